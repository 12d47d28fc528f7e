// The strategies suite: remote, copy, bounce and pin over four workloads, on memfd, tmpfs and a
// disk file, side by side; and bounce-page writeback against plain pwrite of the same pages.
// Every repetition uses a fresh file, device and mirror; medians over repetitions.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { mapFile, mapMemfd, type Mapping } from '../mapping.js';
import { Device, type FileMirror, type FileStrategy } from '../device.js';
import { native } from '../native.js';
import { fileSystemOf } from '../probe.js';
import { quantile, summarize, type Summary } from './stats.js';
import { Progress } from './progress.js';
import { registerTempFile, releaseTempFile } from './tempfiles.js';

const PAGE = native.uname().pageSize;
/** The file strategies the strategies suite compares. */
export const STRATEGY_NAMES: FileStrategy[] = ['remote', 'copy', 'bounce', 'pin'];
/** The strategies suite's workloads. */
export const WORKLOADS = ['read-once', 'alternating', 'fsync', 'sparse'] as const;
/** A name of {@link WORKLOADS}. */
export type Workload = (typeof WORKLOADS)[number];

export const WORKLOAD_TEXT: Record<Workload, string> = {
  'read-once': 'the device reads the dataset once, then works on it alone (read-modify-write passes) while periodic writeback runs every 20 ms',
  alternating: 'device phases (write every page) alternate with CPU phases (read() the dataset, write() an eighth of it) through the library',
  fsync: 'device writers rewrite 64 KiB windows and call fsync() after every eighth window',
  sparse: 'device threads make random one-word accesses (reads and writes) over the dataset, touching a sparse subset of its pages',
};

/** Where a strategies-suite file lives: a directory (tmpfs, a disk) or a memfd. */
export interface Place {
  /** memfd, tmpfs, or the disk file system's name. */
  fs: string;
  /** Directory for files; undefined: memfd. */
  dir?: string;
}

/** One strategy on one workload and file system: times, latencies and page-cache footprint. */
export interface StrategyRow {
  fs: string;
  strategy: FileStrategy;
  workload: Workload;
  /** MB/s of device-side work (bytes) or, for sparse, million accesses per second. */
  throughput: Summary & { samples: number[]; unit: string };
  /** Per-operation latency in µs (device window, fsync or CPU phase, as the workload defines), pooled over repetitions. */
  latency: { p50: number; p99: number; unit: string; what: string };
  /** The last repetition's accounting at the end of the workload. */
  pageCachePages: number;
  rssMiB: number;
  devicePages: number;
  bytesCopiedMiB: number;
  faultRounds: number;
  writebacks: number;
  writtenPages: number;
  skipped?: string;
}

/** One bounce writeback measurement: how long device writers wait while pages are written. */
export interface WritebackRow {
  fs: string;
  /** pagecache: the page-cache page pwrite fills is the bounce page; buffer: a private bounce buffer first. */
  snapshot: 'pagecache' | 'buffer';
  pages: number;
  /** MB/s of bounce-page writeback (all pages dirty on the device, writeback + fdatasync). */
  writeback: Summary & { samples: number[] };
  /** MB/s of plain pwrite of the same pages from a buffer + fdatasync, same file, same run. */
  pwrite: Summary & { samples: number[] };
  ratio: number;
  target: number | null;
  pass: boolean | null;
}

/** What {@link runStrategies} returns. */
export interface StrategiesResult {
  dataset: { pages: number; bytes: number };
  places: Place[];
  rows: StrategyRow[];
  writeback: WritebackRow[];
}

/** memfd, /dev/shm and a file under the OS temp dir (or --dir): the built-in defaults. */
/** memfd, tmpfs (/dev/shm) and a file in `dir` (default: the OS temp dir). */
export function defaultPlaces(dir?: string): Place[] {
  const places: Place[] = [{ fs: 'memfd' }];
  if (fs.existsSync('/dev/shm')) places.push({ fs: 'tmpfs', dir: '/dev/shm' });
  const disk = dir ?? os.tmpdir();
  const type = fileSystemOf(disk);
  if (type !== 'tmpfs' || dir) places.push({ fs: type, dir: disk });
  return places;
}

interface Fixture {
  m: Mapping;
  dev: Device;
  fm: FileMirror;
  done(): void;
}

