// hugetlb: real huge pages. As root with none reserved, the test reserves a few for its own run and
// gives them back; otherwise it uses what is free, or skips saying why.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import { mapAnonymous, mapMemfd, Userfaultfd, Device, SNAPSHOT, access, probe } from '../lib/index.js';
import { P, PAGE, within, fillPattern } from './helpers.js';

const NR = '/proc/sys/vm/nr_hugepages';
const HUGE = P.hugetlb.defaultSize || 2 << 20;
let restore: string | undefined;
let free = 0;
let why = '';

beforeAll(() => {
  free = P.hugetlb.free;
  if (free >= 4) return;
  if (P.euid !== 0) {
    why = `only ${free} free hugetlb pages and not root: echo 4 > ${NR}`;
    return;
  }
  try {
    restore = fs.readFileSync(NR, 'utf8').trim();
    fs.writeFileSync(NR, String(Number(restore) + 4));
    free = probe({ refresh: true }).hugetlb.free;
    if (free < 4) why = `asked the kernel for 4 more huge pages, got ${free} free (memory too fragmented?)`;
  } catch (err) {
    why = `cannot reserve huge pages: ${(err as Error).message}`;
  }
});

afterAll(() => {
  if (restore !== undefined) fs.writeFileSync(NR, restore);
});

