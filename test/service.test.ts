// The fault service across threads (workers), its polling (spin before sleeping), and the no-hang
// rule: a rule on an unserved descriptor starts the service, and an access to registered memory that
// nothing serves fails at once instead of sleeping forever.
import { describe, it, expect } from 'vitest';
import fs from 'node:fs';
import { mapAnonymous, Userfaultfd, access, Device, configureEngine, engineStats, type Fault, type Mapping } from '../lib/index.js';
import { P, PAGE, within, fillPattern, requireCap, waitFor, runFixtureWatched } from './helpers.js';

const N = 256;

function setup(pages = N, seed = 11) {
  const dst = mapAnonymous(pages * PAGE);
  const src = mapAnonymous(pages * PAGE);
  fillPattern(src.bytes, seed);
  return { dst, src };
}

function sumWorkers(s: ReturnType<Userfaultfd['stats']>, k: 'faults' | 'reads' | 'fastResolved' | 'forwarded'): number {
  return s.workers.reduce((a, w) => a + w[k], 0);
}

describe('workers', () => {
  for (const workers of [1, 2, 4]) {
    it(`${workers} worker(s): a copy rule under 4 faulting threads, every word exact`, async (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      const { dst, src } = setup(1024);
      const uffd = Userfaultfd.open();
      try {
        uffd.register(dst);
        uffd.serve({ workers });
        uffd.addRule({ mapping: dst, action: 'copy', source: src });
        const r = await within(access(dst, { op: 'verify', seed: 11, unit: 8, threads: 4 }), 20_000, 'verify');
        expect(r.mismatches).toBe(0);
        const s = uffd.stats();
        expect(s.workers).toHaveLength(workers);
        // Every page faulted once (one thread per quarter), each resolved by exactly one worker.
        expect(s.faults).toBe(1024);
        expect(s.fastResolved).toBe(1024);
        expect(sumWorkers(s, 'faults')).toBe(s.faults);
        expect(sumWorkers(s, 'fastResolved')).toBe(s.fastResolved);
        expect(s.forwarded).toBe(0);
        expect(s.cpuNs).toBeGreaterThan(0);
        expect(s.workers.every((w) => w.cpuNs > 0)).toBe(true); // every worker ran (and polled)
      } finally {
        uffd.close();
        dst.close();
        src.close();
      }
    }, 30_000);
  }

  it('a fault wakes one sleeping worker of 4, not all of them (no thundering herd)', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const { dst, src } = setup(512);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(dst);
      uffd.serve({ workers: 4 });
      uffd.addRule({ mapping: dst, action: 'copy', source: src });
      // The kernel's count of each worker's sleeps: woken all together, each fault would cost four
      // (the losers find nothing to read and sleep again inside epoll/poll, unseen by the service).
      await waitFor(() => uffd.stats().workers.every((w) => w.tid > 0), 5000, 'the workers to start');
      const tids = uffd.stats().workers.map((w) => w.tid);
      const switches = () =>
        tids.reduce((a, tid) => a + Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(fs.readFileSync(`/proc/self/task/${tid}/status`, 'utf8'))![1]), 0);
      const before = switches();
      // One thread: one fault at a time, so every fault finds all four workers asleep.
      const r = await within(access(dst, { op: 'verify', seed: 11, unit: 8 }), 20_000, 'verify');
      expect(r.mismatches).toBe(0);
      const s = uffd.stats();
      expect(s.faults).toBe(512);
      expect(switches() - before).toBeLessThan(2 * s.faults);
    } finally {
      uffd.close();
      dst.close();
      src.close();
    }
  }, 30_000);

  it('2 workers hand unmatched faults to one JavaScript handler; batches and counts add up', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const { dst, src } = setup();
    const uffd = Userfaultfd.open();
    const seen = new Set<number>();
    try {
      uffd.register(dst);
      uffd.serve({
        workers: 2,
        onFaults(faults: Fault[], u) {
          for (const f of faults) {
            seen.add(f.offset);
            u.copy(dst, f.offset, PAGE, src, { sourceOffset: f.offset });
          }
        },
      });
      const r = await within(access(dst, { op: 'verify', seed: 11, unit: 8, threads: 4 }), 20_000, 'verify');
      expect(r.mismatches).toBe(0);
      const s = uffd.stats();
      expect(seen.size).toBe(N);
      expect(s.forwarded).toBe(N);
      expect(sumWorkers(s, 'forwarded')).toBe(N);
      expect(uffd.outstanding()).toEqual([]);
    } finally {
      uffd.close();
      dst.close();
      src.close();
    }
  }, 30_000);

  it('workers out of 1..64 (or not an integer) is a RangeError before anything starts', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const uffd = Userfaultfd.open();
    try {
      for (const w of [0, 65, 1.5, -1])
        expect(() => uffd.serve({ workers: w })).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }));
      expect(() => uffd.serve({ workers: '2' as unknown as number })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
      expect(uffd.serving).toBe(false);
      uffd.serve({ workers: 64 });
      expect(uffd.stats().workers).toHaveLength(64);
    } finally {
      uffd.close();
    }
  });

  for (const outcome of ['zero', 'wake'] as const) {
    it(`close('${outcome}') with 4 workers and faults held by the handler wakes every faulting thread`, async (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      const m = mapAnonymous(N * PAGE);
      const uffd = Userfaultfd.open();
      let held = 0;
      try {
        uffd.register(m);
        // The handler never resolves: four threads sleep on their first fault each.
        uffd.serve({ workers: 4, onFaults: (faults) => void (held += faults.length) });
        const run = access(m, { op: 'read', threads: 4 });
        await waitFor(() => held >= 4, 10_000, 'four faults held by the handler');
        uffd.close(outcome);
        const r = await within(run, 10_000, 'the faulting threads after close');
        expect(r.ops).toBe(N);
        expect(r.checksum).toBe(0n); // zero-filled or woken as unregistered anonymous memory
      } finally {
        uffd.close();
        m.close();
      }
    }, 30_000);
  }

  it('4 workers hand REMOVE events to onEvents in the order the kernel queued them', async (ctx) => {
    requireCap(ctx, P.experiments.events, 'uffd events');
    const m = mapAnonymous(64 * PAGE);
    m.bytes.fill(1); // populated: each dontneed below removes pages, so each queues an event
    const uffd = Userfaultfd.open({ features: ['eventRemove'] });
    const events: { start: bigint }[] = [];
    try {
      uffd.serve({ workers: 4, poll: 'adaptive', onEvents: (evs) => void events.push(...(evs as { start: bigint }[])) });
      uffd.register(m);
      // Each advise sleeps in the kernel until a worker has read its event.
      for (let i = 0; i < 64; i++) m.advise('dontneed', { offset: i * PAGE, length: PAGE });
      await waitFor(() => events.length === 64, 5000, '64 remove events');
      expect(events.map((e) => Number(e.start - m.address) / PAGE)).toEqual(Array.from({ length: 64 }, (_, i) => i));
    } finally {
      uffd.close();
      m.close();
    }
  });

  it('forkAccess() with eventFork while 4 spinning workers serve JavaScript-handled faults never deadlocks', async (ctx) => {
    requireCap(ctx, P.experiments.events, 'uffd events');
    // glibc's fork() holds the malloc locks until a worker reads the FORK event: no worker may
    // allocate or wait on a lock an allocating thread holds (see uffd-events.test.ts). In its own
    // process: such a deadlock cannot be interrupted.
    const res = await runFixtureWatched('events-fork-traffic.mjs', ['4', '4', 'adaptive'], { stallMs: 10_000, totalMs: 60_000 });
    const { lines, progress } = res;
    expect(res.stalled, `the fixture deadlocked and was killed: ${progress}`).toBe(false);
    expect(res.signal, `the fixture was killed: ${progress}`).toBeNull();
    expect(res.status, progress).toBe(0);
    expect(lines.at(-1)).toMatch(/^all rounds done: [1-9]\d* forks, [1-9]\d* faults/);
  }, 70_000);

  it('close() while 2 workers resolve a copy rule under 2 threads: nobody stays asleep', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const { dst, src } = setup(8192);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(dst);
      uffd.serve({ workers: 2 });
      uffd.addRule({ mapping: dst, action: 'copy', source: src });
      const run = access(dst, { op: 'read', unit: PAGE, threads: 2 });
      await waitFor(() => uffd.stats().faults > 64, 10_000, 'faults under way');
      uffd.close('zero');
      const r = await within(run, 10_000, 'the access after close');
      expect(r.ops).toBe(8192);
    } finally {
      uffd.close();
      dst.close();
      src.close();
    }
  }, 30_000);
});

