// The page's link to the server: REST calls (Api) and the chat websocket
// (ChatSocket). No DOM here; ui.js draws. Plain ES module, no build step.

/** An error answer of the API: {"error": {"code", "message"}} (+ Retry-After). */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/** REST: /api/sessions, /api/sessions/metadata, /api/sessions/messages. */
export class Api {
  /**
   * @param {object} opts
   * @param {string} opts.base       "/api"
   * @param {string} opts.csrfToken  sent as X-CSRFToken on unsafe methods (session-cookie callers)
   * @param {() => (string|null)} opts.resourceId  the resource to name, or null for the caller's own
   * @param {(error: ApiError) => void} opts.onUnauthenticated  called on a 401 (e.g. logged out elsewhere)
   */
  constructor({ base = "/api", csrfToken = "", resourceId = () => null, onUnauthenticated = null } = {}) {
    this.base = base;
    this.csrfToken = csrfToken;
    this.resourceId = resourceId;
    this.onUnauthenticated = onUnauthenticated;
  }

  withResource(fields = {}) {
    const resourceId = this.resourceId();
    return resourceId ? { ...fields, resourceId } : { ...fields };
  }

  async request(method, path, { query, body } = {}) {
    let url = this.base + path;
    if (query) url += "?" + new URLSearchParams(query).toString();
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (!["GET", "HEAD", "OPTIONS"].includes(method) && this.csrfToken) {
      headers["X-CSRFToken"] = this.csrfToken;
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (err) {
      throw new ApiError(0, "network_error", "the server cannot be reached");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      const retry = response.headers.get("Retry-After");
      const failure = new ApiError(response.status, error.code || `http_${response.status}`,
        error.message || response.statusText, retry ? Number(retry) : null);
      if (response.status === 401 && this.onUnauthenticated) this.onUnauthenticated(failure);
      throw failure;
    }
    return data;
  }

  /** {sessions: [Session], count, nextCursor}, newest first. */
  listSessions({ limit = 100, cursor = null } = {}) {
    const query = this.withResource({ limit: String(limit) });
    if (cursor) query.cursor = cursor;
    return this.request("GET", "/sessions", { query });
  }

  /** {session: Session} */
  metadata(threadId) {
    return this.request("POST", "/sessions/metadata", { body: this.withResource({ threadId }) });
  }

  /** {threadId, sessionId, messages: [{role, text, uuid}]} */
  messages(threadId) {
    return this.request("GET", "/sessions/messages", { query: this.withResource({ threadId }) });
  }

  /** {success, threadId, resourceId} */
  deleteSession(threadId) {
    return this.request("DELETE", "/sessions", { body: this.withResource({ threadId }) });
  }
}

/** A fresh thread id matching [A-Za-z0-9._:-]{1,128}. */
export function newThreadId(prefix = "thread") {
  const random = Math.random().toString(36).slice(2, 10);
  return `${prefix}-${Date.now().toString(36)}-${random}`;
}

/**
 * The chat websocket (ws/chat/): one connection for many turns, reconnecting
 * on its own with exponential back-off.
 *
 * Dispatches (an EventTarget):
 *   "state"      detail {state: "connecting"|"open"|"down", retryIn (ms, when down), attempt}
 *   "turn"       detail {threadId, event}: an event of a thread's turn (session, text,
 *                chunk, done, error); threadId may be null for an error the page
 *                cannot place (shown wherever the person is)
 *   "gone"       detail {threadId}: a turn the page was following is no longer
 *                running on the server (it ended while the socket was down)
 *
 * Turn events other than "session" name only the sessionId, and an error
 * event neither; the socket tracks which thread each belongs to. With "seq"
 * on events (the turn's 0-based position), a reconnect follows with
 * afterSeq; without it, the events already seen are skipped from the replay.
 */
export class ChatSocket extends EventTarget {
  constructor(url, { minDelay = 500, maxDelay = 5000 } = {}) {
    super();
    this.url = url;
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.ws = null;
    this.state = "connecting";
    this.attempt = 0;
    this.timer = null;
    this.closed = false;
    this.threads = new Map(); // threadId -> {sessionId, running, seen, lastSeq, skip, resourceId}
    this.bySession = new Map(); // sessionId -> threadId
    this.pending = []; // frames sent and not answered yet: {kind, threadId}
  }

  connect() {
    this.closed = false;
    clearTimeout(this.timer);
    this.setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.addEventListener("open", () => {
      if (this.ws !== ws) return;
      this.attempt = 0;
      this.setState("open");
      this.resumeFollowing();
    });
    ws.addEventListener("message", (msg) => {
      if (this.ws !== ws) return;
      let event;
      try {
        event = JSON.parse(msg.data);
      } catch (err) {
        return;
      }
      this.onEvent(event);
    });
    ws.addEventListener("close", () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.pending = [];
      if (!this.closed) this.scheduleReconnect();
    });
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close();
    this.ws = null;
  }

