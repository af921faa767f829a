// Playground: one panel per modality, each calling the public API as any client would.
import { api, dataUri, ended, events, models, stream, watchJob } from "./api.js";
import { costLine, errorBox, field, glbViewer, h, progressBar, replace, statusBadge, table } from "./ui.js";

const TABS = [
  ["chat", "Chat"],
  ["image", "Image"],
  ["tts", "Text to speech"],
  ["stt", "Speech to text"],
  ["video", "Video"],
  ["3d", "3D"],
];

const hasParam = (model, name) => (model.params || []).some((p) => p.name === name);

function priceText(price) {
  if (!price) return "";
  if (price.kind === "fixed") return `${price.credits} credits`;
  if (price.kind === "per_second") return `${price.credits_per_second} credits per second of output, at least ${price.minimum}`;
  if (price.kind === "per_token") return `${price.base_credits} credits per message sent, plus the tokens ($${price.input_usd_per_million} / $${price.output_usd_per_million} per million in / out)`;
  return JSON.stringify(price);
}

// A <select> of the catalogue's models that `accept` keeps, served ones first; the others
// are listed disabled with the reason.
function modelSelect(catalogue, accept, preferred, id) {
  const chosen = catalogue.data.filter(accept).sort((a, b) => Number(b.available) - Number(a.available));
  const served = chosen.filter((m) => m.available);
  const pick = served.find((m) => preferred.includes(m.slug)) || served[0];
  const select = h(
    "select",
    { id, name: "model" },
    served.length ? null : h("option", { value: "", selected: true }, "none served here"),
    chosen.map((m) =>
      h("option", { value: m.slug, disabled: !m.available, selected: m === pick, title: m.unavailableReason || m.description || "" },
        m.available ? `${m.slug} — ${m.name}` : `${m.slug} (not served here)`),
    ),
  );
  const price = h("span", { class: "price", id: `${id}-price` });
  const showPrice = () => {
    const model = chosen.find((m) => m.slug === select.value);
    price.textContent = model ? `Price: ${priceText(model.price)}` : "";
  };
  select.addEventListener("change", showPrice);
  showPrice();
  const note = served.length ? null : h("p", { class: "muted" }, "No model of this kind is served by this server's backends: configure one (README, Backends).");
  return { select, note, served, price };
}

// The form's submit button, disabled when no model of its kind is served.
function submitButton(id, label, served) {
  return h("button", { type: "submit", id, disabled: !served.length }, label);
}

// Submits a job and follows it: onUpdate(job) after the submission and each poll.
async function runJob(route, body, onUpdate, isLive) {
  const submitted = await api(route, { method: "POST", body });
  onUpdate(submitted);
  if (ended(submitted)) return submitted;
  return watchJob(submitted.jobId, onUpdate, { isLive });
}

// An audio job, its status shown in `status`; throws unless it completed.
async function runAudio(body, status, isLive) {
  const job = await runJob("/audio/generate", body, (j) => replace(status, statusBadge(j.status)), isLive);
  if (job.status !== "completed") throw new Error(job.error || `Job ${job.status}`);
  return job;
}

function jobFailure(job) {
  return errorBox(new Error(`Job ${job.status}: ${job.error || "no output"}`));
}

function busy(button, on) {
  button.disabled = on;
  button.classList.toggle("busy", on);
}

let refreshBalance = () => Promise.resolve();

// A request ended: the button works again, and the top bar shows the balance left.
function done(button) {
  busy(button, false);
  refreshBalance().catch(() => {});
}

// A card form whose submit clears `status` and the `clear` nodes, then runs `work` with
// `submit` busy; an error shows in `status` (replacing it, or after it with `appendError`).
function cardForm({ submit, status, clear = [], appendError = false }, work, ...children) {
  return h(
    "form",
    {
      class: "card",
      onsubmit: async (event) => {
        event.preventDefault();
        replace(status);
        for (const node of clear) replace(node);
        busy(submit, true);
        try {
          await work();
        } catch (err) {
          if (appendError) status.append(errorBox(err));
          else replace(status, errorBox(err));
        } finally {
          done(submit);
        }
      },
    },
    ...children,
  );
}

