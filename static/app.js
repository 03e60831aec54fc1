// app.js: the demo page. All server data is written with textContent, never as HTML.
import { WsClient, WsError, describeClose, socketUrl } from './wsclient.js';
import { StatsChart, messageRate } from './chart.js';

const $ = (id) => document.getElementById(id);
const STATS_EVERY_MS = 1000;

// --- identity and tokens ---------------------------------------------------

/** A name per tab, so two tabs of one browser are two users. */
function initialName() {
  const saved = sessionStorage.getItem('wsserver-demo-name');
  if (saved) return saved;
  const name = `guest-${Math.random().toString(36).slice(2, 6)}`;
  sessionStorage.setItem('wsserver-demo-name', name);
  return name;
}

let userName = initialName();
let waitingForPaste = null; // resolve() of the getToken() call waiting for a pasted token
let pastedToken = null; // pasted while no getToken() call was waiting: used by the next one
let lastClose = null; // {code, reason} of the last connection that ended
/** Whether the server hands out demo tokens; asked once with GET (no 404 in the console). */
let demoTokens = null;

async function demoTokensEnabled() {
  if (demoTokens === null) {
    try {
      const response = await fetch('/auth/demo-token', { cache: 'no-store' });
      demoTokens = response.ok && (await response.json()).enabled === true;
    } catch {
      return true; // the server is unreachable: try again on the next connection
    }
    showMode();
  }
  return demoTokens;
}

/** Demo mode: a name to choose. Key mode: a token to paste, and no name form. */
function showMode() {
  $('name-form').hidden = demoTokens === false;
  $('token-form').hidden = demoTokens !== false;
}

/**
 * getToken() for the client: a demo token for the chosen name, or, when the
 * server has no demo endpoint, whatever the user pastes.
 */
async function getToken() {
  if (pastedToken) {
    const token = pastedToken;
    pastedToken = null;
    return token;
  }
  if (!(await demoTokensEnabled())) return askForToken();
  const response = await fetch('/auth/demo-token', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ user: userName }),
    cache: 'no-store',
  });
  if (!response.ok) {
    const refusal = await response.json().catch(() => ({}));
    if (refusal.error === 'origin') {
      // The same check as the handshake's: asking again cannot help. The client stops.
      throw Object.assign(new Error(`the server refused this page's origin (HTTP ${response.status})`),
                          { final: true });
    }
    throw new Error(`demo token refused: HTTP ${response.status}`);
  }
  const body = await response.json();
  return body.token;
}

/** What to check when the server is up but refuses this page: said instead of a bare 1006. */
function refusalAdvice() {
  return `The server is up but refuses this page's connection. Check that its `
    + `--allowed-origins includes this page's origin, ${window.location.origin} (its log then `
    + 'says "handshake refused: origin not allowed"), and that it is not full (503) or '
    + 'limiting this address (429). Then press Connect (or Use token) to try again.';
}

/** Key mode: wait for a pasted token, saying why one is needed now. */
function askForToken() {
  $('token-form').hidden = false;
  let why = 'Waiting for a token: paste one below.';
  if (client.state === 'open') {
    why = 'Your token expires soon: paste a new one to stay connected.';
  } else if (lastClose && lastClose.code === 4001) {
    why = `The server refused the token (4001 ${lastClose.reason}): paste another.`;
  }
  $('conn-detail').textContent = why;
  if (client.state !== 'open') {
    $('conn-state').textContent = 'waiting for a token';
    $('conn-state').dataset.state = 'waiting';
  }
  return new Promise((resolve) => { waitingForPaste = resolve; });
}

// --- the client ------------------------------------------------------------

/**
 * The transport the page asks for: ?transport=sse or ?transport=websocket forces one;
 * otherwise "auto" (a WebSocket, or HTTP streaming where a WebSocket cannot be opened).
 */
function transportAsked() {
  const asked = new URLSearchParams(window.location.search).get('transport');
  return asked === 'sse' || asked === 'websocket' ? asked : 'auto';
}

const TRANSPORT_NAMES = { websocket: 'WebSocket', sse: 'HTTP streaming (SSE)' };

