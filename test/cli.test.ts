// The command line (from dist/, compiled by test/global-setup.ts) and the benchmark's smoke run: results are produced and well formed (speed is
// the benchmark's business, never a test's).
import { describe, it, expect } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { P, PAGE, requireCap } from './helpers.js';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(root, 'dist', 'cli.js');

describe('pagemirror probe', () => {
  it('prints the probe for a person', () => {
    const out = execFileSync(process.execPath, [cli, 'probe'], { encoding: 'utf8', timeout: 30_000 });
    expect(out).toMatch(/^kernel\s+\S+/m);
    expect(out).toMatch(/^userfaultfd\s+/m);
    expect(out).toMatch(/^experiments$/m);
    expect(out).toContain(`page size ${P.pageSize}`);
  });

  it('--json is the probe object', () => {
    const out = execFileSync(process.execPath, [cli, 'probe', '--json'], { encoding: 'utf8', timeout: 30_000 });
    const j = JSON.parse(out);
    expect(j.kernel.release).toBe(P.kernel.release);
    expect(j.pageSize).toBe(P.pageSize);
    expect(j.uffd.features).toEqual(P.uffd.features);
    expect(Object.keys(j.experiments)).toEqual(expect.arrayContaining(['uffd', 'wp', 'minor', 'tmpfs', 'ext4', 'dax', 'hugetlb']));
    for (const c of Object.values(j.experiments) as { ok: boolean; reason?: string }[]) if (!c.ok) expect(c.reason).toBeTruthy();
  });

  it('an unknown command exits 2 with usage', () => {
    const r = spawnSync(process.execPath, [cli, 'bogus'], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/unknown command 'bogus'/);
    expect(r.stderr).toMatch(/usage: pagemirror/);
  });

  it('bad bench options are usage errors, not crashes', () => {
    const r = spawnSync(process.execPath, [cli, 'bench', 'nosuchsuite'], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/unknown suite 'nosuchsuite'/);
    const r2 = spawnSync(process.execPath, [cli, 'bench', '--reps', 'x'], { encoding: 'utf8', timeout: 30_000 });
    expect(r2.stderr).toMatch(/--reps must be a positive integer/);
  });
});

