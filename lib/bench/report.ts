// Reports: JSON for machines (every raw sample and the environment) and a self-contained HTML page
// with inline SVG plots for people (opens offline: no scripts, no network).
import fs from 'node:fs';
import path from 'node:path';
import type { BenchEnv } from './env.js';

/** One bar of a bar chart: a series' value with optional min-max whiskers. */
export interface Bar {
  series: string;
  value: number;
  min?: number;
  max?: number;
}
/** A group of bars under one label. */
export interface BarGroup {
  label: string;
  bars: Bar[];
  /** A target for this group's values (a ratio chart's pass line), drawn as a dashed line across it. */
  target?: number;
}

/** Options of the chart functions. */
export interface ChartOptions {
  /** A fixed colour per series name (e.g. one per strategy, the same in every chart); the rest take the palette in order. */
  colors?: Record<string, string>;
  /** Line charts: a linear x axis whatever its span (time from 0). */
  linearX?: boolean;
}

// Ten colours a person tells apart, so a chart of up to ten series never repeats one.
const COLORS = ['#3366cc', '#dc3912', '#ff9900', '#109618', '#990099', '#0099c6', '#dd4477', '#66aa00', '#b82e2e', '#316395'];
const TARGET_COLOR = '#d62728';

/** The colour `color` (#rrggbb) mixed with white: 0 keeps it, 1 is white. A lighter shade of one series' colour. */
export function tint(color: string, amount: number): string {
  const n = parseInt(color.slice(1), 16);
  const mix = (c: number) => Math.round(c + (255 - c) * amount);
  return '#' + [(n >> 16) & 255, (n >> 8) & 255, n & 255].map((c) => mix(c).toString(16).padStart(2, '0')).join('');
}

/** One colour per series name, `fixed` ones first, the rest from a ten-colour palette in order. */
export function seriesColors(series: string[], fixed: Record<string, string> = {}): Map<string, string> {
  const taken = new Set(Object.values(fixed));
  const free = COLORS.filter((c) => !taken.has(c));
  let next = 0;
  return new Map(series.map((s) => [s, fixed[s] ?? free[next++ % free.length] ?? COLORS[0]!]));
}

/**
 * Legend entries laid out left to right, wrapping onto as many rows as they need within `width`
 * (a row of fixed slots left the later entries outside the chart). Returns the SVG and its height.
 */
