// LoraDeploy dashboard: hash-routed views over the HTTP API. No build step, no third-party code.
import { api, ApiError, apiStream, enc, getToken, plain, serverNow, setToken, sseEvents } from "./api.js";

const main = document.getElementById("main");
const POLL_MS = 1500;
const WORKERS_POLL_MS = 3000;
const SETTLED = new Set(["deploying", "running", "failed", "stopped", "deleted"]);
// A deploy in one of these no longer changes by itself: its view stops polling. Deploying and running ones keep
// polling, as their instances follow the workers.
const FINAL = new Set(["failed", "stopped", "deleted"]);

// ---------- tiny DOM helpers (text only, never innerHTML with data) ----------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces an element's children, skipping null/false (replaceChildren would print "null"). */
function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

function safeUrl(url) {
  try {
    const u = new URL(url);
    return u.protocol === "https:" || u.protocol === "http:" ? u.href : null;
  } catch {
    return null;
  }
}

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function loraNameOf(modelName) {
  const i = modelName.lastIndexOf("/");
  return i >= 0 ? modelName.slice(i + 1) : modelName;
}

/** "1 running · 2 pending" from a deploy's `instances`; null when the server sent none. */
function instancesText(instances) {
  if (!instances) return null;
  const running = instances.running ?? 0;
  const pending = instances.pending ?? 0;
  return pending ? `${running} running · ${pending} pending` : `${running} running`;
}

function instancesCell(deploy) {
  const instances = deploy?.instances;
  if (!instances || FINAL.has(deploy.status)) return h("span", { class: "muted" }, "—");
  return h("span", {
    class: "instances", "data-running": instances.running ?? 0, "data-pending": instances.pending ?? 0,
  }, instancesText(instances));
}

function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-status": status }, status);
}

/** A <progress> while downloading, with the numbers beside it. */
function downloadProgress(lora) {
  const size = lora?.size_bytes;
  const done = lora?.downloaded_bytes ?? 0;
  if (!size) return h("span", { class: "muted" }, "waiting for size…");
  const pct = Math.min(100, Math.floor((done * 100) / size));
  return h("div", { class: "download" },
    h("progress", { max: size, value: done, "aria-label": `Downloaded ${pct}%` }),
    h("span", { class: "muted small" }, `${bytes(done)} / ${bytes(size)} (${pct}%)`));
}

function setMain(title, ...children) {
  document.title = title ? `${title} · LoraDeploy` : "LoraDeploy";
  fill(main, ...children);
}

function notice(kind, text) {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

// ---------- confirmation dialog ----------
const dialog = document.getElementById("confirm");
function confirmAction(title, message, confirmLabel) {
  dialog.querySelector("#confirm-title").textContent = title;
  dialog.querySelector("#confirm-message").textContent = message;
  dialog.querySelector("#confirm-ok").textContent = confirmLabel;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
    dialog.showModal();
  });
}

// ---------- polling, tied to the current view ----------
let viewToken = 0;
function startPolling(fn, intervalMs = POLL_MS) {
  const mine = ++viewToken;
  let timer = 0;
  const tick = async () => {
    if (mine !== viewToken) return;
    let again = true;
    try {
      again = (await fn()) !== false;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return signedOut("Your token was not accepted. Sign in again.");
    }
    if (again && mine === viewToken) timer = setTimeout(tick, intervalMs);
  };
  tick();
  return () => clearTimeout(timer);
}

// ---------- auth ----------
const session = document.getElementById("session");
document.getElementById("sign-out").addEventListener("click", () => {
  setToken("");
  signedOut("You are signed out.");
});

function refreshSession() {
  session.hidden = !getToken();
  refreshWorkersLink();
}

// The Workers page is for admin tokens: its link appears once the server has answered /v1/workers for this token.
const workersLink = document.getElementById("nav-workers");
let adminCheck = { token: "", admin: false, pending: null };

function showWorkersLink(token, admin) {
  if (adminCheck.token === token) adminCheck.admin = admin;
  workersLink.hidden = !(getToken() === token && admin);
}

function refreshWorkersLink() {
  const token = getToken();
  if (!token) {
    adminCheck = { token: "", admin: false, pending: null };
    workersLink.hidden = true;
    return;
  }
  if (adminCheck.token === token) {
    workersLink.hidden = !adminCheck.admin;
    return;
  }
  adminCheck = { token, admin: false, pending: null };
  workersLink.hidden = true;
  adminCheck.pending = api("GET", "/v1/workers").then(() => showWorkersLink(token, true), () => showWorkersLink(token, false));
}

function signedOut(message) {
  setToken("");
  refreshSession();
  renderSignIn(message);
}

function renderSignIn(message) {
  viewToken++;
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "current-password", required: true, spellcheck: "false" });
  const error = h("p", { id: "token-error", class: "field-error", role: "alert" });
  const form = h("form", { class: "card narrow", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    message ? notice("info", message) : null,
    h("p", { class: "muted" }, "Paste an API token. An administrator creates one with ",
      h("code", {}, "loradeploy token create --user NAME"), ". It is kept in this tab only."),
    h("div", { class: "field" },
      h("label", { for: "token" }, "API token"),
      input, error),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Sign in")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.textContent = "";
    setToken(input.value.trim());
    try {
      await api("GET", "/v1/user/loras");
      refreshSession();
      route();
    } catch (err) {
      setToken("");
      error.textContent = err.status === 401 ? "That token was not accepted." : err.message;
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", "token-error");
      input.focus();
    }
  });
  setMain("Sign in", form);
  input.focus();
}

// ---------- actions shared by list and detail ----------
function actionButtons(deploy, onDone) {
  const id = deploy.deploy_id;
  const name = deploy.model_name;
  const status = deploy.status;
  const buttons = [];
  if (status === "deploying" || status === "running") {
    buttons.push(h("button", {
      type: "button", class: "secondary small", "aria-label": `Stop ${name}`,
      onclick: () => act("Stop deployment?", `Stop ${name}? It will run no instances until started again.`, "Stop",
        () => api("POST", `/deploy/${enc(id)}/stop`), onDone),
    }, "Stop"));
  }
  if (status === "stopped") {
    buttons.push(h("button", {
      type: "button", class: "secondary small", "aria-label": `Start ${name}`,
      onclick: () => act("Start deployment?", `Start ${name} again?`, "Start",
        () => api("POST", `/deploy/${enc(id)}/start`), onDone),
    }, "Start"));
  }
  if (status !== "deleted") {
    buttons.push(h("button", {
      type: "button", class: "danger small", "aria-label": `Delete ${name}`,
      onclick: () => act("Delete deployment?", `Delete ${name}? The deployment and its LoRA are removed; this cannot be undone.`, "Delete",
        () => api("DELETE", `/deploy/${enc(id)}`), onDone),
    }, "Delete"));
  }
  return h("div", { class: "row-actions" }, buttons);
}

