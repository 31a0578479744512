// ws_micro.js: a browser client for the ws_micro protocol. No dependencies, no build step.
//
//   import { Client } from "/static/ws_micro.js";
//   const client = new Client();                  // ws(s)://<this page's host>/ws/py_client
//   client.on("connect", () => client.join("lobby"));
//   client.on("chat", (frame) => console.log(frame.client_id, frame.data.data));
//   client.onState((state, detail) => console.log(state, detail)); // the states are below
//   client.connect();
//   client.send("chat", { text: "hi" }, { room: "lobby" });
//
// It reconnects by itself after any close it did not ask for (but a server's 1000, a kick),
// waiting a jittered, exponentially growing delay, and re-joins its rooms once the new
// connection's connect frame has arrived. The delay starts over only once a connection has
// stayed up `minUptime` ms, so a server that greets and drops at once is not hammered. A socket
// whose connect frame has not come `connectTimeout` ms after it was opened is dropped and
// retried. An app-level ping every `keepalive` ms notices a dead connection that the browser
// would not. A retry waiting for its delay goes at once when the browser comes back online.
//
// `token` (a string, or a function returning one or a Promise of one, called before every try)
// goes in the URL's query as `token=`: browsers cannot set headers on a WebSocket. A browser
// sees a refused handshake only as a close (1006) before open, so after a try closes before its
// connect frame the client asks the gateway why, once: a plain GET of the same URL answers the
// handshake's status. 401 or 403 stops the client (state "refused") until connect() or
// reconnect(); other answers (503: full, or the auth backend down) are kept in `refusal` and
// the client retries as usual.
//
// Recovery (a gateway with recovery_window): every connect frame brings a single-use resume token, kept
// in memory only, and the client counts the frames it receives after each connect frame (`offset`).
// Reconnecting by itself, it sends both (`resume_token=`, `resume_offset=`); the gateway then gives it
// back its id and rooms and replays the frames it missed, and `recovered` is true: it joins nothing
// again. `recovered` false is a new session (new id, rooms joined again): the app must resynchronise.
// A token in use by an open connection (409) is dropped, and the next try starts a new session. Once the
// client stops (close(), reconnect(), a kick, a refusal, giving up), it forgets the token.
//
// onState(fn) calls fn(state, detail) with:
//   connecting    {attempt: 0}     connect() or reconnect() opened a socket
//   open          {clientId, recovered}  its connect frame arrived; recovered: true, false, or null
//                                  (a gateway without recovery)
//   reconnecting  {attempt, delay, cause, code, reason}
//                 lost: try number `attempt` comes in `delay` ms. cause: "close" (code, reason:
//                 the close), "timeout" (no connect frame in time), "keepalive" (no pong in
//                 time), "error" (no WebSocket could be made), or "online" (delay 0)
//   reconnecting  {attempt}        try number `attempt` opened a socket
//   closed        {code, reason}   close(), or the server closed with 1000
//   closed        {gaveUp: true, attempt, cause, code, reason}  maxRetries tries failed in a row
//   refused       {status, code, message}  the gateway refused the handshake with 401 or 403: no retry
// A wait after a refused try (503, or 409: a resume token used already) also carries
// `refusal: {status, code, message}`.
//
// Requests: `await client.request("ping", { n: 1 })` sends the frame with an `id` and resolves with the
// gateway's answer, the frame that carries the id back (a pong, a handler's or the backend's reply); an
// `error` answer rejects it with a RequestError (its code and message), and so do a timeout ("timeout"),
// the connection closing first ("closed": a request does not outlive its connection), a client that is
// not open ("not_connected") and MAX_PENDING_REQUESTS waiting already ("too_many_requests"). An answer
// goes to its request only, not to the `on()` handlers.

export const DEFAULT_PATH = "/ws/py_client";