function fixture(place: Place, pages: number, strategy: FileStrategy, interval: number, snapshot: 'pagecache' | 'buffer' = 'pagecache'): Fixture {
  const bytes = pages * PAGE;
  let file: string | undefined;
  let m: Mapping | undefined;
  // Real pages with data in them, as in a file someone wrote.
  const fill = (fd: number) => {
    const chunk = Buffer.alloc(Math.min(bytes, 1 << 20), 0x5a);
    for (let off = 0; off < bytes; off += chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - off), off);
  };
  // A fixture that fails half-made (a full disk, a refused mirror) is reported as a skipped cell:
  // what it made must go, the dataset-sized file first.
  let dev: Device | undefined;
  let fm: FileMirror;
  try {
    if (place.dir) {
      file = path.join(place.dir, `pagemirror-bench-${process.pid}-${strategy}`);
      registerTempFile(file);
      const fd = fs.openSync(file, 'w+');
      try {
        fill(fd);
        fs.fdatasyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      m = mapFile(file);
    } else {
      m = mapMemfd(bytes, { name: 'pagemirror-bench' });
      fill(m.fd);
    }
    dev = Device.create({ name: strategy, memory: bytes + (2 << 20), faultAround: 64 << 10, faultBatch: 64, preallocate: true });
    fm = dev.mirrorFile(m, { strategy, writebackIntervalMs: interval, snapshot });
  } catch (err) {
    dev?.close();
    m?.close();
    if (file) releaseTempFile(file);
    throw err;
  }
  return {
    m,
    dev,
    fm,
    done() {
      fm.close();
      dev.close();
      m.close();
      if (file) releaseTempFile(file);
    },
  };
}

const WINDOW = 16; // pages per device kernel call (64 KiB): one latency sample

async function windows(fm: FileMirror, pages: number, op: 'read' | 'write' | 'atomic', seed: number, lat: number[]): Promise<number> {
  let ns = 0;
  for (let p = 0; p < pages; p += WINDOW) {
    const r = await fm.run({ op, offset: p * PAGE, npages: Math.min(WINDOW, pages - p), unit: 8, seed });
    ns += r.elapsedNs;
    lat.push(r.elapsedNs / 1000);
  }
  return ns;
}

/** One repetition of a workload: returns throughput and latency samples. */
async function runWorkload(f: Fixture, w: Workload, pages: number, lat: number[]): Promise<number> {
  const bytes = pages * PAGE;
  if (w === 'read-once') {
    await f.fm.run({ op: 'read', unit: PAGE, threads: 2 }); // the one read of the dataset (loads)
    let ns = 0;
    for (let pass = 0; pass < 4; pass++) ns += await windows(f.fm, pages, 'atomic', pass, lat);
    return (4 * bytes) / (ns / 1e9) / 1e6;
  }
  if (w === 'alternating') {
    const t0 = process.hrtime.bigint();
    for (let round = 0; round < 3; round++) {
      await windows(f.fm, pages, 'write', round * 1000, lat);
      const c0 = process.hrtime.bigint();
      await f.fm.pread(0, bytes);
      await f.fm.pwrite(0, Buffer.alloc(Math.max(1, Math.floor(pages / 8)) * PAGE, round));
      lat.push(Number(process.hrtime.bigint() - c0) / 1000);
    }
    return (3 * 2 * bytes) / (Number(process.hrtime.bigint() - t0) / 1e9) / 1e6;
  }
  if (w === 'fsync') {
    const t0 = process.hrtime.bigint();
    let k = 0;
    for (let p = 0; p < pages; p += WINDOW) {
      await f.fm.run({ op: 'write', offset: p * PAGE, npages: Math.min(WINDOW, pages - p), unit: 8, seed: p });
      if (++k % 8 === 0) {
        const s0 = process.hrtime.bigint();
        await f.fm.fsync();
        lat.push(Number(process.hrtime.bigint() - s0) / 1000);
      }
    }
    await f.fm.fsync();
    return bytes / (Number(process.hrtime.bigint() - t0) / 1e9) / 1e6;
  }
  // sparse: random words over the dataset, reads and writes, 32 calls.
  let ns = 0;
  let ops = 0;
  const per = Math.max(64, Math.floor(pages / 16));
  for (let k = 0; k < 32; k++) {
    const r = await f.fm.run({ op: k % 2 ? 'write' : 'read', pattern: 'random', ops: per, seed: k + 1, threads: 2 });
    ns += r.elapsedNs;
    ops += r.ops;
    lat.push(r.elapsedNs / 1000 / (r.ops || 1)); // µs per access
  }
  return ops / (ns / 1e9) / 1e6;
}

