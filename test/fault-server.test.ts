// The fault server (docs/fault-server.md) with real client processes: the C client library's demo
// (build/Release/pagemirror_client_demo) hands its memory to a server running in another process,
// which serves its faults, takes pages away into the client's pool, and is SIGKILLed mid-run: the
// client's watchdog must take over with no data lost and no thread asleep.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { FaultServer, Userfaultfd, type RemoteClient } from '../lib/index.js';
import { PAGE, waitFor, within } from './helpers.js';
import { DEMO, Lines, finish, needUffd, sockPath, startDemo, startServer } from './fault-server-helpers.js';

/** A server and a client of `pages` pages that wrote its pattern; evicts them all unless told not to. */
async function clientOf(name: string, pages: number, mode: 'alloc' | 'detach' | 'hammer', opts: { delayUs?: number; evict?: boolean } = {}) {
  const sock = sockPath(name);
  const server = await startServer(sock);
  const demo = startDemo(sock, pages, mode, opts.delayUs ?? 0);
  const [, addr, bytes] = (await demo.next((l) => l.startsWith('READY'), 10_000, 'READY')).split(' ');
  await server.json('client', 10_000);
  if (opts.evict !== false) {
    server.send(`evict ${addr} ${bytes}`);
    expect((await server.json('evicted', 10_000)).pages).toBe(pages);
  }
  return { server, demo, addr: addr!, bytes: bytes! };
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
    const { server, demo } = await clientOf('evict', 128, 'alloc');
    demo.send('GO');
    expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
    const exit = await server.json('exit', 10_000);
    const counters = exit.counters as { evicted: number; restored: number; poolHeld: number };
    expect(counters.evicted).toBe(128);
    expect(counters.restored).toBe(128);
  });
});

describe("fault server: policy 'manual' (the same rules and batch handlers as a local descriptor)", () => {
  async function manual(name: string, serve: (c: RemoteClient) => void): Promise<{ server: FaultServer; client: () => RemoteClient | undefined; demo: Lines }> {
    const sock = sockPath(name);
    let got: RemoteClient | undefined;
    const server = await FaultServer.listen(sock, { policy: 'manual', onClient: (c) => ((got = c), serve(c)) });
    const demo = startDemo(sock, 32, 'attach');
    return { server, client: () => got, demo };
  }

  it("a rule by address resolves the client's faults natively", { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx, false);
    const { server, client, demo } = await manual('rule', (c) => {
      for (const r of c.ranges) c.uffd.addRule({ address: r.address, length: r.length, action: 'zero' });
    });
    try {
      await demo.next((l) => l.startsWith('READY'), 10_000, 'READY');
      demo.send('GO');
      expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
      await waitFor(() => client()?.closed === true, 10_000, 'the client to be cleaned up');
      const st = client()!.stats();
      expect(st.faults).toBe(32);
      expect(st.fastResolved).toBe(32);
      expect(server.exited).toContain(client());
      expect(client()!.uffd.closed).toBe(true);
    } finally {
      await server.close();
    }
  });

  it("onFaults gets the client's faults in batches, with the client's addresses", { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx, false);
    const seen: bigint[] = [];
    const { server, client, demo } = await manual('batch', (c) => {
      c.uffd.serve({
        onFaults(faults, u) {
          for (const f of faults) {
            seen.push(f.address);
            u.zeropage(f.address & ~BigInt(PAGE - 1), 0, PAGE);
          }
        },
      });
    });
    try {
      const [, addr] = (await demo.next((l) => l.startsWith('READY'), 10_000, 'READY')).split(' ');
      demo.send('GO');
      expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
      const base = BigInt(addr!);
      expect(seen).toHaveLength(32);
      expect(new Set(seen.map((a) => (a - base) / BigInt(PAGE)))).toEqual(new Set(Array.from({ length: 32 }, (_, i) => BigInt(i))));
      await waitFor(() => client()?.closed === true, 10_000, 'the client to be cleaned up');
      expect(client()!.stats().forwarded).toBe(32);
    } finally {
      await server.close();
    }
  });
});

