// The mailsuite sandbox page: plain JavaScript, no build step, no libraries.
// Everything from a message is shown with textContent (never parsed as markup here); the
// HTML part is shown only inside the sandboxed iframe, served with its own strict policy.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  inbox: "",        // "" = all inboxes
  search: "",
  messages: [],     // summaries in the list, newest first
  open: null,       // the open message (Mailpit's Message object)
  tab: "html",
  release: false,   // [sandbox] release
  inboxes: new Set(),
};
const LIMIT = 200;

function api(path, params) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== "" && v !== null && v !== undefined) url.searchParams.set(k, v);
  }
  if (state.inbox && !url.searchParams.has("inbox")) url.searchParams.set("inbox", state.inbox);
  return url;
}

async function call(method, path, body, params) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(api(path, params), init);
  if (!resp.ok) throw new Error((await resp.text()).trim() || resp.statusText);
  const type = resp.headers.get("Content-Type") || "";
  return type.startsWith("application/json") ? resp.json() : resp.text();
}

function say(text) { $("status").textContent = text; }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function address(a) {
  if (!a) return "";
  if (a.Name && a.Address) return `${a.Name} <${a.Address}>`;
  return a.Name || a.Address || "";
}

function when(text) {
  const d = new Date(text);
  if (isNaN(d)) return text;
  const today = new Date();
  return d.toDateString() === today.toDateString()
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

// -- inboxes ------------------------------------------------------------------------------

async function loadInfo() {
  const [info, webui] = await Promise.all([
    call("GET", "/api/v1/info", undefined, { inbox: "" }),
    call("GET", "/api/v1/webui"),
  ]);
  state.release = !!(webui.MessageRelay && webui.MessageRelay.Enabled);
  for (const name of Object.keys(info.Inboxes || {})) addInbox(name);
}

function addInbox(name) {
  if (state.inboxes.has(name)) return;
  state.inboxes.add(name);
  const select = $("inbox");
  const names = [...state.inboxes].sort();
  const option = el("option", { value: name, text: name });
  const before = [...select.options].find((o) => o.value && o.value > name);
  select.insertBefore(option, before || null);
  if (names.length && select.value !== state.inbox) select.value = state.inbox;
}

// -- the list ------------------------------------------------------------------------------

async function loadList() {
  const path = state.search ? "/api/v1/search" : "/api/v1/messages";
  const data = await call("GET", path, undefined, { query: state.search, limit: LIMIT });
  state.messages = data.messages;
  renderList(data);
}

function item(m) {
  const li = el("li", { "data-id": m.ID });
  const button = el("button", { type: "button", class: m.Read ? "msg" : "msg unread" },
    el("span", { class: "from", text: address(m.From) || "(no sender)" }),
    el("span", { class: "date", text: when(m.Created) }),
    el("span", { class: "subject", text: m.Subject || "(no subject)" }),
    el("span", { class: "snippet", text: m.Snippet }),
    state.inbox ? null : el("span", { class: "tag", text: m.Inbox }),
    m.Attachments ? el("span", { class: "tag", text: `📎 ${m.Attachments}` }) : null,
  );
  button.setAttribute("aria-label",
    `${m.Read ? "" : "Unread. "}From ${address(m.From)}. ${m.Subject}. ${when(m.Created)}`);
  button.addEventListener("click", () => openMessage(m.ID));
  if (state.open && state.open.ID === m.ID) button.setAttribute("aria-current", "true");
  li.append(button);
  return li;
}

function renderList(data) {
  const list = $("list");
  const focused = document.activeElement && document.activeElement.closest("#list li");
  const focusedId = focused ? focused.dataset.id : null;
  list.replaceChildren(...state.messages.map(item));
  $("empty").hidden = state.messages.length > 0;
  if (data) {
    const shown = data.messages_count;
    $("count").textContent = state.search
      ? `${shown} of ${data.total} match`
      : `${data.total} messages, ${data.unread} unread`;
  } else {
    $("count").textContent = `${state.messages.length} messages`;
  }
  if (focusedId) focusItem(focusedId);
}

function focusItem(id) {
  const li = [...$("list").children].find((n) => n.dataset.id === id);
  if (li) li.firstChild.focus();
}

function moveFocus(step) {
  const items = [...$("list").children];
  if (!items.length) return;
  const current = document.activeElement && document.activeElement.closest("#list li");
  let i = current ? items.indexOf(current) + step : 0;
  i = Math.max(0, Math.min(items.length - 1, i));
  items[i].firstChild.focus();
}

// -- one message ---------------------------------------------------------------------------

async function openMessage(id) {
  let m;
  try {
    m = await call("GET", `/api/v1/message/${encodeURIComponent(id)}`, undefined, { inbox: "" });
  } catch (e) {
    say(`Cannot open the message: ${e.message}`);
    return;
  }
  state.open = m;
  const summary = state.messages.find((s) => s.ID === id);
  if (summary) summary.Read = true;
  document.body.classList.add("viewing");
  $("view-pane").hidden = false;
  $("subject").textContent = m.Subject || "(no subject)";
  const meta = $("meta");
  meta.replaceChildren();
  const rows = [
    ["From", address(m.From)],
    ["To", m.To.map(address).join(", ")],
    ["Cc", m.Cc.map(address).join(", ")],
    ["Bcc", m.Bcc.map(address).join(", ")],
    ["Reply-To", m.ReplyTo.map(address).join(", ")],
    ["Date", when(m.Date)],
    ["Inbox", m.Inbox],
    ["Size", `${m.Size} bytes`],
  ];
  for (const [k, v] of rows) if (v) meta.append(el("dt", { text: k }), el("dd", { text: v }));
  fillList("codes", m.Codes, (c) => el("li", {}, el("code", { text: c })));
  fillList("links", m.Links, (u) => el("li", {}, el("a", {
    href: u, text: u, target: "_blank", rel: "noopener noreferrer" })));
  fillList("attachments", [...m.Attachments, ...m.Inline], (a) => el("li", {}, el("a", {
    href: `/api/v1/message/${encodeURIComponent(m.ID)}/part/${encodeURIComponent(a.PartID)}`,
    text: `${a.FileName || a.PartID} (${a.ContentType}, ${a.Size} bytes)`,
    download: a.FileName || "",
  })));
  $("download").href = `/api/v1/message/${encodeURIComponent(m.ID)}/raw?dl=1`;
  $("toggle-read").textContent = "Mark unread";
  $("release").hidden = !state.release;
  $("remote").checked = false;
  $("tab-html").disabled = !m.HTML;
  showTab(m.HTML ? "html" : "text");
  renderList(null);
  $("subject").focus();
}

function fillList(name, items, make) {
  $(name).replaceChildren(...items.map(make));
  $(`${name}-box`).hidden = items.length === 0;
}

function frameSource() {
  const m = state.open;
  const remote = $("remote").checked ? "?remote=1" : "";
  return `/view/${encodeURIComponent(m.ID)}.html${remote}`;
}

async function showTab(name) {
  state.tab = name;
  for (const t of ["html", "text", "source", "headers"]) {
    const tab = $(`tab-${t}`);
    tab.setAttribute("aria-selected", String(t === name));
    tab.tabIndex = t === name ? 0 : -1;
    $(`panel-${t}`).hidden = t !== name;
  }
  const m = state.open;
  if (!m) return;
  if (name === "html") {
    $("frame").src = frameSource();
  } else if (name === "text") {
    $("panel-text").textContent = m.Text || "(no text part)";
  } else if (name === "source") {
    $("panel-source").textContent = "Loading…";
    $("panel-source").textContent = await call(
      "GET", `/api/v1/message/${encodeURIComponent(m.ID)}/raw`, undefined, { inbox: "" });
  } else if (name === "headers") {
    const fields = await call(
      "GET", `/api/v1/message/${encodeURIComponent(m.ID)}/headers`, undefined, { inbox: "" });
    const rows = [];
    for (const [k, values] of Object.entries(fields)) {
      for (const v of values) rows.push(el("tr", {}, el("th", { text: k }), el("td", { text: v })));
    }
    $("headers").replaceChildren(...rows);
  }
}

function closeMessage() {
  const id = state.open && state.open.ID;
  state.open = null;
  $("frame").src = "about:blank";
  $("view-pane").hidden = true;
  document.body.classList.remove("viewing");
  renderList(null);
  if (id) focusItem(id);
}

async function deleteOpen() {
  if (!state.open) return;
  await call("DELETE", "/api/v1/messages", { IDs: [state.open.ID] }, { inbox: "" });
  say("Message deleted.");
  closeMessage();
}

async function toggleRead() {
  if (!state.open) return;
  const summary = state.messages.find((s) => s.ID === state.open.ID);
  const read = summary ? !summary.Read : false;
  await call("PUT", "/api/v1/messages", { IDs: [state.open.ID], Read: read }, { inbox: "" });
  $("toggle-read").textContent = read ? "Mark unread" : "Mark read";
}

async function toggleFocusedRead() {
  const li = document.activeElement && document.activeElement.closest("#list li");
  if (!li) return toggleRead();
  const summary = state.messages.find((s) => s.ID === li.dataset.id);
  if (summary) {
    await call("PUT", "/api/v1/messages", { IDs: [summary.ID], Read: !summary.Read }, { inbox: "" });
  }
}

async function deleteFocused() {
  const li = document.activeElement && document.activeElement.closest("#list li");
  if (!li) return deleteOpen();
  const next = li.nextElementSibling || li.previousElementSibling;
  await call("DELETE", "/api/v1/messages", { IDs: [li.dataset.id] }, { inbox: "" });
  if (next) next.firstChild.focus();
}

// -- release -------------------------------------------------------------------------------

function openRelease() {
  $("release-error").textContent = "";
  $("release-to").value = state.open.To.map((a) => a.Address).join(", ");
  $("release-box").hidden = false;
  $("release-to").focus();
}

function closeRelease() {
  $("release-box").hidden = true;
  $("release").focus();
}

async function sendRelease() {
  const to = $("release-to").value.split(",").map((s) => s.trim()).filter(Boolean);
  try {
    await call("POST", `/api/v1/message/${encodeURIComponent(state.open.ID)}/release`,
      { To: to }, { inbox: "" });
  } catch (e) {
    $("release-error").textContent = e.message;
    return;
  }
  closeRelease();
  say(`Released to ${to.join(", ")}.`);
}

// -- live updates --------------------------------------------------------------------------

let source = null;
let refreshTimer = null;

function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => loadList().catch((e) => say(e.message)), 150);
}

