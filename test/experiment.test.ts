// Custom experiments through the public subpath 'pagemirror/bench': a tiny experiment on real
// faults writes its JSON and HTML, runs every cell every repetition with each baseline right before
// the cells compared with it, and (where Chromium is installed) its report passes the same render
// checks as the built-in suites'. Bad definitions are typed errors before anything runs.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Browser, findChromium } from '../scripts/render-reports.mjs';
import { defineExperiment, runExperiment } from '../lib/bench/index.js';
import { FIXTURES_DIR, within } from './helpers.js';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');

describe('pagemirror/bench: custom experiments', () => {
  it('a tiny experiment imported from the package subpath writes JSON and HTML, alternating against its baseline', async (ctx) => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-experiment-'));
    try {
      const r = spawnSync(process.execPath, [path.join(FIXTURES_DIR, 'experiment-subpath.mjs'), out], { cwd: root, encoding: 'utf8', timeout: 60_000 });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      const res = JSON.parse(r.stdout) as {
        ok: boolean;
        files: { json: string; html: string };
        calls: string[];
        cells: { cell: { pages: number; op: string }; n: number; ratio?: number; verdict?: Record<string, string> }[];
      };
      // 2 x 2 cells, 3 repetitions; in each, the read (baseline) cell right before its write cell.
      expect(res.cells.map((c) => `${c.cell.pages}:${c.cell.op}`)).toEqual(['8:read', '8:write', '32:read', '32:write']);
      const perRep = ['8:read', '8:write', '32:read', '32:write'];
      expect(res.calls).toEqual([0, 1, 2].flatMap((rep) => perRep.map((c) => `${rep}:${c}`)));
      for (const c of res.cells) {
        expect(c.n).toBe(3);
        if (c.cell.op === 'read') expect(c.ratio).toBeUndefined();
        else {
          expect(c.ratio).toBe(1); // faults: the same page count as the baseline
          expect(c.verdict).toEqual({ time: expect.stringMatching(/^(pass|FAIL)$/) });
        }
      }
      expect(res.files.json).toBe(path.join(out, 'tiny.json'));
      const j = JSON.parse(fs.readFileSync(res.files.json, 'utf8'));
      expect(j.env.kernel).toBe(os.release());
      expect(j.env.pagemirror).toBe(JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')).version);
      expect(j.data.cells).toHaveLength(4);
      expect(j.data.cells[1].samples.time).toHaveLength(3);
      const html = fs.readFileSync(res.files.html, 'utf8');
      expect(html).toContain('<svg');
      expect(html).toContain('class="target"');
      expect(html).toMatch(/time ratio to the baseline/);

      const chromium = findChromium() as { bin: string | null; reason?: string };
      if (!chromium.bin) return ctx.skip(`report written and checked; not rendered: ${chromium.reason}`);
      const browser = new Browser(chromium.bin);
      try {
        const shot = await within(browser.render(res.files.html), 60_000, 'rendering the experiment report');
        expect(shot.errors).toEqual([]);
        expect(shot.problems).toEqual([]);
      } finally {
        await browser.close();
      }
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 120_000);

  it('bad definitions and bad results are typed errors, raised before or instead of a report', async () => {
    const base = { name: 'x', axes: { a: [1, 2] }, run: () => ({ m: 1 }) };
    const bad = (o: object) => expect.objectContaining({ code: 'ERR_PAGEMIRROR_BAD_EXPERIMENT', name: 'RangeError', ...o });
    expect(() => defineExperiment({ ...base, name: '../x' })).toThrow(bad({}));
    expect(() => defineExperiment({ ...base, axes: { a: [] } })).toThrow(bad({}));
    expect(() => defineExperiment({ ...base, reps: 0 })).toThrow(bad({}));
    expect(() => defineExperiment({ ...base, baseline: { a: 3 as 1 } })).toThrow(bad({}));
    expect(() => defineExperiment({ ...base, run: undefined as never })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => defineExperiment({ ...base, metrics: { m: { better: 'up' as 'lower' } } })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
    expect(() => defineExperiment({ ...base, metrics: { m: { target: -1 } } })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    await expect(runExperiment(defineExperiment(base), null as never)).rejects.toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    await expect(runExperiment(defineExperiment(base), { out: 5 as never })).rejects.toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-experiment-'));
    try {
      let torn = 0;
      const nan = defineExperiment({ ...base, reps: 1, run: () => ({ m: NaN }), teardown: () => void torn++ });
      await expect(runExperiment(nan, { out, quiet: true })).rejects.toThrow(bad({}));
      expect(torn).toBe(1);
      const changing = defineExperiment({ ...base, reps: 1, run: ({ a }) => (a === 1 ? { m: 1 } : { n: 1 }) });
      await expect(runExperiment(changing, { out, quiet: true })).rejects.toThrow(bad({}));
      expect(fs.readdirSync(out)).toEqual([]);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 30_000);
});
