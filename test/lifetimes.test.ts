// Leases, descriptors and processes must not outlive their owner: a mapping's close() closes its
// mirrors (and their leases), adopt() owns a userfaultfd of its own, forkAccess()'s child dies with
// its parent.
import { describe, it, expect, beforeEach } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { Device, Userfaultfd, access, forkAccess, FORK_DELAY_MAX_MS, mapFile, mapAnonymous, fileSystemOf, type FileStrategy } from '../lib/index.js';
import { P, PAGE, FIXTURES_DIR, requireCap, cleanupAfterEach, within } from './helpers.js';

const STRATEGIES: FileStrategy[] = ['remote', 'copy', 'bounce', 'pin'];
const DISK = [os.tmpdir(), '/var/tmp'].find((d) => fs.existsSync(d) && fileSystemOf(d) !== 'tmpfs');
const cleanup = cleanupAfterEach();

/** Another process opens the file for reading: returns how long open() took (a lease makes it wait). */
function openElsewhere(file: string): number {
  const t0 = Date.now();
  const c = spawnSync(process.execPath, ['-e', `require('fs').closeSync(require('fs').openSync(${JSON.stringify(file)}, 'r'))`], {
    encoding: 'utf8',
    timeout: 20_000,
  });
  expect(c.error, 'the other process did not finish: a lease was left behind').toBeUndefined();
  expect(c.status, c.stderr).toBe(0);
  return Date.now() - t0;
}

function tempFile(dir: string, npages: number): string {
  const file = path.join(dir, `pagemirror-lifetime-${process.pid}-${Math.random().toString(36).slice(2)}`);
  fs.writeFileSync(file, Buffer.alloc(npages * PAGE, 1));
  cleanup.push(() => fs.rmSync(file, { force: true }));
  return file;
}

describe('closing a mapping closes its mirrors', () => {
  beforeEach((ctx) => requireCap(ctx, P.experiments.uffd, 'userfaultfd'));

  const places = [{ name: 'tmpfs', dir: '/dev/shm' }, ...(DISK ? [{ name: fileSystemOf(DISK), dir: DISK }] : [])];
  for (const place of places) {
    it.for(STRATEGIES)(`${place.name}, %s with a lease: close() writes device copies back and releases the lease; another process opens at once`, async (strategy, ctx) => {
      requireCap(ctx, P.experiments.leases, 'file leases');
      const n = 8;
      const file = tempFile(place.dir, n);
      const m = mapFile(file);
      const dev = Device.create({ memory: 1 << 20 });
      cleanup.push(() => dev.close(), () => m.close());
      const fm = dev.mirrorFile(m, { strategy, lease: true });
      expect(fm.stats().leaseHeld).toBe(true);
      await fm.run({ op: 'write', seed: 41, unit: 8 });
      m.close();
      // A pin outlives the munmap, as a GUP pin does (the device keeps its pages); the others close.
      expect(fm.info().closed).toBe(strategy !== 'pin');
      // The lease went either way: no lease break to wait for (the kernel would wait 45 s).
      expect(openElsewhere(file)).toBeLessThan(5000);
      // Written back before the lease went: the file holds the device's data.
      const data = fs.readFileSync(file);
      for (let p = 0; p < n; p++) expect(data.readBigUInt64LE(p * PAGE), `page ${p}`).toBe(41n + BigInt((p * PAGE) / 8));
      if (strategy === 'pin') {
        expect(fm.stats().leaseHeld).toBe(false);
        // Its range is gone: no lease can be taken (nothing would release it); the device works on.
        expect(() => fm.takeLease()).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'fcntl(F_SETLEASE)' }));
        expect((await fm.run({ op: 'verify', seed: 41, unit: 8 })).mismatches).toBe(0);
      } else {
        // A closed mirror takes no lease, and every other call says it is closed.
        expect(() => fm.takeLease()).toThrow(expect.objectContaining({ name: 'Error', code: 'ERR_PAGEMIRROR_CLOSED' }));
        expect(() => fm.stats()).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
        await expect(fm.read(0, 1)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_CLOSED' });
      }
      fm.close(); // idempotent
      expect(openElsewhere(file)).toBeLessThan(5000);
    }, 30_000);
  }

  it('takeLease() after the mapping closed: ERR_PAGEMIRROR_CLOSED, and no lease is taken', async (ctx) => {
    requireCap(ctx, P.experiments.leases, 'file leases');
    const file = tempFile(DISK ?? os.tmpdir(), 4);
    const m = mapFile(file);
    const dev = Device.create({ memory: 1 << 20 });
    cleanup.push(() => dev.close());
    const fm = dev.mirrorFile(m, { strategy: 'remote' });
    m.close();
    expect(() => fm.takeLease()).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    expect(openElsewhere(file)).toBeLessThan(5000);
  }, 30_000);

  it('takeLease() on a mirror whose whole range was unmapped: EBADF (nothing would release it)', async (ctx) => {
    requireCap(ctx, P.experiments.leases, 'file leases');
    const file = tempFile(DISK ?? os.tmpdir(), 4);
    const m = mapFile(file);
    const dev = Device.create({ memory: 1 << 20 });
    cleanup.push(() => dev.close(), () => m.close());
    const fm = dev.mirrorFile(m, { strategy: 'remote' });
    cleanup.push(() => fm.close());
    m.unmap(0, m.length);
    expect(() => fm.takeLease()).toThrow(expect.objectContaining({ code: 'EBADF', errno: -9, syscall: 'fcntl(F_SETLEASE)' }));
    expect(fm.stats().leaseHeld).toBe(false);
    expect(openElsewhere(file)).toBeLessThan(5000);
  }, 30_000);

  it('a plain mirror closes with its mapping too: its calls say closed, its own close() is a no-op', async () => {
    const m = mapAnonymous(4 * PAGE);
    const dev = Device.create({ memory: 1 << 20 });
    cleanup.push(() => dev.close());
    const mir = dev.mirror(m);
    await mir.write(0, Buffer.alloc(4 * PAGE, 3));
    m.close();
    expect(mir.info()).toMatchObject({ closed: true });
    await expect(mir.read(0, 1)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_CLOSED' });
    expect(() => mir.entries()).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    mir.close();
    // The device can mirror a new mapping at once (the closed mirror is off its list).
    const m2 = mapAnonymous(4 * PAGE);
    cleanup.push(() => m2.close());
    const mir2 = dev.mirror(m2);
    await expect(mir2.read(0, 4)).resolves.toMatchObject({ cpages: 4 });
    mir2.close();
  }, 20_000);
});

