// The chat page's drawing and behaviour. Talks to the server only through
// api.js (Api for REST, ChatSocket for the websocket). Plain ES module.
//
// Everything a person or a model typed is put in the page with textContent
// (see renderText): no HTML from a message ever reaches innerHTML.

import { Api, ChatSocket, newThreadId } from "./api.js";

const config = JSON.parse(document.getElementById("omni-config").textContent);
const authRequired = config.auth === "required";
const RESOURCE_KEY = "omni.resourceId";
const ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;

const $ = (id) => document.getElementById(id);
const el = {
  connection: $("connection"),
  resource: $("resource-id"),
  newChat: $("new-chat"),
  agent: $("agent"),
  threads: $("threads"),
  threadsEmpty: $("threads-empty"),
  moreThreads: $("more-threads"),
  title: $("thread-title"),
  origin: $("thread-origin"),
  forkThread: $("fork-thread"),
  deleteThread: $("delete-thread"),
  messages: $("messages"),
  error: $("error"),
  composer: $("composer"),
  input: $("message"),
  send: $("send"),
  stop: $("stop"),
  forkBanner: $("fork-banner"),
  forkBannerText: $("fork-banner-text"),
  forkCancel: $("fork-cancel"),
  confirm: $("confirm-delete"),
  confirmText: $("confirm-delete-text"),
};

// --- state -----------------------------------------------------------------------

const state = {
  threadId: null, // the open thread (null: a new conversation)
  sessions: new Map(), // threadId -> Session, from GET /api/sessions
  nextCursor: null, // the next page of the thread list
  forkFrom: null, // {threadId, uuid, label}: the next message forks
  streaming: null, // {threadId, li, text}: the assistant reply being drawn
  stopped: false,
};

function resourceId() {
  if (authRequired) return null; // the server uses the logged-in person's own
  const value = el.resource.value.trim();
  return ID_RE.test(value) ? value : config.defaultResourceId;
}

// The running turns' replies so far, by thread (drawn again when a thread
// whose turn is running is opened again).
const replies = new Map();

function logInAgain() {
  // The session ended (logged out in another tab, expired): back to the login.
  const next = location.pathname + location.search + location.hash;
  location.assign(`${config.loginUrl}?next=${encodeURIComponent(next)}`);
}

const api = new Api({
  base: config.apiBase, csrfToken: config.csrfToken, resourceId,
  onUnauthenticated: authRequired ? logInAgain : null,
});
const wsUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + config.wsPath;
const socket = new ChatSocket(wsUrl);
socket.addEventListener("unauthenticated", () => {
  if (authRequired) logInAgain();
});

// --- drawing helpers -----------------------------------------------------------------

/**
 * Draw text into `node` with a small Markdown subset built from DOM nodes:
 * ``` fenced blocks ```, `inline code` and **bold**. Never creates HTML from text.
 */
export function renderText(node, text) {
  node.replaceChildren();
  const parts = text.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/^[\w+-]*\n/, "");
      pre.append(code);
      node.append(pre);
      return;
    }
    for (const piece of part.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/)) {
      if (!piece) continue;
      if (piece.startsWith("`") && piece.endsWith("`") && piece.length > 2) {
        const code = document.createElement("code");
        code.textContent = piece.slice(1, -1);
        node.append(code);
      } else if (piece.startsWith("**") && piece.endsWith("**") && piece.length > 4) {
        const strong = document.createElement("strong");
        strong.textContent = piece.slice(2, -2);
        node.append(strong);
      } else {
        node.append(document.createTextNode(piece));
      }
    }
  });
}

function formatTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
}

function threadLabel(threadId) {
  const session = state.sessions.get(threadId);
  return (session && session.title) || threadId;
}

function showError(message) {
  if (!message) {
    el.error.hidden = true;
    el.error.textContent = "";
    return;
  }
  el.error.textContent = message;
  el.error.hidden = false;
}

