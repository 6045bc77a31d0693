// The chat page's drawing and behaviour. Talks to the server only through
// api.js (Api for REST, ChatSocket for the websocket). Plain ES module.
//
// Everything a person or a model typed is put in the page with textContent
// (see renderText, renderToolCall): no HTML from a message, a tool's input
// or its result ever reaches innerHTML.

import { Api, ChatSocket, newThreadId } from "./api.js";
import { AttachmentTray, renderAttachments } from "./attachments.js";

const config = JSON.parse(document.getElementById("omni-config").textContent);
const authRequired = config.auth === "required";
const RESOURCE_KEY = "omni.resourceId";
const ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;

const $ = (id) => document.getElementById(id);
const el = {
  connection: $("connection"),
  spend: $("spend"),
  resource: $("resource-id"),
  newChat: $("new-chat"),
  agent: $("agent"),
  threads: $("threads"),
  threadsEmpty: $("threads-empty"),
  moreThreads: $("more-threads"),
  title: $("thread-title"),
  threadCost: $("thread-cost"),
  origin: $("thread-origin"),
  forkThread: $("fork-thread"),
  deleteThread: $("delete-thread"),
  messages: $("messages"),
  error: $("error"),
  composer: $("composer"),
  input: $("message"),
  send: $("send"),
  sendNow: $("send-now"),
  stop: $("stop"),
  forkBanner: $("fork-banner"),
  forkBannerText: $("fork-banner-text"),
  forkCancel: $("fork-cancel"),
  confirm: $("confirm-delete"),
  confirmText: $("confirm-delete-text"),
  conversation: document.querySelector("main.conversation"),
  attachments: $("attachments"),
  attach: $("attach"),
  fileInput: $("file-input"),
  attachStatus: $("attach-status"),
  lightbox: $("lightbox"),
  lightboxImg: $("lightbox-img"),
  lightboxOpen: $("lightbox-open"),
};

// --- state -----------------------------------------------------------------------

const state = {
  threadId: null, // the open thread (null: a new conversation)
  sessions: new Map(), // threadId -> Session, from GET /api/sessions
  nextCursor: null, // the next page of the thread list
  forkFrom: null, // {threadId, uuid, label}: the next message forks
  streaming: null, // {threadId, li}: the assistant reply being drawn (its parts in `replies`)
  stopped: false,
  // {threadId, ended, note}: a drawing that could not reach the server, to do
  // again once the socket is back (with the ended reply and its note)
  redrawOnReconnect: null,
  usage: null, // the resource's GET /api/usage answer (today's spend, the budget)
  // threadId -> [entry]: the messages waiting for the thread's running turn, in
  // the order they run (contract §12), each {threadId, text, attachments, kind:
  // "queued"|"interrupt", queueId, turnId (null: not streamed to this page, e.g.
  // read from GET /api/chat/queue after a reload), li, status: "waiting"|"started"|"gone"}
  outbox: new Map(),
  // threadId -> {li, text, turnId}: the person's message of a turn that started
  // from the outbox, drawn until the stored conversation shows it
  started: new Map(),
};

function resourceId() {
  if (authRequired) return null; // the server uses the logged-in person's own
  const value = el.resource.value.trim();
  return ID_RE.test(value) ? value : config.defaultResourceId;
}

// The running turns' replies so far, by thread (drawn again when a thread
// whose turn is running is opened again): a list of parts, the text between
// tool calls ({kind: "text", text}) and the calls ({kind: "tool", toolUseId}).
const replies = new Map();

function replyOf(threadId) {
  let parts = replies.get(threadId);
  if (!parts) {
    parts = [{ kind: "text", text: "" }];
    replies.set(threadId, parts);
  }
  return parts;
}

/** Whether a call of the thread's reply still waits for a person's decision. */
function replyWaits(threadId) {
  return (replies.get(threadId) || []).some((part) => {
    const call = part.kind === "tool" && callsOf(threadId).get(part.toolUseId);
    return Boolean(call && call.approval && !call.approval.decision);
  });
}

/** The reply's text since its last tool call (what the store keeps as its last message). */
function lastText(parts) {
  const last = parts && parts[parts.length - 1];
  return last && last.kind === "text" ? last.text : "";
}

// The tool calls the page knows of, by thread, then by toolUseId: {toolUseId,
// tool, input, result (string or null), isError, approval}, approval being
// null (no person asked), {approvalId, expiresAt, decision: null} (waiting)
// or {decision: "allow"|"deny"|"expired", by}. Filled from the stream and
// from /api/sessions/messages, whichever is newer.
const calls = new Map();

function callsOf(threadId) {
  let known = calls.get(threadId);
  if (!known) {
    known = new Map();
    calls.set(threadId, known);
  }
  return known;
}

// Threads whose waiting call was decided here while the page followed no
// turn on them: threadId -> until when (ms) to look for the turn that goes on.
const continuing = new Map();

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

