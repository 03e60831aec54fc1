// Unit tests for the browser client's pure decisions: node --test tests/js/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  BACKOFF_BASE_MS, BACKOFF_CAP_MS, SOON_MS, STABLE_MS, DEFAULT_MAX_QUEUE,
  backoffDelay, closeDecision, queueAccepts, attemptAfterClose, reconnectDelay,
  socketUrl, describeClose, tokenUsable, TOKEN_MARGIN_MS, WsClient, WsError,
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

// CONTRACT.md, "Close codes".
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
