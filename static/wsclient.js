// wsclient.js: a reconnecting browser client for wsserver.
//
// One ES module with no dependencies: copy it into your app.
// The token travels in the subprotocol list ["bearer", token], never in the URL
// (URLs end up in logs and browser history).
//
// Where a WebSocket cannot be opened (a proxy that strips the upgrade, a
// browser without WebSocket), the client falls back to HTTP streaming:
// Server-Sent Events from GET /sse, messages by POST /sse/send. Over either
// transport it behaves the same: same close codes, same reconnects, same
// recovery of rooms with history. The option `transport` forces one.
//
// The pure decisions (backoff delay, what a close code means, the queue
// bound, which room messages to deliver after a reconnect) are exported
// functions so they can be tested without a browser.

/** First reconnect waits up to this long (ms); the window doubles each attempt. */
export const BACKOFF_BASE_MS = 500;
/** The backoff window never grows past this (ms). */
export const BACKOFF_CAP_MS = 20000;
/** After 1001 (server shutting down) reconnect within this window (ms). */
export const SOON_MS = 1000;
/** A connection open at least this long (ms) resets the backoff. */
export const STABLE_MS = 10000;
/** A token expiring within this margin (ms) is not used for a new connection. */
export const TOKEN_MARGIN_MS = 5000;
/** Default bound on messages queued while disconnected; matches the server's default burst. */
export const DEFAULT_MAX_QUEUE = 20;
/** Default time (ms) a request waits for its reply. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 60000;

/**
 * How long (ms) after its first send a publish left unconfirmed by a dropped
 * connection is sent again with its idempotency key: well inside the 5 minutes
 * the server remembers a key, so a repeat is never published twice.
 */
export const RESEND_PUBLISH_MS = 120_000;

/** Wait (ms) before sending again a message the server could not take yet (503). */
export const SEND_RETRY_MS = 1000;

// WebSocket.CONNECTING, .OPEN and .CLOSED, spelled out so the module loads where
// WebSocket is undefined.
const CONNECTING_STATE = 0;
const OPEN_STATE = 1;
const CLOSED_STATE = 3;

/**
 * Delay before reconnect attempt number `attempt` (0 for the first):
 * exponential backoff with full jitter, uniform in [0, min(cap, base * 2^attempt)).
 * Full jitter spreads a crowd of clients that lost the same server.
 */
export function backoffDelay(attempt, random = Math.random, base = BACKOFF_BASE_MS,
                             cap = BACKOFF_CAP_MS) {
  const exponent = Math.min(Math.max(0, attempt), 30); // 2^30 already exceeds any cap
  return random() * Math.min(cap, base * 2 ** exponent);
}

/**
 * Every close code the server sends, what it means and what the client does:
 * "never" and "fix_client" stop (retrying would repeat it), "soon" reconnects
 * within a second, "backoff" with exponential backoff, "new_token" gets a new
 * token first. The same table as wsserver/closecodes.py (a test compares them).
 */
export const CLOSE_CODES = Object.freeze({
  1000: { reconnect: 'never', text: 'closed normally' },
  1001: { reconnect: 'soon', text: 'server shutting down' },
  1002: { reconnect: 'fix_client', text: 'protocol error' },
  1007: { reconnect: 'fix_client', text: 'invalid UTF-8 in a text message' },
  1008: { reconnect: 'fix_client', text: 'policy violation' },
  1009: { reconnect: 'fix_client', text: 'message too big' },
  1011: { reconnect: 'backoff', text: 'server error' },
  1012: { reconnect: 'backoff', text: 'server restarting' },
  4001: { reconnect: 'new_token', text: 'token invalid or expired' },
  4003: { reconnect: 'never', text: 'not permitted' },
  4008: { reconnect: 'backoff', text: 'too many connections for this user' },
  4009: { reconnect: 'backoff', text: 'too slow reading messages' },
  4029: { reconnect: 'backoff', text: 'kept sending while rate limited' },
});

/**
 * What to do when the socket closes with `code`, per CLOSE_CODES; 1006 (no
 * close frame: the network or the server went away) and unknown codes back off.
 * `previousCode` is the code of the close before, if the connection in between
 * never got its welcome.
 *
 * Returns {action: "stop"} or {action: "reconnect", delay: "soon" | "backoff",
 * newToken: boolean}.
 */
export function closeDecision(code, { userClosed = false, previousCode = null } = {}) {
  if (userClosed) return { action: 'stop' };
  const entry = CLOSE_CODES[code];
  switch (entry ? entry.reconnect : 'backoff') {
    case 'never':
    case 'fix_client':
      return { action: 'stop' };
    case 'new_token':
      // A fresh token fixes it: try at once; if that one fails too, back off.
      return { action: 'reconnect', delay: previousCode === code ? 'backoff' : 'soon',
               newToken: true };
    case 'soon': // server going away: a replacement is usually up soon
      return { action: 'reconnect', delay: 'soon', newToken: false };
    default:
      return { action: 'reconnect', delay: 'backoff', newToken: false };
  }
}

// --- resuming rooms with history -------------------------------------------
//
// In a room with history every message carries (epoch, offset). The client
// remembers the last position it delivered per room, re-joins with
// "since" after a reconnect, and never delivers a message twice.

/** The `join` message for `room`, asking for what was missed when `position` is known. */
export function joinMessage(room, position) {
  if (!position || typeof position.epoch !== 'string' || !Number.isInteger(position.offset)) {
    return { type: 'join', room };
  }
  return { type: 'join', room, since: { offset: position.offset, epoch: position.epoch } };
}

/**
 * Whether a `message` is new given the room's last `position` ({epoch, offset}
 * or null), and the position after it. A message without an offset (room
 * without history) is always delivered; one at or below the last offset of
 * the same epoch is a repeat and dropped; a new epoch starts over.
 * Returns {deliver: boolean, position}.
 */
export function acceptMessage(position, msg) {
  if (!Number.isInteger(msg.offset) || typeof msg.epoch !== 'string') {
    return { deliver: true, position };
  }
  if (position && position.epoch === msg.epoch && msg.offset <= position.offset) {
    return { deliver: false, position };
  }
  return { deliver: true, position: { epoch: msg.epoch, offset: msg.offset } };
}

