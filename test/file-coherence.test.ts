// Coherence of the file strategies against a shadow model, per strategy and file system. In each
// round the file's pages are cut into disjoint contiguous ranges, each given to one actor: a device
// writer or reader (kernels through the mirror), a CPU writer or reader through the shared mapping
// (where the strategy hands it out: tmpfs always, the disk only for remote and pin), a library
// writer or reader (pread/pwrite through the strategy); writebacks and fsyncs race them all. A page
// read in a round is written by nobody in that round, so what it must read is the model's. At the
// end the file (read() by another path), a device read of everything and the file after close()
// must all be the model. No lost write, no stale read, no torn page, no hang.
import { describe, it, expect } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Device, mapFile, access, fileSystemOf, type FileStrategy, type FileMirror, type Mapping } from '../lib/index.js';
import { P, PAGE, within, requireCap, rng, cleanupAfterEach } from './helpers.js';

const WORDS = PAGE / 8;
const NPAGES = 64;
const ROUNDS = Number(process.env.PAGEMIRROR_ROUNDS ?? 12); // per strategy and settings
// Reproducible by default; PAGEMIRROR_SEED=n explores other interleavings (the seed is in the test's name).
const SEED = Number(process.env.PAGEMIRROR_SEED ?? 1234);
const STRATEGIES: FileStrategy[] = ['remote', 'copy', 'bounce', 'pin'];
const FILESYSTEMS = [
  { name: 'tmpfs', dir: '/dev/shm', shmem: true },
  // The disk's file system (ext4 here); userfaultfd cannot register it, unless it is tmpfs too.
  { name: fileSystemOf(os.tmpdir()), dir: os.tmpdir(), shmem: fileSystemOf(os.tmpdir()) === 'tmpfs' },
];
// Write number k stores seed k << 20: a page's first word tells which write (and which of its pages) it holds.
const ID_SHIFT = 20;

const cleanup = cleanupAfterEach();


/** Per page: word j of page p holds seed + (p - base) * WORDS + j (base: first page of the writer's range). */
interface PageModel {
  seed: number;
  base: number;
}

/** The bytes the model says pages [first, first + n) hold. */
function expected(model: PageModel[], first: number, n: number): Buffer {
  const b = Buffer.alloc(n * PAGE);
  const w = new BigUint64Array(b.buffer, b.byteOffset, n * WORDS);
  for (let k = 0; k < n; k++) {
    const { seed, base } = model[first + k]!;
    const v0 = BigInt(seed + (first + k - base) * WORDS);
    for (let j = 0; j < WORDS; j++) w[k * WORDS + j] = v0 + BigInt(j);
  }
  return b;
}

/** What a write kernel with this seed stores over n pages: seed + word index within its range. */
function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n * PAGE);
  const w = new BigUint64Array(b.buffer, b.byteOffset, n * WORDS);
  for (let i = 0; i < w.length; i++) w[i] = BigInt(seed) + BigInt(i);
  return b;
}

type Kind = 'devWrite' | 'devRead' | 'cpuWrite' | 'cpuRead' | 'libWrite' | 'libRead';

interface WriteRecord {
  round: number;
  kind: Kind;
  first: number;
  n: number;
}

/**
 * A page as read (words [lo, hi) of it were read): which write it holds (and as which of that
 * write's pages), or that it is torn.
 */
