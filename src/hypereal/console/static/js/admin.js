// Admin (admin keys only): accounts, keys and their limits, credit grants, the audit log.
import { api, ApiError } from "./api.js";
import { credits, errorBox, field, h, replace, table, when } from "./ui.js";

const BUDGETS = [
  ["dailyBudget", "Daily budget"],
  ["monthlyBudget", "Monthly budget"],
  ["maxBudget", "Total budget"],
];

const dash = (value) => (value === null || value === undefined || value === "" ? "—" : value);

function numberInput(id, placeholder = "no limit") {
  return h("input", { id, type: "number", min: 0, placeholder });
}

// The limit fields of a key, for the create and the edit forms.
function limitFields(prefix, key = {}) {
  const inputs = {
    rateLimitPerHour: numberInput(`${prefix}-rate`, "server default"),
    models: h("input", { id: `${prefix}-models`, type: "text", placeholder: "every model (or: audio-tts, chat-*)" }),
    expiresAt: h("input", { id: `${prefix}-expires`, type: "datetime-local" }),
  };
  for (const [name] of BUDGETS) inputs[name] = numberInput(`${prefix}-${name}`);
  if (key.rateLimitPerHour) inputs.rateLimitPerHour.value = key.rateLimitPerHour;
  if (key.models) inputs.models.value = key.models.join(", ");
  if (key.expiresAt) {
    const local = new Date(new Date(key.expiresAt).getTime() - new Date().getTimezoneOffset() * 60000);
    inputs.expiresAt.value = local.toISOString().slice(0, 16);
  }
  for (const [name] of BUDGETS) if (key[name] !== null && key[name] !== undefined) inputs[name].value = key[name];
  const nodes = [
    field("Requests per hour", inputs.rateLimitPerHour),
    field("Models allowed", inputs.models, "slugs or patterns, comma separated; empty: every model"),
    field("Expires", inputs.expiresAt, "your local time; empty: never"),
    ...BUDGETS.map(([name, label]) => field(`${label} (credits)`, inputs[name])),
  ];
  // The JSON fields; `clear` sends null for an emptied field (PATCH), else leaves it out.
  const values = (clear) => {
    const body = {};
    const set = (name, value) => {
      if (value !== null) body[name] = value;
      else if (clear) body[name] = null;
    };
    set("rateLimitPerHour", inputs.rateLimitPerHour.value ? Number(inputs.rateLimitPerHour.value) : null);
    const models = inputs.models.value.split(",").map((m) => m.trim()).filter(Boolean);
    set("models", models.length ? models : null);
    set("expiresAt", inputs.expiresAt.value ? new Date(inputs.expiresAt.value).toISOString() : null);
    for (const [name] of BUDGETS) set(name, inputs[name].value === "" ? null : Number(inputs[name].value));
    return body;
  };
  return { nodes, values };
}

// The fields of a PATCH that differ from the key's (so the audit log names only those).
function changed(key, body) {
  const same = (name, value) => {
    const now = key[name] ?? null;
    if (name === "expiresAt" && now && value) return new Date(now).getTime() === new Date(value).getTime();
    return JSON.stringify(now) === JSON.stringify(value);
  };
  return Object.fromEntries(Object.entries(body).filter(([name, value]) => !same(name, value)));
}

function budgetCell(key) {
  const spend = key.spend || {};
  const parts = [
    ["day", key.dailyBudget],
    ["month", key.monthlyBudget],
    ["total", key.maxBudget],
  ]
    .filter(([, limit]) => limit !== null && limit !== undefined)
    .map(([period, limit]) => `${period}: ${spend[period] ?? 0}/${limit}`);
  return parts.length ? parts.join(" · ") : "—";
}