/**
 * What a `joined` reply means, given the `position` held before the join and
 * whether the join asked to recover (`asked`). Returns
 * {position, messages, recovered}: `messages` are the recovered ones still to
 * deliver, in order and without repeats; `recovered` is true or false when the
 * join asked, null otherwise (also for rooms without history).
 */
export function joinedOutcome(position, reply, asked) {
  if (typeof reply.epoch !== 'string' || !Number.isInteger(reply.offset)) {
    return { position: null, messages: [], recovered: null }; // no history in this room
  }
  const top = { epoch: reply.epoch, offset: reply.offset };
  if (!asked) return { position: top, messages: [], recovered: null };
  if (reply.recovered !== true) return { position: top, messages: [], recovered: false };
  let current = position;
  const messages = [];
  const sorted = [...(reply.messages || [])].sort((a, b) => a.offset - b.offset);
  for (const msg of sorted) {
    const verdict = acceptMessage(current, msg);
    current = verdict.position;
    if (verdict.deliver) messages.push(msg);
  }
  // "pending": N more recovered messages follow the reply as ordinary messages
  // (they did not fit in it), so the position stays at the last one given here.
  const pending = Number.isInteger(reply.pending) && reply.pending > 0;
  if (pending && !current) current = position;
  // Never move back: a live message may already be past the reply's top.
  if (!pending && (!current || current.epoch !== top.epoch || current.offset < top.offset)) {
    current = top;
  }
  return { position: current, messages, recovered: true };
}

/**
 * What a `gap` message means given the room's last `position`: the server
 * lost messages up to the gap's offset ("reload; what follows is above it").
 * Returns {position, lost}: lost is false (and nothing moves) when the client
 * already has everything up to there (same epoch, offset at or below its own);
 * otherwise the position jumps to the gap's, so what follows is delivered.
 * A gap with `dropped` (messages without offsets were skipped while the client
 * read too slowly) is a loss that moves nothing.
 */
export function gapOutcome(position, gap) {
  if (Number.isInteger(gap.dropped) && gap.dropped > 0) return { position, lost: true };
  if (typeof gap.epoch !== 'string' || !Number.isInteger(gap.offset)) {
    return { position, lost: false };
  }
  if (position && position.epoch === gap.epoch && gap.offset <= position.offset) {
    return { position, lost: false };
  }
  return { position: { epoch: gap.epoch, offset: gap.offset }, lost: true };
}

/** Delay (ms) for a reconnect of `kind` ("soon" or "backoff") at backoff `attempt`. */
export function reconnectDelay(kind, attempt, random = Math.random) {
  return kind === 'soon' ? random() * SOON_MS : backoffDelay(attempt, random);
}

/**
 * Whether a message may join a queue of `length` messages bounded by `max`.
 * When full the new message is refused (not an old one dropped), so the
 * caller learns at once that it was not sent.
 */
export function queueAccepts(length, max) {
  return length < max;
}

/**
 * The backoff attempt number to use after a close: back to 0 when the connection
 * had been up for a while, so a long-lived client that loses its server retries
 * fast, while a server that accepts then drops at once (4029, 4009...) still
 * sees the client back off further each time.
 */
export function attemptAfterClose(attempt, openForMs, stableMs = STABLE_MS) {
  return openForMs !== null && openForMs >= stableMs ? 0 : attempt;
}

/**
 * Whether a token expiring at `expiresAt` (unix seconds, null when unknown) is
 * worth a handshake at `nowMs`: not when it expires within `marginMs`, as the
 * server would close with 4001 at once.
 */
export function tokenUsable(expiresAt, nowMs, marginMs = TOKEN_MARGIN_MS) {
  return expiresAt === null || expiresAt * 1000 - nowMs > marginMs;
}

/**
 * Handshakes in a row that fail before the socket opens while the server's
 * health check answers 200, after which the client stops: the server is up
 * and refusing this client (its origin, most often), so retrying cannot help.
 */
export const MAX_REFUSALS = 5;

/**
 * The count of refused handshakes after one more failed before opening.
 * `serverAnswers` is the health probe's verdict: true (up: the handshake was
 * refused), false or null (down, or cannot be told: an outage, not a refusal).
 */
export function refusalsAfter(refusals, serverAnswers) {
  return serverAnswers === true ? refusals + 1 : 0;
}

/**
 * Whether the server behind `socketUrl` answers `GET /healthz` with 200 (true),
 * with something else (false), or cannot be asked (null: unreachable, or another
 * origin, whose answer the browser hides).
 */
export async function healthProbe(socketUrl, fetchImpl = globalThis.fetch) {
  if (typeof fetchImpl !== 'function') return null;
  try {
    const url = new URL('/healthz', socketUrl.replace(/^ws/, 'http'));
    const response = await fetchImpl(url, { cache: 'no-store', signal: AbortSignal.timeout(5000) });
    return response.ok;
  } catch {
    return null;
  }
}

/** The WebSocket URL of `path` on the page's own host: ws: for http:, wss: for https:. */
export function socketUrl(location, path = '/ws') {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}${path}`;
}

/**
 * The HTTP-streaming endpoints next to the WebSocket endpoint `url`:
 * ws://host/ws gives http://host/auth/ticket, http://host/sse and http://host/sse/send
 * (wss: gives https:; a path prefix before /ws is kept).
 */
export function streamUrls(url) {
  const parsed = new URL(url);
  const scheme = parsed.protocol === 'wss:' || parsed.protocol === 'https:' ? 'https:' : 'http:';
  const prefix = parsed.pathname.replace(/\/ws\/?$/, '').replace(/\/$/, '');
  const base = `${scheme}//${parsed.host}${prefix}`;
  return { ticket: `${base}/auth/ticket`, stream: `${base}/sse`, send: `${base}/sse/send` };
}