const ERROR_TEXT = {
  thread_busy: "This conversation is still answering; wait for it or press Stop.",
  rate_limited: "Too many messages for now.",
  server_busy: "The server is at its limit of running conversations.",
  model_unavailable: "The model could not be reached.",
  network_error: "The server cannot be reached.",
};

function describeError({ code, message, retryAfter }) {
  let text = ERROR_TEXT[code] ? `${ERROR_TEXT[code]} (${message})` : message || code;
  if (retryAfter) text += ` Try again in ${retryAfter} s.`;
  return text;
}

// --- the thread list -------------------------------------------------------------------

async function loadThreads({ more = false } = {}) {
  try {
    const data = await api.listSessions({ cursor: more ? state.nextCursor : null });
    const sessions = more ? [...state.sessions.values(), ...data.sessions] : data.sessions;
    state.sessions = new Map(sessions.map((s) => [s.threadId, s]));
    state.nextCursor = data.nextCursor;
    el.moreThreads.hidden = !data.nextCursor;
    drawThreads([...state.sessions.values()]);
  } catch (err) {
    showError(`Could not list conversations: ${describeError(err)}`);
  }
}

function drawThreads(sessions) {
  const items = sessions.map((session) => {
    const li = document.createElement("li");
    li.className = "thread";
    li.dataset.threadId = session.threadId;
    if (session.threadId === state.threadId) li.setAttribute("aria-current", "true");

    const open = document.createElement("a");
    open.className = "thread-open";
    open.href = "#thread=" + encodeURIComponent(session.threadId);
    const title = document.createElement("span");
    title.className = "thread-title";
    title.textContent = session.title || session.threadId;
    const time = document.createElement("time");
    time.dateTime = session.updatedAt;
    time.textContent = formatTime(session.updatedAt);
    open.append(title, time);
    li.append(open);

    if (session.forkedFromThreadId) {
      const badge = document.createElement("a");
      badge.className = "fork-badge";
      badge.href = "#thread=" + encodeURIComponent(session.forkedFromThreadId);
      badge.textContent = "fork of " + threadLabel(session.forkedFromThreadId);
      badge.title = "Open the conversation this one was forked from";
      li.append(badge);
    }
    return li;
  });
  el.threads.replaceChildren(...items);
  el.threadsEmpty.hidden = items.length > 0;
}

function markCurrentThread() {
  for (const li of el.threads.children) {
    if (li.dataset.threadId === state.threadId) li.setAttribute("aria-current", "true");
    else li.removeAttribute("aria-current");
  }
}

// --- the conversation ----------------------------------------------------------------

