// Unit tests for the browser client's pure decisions: node --test tests/js/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACKOFF_BASE_MS, BACKOFF_CAP_MS, SOON_MS, STABLE_MS, DEFAULT_MAX_QUEUE,
  backoffDelay, closeDecision, queueAccepts, attemptAfterClose, reconnectDelay,
  socketUrl, describeClose, tokenUsable, TOKEN_MARGIN_MS, WsClient, WsError,
  MAX_REFUSALS, healthProbe, refusalsAfter,
  streamUrls, chooseTransport, sendOutcome, SEND_RETRY_MS, websocketMisses,
  WS_MISSES_BEFORE_STREAMING,
} from '../../static/wsclient.js';

const justBelowOne = () => 1 - Number.EPSILON;

test('backoff window doubles from 0.5 s and stops at 20 s', () => {
  const windows = [0, 1, 2, 3, 4, 5, 6, 7, 50].map((n) => backoffDelay(n, justBelowOne));
  const expected = [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000];
  windows.forEach((got, i) => assert.ok(Math.abs(got - expected[i]) < 1e-6,
    `attempt ${i}: ${got} != ${expected[i]}`));
  assert.equal(BACKOFF_BASE_MS, 500);
  assert.equal(BACKOFF_CAP_MS, 20000);
});

test('backoff uses full jitter: the whole window, down to zero', () => {
  assert.equal(backoffDelay(5, () => 0), 0);
  assert.equal(backoffDelay(5, () => 0.5), 8000);
  assert.equal(backoffDelay(3, () => 0.25), 1000);
});

test('backoff with the real random source stays inside its window', () => {
  for (let attempt = 0; attempt < 12; attempt += 1) {
    const window = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
    for (let i = 0; i < 200; i += 1) {
      const delay = backoffDelay(attempt);
      assert.ok(delay >= 0 && delay < window, `attempt ${attempt}: ${delay}`);
    }
  }
});

test('backoff treats a negative attempt as the first and never overflows', () => {
  assert.equal(backoffDelay(-3, () => 0.5), 250);
  assert.equal(backoffDelay(10_000, () => 0.5), 10000);
});

test('"soon" reconnects (after 1001) wait under a second, whatever the attempt', () => {
  assert.equal(SOON_MS, 1000);
  assert.equal(reconnectDelay('soon', 9, () => 0.5), 500);
  assert.equal(reconnectDelay('backoff', 2, () => 0.5), 1000);
});

// docs/protocol.md, "Close codes".
const closeTable = [
  [1000, { action: 'stop' }],
  [1001, { action: 'reconnect', delay: 'soon', newToken: false }],
  [1006, { action: 'reconnect', delay: 'backoff', newToken: false }],
  [1008, { action: 'stop' }],
  [1009, { action: 'stop' }],
  [1011, { action: 'reconnect', delay: 'backoff', newToken: false }],
  [4001, { action: 'reconnect', delay: 'soon', newToken: true }],
  [4003, { action: 'stop' }],
  [4008, { action: 'reconnect', delay: 'backoff', newToken: false }],
  [4009, { action: 'reconnect', delay: 'backoff', newToken: false }],
  [4029, { action: 'reconnect', delay: 'backoff', newToken: false }],
  [4999, { action: 'reconnect', delay: 'backoff', newToken: false }],
];

for (const [code, expected] of closeTable) {
  test(`close code ${code} → ${expected.action} ${expected.delay || ''}`, () => {
    assert.deepEqual(closeDecision(code), expected);
  });
}

test('a second 4001 in a row (the new token failed too) backs off', () => {
  assert.deepEqual(closeDecision(4001, { previousCode: 4001 }),
    { action: 'reconnect', delay: 'backoff', newToken: true });
  assert.deepEqual(closeDecision(4001, { previousCode: 1006 }),
    { action: 'reconnect', delay: 'soon', newToken: true });
});

test('a close the user asked for stops, whatever the code', () => {
  for (const [code] of closeTable) {
    assert.deepEqual(closeDecision(code, { userClosed: true }), { action: 'stop' });
  }
});