const client = new WsClient({
  url: socketUrl(window.location),
  getToken,
  transport: transportAsked(),
  onRecoveryFailed: (room, reply) => addNotice(reply.type === 'gap'
    ? `Some messages of #${room} were lost on the server (its history was reset or trimmed): `
      + 'some may be missing above this line.'
    : `Messages sent to #${room} while you were away could not be recovered: `
      + 'some may be missing.'),
});
/** Rooms the server confirmed joining on this connection (the others are still joining). */
const joinedRooms = new Set();
/** Ids of publishes -> their text, so a refused one can be marked as not sent. */
const publishIds = new Map();
/** Ids of requests: their errors are shown by the code awaiting them. */
const requestIds = new Set();
let idCounter = 0;
const newId = (prefix) => `${prefix}${++idCounter}`;

let connectionsMade = 0;
let refreshes = 0;

client.addEventListener('state', ({ detail }) => {
  const badge = $('conn-state');
  badge.dataset.state = detail.state;
  const reason = detail.reason ? `: ${detail.reason}` : '';
  switch (detail.state) {
    case 'connecting':
      badge.textContent = 'connecting…';
      break;
    case 'open':
      badge.textContent = 'connected';
      $('conn-detail').textContent = '';
      $('conn-error').textContent = '';
      $('conn-transport').textContent = TRANSPORT_NAMES[detail.transport] || '–';
      $('conn-transport').dataset.transport = detail.transport || '';
      break;
    case 'waiting':
      badge.textContent = 'reconnecting…';
      $('conn-detail').textContent =
        `Closed${reason}. Next try in ${(detail.delay / 1000).toFixed(1)} s.`;
      break;
    default:
      badge.textContent = 'disconnected';
      $('conn-detail').textContent = `Stopped${reason}.`;
      if (detail.refused) $('conn-error').textContent = refusalAdvice();
  }
  if (typeof detail.code === 'number' && detail.state !== 'open') showClose(detail);
  if (detail.state !== 'open' && joinedRooms.size) {
    joinedRooms.clear(); // re-joined (with what was missed) after the reconnect
    renderRooms();
  }
});

/** The Connection panel's "Last close: 4029 kept sending while rate limited". */
function showClose({ code, reason }) {
  lastClose = { code, reason: reason || describeClose(code) };
  $('conn-close-code').textContent = `${code} ${lastClose.reason}`;
  $('conn-close').hidden = false;
}

client.addEventListener('welcome', ({ detail }) => {
  connectionsMade += 1;
  $('conn-count').textContent = String(connectionsMade);
  $('conn-user').textContent = detail.user;
  $('personal-name').textContent = `user:${detail.user}`;
  if (demoTokens !== false) $('token-form').hidden = true;
  const limits = detail.limits || {};
  if (limits.message_rate !== undefined) {
    $('conn-limits').textContent = `Limits: ${limits.message_rate} messages/s `
      + `(bursts of ${limits.message_burst}), ${limits.tasks_in_flight} tasks at once, `
      + `${limits.max_message_size} bytes per message.`;
  }
});

client.addEventListener('token', ({ detail }) => {
  $('conn-expiry').dataset.expiresAt = String(detail.expiresAt);
  showExpiry();
});

client.addEventListener('message', ({ detail: msg }) => {
  switch (msg.type) {
    case 'message':
      if (msg.from === client.user) publishIds.delete(msg.id); // our own publish came back
      addChatLine(msg);
      break;
    case 'joined':
      joinedRooms.add(msg.room);
      renderRooms();
      break;
    case 'user_joined':
      addSystemLine(`${msg.user} joined #${msg.room}`);
      break;
    case 'user_left':
      addSystemLine(`${msg.user} left #${msg.room}`);
      break;
    case 'refreshed':
      refreshes += 1;
      $('conn-detail').textContent = ''; // a pasted token may have answered "expires soon"
      $('conn-refreshes').textContent = String(refreshes);
      break;
    case 'error':
      showServerError(msg);
      break;
    default:
  }
});

function showServerError(msg) {
  if (requestIds.has(msg.id)) return; // shown where they were made
  // A refused publish: already marked in the chat by its publish_error, which comes first.
  if (publishIds.delete(msg.id)) return;
  $('conn-error').textContent = `${msg.code}: ${msg.message}`;
}

