// In-kernel dirty tracking: UFFD_FEATURE_WP_ASYNC resolves write-protect faults inside the kernel
// (no message, no handler), and PAGEMAP_SCAN reads PAGE_IS_WRITTEN and re-protects atomically
// (PM_SCAN_WP_MATCHING).
import { describe, it, expect } from 'vitest';
import { mapAnonymous, Userfaultfd, access, isSystemError, type Mapping, type ScanRegion } from '../lib/index.js';
import { P, PAGE, within, requireCap } from './helpers.js';

const N = 16;
const LEN = N * PAGE;

function pagesOf(regions: ScanRegion[]): number[] {
  const out: number[] = [];
  for (const r of regions) for (let o = r.offset; o < r.offset + r.length; o += PAGE) out.push(o / PAGE);
  return out;
}

async function teardown(uffd: Userfaultfd | undefined, jobs: Promise<unknown>[], ...maps: (Mapping | undefined)[]) {
  uffd?.close();
  for (const j of jobs) await within(j.catch(() => undefined), 5_000, 'access job after close').catch(() => undefined);
  for (const m of maps) m?.close();
}

describe('dirty tracking (WP_ASYNC + PAGEMAP_SCAN)', () => {
  it('writes raise no fault messages; scan finds exactly the written pages, and WP_MATCHING resets', async (ctx) => {
    requireCap(ctx, P.experiments.wpAsync, 'uffd-wp-async');
    const m = mapAnonymous(LEN);
    const uffd = Userfaultfd.open({ features: ['wpAsync', 'wpUnpopulated', 'pagefaultFlagWp'] });
    const jobs: Promise<unknown>[] = [];
    let calls = 0;
    const errors: unknown[] = [];
    try {
      uffd.register(m, { modes: ['wp'] });
      uffd.writeProtect(m, 0, LEN);
      // Served only so that a fault, were one raised, could not hang the test: none may come.
      uffd.serve({
        onError: (e) => void errors.push(e),
        onFaults(faults, u) {
          calls++;
          for (const f of faults) u.unprotect(m, f.offset, PAGE);
        },
      });
      expect(m.scan({ require: ['written'] }).regions).toEqual([]);
      expect(pagesOf(m.scan({ require: ['wpAllowed'] }).regions)).toEqual(Array.from({ length: N }, (_, i) => i));

      // Every third page: 0, 3, 6, 9, 12, 15.
      const w = access(m, { op: 'write', pattern: 'strided', stride: 3 * PAGE, ops: 6, seed: 71 });
      jobs.push(w);
      expect((await within(w, 10_000, 'strided write')).ops).toBe(6);
      const dirty = [0, 3, 6, 9, 12, 15];
      const scan = m.scan({ require: ['written'] });
      expect(scan.walkEnd).toBe(LEN);
      expect(pagesOf(scan.regions)).toEqual(dirty);
      expect(scan.regions.every((r) => r.length === PAGE && r.categories.includes('written'))).toBe(true);
      // the data went where it was written
      const v = access(m, { op: 'verify', pattern: 'strided', stride: 3 * PAGE, ops: 6, seed: 71 });
      jobs.push(v);
      expect((await within(v, 10_000, 'verify')).mismatches).toBe(0);

      // Read the dirty set and re-protect it in one walk; the next scan starts clean.
      const reset = m.scan({ require: ['written'], writeProtect: true });
      expect(pagesOf(reset.regions)).toEqual(dirty);
      expect(m.scan({ require: ['written'] }).regions).toEqual([]);
      expect(m.pagemap().every((p) => p.uffdWp)).toBe(true);

      const one = access(m, { op: 'write', offset: 4 * PAGE, length: PAGE, seed: 72 });
      jobs.push(one);
      expect((await within(one, 10_000, 'one more write')).ops).toBe(1);
      expect(pagesOf(m.scan({ require: ['written'] }).regions)).toEqual([4]);
      // the fast path of the kernel (only WRITTEN asked and reported) agrees
      expect(pagesOf(m.scan({ require: ['written'], report: ['written'] }).regions)).toEqual([4]);
      // and reads are not writes
      const r = access(m, { op: 'read' });
      jobs.push(r);
      await within(r, 10_000, 'read everything');
      expect(pagesOf(m.scan({ require: ['written'] }).regions)).toEqual([4]);

      await new Promise((res) => setTimeout(res, 20)); // a message, had there been one, is read by now
      const s = uffd.stats();
      expect(s.faults).toBe(0);
      expect(s.messages).toBe(0);
      expect(calls).toBe(0);
      expect(errors).toEqual([]);
    } finally {
      await teardown(uffd, jobs, m);
    }
  });

  it('checkWpAsync: scanning memory not registered with WP_ASYNC fails with EPERM', (ctx) => {
    requireCap(ctx, P.experiments.wpAsync, 'uffd-wp-async');
    const plain = mapAnonymous(4 * PAGE);
    const wpOnly = mapAnonymous(4 * PAGE);
    const uffd = Userfaultfd.open({ features: ['pagefaultFlagWp', 'wpUnpopulated'] });
    const scanError = (m: Mapping) => {
      try {
        m.scan({ checkWpAsync: true });
      } catch (err) {
        return err;
      }
      return undefined;
    };
    try {
      plain.bytes.fill(1);
      // not registered at all
      const e1 = scanError(plain);
      expect(isSystemError(e1)).toBe(true);
      expect(e1).toMatchObject({ code: 'EPERM', errno: -1, syscall: 'ioctl(PAGEMAP_SCAN)' });
      // registered for WP, but synchronous WP (no WP_ASYNC)
      uffd.register(wpOnly, { modes: ['wp'] });
      const e2 = scanError(wpOnly);
      expect(isSystemError(e2)).toBe(true);
      expect(e2).toMatchObject({ code: 'EPERM', errno: -1, syscall: 'ioctl(PAGEMAP_SCAN)' });
      // without the check, the same scan succeeds
      expect(plain.scan({ require: ['present'] }).regions.length).toBeGreaterThan(0);
    } finally {
      uffd.close();
      plain.close();
      wpOnly.close();
    }
  });
});
