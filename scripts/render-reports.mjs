#!/usr/bin/env node
// Renders benchmark reports (results/*.html) in headless Chromium, as a person would see them:
// saves a full-page screenshot next to each (<name>.png), and fails (exit 1) on a console error in
// the page (an SVG attribute Chromium cannot use is one) or on a layout fault a person would see:
// text outside its chart, legend entries on top of each other, two series of one chart in one
// colour, table cells wrapped onto several lines, a FAIL verdict not highlighted, a ratio chart
// without its target line.
//
//   npm run render-reports [-- FILE.html|DIR ...]    (default: ./results)
//
// It drives Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: no port, no
// network). Chromium is Debian's `chromium` package (apt-get install -y chromium).
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL, fileURLToPath } from 'node:url';

const CANDIDATES = ['chromium', 'chromium-browser', 'google-chrome'];

// Chromium is not ours to sanitize: under `npm run test:sanitize` the suite's environment preloads
// ASan/UBSan into every child, and Chromium must start as it would anywhere else.
const SANITIZER_VARS = ['LD_PRELOAD', 'ASAN_OPTIONS', 'UBSAN_OPTIONS', 'LSAN_OPTIONS'];
const chromiumEnv = () => Object.fromEntries(Object.entries(process.env).filter(([k]) => !SANITIZER_VARS.includes(k)));

/** The Chromium binary on PATH, or null with why not. */
export function findChromium() {
  for (const c of CANDIDATES) {
    const r = spawnSync(c, ['--version'], { encoding: 'utf8', timeout: 30_000, env: chromiumEnv() });
    if (r.status === 0) return { bin: c, version: r.stdout.trim() };
  }
  return { bin: null, reason: `no Chromium on PATH (tried ${CANDIDATES.join(', ')}): apt-get install -y chromium` };
}

// Runs in the page: the facts a person would see. Kept as a function so the test and the script
// judge the same facts.
function inspectPage() {
  const inside = (r, b) => r.left >= b.left - 1 && r.right <= b.right + 1 && r.top >= b.top - 1 && r.bottom <= b.bottom + 1;
  const overlap = (a, b) => a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1;
  const charts = [...document.querySelectorAll('svg')].map((svg) => {
    const box = svg.getBoundingClientRect();
    const title = svg.querySelector('text')?.textContent ?? '';
    const outside = [...svg.querySelectorAll('text')].filter((t) => !inside(t.getBoundingClientRect(), box)).map((t) => t.textContent);
    // Legend entries: a 12x12 swatch and the text after it.
    const legend = [...svg.querySelectorAll('rect')]
      .filter((r) => r.getAttribute('width') === '12' && r.getAttribute('height') === '12')
      .map((r) => {
        const t = r.nextElementSibling;
        const a = r.getBoundingClientRect();
        const b = t?.getBoundingClientRect() ?? a;
        const rect = { left: Math.min(a.left, b.left), right: Math.max(a.right, b.right), top: Math.min(a.top, b.top), bottom: Math.max(a.bottom, b.bottom) };
        return { name: t?.textContent ?? '', color: getComputedStyle(r).fill, rect };
      });
    const overlapping = [];
    legend.forEach((a, i) => legend.slice(i + 1).forEach((b) => overlap(a.rect, b.rect) && overlapping.push(`${a.name} / ${b.name}`)));
    const colors = new Map();
    const sharedColors = [];
    for (const l of legend) {
      if (colors.has(l.color)) sharedColors.push(`${colors.get(l.color)} / ${l.name}`);
      else colors.set(l.color, l.name);
    }
    return {
      title,
      legend: legend.map((l) => ({ name: l.name, color: l.color })),
      outside,
      overlapping,
      sharedColors,
      targets: svg.querySelectorAll('.target').length,
      ratio: /\bratio\b/i.test(title),
    };
  });
  const lines = (el) => {
    const range = document.createRange();
    range.selectNodeContents(el);
    return new Set([...range.getClientRects()].filter((r) => r.width > 0).map((r) => Math.round(r.top))).size;
  };
  const tables = [...document.querySelectorAll('table')].map((t) => {
    const cells = [...t.querySelectorAll('td')];
    const bodyColor = getComputedStyle(t.querySelector('tbody td') ?? t).color;
    const box = t.closest('.table') ?? t.parentElement;
    return {
      columns: t.querySelectorAll('th').length,
      width: Math.round(t.getBoundingClientRect().width),
      hidden: box.scrollWidth > box.clientWidth ? box.scrollWidth - box.clientWidth : 0,
      maxCellLines: Math.max(0, ...cells.map(lines)),
      maxHeaderLines: Math.max(0, ...[...t.querySelectorAll('th')].map(lines)),
      verdicts: cells
        .filter((c) => /^(FAIL|pass)$/.test(c.textContent.trim()))
        .map((c) => ({ verdict: c.textContent.trim(), color: getComputedStyle(c).color, background: getComputedStyle(c.parentElement).backgroundColor, highlighted: getComputedStyle(c).color !== bodyColor })),
    };
  });
  return { title: document.title, charts, tables, width: document.documentElement.scrollWidth, viewport: window.innerWidth };
}

