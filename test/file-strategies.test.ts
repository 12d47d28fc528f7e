// File-backed mirroring: the four strategies on real files on tmpfs and on the disk's file system
// (ext4 here), with real faults, real writeback and real other processes reading the files.
import { describe, it, expect, beforeAll, afterAll, beforeEach } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { Device, mapFile, mapMemfd, mapAnonymous, access, fileSystemOf, type FileStrategy, type Mapping } from '../lib/index.js';
import { P, PAGE, FIXTURES_DIR, within, requireCap, cleanupAfterEach, smallTmpfs } from './helpers.js';

const WORDS = PAGE / 8;
const STRATEGIES: FileStrategy[] = ['remote', 'copy', 'bounce', 'pin'];
// The disk file system: the OS temp dir, or /var/tmp where the temp dir is a tmpfs.
const DISK = [os.tmpdir(), '/var/tmp'].find((d) => fs.existsSync(d) && fileSystemOf(d) !== 'tmpfs');
// Another process that truncates by path (truncate(2), no open first) or just opens: python3.
const PYTHON = spawnSync('python3', ['-c', 'pass'], { timeout: 10_000 }).status === 0;
const FILESYSTEMS = [{ name: 'tmpfs', dir: '/dev/shm' }, ...(DISK ? [{ name: fileSystemOf(DISK), dir: DISK }] : [])];

// Devices' memory and copy/bounce need the engine's userfaultfd: without one, every test here skips
// with the probe's reason; the tests that need more (CPU fault interception on tmpfs, leases) say so.
beforeEach((ctx) => requireCap(ctx, P.experiments.uffd, 'userfaultfd'));

const cleanup = cleanupAfterEach();

/** A file of npages filled with one seed (as a device write kernel over it would), mapped shared. */
function setup(dir: string, npages: number, strategy: FileStrategy, opts: Parameters<Device['mirrorFile']>[1] = {}, devOpts = {}) {
  const file = path.join(dir, `pagemirror-${strategy}-${process.pid}-${Math.random().toString(36).slice(2)}`);
  fs.writeFileSync(file, pattern(npages, 1));
  const m = mapFile(file);
  const dev = Device.create({ memory: 4 << 20, ...devOpts });
  const fm = dev.mirrorFile(m, { strategy, ...opts });
  cleanup.push(() => fs.unlinkSync(file), () => m.close(), () => dev.close(), () => fm.close());
  return { file, m, dev, fm };
}

/** What a write kernel with this seed over pages [base, base + n) stores: seed + word index. */
function pattern(npages: number, seed: number, base = 0): Buffer {
  const b = Buffer.alloc(npages * PAGE);
  for (let w = 0; w < npages * WORDS; w++) b.writeBigUInt64LE(BigInt(seed) + BigInt(base * WORDS + w), w * 8);
  return b;
}

/** The seed each page carries (pages written by whole-file kernels), null if torn. */
function seeds(buf: Buffer): (number | null)[] {
  const out: (number | null)[] = [];
  for (let p = 0; p * PAGE < buf.length; p++) {
    const s = buf.readBigUInt64LE(p * PAGE) - BigInt(p * WORDS);
    let ok = true;
    for (let j = 1; j < WORDS && ok; j++) ok = buf.readBigUInt64LE(p * PAGE + j * 8) - BigInt(p * WORDS + j) === s;
    out.push(ok ? Number(s) : null);
  }
  return out;
}

function readPagesElsewhere(file: string): Promise<{ size: number; seeds: (string | null)[]; torn: number[] }> {
  return new Promise((resolve, reject) => {
    const c = spawn(process.execPath, [path.join(FIXTURES_DIR, 'read-pages.mjs'), file, String(PAGE)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    c.stdout.on('data', (d) => (out += d));
    c.on('error', reject);
    c.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out)) : reject(new Error(`reader exited ${code}`))));
  });
}