// The next message's attachments: uploaded as soon as they are added.
const tray = new AttachmentTray(el.attachments, {
  apiBase: config.apiBase, csrfToken: config.csrfToken, resourceId,
  max: config.attachmentsPerMessage || 20, maxMb: config.attachmentMaxMb || 20,
  onUnauthenticated: authRequired ? logInAgain : null, fallbackFocus: el.input,
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

/** An amount in USD: cents above a dollar, else up to 4 decimals ("$0.0042", "$0.50", "$0.00"). */
export function formatUsd(value) {
  const amount = Number(value) || 0;
  if (amount >= 1 || amount === 0) return `$${amount.toFixed(2)}`;
  if (amount < 0.0001) return "<$0.0001";
  return `$${amount.toFixed(4).replace(/(\.\d\d\d??)0+$/, "$1")}`;
}

/** When a wait of `seconds` ends, as local time: "today at 19:00 (in 5 h 12 min)". */
function whenResets(seconds) {
  const at = new Date(Math.round((Date.now() + seconds * 1000) / 60_000) * 60_000); // (a UTC midnight)
  const now = new Date();
  const tomorrow = new Date(now.getFullYear(), now.getMonth(), now.getDate() + 1);
  const day = at.toDateString() === now.toDateString() ? "today"
    : at.toDateString() === tomorrow.toDateString() ? "tomorrow" : at.toLocaleDateString();
  const time = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const minutes = Math.max(1, Math.round(seconds / 60));
  const hours = Math.floor(minutes / 60);
  const wait = hours ? `${hours} h${minutes % 60 ? ` ${minutes % 60} min` : ""}` : `${minutes} min`;
  return `${day} at ${time} your time (in ${wait})`;
}

/** Seconds until the budget resets: the refusal's retryAfter, else the last usage's resetsAt. */
function secondsToReset(retryAfter) {
  if (retryAfter) return Number(retryAfter);
  const resetsAt = state.usage && Date.parse(state.usage.budget.resetsAt);
  return resetsAt ? Math.max(60, (resetsAt - Date.now()) / 1000) : null;
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
  thread_waiting: "This conversation waits for a decision on a tool call: Allow or Deny it first.",
  queue_full: "Too many messages already wait in this conversation; cancel one or wait for it to run.",
  cancelled: "The queued message was cancelled.",
  rate_limited: "Too many messages for now.",
  server_busy: "The server is at its limit of running conversations.",
  model_unavailable: "The model could not be reached.",
  network_error: "The server cannot be reached.",
};

function describeError({ code, message, retryAfter }, threadId = null) {
  if (code === "budget_exceeded") {
    const seconds = secondsToReset(retryAfter);
    return "Today's budget is spent: no new messages until it resets"
      + (seconds ? ` ${whenResets(seconds)}.` : " at midnight UTC.");
  }
  const session = threadId ? state.sessions.get(threadId) : null;
  if (code === "thread_busy" && session && session.pendingApprovalId) code = "thread_waiting";
  let text = ERROR_TEXT[code] ? `${ERROR_TEXT[code]} (${message})` : message || code;
  if (retryAfter) text += ` Try again in ${retryAfter} s.`;
  return text;
}

// --- the thread list -------------------------------------------------------------------

let listing = 0; // the latest loadThreads call: an older answer that comes later is dropped

async function loadThreads({ more = false } = {}) {
  const call = ++listing;
  try {
    const data = await api.listSessions({ cursor: more ? state.nextCursor : null });
    if (call !== listing) return;
    const sessions = more ? [...state.sessions.values(), ...data.sessions] : data.sessions;
    state.sessions = new Map(sessions.map((s) => [s.threadId, s]));
    state.nextCursor = data.nextCursor;
    el.moreThreads.hidden = !data.nextCursor;
    drawThreads([...state.sessions.values()]);
  } catch (err) {
    showError(`Could not list conversations: ${describeError(err)}`);
  }
}

// --- today's spend ----------------------------------------------------------------------

let reading = 0; // the latest loadUsage call: an older answer that comes later is dropped
let newDay = null; // the timer that reads the spend again when the UTC day ends

/** Today's spend and the budget (GET /api/usage for today), drawn in the header. */
async function loadUsage() {
  const call = ++reading;
  const today = new Date().toISOString().slice(0, 10); // the UTC day
  try {
    const data = await api.usage({ from: today, to: today });
    if (call !== reading) return;
    state.usage = data;
  } catch (err) {
    if (call !== reading) return;
    state.usage = null; // (not shown rather than stale; the page works without it)
  }
  drawSpend();
}

function drawSpend() {
  const budget = state.usage && state.usage.budget;
  el.spend.hidden = !budget;
  if (!budget) return;
  const spent = budget.spentTodayUsd;
  const capped = typeof budget.dailyUsd === "number";
  el.spend.textContent = capped
    ? `Today ${formatUsd(spent)} of ${formatUsd(budget.dailyUsd)}`
    : `Today ${formatUsd(spent)} (no cap)`;
  el.spend.dataset.over = String(capped && spent >= budget.dailyUsd);
  const resets = formatTime(budget.resetsAt);
  el.spend.title = capped
    ? `Spent today (UTC day) against the daily budget; it resets at ${resets}`
    : `Spent today (UTC day); no daily budget. The day ends at ${resets}`;
  // A page left open overnight: a new day starts at zero (read again then;
  // in a minute at the soonest, should this clock be ahead of the server's).
  const wait = (Date.parse(budget.resetsAt) || 0) - Date.now() + 2000;
  clearTimeout(newDay);
  newDay = setTimeout(loadUsage, Math.min(Math.max(wait, 60_000), 2 ** 31 - 1));
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
    drawWaiting(li, session);
    return li;
  });
  el.threads.replaceChildren(...items);
  el.threadsEmpty.hidden = items.length > 0;
}

/** The sidebar's mark on a thread whose tool call waits for a person's decision. */
function drawWaiting(li, session) {
  li.querySelector(".approval-badge")?.remove();
  li.classList.toggle("waiting", Boolean(session.pendingApprovalId));
  if (!session.pendingApprovalId) return;
  const badge = document.createElement("a");
  badge.className = "approval-badge";
  badge.href = "#thread=" + encodeURIComponent(session.threadId);
  badge.textContent = "Needs your approval";
  badge.title = "A tool call of this conversation waits for your decision";
  li.append(badge);
}

/** Mark (approvalId) or unmark (null) a thread as waiting, before the list is read again. */
function setWaiting(threadId, approvalId) {
  const session = state.sessions.get(threadId);
  if (!session) return;
  session.pendingApprovalId = approvalId;
  const li = el.threads.querySelector(`[data-thread-id="${CSS.escape(threadId)}"]`);
  if (li) drawWaiting(li, session);
}

function markCurrentThread() {
  for (const li of el.threads.children) {
    if (li.dataset.threadId === state.threadId) li.setAttribute("aria-current", "true");
    else li.removeAttribute("aria-current");
  }
}

// --- the conversation ----------------------------------------------------------------