describe('polling', () => {
  async function sequential(poll: false | 'adaptive' | { spinUs?: number }) {
    const { dst, src } = setup(512);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(dst);
      uffd.serve({ poll });
      uffd.addRule({ mapping: dst, action: 'copy', source: src });
      const r = await within(access(dst, { op: 'verify', seed: 11, unit: 8 }), 20_000, 'verify');
      expect(r.mismatches).toBe(0);
      return uffd.stats();
    } finally {
      uffd.close();
      dst.close();
      src.close();
    }
  }

  it('off (the default): workers sleep in poll() at once and never spin', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const s = await sequential(false);
    expect(s.faults).toBe(512);
    expect(s.spinNs).toBe(0);
    expect(s.spinHits).toBe(0);
    expect(s.spinBudgetNs).toBe(0);
    expect(s.sleeps).toBeGreaterThan(0);
  }, 30_000);

  it('{ spinUs }: a fixed spin catches the next fault of a faulting thread, and its time is counted', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    // 20 ms: far longer than the gap between one thread's consecutive faults, on any machine load.
    const s = await sequential({ spinUs: 20_000 });
    expect(s.faults).toBe(512);
    expect(s.spinBudgetNs).toBe(20_000_000);
    expect(s.spinHits).toBeGreaterThan(256);
    expect(s.spinNs).toBeGreaterThan(0);
    expect(s.cpuNs).toBeGreaterThan(0);
    expect(s.workers[0]!.spinHits).toBe(s.spinHits);
  }, 30_000);

  it("'adaptive': the budget grows from the gaps between faults, stays under its cap, and spinning is counted", async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const s = await sequential('adaptive');
    expect(s.faults).toBe(512);
    expect(s.spinBudgetNs).toBeLessThanOrEqual(200_000);
    expect(s.spinNs).toBeGreaterThan(0); // a budget > 0 was reached: gaps of < 200 µs were seen
    expect(s.spinHits + s.sleeps).toBeGreaterThan(0);
  }, 30_000);

  it('a bad poll option is refused before anything starts', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const uffd = Userfaultfd.open();
    try {
      expect(() => uffd.serve({ poll: { spinUs: -1 } })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(() => uffd.serve({ poll: { spinUs: 2_000_000 } })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(() => uffd.serve({ poll: 'fast' as unknown as 'adaptive' })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
      expect(uffd.serving).toBe(false);
    } finally {
      uffd.close();
    }
  });
});

