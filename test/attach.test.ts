// pagemirror run and the preload shim (docs/attach.md): unmodified programs attached to a fault
// server under a resident-set limit small enough to migrate pages both ways, their output compared
// byte for byte with a run without the shim; what a program may do to attached memory (fork,
// munmap, mremap, madvise, realloc); refusals of what no preload reaches.
import { describe, it, expect } from 'vitest';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { P, FIXTURES_DIR, USER_MODE_ONLY, attachEnv, requireCap, waitFor, within } from './helpers.js';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(root, 'dist', 'cli.js');
const shim = path.join(root, 'build', 'Release', 'pagemirror_preload.so');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-attach-test-'));
// The interpreter itself, not a launcher script (pyenv's shims run a shell first, which would be
// attached, and say so, too).
const py = spawnSync('python3', ['-c', 'import sys; print(sys.executable)'], { encoding: 'utf8' });
const python = py.status === 0 ? py.stdout.trim() : undefined;

interface Report {
  exitCode: number;
  processes: number;
  faults: { total: number; missingZero: number; missingFromDevice: number; minor: number; wp: number; retried: number; raced: number; fallback: number; other: number };
  migrations: { toDevice: { total: number; residentLimit: number }; toHost: { total: number; cpuFault: number; prefetch: number; release: number } };
  eviction: { policy: string; secondChances: number; examined: number };
  writes: { method: string; rounds: number; roundMs: number; protectedPages: number; wpFaults: number; distinctPages: number; perInterval: { ms: number; pages: number }[]; lost: number };
  samples: unknown[];
  ranges: unknown[];
}

function needServing(ctx: { skip: (note?: string) => void }): void {
  requireCap(ctx, P.experiments.uffd, 'userfaultfd');
  // Migration to the pool needs MISSING and WP on shared memory (the client's memfd).
  requireCap(ctx, P.experiments.fileCpuFaults, 'userfaultfd on shared memory');
  if (P.uffd.userModeOnly) ctx.skip(USER_MODE_ONLY);
}

function cc(ctx: { skip: (note?: string) => void }, out: string, src: string, extra: string[] = []): void {
  const r = spawnSync('cc', ['-O2', '-o', out, src, ...extra], { encoding: 'utf8', timeout: 60_000 });
  if (r.error || r.status !== 0) ctx.skip(`cannot compile with the system cc: ${r.error?.message ?? r.stderr.split('\n')[0]}`);
}

/** A child's exit and output; spawned, not spawnSync'd: an attached run under load can take longer
 * than the test watchdog lets the JavaScript thread block (it looks for native deadlocks). */
function spawnAsync(cmd: string, args: string[], opts: { cwd: string; input?: string; env?: NodeJS.ProcessEnv; timeout: number }) {
  return new Promise<{ status: number | null; stdout: Buffer; stderr: Buffer }>((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeout);
    child.once('error', reject);
    child.once('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout: Buffer.concat(out), stderr: Buffer.concat(err) });
    });
  });
}

/** The program alone, then under pagemirror run with the report as JSON on stderr. */
async function both(argv: string[], runFlags: string[], opts: { input?: string; cwd?: string } = {}) {
  const plain = await spawnAsync(argv[0]!, argv.slice(1), { cwd: opts.cwd ?? tmp, input: opts.input, timeout: 120_000 });
  const run = await spawnAsync(process.execPath, [cli, 'run', '--json', ...runFlags, '--', ...argv], { env: attachEnv(), cwd: opts.cwd ?? tmp, input: opts.input, timeout: 180_000 });
  const err = run.stderr.toString();
  const line = err.split('\n').filter((l) => l.startsWith('{')).pop();
  return { plain, run, err, report: line ? (JSON.parse(line) as Report) : undefined };
}

/** The counters agree with each other and show migration both ways. */
function checkConsistent(r: Report | undefined, err: string): void {
  expect(r, err).toBeDefined();
  const f = r!.faults;
  expect(r!.processes).toBeGreaterThan(0);
  expect(f.other, JSON.stringify(f)).toBe(0);
  expect(f.missingZero + f.missingFromDevice + f.minor + f.wp + f.retried + f.raced + f.fallback).toBe(f.total);
  expect(r!.migrations.toDevice.total).toBeGreaterThan(0);
  expect(r!.migrations.toDevice.residentLimit).toBe(r!.migrations.toDevice.total);
  expect(r!.migrations.toHost.cpuFault).toBeGreaterThan(0);
  expect(r!.migrations.toHost.cpuFault).toBe(f.missingFromDevice);
  expect(r!.migrations.toHost.cpuFault + r!.migrations.toHost.prefetch + r!.migrations.toHost.release).toBe(r!.migrations.toHost.total);
  expect(r!.writes.lost).toBe(0);
  // Every page taken away came back: by a fault, or when the program released its range.
  expect(r!.migrations.toHost.total).toBeLessThanOrEqual(r!.migrations.toDevice.total);
  expect(r!.samples.length).toBeGreaterThan(0);
  expect(r!.ranges.length).toBeGreaterThan(0);
}