function legendSvg(entries: { name: string; color: string; line?: boolean }[], x0: number, y0: number, width: number): { svg: string; height: number } {
  const out: string[] = [];
  const rowH = 16;
  let x = x0;
  let row = 0;
  for (const e of entries) {
    const w = 16 + Math.ceil(e.name.length * 6.6) + 18; // 11 px sans-serif: at most ~6.6 px a character
    if (x > x0 && x + w > x0 + width) {
      x = x0;
      row++;
    }
    const y = y0 + row * rowH;
    if (e.line) out.push(`<line class="legend target" x1="${x}" x2="${x + 12}" y1="${y + 6}" y2="${y + 6}" stroke="${e.color}" stroke-width="2" stroke-dasharray="4 2"/>`);
    else out.push(`<rect class="legend" x="${x}" y="${y}" width="12" height="12" fill="${e.color}"/>`);
    out.push(`<text x="${x + 16}" y="${y + 10}">${esc(e.name)}</text>`);
    x += w;
  }
  return { svg: out.join('\n'), height: entries.length ? (row + 1) * rowH : 0 };
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** 1, 2 or 5 times a power of ten: axis steps a person can read. */
function niceStep(raw: number): number {
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const m = raw / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

/**
 * Grouped bars with min-max whiskers and, where a group has one, its target as a dashed line;
 * log scale when the values span more than 30x.
 */
export function barChartSvg(title: string, unit: string, groups: BarGroup[], opts: ChartOptions = {}): string {
  const series = [...new Set(groups.flatMap((g) => g.bars.map((b) => b.series)))];
  const colors = seriesColors(series, opts.colors);
  const targets = groups.some((g) => g.target !== undefined);
  const values = groups.flatMap((g) => [...g.bars.flatMap((b) => [b.value, b.max ?? b.value]), g.target ?? 0]).filter((v) => v > 0);
  const maxV = Math.max(...values, 1);
  const minV = Math.min(...values, maxV);
  const log = maxV / minV > 30;
  const W = 860,
    right = 20,
    top = 40,
    plotH = 210;
  // Room for the group labels, written at -40 degrees below the axis: as deep as the longest one,
  // and, to the left, as wide as the first groups' labels reach past the axis (a long first label
  // would start outside the chart).
  const reach = (g: BarGroup) => g.label.length * 6.6 * Math.cos((40 * Math.PI) / 180);
  let left = 70;
  for (let k = 0; k < 4; k++) {
    const gw0 = (W - left - right) / Math.max(groups.length, 1);
    left = Math.max(70, ...groups.map((g, gi) => Math.ceil(reach(g) - gi * gw0 - gw0 / 2 + 4)));
  }
  const bottom = 24 + Math.ceil(Math.max(4, ...groups.map((g) => g.label.length)) * 6.6 * Math.sin((40 * Math.PI) / 180) + 8);
  const plotW = W - left - right;
  const legend = legendSvg(
    [...series.map((s) => ({ name: s, color: colors.get(s)! })), ...(targets ? [{ name: 'target', color: TARGET_COLOR, line: true }] : [])],
    left,
    top + plotH + bottom,
    plotW,
  );
  const H = top + plotH + bottom + legend.height + 6;
  const step = niceStep(maxV * 1.1 / 5);
  const lo = log ? Math.pow(10, Math.floor(Math.log10(minV))) : 0;
  const hi = log ? Math.pow(10, Math.ceil(Math.log10(maxV))) : Math.ceil((maxV * 1.1) / step) * step;
  const y = (v: number) =>
    top + plotH - (log ? (Math.log10(Math.max(v, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo)) : (v - lo) / (hi - lo)) * plotH;
  const gw = plotW / Math.max(groups.length, 1);
  const bw = Math.min(28, (gw * 0.8) / Math.max(series.length, 1));
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`);
  out.push(`<text x="${W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">${esc(title)}</text>`);
  const ticks = log
    ? Array.from({ length: Math.round(Math.log10(hi / lo)) + 1 }, (_, i) => lo * Math.pow(10, i))
    : Array.from({ length: Math.round(hi / step) + 1 }, (_, i) => i * step);
  for (const t of ticks) {
    out.push(`<line x1="${left}" x2="${W - right}" y1="${y(t)}" y2="${y(t)}" stroke="#ddd"/>`);
    out.push(`<text x="${left - 6}" y="${y(t) + 4}" text-anchor="end">${t >= 100 || t === 0 ? t.toFixed(0) : t.toPrecision(2)}</text>`);
  }
  out.push(`<text x="14" y="${top + plotH / 2}" transform="rotate(-90 14 ${top + plotH / 2})" text-anchor="middle">${esc(unit)}${log ? ' (log)' : ''}</text>`);
  groups.forEach((g, gi) => {
    const x0 = left + gi * gw + (gw - bw * series.length) / 2;
    g.bars.forEach((b) => {
      const si = series.indexOf(b.series);
      const x = x0 + si * bw;
      const yv = y(b.value);
      out.push(`<rect x="${x}" y="${yv}" width="${bw - 2}" height="${top + plotH - yv}" fill="${colors.get(b.series)}"><title>${esc(`${g.label} ${b.series}: ${b.value.toFixed(1)} ${unit}`)}</title></rect>`);
      if (b.min !== undefined && b.max !== undefined) {
        const cx = x + (bw - 2) / 2;
        out.push(`<line x1="${cx}" x2="${cx}" y1="${y(b.min)}" y2="${y(b.max)}" stroke="#000"/>`);
        out.push(`<line x1="${cx - 3}" x2="${cx + 3}" y1="${y(b.max)}" y2="${y(b.max)}" stroke="#000"/>`);
        out.push(`<line x1="${cx - 3}" x2="${cx + 3}" y1="${y(b.min)}" y2="${y(b.min)}" stroke="#000"/>`);
      }
    });
    if (g.target !== undefined) {
      const yt = y(g.target);
      out.push(
        `<line class="target" x1="${left + gi * gw + 4}" x2="${left + (gi + 1) * gw - 4}" y1="${yt}" y2="${yt}" stroke="${TARGET_COLOR}" stroke-width="2" stroke-dasharray="6 3"><title>${esc(`${g.label} target: ${g.target} ${unit}`)}</title></line>`,
      );
    }
    const lx = left + gi * gw + gw / 2;
    out.push(`<text x="${lx}" y="${top + plotH + 14}" text-anchor="end" transform="rotate(-40 ${lx} ${top + plotH + 14})">${esc(g.label)}</text>`);
  });
  out.push(legend.svg);
  out.push('</svg>');
  return out.join('\n');
}

/** A table for the HTML report and the terminal. */
export interface Table {
  columns: string[];
  rows: (string | number)[][];
}

/** Numbers align right, words left: a column is numeric when every cell that says something is a number. */
function numericColumns(t: Table): boolean[] {
  return t.columns.map((_, i) => t.rows.every((r) => /^(-|[-+]?\d+(\.\d+)?(x| %)?)?$/.test(String(r[i] ?? ''))));
}

/** A verdict cell's class: what the report's CSS highlights. */
function verdictClass(cell: string): string | undefined {
  // 'meets'/'misses'/'undecided': a verdict from a confidence interval (the pager suite).
  if (cell === 'FAIL' || cell === 'misses') return 'fail';
  if (cell === 'pass' || cell === 'meets') return 'pass';
  if (cell === 'undecided') return 'skip';
  if (cell.startsWith('skipped') || cell.startsWith('not measured')) return 'skip';
  return undefined;
}

/** A table in a box that scrolls sideways on a narrow window (its cells never wrap); FAIL rows highlighted. */
export function htmlTable(t: Table): string {
  const numeric = numericColumns(t);
  const head = t.columns.map((c, i) => `<th${numeric[i] ? '' : ' class="l"'}>${esc(c)}</th>`).join('');
  const body = t.rows
    .map((r) => {
      const cells = r.map(String);
      const classes = cells.map((c, i) => [verdictClass(c), numeric[i] ? undefined : 'l'].filter(Boolean).join(' '));
      const row = cells.some((c) => verdictClass(c) === 'fail') ? ' class="fail"' : '';
      return `<tr${row}>${cells.map((c, i) => `<td${classes[i] ? ` class="${classes[i]}"` : ''}>${esc(c)}</td>`).join('')}</tr>`;
    })
    .join('\n');
  const thead = t.columns.some((c) => c !== '') ? `<thead><tr>${head}</tr></thead>` : '';
  return `<div class="table"><table>${thead}<tbody>${body}</tbody></table></div>`;
}

/** A table as aligned text for a terminal. */
export function textTable(t: Table): string {
  const cells = [t.columns, ...t.rows.map((r) => r.map(String))];
  const widths = t.columns.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const numeric = numericColumns(t);
  return cells.map((r) => r.map((c, i) => (numeric[i] ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd()).join('\n');
}

/** One section of an HTML report: a title, a paragraph, charts and a table. */
export interface Section {
  title: string;
  text?: string;
  svg?: string[];
  table?: Table;
}

/** Writes `<dir>/<name>.json` (environment and data) and `<dir>/<name>.html` (the sections, the environment). */
export function writeReport(dir: string, name: string, env: BenchEnv, data: unknown, sections: Section[]): { json: string; html: string } {
  fs.mkdirSync(dir, { recursive: true });
  const json = path.join(dir, `${name}.json`);
  const html = path.join(dir, `${name}.html`);
  fs.writeFileSync(json, JSON.stringify({ env, data }, (_k, v) => (typeof v === 'bigint' ? v.toString() : v), 2) + '\n');
  const envRows = Object.entries(env).map(([k, v]) => [k, typeof v === 'object' ? JSON.stringify(v) : String(v)]);
  const page = `<!doctype html>
<html><head><meta charset="utf-8"><title>pagemirror: ${esc(name)}</title>
<style>
body { font-family: sans-serif; max-width: 1360px; margin: 2em auto; padding: 0 1em; color: #222; }
p { max-width: 960px; }
.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
td { white-space: nowrap; }
th { background: #f4f4f4; vertical-align: bottom; }
td.l, th.l { text-align: left; }
td.pass { color: #109618; font-weight: bold; }
td.fail { color: #fff; background: #d62728; font-weight: bold; }
tr.fail td { background-color: #fde8e8; }
tr.fail td.fail { background-color: #d62728; }
td.skip { color: #888; }
</style></head><body>
<h1>pagemirror: ${esc(name)}</h1>
${sections
  .map((s) => `<h2>${esc(s.title)}</h2>\n${s.text ? `<p>${esc(s.text)}</p>` : ''}\n${(s.svg ?? []).join('\n')}\n${s.table ? htmlTable(s.table) : ''}`)
  .join('\n')}
<h2>Environment</h2>
${htmlTable({ columns: ['', ''], rows: envRows })}
<p>Raw samples: <code>${esc(path.basename(json))}</code></p>
</body></html>
`;
  fs.writeFileSync(html, page);
  return { json, html };
}

/** One line of a line chart. */
export interface Series {
  name: string;
  points: { x: number; y: number; min?: number; max?: number }[];
}

/** Lines over a numeric x axis (log2 when it spans more than 16x), with min-max whiskers. */
export function lineChartSvg(title: string, xLabel: string, yLabel: string, series: Series[], opts: ChartOptions = {}): string {
  const colors = seriesColors(
    series.map((s) => s.name),
    opts.colors,
  );
  const xs = series.flatMap((s) => s.points.map((p) => p.x)).filter((x) => x > 0);
  const ys = series.flatMap((s) => s.points.flatMap((p) => [p.y, p.max ?? p.y]));
  const xMin = Math.min(...xs);
  const xMax = Math.max(...xs, xMin * 2);
  const logX = !opts.linearX && xMax / xMin > 16;
  const yPos = ys.filter((v) => v > 0);
  const logY = yPos.length > 0 && Math.max(...yPos) / Math.min(...yPos) > 30;
  const yMax = Math.max(...ys, 1e-9) * 1.1;
  const step = niceStep(yMax / 5);
  const yTop = logY ? Math.pow(10, Math.ceil(Math.log10(Math.max(...yPos)))) : Math.ceil(yMax / step) * step;
  const yBottom = logY ? Math.pow(10, Math.floor(Math.log10(Math.min(...yPos)))) : 0;
  // The legend's column fits its longest name (7 px a character at 11 px covers the wide sans-serif
  // fonts: with a fixed 170 px, 'around 2048 KiB, prefetch' ran past the edge in Debian's Chromium).
  const W = 860,
    H = 380,
    left = 70,
    right = Math.min(360, Math.max(170, 40 + 7 * Math.max(0, ...series.map((s) => s.name.length)))),
    top = 40,
    bottom = 60;
  const pw = W - left - right,
    ph = H - top - bottom;
  const x = (v: number) => left + (logX ? Math.log2(v / xMin) / Math.log2(xMax / xMin) : (v - xMin) / (xMax - xMin || 1)) * pw;
  const y = (v: number) =>
    top + ph - (logY ? (Math.log10(Math.max(v, yBottom)) - Math.log10(yBottom)) / (Math.log10(yTop) - Math.log10(yBottom)) : v / yTop) * ph;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`);
  out.push(`<text x="${(left + W - right) / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">${esc(title)}</text>`);
  const yticks = logY
    ? Array.from({ length: Math.round(Math.log10(yTop / yBottom)) + 1 }, (_, i) => yBottom * Math.pow(10, i))
    : Array.from({ length: Math.round(yTop / step) + 1 }, (_, i) => i * step);
  for (const t of yticks) {
    out.push(`<line x1="${left}" x2="${W - right}" y1="${y(t)}" y2="${y(t)}" stroke="#ddd"/>`);
    out.push(`<text x="${left - 6}" y="${y(t) + 4}" text-anchor="end">${t >= 100 || t === 0 ? t.toFixed(0) : t.toPrecision(2)}</text>`);
  }
  const xticks = [...new Set(xs)].sort((a, b) => a - b);
  for (const t of xticks) {
    out.push(`<line x1="${x(t)}" x2="${x(t)}" y1="${top}" y2="${top + ph}" stroke="#eee"/>`);
    out.push(`<text x="${x(t)}" y="${top + ph + 14}" text-anchor="middle">${t}</text>`);
  }
  out.push(`<text x="${(left + W - right) / 2}" y="${H - 20}" text-anchor="middle">${esc(xLabel)}${logX ? ' (log)' : ''}</text>`);
  out.push(`<text x="14" y="${top + ph / 2}" transform="rotate(-90 14 ${top + ph / 2})" text-anchor="middle">${esc(yLabel)}${logY ? ' (log)' : ''}</text>`);
  series.forEach((s, si) => {
    const c = colors.get(s.name)!;
    const pts = [...s.points].sort((a, b) => a.x - b.x);
    out.push(`<polyline fill="none" stroke="${c}" stroke-width="2" points="${pts.map((p) => `${x(p.x)},${y(p.y)}`).join(' ')}"/>`);
    for (const p of pts) {
      out.push(`<circle cx="${x(p.x)}" cy="${y(p.y)}" r="3" fill="${c}"><title>${esc(`${s.name}: ${p.x} → ${p.y.toPrecision(4)}`)}</title></circle>`);
      if (p.min !== undefined && p.max !== undefined)
        out.push(`<line x1="${x(p.x)}" x2="${x(p.x)}" y1="${y(p.min)}" y2="${y(p.max)}" stroke="${c}" stroke-opacity="0.5"/>`);
    }
    out.push(`<rect class="legend" x="${W - right + 12}" y="${top + si * 18}" width="12" height="12" fill="${c}"/>`);
    out.push(`<text x="${W - right + 28}" y="${top + si * 18 + 10}">${esc(s.name)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n');
}
