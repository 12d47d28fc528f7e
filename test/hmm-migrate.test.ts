// The migration scenarios of the kernel's HMM tests (../shared/reference/hmm-tests.md): pages move
// into device memory, CPU touches fault them back, and what cannot move says why.
import { describe, it, expect } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { mapAnonymous, mapFile, Device, Userfaultfd, access, forkAccess, fileSystemOf, SNAPSHOT as S, type Mapping } from '../lib/index.js';
import { P, PAGE, within, requireCap } from './helpers.js';

const NPAGES = 1024;

function fillPages(m: Mapping, value: (i: number) => bigint): void {
  const w = new BigUint64Array(m.bytes.buffer);
  for (let i = 0; i < m.length / PAGE; i++) w[(i * PAGE) / 8] = value(i);
}

/** Sum of value(i) over pages [from, to): what a one-word-per-page read checksum must be. */
function sum(from: number, to: number, value: (i: number) => bigint): bigint {
  let s = 0n;
  for (let i = from; i < to; i++) s += value(i);
  return s;
}

async function withDevices<T>(n: number, fn: (...devs: Device[]) => Promise<T>): Promise<T> {
  const devs = Array.from({ length: n }, (_, i) => Device.create({ name: `dev${i}`, memory: 16 << 20 }));
  try {
    return await fn(...devs);
  } finally {
    for (const d of devs) d.close();
  }
}

const ID = (i: number) => BigInt(i);

