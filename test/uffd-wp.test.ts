// userfaultfd write protection (UFFDIO_REGISTER_MODE_WP): WP faults raised by native writes,
// resolved by UFFDIO_WRITEPROTECT from TypeScript and from the fast path; reads pass; unpopulated
// pages with and without WP_UNPOPULATED; COPY and CONTINUE installing pages write-protected; and
// stats() being current once the faulting access has finished.
import { describe, it, expect, beforeEach, afterEach } from 'vitest';
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { mapAnonymous, mapMemfd, Userfaultfd, access, type Fault, type Mapping } from '../lib/index.js';
import { P, PAGE, within, waitFor, fillPattern, requireCap } from './helpers.js';

const N = 16;
const LEN = N * PAGE;
const ALL = Array.from({ length: N }, (_, i) => i * PAGE);
const ZERO = new Uint8Array(PAGE);

/** Tear-down that cannot hang: close the descriptor (wakes any sleeper), let access jobs end, unmap. */
async function teardown(uffd: Userfaultfd | undefined, jobs: Promise<unknown>[], ...maps: (Mapping | undefined)[]) {
  uffd?.close();
  for (const j of jobs) await within(j.catch(() => undefined), 5_000, 'access job after close').catch(() => undefined);
  for (const m of maps) m?.close();
}

/**
 * Reads stats() once the counters reach n (bounded), then the test asserts exact values. The service
 * thread now publishes its counts before handing a batch over (the last test in this file checks
 * that directly); the bounded wait only keeps a regression from reading as an unrelated failure.
 */
async function statsAt(uffd: Userfaultfd, key: 'faults' | 'fastResolved' | 'forwarded', n: number) {
  await waitFor(() => uffd.stats()[key] >= n, 2_000, `stats().${key} >= ${n}`).catch(() => undefined);
  return uffd.stats();
}