describe('pagemirror run', () => {
  it('sorts a 24 MiB file with GNU sort attached, byte for byte as without the shim', { timeout: 300_000 }, async (ctx) => {
    needServing(ctx);
    if (spawnSync('sort', ['--version']).status !== 0) ctx.skip('no sort on PATH');
    const lines: string[] = [];
    let x = 12345;
    let size = 0;
    while (size < 24 << 20) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      const l = `${x.toString(16).padStart(8, '0')} ${(x % 99991).toString().padStart(5, '0')} ${'abcdefghij'.slice(x % 10)}`;
      lines.push(l);
      size += l.length + 1;
    }
    const input = path.join(tmp, 'sort.in');
    fs.writeFileSync(input, lines.join('\n') + '\n');
    const { plain, run, err, report } = await both(['sort', '-S', '16M', '--parallel=1', input], ['--resident', '8M', '--threshold', '1M']);
    expect(plain.status).toBe(0);
    expect(run.status, err.slice(0, 2000)).toBe(0);
    expect(run.stdout.length).toBe(plain.stdout.length);
    expect(Buffer.compare(run.stdout, plain.stdout)).toBe(0);
    checkConsistent(report, err);
  });

  it('runs a C matrix multiply attached, same output', { timeout: 300_000 }, async (ctx) => {
    needServing(ctx);
    const exe = path.join(tmp, 'matmul');
    cc(ctx, exe, path.join(FIXTURES_DIR, 'matmul.c'));
    const { plain, run, err, report } = await both([exe, '384'], ['--resident', '1M', '--threshold', '256K']);
    expect(plain.status).toBe(0);
    expect(run.status, err.slice(0, 2000)).toBe(0);
    expect(run.stdout.toString()).toBe(plain.stdout.toString());
    checkConsistent(report, err);
  });

  it('runs a python3 numeric program attached, same output', { timeout: 300_000 }, async (ctx) => {
    needServing(ctx);
    if (!python) ctx.skip('no python3 on PATH');
    const prog = [
      'import array',
      'n = 1 << 20',
      "a = array.array('d', (float(i % 1000) for i in range(n)))",
      "b = array.array('q', range(n))",
      'for r in range(2):',
      '    s = 0.0',
      '    for i in range(0, n, 7): a[i] = a[i] * 1.5 + b[(i * 31) % n] % 13; s += a[i]',
      "    print(r, f'{s:.6f}', sum(b[::4096]))",
    ].join('\n');
    const { plain, run, err, report } = await both([python!, '-c', prog], ['--resident', '4M', '--threshold', '1M']);
    expect(plain.status, plain.stderr.toString()).toBe(0);
    expect(run.status, err.slice(0, 2000)).toBe(0);
    expect(run.stdout.toString()).toBe(plain.stdout.toString());
    checkConsistent(report, err);
  });

  it('fork, munmap, mremap, madvise, realloc and calloc of attached memory behave as without the shim', { timeout: 120_000 }, async (ctx) => {
    needServing(ctx);
    const exe = path.join(tmp, 'attach-ops');
    cc(ctx, exe, path.join(FIXTURES_DIR, 'attach-ops.c'));
    const { plain, run, err, report } = await both([exe], ['--resident', '1M', '--threshold', '1M']);
    expect(plain.status).toBe(0);
    const out = plain.stdout.toString();
    // The checks hold without the shim (else the fixture is wrong) ...
    expect(out).not.toMatch(/(kept|zero|zeros|data|usable) 0\b|exited [^0]/);
    expect(out.split('\n').filter(Boolean)).toHaveLength(7);
    // ... and with it.
    expect(run.status, err.slice(0, 2000)).toBe(0);
    expect(run.stdout.toString()).toBe(out);
    checkConsistent(report, err);
    expect(report!.migrations.toHost.release).toBeGreaterThan(0);
    // The program's stderr is its own: no server warnings in it.
    expect(err).not.toMatch(/Warning/);
  });

  it('a parent attaches its ranges again after a fork: writes on both sides kept, memory back on the device', { timeout: 120_000 }, async (ctx) => {
    needServing(ctx);
    const exe = path.join(tmp, 'fork-reattach');
    cc(ctx, exe, path.join(FIXTURES_DIR, 'fork-reattach.c'));
    const { plain, run, err, report } = await both([exe, '4'], ['--resident', '1M', '--threshold', '1M']);
    expect(plain.status, plain.stderr.toString()).toBe(0);
    const out = plain.stdout.toString();
    expect(out).not.toMatch(/(data|kept) 0\b|exited [^0]/);
    expect(out.split('\n').filter(Boolean)).toHaveLength(5);
    expect(plain.stderr.toString()).toMatch(/attached after the forks: block 0 mapping 0/);
    expect(run.status, err.slice(0, 2000)).toBe(0);
    expect(run.stdout.toString()).toBe(out);
    // Without pm_adopt after the fork both would be 0: the ranges released for the fork stayed private.
    expect(err).toMatch(/attached after the forks: block 1 mapping 1/);
    checkConsistent(report, err);
    expect(report!.migrations.toHost.release).toBeGreaterThan(0);
  });

  // A release copies a range and then replaces its mapping (docs/attach.md, "Where shared is not
  // private"): a write another thread makes to a page between its copy and the replacement must
  // not be lost. Writers keep writing their own pages while the main thread forks, or madvises or
  // shrinks its own part of the same range.
  for (const mode of ['fork', 'madvise', 'mremap'] as const) {
    it(`keeps every write of threads racing a release by ${mode}`, { timeout: 180_000 }, async (ctx) => {
      needServing(ctx);
      const exe = path.join(tmp, 'fork-race');
      cc(ctx, exe, path.join(FIXTURES_DIR, 'fork-race.c'), ['-pthread']);
      const { plain, run, err, report } = await both([exe, mode, '2', '20', '4'], ['--threshold', '1M']);
      const summary = /^fork-race .*: (\d+) writes, lost (\d+) /m;
      const said = err.split('\n').filter((l) => !l.startsWith('{')).join('\n').slice(-2000);
      expect(plain.status, plain.stdout.toString() + plain.stderr.toString()).toBe(0);
      const line = run.stdout.toString().match(summary);
      expect(line, said).not.toBeNull();
      expect(Number(line![1])).toBeGreaterThan(0);
      expect(line![0], said).toMatch(/lost 0 /);
      expect(run.status, said).toBe(0);
      expect(report!.ranges.length).toBeGreaterThan(0);
    });
  }

  it('says once that it cannot hold writes, and releases as before, when no new userfaultfd is to be had (seccomp)', { timeout: 120_000 }, async (ctx) => {
    needServing(ctx);
    const exe = path.join(tmp, 'fork-race');
    cc(ctx, exe, path.join(FIXTURES_DIR, 'fork-race.c'), ['-pthread']);
    // The filter comes after the shim connected: its own userfaultfd is there, a window's is refused.
    const { plain, run, err } = await both([exe, 'fork', '1', '5', '4', 'nouffd'], ['--threshold', '1M']);
    if (plain.status === 3) ctx.skip('no seccomp filter for this process (prctl PR_SET_SECCOMP failed)');
    expect(plain.status, plain.stdout.toString() + plain.stderr.toString()).toBe(0);
    // Writes racing the unheld copies may be lost (exit 1), as they were before the hold.
    expect([0, 1], err.slice(-2000)).toContain(run.status);
    expect(run.stdout.toString()).toMatch(/^fork-race fork: 1 writers, 5 rounds/m);
    const said = err.split('\n').filter((l) => l.startsWith('pagemirror: a range changes hands without holding'));
    expect(said, err.slice(-2000)).toHaveLength(1);
    expect(said[0]).toMatch(/Operation not permitted$/);
  });

  it('propagates the exit status and a signal as 128 + signal', { timeout: 60_000 }, async (ctx) => {
    needServing(ctx);
    const prog = 'import os, signal, sys\nb = bytearray(4 << 20)\nb[0] = 1\nif sys.argv[1] == "kill": os.kill(os.getpid(), signal.SIGTERM)\nsys.exit(7)';
    if (!python) ctx.skip('no python3 on PATH');
    const seven = spawnSync(process.execPath, [cli, 'run', '--', python!, '-c', prog, 'exit'], { env: attachEnv(), encoding: 'utf8', timeout: 60_000 });
    expect(seven.status, seven.stderr).toBe(7);
    const killed = spawnSync(process.execPath, [cli, 'run', '--', python!, '-c', prog, 'kill'], { env: attachEnv(), encoding: 'utf8', timeout: 60_000 });
    expect(killed.status, killed.stderr).toBe(128 + os.constants.signals.SIGTERM);
  });

  it('writes the report as JSON and HTML with --out', { timeout: 60_000 }, async (ctx) => {
    needServing(ctx);
    if (!python) ctx.skip('no python3 on PATH');
    const out = path.join(tmp, 'report');
    const r = spawnSync(process.execPath, [cli, 'run', '--out', out, '--', python!, '-c', 'b = bytearray(8 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1'], { env: attachEnv(), encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    const files = fs.readdirSync(out);
    expect(files.filter((f) => f.endsWith('.json'))).toHaveLength(1);
    expect(files.filter((f) => f.endsWith('.html'))).toHaveLength(1);
    const json = JSON.parse(fs.readFileSync(path.join(out, files.find((f) => f.endsWith('.json'))!), 'utf8')) as { data: Report };
    expect(json.data.faults.total).toBeGreaterThan(0);
    expect(fs.readFileSync(path.join(out, files.find((f) => f.endsWith('.html'))!), 'utf8')).toContain('Resident set over time');
  });

  it('fails with exit 1 when nothing was attached', { timeout: 60_000 }, () => {
    const r = spawnSync(process.execPath, [cli, 'run', '--threshold', '1G', '--', 'true'], { env: attachEnv(), encoding: 'utf8', timeout: 60_000 });
    expect(r.status, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/nothing was attached/);
  });

  it('refuses a set-user-ID program', { timeout: 60_000 }, () => {
    const exe = path.join(tmp, 'suid-true');
    fs.copyFileSync(fs.realpathSync('/bin/true'), exe);
    fs.chmodSync(exe, 0o4755);
    const r = spawnSync(process.execPath, [cli, 'run', '--', exe], { env: attachEnv(), encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/ERR_PAGEMIRROR_NOT_ATTACHABLE: refused: .*set-user-ID/);
  });

  it('refuses a statically linked program', { timeout: 120_000 }, async (ctx) => {
    const exe = path.join(tmp, 'static-true');
    fs.writeFileSync(path.join(tmp, 'static.c'), 'int main(void) { return 0; }\n');
    cc(ctx, exe, path.join(tmp, 'static.c'), ['-static']);
    const r = spawnSync(process.execPath, [cli, 'run', '--', exe], { env: attachEnv(), encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/ERR_PAGEMIRROR_NOT_ATTACHABLE: refused: .*statically linked/);
  });

  it('usage errors exit 2', { timeout: 30_000 }, () => {
    const bad = [['--wp-interval', '-1'], ['--wp-interval', '60001'], ['--wp-interval', '1.5'], ['--prefetch', '513'], ['--prefetch', 'x'], ['--eviction', 'lru']];
    for (const args of [['run'], ['run', '--resident', '3', '--', 'true'], ['run', '--eviction', 'mru', '--', 'true'], ['run', '--bogus', '--', 'true'], ...bad.map((b) => ['run', ...b, '--', 'true'])]) {
      const r = spawnSync(process.execPath, [cli, ...args], { env: attachEnv(), encoding: 'utf8', timeout: 30_000 });
      expect(r.status, args.join(' ')).toBe(2);
    }
    expect(spawnSync(process.execPath, [cli, 'run', '--help'], { env: attachEnv(), encoding: 'utf8' }).stdout).toMatch(/usage: pagemirror run/);
  });
});

const summary = (r: Report) =>
  `to host ${JSON.stringify(r.migrations.toHost)}, to device ${r.migrations.toDevice.total}, eviction ${JSON.stringify(r.eviction)}, writes ${r.writes.distinctPages} distinct / ${r.writes.wpFaults} WP faults / ${r.writes.rounds} rounds`;

describe('pagemirror run policies', () => {
  it('write-protect rounds measure the pages written per interval; data intact under a tight limit and fast rounds', { timeout: 300_000 }, async (ctx) => {
    needServing(ctx);
    const exe = path.join(tmp, 'matmul');
    cc(ctx, exe, path.join(FIXTURES_DIR, 'matmul.c'));
    // Rounds every 1 ms race the evictions every 2 ms on a 256 KiB limit: every page is protected
    // over and over, and many are evicted while a round's protection is on them.
    const { plain, run, err, report } = await both([exe, '256'], ['--resident', '256K', '--threshold', '256K', '--interval', '2', '--wp-interval', '1']);
    expect(plain.status).toBe(0);
    expect(run.status, err.slice(0, 2000)).toBe(0);
    expect(run.stdout.toString()).toBe(plain.stdout.toString());
    checkConsistent(report, err);
    const w = report!.writes;
    expect(w.method).toBe('wp-rounds');
    expect(w.rounds).toBeGreaterThan(10);
    expect(w.protectedPages).toBeGreaterThan(0);
    expect(w.wpFaults).toBeGreaterThan(0);
    expect(w.perInterval.length).toBeGreaterThanOrEqual(w.rounds);
    // matmul writes its three 256x256 double matrices (3 x 128 pages) and C again per row.
    expect(w.distinctPages).toBeGreaterThanOrEqual(3 * 128);
    expect(w.distinctPages).toBeLessThanOrEqual(3 * 128 + 8);
    expect(Math.max(...w.perInterval.map((i) => i.pages))).toBeGreaterThan(0);
  });

  it('without rounds, writes are seen only by faults flagged as writes and no page is protected', { timeout: 120_000 }, async (ctx) => {
    needServing(ctx);
    const exe = path.join(tmp, 'reread');
    cc(ctx, exe, path.join(FIXTURES_DIR, 'reread.c'));
    const { plain, run, err, report } = await both([exe, '4', '50'], ['--resident', '1M', '--threshold', '256K', '--wp-interval', '0']);
    expect(run.status, err.slice(0, 2000)).toBe(0);
    expect(run.stdout.toString()).toBe(plain.stdout.toString());
    expect(report!.writes.method).toBe('none');
    expect(report!.writes.rounds).toBe(0);
    expect(report!.writes.protectedPages).toBe(0);
    // Each page's first touch is a write: a missing fault flagged WRITE. 4 MiB of data and the
    // shim's 16-byte block header: 1025 pages.
    expect(report!.writes.distinctPages).toBe(1025);
  });

  it('clock keeps a rewritten hot set resident while a cold stream passes: fewer migrations back to host than fifo', { timeout: 300_000 }, async (ctx) => {
    needServing(ctx);
    const exe = path.join(tmp, 'hot-cold');
    cc(ctx, exe, path.join(FIXTURES_DIR, 'hot-cold.c'));
    const args = [exe, '512', '8'];
    const flags = ['--resident', '1M', '--threshold', '256K', '--wp-interval', '20'];
    const fifo = await both(args, [...flags, '--eviction', 'fifo']);
    const clock = await both(args, [...flags, '--eviction', 'clock']);
    expect(fifo.plain.status).toBe(0);
    for (const r of [fifo, clock]) {
      expect(r.run.status, r.err.slice(0, 2000)).toBe(0);
      expect(r.run.stdout.toString()).toBe(fifo.plain.stdout.toString());
      checkConsistent(r.report, r.err);
    }
    const f = fifo.report!;
    const c = clock.report!;
    console.log(`hot-cold 512K hot, 8M cold, 1M limit, rounds 20 ms: fifo ${summary(f)}; clock ${summary(c)}`);
    expect(f.eviction.secondChances).toBe(0);
    expect(c.eviction.secondChances).toBeGreaterThan(0);
    // The final checksum reads every cold page back once (2048) under either policy; the rest of
    // the migrations back are the hot set's refaults, which clock should mostly avoid.
    expect(c.migrations.toHost.cpuFault).toBeLessThan(f.migrations.toHost.cpuFault);
    expect(c.migrations.toHost.cpuFault - 2048).toBeLessThan((f.migrations.toHost.cpuFault - 2048) / 2);
  });

  it('--prefetch N: a sequential re-read after eviction takes about 1/(N+1) of the faults', { timeout: 300_000 }, async (ctx) => {
    needServing(ctx);
    const exe = path.join(tmp, 'reread');
    cc(ctx, exe, path.join(FIXTURES_DIR, 'reread.c'));
    const runs: Awaited<ReturnType<typeof both>>[] = [];
    for (const n of [0, 7]) runs.push(await both([exe, '8', '300'], ['--resident', '256K', '--threshold', '256K', '--prefetch', String(n)]));
    for (const r of runs) {
      expect(r.run.status, r.err.slice(0, 2000)).toBe(0);
      expect(r.run.stdout.toString()).toBe(runs[0]!.plain.stdout.toString());
      checkConsistent(r.report, r.err);
    }
    const [none, eight] = runs.map((r) => r.report!);
    console.log(`reread 8 MiB, 256K limit: prefetch 0 ${summary(none!)}; prefetch 7 ${summary(eight!)}`);
    expect(none!.migrations.toHost.prefetch).toBe(0);
    expect(eight!.migrations.toHost.prefetch).toBeGreaterThan(0);
    // Nearly every page of 8 MiB (2048) was in the pool at the re-read.
    expect(none!.migrations.toHost.cpuFault).toBeGreaterThan(1800);
    const ratio = eight!.migrations.toHost.cpuFault / none!.migrations.toHost.cpuFault;
    expect(ratio).toBeGreaterThan(1 / 8 - 0.03);
    expect(ratio).toBeLessThan(1 / 8 + 0.1);
  });
});

describe('the preload shim', () => {
  it('lets the program run unattached, saying so once, when the server is unreachable', { timeout: 60_000 }, async (ctx) => {
    if (!python) ctx.skip('no python3 on PATH');
    const r = spawnSync(python!, ['-c', 'b = bytearray(8 << 20)\nb[-1] = 5\nprint(sum(b))'], {
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, LD_PRELOAD: shim, PAGEMIRROR_SOCKET: path.join(tmp, 'nobody-here.sock') },
    });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe('5\n');
    const lines = r.stderr.split('\n').filter((l) => l.startsWith('pagemirror:'));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/not attached: cannot connect to the fault server/);
  });

  // qemu-user implements no userfaultfd (ENOSYS): the arm64 prebuilt shim is checked the same way
  // from the packed tarball (scripts/test-package.sh --arm64). The server is there, so the message
  // must not blame the connection.
  it('lets the program run unattached, saying so once, when the process has no userfaultfd (under qemu-user)', { timeout: 120_000 }, async (ctx) => {
    const qemu = `qemu-${execFileSync('uname', ['-m'], { encoding: 'utf8' }).trim()}`;
    if (spawnSync(qemu, ['--version']).status !== 0) ctx.skip(`no ${qemu} on PATH (Debian: qemu-user)`);
    const socket = path.join(tmp, 'qemu.sock');
    const server = spawn(process.execPath, [cli, 'serve', '--socket', socket], { env: attachEnv(), stdio: ['ignore', 'ignore', 'pipe'] });
    let said = '';
    server.stderr.on('data', (d: Buffer) => (said += d.toString()));
    try {
      await waitFor(() => said.includes('listening') || server.exitCode !== null, 30_000, 'pagemirror serve to listen');
      if (!said.includes('listening')) ctx.skip(`pagemirror serve does not run here: ${said.trim()}`);
      const sort = spawnSync('sh', ['-c', 'command -v sort'], { encoding: 'utf8' }).stdout.trim();
      if (!sort) ctx.skip('no sort on PATH');
      const input = path.join(tmp, 'qemu-sort.in');
      fs.writeFileSync(input, Array.from({ length: 20_000 }, (_, i) => `${(i * 7919) % 20_011}\n`).join(''));
      const plain = spawnSync('sort', [input], { env: { ...process.env, LC_ALL: 'C' }, timeout: 60_000 });
      const r = spawnSync(qemu, ['-E', `LD_PRELOAD=${shim}`, '-E', `PAGEMIRROR_SOCKET=${socket}`, '-E', 'LC_ALL=C', sort, input], {
        env: attachEnv(),
        timeout: 90_000,
        maxBuffer: 1 << 26,
      });
      expect(r.status, r.stderr.toString()).toBe(0);
      expect(Buffer.compare(r.stdout, plain.stdout)).toBe(0);
      const lines = r.stderr.toString().split('\n').filter((l) => l.startsWith('pagemirror:'));
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/^pagemirror: not attached: no userfaultfd for this process \(the program runs without it\): /);
    } finally {
      const closed = new Promise((res) => server.once('close', res));
      if (server.exitCode === null && server.signalCode === null) {
        server.kill('SIGTERM');
        await within(closed, 10_000, 'pagemirror serve to exit on SIGTERM');
      }
    }
  });
});