async function act(title, message, label, call, onDone) {
  if (!(await confirmAction(title, message, label))) return;
  try {
    await call();
    onDone?.(null);
  } catch (err) {
    if (err.status === 401) return signedOut("Your token was not accepted. Sign in again.");
    onDone?.(err.message);
  }
}

// ---------- views ----------
async function renderDeploys() {
  const flash = h("div", { "aria-live": "polite" });
  const tbody = h("tbody");
  const empty = h("p", { class: "muted", hidden: true }, "No deployments yet. ",
    h("a", { href: "#/new" }, "Create your first one"), ".");
  const table = h("table", { class: "deploys" },
    h("caption", { class: "visually-hidden" }, "Your deployments, newest first"),
    h("thead", {}, h("tr", {},
      ["Name", "Status", "Progress", "Instances", "Version", "Updated", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
    tbody);
  setMain("Deployments",
    h("div", { class: "page-head" },
      h("h1", {}, "Deployments"),
      h("a", { class: "button", href: "#/new" }, "New deployment")),
    flash,
    h("div", { class: "table-wrap" }, table),
    empty);

  const rows = new Map();
  const onDone = (error) => {
    fill(flash, error ? notice("error", error) : notice("info", "Done."));
    refresh();
  };
  const refresh = async () => {
    const [deploys, loras] = await Promise.all([api("GET", "/deploy/list"), api("GET", "/v1/user/loras")]);
    const byDeploy = new Map((loras ?? []).map((l) => [l.deploy_id, l]));
    empty.hidden = deploys.length > 0;
    table.hidden = deploys.length === 0;
    const seen = new Set();
    let previous = null;
    for (const d of deploys) {
      seen.add(d.deploy_id);
      const lora = byDeploy.get(d.deploy_id);
      let row = rows.get(d.deploy_id);
      if (!row) {
        row = { tr: h("tr", { "data-deploy-id": d.deploy_id }), key: "" };
        rows.set(d.deploy_id, row);
      }
      const key = JSON.stringify([d.status, d.fail_reason, d.version, d.updated_at, d.instances, lora?.downloaded_bytes, lora?.size_bytes]);
      if (key !== row.key) {
        const hadFocus = row.tr.contains(document.activeElement);
        row.key = key;
        const name = lora?.lora_name ?? loraNameOf(d.model_name);
        fill(row.tr,
          h("td", { "data-label": "Name" }, h("a", { href: `#/lora/${enc(name)}` }, d.model_name)),
          h("td", { "data-label": "Status" }, h("div", {}, statusBadge(d.status),
            d.status === "failed" && d.fail_reason ? h("p", { class: "fail-reason" }, plain(d.fail_reason)) : null)),
          h("td", { "data-label": "Progress" },
            d.status === "downloading" ? downloadProgress(lora)
              : SETTLED.has(d.status) ? h("span", { class: "muted" }, d.status === "failed" ? "—" : "done")
              : h("span", { class: "muted" }, "queued")),
          h("td", { "data-label": "Instances" }, instancesCell(d)),
          h("td", { "data-label": "Version" }, d.version ? h("code", { title: d.version }, d.version.slice(0, 12)) : h("span", { class: "muted" }, "—")),
          h("td", { "data-label": "Updated" }, h("time", { datetime: d.updated_at }, when(d.updated_at))),
          h("td", { "data-label": "Actions" }, actionButtons(d, onDone)));
        if (hadFocus) row.tr.querySelector("button, a")?.focus();
      }
      // keep order: newest first
      if (previous ? previous.nextSibling !== row.tr : tbody.firstChild !== row.tr) {
        if (previous) previous.after(row.tr);
        else tbody.prepend(row.tr);
      }
      previous = row.tr;
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) { row.tr.remove(); rows.delete(id); }
    }
  };
  startPolling(async () => {
    try {
      await refresh();
    } catch (err) {
      if (err.status === 401) throw err;
      fill(flash, notice("error", err.message));
    }
  });
}

// Which form field a 422 `detail[].loc` item belongs to, per source: the two APIs name their fields differently.
const FIELD_FOR_LOC = {
  civitai: {
    lora_name: "lora_name",
    base_model: "base_model",
    source: "civit_url",
    civit_url: "civit_url",
    type: "civit_url",
    private: "private",
    description: "description",
  },
  huggingface: {
    hf_model_name: "hf_model_name",
    lora_model_name: "lora_model_name",
    base_model_name: "base_model_name",
    hf_token: "hf_token",
  },
};

function fieldForLoc(source, loc) {
  if (!Array.isArray(loc)) return null;
  for (let i = loc.length - 1; i >= 0; i--) {
    const f = FIELD_FOR_LOC[source][loc[i]];
    if (f) return f;
  }
  return null;
}

/** A labelled control with its hint and the element its 422 message goes in. */
function formField(id, label, control, hint) {
  const error = h("p", { id: `${id}-error`, class: "field-error" });
  const hintEl = hint ? h("p", { id: `${id}-hint`, class: "hint" }, hint) : null;
  control.id = id;
  control.name = id;
  control.setAttribute("aria-describedby", [hint ? `${id}-hint` : "", `${id}-error`].filter(Boolean).join(" "));
  return h("div", { class: "field", "data-field": id }, h("label", { for: id }, label), control, hintEl, error);
}

const isLlmPool = (model) => model?.engine === "llamacpp";

/** The CivitAI part of the new-deployment form: image base models only. */
function civitaiSource() {
  const name = h("input", { type: "text", required: true, maxlength: 64, autocomplete: "off", spellcheck: "false" });
  const base = h("select", { required: true }, h("option", { value: "" }, "Loading…"));
  const url = h("input", { type: "url", required: true, placeholder: "https://civitai.com/models/123?modelVersionId=456", spellcheck: "false" });
  const priv = h("input", { type: "checkbox", checked: true });
  const desc = h("textarea", { rows: 3, maxlength: 2000 });
  const privateField = h("div", { class: "field checkbox", "data-field": "private" },
    h("label", { for: "private" }, priv, " Private (only you can see and use it)"),
    h("p", { id: "private-error", class: "field-error" }));
  priv.id = "private";
  priv.name = "private";
  priv.setAttribute("aria-describedby", "private-error");
  return {
    key: "civitai",
    nameField: "lora_name",
    nodes: [
      formField("lora_name", "Name", name, "1–64 letters, digits, dots, dashes or underscores; starts with a letter or digit."),
      formField("base_model", "Base model", base),
      formField("civit_url", "CivitAI URL", url, "A model page or a specific version (…?modelVersionId=…)."),
      privateField,
      formField("description", "Description (optional)", desc),
    ],
    first: name,
    ready: true,
    setModels(models, error) {
      if (error) return fill(base, h("option", { value: "" }, "Could not load base models"));
      fill(base, h("option", { value: "" }, "Choose a base model…"),
        ...models.filter((m) => !isLlmPool(m))
          .map((m) => h("option", { value: m.name }, m.display ? `${m.display} — ${m.name}` : m.name)));
    },
    request() {
      return ["/v1/lora/create", {
        lora_name: name.value.trim(),
        base_model: base.value,
        source: { type: "civitai", civit_url: url.value.trim() },
        private: priv.checked,
        description: desc.value,
      }];
    },
  };
}

/**
 * The Hugging Face part: a PEFT adapter repo onto an LLM pool (engine llamacpp). The token is read once at submit,
 * cleared from its field at once and sent with that one request: never stored, never put back in the page.
 */
function huggingFaceSource() {
  const repo = h("input", { type: "text", required: true, placeholder: "owner/repo", autocomplete: "off", spellcheck: "false" });
  const name = h("input", { type: "text", required: true, maxlength: 64, autocomplete: "off", spellcheck: "false" });
  const base = h("select", { required: true }, h("option", { value: "" }, "Loading…"));
  const token = h("input", { type: "password", autocomplete: "off", spellcheck: "false" });
  const fields = [
    formField("hf_model_name", "Hugging Face repo", repo,
      "owner/repo, owner/repo@revision (a branch, tag or commit) or a huggingface.co link. The repo holds a PEFT LoRA: adapter_config.json and adapter_model.safetensors."),
    formField("lora_model_name", "Name", name, "1–64 letters, digits, dots, dashes or underscores; starts with a letter or digit."),
    formField("base_model_name", "Base model", base, "An LLM served by llama.cpp on this server; the adapter must have been trained on it."),
    formField("hf_token", "Hugging Face token (optional)", token,
      "Only for a gated or private repo. Used for this import only: not stored, and cleared from this field when you deploy."),
  ];
  const noPools = h("div", { class: "notice info setup", role: "status", "data-no-llm-pool": true },
    h("p", {}, "This server has no LLM base model, so a Hugging Face adapter has nothing to run on. An administrator adds one in the server's settings, for example:"),
    h("pre", {}, h("code", {}, "BaseModels:{name}:Family=llama\nBaseModels:{name}:Engine=llamacpp\nBaseModels:{name}:Gguf=/models/base.gguf")),
    h("p", {}, h("code", {}, "{name}"), " is the base model's name (e.g. ", h("code", {}, "meta-llama/Llama-3.2-1B-Instruct"),
      ") and ", h("code", {}, "Gguf"), " the path of its GGUF file on the server. After a restart it is listed here."));
  const source = {
    key: "huggingface",
    nameField: "lora_model_name",
    nodes: fields,
    first: repo,
    ready: false,
    setModels(models, error) {
      if (error) {
        fill(base, h("option", { value: "" }, "Could not load base models"));
        source.nodes = fields;
        source.ready = true;
        return;
      }
      const pools = models.filter(isLlmPool);
      source.ready = pools.length > 0;
      source.nodes = pools.length ? fields : [noPools];
      source.first = pools.length ? repo : null;
      fill(base,
        pools.length === 1 ? null : h("option", { value: "" }, "Choose a base model…"),
        ...pools.map((m) => h("option", { value: m.name }, m.display ? `${m.display} — ${m.name}` : m.name)));
    },
    request() {
      const secret = token.value.trim();
      token.value = "";
      return ["/lora-model", {
        hf_model_name: repo.value.trim(),
        lora_model_name: name.value.trim(),
        base_model_name: base.value || null,
        hf_token: secret || null,
      }];
    },
  };
  return source;
}

async function renderNew() {
  const sources = { civitai: civitaiSource(), huggingface: huggingFaceSource() };
  let current = sources.civitai;
  const radio = (value, label, hint) => {
    const input = h("input", { type: "radio", name: "source", id: `source-${value}`, value, checked: value === current.key,
      "aria-describedby": `source-${value}-hint` });
    input.addEventListener("change", () => input.checked && choose(value));
    return h("div", { class: "choice" },
      h("label", { for: `source-${value}` }, input, ` ${label}`),
      h("p", { id: `source-${value}-hint`, class: "hint" }, hint));
  };
  const fields = h("div", { "data-source-fields": true });
  const formError = h("div", { "aria-live": "assertive" });
  const submit = h("button", { type: "submit" }, "Deploy");

  const form = h("form", { class: "card", novalidate: true, "aria-labelledby": "new-title" },
    h("h1", { id: "new-title" }, "New LoRA deployment"),
    h("fieldset", { class: "choices" },
      h("legend", {}, "Source"),
      radio("civitai", "CivitAI LoRA (image)", "An image LoRA from a CivitAI model page."),
      radio("huggingface", "Hugging Face PEFT adapter (LLM)", "A PEFT LoRA for a language model, from a Hugging Face repo.")),
    formError,
    fields,
    h("div", { class: "actions" }, submit, h("a", { href: "#/deploys", class: "button secondary" }, "Cancel")));

  const clearErrors = () => {
    fill(formError);
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  };
  const showFieldError = (fieldId, message) => {
    const err = form.querySelector(`#${fieldId}-error`);
    const control = form.querySelector(`#${fieldId}`);
    if (!err) return null;
    err.textContent = err.textContent ? `${err.textContent} ${message}` : message;
    control?.setAttribute("aria-invalid", "true");
    return control;
  };
  function choose(key) {
    current = sources[key];
    clearErrors();
    fill(fields, current.nodes);
    submit.hidden = !current.ready;
  }

  choose(current.key);
  setMain("New deployment", form);

  let models = [];
  let loadError = null;
  try {
    models = (await api("GET", "/v1/base-models", { auth: false })) ?? [];
  } catch (err) {
    loadError = err;
  }
  for (const s of Object.values(sources)) s.setModels(models, loadError);
  choose(current.key);
  if (loadError) fill(formError, notice("error", loadError.message));
  if (!form.contains(document.activeElement)) current.first?.focus();

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!current.ready) return;
    const source = current;
    clearErrors();
    submit.disabled = true;
    const [path, body] = source.request();
    try {
      const created = await api("POST", path, { body });
      location.hash = `#/lora/${enc(loraNameOf(created.model_name ?? body.lora_name ?? body.lora_model_name))}`;
    } catch (err) {
      if (err.status === 401) return signedOut("Your token was not accepted. Sign in again.");
      let first = null;
      if (err.status === 422 && err.detail.length) {
        const unplaced = [];
        for (const d of err.detail) {
          const f = fieldForLoc(source.key, d.loc);
          const control = f ? showFieldError(f, d.msg) : null;
          if (control) first ??= control;
          else unplaced.push(`${(d.loc ?? []).join(".")}: ${d.msg}`);
        }
        if (unplaced.length) fill(formError, notice("error", unplaced.join(" ")));
      } else if (err.status === 409) {
        first = showFieldError(source.nameField, err.message);
      } else {
        fill(formError, notice("error", err.message));
      }
      (first ?? formError).focus?.();
    } finally {
      submit.disabled = false;
    }
  });
}