/** A full-size view of a message's image (Escape or Close ends it). */
function openImage(url, name) {
  el.lightboxImg.src = url;
  el.lightboxImg.alt = name;
  el.lightboxOpen.href = url;
  el.lightbox.setAttribute("aria-label", name);
  el.lightbox.showModal();
}

function appendMessage(role, text, uuid = null, toolCalls = [], attachments = []) {
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
  if (Array.isArray(attachments) && attachments.length) {
    li.append(renderAttachments(attachments, { apiBase: config.apiBase, resourceId: resourceId(), openImage }));
  }
  for (const stored of toolCalls || []) {
    if (!stored || typeof stored.toolUseId !== "string") continue;
    li.append(renderToolCall(state.threadId, rememberCall(state.threadId, stored)));
  }
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
  const next = firstWaiting(threadId); // the reply comes before the messages waiting for it
  if (next) el.messages.insertBefore(li, next);
  li.classList.add("streaming");
  li.setAttribute("aria-busy", "true");
  state.streaming = { threadId, li };
  return state.streaming;
}

/** Draw the streaming reply's parts (text and tool calls) into its element. */
function drawReply(streaming) {
  const threadId = streaming.threadId;
  const nodes = [];
  for (const part of replyOf(threadId)) {
    if (part.kind === "tool") {
      const call = callsOf(threadId).get(part.toolUseId);
      if (call) nodes.push(renderToolCall(threadId, call));
    } else {
      const node = document.createElement("div");
      node.className = "text";
      renderText(node, part.text);
      nodes.push(node);
    }
  }
  streaming.li.replaceChildren(streaming.li.querySelector(".who"), ...nodes);
  dropStoredCopies();
}

/**
 * A followed turn is replayed from its start (a reload, another tab): what
 * the store already kept of it (its tool calls, the text before them) is
 * drawn by the stream now. Remove the stored copy: the stored message holding
 * a call the streaming reply shows, the assistant messages before it (back to
 * the person's message) and every stored message after it.
 */
function dropStoredCopies() {
  const streaming = state.streaming;
  if (!streaming || !streaming.li.isConnected) return;
  for (const block of streaming.li.querySelectorAll(".tool-call")) {
    const selector = `.tool-call[data-tool-use-id="${CSS.escape(block.dataset.toolUseId)}"]`;
    for (const copy of el.messages.querySelectorAll(selector)) {
      if (streaming.li.contains(copy)) continue;
      const stored = copy.closest(".message");
      if (!stored) continue;
      while (stored.previousElementSibling && stored.previousElementSibling.classList.contains("assistant")) {
        stored.previousElementSibling.remove();
      }
      while (stored.nextElementSibling && stored.nextElementSibling !== streaming.li) {
        stored.nextElementSibling.remove();
      }
      stored.remove();
    }
  }
}

// --- messages waiting for the running turn (queued, sent now) ----------------------

function waitingOf(threadId) {
  return state.outbox.get(threadId) || [];
}

/** The first waiting message shown in the open conversation (the running reply goes before it). */
function firstWaiting(threadId) {
  if (threadId !== state.threadId) return null;
  const entry = waitingOf(threadId).find((e) => e.li.parentNode === el.messages);
  return entry ? entry.li : null;
}

function waitingByTurn(threadId, turnId) {
  return turnId ? waitingOf(threadId).find((e) => e.turnId === turnId) || null : null;
}

/** A waiting message's element: the person's message, marked queued (with Cancel) or sending. */
function waitingMessage(entry) {
  const li = appendMessage("user", entry.text, null, [], entry.attachments);
  li.classList.add("waiting");
  const line = document.createElement("div");
  line.className = "queue-state";
  const badge = document.createElement("span");
  badge.className = "queue-badge";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "queue-cancel";
  cancel.textContent = "Cancel";
  cancel.setAttribute("aria-label", "Cancel, take it off the queue");
  cancel.addEventListener("click", () => cancelWaiting(entry));
  line.append(badge, cancel);
  li.append(line);
  return li;
}

/** Put a message in the thread's outbox (a "send now" ahead of the queued ones). */
function addWaiting(entry) {
  const entries = [...waitingOf(entry.threadId)];
  entry.status = "waiting";
  entry.li = waitingMessage(entry);
  if (entry.kind === "interrupt") {
    const next = firstWaiting(entry.threadId);
    if (next) el.messages.insertBefore(entry.li, next);
    entries.unshift(entry);
  } else {
    entries.push(entry);
  }
  state.outbox.set(entry.threadId, entries);
  drawOutbox(entry.threadId);
  return entry;
}

/** Each waiting message's mark: its place in line (the page's order), or that it is being sent. */
function drawOutbox(threadId) {
  let position = 0;
  for (const entry of waitingOf(threadId)) {
    const badge = entry.li.querySelector(".queue-badge");
    const cancel = entry.li.querySelector(".queue-cancel");
    if (entry.kind === "interrupt") {
      entry.li.dataset.queueState = "sending";
      badge.textContent = "Sending now…";
      cancel.hidden = true;
      continue;
    }
    position += 1;
    entry.li.dataset.queueState = "queued";
    entry.li.dataset.position = String(position);
    badge.textContent = entry.queueId ? `Queued: ${position} in line` : "Queuing…";
    cancel.hidden = !entry.queueId;
    cancel.disabled = Boolean(entry.cancelling);
    cancel.textContent = entry.cancelling ? "Cancelling…" : "Cancel";
  }
}

function dropWaiting(entry) {
  entry.status = "gone";
  entry.li.remove();
  const entries = waitingOf(entry.threadId).filter((e) => e !== entry);
  if (entries.length) state.outbox.set(entry.threadId, entries);
  else state.outbox.delete(entry.threadId);
  drawOutbox(entry.threadId);
  drawRunning();
}

/** A waiting message's turn started: it is the person's message of the running turn now. */
function startWaiting(entry, turnId) {
  if (entry.status !== "waiting") return;
  dropWaiting(entry);
  entry.status = "started";
  const li = entry.li;
  li.classList.remove("waiting");
  delete li.dataset.queueState;
  delete li.dataset.position;
  li.querySelector(".queue-state")?.remove();
  state.started.set(entry.threadId, { li, text: entry.text, turnId });
  const next = firstWaiting(entry.threadId);
  if (entry.threadId === state.threadId) {
    if (next) el.messages.insertBefore(li, next);
    else el.messages.append(li);
  }
}

