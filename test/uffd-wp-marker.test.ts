// Missing faults on a uffd-wp marker: UFFDIO_WRITEPROTECT over a none pte leaves a PTE marker
// (on anonymous memory with WP_UNPOPULATED, which the default features include; always on shmem
// and hugetlb: userfaultfd_wp_use_markers()), a
// fault there is reported as MISSING, and UFFDIO_ZEROPAGE refuses the marker with EEXIST (anonymous)
// or replaces it with a writable page (shared shmem). A 'zero' rule used to take that EEXIST for
// "already present" and wake the faulter into the same fault forever; on shmem the page lost its
// protection. Each test here: the read completes, the page is present and still write-protected,
// and a write to it is a WP fault.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import { mapAnonymous, mapMemfd, Userfaultfd, access, probe, type Fault, type FeatureName, type Mapping } from '../lib/index.js';
import { P, PAGE, within, waitFor, requireCap } from './helpers.js';

const N = 16;
const LEN = N * PAGE;
const TOUCHED = 8; // pages 0-7 written before writeProtect: the page table exists
const PROBE_PAGE = 10; // never touched: a marker after writeProtect

/** Closing the descriptor wakes a thread asleep (or livelocked) on a fault, so no job outlives a test. */
async function teardown(uffd: Userfaultfd | undefined, jobs: Promise<unknown>[], ...maps: (Mapping | undefined)[]) {
  uffd?.close();
  for (const j of jobs) await within(j.catch(() => undefined), 5_000, 'access job after close').catch(() => undefined);
  for (const m of maps) m?.close();
}

type Memory = 'anonymous' | 'shared anonymous' | 'memfd';
function map(kind: Memory): Mapping {
  if (kind === 'memfd') return mapMemfd(LEN);
  return mapAnonymous(LEN, { shared: kind === 'shared anonymous' });
}

/**
 * The reported scenario: a zero rule, pages 0-7 written, the whole range write-protected (the none
 * ptes 8-15 get markers), a read of page 10. WP faults go to JavaScript (no unprotect rule), so a
 * write after the read shows whether the page kept its protection.
 */
async function readMarker(kind: Memory, features: 'default' | FeatureName[], touch: boolean) {
  const m = map(kind);
  const uffd = Userfaultfd.open({ features });
  const jobs: Promise<unknown>[] = [];
  const forwarded: Fault[] = [];
  try {
    uffd.register(m, { modes: ['missing', 'wp'] });
    uffd.addRule({ mapping: m, action: 'zero' });
    uffd.serve({
      onFaults(faults, u) {
        for (const f of faults) {
          forwarded.push(f);
          if (f.kind === 'wp') u.unprotect(m, f.offset, PAGE);
        }
      },
    });
    if (touch) {
      const w = access(m, { length: TOUCHED * PAGE, op: 'write', seed: 7 });
      jobs.push(w);
      await within(w, 10_000, 'first writes');
    }
    uffd.writeProtect(m, 0, LEN);
    expect(m.pagemap()[PROBE_PAGE]).toMatchObject({ present: false, uffdWp: true });

    const r = access(m, { offset: PROBE_PAGE * PAGE, length: PAGE, op: 'read' });
    jobs.push(r);
    await within(r, 5_000, `read of a marker page (${kind})`);
    expect(m.pagemap()[PROBE_PAGE]).toMatchObject({ present: true, uffdWp: true });
    expect(forwarded).toEqual([]);
    await waitFor(() => uffd.stats().markerFills >= 1, 2_000, 'stats().markerFills >= 1').catch(() => undefined);
    const s = uffd.stats();
    expect(s.markerFills).toBe(1);
    expect(s.eexist).toBe(0);

    const w = access(m, { offset: PROBE_PAGE * PAGE, length: PAGE, op: 'write', seed: 8 });
    jobs.push(w);
    await within(w, 5_000, 'write after the read');
    expect(forwarded.map((f) => [f.kind, f.offset, f.write])).toEqual([['wp', PROBE_PAGE * PAGE, true]]);
    const v = access(m, { offset: PROBE_PAGE * PAGE, length: PAGE, op: 'verify', seed: 8 });
    jobs.push(v);
    expect((await within(v, 5_000, 'verify')).mismatches).toBe(0);
    // The neighbours' markers are untouched.
    expect(m.pagemap()[PROBE_PAGE + 1]).toMatchObject({ present: false, uffdWp: true });
  } finally {
    await teardown(uffd, jobs, m);
  }
}