// A refused publish: marked in the chat, and said under it (forbidden, unavailable...).
client.addEventListener('publish_error', ({ detail }) => {
  const text = publishIds.get(detail.id); // forgotten by showServerError, which follows
  const { code } = detail.error;
  addUnsentLine(`Not sent to #${detail.room} (${code})${text === undefined ? '' : `: "${text}"`}`);
  if (code === 'rate_limited') {
    holdSendButton(detail.error.retryAfter);
  } else {
    $('chat-error').textContent = `Not sent to #${detail.room}: ${userText(detail.error)}`;
  }
});

client.addEventListener('left', ({ detail }) => {
  joinedRooms.delete(detail.room);
  addNotice(`You are no longer in #${detail.room} (${detail.reason}).`);
  renderRooms();
});

// After a reconnect: say how many missed messages follow (a loss is said by onRecoveryFailed).
client.addEventListener('recovery', ({ detail }) => {
  if (!detail.recovered || detail.missed === 0) return;
  const count = detail.missed === 1 ? '1 message' : `${detail.missed} messages`;
  addSystemLine(`Back in #${detail.room}: ${count} sent while you were away, recovered below.`);
});

/** The rate-limit notice stays at least this long, so it can be read. */
const NOTICE_MS = 4000;

/** After rate_limited: say how long to wait, and keep Send disabled that long. */
let sendHeldUntil = 0;
let noticeUntil = 0;
function holdSendButton(retryAfter) {
  const button = $('send-button');
  const until = Date.now() + (Number(retryAfter) || 1) * 1000;
  const ticking = noticeUntil > Date.now();
  sendHeldUntil = Math.max(sendHeldUntil, until); // several replies: the latest wait wins
  noticeUntil = Math.max(noticeUntil, sendHeldUntil, Date.now() + NOTICE_MS);
  button.disabled = true;
  if (ticking) return;
  const notice = $('chat-notice');
  const tick = () => {
    const now = Date.now();
    const left = (sendHeldUntil - now) / 1000;
    if (left > 0) {
      notice.textContent = `Rate limited: you can send again in ${left.toFixed(1)} s.`;
    } else {
      button.disabled = false;
      notice.textContent = 'Rate limited: messages marked "Not sent" did not go out; '
        + 'you can send again.';
    }
    if (now >= noticeUntil) {
      notice.textContent = '';
      return;
    }
    setTimeout(tick, 100);
  };
  tick();
}

// --- connection panel ------------------------------------------------------

function showExpiry() {
  const cell = $('conn-expiry');
  const expiresAt = Number(cell.dataset.expiresAt);
  if (!expiresAt) return;
  const left = Math.round(expiresAt - Date.now() / 1000);
  if (left <= 0) {
    cell.textContent = 'expired';
    return;
  }
  const minutes = Math.floor(left / 60);
  cell.textContent = `${minutes}:${String(left % 60).padStart(2, '0')}`;
}
setInterval(showExpiry, 1000);

$('name-input').value = userName;
$('name-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const name = $('name-input').value.trim();
  if (!name) {
    $('conn-error').textContent = 'Type a name first: a blank name cannot connect.';
    $('name-input').focus();
    return;
  }
  $('conn-error').textContent = '';
  userName = name;
  sessionStorage.setItem('wsserver-demo-name', userName);
  restart();
});

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const token = $('token-input').value.trim();
  if (!token) {
    $('conn-error').textContent = 'Paste a token first.';
    $('token-input').focus();
    return;
  }
  $('conn-error').textContent = '';
  $('token-input').value = '';
  if (waitingForPaste) {
    waitingForPaste(token);
    waitingForPaste = null;
  } else {
    pastedToken = token;
    restart();
  }
});

$('disconnect-button').addEventListener('click', () => client.close());
$('token-disconnect').addEventListener('click', () => client.close());

function restart() {
  client.close();
  client.dropToken();
  client.connect();
}

// --- chat ------------------------------------------------------------------

