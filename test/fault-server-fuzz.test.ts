// The fault server against hostile clients (issue 12 §1): a seeded C client sends random,
// truncated and oversized packets, wrong versions, descriptors of the wrong kind, bad ranges,
// floods and half-closed connections, while a well-behaved client keeps having its faults served.
// The server runs in its own process, so a crash would show as a signal.
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { within } from './helpers.js';
import { DEMO, Lines, needUffd, sockPath, startDemo, startServer } from './fault-server-helpers.js';

const FUZZ = path.join(path.dirname(DEMO), 'pagemirror_client_fuzz');

describe('fault server: protocol fuzz', () => {
  it('hostile clients end only their own connection; a good client is served throughout', { timeout: 60_000 }, async (ctx) => {
    needUffd(ctx);
    if (!fs.existsSync(FUZZ)) ctx.skip(`the fuzz client was not built (${FUZZ})`);
    const sock = sockPath('fuzz');
    const server = await startServer(sock);
    server.send('stats');
    const before = await server.json('stats', 10_000);
    const ms = 4000;
    const fuzzers = [11, 12].map((seed) => new Lines(spawn(FUZZ, [sock, String(seed), String(ms)], { stdio: ['ignore', 'pipe', 'pipe'] })));
    const until = Date.now() + ms;
    let served = 0;
    while (Date.now() < until) {
      const demo = startDemo(sock, 32, served % 2 ? 'attach' : 'alloc');
      await demo.next((l) => l.startsWith('READY') || l.startsWith('ERR'), 10_000, 'READY');
      demo.send('GO');
      const ok = await demo.next((l) => l.startsWith('OK ') || l.startsWith('ERR'), 10_000, 'the good client to be served');
      expect(ok).toBe('OK 0 0');
      expect((await within(demo.exit, 10_000, 'the good client to exit')).code).toBe(0);
      served++;
    }
    for (const f of fuzzers) {
      const exit = await within(f.exit, 20_000, 'the fuzz client to finish');
      expect(exit.code, f.stderr).toBe(0);
      expect(f.lines.at(-1)).toMatch(/^DONE \d+ \d+ \d+$/);
    }
    expect(served).toBeGreaterThan(2);
    expect(server.child.exitCode).toBeNull();
    expect(server.child.signalCode).toBeNull();
    server.lines.length = 0;
    server.send('stats');
    const after = await server.json('stats', 10_000);
    const stats = after.server as Record<string, number>;
    // Nothing a client sent or made the server open is kept: no descriptor, no mapped pool.
    expect(after.fds).toBe(before.fds);
    expect(after.memfdMappings).toBe(0);
    expect(before.memfdMappings).toBe(0);
    const conns = fuzzers.reduce((n, f) => n + Number(f.lines.at(-1)!.split(' ')[1]), 0);
    expect(stats.accepted).toBeGreaterThanOrEqual(conns + served);
    expect(stats.protocolErrors).toBeGreaterThan(10);
    expect(stats.refusals).toBeGreaterThan(stats.protocolErrors);
    // Every connection ended: nothing a hostile client opened is still held.
    expect(stats.connections).toBe(0);
    server.send('close');
    await server.json('closed', 10_000);
    expect(await within(server.exit, 10_000, 'the server to exit')).toEqual({ code: 0, signal: null });
  });
});

describe('fault server: a client faulting on memory it never described', () => {
  // Its faults can only be woken, and come back at once: without a bound the server's JavaScript
  // thread would wake them for good. The client is ended after staleFaultLimitMs; the server goes
  // on serving others.
  it('is ended after staleFaultLimitMs, with a warning and staleFaultEnds; a good client is served after it', { timeout: 60_000 }, async (ctx) => {
    needUffd(ctx, false);
    if (!fs.existsSync(FUZZ)) ctx.skip(`the fuzz client was not built (${FUZZ})`);
    const sock = sockPath('stale');
    const server = await startServer(sock, [JSON.stringify({ staleFaultLimitMs: 500 })]);
    const hostile = new Lines(spawn(FUZZ, [sock, 'undescribed', '15000'], { stdio: ['ignore', 'pipe', 'pipe'] }));
    await hostile.next((l) => l === 'FAULTING' || l.startsWith('ERR'), 10_000, 'FAULTING');
    const end = await hostile.next((l) => l.startsWith('ENDED') || l === 'NOT-ENDED', 20_000, 'the connection to end');
    expect(end, hostile.stderr).toMatch(/^ENDED \d+$/);
    expect(Number(end.split(' ')[1])).toBeGreaterThanOrEqual(500);
    expect(server.child.exitCode).toBeNull();
    server.send('stats');
    const stats = (await server.json('stats', 10_000)).server as Record<string, number>;
    expect(stats.staleFaultEnds).toBe(1);
    expect(stats.connections).toBe(0);
    expect(server.stderr).toMatch(/client \d+ ended: its threads faulted for \d+ ms \(\d+ faults\) on memory it never described/);
    const demo = startDemo(sock, 16, 'attach');
    await demo.next((l) => l.startsWith('READY') || l.startsWith('ERR'), 10_000, 'READY');
    demo.send('GO');
    expect(await demo.next((l) => l.startsWith('OK ') || l.startsWith('ERR'), 10_000, 'the good client to be served')).toBe('OK 0 0');
  });
});