export const DEFAULTS = Object.freeze({
  initialDelay: 500, // ms: the first retry waits 250-500 ms (half of it fixed, half random)
  maxDelay: 10000, // ms: each further wait doubles, up to this
  minUptime: 5000, // ms a connection must last for the waits to start over from initialDelay
  connectTimeout: 10000, // ms from opening a socket to its connect frame, then drop and retry; 0: none
  maxRetries: Infinity, // failed tries in a row (see minUptime) before giving up: state "closed"
  keepalive: 25000, // ms between app-level pings, and how long a pong may take; 0: no pings
  token: null, // a string, or a function returning one (or a Promise of one), called before every try
});

// Events only the gateway sends, always with the recipient's own id and never with `to` or `room`.
// A gateway without the server-event check relays any name: such a frame is another client's forgery.
const SERVER_EVENTS = new Set(["error", "pong", "joined", "left", "presence"]);

// The statuses of a refused handshake that no retry will change: the token (or the origin) must.
const FINAL_REFUSALS = new Set([401, 403]);
// A refused resume token: it was used already (by an earlier try whose connect frame never came, or by
// someone else). The next try goes without it, and starts a new session.
const TOKEN_USED = 409;

// Requests: how long one waits for its answer unless it says (ms), and how many may wait at once: an app
// that sends faster than the gateway answers gets rejections, not a growing table.
export const REQUEST_TIMEOUT = 10000;
export const MAX_PENDING_REQUESTS = 1000;

/** Why a request got no answer but an error: `code` is the gateway's error code, or one of the client's own
 * ("timeout", "closed", "not_connected", "too_many_requests"); `answer` is the gateway's error frame, if any. */
export class RequestError extends Error {
  constructor(code, message, answer = null) {
    super(`${code}: ${message}`);
    this.name = "RequestError";
    this.code = code;
    this.answer = answer;
  }
}