function listen() {
  if (source) source.close();
  source = new EventSource(api("/api/v1/events"));
  source.addEventListener("open", () => document.body.classList.remove("offline"));
  source.addEventListener("error", () => document.body.classList.add("offline"));
  source.addEventListener("new", (e) => {
    const m = JSON.parse(e.data);
    addInbox(m.Inbox);
    if (state.search) { refreshSoon(); return; }
    state.messages.unshift(m);
    state.messages.length = Math.min(state.messages.length, LIMIT);
    refreshSoon();  // counts (total, unread) come with the listing
    renderList(null);
    say(`New message: ${m.Subject || "(no subject)"}`);
  });
  source.addEventListener("deleted", (e) => {
    const { ID } = JSON.parse(e.data);
    state.messages = state.messages.filter((m) => m.ID !== ID);
    if (state.open && state.open.ID === ID) closeMessage();
    refreshSoon();
  });
  source.addEventListener("read", (e) => {
    const { ID, Read } = JSON.parse(e.data);
    const m = state.messages.find((s) => s.ID === ID);
    if (m) m.Read = Read;
    if (state.open && state.open.ID === ID) $("toggle-read").textContent = Read ? "Mark unread" : "Mark read";
    refreshSoon();
  });
}

// -- wiring --------------------------------------------------------------------------------