/** What a person would call wrong in what inspectPage() found. */
export function problems(facts) {
  const out = [];
  for (const c of facts.charts) {
    if (c.outside.length) out.push(`chart '${c.title}': text outside the chart: ${c.outside.join(', ')}`);
    if (c.overlapping.length) out.push(`chart '${c.title}': legend entries overlap: ${c.overlapping.join(', ')}`);
    if (c.sharedColors.length) out.push(`chart '${c.title}': series share a colour: ${c.sharedColors.join(', ')}`);
    if (c.ratio && c.targets === 0) out.push(`chart '${c.title}': a ratio chart without a target line`);
  }
  facts.tables.forEach((t, i) => {
    if (t.maxCellLines > 1) out.push(`table ${i + 1} (${t.columns} columns): cells wrap onto ${t.maxCellLines} lines`);
    if (t.hidden) out.push(`table ${i + 1} (${t.columns} columns): ${t.hidden} px of it are scrolled out of sight`);
    for (const v of t.verdicts) if (v.verdict === 'FAIL' && !v.highlighted) out.push(`table ${i + 1}: a FAIL verdict is not highlighted`);
  });
  if (facts.width > facts.viewport) out.push(`the page is ${facts.width} px wide in a ${facts.viewport} px window`);
  return out;
}

/** A headless Chromium driven over --remote-debugging-pipe. */
export class Browser {
  #child;
  #id = 0;
  #pending = new Map();
  #listeners = new Set();
  #buf = '';
  #dataDir;