describe('fault server: eviction racing the client', () => {
  // The server evicts the client's pages over and over while the client works on them; the client
  // must see every page right, and each page must have been taken, faulted back and taken again.
  async function raced(name: string, pages: number, mode: 'alloc' | 'hammer', delayUs: number, rounds = false): Promise<void> {
    const { server, demo, addr, bytes } = await clientOf(name, pages, mode, { delayUs, evict: false });
    server.send(`evict-loop ${addr} ${bytes}${rounds ? ' wp' : ''}`);
    demo.send('GO');
    const r = await finish(demo, 30_000);
    server.send('stop');
    const stopped = await server.json('stopped', 10_000);
    expect(stopped.passes).toBeGreaterThan(0);
    expect(r).toEqual({ bad: 0, lost: 0 });
    const c = (await server.json('exit', 10_000)).counters as { evicted: number; restored: number; protectedPages: number; unprotected: number };
    expect(c.evicted).toBeGreaterThan(pages);
    expect(c.restored).toBeGreaterThan(0);
    if (rounds) {
      expect(c.protectedPages).toBeGreaterThan(0);
      expect(c.unprotected).toBeGreaterThan(0);
      expect(stopped.touches).toBeGreaterThan(0);
    }
  }

  it('pages evicted over and over while the client reads and writes them: every page reads right', { timeout: 40_000 }, async (ctx) => {
    needUffd(ctx);
    await raced('race', 64, 'alloc', 500);
  });

  it('a writer adding to every page while they are evicted over and over loses no addition', { timeout: 40_000 }, async (ctx) => {
    needUffd(ctx);
    await raced('hammer', 16, 'hammer', 1500);
  });

  it('the same with write-protect rounds over the range between evictions (reads mapped write-protected, prefetch 2): no addition lost', { timeout: 40_000 }, async (ctx) => {
    needUffd(ctx);
    await raced('hammer-wp', 16, 'hammer', 1500, true);
  });
});

describe('fault server: a server killed mid-run loses nothing and hangs nobody', () => {
  for (const when of ['after evicting everything', 'while the client reads', 'while evicting'] as const) {
    it(`SIGKILL ${when}`, { timeout: 40_000 }, async (ctx) => {
      needUffd(ctx);
      // The reader is slow enough that the kill lands while pages it has not read yet are in the pool.
      const evicting = when === 'while evicting';
      const { server, demo, addr, bytes } = await clientOf('kill', 256, 'alloc', { delayUs: when === 'after evicting everything' ? 0 : 1000, evict: !evicting });
      if (evicting) {
        demo.send('GO');
        server.send(`evict-slow ${addr} ${bytes}`);
        await server.next((l) => l.includes('"evicted-one","n":40,'), 10_000, 'forty pages evicted');
      } else if (when === 'while the client reads') {
        demo.send('GO');
        await new Promise((r) => setTimeout(r, 25));
      }
      server.child.kill('SIGKILL');
      expect((await within(server.exit, 10_000, 'the server to die')).signal).toBe('SIGKILL');
      if (when === 'after evicting everything') demo.send('GO');
      const r = await finish(demo, 25_000);
      expect(r).toEqual({ bad: 0, lost: 1 });
    });
  }
});

describe('fault server: a server killed under a many-threaded client', () => {
  // Eight threads add to their pages while the server evicts them in a loop, so faults are in
  // flight when the watchdog takes over: its UFFDIO_UNREGISTER races them. Before the client woke
  // its ranges after unregistering, 4 kills in 100 (4 or 8 threads) left a thread asleep in handle_userfault.
  it('SIGKILL while 8 threads write pages the server keeps evicting: every addition kept, no thread asleep (3 kills)', { timeout: 90_000 }, async (ctx) => {
    needUffd(ctx);
    for (let kill = 0; kill < 3; kill++) {
      const sock = sockPath(`kill-threads-${kill}`);
      const server = await startServer(sock);
      const demo = startDemo(sock, 2048, 'hammer', 1500, undefined, 8);
      const [, addr, bytes] = (await demo.next((l) => l.startsWith('READY'), 10_000, 'READY')).split(' ');
      await server.json('client', 10_000);
      server.send(`evict-loop ${addr} ${bytes}`);
      demo.send('GO');
      await new Promise((r) => setTimeout(r, 200 + 150 * kill));
      server.child.kill('SIGKILL');
      expect((await within(server.exit, 10_000, 'the server to die')).signal).toBe('SIGKILL');
      expect(await finish(demo, 25_000)).toEqual({ bad: 0, lost: 1 });
    }
  });
});