describe('Userfaultfd.adopt() owns a userfaultfd of its own', () => {
  it("refuses a descriptor that is not a userfaultfd (a mapping's file stays open and the mapping's)", (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const file = tempFile(os.tmpdir(), 2);
    const m = mapFile(file);
    cleanup.push(() => m.close());
    const fd = m.fd;
    expect(() => Userfaultfd.adopt(fd, 0n)).toThrow(expect.objectContaining({ name: 'TypeError', code: 'ERR_INVALID_ARG_VALUE', message: expect.stringMatching(/not a userfaultfd.*pagemirror-lifetime/) }));
    expect(fs.fstatSync(fd).size).toBe(2 * PAGE); // still open, still the file
    m.close();
    expect(() => fs.fstatSync(fd)).toThrow(expect.objectContaining({ code: 'EBADF' })); // closed once, by its owner
    expect(() => Userfaultfd.adopt(fd, 0n)).toThrow(expect.objectContaining({ code: 'EBADF', errno: -9, syscall: 'fcntl' }));
    expect(() => Userfaultfd.adopt(-1, 0n)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
  });

  it("adopting a userfaultfd wraps a duplicate: closing it leaves the caller's descriptor working", async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const u = Userfaultfd.open();
    cleanup.push(() => u.close());
    const a = Userfaultfd.adopt(u.fd, u.featureMask);
    expect(a.fd).not.toBe(u.fd);
    expect(a.openedBy).toBe('adopted');
    a.close();
    // The original still serves real faults.
    const m = mapAnonymous(4 * PAGE);
    cleanup.push(() => m.close());
    u.register(m);
    u.addRule({ mapping: m, action: 'zero' });
    u.serve();
    const r = await access(m, { op: 'read' });
    expect(r.ops).toBe(4);
    expect(u.stats().faults).toBeGreaterThan(0);
  }, 10_000);
});

describe("forkAccess()'s child does not outlive its parent", () => {
  /** Whether a process still runs: gone, or a zombie nobody reaped (it runs nothing), is not running. */
  function running(pid: number, start: string): boolean {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      return f[19] === start && f[0] !== 'Z' && f[0] !== 'X';
    } catch {
      return false;
    }
  }

  for (const mode of ['exit', 'kill'] as const) {
    it(`a parent that ${mode === 'exit' ? 'exits' : 'is SIGKILLed'} while its child sleeps (delayMs 30 s): the child is gone within 5 s`, async () => {
      const child = spawn(process.execPath, [path.join(FIXTURES_DIR, 'fork-access-orphan.mjs'), mode], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout.on('data', (d) => (out += d));
      let err = '';
      child.stderr.on('data', (d) => (err += d));
      const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
      cleanup.push(() => child.kill('SIGKILL'));
      await within(
        (async () => {
          while (!out.includes('\n')) await new Promise((r) => setTimeout(r, 10));
        })(),
        10_000,
        `the fixture reporting its child (stderr: ${err})`,
      );
      const line = JSON.parse(out.split('\n')[0]) as { parent: number; children: { pid: number; start: string }[] };
      expect(line.children, 'the fixture saw its forked child').toHaveLength(1);
      const kid = line.children[0];
      if (mode === 'kill') child.kill('SIGKILL');
      await within(exited, 10_000, 'the fixture ending');
      const t0 = Date.now();
      while (running(kid.pid, kid.start) && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 20));
      expect(running(kid.pid, kid.start), `child ${kid.pid} still runs ${Date.now() - t0} ms after its parent ended`).toBe(false);
      if (running(kid.pid, kid.start)) process.kill(kid.pid, 'SIGKILL');
    }, 30_000);
  }

  it('delayMs is bounded: past FORK_DELAY_MAX_MS a RangeError, before any fork', async () => {
    const m = mapAnonymous(PAGE);
    cleanup.push(() => m.close());
    await expect(forkAccess(m, { delayMs: FORK_DELAY_MAX_MS + 1 })).rejects.toMatchObject({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' });
    await expect(forkAccess(m, { delayMs: 2 ** 40 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    const r = await within(forkAccess(m, { delayMs: 1 }), 10_000, 'forkAccess');
    expect(r).toMatchObject({ exitCode: 0, ops: 1 });
  }, 20_000);
});
