// Page-table and page-cache introspection: /proc/self/pagemap entries, soft-dirty, PAGEMAP_SCAN,
// statx, cachestat and mincore, each on memory whose state the test set up itself.
import { describe, it, expect } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { mapAnonymous, mapMemfd, mapFile, type Mapping, type ScanRegion } from '../lib/index.js';
import { P, PAGE, requireCap } from './helpers.js';

const N = 16;
const LEN = N * PAGE;

/** Page indices a scan reported, in order. */
function pagesOf(regions: ScanRegion[]): number[] {
  const out: number[] = [];
  for (const r of regions) for (let o = r.offset; o < r.offset + r.length; o += PAGE) out.push(o / PAGE);
  return out;
}

/** Regions as offset/length runs, adjacent regions (split only by other categories) merged. */
function runs(regions: ScanRegion[]): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  for (const r of regions) {
    const last = out[out.length - 1];
    if (last && last.offset + last.length === r.offset) last.length += r.length;
    else out.push({ offset: r.offset, length: r.length });
  }
  return out;
}

function closeAll(...maps: (Mapping | undefined)[]) {
  for (const m of maps) m?.close();
}

describe('pagemap', () => {
  it('pagemap(): absent when fresh, present and exclusive once written, absent after MADV_DONTNEED; shared pages are file/shared', () => {
    const m = mapAnonymous(4 * PAGE);
    const s = mapMemfd(4 * PAGE);
    try {
      expect(m.pagemap()).toHaveLength(4);
      expect(m.pagemap().some((p) => p.present)).toBe(false);
      m.bytes.fill(7);
      for (const p of m.pagemap()) {
        expect(p.present).toBe(true);
        expect(p.exclusive).toBe(true);
        expect(p.fileOrShared).toBe(false);
        expect(p.swapped).toBe(false);
        expect(p.uffdWp).toBe(false);
      }
      m.advise('dontneed', { offset: PAGE, length: 2 * PAGE });
      expect(m.pagemap().map((p) => p.present)).toEqual([true, false, false, true]);
      expect(m.bytes[PAGE]).toBe(0); // private anonymous memory comes back zero-filled

      expect(s.pagemap().some((p) => p.present)).toBe(false);
      s.bytes.fill(9);
      for (const p of s.pagemap()) {
        expect(p.present).toBe(true);
        expect(p.fileOrShared).toBe(true);
      }
      // one entry per base page, also for a range that is not a whole mapping
      expect(s.pagemap({ offset: PAGE, length: 2 * PAGE })).toHaveLength(2);
      expect(s.pagemapRaw({ offset: 0, length: PAGE })[0]! >> 63n).toBe(1n);
    } finally {
      closeAll(m, s);
    }
  });

  it('soft-dirty: after clear_refs 4 only the page written since is soft-dirty', (ctx) => {
    const m = mapAnonymous(8 * PAGE);
    try {
      m.bytes.fill(1); // every page present (a fresh mapping is soft-dirty as a whole)
      if (!m.pagemap()[0]!.softDirty)
        ctx.skip('soft-dirty: a freshly written page is not soft-dirty: the kernel is built without CONFIG_MEM_SOFT_DIRTY');
      try {
        fs.writeFileSync('/proc/self/clear_refs', '4');
      } catch (err) {
        ctx.skip(`soft-dirty: /proc/self/clear_refs is not writable (${(err as Error).message})`);
      }
      // Synchronous from here on, so nothing maps next to this range and merges a soft-dirty VMA in.
      expect(m.pagemap().some((p) => p.softDirty)).toBe(false);
      m.bytes[3 * PAGE] = 2;
      expect(m.pagemap().map((p) => p.softDirty)).toEqual([false, false, false, true, false, false, false, false]);
      expect(m.pagemap().every((p) => p.present)).toBe(true);
    } finally {
      m.close();
    }
  });

  it('PAGEMAP_SCAN: present regions are exactly the written pages, the complement is not', (ctx) => {
    requireCap(ctx, P.pagemapScan, 'PAGEMAP_SCAN');
    const m = mapAnonymous(LEN);
    try {
      const written = [1, 2, 3, 7, 12];
      for (const i of written) m.bytes[i * PAGE + 5] = 0x5a;
      const present = m.scan({ require: ['present'] });
      expect(present.walkEnd).toBe(LEN);
      expect(runs(present.regions)).toEqual([
        { offset: PAGE, length: 3 * PAGE },
        { offset: 7 * PAGE, length: PAGE },
        { offset: 12 * PAGE, length: PAGE },
      ]);
      expect(present.regions.every((r) => r.categories.includes('present'))).toBe(true);
      const absent = m.scan({ exclude: ['present'] });
      expect(absent.walkEnd).toBe(LEN);
      expect(pagesOf(absent.regions)).toEqual([0, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15]);
      expect(absent.regions.some((r) => r.categories.includes('present'))).toBe(false);
      // the two scans agree with pagemap
      expect(m.pagemap().flatMap((p, i) => (p.present ? [i] : []))).toEqual(written);
      // maxPages stops the walk early
      const first2 = m.scan({ require: ['present'], maxPages: 2 });
      expect(pagesOf(first2.regions)).toEqual([1, 2]);
    } finally {
      m.close();
    }
  });

  it('PAGEMAP_SCAN: a read-touched page is the zero page; a write replaces it', (ctx) => {
    requireCap(ctx, P.pagemapScan, 'PAGEMAP_SCAN');
    requireCap(ctx, P.zeroPage, 'the shared zero page');
    const z = mapAnonymous(4 * PAGE);
    try {
      // A read of untouched private anonymous memory maps the shared zero page (PAGE_IS_PFNZERO).
      expect(z.bytes[2 * PAGE]).toBe(0);
      const zero = z.scan({ require: ['pfnZero'] });
      expect(pagesOf(zero.regions)).toEqual([2]);
      expect(zero.regions[0]!.categories).toEqual(expect.arrayContaining(['pfnZero', 'present']));
      // a write replaces it with a private page
      z.bytes[2 * PAGE] = 1;
      expect(z.scan({ require: ['pfnZero'] }).regions).toEqual([]);
      expect(pagesOf(z.scan({ require: ['present'] }).regions)).toEqual([2]);
    } finally {
      z.close();
    }
  });

  it('statx: a tmpfs file is not DAX; PAGEMAP_SCAN marks its mapped pages file-backed', (ctx) => {
    requireCap(ctx, P.experiments.tmpfs, 'tmpfs');
    requireCap(ctx, P.pagemapScan, 'PAGEMAP_SCAN');
    const file = path.join('/dev/shm', `pagemirror-pagemap-${process.pid}-${Date.now()}`);
    let f: Mapping | undefined;
    const a = mapAnonymous(4 * PAGE);
    try {
      f = mapFile(file, { create: true, length: 4 * PAGE });
      const sx = f.statx();
      expect(sx.dax).toBe(false);
      expect(sx.size).toBe(4 * PAGE);
      expect(f.kind).toBe('file');
      f.bytes[PAGE] = 1;
      f.bytes[2 * PAGE] = 1;
      const r = f.scan({ require: ['file'] });
      expect(pagesOf(r.regions)).toEqual([1, 2]);
      expect(r.regions.every((x) => x.categories.includes('file') && x.categories.includes('present'))).toBe(true);
      // anonymous pages are not
      a.bytes.fill(1);
      expect(a.scan({ require: ['file'] }).regions).toEqual([]);
      expect(pagesOf(a.scan({ require: ['present'] }).regions)).toEqual([0, 1, 2, 3]);
    } finally {
      closeAll(f, a);
      fs.rmSync(file, { force: true });
    }
  });

  it('cachestat on a memfd: the written pages are cached; punching a hole drops them', (ctx) => {
    requireCap(ctx, P.cachestat, 'cachestat');
    const m = mapMemfd(LEN);
    try {
      expect(m.cachestat()).toMatchObject({ cache: 0, dirty: 0, writeback: 0 });
      const n = 5;
      for (let i = 0; i < n; i++) m.bytes[i * PAGE] = 1;
      const cs = m.cachestat();
      expect(cs.cache).toBe(n);
      // shmem folios are dirty but never tagged so in the page cache (there is no writeback to
      // disk): cachestat's dirty count for a memfd stays within the cached pages (0 on 6.18).
      expect(cs.dirty).toBeGreaterThanOrEqual(0);
      expect(cs.dirty).toBeLessThanOrEqual(n);
      expect(cs.writeback).toBe(0);
      // a sub-range counts only its own pages
      expect(m.cachestat({ fileOffset: 2 * PAGE, length: 2 * PAGE }).cache).toBe(2);
      m.punchHole(0, 2 * PAGE);
      expect(m.cachestat().cache).toBe(n - 2);
      expect(m.pagemap().map((p) => p.present).slice(0, n)).toEqual([false, false, true, true, true]);
      m.punchHole(0, LEN);
      expect(m.cachestat().cache).toBe(0);
    } finally {
      m.close();
    }
  });

  it('cachestat on a disk file: written pages are dirty until msync writes them back', (ctx) => {
    requireCap(ctx, P.cachestat, 'cachestat');
    const disk = P.filesystems.find((f) => f.path === os.tmpdir() && ['ext4', 'xfs', 'btrfs'].includes(f.type));
    if (!disk) ctx.skip(`cachestat: ${os.tmpdir()} is not a disk file system (${P.filesystems.map((f) => `${f.path}: ${f.type}`).join(', ')})`);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-cachestat-'));
    let f: Mapping | undefined;
    try {
      f = mapFile(path.join(dir, 'data'), { create: true, length: LEN });
      const n = 5;
      for (let i = 0; i < n; i++) f.bytes[i * PAGE] = 1;
      const cs = f.cachestat();
      expect(cs.dirty).toBe(n);
      expect(cs.cache).toBeGreaterThanOrEqual(n); // read-around may cache more
      f.sync();
      expect(f.cachestat()).toMatchObject({ dirty: 0, writeback: 0 });
    } finally {
      f?.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('residency(): mincore reports written pages resident, untouched anonymous pages not', () => {
    const m = mapAnonymous(8 * PAGE);
    try {
      expect(m.residency()).toEqual(Array(8).fill(false));
      for (const i of [0, 2, 5]) m.bytes[i * PAGE] = 1;
      expect(m.residency()).toEqual([true, false, true, false, false, true, false, false]);
      expect(m.residency({ offset: 2 * PAGE, length: 2 * PAGE })).toEqual([true, false]);
      m.advise('dontneed', { offset: 0, length: PAGE });
      expect(m.residency()[0]).toBe(false);
    } finally {
      m.close();
    }
  });
});