describe('zero-fill over a uffd-wp marker', () => {
  it('anonymous memory, default features, pages around it touched: a zero rule resolves the read (once), the page stays write-protected', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    if (!P.uffd.features.includes('wpUnpopulated')) return ctx.skip('kernel lacks UFFD_FEATURE_WP_UNPOPULATED (6.7+): no markers on anonymous memory');
    await readMarker('anonymous', 'default', true);
  }, 30_000);

  it('the same with WP_UNPOPULATED and no page ever touched', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    if (!P.uffd.features.includes('wpUnpopulated')) return ctx.skip('kernel lacks UFFD_FEATURE_WP_UNPOPULATED (6.7+)');
    await readMarker('anonymous', ['wpUnpopulated'], false);
  }, 30_000);

  for (const kind of ['memfd', 'shared anonymous'] as const) {
    it(`shared shmem (${kind}): ZEROPAGE would replace the marker with a writable page; the zero rule keeps it protected`, async (ctx) => {
      requireCap(ctx, P.experiments.wp, 'uffd-wp');
      if (!P.uffd.features.includes('wpHugetlbfsShmem')) return ctx.skip('kernel lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM');
      // Without WP_UNPOPULATED: shmem gets markers regardless.
      await readMarker(kind, ['pagefaultFlagWp', 'missingShmem', 'wpHugetlbfsShmem'], true);
    }, 30_000);
  }

  it('fault-around over markers only: every page of the block filled write-protected', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    if (!P.uffd.features.includes('wpUnpopulated')) return ctx.skip('kernel lacks UFFD_FEATURE_WP_UNPOPULATED (6.7+)');
    const m = mapAnonymous(LEN, { align: LEN }); // the block is aligned: one block, the whole mapping
    const uffd = Userfaultfd.open({ features: ['wpUnpopulated'] });
    const jobs: Promise<unknown>[] = [];
    try {
      uffd.register(m, { modes: ['missing', 'wp'] });
      uffd.writeProtect(m, 0, LEN);
      uffd.addRule({ mapping: m, action: 'zero', granule: LEN });
      const r = access(m, { offset: PROBE_PAGE * PAGE, length: PAGE, op: 'read' });
      jobs.push(r);
      await within(r, 5_000, 'read in a block of markers');
      await waitFor(() => uffd.stats().markerFills >= N, 2_000, `stats().markerFills >= ${N}`).catch(() => undefined);
      const s = uffd.stats();
      expect(s.faults).toBe(1);
      expect(s.fastPages).toBe(N);
      expect(s.markerFills).toBe(N);
      expect(m.pagemap().every((p) => p.present && p.uffdWp)).toBe(true);
    } finally {
      await teardown(uffd, jobs, m);
    }
  }, 30_000);

  for (const how of ['zeropage', 'resolveMany'] as const) {
    it(`a JS handler's ${how === 'zeropage' ? 'u.zeropage()' : "u.resolveMany('zeropage')"} on a marker page resolves it, write-protected`, async (ctx) => {
      requireCap(ctx, P.experiments.wp, 'uffd-wp');
      const m = mapAnonymous(LEN);
      const uffd = Userfaultfd.open();
      const jobs: Promise<unknown>[] = [];
      const results: unknown[] = [];
      const errors: unknown[] = [];
      let missing = 0;
      try {
        uffd.register(m, { modes: ['missing', 'wp'] });
        uffd.serve({
          onError: (err) => void errors.push(err),
          onFaults(faults, u) {
            for (const f of faults) {
              if (f.kind === 'wp') {
                u.unprotect(m, f.offset, PAGE);
                continue;
              }
              missing++;
              // Bounded: a livelock here would be the bug itself; the rest go to the fallback.
              if (missing > TOUCHED + 4) throw new Error(`missing fault ${missing} on offset ${f.offset}`);
              results.push(how === 'zeropage' ? u.zeropage(m, f.offset, PAGE) : u.resolveMany('zeropage', m, [f.offset]));
            }
          },
        });
        const w = access(m, { length: TOUCHED * PAGE, op: 'write', seed: 9 });
        jobs.push(w);
        await within(w, 10_000, 'first writes');
        const before = missing;
        expect(before).toBe(TOUCHED);
        results.length = 0;
        uffd.writeProtect(m, 0, LEN);
        const r = access(m, { offset: PROBE_PAGE * PAGE, length: PAGE, op: 'read' });
        jobs.push(r);
        await within(r, 5_000, 'read of a marker page');
        expect(missing - before).toBe(1);
        expect(errors).toEqual([]);
        expect(results).toEqual(how === 'zeropage' ? [{ bytes: PAGE, exists: false }] : [{ bytes: PAGE, exists: 0 }]);
        expect(m.pagemap()[PROBE_PAGE]).toMatchObject({ present: true, uffdWp: true });
      } finally {
        await teardown(uffd, jobs, m);
      }
    }, 30_000);
  }
});

