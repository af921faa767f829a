// The HTTP layer of the console: the API key (sessionStorage only), JSON calls with
// "Authorization: Bearer", server-sent events, and files as data: URIs.

const KEY = "hypereal.apiKey";

export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    super(errorMessage(status, body));
    this.status = status;
    this.body = body;
  }
}

// The human message of any of the API's error shapes (ours, OpenAI's, Anthropic's).
export function errorMessage(status, body) {
  let text = `HTTP ${status}`;
  if (body && typeof body.error === "string") text = body.error;
  else if (body && body.error && typeof body.error.message === "string") text = body.error.message;
  else if (body && typeof body.detail === "string") text = body.detail;
  if (body && body.required !== undefined && body.available !== undefined) {
    text += `: ${body.required} credits required, ${body.available} available`;
  }
  return text;
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.key() || ""}`, ...extra };
}

async function readBody(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return { error: text };
  }
}

// Calls /v1 + path; answers the parsed JSON, throws ApiError on a non-2xx answer.
export async function api(path, { method = "GET", body, signal, extraHeaders } = {}) {
  const init = { method, headers: headers(extraHeaders), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(`/v1${path}`, init);
  const data = await readBody(response);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// POSTs and answers the open Response of a stream (for chat); throws ApiError before it.
export async function stream(path, body, signal) {
  const response = await fetch(`/v1${path}`, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new ApiError(response.status, await readBody(response));
  return response;
}

// The data of each server-sent event of a response, as it arrives.
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

export function dataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

const ENDED = new Set(["completed", "failed", "canceled"]);

export function ended(job) {
  return ENDED.has(job.status);
}

// Polls a job until it ends, calling onUpdate with each state; answers the last one.
export async function watchJob(jobId, onUpdate, { interval = 400, isLive = () => true } = {}) {
  for (;;) {
    const job = await api(`/jobs/${encodeURIComponent(jobId)}`);
    onUpdate(job);
    if (ended(job) || !isLive()) return job;
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
}

let modelsCache = null;

// The catalogue (GET /v1/models), fetched once per page load.
export async function models() {
  if (!modelsCache) modelsCache = api("/models").catch((err) => {
    modelsCache = null;
    throw err;
  });
  return modelsCache;
}
