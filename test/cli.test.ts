// The command line (from dist/, compiled by test/global-setup.ts) and the benchmark's smoke run: results are produced and well formed (speed is
// the benchmark's business, never a test's).
import { describe, it, expect } from 'vitest';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { P, PAGE, requireCap, runNodeScript, waitFor, within } from './helpers.js';

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

  it('an unknown command exits 2 with one line pointing at --help', () => {
    const r = spawnSync(process.execPath, [cli, 'bogus'], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toBe("pagemirror: unknown command 'bogus'; see 'pagemirror --help'\n");
  });

  it('bad bench options are usage errors, not crashes', () => {
    const r = spawnSync(process.execPath, [cli, 'bench', 'nosuchsuite'], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/unknown suite 'nosuchsuite'/);
    const r2 = spawnSync(process.execPath, [cli, 'bench', '--reps', 'x'], { encoding: 'utf8', timeout: 30_000 });
    expect(r2.stderr).toMatch(/--reps must be a positive integer/);
  });
});

/**
 * Runs the CLI in a fresh directory (whatever it writes by default lands there, to be seen),
 * asynchronously: a command that wrongly starts a long run must fail by its timeout while this
 * process's timers (the watchdog's heartbeat) go on.
 */
async function inTmp(args: string[], timeout = 15_000): Promise<{ status: number | null; stdout: string; stderr: string; wrote: string[] }> {
  const cwd = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-cli-'));
  try {
    const child = spawn(process.execPath, [cli, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'], timeout });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const status = await new Promise<number | null>((res) => child.on('close', (code) => res(code)));
    return { status, stdout, stderr, wrote: fs.readdirSync(cwd) };
  } finally {
    fs.rmSync(cwd, { recursive: true, force: true });
  }
}

const EXIT_LINES = [/^\s+0\s+success/m, /^\s+1\s+failure/m, /^\s+2\s+usage error/m, /^\s+3\s+a benchmark .*missed/m];

describe('command line: help, version, strict flags', () => {
  for (const cmd of ['probe', 'demo', 'bench'])
    for (const flag of ['--help', '-h'])
      it(`${cmd} ${flag} prints its help and runs nothing`, async () => {
        const r = await inTmp([cmd, flag]);
        expect(r.status, r.stderr).toBe(0);
        expect(r.stdout).toMatch(new RegExp(`^usage: pagemirror ${cmd}`));
        for (const l of EXIT_LINES) expect(r.stdout).toMatch(l);
        expect(r.stdout).not.toMatch(/^kernel\s/m); // not the probe
        expect(r.wrote).toEqual([]); // no ./results: nothing ran
        expect(r.stderr).toBe(''); // no progress
      });

  it('help for a command equals its --help; the top-level help lists the commands and exit codes', async () => {
    expect((await inTmp(['help', 'bench'])).stdout).toBe((await inTmp(['bench', '--help'])).stdout);
    for (const args of [[], ['--help'], ['help']]) {
      const r = await inTmp(args);
      expect(r.status).toBe(0);
      for (const c of ['probe', 'demo', 'bench']) expect(r.stdout).toMatch(new RegExp(`^  ${c}\\s`, 'm'));
      for (const l of EXIT_LINES) expect(r.stdout).toMatch(l);
    }
  });

  it('bench --help lists every suite', async () => {
    const { SUITES } = await import('../lib/bench/cli.js');
    const r = await inTmp(['bench', '--help']);
    for (const s of SUITES) expect(r.stdout).toMatch(new RegExp(`^  ${s}\\s`, 'm'));
  });

  it('--version prints the package version', async () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
    const r = await inTmp(['--version']);
    expect(r.status).toBe(0);
    expect(r.stdout).toBe(`${pkg.version}\n`);
  });

  const bad: [string[], RegExp][] = [
    [['bench', '--frob'], /unknown option '--frob'/],
    [['bench', '--jsn'], /unknown option '--jsn' \(did you mean --json\?\)/],
    [['bench', '--pagse', '64'], /unknown option '--pagse' \(did you mean --pages\?\)/],
    [['bench', '--pages=x'], /--pages must be a positive integer, got 'x'/],
    [['bench', '--pages', '0'], /--pages must be/],
    [['bench', '--pages', '8'], /--pages must be from 16/],
    [['bench', '--reps=-1'], /--reps must be a positive integer/],
    [['bench', '--pages'], /--pages .*missing/],
    [['bench', '--size', '3000'], /--size must be a whole number of MiB/],
    [['bench', '--size', '1T'], /--size must be a size in bytes/],
    [['bench', '--dir', '/nonexistent-pagemirror'], /--dir .* is not an existing directory/],
    [['bench', '--json=yes'], /'--json' does not take an argument/],
    [['bench', '64'], /unknown suite '64'/],
    [['bench', 'pager', '--cells', '2M x3'], /--cells: 'x3' names nothing in the matrix \(words: .*\bx2\b/],
    [['bench', 'pager', '--quick', '--cells', '2M'], /--cells: '2M' names nothing in the --quick matrix/],
    [['bench', 'pager', '--cells', 'write-back x2'], /--cells: 'write-back x2' matches no cell/],
    [['bench', 'pager', '--cells', 'tmpfs,'], /--cells has an empty pattern/],
    [['bench', 'faults', '--cells', '2M'], /--cells applies to the pager suite/],
    [['bench', 'pager', '--writeback', 'bogus'], /--writeback must be pagecache or confirmed, got 'bogus'/],
    [['bench', 'faults', '--writeback', 'confirmed'], /--writeback applies to the pager suite/],
    [['bench', 'pager', '--spin-us', '1.5'], /--spin-us must be an integer from 0 to 1000000, got '1.5'/],
    [['bench', 'pager', '--spin-us', '2000000'], /--spin-us must be an integer from 0 to 1000000/],
    [['bench', 'faults', '--spin-us', '50'], /--spin-us applies to the pager suite/],
    [['bench', 'faults', '--c-tracks-dirty'], /--c-tracks-dirty applies to the pager suite/],
    [['probe', '--frob'], /unknown option '--frob'/],
    [['probe', 'extra'], /unexpected argument 'extra'/],
    [['demo', '--jsn'], /unknown option '--jsn'/],
    [['nosuch'], /unknown command 'nosuch'/],
    [['--frob'], /unknown option '--frob'/],
    [['help', 'nosuch'], /unknown command 'nosuch'/],
  ];
  for (const [args, msg] of bad)
    it(`${args.join(' ')}: exit 2, one line pointing at --help`, async () => {
      const r = await inTmp(args);
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr).toMatch(msg);
      expect(r.stderr).toMatch(/see 'pagemirror( \w+)? --help'\n$/);
      expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
      expect(r.stdout).toBe('');
      expect(r.wrote).toEqual([]);
    });
});

describe('command line: --flag=value, --json, --quick', () => {
  it('bench --pages=64 --reps=1 --json: the values are used, stdout is the results as JSON, progress on stderr', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-bench-'));
    try {
      const r = spawnSync(process.execPath, [cli, 'bench', 'dirty', '--pages=64', '--reps=1', `--out=${out}`, '--json'], { encoding: 'utf8', timeout: 60_000 });
      expect(r.status, r.stderr).toBe(0);
      const j = JSON.parse(r.stdout); // all of stdout, nothing else
      expect(j.ok).toBe(true);
      expect(j.reports.map((x: { suite: string }) => x.suite)).toEqual(['dirty']);
      const rep = j.reports[0];
      expect(JSON.parse(fs.readFileSync(rep.file, 'utf8'))).toEqual({ env: rep.env, data: rep.data });
      expect(fs.existsSync(rep.html)).toBe(true);
      for (const row of rep.data) if (!row.skipped) expect(row.found).toBe(16); // a quarter of 64 pages, not of 4096
      expect(r.stderr).toMatch(/^dirty tracking \[/m); // progress
      expect(r.stderr).toMatch(/^dirty tracking \(kernel/m); // the summary, off stdout
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 90_000);

  it('bench pager --cells runs the cells named and no other, each named in the progress with its time', (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-bench-'));
    try {
      const cells = 'tmpfs 64K x1 25% seq-read, write-back tmpfs 64K';
      const r = spawnSync(process.execPath, [cli, 'bench', 'pager', '--cells', cells, '--reps', '2', '--spin-us', '20', '--c-tracks-dirty', '--out', out, '--json'], { encoding: 'utf8', timeout: 90_000 });
      expect(r.status === 0 || r.status === 3, r.stderr).toBe(true); // 3: a target missed (speed is not a test's business)
      const data = JSON.parse(r.stdout).reports[0].data;
      expect(data.cells.map((c: { fs: string; granule: number; threads: number; limit: string; workload: string }) => [c.fs, c.granule, c.threads, c.limit, c.workload])).toEqual([['tmpfs', 64 << 10, 1, '25%', 'seq-read']]);
      expect(data.spinUs).toBe(20);
      expect(data.cTracksDirty).toBe(true); // the C pager registered WP and copied read-filled granules in protected
      // The ratio is per repetition (pager and C paired), with its interval and a verdict.
      const paired = data.cells[0].paired;
      expect(paired.pairs).toHaveLength(2);
      expect(paired.low).toBeLessThanOrEqual(paired.median);
      expect(paired.high).toBeGreaterThanOrEqual(paired.median);
      expect(['meets', 'misses', 'undecided']).toContain(paired.verdict);
      expect(data.verdicts.meets + data.verdicts.misses + data.verdicts.undecided).toBe(1);
      expect(data.writeback.map((w: { fs: string; granule: number }) => [w.fs, w.granule])).toEqual([['tmpfs', 64 << 10]]);
      expect(r.stderr).toMatch(/^pager \[#+\.*\]\s+50% tmpfs 64K x1 25% seq-read: .*\(\d+\.\d s\)$/m);
      expect(r.stderr).toMatch(/^pager \[#+\]\s+100% write-back tmpfs 64K: .*\(\d+\.\d s\)$/m);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 120_000);

  it('bench --quick is a smoke-sized run; a flag given overrides the preset', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-bench-'));
    try {
      const r = spawnSync(process.execPath, [cli, 'bench', 'dirty', 'batching', '--quick', '--out', out, '--json', '--quiet'], { encoding: 'utf8', timeout: 90_000 });
      expect(r.status, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      const j = JSON.parse(r.stdout);
      const dirty = j.reports.find((x: { suite: string }) => x.suite === 'dirty');
      for (const row of dirty.data) if (!row.skipped) expect(row.found).toBe(64); // 256 pages
      const batching = j.reports.find((x: { suite: string }) => x.suite === 'batching');
      for (const p of batching.data) expect(p.gbps.samples).toHaveLength(2);
      const r2 = spawnSync(process.execPath, [cli, 'bench', 'dirty', '--quick', '--pages', '128', '--out', out, '--json', '--quiet'], { encoding: 'utf8', timeout: 60_000 });
      for (const row of JSON.parse(r2.stdout).reports[0].data) if (!row.skipped) expect(row.found).toBe(32);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 120_000);
});

describe('command line: failures are one line', () => {
  it('without the addon, probe says ERR_PAGEMIRROR_NOT_BUILT in one line and exits 1; --help still works', () => {
    // The compiled CLI, package.json and its loader dependency, as an install whose build step did
    // not run and that has no prebuilt binary.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-nobuild-'));
    try {
      fs.cpSync(path.join(root, 'dist'), path.join(dir, 'dist'), { recursive: true });
      fs.copyFileSync(path.join(root, 'package.json'), path.join(dir, 'package.json'));
      fs.mkdirSync(path.join(dir, 'node_modules'));
      fs.symlinkSync(path.join(root, 'node_modules', 'node-gyp-build'), path.join(dir, 'node_modules', 'node-gyp-build'));
      const bare = path.join(dir, 'dist', 'cli.js');
      // PAGEMIRROR_ADDON (the sanitizer run's) would name an addon that is built.
      const env = { ...process.env, PAGEMIRROR_ADDON: '' };
      for (const cmd of ['probe', 'demo', 'bench']) {
        const r = spawnSync(process.execPath, [bare, cmd], { encoding: 'utf8', timeout: 30_000, cwd: dir, env });
        expect(r.status, r.stderr).toBe(1);
        expect(r.stderr).toMatch(/^pagemirror: ERR_PAGEMIRROR_NOT_BUILT: the native addon is not built .*npm install/);
        expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
      }
      const h = spawnSync(process.execPath, [bare, 'probe', '--help'], { encoding: 'utf8', timeout: 30_000 });
      expect(h.status).toBe(0);
      expect(h.stdout).toMatch(/^usage: pagemirror probe/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('command line: a reader that stops early', () => {
  it('probe --json into a closed pipe: no stack trace, exit 0', async () => {
    const child = spawn(process.execPath, [cli, 'probe', '--json'], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000 });
    child.stdout.destroy(); // closed before the probe is written, as `| head -c0` would
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const code = await within(new Promise((res) => child.on('close', res)), 30_000, 'probe into a closed pipe');
    expect(stderr).toBe('');
    expect(code).toBe(0);
  });
});

describe('command line: interrupted bench strategies leaves no files', () => {
  /** Starts a strategies run, waits for a dataset file matching `where`, sends `sig`. */
  async function interrupt(where: 'tmpfs' | 'disk', sig: 'SIGINT' | 'SIGTERM') {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-bench-'));
    const disk = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-disk-'));
    const child = spawn(process.execPath, [cli, 'bench', 'strategies', '--pages', '2048', '--reps', '1', '--out', out, '--dir', disk, '--quiet'], { stdio: 'ignore' });
    const exited = new Promise<{ code: number | null; signal: string | null }>((res) => child.on('exit', (code, signal) => res({ code, signal })));
    const dir = where === 'tmpfs' ? '/dev/shm' : disk;
    const mine = () => fs.readdirSync(dir).filter((f) => f.startsWith(`pagemirror-bench-${child.pid}-`));
    try {
      await waitFor(() => mine().length > 0, 60_000, `a dataset file in ${dir}`);
      const seen = mine();
      child.kill(sig);
      const e = await within(exited, 30_000, `bench strategies after ${sig}`);
      return { ...e, seen, leftDisk: fs.readdirSync(disk), leftShm: fs.readdirSync('/dev/shm').filter((f) => f.startsWith(`pagemirror-bench-${child.pid}-`)) };
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      fs.rmSync(out, { recursive: true, force: true });
      fs.rmSync(disk, { recursive: true, force: true });
      for (const f of fs.readdirSync('/dev/shm')) if (f.startsWith(`pagemirror-bench-${child.pid}-`)) fs.rmSync(path.join('/dev/shm', f), { force: true });
    }
  }

  const cases = [
    { where: 'tmpfs', sig: 'SIGINT', text: 'SIGINT while a file is in /dev/shm' },
    { where: 'disk', sig: 'SIGTERM', text: 'SIGTERM while a file is in the disk directory' },
  ] as const;
  for (const c of cases)
    it(`${c.text}: removed, and the run ends by ${c.sig}`, async (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      if (c.where === 'tmpfs') requireCap(ctx, P.experiments.tmpfs, 'tmpfs at /dev/shm');
      const r = await interrupt(c.where, c.sig);
      expect(r.seen.length).toBe(1);
      expect(r.leftShm).toEqual([]);
      expect(r.leftDisk).toEqual([]);
      expect(r.signal).toBe(c.sig);
    }, 120_000);
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
    it(`examples/${name} runs`, async (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      const script = name.endsWith('.ts') ? path.join(root, 'dist', 'examples', name.replace(/\.ts$/, '.js')) : path.join(root, 'examples', name);
      const args = name === 'file-strategies.ts' ? ['--size', String(1 << 20)] : [];
      // Each takes 2-10 s here; one that has not ended in 60 s is stuck, and says where.
      const r = await runNodeScript(script, args, { timeoutMs: 60_000, cwd: root });
      expect(r.states, `killed after ${r.ms} ms; its threads:\n${r.states}\nstderr: ${r.stderr}`).toBe('');
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout.length).toBeGreaterThan(0);
    }, 90_000);
  }
});