/** Take a queued message back (DELETE /api/chat/queue); its stream, if here, ends "cancelled". */
async function cancelWaiting(entry) {
  if (!entry.queueId || entry.cancelling || entry.status !== "waiting") return;
  entry.cancelling = true;
  drawOutbox(entry.threadId);
  try {
    await api.cancelQueued(entry.threadId, entry.queueId);
    if (entry.status === "waiting") dropWaiting(entry);
  } catch (err) {
    entry.cancelling = false;
    if (entry.status === "waiting") {
      showError(err.status === 404
        ? "This message no longer waits: its turn has started."
        : `Could not cancel the message: ${describeError(err)}`);
      drawOutbox(entry.threadId);
      if (err.status === 404 && !entry.turnId) loadQueue(entry.threadId);
    }
  }
}

/**
 * The thread's queued messages as the server keeps them (GET /api/chat/queue):
 * those this page does not show yet are added (after a reload, another tab's);
 * those not streamed to this page that no longer wait are dropped (they ran
 * or were cancelled: the stored conversation shows them). Returns the answer.
 */
let queueReads = 0;

async function loadQueue(threadId, { follow = true } = {}) {
  const call = ++queueReads;
  let data;
  try {
    data = await api.queue(threadId);
  } catch (err) {
    return null; // (drawn without; the conversation works without it)
  }
  if (call !== queueReads || threadId !== state.threadId) return data;
  const waiting = new Set(data.queued.map((q) => q.queueId));
  for (const entry of waitingOf(threadId)) {
    if (!entry.turnId && entry.queueId && !waiting.has(entry.queueId)) dropWaiting(entry);
  }
  const shown = new Set(waitingOf(threadId).map((e) => e.queueId));
  for (const queued of [...data.queued].sort((a, b) => a.position - b.position)) {
    if (shown.has(queued.queueId)) continue;
    addWaiting({ threadId, text: String(queued.message ?? ""), attachments: [], kind: "queued",
      queueId: queued.queueId, turnId: null });
  }
  // Their turns do not come to this page by themselves: follow the thread until the next one runs.
  if (follow && waitingOf(threadId).some((e) => !e.turnId) && !socket.isRunning(threadId)) followContinuation(threadId);
  return data;
}

/**
 * A turn started that this page did not send (followed after a reload): if
 * one of the queued messages read from the server no longer waits, it is
 * that turn's message (the first of them in line; any other was cancelled).
 */
async function claimStarted(threadId, turnId) {
  if (!waitingOf(threadId).some((e) => !e.turnId && e.queueId)) return;
  const data = await api.queue(threadId).catch(() => null);
  if (!data || threadId !== state.threadId) return;
  const waiting = new Set(data.queued.map((q) => q.queueId));
  const gone = waitingOf(threadId).filter((e) => !e.turnId && e.queueId && !waiting.has(e.queueId));
  if (!gone.length) return;
  const running = socket.threads.get(threadId);
  const [first, ...others] = gone;
  others.forEach(dropWaiting);
  if (running && running.running && running.turnId === turnId) {
    startWaiting(first, turnId);
    if (state.streaming && state.streaming.threadId === threadId) el.messages.insertBefore(first.li, state.streaming.li);
  } else {
    dropWaiting(first);
  }
}

// --- tool calls ------------------------------------------------------------------------

const LONG_TEXT = 240; // characters: a longer input or result starts collapsed
const LONG_LINES = 8;

/** Record what is known of a call (from an event or the store), newest wins. */
function rememberCall(threadId, incoming) {
  const known = callsOf(threadId);
  let call = known.get(incoming.toolUseId);
  if (!call) {
    call = { toolUseId: incoming.toolUseId, tool: "", input: null, result: null, isError: false, approval: null };
    known.set(call.toolUseId, call);
  }
  if (typeof incoming.tool === "string") call.tool = incoming.tool;
  if (incoming.input !== undefined) call.input = incoming.input;
  if (typeof incoming.result === "string") {
    call.result = incoming.result;
    call.isError = Boolean(incoming.isError);
  }
  const approval = incoming.approval;
  // A decision is never undone by an older view of the call still waiting.
  if (approval && (approval.decision || !call.approval || !call.approval.decision)) {
    call.approval = { ...approval };
  }
  return call;
}

function callByApproval(threadId, approvalId) {
  for (const call of callsOf(threadId).values()) {
    if (call.approval && call.approval.approvalId === approvalId) return call;
  }
  return null;
}

/** Input or result as text: JSON pretty-printed (a string holding JSON too). */
function pretty(value) {
  if (typeof value === "string") {
    try {
      const parsed = JSON.parse(value);
      if (parsed !== null && typeof parsed === "object") return JSON.stringify(parsed, null, 2);
    } catch (err) {
      // not JSON: as it is
    }
    return value;
  }
  if (value === undefined || value === null) return "";
  try {
    return JSON.stringify(value, null, 2);
  } catch (err) {
    return String(value);
  }
}

/** A <details> with `text` in a <pre>: open when short, collapsed when long. */
function collapsible(className, label, text) {
  const details = document.createElement("details");
  details.className = className;
  const summary = document.createElement("summary");
  const long = text.length > LONG_TEXT || text.split("\n").length > LONG_LINES;
  summary.textContent = long ? `${label} (${text.length.toLocaleString()} characters)` : label;
  const pre = document.createElement("pre");
  pre.textContent = text;
  details.append(summary, pre);
  details.open = !long;
  return details;
}

/** "mcp__omni__delete_conversation" -> {name: "delete_conversation", server: "omni"} */
function toolName(tool) {
  const match = /^mcp__(.+?)__(.+)$/.exec(tool || "");
  return match ? { name: match[2], server: match[1] } : { name: tool || "tool", server: null };
}