test('every contract close code has a human description', () => {
  for (const [code] of closeTable.slice(0, -1)) {
    assert.doesNotMatch(describeClose(code), /^closed \(/, `code ${code}`);
  }
  assert.equal(describeClose(4999), 'closed (4999)');
});

test('the queue refuses the message that would exceed its bound', () => {
  assert.equal(queueAccepts(0, 3), true);
  assert.equal(queueAccepts(2, 3), true);
  assert.equal(queueAccepts(3, 3), false);
  assert.equal(queueAccepts(0, 0), false);
  assert.equal(DEFAULT_MAX_QUEUE, 20);
});

test('backoff restarts only after a connection that stayed up', () => {
  assert.equal(attemptAfterClose(6, null), 6); // never opened
  assert.equal(attemptAfterClose(6, 50), 6); // dropped right after welcome: keep backing off
  assert.equal(attemptAfterClose(6, STABLE_MS - 1), 6);
  assert.equal(attemptAfterClose(6, STABLE_MS), 0);
});

test('a token about to expire is not used for a new connection', () => {
  const now = 1_000_000_000_000; // ms
  assert.equal(tokenUsable(null, now), true); // expiry unknown: try it
  assert.equal(tokenUsable(now / 1000 + 60, now), true);
  assert.equal(tokenUsable(now / 1000 + TOKEN_MARGIN_MS / 1000 + 1, now), true);
  assert.equal(tokenUsable(now / 1000 + TOKEN_MARGIN_MS / 1000, now), false);
  assert.equal(tokenUsable(now / 1000 - 1, now), false);
});

test('socket URL follows the page: ws for http, wss for https, same host and port', () => {
  assert.equal(socketUrl({ protocol: 'http:', host: '127.0.0.1:8888' }), 'ws://127.0.0.1:8888/ws');
  assert.equal(socketUrl({ protocol: 'https:', host: 'example.com' }), 'wss://example.com/ws');
  assert.equal(socketUrl({ protocol: 'https:', host: 'example.com' }, '/chat'), 'wss://example.com/chat');
});

test('WsError carries the server code and retry_after', () => {
  const err = new WsError('rate_limited', 'slow down',
    { type: 'error', code: 'rate_limited', retry_after: 1.5, id: 'c3' });
  assert.equal(err.code, 'rate_limited');
  assert.equal(err.retryAfter, 1.5);
  assert.equal(err.reply.id, 'c3');
  assert.equal(new WsError('busy', 'full').retryAfter, null);
});

test('the client refuses to send before connect() and needs url and getToken', () => {
  assert.throws(() => new WsClient({ url: 'ws://x/ws' }), TypeError);
  const client = new WsClient({ url: 'ws://x/ws', getToken: async () => 't' });
  assert.equal(client.state, 'stopped');
  assert.throws(() => client.send({ type: 'ping' }), (err) => err.code === 'stopped');
});

// --- resuming rooms with history (docs/protocol.md "History and recovery") ------------------

import {
  joinMessage, acceptMessage, joinedOutcome, gapOutcome, CLOSE_CODES,
} from '../../static/wsclient.js';

const msgAt = (offset, epoch = 'e1', room = 'chat:1') =>
  ({ type: 'message', room, from: 'bob', data: `m${offset}`, offset, epoch });

test('a join asks for what was missed only when a position is known', () => {
  assert.deepEqual(joinMessage('lobby', undefined), { type: 'join', room: 'lobby' });
  assert.deepEqual(joinMessage('lobby', null), { type: 'join', room: 'lobby' });
  assert.deepEqual(joinMessage('chat:1', { epoch: 'e1', offset: 7 }),
    { type: 'join', room: 'chat:1', since: { offset: 7, epoch: 'e1' } });
  assert.deepEqual(joinMessage('chat:1', { epoch: 'e1', offset: 0 }).since, { offset: 0, epoch: 'e1' });
  assert.equal(joinMessage('chat:1', { epoch: 1, offset: 7 }).since, undefined); // malformed
});

test('messages at or below the last offset of the same epoch are dropped', () => {
  const at5 = { epoch: 'e1', offset: 5 };
  assert.deepEqual(acceptMessage(at5, msgAt(6)), { deliver: true, position: { epoch: 'e1', offset: 6 } });
  assert.deepEqual(acceptMessage(at5, msgAt(5)), { deliver: false, position: at5 });
  assert.deepEqual(acceptMessage(at5, msgAt(2)), { deliver: false, position: at5 });
  assert.deepEqual(acceptMessage(at5, msgAt(9)).position, { epoch: 'e1', offset: 9 }); // a gap: still new
  // A new epoch: the room's history was lost, offsets start over.
  assert.deepEqual(acceptMessage(at5, msgAt(1, 'e2')), { deliver: true, position: { epoch: 'e2', offset: 1 } });
  assert.deepEqual(acceptMessage(null, msgAt(3)).position, { epoch: 'e1', offset: 3 });
});

test('messages of rooms without history are always delivered and move nothing', () => {
  const plain = { type: 'message', room: 'lobby', from: 'bob', data: 'x' };
  assert.deepEqual(acceptMessage(null, plain), { deliver: true, position: null });
  assert.deepEqual(acceptMessage({ epoch: 'e', offset: 3 }, plain).position, { epoch: 'e', offset: 3 });
});

test('a recovered join delivers the missed messages once, in order', () => {
  const reply = { type: 'joined', room: 'chat:1', epoch: 'e1', offset: 8, recovered: true,
                  messages: [msgAt(7), msgAt(5), msgAt(6), msgAt(8)] };
  const outcome = joinedOutcome({ epoch: 'e1', offset: 5 }, reply, true);
  assert.equal(outcome.recovered, true);
  assert.deepEqual(outcome.messages.map((m) => m.offset), [6, 7, 8]);
  assert.deepEqual(outcome.position, { epoch: 'e1', offset: 8 });
});

test('a position never moves back past a live message already delivered', () => {
  const reply = { type: 'joined', room: 'chat:1', epoch: 'e1', offset: 6, recovered: true,
                  messages: [msgAt(6)] };
  const outcome = joinedOutcome({ epoch: 'e1', offset: 9 }, reply, true);
  assert.deepEqual(outcome.messages, []);
  assert.deepEqual(outcome.position, { epoch: 'e1', offset: 9 });
});

test('recovered false: nothing delivered, the position jumps to the top', () => {
  const reply = { type: 'joined', room: 'chat:1', epoch: 'e2', offset: 40, recovered: false,
                  messages: [] };
  assert.deepEqual(joinedOutcome({ epoch: 'e1', offset: 5 }, reply, true),
    { position: { epoch: 'e2', offset: 40 }, messages: [], recovered: false });
});

test('a plain join starts at the top; a room without history has no position', () => {
  const top = { type: 'joined', room: 'chat:1', epoch: 'e1', offset: 12 };
  assert.deepEqual(joinedOutcome(null, top, false),
    { position: { epoch: 'e1', offset: 12 }, messages: [], recovered: null });
  assert.deepEqual(joinedOutcome(null, { type: 'joined', room: 'lobby' }, false),
    { position: null, messages: [], recovered: null });
});

const gapAt = (offset, epoch = 'e1', room = 'chat:1') =>
  ({ type: 'gap', room, epoch, offset, recovered: false });

test('a gap moves the position to its offset and means messages were lost', () => {
  assert.deepEqual(gapOutcome({ epoch: 'e1', offset: 4 }, gapAt(9)),
    { position: { epoch: 'e1', offset: 9 }, lost: true });
  assert.deepEqual(gapOutcome({ epoch: 'e1', offset: 4 }, gapAt(0, 'e2')),
    { position: { epoch: 'e2', offset: 0 }, lost: true }); // new epoch: always a loss
  assert.deepEqual(gapOutcome(null, gapAt(3)),
    { position: { epoch: 'e1', offset: 3 }, lost: true });
});

test('a gap of dropped messages (a room without history) is a loss that moves nothing', () => {
  const position = { epoch: 'e1', offset: 9 };
  assert.deepEqual(gapOutcome(position, { type: 'gap', room: 'r', dropped: 3 }),
    { position, lost: true });
  assert.deepEqual(gapOutcome(null, { type: 'gap', room: 'r', dropped: 1 }),
    { position: null, lost: true });
  assert.deepEqual(gapOutcome(position, { type: 'gap', room: 'r', dropped: 0 }),
    { position, lost: false });
});

test('a recovery with "pending" keeps the position at the last message given', () => {
  // The rest follows as ordinary messages: they must not be dropped as repeats.
  const reply = { type: 'joined', room: 'chat:1', epoch: 'e1', offset: 9, recovered: true,
                  messages: [msgAt(6), msgAt(7)], pending: 2 };
  const outcome = joinedOutcome({ epoch: 'e1', offset: 5 }, reply, true);
  assert.deepEqual(outcome.position, { epoch: 'e1', offset: 7 });
  assert.equal(acceptMessage(outcome.position, msgAt(8)).deliver, true);
  const none = joinedOutcome({ epoch: 'e1', offset: 5 },
    { ...reply, messages: [], pending: 4 }, true);
  assert.deepEqual(none.position, { epoch: 'e1', offset: 5 });
});

test('a gap at or below what the client already has loses nothing', () => {
  const position = { epoch: 'e1', offset: 9 };
  assert.deepEqual(gapOutcome(position, gapAt(9)), { position, lost: false });
  assert.deepEqual(gapOutcome(position, gapAt(2)), { position, lost: false });
  assert.deepEqual(gapOutcome(position, { type: 'gap', room: 'chat:1' }), { position, lost: false });
});

test('the close-code table says what the client does for every code', () => {
  const actions = { never: 'stop', fix_client: 'stop', soon: 'reconnect', backoff: 'reconnect',
                    new_token: 'reconnect' };
  for (const [code, entry] of Object.entries(CLOSE_CODES)) {
    assert.equal(closeDecision(Number(code)).action, actions[entry.reconnect], `code ${code}`);
    assert.equal(describeClose(Number(code)), entry.text);
  }
  assert.equal(closeDecision(4001).newToken, true);
  assert.equal(closeDecision(1002).action, 'stop');
});

test('1012 (a paced restart) reconnects with backoff and jitter, never at once', () => {
  assert.equal(CLOSE_CODES[1012].reconnect, 'backoff');
  assert.equal(describeClose(1012), 'server restarting');
  assert.deepEqual(closeDecision(1012), { action: 'reconnect', delay: 'backoff', newToken: false });
  // Full jitter: each client picks its own moment in the window.
  const delays = [0, 0.25, 0.5, 0.99].map((r) => reconnectDelay('backoff', 0, () => r));
  assert.deepEqual(delays, [0, 125, 250, 495]);
});

// --- the client over a scripted socket ---------------------------------------------------

/** A WebSocket stand-in: records what the client sends; the test plays the server. */
class ScriptedSocket {
  static last = null;
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 1;
    this.sent = [];
    ScriptedSocket.last = this;
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code = 1000) { this.readyState = 3; this.onclose?.({ code, reason: '' }); }
  receive(msg) { this.onmessage({ data: JSON.stringify(msg) }); }
  drop(code = 1006) { this.readyState = 3; this.onclose({ code, reason: '' }); }
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

async function connected(client) {
  client.connect();
  await tick(); // getToken()
  const ws = ScriptedSocket.last;
  ws.receive({ type: 'welcome', user: 'alice', expires_at: Date.now() / 1000 + 3600, limits: {} });
  return ws;
}

function newClient(extra = {}) {
  // probe: never a real request from a unit test ("cannot tell": the old behaviour).
  return new WsClient({ url: 'ws://x/ws', getToken: async () => 'tok', WebSocket: ScriptedSocket,
                        random: () => 0, probe: async () => null, ...extra });
}

test('after a reconnect the client re-joins with since, and drops repeats', async () => {
  const failed = [];
  const client = newClient({ onRecoveryFailed: (room) => failed.push(room) });
  const delivered = [];
  const recoveries = [];
  client.addEventListener('message', (e) => { if (e.detail.type === 'message') delivered.push(e.detail.offset); });
  client.addEventListener('recovery', (e) => recoveries.push(e.detail));
  let ws = await connected(client);
  const joining = client.join('chat:1');
  const join = ws.sent.at(-1);
  assert.deepEqual({ ...join, id: undefined }, { type: 'join', room: 'chat:1', id: undefined });
  ws.receive({ type: 'joined', room: 'chat:1', epoch: 'e1', offset: 2, id: join.id });
  await joining;
  ws.receive(msgAt(3));
  ws.receive(msgAt(3)); // a repeat
  ws.drop(1006);
  await new Promise((resolve) => setTimeout(resolve, 5)); // backoff with random() = 0
  ws = await connected(client);
  const rejoin = ws.sent.find((m) => m.type === 'join');
  assert.deepEqual(rejoin.since, { offset: 3, epoch: 'e1' });
  ws.receive(msgAt(6)); // live, before the reply: held, then dropped as a repeat of the recovered 6
  ws.receive({ type: 'joined', room: 'chat:1', epoch: 'e1', offset: 6, recovered: true,
               messages: [msgAt(4), msgAt(5), msgAt(6)], id: rejoin.id });
  ws.receive(msgAt(7));
  assert.deepEqual(delivered, [3, 4, 5, 6, 7]);
  assert.deepEqual(recoveries, [{ room: 'chat:1', recovered: true, missed: 3 }]);
  assert.deepEqual(failed, []);
  client.close();
});

test('a re-join that cannot recover tells the application', async () => {
  const failed = [];
  const client = newClient({ onRecoveryFailed: (room) => failed.push(room) });
  let ws = await connected(client);
  const joining = client.join('chat:1');
  ws.receive({ type: 'joined', room: 'chat:1', epoch: 'e1', offset: 4, id: ws.sent.at(-1).id });
  await joining;
  ws.drop(1001);
  await new Promise((resolve) => setTimeout(resolve, 5));
  ws = await connected(client);
  const rejoin = ws.sent.find((m) => m.type === 'join');
  ws.receive({ type: 'joined', room: 'chat:1', epoch: 'e2', offset: 1, recovered: false,
               messages: [], id: rejoin.id });
  assert.deepEqual(failed, ['chat:1']);
  assert.deepEqual(client.positions.get('chat:1'), { epoch: 'e2', offset: 1 });
  client.close();
});

test('forbidden: join() rejects and the room is not re-joined; left with a reason drops it',
  async () => {
    const client = newClient();
    const left = [];
    client.addEventListener('left', (e) => left.push(e.detail));
    const ws = await connected(client);
    const joining = client.join('dm:bob:carol');
    ws.receive({ type: 'error', code: 'forbidden', message: 'not granted', id: ws.sent.at(-1).id });
    await assert.rejects(joining, (err) => err.code === 'forbidden');
    assert.equal(client.rooms.has('dm:bob:carol'), false);
    const joiningLobby = client.join('lobby');
    ws.receive({ type: 'joined', room: 'lobby', id: ws.sent.at(-1).id });
    await joiningLobby;
    ws.receive({ type: 'left', room: 'lobby', reason: 'forbidden' });
    assert.deepEqual(left, [{ room: 'lobby', reason: 'forbidden' }]);
    assert.equal(client.rooms.size, 0);
    client.close();
  });

test('a refused publish is reported with its room; unavailable is retryable', async () => {
  const client = newClient();
  const refused = [];
  client.addEventListener('publish_error', (e) => refused.push(e.detail));
  const ws = await connected(client);
  const id = client.publish('user:bob', 'hi');
  ws.receive({ type: 'error', code: 'forbidden', message: 'only the server publishes here', id });
  const id2 = client.publish('chat:1', 'hi');
  ws.receive({ type: 'error', code: 'unavailable', message: 'broker down', id: id2 });
  assert.deepEqual(refused.map((r) => [r.room, r.error.code]),
    [['user:bob', 'forbidden'], ['chat:1', 'unavailable']]);
  client.close();
});

test('a publish with an idempotency key sends it; a repeat is answered "published"', async () => {
  const client = newClient();
  const answered = [];
  client.addEventListener('published', (e) => answered.push(e.detail));
  const ws = await connected(client);
  const id = client.publish('chat:1', 'hi', { idempotencyKey: 'k1' });
  assert.deepEqual(ws.sent.at(-1), { type: 'publish', room: 'chat:1', data: 'hi',
                                     idempotency_key: 'k1', id });
  assert.equal(client.publishes.get(id).room, 'chat:1');
  ws.receive({ type: 'published', room: 'chat:1', duplicate: true, offset: 3, epoch: 'e', id });
  assert.deepEqual(answered, [{ type: 'published', room: 'chat:1', duplicate: true, offset: 3,
                                epoch: 'e', id }]);
  assert.equal(client.publishes.has(id), false);
  client.close();
});

test('every publish gets a key of its own, unique to the client', async () => {
  const first = newClient();
  const ws = await connected(first);
  first.publish('chat:1', 'a');
  first.publish('chat:1', 'b');
  const [a, b] = ws.sent.slice(-2).map((m) => m.idempotency_key);
  assert.match(a, /^[0-9a-f]{16}\.1$/);
  assert.equal(b, `${a.split('.')[0]}.2`);
  const second = newClient();
  const ws2 = await connected(second);
  second.publish('chat:1', 'a');
  assert.notEqual(ws2.sent.at(-1).idempotency_key.split('.')[0], a.split('.')[0]);
  const plain = newClient({ resendPublishes: false });
  const ws3 = await connected(plain);
  plain.publish('chat:1', 'a');
  assert.equal('idempotency_key' in ws3.sent.at(-1), false);
  for (const client of [first, second, plain]) client.close();
});

test('a publish the dropped connection left unconfirmed is sent again, with its key', async () => {
  const client = newClient();
  const refused = [];
  client.addEventListener('publish_error', (e) => refused.push(e.detail));
  let ws = await connected(client);
  const joining = client.join('chat:1');
  ws.receive({ type: 'joined', room: 'chat:1', id: ws.sent.at(-1).id });
  await joining;
  const confirmed = client.publish('chat:1', 'confirmed');
  ws.receive({ type: 'message', room: 'chat:1', from: 'alice', data: 'confirmed', id: confirmed });
  const lost = client.publish('chat:1', 'in flight');
  const sent = ws.sent.at(-1);
  ws.drop(1006);
  const queuedMeanwhile = client.publish('chat:1', 'while away');
  await new Promise((resolve) => setTimeout(resolve, 5)); // backoff with random() = 0
  ws = await connected(client);
  // The re-join first, then the unconfirmed publish as it was, then what was queued.
  assert.deepEqual(ws.sent.map((m) => m.type), ['join', 'publish', 'publish']);
  assert.deepEqual(ws.sent[1], sent);
  assert.equal(ws.sent[1].id, lost);
  assert.equal(ws.sent[2].id, queuedMeanwhile);
  // It had gone through: the server answers the repeat "published".
  ws.receive({ type: 'published', room: 'chat:1', duplicate: true, id: lost });
  ws.receive({ type: 'message', room: 'chat:1', from: 'alice', data: 'while away',
               id: queuedMeanwhile });
  assert.equal(client.publishes.size, 0);
  assert.deepEqual(refused, []);
  client.close();
});

test('without keys, or when the client stops, an unconfirmed publish is a publish_error', async () => {
  const plain = newClient({ resendPublishes: false });
  const refused = [];
  plain.addEventListener('publish_error', (e) => refused.push([e.detail.room, e.detail.error.code]));
  let ws = await connected(plain);
  plain.publish('chat:1', 'in flight');
  ws.drop(1006);
  assert.deepEqual(refused, [['chat:1', 'disconnected']]);
  await new Promise((resolve) => setTimeout(resolve, 5));
  ws = await connected(plain);
  assert.deepEqual(ws.sent.filter((m) => m.type === 'publish'), []);
  plain.close();
  const keyed = newClient();
  keyed.addEventListener('publish_error', (e) => refused.push([e.detail.room, e.detail.error.code]));
  ws = await connected(keyed);
  keyed.publish('chat:2', 'in flight');
  ws.drop(4003); // disconnected by the server: the client stops
  assert.deepEqual(refused.at(-1), ['chat:2', 'stopped']);
  assert.equal(keyed.publishes.size, 0);
  ws = await connected(keyed);
  keyed.publish('chat:3', 'unconfirmed');
  keyed.close(); // by the app
  assert.deepEqual(refused.at(-1), ['chat:3', 'stopped']);
  assert.equal(keyed.publishes.size, 0);
});

test('user_joined, user_left and presence are events of their own', async () => {
  const client = newClient();
  const seen = [];
  for (const type of ['user_joined', 'user_left', 'presence']) {
    client.addEventListener(type, (e) => seen.push([type, e.detail.user || e.detail.users]));
  }
  const ws = await connected(client);
  ws.receive({ type: 'user_joined', room: 'chat:1', user: 'bob' });
  ws.receive({ type: 'user_left', room: 'chat:1', user: 'bob' });
  const asking = client.presence('chat:1');
  ws.receive({ type: 'presence', room: 'chat:1', users: ['alice'], connections: 1,
               id: ws.sent.at(-1).id });
  assert.deepEqual((await asking).users, ['alice']);
  assert.deepEqual(seen, [['user_joined', 'bob'], ['user_left', 'bob'], ['presence', ['alice']]]);
  client.close();
});

test('a gap for a live member reports the loss; what follows it is delivered', async () => {
  const failed = [];
  const client = newClient({ onRecoveryFailed: (room, reply) => failed.push([room, reply.type]) });
  const delivered = [];
  const recoveries = [];
  client.addEventListener('message', (e) => delivered.push([e.detail.type, e.detail.offset]));
  client.addEventListener('recovery', (e) => recoveries.push(e.detail));
  const ws = await connected(client);
  const joining = client.join('chat:1');
  ws.receive({ type: 'joined', room: 'chat:1', epoch: 'e1', offset: 2, id: ws.sent.at(-1).id });
  await joining;
  delivered.length = 0;
  ws.receive(msgAt(3));
  ws.receive(gapAt(7)); // 4 to 7 lost on the server
  ws.receive(msgAt(8));
  ws.receive(gapAt(8)); // nothing the client lacks: dropped
  ws.receive(gapAt(1, 'e2')); // history lost: new epoch, starting above 1
  ws.receive(msgAt(2, 'e2'));
  ws.receive(gapAt(5, 'e1', 'lobby')); // a room the client is not in: ignored
  assert.deepEqual(delivered, [['message', 3], ['gap', 7], ['message', 8], ['gap', 1],
                               ['message', 2]]);
  assert.deepEqual(recoveries, [{ room: 'chat:1', recovered: false, missed: 0 },
                                { room: 'chat:1', recovered: false, missed: 0 }]);
  assert.deepEqual(failed, [['chat:1', 'gap'], ['chat:1', 'gap']]);
  assert.deepEqual(client.positions.get('chat:1'), { epoch: 'e2', offset: 2 });
  client.close();
});

test('a gap during a recovering re-join is reported after the recovered messages', async () => {
  const client = newClient();
  const events = [];
  client.addEventListener('message', (e) => {
    if (e.detail.type !== 'welcome') events.push([e.detail.type, e.detail.offset ?? null]);
  });
  client.addEventListener('recovery', (e) => events.push(['recovery', e.detail.recovered]));
  let ws = await connected(client);
  const joining = client.join('chat:1');
  ws.receive({ type: 'joined', room: 'chat:1', epoch: 'e1', offset: 4, id: ws.sent.at(-1).id });
  await joining;
  ws.drop(1006);
  await new Promise((resolve) => setTimeout(resolve, 5));
  ws = await connected(client);
  events.length = 0;
  const rejoin = ws.sent.find((m) => m.type === 'join');
  ws.receive(gapAt(9)); // held with the join
  ws.receive(msgAt(10));
  ws.receive({ type: 'joined', room: 'chat:1', epoch: 'e1', offset: 6, recovered: true,
               messages: [msgAt(5), msgAt(6)], id: rejoin.id });
  assert.deepEqual(events, [
    ['recovery', true], ['joined', 6], ['message', 5], ['message', 6],
    ['recovery', false], ['gap', 9], ['message', 10],
  ]);
  assert.deepEqual(client.positions.get('chat:1'), { epoch: 'e1', offset: 10 });
  client.close();
});

// --- a server that is up but refuses the handshake (its origin check) -----------------

/** A socket whose handshake fails: no open event, then a close with 1006, as a 403 gives. */
class RefusedSocket {
  static made = 0;
  constructor() {
    RefusedSocket.made += 1;
    this.readyState = 0;
    setImmediate(() => { this.readyState = 3; this.onclose({ code: 1006, reason: '' }); });
  }
  send() { throw new Error('never open'); }
  close() {}
}

/** Waits (a bounded number of turns) until the client's state is `state`. */
async function until(client, state, turns = 500) {
  for (let i = 0; i < turns && client.state !== state; i += 1) {
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  return client.state;
}

test('refused handshakes: counted only while the server answers its health check', () => {
  assert.equal(refusalsAfter(0, true), 1);
  assert.equal(refusalsAfter(3, true), 4);
  assert.equal(refusalsAfter(3, false), 0); // a 502 from the proxy: the server is away
  assert.equal(refusalsAfter(3, null), 0); // unreachable, or the answer is hidden
});

test('a server that is up and keeps refusing the handshake stops the client, saying so', async () => {
  RefusedSocket.made = 0;
  const states = [];
  const client = newClient({ WebSocket: RefusedSocket, probe: async () => true });
  client.addEventListener('state', (e) => states.push(e.detail));
  client.connect();
  assert.equal(await until(client, 'stopped'), 'stopped');
  assert.equal(RefusedSocket.made, MAX_REFUSALS);
  const last = states.at(-1);
  assert.equal(last.refused, true);
  assert.equal(last.code, 1006);
  assert.match(last.reason, /refused before opening, 5 times in a row/);
  // connect() starts over (say, after the server's --allowed-origins was fixed).
  client.connect();
  assert.equal(await until(client, 'stopped'), 'stopped');
  assert.equal(RefusedSocket.made, 2 * MAX_REFUSALS);
});

test('a server that is away is retried for as long as it takes', async () => {
  RefusedSocket.made = 0;
  const client = newClient({ WebSocket: RefusedSocket, probe: async () => null });
  client.connect();
  for (let i = 0; i < 2000 && RefusedSocket.made < 3 * MAX_REFUSALS; i += 1) {
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  assert.ok(RefusedSocket.made >= 3 * MAX_REFUSALS, `${RefusedSocket.made} tries`);
  assert.notEqual(client.state, 'stopped');
  client.close();
});

test('getToken() rejecting with a final error stops instead of retrying', async () => {
  const refusal = Object.assign(new Error('this origin is not allowed'), { final: true });
  const client = newClient({ getToken: async () => { throw refusal; } });
  const states = [];
  client.addEventListener('state', (e) => states.push(e.detail));
  client.connect();
  assert.equal(await until(client, 'stopped'), 'stopped');
  assert.deepEqual(states.at(-1), { state: 'stopped', code: null, refused: true,
                                    reason: 'this origin is not allowed' });
});

test('the health probe asks /healthz of the socket URL\'s server', async () => {
  const asked = [];
  const fake = (answer) => async (url) => { asked.push(String(url)); return answer; };
  assert.equal(await healthProbe('wss://a.example/app/ws', fake({ ok: true })), true);
  assert.equal(await healthProbe('ws://127.0.0.1:8888/ws', fake({ ok: false })), false);
  assert.equal(await healthProbe('ws://x/ws', async () => { throw new TypeError('down'); }), null);
  assert.equal(await healthProbe('ws://x/ws', null), null); // no fetch() at all
  assert.deepEqual(asked, ['https://a.example/healthz', 'http://127.0.0.1:8888/healthz']);
});

test('rpc resolves with the result data; a join with a subscription token re-joins with it', async () => {
  const client = newClient();
  let ws = await connected(client);
  const calling = client.rpc('orders.list', { page: 2 });
  const call = ws.sent.at(-1);
  assert.deepEqual({ ...call, id: undefined },
    { type: 'rpc', method: 'orders.list', data: { page: 2 }, id: undefined });
  ws.receive({ type: 'rpc_result', data: [1, 2], id: call.id });
  assert.deepEqual(await calling, [1, 2]);
  const refused = client.rpc('nope');
  ws.receive({ type: 'error', code: 'unknown_type', message: 'rpc is not enabled', id: ws.sent.at(-1).id });
  await assert.rejects(refused, (err) => err.code === 'unknown_type');

  const joining = client.join('team:7', { token: 'sub.jwt.x' });
  const join = ws.sent.at(-1);
  assert.equal(join.token, 'sub.jwt.x');
  ws.receive({ type: 'joined', room: 'team:7', id: join.id });
  await joining;
  ws.drop(1006);
  await new Promise((resolve) => setTimeout(resolve, 5));
  ws = await connected(client);
  const rejoin = ws.sent.find((m) => m.type === 'join');
  assert.deepEqual({ ...rejoin, id: undefined },
    { type: 'join', room: 'team:7', token: 'sub.jwt.x', id: undefined });
  client.close();
});

// --- HTTP streaming: the fallback (issue 22) -----------------------------------------------

test('stream URLs sit next to the WebSocket URL, same host, http for ws and https for wss', () => {
  assert.deepEqual(streamUrls('ws://h:8888/ws'), {
    ticket: 'http://h:8888/auth/ticket', stream: 'http://h:8888/sse', send: 'http://h:8888/sse/send',
  });
  assert.deepEqual(streamUrls('wss://example.com/realtime/ws'), {
    ticket: 'https://example.com/realtime/auth/ticket',
    stream: 'https://example.com/realtime/sse',
    send: 'https://example.com/realtime/sse/send',
  });
});

// [state, expected transport]
const transportTable = [
  [{}, 'websocket'],
  [{ wsBlocked: true }, 'sse'],
  [{ preference: 'websocket', wsBlocked: true }, 'websocket'],
  [{ preference: 'sse' }, 'sse'],
  [{ hasWebSocket: false }, 'sse'],
  [{ hasEventSource: false, wsBlocked: true }, 'websocket'],
];

for (const [state, expected] of transportTable) {
  test(`transport for ${JSON.stringify(state)} → ${expected}`, () => {
    assert.equal(chooseTransport(state), expected);
  });
}

test('a WebSocket is taken for blocked only after misses while the server answered', () => {
  assert.equal(WS_MISSES_BEFORE_STREAMING, 2);
  let misses = 0;
  misses = websocketMisses(misses, { reached: false, serverAnswered: true });
  assert.equal(misses, 1);
  // The server was down: the socket is not to blame, start over.
  assert.equal(websocketMisses(misses, { reached: false, serverAnswered: false }), 0);
  // A socket that opened: start over.
  assert.equal(websocketMisses(misses, { reached: true, serverAnswered: true }), 0);
  assert.equal(websocketMisses(misses, { reached: false, serverAnswered: true }), 2);
});

test('a send refused over HTTP means what the same failure means over a WebSocket', () => {
  assert.deepEqual(sendOutcome(202), { action: 'sent' });
  assert.deepEqual(sendOutcome(503, '3'), { action: 'retry', delay: 3000 });
  assert.deepEqual(sendOutcome(503, null), { action: 'retry', delay: SEND_RETRY_MS });
  assert.deepEqual(sendOutcome(413), { action: 'close', code: 1009, reason: 'message too big' });
  assert.deepEqual(sendOutcome(404), { action: 'close', code: 1006, reason: 'stream closed' });
  assert.equal(sendOutcome(415).code, 1008);
  assert.equal(sendOutcome(403).code, 1008);
  assert.equal(closeDecision(sendOutcome(413).code).action, 'stop');
  assert.equal(closeDecision(sendOutcome(404).code).action, 'reconnect');
});

/** An EventSource stand-in: the test plays the server's events. */
class ScriptedSource {
  static all = [];
  constructor(url) {
    this.url = url;
    this.closed = false;
    ScriptedSource.all.push(this);
  }
  static get last() { return ScriptedSource.all.at(-1); }
  open() { this.onopen?.(); }
  emit(msg) { this.onmessage?.({ data: JSON.stringify(msg) }); }
  fail() { this.onerror?.(); }
  close() { this.closed = true; }
}

/**
 * fetch() for /auth/ticket and /sse/send: records calls; answers from queues,
 * else 200/202. `probe` is the client's health probe: true while the server is
 * up, null once `down` is set (as healthProbe answers); `probes` counts it.
 */
function scriptedFetch() {
  const calls = [];
  const answers = { ticket: [], send: [] };
  let tickets = 0;
  const net = { down: false, probes: 0 };
  net.probe = async () => { net.probes += 1; return net.down ? null : true; };
  const fetcher = async (url, init) => {
    const kind = url.endsWith('/auth/ticket') ? 'ticket' : 'send';
    calls.push({ kind, url, init, body: init.body === undefined ? undefined : JSON.parse(init.body) });
    const answer = answers[kind].shift()
      || (kind === 'ticket' ? { status: 200, body: { ticket: `tk${++tickets}`, expires_in: 30 } }
        : { status: 202, body: {} });
    return {
      status: answer.status,
      ok: answer.status >= 200 && answer.status < 300,
      json: async () => answer.body || {},
      headers: { get: (name) => (answer.headers || {})[name] ?? null },
    };
  };
  return Object.assign(net, {
    fetcher, calls, answers, sends: () => calls.filter((c) => c.kind === 'send'),
  });
}

/** A WebSocket that never gets through: it closes with 1006 without opening. */
class UnreachableSocket {
  static made = 0;
  constructor() {
    UnreachableSocket.made += 1;
    this.readyState = 0;
    setImmediate(() => { this.readyState = 3; this.onclose?.({ code: 1006, reason: '' }); });
  }
  close() {}
}

class ThrowingSocket {
  constructor() { throw new Error('WebSocket is blocked here'); }
}

const settle = async (n = 5) => { for (let i = 0; i < n; i += 1) await tick(); };
/** Past a reconnect's timer (random() is 0: its delay is 0), then settled. */
const afterReconnect = async () => {
  await new Promise((resolve) => setTimeout(resolve, 5));
  await settle(10);
};

function streamingClient(extra = {}) {
  const net = scriptedFetch();
  const tokens = [];
  const client = new WsClient({
    url: 'ws://x/ws',
    getToken: async () => { tokens.push(`tok${tokens.length + 1}`); return tokens.at(-1); },
    WebSocket: ThrowingSocket, EventSource: ScriptedSource, fetch: net.fetcher,
    probe: net.probe, random: () => 0, ...extra,
  });
  const states = [];
  client.addEventListener('state', (e) => states.push(e.detail));
  return { client, net, tokens, states };
}

/** The stream answers: open, then the welcome naming session `session`. */
function welcome(source, session = 'tag12345.s1') {
  source.open();
  source.emit({ type: 'welcome', user: 'alice', expires_at: Date.now() / 1000 + 3600,
                limits: {}, session });
}

test('a WebSocket that throws: the client streams, with a ticket, never the token in a URL',
  async () => {
    const { client, net, tokens, states } = streamingClient();
    client.connect();
    await settle();
    const [ticketCall] = net.calls;
    assert.equal(ticketCall.url, 'http://x/auth/ticket');
    assert.equal(ticketCall.init.method, 'POST');
    assert.equal(ticketCall.init.headers.Authorization, `Bearer ${tokens[0]}`);
    const source = ScriptedSource.last;
    assert.equal(source.url, 'http://x/sse?ticket=tk1');
    assert.ok(!source.url.includes(tokens[0]));
    welcome(source);
    assert.equal(client.state, 'open');
    assert.equal(client.transport, 'sse');
    assert.equal(states.at(-1).transport, 'sse');

    const echo = client.request({ type: 'echo', data: 1, id: 'e1' });
    await settle();
    const [send] = net.sends();
    assert.equal(send.url, 'http://x/sse/send');
    assert.equal(send.init.headers['X-Session'], 'tag12345.s1');
    assert.equal(send.init.headers['Content-Type'], 'application/json');
    assert.deepEqual(send.body, { type: 'echo', data: 1, id: 'e1' });
    source.emit({ type: 'echo', data: 1, id: 'e1' });
    assert.deepEqual(await echo, { type: 'echo', data: 1, id: 'e1' });
    client.close();
    assert.equal(source.closed, true);
  });

test('messages go out one POST at a time, in order; a 503 is sent again after Retry-After',
  async () => {
    const { client, net } = streamingClient();
    client.connect();
    await settle();
    welcome(ScriptedSource.last);
    net.answers.send.push({ status: 503, headers: { 'Retry-After': '0.01' } });
    client.send({ type: 'echo', data: 'a' });
    client.send({ type: 'echo', data: 'b' });
    await new Promise((resolve) => setTimeout(resolve, 40));
    await settle();
    assert.deepEqual(net.sends().map((c) => c.body.data), ['a', 'a', 'b']);
    client.close();
  });

test('the close event ends the stream with its code: 4001 gets a new token, then a new ticket',
  async () => {
    const { client, net, tokens, states } = streamingClient();
    client.connect();
    await settle();
    const first = ScriptedSource.last;
    welcome(first);
    first.emit({ type: 'close', code: 4001, reason: 'token expired' });
    assert.equal(first.closed, true); // never reconnected by EventSource itself
    assert.equal(states.find((s) => s.state === 'waiting').code, 4001);
    await afterReconnect();
    assert.deepEqual(tokens, ['tok1', 'tok2']);
    assert.equal(net.calls.filter((c) => c.kind === 'ticket').length, 2);
    assert.notEqual(ScriptedSource.last, first);
    assert.equal(ScriptedSource.last.url, 'http://x/sse?ticket=tk2');
    client.close();
  });

test('a refused ticket is 4001; a stream that fails without its close event is 1006',
  async () => {
    const { client, net, states } = streamingClient();
    net.answers.ticket.push({ status: 401, body: { error: 'unauthorized', message: 'token expired' } });
    client.connect();
    await settle();
    assert.deepEqual(states.find((s) => s.state === 'waiting'),
      { state: 'waiting', code: 4001, reason: 'token expired', delay: 0, attempt: 0 });
    await afterReconnect();
    const source = ScriptedSource.last;
    welcome(source);
    source.fail();
    assert.equal(states.at(-1).state, 'waiting');
    assert.equal(states.at(-1).code, 1006);
    client.close();
  });

test('a message over the server\'s size stops the client as 1009 does over a WebSocket',
  async () => {
    const { client, net, states } = streamingClient();
    client.connect();
    await settle();
    welcome(ScriptedSource.last);
    net.answers.send.push({ status: 413 });
    client.send({ type: 'echo', data: 'x'.repeat(100) });
    await settle();
    assert.deepEqual(states.at(-1), { state: 'stopped', code: 1009, reason: 'message too big' });
  });

test('a send to a stream that is gone (404) reconnects and re-joins with since', async () => {
  const { client, net } = streamingClient();
  client.connect();
  await settle();
  let source = ScriptedSource.last;
  welcome(source);
  const joining = client.join('chat:1');
  await settle();
  source.emit({ type: 'joined', room: 'chat:1', epoch: 'e1', offset: 4, id: net.sends()[0].body.id });
  await joining;
  net.answers.send.push({ status: 404 });
  client.send({ type: 'ping' });
  await settle();
  await afterReconnect();
  source = ScriptedSource.last;
  welcome(source, 'tag12345.s2');
  await settle();
  const rejoin = net.sends().at(-1);
  assert.equal(rejoin.init.headers['X-Session'], 'tag12345.s2');
  assert.deepEqual(rejoin.body.since, { offset: 4, epoch: 'e1' });
  client.close();
});

test('auto: a WebSocket that misses a server that answers HTTP twice: streams from then on',
  async () => {
    UnreachableSocket.made = 0;
    const { client, net, states } = streamingClient({ WebSocket: UnreachableSocket });
    client.connect();
    await settle(10);
    assert.equal(states.find((s) => s.state === 'waiting').code, 1006);
    await afterReconnect();
    await afterReconnect();
    assert.equal(UnreachableSocket.made, 2);
    assert.equal(net.probes, 2);
    const source = ScriptedSource.last;
    assert.equal(source.url, 'http://x/sse?ticket=tk1');
    welcome(source);
    assert.equal(client.transport, 'sse');
    assert.equal(client.wsBlocked, true);
    source.emit({ type: 'close', code: 1001, reason: 'server shutting down' });
    await afterReconnect();
    assert.equal(UnreachableSocket.made, 2); // known blocked: not tried again
    assert.notEqual(ScriptedSource.last, source);
    client.close();
  });

test('auto: while the server is down a missed WebSocket is not taken for blocked', async () => {
  UnreachableSocket.made = 0;
  const sources = ScriptedSource.all.length;
  const { client, net } = streamingClient({ WebSocket: UnreachableSocket });
  net.down = true;
  client.connect();
  for (let n = 0; n < 4; n += 1) await afterReconnect();
  assert.ok(UnreachableSocket.made >= 3);
  assert.equal(client.wsBlocked, false);
  assert.equal(ScriptedSource.all.length, sources); // never streamed
  client.close();
});

test('transport "websocket" never streams; "sse" never opens a WebSocket', async () => {
  UnreachableSocket.made = 0;
  const sources = ScriptedSource.all.length;
  const ws = streamingClient({ WebSocket: UnreachableSocket, transport: 'websocket' });
  ws.client.connect();
  await settle(10);
  await afterReconnect();
  assert.ok(UnreachableSocket.made >= 2);
  assert.equal(ScriptedSource.all.length, sources);
  ws.client.close();

  UnreachableSocket.made = 0;
  const sse = streamingClient({ WebSocket: UnreachableSocket, transport: 'sse' });
  sse.client.connect();
  await settle();
  welcome(ScriptedSource.last);
  assert.equal(UnreachableSocket.made, 0);
  assert.equal(sse.client.transport, 'sse');
  sse.client.close();
  assert.throws(() => newClient({ transport: 'carrier-pigeon' }), TypeError);
});
