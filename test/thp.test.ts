// Transparent huge pages and device memory: a THP that migrates to the device whole is reported
// with the PMD flag, as the kernel's test device reports a THP it migrated whole; pages that moved
// one by one, or a unit split by a CPU fault, are not.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, Device, SNAPSHOT, access, type Mapping } from '../lib/index.js';
import { P, PAGE, cleanupAfterEach, within } from './helpers.js';

const closers = cleanupAfterEach();
const HUGE = 2 << 20;
const N = HUGE / PAGE;

/** A 2 MiB aligned anonymous range, written by the CPU, THP-advised (or not). */
async function written(huge: boolean): Promise<Mapping> {
  const m = mapAnonymous(HUGE, { align: HUGE });
  closers.push(() => m.close());
  m.advise(huge ? 'hugepage' : 'nohugepage');
  await within(access(m, { op: 'write', seed: 7 }), 10_000, 'CPU write');
  return m;
}

const DEV_WRITE = SNAPSHOT.DEV_PRIVATE_LOCAL | SNAPSHOT.WRITE;

describe('THP migration to device memory', () => {
  it('a THP migrated whole reports DEV_PRIVATE_LOCAL|WRITE|PMD on every page until a CPU fault splits it', async (ctx) => {
    if (!P.experiments.thp.ok) ctx.skip(`transparent hugepages: ${P.experiments.thp.reason}`);
    const m = await written(true);
    if (m.scan({ require: ['huge'] }).regions.reduce((n, r) => n + r.length, 0) !== HUGE)
      ctx.skip('the kernel did not back the advised range with a THP (no free 2 MiB of contiguous memory?)');
    const dev = Device.create();
    closers.push(() => dev.close());
    const mir = dev.mirror(m);
    closers.push(() => mir.close());
    expect([...new Set(mir.snapshot())]).toEqual([SNAPSHOT.WRITE | SNAPSHOT.PMD]); // on the host, mapped huge
    const r = await within(mir.migrateToDevice(0, N), 10_000, 'migrate');
    expect(r.cpages).toBe(N);
    expect([...new Set(mir.snapshot())]).toEqual([DEV_WRITE | SNAPSHOT.PMD]);
    // The CPU reads one page: it comes home, and the unit is no longer whole.
    await within(access(m, { op: 'read', length: PAGE, offset: 5 * PAGE }), 10_000, 'CPU read');
    const after = mir.snapshot();
    expect(after[5]).not.toBe(DEV_WRITE | SNAPSHOT.PMD);
    expect(after[5] & 0xf0).toBe(SNAPSHOT.NONE); // a host page again (NONE until the device maps it)
    expect([...new Set([...after.subarray(0, 5), ...after.subarray(6)])]).toEqual([DEV_WRITE]);
    expect((await within(access(m, { op: 'verify', seed: 7 }), 10_000, 'CPU verify')).mismatches).toBe(0);
  });

  it('small pages that migrate, or part of a THP, report no PMD', async (ctx) => {
    const small = await written(false);
    const dev = Device.create();
    closers.push(() => dev.close());
    const a = dev.mirror(small);
    closers.push(() => a.close());
    expect((await within(a.migrateToDevice(0, N), 10_000, 'migrate small pages')).cpages).toBe(N);
    expect([...new Set(a.snapshot())]).toEqual([DEV_WRITE]);
    if (!P.experiments.thp.ok) ctx.skip(`transparent hugepages: ${P.experiments.thp.reason}`);
    const huge = await written(true);
    const b = dev.mirror(huge);
    closers.push(() => b.close());
    expect((await within(b.migrateToDevice(0, N / 2), 10_000, 'migrate half a THP')).cpages).toBe(N / 2);
    expect([...new Set(b.snapshot(0, N / 2))]).toEqual([DEV_WRITE]);
  });
});
