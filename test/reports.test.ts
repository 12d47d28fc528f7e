// The benchmark reports as a person sees them: each suite's HTML (from a real --quick run) rendered
// in headless Chromium (scripts/render-reports.mjs, over the DevTools protocol), with no console
// error, legends inside their charts and one colour per series, table cells on one line, FAIL
// verdicts highlighted and target lines on ratio charts. Screenshots stay in
// results/report-render/ to be looked at. Skips, saying so, where Chromium is not installed.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
// A plain ES module script (npm run render-reports), the same code as the test's.
import { Browser, findChromium, problems } from '../scripts/render-reports.mjs';
import { barChartSvg, writeReport } from '../lib/bench/report.js';
import { benchEnv } from '../lib/bench/env.js';
import { SUITES } from '../lib/bench/cli.js';
import { P, requireCap, within } from './helpers.js';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(root, 'dist', 'cli.js');
const out = path.join(root, 'results', 'report-render');
const chromium = findChromium() as { bin: string | null; reason?: string };

interface Chart {
  title: string;
  legend: { name: string; color: string }[];
  outside: string[];
  sharedColors: string[];
  targets: number;
  ratio: boolean;
}
interface Table {
  columns: number;
  maxCellLines: number;
  hidden: number;
  verdicts: { verdict: string; color: string; background: string; highlighted: boolean }[];
}
interface Rendered {
  errors: string[];
  problems: string[];
  facts: { charts: Chart[]; tables: Table[] };
  png: Buffer;
}

let browser: { render(file: string, o?: { width?: number }): Promise<Rendered>; close(): Promise<void> } | undefined;
const reports: Record<string, string> = {};
let benchError: string | undefined;

async function render(file: string): Promise<Rendered> {
  const r = await within(browser!.render(file), 60_000, `rendering ${file}`);
  fs.writeFileSync(file.replace(/\.html$/, '.png'), r.png);
  return r;
}

beforeAll(async () => {
  if (!chromium.bin) return;
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(out, { recursive: true });
  browser = new Browser(chromium.bin);
  if (!P.experiments.uffd.ok) return;
  // Every suite at smoke size: real data, so the report code meets what the suites produce.
  const child = spawn(process.execPath, [cli, 'bench', '--quick', '--json', '--quiet', '--out', out], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 170_000 });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const code = await new Promise<number | null>((res) => child.on('close', res));
  if (code !== 0 && code !== 3) benchError = `bench --quick exited ${code}: ${stderr}`;
  else for (const r of JSON.parse(stdout).reports as { suite: string; html: string }[]) reports[r.suite] = r.html;
}, 200_000);

afterAll(async () => {
  await browser?.close();
}, 30_000);

function needs(ctx: { skip: (note?: string) => void }): void {
  if (!chromium.bin) ctx.skip(chromium.reason);
  requireCap(ctx, P.experiments.uffd, 'userfaultfd (the reports come from a real run)');
  expect(benchError).toBeUndefined();
}