function dl(pairs) {
  return h("dl", { class: "facts" },
    pairs.filter(([, v]) => v !== undefined && v !== null && v !== "" && !(Array.isArray(v) && v.length === 0))
      .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v instanceof Node ? v : Array.isArray(v) ? v.join(", ") : String(v))]));
}

function probeSection(probe, fromHub) {
  if (!probe) return h("section", { "aria-labelledby": "probe-title" },
    h("h2", { id: "probe-title" }, "Adapter report"),
    h("p", { class: "muted" }, fromHub
      ? "Not converted yet: the report appears once the adapter is downloaded, checked against the base model and converted."
      : "Not probed yet: the report appears once the file is downloaded and verified."));
  if (probe.converter_version !== undefined) return peftReportSection(probe);
  const rank = probe.rank_min === undefined || probe.rank_min === null ? null
    : probe.rank_min === probe.rank_max ? String(probe.rank_min) : `${probe.rank_min}–${probe.rank_max}`;
  const tags = Array.isArray(probe.top_tags)
    ? probe.top_tags.map((t) => Array.isArray(t) ? `${t[0]} (${t[1]})` : typeof t === "object" && t ? `${t.tag ?? t.name ?? ""} (${t.count ?? ""})` : String(t))
    : null;
  return h("section", { "aria-labelledby": "probe-title" },
    h("h2", { id: "probe-title" }, "Adapter report"),
    dl([
      ["Architecture", probe.architecture_display ? `${probe.architecture_display} (${probe.architecture})` : probe.architecture],
      ["Network type", probe.network],
      ["Key format", probe.format],
      ["Rank", rank],
      ["Alpha", probe.alpha],
      ["Scale", probe.scale],
      ["Dtypes", probe.dtypes],
      ["Parameters", typeof probe.parameter_count === "number" ? probe.parameter_count.toLocaleString() : null],
      ["Targets", probe.targets],
      ["Modules", probe.module_count],
      ["Trigger words", probe.trigger_words],
      ["Top tags", tags],
      ["Applicable", probe.applicable === undefined ? null : probe.applicable ? "yes" : `no${probe.not_applicable_reason ? ` — ${probe.not_applicable_reason}` : ""}`],
    ]),
    Array.isArray(probe.warnings) && probe.warnings.length
      ? h("ul", { class: "warnings" }, probe.warnings.map((w) => h("li", {}, typeof w === "string" ? w : JSON.stringify(w))))
      : null);
}

