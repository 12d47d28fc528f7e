// Errors must name their real cause at once: a privilege the engine's userfaultfd lacks must not
// look like racing invalidations, a full file system must not look like a timeout, and a
// read-only mapping must not look like a missing userfaultfd.
import { describe, it, expect, beforeEach, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Device, Userfaultfd, mapAnonymous, mapFile, mapMemfd, POPULATE_SYNC_MAX_BYTES } from '../lib/index.js';
import { P, PAGE, FIXTURES_DIR, requireCap, cleanupAfterEach, within, smallTmpfs } from './helpers.js';

const NOBODY = 65534;
const cleanup = cleanupAfterEach();
beforeEach((ctx) => requireCap(ctx, P.experiments.uffd, 'userfaultfd'));

describe('device accesses do not depend on the engine seeing kernel-mode faults', () => {
  const fixture = path.join(FIXTURES_DIR, 'unprivileged-device.mjs');
  const expectAllWork = (out: Record<string, { mismatches?: number; code?: string; message?: string; ms: number }>) => {
    for (const name of ['singleWriter', 'placementMemfd', 'placementOversubscribed']) {
      expect(out[name], name).toMatchObject({ mismatches: 0 });
      expect(out[name].ms, `${name} took ${out[name].ms} ms`).toBeLessThan(4000);
    }
  };

  it('single-writer and placement device on a memfd, placement device past device memory: in this process', () => {
    const r = spawnSync(process.execPath, [fixture], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    expectAllWork(JSON.parse(r.stdout));
  }, 40_000);

  it('the same as uid nobody with vm.unprivileged_userfaultfd=0 (a user-mode-only engine descriptor)', (ctx) => {
    if (P.euid !== 0) ctx.skip('needs root to start a child as uid nobody (this run is unprivileged: the test above covers it)');
    if (P.sysctl.unprivilegedUserfaultfd !== '0')
      ctx.skip(`vm.unprivileged_userfaultfd=${P.sysctl.unprivilegedUserfaultfd}: the restricted case does not arise here`);
    const r = spawnSync(process.execPath, [fixture], { uid: NOBODY, gid: NOBODY, encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.euid).toBe(NOBODY);
    expectAllWork(out);
  }, 40_000);
});

describe('a read-only shared file mapping cannot be registered: the error says so', () => {
  it('register() and a copy mirror on tmpfs: EPERM naming VM_MAYWRITE and prot rw, not userfaultfd access', () => {
    const file = path.join('/dev/shm', `pagemirror-ro-${process.pid}`);
    fs.writeFileSync(file, Buffer.alloc(4 * PAGE, 1));
    cleanup.push(() => fs.rmSync(file, { force: true }));
    const m = mapFile(file, { prot: 'r' });
    cleanup.push(() => m.close());
    const u = Userfaultfd.open();
    cleanup.push(() => u.close());
    const readOnly = expect.objectContaining({ code: 'EPERM', errno: -1, path: file, message: expect.stringMatching(/VM_MAYWRITE.*open read-only.*prot 'rw'/) });
    expect(() => u.register(m)).toThrow(readOnly);
    const dev = Device.create();
    cleanup.push(() => dev.close());
    let err: unknown;
    try {
      dev.mirrorFile(m, { strategy: 'copy' });
    } catch (e) {
      err = e;
    }
    expect(err).toEqual(readOnly);
    expect((err as Error).message).not.toMatch(/unprivileged_userfaultfd/);
    // A single-writer mirror maps the file again for the device's writes: refused by mmap, and said so.
    expect(() => dev.mirror(m, { writeMode: 'single' })).toThrow(
      expect.objectContaining({ code: 'EACCES', syscall: 'mmap', message: expect.stringMatching(/open for writing.*prot 'rw'/) }),
    );
    // Writable: both work.
    const w = mapFile(file);
    cleanup.push(() => w.close());
    u.register(w);
    u.unregister(w);
    dev.mirrorFile(w, { strategy: 'copy' }).close();
  });
});

describe('a device write on a full tmpfs', () => {
  const tmp = smallTmpfs(16, 'pagemirror-enospc');

  it('remote: a write to a page the file system cannot allocate fails at once with ENOSPC, not EBUSY after timeoutMs', async (ctx) => {
    const mnt = tmp.dir;
    if (!mnt) return ctx.skip(tmp.why);
    const file = path.join(mnt, 'sparse');
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 8 * PAGE); // a hole: its pages take blocks only when written
    try {
      fs.writeFileSync(path.join(mnt, 'filler'), Buffer.alloc(32 * PAGE));
    } catch {
      /* ENOSPC part way: full either way */
    }
    const m = mapFile(file);
    const dev = Device.create({ timeoutMs: 5000 });
    cleanup.push(() => dev.close(), () => m.close());
    const fm = dev.mirrorFile(m, { strategy: 'remote' });
    cleanup.push(() => fm.close());
    const t0 = Date.now();
    await expect(within(fm.write(0, Buffer.alloc(PAGE, 7)), 10_000, 'device write')).rejects.toMatchObject({
      code: 'ENOSPC',
      errno: -28,
      syscall: 'device fault',
    });
    expect(Date.now() - t0).toBeLessThan(2500);
    // tmpfs gives a shared mapping no zero page: a read of the hole must allocate too.
    await expect(within(fm.read(0, 1), 10_000, 'device read')).rejects.toMatchObject({ code: 'ENOSPC' });
    // Space again: the same write succeeds and reaches the file.
    fs.rmSync(path.join(mnt, 'filler'));
    await within(fm.write(0, Buffer.alloc(PAGE, 7)), 10_000, 'device write');
    expect(fs.readFileSync(file).subarray(0, PAGE).every((b) => b === 7)).toBe(true);
  }, 30_000);
});

describe('file I/O cut off by close()', () => {
  it('fsync() and pread() running when the mirror closes reject with ERR_PAGEMIRROR_CLOSED, never a bare EBADF', async () => {
    const outcomes: string[] = [];
    for (const dir of ['/dev/shm', os.tmpdir()]) {
      for (const strategy of ['remote', 'copy', 'bounce', 'pin'] as const) {
        const file = path.join(dir, `pagemirror-cut-${process.pid}-${strategy}`);
        fs.writeFileSync(file, Buffer.alloc(1024 * PAGE, 1));
        cleanup.push(() => fs.rmSync(file, { force: true }));
        const m = mapFile(file);
        const dev = Device.create({ memory: 8 << 20 });
        cleanup.push(() => dev.close(), () => m.close());
        const fm = dev.mirrorFile(m, { strategy });
        await fm.run({ op: 'write', seed: 3 });
        // Outcomes are taken as the jobs settle: a rejection waiting for its turn in the loop
        // below would be an unhandled one.
        const jobs = [fm.fsync(), fm.pread(0, 256 * PAGE)].map((j) =>
          j.then(
            () => 'done',
            (e: NodeJS.ErrnoException) => e.code ?? String(e),
          ),
        );
        fm.close();
        for (const j of jobs) {
          const r = await within(j, 20_000, `${strategy} job`);
          expect(['done', 'ERR_PAGEMIRROR_CLOSED'], `${strategy} in ${dir}`).toContain(r);
          outcomes.push(r);
        }
      }
    }
    expect(outcomes, 'no job was cut off: this machine closed too late to test anything').toContain('ERR_PAGEMIRROR_CLOSED');
  }, 60_000);
});

describe('requests with no bound', () => {
  it('allocate() on a memfd beyond the memory available: ENOMEM at once, not the OOM killer', () => {
    const meminfo = fs.readFileSync('/proc/meminfo', 'utf8');
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(meminfo)?.[1] ?? 0);
    const avail = (kb('MemAvailable') + kb('SwapFree')) * 1024;
    const m = mapMemfd(PAGE);
    cleanup.push(() => m.close());
    const t0 = Date.now();
    expect(() => m.allocate(0, avail + (1 << 30), { keepSize: true })).toThrow(
      expect.objectContaining({ code: 'ENOMEM', errno: -12, syscall: 'fallocate', message: expect.stringMatching(/memory-backed file.*available/) }),
    );
    expect(Date.now() - t0).toBeLessThan(1000);
    m.allocate(0, 16 * PAGE, { keepSize: true }); // within bounds: granted
    expect(m.cachestat({ fileOffset: 0, length: 16 * PAGE }).cache).toBe(16);
  });

  it("advise('populateWrite') of more than 1 GiB on the JavaScript thread: RangeError; populate() does it on a native thread", async () => {
    const big = mapAnonymous(POPULATE_SYNC_MAX_BYTES + (2 << 20), { noReserve: true });
    cleanup.push(() => big.close());
    const t0 = Date.now();
    expect(() => big.advise('populateWrite')).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE', message: expect.stringMatching(/populate\(\)/) }));
    expect(Date.now() - t0).toBeLessThan(500); // refused before any page was touched
    expect(big.residency({ length: 16 * PAGE }).some(Boolean)).toBe(false);
    big.advise('populateWrite', { length: 16 * PAGE }); // small: fine on this thread
    expect(big.residency({ length: 16 * PAGE }).every(Boolean)).toBe(true);
  });

  it('populate() of registered memory whose faults JavaScript resolves: the JavaScript thread stays free to serve them', async () => {
    const m = mapAnonymous(16 * PAGE);
    cleanup.push(() => m.close());
    const u = Userfaultfd.open();
    cleanup.push(() => u.close());
    u.register(m);
    let served = 0;
    u.serve({
      onFaults: (faults, uf) => {
        for (const f of faults) {
          uf.zeropage(m, f.offset, PAGE);
          served++;
        }
      },
    });
    await within(m.populate({ write: true }), 10_000, 'populate');
    expect(served).toBeGreaterThan(0);
    expect(m.residency().every(Boolean)).toBe(true);
    await expect(m.populate({ offset: 0, length: 0 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
  }, 20_000);
});
