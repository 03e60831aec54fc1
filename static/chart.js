// chart.js: the live server chart, SVG polylines and no library.

/** Points kept: one a second, so a minute of history. */
export const HISTORY = 60;

/**
 * Messages per second between two /stats samples; null when it cannot be told
 * (first sample, clock not advancing, or the counter went back: a new server).
 */
export function messageRate(previous, current) {
  if (!previous) return null;
  const seconds = (current.at - previous.at) / 1000;
  const delta = current.messages - previous.messages;
  if (seconds <= 0 || delta < 0) return null;
  return delta / seconds;
}

/**
 * SVG polyline points for `values` in a width × height box, scaled to `max`
 * (at least 1 so a flat zero line sits on the bottom), newest on the right.
 */
export function polylinePoints(values, width, height, max, slots = HISTORY) {
  const top = Math.max(1, max);
  const step = width / Math.max(1, slots - 1);
  const offset = slots - values.length;
  return values
    .map((v, i) => {
      const x = (offset + i) * step;
      const y = height - (Math.max(0, v) / top) * (height - 4) - 2; // 2-unit margin for the stroke
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    })
    .join(' ');
}

/** Keeps the series and redraws the chart's two lines. */
export class StatsChart {
  /** @param {SVGSVGElement} svg  has polylines .conn and .rate and a 0 0 W H viewBox */
  constructor(svg) {
    this.svg = svg;
    this.connections = [];
    this.rates = [];
    const box = svg.viewBox.baseVal;
    this.width = box.width;
    this.height = box.height;
  }

  /** Adds one sample; rate may be null (drawn as 0, it is only unknown at start). */
  push(connections, rate) {
    this.connections.push(connections);
    this.rates.push(rate ?? 0);
    if (this.connections.length > HISTORY) this.connections.shift();
    if (this.rates.length > HISTORY) this.rates.shift();
    this.draw();
  }

  draw() {
    // Each line on its own scale: a handful of connections next to hundreds of messages/s.
    const lines = [['.conn', this.connections], ['.rate', this.rates]];
    for (const [selector, values] of lines) {
      const max = Math.max(...values, 0) * 1.1;
      this.svg.querySelector(selector)
        .setAttribute('points', polylinePoints(values, this.width, this.height, max));
    }
  }
}