function renderRooms() {
  const list = $('room-list');
  const select = $('message-room');
  const chosen = select.value;
  list.replaceChildren();
  select.replaceChildren();
  for (const room of client.rooms) {
    const item = document.createElement('li');
    // "joining" until the server answers: a publish before that would be refused.
    item.dataset.state = joinedRooms.has(room) ? 'joined' : 'joining';
    item.title = joinedRooms.has(room) ? `In #${room}` : `Joining #${room}…`;
    item.append(document.createTextNode(room));
    const leave = document.createElement('button');
    leave.type = 'button';
    leave.textContent = '×';
    leave.setAttribute('aria-label', `Leave room ${room}`);
    leave.addEventListener('click', () => leaveRoom(room));
    item.append(leave);
    list.append(item);
    select.append(new Option(room, room, false, room === chosen));
  }
}

async function joinRoom(room) {
  $('chat-error').textContent = '';
  const id = newId('join');
  requestIds.add(id);
  const joining = client.join(room, { id });
  renderRooms();
  $('message-room').value = room;
  try {
    await joining;
  } catch (err) {
    // A join lost with its connection is sent again on reconnect, and one dropped by a
    // restart (new name) is re-joined after it; the client forgets refused ones itself.
    renderRooms();
    if (err.code === 'cancelled') return; // the user left it before the join went out
    if (err.code === 'disconnected' || err.code === 'stopped') return;
    $('chat-error').textContent = `Could not join #${room}: ${userText(err)}`;
  } finally {
    requestIds.delete(id);
  }
}

async function leaveRoom(room) {
  joinedRooms.delete(room);
  try {
    await client.leave(room);
  } catch (err) {
    $('chat-error').textContent = `Could not leave #${room}: ${userText(err)}`;
  }
  renderRooms();
}

$('join-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const room = $('room-input').value.trim();
  if (room) joinRoom(room);
});

// The personal room: the server lets only this user join it; only its API publishes there.
$('personal-room').addEventListener('click', () => {
  if (!client.user) {
    $('chat-error').textContent = 'Connect first: your room is named after your user.';
    return;
  }
  joinRoom(`user:${client.user}`);
});

$('message-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const input = $('message-input');
  const room = $('message-room').value;
  const text = input.value;
  if (!room) {
    $('chat-error').textContent = 'Join a room first.';
    return;
  }
  if (!text.trim()) return;
  $('chat-error').textContent = '';
  const id = newId('pub');
  try {
    client.publish(room, text, { id });
  } catch (err) {
    $('chat-error').textContent = `Not sent: ${userText(err)}`;
    return;
  }
  publishIds.set(id, text);
  if (client.state !== 'open') {
    addSystemLine(`Queued for ${room}: "${text}" (sent on reconnect)`);
  }
  input.value = '';
  // Ids of publishes that got no error are forgotten after a while.
  setTimeout(() => publishIds.delete(id), 60000);
});

function addChatLine(msg) {
  const item = document.createElement('li');
  if (msg.from === client.user) item.classList.add('mine');
  const room = document.createElement('span');
  room.className = 'room';
  room.textContent = `#${msg.room} `;
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = `${msg.from === null ? 'server' : msg.from}: `; // null: the server API
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = typeof msg.data === 'string' ? msg.data : JSON.stringify(msg.data);
  item.append(room, from, text);
  appendToLog($('chat-log'), item);
}

function addSystemLine(text, className = 'system') {
  const item = document.createElement('li');
  item.className = className;
  item.textContent = text;
  appendToLog($('chat-log'), item);
}

const addUnsentLine = (text) => addSystemLine(text, 'unsent');
const addNotice = (text) => addSystemLine(text, 'notice');