describe.each(FILESYSTEMS)('file strategies on $name', ({ dir }) => {
  it.each(STRATEGIES)('%s: device writes reach read() and, by fsync(), the file; close() loses nothing', async (strategy) => {
    const n = 32;
    const { file, fm } = setup(dir, n, strategy);
    await within(fm.run({ op: 'write', seed: 500, unit: 8, threads: 2 }), 10_000, 'device write');
    const st = fm.stats();
    if (strategy === 'copy' || strategy === 'bounce') {
      expect(st).toMatchObject({ devicePages: n, loadedPages: n, dirtyPages: n });
    } else {
      expect(st.devicePages).toBe(0); // the device maps the page-cache pages themselves
    }
    const wb = await within(fm.fsync(), 10_000, 'fsync');
    expect(wb.pages).toBe(n);
    expect(seeds(fs.readFileSync(file)).every((s) => s === 500)).toBe(true);
    expect((await fm.fsync()).pages).toBe(0); // written once: nothing left
    expect(seeds(await fm.pread(0, n * PAGE)).every((s) => s === 500)).toBe(true);

    // The device writes again; read() sees it under every strategy; the file, by strategy.
    await fm.run({ op: 'write', seed: 600, unit: 8 });
    expect(seeds(await fm.pread(0, 4 * PAGE))).toEqual([600, 600, 600, 600]);
    const file4 = seeds(fs.readFileSync(file)).slice(0, 4);
    if (strategy === 'bounce') {
      expect(file4).toEqual([500, 500, 500, 500]); // read through bounce pages: the file waits for writeback
    } else {
      // remote/pin: one shared page; copy: read() pulled A' back into A first.
      expect(file4).toEqual([600, 600, 600, 600]);
    }
    if (strategy === 'copy') expect(fm.stats().pulledBack).toBe(4);
    fm.close(); // not synced: close writes the device's copies back
    expect(seeds(fs.readFileSync(file)).every((s) => s === 600)).toBe(true);
  }, 30_000);

  it.each(STRATEGIES)('%s: pwrite() through the library reaches the device, the file and other readers', async (strategy) => {
    const n = 8;
    const { file, fm } = setup(dir, n, strategy);
    await fm.run({ op: 'read', unit: 8 }); // the device has every page
    await fm.pwrite(2 * PAGE, pattern(2, 900, 2));
    expect((await fm.run({ op: 'verify', offset: 2 * PAGE, npages: 2, seed: 900 + 2 * WORDS, unit: 8 })).mismatches).toBe(0);
    await fm.fsync();
    const s = seeds(fs.readFileSync(file));
    expect(s).toEqual([1, 1, 900, 900, 1, 1, 1, 1]);
    // A partial-page write keeps the rest of the page.
    await fm.pwrite(5 * PAGE + 8, Buffer.alloc(8, 0xff));
    const back = await fm.pread(5 * PAGE, PAGE);
    expect(back.readBigUInt64LE(8)).toBe(0xffffffffffffffffn);
    expect(back.readBigUInt64LE(16)).toBe(BigInt(1 + 5 * WORDS + 2));
  }, 30_000);

  it.each(['copy', 'bounce'] as const)('%s: msync through the library (Mapping.sync) writes the device copies back too', async (strategy) => {
    const { file, m, fm } = setup(dir, 8, strategy);
    await fm.run({ op: 'write', seed: 4242, unit: 8 });
    m.sync();
    expect(seeds(fs.readFileSync(file)).every((s) => s === 4242)).toBe(true);
    expect(fm.stats()).toMatchObject({ dirtyPages: 0, devicePages: 8 }); // written, still on the device
  }, 30_000);

  it.each(['copy', 'bounce'] as const)('%s: a truncate in the middle of a page keeps the head of that page (the device copy is written back first)', async (strategy) => {
    const { file, m, fm } = setup(dir, 4, strategy);
    await fm.run({ op: 'write', seed: 31, unit: 8 });
    m.truncateFile(2 * PAGE + 128);
    // Page 2 was written back before the cut: its head is the device's, already.
    expect(fs.readFileSync(file).subarray(2 * PAGE).equals(pattern(3, 31).subarray(2 * PAGE, 2 * PAGE + 128))).toBe(true);
    await fm.fsync(); // pages 0 and 1 (still on the device)
    const data = fs.readFileSync(file);
    expect(data.length).toBe(2 * PAGE + 128); // writeback wrote nothing past the end
    expect(data.equals(pattern(3, 31).subarray(0, 2 * PAGE + 128))).toBe(true);
  }, 30_000);

  it('torn-write test: while a device rewrites every page with a page-wide sequence number, every page another process reads after a writeback carries one', async () => {
    const n = 64;
    for (const [strategy, snapshot] of [
      ['copy', 'pagecache'],
      ['copy', 'buffer'],
      ['bounce', 'pagecache'],
      ['bounce', 'buffer'],
    ] as const) {
      // remote and pin are not in this test: their page-cache page is the device's page, so a
      // reader sees device writes as they happen (as with a real GPU); only writeback is in question.
      const { file, fm } = setup(dir, n, strategy, { snapshot, chunkPages: 8 });
      // Every page on the device first (bounce on tmpfs: until a page is written back, the file
      // has a hole there).
      await fm.run({ op: 'read', unit: 8 });
      // Device kernels back to back: each adds 1 to every word of every page, pass after pass, a
      // page at a time (the device holds the page while it rewrites it), so between its writes
      // each page carries one sequence number: its first word minus its index. Writebacks race them.
      let stop = false;
      let kernel = 0; // the kernel running now, 0 between kernels
      const device = (async () => {
        for (let k = 1; !stop; k++) {
          kernel = k;
          try {
            await fm.run({ op: 'atomic', unit: 8, ops: 200 * n * WORDS, threads: 1 });
          } finally {
            kernel = 0;
          }
        }
      })();
      // Driven by count, not by the clock (a loaded machine gets fewer writebacks into a given
      // time): writebacks go on until RACES of them ran from start to end inside one kernel.
      const RACES = 8;
      let raced = 0;
      let taken = 0;
      const seen = new Set<string>();
      try {
        while (raced < RACES && taken < 200) {
          const during = kernel;
          await within(fm.writeback(), 10_000, 'writeback');
          if (during !== 0 && kernel === during) raced++;
          const r = await within(readPagesElsewhere(file), 10_000, 'reader');
          expect(r.torn, `${strategy}/${snapshot}: torn pages after writeback ${taken}`).toEqual([]);
          r.seeds.forEach((x) => seen.add(x!));
          taken++;
        }
      } finally {
        stop = true;
        await within(device, 60_000, 'device kernel');
      }
      // The writebacks really ran while the device was writing, and caught it at different passes.
      expect(raced, `${strategy}/${snapshot}: writebacks inside a kernel (of ${taken})`).toBeGreaterThanOrEqual(RACES);
      expect(seen.size, `${strategy}/${snapshot}: sequence numbers seen`).toBeGreaterThan(3);
      fm.close();
    }
  }, 120_000);

  // copy and bounce only: with remote and pin the device writes the page cache itself, which a
  // killed process cannot lose, so the test could not tell a working fsync() from none. (Media
  // durability, fdatasync against power loss, cannot be tested without losing power.)
  it.each(['copy', 'bounce'] as const)('durability test (%s): what fsync() reported survives the process being killed', async (strategy) => {
    const file = path.join(dir, `pagemirror-durable-${strategy}-${process.pid}`);
    const n = 32;
    fs.writeFileSync(file, pattern(n, 1));
    cleanup.push(() => fs.unlinkSync(file));
    const child = spawn(process.execPath, [path.join(FIXTURES_DIR, 'durability.mjs'), file, strategy], { stdio: ['ignore', 'pipe', 'inherit'] });
    let synced = 0;
    let buf = '';
    await within(
      new Promise<void>((resolve, reject) => {
        child.on('exit', (code) => reject(new Error(`child exited early (${code})`)));
        child.stdout.on('data', (d) => {
          buf += d;
          const lines = buf.split('\n');
          buf = lines.pop()!;
          for (const l of lines) synced = Number(l.split(' ')[1]);
          if (synced >= 4001) resolve();
        });
      }),
      20_000,
      'four syncs',
    );
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
    const s = seeds(fs.readFileSync(file));
    expect(s.length).toBe(n);
    for (const [p, v] of s.entries()) {
      expect(v, `page ${p}`).not.toBeNull();
      expect(v!, `page ${p}`).toBeGreaterThanOrEqual(synced);
    }
  }, 30_000);

  it.each(STRATEGIES)('truncate test (%s): a device writing past a truncate through the library; size and contents match the model', async (strategy) => {
    const n = 32;
    const { file, m, fm } = setup(dir, n, strategy);
    await fm.run({ op: 'write', seed: 10_000, unit: 8 });
    let stop = false;
    let last = 10_000;
    let failure: (Error & { code?: string }) | undefined;
    const writer = (async () => {
      for (let s = 20_000; !stop; s += 1000) {
        try {
          await fm.run({ op: 'write', seed: s, unit: 8, threads: 2 });
          last = s;
        } catch (e) {
          failure = e as Error;
          return;
        }
      }
    })();
    await new Promise((r) => setTimeout(r, 20));
    m.truncateFile((n / 2) * PAGE);
    await new Promise((r) => setTimeout(r, 20));
    stop = true;
    await within(writer, 10_000, 'writer');
    // And one more write after the truncate, whatever the loop managed meanwhile.
    const after = await fm.run({ op: 'write', seed: 90_000, unit: 8 }).then(
      () => undefined,
      (e: Error & { code?: string }) => e,
    );
    if (strategy === 'pin') {
      // A long-term pin outlives the truncate: the device keeps its pages (diverged from the file).
      expect(failure).toBeUndefined();
      expect(after).toBeUndefined();
      expect(fm.info().diverged).toBe(n / 2);
    } else {
      if (failure) expect(failure.code).toBe('EFAULT');
      expect(after?.code).toBe('EFAULT'); // past the end of file, as the CPU's SIGBUS
    }
    await fm.fsync();
    expect(fs.statSync(file).size).toBe((n / 2) * PAGE);
    // The first half carries one sequence number per page, one of those the device wrote.
    const half = seeds(fs.readFileSync(file));
    const valid = (x: number | null) => x !== null && ((x >= 10_000 && x <= Math.max(last, 10_000) + 1000) || x === 90_000);
    expect(half.every(valid)).toBe(true);
    // Nothing past the new end was ever written back: extend the file again and it reads zeros.
    fs.truncateSync(file, n * PAGE);
    await fm.fsync();
    expect(fs.readFileSync(file).subarray((n / 2) * PAGE).equals(Buffer.alloc((n / 2) * PAGE))).toBe(true);
  }, 30_000);

  it.for(STRATEGIES)('lease (%s): another process truncating the file breaks the lease; the engine revokes, writes back and releases at once', async (strategy, ctx) => {
    requireCap(ctx, P.experiments.leases, 'file leases');
    if (!PYTHON) ctx.skip('python3 is not installed (it plays the other process, calling truncate(2))');
    const n = 32;
    const { file, fm } = setup(dir, n, strategy, { lease: true });
    expect(fm.stats().leaseHeld).toBe(true);
    await fm.run({ op: 'write', seed: 3000, unit: 8 });
    // A truncate(2) by path from another process (python: no open first); the kernel holds it until
    // we release the lease. spawnSync blocks this JavaScript thread meanwhile: the break is handled
    // by a native thread.
    const t0 = Date.now();
    const c = spawnSync('python3', ['-c', `import os; os.truncate(${JSON.stringify(file)}, ${(n / 2) * PAGE})`], { encoding: 'utf8', timeout: 20_000 });
    const ms = Date.now() - t0;
    expect(c.status, c.stderr).toBe(0);
    expect(ms).toBeLessThan(5000); // lease-break-time is 45 s by default; we answered at once
    const st = fm.stats();
    // Revoked and written back: copy and bounce gave their copies up; pin kept its pages as its own.
    expect(st).toMatchObject({ leaseBreaks: 1, leaseHeld: false, devicePages: strategy === 'pin' ? n : 0 });
    expect(fs.statSync(file).size).toBe((n / 2) * PAGE);
    // Written back before the release: the other process truncated the device's data, not stale pages.
    expect(seeds(fs.readFileSync(file)).every((s) => s === 3000)).toBe(true);
    if (strategy === 'pin') {
      // The pin cannot be revoked: the device keeps its pages, detached from the file.
      await fm.run({ op: 'write', seed: 4000, unit: 8 });
      expect(fm.info().diverged).toBe(n);
    } else {
      await expect(fm.run({ op: 'write', seed: 4000, unit: 8 })).rejects.toMatchObject({ code: 'EFAULT' });
      await fm.run({ op: 'write', seed: 5000, unit: 8, npages: n / 2 });
      await fm.fsync();
      expect(seeds(fs.readFileSync(file)).every((s) => s === 5000)).toBe(true);
    }
  }, 30_000);
});