  setState(state, extra = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, attempt: this.attempt, ...extra } }));
  }

  scheduleReconnect() {
    const base = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt);
    const delay = Math.round(base / 2 + Math.random() * (base / 2));
    this.attempt += 1;
    this.setState("down", { retryIn: delay });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  thread(threadId) {
    let state = this.threads.get(threadId);
    if (!state) {
      state = { sessionId: null, running: false, seen: 0, lastSeq: null, skip: 0, resourceId: null };
      this.threads.set(threadId, state);
    }
    return state;
  }

  isRunning(threadId) {
    const state = this.threads.get(threadId);
    return Boolean(state && state.running);
  }

  /** Start a turn: frame is a "message" or "fork" frame (with its threadId). */
  startTurn(frame) {
    if (!this.send(frame)) return false;
    const state = this.thread(frame.threadId);
    Object.assign(state, { running: true, seen: 0, lastSeq: null, skip: 0,
      resourceId: frame.resourceId || null });
    this.pending.push({ kind: "start", threadId: frame.threadId });
    return true;
  }

  /** Receive a thread's running turn, if any (after a reload or a reconnect). */
  follow(threadId, resourceId = null) {
    if (this.pending.some((p) => p.kind === "follow" && p.threadId === threadId)) return true;
    const state = this.thread(threadId);
    const frame = { type: "follow", threadId };
    if (resourceId) frame.resourceId = resourceId;
    if (state.running && state.lastSeq !== null) {
      frame.afterSeq = state.lastSeq;
      state.skip = 0;
    } else {
      // A server without afterSeq replays the turn from its start: skip what we saw.
      state.skip = state.running ? state.seen : 0;
      if (!state.running) state.seen = 0;
    }
    state.resourceId = resourceId;
    if (!this.send(frame)) return false;
    this.pending.push({ kind: "follow", threadId });
    return true;
  }

  interrupt(threadId, resourceId = null) {
    const frame = { type: "interrupt", threadId };
    if (resourceId) frame.resourceId = resourceId;
    return this.send(frame);
  }

  resumeFollowing() {
    for (const [threadId, state] of this.threads) {
      if (state.running) this.follow(threadId, state.resourceId);
    }
  }

  /** Forget a thread (deleted) so its events are no longer placed. */
  forget(threadId) {
    const state = this.threads.get(threadId);
    if (state && state.sessionId) this.bySession.delete(state.sessionId);
    this.threads.delete(threadId);
  }

  dropPending(threadId) {
    const index = this.pending.findIndex((p) => p.threadId === threadId);
    if (index >= 0) this.pending.splice(index, 1);
  }

  placeError(event) {
    // Errors name no thread. A frame the server refused is answered at once,
    // in order: the oldest unanswered frame. Otherwise the one running turn.
    if (this.pending.length) {
      const follow = this.pending.findIndex((p) => p.kind === "follow");
      if (event.code === "not_found" && follow >= 0) return this.pending.splice(follow, 1)[0];
      const start = this.pending.findIndex((p) => p.kind === "start");
      if (start >= 0) return this.pending.splice(start, 1)[0];
    }
    const running = [...this.threads].filter(([, s]) => s.running && s.sessionId);
    if (running.length === 1) return { kind: "turn", threadId: running[0][0] };
    return { kind: "unknown", threadId: null };
  }

  onEvent(event) {
    let threadId = null;
    if (event.type === "session") {
      threadId = event.threadId;
      this.bySession.set(event.sessionId, threadId);
      const state = this.thread(threadId);
      state.sessionId = event.sessionId;
      state.running = true;
    } else if (event.type === "error") {
      const placed = this.placeError(event);
      threadId = placed.threadId;
      if (placed.kind === "follow") {
        // Nothing runs on that thread (any more).
        const state = this.threads.get(threadId);
        const wasRunning = Boolean(state && state.running);
        if (state) Object.assign(state, { running: false, skip: 0 });
        if (wasRunning) this.dispatchEvent(new CustomEvent("gone", { detail: { threadId } }));
        return;
      }
    } else if (event.sessionId) {
      threadId = this.bySession.get(event.sessionId) || null;
    }
    if (threadId === null) {
      if (event.type === "error") this.emitTurn(null, event);
      return; // a turn of a thread the page no longer shows
    }
    const state = this.thread(threadId);
    this.dropPending(threadId);
    if (state.skip > 0) { // replayed from the start after a reconnect
      state.skip -= 1;
      return;
    }
    if (typeof event.seq === "number") {
      if (state.lastSeq !== null && event.type !== "session" && event.seq <= state.lastSeq) return;
      state.lastSeq = event.seq;
    }
    state.seen += 1;
    if (event.type === "done" || event.type === "error") {
      Object.assign(state, { running: false, seen: 0, lastSeq: null });
    }
    this.emitTurn(threadId, event);
  }

  emitTurn(threadId, event) {
    this.dispatchEvent(new CustomEvent("turn", { detail: { threadId, event } }));
  }
}