/** A PEFT adapter's conversion report (what the import found in adapter_config.json and the weights). */
function peftReportSection(report) {
  const list = (v) => Array.isArray(v) ? v : [];
  const layers = list(report.layers);
  const contiguous = layers.length > 2 && layers.every((l, i) => i === 0 || l === layers[i - 1] + 1);
  return h("section", { "aria-labelledby": "probe-title" },
    h("h2", { id: "probe-title" }, "Adapter report"),
    dl([
      ["Architecture", report.architecture],
      ["Trained on", report.base_model_name_or_path],
      ["Rank", list(report.ranks).join(", ")],
      ["rsLoRA", typeof report.use_rslora === "boolean" ? (report.use_rslora ? "yes" : "no") : null],
      ["Target modules", list(report.target_modules)],
      ["Layers", contiguous ? `${layers[0]}–${layers[layers.length - 1]}` : layers],
      ["Tensors", report.tensor_count],
      ["Parameters", typeof report.parameter_count === "number" ? report.parameter_count.toLocaleString() : null],
    ]));
}

/** The Hub page of "owner/repo" or "owner/repo@revision"; null when the text is not that. */
function huggingFaceUrl(ref) {
  const m = /^([A-Za-z0-9_.-]+)\/([A-Za-z0-9_.-]+)(?:@(.+))?$/.exec(String(ref ?? ""));
  if (!m) return null;
  const repo = `https://huggingface.co/${enc(m[1])}/${enc(m[2])}`;
  return m[3] ? `${repo}/tree/${enc(m[3])}` : repo;
}