describe('leases broken by an open', () => {
  it('another process opening the file for reading breaks a write lease too (the kernel\'s rule): written back first', async (ctx) => {
    requireCap(ctx, P.experiments.leases, 'file leases');
    if (!PYTHON) ctx.skip('python3 is not installed (it plays the other process)');
    const { file, fm } = setup(DISK ?? os.tmpdir(), 8, 'bounce', { lease: true });
    await fm.run({ op: 'write', seed: 77, unit: 8 });
    const t0 = Date.now();
    const c = spawnSync('python3', ['-c', `f = open(${JSON.stringify(file)}, 'rb'); import sys; sys.stdout.write(str(f.read(8)[0]))`], { encoding: 'utf8', timeout: 20_000 });
    expect(c.status, c.stderr).toBe(0);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(fm.stats()).toMatchObject({ leaseBreaks: 1, leaseHeld: false, devicePages: 0 });
    expect(Number(c.stdout)).toBe(77 & 0xff); // the reader saw the device's data
  }, 30_000);
});

describe('a file truncated behind the library\'s back (no lease)', () => {
  it.each(['remote', 'pin'] as const)('%s: a device access past the new end is EFAULT for that kernel, not the death of the process', async (strategy) => {
    const { file, fm } = setup(DISK ?? os.tmpdir(), 16, strategy);
    await fm.run({ op: 'write', seed: 5, unit: 8 }); // every entry valid, mapping the page cache
    const c = spawn(process.execPath, ['-e', `require('fs').truncateSync(${JSON.stringify(file)}, ${4 * PAGE})`], { stdio: 'inherit' });
    expect(await within(new Promise((r) => c.on('exit', r)), 20_000, 'the other process')).toBe(0);
    // No invalidation reached the device (the library never saw the truncate): its next access
    // past the end meets the kernel's SIGBUS, caught in the device thread.
    await expect(within(fm.run({ op: 'read', unit: 8 }), 10_000, 'device read')).rejects.toMatchObject({ code: 'EFAULT' });
    expect((await fm.run({ op: 'verify', seed: 5, unit: 8, npages: 4 })).mismatches).toBe(0); // the rest still works
  }, 30_000);
});

