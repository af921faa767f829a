// Overview: the balance, credits by model per day, and the latest ledger entries.
import { api, ApiError } from "./api.js";
import { creditsChart } from "./chart.js";
import { credits, errorBox, h, replace, table, when } from "./ui.js";

const DAYS = 14;

function lastDays(n) {
  const days = [];
  const today = new Date();
  for (let i = n - 1; i >= 0; i--) {
    const d = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - i));
    days.push(d.toISOString().slice(0, 10));
  }
  return days;
}

// Net credits by day and model: GET /v1/usage/summary, or (on a server without it) the
// ledger's debits and refunds, each named by its model.
async function spending(days) {
  const query = new URLSearchParams({ groupBy: "day,model", from: days[0], to: days[days.length - 1] });
  try {
    const summary = await api(`/usage/summary?${query}`);
    return summary.data.map((r) => ({ day: r.day, model: r.model, credits: r.credits }));
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 404) throw err;
  }
  const ledger = await api("/usage?limit=200");
  return ledger.data
    .filter((e) => e.type === "debit" || e.type === "refund")
    .map((e) => ({
      day: (e.createdAt || "").slice(0, 10),
      model: e.model || (e.description || "").split(" ")[1] || null,
      credits: -e.amount,
    }));
}

function signed(n) {
  return n > 0 ? `+${n}` : String(n);
}

export async function render(page, ctx) {
  const balance = h("div", { class: "big", id: "balance" }, "…");
  const chart = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const usage = h("div", { id: "recent-usage" }, h("p", { class: "muted" }, "Loading…"));
  page.append(
    h("h1", {}, "Overview"),
    h(
      "div",
      { class: "grid-2" },
      h("div", { class: "card" }, h("h2", {}, "Balance"), balance, h("p", { class: "muted" }, ctx.isAdmin ? "The account of this admin key" : "The account of this key")),
      h("div", { class: "card wide" }, h("h2", {}, `Credits by model, last ${DAYS} days`), chart),
    ),
    h("div", { class: "card" }, h("h2", {}, "Recent usage"), usage),
  );
  const days = lastDays(DAYS);
  const [credit, rows, ledger] = await Promise.allSettled([ctx.refreshBalance(), spending(days), api("/usage?limit=15")]);
  if (credit.status === "fulfilled") replace(balance, credits(credit.value.balance));
  else replace(balance, errorBox(credit.reason));
  if (rows.status === "fulfilled") replace(chart, creditsChart(rows.value, days));
  else replace(chart, errorBox(rows.reason));
  if (ledger.status === "fulfilled") {
    replace(
      usage,
      table(ledger.value.data, [
        ["When", (e) => when(e.createdAt)],
        ["Type", (e) => h("span", { class: `badge entry-${e.type}` }, e.type)],
        ["Credits", (e) => h("span", { class: e.amount < 0 ? "neg" : "pos" }, signed(e.amount))],
        ["Balance after", (e) => e.balanceAfter],
        ["Model", (e) => e.model || ""],
        ["Description", (e) => e.description],
      ], { empty: "No usage yet." }),
    );
  } else replace(usage, errorBox(ledger.reason));
}