describe('uffd-wp', () => {
  // A handler that throws is resolved by the library's fallback and reported to onError: collect
  // those, and fail the test on any.
  let handlerErrors: unknown[] = [];
  const onError = (err: unknown) => void handlerErrors.push(err);
  beforeEach(() => {
    handlerErrors = [];
  });
  afterEach(() => {
    expect(handlerErrors).toEqual([]);
  });

  it('WP round trip: writes to protected pages fault (kind wp, write), unprotect resolves them', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const m = mapAnonymous(LEN);
    m.bytes.fill(0xaa); // populated before registering: write protection applies to present pages
    const uffd = Userfaultfd.open();
    const jobs: Promise<unknown>[] = [];
    const seen: Fault[] = [];
    try {
      const reg = uffd.register(m, { modes: ['wp'] });
      expect(reg.ioctls.has('writeProtect')).toBe(true);
      uffd.writeProtect(m, 0, LEN);
      expect(m.pagemap().every((p) => p.present && p.uffdWp)).toBe(true);
      uffd.serve({
        onError,
        onFaults(faults, u) {
          for (const f of faults) {
            seen.push(f);
            u.unprotect(m, f.offset, PAGE);
          }
        },
      });
      const w = access(m, { op: 'write', seed: 41 });
      jobs.push(w);
      const wr = await within(w, 10_000, 'write access');
      expect(wr.ops).toBe(N);
      expect(wr.signal).toBeUndefined();
      expect(seen.length).toBe(N);
      for (const f of seen) {
        expect(f.kind).toBe('wp');
        expect(f.write).toBe(true);
        expect(f.mapping).toBe(m);
      }
      expect(seen.map((f) => f.offset).sort((a, b) => a - b)).toEqual(ALL);
      const v = access(m, { op: 'verify', seed: 41 });
      jobs.push(v);
      expect((await within(v, 10_000, 'verify')).mismatches).toBe(0);
      const s = await statsAt(uffd, 'faults', N);
      expect(s.faults).toBe(N);
      expect(s.forwarded).toBe(N);
      expect(s.fastResolved).toBe(0);
      expect(m.pagemap().some((p) => p.uffdWp)).toBe(false);
      expect(uffd.outstanding()).toEqual([]);
    } finally {
      await teardown(uffd, jobs, m);
    }
  });

  it('WP fast path: an unprotect rule resolves every WP fault natively', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const m = mapAnonymous(LEN);
    m.bytes.fill(1);
    const uffd = Userfaultfd.open();
    const jobs: Promise<unknown>[] = [];
    let calls = 0;
    try {
      uffd.register(m, { modes: ['wp'] });
      uffd.writeProtect(m, 0, LEN);
      uffd.addRule({ mapping: m, action: 'unprotect' });
      uffd.serve({
        onError,
        onFaults(faults, u) {
          calls++;
          for (const f of faults) u.unprotect(m, f.offset, PAGE);
        },
      });
      const w = access(m, { op: 'write', seed: 42 });
      jobs.push(w);
      expect((await within(w, 10_000, 'write access')).ops).toBe(N);
      const v = access(m, { op: 'verify', seed: 42 });
      jobs.push(v);
      expect((await within(v, 10_000, 'verify')).mismatches).toBe(0);
      const s = await statsAt(uffd, 'fastResolved', N);
      expect(s.faults).toBe(N);
      expect(s.fastResolved).toBe(N);
      expect(s.fastPages).toBe(N);
      expect(s.forwarded).toBe(0);
      expect(s.errors).toBe(0);
      expect(calls).toBe(0);
      expect(m.pagemap().some((p) => p.uffdWp)).toBe(false);
    } finally {
      await teardown(uffd, jobs, m);
    }
  });

  it('reads of write-protected pages do not fault', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const m = mapAnonymous(LEN);
    fillPattern(m.bytes, 43);
    const uffd = Userfaultfd.open();
    const jobs: Promise<unknown>[] = [];
    let calls = 0;
    try {
      uffd.register(m, { modes: ['wp'] });
      uffd.writeProtect(m, 0, LEN);
      uffd.serve({
        onError,
        onFaults(faults, u) {
          calls++;
          for (const f of faults) u.unprotect(m, f.offset, PAGE);
        },
      });
      const before = uffd.stats();
      const v = access(m, { op: 'verify', seed: 43, unit: 8 });
      jobs.push(v);
      const r = await within(v, 10_000, 'verify');
      expect(r.mismatches).toBe(0);
      expect(r.ops).toBe(LEN / 8);
      await new Promise((res) => setTimeout(res, 20)); // a fault would have been counted by now
      const after = uffd.stats();
      expect(after.faults).toBe(before.faults);
      expect(after.faults).toBe(0);
      expect(after.messages).toBe(0);
      expect(calls).toBe(0);
      // still protected: reads did not lift anything
      expect(m.pagemap().every((p) => p.present && p.uffdWp)).toBe(true);
    } finally {
      await teardown(uffd, jobs, m);
    }
  });

  it('WP on unpopulated pages without wpUnpopulated: silently ignored, a write raises MISSING, not WP', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const m = mapAnonymous(LEN);
    const uffd = Userfaultfd.open({ features: ['pagefaultFlagWp'] });
    const jobs: Promise<unknown>[] = [];
    const seen: Fault[] = [];
    try {
      expect(uffd.has('wpUnpopulated')).toBe(false);
      uffd.register(m, { modes: ['missing', 'wp'] });
      uffd.writeProtect(m, 0, LEN); // no error...
      expect(m.pagemap().some((p) => p.present || p.uffdWp)).toBe(false); // ...and nothing protected
      uffd.serve({
        onError,
        onFaults(faults, u) {
          for (const f of faults) {
            seen.push(f);
            if (f.kind === 'wp') u.unprotect(m, f.offset, PAGE);
            else u.copy(m, f.offset, PAGE, ZERO);
          }
        },
      });
      const w = access(m, { op: 'write', seed: 44 });
      jobs.push(w);
      expect((await within(w, 10_000, 'write access')).ops).toBe(N);
      expect(seen.length).toBe(N);
      expect(seen.every((f) => f.kind === 'missing' && f.write)).toBe(true);
      expect(seen.map((f) => f.offset).sort((a, b) => a - b)).toEqual(ALL);
      const v = access(m, { op: 'verify', seed: 44 });
      jobs.push(v);
      expect((await within(v, 10_000, 'verify')).mismatches).toBe(0);
      expect((await statsAt(uffd, 'faults', N)).faults).toBe(N);
    } finally {
      await teardown(uffd, jobs, m);
    }
  });

  it('WP on unpopulated pages with wpUnpopulated: a marker is installed and the first write raises WP', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    if (!P.uffd.features.includes('wpUnpopulated')) ctx.skip('uffd-wp: the kernel lacks UFFD_FEATURE_WP_UNPOPULATED');
    // Registered WP only: the marker is the only thing that can stop the write.
    {
      const m = mapAnonymous(LEN);
      const uffd = Userfaultfd.open({ features: ['pagefaultFlagWp', 'wpUnpopulated'] });
      const jobs: Promise<unknown>[] = [];
      const seen: Fault[] = [];
      try {
        uffd.register(m, { modes: ['wp'] });
        uffd.writeProtect(m, 0, LEN);
        expect(m.pagemap().every((p) => !p.present && p.uffdWp)).toBe(true); // pte markers
        uffd.serve({
          onError,
          onFaults(faults, u) {
            for (const f of faults) {
              seen.push(f);
              u.unprotect(m, f.offset, PAGE);
            }
          },
        });
        const w = access(m, { op: 'write', seed: 45 });
        jobs.push(w);
        expect((await within(w, 10_000, 'write access')).ops).toBe(N);
        expect(seen.length).toBe(N);
        expect(seen.every((f) => f.kind === 'wp' && f.write)).toBe(true);
        expect(seen.map((f) => f.offset).sort((a, b) => a - b)).toEqual(ALL);
        const v = access(m, { op: 'verify', seed: 45 });
        jobs.push(v);
        expect((await within(v, 10_000, 'verify')).mismatches).toBe(0);
        expect((await statsAt(uffd, 'faults', N)).faults).toBe(N);
        expect(m.pagemap().every((p) => p.present && !p.uffdWp)).toBe(true);
      } finally {
        await teardown(uffd, jobs, m);
      }
    }
    // Registered MISSING too: the kernel (6.18) treats a marker as an empty PTE first, so MISSING
    // comes first; a COPY without MODE_WP would drop the protection, with MODE_WP the write then
    // faults WP. Each page: MISSING, then WP.
    {
      const m = mapAnonymous(LEN);
      const uffd = Userfaultfd.open({ features: ['pagefaultFlagWp', 'wpUnpopulated'] });
      const jobs: Promise<unknown>[] = [];
      const seen: Fault[] = [];
      try {
        uffd.register(m, { modes: ['missing', 'wp'] });
        uffd.writeProtect(m, 0, LEN);
        expect(m.pagemap().every((p) => !p.present && p.uffdWp)).toBe(true);
        uffd.serve({
          onError,
          onFaults(faults, u) {
            for (const f of faults) {
              seen.push(f);
              if (f.kind === 'wp') u.unprotect(m, f.offset, PAGE);
              else u.copy(m, f.offset, PAGE, ZERO, { wp: true });
            }
          },
        });
        const w = access(m, { op: 'write', seed: 46 });
        jobs.push(w);
        expect((await within(w, 10_000, 'write access')).ops).toBe(N);
        for (const off of ALL) {
          expect(seen.filter((f) => f.offset === off).map((f) => f.kind), `faults at offset ${off}`).toEqual(['missing', 'wp']);
        }
        const v = access(m, { op: 'verify', seed: 46 });
        jobs.push(v);
        expect((await within(v, 10_000, 'verify')).mismatches).toBe(0);
        expect((await statsAt(uffd, 'faults', 2 * N)).faults).toBe(2 * N);
      } finally {
        await teardown(uffd, jobs, m);
      }
    }
  });

  it('COPY with MODE_WP installs pages write-protected: pagemap shows uffd-wp, a write faults WP', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const m = mapAnonymous(LEN);
    const src = mapAnonymous(LEN);
    fillPattern(src.bytes, 50);
    const uffd = Userfaultfd.open();
    const jobs: Promise<unknown>[] = [];
    const seen: Fault[] = [];
    const resolved: number[] = [];
    try {
      uffd.register(m, { modes: ['missing', 'wp'] });
      uffd.serve({
        onError,
        onFaults(faults, u) {
          for (const f of faults) {
            seen.push(f);
            if (f.kind === 'missing') resolved.push(u.copy(m, f.offset, PAGE, src, { sourceOffset: f.offset, wp: true }).bytes);
            else u.unprotect(m, f.offset, PAGE);
          }
        },
      });
      const r = access(m, { op: 'verify', seed: 50 });
      jobs.push(r);
      expect((await within(r, 10_000, 'read (missing faults)')).mismatches).toBe(0);
      expect(seen.length).toBe(N);
      expect(seen.every((f) => f.kind === 'missing' && !f.write)).toBe(true);
      expect(resolved).toEqual(Array(N).fill(PAGE));
      expect(m.pagemap().every((p) => p.present && p.uffdWp)).toBe(true);

      seen.length = 0;
      const w = access(m, { op: 'write', seed: 51 });
      jobs.push(w);
      expect((await within(w, 10_000, 'write (WP faults)')).ops).toBe(N);
      expect(seen.length).toBe(N);
      expect(seen.every((f) => f.kind === 'wp' && f.write)).toBe(true);
      const v = access(m, { op: 'verify', seed: 51 });
      jobs.push(v);
      expect((await within(v, 10_000, 'verify')).mismatches).toBe(0);
      expect((await statsAt(uffd, 'faults', 2 * N)).faults).toBe(2 * N);
      expect(m.pagemap().some((p) => p.uffdWp)).toBe(false);
    } finally {
      await teardown(uffd, jobs, m, src);
    }
  });

  it('CONTINUE with MODE_WP on a memfd: the page is mapped write-protected, a write faults WP', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    requireCap(ctx, P.experiments.minor, 'uffd-minor');
    if (!P.uffd.features.includes('wpHugetlbfsShmem')) ctx.skip('uffd-wp: the kernel lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM');
    const m = mapMemfd(LEN);
    const alias = m.alias();
    const uffd = Userfaultfd.open({ features: ['pagefaultFlagWp', 'minorShmem', 'wpHugetlbfsShmem'] });
    const jobs: Promise<unknown>[] = [];
    const seen: Fault[] = [];
    const resolved: number[] = [];
    try {
      const a = access(alias, { op: 'write', seed: 48 }); // page cache populated through the alias
      jobs.push(a);
      await within(a, 10_000, 'alias write');
      const reg = uffd.register(m, { modes: ['minor', 'wp'] });
      expect(reg.ioctls.has('continue')).toBe(true);
      expect(reg.ioctls.has('writeProtect')).toBe(true);
      uffd.serve({
        onError,
        onFaults(faults, u) {
          for (const f of faults) {
            seen.push(f);
            if (f.kind === 'minor') resolved.push(u.continue(m, f.offset, PAGE, { wp: true }).bytes);
            else u.unprotect(m, f.offset, PAGE);
          }
        },
      });
      const r = access(m, { op: 'verify', seed: 48 });
      jobs.push(r);
      expect((await within(r, 10_000, 'read (minor faults)')).mismatches).toBe(0);
      expect(seen.length).toBe(N);
      expect(seen.every((f) => f.kind === 'minor' && !f.write)).toBe(true);
      expect(resolved).toEqual(Array(N).fill(PAGE));
      expect(m.pagemap().every((p) => p.present && p.uffdWp)).toBe(true);

      seen.length = 0;
      const w = access(m, { op: 'write', seed: 49 });
      jobs.push(w);
      expect((await within(w, 10_000, 'write (WP faults)')).ops).toBe(N);
      expect(seen.length).toBe(N);
      expect(seen.every((f) => f.kind === 'wp' && f.write)).toBe(true);
      const v = access(m, { op: 'verify', seed: 49 });
      const va = access(alias, { op: 'verify', seed: 49 }); // same page cache
      jobs.push(v, va);
      expect((await within(v, 10_000, 'verify')).mismatches).toBe(0);
      expect((await within(va, 10_000, 'verify alias')).mismatches).toBe(0);
      expect((await statsAt(uffd, 'faults', 2 * N)).faults).toBe(2 * N);
    } finally {
      await teardown(uffd, jobs, m, alias);
    }
  });

  // The counters must be current once the faulting access has finished: tests and users read them
  // right after `await access(...)`. The service thread hands the batch to JavaScript first and
  // publishes its counters after, so a handler that resolves quickly can wake the faulter before
  // the counters move; CPU contention (spinning workers) makes that the common case.
  it('stats() already counts a forwarded WP fault when the faulting access resolves', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const m = mapAnonymous(PAGE);
    m.bytes.fill(1);
    const uffd = Userfaultfd.open();
    const jobs: Promise<unknown>[] = [];
    const spinners = Array.from(
      { length: Math.max(2, os.availableParallelism() * 2) },
      () => new Worker('const end = Date.now() + 10000; while (Date.now() < end);', { eval: true }),
    );
    const stale: string[] = [];
    const T = 100;
    try {
      uffd.register(m, { modes: ['wp'] });
      uffd.serve({
        onError,
        onFaults(faults, u) {
          for (const f of faults) u.unprotect(m, f.offset, PAGE);
        },
      });
      for (let i = 1; i <= T; i++) {
        uffd.writeProtect(m, 0, PAGE);
        const w = access(m, { op: 'write', seed: i });
        jobs.push(w);
        await within(w, 5_000, `write #${i}`);
        const s = uffd.stats();
        if (s.faults !== i || s.forwarded !== i) stale.push(`#${i}: faults ${s.faults}, forwarded ${s.forwarded}`);
      }
      expect(stale.length, `${stale.length} of ${T} reads of stats() lagged behind a completed access, e.g. ${stale.slice(0, 3).join('; ')}`).toBe(0);
    } finally {
      await Promise.all(spinners.map((w) => w.terminate()));
      await teardown(uffd, jobs, m);
    }
  });

  it('a throwing handler on a missing+wp range: the fallback installs the page write-protected', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const m = mapAnonymous(PAGE);
    const uffd = Userfaultfd.open();
    const errors: unknown[] = [];
    const jobs: Promise<unknown>[] = [];
    try {
      uffd.register(m, { modes: ['missing', 'wp'] });
      uffd.serve({
        onFaults() {
          throw new Error('handler bug');
        },
        onError: (err) => void errors.push(err),
      });
      jobs.push(access(m, { op: 'read' }));
      const r = (await within(jobs[0]!, 5_000, 'read through the fallback')) as { checksum: bigint };
      expect(r.checksum).toBe(0n);
      expect(errors).toHaveLength(1);
      // The fallback's zero page is write-protected: dirty tracking still sees the next write.
      expect(m.pagemap()[0]).toMatchObject({ present: true, uffdWp: true });
    } finally {
      await teardown(uffd, jobs, m);
    }
  });
});
