// Devices in a forked child: the kernel's HMM tests fork, and the child opens its own device and
// reads and writes through it (anon_write_child, anon_write_child_shared). device.forkRun() runs
// such a sequence natively in the child; these check copy-on-write of mirrored and migrated pages
// from both sides, with real faults in both processes.
import { describe, it, expect } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { mapAnonymous, mapFile, Device, access, fileSystemOf } from '../lib/index.js';
import { P, PAGE, FIXTURES_DIR, within, waitFor, requireCap, cleanupAfterEach } from './helpers.js';

const cleanup = cleanupAfterEach();
const WORDS = PAGE / 8;

function device(options: Parameters<typeof Device.create>[0] = {}): Device {
  const d = Device.create({ memory: 16 << 20, ...options });
  cleanup.push(() => d.close());
  return d;
}

/** A private anonymous mapping whose words are seed + word index (the parent's CPU wrote them). */
async function written(npages: number, seed: number, shared = false) {
  const m = mapAnonymous(npages * PAGE, { shared });
  cleanup.push(() => m.close());
  await access(m, { op: 'write', seed, unit: 8 });
  return m;
}

describe('a device in a forked child (hmm-tests)', () => {
  for (const migrated of [false, true]) {
    it(`anon_write_child${migrated ? ' (pages on the parent\'s device at fork)' : ''}: the child's device sees the parent's data and writes its own; the parent's is unchanged`, async (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      const dev = device();
      const m = await written(64, 100);
      const mir = dev.mirror(m);
      await mir.write(0, m.readSync(0, 64 * PAGE)); // the parent's device holds write access to every page
      if (migrated) expect((await mir.migrateToDevice(0, 32)).cpages).toBe(32);
      const r = await within(
        mir.forkRun([
          { op: 'verify', seed: 100 },
          { op: 'write', seed: 200 },
          { op: 'verify', seed: 200 },
          { op: 'cpu-verify', seed: 200 },
        ]),
        20_000,
        'forked child',
      );
      expect(r.exitCode).toBe(0);
      expect(r.steps.map((s) => s.error)).toEqual([undefined, undefined, undefined, undefined]);
      // The child's own device: one fault round for the read (everything missing), one for the
      // write (read-only entries upgraded), none after.
      expect(r.steps[0]).toMatchObject({ op: 'verify', mismatches: 0, faults: 1, cpages: 64 });
      expect(r.steps[1]).toMatchObject({ op: 'write', faults: 1, cpages: 64 });
      expect(r.steps[2]).toMatchObject({ op: 'verify', mismatches: 0, faults: 0 });
      expect(r.steps[3]).toMatchObject({ op: 'cpu-verify', mismatches: 0, cpuFaults: 0 });
      expect(r.counters).toMatchObject({ faultRounds: 2, faultedPages: 128 });
      // The parent: its pages came home for the fork and its device lost write access to them
      // (copy on write); its data is what it was.
      expect(dev.memory().used).toBe(0);
      if (migrated) expect(dev.counters().migratedToHost.fork).toBe(32);
      expect(mir.entries().some((e) => e.valid && e.write)).toBe(false);
      expect((await access(m, { op: 'verify', seed: 100, unit: 8 })).mismatches).toBe(0);
      expect((await mir.run({ op: 'verify', seed: 100, unit: 8 })).mismatches).toBe(0);
      const w = await mir.write(0, Buffer.alloc(64 * PAGE, 9)); // the parent's device writes again: it faults
      expect(w.faults).toBe(1);
    }, 30_000);
  }

  it('anon_write_child (huge page): a THP the parent wrote is read, written, migrated and faulted home by the child; the parent keeps its huge page\'s data', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    if (!P.experiments.thp.ok) ctx.skip(`transparent hugepages: ${P.experiments.thp.reason}`);
    const dev = device();
    const m = mapAnonymous(4 << 20);
    cleanup.push(() => m.close());
    const off = Number((2n << 20n) - (m.address % (2n << 20n))) % (2 << 20);
    m.advise('hugepage', { offset: off, length: 2 << 20 });
    await access(m, { op: 'write', seed: 100, unit: 8, offset: off, length: 2 << 20 });
    const mir = dev.mirror(m, { offset: off, length: 2 << 20 });
    expect((await mir.read(0, 512)).faults).toBe(1);
    const r = await within(
      mir.forkRun([
        { op: 'verify', seed: 100 },
        { op: 'write', seed: 200 },
        { op: 'migrate', offset: 256 * PAGE, npages: 128 },
        { op: 'cpu-verify', seed: 200 },
      ]),
      20_000,
      'forked child',
    );
    expect(r.exitCode).toBe(0);
    expect(r.steps.filter((s) => s.error)).toEqual([]);
    expect(r.steps[0]).toMatchObject({ mismatches: 0, faults: 1, cpages: 512 });
    expect(r.steps[1]).toMatchObject({ faults: 1, cpages: 512 });
    expect(r.steps[2]).toMatchObject({ cpages: 128, moved: 128 });
    expect(r.steps[3]).toMatchObject({ mismatches: 0, cpuFaults: 128 });
    expect((await access(m, { op: 'verify', seed: 100, unit: 8, offset: off, length: 2 << 20 })).mismatches).toBe(0);
  }, 30_000);

  it('migration inside the child: pages still shared with the parent are copied (not moved) into the child\'s device; its CPU touch brings them home; the parent never sees the child\'s writes', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    requireCap(ctx, P.experiments.move, 'UFFDIO_MOVE');
    const dev = device();
    const m = await written(64, 100);
    const mir = dev.mirror(m);
    expect((await mir.migrateToDevice(0, 16)).cpages).toBe(16);
    const tail = 100 + 32 * WORDS; // seed + word index, counted from the step's own offset
    const r = await within(
      mir.forkRun([
        { op: 'migrate', npages: 32 },
        { op: 'verify', seed: 100, npages: 32 },
        { op: 'write', seed: 300, npages: 32 },
        { op: 'cpu-verify', seed: 300, npages: 32 },
        { op: 'verify', seed: 300, npages: 32 },
        { op: 'migrate', offset: 32 * PAGE },
        { op: 'migrate', offset: 32 * PAGE }, // already there: nothing moves, all resident
        { op: 'migrate-back', offset: 32 * PAGE },
        { op: 'cpu-verify', seed: tail, offset: 32 * PAGE },
      ]),
      20_000,
      'forked child',
    );
    expect(r.exitCode).toBe(0);
    expect(r.steps.filter((s) => s.error)).toEqual([]);
    // Every private page is mapped by both processes after fork: UFFDIO_MOVE refuses them (EBUSY).
    expect(r.steps[0]).toMatchObject({ cpages: 32, moved: 32, byCopy: 32, byMove: 0 });
    expect(r.steps[1]).toMatchObject({ mismatches: 0, faults: 0 }); // read from the child's device memory
    expect(r.steps[2]).toMatchObject({ faults: 0, cpages: 32 });
    expect(r.steps[3]).toMatchObject({ mismatches: 0, cpuFaults: 32 }); // real faults, pages home
    expect(r.steps[4]).toMatchObject({ mismatches: 0, faults: 1 }); // the CPU's touches took the device's entries
    expect(r.steps[5]).toMatchObject({ cpages: 32, moved: 32 });
    expect(r.steps[6]).toMatchObject({ cpages: 32, moved: 0 });
    expect(r.steps[7]).toMatchObject({ cpages: 32, moved: 32 });
    expect(r.steps[8]).toMatchObject({ mismatches: 0, cpuFaults: 0 });
    expect(r.counters).toEqual({
      faultRounds: 1,
      faultedPages: 32,
      migratedToDevice: 64,
      migratedToHost: { explicit: 32, 'cpu-fault': 32 },
    });
    // The parent's memory is its own: none of the child's writes, its device pages home.
    expect((await access(m, { op: 'verify', seed: 100, unit: 8 })).mismatches).toBe(0);
    expect(dev.memory().used).toBe(0);
    expect((await mir.run({ op: 'verify', seed: 100, unit: 8 })).mismatches).toBe(0);
  }, 30_000);

  it('copy on write from both sides: the parent\'s device and CPU write while the child runs; the child only ever sees the data as it was at fork', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const N = 4096; // 16 MiB: the child's 600 verify passes take a second or more
    const dev = device({ faultAround: 2 << 20 }); // the parent's writes below take a few fault rounds, not thousands
    const m = await written(N, 100);
    const mir = dev.mirror(m);
    await mir.run({ op: 'write', seed: 100, unit: 8 }); // the parent's device holds write access to every page
    expect((await mir.migrateToDevice(0, N / 2)).cpages).toBe(N / 2);
    // A thread listed may exit before its children file is read (ENOENT): it has none then.
    const childrenOf = (t: string) => {
      try {
        return fs.readFileSync(`/proc/self/task/${t}/children`, 'utf8').split(' ').filter(Boolean);
      } catch {
        return [];
      }
    };
    const children = () => fs.readdirSync('/proc/self/task').flatMap(childrenOf);
    const before = new Set(children());
    let finished = false;
    const run = mir.forkRun(Array.from({ length: 600 }, () => ({ op: 'verify' as const, seed: 100 })), { timeoutMs: 120_000 });
    void run.then(() => (finished = true), () => (finished = true));
    await waitFor(() => children().some((p) => !before.has(p)), 10_000, 'the fork');
    // The fork revoked the parent's device write access: its write faults (and copies on write).
    const w = await mir.run({ op: 'write', seed: 300, unit: 8 });
    expect(w.faults).toBeGreaterThan(0);
    await access(m, { op: 'write', seed: 300 + (N / 2) * WORDS, unit: 8, offset: (N / 2) * PAGE, length: (N / 2) * PAGE });
    expect(finished).toBe(false); // the child was still reading meanwhile
    const r = await within(run, 120_000, 'forked child');
    expect(r.exitCode).toBe(0);
    expect(r.steps).toHaveLength(600);
    expect(r.steps.filter((s) => s.error || s.mismatches)).toEqual([]);
    expect((await access(m, { op: 'verify', seed: 300, unit: 8 })).mismatches).toBe(0);
  }, 150_000);

  it('anon_write_child_shared: the child\'s device writes shared memory; the parent and its device see it; nothing migrates', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const dev = device();
    const m = await written(16, 1, true);
    const mir = dev.mirror(m);
    await mir.read(0, 16);
    const r = await within(mir.forkRun([{ op: 'verify', seed: 1 }, { op: 'write', seed: 7 }, { op: 'migrate' }]), 20_000, 'forked child');
    expect(r.exitCode).toBe(0);
    expect(r.steps[0]).toMatchObject({ mismatches: 0, faults: 1 });
    expect(r.steps[1].error).toBeUndefined();
    expect(r.steps[2].error).toMatchObject({ code: 'ENOENT', errno: -2, syscall: 'forkRun', step: 2 });
    expect(r.steps[2].skipped).toEqual({ shared: 16 });
    expect((await access(m, { op: 'verify', seed: 7, unit: 8 })).mismatches).toBe(0);
    expect((await mir.run({ op: 'verify', seed: 7, unit: 8 })).mismatches).toBe(0);
  }, 30_000);

  for (const where of ['tmpfs', 'disk']) {
    it(`a private file mapping (${where}) in the child: only pages copied on write can migrate, as in the parent`, async (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      const dir = where === 'tmpfs' ? '/dev/shm' : [os.tmpdir(), '/var/tmp'].find((d) => fs.existsSync(d) && fileSystemOf(d) !== 'tmpfs');
      if (!dir) ctx.skip('no disk file system here: os.tmpdir() and /var/tmp are tmpfs');
      const d = fs.mkdtempSync(path.join(dir!, 'pagemirror-forkpriv-'));
      cleanup.push(() => fs.rmSync(d, { recursive: true, force: true }));
      const f = path.join(d, 'f.bin');
      fs.writeFileSync(f, Buffer.alloc(16 * PAGE, 0xee));
      const m = mapFile(f, { shared: false });
      cleanup.push(() => m.close());
      await access(m, { op: 'write', seed: 100, unit: 8, length: 8 * PAGE }); // copied on write
      const dev = device();
      const r = await within(
        dev.forkRun(m, [{ op: 'migrate' }, { op: 'cpu-verify', seed: 100, npages: 8 }, { op: 'read', offset: 8 * PAGE }]),
        20_000,
        'forked child',
      );
      expect(r.exitCode).toBe(0);
      if (where === 'tmpfs') {
        expect(r.steps[0]).toMatchObject({ cpages: 8, moved: 8, byCopy: 8, skipped: { 'file-backed': 8 } });
        expect(r.steps[0].error).toBeUndefined();
        expect(r.steps[1]).toMatchObject({ mismatches: 0, cpuFaults: 8 }); // the written data came home, not the file's
      } else {
        expect(r.steps[0].error).toMatchObject({ code: 'ENOENT', syscall: 'forkRun' });
        expect(r.steps[0].skipped).toEqual({ 'userfaultfd-unsupported': 8, 'file-backed': 8 });
        expect(r.steps[1]).toMatchObject({ mismatches: 0, cpuFaults: 0 });
      }
      expect(r.steps[2].checksum).toBe((0xeeeeeeeeeeeeeeeen * BigInt(8 * WORDS)) % 2n ** 64n); // the file's pages, read in place
      expect((await access(m, { op: 'verify', seed: 100, unit: 8, length: 8 * PAGE })).mismatches).toBe(0);
      expect(fs.readFileSync(f).equals(Buffer.alloc(16 * PAGE, 0xee))).toBe(true);
    }, 30_000);
  }

  it('a step that fails reports its own error and the rest still run; misuse is refused before the fork', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const dev = device();
    const m = await written(8, 5);
    m.protect('r');
    const r = await within(
      dev.forkRun(m, [{ op: 'write', seed: 9 }, { op: 'verify', seed: 5 }, { op: 'cpu-verify', seed: 5 + 4 * WORDS, offset: 4 * PAGE, npages: 1 }]),
      20_000,
      'forked child',
    );
    expect(r.exitCode).toBe(0);
    expect(r.steps[0].error).toMatchObject({ code: 'EPERM', syscall: 'forkRun', step: 0, page: 0 });
    expect(r.steps[0].cpages).toBe(0);
    expect(r.steps[1]).toMatchObject({ mismatches: 0, cpages: 8 });
    expect(r.steps[2]).toMatchObject({ mismatches: 0, cpages: 1 }); // words count from the step's own offset
    expect(() => dev.forkRun(m, [{ op: 'cpu-write' }])).toThrow(expect.objectContaining({ code: 'EACCES', syscall: 'forkRun' }));
    // PROT_NONE: the child's device gets EFAULT, and nothing was migrated (EINVAL), as the kernel's device.
    m.protect('none');
    const none = await within(dev.forkRun(m, [{ op: 'read' }, { op: 'migrate' }]), 20_000, 'forked child');
    expect(none.steps.map((st) => st.error?.code)).toEqual(['EFAULT', 'EINVAL']);
    expect(() => dev.forkRun(m, [{ op: 'cpu-read' }])).toThrow(expect.objectContaining({ code: 'EACCES' }));
    m.protect('r');
    expect(() => dev.forkRun(m, [{ op: 'bogus' as 'read' }])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
    expect(() => dev.forkRun(m, [{ op: 'read', offset: 8 * PAGE }])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => dev.forkRun(m, [{ op: 'read', npages: 9 }])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => dev.forkRun(m, [])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => dev.forkRun(m, [{ op: 'read' }], { timeoutMs: 0 })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    dev.close();
    expect(() => dev.forkRun(m, [{ op: 'read' }])).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
  }, 30_000);

  it('a child past its timeout is killed: ETIMEDOUT with the steps it finished, and no process left', async () => {
    const dev = device();
    const m = mapAnonymous(64 << 20, { noReserve: true });
    cleanup.push(() => m.close());
    const steps = Array.from({ length: 400 }, (_, k) => ({ op: 'write' as const, seed: k }));
    const err = (await within(dev.forkRun(m, steps, { timeoutMs: 300 }), 20_000, 'forked child').catch((e: unknown) => e)) as Error &
      Record<string, unknown>;
    expect(err).toMatchObject({ code: 'ETIMEDOUT', errno: -110, syscall: 'forkRun' });
    expect((err.steps as unknown[]).length).toBeLessThan(400);
    expect(() => process.kill(err.pid as number, 0)).toThrow(expect.objectContaining({ code: 'ESRCH' }));
  }, 30_000);

  it('the child does not outlive its parent: a process that exits mid-run takes its forkRun child with it', async () => {
    const r = spawnSync(process.execPath, [path.join(FIXTURES_DIR, 'fork-orphan.mjs')], { encoding: 'utf8', timeout: 20_000 });
    expect(r.status).toBe(0);
    const pid = Number(/child (\d+)/.exec(r.stdout)?.[1]);
    expect(pid).toBeGreaterThan(0);
    // Gone, or at most a zombie the init process has yet to reap.
    const alive = () => {
      try {
        return !/^State:\s+Z/m.test(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
      } catch {
        return false;
      }
    };
    // Its step alone takes seconds: without the death signal it would still be running.
    await waitFor(() => !alive(), 1500, `forkRun child ${pid} to die with its parent`);
  }, 30_000);
});