describe('pagemirror bench (smoke size)', () => {
  it('faults: writes JSON with every sample and the environment, and an HTML report with SVG', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-bench-'));
    try {
      const r = spawnSync(process.execPath, [cli, 'bench', 'faults', '--pages', '64', '--reps', '2', '--out', out, '--quiet'], {
        encoding: 'utf8',
        timeout: 120_000,
      });
      expect([0, 3]).toContain(r.status); // 3: a target missed at smoke size; the output is what is checked
      const files = fs.readdirSync(out);
      const json = files.find((f) => f.endsWith('.json'))!;
      const html = files.find((f) => f.endsWith('.html'))!;
      expect(json && html).toBeTruthy();
      const data = JSON.parse(fs.readFileSync(path.join(out, json), 'utf8'));
      for (const k of ['kernel', 'cpu', 'node', 'pageSize', 'pinned']) expect(data.env).toHaveProperty(k);
      expect(data.data.length).toBeGreaterThanOrEqual(8);
      for (const row of data.data) {
        if (row.skipped) continue;
        expect(row.addon.samples).toHaveLength(2);
        expect(row.addon.samples.every((x: number) => x > 0)).toBe(true);
        expect(row.c.samples).toHaveLength(2);
        expect(row.ratio).toBeGreaterThan(0);
      }
      const page = fs.readFileSync(path.join(out, html), 'utf8');
      expect(page).toContain('<svg');
      expect(page).not.toMatch(/<script|https?:\/\/(?!www\.w3\.org)/); // opens offline
      expect(r.stdout).toMatch(/missing-copy/);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 180_000);
});

describe('pagemirror bench engine (smoke size)', () => {
  it('writes rows for device read, migrations and the CPU fault on a device page, with C baselines', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-bench-'));
    try {
      const r = spawnSync(process.execPath, [cli, 'bench', 'engine', '--size', String(4 << 20), '--pages', '64', '--reps', '2', '--out', out, '--quiet'], {
        encoding: 'utf8',
        timeout: 120_000,
      });
      expect([0, 3]).toContain(r.status);
      const json = fs.readdirSync(out).find((f) => f.startsWith('engine-') && f.endsWith('.json'))!;
      const data = JSON.parse(fs.readFileSync(path.join(out, json), 'utf8'));
      expect(data.data.map((x: { scenario: string }) => x.scenario)).toEqual(['device-read-2m', 'migrate-copy', 'migrate-move', 'cpu-fault-on-device-page']);
      for (const row of data.data) {
        if (row.skipped) continue;
        expect(row.addon.samples).toHaveLength(2);
        expect(row.c.samples.length).toBeGreaterThanOrEqual(2);
        expect(row.ratio).toBeGreaterThan(0);
      }
      expect(fs.readFileSync(path.join(out, json.replace('.json', '.html')), 'utf8')).toContain('<svg');
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 180_000);
});

describe('pagemirror bench batching, oversubscription and dirty (smoke size)', () => {
  it('write well-formed curves: every setting measured, line plots in the report', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-bench-'));
    try {
      const r = spawnSync(process.execPath, [cli, 'bench', 'batching', 'oversubscription', 'dirty', '--size', String(2 << 20), '--pages', '256', '--reps', '1', '--out', out, '--quiet'], {
        encoding: 'utf8',
        timeout: 120_000,
      });
      expect(r.status, r.stderr).toBe(0);
      const read = (prefix: string) => JSON.parse(fs.readFileSync(path.join(out, fs.readdirSync(out).find((f) => f.startsWith(prefix) && f.endsWith('.json'))!), 'utf8'));
      const b = read('batching-');
      expect(b.data).toHaveLength(30); // 5 batch sizes x 3 granules x 2 prefetch settings
      for (const p of b.data) expect(p.gbps.median).toBeGreaterThan(0);
      const o = read('oversubscription-');
      expect(o.data).toHaveLength(18);
      const over = o.data.filter((p: { ratio: number }) => p.ratio > 1);
      for (const p of over) expect(p.migrated.toHost.eviction).toBeGreaterThan(0);
      for (const f of fs.readdirSync(out).filter((f) => f.endsWith('.html') && !f.startsWith('dirty-')))
        expect(fs.readFileSync(path.join(out, f), 'utf8')).toContain('<polyline');
      const d = read('dirty-');
      for (const row of d.data) {
        if (row.skipped) expect(row.nsPerDirtyPage).toBeNull();
        else expect(row.found).toBe(64); // every written page found, none more
      }
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 180_000);
});

describe('pagemirror bench strategies (smoke size)', () => {
  it('measures every strategy x workload x file system and bounce writeback against pwrite', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-bench-'));
    try {
      const r = spawnSync(process.execPath, [cli, 'bench', 'strategies', '--pages', '128', '--reps', '1', '--out', out, '--quiet'], {
        encoding: 'utf8',
        timeout: 120_000,
      });
      expect(r.status === 0 || r.status === 3, r.stderr).toBe(true); // 3: a speed target missed (not this test's business)
      const file = fs.readdirSync(out).find((f) => f.startsWith('strategies-') && f.endsWith('.json'))!;
      const j = JSON.parse(fs.readFileSync(path.join(out, file), 'utf8'));
      expect(j.env).toMatchObject({ kernel: expect.any(String), node: process.version, pageSize: PAGE });
      const places = j.data.places.map((p: { fs: string }) => p.fs);
      expect(places).toEqual(expect.arrayContaining(['memfd', 'tmpfs']));
      expect(j.data.rows).toHaveLength(places.length * 4 * 4);
      for (const row of j.data.rows) {
        expect(row.skipped, `${row.fs} ${row.strategy} ${row.workload}`).toBeUndefined();
        expect(row.throughput.median).toBeGreaterThan(0);
        expect(row.latency.p99).toBeGreaterThanOrEqual(row.latency.p50);
      }
      // The accounting tells the strategies apart: copy and bounce hold the dataset in device memory.
      const readOnce = (fsName: string, s: string) => j.data.rows.find((x: { fs: string; strategy: string; workload: string }) => x.fs === fsName && x.strategy === s && x.workload === 'read-once');
      expect(readOnce('tmpfs', 'copy').devicePages).toBe(128);
      expect(readOnce('tmpfs', 'remote').devicePages).toBe(0);
      expect(j.data.writeback).toHaveLength(places.length * 2);
      for (const w of j.data.writeback) expect(w.writeback.median).toBeGreaterThan(0);
      expect(fs.readFileSync(path.join(out, file.replace('.json', '.html')), 'utf8')).toContain('<svg');
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 180_000);
});

describe('examples', () => {
  // .mjs run as they are; .ts run compiled (dist/examples, by test/global-setup.ts).
  const names = fs.readdirSync(path.join(root, 'examples')).filter((f) => f.endsWith('.mjs') || f.endsWith('.ts'));
  for (const name of names) {
    it(`examples/${name} runs`, (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      const script = name.endsWith('.ts') ? path.join(root, 'dist', 'examples', name.replace(/\.ts$/, '.js')) : path.join(root, 'examples', name);
      const args = name === 'file-strategies.ts' ? ['--size', String(1 << 20)] : [];
      const r = spawnSync(process.execPath, [script, ...args], { encoding: 'utf8', timeout: 60_000, cwd: root });
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout.length).toBeGreaterThan(0);
    }, 90_000);
  }
});