async function renderLora(loraName) {
  const body = h("div", { "aria-live": "polite" }, h("p", { class: "muted" }, "Loading…"));
  const flash = h("div");
  setMain(loraName, h("p", {}, h("a", { href: "#/deploys" }, "← All deployments")), flash, body);
  let lastKey = "";
  let tryIt = null; // kept across re-renders: a prompt being typed or an image being made survives a poll
  const onDone = (error) => {
    if (error) fill(flash, notice("error", error));
    else location.hash = "#/deploys";
  };
  startPolling(async () => {
    let lora;
    try {
      lora = await api("GET", `/v1/lora/${enc(loraName)}`);
    } catch (err) {
      if (err.status === 401) throw err;
      fill(body, notice("error", err.status === 404 ? `No LoRA named “${loraName}”.` : err.message),
        h("p", {}, h("a", { href: "#/deploys" }, "Back to deployments")));
      return err.status !== 404;
    }
    let deploy = null;
    try {
      deploy = await api("GET", `/deploy/${enc(lora.deploy_id)}`);
    } catch (err) {
      if (err.status === 401) throw err;
    }
    const key = JSON.stringify([lora, deploy]);
    if (key === lastKey) return !FINAL.has(lora.status);
    lastKey = key;
    const focusedInTry = tryIt?.contains(document.activeElement) ? document.activeElement : null;
    const hadFocus = !focusedInTry && body.contains(document.activeElement) ? document.activeElement.textContent : null;
    if (deploy?.task === "text-to-image" && lora.status === "running") tryIt ??= tryItPanel(lora.model_name);
    const civitaiUrl = safeUrl(lora.civitai?.url ?? "");
    const fromHub = lora.source?.type === "huggingface";
    const sourceUrl = fromHub ? huggingFaceUrl(lora.source.civit_url) : safeUrl(lora.source?.civit_url ?? "");
    fill(body,
      h("div", { class: "page-head" },
        h("h1", {}, lora.model_name),
        statusBadge(lora.status)),
      lora.status === "failed" ? notice("error", plain(lora.fail_reason) || "The deployment failed.") : null,
      lora.status === "downloading" ? downloadProgress(lora) : null,
      Array.isArray(lora.warnings) && lora.warnings.length
        ? h("ul", { class: "warnings" }, lora.warnings.map((w) => h("li", {}, w))) : null,
      actionButtons({ deploy_id: lora.deploy_id, model_name: lora.model_name, status: lora.status }, onDone),
      h("section", { "aria-labelledby": "facts-title" },
        h("h2", { id: "facts-title" }, "Deployment"),
        dl([
          ["Deploy id", h("code", {}, lora.deploy_id)],
          ["Base model", lora.base_model],
          ["Visibility", lora.private ? "private" : "public"],
          ["Description", lora.description],
          ["Version (SHA-256)", lora.version ? h("code", { class: "hash" }, lora.version) : null],
          ["Size", lora.size_bytes ? bytes(lora.size_bytes) : null],
          [fromHub ? "Hugging Face repo" : "Source",
            sourceUrl ? h("a", { href: sourceUrl, rel: "noopener noreferrer", target: "_blank" }, lora.source.civit_url) : lora.source?.civit_url],
          ["Created", when(lora.created_at)],
          ["Updated", when(lora.updated_at)],
        ])),
      deploy ? servingSection(lora.status, deploy) : null,
      tryIt && lora.status === "running" ? tryIt : null,
      lora.civitai ? h("section", { "aria-labelledby": "civitai-title" },
        h("h2", { id: "civitai-title" }, "CivitAI"),
        dl([
          ["Page", civitaiUrl ? h("a", { href: civitaiUrl, rel: "noopener noreferrer", target: "_blank" }, "Open on CivitAI") : null],
          ["File", lora.civitai.file_name],
          ["CivitAI base model", lora.civitai.base_model],
          ["Trained words", lora.civitai.trained_words],
          ["Model / version / file id", [lora.civitai.model_id, lora.civitai.version_id, lora.civitai.file_id].filter((x) => x != null).join(" / ")],
          ...licenseFacts(lora.license, lora.nsfw_level),
        ])) : null,
      probeSection(lora.probe, fromHub));
    if (hadFocus) [...body.querySelectorAll("button, a")].find((el) => el.textContent === hadFocus)?.focus();
    if (focusedInTry && body.contains(focusedInTry)) focusedInTry.focus();
    return !FINAL.has(lora.status);
  });
}

/** The CivitAI model's recorded license terms, creator and NSFW level, as rows for dl(). */
function licenseFacts(license, nsfwLevel) {
  const yesNo = (v) => (v === true ? "yes" : v === false ? "no" : null);
  const commercial = license?.allow_commercial_use;
  const flags = [["PG", 1], ["PG13", 2], ["R", 4], ["X", 8], ["XXX", 16], ["Blocked", 32]];
  const highest = typeof nsfwLevel === "number" ? flags.filter(([, f]) => (nsfwLevel & f) !== 0).pop() : null;
  return [
    ["Commercial use", Array.isArray(commercial) ? (commercial.length ? commercial.join(", ") : "none") : null],
    ["Derivatives allowed", yesNo(license?.allow_derivatives)],
    ["Different license allowed", yesNo(license?.allow_different_license)],
    ["Use without credit", yesNo(license?.allow_no_credit)],
    ["Creator", license?.creator],
    ["NSFW level", typeof nsfwLevel === "number" ? `${highest ? highest[0] : "unrated"} (${nsfwLevel})` : null],
  ];
}

/**
 * "Try it" on a running image deploy: prompt, scale and seed go to the native route with `"stream": true`; the
 * progress events fill a bar, the result's image is shown with the seed used, and errors are shown as the server
 * words them.
 */