describe('zero rule over a hugetlb marker', () => {
  const NR = '/proc/sys/vm/nr_hugepages';
  const HUGE = P.hugetlb.defaultSize || 2 << 20;
  let restore: string | undefined;
  let why = '';
  beforeAll(() => {
    if (P.hugetlb.free >= 2) return;
    if (P.euid !== 0) {
      why = `only ${P.hugetlb.free} free hugetlb pages and not root: echo 2 > ${NR}`;
      return;
    }
    try {
      restore = fs.readFileSync(NR, 'utf8').trim();
      fs.writeFileSync(NR, String(Number(restore) + 2));
      const free = probe({ refresh: true }).hugetlb.free;
      if (free < 2) why = `asked the kernel for 2 more huge pages, got ${free} free`;
    } catch (err) {
      why = `cannot reserve huge pages: ${(err as Error).message}`;
    }
  });
  afterAll(() => {
    if (restore !== undefined) fs.writeFileSync(NR, restore);
  });

  it('ZEROPAGE does not apply to hugetlb: the fault falls back to a write-protected zero huge page', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    if (why) return ctx.skip(why);
    if (!P.uffd.features.includes('wpHugetlbfsShmem')) return ctx.skip('kernel lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM');
    const m = mapAnonymous(2 * HUGE, { hugetlb: true });
    const uffd = Userfaultfd.open();
    const jobs: Promise<unknown>[] = [];
    const wp: Fault[] = [];
    try {
      uffd.register(m, { modes: ['missing', 'wp'] });
      uffd.addRule({ mapping: m, action: 'zero' });
      uffd.writeProtect(m, 0, 2 * HUGE);
      expect(m.pagemap()[HUGE / PAGE]).toMatchObject({ present: false, uffdWp: true });
      const r = access(m, { offset: HUGE, length: PAGE, op: 'read' });
      jobs.push(r);
      // No handler yet: the rule's EINVAL sends the fault to the fallback, which copies zeros WP.
      await within(r, 5_000, 'read of a hugetlb marker');
      expect(m.pagemap()[HUGE / PAGE]).toMatchObject({ present: true, uffdWp: true });
      uffd.serve({
        onFaults(faults, u) {
          for (const f of faults) {
            wp.push(f);
            if (f.kind === 'wp') u.unprotect(m, f.offset, HUGE);
          }
        },
      });
      const w = access(m, { offset: HUGE, length: PAGE, op: 'write', seed: 3 });
      jobs.push(w);
      await within(w, 5_000, 'write after the read');
      expect(wp.map((f) => [f.kind, f.offset])).toEqual([['wp', HUGE]]);
    } finally {
      await teardown(uffd, jobs, m);
    }
  }, 30_000);
});