export async function render(page, ctx) {
  const accountsBox = h("div", { id: "accounts" });
  const keysBox = h("div", { id: "keys" });
  const auditBox = h("div", { id: "audit" });
  const secretBox = h("div", { id: "new-key" });
  const accountFilter = h("select", { id: "keys-account", onchange: () => loadKeys() });
  let accounts = [];

  // ---- accounts
  async function loadAccounts() {
    accounts = (await api("/admin/accounts")).data;
    const current = accountFilter.value;
    replace(accountFilter, h("option", { value: "" }, "all accounts"), accounts.map((a) => h("option", { value: a.accountId }, `${a.name || "(no name)"} · ${a.accountId}`)));
    accountFilter.value = current;
    replace(keyAccount, h("option", { value: "" }, "a new account"), accounts.map((a) => h("option", { value: a.accountId }, `${a.name || "(no name)"} · ${a.accountId}`)));
    replace(accountsBox, table(accounts, [
      ["Account", (a) => h("code", {}, a.accountId)],
      ["Name", (a) => a.name],
      ["Admin", (a) => (a.isAdmin ? "yes" : "")],
      ["Balance", (a) => h("span", { class: "account-balance" }, credits(a.balance))],
      ["Created", (a) => when(a.createdAt)],
      ["Grant credits", (a) => grantForm(a)],
    ]));
  }

  function grantForm(account) {
    const amount = h("input", { type: "number", min: 1, placeholder: "amount", class: "narrow", name: "amount" });
    const problem = h("span", {});
    return h("form", {
      class: "inline",
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          await api(`/admin/accounts/${account.accountId}/credits`, { method: "POST", body: { amount: Number(amount.value) } });
          await Promise.all([loadAccounts(), loadAudit(), ctx.refreshBalance()]);
        } catch (err) {
          replace(problem, errorBox(err));
        }
      },
    }, amount, h("button", { type: "submit" }, "Grant"), problem);
  }

  const newAccount = (() => {
    const name = h("input", { id: "account-name", type: "text", placeholder: "name" });
    const start = numberInput("account-credits", "0");
    const admin = h("input", { id: "account-admin", type: "checkbox" });
    const problem = h("div", {});
    return h("form", {
      class: "row",
      onsubmit: async (event) => {
        event.preventDefault();
        replace(problem);
        try {
          await api("/admin/accounts", { method: "POST", body: { name: name.value, credits: Number(start.value || 0), isAdmin: admin.checked } });
          name.value = "";
          await Promise.all([loadAccounts(), loadAudit()]);
        } catch (err) {
          replace(problem, errorBox(err));
        }
      },
    }, field("Name", name), field("Credits", start), h("label", { class: "check" }, admin, "admin"), h("button", { type: "submit" }, "Create account"), problem);
  })();

  // ---- keys
  const keyAccount = h("select", { id: "key-account" });
  const keyName = h("input", { id: "key-name", type: "text", placeholder: "who or what uses it" });
  const keyCredits = numberInput("key-credits", "0");
  const createLimits = limitFields("key");
  const createProblem = h("div", {});
  const createForm = h("form", {
    id: "create-key",
    class: "card",
    onsubmit: async (event) => {
      event.preventDefault();
      replace(createProblem);
      const body = { name: keyName.value, ...createLimits.values(false) };
      if (keyAccount.value) body.accountId = keyAccount.value;
      else if (keyCredits.value) body.credits = Number(keyCredits.value);
      try {
        const created = await api("/admin/keys", { method: "POST", body });
        replace(secretBox, h("div", { class: "secret card" },
          h("h3", {}, `Key "${created.name || created.id}" created`),
          h("p", {}, "Its secret is shown this once: copy it now."),
          h("code", { id: "new-key-secret" }, created.key),
          h("button", { type: "button", class: "ghost", onclick: (e) => navigator.clipboard?.writeText(created.key).then(() => { e.target.textContent = "Copied"; }) }, "Copy"),
          h("button", { type: "button", class: "ghost", onclick: () => replace(secretBox) }, "Done"),
        ));
        keyName.value = "";
        await Promise.all([loadAccounts(), loadKeys(), loadAudit()]);
      } catch (err) {
        replace(createProblem, errorBox(err));
      }
    },
  },
  h("h3", {}, "Create a key"),
  h("div", { class: "form-grid" }, field("Account", keyAccount), field("Name", keyName), field("Credits for a new account", keyCredits), createLimits.nodes),
  h("button", { type: "submit", id: "create-key-submit" }, "Create key"),
  createProblem);

  function editForm(key, row) {
    const limits = limitFields(`edit-${key.id}`, key);
    const problem = h("div", {});
    return h("form", {
      class: "card edit-key",
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          const body = changed(key, limits.values(true));
          if (Object.keys(body).length) await api(`/admin/keys/${key.id}`, { method: "PATCH", body });
          await Promise.all([loadKeys(), loadAudit()]);
        } catch (err) {
          replace(problem, errorBox(err));
        }
      },
    }, h("div", { class: "form-grid" }, limits.nodes), h("div", { class: "row" }, h("button", { type: "submit" }, "Save"), h("button", { type: "button", class: "ghost", onclick: () => row.remove() }, "Close")), problem);
  }

  function keyActions(key) {
    if (!key.active) return h("span", { class: "muted" }, `revoked ${when(key.revokedAt)}`);
    const revoke = h("button", {
      type: "button",
      class: "danger revoke",
      onclick: async () => {
        if (!revoke.classList.contains("confirm")) {
          revoke.classList.add("confirm");
          revoke.textContent = "Confirm revoke";
          return;
        }
        revoke.disabled = true;
        try {
          await api(`/admin/keys/${key.id}/revoke`, { method: "POST" });
          await Promise.all([loadKeys(), loadAudit()]);
        } catch (err) {
          revoke.after(errorBox(err));
        }
      },
    }, "Revoke");
    const edit = h("button", {
      type: "button",
      class: "ghost",
      onclick: (event) => {
        const tr = event.target.closest("tr");
        if (tr.nextElementSibling?.classList.contains("edit-row")) return tr.nextElementSibling.remove();
        const row = h("tr", { class: "edit-row" });
        row.append(h("td", { colSpan: 9 }, editForm(key, row)));
        tr.after(row);
      },
    }, "Limits");
    return h("div", { class: "row" }, edit, revoke);
  }

  async function loadKeys() {
    const query = accountFilter.value ? `?accountId=${encodeURIComponent(accountFilter.value)}` : "";
    const keys = (await api(`/admin/keys${query}`)).data;
    replace(keysBox, table(keys, [
      ["Name", (k) => h("span", { class: "key-name" }, k.name || "(no name)")],
      ["Key", (k) => h("code", {}, `${k.prefix}…`)],
      ["Account", (k) => h("code", {}, k.accountId)],
      ["Per hour", (k) => dash(k.rateLimitPerHour)],
      ["Models", (k) => (k.models ? k.models.join(", ") : "all")],
      ["Expires", (k) => (k.expiresAt ? `${when(k.expiresAt)}${k.expired ? " (expired)" : ""}` : "never")],
      ["Budget (spent/limit)", budgetCell],
      ["Status", (k) => h("span", { class: `badge ${k.active ? "status-completed" : "status-canceled"} key-status` }, k.active ? "active" : "revoked")],
      ["", keyActions],
    ], { empty: "No keys." }));
    for (const [index, key] of keys.entries()) keysBox.querySelectorAll("tbody tr")[index].dataset.keyId = key.id;
  }

  // ---- audit log
  async function loadAudit(cursor) {
    let answer;
    try {
      answer = await api(`/admin/audit?limit=25${cursor ? `&before=${cursor}` : ""}`);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return replace(auditBox, h("p", { class: "muted" }, "This server keeps no audit log."));
      throw err;
    }
    const rows = table(answer.data, [
      ["When", (e) => when(e.at)],
      ["Action", (e) => h("span", { class: "badge" }, e.action)],
      ["By", (e) => (e.actorKeyId ? h("code", {}, e.actorKeyId) : e.details?.actor || "—")],
      ["Target", (e) => (e.targetId ? h("code", {}, `${e.targetType} ${e.targetId}`) : "—")],
      ["Account", (e) => (e.accountId ? h("code", {}, e.accountId) : "")],
      ["Details", (e) => h("code", { class: "details" }, JSON.stringify(e.details || {}))],
    ], { empty: "No admin action recorded yet." });
    const older = answer.hasMore ? h("button", { type: "button", class: "ghost", onclick: () => loadAudit(answer.nextCursor) }, "Older") : null;
    const newer = cursor ? h("button", { type: "button", class: "ghost", onclick: () => loadAudit() }, "Newest") : null;
    replace(auditBox, rows, h("div", { class: "row" }, newer, older));
  }

  page.append(
    h("h1", {}, "Admin"),
    h("div", { class: "card" }, h("h2", {}, "Accounts"), newAccount, accountsBox),
    h("div", { class: "card" }, h("h2", {}, "Keys"), secretBox, createForm, h("div", { class: "row" }, field("Show keys of", accountFilter)), keysBox),
    h("div", { class: "card" }, h("h2", {}, "Audit log"), auditBox),
  );
  await loadAccounts();
  await Promise.all([loadKeys(), loadAudit().catch((err) => replace(auditBox, errorBox(err)))]);
}