function chatPanel(catalogue, live) {
  const { select, note, served, price } = modelSelect(catalogue, (m) => m.modality === "chat", [catalogue.defaults?.chat, "smollm2-135m-instruct"], "chat-model");
  const prompt = h("textarea", { id: "chat-input", rows: 3, placeholder: "Ask something…" });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 4096, value: "80" });
  const log = h("div", { class: "chat-log", id: "chat-log" });
  const status = h("div", { id: "chat-status" });
  const history = [];
  let controller = null;
  const send = submitButton("chat-send", "Send", served);
  const stop = h("button", { type: "button", class: "ghost", onclick: () => controller && controller.abort() }, "Stop");
  const form = h(
    "form",
    {
      class: "card",
      onsubmit: async (event) => {
        event.preventDefault();
        const text = prompt.value.trim();
        if (!text) return;
        history.push({ role: "user", content: text });
        log.append(h("div", { class: "msg user" }, text));
        const answer = h("div", { class: "msg assistant streaming", id: `answer-${history.length}` });
        log.append(answer);
        prompt.value = "";
        replace(status);
        busy(send, true);
        controller = new AbortController();
        let content = "";
        try {
          const response = await stream("/chat", { model: select.value, messages: history, stream: true, max_tokens: Number(maxTokens.value) || 80 }, controller.signal);
          for await (const data of events(response)) {
            if (data === "[DONE]" || !live()) break;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
            const delta = chunk.choices?.[0]?.delta?.content;
            if (delta) {
              content += delta;
              answer.textContent = content;
              log.scrollTop = log.scrollHeight;
            }
            if (chunk.creditsUsed !== undefined) replace(status, costLine(chunk.creditsUsed));
          }
          history.push({ role: "assistant", content });
        } catch (err) {
          if (err.name !== "AbortError") status.append(errorBox(err));
          history.pop();
        } finally {
          answer.classList.remove("streaming");
          answer.classList.add("done");
          done(send);
        }
      },
    },
    h("h2", {}, "Chat"),
    note,
    h("div", { class: "row" }, field("Model", select, price), field("Max tokens", maxTokens)),
    log,
    field("Message", prompt),
    h("div", { class: "row" }, send, stop),
    status,
  );
  return form;
}

function fileInput(id, accept, preview) {
  return h("input", {
    id,
    type: "file",
    accept,
    onchange: (event) => {
      const file = event.target.files[0];
      if (preview && file) replace(preview, h("img", { src: URL.createObjectURL(file), alt: "input" }));
    },
  });
}

function imageForm(catalogue, { id, title, modalities, preferred, withImage, defaultPrompt, route }) {
  const { select, note, served, price } = modelSelect(catalogue, (m) => modalities.includes(m.modality), preferred, `${id}-model`);
  const prompt = h("input", { id: `${id}-prompt`, type: "text", value: defaultPrompt });
  const inputPreview = h("div", { class: "preview small" });
  const file = withImage ? fileInput(`${id}-image`, "image/*", inputPreview) : null;
  const result = h("div", { class: "preview", id: `${id}-result` });
  const status = h("div", {});
  const submit = submitButton(`${id}-submit`, title, served);
  return cardForm(
    { submit, status },
    async () => {
      const body = { model: select.value, prompt: prompt.value };
      if (withImage) {
        if (!file.files[0]) throw new Error("Choose an image first.");
        body.image = await dataUri(file.files[0]);
      }
      const answer = await api(route, { method: "POST", body });
      replace(result, answer.data.map((d) => h("img", { src: d.url, alt: "result", class: "result-image" })));
      replace(status, costLine(answer.creditsUsed));
    },
    h("h2", {}, title),
    note,
    field("Model", select, price),
    withImage ? h("div", { class: "row" }, field("Image", file), inputPreview) : null,
    field("Prompt", prompt),
    submit,
    status,
    result,
  );
}

function imagePanel(catalogue) {
  return h(
    "div",
    { class: "grid-2" },
    imageForm(catalogue, { id: "gen", title: "Generate", modalities: ["image"], preferred: [], withImage: false, defaultPrompt: "a lighthouse at dawn", route: "/images/generate" }),
    imageForm(catalogue, { id: "edit", title: "Edit", modalities: ["image-edit"], preferred: ["background-removal"], withImage: true, defaultPrompt: "remove background", route: "/images/edit" }),
  );
}

function ttsPanel(catalogue, live) {
  const { select, note, served, price } = modelSelect(catalogue, (m) => m.modality === "audio" && hasParam(m, "text") && !hasParam(m, "audio"), ["audio-tts"], "tts-model");
  const text = h("textarea", { id: "tts-text", rows: 3 }, "Hello from the hypereal console.");
  const result = h("div", { id: "tts-result" });
  const status = h("div", {});
  const submit = submitButton("tts-submit", "Speak", served);
  return cardForm(
    { submit, status, clear: [result] },
    async () => {
      const job = await runAudio({ model: select.value, input: { text: text.value } }, status, live);
      replace(result, h("audio", { id: "tts-audio", src: job.outputUrl, controls: true, preload: "auto" }));
      replace(status, costLine(job.creditsUsed));
    },
    h("h2", {}, "Text to speech"),
    note,
    field("Model", select, price),
    field("Text", text),
    submit,
    status,
    result,
  );
}