function wire() {
  $("inbox").addEventListener("change", () => {
    state.inbox = $("inbox").value;
    closeMessage();
    listen();
    loadList().catch((e) => say(e.message));
  });
  let searchTimer = null;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      state.search = $("search").value.trim();
      loadList().catch((e) => say(e.message));
    }, 200);
  });
  $("search").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); moveFocus(0); }
    if (e.key === "Escape") {
      // first clear the search; on an empty box, go back from the open message
      if ($("search").value) {
        $("search").value = "";
        $("search").dispatchEvent(new Event("input"));
      } else if (state.open) {
        closeMessage();
      }
    }
  });
  $("back").addEventListener("click", closeMessage);
  $("delete").addEventListener("click", () => deleteOpen().catch((e) => say(e.message)));
  $("toggle-read").addEventListener("click", () => toggleRead().catch((e) => say(e.message)));
  $("release").addEventListener("click", openRelease);
  $("release-send").addEventListener("click", () => sendRelease());
  $("release-cancel").addEventListener("click", closeRelease);
  $("release-to").addEventListener("keydown", (e) => {
    if (e.key === "Enter") sendRelease();
    if (e.key === "Escape") closeRelease();
  });
  $("remote").addEventListener("change", () => { $("frame").src = frameSource(); });
  $("mark-all-read").addEventListener("click", () =>
    call("PUT", "/api/v1/messages", { Read: true }).catch((e) => say(e.message)));
  $("delete-all").addEventListener("click", () => {
    const where = state.inbox ? `inbox ${state.inbox}` : "every inbox";
    if (!confirm(`Delete every message in ${where}?`)) return;
    call("DELETE", "/api/v1/messages").then(() => loadList()).catch((e) => say(e.message));
  });
  const tabs = ["html", "text", "source", "headers"];
  for (const t of tabs) $(`tab-${t}`).addEventListener("click", () => showTab(t));
  $("tabs").addEventListener("keydown", (e) => {
    const enabled = tabs.filter((t) => !$(`tab-${t}`).disabled);
    const i = enabled.indexOf(state.tab);
    let next = null;
    if (e.key === "ArrowRight") next = enabled[(i + 1) % enabled.length];
    if (e.key === "ArrowLeft") next = enabled[(i - 1 + enabled.length) % enabled.length];
    if (next) { e.preventDefault(); showTab(next); $(`tab-${next}`).focus(); }
  });
  document.addEventListener("keydown", (e) => {
    const typing = e.target.matches("input, select, textarea");
    if (!$("release-box").hidden) return;
    if (e.key === "Escape" && state.open && !typing) { closeMessage(); return; }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    const inList = e.target.closest && e.target.closest("#list");
    if (e.key === "/") { e.preventDefault(); $("search").focus(); }
    else if (e.key === "i") { e.preventDefault(); $("inbox").focus(); }
    else if (e.key === "ArrowDown" || e.key === "j") {
      if (inList || e.key === "j") { e.preventDefault(); moveFocus(1); }
    } else if (e.key === "ArrowUp" || e.key === "k") {
      if (inList || e.key === "k") { e.preventDefault(); moveFocus(-1); }
    } else if (e.key === "Delete" || e.key === "#") {
      deleteFocused().catch((err) => say(err.message));
    } else if (e.key === "u") {
      toggleFocusedRead().catch((err) => say(err.message));
    }
  });
}

async function start() {
  wire();
  const params = new URLSearchParams(location.search);
  state.inbox = params.get("inbox") || "";
  try {
    await loadInfo();
  } catch (e) {
    say(`Cannot reach the API: ${e.message}`);
  }
  if (state.inbox) { addInbox(state.inbox); $("inbox").value = state.inbox; }
  listen();
  await loadList().catch((e) => say(e.message));
}

start();
