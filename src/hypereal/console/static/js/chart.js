// Credits by model per day: a stacked bar chart drawn as SVG (no library).
import { h } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#4f7cff", "#f28b30", "#2fb380", "#d9487c", "#8a63d2", "#e0b020", "#3bb6c9", "#7d8597"];

function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child);
  return node;
}

// rows: [{day: "2026-12-05", model: "audio-tts", credits: 3}, ...]; days: every day shown.
export function creditsChart(rows, days) {
  const models = [...new Set(rows.map((r) => r.model || "other"))].sort();
  const colour = Object.fromEntries(models.map((m, i) => [m, COLOURS[i % COLOURS.length]]));
  const byDay = new Map(days.map((d) => [d, new Map()]));
  for (const row of rows) {
    const day = byDay.get(row.day);
    if (!day) continue;
    const model = row.model || "other";
    day.set(model, (day.get(model) || 0) + row.credits);
  }
  const totals = days.map((d) => [...byDay.get(d).values()].reduce((a, b) => a + b, 0));
  // A round top for the axis, so that its three labels are whole numbers.
  const peak = Math.max(1, ...totals);
  const unit = 10 ** Math.max(0, Math.floor(Math.log10(peak)) - 1);
  const top = Math.ceil(peak / (2 * unit)) * 2 * unit;
  const width = 720, height = 240, left = 44, bottom = 28, plotH = height - bottom - 10;
  const step = (width - left - 8) / days.length;
  const bar = Math.max(2, step * 0.7);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": "Credits by model per day" });
  for (const frac of [0, 0.5, 1]) {
    const y = 10 + plotH * (1 - frac);
    svg.append(s("line", { x1: left, x2: width - 4, y1: y, y2: y, class: "grid" }));
    svg.append(s("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, String(Math.round(top * frac))));
  }
  days.forEach((day, i) => {
    const x = left + i * step + (step - bar) / 2;
    let y = 10 + plotH;
    for (const model of models) {
      const value = byDay.get(day).get(model) || 0;
      if (!value) continue;
      const barH = (value / top) * plotH;
      y -= barH;
      const rect = s("rect", { x, y, width: bar, height: barH, fill: colour[model] });
      rect.append(s("title", {}, `${day} · ${model}: ${value} credits`));
      svg.append(rect);
    }
    if (days.length <= 16 || i % Math.ceil(days.length / 10) === 0) {
      svg.append(s("text", { x: x + bar / 2, y: height - 10, "text-anchor": "middle", class: "axis" }, day.slice(5)));
    }
  });
  const legend = h(
    "ul",
    { class: "legend" },
    models.map((m) => h("li", {}, h("span", { class: "swatch", style: `background:${colour[m]}` }), m)),
  );
  return h("figure", { class: "chart-box", id: "credits-chart" }, svg, models.length ? legend : h("p", { class: "muted" }, "No spending in this period."));
}