function sttPanel(catalogue, live) {
  const { select, note, served, price } = modelSelect(catalogue, (m) => m.modality === "audio" && hasParam(m, "audio") && !hasParam(m, "text"), ["audio-asr"], "stt-model");
  const file = h("input", { id: "stt-file", type: "file", accept: "audio/*" });
  const result = h("div", { id: "stt-result" });
  const status = h("div", {});
  const submit = submitButton("stt-submit", "Transcribe", served);
  return cardForm(
    { submit, status, clear: [result] },
    async () => {
      if (!file.files[0]) throw new Error("Choose an audio file first.");
      const audio = await dataUri(file.files[0]);
      const job = await runAudio({ model: select.value, input: { audio } }, status, live);
      const words = job.result?.words || [];
      replace(
        result,
        h("blockquote", { id: "stt-text" }, job.result?.text || "(no speech recognised)"),
        table(words, [
          ["Word", (w) => w.word],
          ["Start (s)", (w) => Number(w.start).toFixed(2)],
          ["End (s)", (w) => Number(w.end).toFixed(2)],
        ], { empty: "No word timings." }),
      );
      replace(status, costLine(job.creditsUsed));
    },
    h("h2", {}, "Speech to text"),
    note,
    field("Model", select, price),
    field("Audio file", file, "WAV or MP3; English"),
    submit,
    status,
    result,
  );
}

// Video and 3D: an image in, a job with a live progress bar, then the output.
function jobPanel(catalogue, live, { id, title, modality, preferred, route, extra, show }) {
  const { select, note, served, price } = modelSelect(catalogue, (m) => m.modality === modality && hasParam(m, "image"), preferred, `${id}-model`);
  const inputPreview = h("div", { class: "preview small" });
  const file = fileInput(`${id}-image`, "image/*", inputPreview);
  const progress = h("div", { id: `${id}-progress` });
  const result = h("div", { id: `${id}-result`, class: "preview" });
  const status = h("div", {});
  const submit = submitButton(`${id}-submit`, "Start", served);
  return cardForm(
    { submit, status, clear: [result, progress], appendError: true },
    async () => {
      if (!file.files[0]) throw new Error("Choose an image first.");
      const input = { image: await dataUri(file.files[0]) };
      for (const [name, node] of Object.entries(extra)) if (node.value !== "") input[name] = node.type === "number" ? Number(node.value) : node.value;
      const job = await runJob(route, { model: select.value, input }, (j) => {
        const done = j.status === "completed";
        replace(progress, progressBar(done ? 1 : j.progress, done ? "completed" : j.stage || j.status), h("small", { class: "muted" }, `Job ${j.jobId}`));
        replace(status, costLine(j.creditsUsed));
      }, live);
      if (job.status !== "completed") return replace(status, jobFailure(job), costLine(job.creditsUsed));
      replace(result, await show(job.outputUrl));
    },
    h("h2", {}, title),
    note,
    field("Model", select, price),
    h("div", { class: "row" }, field("Image", file), inputPreview),
    Object.entries(extra).map(([name, node]) => field(name[0].toUpperCase() + name.slice(1), node)),
    submit,
    progress,
    status,
    result,
  );
}

function videoPanel(catalogue, live) {
  return jobPanel(catalogue, live, {
    id: "video",
    title: "Image to video",
    modality: "video",
    preferred: ["camera-motion-i2v"],
    route: "/videos/generate",
    extra: {
      prompt: h("input", { id: "video-prompt", type: "text", value: "slow zoom in" }),
      duration: h("input", { id: "video-duration", type: "number", min: 1, max: 20, value: "2" }),
    },
    show: async (url) => h("video", { id: "video-player", src: url, controls: true, muted: true, autoplay: true, loop: true, playsInline: true }),
  });
}

function threedPanel(catalogue, live) {
  return jobPanel(catalogue, live, {
    id: "mesh",
    title: "Image to 3D",
    modality: "3d",
    preferred: ["relief-3d"],
    route: "/3d/generate",
    extra: {},
    show: async (url) => h("div", { class: "glb" }, await glbViewer(url), h("a", { href: url, download: "" }, "Download the GLB")),
  });
}

const PANELS = { chat: chatPanel, image: imagePanel, tts: ttsPanel, stt: sttPanel, video: videoPanel, "3d": threedPanel };

export async function render(page, ctx, [tab = "chat"]) {
  refreshBalance = ctx.refreshBalance;
  if (!(tab in PANELS)) tab = "chat";
  let alive = true;
  const live = () => alive;
  page.append(
    h("h1", {}, "Playground"),
    h("nav", { class: "tabs" }, TABS.map(([name, label]) => h("a", { href: `#/playground/${name}`, class: name === tab ? "active" : "", id: `tab-${name}` }, label))),
  );
  const catalogue = await models();
  page.append(PANELS[tab](catalogue, live));
  return () => {
    alive = false;
  };
}
