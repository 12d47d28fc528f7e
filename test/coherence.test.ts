// Coherence against a shadow model: device threads (two devices, one migrating on faults with a
// small memory that must evict), CPU threads, explicit migrations in and out, discards, munmap of
// parts and forks hammer one range; after every read the data must be what the model says. No lost write, no
// stale read, no hang, no crash.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, Device, access, forkAccess, type Mirror, type Mapping } from '../lib/index.js';
import { PAGE, within, rng } from './helpers.js';

const PAGES = 64;
const OPS = 1500;
// Reproducible by default; PAGEMIRROR_SEED=n explores other interleavings (the seed is in the failure).
const SEED = Number(process.env.PAGEMIRROR_SEED ?? 1234);


interface Stream {
  first: number; // pages [first, first + n) belong to this stream
  n: number;
  model: number[]; // per page: the seed its words were last written with (0: zeros; -1: unmapped)
}

/** Page i's words hold seed + word index (seed 0 means all zeros after a discard). */
async function verifyPage(m: Mapping, page: number, seed: number): Promise<number> {
  const opts = { offset: page * PAGE, length: PAGE, unit: 8 };
  if (seed === 0) return (await access(m, { ...opts, op: 'read' })).checksum === 0n ? 0 : 1;
  return (await access(m, { ...opts, op: 'verify', seed })).mismatches;
}

async function runStream(st: Stream, m: Mapping, mirrors: Mirror[], rand: () => number, log: string[]): Promise<void> {
  try {
    await streamOps(st, m, mirrors, rand, log);
  } catch (err) {
    // Say where: the last operations of this stream, and the seed to replay it.
    (err as Error).message += `\n(seed ${SEED}, stream at page ${st.first}; last ops: ${log.slice(-6).join('; ')})`;
    throw err;
  }
}

async function streamOps(st: Stream, m: Mapping, mirrors: Mirror[], rand: () => number, log: string[]): Promise<void> {
  let seed = st.first * 1_000_003 + 17;
  for (let k = 0; k < OPS; k++) {
    const page = st.first + Math.floor(rand() * st.n);
    const r = rand();
    const which = mirrors[Math.floor(rand() * mirrors.length)]!;
    log.push(`[${k}] page ${page} r=${r.toFixed(3)} on ${which.device.name}`);
    if (st.model[page - st.first] === -1) {
      // Unmapped part: every device and CPU access is refused, typed, and nothing crashes.
      await expect(which.read(page * PAGE, 1)).rejects.toMatchObject({ code: 'EFAULT' });
      await expect(access(m, { offset: page * PAGE, length: PAGE })).rejects.toMatchObject({ code: 'EACCES' });
      continue;
    }
    if (r < 0.005 && st.model.filter((x) => x === -1).length < 3) {
      m.unmap(page * PAGE, PAGE); // munmap of a part, under everything else
      st.model[page - st.first] = -1;
      log.push(`unmap ${page}`);
    } else if (r < 0.3) {
      seed += 7;
      await which.run({ op: 'write', seed, offset: page * PAGE, npages: 1, unit: 8 });
      st.model[page - st.first] = seed;
      log.push(`dev write ${page} ${seed}`);
    } else if (r < 0.55) {
      seed += 7;
      // Both kinds of kernel store seed + word index within their own range: the same page content.
      await access(m, { op: 'write', seed, offset: page * PAGE, length: PAGE, unit: 8 });
      st.model[page - st.first] = seed;
      log.push(`cpu write ${page} ${seed}`);
    } else if (r < 0.75) {
      const want = st.model[page - st.first]!;
      const dev = await which.run({ op: 'verify', seed: want, offset: page * PAGE, npages: 1, unit: 8 });
      if (want !== 0 && dev.mismatches !== 0) throw new Error(`seed ${SEED}: stale device read of page ${page}: ${dev.mismatches} words (model ${want})\n${log.slice(-8).join('\n')}`);
      const cpu = await verifyPage(m, page, want);
      if (cpu !== 0) throw new Error(`seed ${SEED}: stale CPU read of page ${page} (model ${want})\n${log.slice(-8).join('\n')}`);
    } else if (r < 0.85) {
      await which.migrateToDevice(page * PAGE, 1).catch((e: { code?: string }) => {
        if (e.code !== 'ENOENT') throw e; // on the other device, or memory full: reported, not an error
      });
      log.push(`migrate ${page}`);
    } else if (r < 0.93) {
      await which.migrateToHost(page * PAGE, 1);
      log.push(`home ${page}`);
    } else if (r < 0.97) {
      m.advise('dontneed', { offset: page * PAGE, length: PAGE });
      st.model[page - st.first] = 0;
      log.push(`discard ${page}`);
    } else {
      const want = st.model[page - st.first]!;
      const child = await forkAccess(m, { op: want === 0 ? 'read' : 'verify', seed: want, offset: page * PAGE, length: PAGE, unit: 8 });
      if (child.exitCode !== 0 || (want === 0 ? child.checksum !== 0n : child.mismatches !== 0))
        throw new Error(`forked child saw stale data on page ${page} (model ${want})`);
      log.push(`fork ${page}`);
    }
  }
}

describe('coherence against a shadow model', () => {
  it('two devices, CPU threads, migrations, evictions, discards and forks on one range', async () => {
    const host = Device.create({ name: 'mirror', memory: 64 * PAGE });
    const uvm = Device.create({ name: 'uvm', memory: 16 * PAGE, placement: 'device', eviction: 'lru' });
    const m = mapAnonymous(PAGES * PAGE);
    try {
      const mirrors = [host.mirror(m), uvm.mirror(m)];
      const streams: Stream[] = [0, 1].map((i) => ({ first: (i * PAGES) / 2, n: PAGES / 2, model: Array(PAGES / 2).fill(0) }));
      const logs: string[][] = [[], []];
      // Two streams on disjoint halves run concurrently: their faults, migrations and evictions
      // interleave in the engine, the devices and the kernel.
      // allSettled: a failing stream must not leave the other running while the mapping closes.
      const results = await within(Promise.allSettled(streams.map((st, i) => runStream(st, m, mirrors, rng(SEED + i), logs[i]!))), 60_000, `streams (seed ${SEED})`);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
      // Final check of every page, from the CPU and from both devices.
      for (const st of streams)
        for (let k = 0; k < st.n; k++) {
          const page = st.first + k;
          const want = st.model[k]!;
          if (want === -1) continue;
          expect(await verifyPage(m, page, want)).toBe(0);
          if (want !== 0) for (const mir of mirrors) expect((await mir.run({ op: 'verify', seed: want, offset: page * PAGE, npages: 1, unit: 8 })).mismatches).toBe(0);
        }
      expect(uvm.counters().migratedToHost.eviction ?? 0).toBeGreaterThan(0);
      for (const mir of mirrors) mir.close();
    } finally {
      host.close();
      uvm.close();
      m.close();
    }
  }, 90_000);
});