function describePage(buf: Buffer, at: number, page: number, history: Map<number, WriteRecord>, lo = 0, hi = WORDS): string {
  const s0 = buf.readBigUInt64LE(at + lo * 8) - BigInt(lo); // word j = s0 + j
  let uniform = true;
  for (let j = lo + 1; j < hi && uniform; j++) uniform = buf.readBigUInt64LE(at + j * 8) === s0 + BigInt(j);
  const part = lo > 0 || hi < WORDS ? `words [${lo}, ${hi}): ` : '';
  if (!uniform) {
    const words = [...new Set([lo, lo + 1, (lo + hi) >> 1, hi - 1])].filter((j) => j < hi).map((j) => `${j}: ${buf.readBigUInt64LE(at + j * 8)}`);
    return `${part}torn page (${words.join(', ')})`;
  }
  if (s0 === 0n && buf.readBigUInt64LE(at + lo * 8) === 0n) return `${part}zeros`;
  const id = Number(s0 >> BigInt(ID_SHIFT));
  const rel = Number(s0 & BigInt((1 << ID_SHIFT) - 1));
  const rec = history.get(id);
  if (!rec || rel % WORDS !== 0) return `${part}unknown value ${s0 + BigInt(lo)} at word ${lo}`;
  const as = rec.first + rel / WORDS;
  return `${part}write #${id} (round ${rec.round}, ${rec.kind} of pages [${rec.first}, ${rec.first + rec.n}))${as === page ? '' : ` as its page ${as}`}`;
}

/**
 * Pages of `got` (covering [first, first + n)) that differ from the model, described; [] if none.
 * Only bytes [head, n * PAGE - tail) were read (the rest of got is the model's).
 */
function diff(got: Buffer, model: PageModel[], first: number, n: number, history: Map<number, WriteRecord>, head = 0, tail = 0): string[] {
  const want = expected(model, first, n);
  if (got.length === want.length && got.equals(want)) return [];
  if (got.length !== want.length) return [`${got.length} bytes instead of ${want.length}`];
  const out: string[] = [];
  for (let k = 0; k < n; k++) {
    const a = got.subarray(k * PAGE, (k + 1) * PAGE);
    if (a.equals(want.subarray(k * PAGE, (k + 1) * PAGE))) continue;
    const p = first + k;
    const m = model[p]!;
    const lo = k === 0 ? head / 8 : 0;
    const hi = k === n - 1 ? WORDS - tail / 8 : WORDS;
    out.push(`page ${p}: read ${describePage(got, k * PAGE, p, history, lo, hi)}; model: write #${m.seed >> ID_SHIFT}${m.base === p ? '' : ` as its page ${p}`}`);
  }
  return out;
}