  constructor(bin) {
    this.#dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-chromium-'));
    // --no-sandbox: these machines run tests as root, where Chromium's sandbox refuses to start.
    this.#child = spawn(
      bin,
      ['--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--no-first-run', '--no-default-browser-check', '--mute-audio', '--remote-debugging-pipe', `--user-data-dir=${this.#dataDir}`, 'about:blank'],
      { stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'], env: chromiumEnv() },
    );
    this.stderr = '';
    this.#child.stdio[2].setEncoding('utf8').on('data', (d) => (this.stderr = (this.stderr + d).slice(-4000)));
    this.#child.stdio[4].setEncoding('utf8').on('data', (d) => this.#onData(d));
    this.exited = new Promise((res) => this.#child.on('exit', (code, signal) => res({ code, signal })));
    this.exited.then(() => {
      for (const { reject } of this.#pending.values()) reject(new Error(`chromium exited: ${this.stderr.trim().split('\n').slice(-3).join(' | ')}`));
      this.#pending.clear();
    });
  }

  #onData(d) {
    this.#buf += d;
    let i;
    while ((i = this.#buf.indexOf('\0')) >= 0) {
      const msg = JSON.parse(this.#buf.slice(0, i));
      this.#buf = this.#buf.slice(i + 1);
      if (msg.id !== undefined) {
        const p = this.#pending.get(msg.id);
        this.#pending.delete(msg.id);
        if (msg.error) p?.reject(new Error(`${p.method}: ${msg.error.message}`));
        else p?.resolve(msg.result);
      } else for (const l of this.#listeners) l(msg);
    }
  }

  send(method, params = {}, sessionId, timeoutMs = 30_000) {
    const id = ++this.#id;
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.#pending.delete(id);
        reject(new Error(`chromium did not answer ${method} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { method, resolve: (v) => (clearTimeout(t), resolve(v)), reject: (e) => (clearTimeout(t), reject(e)) });
      this.#child.stdio[3].write(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }) + '\0');
    });
  }

  /**
   * Loads one page and returns its console errors, the layout facts and a PNG of the whole page.
   * @param {string} file an HTML file
   * @param {{ width?: number }} [o] window width in CSS pixels (default 1400)
   */
  async render(file, o = {}) {
    const width = o.width ?? 1400;
    const { targetId } = await this.send('Target.createTarget', { url: 'about:blank' });
    const { sessionId } = await this.send('Target.attachToTarget', { targetId, flatten: true });
    const errors = [];
    let loaded;
    const load = new Promise((res) => (loaded = res));
    const listener = (m) => {
      if (m.sessionId !== sessionId) return;
      if (m.method === 'Runtime.consoleAPICalled' && (m.params.type === 'error' || m.params.type === 'assert'))
        errors.push(`console.${m.params.type}: ${m.params.args.map((a) => a.value ?? a.description).join(' ')}`);
      else if (m.method === 'Runtime.exceptionThrown') errors.push(`exception: ${m.params.exceptionDetails.exception?.description ?? m.params.exceptionDetails.text}`);
      else if (m.method === 'Log.entryAdded' && m.params.entry.level === 'error') errors.push(`${m.params.entry.source}: ${m.params.entry.text}${m.params.entry.url ? ` (${m.params.entry.url})` : ''}`);
      else if (m.method === 'Network.loadingFailed' && !m.params.canceled) errors.push(`load failed: ${m.params.errorText}`);
      else if (m.method === 'Page.loadEventFired') loaded();
    };
    this.#listeners.add(listener);
    try {
      for (const d of ['Runtime', 'Log', 'Page', 'Network']) await this.send(`${d}.enable`, {}, sessionId);
      await this.send('Emulation.setDeviceMetricsOverride', { width, height: 900, deviceScaleFactor: 1, mobile: false }, sessionId);
      await this.send('Page.navigate', { url: pathToFileURL(path.resolve(file)).href }, sessionId);
      await Promise.race([load, new Promise((_, rej) => setTimeout(() => rej(new Error(`${file} did not load within 30 s`)), 30_000))]);
      const r = await this.send('Runtime.evaluate', { expression: `(${inspectPage.toString()})()`, returnByValue: true }, sessionId);
      if (r.exceptionDetails) throw new Error(`inspecting ${file}: ${r.exceptionDetails.exception?.description ?? r.exceptionDetails.text}`);
      const facts = r.result.value;
      const { cssContentSize } = await this.send('Page.getLayoutMetrics', {}, sessionId);
      const shot = await this.send(
        'Page.captureScreenshot',
        { format: 'png', captureBeyondViewport: true, clip: { x: 0, y: 0, width: Math.ceil(cssContentSize.width), height: Math.ceil(cssContentSize.height), scale: 1 } },
        sessionId,
      );
      return { file, errors, facts, problems: problems(facts), png: Buffer.from(shot.data, 'base64') };
    } finally {
      this.#listeners.delete(listener);
      await this.send('Target.closeTarget', { targetId }).catch(() => {});
    }
  }

  async close() {
    await this.send('Browser.close', {}, undefined, 10_000).catch(() => {});
    const t = setTimeout(() => this.#child.kill('SIGKILL'), 10_000);
    await this.exited;
    clearTimeout(t);
    fs.rmSync(this.#dataDir, { recursive: true, force: true });
  }
}

/** Renders each report, writes <name>.png beside it; returns one result per file. */
export async function renderReports(files, o = {}) {
  const found = findChromium();
  if (!found.bin) throw Object.assign(new Error(found.reason), { code: 'ERR_NO_CHROMIUM' });
  const browser = new Browser(found.bin);
  const out = [];
  try {
    for (const f of files) {
      const r = await browser.render(f, o);
      r.screenshot = f.replace(/\.html$/, '') + '.png';
      fs.writeFileSync(r.screenshot, r.png);
      out.push(r);
    }
  } finally {
    await browser.close();
  }
  return out;
}

function htmlFiles(args) {
  const list = args.length ? args : ['results'];
  return list.flatMap((a) => (fs.statSync(a).isDirectory() ? fs.readdirSync(a).filter((f) => f.endsWith('.html')).sort().map((f) => path.join(a, f)) : [a]));
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  if (args.includes('--help') || args.includes('-h')) {
    process.stdout.write('usage: node scripts/render-reports.mjs [FILE.html|DIR ...]   (default: ./results)\n');
    process.exit(0);
  }
  let files;
  try {
    files = htmlFiles(args);
  } catch (err) {
    process.stderr.write(`render-reports: ${err.message}\n`);
    process.exit(2);
  }
  if (!files.length) {
    process.stderr.write('render-reports: no .html reports found (run `npx pagemirror bench --quick` first)\n');
    process.exit(2);
  }
  try {
    let bad = 0;
    for (const r of await renderReports(files)) {
      const faults = [...r.errors, ...r.problems];
      bad += faults.length ? 1 : 0;
      process.stdout.write(`${faults.length ? 'FAIL' : 'ok  '} ${r.file} -> ${r.screenshot}\n${faults.map((e) => `       ${e}\n`).join('')}`);
    }
    process.exit(bad ? 1 : 0);
  } catch (err) {
    process.stderr.write(`render-reports: ${err.code ? err.code + ': ' : ''}${err.message}\n`);
    process.exit(1);
  }
}