describe('eviction of file pages', () => {
  it.each(['lru', 'fifo'] as const)('%s: with many pages gone from the device (stale queue entries), a full memory still finds a victim', async (eviction) => {
    // Regression (found by the file coherence test): the scan bound shrank with each stale entry
    // it dropped and gave up (ENOMEM) before reaching the live pages it had given a second chance.
    const { m, fm, dev } = setup('/dev/shm', 64, 'copy', {}, { memory: 24 * PAGE, eviction });
    for (const first of [0, 24]) {
      await fm.run({ op: 'read', offset: first * PAGE, npages: 24, unit: 8 }); // 24 pages on the device
      await access(m, { op: 'read', offset: first * PAGE, length: 24 * PAGE, unit: 8 }); // the CPU pulls them back
    }
    await fm.run({ op: 'read', offset: 40 * PAGE, npages: 24, unit: 8 }); // memory full of evictable pages
    await within(fm.run({ op: 'read', offset: 0, npages: 1, unit: 8 }), 10_000, 'one more page');
    expect(dev.memory().used).toBe(24);
  }, 30_000);

  it('a device range larger than device memory is served in parts, never evicting the page that faulted', async () => {
    const { fm } = setup(DISK ?? os.tmpdir(), 64, 'copy', {}, { memory: 24 * PAGE, eviction: 'fifo' });
    const r = await within(fm.read(0, 40), 10_000, 'device read of 40 pages'); // a miss faults to the end of the range
    expect(seeds(r.data).every((s) => s === 1)).toBe(true);
  }, 30_000);
});