function appendMessage(role, text, uuid = null) {
  const li = document.createElement("li");
  li.className = `message ${role}`;
  if (uuid) li.dataset.uuid = uuid;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  renderText(body, text);
  li.append(who, body);
  if (uuid && state.threadId) {
    const fork = document.createElement("button");
    fork.type = "button";
    fork.className = "fork-here";
    fork.textContent = "Fork from here";
    fork.setAttribute("aria-label", `Fork the conversation from this ${role === "user" ? "question" : "answer"}`);
    fork.addEventListener("click", () => startFork(uuid, li));
    li.append(fork);
  }
  el.messages.append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function startStreaming(threadId) {
  const li = appendMessage("assistant", "");
  li.classList.add("streaming");
  li.setAttribute("aria-busy", "true");
  state.streaming = { threadId, li, text: "" };
  return state.streaming;
}

function addNote(li, note) {
  li.classList.add("ended");
  const small = document.createElement("small");
  small.className = "note";
  small.textContent = note;
  li.append(small);
}

function endStreaming(note = null) {
  const streaming = state.streaming;
  if (!streaming) return;
  streaming.li.classList.remove("streaming");
  streaming.li.removeAttribute("aria-busy");
  if (note) addNote(streaming.li, note);
  if (!streaming.text && !note) streaming.li.remove();
  state.streaming = null;
}

function drawHeader() {
  const threadId = state.threadId;
  const session = threadId ? state.sessions.get(threadId) : null;
  el.title.textContent = threadId ? threadLabel(threadId) : "New conversation";
  document.title = `${el.title.textContent} · Omni chat`;
  if (session && session.forkedFromThreadId) {
    el.origin.replaceChildren("Forked from ");
    const link = document.createElement("a");
    link.href = "#thread=" + encodeURIComponent(session.forkedFromThreadId);
    link.textContent = threadLabel(session.forkedFromThreadId);
    el.origin.append(link);
    el.origin.hidden = false;
  } else {
    el.origin.hidden = true;
  }
  if (session && session.agent) el.agent.value = session.agent;
  drawRunning();
}

function drawRunning() {
  const running = state.threadId !== null && socket.isRunning(state.threadId);
  const stored = state.threadId !== null && state.sessions.has(state.threadId);
  el.stop.hidden = !running;
  el.send.disabled = running || !socket.isOpen;
  // Fork and delete a thread that is stored and not answering.
  el.forkThread.disabled = el.deleteThread.disabled = running || !stored;
}

async function openThread(threadId, { focus = true } = {}) {
  endStreaming();
  cancelFork();
  showError(null);
  state.threadId = threadId;
  el.messages.replaceChildren();
  markCurrentThread();
  drawHeader();
  if (threadId === null) {
    if (focus) el.input.focus();
    return;
  }
  if (!state.sessions.has(threadId)) {
    // Not on the list's first page (or just created elsewhere): its metadata.
    try {
      const { session } = await api.metadata(threadId);
      state.sessions.set(threadId, session);
    } catch (err) {
      // drawn as unknown below
    }
    if (state.threadId !== threadId) return;
    drawHeader();
  }
  await drawConversation(threadId);
  if (state.threadId !== threadId) return;
  if (socket.isRunning(threadId)) {
    // Its turn runs on this page's socket: draw the reply so far.
    if (!state.streaming) {
      const streaming = startStreaming(threadId);
      streaming.text = replies.get(threadId) || "";
      renderText(streaming.li.querySelector(".text"), streaming.text);
    }
  } else {
    // A turn may still be running (a reload, another tab): receive the rest.
    socket.follow(threadId, resourceId());
  }
  if (focus) el.input.focus();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Draw the thread's stored conversation (GET /api/sessions/messages). After a
 * turn (`ended`: the reply just drawn, `note`: how it ended), wait until the
 * store holds that reply (it is written as the turn runs, and may trail its
 * last event by a moment); if it never does (a stopped reply), keep the page
 * as drawn.
 */
let drawing = 0; // the latest drawConversation call; an older one gives way

async function drawConversation(threadId, options = {}) {
  const call = ++drawing;
  el.messages.setAttribute("aria-busy", "true");
  try {
    await fetchAndDraw(threadId, call, options);
  } finally {
    if (call === drawing) el.messages.removeAttribute("aria-busy");
  }
}

async function fetchAndDraw(threadId, call, { ended = null, note = null }) {
  for (let attempt = 0; ; attempt++) {
    let data;
    try {
      data = await api.messages(threadId);
    } catch (err) {
      if (state.threadId !== threadId || call !== drawing) return;
      if (err.status === 404 && (ended || socket.isRunning(threadId))) return; // not stored yet
      if (err.status === 404) showError(`There is no conversation ${threadId}.`);
      else showError(`Could not load the conversation: ${describeError(err)}`);
      return;
    }
    if (state.threadId !== threadId || call !== drawing) return;
    const last = data.messages[data.messages.length - 1];
    const stored = !ended || !ended.text || (last && last.role === "assistant" && last.text === ended.text);
    if (!stored) {
      if (attempt >= 5) return;
      await sleep(300);
      continue;
    }
    const streaming = state.streaming && state.streaming.threadId === threadId ? state.streaming : null;
    el.messages.replaceChildren();
    let li = null;
    for (const message of data.messages) li = appendMessage(message.role, message.text, message.uuid);
    if (note && ended && ended.text && li) addNote(li, note);
    if (streaming) el.messages.append(streaming.li);
    return;
  }
}

function newChat() {
  if (location.hash) history.pushState(null, "", location.pathname + location.search);
  openThread(null);
}

// --- sending, forking, stopping -----------------------------------------------------

function startFork(uuid = null, li = null) {
  if (!state.threadId) return;
  const label = threadLabel(state.threadId);
  state.forkFrom = { threadId: state.threadId, uuid };
  for (const item of el.messages.querySelectorAll(".fork-point")) item.classList.remove("fork-point");
  if (li) li.classList.add("fork-point");
  el.forkBannerText.textContent = uuid
    ? `Your next message starts a fork of “${label}” from the marked message.`
    : `Your next message starts a fork of “${label}”.`;
  el.forkBanner.hidden = false;
  el.input.focus();
}

function cancelFork() {
  state.forkFrom = null;
  el.forkBanner.hidden = true;
  for (const item of el.messages.querySelectorAll(".fork-point")) item.classList.remove("fork-point");
}

function send() {
  const text = el.input.value;
  if (!text.trim()) return;
  if (!socket.isOpen) {
    showError("Not connected to the server; the page reconnects on its own.");
    return;
  }
  if (state.threadId && socket.isRunning(state.threadId)) return;
  showError(null);
  const frame = { message: text, agent: el.agent.value };
  const resource = resourceId();
  if (resource) frame.resourceId = resource;

  if (state.forkFrom) {
    const { threadId: parent, uuid } = state.forkFrom;
    Object.assign(frame, { type: "fork", forkFromThreadId: parent, threadId: newThreadId("fork") });
    if (uuid) frame.atMessageUuid = uuid;
    // The fork starts with the parent's conversation up to the fork point.
    const point = uuid ? el.messages.querySelector(`[data-uuid="${CSS.escape(uuid)}"]`) : null;
    if (point) while (point.nextSibling) point.nextSibling.remove();
    for (const button of el.messages.querySelectorAll(".fork-here")) button.remove();
    cancelFork();
    state.threadId = frame.threadId;
    history.pushState(null, "", "#thread=" + encodeURIComponent(frame.threadId));
    el.title.textContent = `Fork of ${threadLabel(parent)}`;
    markCurrentThread();
  } else {
    if (!state.threadId) {
      state.threadId = newThreadId();
      history.pushState(null, "", "#thread=" + encodeURIComponent(state.threadId));
      el.title.textContent = text.trim().slice(0, 80);
    }
    Object.assign(frame, { type: "message", threadId: state.threadId });
  }
  appendMessage("user", text);
  startStreaming(frame.threadId);
  state.stopped = false;
  socket.startTurn(frame);
  el.input.value = "";
  drawRunning();
}

function stop() {
  if (!state.threadId || !socket.isRunning(state.threadId)) return;
  state.stopped = true;
  socket.interrupt(state.threadId, resourceId());
}

async function deleteThread() {
  const threadId = state.threadId;
  if (!threadId) return;
  el.confirmText.textContent = `“${threadLabel(threadId)}”: its messages and transcript are erased for good.`;
  el.confirm.returnValue = "";
  el.confirm.showModal();
  const answer = await new Promise((resolve) =>
    el.confirm.addEventListener("close", () => resolve(el.confirm.returnValue), { once: true }));
  if (answer !== "delete") return;
  try {
    await api.deleteSession(threadId);
  } catch (err) {
    if (err.status !== 404) {
      showError(`Could not delete the conversation: ${describeError(err)}`);
      return;
    }
  }
  socket.forget(threadId);
  state.sessions.delete(threadId);
  el.threads.querySelector(`[data-thread-id="${CSS.escape(threadId)}"]`)?.remove();
  if (state.threadId === threadId) newChat();
  await loadThreads();
}

// --- events of turns ----------------------------------------------------------------

socket.addEventListener("turn", async ({ detail: { threadId, event } }) => {
  const current = threadId !== null && threadId === state.threadId;
  if (threadId === null) {
    // An error the page cannot place (e.g. a stop that came after the end).
    if (event.code !== "not_found") showError(describeError(event));
    return;
  }
  if (event.type === "session") {
    replies.set(threadId, "");
    if (event.notice && current) showError(event.notice);
    loadThreads().then(() => current && state.threadId === threadId && drawHeader());
    if (current && !state.streaming) startStreaming(threadId);
  } else if (event.type === "text") {
    replies.set(threadId, (replies.get(threadId) || "") + event.text);
    if (!current) return;
    const streaming = state.streaming || startStreaming(threadId);
    streaming.text = replies.get(threadId);
    renderText(streaming.li.querySelector(".text"), streaming.text);
    streaming.li.scrollIntoView({ block: "end" });
  } else if (event.type === "done" || event.type === "error") {
    replies.delete(threadId);
    if (current) {
      const stopped = state.stopped;
      state.stopped = false;
      let note = null;
      if (event.type === "error") {
        showError(describeError(event));
        note = "failed";
      } else if (stopped) {
        note = "stopped";
      } else if (event.result && event.result.isError) {
        note = "ended with an error";
      }
      const ended = state.streaming;
      endStreaming(note);
      drawRunning();
      await Promise.all([loadThreads(), drawConversation(threadId, { ended, note })]);
      if (state.threadId === threadId) drawHeader();
    } else {
      loadThreads();
    }
  }
  if (current) drawRunning();
});

socket.addEventListener("gone", async ({ detail: { threadId } }) => {
  // The turn ended while the socket was down: show what the server kept.
  if (threadId !== state.threadId) return;
  const ended = state.streaming;
  const note = "interrupted: the connection to the server was lost";
  endStreaming(note);
  drawRunning();
  await Promise.all([loadThreads(), drawConversation(threadId, { ended, note })]);
  if (state.threadId === threadId) drawHeader();
});

socket.addEventListener("state", ({ detail }) => {
  el.connection.dataset.state = detail.state;
  if (detail.state === "open") el.connection.textContent = "Connected";
  else if (detail.state === "connecting") el.connection.textContent = "Connecting…";
  else {
    const seconds = Math.max(1, Math.round(detail.retryIn / 1000));
    el.connection.textContent = `Connection lost: reconnecting in ${seconds} s…`;
  }
  drawRunning();
});

// --- wiring ---------------------------------------------------------------------------

function threadFromHash() {
  const match = /^#thread=(.+)$/.exec(location.hash);
  if (!match) return null;
  let threadId;
  try {
    threadId = decodeURIComponent(match[1]);
  } catch (err) { // a malformed escape (#thread=%): no thread, not an error
    return null;
  }
  return ID_RE.test(threadId) ? threadId : null;
}

el.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
el.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
el.stop.addEventListener("click", stop);
el.newChat.addEventListener("click", newChat);
el.moreThreads.addEventListener("click", () => loadThreads({ more: true }));
el.forkThread.addEventListener("click", () => startFork());
el.forkCancel.addEventListener("click", () => {
  cancelFork();
  el.input.focus();
});
el.deleteThread.addEventListener("click", deleteThread);
window.addEventListener("hashchange", () => {
  const threadId = threadFromHash();
  if (threadId !== state.threadId) openThread(threadId);
});

for (const agent of config.agents) {
  const option = document.createElement("option");
  option.value = agent.name;
  option.textContent = agent.name;
  option.title = agent.description;
  el.agent.append(option);
}
el.agent.value = config.defaultAgent;

if (!authRequired) {
  el.resource.value = localStorage.getItem(RESOURCE_KEY) || config.defaultResourceId;
  el.resource.addEventListener("change", () => {
    const value = el.resource.value.trim();
    if (!ID_RE.test(value)) {
      showError("A resource id is 1 to 128 letters, digits or . _ : -");
      return;
    }
    localStorage.setItem(RESOURCE_KEY, value);
    newChat();
    loadThreads();
  });
}

socket.addEventListener("state", ({ detail }) => {
  // Connected (first time or again): receive the open thread's running turn, if any.
  if (detail.state === "open" && state.threadId && !socket.isRunning(state.threadId)) {
    socket.follow(state.threadId, resourceId());
  }
});
socket.connect();
await loadThreads();
await openThread(threadFromHash(), { focus: true });