/** The strategies suite: remote, copy, bounce and pin over four workloads and file systems. */
export async function runStrategies(o: { pages?: number; reps?: number; dir?: string; quiet?: boolean; places?: Place[] } = {}): Promise<StrategiesResult> {
  const pages = o.pages ?? 4096;
  const reps = o.reps ?? 3;
  const places = o.places ?? defaultPlaces(o.dir);
  const progress = new Progress(places.length * (STRATEGY_NAMES.length * WORKLOADS.length + 1), 'strategies', o.quiet);
  const rows: StrategyRow[] = [];
  const writeback: WritebackRow[] = [];
  for (const place of places) {
    for (const strategy of STRATEGY_NAMES) {
      for (const w of WORKLOADS) {
        const tput: number[] = [];
        const lat: number[] = [];
        let last: StrategyRow | undefined;
        let skipped: string | undefined;
        for (let rep = 0; rep < reps && !skipped; rep++) {
          let f: Fixture;
          try {
            f = fixture(place, pages, strategy, w === 'fsync' ? 0 : 20);
          } catch (err) {
            skipped = `${(err as { code?: string }).code ?? 'error'}: ${(err as Error).message}`;
            break;
          }
          try {
            tput.push(await runWorkload(f, w, pages, lat));
            const a = f.fm.accounting();
            last = {
              fs: place.fs,
              strategy,
              workload: w,
              throughput: { ...summarize([]), samples: [], unit: '' },
              latency: { p50: 0, p99: 0, unit: 'µs', what: '' },
              pageCachePages: a.pageCache.cachedPages,
              rssMiB: a.rssBytes / 2 ** 20,
              devicePages: a.devicePages,
              bytesCopiedMiB: ((a.loadedPages + a.writtenPages + a.pulledBack) * PAGE + a.snapshotBytes) / 2 ** 20,
              faultRounds: f.dev.counters().faultRounds,
              writebacks: a.writebacks,
              writtenPages: a.writtenPages,
            };
          } finally {
            f.done();
          }
        }
        const sorted = Float64Array.from(lat).sort();
        rows.push({
          ...(last ?? { fs: place.fs, strategy, workload: w, pageCachePages: 0, rssMiB: 0, devicePages: 0, bytesCopiedMiB: 0, faultRounds: 0, writebacks: 0, writtenPages: 0, latency: { p50: 0, p99: 0, unit: 'µs', what: '' }, throughput: { ...summarize([]), samples: [], unit: '' } }),
          throughput: { ...summarize(tput), samples: tput, unit: w === 'sparse' ? 'M accesses/s' : 'MB/s' },
          latency: {
            p50: quantile(sorted, 0.5),
            p99: quantile(sorted, 0.99),
            unit: 'µs',
            what: w === 'fsync' ? 'fsync()' : w === 'sparse' ? 'per access' : w === 'alternating' ? '64 KiB window, CPU phase' : '64 KiB window',
          },
          ...(skipped ? { skipped } : {}),
        });
        progress.step(`${place.fs} ${strategy} ${w}`);
      }
    }
    for (const snapshot of ['pagecache', 'buffer'] as const) writeback.push(await writebackVsPwrite(place, pages, reps, snapshot));
    progress.step(`${place.fs} bounce writeback vs pwrite`);
  }
  progress.end();
  return { dataset: { pages, bytes: pages * PAGE }, places, rows, writeback };
}

/**
 * Bounce-page writeback of a dataset the device holds and dirtied, against plain pwrite of the
 * same pages (in the same 64-page pieces) from a buffer, each followed by fdatasync; the two
 * alternate, repetition by repetition, on the same file.
 */
async function writebackVsPwrite(place: Place, pages: number, reps: number, snapshot: 'pagecache' | 'buffer'): Promise<WritebackRow> {
  const bytes = pages * PAGE;
  const wb: number[] = [];
  const pw: number[] = [];
  const f = fixture(place, pages, 'bounce', 0, snapshot);
  try {
    const fd = f.m.fd;
    // The same number of pages from memory of the same size (a small reused buffer would stay in
    // the CPU cache, and the device's pages do not).
    const buf = Buffer.alloc(bytes, 0x33);
    await f.fm.run({ op: 'read', unit: PAGE }); // every page on the device
    for (let rep = 0; rep < Math.max(reps, 5); rep++) {
      await f.fm.run({ op: 'write', unit: PAGE, seed: rep + 1, threads: 2 }); // all dirty
      const r = await f.fm.writeback({ sync: true });
      wb.push(bytes / (r.elapsedNs / 1e9) / 1e6);
      const t0 = process.hrtime.bigint();
      for (let off = 0; off < bytes; off += 64 * PAGE) fs.writeSync(fd, buf, off, Math.min(64 * PAGE, bytes - off), off);
      fs.fdatasyncSync(fd);
      pw.push(bytes / (Number(process.hrtime.bigint() - t0) / 1e9) / 1e6);
    }
  } finally {
    f.done();
  }
  const a = summarize(wb);
  const b = summarize(pw);
  // The target is for the default snapshot (the page-cache page as the bounce page); 'buffer' is reported.
  const target = snapshot === 'pagecache' ? 0.8 : null;
  return { fs: place.fs, snapshot, pages, writeback: { ...a, samples: wb }, pwrite: { ...b, samples: pw }, ratio: a.median / b.median, target, pass: target === null ? null : a.median / b.median >= target };
}