describe('fault server: a server that closes hands everything back', () => {
  it('pm_detach brings pooled pages home before the range is let go', { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx);
    const { server, demo } = await clientOf('detach', 64, 'detach');
    demo.send('GO');
    expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
    const exit = await server.json('exit', 10_000);
    // Brought home by the UNREGISTER (written into the memfd), not by faults.
    expect(exit.counters).toMatchObject({ evicted: 64, restored: 64, poolHeld: 0 });
  });

  it('server.close() with pages in the pool: the client takes them back', { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx);
    const { server, demo } = await clientOf('close', 64, 'alloc');
    server.send('close');
    await server.json('closed', 10_000);
    expect(await within(server.exit, 10_000, 'the server to exit')).toEqual({ code: 0, signal: null });
    demo.send('GO');
    expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 1 });
  });
});

describe('fault server: who may connect', () => {
  it('refuses a peer whose uid is not allowed (SO_PEERCRED), and says so', { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx, false);
    const sock = sockPath('uid');
    const other = (process.getuid?.() ?? 0) + 12345;
    const server = await startServer(sock, [JSON.stringify({ allowUids: [other] })]);
    const demo = startDemo(sock, 4, 'attach');
    expect(await demo.next((l) => l.startsWith('ERR') || l.startsWith('READY'), 10_000, 'the refusal')).toBe('ERR pm_connect 13'); // EACCES
    expect((await within(demo.exit, 10_000, 'the refused client to exit')).code).toBe(1);
    server.send('stats');
    const stats = (await server.json('stats', 10_000)).server as Record<string, number>;
    expect(stats.refusedUid).toBe(1);
    expect(stats.connections).toBe(0);
  });

  it('lets an allowed other user in, through a socket it can open', { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx, false);
    if (process.getuid?.() !== 0) ctx.skip('running a client as another user needs root');
    const nobody = 65534;
    const sock = sockPath('nobody');
    fs.chmodSync(path.dirname(sock), 0o755);
    const server = await startServer(sock, [JSON.stringify({ allowUids: [nobody] })]);
    // The socket is 0600: another user cannot even connect until the test opens it up.
    const denied = startDemo(sock, 4, 'attach', 0, nobody);
    expect(await denied.next((l) => l.startsWith('ERR') || l.startsWith('READY'), 10_000, 'the refusal')).toBe('ERR pm_connect 13');
    fs.chmodSync(sock, 0o666);
    const demo = startDemo(sock, 16, 'attach', 0, nobody);
    const first = await demo.next((l) => l.startsWith('ERR') || l.startsWith('READY'), 10_000, 'READY');
    if (first.startsWith('ERR pm_connect')) ctx.skip(`no userfaultfd for uid ${nobody}: ${first}`);
    expect(first).toMatch(/^READY/);
    expect((await server.json('client', 10_000)).uid).toBe(nobody);
    demo.send('GO');
    expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
  });

  it('refuses clients beyond maxClients with EUSERS', { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx, false);
    const sock = sockPath('full');
    const server = await startServer(sock, [JSON.stringify({ maxClients: 1 })]);
    const a = startDemo(sock, 4, 'attach');
    await a.next((l) => l.startsWith('READY'), 10_000, 'READY');
    const b = startDemo(sock, 4, 'attach');
    expect(await b.next((l) => l.startsWith('ERR') || l.startsWith('READY'), 10_000, 'the refusal')).toBe('ERR pm_connect 87'); // EUSERS
    a.send('GO');
    expect(await finish(a, 15_000)).toEqual({ bad: 0, lost: 0 });
    await server.json('exit', 10_000);
  });

  it('ends a connection that says no HELLO within helloTimeoutMs (ETIMEDOUT reply): silent peers cannot hold the slots', { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx, false);
    const sock = sockPath('silent');
    const server = await FaultServer.listen(sock, { maxClients: 1, helloTimeoutMs: 300 });
    try {
      // A peer that connects and sends nothing: before, it held the only slot for good. (The
      // socket is SOCK_SEQPACKET, which node:net cannot open: python3, which node-gyp needs.)
      const py = 'import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET)\ns.connect(sys.argv[1])\nprint("CONNECTED",flush=True)\nd=s.recv(64)\nprint("REPLY",d.hex(),flush=True)\nprint("CLOSED",len(s.recv(64)),flush=True)\n';
      // A missing tool skips (as sort and cc do elsewhere); a failed connection fails.
      if (spawnSync('python3', ['--version']).status !== 0) ctx.skip('no python3 on PATH');
      const silent = new Lines(spawn('python3', ['-c', py, sock], { stdio: ['ignore', 'pipe', 'pipe'] }));
      expect(await silent.next((l) => l.startsWith('CONNECTED'), 10_000, 'python3 to connect')).toBe('CONNECTED');
      const refused = startDemo(sock, 4, 'attach');
      expect(await refused.next((l) => l.startsWith('ERR') || l.startsWith('READY'), 10_000, 'the refusal')).toBe('ERR pm_connect 87'); // EUSERS: the slot is taken
      const reply = Buffer.from((await silent.next((l) => l.startsWith('REPLY'), 5_000, 'the reply')).split(' ')[1]!, 'hex');
      expect(reply.length).toBe(24); // pm_reply: header (16) + error + value
      expect(reply.readInt32LE(16)).toBe(-110); // -ETIMEDOUT
      expect(await silent.next((l) => l.startsWith('CLOSED'), 5_000, 'the close')).toBe('CLOSED 0');
      expect(server.stats()).toMatchObject({ helloTimeouts: 1, connections: 0 });
      // The slot is free again: a client that says HELLO at once is served.
      const a = startDemo(sock, 4, 'attach');
      expect(await a.next((l) => l.startsWith('ERR') || l.startsWith('READY'), 10_000, 'READY')).toMatch(/^READY/);
      a.send('GO');
      expect(await finish(a, 15_000)).toEqual({ bad: 0, lost: 0 });
      expect(server.stats().helloTimeouts).toBe(1);
    } finally {
      await server.close();
    }
    await expect(FaultServer.listen(sockPath('badhello'), { helloTimeoutMs: 0 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
  });
});