export function defaultUrl(location = globalThis.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${DEFAULT_PATH}`;
}

export class Client {
  // The session's resume token: a secret, in no field that JSON, a log of the client or storage could see.
  #resumeToken = null;

  /**
   * @param {string} [url] the gateway's WebSocket URL; defaults to this page's host
   * @param {object} [options] any of DEFAULTS' names (a missing or undefined one takes its default)
   */
  constructor(url = defaultUrl(), options = {}) {
    this.url = url;
    this.clientId = null;
    this.state = "closed";
    this.user = null; // who the gateway says this connection is (its connect frame's user), or null
    this.rooms = new Set(); // the rooms this client is in: those it joined and those the gateway put it in
    this.lastClose = null; // {code, reason} of the last close
    // {status, code, message}: why the gateway refused the last try, as its probe found out; null when
    // that probe found no refusal (the server was down, or would have accepted), and once open.
    this.refusal = null;
    // Connection recovery: whether the last connect frame resumed the session (true), began a new one
    // (false), or came from a gateway without recovery (null; also before any); and the frames received
    // in this session after its connect frames, which a resumed connection's replay goes on from.
    this.recovered = null;
    this.missed = 0; // with recovered true: how many frames the gateway replays after the connect frame
    this.offset = 0;
    this._options = {};
    for (const [name, value] of Object.entries(DEFAULTS)) this._options[name] = options[name] ?? value;
    for (const name of Object.keys(options)) {
      if (!(name in DEFAULTS)) console.warn(`ws_micro: unknown option ${name}; known: ${Object.keys(DEFAULTS)}`);
    }
    this._handlers = new Map(); // event name (or "*") -> Set of functions
    this._stateHandlers = new Set();
    this._joined = new Set(); // the rooms join() asked for: joined again after a reconnect
    this._granted = new Set(); // the rooms the gateway joined this connection to itself, at connect
    this._left = new Set(); // rooms left while not connected: a resumed session is still in them
    this._try = null; // the current try; a token or a probe that comes back for an older one is dropped
    this._socket = null; // the one socket it listens to; any other was let go of with _drop
    this._greeted = false; // the current connection's first frame (its connect) has arrived
    this._attempt = 0; // tries since the last connection that lasted minUptime
    this._stopped = true;
    this._timers = { reconnect: 0, connect: 0, uptime: 0, ping: 0, pong: 0 };
    this._online = () => this._retryNow();
    this._requests = new Map(); // request id -> {resolve, reject, timer}: those waiting for their answer
    this._lastRequestId = 0;
  }

  /** Call `fn(frame)` for every frame named `event` ("*": every frame). Returns an unsubscribe. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this._handlers.get(event).delete(fn);
  }

  /** Call `fn(state, detail)` on every change of connection state. Returns an unsubscribe. */
  onState(fn) {
    this._stateHandlers.add(fn);
    return () => this._stateHandlers.delete(fn);
  }

  /** Connect; while connecting, open or waiting to reconnect, do nothing (one socket at a time). */
  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._attempt = 0;
    globalThis.addEventListener?.("online", this._online);
    this._open();
    return this;
  }

  /** Drop the connection, if any, and connect at once with the waits started over (also when closed). */
  reconnect() {
    this._stop(1000, "reconnect");
    return this.connect();
  }

  /** Close for good: no reconnect. */
  close(code = 1000, reason = "") {
    this._stop(code, reason);
    this.lastClose = { code, reason };
    this._setState("closed", this.lastClose);
  }

  /** Send an event; false (and nothing sent) while not connected. */
  send(event, data = {}, { to, room } = {}) {
    if (this.state !== "open") return false;
    const frame = { event, client_id: this.clientId, data: { data } };
    if (to) frame.to = to;
    if (room) frame.room = room;
    this._socket.send(JSON.stringify(frame));
    return true;
  }

  /**
   * Send an event with an `id`, and resolve with the gateway's answer (the frame carrying the id back), or
   * reject with a RequestError: an `error` answer, no answer in `timeout` ms, the connection closing first.
   */
  request(event, data = {}, { timeout = REQUEST_TIMEOUT } = {}) {
    if (this.state !== "open") {
      return Promise.reject(new RequestError("not_connected", `not connected (state ${this.state})`));
    }
    if (this._requests.size >= MAX_PENDING_REQUESTS) {
      return Promise.reject(new RequestError("too_many_requests",
        `${MAX_PENDING_REQUESTS} requests are waiting for their answers already`));
    }
    const id = ++this._lastRequestId;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._requests.delete(id);
        reject(new RequestError("timeout", `no answer to ${event} (id ${id}) within ${timeout} ms`));
      }, timeout);
      this._requests.set(id, { resolve, reject, timer });
      this._socket.send(JSON.stringify({ event, client_id: this.clientId, data: { data }, id }));
    });
  }

  /** Join a room now (if connected) and after every reconnect. */
  join(room) {
    this._left.delete(room);
    this._joined.add(room);
    this.rooms.add(room);
    return this.send("join", { room });
  }

  /** Leave a room, and stop re-joining it (a room the gateway joins at connect, it joins again). */
  leave(room) {
    this._joined.delete(room);
    this._granted.delete(room);
    this.rooms.delete(room);
    const sent = this.send("leave", { room });
    if (!sent) this._left.add(room);
    return sent;
  }

  // Internals

  _open() {
    const current = (this._try = {});
    this._setState(this._attempt ? "reconnecting" : "connecting", { attempt: this._attempt });
    const { connectTimeout, token } = this._options;
    if (connectTimeout) {
      // It covers the token, the handshake and the connect frame: a server may accept and never greet.
      this._timers.connect = setTimeout(() => this._abandon("connect timeout", "timeout"), connectTimeout);
    }
    if (typeof token !== "function") {
      this._openSocket(current, token);
      return;
    }
    // A fresh token for every try: a short-lived one fetched now has not expired by the handshake.
    new Promise((resolve) => resolve(token())).then(
      (value) => this._openSocket(current, value),
      (error) => this._failed(current, `no token: ${error?.message ?? error}`, "token"),
    );
  }

  _openSocket(current, token) {
    if (this._try !== current) return; // given up on (timeout, close(), reconnect()) while the token came
    let url, socket;
    current.resuming = this.#resumeToken !== null;
    try {
      const resume = current.resuming ? { resume_token: this.#resumeToken, resume_offset: this.offset } : {};
      url = withParams(this.url, { token, ...resume });
      socket = new WebSocket(url);
    } catch (error) {
      // The error names the URL, and with it the tokens: say which URL without them.
      this._failed(current, `cannot open a WebSocket to ${this.url}: ${error?.name ?? "error"}`, "error");
      return;
    }
    this._socket = socket;
    this._greeted = false;
    socket.onmessage = (message) => this._receive(message.data);
    socket.onclose = (event) => this._closed(event, current, url);
  }

  // A try that made no socket: say so in the frame log, and retry.
  _failed(current, message, cause) {
    if (this._try !== current) return;
    clearTimeout(this._timers.connect);
    this._emit("*", { event: "client_error", data: { data: { message } } });
    this.lastClose = { code: null, reason: message };
    this._retry(cause);
  }

  _receive(text) {
    if (typeof text !== "string") return; // the gateway sends text frames only, and counts only those
    // As the gateway counts: every frame after the connect frame, those ignored below too.
    if (this._greeted) this.offset += 1;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // the gateway sends JSON only
    }
    const first = !this._greeted;
    this._greeted = true;
    if (frame.event === "connect" && !first) {
      // Only a connection's first frame is the server's connect. A later one was relayed from
      // another client (a gateway without the server-event check relays any name): taken as
      // ours, its id would replace ours and the server would refuse everything we send.
      console.warn("ws_micro: ignored a connect frame that was not the first, from", frame.client_id);
      return;
    }
    if (SERVER_EVENTS.has(frame.event) && !this._fromServer(frame)) {
      console.warn(`ws_micro: ignored a ${frame.event} frame that the server did not send, from`, frame.client_id);
      return;
    }
    // An answer to a request: its id, on a frame the gateway sent us (a relayed frame has its sender's id).
    const request = frame.id != null && this._fromServer(frame) ? this._requests.get(frame.id) : undefined;
    if (request) {
      this._requests.delete(frame.id);
      clearTimeout(request.timer);
      if (frame.event === "error") {
        const { code, message } = frame.data?.data ?? {};
        request.reject(new RequestError(String(code), String(message), frame));
      } else {
        request.resolve(frame);
      }
      return;
    }
    if (frame.event === "connect") {
      clearTimeout(this._timers.connect);
      this.clientId = frame.client_id;
      this.refusal = null;
      const info = frame.data?.data ?? {};
      this.user = typeof info.user === "string" ? info.user : null;
      const rooms = Array.isArray(info.rooms) ? info.rooms.filter((room) => typeof room === "string") : [];
      this.recovered = typeof info.recovered === "boolean" ? info.recovered : null;
      this.missed = this.recovered && Number.isSafeInteger(info.missed) ? info.missed : 0;
      this.#resumeToken = typeof info.resume_token === "string" ? info.resume_token : null;
      delete info.resume_token; // the app's handlers (and whatever they log) never see it
      if (this.recovered) {
        // The same session, still in its rooms (those it joined and those it was granted); the replay of
        // what this client missed goes on from the gateway's offset, the one this client sent.
        if (Number.isSafeInteger(info.offset) && info.offset >= 0) this.offset = info.offset;
      } else {
        this.offset = 0;
        // The gateway joined these itself (the token's rooms), and joins them again on every connection.
        this._granted = new Set(rooms);
      }
      const left = this.recovered ? rooms.filter((room) => this._left.has(room)) : [];
      const inRooms = new Set(this.recovered ? rooms.filter((room) => !this._left.has(room)) : this._granted);
      this._left.clear();
      this.rooms.clear();
      for (const room of [...inRooms, ...this._joined]) this.rooms.add(room);
      // Only a connection that lasts starts the waits over: one that the server drops at once
      // (it greets, then fails) counts as a failed try.
      this._timers.uptime = setTimeout(() => { this._attempt = 0; }, this._options.minUptime);
      this._setState("open", { clientId: this.clientId, recovered: this.recovered });
      // A resumed session is in its rooms already: only what changed while away is sent.
      for (const room of left) this.send("leave", { room });
      for (const room of this._joined) if (!inRooms.has(room)) this.send("join", { room });
      this._schedulePing();
    } else if (frame.event === "pong") {
      clearTimeout(this._timers.pong);
    } else if ((frame.event === "joined" || frame.event === "left") && this._fromServer(frame)) {
      // Its own join() or leave(), or the server's (Registry.join/leave, on_connect): rooms says where it is.
      // A room the server put it in is not joined again after a reconnect: the server decides that again.
      const room = frame.data?.data?.room;
      if (typeof room === "string") {
        if (frame.event === "joined") this.rooms.add(room);
        else this.rooms.delete(room);
      }
    } else if (frame.event === "error") {
      const { code, event, room } = frame.data?.data ?? {};
      // A room this connection may not join is not joined again on every reconnect (the gateway names
      // the room in the error when it can; otherwise it stays and is refused again).
      if (code === "forbidden" && event === "join" && typeof room === "string" && !this._granted.has(room)) {
        this._joined.delete(room);
        this.rooms.delete(room);
      }
    }
    this._emit(frame.event, frame);
    this._emit("*", frame);
  }

  _closed(event, current, url) {
    this._clearTimers();
    this._socket = null;
    this._rejectRequests(`the connection closed (${event.code}) before the answer came`);
    this.lastClose = { code: event.code, reason: event.reason };
    if (event.code === 1000) {
      // The server closed us on purpose (e.g. DELETE /api/clients/{id}): stay closed.
      this._stop();
      this._setState("closed", this.lastClose);
      return;
    }
    if (this._greeted || !globalThis.fetch) {
      this._retry("close");
      return;
    }
    // Closed before its connect frame: maybe refused, and the browser does not say with what status.
    // The gateway answers a plain GET of the same URL with it. One such probe per failed try.
    const timeout = this._options.connectTimeout || DEFAULTS.connectTimeout;
    probe(url, timeout).then((refusal) => {
      if (this._try !== current) return; // close(), connect() or reconnect() came first
      this.refusal = refusal;
      if (refusal && FINAL_REFUSALS.has(refusal.status)) {
        this._stop();
        this._setState("refused", { ...refusal });
        return;
      }
      // Its resume token was used already: never again, or every try would be refused the same way. A
      // try that failed for any other reason (the network, a server restarting) keeps it.
      if (refusal?.status === TOKEN_USED && current.resuming) this.#resumeToken = null;
      this._retry("close", refusal);
    });
  }

  // Give up on the socket without waiting for its close event, which on a dead network comes
  // only when the browser gives up on the closing handshake (a minute in Chromium).
  _abandon(reason, cause) {
    this._clearTimers();
    this._drop(4000, reason);
    this.lastClose = { code: 4000, reason };
    this._retry(cause);
  }

  _retry(cause, refusal = null) {
    const { initialDelay, maxDelay, maxRetries } = this._options;
    const why = refusal ? { refusal: { ...refusal } } : {};
    if (this._attempt >= maxRetries) {
      this._stop();
      this._setState("closed", { ...this.lastClose, cause, ...why, gaveUp: true, attempt: this._attempt });
      return;
    }
    const ceiling = Math.min(maxDelay, initialDelay * 2 ** this._attempt);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2); // "equal jitter"
    this._attempt += 1;
    this._setState("reconnecting", {
      ...this.lastClose, delay: Math.round(delay), attempt: this._attempt, cause, ...why,
    });
    this._timers.reconnect = setTimeout(() => {
      this._timers.reconnect = 0;
      this._open();
    }, delay);
  }

  // The browser is back online: a retry waiting for its delay goes now. The waits are not started
  // over: the network is back, the server may not be.
  _retryNow() {
    if (!this._timers.reconnect) return;
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = 0;
    this._setState("reconnecting", { ...this.lastClose, delay: 0, attempt: this._attempt, cause: "online" });
    this._open();
  }

  _schedulePing() {
    const { keepalive } = this._options;
    if (!keepalive) return;
    this._timers.ping = setTimeout(() => {
      if (!this.send("ping", { keepalive: Date.now() })) return;
      // No pong in time: the connection is dead even if the browser has not noticed.
      this._timers.pong = setTimeout(() => this._abandon("keepalive timeout", "keepalive"), keepalive);
      this._schedulePing();
    }, keepalive);
  }

  // Stop for good: no timers, no socket, no listening for the browser coming online, no session to resume.
  _stop(code, reason) {
    this._stopped = true;
    this.#resumeToken = null;
    this._clearTimers();
    globalThis.removeEventListener?.("online", this._online);
    this._drop(code, reason);
  }

  // Let go of the socket: close it, and take no more events from it, nor a token or probe for it.
  _drop(code, reason) {
    this._try = null;
    const socket = this._socket;
    if (!socket) return;
    this._socket = null;
    socket.onmessage = socket.onclose = null;
    socket.close(code, reason);
    this._rejectRequests(`the connection closed (${reason || code || "dropped"}) before the answer came`);
  }

  // The requests waiting go with their connection: an answer would come on it or not at all (with recovery,
  // a replayed one reaches the on() handlers).
  _rejectRequests(message) {
    const waiting = [...this._requests.values()];
    this._requests.clear();
    for (const { reject, timer } of waiting) {
      clearTimeout(timer);
      reject(new RequestError("closed", message));
    }
  }

  _clearTimers() {
    for (const name of Object.keys(this._timers)) {
      clearTimeout(this._timers[name]);
      this._timers[name] = 0;
    }
  }

  // A frame the gateway itself sent: it carries our own id, and no `to` or `room` (a relayed one has
  // its sender's id, which the gateway checks, so no client can send a frame with ours).
  _fromServer(frame) {
    return frame.client_id === this.clientId && frame.to == null && frame.room == null;
  }

  _setState(state, detail = {}) {
    if (state === "open" || state !== this.state || state === "reconnecting") {
      this.state = state;
      for (const fn of this._stateHandlers) fn(state, detail);
    }
  }

  _emit(event, frame) {
    for (const fn of this._handlers.get(event) || []) {
      try {
        fn(frame);
      } catch (error) {
        console.error(`ws_micro: a handler for ${event} failed`, error);
      }
    }
  }
}

// The URL of one try: `url` with `params` that have a value (token, resume_token, resume_offset) in its
// query; an existing query is kept.
function withParams(url, params) {
  const given = Object.entries(params).filter(([, value]) => value !== null && value !== undefined && value !== "");
  if (!given.length) return url;
  const parsed = new URL(url, globalThis.location?.href);
  for (const [name, value] of given) parsed.searchParams.set(name, String(value));
  return parsed.href;
}

// Why the gateway refuses a handshake: a plain GET of the WebSocket's URL (the same query, so the same
// token; cookies go along as they do with the WebSocket) answers the handshake's status with
// {"error": {"code", "message"}}: 401 or 403 (refused), 409 (its resume token was used already), 503
// (full, or its auth backend is down), or 426 (it would be accepted now). {status, code, message} for a refusal; null for anything else,
// including no answer in time and an answer this page may not read (another origin, not allowed).
async function probe(url, timeout) {
  const target = new URL(url, globalThis.location?.href);
  target.protocol = target.protocol === "wss:" ? "https:" : target.protocol === "ws:" ? "http:" : target.protocol;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeout);
  try {
    const response = await fetch(target, { credentials: "include", cache: "no-store", signal: abort.signal });
    if (![401, 403, 409, 503].includes(response.status)) return null;
    let error = {};
    try {
      error = (await response.json())?.error ?? {};
    } catch {
      // not the gateway's JSON (a proxy's page): the status alone
    }
    return {
      status: response.status,
      code: typeof error.code === "string" ? error.code : null,
      message: typeof error.message === "string" ? error.message : response.statusText,
    };
  } catch {
    return null; // no answer: the server is down or unreachable, and the usual retries apply
  } finally {
    clearTimeout(timer);
  }
}