describe('hugetlb', () => {
  it('anonymous hugetlb mapping: huge page size, written and read back', async (ctx) => {
    if (free < 1) ctx.skip(why);
    const m = mapAnonymous(HUGE, { hugetlb: true });
    try {
      expect(m.pageSize).toBe(HUGE);
      expect(m.hugetlb).toBe(true);
      await access(m, { op: 'write', seed: 4 });
      expect((await access(m, { op: 'verify', seed: 4 })).mismatches).toBe(0);
      expect(() => m.protect('r', { offset: 4096, length: 4096 })).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_UNALIGNED' }));
    } finally {
      m.close();
    }
  });

  it('a handler that throws on hugetlb memory: the fallback zero-fills whole huge pages (nothing hangs)', async (ctx) => {
    if (free < 2) ctx.skip(why);
    const m = mapAnonymous(2 * HUGE, { hugetlb: true });
    const uffd = Userfaultfd.open();
    try {
      uffd.register(m);
      let failed = 0;
      uffd.serve({
        onFaults() {
          throw new Error('handler failed');
        },
        onError: (_err, faults) => void (failed += faults.length),
      });
      const r = await within(access(m, { op: 'read', unit: 4096 }), 10_000, 'hugetlb read with a throwing handler');
      expect(r.checksum).toBe(0n);
      expect(failed).toBe(2); // one fault per huge page, each resolved whole
      expect(uffd.outstanding()).toEqual([]);
    } finally {
      uffd.close();
      m.close();
    }
  });

  it('MISSING faults on hugetlb memory resolved by a copy rule, one fault per huge page', async (ctx) => {
    if (free < 2) ctx.skip(why);
    const dst = mapAnonymous(HUGE, { hugetlb: true });
    const src = mapAnonymous(HUGE);
    fillPattern(src.bytes, 21);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(dst);
      uffd.addRule({ mapping: dst, action: 'copy', source: src, granule: HUGE });
      uffd.serve();
      const r = await within(access(dst, { op: 'verify', seed: 21, unit: 4096 }), 10_000, 'hugetlb verify');
      expect(r.mismatches).toBe(0);
      expect(uffd.stats().faults).toBe(1);
    } finally {
      uffd.close();
      dst.close();
      src.close();
    }
  });

  it('a hugetlb memfd takes huge pages from the pool', (ctx) => {
    if (free < 1) ctx.skip(why);
    const before = probe({ refresh: true }).hugetlb.free;
    const m = mapMemfd(HUGE, { hugetlb: true, populate: true });
    try {
      expect(probe({ refresh: true }).hugetlb.free).toBe(before - 1);
    } finally {
      m.close();
    }
  });

  it('anon_write_hugetlbfs: a device writes a hugetlb page in one fault; it cannot migrate (EINVAL)', async (ctx) => {
    if (free < 1) ctx.skip(why);
    const m = mapAnonymous(HUGE, { hugetlb: true });
    const dev = Device.create();
    try {
      const mir = dev.mirror(m);
      expect(mir.info().npages).toBe(1); // one entry per huge page
      const data = Buffer.alloc(HUGE);
      for (let i = 0; i < HUGE; i += 4096) data.writeBigUInt64LE(BigInt(i / 4096), i);
      const r = await within(mir.write(0, data), 10_000, 'device write');
      expect(r).toMatchObject({ cpages: HUGE / 4096, faults: 1 }); // counted in base pages, as the kernel's device does
      expect((await access(m, { op: 'read', unit: 4096 })).checksum).toBe(BigInt(((HUGE / 4096) * (HUGE / 4096 - 1)) / 2));
      await expect(mir.migrateToDevice(0, 1)).rejects.toMatchObject({ code: 'EINVAL' });
      await expect(mir.migrateToDevice(0, HUGE / 4096)).rejects.toMatchObject({ code: 'EINVAL' });
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  // hmm-tests.c "compound": a hugetlb mirror's snapshot has one byte per base page, each with the
  // size the CPU maps it by; the kernel's device counts hugetlb pages in base pages.
  it('snapshot() of a hugetlb mirror: one byte per base page, WRITE|PMD, READ|PMD after mprotect; counts in base pages', async (ctx) => {
    if (free < 2) ctx.skip(why);
    const m = mapAnonymous(2 * HUGE, { hugetlb: true });
    const dev = Device.create();
    try {
      const mir = dev.mirror(m);
      const n = (2 * HUGE) / 4096;
      expect(mir.npages).toBe(n);
      let snap = mir.snapshot(); // default arguments: the whole mirror, in base pages
      expect(snap.length).toBe(n);
      expect(snap.every((b) => b === SNAPSHOT.NONE)).toBe(true); // nothing faulted in yet
      const flag = HUGE >= 2 ** 30 ? SNAPSHOT.PUD : SNAPSHOT.PMD;
      const w = await within(mir.write(0, Buffer.alloc(HUGE, 3)), 10_000, 'device write');
      expect(w).toMatchObject({ cpages: HUGE / 4096, faults: 1 });
      snap = mir.snapshot();
      expect([...new Set(snap.subarray(0, n / 2))]).toEqual([SNAPSHOT.WRITE | flag]);
      expect([...new Set(snap.subarray(n / 2))]).toEqual([SNAPSHOT.NONE]);
      const r = await within(mir.read(0, n), 10_000, 'device read');
      expect(r).toMatchObject({ cpages: n, faults: 1 });
      expect(r.data[HUGE - 1]).toBe(3);
      expect(r.data[HUGE]).toBe(0);
      // Entries: one per base page too (a huge page's entry stands for each of its pages).
      expect(mir.entries().length).toBe(n);
      expect(mir.entries(511, 2).map((e) => e.valid)).toEqual([true, true]);
      m.protect('r'); // invalidates: the entries go, the CPU mapping stays
      // Counted in base pages, as everything else: both huge pages' entries were valid (the read).
      expect(dev.counters().invalidatedPages).toBe(n);
      expect(mir.info().invalidatedPages).toBe(n);
      snap = mir.snapshot();
      expect([...new Set(snap)]).toEqual([SNAPSHOT.READ | flag]);
      // Any base-page window, default length to the end.
      expect([...mir.snapshot(HUGE + 4096)]).toEqual(new Array(n / 2 - 1).fill(SNAPSHOT.READ | flag));
      expect(mir.entries(511, 2).map((e) => e.valid)).toEqual([false, false]);
      // A device access covers whole huge pages.
      await expect(mir.run({ op: 'read', npages: 1 })).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_UNALIGNED' });
      expect((await within(mir.run({ op: 'read', npages: n / 2 }), 10_000, 'kernel')).faults).toBe(1);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('snapshot() of a 1 GiB hugetlb page: WRITE|PUD on each base page', async (ctx) => {
    const GIG = '/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages';
    if (!fs.existsSync(GIG)) ctx.skip('this kernel offers no 1 GiB huge pages');
    if (P.euid !== 0) ctx.skip(`reserving a 1 GiB huge page needs root (${GIG})`);
    const old = fs.readFileSync(GIG, 'utf8').trim();
    try {
      fs.writeFileSync(GIG, String(Number(old) + 1));
      if (Number(fs.readFileSync(GIG, 'utf8').trim()) <= Number(old)) ctx.skip('the kernel found no free 1 GiB of contiguous memory for a huge page');
      const m = mapAnonymous(2 ** 30, { hugetlb: true, hugePageSize: 2 ** 30 });
      const dev = Device.create();
      try {
        const mir = dev.mirror(m);
        const w = await within(mir.run({ op: 'write', npages: 2 ** 18 }), 30_000, 'device write of 1 GiB');
        expect(w.faults).toBe(1);
        const snap = mir.snapshot();
        expect(snap.length).toBe(2 ** 18);
        expect([...new Set(snap)]).toEqual([SNAPSHOT.WRITE | SNAPSHOT.PUD]);
        mir.close();
      } finally {
        dev.close();
        m.close();
      }
    } finally {
      fs.writeFileSync(GIG, old);
    }
  }, 60_000);
});

describe('hugetlb and remap', () => {
  it('a mirror of hugetlb memory follows a move to a huge-page-aligned address and a shrink; growing is the kernel\'s EINVAL, explained (device reads cover whole huge pages, counted in base pages)', async (ctx) => {
    if (free < 2) ctx.skip(why);
    const m = mapAnonymous(2 * HUGE, { hugetlb: true });
    const dev = Device.create();
    try {
      const mir = dev.mirror(m);
      const data = Buffer.alloc(2 * HUGE);
      data.writeBigUInt64LE(111n, 0);
      data.writeBigUInt64LE(222n, HUGE);
      await within(mir.write(0, data), 10_000, 'device write');
      const maps = fs.readFileSync('/proc/self/maps', 'utf8');
      let to = (m.address - (1n << 40n)) & ~BigInt(HUGE - 1);
      while (maps.includes(to.toString(16) + '-')) to -= BigInt(HUGE);
      expect(() => m.remap(2 * HUGE, { address: to + 4096n })).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_UNALIGNED' }));
      expect(() => m.remap(2 * HUGE, { dontUnmap: true })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
      expect(m.remap(2 * HUGE, { address: to })).toBe(to);
      expect(mir.info().dead).toBe(false);
      expect(mir.info().address).toBe(to);
      expect((await within(mir.read(HUGE, HUGE / PAGE), 10_000, 'device read after the move')).data.readBigUInt64LE()).toBe(222n);
      expect((await m.read(0, 8)).readBigUInt64LE()).toBe(111n);
      // The kernel refuses to grow hugetlb mappings (mm/mremap.c: its reservations cannot be
      // split); should a kernel allow it, the data must survive.
      let grown = false;
      try {
        m.remap(4 * HUGE);
        grown = true;
      } catch (err) {
        expect(err).toMatchObject({ code: 'EINVAL', syscall: 'mremap' });
        expect((err as Error).message).toMatch(/does not grow hugetlb/);
      }
      expect(m.length).toBe(grown ? 4 * HUGE : 2 * HUGE);
      expect(mir.info().dead).toBe(false);
      expect((await within(mir.read(0, HUGE / PAGE), 10_000, 'device read after the grow attempt')).data.readBigUInt64LE()).toBe(111n);
      m.remap(HUGE);
      expect(m.length).toBe(HUGE);
      await expect(within(mir.read(HUGE, HUGE / PAGE), 10_000, 'read past the end')).rejects.toMatchObject({ code: 'EFAULT' });
      expect((await within(mir.read(0, HUGE / PAGE), 10_000, 'device read after the shrink')).data.readBigUInt64LE()).toBe(111n);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });
});