describe('reports in headless Chromium', () => {
  for (const suite of SUITES)
    it(`${suite}: no console error, nothing a person would call broken, a screenshot kept`, async (ctx) => {
      needs(ctx);
      expect(reports[suite], `no ${suite} report`).toBeTruthy();
      const r = await render(reports[suite]!);
      expect(r.errors).toEqual([]);
      expect(r.problems).toEqual([]);
      expect(r.facts.charts.length).toBeGreaterThan(0);
      expect(fs.statSync(reports[suite]!.replace(/\.html$/, '.png')).size).toBeGreaterThan(10_000);
    }, 90_000);

  it('strategies: the fsync legend shows all 8 series, each strategy in its own colour everywhere; the 17-column table on one line a row', async (ctx) => {
    needs(ctx);
    const r = await render(reports.strategies!);
    const fsync = r.facts.charts.find((c) => c.title.startsWith('fsync()'))!;
    expect(fsync.legend.map((l) => l.name)).toEqual(['remote', 'copy', 'bounce', 'pin'].flatMap((s) => [`${s} p50`, `${s} p99`]));
    expect(fsync.outside).toEqual([]);
    expect(new Set(fsync.legend.map((l) => l.color)).size).toBe(8);
    const throughput = r.facts.charts.find((c) => c.title.startsWith('read-once: throughput'))!;
    for (const s of ['remote', 'copy', 'bounce', 'pin'])
      expect(fsync.legend.find((l) => l.name === `${s} p99`)!.color).toBe(throughput.legend.find((l) => l.name === s)!.color);
    const wide = r.facts.tables.find((t) => t.columns === 17)!;
    expect(wide.maxCellLines).toBe(1);
    expect(wide.hidden).toBe(0); // all of it visible in a 1400 px window
  }, 90_000);

  it('ratio charts carry their target lines (faults, engine, bounce writeback)', async (ctx) => {
    needs(ctx);
    for (const suite of ['faults', 'engine', 'strategies']) {
      const ratios = (await render(reports[suite]!)).facts.charts.filter((c) => c.ratio);
      expect(ratios.length, suite).toBeGreaterThan(0);
      for (const c of ratios) expect(c.targets, c.title).toBeGreaterThan(0);
    }
  }, 90_000);

  it('FAIL and pass verdicts are highlighted; ten series get ten colours and a legend inside the chart', async (ctx) => {
    if (!chromium.bin) ctx.skip(chromium.reason);
    // The report code on a table whose verdicts are known (a real run may meet every target).
    const names = Array.from({ length: 10 }, (_, i) => `series number ${i + 1}`);
    const svg = barChartSvg('ten series, ratio to a baseline', 'ratio', [
      { label: 'a', bars: names.map((series, i) => ({ series, value: 1 + i / 10 })), target: 1.2 },
      { label: 'b', bars: names.map((series, i) => ({ series, value: 2 - i / 10 })) },
    ]);
    const { html } = writeReport(out, 'verdicts', benchEnv(false, 'test'), {}, [
      { title: 'verdicts', svg: [svg], table: { columns: ['scenario', 'ratio', 'target', 'verdict'], rows: [['a', '1.50x', '<= 1.2x', 'FAIL'], ['b', '1.00x', '<= 1.2x', 'pass'], ['c', '-', '-', 'reported']] } },
    ]);
    const r = await render(html);
    expect(r.errors).toEqual([]);
    expect(r.problems).toEqual([]);
    const chart = r.facts.charts[0]!;
    expect(chart.legend.map((l) => l.name)).toEqual(names);
    expect(new Set(chart.legend.map((l) => l.color)).size).toBe(10);
    expect(chart.targets).toBeGreaterThan(0);
    const v = r.facts.tables[0]!.verdicts;
    expect(v.map((x) => [x.verdict, x.highlighted])).toEqual([
      ['FAIL', true],
      ['pass', true],
    ]);
    expect(v[0]!.color).not.toBe(v[1]!.color);
  }, 60_000);

  it('the renderer itself catches a console error and a broken layout', async (ctx) => {
    if (!chromium.bin) ctx.skip(chromium.reason);
    // Not in results/: a deliberately broken page would fail `npm run render-reports` there.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-render-'));
    const bad = path.join(dir, 'broken.html');
    // An SVG attribute Chromium cannot parse (a NaN from a chart with no data) is a console error.
    fs.writeFileSync(
      bad,
      '<!doctype html><meta charset="utf-8"><svg xmlns="http://www.w3.org/2000/svg" width="200" height="100"><text x="10" y="20">a ratio chart</text><rect y="NaN" width="10" height="10"/>' +
        '<rect x="10" y="60" width="12" height="12" fill="#3366cc"/><text x="26" y="70">one</text><rect x="150" y="60" width="12" height="12" fill="#3366cc"/><text x="166" y="70">two, past the edge</text></svg>' +
        '<table style="width:80px"><tr><td>a cell that has to wrap</td><td>FAIL</td></tr></table>',
    );
    const r = await render(bad).finally(() => fs.rmSync(dir, { recursive: true, force: true }));
    expect(r.errors.join('\n')).toMatch(/NaN/);
    const p = problems(r.facts).join('\n');
    expect(p).toMatch(/text outside the chart: two, past the edge/);
    expect(p).toMatch(/series share a colour: one \/ two/);
    expect(p).toMatch(/a ratio chart without a target line/);
    expect(p).toMatch(/cells wrap onto [2-9] lines/);
    expect(p).toMatch(/a FAIL verdict is not highlighted/);
  }, 60_000);
});