/** Random disjoint contiguous ranges covering [0, NPAGES). */
function cut(rand: () => number): { first: number; n: number }[] {
  const k = 3 + Math.floor(rand() * 8); // 3..10 ranges
  const points = new Set<number>();
  while (points.size < k - 1) points.add(1 + Math.floor(rand() * (NPAGES - 1)));
  const cuts = [0, ...[...points].sort((a, b) => a - b), NPAGES];
  return cuts.slice(0, -1).map((first, i) => ({ first, n: cuts[i + 1]! - first }));
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// The mirror settings each strategy runs under, listed rather than drawn from the seed, so every
// one of them runs every time: chunk size, snapshot mode, periodic writeback as one more racer, and
// device memory smaller than the file (copy and bounce then evict their own pages, written back if
// dirty, while they load others).
interface Config {
  chunkPages: number;
  snapshot: 'pagecache' | 'buffer';
  writebackIntervalMs: number;
  eviction?: 'lru' | 'fifo';
}
const CONFIGS: Config[] = [
  { chunkPages: 8, snapshot: 'pagecache', writebackIntervalMs: 0 },
  { chunkPages: 64, snapshot: 'buffer', writebackIntervalMs: 2 },
  { chunkPages: 8, snapshot: 'buffer', writebackIntervalMs: 0, eviction: 'lru' },
  { chunkPages: 64, snapshot: 'pagecache', writebackIntervalMs: 1, eviction: 'fifo' },
];
const CASES = STRATEGIES.flatMap((strategy) => CONFIGS.map((config, index) => ({ strategy, config, index })));

describe.each(FILESYSTEMS)('file coherence against a shadow model on $name', ({ name: fsName, dir, shmem }) => {
  it.for(CASES)(`$strategy, settings #$index (seed ${SEED}): device, CPU and library writers and readers on disjoint ranges, racing writebacks`, async ({ strategy, config, index }, ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    // copy/bounce on tmpfs intercept CPU faults: without that, the mirror cannot be made there.
    if (shmem && (strategy === 'copy' || strategy === 'bounce')) requireCap(ctx, P.experiments.fileCpuFaults, 'CPU fault interception on tmpfs');
    const testSeed = SEED * 31 + STRATEGIES.indexOf(strategy) * 7 + index * 101 + (shmem ? 0 : 3);
    const rand = rng(testSeed);
    // The CPU mapping: on the disk, copy and bounce refuse it by design (it would read stale pages).
    const cpuAllowed = shmem || strategy === 'remote' || strategy === 'pin';
    const opts = { chunkPages: config.chunkPages, snapshot: config.snapshot };
    const writebackIntervalMs = config.writebackIntervalMs;
    const small = config.eviction !== undefined;
    const devOpts = small ? { memory: 24 * PAGE, eviction: config.eviction } : { memory: 4 << 20 };
    const where =
      `${strategy} on ${fsName}, seed ${SEED}, chunkPages ${opts.chunkPages}, snapshot ${opts.snapshot}` +
      `${writebackIntervalMs ? `, periodic writeback ${writebackIntervalMs} ms` : ''}${small ? `, device memory 24 pages (${devOpts.eviction})` : ''}`;

    const file = path.join(dir, `pagemirror-coherence-${strategy}-${process.pid}-${Math.random().toString(36).slice(2)}`);
    const history = new Map<number, WriteRecord>();
    history.set(1, { round: -1, kind: 'libWrite', first: 0, n: NPAGES }); // the file's first contents
    fs.writeFileSync(file, pattern(NPAGES, 1 << ID_SHIFT));
    const model: PageModel[] = Array.from({ length: NPAGES }, () => ({ seed: 1 << ID_SHIFT, base: 0 }));
    let nextId = 2;

    const m: Mapping = mapFile(file);
    const dev = Device.create(devOpts);
    const fm: FileMirror = dev.mirrorFile(m, { strategy, ...opts, writebackIntervalMs });
    cleanup.push(() => fs.unlinkSync(file), () => m.close(), () => dev.close(), () => fm.close());

    const kinds: Kind[] = ['devWrite', 'devRead', 'libWrite', 'libRead', ...(cpuAllowed ? (['cpuWrite', 'cpuRead'] as Kind[]) : [])];

    for (let round = 0; round < ROUNDS; round++) {
      const plan: string[] = [];
      const writes: { first: number; n: number; seed: number }[] = [];
      const failures: string[] = [];
      const tasks: Promise<void>[] = [];

      for (const { first, n } of cut(rand)) {
        const kind = kinds[Math.floor(rand() * kinds.length)]!;
        const delay = rand() < 0.5 ? 0 : Math.floor(rand() * 3);
        const off = first * PAGE;
        const len = n * PAGE;
        // Writers store the same values reps times over (a longer overlap with the others); readers read reps times.
        const reps = 1 + Math.floor(rand() * 3);
        const what = `${kind} [${first}, ${first + n})${reps > 1 ? ` x${reps}` : ''}`;
        let act: () => Promise<void>;
        if (kind.endsWith('Write')) {
          const id = nextId++;
          const seed = id << ID_SHIFT;
          history.set(id, { round, kind, first, n });
          writes.push({ first, n, seed });
          plan.push(`${what} #${id}`);
          if (kind === 'devWrite') {
            const threads = rand() < 0.5 ? 1 : 2;
            act = async () => {
              await fm.run({ op: 'write', offset: off, npages: n, seed, unit: 8, threads, ops: n * WORDS * reps });
            };
          } else if (kind === 'cpuWrite') {
            const threads = rand() < 0.5 ? 1 : 2;
            act = async () => {
              const r = await access(m, { op: 'write', offset: off, length: len, seed, unit: 8, threads, ops: n * WORDS * reps });
              if (r.signal) failures.push(`${what}: ${r.signal} at ${r.signalAddress}`);
            };
          } else {
            const data = pattern(n, seed);
            act = async () => {
              for (let k = 0; k < reps; k++) await fm.pwrite(off, data);
            };
          }
        } else {
          // CPU and library reads sometimes start and end inside a page (the device reads whole pages).
          const partial = kind !== 'devRead' && rand() < 0.3;
          const head = partial ? Math.floor(rand() * WORDS) * 8 : 0;
          const tail = partial ? Math.floor(rand() * Math.min(WORDS, n * WORDS - head / 8 - 1)) * 8 : 0; // at least a word is read
          const rwhat = partial ? `${what} bytes [+${head}, -${tail}]` : what;
          plan.push(rwhat);
          const check = (got: Buffer) => {
            // Compared page by page: a partial read is laid over the model's pages around it.
            const full = expected(model, first, n);
            if (got.length !== len - head - tail) {
              failures.push(`${rwhat}: read ${got.length} bytes instead of ${len - head - tail}`);
              return;
            }
            got.copy(full, head);
            const bad = diff(full, model, first, n, history, head, tail);
            if (bad.length) failures.push(`${rwhat} read stale data:\n    ${bad.join('\n    ')}`);
          };
          const read1 =
            kind === 'devRead'
              ? async () => (await fm.read(off, n)).data
              : kind === 'cpuRead'
                ? () => m.read(off + head, len - head - tail)
                : () => fm.pread(off + head, len - head - tail);
          act = async () => {
            for (let k = 0; k < reps; k++) check(await read1());
          };
        }
        tasks.push(
          (async () => {
            if (delay) await sleep(delay);
            await within(act(), 15_000, `${what} (round ${round}, ${where})`);
          })().catch((e: Error) => {
            failures.push(`${what}: ${e.message}`);
          }),
        );
      }
      // Writebacks racing everything: the whole file, a range, or an fsync.
      const nwb = 1 + Math.floor(rand() * 3);
      for (let k = 0; k < nwb; k++) {
        const r = rand();
        const delay = Math.floor(rand() * 3);
        let what: string;
        let act: () => Promise<unknown>;
        if (r < 0.5) {
          what = 'writeback()';
          act = () => fm.writeback();
        } else if (r < 0.8) {
          const a = Math.floor(rand() * NPAGES);
          const b = a + 1 + Math.floor(rand() * (NPAGES - a));
          what = `writeback([${a}, ${b}))`;
          act = () => fm.writeback({ offset: a * PAGE, length: (b - a) * PAGE, sync: rand() < 0.3 });
        } else {
          what = 'fsync()';
          act = () => fm.fsync();
        }
        plan.push(`${what} after ${delay} ms`);
        tasks.push(
          (async () => {
            if (delay) await sleep(delay);
            await within(act(), 15_000, `${what} (round ${round}, ${where})`);
          })().catch((e: Error) => {
            failures.push(`${what}: ${e.message}`);
          }),
        );
      }

      await within(Promise.all(tasks), 20_000, `round ${round} (${where})`);
      if (failures.length) throw new Error(`${where}, round ${round}:\n  ${failures.join('\n  ')}\nplan: ${plan.join('; ')}`);
      for (const w of writes) for (let p = w.first; p < w.first + w.n; p++) model[p] = { seed: w.seed, base: w.first };
    }

    // The end: fsync, then the file read by another path, the device's view, and the file after close().
    await within(fm.fsync(), 15_000, `final fsync (${where})`);
    const onDisk = diff(fs.readFileSync(file), model, 0, NPAGES, history);
    expect(onDisk, `${where}: the file after fsync()`).toEqual([]);
    const devView = diff((await within(fm.read(0, NPAGES), 15_000, `final device read (${where})`)).data, model, 0, NPAGES, history);
    expect(devView, `${where}: a device read of the whole file`).toEqual([]);
    fm.close();
    expect(diff(fs.readFileSync(file), model, 0, NPAGES, history), `${where}: the file after close()`).toEqual([]);
    // With the mirror gone, the mapping is the file's again (on the disk too).
    expect(diff(await within(m.read(0, NPAGES * PAGE), 15_000, 'final CPU read'), model, 0, NPAGES, history), `${where}: the CPU mapping after close()`).toEqual([]);
  }, 60_000);
});
