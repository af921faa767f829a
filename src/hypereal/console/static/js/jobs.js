// Jobs: the caller's jobs as a gallery, kept live while any runs, with each job's webhook
// deliveries on demand.
import { api, ended } from "./api.js";
import { credits, errorBox, glbViewer, h, mediaPreview, progressBar, replace, statusBadge, when } from "./ui.js";

const TYPES = ["", "video", "audio", "3d", "image"];
const PAGE = 24;

// Each delivery as a short block (the cards are narrow): state, URL, then every attempt.
function deliveriesList(deliveries) {
  if (!deliveries.length) return h("p", { class: "muted" }, "No webhook for this job (submit with webhook_url to get one).");
  return h(
    "ul",
    { class: "delivery-list" },
    deliveries.map((d) =>
      h(
        "li",
        {},
        h("div", {}, statusBadge(d.status), ` ${d.event} · ${d.attempts} attempt${d.attempts === 1 ? "" : "s"}`),
        h("code", {}, d.url),
        d.nextAttemptAt && d.status !== "delivered" ? h("div", { class: "muted" }, `next try ${when(d.nextAttemptAt)}`) : null,
        h("ol", { class: "attempts" }, d.attemptLog.map((a) => h("li", {}, `${when(a.at)} · ${a.statusCode ? `HTTP ${a.statusCode}` : a.error || "no answer"} · ${a.durationMs ?? "?"} ms`))),
      ),
    ),
  );
}

function card(job) {
  const deliveries = h("div", { class: "deliveries" });
  const actions = h("div", { class: "row" });
  if (!ended(job)) {
    actions.append(h("button", {
      type: "button",
      class: "ghost",
      onclick: async (event) => {
        event.target.disabled = true;
        try {
          await api(`/jobs/${job.jobId}/cancel`, { method: "POST" });
        } catch (err) {
          deliveries.append(errorBox(err));
        }
      },
    }, "Cancel"));
  }
  actions.append(h("button", {
    type: "button",
    class: "ghost",
    onclick: async () => {
      if (deliveries.childElementCount) return replace(deliveries);
      replace(deliveries, h("p", { class: "muted" }, "Loading…"));
      try {
        const answer = await api(`/jobs/${job.jobId}/deliveries`);
        replace(deliveries, h("h3", {}, "Webhook deliveries"), deliveriesList(answer.data));
      } catch (err) {
        replace(deliveries, errorBox(err));
      }
    },
  }, "Webhooks"));
  let preview = null;
  if (job.status === "completed" && typeof job.result?.text === "string") {
    preview = h("blockquote", { class: "transcript" }, job.result.text || "(no speech recognised)");
  } else if (job.status === "completed" && job.outputUrl) {
    if (job.outputUrl.split("?")[0].toLowerCase().endsWith(".glb")) {
      preview = h("div", { class: "glb-slot" }, h("button", {
        type: "button",
        onclick: async (event) => replace(event.target.parentNode, await glbViewer(job.outputUrl)),
      }, "View in 3D"));
    } else {
      preview = mediaPreview(job.outputUrl);
    }
  }
  return h(
    "article",
    { class: `job-card card status-${job.status}`, dataset: { jobId: job.jobId } },
    h("header", {}, h("strong", { title: job.model }, job.model), statusBadge(job.status)),
    !ended(job) ? progressBar(job.progress, job.stage || "") : null,
    h("div", { class: "job-preview" }, preview),
    job.error ? h("div", { class: "error" }, job.error) : null,
    h("dl", { class: "meta" },
      h("dt", {}, "Type"), h("dd", {}, job.type),
      h("dt", {}, "Cost"), h("dd", {}, credits(job.creditsUsed)),
      h("dt", {}, "Created"), h("dd", {}, when(job.createdAt)),
      h("dt", {}, "Id"), h("dd", {}, h("code", {}, job.jobId)),
    ),
    actions,
    deliveries,
  );
}

const fingerprint = (job) => `${job.status}|${job.progress}|${job.stage}|${job.outputUrl}|${job.error}`;

export async function render(page, ctx) {
  let type = "";
  let changes = 0;
  let timer = null;
  let alive = true;
  const shown = new Map(); // jobId -> [fingerprint, card]
  const gallery = h("div", { class: "gallery", id: "jobs-gallery" });
  const more = h("div", {});
  const filter = h("select", { id: "jobs-type", onchange: () => { type = filter.value; reload(); } },
    TYPES.map((t) => h("option", { value: t }, t || "all types")));
  page.append(h("h1", {}, "Jobs"), h("div", { class: "row toolbar" }, filter, h("span", { class: "muted" }, "Live: running jobs update on their own.")), gallery, more);

  function put(job, at) {
    const known = shown.get(job.jobId);
    const print = fingerprint(job);
    if (known && known[0] === print) return known[1];
    changes += 1;
    const node = card(job);
    if (known) known[1].replaceWith(node);
    else if (at === "end") gallery.append(node);
    else gallery.prepend(node);
    shown.set(job.jobId, [print, node]);
    return node;
  }

  async function loadMore(cursor) {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (type) query.set("type", type);
    if (cursor) query.set("before", cursor);
    const answer = await api(`/jobs?${query}`);
    for (const job of answer.data) put(job, "end");
    replace(more, answer.hasMore ? h("button", { type: "button", class: "ghost", onclick: () => loadMore(answer.nextCursor) }, "Older jobs") : null);
    if (!gallery.childElementCount) replace(gallery, h("p", { class: "muted", id: "jobs-empty" }, "No jobs yet: try the Playground."));
  }

  // Refresh the newest page (new jobs appear first) and every running job shown.
  async function refresh() {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (type) query.set("type", type);
    const answer = await api(`/jobs?${query}`);
    document.getElementById("jobs-empty")?.remove();
    for (const job of [...answer.data].reverse()) put(job, shown.has(job.jobId) ? "" : "start");
    const newest = new Set(answer.data.map((j) => j.jobId));
    const running = [...shown.entries()].filter(([id, [print]]) => !newest.has(id) && /^(processing|queued)/.test(print));
    for (const [id] of running) put(await api(`/jobs/${id}`));
    if (changes) ctx.refreshBalance().catch(() => {}); // a failed job was refunded, a new one paid
    changes = 0;
  }

  function schedule() {
    if (!alive) return;
    const busy = [...shown.values()].some(([print]) => /^(processing|queued)/.test(print));
    timer = setTimeout(async () => {
      try {
        await refresh();
      } catch (err) {
        console.warn(err);
      }
      schedule();
    }, busy ? 1000 : 5000);
  }

  async function reload() {
    clearTimeout(timer);
    shown.clear();
    replace(gallery);
    try {
      await loadMore(null);
    } catch (err) {
      replace(gallery, errorBox(err));
    }
    schedule();
  }

  await reload();
  return () => {
    alive = false;
    clearTimeout(timer);
  };
}
