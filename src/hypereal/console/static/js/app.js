// The console's shell: sign-in, navigation (hash routes) and the balance in the top bar.
import { api, ApiError, session } from "./api.js";
import { errorBox, h, replace } from "./ui.js";

const pages = {
  overview: () => import("./overview.js"),
  playground: () => import("./playground.js"),
  jobs: () => import("./jobs.js"),
  admin: () => import("./admin.js"),
};

const view = document.getElementById("view");
const ctx = { isAdmin: false, refreshBalance };
let leave = null; // the current page's clean-up (stops its polling)
let rendering = 0;

async function refreshBalance() {
  try {
    const credits = await api("/credits");
    document.getElementById("who-balance").textContent = `${credits.balance} credits`;
    return credits;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) signOut(err.message);
    throw err;
  }
}

// Is the key an admin's? The admin routes answer 403 to any other key.
async function detectAdmin() {
  try {
    await api("/admin/accounts");
    return true;
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) return false;
    throw err;
  }
}

function signInForm(message) {
  const input = h("input", {
    id: "api-key",
    type: "password",
    placeholder: "ck_...",
    autocomplete: "off",
    required: true,
    spellcheck: "false",
  });
  const problem = h("div", { id: "sign-in-error" }, message ? errorBox(new Error(message)) : null);
  const form = h(
    "form",
    {
      class: "card sign-in",
      id: "sign-in",
      onsubmit: async (event) => {
        event.preventDefault();
        session.signIn(input.value.trim());
        try {
          await start();
        } catch (err) {
          session.signOut();
          replace(problem, errorBox(err));
        }
      },
    },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Use an API key of this server. It is kept in this tab only (sessionStorage) and sent as a Bearer token with each call."),
    h("label", { class: "field" }, h("span", {}, "API key"), input),
    h("button", { type: "submit" }, "Sign in"),
    problem,
  );
  return form;
}

function signOut(message) {
  session.signOut();
  if (leave) leave();
  leave = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  replace(view, signInForm(message));
}

async function start() {
  await refreshBalance();
  ctx.isAdmin = await detectAdmin();
  document.getElementById("nav-admin").hidden = !ctx.isAdmin;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  if (!location.hash || location.hash === "#/") location.hash = "#/overview";
  await route();
}

async function route() {
  if (!session.key()) return signOut();
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  let name = parts[0] || "overview";
  if (!(name in pages) || (name === "admin" && !ctx.isAdmin)) name = "overview";
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.page === name);
  }
  if (leave) leave();
  leave = null;
  const mine = ++rendering;
  const container = h("section", { class: `page page-${name}`, id: `page-${name}` });
  replace(view, container);
  try {
    const module = await pages[name]();
    if (mine !== rendering) return;
    leave = (await module.render(container, ctx, parts.slice(1))) || null;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return signOut(err.message);
    container.append(errorBox(err));
  }
}

window.addEventListener("hashchange", () => {
  if (session.key()) route();
});
document.getElementById("sign-out").addEventListener("click", () => signOut());

if (session.key()) {
  start().catch((err) => signOut(err.message));
} else {
  signOut();
}