function tryItPanel(modelName) {
  const slash = modelName.indexOf("/");
  const path = `/v1/inference/${enc(modelName.slice(0, slash))}/${enc(modelName.slice(slash + 1))}`;
  const prompt = h("textarea", { rows: 3, maxlength: 10000, required: true });
  const scale = h("input", { type: "number", step: "0.05", min: "-8", max: "8", value: "1", inputmode: "decimal" });
  const seed = h("input", { type: "number", step: "1", placeholder: "random", inputmode: "numeric" });
  const submit = h("button", { type: "submit" }, "Generate");
  const status = h("div", { class: "try-status", "aria-live": "polite" });
  const result = h("div", { class: "try-result" });
  const form = h("form", { class: "try-form", novalidate: true },
    formField("try-prompt", "Prompt", prompt),
    h("div", { class: "try-row" },
      formField("try-scale", "LoRA scale", scale, "How strongly the LoRA applies (1 = as trained)."),
      formField("try-seed", "Seed", seed, "Leave empty for a random one; the same seed gives the same image.")),
    h("div", { class: "actions" }, submit));

  const fieldError = (id, message) => {
    form.querySelector(`#${id}-error`).textContent = message;
    form.querySelector(`#${id}`).setAttribute("aria-invalid", "true");
    form.querySelector(`#${id}`).focus();
  };
  const FIELD_IDS = { prompt: "try-prompt", lora_scale: "try-scale", seed: "try-seed" };

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    if (!prompt.value.trim()) return fieldError("try-prompt", "Write a prompt.");
    const body = { prompt: prompt.value, stream: true };
    if (scale.value !== "") {
      const n = Number(scale.value);
      if (!Number.isFinite(n) || scale.validity.badInput) return fieldError("try-scale", "The scale must be a number.");
      body.lora_scale = n;
    } else if (scale.validity.badInput) return fieldError("try-scale", "The scale must be a number.");
    if (seed.value !== "" || seed.validity.badInput) {
      const n = Number(seed.value);
      if (!Number.isSafeInteger(n)) return fieldError("try-seed", "The seed must be a whole number.");
      body.seed = n;
    }

    submit.disabled = true;
    const bar = h("progress", { max: 1, "aria-label": "Sampling progress" });
    const label = h("span", { class: "muted small" }, "Waiting for a worker…");
    fill(status, h("div", { class: "download" }, bar, label));
    fill(result);
    try {
      const response = await apiStream(path, body);
      let answer = null;
      if ((response.headers.get("Content-Type") ?? "").startsWith("text/event-stream")) {
        for await (const ev of sseEvents(response)) {
          const data = JSON.parse(ev.data);
          if (ev.event === "progress") {
            bar.max = data.steps;
            bar.value = data.step;
            label.textContent = `Step ${data.step} of ${data.steps}`;
          } else if (ev.event === "result") {
            answer = data;
            break;
          } else if (ev.event === "error") {
            throw new ApiError(data.status ?? 502, plain(data.error));
          }
        }
        if (!answer) throw new ApiError(502, "The server ended the stream before the image was ready.");
      } else {
        answer = await response.json();
      }
      const image = Array.isArray(answer?.images) ? answer.images[0] : null;
      if (typeof image !== "string" || !image.startsWith("data:image/")) throw new ApiError(502, "The answer has no image.");
      fill(status);
      fill(result,
        h("img", { src: image, alt: `Generated image: ${prompt.value}`, class: "try-image" }),
        h("p", { class: "muted small" }, "Seed ", h("code", { class: "try-seed-used" }, String(answer.seed ?? "not reported"))));
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return signedOut("Your token was not accepted. Sign in again.");
      const message = err instanceof ApiError ? err.message : "The answer could not be read.";
      const field = err instanceof ApiError && err.status === 422 ? Object.keys(FIELD_IDS).find((f) => message.startsWith(f)) : null;
      fill(status, field ? null : notice("error", message));
      if (field) fieldError(FIELD_IDS[field], message);
    } finally {
      submit.disabled = false;
    }
  });
  return h("section", { class: "try-it", "aria-labelledby": "try-title" }, h("h2", { id: "try-title" }, "Try it"), form, status, result);
}

/** Where the deploy runs: instances (running / pending) and its scaling settings. */
function servingSection(status, deploy) {
  const running = deploy.instances?.running ?? 0;
  const pending = deploy.instances?.pending ?? 0;
  const settings = deploy.settings ?? {};
  const explain =
    status === "deploying" && pending > 0 && running === 0 ? "Waiting for a worker of this base model's pool to load the adapter."
    : status === "running" && pending > 0 ? "More workers are loading the adapter."
    : null;
  return h("section", { "aria-labelledby": "serving-title" },
    h("h2", { id: "serving-title" }, "Serving"),
    dl([
      ["Instances", h("span", { class: "instances", "data-running": running, "data-pending": pending },
        `${running} running · ${pending} pending`)],
      ["Scaling", settings.min_instances === undefined ? null : `min ${settings.min_instances}, max ${settings.max_instances} instances`],
    ]),
    explain ? h("p", { class: "muted small" }, explain) : null);
}

