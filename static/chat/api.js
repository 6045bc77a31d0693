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

/** REST: /api/sessions, /api/sessions/metadata, /api/sessions/messages, /api/usage, /api/chat/approval, /api/chat/queue. */
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

  /** {threadId, sessionId, messages: [{role, text, uuid, toolCalls?}]} */
  messages(threadId) {
    return this.request("GET", "/sessions/messages", { query: this.withResource({ threadId }) });
  }

  /** {success, threadId, resourceId} */
  deleteSession(threadId) {
    return this.request("DELETE", "/sessions", { body: this.withResource({ threadId }) });
  }

  /**
   * What the resource's turns cost (GET /api/usage), by UTC day from `from`
   * to `to` (YYYY-MM-DD, inclusive; default the server's last 30 days):
   * {resourceId, from, to, total, days, budget: {dailyUsd (null: no cap), spentTodayUsd, resetsAt}}.
   */
  usage({ from = null, to = null } = {}) {
    const query = this.withResource({});
    if (from) query.from = from;
    if (to) query.to = to;
    return this.request("GET", "/usage", { query });
  }

  /**
   * Decide a tool call that waits for a person (POST /api/chat/approval):
   * decision "allow" or "deny", message (optional) told to the model.
   * {approvalId, decision}; ApiError 404 (unknown or expired), 409 (already_decided).
   */
  decide(threadId, approvalId, decision, message = null) {
    const body = this.withResource({ threadId, approvalId, decision });
    if (message) body.message = message;
    return this.request("POST", "/chat/approval", { body });
  }

  /** The thread's messages waiting for its running turn: {queued: [{queueId, message, position, createdAt}]}, in order. */
  queue(threadId) {
    return this.request("GET", "/chat/queue", { query: this.withResource({ threadId }) });
  }

  /** Take a waiting message back: {success, queueId}; ApiError 404 once its turn started (or unknown). */
  cancelQueued(threadId, queueId) {
    return this.request("DELETE", "/chat/queue", { body: this.withResource({ threadId, queueId }) });
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
 *   "turn"       detail {threadId, event, ref}: an event of a thread's turn (session, text,
 *                tool_use, approval_request, approval, tool_result, done, error;
 *                queued, for a message waiting for the thread's running turn;
 *                chunk too, unless the frame that started it said "chunks": false);
 *                threadId may be null for an error the page cannot place
 *                (shown wherever the person is); ref: the startTurn caller's
 *                ref when the event answers its frame (the queued event, the
 *                new turn's first event, an error), else null
 *   "gone"       detail {threadId}: a turn the page was following is no longer
 *                running on the server (it ended while the socket was down)
 *   "idle"       detail {threadId}: a follow found no turn running on the thread
 *                (after "gone" when the page was following one)
 *   "unauthenticated"  the server closed the socket with 4401 (logged out,
 *                token revoked, user deactivated): no reconnect
 *
 * Every event of a turn names its thread and turn ("threadId", "turnId") and
 * its position in the turn ("seq"); an error answering a frame (a turn that
 * could not start, a follow of a turn that is gone) names the frame's thread
 * and no turn. A reconnect follows each streaming turn with its turnId and
 * afterSeq: only what was missed, of that turn only.
 *
 * A thread runs one turn at a time; messages sent with "ifBusy": "enqueue"
 * (contract §12) wait as turns of their own, announced by a `queued` event.
 * Their events are passed on in turn order: should one come before the
 * running turn's last event, it is held until then. The turn of an
 * "interrupt" message is held the same way.
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
    // threadId -> {sessionId, running, turnId, lastSeq, resourceId, queued}, queued:
    // turnId -> {lastSeq, held: [events], request} of the turns waiting for the running one
    this.threads = new Map();
    // frames sent and not answered yet: {kind: "start"|"enqueue"|"interrupt"|"follow", threadId, ref}
    this.pending = [];
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
    ws.addEventListener("close", (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.pending = [];
      // the server streamed the waiting turns to that connection only
      for (const state of this.threads.values()) state.queued.clear();
      if (event.code === 4401) { // the server no longer accepts our credentials
        this.closed = true;
        this.setState("down");
        this.dispatchEvent(new CustomEvent("unauthenticated"));
        return;
      }
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
      state = { sessionId: null, running: false, turnId: null, lastSeq: null, resourceId: null, queued: new Map() };
      this.threads.set(threadId, state);
    }
    return state;
  }

  isRunning(threadId) {
    const state = this.threads.get(threadId);
    return Boolean(state && state.running);
  }

  /**
   * Start a turn: frame is a "message" or "fork" frame (with its threadId).
   * A client that reads no chunk events says "chunks": false in it (the page does).
   * With "ifBusy": "enqueue" or "interrupt" the thread's running turn (if
   * any) goes on being followed; the frame's answer carries `ref`.
   */
  startTurn(frame, ref = null) {
    if (!this.send(frame)) return false;
    const state = this.thread(frame.threadId);
    const kind = ["enqueue", "interrupt"].includes(frame.ifBusy) ? frame.ifBusy : "start";
    if (kind === "start") {
      Object.assign(state, { running: true, turnId: null, lastSeq: null });
    }
    if (kind === "start" || !state.running) state.resourceId = frame.resourceId || null;
    this.pending.push({ kind, threadId: frame.threadId, ref });
    return true;
  }

  /** Receive a thread's running turn, if any (after a reload or a reconnect). */
  follow(threadId, resourceId = null) {
    if (this.pending.some((p) => p.kind === "follow" && p.threadId === threadId)) return true;
    const state = this.thread(threadId);
    const frame = { type: "follow", threadId };
    if (resourceId) frame.resourceId = resourceId;
    if (state.running && state.turnId !== null) {
      // the turn we were reading, from where we were: its tail even if it
      // just ended, never the events of a turn that started since
      frame.turnId = state.turnId;
      if (state.lastSeq !== null) frame.afterSeq = state.lastSeq;
    } else {
      Object.assign(state, { turnId: null, lastSeq: null });
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
    this.threads.delete(threadId);
    this.pending = this.pending.filter((p) => p.threadId !== threadId);
  }

  /** Take the oldest pending frame of the thread of one of `kinds`. */
  dropPending(threadId, kinds) {
    const index = this.pending.findIndex((p) => p.threadId === threadId && kinds.includes(p.kind));
    if (index >= 0) return this.pending.splice(index, 1)[0];
    return null;
  }

  onEvent(event) {
    const threadId = typeof event.threadId === "string" ? event.threadId : null;
    if (threadId === null) { // an error the server could not place (a frame that was not JSON)
      if (event.type === "error") this.emitTurn(null, event);
      return;
    }
    if (!event.turnId) { // an error answering a frame of ours: no turn ran
      if (event.type !== "error") return;
      const follow = event.code === "not_found" && this.dropPending(threadId, ["follow"]);
      const state = this.threads.get(threadId);
      if (follow) {
        // Nothing runs on that thread (any more).
        const wasRunning = Boolean(state && state.running);
        if (state) Object.assign(state, { running: false, turnId: null, lastSeq: null });
        if (wasRunning) this.dispatchEvent(new CustomEvent("gone", { detail: { threadId } }));
        this.dispatchEvent(new CustomEvent("idle", { detail: { threadId } }));
        return;
      }
      // (a refused enqueue or interrupt leaves the running turn running)
      const request = this.dropPending(threadId, ["start", "enqueue", "interrupt"]);
      if (request && request.kind === "start" && state) {
        Object.assign(state, { running: false, turnId: null, lastSeq: null });
      }
      this.emitTurn(threadId, event, request);
      return;
    }
    const state = this.threads.get(threadId);
    if (!state) return; // a turn of a thread the page no longer shows
    if (event.type === "queued") { // a message of ours waits for the running turn
      if (state.queued.has(event.turnId) || state.turnId === event.turnId) return; // replayed
      const request = this.dropPending(threadId, ["enqueue"]);
      state.queued.set(event.turnId, { lastSeq: event.seq, held: [], request: null });
      this.emitTurn(threadId, event, request);
      return;
    }
    const waiting = state.queued.get(event.turnId);
    if (waiting) {
      if (waiting.lastSeq !== null && event.seq <= waiting.lastSeq) return;
      waiting.lastSeq = event.seq;
      waiting.held.push(event);
      if (event.type === "error" || !state.running || state.turnId === null) this.release(threadId, event.turnId);
      return;
    }
    let request = null;
    if (state.turnId !== event.turnId) { // a turn we had not seen yet
      if (state.running && state.turnId !== null
          && this.pending.some((p) => p.threadId === threadId && ["interrupt", "enqueue"].includes(p.kind))) {
        // the turn of an "interrupt" message (or of an "enqueue" one that did not
        // wait), to pass on once the running one ended
        const request = this.dropPending(threadId, ["interrupt", "enqueue"]);
        state.queued.set(event.turnId, { lastSeq: event.seq, held: [event], request });
        return;
      }
      request = this.dropPending(threadId, ["start", "interrupt", "follow"])
        || this.dropPending(threadId, ["enqueue"]); // (one that started at once)
      Object.assign(state, { turnId: event.turnId, lastSeq: null, running: true });
    } else {
      this.dropPending(threadId, ["start", "follow"]);
    }
    this.accept(threadId, state, event, request);
  }

  /** Pass on an event of the thread's current turn. */
  accept(threadId, state, event, request = null) {
    if (state.lastSeq !== null && event.seq <= state.lastSeq) return; // replayed twice
    state.lastSeq = event.seq;
    if (event.type === "session") state.sessionId = event.sessionId;
    if (event.type === "done" || event.type === "error") {
      Object.assign(state, { running: false, lastSeq: null });
    }
    this.emitTurn(threadId, event, request);
    if (!state.running) { // the next waiting turn whose events came already
      const next = [...state.queued].find(([, waiting]) => waiting.held.length);
      if (next) this.release(threadId, next[0]);
    }
  }

  /** A waiting turn's held events, passed on: it is the thread's turn now (unless it ended unstarted). */
  release(threadId, turnId) {
    const state = this.threads.get(threadId);
    const waiting = state.queued.get(turnId);
    state.queued.delete(turnId);
    let request = waiting.request;
    for (const event of waiting.held) {
      if (state.turnId !== turnId && (event.type === "error" || event.type === "done")) {
        // cancelled or refused before it started: the running turn (if any) goes on
        this.emitTurn(threadId, event, request);
      } else {
        if (state.turnId !== turnId) Object.assign(state, { turnId, lastSeq: null, running: true });
        this.accept(threadId, state, event, request);
      }
      request = null;
    }
  }

  emitTurn(threadId, event, request = null) {
    const ref = request ? request.ref : null;
    this.dispatchEvent(new CustomEvent("turn", { detail: { threadId, event, ref } }));
  }
}