describe('strategy test: host memory of a dataset resident on the device', () => {
  it.each(FILESYSTEMS)('on $name: bounce keeps next to no page cache, copy keeps the whole dataset', async ({ dir }) => {
    const n = 512; // 2 MiB
    const result: Record<string, { pageCache: number; device: number }> = {};
    for (const strategy of ['copy', 'bounce'] as const) {
      const { fm } = setup(dir, n, strategy, {}, { memory: 8 << 20 });
      await fm.run({ op: 'read', unit: 8 });
      const a = fm.accounting();
      result[strategy] = { pageCache: a.pageCache.cachedPages, device: a.devicePages };
      fm.close();
    }
    expect(result.copy!.device).toBe(n);
    expect(result.bounce!.device).toBe(n);
    expect(result.copy!.pageCache).toBeGreaterThanOrEqual(n * 0.95);
    expect(result.bounce!.pageCache).toBeLessThanOrEqual(n * 0.05);
  }, 30_000);
});

describe('CPU mmap access on tmpfs (userfaultfd registers shmem)', () => {
  it.for(['copy', 'bounce'] as const)('%s: a CPU touch of a page the device wrote faults and pulls it back first', async (strategy, ctx) => {
    requireCap(ctx, P.experiments.fileCpuFaults, 'CPU fault interception on tmpfs');
    const n = 16;
    const { m, fm } = setup('/dev/shm', n, strategy);
    expect(fm.stats().cpuFaultsIntercepted).toBe(true);
    await fm.run({ op: 'write', seed: 77, unit: 8 });
    // CPU threads read through the mapping: real MINOR (copy) or MISSING (bounce) faults.
    const r = await within(access(m, { op: 'verify', seed: 77, unit: 8, threads: 2 }), 10_000, 'CPU verify');
    expect(r.mismatches).toBe(0);
    expect(fm.stats()).toMatchObject({ pulledBack: n, devicePages: 0 });
    // The CPU writes; the device's next access loads the new data.
    await access(m, { op: 'write', seed: 88, unit: 8 });
    expect((await fm.run({ op: 'verify', seed: 88, unit: 8 })).mismatches).toBe(0);
  }, 30_000);
});

describe('copy on tmpfs: A write-protected while A\' is readable (Jan Kara\'s scheme)', () => {
  it('CPU reads of pages the device only read share A; a CPU write takes A\' away; a device write takes the CPU\'s view away', async (ctx) => {
    requireCap(ctx, P.experiments.fileCpuFaults, 'CPU fault interception on tmpfs');
    const n = 16;
    const { m, fm } = setup('/dev/shm', n, 'copy');
    await fm.run({ op: 'verify', seed: 1, unit: 8 }); // the device reads: A' clean, not writable
    // CPU reads: real MINOR faults, answered with A mapped write-protected; the device keeps A'.
    expect((await within(access(m, { op: 'verify', seed: 1, unit: 8 }), 10_000, 'CPU read')).mismatches).toBe(0);
    expect(fm.stats()).toMatchObject({ sharedReads: n, pulledBack: 0, devicePages: n });
    expect((await fm.run({ op: 'verify', seed: 1, unit: 8 })).faults).toBe(0); // still the device's
    // A CPU write to pages 0-3: write-protect faults; A' of those pages goes first.
    await within(access(m, { op: 'write', seed: 50, unit: 8, length: 4 * PAGE }), 10_000, 'CPU write');
    expect(fm.stats()).toMatchObject({ pulledBack: 4, devicePages: n - 4 });
    expect((await fm.run({ op: 'verify', seed: 50, unit: 8, npages: 4 })).mismatches).toBe(0); // reloaded
    // A device write to pages 8-15: the CPU's read-only view goes first; its next read pulls A' back.
    await fm.run({ op: 'write', seed: 70, unit: 8, offset: 8 * PAGE, npages: 8 });
    expect((await access(m, { op: 'verify', seed: 70, unit: 8, offset: 8 * PAGE, length: 8 * PAGE })).mismatches).toBe(0);
    expect(fm.stats().pulledBack).toBe(4 + 8);
  }, 30_000);
});