/**
 * The transport of the next connection: "websocket" or "sse".
 *
 * `preference` "websocket" or "sse" is obeyed (when the browser has it); with
 * "auto" a WebSocket is used until it is known not to get through
 * (`wsBlocked`, see websocketMisses), then HTTP streaming.
 */
export function chooseTransport({ preference = 'auto', wsBlocked = false, hasWebSocket = true,
                                  hasEventSource = true } = {}) {
  if (preference === 'websocket' || !hasEventSource) return 'websocket';
  if (preference === 'sse' || !hasWebSocket) return 'sse';
  return wsBlocked ? 'sse' : 'websocket';
}

/** WebSocket attempts that must miss in a row, the server answering HTTP, before streaming. */
export const WS_MISSES_BEFORE_STREAMING = 2;

/**
 * How many WebSocket attempts in a row missed a server that was up, after one
 * more attempt: `reached` (it opened), and whether the server's health check
 * answered 200 right after (`serverAnswered`, see healthProbe). A socket that
 * opened resets the count, and so does a server that did not answer (it is
 * down: not the socket's fault, and streaming would not help). At
 * WS_MISSES_BEFORE_STREAMING the WebSocket is taken for blocked on the way (a
 * proxy that strips the upgrade): two, so that a server coming back between a
 * failed socket and the check is not taken for it.
 */
export function websocketMisses(misses, { reached, serverAnswered }) {
  if (reached || !serverAnswered) return 0;
  return misses + 1;
}

/**
 * What the answer to a POST /sse/send means for the stream: "sent", "retry"
 * (503: the server could not take it yet; send it again after `delay` ms), or
 * "close" with the close code the same failure has over a WebSocket: 413 is
 * 1009 (message too big), 404 is a stream that is gone (1006), any other
 * refusal is the client's fault (1008).
 */
export function sendOutcome(status, retryAfter = null) {
  if (status >= 200 && status < 300) return { action: 'sent' };
  if (status === 503 || status === 429) {
    const seconds = Number(retryAfter);
    return { action: 'retry', delay: seconds > 0 ? seconds * 1000 : SEND_RETRY_MS };
  }
  if (status === 413) return { action: 'close', code: 1009, reason: 'message too big' };
  if (status === 404) return { action: 'close', code: 1006, reason: 'stream closed' };
  return { action: 'close', code: 1008, reason: `message refused (HTTP ${status})` };
}

/**
 * A connection over HTTP streaming with the WebSocket interface WsClient uses
 * (`send`, `close`, `readyState`, `onopen`, `onmessage`, `onclose`).
 *
 * It trades the token for a single-use ticket (POST /auth/ticket: the token
 * never goes in a URL), reads GET /sse?ticket= with an EventSource, and sends
 * each message with POST /sse/send, one at a time and in order, naming the
 * stream by the `session` of its welcome. The server's `close` event becomes
 * `onclose` with its code; a stream that ends or fails otherwise is 1006.
 */
export class StreamSocket {
  constructor(urls, token, { EventSource, fetch }) {
    this.urls = urls;
    this.EventSource = EventSource;
    this.fetch = fetch;
    this.readyState = CONNECTING_STATE;
    this.session = null;
    this.source = null;
    this.outbox = [];
    this.sending = false;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this.start(token);
  }

  async start(token) {
    let ticket;
    try {
      const response = await this.fetch(this.urls.ticket, {
        method: 'POST', headers: { Authorization: `Bearer ${token}` }, cache: 'no-store',
      });
      if (this.readyState === CLOSED_STATE) return;
      if (response.status === 401) {
        const body = await response.json().catch(() => ({}));
        this.finish(4001, body.message || 'invalid token');
        return;
      }
      if (!response.ok) {
        this.finish(1006, `HTTP ${response.status}`);
        return;
      }
      ticket = (await response.json()).ticket;
    } catch {
      this.finish(1006, '');
      return;
    }
    if (this.readyState === CLOSED_STATE) return;
    const source = new this.EventSource(`${this.urls.stream}?ticket=${encodeURIComponent(ticket)}`);
    this.source = source;
    source.onopen = () => {
      if (source !== this.source) return;
      this.readyState = OPEN_STATE;
      if (this.onopen) this.onopen();
    };
    source.onmessage = (event) => { if (source === this.source) this.onEvent(event.data); };
    // A stream that failed or ended without its close event. (EventSource would
    // reconnect by itself, with a ticket already used: never let it.)
    source.onerror = () => { if (source === this.source) this.finish(1006, ''); };
  }

  onEvent(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg.type === 'close') {
      this.finish(msg.code, msg.reason || '');
      return;
    }
    if (msg.type === 'welcome') this.session = msg.session;
    if (this.onmessage) this.onmessage({ data: text });
  }

  /** Queue one message (text); they go out one POST at a time, in order. */
  send(text) {
    if (this.readyState !== OPEN_STATE) return;
    this.outbox.push(text);
    this.pump();
  }

  async pump() {
    if (this.sending) return;
    this.sending = true;
    try {
      while (this.outbox.length && this.readyState === OPEN_STATE) {
        let outcome;
        try {
          const response = await this.fetch(this.urls.send, {
            method: 'POST',
            headers: { 'Content-Type': 'application/json', 'X-Session': this.session },
            body: this.outbox[0],
            cache: 'no-store',
          });
          outcome = sendOutcome(response.status, response.headers.get('Retry-After'));
        } catch {
          outcome = { action: 'close', code: 1006, reason: '' };
        }
        if (outcome.action === 'retry') {
          await new Promise((resolve) => { setTimeout(resolve, outcome.delay); });
          continue;
        }
        this.outbox.shift();
        if (outcome.action === 'close') this.finish(outcome.code, outcome.reason);
      }
    } finally {
      this.sending = false;
    }
  }

  close(code = 1000, reason = '') {
    this.finish(code, reason);
  }

  finish(code, reason) {
    if (this.readyState === CLOSED_STATE) return;
    this.readyState = CLOSED_STATE;
    if (this.source) this.source.close();
    this.source = null;
    this.outbox = [];
    if (this.onclose) this.onclose({ code, reason });
  }
}