describe('no silent hang', () => {
  it('addRule() on an unserved descriptor starts the service: faults the rule covers are resolved', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const { dst, src } = setup();
    const uffd = Userfaultfd.open();
    try {
      uffd.register(dst);
      expect(uffd.serving).toBe(false);
      uffd.addRule({ mapping: dst, action: 'copy', source: src });
      expect(uffd.serving).toBe(true);
      const r = await within(access(dst, { op: 'verify', seed: 11, unit: 8 }), 10_000, 'verify under an auto-started service');
      expect(r.mismatches).toBe(0);
      expect(uffd.stats().fastResolved).toBe(N);
    } finally {
      uffd.close();
      dst.close();
      src.close();
    }
  }, 20_000);

  it('with no handler, faults no rule covers get the fallback (zero page) and a warning; serve() then takes over', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const { dst, src } = setup();
    const uffd = Userfaultfd.open();
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.message);
    process.on('warning', onWarning);
    try {
      uffd.register(dst);
      uffd.addRule({ mapping: dst, offset: 0, length: (N / 2) * PAGE, action: 'copy', source: src });
      // The upper half has no rule and no handler: the fallback zero-fills it.
      const r = await within(access(dst, { op: 'read', offset: (N / 2) * PAGE, length: (N / 4) * PAGE }), 10_000, 'unmatched faults');
      expect(r.checksum).toBe(0n);
      await waitFor(() => warnings.some((w) => w.includes('no onFaults handler')), 5000, 'the fallback warning');
      // serve() takes the running service over: a handler and two workers from now on.
      const handled: number[] = [];
      uffd.serve({
        workers: 2,
        onFaults(faults, u) {
          for (const f of faults) {
            handled.push(f.offset);
            u.copy(dst, f.offset, PAGE, src, { sourceOffset: f.offset });
          }
        },
      });
      expect(uffd.stats().workers).toHaveLength(2);
      const off = ((3 * N) / 4) * PAGE;
      const v = await within(dst.read(off, (N / 4) * PAGE), 10_000, 'handled faults');
      expect(Buffer.compare(v, Buffer.from(src.bytes.subarray(off, off + (N / 4) * PAGE)))).toBe(0);
      expect(handled.length).toBe(N / 4);
      const low = await within(access(dst, { op: 'verify', seed: 11, unit: 8, length: (N / 2) * PAGE }), 10_000, 'rule faults');
      expect(low.mismatches).toBe(0);
      expect(() => uffd.serve()).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_SERVING' }));
    } finally {
      process.off('warning', onWarning);
      uffd.close();
      dst.close();
      src.close();
    }
  }, 20_000);

  function unserved(): { m: Mapping; uffd: Userfaultfd } {
    const m = mapAnonymous(16 * PAGE);
    const uffd = Userfaultfd.open();
    uffd.register(m, { offset: 4 * PAGE, length: 8 * PAGE });
    return { m, uffd };
  }

  it('access(), read(), write() and populate() on registered memory nothing serves fail at once with ERR_PAGEMIRROR_NOT_SERVED', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const { m, uffd } = unserved();
    try {
      const notServed = expect.objectContaining({ code: 'ERR_PAGEMIRROR_NOT_SERVED', message: expect.stringContaining(`userfaultfd ${uffd.fd}`) });
      await expect(within(access(m), 5000, 'access')).rejects.toThrow(notServed);
      await expect(within(access(m, { op: 'write', offset: 6 * PAGE, length: PAGE }), 5000, 'access')).rejects.toThrow(notServed);
      await expect(within(m.read(5 * PAGE, 8), 5000, 'read')).rejects.toThrow(notServed);
      expect(() => m.write(11 * PAGE, Buffer.alloc(8))).toThrow(notServed);
      await expect(within(m.populate(), 5000, 'populate')).rejects.toThrow(notServed);
      // Outside the registered range nothing is refused.
      const r = await within(access(m, { offset: 0, length: 4 * PAGE }), 5000, 'unregistered part');
      expect(r.ops).toBe(4);
      // Served, the same access goes through.
      uffd.serve();
      await within(access(m), 5000, 'served access');
    } finally {
      uffd.close();
      m.close();
    }
  }, 20_000);

  it('pages that cannot fault are not refused: present pages (read), write-protect-only registration (read)', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'userfaultfd write-protect');
    const m = mapAnonymous(8 * PAGE);
    m.bytes.fill(7);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(m, { modes: ['missing', 'wp'] });
      const r = await within(access(m, { op: 'read' }), 5000, 'read of present pages');
      expect(r.ops).toBe(8);
      uffd.writeProtect(m, 0, PAGE);
      // A write to the write-protected page would fault: refused.
      await expect(access(m, { op: 'write', length: PAGE })).rejects.toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_NOT_SERVED' }));
      // The other pages are writable.
      await within(access(m, { op: 'write', offset: PAGE, length: 7 * PAGE }), 5000, 'write of unprotected pages');
    } finally {
      uffd.close();
      m.close();
    }
  }, 20_000);

  it('after close() or unregister() the memory is no longer refused', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const a = unserved();
    const b = unserved();
    try {
      a.uffd.unregister(a.m, { offset: 4 * PAGE, length: 8 * PAGE });
      await within(access(a.m), 5000, 'unregistered');
      b.uffd.close();
      await within(access(b.m), 5000, 'closed');
    } finally {
      a.uffd.close();
      a.m.close();
      b.m.close();
    }
  }, 20_000);

  it('a device mirror over registered memory nothing serves fails at once too', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const { m, uffd } = unserved();
    const dev = Device.create({ name: 'ns', memory: 1 << 20 });
    try {
      const mir = dev.mirror(m);
      const notServed = expect.objectContaining({ code: 'ERR_PAGEMIRROR_NOT_SERVED' });
      await expect(within(mir.read(0, 16), 5000, 'mirror read')).rejects.toThrow(notServed);
      await expect(within(mir.run({ op: 'read' }), 5000, 'mirror run')).rejects.toThrow(notServed);
      uffd.serve();
      const served = within(mir.read(0, 16), 5000, 'served mirror read');
      if (uffd.userModeOnly) {
        // The device's range fault is a kernel-mode fault, which a user-mode-only descriptor never
        // sees: the kernel fails it (EFAULT) instead of waiting; not refused by the library.
        await expect(served).rejects.toThrow(expect.objectContaining({ code: 'EFAULT' }));
      } else {
        expect((await served).data.length).toBe(16 * PAGE);
      }
      mir.close();
    } finally {
      dev.close();
      uffd.close();
      m.close();
    }
  }, 20_000);
});