function callStatus(call) {
  const approval = call.approval;
  if (approval && !approval.decision) return ["waiting", "waiting for your decision"];
  if (approval && approval.decision !== "allow") return ["refused", "not run"];
  if (call.result === null) return ["running", "running…"];
  return call.isError ? ["error", "failed"] : ["done", "done"];
}

function decisionText({ decision, by }) {
  if (decision === "expired") return "Expired: no decision in time, not run";
  if (by === "interrupt") return "Denied: the reply was stopped";
  const verb = decision === "allow" ? "Allowed" : "Denied";
  return by ? `${verb} by ${by}` : verb;
}

/** A tool call as a block of DOM nodes: name, input, approval, result. */
function renderToolCall(threadId, call) {
  const box = document.createElement("div");
  box.className = "tool-call";
  box.dataset.toolUseId = call.toolUseId;
  const [status, statusText] = callStatus(call);
  box.dataset.state = status;

  const head = document.createElement("div");
  head.className = "tool-head";
  const { name, server } = toolName(call.tool);
  const label = document.createElement("span");
  label.className = "tool-label";
  label.textContent = "Tool";
  const code = document.createElement("code");
  code.className = "tool-name";
  code.textContent = name;
  code.title = call.tool;
  head.append(label, code);
  if (server) {
    const from = document.createElement("span");
    from.className = "tool-server";
    from.textContent = `(${server})`;
    head.append(from);
  }
  const statusNode = document.createElement("span");
  statusNode.className = "tool-status";
  statusNode.textContent = statusText;
  head.append(statusNode);
  box.append(head, collapsible("tool-input", "Input", pretty(call.input)));

  if (call.approval) box.append(renderApproval(threadId, call, name));
  if (call.result !== null) {
    box.append(collapsible("tool-result", call.isError ? "Result (error)" : "Result", pretty(call.result)));
  }
  return box;
}