/** An error reply from the server, or a failure of the client itself. */
export class WsError extends Error {
  /**
   * @param {string} code  server code (bad_request, forbidden, unavailable, rate_limited,
   *   busy...) or a client one: queue_full, stopped, disconnected, timeout, cancelled
   * @param {string} message  human-readable text
   * @param {object} [reply]  the server's error message, when there is one
   */
  constructor(code, message, reply = null) {
    super(message);
    this.name = 'WsError';
    this.code = code;
    this.reply = reply;
    /** Seconds to wait, for rate_limited. */
    this.retryAfter = reply && typeof reply.retry_after === 'number' ? reply.retry_after : null;
  }
}

/**
 * A connection to wsserver that survives network and server failures.
 *
 * Events (CustomEvent, payload in `detail`):
 *   "state"    {state, code?, reason?, delay?, attempt?, refused?}; state is one of
 *              "connecting", "open", "waiting" (reconnect scheduled), "stopped";
 *              refused: true when it stopped because a server that is up keeps
 *              refusing the handshake (MAX_REFUSALS), or getToken() rejected with
 *              an error whose `final` is true
 *   "welcome"  the server's welcome message
 *   "token"    {expiresAt} (unix seconds) after welcome and after each refresh
 *   "message"  every message the server sends, except repeated room messages
 *              (and a `gap` that loses nothing the client has not seen);
 *              recovered room messages follow their "joined" reply, in order
 *   "left"     {room, reason}: the client is no longer in `room` although it did
 *              not leave (reason "forbidden": its new token no longer grants it)
 *   "recovery" {room, recovered, missed, dropped?}: after a re-join that asked for
 *              missed messages (missed counts those still "pending" too, which
 *              follow as "message" events), and after a `gap` (recovered false,
 *              missed 0; dropped N when N messages without offsets were skipped);
 *              recovered false means messages are lost: reload the room
 *   "publish_error" {room, id, error}: a publish was refused (a WsError)
 *   "published" {room, id, duplicate, offset?, epoch?}: a publish whose
 *              idempotency key was used before was not published again
 *   "user_joined", "user_left", "presence": those server messages
 */
