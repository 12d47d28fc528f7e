// Helpers of the fault-server tests: the server fixture and the C client programs as child
// processes, read line by line with bounded waits.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterEach, expect } from 'vitest';
import { FIXTURES_DIR, P, requireCap, threadStates, within } from './helpers.js';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
export const DEMO = path.join(ROOT, 'build', 'Release', 'pagemirror_client_demo');

/** A child whose stdout is read line by line; next(pred) waits (bounded) for a matching line. */
export class Lines {
  readonly lines: string[] = [];
  #waiters: (() => void)[] = [];
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr = '';
  constructor(readonly child: ChildProcess) {
    let buf = '';
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        this.lines.push(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
      for (const w of this.#waiters.splice(0)) w();
    });
    child.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    // 'close', not 'exit': it comes after the last of stdout has been read (a client's final line
    // could still be unread at 'exit').
    this.exit = new Promise((res) => child.on('close', (code, signal) => {
      for (const w of this.#waiters.splice(0)) w();
      res({ code, signal });
    }));
  }
  async next(pred: (line: string) => boolean, ms: number, what: string): Promise<string> {
    const end = Date.now() + ms;
    for (let seen = 0; ; ) {
      for (; seen < this.lines.length; seen++) if (pred(this.lines[seen]!)) return this.lines[seen]!;
      if (Date.now() > end || this.child.exitCode !== null || this.child.signalCode !== null) {
        for (; seen < this.lines.length; seen++) if (pred(this.lines[seen]!)) return this.lines[seen]!;
        const alive = this.child.exitCode === null && this.child.signalCode === null;
        const where = alive ? `\nthreads:\n${threadStates(this.child.pid)}` : `\nexited: ${this.child.exitCode ?? this.child.signalCode}`;
        throw new Error(`timed out waiting for ${what}; output:\n${this.lines.join('\n')}\nstderr:\n${this.stderr}${where}`);
      }
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, Math.min(50, end - Date.now())));
        this.#waiters.push(() => (clearTimeout(t), r()));
      });
    }
  }
  async json(event: string, ms: number): Promise<Record<string, unknown>> {
    return JSON.parse(await this.next((l) => l.startsWith(`{"event":"${event}"`), ms, event)) as Record<string, unknown>;
  }
  send(line: string): void {
    this.child.stdin!.write(line + '\n');
  }
}

const children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

export function sockPath(name: string): string {
  return path.join(fs.mkdtempSync(path.join(os.tmpdir(), `pm-${name}-`)), 's');
}

export async function startServer(sock: string, args: string[] = []): Promise<Lines> {
  const child = spawn(process.execPath, [path.join(FIXTURES_DIR, 'fault-server.mjs'), sock, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  children.push(child);
  const l = new Lines(child);
  await l.json('listening', 10_000);
  return l;
}

export function startDemo(sock: string, pages: number, mode: 'alloc' | 'attach' | 'detach' | 'hammer', delayUs = 0, uid?: number, threads = 1): Lines {
  const child = spawn(DEMO, [sock, String(pages), mode, String(delayUs), String(threads)], { stdio: ['pipe', 'pipe', 'pipe'], ...(uid === undefined ? {} : { uid, gid: uid }) });
  children.push(child);
  return new Lines(child);
}

/** The demo's final line: bad words and whether the watchdog took over. */
export async function finish(demo: Lines, ms: number): Promise<{ bad: number; lost: number }> {
  const ok = await demo.next((l) => l.startsWith('OK ') || l.startsWith('ERR '), ms, 'the client to read everything back');
  expect(ok).toMatch(/^OK /);
  const [, bad, lost] = ok.split(' ');
  await demo.next((l) => l.startsWith('CLOSED '), ms, 'pm_close');
  const exit = await within(demo.exit, ms, 'the client to exit');
  expect(exit.signal).toBeNull();
  return { bad: Number(bad), lost: Number(lost) };
}

export function needUffd(ctx: { skip: (note?: string) => void }, shared = true): void {
  requireCap(ctx, P.experiments.uffd, 'the fault server');
  // pm_alloc registers shared memory MISSING | MINOR | WP; evict needs WP on it.
  if (shared) requireCap(ctx, P.experiments.tmpfs, 'shared memory for pm_alloc');
  if (!fs.existsSync(DEMO)) ctx.skip(`the client demo was not built (${DEMO})`);
}

