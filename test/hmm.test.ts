// The kernel's HMM test device (lib/test_hmm.c, hmm-tests.c) as a contract: the scenarios of
// ../shared/reference/hmm-tests.md that need mirroring, device faults and invalidation.
import { describe, it, expect } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { mapAnonymous, mapFile, Device, type Mapping } from '../lib/index.js';
import { P, PAGE, within } from './helpers.js';

const NPAGES = 1024; // 4 MiB buffers, as the kernel tests

/** One word per page, p[i] = value(i), written from the JavaScript thread before mirroring. */
function fillPages(m: Mapping, value: (i: number) => bigint, from = 0): void {
  const w = new BigUint64Array(m.bytes.buffer);
  for (let i = from; i < m.length / PAGE; i++) w[(i * PAGE) / 8] = value(i);
}

function pageWords(b: Buffer): BigUint64Array {
  return new BigUint64Array(b.buffer, b.byteOffset, b.length / 8);
}

function withDevice<T>(fn: (dev: Device) => Promise<T>, opts = {}): Promise<T> {
  const dev = Device.create({ memory: 16 << 20, ...opts });
  return fn(dev).finally(() => dev.close());
}

describe('hmm-tests scenarios', () => {
  it('anon_read: one fault round for the whole range, data intact, zero page for pages 0-1', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(NPAGES * PAGE);
      try {
        fillPages(m, (i) => BigInt(i), 2);
        m.readSync(PAGE, 8); // page 1 read by the CPU: the zero page; page 0 never touched
        m.protect('r');
        const mir = dev.mirror(m);
        const r = await within(mir.read(0, NPAGES), 10_000, 'device read');
        expect(r.cpages).toBe(NPAGES);
        expect(r.faults).toBe(1);
        const w = pageWords(r.data);
        for (let i = 0; i < NPAGES; i++) expect(w[(i * PAGE) / 8]).toBe(i < 2 ? 0n : BigInt(i));
        // Mirrored now: reading again takes no fault.
        expect((await mir.read(0, NPAGES)).faults).toBe(0);
        expect(mir.entries().every((e) => e.valid && !e.write)).toBe(true);
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('anon_read_prot: PROT_NONE gives EFAULT, nothing copied out, CPU data intact', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(NPAGES * PAGE);
      try {
        fillPages(m, (i) => BigInt(i));
        m.protect('none');
        const mir = dev.mirror(m);
        await expect(mir.read(0, NPAGES)).rejects.toMatchObject({ code: 'EFAULT', errno: -14 });
        m.protect('r');
        expect(m.readSync(5 * PAGE, 8).readBigUInt64LE()).toBe(5n);
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('anon_write: one fault, the CPU sees the device data', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(NPAGES * PAGE);
      try {
        const mir = dev.mirror(m);
        const data = Buffer.alloc(NPAGES * PAGE);
        for (let i = 0; i < NPAGES; i++) data.writeBigUInt64LE(BigInt(i), i * PAGE);
        const r = await within(mir.write(0, data), 10_000, 'device write');
        expect(r).toMatchObject({ cpages: NPAGES, faults: 1 });
        mir.close();
        expect(m.readSync(0, NPAGES * PAGE).equals(data)).toBe(true);
      } finally {
        m.close();
      }
    }));

  it('anon_write_prot: read 1 page (1 fault); write EPERM with no change; after mprotect rw the write faults once', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(NPAGES * PAGE, { prot: 'r' });
      try {
        const mir = dev.mirror(m);
        const r = await mir.read(0, 1);
        expect(r).toMatchObject({ cpages: 1, faults: 1 });
        const data = Buffer.alloc(NPAGES * PAGE, 0x11);
        await expect(mir.write(0, data)).rejects.toMatchObject({ code: 'EPERM' });
        expect(m.readSync(0, 8)).toEqual(Buffer.alloc(8));
        m.protect('rw');
        const w = await mir.write(0, data);
        expect(w).toMatchObject({ cpages: NPAGES, faults: 1 });
        expect(m.readSync(NPAGES * PAGE - 8, 8)).toEqual(Buffer.alloc(8, 0x11));
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('anon_read_multiple: 10 rounds of fresh data, one fault each', () =>
    withDevice(async (dev) => {
      for (let c = 0; c < 10; c++) {
        const m = mapAnonymous(NPAGES * PAGE);
        try {
          fillPages(m, (i) => BigInt(i + c));
          const mir = dev.mirror(m);
          const r = await mir.read(0, NPAGES);
          expect(r.faults).toBe(1);
          expect(pageWords(r.data)[(7 * PAGE) / 8]).toBe(BigInt(7 + c));
          mir.close();
        } finally {
          m.close();
        }
      }
    }));

  it('file_read: a file mapped shared read-only, one fault, data intact', () =>
    withDevice(async (dev) => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-hmm-'));
      const f = path.join(dir, 'data.bin');
      const content = Buffer.alloc(NPAGES * PAGE);
      for (let i = 0; i < NPAGES; i++) content.writeBigUInt64LE(BigInt(i), i * PAGE);
      fs.writeFileSync(f, content);
      const m = mapFile(f, { prot: 'r' });
      try {
        const mir = dev.mirror(m);
        const r = await mir.read(0, NPAGES);
        expect(r.faults).toBe(1);
        expect(r.data.equals(content)).toBe(true);
        mir.close();
      } finally {
        m.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }));

  it('anon_write_huge: a 2 MiB aligned, THP-advised range written by the device in one fault', (ctx) =>
    withDevice(async (dev) => {
      if (!P.experiments.thp.ok) ctx.skip(`transparent hugepages: ${P.experiments.thp.reason}`);
      const m = mapAnonymous(4 << 20);
      try {
        const off = Number((2n << 20n) - (m.address % (2n << 20n))) % (2 << 20);
        m.advise('hugepage', { offset: off, length: 2 << 20 });
        const mir = dev.mirror(m, { offset: off, length: 2 << 20 });
        const r = await mir.write(0, Buffer.alloc(2 << 20, 0x5a));
        expect(r).toMatchObject({ cpages: 512, faults: 1 });
        expect(m.readSync(off + (1 << 20), 4)).toEqual(Buffer.alloc(4, 0x5a));
        mir.close();
      } finally {
        m.close();
      }
    }));
});

describe('invalidation (the mmu notifier)', () => {
  it('mprotect, madvise(DONTNEED) and msync erase entries; the next access faults again', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(16 * PAGE);
      try {
        const mir = dev.mirror(m);
        await mir.write(0, Buffer.alloc(16 * PAGE, 1));
        expect(mir.entries().every((e) => e.valid && e.write && e.dirty)).toBe(true);
        m.protect('r', { offset: 0, length: 4 * PAGE });
        expect(mir.entries(0, 4).every((e) => !e.valid)).toBe(true); // erased, not downgraded
        expect(mir.entries(4).every((e) => e.valid)).toBe(true); // outside the range: kept
        m.advise('dontneed', { offset: 8 * PAGE, length: 8 * PAGE });
        expect(mir.entries(8).every((e) => !e.valid)).toBe(true);
        const r = await mir.read(8 * PAGE, 8);
        expect(r.faults).toBe(1);
        expect(r.data.equals(Buffer.alloc(8 * PAGE))).toBe(true); // DONTNEED zeroed them
        const c = dev.counters();
        expect(c.invalidations).toMatchObject({ protect: 1, discard: 1 });
        expect(mir.info().invalidatedPages).toBe(12);
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('closing the mapping closes its mirror; the mirror says so afterwards, never touches freed memory', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(8 * PAGE);
      const mir = dev.mirror(m);
      await mir.write(0, Buffer.alloc(8 * PAGE, 2));
      m.close();
      expect(mir.info().closed).toBe(true);
      await expect(mir.read(0, 8)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_CLOSED' });
      mir.close();
    }));

  it('writeback cleaning (msync) of a shared file erases device write access', () =>
    withDevice(async (dev) => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-wb-'));
      const f = path.join(dir, 'wb.bin');
      fs.writeFileSync(f, Buffer.alloc(4 * PAGE));
      const m = mapFile(f);
      try {
        const mir = dev.mirror(m);
        await mir.write(0, Buffer.alloc(4 * PAGE, 7));
        m.sync();
        expect(mir.entries().some((e) => e.valid)).toBe(false);
        expect(fs.readFileSync(f)).toEqual(Buffer.alloc(4 * PAGE, 7));
        const again = await mir.write(0, Buffer.alloc(4 * PAGE, 8)); // mkwrite again
        expect(again.faults).toBe(1);
        expect(dev.counters().invalidations.writeback).toBe(1);
        mir.close();
      } finally {
        m.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }));

  it('a page table costs 8 bytes per mirrored page where the device maps pages, next to nothing elsewhere', async () => {
    const dev = Device.create({ faultAround: 2 << 20 });
    const m = mapAnonymous(1 << 30, { noReserve: true }); // 1 GiB mirrored
    try {
      const mir = dev.mirror(m);
      expect(mir.info().tableBytes).toBeLessThanOrEqual(64); // nothing touched: the top level only
      // The device reads every page (the zero page: no memory), so every entry is set.
      await within(mir.run({ op: 'read', unit: PAGE }), 30_000, 'device read of 1 GiB');
      expect(mir.entries(mir.npages - 1, 1)[0].valid).toBe(true);
      // 8 bytes per entry, plus per 2 MiB block its in-flight counter (8 bytes) and its pointer
      // in the directory (8 bytes): 8.03 bytes per page, HMM's "2 MB per GB mirrored".
      const perPage = mir.info().tableBytes! / mir.npages;
      expect(perPage).toBeGreaterThanOrEqual(8);
      expect(perPage).toBeLessThanOrEqual(8 + 16 / 512 + 0.001);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  }, 60_000);

  it('device writers and a CPU flipping protection: no write through a stale entry (it would SIGSEGV)', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(64 * PAGE);
      try {
        const mir = dev.mirror(m);
        let stop = false;
        const writers = (async () => {
          let runs = 0;
          let refused = 0;
          while (!stop) {
            try {
              await mir.run({ op: 'write', threads: 2, unit: 8, ops: 20_000, pattern: 'random' });
              runs++;
            } catch (err) {
              expect((err as { code: string }).code).toBe('EPERM'); // caught read-only: refused, not crashed
              refused++;
            }
          }
          return runs + refused;
        })();
        for (let i = 0; i < 200; i++) {
          m.protect('r');
          // While read-only, the words must not change: any device write now would be through a
          // stale entry (and would have killed the process with SIGSEGV).
          const before = m.readSync(0, 64 * PAGE);
          await new Promise((r) => setImmediate(r));
          expect(m.readSync(0, 64 * PAGE).equals(before)).toBe(true);
          m.protect('rw');
          await new Promise((r) => setImmediate(r));
        }
        stop = true;
        expect(await within(writers, 10_000, 'writers')).toBeGreaterThan(0);
        expect(dev.counters().invalidations.protect).toBeGreaterThanOrEqual(200);
        mir.close();
      } finally {
        m.close();
      }
    }), 30_000);
});

describe('device faults', () => {
  it('many device threads missing at once are serviced in batches, coalesced and replayed', () =>
    withDevice(
      async (dev) => {
        const m = mapAnonymous(256 * PAGE);
        try {
          const mir = dev.mirror(m);
          const r = await mir.run({ op: 'write', threads: 32, unit: PAGE, seed: 3 });
          expect(r.ops).toBe(256);
          const c = dev.counters();
          expect(c.faultRequests).toBeGreaterThanOrEqual(c.faultRounds);
          expect(c.faultedPages).toBeGreaterThanOrEqual(256);
          const v = await mir.run({ op: 'verify', seed: 3, unit: PAGE });
          expect(v.mismatches).toBe(0);
          expect(v.faults).toBe(0);
          mir.close();
        } finally {
          m.close();
        }
      },
      { faultBatch: 32 },
    ));

  it('fault-around: a 64 KiB granule faults one block per 16 pages', () =>
    withDevice(
      async (dev) => {
        const m = mapAnonymous(256 * PAGE);
        try {
          const mir = dev.mirror(m);
          const r = await mir.run({ op: 'read', unit: PAGE });
          expect(r.faults).toBe(16);
          expect(dev.counters().faultedPages).toBe(256);
          mir.close();
        } finally {
          m.close();
        }
      },
      { faultAround: 64 << 10 },
    ));

  it('atomics from many device threads and the CPU add up exactly', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(PAGE);
      try {
        const mir = dev.mirror(m);
        const r = await mir.run({ op: 'atomic', threads: 4, unit: PAGE, ops: 40_000 });
        expect(r.ops).toBe(40_000);
        expect(m.readSync(0, 8).readBigUInt64LE()).toBe(40_000n);
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('copy kernel: the device copies half the range onto the other half through its page table', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(16 * PAGE);
      try {
        const mir = dev.mirror(m);
        await mir.run({ op: 'write', seed: 40, npages: 8, unit: 8 });
        const r = await mir.run({ op: 'copy', npages: 8, unit: 8, copyTo: 8 * PAGE });
        expect(r.ops).toBe((8 * PAGE) / 8);
        expect(m.readSync(8 * PAGE, 8 * PAGE).equals(m.readSync(0, 8 * PAGE))).toBe(true);
        await expect(mir.run({ op: 'copy', npages: 8, copyTo: 9 * PAGE })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('gather pattern: exactly the listed words, faulting only their pages', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(64 * PAGE);
      try {
        m.bytes.fill(0);
        const w = new BigUint64Array(m.bytes.buffer);
        const idx = new Uint32Array([0, (5 * PAGE) / 8 + 3, (40 * PAGE) / 8 + 7]);
        for (const i of idx) w[i] = 1000n + BigInt(i);
        const mir = dev.mirror(m);
        const r = await mir.run({ op: 'read', pattern: 'gather', indices: idx, ops: 3 });
        expect(r.checksum).toBe(3000n + BigInt(idx[0]! + idx[1]! + idx[2]!));
        expect(mir.entries().filter((e) => e.valid)).toHaveLength(3);
        await expect(mir.run({ pattern: 'gather' })).rejects.toThrow(TypeError);
        mir.close();
      } finally {
        m.close();
      }
    }));

  it('one device cannot mirror the same memory twice (EEXIST); another device can', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(8 * PAGE);
      const other = Device.create();
      try {
        const a = dev.mirror(m, { offset: 0, length: 4 * PAGE });
        expect(() => dev.mirror(m, { offset: 2 * PAGE, length: 4 * PAGE })).toThrow(expect.objectContaining({ code: 'EEXIST', syscall: 'mirror' }));
        const b = dev.mirror(m, { offset: 4 * PAGE, length: 4 * PAGE }); // adjacent: fine
        const c = other.mirror(m); // several devices on one range
        a.close();
        b.close();
        c.close();
        dev.mirror(m).close(); // closed mirrors no longer count
      } finally {
        other.close();
        m.close();
      }
    }));

  it('bad input: zero pages is EINVAL, ranges outside the mirror are RangeErrors, closed objects say so', () =>
    withDevice(async (dev) => {
      const m = mapAnonymous(4 * PAGE);
      try {
        const mir = dev.mirror(m);
        await expect(mir.read(0, 0)).rejects.toMatchObject({ code: 'EINVAL' });
        await expect(mir.read(0, 5)).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
        await expect(mir.read(1, 1)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_UNALIGNED' });
        expect(() => dev.mirror(m, { offset: 0, length: 5 * PAGE })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
        mir.close();
        await expect(mir.read(0, 1)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_CLOSED' });
        dev.close();
        expect(() => dev.mirror(m)).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
      } finally {
        m.close();
      }
    }));
});
