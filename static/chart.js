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

/**
 * The top of the scale for a series whose highest value is `max`: the smallest
 * 1, 2 or 5 times a power of ten at or above it, and at least 1, so the axis
 * reads in round numbers and a flat zero line sits on the bottom.
 */
export function niceCeiling(max) {
  if (!(max > 1)) return 1;
  const power = 10 ** Math.floor(Math.log10(max));
  for (const step of [1, 2, 5]) if (step * power >= max) return step * power;
  return 10 * power;
}

/** An axis's labels for a scale topped at `top`: its top, its middle and zero. */
export function axisLabels(top) {
  const label = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1));
  return [label(top), label(top / 2), '0'];
}

/** Keeps the series and redraws the chart's two lines and their axes. */
export class StatsChart {
  /**
   * @param {SVGSVGElement} svg  has polylines .conn and .rate and a 0 0 W H viewBox
   * @param {{conn?: Element, rate?: Element}} axes  each holds three [data-tick]
   *   elements (top, middle, bottom) for that line's scale
   */
  constructor(svg, axes = {}) {
    this.svg = svg;
    this.axes = axes;
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
    // Each line on its own scale (a handful of connections next to hundreds of
    // messages/s), read off its own axis: connections on the left, rate on the right.
    const lines = [['conn', this.connections], ['rate', this.rates]];
    for (const [name, values] of lines) {
      const top = niceCeiling(Math.max(...values, 0));
      this.svg.querySelector(`.line.${name}`)
        .setAttribute('points', polylinePoints(values, this.width, this.height, top));
      const ticks = this.axes[name] ? this.axes[name].querySelectorAll('[data-tick]') : [];
      axisLabels(top).forEach((text, i) => { if (ticks[i]) ticks[i].textContent = text; });
    }
  }
}
