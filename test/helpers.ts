// Shared test helpers: the probe (skips cite it), page size, and a bounded wait.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll } from 'vitest';
import { probe, type Capability } from '../lib/index.js';

export const P = probe();
export const PAGE = P.pageSize;
/** Scripts run as separate processes; they import ../../dist (compiled by test/global-setup.ts). */
export const FIXTURES_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures');

/** What a fixture process did: its output split into lines, and how long it ran. */
export interface FixtureRun {
  status: number | null;
  signal: NodeJS.Signals | null;
  error?: Error;
  stdout: string;
  stderr: string;
  lines: string[];
  ms: number;
  /** The last line reached and the stderr, for assertion messages. */
  progress: string;
}

/**
 * Runs test/fixtures/NAME in its own Node process, killed with SIGKILL after timeoutMs: a fixture
 * looks for hangs (a deadlocked fork, a thread asleep on a fault) that cannot be interrupted in
 * the test's own process.
 */
export function runFixture(name: string, args: string[] = [], timeoutMs = 10_000): FixtureRun {
  const t0 = Date.now();
  const res = spawnSync(process.execPath, [path.join(FIXTURES_DIR, name), ...args], {
    encoding: 'utf8',
    timeout: timeoutMs,
    killSignal: 'SIGKILL',
  });
  const lines = res.stdout.split('\n').filter(Boolean);
  return {
    status: res.status,
    signal: res.signal,
    error: res.error,
    stdout: res.stdout,
    stderr: res.stderr,
    lines,
    ms: Date.now() - t0,
    progress: `reached ${lines.at(-1) ?? 'no line'}; stderr: ${res.stderr}`,
  };
}

/**
 * Runs test/fixtures/NAME as {@link runFixture} does, but tells a deadlock from slowness by
 * progress: the fixture prints a line per step, and is killed (SIGKILL) when no line came for
 * `stallMs`, or after `totalMs` in all. `stalled` says which: a deadlocked fork never prints again,
 * while a run that is only slow (the sanitizers, a loaded machine) keeps printing. Bounds on a
 * whole run confused the two in CI (a sanitized run reached round 46 of 60 in 20 s: slow, not
 * stuck).
 */
export function runFixtureWatched(name: string, args: string[], bounds: { stallMs: number; totalMs: number }): Promise<FixtureRun & { stalled: boolean }> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(FIXTURES_DIR, name), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '', stalled = false;
    let states = '';
    const kill = (why: 'stall' | 'total') => {
      stalled = why === 'stall';
      states = threadStates(child.pid);
      child.kill('SIGKILL');
    };
    let stall = setTimeout(() => kill('stall'), bounds.stallMs);
    const total = setTimeout(() => kill('total'), bounds.totalMs);
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
      clearTimeout(stall);
      stall = setTimeout(() => kill('stall'), bounds.stallMs);
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('close', (status, signal) => {
      clearTimeout(stall);
      clearTimeout(total);
      const lines = stdout.split('\n').filter(Boolean);
      const ms = Date.now() - t0;
      resolve({ status, signal, stdout, stderr, lines, ms, stalled, progress: `reached ${lines.at(-1) ?? 'no line'} after ${ms} ms${signal ? (stalled ? `, no line for ${bounds.stallMs} ms` : `, past ${bounds.totalMs} ms in all`) : ''}; stderr: ${stderr}${states ? `\nthreads when killed:\n${states}` : ''}` });
    });
  });
}

/**
 * Where each thread of a live process sleeps, for the message of a test that timed out waiting on
 * it: a hang here is a thread asleep in the kernel (handle_userfault, a lock), and the state,
 * wait channel and kernel stack say which. The stack needs root; without it, state and wchan only.
 */
export function threadStates(pid: number | undefined): string {
  if (pid === undefined) return 'no pid';
  const read = (f: string): string => {
    try {
      return fs.readFileSync(f, 'utf8').trim();
    } catch (err) {
      return `(${(err as NodeJS.ErrnoException).code ?? 'unreadable'})`;
    }
  };
  let tids: string[];
  try {
    tids = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return `process ${pid} is gone`;
  }
  return tids
    .map((tid) => {
      const dir = `/proc/${pid}/task/${tid}`;
      const stat = read(`${dir}/stat`);
      const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
      const stack = read(`${dir}/stack`).split('\n').map((l) => `      ${l}`).join('\n');
      return `  thread ${tid} (${read(`${dir}/comm`)}) state ${state} wchan ${read(`${dir}/wchan`)}\n${stack}`;
    })
    .join('\n');
}