describe('memfd', () => {
  it.for(STRATEGIES)('%s: a memfd is a file too: device writes, CPU reads through the mapping, read(), fsync()', async (strategy, ctx) => {
    if (strategy === 'copy' || strategy === 'bounce') requireCap(ctx, P.experiments.fileCpuFaults, 'CPU fault interception on shmem');
    const m = mapMemfd(8 * PAGE, { name: 'pagemirror-strategy' });
    fs.writeSync(m.fd, pattern(8, 1), 0, 8 * PAGE, 0);
    const dev = Device.create();
    const fm = dev.mirrorFile(m, { strategy });
    cleanup.push(() => m.close(), () => dev.close(), () => fm.close());
    await fm.run({ op: 'write', seed: 44, unit: 8 });
    expect((await within(access(m, { op: 'verify', seed: 44, unit: 8 }), 10_000, 'CPU verify')).mismatches).toBe(0);
    expect(seeds(await fm.pread(0, 8 * PAGE)).every((x) => x === 44)).toBe(true);
    await fm.fsync();
    const back = Buffer.alloc(8 * PAGE);
    fs.readSync(m.fd, back, 0, back.length, 0);
    expect(seeds(back).every((x) => x === 44)).toBe(true);
  }, 30_000);
});

describe('the end of a process or a worker thread', () => {
  it.for([
    ['copy', 'process'],
    ['bounce', 'process'],
    ['bounce', 'worker'],
  ] as const)('%s, %s ending without close() or fsync(): the device\'s copies are written back', ([strategy, where], ctx) => {
    if (!DISK) ctx.skip('no disk file system here: the temp dir and /var/tmp are tmpfs');
    const file = path.join(DISK!, `pagemirror-exit-${process.pid}-${strategy}-${where}`);
    fs.writeFileSync(file, pattern(8, 1));
    cleanup.push(() => fs.unlinkSync(file));
    const r = spawnSync(process.execPath, [path.join(FIXTURES_DIR, 'exit-writeback.mjs'), file, strategy, where], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(seeds(fs.readFileSync(file)).every((x) => x === 4321)).toBe(true);
  });
});

describe('second review regressions', () => {
  it('bounce on tmpfs: a library write into a page the CPU reads (shared after writeback) takes the CPU\'s stale view away', async (ctx) => {
    requireCap(ctx, P.experiments.fileCpuFaults, 'CPU fault interception on tmpfs');
    const { m, fm } = setup('/dev/shm', 4, 'bounce');
    await fm.run({ op: 'read', unit: 8 }); // on the device, A punched
    await fm.writeback(); // A back in the file, the device keeps a clean copy
    expect(seeds(await m.read(0, 4 * PAGE))).toEqual([1, 1, 1, 1]); // CPU reads share A
    expect(fm.stats().sharedReads).toBe(4);
    await fm.pwrite(0, pattern(1, 77));
    expect(seeds(await m.read(0, PAGE))).toEqual([77]); // not the stale shared page
  }, 30_000);

  it('bounce: a write past end of file inside the last page extends the file, as pwrite(2) does', async () => {
    const file = path.join(os.tmpdir(), `pagemirror-eof-${process.pid}`);
    fs.writeFileSync(file, Buffer.alloc(PAGE + 100, 1));
    cleanup.push(() => fs.unlinkSync(file));
    const m = mapFile(file, { length: 2 * PAGE });
    const dev = Device.create();
    const fm = dev.mirrorFile(m, { strategy: 'bounce' });
    cleanup.push(() => m.close(), () => dev.close(), () => fm.close());
    await fm.run({ op: 'read', unit: 8, npages: 2 });
    await fm.pwrite(PAGE + 100, Buffer.alloc(50, 9));
    await fm.fsync();
    expect(fs.statSync(file).size).toBe(PAGE + 150);
    expect(fs.readFileSync(file).subarray(PAGE + 100).equals(Buffer.alloc(50, 9))).toBe(true);
  }, 30_000);

  it('pin: a file truncated behind the library\'s back, then a protect: the pin keeps what it can, the process lives', async () => {
    const { file, m, fm } = setup(DISK ?? os.tmpdir(), 8, 'pin', {}, { preallocate: true });
    await fm.run({ op: 'write', seed: 3, unit: 8 });
    const c = spawn(process.execPath, ['-e', `require('fs').truncateSync(${JSON.stringify(file)}, ${4 * PAGE})`], { stdio: 'inherit' });
    expect(await within(new Promise((r) => c.on('exit', r)), 20_000, 'the other process')).toBe(0);
    m.protect('r'); // invalidation: the pin copies its pages; those past the end fault (SIGBUS), caught
    expect(fm.info().diverged).toBe(4);
    expect((await fm.run({ op: 'verify', seed: 3, unit: 8, npages: 4 })).mismatches).toBe(0);
  }, 30_000);
});

// A file system that runs out of space: the copies the file cannot take stay on the device, the
// errors are typed, a CPU access to such a page is a SIGBUS (not a stale page), and close() says
// what was lost. Needs root (a small tmpfs is mounted for it).
describe('a full file system (ENOSPC)', () => {
  const tmp = smallTmpfs(16, 'pagemirror-full');

  it('bounce: writeback fails with ENOSPC and loses nothing; a CPU access is a SIGBUS; close() reports the loss', async (ctx) => {
    const mnt = tmp.dir;
    if (!mnt) return ctx.skip(tmp.why);
    requireCap(ctx, P.experiments.fileCpuFaults, 'CPU fault interception on tmpfs');
    requireCap(ctx, P.experiments.poison, 'UFFDIO_POISON');
    const file = path.join(mnt, 'data');
    fs.writeFileSync(file, pattern(8, 1));
    const m = mapFile(file);
    const dev = Device.create();
    const fm = dev.mirrorFile(m, { strategy: 'bounce' });
    try {
      await fm.run({ op: 'write', seed: 60, unit: 8 }); // A punched: the device holds the only copy
      const filler = path.join(mnt, 'filler');
      try {
        fs.writeFileSync(filler, Buffer.alloc(16 * PAGE)); // fills what the punch freed
      } catch {
        /* ENOSPC part way: full either way */
      }
      await expect(fm.fsync()).rejects.toMatchObject({ code: 'ENOSPC' });
      expect(fm.stats()).toMatchObject({ devicePages: 8, dirtyPages: 8 });
      expect(fm.stats().storeErrors).toBeGreaterThan(0);
      expect((await fm.run({ op: 'verify', seed: 60, unit: 8 })).mismatches).toBe(0); // nothing lost
      const r = await within(access(m, { op: 'read', length: PAGE }), 10_000, 'CPU read');
      expect(r.signal).toBe('SIGBUS'); // the file cannot take the page back: no stale page
      fs.rmSync(filler);
      await fm.fsync(); // space again: everything is written
      expect(seeds(fs.readFileSync(file)).every((s) => s === 60)).toBe(true);
      fm.close();

      // Full again, and a mirror closed with copies the file cannot take: close() says so.
      const file2 = path.join(mnt, 'data2');
      fs.writeFileSync(file2, pattern(2, 1));
      const m2 = mapFile(file2);
      const fm2 = dev.mirrorFile(m2, { strategy: 'bounce' });
      await fm2.run({ op: 'write', seed: 61, unit: 8 }); // punched: the only copies on the device
      try {
        fs.writeFileSync(filler, Buffer.alloc(16 * PAGE));
      } catch {
        /* full */
      }
      expect(() => fm2.close()).toThrow(
        expect.objectContaining({ code: 'ERR_PAGEMIRROR_DATA_LOST', errno: -28, cause: 'ENOSPC', pages: 2, message: expect.stringContaining('2 pages') }),
      );
      fm2.close(); // closed already: idempotent
      m2.close();
    } finally {
      fm.close();
      dev.close();
      m.close();
    }
  }, 30_000);
});

describe('file strategy errors', () => {
  it('refuses memory that is not a shared file mapping, mixing, and bad ranges, with typed errors', () => {
    const dev = Device.create();
    const anon = mapAnonymous(4 * PAGE);
    try {
      expect(() => dev.mirrorFile(anon, { strategy: 'copy' })).toThrow(expect.objectContaining({ code: 'EINVAL', syscall: 'mirror' }));
      expect(() => dev.mirrorFile(anon, { strategy: 'sideways' as FileStrategy })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
    } finally {
      anon.close();
      dev.close();
    }
    const { m, dev: d2, fm } = setup('/dev/shm', 4, 'copy');
    expect(() => d2.mirror(m)).toThrow(expect.objectContaining({ code: 'EEXIST' }));
    const other = Device.create();
    cleanup.push(() => other.close());
    expect(() => other.mirror(m)).toThrow(expect.objectContaining({ code: 'EBUSY' }));
    expect(() => fm.pread(0, 5 * PAGE)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => fm.pread(-1, 1)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => fm.pwrite(0, 'text' as unknown as Uint8Array)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => fm.writeback({ offset: 100 })).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_UNALIGNED' }));
    expect(() => d2.mirrorFile(m, { strategy: 'copy', chunkPages: 0 })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => d2.mirrorFile(m, { strategy: 'copy', snapshot: 'torn' as 'buffer' })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
    fm.close();
    expect(() => fm.pread(0, PAGE)).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    expect(() => fm.fsync()).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    expect(() => fm.stats()).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
  });

  it('copy/bounce on the disk: the CPU mapping is not handed to JavaScript (it could read stale pages)', async (ctx) => {
    if (!DISK) ctx.skip('no disk file system here: the temp dir and /var/tmp are tmpfs');
    const { m, fm } = setup(DISK!, 4, 'bounce');
    expect(fm.stats().cpuFaultsIntercepted).toBe(false);
    expect(() => m.bytes).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_FILE_STRATEGY' }));
    await expect(access(m as Mapping, { op: 'read' })).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_FILE_STRATEGY' });
    fm.close();
    expect(m.bytes.length).toBe(4 * PAGE); // the mirror gone, the mapping is the file's again
  });

  it('a lease on a file open elsewhere: EAGAIN, with the reason', (ctx) => {
    requireCap(ctx, P.experiments.leases, 'file leases');
    const file = path.join(os.tmpdir(), `pagemirror-lease-busy-${process.pid}`);
    fs.writeFileSync(file, Buffer.alloc(4 * PAGE));
    const fd = fs.openSync(file, 'r');
    const m = mapFile(file);
    const dev = Device.create();
    try {
      expect(() => dev.mirrorFile(m, { strategy: 'copy', lease: true })).toThrow(
        expect.objectContaining({ code: 'EAGAIN', syscall: 'fcntl(F_SETLEASE)', path: file }),
      );
      expect(() => dev.mirrorFile(m, { strategy: 'copy' })).not.toThrow(); // the failed one left nothing behind
    } finally {
      fs.closeSync(fd);
      dev.close();
      m.close();
      fs.unlinkSync(file);
    }
  });

  it('DAX: copy and bounce are refused (EOPNOTSUPP); remote mirrors and writeback is a no-op', async (ctx) => {
    if (!P.experiments.dax.ok) ctx.skip(`DAX: ${P.experiments.dax.reason ?? 'no DAX file system'}`);
    const f = path.join(P.dax.candidates[0]!, `pagemirror-dax-${process.pid}`);
    fs.writeFileSync(f, Buffer.alloc(4 * PAGE));
    const m = mapFile(f);
    const dev = Device.create();
    try {
      expect(() => dev.mirrorFile(m, { strategy: 'bounce' })).toThrow(expect.objectContaining({ code: 'EOPNOTSUPP' }));
      const fm = dev.mirrorFile(m, { strategy: 'remote' });
      await fm.run({ op: 'write', seed: 1, unit: 8 });
      expect((await fm.fsync()).pages).toBe(0);
      fm.close();
    } finally {
      dev.close();
      m.close();
      fs.unlinkSync(f);
    }
  });
});

// xfs (and any other file system) on a loop-mounted image: the same strategy round as above. Skips,
// with the reason, where the image cannot be made (no mkfs for it, not root, no loop devices).
describe.each(['xfs', 'btrfs'])('file strategies on a loop-mounted %s image', (fsType) => {
  let mnt: string | undefined;
  let why: string | undefined;
  let dir: string | undefined;
  beforeAll(() => {
    const mkfs = ['/usr/sbin/mkfs.' + fsType, '/sbin/mkfs.' + fsType].find((p) => fs.existsSync(p));
    if (!mkfs) return void (why = `mkfs.${fsType} is not installed`);
    if (process.getuid?.() !== 0) return void (why = 'mounting a loop image needs root');
    if (!fs.existsSync('/dev/loop-control')) return void (why = 'no loop devices here (/dev/loop-control)');
    // From here a failure is the test's failure, not a reason to skip.
    dir = fs.mkdtempSync(path.join(os.tmpdir(), `pagemirror-${fsType}-`));
    const img = path.join(dir, 'image');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 512 << 20);
    const mk = spawnSync(mkfs, ['-q', img], { encoding: 'utf8', timeout: 60_000 });
    if (mk.status !== 0) throw new Error(`mkfs.${fsType} failed: ${mk.stderr.trim()}`);
    fs.mkdirSync(path.join(dir, 'mnt'));
    const mo = spawnSync('mount', ['-o', 'loop', img, path.join(dir, 'mnt')], { encoding: 'utf8', timeout: 60_000 });
    if (mo.status !== 0) throw new Error(`mount -o loop failed: ${mo.stderr.trim()}`);
    mnt = path.join(dir, 'mnt');
  });
  afterAll(() => {
    if (mnt) spawnSync('umount', [mnt], { timeout: 60_000 });
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });
  it.for(STRATEGIES)('%s: device writes, read(), fsync(), close()', async (strategy, ctx) => {
    if (!mnt) return ctx.skip(`${fsType} image: ${why}`);
    expect(fileSystemOf(mnt)).toBe(fsType);
    const n = 32;
    const { file, fm } = setup(mnt, n, strategy);
    await within(fm.run({ op: 'write', seed: 900, unit: 8, threads: 2 }), 10_000, 'device write');
    expect(seeds(await fm.pread(0, n * PAGE)).every((s) => s === 900)).toBe(true);
    await within(fm.fsync(), 10_000, 'fsync');
    expect(seeds(fs.readFileSync(file)).every((s) => s === 900)).toBe(true);
  }, 30_000);
});
