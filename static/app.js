// app.js: the demo page. All server data is written with textContent, never as HTML.
import { WsClient, WsError, socketUrl } from './wsclient.js';
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

/**
 * getToken() for the client: a demo token for the chosen name, or, when the
 * server has no demo endpoint (404), whatever the user pastes.
 */
async function getToken() {
  if (pastedToken) {
    const token = pastedToken;
    pastedToken = null;
    return token;
  }
  const response = await fetch('/auth/demo-token', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ user: userName }),
    cache: 'no-store',
  });
  if (response.status === 404) return askForToken();
  if (!response.ok) throw new Error(`demo token refused: HTTP ${response.status}`);
  const body = await response.json();
  return body.token;
}

function askForToken() {
  $('token-form').hidden = false;
  $('conn-detail').textContent = 'Waiting for a token: paste one below.';
  return new Promise((resolve) => { waitingForPaste = resolve; });
}

// --- the client ------------------------------------------------------------

const client = new WsClient({ url: socketUrl(window.location), getToken });
/** Ids of publishes, so their error replies are shown under the chat. */
const publishIds = new Set();
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
      break;
    case 'waiting':
      badge.textContent = 'reconnecting…';
      $('conn-detail').textContent =
        `Closed${reason}. Next try in ${(detail.delay / 1000).toFixed(1)} s.`;
      break;
    default:
      badge.textContent = 'disconnected';
      $('conn-detail').textContent = `Stopped${reason}.`;
  }
});

client.addEventListener('welcome', ({ detail }) => {
  connectionsMade += 1;
  $('conn-count').textContent = String(connectionsMade);
  $('conn-user').textContent = detail.user;
  $('token-form').hidden = true;
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
      publishIds.delete(msg.id); // our own publish came back: delivered
      addChatLine(msg);
      break;
    case 'refreshed':
      refreshes += 1;
      $('conn-refreshes').textContent = String(refreshes);
      break;
    case 'error':
      showServerError(msg);
      break;
    default:
  }
});

function showServerError(msg) {
  if (requestIds.has(msg.id)) return;
  if (publishIds.has(msg.id)) {
    publishIds.delete(msg.id);
    if (msg.code === 'rate_limited') {
      holdSendButton(msg.retry_after);
    } else {
      $('chat-error').textContent = `Not sent (${msg.code}): ${msg.message}`;
    }
    return;
  }
  $('conn-error').textContent = `${msg.code}: ${msg.message}`;
}

/** After rate_limited: say how long to wait, and keep Send disabled that long. */
let sendHeldUntil = 0;
function holdSendButton(retryAfter) {
  const button = $('send-button');
  const until = Date.now() + (Number(retryAfter) || 1) * 1000;
  const ticking = sendHeldUntil > Date.now();
  sendHeldUntil = Math.max(sendHeldUntil, until); // several replies: the latest wait wins
  button.disabled = true;
  if (ticking) return;
  const tick = () => {
    const left = (sendHeldUntil - Date.now()) / 1000;
    if (left <= 0) {
      button.disabled = false;
      $('chat-error').textContent = '';
      return;
    }
    $('chat-error').textContent = `Rate limited: you can send again in ${left.toFixed(1)} s.`;
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
  userName = $('name-input').value.trim() || userName;
  sessionStorage.setItem('wsserver-demo-name', userName);
  restart();
});

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const token = $('token-input').value.trim();
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
    // restart (new name) is re-joined after it; other failures are final.
    if (err.code !== 'disconnected' && err.code !== 'stopped') client.rooms.delete(room);
    renderRooms();
    if (err.code === 'cancelled') return; // the user left it before the join went out
    $('chat-error').textContent = `Could not join ${room}: ${errorText(err)}`;
  } finally {
    requestIds.delete(id);
  }
}

async function leaveRoom(room) {
  try {
    await client.leave(room);
  } catch (err) {
    $('chat-error').textContent = `Could not leave ${room}: ${errorText(err)}`;
  }
  renderRooms();
}

$('join-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const room = $('room-input').value.trim();
  if (room) joinRoom(room);
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
    $('chat-error').textContent = `Not sent: ${errorText(err)}`;
    return;
  }
  publishIds.add(id);
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
  from.textContent = `${msg.from}: `;
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = typeof msg.data === 'string' ? msg.data : JSON.stringify(msg.data);
  item.append(room, from, text);
  appendToLog($('chat-log'), item);
}

function addSystemLine(text) {
  const item = document.createElement('li');
  item.className = 'system';
  item.textContent = text;
  appendToLog($('chat-log'), item);
}

function appendToLog(log, item) {
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
  log.append(item);
  while (log.children.length > 200) log.firstElementChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function errorText(err) {
  if (err instanceof WsError) {
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

/** A number when the field holds an integer, else the raw text (the server judges it). */
function integerOrText(value) {
  return /^\s*-?\d+\s*$/.test(value) ? Number(value) : value;
}

function taskArgs(name) {
  if (name === 'primes') return { limit: integerOrText($('primes-limit').value) };
  return { data: $('sha-data').value, rounds: integerOrText($('sha-rounds').value) };
}

$('task-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const name = taskSelect.value;
  const args = taskArgs(name);
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
    outcome.textContent = `failed: ${errorText(err)}`;
    $('task-error').textContent = `${name}: ${errorText(err)}`;
  } finally {
    requestIds.delete(id);
  }
});

// --- live server statistics --------------------------------------------------

const chart = new StatsChart($('stats-chart'));
let lastSample = null;

function formatUptime(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

async function pollStats() {
  try {
    const response = await fetch('/stats', { cache: 'no-store' });
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
  } finally {
    setTimeout(pollStats, STATS_EVERY_MS);
  }
}

// --- start -------------------------------------------------------------------

client.connect();
joinRoom('lobby');
pollStats();

// For debugging from the console; the page itself does not rely on it.
window.wsDemo = { client };