function renderApproval(threadId, call, name) {
  const approval = call.approval;
  const box = document.createElement("div");
  box.className = "approval";
  if (approval.approvalId) box.dataset.approvalId = approval.approvalId;
  if (approval.decision) {
    box.dataset.decision = approval.decision;
    const said = document.createElement("p");
    said.className = "approval-decision";
    said.textContent = decisionText(approval);
    box.append(said);
    return box;
  }
  box.setAttribute("role", "group");
  box.setAttribute("aria-label", `Approve ${name}`);
  const ask = document.createElement("p");
  ask.className = "approval-ask";
  ask.append("This call needs your approval.");
  if (approval.expiresAt) {
    const time = document.createElement("time");
    time.dateTime = approval.expiresAt;
    time.textContent = formatTime(approval.expiresAt);
    ask.append(" It expires at ", time, " (then it is denied).");
  }
  const buttons = document.createElement("div");
  buttons.className = "approval-buttons";
  for (const [decision, text, cls] of [["allow", "Allow", "allow"], ["deny", "Deny", "deny danger"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = cls;
    button.textContent = approval.sending === decision ? `${text}…` : text;
    button.disabled = Boolean(approval.sending);
    button.setAttribute("aria-label", `${text} ${name}`);
    button.addEventListener("click", () => decide(threadId, call.toolUseId, decision));
    buttons.append(button);
  }
  box.append(ask, buttons);
  return box;
}

/** Draw a call again wherever the open conversation shows it (keeping what was opened). */
function redrawCall(threadId, toolUseId) {
  if (threadId !== state.threadId) return;
  const call = callsOf(threadId).get(toolUseId);
  if (!call) return;
  const selector = `.tool-call[data-tool-use-id="${CSS.escape(toolUseId)}"]`;
  for (const old of el.messages.querySelectorAll(selector)) {
    const fresh = renderToolCall(threadId, call);
    for (const cls of ["tool-input", "tool-result"]) {
      const was = old.querySelector(`.${cls}`);
      const now = fresh.querySelector(`.${cls}`);
      if (was && now) now.open = was.open;
    }
    const focused = old.contains(document.activeElement);
    old.replaceWith(fresh);
    if (focused) { // the button pressed is gone: keep the focus in the call
      fresh.tabIndex = -1;
      fresh.focus({ preventScroll: true });
    }
  }
}

/** Allow or deny a waiting call (POST /api/chat/approval). */
async function decide(threadId, toolUseId, decision) {
  const call = callsOf(threadId).get(toolUseId);
  if (!call || !call.approval || call.approval.decision || call.approval.sending || !call.approval.approvalId) return;
  call.approval.sending = decision;
  redrawCall(threadId, toolUseId);
  try {
    await api.decide(threadId, call.approval.approvalId, decision);
    // (the approval event, which says who decided, may have come first)
    if (!call.approval.decision) call.approval = { ...call.approval, decision, by: null };
    setWaiting(threadId, null);
    // Not following a turn there (reloaded after its worker restarted...):
    // the conversation goes on in a turn to follow.
    if (!socket.isRunning(threadId)) followContinuation(threadId);
  } catch (err) {
    if (err.status === 404 || err.status === 409) {
      showError(err.status === 409
        ? "This tool call was already decided."
        : "This tool call no longer waits for a decision (it expired, or its conversation is gone).");
      if (threadId === state.threadId && !socket.isRunning(threadId)) drawConversation(threadId);
    } else {
      showError(`Could not send the decision: ${describeError(err)}`);
    }
  } finally {
    if (call.approval) call.approval.sending = null;
    redrawCall(threadId, toolUseId);
    loadThreads();
  }
}

/** Follow the thread until the turn that goes on after a decision shows up (within a few seconds). */
function followContinuation(threadId) {
  continuing.set(threadId, Date.now() + 6000);
  socket.follow(threadId, resourceId());
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
  const li = streaming.li;
  li.classList.remove("streaming");
  li.removeAttribute("aria-busy");
  if (note) addNote(li, note);
  const empty = ![...li.querySelectorAll(".text")].some((node) => node.textContent) && !li.querySelector(".tool-call");
  if (empty && !note) li.remove();
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
  drawCost();
  drawRunning();
}

/** The open thread's cost so far (its Session's costUsd). */
function drawCost() {
  const session = state.threadId ? state.sessions.get(state.threadId) : null;
  const known = Boolean(session) && typeof session.costUsd === "number";
  el.threadCost.hidden = !known;
  if (!known) return;
  el.threadCost.textContent = formatUsd(session.costUsd);
  el.threadCost.title = "What this conversation has cost so far";
}

function drawRunning() {
  const running = state.threadId !== null && socket.isRunning(state.threadId);
  const stored = state.threadId !== null && state.sessions.has(state.threadId);
  el.stop.hidden = !running;
  el.sendNow.hidden = !running;
  // While it answers, a message waits for the reply (Send) or stops it (Send now).
  el.send.disabled = el.sendNow.disabled = !socket.isOpen || tray.uploading;
  el.send.title = running ? "Queue this message: it is sent when the current reply ends (Enter)" : "";
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
    if (!state.streaming) drawReply(startStreaming(threadId));
  } else {
    // A turn may still be running (a reload, another tab): receive the rest.
    socket.follow(threadId, resourceId());
  }
  if (focus) el.input.focus();
  await loadQueue(threadId); // the messages waiting for it
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
      if (err.status === 0) {
        // the server is away: again once it is back, with the turn's note
        // (the redraw replaces the list, and with it the note on the ended reply)
        state.redrawOnReconnect = { threadId, ended, note };
      }
      return;
    }
    if (state.threadId !== threadId || call !== drawing) return;
    if (state.redrawOnReconnect && state.redrawOnReconnect.threadId === threadId) {
      state.redrawOnReconnect = null;
      showError(null); // the "could not load" of before
    }
    // The message of a turn that started from the outbox, when the store has it already.
    const started = state.started.get(threadId);
    const final = data.messages[data.messages.length - 1];
    const startedStored = Boolean(started) && final && final.role === "user" && final.text === started.text;
    let last = data.messages[data.messages.length - (startedStored ? 2 : 1)];
    if (ended && ended.more) {
      // The turns of the messages that waited may be stored after it already.
      last = data.messages.slice(-4).reverse().find((m) => m.role === "assistant" && m.text === ended.text) || last;
    }
    const stored = !ended || !ended.text || (last && last.role === "assistant" && last.text === ended.text);
    if (!stored) {
      if (attempt >= 5) return;
      await sleep(300);
      continue;
    }
    const streaming = state.streaming && state.streaming.threadId === threadId ? state.streaming : null;
    el.messages.replaceChildren();
    let li = null;
    for (const message of data.messages) {
      const item = appendMessage(message.role, message.text, message.uuid, message.toolCalls, message.attachments);
      if (message === last) li = item;
    }
    if (note && ended && ended.text && li) addNote(li, note);
    if (started && !startedStored) el.messages.append(started.li);
    if (streaming) {
      el.messages.append(streaming.li);
      dropStoredCopies();
    }
    // The messages waiting for the running turn, after it. One not streamed to
    // this page that the store shows as its last message has run: dropped.
    const head = waitingOf(threadId)[0];
    if (head && !head.turnId && !startedStored && final && final.role === "user" && final.text === head.text) {
      dropWaiting(head);
    }
    for (const entry of waitingOf(threadId)) el.messages.append(entry.li);
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

/** Send the composer's message; `now`: while a turn runs, interrupt it (else queue the message). */
function send({ now = false } = {}) {
  const text = el.input.value;
  if (tray.uploading) {
    el.attachStatus.textContent = "Wait for the uploads to finish, then send.";
    return;
  }
  const attachments = tray.ready;
  if (!text.trim() && !attachments.length) return;
  if (!socket.isOpen) {
    showError("Not connected to the server; the page reconnects on its own.");
    return;
  }
  const running = state.threadId !== null && socket.isRunning(state.threadId);
  const busy = state.threadId !== null && !state.forkFrom && (running || waitingOf(state.threadId).length > 0);
  if (running && state.forkFrom) return; // (Fork is not offered while the thread answers)
  showError(null);
  // The page reads no chunk events (the raw SDK messages): the server leaves them out.
  const frame = { message: text, agent: el.agent.value, chunks: false };
  if (attachments.length) frame.attachments = attachments.map((a) => a.attachmentId);
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
      el.title.textContent = (text.trim() || attachments.map((a) => a.name).join(", ")).slice(0, 80);
    }
    Object.assign(frame, { type: "message", threadId: state.threadId });
  }
  if (busy) {
    // The thread answers: the message waits for it (queued), or stops it (sent now).
    frame.ifBusy = now ? "interrupt" : "enqueue";
    const entry = addWaiting({ threadId: frame.threadId, text, attachments, kind: frame.ifBusy === "interrupt" ? "interrupt" : "queued",
      queueId: null, turnId: null });
    if (now && running) state.stopped = true;
    socket.startTurn(frame, entry);
    el.input.value = "";
    tray.clear();
    drawRunning();
    return;
  }
  appendMessage("user", text, null, [], attachments);
  startStreaming(frame.threadId);
  state.stopped = false;
  socket.startTurn(frame);
  el.input.value = "";
  tray.clear();
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
  state.outbox.delete(threadId);
  state.started.delete(threadId);
  state.sessions.delete(threadId);
  el.threads.querySelector(`[data-thread-id="${CSS.escape(threadId)}"]`)?.remove();
  if (state.threadId === threadId) newChat();
  await loadThreads();
}

// --- events of turns ----------------------------------------------------------------

/** The streaming reply of the open thread `threadId` (started if need be), or null. */
function streamingOf(threadId) {
  if (threadId !== state.threadId) return null;
  return state.streaming || startStreaming(threadId);
}

/** Make sure the reply shows the call (a turn that goes on after a decision starts with it). */
function showCall(threadId, toolUseId) {
  const parts = replyOf(threadId);
  if (parts.some((part) => part.kind === "tool" && part.toolUseId === toolUseId)) return;
  if (threadId === state.threadId
      && el.messages.querySelector(`.tool-call[data-tool-use-id="${CSS.escape(toolUseId)}"]`)) return;
  parts.push({ kind: "tool", toolUseId });
  const streaming = streamingOf(threadId);
  if (streaming) drawReply(streaming);
}