describe('pagemirror serve', () => {
  const cli = path.join(path.dirname(DEMO), '..', '..', 'dist', 'cli.js');

  it('serves clients until SIGTERM, then prints their counters as JSON', { timeout: 30_000 }, async (ctx) => {
    needUffd(ctx);
    const sock = sockPath('cli');
    const child = spawn(process.execPath, [cli, 'serve', '--socket', sock, '--json', '--allow-uid', String(process.getuid?.() ?? 0)], { stdio: ['ignore', 'pipe', 'pipe'] });
    const l = new Lines(child);
    await waitFor(() => l.stderr.includes('listening on'), 10_000, 'the server to listen');
    const demo = startDemo(sock, 48, 'alloc');
    await demo.next((x) => x.startsWith('READY'), 10_000, 'READY');
    demo.send('GO');
    expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
    await waitFor(() => l.stderr.includes('left:'), 10_000, 'the client to be reported gone');
    child.kill('SIGTERM');
    expect(await within(l.exit, 10_000, 'serve to exit')).toEqual({ code: 0, signal: null });
    const out = JSON.parse(l.lines.join('\n')) as { clients: { pid: number; faults: number; zeroFilled: number; bytes: number; connectedAtExit: boolean }[] };
    expect(out.clients).toHaveLength(1);
    expect(out.clients[0]).toMatchObject({ pid: demo.child.pid, bytes: 48 * PAGE, zeroFilled: 48, connectedAtExit: false });
    expect(out.clients[0]!.faults).toBeGreaterThanOrEqual(48);
    expect(fs.existsSync(sock)).toBe(false);
  });

  it('refuses bad flags with exit 2 and runs nothing for --help', () => {
    for (const args of [['serve'], ['serve', '--socket', '/tmp/x', '--allow-uid', 'me'], ['serve', '--socket', '/tmp/x', '--max-clients', '0'], ['serve', '--sock', '/tmp/x']]) {
      const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 30_000 });
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    const h = spawnSync(process.execPath, [cli, 'serve', '--help'], { encoding: 'utf8', timeout: 30_000 });
    expect(h.status).toBe(0);
    expect(h.stdout).toMatch(/^usage: pagemirror serve --socket PATH/);
  });
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

  it('writeProtect, configure and takeTouches refuse bad arguments with typed errors', { timeout: 20_000 }, async (ctx) => {
    needUffd(ctx);
    const { server, demo, addr } = await clientOf('api', 4, 'alloc', { evict: false });
    server.send(`api-checks ${addr}`);
    const r = await server.json('api-checks', 10_000);
    // The client then reads its pattern back through the protection: reads do not fault on it.
    demo.send('GO');
    expect(await finish(demo, 15_000)).toEqual({ bad: 0, lost: 0 });
    expect(r.codes).toEqual(['ERR_INVALID_ARG_TYPE', 'ERR_PAGEMIRROR_UNALIGNED', 'ERR_OUT_OF_RANGE', 'EINVAL', 'ERR_OUT_OF_RANGE', 'ERR_INVALID_ARG_TYPE', 'ERR_INVALID_ARG_TYPE']);
    expect(r.protected).toBe(4);
    expect(Array.isArray(r.touches)).toBe(true);
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