/**
 * Runs a Node script in a child, asynchronously (the JavaScript thread stays free, so the test
 * watchdog never mistakes a slow child for a native deadlock). Past `timeoutMs` the child is
 * killed, after its threads' states were taken (`states`): a hang says where it sleeps.
 */
export function runNodeScript(script: string, args: string[], opts: { timeoutMs: number; cwd?: string }): Promise<{ status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number; states: string }> {
  const t0 = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, ...args], { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '', states = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      states = threadStates(child.pid);
      child.kill('SIGKILL');
    }, opts.timeoutMs);
    child.on('error', reject);
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({ status, signal, stdout, stderr, ms: Date.now() - t0, states });
    });
  });
}

/** Skips the running test, visibly, with the probe's reason, when a capability is absent. */
export function requireCap(ctx: { skip: (note?: string) => void }, cap: Capability, what: string): void {
  if (!cap.ok) ctx.skip(`${what}: ${cap.reason ?? 'not available'}`);
}

/**
 * Why attaching a program (the preload shim) is skipped for a user-mode-only descriptor: the shim
 * refuses one, since the program's read(2) into attached memory would fail with EFAULT.
 */
export const USER_MODE_ONLY =
  'attaching a program needs faults raised inside the kernel too (its read(2) into attached memory), and userfaultfd is user-mode only for this user (vm.unprivileged_userfaultfd=0, no CAP_SYS_PTRACE): the shim runs the program unattached';

/**
 * The environment for a `pagemirror run`/`record` child: without the sanitizer's runtimes and
 * addon under `npm run test:sanitize`. The attached program would inherit them, and a process has
 * one allocator: ASan's must come first and would then take the large allocations the shim
 * attaches. The server side is checked sanitized by the fault-server tests.
 */
export function attachEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  if (process.env.PAGEMIRROR_SANITIZED) {
    for (const k of ['LD_PRELOAD', 'PAGEMIRROR_ADDON', 'PAGEMIRROR_SANITIZED', 'ASAN_OPTIONS', 'UBSAN_OPTIONS', 'LSAN_OPTIONS']) delete env[k];
  }
  return env;
}

/** Resolves when pred() holds; rejects after ms (a hung fault must fail the test, not hang it). */
export async function waitFor(pred: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** A promise that rejects after ms: race it against anything that could hang. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<T>((_, rej) => {
      t = setTimeout(() => rej(new Error(`${what} did not finish within ${ms} ms`)), ms);
    }),
  ]);
}

/** The value a write access with this seed stores at byte offset `off` (seed + word index). */
export function written(seed: number, off: number): bigint {
  return BigInt(seed) + BigInt(off / 8);
}

export function fillPattern(buf: Uint8Array, seed: number): Uint8Array {
  const w = new BigUint64Array(buf.buffer, buf.byteOffset, buf.byteLength / 8);
  for (let i = 0; i < w.length; i++) w[i] = BigInt(seed) + BigInt(i);
  return buf;
}

/** A small deterministic PRNG (a run is reproducible from its seed); the fuzz workers use it too. */
// @ts-expect-error plain JavaScript module (the fuzz workers run it without a TypeScript step)
export { rng } from './fuzz/values.mjs';

/**
 * A list of closers run (last first) after each test of the file that calls this, whatever the
 * test's outcome; a closer that throws (the thing is gone already) does not stop the others.
 */
export function cleanupAfterEach(): (() => void)[] {
  const list: (() => void)[] = [];
  afterEach(() => {
    while (list.length) {
      try {
        list.pop()!();
      } catch {
        /* already gone */
      }
    }
  });
  return list;
}

/**
 * A small tmpfs of `pages` pages mounted for the enclosing describe() (root only): `dir` is its
 * mount point once mounted, `why` says why not. Set-up failures fail the suite; unmounted after it.
 */
export function smallTmpfs(pages: number, name: string): { dir?: string; why: string } {
  const t: { dir?: string; why: string } = { why: '' };
  beforeAll(() => {
    if (process.getuid?.() !== 0) return void (t.why = 'mounting a small tmpfs needs root');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `${name}-`));
    const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${pages * PAGE}`, name, dir], { encoding: 'utf8', timeout: 30_000 });
    if (r.status !== 0) throw new Error(`mount -t tmpfs failed: ${r.stderr.trim()}`);
    t.dir = dir;
  });
  afterAll(() => {
    if (!t.dir) return;
    spawnSync('umount', [t.dir], { timeout: 30_000 });
    fs.rmSync(t.dir, { recursive: true, force: true });
  });
  return t;
}