export class WsClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.url  ws:// or wss:// URL of the endpoint
   * @param {() => Promise<string>} options.getToken  returns a fresh JWT
   * @param {number} [options.maxQueue]  bound on messages kept while disconnected
   * @param {number} [options.requestTimeoutMs]  default wait for a reply
   * @param {(room: string, reply: object) => void} [options.onRecoveryFailed]  called when
   *   a re-join could not recover what was missed in `room`, or the server sent a `gap`
 *   (`reply` is then that message): the app must reload it
   * @param {number} [options.maxRefusals]  handshakes refused in a row by a server
   *   that is up (see MAX_REFUSALS) before the client stops; Infinity never stops
   * @param {(url: string) => Promise<boolean|null>} [options.probe]  asks whether the
   *   server is up after a handshake failed before opening (default healthProbe)
   * @param {() => number} [options.random]  jitter source (tests pin it)
   * @param {string} [options.transport]  "auto" (WebSocket, falling back to HTTP
   *   streaming when a WebSocket cannot be opened), "websocket" or "sse"
   * @param {typeof WebSocket} [options.WebSocket]  constructor to use
   * @param {typeof EventSource} [options.EventSource]  constructor to use (streaming)
   * @param {typeof fetch} [options.fetch]  fetch to use (streaming)
   * @param {boolean} [options.resendPublishes]  give every publish an idempotency
   *   key and send again, after a reconnect, those the dropped connection left
   *   unconfirmed (default true); false: they end in a "publish_error"
   *   `disconnected` instead
   */
  constructor({ url, getToken, maxQueue = DEFAULT_MAX_QUEUE,
                requestTimeoutMs = DEFAULT_REQUEST_TIMEOUT_MS, random = Math.random,
                onRecoveryFailed = null, maxRefusals = MAX_REFUSALS, probe = healthProbe,
                transport = 'auto', resendPublishes = true,
                WebSocket: Socket = globalThis.WebSocket,
                EventSource: Source = globalThis.EventSource,
                fetch: fetcher = globalThis.fetch }) {
    super();
    if (!url || typeof getToken !== 'function') {
      throw new TypeError('WsClient needs a url and an async getToken()');
    }
    this.url = url;
    this.getToken = getToken;
    this.maxQueue = maxQueue;
    this.requestTimeoutMs = requestTimeoutMs;
    this.random = random;
    this.Socket = Socket;
    this.EventSource = Source;
    this.fetch = fetcher ? (...args) => fetcher(...args) : null; // unbound fetch throws
    this.onRecoveryFailed = onRecoveryFailed;
    this.maxRefusals = maxRefusals;
    this.probe = probe;
    /** Handshakes refused in a row by a server that is up. */
    this.refusals = 0;
    if (!['auto', 'websocket', 'sse'].includes(transport)) {
      throw new TypeError('transport is "auto", "websocket" or "sse"');
    }
    /** "auto", "websocket" or "sse", as asked. */
    this.preference = transport;
    /** The transport of the current (or last) connection: "websocket" or "sse". */
    this.transport = null;
    /** WebSocket attempts in a row that missed a server that was up (websocketMisses). */
    this.wsMisses = 0;
    /** The WebSocket does not get through here: stream (for this client's life). */
    this.wsBlocked = false;

    this.state = 'stopped';
    this.user = null;
    this.expiresAt = null;
    /** Rooms to be in; re-joined after every reconnect. */
    this.rooms = new Set();
    /** Room -> {epoch, offset} of the last message delivered (rooms with history). */
    this.positions = new Map();
    /** Per room: the subscription token and data its join carries (re-joins too). */
    this.joinExtras = new Map();
    /**
     * Id of each join in flight -> {room, asked, rejoin, held}: its reply is matched by
     * id; `held` keeps live messages that arrive before the reply of a recovering join.
     */
    this.joins = new Map();
    /**
     * Id of each publish not yet echoed or refused -> {room, msg, at} (bounded):
     * `msg` (with its idempotency key) is sent again after a reconnect if the
     * connection dropped before it was confirmed, until RESEND_PUBLISH_MS after `at`.
     */
    this.publishes = new Map();
    this.resendPublishes = resendPublishes;
    /** This client's idempotency keys: `${publishKeyPrefix}.${n}`, unique per page. */
    this.publishKeyPrefix = randomKeyPrefix();
    this.publishSerial = 0;
    /** Re-joins waiting for the broker to come back (`unavailable`): room -> timer. */
    this.retries = new Map();
    this.token = null;
    this.attempt = 0;
    this.ws = null;
    this.openedAt = null;
    this.timer = null;
    this.queue = [];
    this.pending = new Map();
    this.nextId = 1;
    /** Bumped by connect() and close(), so a stale dial() gives up. */
    this.generation = 0;
    this.refreshing = false;
    /** Close code of the last connection that ended without a welcome, else null. */
    this.failedCode = null;
  }

  /** Start connecting (and keep reconnecting) until close() or a final close code. */
  connect() {
    if (this.state !== 'stopped') return;
    this.attempt = 0;
    this.generation += 1;
    this.dial();
  }

  /** Close for good with 1000; pending and queued requests fail with "stopped". */
  close() {
    this.generation += 1;
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState === CONNECTING_STATE) {
      // Closing a socket still connecting makes browsers log an error: close once open.
      ws.onopen = () => ws.close(1000, 'client closed');
    } else if (ws) {
      ws.close(1000, 'client closed');
    }
    this.failAll('stopped', 'the client was closed', true);
    this.failPublishes('stopped', 'the client was closed');
    for (const room of [...this.retries.keys()]) this.cancelRetry(room);
    this.joins.clear();
    this.setState({ state: 'stopped', code: 1000, reason: 'closed by the user' });
  }

  /** Forget the token so the next connection asks getToken() for a new one. */
  dropToken() {
    this.token = null;
  }

  /**
   * Send `message` (an object) now, or queue it while disconnected.
   * Returns the message's id (one is assigned when absent), so replies and errors
   * can be matched to it. Throws WsError "queue_full" or "stopped".
   */
  send(message) {
    const msg = message.id === undefined ? { ...message, id: `c${this.nextId++}` } : message;
    if (this.state === 'stopped') {
      throw new WsError('stopped', 'not connected: connect() was not called, or close() was');
    }
    // A socket can be closing (readyState 2) before its close event: queue, do not lose.
    if (this.state === 'open' && this.ws && this.ws.readyState === OPEN_STATE) {
      this.ws.send(JSON.stringify(msg));
    } else if (queueAccepts(this.queue.length, this.maxQueue)) {
      this.queue.push(msg);
    } else {
      throw new WsError('queue_full', `already ${this.maxQueue} messages waiting to be sent`);
    }
    return msg.id;
  }

  /**
   * Send `message` and resolve with the reply carrying the same id; reject with
   * WsError when the reply is an error, on timeout, or when the connection drops
   * after the message was sent (the server forgets it then).
   */
  request(message, { timeoutMs = this.requestTimeoutMs } = {}) {
    return new Promise((resolve, reject) => {
      let id;
      try {
        id = this.send(message);
      } catch (err) {
        reject(err);
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.queue = this.queue.filter((m) => m.id !== id); // too late to be worth sending
        reject(new WsError('timeout', `no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer, sent: this.state === 'open' });
    });
  }

  /**
   * Join `room` (kept across reconnects); resolves with the "joined" reply.
   * `options.id` sets the message id, `options.timeoutMs` the wait;
   * `options.token` (a subscription token for this room) and `options.data`
   * (for the application's subscribe proxy) go with the join and with every
   * re-join after a reconnect.
   */
  join(room, options = {}) {
    this.rooms.add(room);
    const extras = {};
    if (options.token !== undefined) extras.token = options.token;
    if (options.data !== undefined) extras.data = options.data;
    this.joinExtras.set(room, extras);
    const msg = withId({ ...joinMessage(room, this.positions.get(room)), ...extras }, options.id);
    if (msg.id === undefined) msg.id = `c${this.nextId++}`;
    this.joins.set(msg.id, { room, asked: msg.since !== undefined, rejoin: false, held: [] });
    return this.request(msg, options);
  }

  /** Ask who is in `room` (namespaces with presence); resolves with the "presence" reply. */
  presence(room, options = {}) {
    return this.request(withId({ type: 'presence', room }, options.id), options);
  }

  /**
   * Leave `room`; resolves with the "left" reply. While disconnected there is
   * nothing to tell the server (it forgot our rooms): the room is just not re-joined.
   */
  leave(room, options = {}) {
    this.rooms.delete(room);
    this.positions.delete(room);
    this.joinExtras.delete(room);
    this.cancelRetry(room);
    if (this.state !== 'open') {
      const dropped = this.queue.filter((m) => m.type === 'join' && m.room === room);
      this.queue = this.queue.filter((m) => !dropped.includes(m));
      for (const m of dropped) {
        this.settle({ type: 'error', code: 'cancelled', message: `left ${room} before joining`,
                      id: m.id });
      }
      return Promise.resolve({ type: 'left', room });
    }
    return this.request(withId({ type: 'leave', room }, options.id), options);
  }

  /**
   * Publish `data` to `room`; returns the message id. A refusal (forbidden,
   * unavailable, rate_limited...) arrives as a "publish_error" event with that id.
   * Each publish carries an idempotency key (its own, unless `resendPublishes`
   * is false; `options.idempotencyKey`, 1 to 128 characters, chooses it): the
   * server publishes a key once within 5 minutes and answers a repeat of one
   * that went through with a "published" event {room, id, duplicate: true,
   * offset?, epoch?}. A publish a dropped connection left unconfirmed is sent
   * again after the reconnect (see requeuePublishes).
   */
  publish(room, data, options = {}) {
    const msg = { type: 'publish', room, data, id: options.id ?? `c${this.nextId++}` };
    let key = options.idempotencyKey;
    if (key === undefined && this.resendPublishes) {
      key = `${this.publishKeyPrefix}.${(this.publishSerial += 1)}`;
    }
    if (key !== undefined) msg.idempotency_key = key;
    const id = this.send(msg);
    this.publishes.set(id, { room, msg: key === undefined ? null : msg, at: Date.now() });
    // Bounded: publishes whose echo never comes (not a member) are forgotten, oldest first.
    if (this.publishes.size > 1000) this.publishes.delete(this.publishes.keys().next().value);
    return id;
  }

  /** Run a server task; resolves with the "result" reply. */
  task(name, args, options = {}) {
    return this.request(withId({ type: 'task', name, args }, options.id), options);
  }

  /**
   * Call `method` on the application's backend through the server's RPC proxy
   * (`--proxy-rpc-url`); resolves with the "rpc_result" reply's `data`, rejects
   * with WsError (`unknown_type` when the server has no RPC proxy).
   */
  async rpc(method, data, options = {}) {
    const reply = await this.request(withId({ type: 'rpc', method, data }, options.id), options);
    return reply.data;
  }

  // --- internals -----------------------------------------------------------

  setState(detail) {
    this.state = detail.state;
    this.dispatchEvent(new CustomEvent('state', { detail }));
  }

  async dial() {
    const generation = this.generation;
    this.setState({ state: 'connecting', attempt: this.attempt, transport: this.nextTransport() });
    if (!tokenUsable(this.expiresAt, Date.now())) this.token = null;
    if (!this.token) {
      let token;
      try {
        token = await this.getToken();
      } catch (err) {
        if (generation !== this.generation) return; // close() was called meanwhile
        if (err && err.final === true) {
          // getToken() knows asking again cannot help (the server refused this origin).
          this.failAll('stopped', err.message, true);
          this.setState({ state: 'stopped', code: null, refused: true, reason: err.message });
          return;
        }
        this.scheduleReconnect('backoff', { code: null, reason: `no token: ${err.message}` });
        return;
      }
      if (generation !== this.generation) return;
      this.token = token;
    }
    const transport = this.nextTransport();
    this.transport = transport;
    let ws;
    try {
      if (transport === 'sse') {
        ws = new StreamSocket(streamUrls(this.url), this.token,
                              { EventSource: this.EventSource, fetch: this.fetch });
      } else {
        ws = new this.Socket(this.url, ['bearer', this.token]);
      }
    } catch (err) {
      if (transport === 'websocket' && this.preference === 'auto' && this.canStream()) {
        // No WebSocket here at all (or one that refuses this URL): stream at once.
        this.wsBlocked = true;
        this.dial();
        return;
      }
      // A malformed URL will not heal by retrying.
      this.setState({ state: 'stopped', code: null, reason: err.message });
      return;
    }
    this.ws = ws;
    this.openedAt = null;
    this.socketOpened = false;
    ws.onopen = () => { if (ws === this.ws) this.socketOpened = true; };
    ws.onmessage = (event) => { if (ws === this.ws) this.onMessage(event.data); };
    ws.onclose = (event) => { if (ws === this.ws) this.onClose(event.code, event.reason); };
    // Every failure is followed by a close event, which does the work.
    ws.onerror = () => {};
  }

  /** Whether HTTP streaming is possible here (EventSource and fetch). */
  canStream() {
    return typeof this.EventSource === 'function' && typeof this.fetch === 'function';
  }

  /** The transport for the next connection (see chooseTransport). */
  nextTransport() {
    return chooseTransport({
      preference: this.preference,
      wsBlocked: this.wsBlocked,
      hasWebSocket: typeof this.Socket === 'function',
      hasEventSource: this.canStream(),
    });
  }

  onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return; // the server only sends JSON; ignore anything else
    }
    let recovered = [];
    if (msg.type === 'welcome') {
      this.onWelcome(msg);
    } else if (msg.type === 'refreshed') {
      this.setExpiry(msg.expires_at);
    } else if (msg.type === 'token_expiring') {
      this.refreshToken();
    } else if (msg.type === 'message') {
      const recovering = this.recoveringJoin(msg.room);
      if (recovering && Number.isInteger(msg.offset)) {
        // Held until the joined reply: the recovered messages go first.
        recovering.held.push(msg);
        return;
      }
      const verdict = acceptMessage(this.positions.get(msg.room) || null, msg);
      if (!verdict.deliver) return; // already delivered (recovered, then repeated)
      if (verdict.position) this.positions.set(msg.room, verdict.position);
      if (msg.from === this.user) this.publishes.delete(msg.id); // our publish came back
    } else if (msg.type === 'published') {
      this.publishes.delete(msg.id); // a repeated idempotency key: no copy comes
    } else if (msg.type === 'gap') {
      const recovering = this.recoveringJoin(msg.room);
      if (recovering) {
        recovering.held.push(msg); // in order with the messages held for that join
        return;
      }
      if (!this.onGap(msg)) return; // a room we left, or nothing lost for us
    } else if (msg.type === 'joined') {
      recovered = this.onJoined(msg);
    } else if (msg.type === 'left' && msg.reason) {
      this.dropRoom(msg.room, msg.reason);
    } else if (msg.type === 'error') {
      this.onErrorReply(msg);
    }
    this.settle(msg);
    this.dispatchEvent(new CustomEvent('message', { detail: msg }));
    for (const m of recovered) {
      if (m.type === 'gap') this.reportGap(m);
      this.dispatchEvent(new CustomEvent('message', { detail: m }));
    }
    if (msg.type === 'user_joined' || msg.type === 'user_left' || msg.type === 'presence'
        || msg.type === 'published') {
      this.dispatchEvent(new CustomEvent(msg.type, { detail: msg }));
    }
  }

  /** A `joined` reply: the room's new position; the recovered messages to deliver. */
  onJoined(msg) {
    const join = this.joins.get(msg.id);
    this.joins.delete(msg.id);
    if (!this.rooms.has(msg.room)) return []; // left meanwhile
    const asked = join ? join.asked : false;
    const outcome = joinedOutcome(this.positions.get(msg.room) || null, msg, asked);
    const missed = outcome.messages.length + (Number.isInteger(msg.pending) ? msg.pending : 0);
    // Live messages that came while the join was answered follow the recovered ones;
    // a held gap keeps its place among them, and is reported there.
    let position = outcome.position;
    for (const live of join ? join.held : []) {
      const verdict = live.type === 'gap'
        ? { ...gapOutcome(position, live), deliver: null } : acceptMessage(position, live);
      position = verdict.position;
      if (verdict.deliver || verdict.lost) outcome.messages.push(live);
    }
    if (position) this.positions.set(msg.room, position);
    else this.positions.delete(msg.room);
    if (outcome.recovered !== null) {
      this.dispatchEvent(new CustomEvent('recovery', {
        detail: { room: msg.room, recovered: outcome.recovered, missed },
      }));
      if (outcome.recovered === false && this.onRecoveryFailed) {
        this.onRecoveryFailed(msg.room, msg);
      }
    }
    return outcome.messages;
  }

  /**
   * A `gap` for a room we are in: messages up to its offset may be lost. Moves the
   * room's position there and reports it; false when there is nothing to report.
   */
  onGap(msg) {
    if (!this.rooms.has(msg.room)) return false;
    const outcome = gapOutcome(this.positions.get(msg.room) || null, msg);
    if (!outcome.lost) return false;
    this.positions.set(msg.room, outcome.position);
    this.reportGap(msg);
    return true;
  }

  /** Tell the application that messages of the gap's room were lost. */
  reportGap(msg) {
    this.dispatchEvent(new CustomEvent('recovery', {
      detail: { room: msg.room, recovered: false, missed: 0,
                ...(msg.dropped ? { dropped: msg.dropped } : {}) },
    }));
    if (this.onRecoveryFailed) this.onRecoveryFailed(msg.room, msg);
  }

  /** An error reply to one of our joins or publishes. */
  onErrorReply(msg) {
    const join = this.joins.get(msg.id);
    if (join) {
      this.joins.delete(msg.id);
      if (join.rejoin && msg.code === 'unavailable') {
        this.retryJoin(join.room); // the broker is down: try again, keep the position
      } else if (join.rejoin) {
        this.dropRoom(join.room, msg.code); // e.g. forbidden: the new token does not grant it
      } else {
        // The caller's join() rejects with this error; it decides whether to try again.
        this.rooms.delete(join.room);
        this.positions.delete(join.room);
      }
      return;
    }
    if (this.publishes.has(msg.id)) {
      this.failPublish(msg.id, new WsError(msg.code, msg.message || msg.code, msg));
    }
  }

  /** Every publish not confirmed yet ends in a "publish_error" (the client stops). */
  failPublishes(code, text) {
    for (const id of [...this.publishes.keys()]) this.failPublish(id, new WsError(code, text));
  }

  /** Forget publish `id` and tell the app with a "publish_error". */
  failPublish(id, error) {
    const { room } = this.publishes.get(id);
    this.publishes.delete(id);
    this.dispatchEvent(new CustomEvent('publish_error', { detail: { room, id, error } }));
  }

  /**
   * The connection dropped: publishes it carried and did not confirm go first in
   * the queue again, with their keys (the server publishes each once), unless
   * they have none or are too old for their key to be remembered: those end in
   * a "publish_error" `disconnected` (they may or may not have been published).
   */
  requeuePublishes() {
    const queued = new Set(this.queue.map((m) => m.id));
    const again = [];
    const now = Date.now();
    for (const [id, entry] of this.publishes) {
      if (queued.has(id)) continue; // never sent: it goes out anyway
      if (entry.msg && now - entry.at < RESEND_PUBLISH_MS) {
        again.push(entry.msg);
        continue;
      }
      this.failPublish(id, new WsError('disconnected',
        'the connection closed before the publish was confirmed: it may not have gone out'));
    }
    this.queue = [...again, ...this.queue];
  }

  /** We are out of `room` without having left it: forget it and tell the app. */
  dropRoom(room, reason) {
    if (!this.rooms.has(room)) return;
    this.rooms.delete(room);
    this.positions.delete(room);
    this.cancelRetry(room);
    this.dispatchEvent(new CustomEvent('left', { detail: { room, reason } }));
  }

  /** Send the (re-)join of `room` on the open socket, with `since` when we have a position. */
  sendRejoin(room) {
    const msg = { ...joinMessage(room, this.positions.get(room)), ...this.joinExtras.get(room),
                  id: `c${this.nextId++}` };
    this.joins.set(msg.id, { room, asked: msg.since !== undefined, rejoin: true, held: [] });
    this.ws.send(JSON.stringify(msg));
  }

  /** The join of `room` in flight that asked to recover, if any. */
  recoveringJoin(room) {
    for (const join of this.joins.values()) if (join.room === room && join.asked) return join;
    return null;
  }

  retryJoin(room) {
    this.cancelRetry(room);
    const attempt = this.retries.size;
    this.retries.set(room, setTimeout(() => {
      this.retries.delete(room);
      if (this.state === 'open' && this.ws && this.rooms.has(room)) this.sendRejoin(room);
    }, Math.max(250, backoffDelay(attempt + 2, this.random))));
  }

  cancelRetry(room) {
    clearTimeout(this.retries.get(room));
    this.retries.delete(room);
  }

  onWelcome(msg) {
    this.openedAt = Date.now();
    this.failedCode = null;
    if (this.transport === 'websocket') this.wsMisses = 0;
    this.user = msg.user;
    // Rooms first, so queued publishes reach rooms we are back in; a join
    // still in the queue goes out with it, and is not sent twice.
    // Each re-join carries "since" for rooms with history, so the server
    // sends what was published while we were away (or says it cannot).
    const queuedJoins = new Set(this.queue.filter((m) => m.type === 'join').map((m) => m.room));
    for (const room of this.rooms) {
      if (queuedJoins.has(room)) continue;
      this.cancelRetry(room);
      this.sendRejoin(room);
    }
    const queued = this.queue;
    this.queue = [];
    for (const msg of queued) {
      const waiter = this.pending.get(msg.id);
      if (waiter) waiter.sent = true;
      this.ws.send(JSON.stringify(msg));
    }
    // Only now "open": what listeners send goes after the re-joins and the queue.
    this.setState({ state: 'open', attempt: this.attempt, transport: this.transport });
    this.dispatchEvent(new CustomEvent('welcome', { detail: msg }));
    this.setExpiry(msg.expires_at);
  }

  setExpiry(expiresAt) {
    if (typeof expiresAt !== 'number') return;
    this.expiresAt = expiresAt;
    this.dispatchEvent(new CustomEvent('token', { detail: { expiresAt } }));
  }

  /** Answer token_expiring with an in-band refresh; on failure the server's 4001 follows. */
  async refreshToken() {
    if (this.refreshing) return;
    this.refreshing = true;
    try {
      const token = await this.getToken();
      this.token = token;
      if (this.state === 'open') await this.request({ type: 'refresh', token });
    } catch (err) {
      this.dispatchEvent(new CustomEvent('message', {
        detail: { type: 'error', code: 'refresh_failed', message: err.message },
      }));
    } finally {
      this.refreshing = false;
    }
  }

  /** Resolve or reject the request waiting for this reply's id. */
  settle(msg) {
    if (msg.id === undefined || !this.pending.has(msg.id)) return;
    const waiter = this.pending.get(msg.id);
    this.pending.delete(msg.id);
    clearTimeout(waiter.timer);
    if (msg.type === 'error') {
      waiter.reject(new WsError(msg.code, msg.message || msg.code, msg));
    } else {
      waiter.resolve(msg);
    }
  }

  /** Reject waiting requests: those already sent (the server forgot them), or all. */
  failAll(code, text, includeQueued) {
    for (const [id, waiter] of this.pending) {
      if (!includeQueued && !waiter.sent) continue;
      this.pending.delete(id);
      clearTimeout(waiter.timer);
      waiter.reject(new WsError(code, text));
    }
    if (includeQueued) this.queue = [];
  }

  onClose(code, reason) {
    const openFor = this.openedAt === null ? null : Date.now() - this.openedAt;
    this.ws = null;
    // Joins in flight got no answer (what they held is recovered by the next re-join);
    // queued ones keep their entries.
    const queuedIds = new Set(this.queue.map((m) => m.id));
    for (const id of this.joins.keys()) if (!queuedIds.has(id)) this.joins.delete(id);
    for (const room of [...this.retries.keys()]) this.cancelRetry(room);
    this.requeuePublishes();
    this.failAll('disconnected', `connection closed (${code}) before the reply`, false);
    const decision = closeDecision(code, { previousCode: this.failedCode });
    this.failedCode = openFor === null ? code : null;
    if (decision.action === 'stop') {
      this.failAll('stopped', `connection closed (${code})`, true);
      this.failPublishes('stopped', `connection closed (${code})`);
      this.setState({ state: 'stopped', code, reason: reason || describeClose(code) });
      return;
    }
    if (decision.newToken) this.token = null;
    this.attempt = attemptAfterClose(this.attempt, openFor);
    const why = reason || describeClose(code);
    if (code === 1006 && openFor === null && !this.socketOpened) {
      this.afterFailedHandshake(decision.delay, why);
      return;
    }
    this.refusals = 0;
    this.scheduleReconnect(decision.delay, { code, reason: why });
  }

  /**
   * The socket failed before it opened: a server that is up refused the handshake
   * (browsers show only 1006 for a 403), or the server is away. The health probe
   * tells them apart; after maxRefusals refusals in a row, stop instead of retrying.
   */
  async afterFailedHandshake(kind, reason) {
    const generation = this.generation;
    let answers = null;
    // With transport "auto", a WebSocket that misses a server that is up may be
    // blocked on the way (a proxy that strips the upgrade): the probe decides.
    const mayStream = this.transport === 'websocket' && this.preference === 'auto'
      && this.canStream() && !this.wsBlocked;
    if (this.maxRefusals !== Infinity || mayStream) {
      try {
        answers = await this.probe(this.url);
      } catch {
        answers = null;
      }
      if (generation !== this.generation) return; // close() was called meanwhile
    }
    if (mayStream) {
      this.wsMisses = websocketMisses(this.wsMisses, { reached: false,
                                                        serverAnswered: answers === true });
      // Streams from now on. A server that refuses this page (its origin) refuses
      // the stream too, and the refusals below go on counting to the stop.
      if (this.wsMisses >= WS_MISSES_BEFORE_STREAMING) this.wsBlocked = true;
    }
    this.refusals = refusalsAfter(this.refusals, answers);
    if (this.refusals >= this.maxRefusals) {
      const refusals = this.refusals;
      this.refusals = 0;
      this.failAll('stopped', 'the server refused the connection', true);
      this.setState({
        state: 'stopped', code: 1006, refused: true,
        reason: `refused before opening, ${refusals} times in a row, by a server that is up `
          + '(its origin check, most often: browsers show only 1006)',
      });
      return;
    }
    this.scheduleReconnect(kind, { code: 1006, reason });
  }

  scheduleReconnect(kind, { code, reason }) {
    const delay = reconnectDelay(kind, this.attempt, this.random);
    if (kind === 'backoff') this.attempt += 1;
    this.setState({ state: 'waiting', code, reason, delay, attempt: this.attempt });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.dial();
    }, delay);
  }
}

/** `message` with `id` added when one is given. */
/** A random prefix for this client's idempotency keys (16 hex digits). */
function randomKeyPrefix() {
  const bytes = new Uint8Array(8);
  if (globalThis.crypto && typeof globalThis.crypto.getRandomValues === 'function') {
    globalThis.crypto.getRandomValues(bytes);
  } else {
    for (let i = 0; i < bytes.length; i += 1) bytes[i] = Math.floor(Math.random() * 256);
  }
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function withId(message, id) {
  return id === undefined ? message : { ...message, id };
}

/** A short human text for a close code, for when the server gave no reason. */
export function describeClose(code) {
  if (code === 1006) return 'connection lost';
  const entry = CLOSE_CODES[code];
  return entry ? entry.text : `closed (${code})`;
}