describe('migration (hmm-tests)', () => {
  it('migrate: every page moves; the device reads them from its memory without faulting', (ctx) =>
    withDevices(1, async (dev) => {
      requireCap(ctx, P.experiments.move, 'UFFDIO_MOVE');
      const m = mapAnonymous(NPAGES * PAGE);
      try {
        fillPages(m, ID);
        const mir = dev.mirror(m);
        const r = await within(mir.migrateToDevice(0, NPAGES), 10_000, 'migrate');
        expect(r).toMatchObject({ cpages: NPAGES, moved: NPAGES, byMove: NPAGES, skipped: [] });
        expect(m.residency().some(Boolean)).toBe(false); // host copies freed
        expect(dev.memory().used).toBe(NPAGES);
        expect(mir.entries().every((e) => e.onDevice && e.valid)).toBe(true);
        const rd = await mir.read(0, NPAGES);
        expect(rd.faults).toBe(0);
        expect(rd.data.readBigUInt64LE(77 * PAGE)).toBe(77n);
        mir.close(); // brings the data home first
        expect(m.readSync(5 * PAGE, 8).readBigUInt64LE()).toBe(5n);
      } finally {
        m.close();
      }
    }));

  it('migrate_fault: a CPU read of half the range migrates it back; migrating again reports npages', () =>
    withDevices(1, async (dev) => {
      const m = mapAnonymous(NPAGES * PAGE);
      try {
        fillPages(m, ID);
        const mir = dev.mirror(m);
        expect((await mir.migrateToDevice(0, NPAGES)).cpages).toBe(NPAGES);
        const a = await within(access(m, { length: (NPAGES / 2) * PAGE, op: 'read' }), 10_000, 'CPU read');
        expect(a.checksum).toBe(sum(0, NPAGES / 2, ID));
        expect(dev.memory().used).toBe(NPAGES / 2);
        expect(dev.counters().invalidations['cpu-access']).toBe(NPAGES / 2);
        const again = await mir.migrateToDevice(0, NPAGES);
        expect(again.cpages).toBe(NPAGES);
        expect(again.moved).toBe(NPAGES / 2);
        const all = await access(m, { op: 'read' });
        expect(all.checksum).toBe(sum(0, NPAGES, ID));
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('migrate_release: release evicts everything; the CPU reads the data', () =>
    withDevices(1, async (dev) => {
      const m = mapAnonymous(NPAGES * PAGE);
      try {
        fillPages(m, ID);
        const mir = dev.mirror(m);
        await mir.migrateToDevice(0, NPAGES);
        expect(await dev.release()).toBe(NPAGES);
        expect(dev.memory().used).toBe(0);
        const a = await access(m, { length: (NPAGES / 2) * PAGE, op: 'read' });
        expect(a.checksum).toBe(sum(0, NPAGES / 2, ID));
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('migrate_shared: shared anonymous memory does not move: ENOENT, every page skipped as shared', () =>
    withDevices(1, async (dev) => {
      const m = mapAnonymous(NPAGES * PAGE, { shared: true });
      try {
        const mir = dev.mirror(m);
        const err = await mir.migrateToDevice(0, NPAGES).catch((e: unknown) => e);
        expect(err).toMatchObject({ code: 'ENOENT', syscall: 'migrate' });
        const skipped = (err as { skipped: { reason: string }[] }).skipped;
        expect(skipped).toHaveLength(NPAGES);
        expect(skipped.every((s) => s.reason === 'shared')).toBe(true);
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('migrate_multiple: 10 rounds of fresh data migrate and read back', () =>
    withDevices(1, async (dev) => {
      for (let c = 0; c < 10; c++) {
        const m = mapAnonymous(64 * PAGE);
        try {
          fillPages(m, (i) => BigInt(i + c));
          const mir = dev.mirror(m);
          expect((await mir.migrateToDevice(0, 64)).cpages).toBe(64);
          const a = await access(m, { op: 'read' });
          expect(a.checksum).toBe(sum(0, 64, (i) => BigInt(i + c)));
          mir.close();
        } finally {
          m.close();
        }
      }
      expect(dev.memory().used).toBe(0);
    }));

  // migrate_file_private: the kernel moves the pages the CPU copied on write in a private file
  // mapping and skips the pages still backed by the file. Where userfaultfd can register the
  // mapping (tmpfs, memfd), the same here; where it cannot (ext4, xfs), nothing would catch the
  // CPU's next touch of a moved page's hole, which would read the file again: refused, saying so.
  const privateFile = (dir: string) => {
    const d = fs.mkdtempSync(path.join(dir, 'pagemirror-mfp-'));
    const f = path.join(d, 'f.bin');
    fs.writeFileSync(f, Buffer.alloc(64 * PAGE, 0xee));
    const m = mapFile(f, { shared: false });
    const words = new BigUint64Array(m.bytes.buffer);
    for (let i = 0; i < 32; i++) words[(i * PAGE) / 8] = BigInt(i); // CPU writes: copy on write
    for (let i = 32; i < 48; i++) expect(words[(i * PAGE) / 8]).toBe(0xeeeeeeeeeeeeeeeen); // read: still the file's
    return { f, m, done: () => (m.close(), fs.rmSync(d, { recursive: true, force: true })) };
  };
  const FILE_WORD = 0xeeeeeeeeeeeeeeeen;
  const DISK = [os.tmpdir(), '/var/tmp'].find((d) => fs.existsSync(d) && fileSystemOf(d) !== 'tmpfs');

  it('migrate_file_private (tmpfs): copied-on-write pages move, file pages are skipped; a CPU touch brings the written data back', (ctx) =>
    withDevices(1, async (dev) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      const { f, m, done } = privateFile('/dev/shm');
      try {
        const mir = dev.mirror(m);
        const r = await within(mir.migrateToDevice(0, 64), 10_000, 'migrate');
        expect(r).toMatchObject({ cpages: 32, moved: 32, byCopy: 32, byMove: 0 });
        expect(r.skipped).toEqual(Array.from({ length: 32 }, (_, k) => ({ offset: (32 + k) * PAGE, reason: 'file-backed' })));
        expect(dev.memory().used).toBe(32);
        expect(mir.entries(0, 32).every((e) => e.onDevice)).toBe(true);
        expect(m.pagemap({ length: 32 * PAGE }).some((p) => p.present)).toBe(false); // the CPU's copies are gone
        // The device reads the written pages from its memory and the file's pages in place.
        const rd = await within(mir.read(0, 64), 10_000, 'device read');
        for (let i = 0; i < 64; i++) expect(rd.data.readBigUInt64LE(i * PAGE)).toBe(i < 32 ? BigInt(i) : FILE_WORD);
        // A CPU touch of a moved page faults and brings the written data home, not the file's.
        const a = await within(access(m, { length: 32 * PAGE, op: 'read' }), 10_000, 'CPU read');
        expect(a.checksum).toBe(sum(0, 32, ID));
        expect(dev.memory().used).toBe(0);
        expect(dev.counters().migratedToHost['cpu-fault']).toBe(32);
        const after = new BigUint64Array(m.readSync(0, 64 * PAGE).buffer.slice(0));
        for (let i = 0; i < 64; i++) expect(after[(i * PAGE) / 8]).toBe(i < 32 ? BigInt(i) : FILE_WORD);
        // Moved again; a CPU write as first touch (a write fault on the hole) and a CPU increment
        // each get the device's data first.
        expect((await mir.migrateToDevice(0, 32)).cpages).toBe(32);
        await within(access(m, { length: 16 * PAGE, op: 'write', seed: 5, unit: PAGE }), 10_000, 'CPU write');
        await within(access(m, { offset: 16 * PAGE, length: 16 * PAGE, op: 'rmw' }), 10_000, 'CPU increment');
        const p7 = m.readSync(7 * PAGE, 16); // the written word, and the rest of the page as the device kept it
        expect([p7.readBigUInt64LE(0), p7.readBigUInt64LE(8)]).toEqual([5n + 7n * BigInt(PAGE / 8), FILE_WORD]);
        expect(m.readSync(20 * PAGE, 8).readBigUInt64LE()).toBe(21n);
        expect(dev.memory().used).toBe(0);
        // Closing the mirror with pages on the device brings them home (UFFDIO_COPY: MOVE takes
        // anonymous VMAs only).
        expect((await mir.migrateToDevice(16 * PAGE, 16)).cpages).toBe(16);
        mir.close();
        expect(m.readSync(20 * PAGE, 8).readBigUInt64LE()).toBe(21n);
        expect(m.readSync(40 * PAGE, 8).readBigUInt64LE()).toBe(FILE_WORD);
        expect(fs.readFileSync(f).equals(Buffer.alloc(64 * PAGE, 0xee))).toBe(true); // the file never saw any of it
      } finally {
        done();
      }
    }));

  it('migrate_file_private (disk file system): refused page by page, written pages as userfaultfd-unsupported', (ctx) =>
    withDevices(1, async (dev) => {
      if (!DISK) ctx.skip('no disk file system here: os.tmpdir() and /var/tmp are tmpfs');
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      const { f, m, done } = privateFile(DISK!);
      try {
        const mir = dev.mirror(m);
        const err = await mir.migrateToDevice(0, 64).catch((e: unknown) => e);
        expect(err).toMatchObject({ code: 'ENOENT', syscall: 'migrate' });
        const skipped = (err as { skipped: { offset: number; reason: string }[] }).skipped;
        expect(skipped).toEqual(
          Array.from({ length: 64 }, (_, i) => ({ offset: i * PAGE, reason: i < 32 ? 'userfaultfd-unsupported' : 'file-backed' })),
        );
        expect(dev.memory().used).toBe(0);
        // The refusal is the kernel's: userfaultfd does not register a private mapping of this
        // file system (vma_can_userfault: anonymous, shmem and hugetlb only). A kernel that
        // learns to would fail this, and the engine should then move these pages too.
        const u = Userfaultfd.open();
        try {
          expect(() => u.register(m)).toThrow(expect.objectContaining({ code: 'EINVAL' }));
        } finally {
          u.close();
        }
        // The device still mirrors the pages in place.
        const rd = await mir.read(0, 64);
        expect(rd.data.readBigUInt64LE(9 * PAGE)).toBe(9n);
        expect(rd.data.readBigUInt64LE(40 * PAGE)).toBe(FILE_WORD);
        mir.close();
        expect(fs.readFileSync(f).subarray(0, 8)).toEqual(Buffer.alloc(8, 0xee));
      } finally {
        done();
      }
    }));

  it('migrate_mixed: PROT_NONE is EINVAL; a read-only zero page and written pages move; another device cannot take them', () =>
    withDevices(2, async (d0, d1) => {
      const m = mapAnonymous(6 * PAGE, { prot: 'none' });
      try {
        const m0 = d0.mirror(m);
        const m1 = d1.mirror(m);
        await expect(m1.migrateToDevice(0, 6)).rejects.toMatchObject({ code: 'EINVAL' });
        m.protect('r', { offset: 2 * PAGE, length: PAGE });
        m.readSync(2 * PAGE, 1); // page 2: read-only zero page
        m.protect('rw', { offset: 3 * PAGE, length: 3 * PAGE });
        m.writeSync(3 * PAGE, Buffer.from([3]));
        m.protect('r', { offset: 3 * PAGE, length: PAGE }); // page 3: written, then read-only
        m.writeSync(4 * PAGE, Buffer.from([4]));
        m.writeSync(5 * PAGE, Buffer.from([5]));
        const r = await m1.migrateToDevice(2 * PAGE, 4);
        expect(r.cpages).toBe(4);
        const e = await m0.migrateToDevice(5 * PAGE, 1).catch((x: unknown) => x);
        expect(e).toMatchObject({ code: 'ENOENT' });
        expect((e as { skipped: { reason: string }[] }).skipped[0]!.reason).toBe('other-device');
        m0.close();
        m1.close();
        expect(m.readSync(3 * PAGE, 1)[0]).toBe(3);
        expect(m.readSync(5 * PAGE, 1)[0]).toBe(5);
      } finally {
        m.close();
      }
    }));

  it('snapshot: ERROR, ZERO|READ, READ, WRITE, DEV_PRIVATE_LOCAL|WRITE, NONE (another device)', (ctx) =>
    withDevices(2, async (d0, d1) => {
      requireCap(ctx, P.pagemapScan, 'PAGEMAP_SCAN');
      requireCap(ctx, P.zeroPage, 'the shared zero page');
      const m = mapAnonymous(7 * PAGE);
      try {
        const s0 = d0.mirror(m);
        const s1 = d1.mirror(m);
        m.writeSync(3 * PAGE, Buffer.from([1]));
        m.writeSync(4 * PAGE, Buffer.from([1]));
        m.writeSync(5 * PAGE, Buffer.from([1]));
        m.writeSync(6 * PAGE, Buffer.from([1]));
        m.readSync(2 * PAGE, 1); // the zero page
        m.protect('none', { offset: 0, length: PAGE });
        m.protect('r', { offset: 2 * PAGE, length: 2 * PAGE });
        await s0.migrateToDevice(5 * PAGE, 1);
        await s1.migrateToDevice(6 * PAGE, 1);
        const snap = Array.from(s0.snapshot(0, 7));
        // Page 1 of the kernel test is an unmapped hole; a Mapping cannot have one, so it is left
        // untouched here and reads NONE.
        expect(snap).toEqual([S.ERROR, S.NONE, S.ZERO | S.READ, S.READ, S.WRITE, S.DEV_PRIVATE_LOCAL | S.WRITE, S.NONE]);
        s0.close();
        s1.close();
      } finally {
        m.close();
      }
    }));

  it('the copy path (no UFFDIO_MOVE) moves the same data, under write protection', () =>
    withDevices(1, async (dev) => {
      const m = mapAnonymous(256 * PAGE);
      try {
        fillPages(m, (i) => BigInt(i * 3));
        const mir = dev.mirror(m);
        const r = await mir.migrateToDevice(0, 256, { useMove: false });
        expect(r).toMatchObject({ cpages: 256, byCopy: 256, byMove: 0 });
        const a = await access(m, { op: 'read' });
        expect(a.checksum).toBe(sum(0, 256, (i) => BigInt(i * 3)));
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('preallocated device memory: a migration copies into pages that exist; pages move home', async () => {
    const dev = Device.create({ memory: 128 * PAGE, preallocate: true });
    const m = mapAnonymous(128 * PAGE);
    try {
      fillPages(m, (i) => BigInt(i * 5));
      const mir = dev.mirror(m);
      for (let round = 0; round < 3; round++) {
        const r = await mir.migrateToDevice(0, 128);
        expect(r.cpages).toBe(128);
        // The first round copies into the preallocated pages; those pages then move home, and
        // later rounds fill the holes they left (by MOVE, no copy).
        if (round === 0) expect(r).toMatchObject({ byMove: 0, byCopy: 128 });
        expect((await mir.read(0, 128)).data.readBigUInt64LE(7 * PAGE)).toBe(35n);
        expect((await mir.migrateToHost(0, 128)).cpages).toBe(128);
        expect((await access(m, { op: 'read' })).checksum).toBe(sum(0, 128, (i) => BigInt(i * 5)));
      }
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('device memory full: pages that do not fit are listed as device-memory-full; the rest move', () => {
    const dev = Device.create({ memory: 16 * PAGE });
    const m = mapAnonymous(32 * PAGE);
    return (async () => {
      try {
        fillPages(m, ID);
        const mir = dev.mirror(m);
        const r = await mir.migrateToDevice(0, 32);
        expect(r.cpages).toBe(16);
        expect(r.skipped).toHaveLength(16);
        expect(r.skipped.every((s) => s.reason === 'device-memory-full')).toBe(true);
        expect((await access(m, { op: 'read' })).checksum).toBe(sum(0, 32, ID));
        mir.close();
      } finally {
        dev.close();
        m.close();
      }
    })();
  });

  it('CPU writers racing migrations in and out: no lost write', () =>
    withDevices(1, async (dev) => {
      const m = mapAnonymous(64 * PAGE);
      try {
        const mir = dev.mirror(m);
        let stop = false;
        const cpu = (async () => {
          let n = 0;
          while (!stop) {
            await access(m, { op: 'rmw', threads: 2, unit: PAGE });
            n++;
          }
          return n;
        })();
        let rounds = 0;
        // Both paths (MOVE, copy under write protection) and both granules (page, 64 KiB runs).
        for (let i = 0; i < 120; i++) {
          await mir.migrateToDevice(0, 64, { useMove: i % 3 === 0, granule: i % 2 ? PAGE : 64 << 10 });
          await mir.migrateToHost(0, 64);
          rounds++;
        }
        stop = true;
        const increments = await within(cpu, 10_000, 'CPU writers');
        mir.close();
        // Every page's word was incremented once per CPU round: nothing lost across migrations.
        const words = new BigUint64Array(m.bytes.buffer);
        for (let p = 0; p < 64; p++) expect(words[(p * PAGE) / 8]).toBe(BigInt(increments));
        expect(rounds).toBe(120);
        expect(increments).toBeGreaterThan(0);
      } finally {
        m.close();
      }
    }), 30_000);
});

describe('exclusive access and fork (hmm-tests)', () => {
  it('exclusive: a CPU increment of every page revokes it; checkExclusive then passes', () =>
    withDevices(1, async (dev) => {
      const m = mapAnonymous(64 * PAGE);
      try {
        fillPages(m, ID);
        const mir = dev.mirror(m);
        const r = await mir.exclusive(0, 64);
        expect(r.cpages).toBe(64);
        expect(() => mir.checkExclusive(0, 64)).toThrow(expect.objectContaining({ code: 'EPERM', pages: 64 }));
        await within(access(m, { op: 'rmw' }), 10_000, 'CPU increments'); // p[i]++ on the CPU
        expect(() => mir.checkExclusive(0, 64)).not.toThrow();
        // Read once the engine no longer registers the mapping: while it does, m.bytes has a view
        // only if the one fillPages() made has not been collected yet (a flake, depending on GC).
        mir.close();
        const words = new BigUint64Array(m.bytes.buffer);
        for (let i = 0; i < 64; i++) expect(words[(i * PAGE) / 8]).toBe(BigInt(i + 1));
      } finally {
        m.close();
      }
    }));

  it('exclusive_mprotect: exclusive, then read-only: a device write is EPERM', () =>
    withDevices(1, async (dev) => {
      const m = mapAnonymous(16 * PAGE);
      try {
        fillPages(m, ID);
        const mir = dev.mirror(m);
        await mir.exclusive(0, 16);
        m.protect('r');
        expect(() => mir.checkExclusive(0, 16)).not.toThrow(); // mprotect revoked exclusivity
        await expect(mir.write(0, Buffer.alloc(16 * PAGE, 1))).rejects.toMatchObject({ code: 'EPERM' });
        expect((await mir.read(0, 16)).data.readBigUInt64LE(3 * PAGE)).toBe(3n); // data intact
        mir.close();
      } finally {
        m.close();
      }
    }));

  for (const migrated of [false, true]) {
    it(`anon_write_child${migrated ? ' (migrated first)' : ''}: the child sees its own writes, the parent keeps its data`, () =>
      withDevices(1, async (dev) => {
        const m = mapAnonymous(64 * PAGE);
        try {
          await access(m, { op: 'write', seed: 100 });
          const mir = dev.mirror(m);
          await mir.write(0, m.readSync(0, 64 * PAGE)); // the device holds write access to every page
          if (migrated) await mir.migrateToDevice(0, 64);
          // Node cannot run JavaScript in a forked child: the child runs a native kernel that
          // writes, then verifies its own writes.
          const child = await within(forkAccess(m, { op: 'write', seed: 200 }), 10_000, 'child');
          expect(child.exitCode).toBe(0);
          expect(mir.entries().some((e) => e.valid && e.write && !e.onDevice)).toBe(false); // fork revoked write access
          expect((await access(m, { op: 'verify', seed: 100 })).mismatches).toBe(0); // parent unchanged
          const w = await mir.write(0, Buffer.alloc(64 * PAGE, 9)); // the device writes again: copy on write in the parent
          expect(w.faults).toBe(1);
          mir.close();
        } finally {
          m.close();
        }
      }));
  }

  it('anon_write_child_shared: the child writes shared memory, the parent (and its device) see it', () =>
    withDevices(1, async (dev) => {
      const m = mapAnonymous(16 * PAGE, { shared: true });
      try {
        await access(m, { op: 'write', seed: 1 });
        const mir = dev.mirror(m);
        await mir.read(0, 16);
        const child = await forkAccess(m, { op: 'write', seed: 7 });
        expect(child.exitCode).toBe(0);
        expect((await access(m, { op: 'verify', seed: 7 })).mismatches).toBe(0);
        const rd = await mir.read(0, 16);
        expect(rd.data.readBigUInt64LE(2 * PAGE)).toBe(7n + BigInt((2 * PAGE) / 8));
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('cow_in_device: pages in device memory at fork come home; the parent writes them all: WRITE', (ctx) =>
    withDevices(1, async (dev) => {
      requireCap(ctx, P.pagemapScan, 'PAGEMAP_SCAN');
      const m = mapAnonymous(4 * PAGE);
      try {
        fillPages(m, ID);
        const mir = dev.mirror(m);
        expect((await mir.migrateToDevice(0, 4)).cpages).toBe(4);
        const child = forkAccess(m, { op: 'read', delayMs: 200 }); // the child lingers meanwhile
        await new Promise((r) => setTimeout(r, 50));
        await access(m, { op: 'rmw' }); // the parent writes every page
        const c = await within(child, 10_000, 'child');
        expect(c.exitCode).toBe(0);
        expect(c.checksum).toBe(sum(0, 4, ID)); // the child saw the data as it was at fork
        expect(Array.from(mir.snapshot(0, 4))).toEqual([S.WRITE, S.WRITE, S.WRITE, S.WRITE]);
        mir.close();
      } finally {
        m.close();
      }
    }));
});

describe('partial unmap (hmm-tests)', () => {
  for (const at of [0, 0.25, 0.5]) {
    it(`migrate_partial_unmap_fault at ${at}: migrate 2 MiB, unmap half, the CPU reads the rest intact`, () =>
      withDevices(1, async (dev) => {
        const pages = 512;
        const m = mapAnonymous(pages * PAGE);
        try {
          fillPages(m, ID);
          const mir = dev.mirror(m);
          expect((await mir.migrateToDevice(0, pages)).cpages).toBe(pages);
          const off = at * pages * PAGE;
          m.unmap(off, (pages / 2) * PAGE);
          expect(m.holes).toEqual([{ offset: off, length: (pages / 2) * PAGE }]);
          expect(dev.memory().used).toBe(pages / 2); // the unmapped half's device pages are freed
          const first = off / PAGE;
          const kept = [...Array(pages).keys()].filter((i) => i < first || i >= first + pages / 2);
          let want = 0n;
          for (const i of kept) want += BigInt(i);
          let got = 0n;
          for (const [a, b] of [[0, first], [first + pages / 2, pages]] as const)
            if (b > a) got += (await access(m, { offset: a * PAGE, length: (b - a) * PAGE, op: 'read' })).checksum;
          expect(got).toBe(want);
          expect(mir.snapshot(off, 1)[0]).toBe(S.ERROR);
          await expect(mir.read(off, 1)).rejects.toMatchObject({ code: 'EFAULT' });
          await expect(access(m, { offset: off, length: PAGE })).rejects.toMatchObject({ code: 'EACCES' });
          mir.close();
        } finally {
          m.close();
        }
      }));
  }
});

describe('races and corner cases found in review', () => {
  it('two devices migrating the same pages at once: each page ends on one of them, data intact, no deadlock', async () => {
    const a = Device.create({ name: 'a', memory: 4 << 20 });
    const b = Device.create({ name: 'b', memory: 4 << 20 });
    const m = mapAnonymous(512 * PAGE);
    try {
      fillPages(m, (i) => BigInt(i + 1000));
      const ma = a.mirror(m);
      const mb = b.mirror(m);
      for (let round = 0; round < 20; round++) {
        const [ra, rb] = await within(
          Promise.all([ma.migrateToDevice(0, 512).catch((e: { code: string }) => e), mb.migrateToDevice(0, 512).catch((e: { code: string }) => e)]),
          10_000,
          'concurrent migrations',
        );
        const on = (r: unknown) => ((r as { cpages?: number }).cpages ?? 0);
        expect(on(ra) + on(rb)).toBe(512); // every page on exactly one device
        expect(a.memory().used + b.memory().used).toBe(512);
        expect((await access(m, { op: 'read' })).checksum).toBe(sum(0, 512, (i) => BigInt(i + 1000)));
      }
      ma.close();
      mb.close();
    } finally {
      a.close();
      b.close();
      m.close();
    }
  });

  it('a migration that evicts to make room does not zero-fill the pages it evicted', async () => {
    const dev = Device.create({ memory: 4 * PAGE, eviction: 'fifo' });
    const m = mapAnonymous(8 * PAGE);
    try {
      const w = new BigUint64Array(m.bytes.buffer);
      w[(6 * PAGE) / 8] = 6006n;
      w[(7 * PAGE) / 8] = 7007n; // pages 0-5 never touched
      const mir = dev.mirror(m);
      await mir.migrateToDevice(6 * PAGE, 2);
      await mir.migrateToDevice(0, 8, { granule: PAGE });
      const d = await mir.read(0, 8);
      expect(d.data.readBigUInt64LE(6 * PAGE)).toBe(6006n);
      expect(d.data.readBigUInt64LE(7 * PAGE)).toBe(7007n);
      await dev.release();
      expect((await m.read(6 * PAGE, 8)).readBigUInt64LE()).toBe(6006n);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('madvise(PAGEOUT) and a failed remap keep device pages; a successful remap takes them along', async () => {
    const dev = Device.create({ memory: 1 << 20 });
    const m = mapAnonymous(16 * PAGE);
    try {
      fillPages(m, (i) => BigInt(i + 1000));
      const mir = dev.mirror(m);
      await mir.migrateToDevice(0, 16);
      m.advise('pageout');
      expect(dev.memory().used).toBe(16);
      expect((await mir.read(3 * PAGE, 1)).data.readBigUInt64LE()).toBe(1003n);
      expect(() => m.remap(1 << 30, { mayMove: false })).toThrow(expect.objectContaining({ code: 'ENOMEM' }));
      expect(mir.info().dead).toBe(false);
      expect((await m.read(3 * PAGE, 8)).readBigUInt64LE()).toBe(1003n);
      await mir.migrateToDevice(0, 16);
      m.remap(64 * PAGE, { mayMove: true });
      expect(mir.info().dead).toBe(false); // it follows the mapping (test/remap.test.ts)
      expect(mir.info().address).toBe(m.address);
      expect(dev.memory().used).toBe(16); // device pages travel with the page tables
      expect((await m.read(5 * PAGE, 8)).readBigUInt64LE()).toBe(1005n);
      expect(dev.memory().used).toBe(15);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });
});
