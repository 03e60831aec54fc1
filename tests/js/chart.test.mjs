// Unit tests for the demo chart's pure functions: node --test tests/js/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  HISTORY, axisLabels, messageRate, niceCeiling, polylinePoints,
} from '../../static/chart.js';

test('message rate is the counter difference over elapsed time', () => {
  assert.equal(messageRate({ at: 1000, messages: 10 }, { at: 3000, messages: 50 }), 20);
  assert.equal(messageRate({ at: 0, messages: 7 }, { at: 500, messages: 7 }), 0);
});

test('message rate is unknown without a previous sample, a moving clock, or after a restart', () => {
  assert.equal(messageRate(null, { at: 1000, messages: 5 }), null);
  assert.equal(messageRate({ at: 1000, messages: 5 }, { at: 1000, messages: 9 }), null);
  // A new server starts its counter at 0 again.
  assert.equal(messageRate({ at: 1000, messages: 500 }, { at: 2000, messages: 3 }), null);
});

test('points: newest on the right edge, zero on the bottom margin, max on the top margin', () => {
  const points = polylinePoints([0, 5, 10], 300, 100, 10, 3).split(' ');
  assert.deepEqual(points, ['0.0,98.0', '150.0,50.0', '300.0,2.0']);
});

test('a short series is drawn at the right, in the slots of the latest samples', () => {
  const points = polylinePoints([1], 300, 100, 1, HISTORY);
  assert.equal(points, '300.0,2.0');
  assert.equal(polylinePoints([], 300, 100, 0), '');
});

test('an all-zero series sits flat on the bottom instead of dividing by zero', () => {
  assert.equal(polylinePoints([0, 0], 300, 100, 0, 2), '0.0,98.0 300.0,98.0');
});

test('negative values are clamped to the bottom', () => {
  assert.equal(polylinePoints([-4], 10, 100, 1, 1), '0.0,98.0');
});

test('the scale tops at 1, 2 or 5 times a power of ten, at least 1', () => {
  const cases = [[0, 1], [-3, 1], [0.4, 1], [1, 1], [1.1, 2], [3, 5], [5, 5], [7, 10],
                 [10, 10], [11, 20], [30.000000000000004, 50], [999, 1000], [1234, 2000]];
  for (const [max, top] of cases) assert.equal(niceCeiling(max), top, `max ${max}`);
});

test('axis labels: top, middle and zero, without float noise', () => {
  assert.deepEqual(axisLabels(10), ['10', '5', '0']);
  assert.deepEqual(axisLabels(5), ['5', '2.5', '0']);
  assert.deepEqual(axisLabels(1), ['1', '0.5', '0']);
  assert.deepEqual(axisLabels(2000), ['2000', '1000', '0']);
});
