// Small DOM helpers shared by the pages.

// h("div", {class: "x", onclick: fn}, child, ...): children are nodes, strings or arrays.
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

export function replace(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export function errorBox(error) {
  return h("div", { class: "error", role: "alert" }, error.message || String(error));
}

export function credits(n) {
  return n === null || n === undefined ? "" : `${n} credit${n === 1 ? "" : "s"}`;
}

export function costLine(n) {
  return h("div", { class: "cost" }, "Cost: ", h("strong", { class: "cost-value" }, credits(n)));
}

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

export function progressBar(fraction, label = "") {
  const pct = Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)));
  return h(
    "div",
    { class: "progress", role: "progressbar", "aria-valuenow": String(pct), "aria-valuemin": "0", "aria-valuemax": "100" },
    h("div", { class: "bar", style: `width: ${pct}%` }),
    h("span", { class: "label" }, `${pct}%${label ? ` · ${label}` : ""}`),
  );
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

let viewerLoaded = null;

// <model-viewer> (vendored, loaded on first use).
export async function glbViewer(url) {
  viewerLoaded ||= import("/console/static/vendor/model-viewer/model-viewer.min.js");
  await viewerLoaded;
  return h("model-viewer", {
    src: url,
    "camera-controls": true,
    "auto-rotate": true,
    "shadow-intensity": "0.6",
    alt: "3D model",
  });
}

// The right preview for a media URL (by its extension).
export function mediaPreview(url, { glb = false } = {}) {
  if (!url) return null;
  const path = url.split("?")[0].toLowerCase();
  if (/\.(png|jpe?g|webp|gif)$/.test(path)) return h("img", { src: url, alt: "output", loading: "lazy" });
  if (/\.(mp4|webm|mov)$/.test(path)) return h("video", { src: url, controls: true, muted: true, preload: "metadata" });
  if (/\.(wav|mp3|ogg|flac)$/.test(path)) return h("audio", { src: url, controls: true, preload: "metadata" });
  if (path.endsWith(".glb") && glb) {
    const holder = h("div", { class: "glb" }, "Loading the 3D viewer…");
    glbViewer(url).then((viewer) => replace(holder, viewer));
    return holder;
  }
  return h("a", { href: url, target: "_blank", rel: "noopener" }, "Open the output");
}

// A table from rows and [title, row => cell] columns.
export function table(rows, columns, { empty = "Nothing yet." } = {}) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map(([title]) => h("th", {}, title)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row)))))),
  );
}

export function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", {}, label), input, hint ? h("small", { class: "muted" }, hint) : null);
}