function appendToLog(log, item) {
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
  log.append(item);
  while (log.children.length > 200) log.firstElementChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

/** Words for the client's own error codes; server errors keep the server's message. */
const CLIENT_ERRORS = {
  stopped: 'not connected: press Connect (or paste a token) first',
  queue_full: 'too many messages are waiting for the connection; try again once connected',
  disconnected: 'the connection dropped before the answer came',
  timeout: 'no answer from the server in time',
  cancelled: 'cancelled',
};

function userText(err) {
  if (err instanceof WsError) {
    if (CLIENT_ERRORS[err.code] && !err.reply) return CLIENT_ERRORS[err.code];
    const wait = err.retryAfter !== null ? ` (retry in ${err.retryAfter} s)` : '';
    return `${err.code}: ${err.message}${wait}`;
  }
  return err.message || String(err);
}

// --- tasks -----------------------------------------------------------------

const taskSelect = $('task-name');
function showTaskArgs() {
  for (const group of document.querySelectorAll('.task-args')) {
    group.hidden = group.dataset.task !== taskSelect.value;
  }
}
taskSelect.addEventListener('change', showTaskArgs);
showTaskArgs();

/** The field's whole number, or throws with the field's name (checked before sending). */
function wholeNumber(id, label) {
  const text = $(id).value.trim();
  if (!/^-?\d+$/.test(text)) throw new Error(`${label} must be a whole number`);
  return Number(text);
}

function taskArgs(name) {
  if (name === 'primes') return { limit: wholeNumber('primes-limit', 'Limit') };
  return { data: $('sha-data').value, rounds: wholeNumber('sha-rounds', 'Rounds') };
}

/** Seconds of hashing (2-3 s on one core of a 2020s server): long enough to chat meanwhile. */
const SLOW_TASK = { name: 'sha256', args: { data: 'slow', rounds: 10000000 } };

$('task-slow').addEventListener('click', () => runTask(SLOW_TASK.name, SLOW_TASK.args));

$('task-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const name = taskSelect.value;
  let args;
  try {
    args = taskArgs(name);
  } catch (err) {
    $('task-error').textContent = err.message; // nothing was sent: said once, here
    return;
  }
  runTask(name, args);
});

async function runTask(name, args) {
  const item = document.createElement('li');
  item.dataset.status = 'running';
  const label = document.createElement('span');
  label.textContent = `${name}(${Object.entries(args).map(([k, v]) => `${k}=${v}`).join(', ')}) `;
  const outcome = document.createElement('span');
  outcome.className = 'outcome';
  outcome.textContent = 'running…';
  item.append(label, outcome);
  appendToLog($('task-list'), item);
  $('task-error').textContent = '';

  const id = newId('task');
  requestIds.add(id);
  const started = performance.now();
  try {
    const reply = await client.task(name, args, { id });
    const ms = Math.round(performance.now() - started);
    const value = document.createElement('span');
    value.className = 'value';
    value.textContent = String(reply.value);
    outcome.replaceChildren('= ', value, ` in ${ms} ms`);
    item.dataset.status = 'done';
  } catch (err) {
    item.dataset.status = 'error';
    outcome.textContent = `failed: ${userText(err)}`; // in its own row, and only there
  } finally {
    requestIds.delete(id);
  }
}

// --- live server statistics --------------------------------------------------

const chart = new StatsChart($('stats-chart'), { conn: $('axis-conn'), rate: $('axis-rate') });
let lastSample = null;

function formatUptime(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

/** Said once, in place of the chart, when this server does not serve /stats here. */
const STATS_ELSEWHERE = 'Live statistics are not served to this page (HTTP 404): a server '
  + 'started with --internal-port serves /stats only on that port, for operators. '
  + 'The chat and tasks work as usual.';

async function pollStats() {
  try {
    const response = await fetch('/stats', { cache: 'no-store' });
    if (response.status === 404) {
      // Not a passing failure: asking every second would only fill the server's log.
      $('stats-error').textContent = STATS_ELSEWHERE;
      $('stats-error').classList.replace('error', 'detail');
      document.querySelector('#stats .chart-box').hidden = true;
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const stats = await response.json();
    const sample = { at: performance.now(), messages: stats.messages };
    const rate = messageRate(lastSample, sample);
    lastSample = sample;
    $('stat-connections').textContent = String(stats.connections);
    $('stat-rate').textContent = rate === null ? '–' : rate.toFixed(1);
    $('stat-users').textContent = String(stats.users);
    $('stat-rooms').textContent = String(stats.rooms);
    $('stat-tasks').textContent = String(stats.tasks_in_flight);
    $('stat-uptime').textContent = formatUptime(stats.uptime);
    $('stats-error').textContent = '';
    chart.push(stats.connections, rate);
  } catch (err) {
    lastSample = null;
    $('stats-error').textContent = `Statistics unavailable (${err.message}).`;
  }
  setTimeout(pollStats, STATS_EVERY_MS);
}

// --- start -------------------------------------------------------------------

demoTokensEnabled().then(() => {
  client.connect();
  joinRoom('lobby');
});
pollStats();

// For debugging from the console; the page itself does not rely on it.
window.wsDemo = { client };