describe('engine workers', () => {
  it('configureEngine({ workers: 2 }): CPU faults on device-resident pages, from 2 threads, come home exact', async (ctx) => {
    requireCap(ctx, P.experiments.move, 'UFFDIO_MOVE');
    const pages = 1024;
    const dev = Device.create({ name: 'ew', memory: 16 << 20 });
    const m = mapAnonymous(pages * PAGE);
    try {
      expect(() => configureEngine({ workers: 0 })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      configureEngine({ workers: 2 });
      await within(access(m, { op: 'write', seed: 5 }), 10_000, 'fill');
      const mir = dev.mirror(m);
      const mig = await within(mir.migrateToDevice(0, pages), 10_000, 'migrate');
      expect(mig.cpages).toBe(pages);
      const before = engineStats().faults;
      expect(engineStats().workerCount).toBe(2);
      expect(engineStats().workers).toHaveLength(2);
      const r = await within(access(m, { op: 'verify', seed: 5, threads: 2 }), 20_000, 'CPU faults bring the pages home');
      expect(r.mismatches).toBe(0);
      const s = engineStats();
      expect(s.faults - before).toBeGreaterThanOrEqual(pages);
      expect(s.workers.reduce((a, w) => a + w.faults, 0)).toBeGreaterThanOrEqual(pages);
      mir.close();
    } finally {
      configureEngine({ workers: 1 });
      m.close();
      dev.close();
    }
  }, 30_000);
});