async function renderPublic() {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  setMain("Public LoRAs", h("h1", {}, "Public LoRAs"), body);
  viewToken++;
  try {
    const models = await api("GET", "/models/lora/list", { auth: false });
    if (!models?.length) {
      fill(body, h("p", { class: "muted" }, "No public LoRAs yet."));
      return;
    }
    fill(body, h("div", { class: "table-wrap" }, h("table", { class: "public" },
      h("caption", { class: "visually-hidden" }, "Public LoRAs"),
      h("thead", {}, h("tr", {}, ["Model", "Type", "Description", "Price"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, models.map((m) => h("tr", {},
        h("td", { "data-label": "Model" }, h("code", {}, m.model_name)),
        h("td", { "data-label": "Type" }, m.reported_type ?? m.type ?? ""),
        h("td", { "data-label": "Description" }, m.description ?? ""),
        h("td", { "data-label": "Price" }, priceText(m.pricing))))))));
  } catch (err) {
    fill(body, notice("error", err.message));
  }
}

function priceText(pricing) {
  if (!pricing || typeof pricing !== "object") return "";
  const cents = Object.entries(pricing).find(([k, v]) => k.startsWith("cents") && typeof v === "number");
  return cents ? (cents[1] === 0 ? "free" : `${cents[1]}¢ per image unit`) : "";
}

/** "4 s ago" for an ISO time, on the server's clock; null when the time cannot be read. */
function ageOf(iso) {
  const t = Date.parse(iso ?? "");
  if (Number.isNaN(t)) return null;
  return Math.max(0, Math.round((serverNow() - t) / 1000));
}

function ageText(seconds) {
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  return `${Math.floor(seconds / 3600)} h ago`;
}

// A worker heartbeats every couple of seconds; one silent this long has missed several and is about to be forgotten.
const LATE_HEARTBEAT_SECONDS = 10;
const MAX_RESIDENT_SHOWN = 16;

/** `resident` items are "pool|sha256": the short hash, with pool and full hash on hover. */
function residentList(worker) {
  const items = Array.isArray(worker.resident) ? worker.resident : [];
  if (!items.length) return h("span", { class: "muted" }, "none");
  const multiPool = (worker.pools ?? []).length > 1;
  const shown = items.slice(0, MAX_RESIDENT_SHOWN).map((item) => {
    const bar = String(item).lastIndexOf("|");
    const pool = bar >= 0 ? String(item).slice(0, bar) : "";
    const sha = bar >= 0 ? String(item).slice(bar + 1) : String(item);
    return h("li", {},
      h("code", { title: pool ? `${sha} on ${pool}` : sha, "data-sha256": sha }, sha.slice(0, 12)),
      multiPool && pool ? h("span", { class: "muted small" }, ` ${pool}`) : null);
  });
  const more = items.length - shown.length;
  return h("ul", { class: "resident" }, shown, more > 0 ? h("li", { class: "muted small" }, `and ${more} more`) : null);
}

function workerRow(w) {
  const seconds = ageOf(w.last_heartbeat_at);
  const late = seconds !== null && seconds >= LATE_HEARTBEAT_SECONDS;
  return h("tr", { "data-worker-id": w.id },
    // One child per cell: on a phone a cell is a two-column grid (label, content).
    h("td", { "data-label": "Worker" }, h("div", {},
      h("div", {}, h("strong", { class: "wrap" }, w.name || w.id)),
      h("div", { class: "muted small wrap" }, h("code", {}, w.id), ` · ${w.engine} · ${w.version}`),
      w.url ? h("div", { class: "muted small wrap" }, w.url) : null)),
    h("td", { "data-label": "Pools" }, h("ul", { class: "plain" }, (w.pools ?? []).map((p) => h("li", { class: "wrap" }, p)))),
    h("td", { "data-label": "Slots", "data-busy": w.busy_slots, "data-slots": w.slots }, `${w.busy_slots}/${w.slots} busy`),
    h("td", { "data-label": "Queue" }, String(w.queue_depth)),
    h("td", { "data-label": "Resident adapters" }, residentList(w)),
    h("td", { "data-label": "Instances" }, String(w.instances)),
    h("td", { "data-label": "Last heartbeat" }, h("div", {},
      h("time", { datetime: w.last_heartbeat_at, title: when(w.last_heartbeat_at), class: late ? "late" : null },
        seconds === null ? w.last_heartbeat_at : ageText(seconds)),
      late ? h("div", { class: "late small" }, "missing heartbeats") : null)));
}

async function renderWorkers() {
  const flash = h("div");
  const tbody = h("tbody");
  const table = h("table", { class: "workers", hidden: true },
    h("caption", { class: "visually-hidden" }, "Workers registered with this server"),
    h("thead", {}, h("tr", {},
      ["Worker", "Pools", "Slots", "Queue", "Resident adapters", "Instances", "Last heartbeat"].map((c) => h("th", { scope: "col" }, c)))),
    tbody);
  const empty = h("div", { hidden: true },
    h("p", { class: "muted" }, "No workers are registered. ",
      h("code", {}, "loradeploy serve"), " runs one in-process for the pools configured on its host (",
      h("code", {}, "Workers:Embedded"), "); a remote one starts with ",
      h("code", {}, "loradeploy worker --server URL --token TOKEN"), ", its token from ",
      h("code", {}, "loradeploy token create --worker NAME"), "."));
  const summary = h("p", { class: "muted small" }, "Loading…");
  setMain("Workers",
    h("div", { class: "page-head" }, h("h1", {}, "Workers")),
    summary, flash,
    h("div", { class: "table-wrap" }, table),
    empty);

  const token = getToken();
  startPolling(async () => {
    let workers;
    try {
      workers = await api("GET", "/v1/workers");
    } catch (err) {
      if (err.status === 401) throw err;
      if (err.status === 403) {
        showWorkersLink(token, false);
        fill(summary);
        fill(flash, notice("error", "Workers are shown to administrators only, and this token is not an admin token. "
          + "Sign in with an admin token (the server prints one on its first start) to see them."));
        table.hidden = true;
        return false;
      }
      fill(flash, notice("error", err.message));
      return true;
    }
    showWorkersLink(token, true);
    fill(flash);
    const list = Array.isArray(workers) ? workers : [];
    const slots = list.reduce((n, w) => n + (w.slots ?? 0), 0);
    const busy = list.reduce((n, w) => n + (w.busy_slots ?? 0), 0);
    fill(summary, list.length
      ? `${list.length} worker${list.length === 1 ? "" : "s"}, ${busy}/${slots} slots busy. Refreshes every ${WORKERS_POLL_MS / 1000} seconds.`
      : "");
    table.hidden = list.length === 0;
    empty.hidden = list.length > 0;
    fill(tbody, list.map(workerRow));
    return true;
  }, WORKERS_POLL_MS);
}

// ---------- API tokens ----------
const TOKEN_FIELD_FOR_LOC = { label: "token-label", expires_in_days: "token-days", expires_at: "token-days" };

/** The newly created token, shown once: in a read-only field (its value, never an attribute) with a copy button. */
function newTokenPanel(created) {
  const field = h("input", { type: "text", readonly: true, spellcheck: "false", autocomplete: "off", "aria-describedby": "new-token-hint" });
  field.id = "new-token";
  field.value = created.token;
  const copied = h("span", { class: "muted small", "aria-live": "polite" });
  const copy = h("button", { type: "button", class: "secondary small" }, "Copy");
  copy.addEventListener("click", async () => {
    field.select();
    try {
      await navigator.clipboard.writeText(field.value);
      copied.textContent = "Copied.";
    } catch {
      copied.textContent = "Press Ctrl+C (⌘C) to copy the selected token.";
    }
  });
  return h("div", { class: "notice setup new-token", role: "status" },
    h("p", {}, h("strong", {}, `Your new token${created.label ? ` “${created.label}”` : ""}`),
      created.expires_at ? ` expires ${when(created.expires_at)}.` : " never expires."),
    h("label", { for: "new-token", class: "visually-hidden" }, "New API token"),
    h("div", { class: "copy-row" }, field, copy),
    h("p", { id: "new-token-hint", class: "hint" },
      "Copy it now and keep it somewhere safe: it is shown this once and cannot be shown again. ",
      "Use it as ", h("code", {}, "Authorization: Bearer …"), " or ", h("code", {}, "LORADEPLOY_TOKEN"), ". ", copied));
}

function tokenRow(t, onRevoke) {
  const expiresMs = Date.parse(t.expires_at ?? "");
  const expired = !Number.isNaN(expiresMs) && expiresMs <= serverNow();
  const name = t.label || t.id;
  return h("tr", { "data-token-id": t.id },
    h("td", { "data-label": "Label" }, h("div", {},
      h("span", { class: "wrap" }, t.label || h("span", { class: "muted" }, "no label")),
      t.current ? h("span", { class: "badge current" }, "this tab") : null)),
    h("td", { "data-label": "ID" }, h("code", {}, t.id)),
    h("td", { "data-label": "Created" }, h("time", { datetime: t.created_at }, when(t.created_at))),
    h("td", { "data-label": "Expires" }, t.expires_at
      ? h("time", { datetime: t.expires_at, class: expired ? "late" : null }, expired ? `expired ${when(t.expires_at)}` : when(t.expires_at))
      : h("span", { class: "muted" }, "never")),
    h("td", { "data-label": "Actions" }, h("button", {
      type: "button", class: "danger small", "aria-label": `Revoke ${name}`, onclick: () => onRevoke(t),
    }, "Revoke")));
}

async function renderTokens() {
  viewToken++;
  const label = h("input", { type: "text", maxlength: 100, autocomplete: "off", spellcheck: "false" });
  const days = h("input", { type: "number", min: 1, max: 3650, step: 1, inputmode: "numeric", placeholder: "never" });
  const submit = h("button", { type: "submit" }, "Create token");
  const formError = h("div", { "aria-live": "assertive" });
  const created = h("div");
  const form = h("form", { class: "card", novalidate: true, "aria-labelledby": "new-token-title" },
    h("h2", { id: "new-token-title" }, "New token"),
    formError,
    h("div", { class: "try-row" },
      formField("token-label", "Label (optional)", label, "What it is for, e.g. “CI” or “laptop”."),
      formField("token-days", "Expires after (days, optional)", days, "1 to 3650; empty: never expires.")),
    h("div", { class: "actions" }, submit));
  const flash = h("div", { "aria-live": "polite" });
  const tbody = h("tbody");
  const table = h("table", { class: "tokens", hidden: true },
    h("caption", { class: "visually-hidden" }, "Your API tokens, newest first"),
    h("thead", {}, h("tr", {}, ["Label", "ID", "Created", "Expires", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
    tbody);
  setMain("API tokens",
    h("h1", {}, "API tokens"),
    h("p", { class: "muted" }, "Tokens for the API, the CLI and this dashboard. A revoked token is refused from its next request on."),
    created, form,
    h("h2", {}, "Your tokens"), flash,
    h("div", { class: "table-wrap" }, table));

  const refresh = async () => {
    const tokens = (await api("GET", "/v1/me/tokens")) ?? [];
    table.hidden = tokens.length === 0;
    fill(tbody, tokens.map((t) => tokenRow(t, revoke)));
  };
  const revoke = async (t) => {
    const name = t.label ? `“${t.label}” (${t.id})` : t.id;
    const warning = t.current ? " It is the token this tab is signed in with: you will be signed out." : "";
    if (!(await confirmAction("Revoke token?", `Revoke ${name}? Anything using it is refused from its next request on; this cannot be undone.${warning}`, "Revoke"))) return;
    try {
      await api("DELETE", `/v1/me/tokens/${enc(t.id)}`);
    } catch (err) {
      if (err.status === 401) return signedOut("Your token was not accepted. Sign in again.");
      fill(flash, notice("error", err.message));
      return;
    }
    if (t.current) return signedOut("You revoked the token this tab was signed in with.");
    fill(flash, notice("info", `Revoked ${name}.`));
    await refresh().catch((err) => fill(flash, notice("error", err.message)));
  };

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    fill(formError);
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    const body = {};
    if (label.value.trim()) body.label = label.value.trim();
    if (days.value !== "" || days.validity.badInput) {
      const n = Number(days.value);
      if (!Number.isSafeInteger(n) || days.validity.badInput) {
        form.querySelector("#token-days-error").textContent = "The number of days must be a whole number.";
        days.setAttribute("aria-invalid", "true");
        return days.focus();
      }
      body.expires_in_days = n;
    }
    submit.disabled = true;
    fill(created);
    try {
      const answer = await api("POST", "/v1/me/tokens", { body });
      fill(created, newTokenPanel(answer));
      label.value = "";
      days.value = "";
      created.querySelector("#new-token")?.focus();
      await refresh();
    } catch (err) {
      if (err.status === 401) return signedOut("Your token was not accepted. Sign in again.");
      let first = null;
      const unplaced = [];
      for (const d of err.status === 422 ? err.detail : []) {
        const id = (d.loc ?? []).map((l) => TOKEN_FIELD_FOR_LOC[l]).find(Boolean);
        const el = id ? form.querySelector(`#${id}-error`) : null;
        if (!el) { unplaced.push(d.msg); continue; }
        el.textContent = d.msg;
        form.querySelector(`#${id}`).setAttribute("aria-invalid", "true");
        first ??= form.querySelector(`#${id}`);
      }
      if (!first) fill(formError, notice("error", unplaced.length ? unplaced.join(" ") : err.message));
      (first ?? formError).focus?.();
    } finally {
      submit.disabled = false;
    }
  });

  try {
    await refresh();
  } catch (err) {
    if (err.status === 401) return signedOut("Your token was not accepted. Sign in again.");
    fill(flash, notice("error", err.message));
  }
  label.focus();
}

function renderNotFound() {
  viewToken++;
  setMain("Not found", h("h1", {}, "Page not found"),
    h("p", {}, "There is nothing at this address. ", h("a", { href: "#/deploys" }, "Go to your deployments"), "."));
}

// ---------- router ----------
function route() {
  const hash = location.hash || "#/deploys";
  const [, page = "", ...rest] = hash.slice(1).split("/");
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  viewToken++; // stops the previous view's polling
  refreshSession();
  if (page === "public") return renderPublic();
  if (!["deploys", "new", "lora", "workers", "tokens"].includes(page)) return renderNotFound();
  if (!getToken()) return renderSignIn();
  if (page === "deploys") return renderDeploys();
  if (page === "new") return renderNew();
  if (page === "workers") return renderWorkers();
  if (page === "tokens") return renderTokens();
  if (page === "lora" && rest.length) return renderLora(decodeURIComponent(rest.join("/")));
  return renderNotFound();
}

// The skip link moves focus without touching the route.
document.querySelector(".skip-link")?.addEventListener("click", (e) => {
  e.preventDefault();
  main.focus();
});

window.addEventListener("hashchange", () => {
  route();
  main.focus({ preventScroll: true });
});
route();
