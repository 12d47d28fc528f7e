// The fault server (docs/fault-server.md) with real client processes: the C client library's demo
// (build/Release/pagemirror_client_demo) hands its memory to a server running in another process,
// which serves its faults, takes pages away into the client's pool, and is SIGKILLed mid-run: the
// client's watchdog must take over with no data lost and no thread asleep.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { FaultServer, Userfaultfd } from '../lib/index.js';
import { FIXTURES_DIR, P, PAGE, requireCap, within } from './helpers.js';

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
    this.exit = new Promise((res) => child.on('exit', (code, signal) => {
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
        throw new Error(`timed out waiting for ${what}; output:\n${this.lines.join('\n')}\nstderr:\n${this.stderr}`);
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

export function startDemo(sock: string, pages: number, mode: 'alloc' | 'attach', delayUs = 0): Lines {
  const child = spawn(DEMO, [sock, String(pages), mode, String(delayUs)], { stdio: ['pipe', 'pipe', 'pipe'] });
  children.push(child);
  return new Lines(child);
}

/** The demo's final line: bad words and whether the watchdog took over. */
async function finish(demo: Lines, ms: number): Promise<{ bad: number; lost: number }> {
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

describe('fault server: serving another process', () => {
  it("serves a client's shared memory (pm_alloc): every missing fault answered, data correct", { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx);
    const sock = sockPath('alloc');
    const server = await startServer(sock);
    expect(fs.statSync(sock).mode & 0o777).toBe(0o600);
    const demo = startDemo(sock, 64, 'alloc');
    await demo.next((l) => l.startsWith('READY'), 10_000, 'READY');
    const client = await server.json('client', 10_000);
    const ranges = client.ranges as { modes: string[]; shared: boolean; length: number }[];
    expect(ranges).toHaveLength(1);
    expect(ranges[0]!.shared).toBe(true);
    expect(ranges[0]!.length).toBe(64 * PAGE);
    expect(ranges[0]!.modes).toContain('missing');
    demo.send('GO');
    const r = await finish(demo, 15_000);
    expect(r).toEqual({ bad: 0, lost: 0 });
    const exit = await server.json('exit', 10_000);
    // The first write of each page was a missing fault the server answered (a zero page).
    expect(exit.faults).toBeGreaterThanOrEqual(64);
    expect((exit.counters as { zeroFilled: number }).zeroFilled).toBe(64);
  });

  it("serves a client's anonymous memory (pm_attach)", { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx, false);
    const sock = sockPath('attach');
    const server = await startServer(sock);
    const demo = startDemo(sock, 32, 'attach');
    await demo.next((l) => l.startsWith('READY'), 10_000, 'READY');
    const client = await server.json('client', 10_000);
    expect((client.ranges as { shared: boolean }[])[0]!.shared).toBe(false);
    demo.send('GO');
    expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
    const exit = await server.json('exit', 10_000);
    expect((exit.counters as { zeroFilled: number }).zeroFilled).toBe(32);
  });

  it('evicted pages come back from the pool when the client touches them', { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx);
    const sock = sockPath('evict');
    const server = await startServer(sock);
    const demo = startDemo(sock, 128, 'alloc');
    const ready = await demo.next((l) => l.startsWith('READY'), 10_000, 'READY');
    const [, addr, bytes] = ready.split(' ');
    await server.json('client', 10_000);
    server.send(`evict ${addr} ${bytes}`);
    expect((await server.json('evicted', 10_000)).pages).toBe(128);
    demo.send('GO');
    expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
    const exit = await server.json('exit', 10_000);
    const counters = exit.counters as { evicted: number; restored: number; poolHeld: number };
    expect(counters.evicted).toBe(128);
    expect(counters.restored).toBe(128);
  });
});

describe('fault server: a server killed mid-run loses nothing and hangs nobody', () => {
  for (const when of ['after evicting everything', 'while the client reads', 'while evicting'] as const) {
    it(`SIGKILL ${when}`, { timeout: 40_000 }, async (ctx) => {
      needUffd(ctx);
      const sock = sockPath('kill');
      const server = await startServer(sock);
      const pages = 256;
      // The reader is slow enough that the kill lands while pages it has not read yet are in the pool.
      const demo = startDemo(sock, pages, 'alloc', when === 'after evicting everything' ? 0 : 1000);
      const ready = await demo.next((l) => l.startsWith('READY'), 10_000, 'READY');
      const [, addr, bytes] = ready.split(' ');
      await server.json('client', 10_000);
      if (when === 'while evicting') {
        demo.send('GO');
        server.send(`evict-slow ${addr} ${bytes}`);
        await server.next((l) => l.includes('"evicted-one","n":40,'), 10_000, 'forty pages evicted');
      } else {
        server.send(`evict ${addr} ${bytes}`);
        expect((await server.json('evicted', 10_000)).pages).toBe(pages);
        if (when === 'while the client reads') {
          demo.send('GO');
          await new Promise((r) => setTimeout(r, 25));
        }
      }
      server.child.kill('SIGKILL');
      expect((await within(server.exit, 10_000, 'the server to die')).signal).toBe('SIGKILL');
      if (when === 'after evicting everything') demo.send('GO');
      const r = await finish(demo, 25_000);
      expect(r).toEqual({ bad: 0, lost: 1 });
    });
  }
});

describe('fault server: API checks', () => {
  it('refuses bad arguments before any system call', async () => {
    await expect(FaultServer.listen(42 as unknown as string)).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_TYPE' });
    await expect(FaultServer.listen('')).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_VALUE' });
    await expect(FaultServer.listen('/tmp/x\0y')).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_VALUE' });
    await expect(FaultServer.listen('/tmp/x', { maxClients: 0 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await expect(FaultServer.listen('/tmp/x', { allowUids: [-1] })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await expect(FaultServer.listen('/tmp/x', { policy: 'manual' })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_VALUE' });
    await expect(FaultServer.listen('/tmp/x', [] as never)).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_TYPE' });
  });

  it('refuses a path that exists and is not a socket, and a live socket; replaces a stale one', { timeout: 20_000 }, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-path-'));
    const file = path.join(dir, 'file');
    fs.writeFileSync(file, 'keep me');
    await expect(FaultServer.listen(file)).rejects.toMatchObject({ code: 'EEXIST', syscall: 'listen', path: file });
    expect(fs.readFileSync(file, 'utf8')).toBe('keep me');
    const sock = path.join(dir, 's');
    const a = await FaultServer.listen(sock);
    await expect(FaultServer.listen(sock)).rejects.toMatchObject({ code: 'EADDRINUSE' });
    await a.close();
    expect(fs.existsSync(sock)).toBe(false);
    // A stale socket (its server was killed) is replaced.
    const server = await startServer(sock);
    server.child.kill('SIGKILL');
    await within(server.exit, 10_000, 'the server to die');
    expect(fs.statSync(sock).isSocket()).toBe(true);
    const b = await FaultServer.listen(sock);
    await b.close();
    await expect(FaultServer.listen(path.join(dir, 'x'.repeat(120)))).rejects.toMatchObject({ code: 'ENAMETOOLONG' });
  });

  it('rules by address are validated', () => {
    const u = Userfaultfd.open();
    try {
      expect(() => u.addRule({ address: 4096n, action: 'zero' } as never)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
      expect(() => u.addRule({ address: -1n, length: 4096, action: 'zero' } as never)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    } finally {
      u.close();
    }
  });
});