/**
 * An event for a message of the outbox (the answer to its frame, or of its
 * turn): true when that is all it is (queued, refused, cancelled); its turn's
 * first event makes it the running turn's message, and goes on as any turn's.
 */
function onWaiting(entry, event, current) {
  if (event.type === "queued") {
    Object.assign(entry, { queueId: event.queueId, turnId: event.turnId });
    drawOutbox(entry.threadId);
    return true;
  }
  if (event.type === "error" && (!event.turnId || entry.status !== "started")) {
    // refused (a full queue, a budget spent...), cancelled, or its thread deleted
    const waited = entry.status === "waiting";
    dropWaiting(entry);
    if (entry.kind === "interrupt") state.stopped = false;
    if (!event.turnId && waited && current && !el.input.value) el.input.value = entry.text; // to send again
    if (event.code !== "cancelled" && current) showError(describeError(event, entry.threadId));
    return true;
  }
  if (entry.status === "waiting" && event.type !== "done") startWaiting(entry, event.turnId);
  return false;
}

socket.addEventListener("turn", async ({ detail: { threadId, event, ref } }) => {
  const current = threadId !== null && threadId === state.threadId;
  if (threadId === null) {
    // An error the page cannot place (e.g. a stop that came after the end).
    if (event.code !== "not_found") showError(describeError(event));
    return;
  }
  continuing.delete(threadId);
  const entry = ref || waitingByTurn(threadId, event.turnId)
    // (a queued message read after a reload: its turn's stream, followed, starts with its queued event)
    || (event.type === "queued" && waitingOf(threadId).find((e) => e.queueId === event.queueId)) || null;
  if (entry && entry.status !== "started" && onWaiting(entry, event, current)) return;
  const own = socket.threads.get(threadId);
  if (event.turnId && own && own.turnId !== event.turnId) return; // the end of a turn that never ran
  if (event.type === "session") {
    if (!entry) claimStarted(threadId, event.turnId); // (a queued message read after a reload)
    replies.set(threadId, [{ kind: "text", text: "" }]);
    if (event.notice && current) showError(event.notice);
    loadThreads().then(() => current && state.threadId === threadId && drawHeader());
    if (current) drawReply(state.streaming || startStreaming(threadId));
  } else if (event.type === "text") {
    const parts = replyOf(threadId);
    let last = parts[parts.length - 1];
    if (last.kind !== "text") {
      last = { kind: "text", text: "" };
      parts.push(last);
    }
    last.text += event.text;
    const streaming = streamingOf(threadId);
    if (!streaming) return;
    const node = streaming.li.lastElementChild;
    if (node && node.classList.contains("text")) renderText(node, last.text);
    else drawReply(streaming);
    streaming.li.scrollIntoView({ block: "end" });
  } else if (event.type === "tool_use" && typeof event.toolUseId === "string") {
    rememberCall(threadId, { toolUseId: event.toolUseId, tool: event.tool, input: event.input });
    const parts = replyOf(threadId);
    if (!parts.some((part) => part.kind === "tool" && part.toolUseId === event.toolUseId)) {
      parts.push({ kind: "tool", toolUseId: event.toolUseId });
    }
    const streaming = streamingOf(threadId);
    if (streaming) {
      drawReply(streaming);
      streaming.li.scrollIntoView({ block: "end" });
    }
  } else if (event.type === "approval_request" && typeof event.toolUseId === "string") {
    const call = rememberCall(threadId, {
      toolUseId: event.toolUseId, tool: event.tool, input: event.input,
      approval: { approvalId: event.approvalId, expiresAt: event.expiresAt, decision: null, by: null },
    });
    showCall(threadId, call.toolUseId);
    redrawCall(threadId, call.toolUseId);
    if (!call.approval.decision) setWaiting(threadId, event.approvalId);
    if (current) state.streaming?.li.scrollIntoView({ block: "end" });
  } else if (event.type === "approval") {
    const call = callByApproval(threadId, event.approvalId);
    if (call) {
      call.approval = { ...call.approval, decision: event.decision, by: event.by, sending: null };
      redrawCall(threadId, call.toolUseId);
    }
    setWaiting(threadId, null);
    loadThreads();
  } else if (event.type === "tool_result" && typeof event.toolUseId === "string") {
    rememberCall(threadId, { toolUseId: event.toolUseId, result: String(event.text ?? ""), isError: event.isError });
    showCall(threadId, event.toolUseId);
    redrawCall(threadId, event.toolUseId);
    loadThreads(); // a tool may have changed the threads (deleted one)
  } else if (event.type === "done" || event.type === "error") {
    loadUsage(); // what today's spend is now (the turn's record is written before its last event)
    const session = state.sessions.get(threadId);
    if (event.type === "done" && session && typeof session.costUsd === "number") {
      // at once; the list read below has the stored total
      session.costUsd += Number(event.result && event.result.costUsd) || 0;
      if (current) drawCost();
    }
    // (more: messages wait, whose turns may be stored after this reply by the time it is read)
    const ended = current && state.streaming
      ? { text: lastText(replies.get(threadId)), more: waitingOf(threadId).length > 0 } : null;
    // The server process running the turn stops while a call waits: the call
    // still waits (in the store) and can be decided; a new turn goes on after.
    const lost = event.type === "error" && event.code === "turn_lost" && replyWaits(threadId);
    replies.delete(threadId);
    if (state.started.get(threadId)?.turnId === event.turnId) state.started.delete(threadId);
    if (current) {
      const stopped = state.stopped;
      state.stopped = false;
      let note = null;
      if (lost) {
        note = null;
      } else if (event.type === "error") {
        showError(describeError(event, threadId));
        note = "failed";
      } else if (stopped) {
        note = "stopped";
      } else if (event.result && event.result.isError) {
        note = "ended with an error";
      }
      endStreaming(note);
      drawRunning();
      // Queued messages whose turns this page receives only by following the thread (after a reload).
      if (!socket.isRunning(threadId) && waitingOf(threadId).some((e) => !e.turnId)) followContinuation(threadId);
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
  // A call that still waits for a decision is not lost: the store shows it, to be decided.
  const waiting = replyWaits(threadId);
  const parts = replies.get(threadId);
  replies.delete(threadId);
  state.started.delete(threadId);
  if (threadId !== state.threadId) return;
  const ended = state.streaming ? { text: lastText(parts) } : null;
  const note = waiting ? null : "interrupted: the connection to the server was lost";
  endStreaming(note);
  drawRunning();
  await Promise.all([loadThreads(), drawConversation(threadId, { ended, note })]);
  if (state.threadId === threadId) drawHeader();
});

socket.addEventListener("idle", ({ detail: { threadId } }) => {
  // No turn on the thread (yet): after a decision, the one that goes on starts within moments.
  // Likewise the next queued message's, after the one that ran (queued messages read after a reload).
  const until = continuing.get(threadId);
  if (until === undefined) return;
  const queued = threadId === state.threadId && waitingOf(threadId).some((e) => !e.turnId);
  if (Date.now() < until) {
    (queued ? loadQueue(threadId, { follow: false }) : Promise.resolve()).then(() => {
      if (!continuing.has(threadId) || socket.isRunning(threadId)) return;
      if (queued && !waitingOf(threadId).some((e) => !e.turnId)) { // none waits any more: all ran
        continuing.delete(threadId);
        drawConversation(threadId);
        return;
      }
      setTimeout(() => {
        if (continuing.has(threadId) && !socket.isRunning(threadId)) socket.follow(threadId, resourceId());
      }, 400);
    });
    return;
  }
  continuing.delete(threadId);
  if (threadId === state.threadId) {
    drawConversation(threadId); // what the store has
    if (queued) {
      // Messages still wait, and no turn runs: look again now and then.
      loadQueue(threadId, { follow: false });
      setTimeout(() => {
        if (threadId === state.threadId && !socket.isRunning(threadId) && !continuing.has(threadId)
            && waitingOf(threadId).some((e) => !e.turnId)) followContinuation(threadId);
      }, 5000);
    }
  }
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
    send({ now: e.ctrlKey || e.metaKey });
  }
});
el.stop.addEventListener("click", stop);
el.sendNow.addEventListener("click", () => send({ now: true }));

// --- attaching: the button, a paste, a drop ------------------------------------------

tray.addEventListener("change", () => {
  // With a file attached the text may be empty.
  el.input.required = tray.ready.length === 0;
  const uploading = tray.items.filter((item) => item.status === "uploading").length;
  el.attachStatus.textContent = uploading
    ? `Uploading ${uploading} file${uploading > 1 ? "s" : ""}… Send waits for ${uploading > 1 ? "them" : "it"}.`
    : "";
  drawRunning();
});
el.attach.addEventListener("click", () => el.fileInput.click());
el.fileInput.addEventListener("change", () => {
  const files = [...el.fileInput.files];
  el.fileInput.value = ""; // the same file can be picked again
  if (files.length) tray.add(files);
  el.input.focus();
});
el.input.addEventListener("paste", (e) => {
  const files = e.clipboardData ? [...e.clipboardData.files] : [];
  if (!files.length) return;
  // A screenshot: attach it. Text pasted along with files is pasted as usual.
  if (!e.clipboardData.types.includes("text/plain")) e.preventDefault();
  tray.add(files);
});

const carriesFiles = (e) => Boolean(e.dataTransfer) && [...e.dataTransfer.types].includes("Files");
let dragDepth = 0;
el.conversation.addEventListener("dragenter", (e) => {
  if (!carriesFiles(e)) return;
  dragDepth += 1;
  el.conversation.classList.add("dropping");
});
el.conversation.addEventListener("dragleave", (e) => {
  if (!carriesFiles(e)) return;
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) el.conversation.classList.remove("dropping");
});
el.conversation.addEventListener("dragover", (e) => {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = "copy";
});
el.conversation.addEventListener("drop", (e) => {
  dragDepth = 0;
  el.conversation.classList.remove("dropping");
  if (!carriesFiles(e)) return;
  e.preventDefault();
  tray.add([...e.dataTransfer.files]);
  el.input.focus();
});
// A file dropped anywhere else is not opened in place of the page.
for (const type of ["dragover", "drop"]) {
  window.addEventListener(type, (e) => {
    if (carriesFiles(e)) e.preventDefault();
  });
}
el.lightbox.addEventListener("click", (e) => {
  if (e.target === el.lightbox) el.lightbox.close(); // a click on the backdrop
});
el.lightbox.addEventListener("close", () => el.lightboxImg.removeAttribute("src"));
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
    tray.clear(); // another resource's uploads
    newChat();
    loadThreads();
    loadUsage();
  });
}

let connectedBefore = false;
socket.addEventListener("state", ({ detail }) => {
  if (detail.state === "open") {
    if (connectedBefore) {
      loadUsage(); // turns may have ended meanwhile (read at load the first time)
      // The waiting messages' streams were the lost connection's: from now on
      // known as the server's queue lists them (and their turns followed).
      for (const entries of state.outbox.values()) {
        for (const entry of [...entries]) {
          if (!entry.queueId) dropWaiting(entry);
          else entry.turnId = null;
        }
      }
      if (state.threadId) loadQueue(state.threadId);
    }
    connectedBefore = true;
  }
  // Connected (first time or again): receive the open thread's running turn, if any.
  if (detail.state === "open" && state.threadId && !socket.isRunning(state.threadId)) {
    socket.follow(state.threadId, resourceId());
    const redraw = state.redrawOnReconnect;
    if (redraw && redraw.threadId === state.threadId) {
      Promise.all([loadThreads(), drawConversation(state.threadId, redraw)]);
    }
  }
});
socket.connect();
loadUsage();
await loadThreads();
await openThread(threadFromHash(), { focus: true });
