// `bench pager`: the pager against a plain mmap of the file and a plain C pager (bench/c/pager_c.c)
// doing the same work: sequential and random reads and writes, one word per 4 KiB page, on tmpfs
// and on the disk file system (page cache dropped before each repetition), granules 4 KiB, 64 KiB
// and 2 MiB, 1 and 2 application threads, resident limit unbounded and 25 % of the file. Also the
// write-back throughput under eviction against pwrite of the same pages.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { access } from '../access.js';
import { checkInteger, typeError } from '../errors.js';
import { helperPath } from '../addon-path.js';
import { mapFile } from '../mapping.js';
import { pager } from '../pager.js';
import { fileSystemOf, probe } from '../probe.js';
import { benchEnv } from './env.js';
import { Progress } from './progress.js';
import { barChartSvg, textTable, writeReport, type Table } from './report.js';
import { quantile, summarize, type Summary } from './stats.js';
import { registerTempFile, releaseTempFile } from './tempfiles.js';

const PAGE = 4096;

/** The pager suite's workloads. */
export const PAGER_WORKLOADS = ['seq-read', 'rand-read', 'seq-write', 'rand-write'] as const;
/** A name of {@link PAGER_WORKLOADS}. */
export type PagerWorkload = (typeof PAGER_WORKLOADS)[number];

/** Options of {@link runPager}. */
export interface PagerBenchOptions {
  /** File bytes. Default 8 MiB (the suite then runs in a few minutes). */
  size?: number;
  /** Repetitions per cell (medians reported). @default 3 */
  reps?: number;
  /** Directory of the disk file. Default the OS temp dir (or /var/tmp when that is tmpfs). */
  dir?: string;
  /** Fault service threads of the pager and fill threads of the C pager. @default 1 */
  workers?: number;
  /** A smoke-sized matrix: 64 KiB granules and one application thread only. @default false */
  quick?: boolean;
  /**
   * Only some cells: those whose label (as the progress shows it, `disk 2M x2 25% rand-write`, or
   * `write-back disk 2M`) holds every word of one of these comma-separated patterns, e.g.
   * `'2M x2 25%'` or `'tmpfs seq-read, write-back'`. Default: every cell. A word that names
   * nothing, or a pattern that matches no cell, is a TypeError `ERR_INVALID_ARG_VALUE`.
   */
  cells?: string;
  /**
   * The pager's `writeback` in the read/write cells. 'pagecache' (an evicted granule is clean once
   * pwrite returned) is what the C pager does, so the ratio compares the same work; 'confirmed'
   * (the pager's default: clean only once the write is on disk, the write-error guarantee) measures
   * what that guarantee costs. @default 'pagecache'
   */
  writeback?: 'pagecache' | 'confirmed';
  /**
   * Service threads of both pagers poll their descriptor for up to this many µs before sleeping
   * (the pager's `poll: { spinUs }`, the C pager's `--spin-us`, the same loop). 0 (default): both
   * sleep at once, and on an idle machine both pay the wake-up of a sleeping thread per fault, a
   * cost that varies from run to run far more than the 10 % the target allows.
   * @default 0
   */
  spinUs?: number;
  /**
   * The C pager also tracks dirty granules the pager's way (`--track-dirty`: registered for
   * write-protect, clean granules copied in protected, only dirty ones written back), without the
   * pager's protection against a write racing an eviction: the ratio then leaves out what dirty
   * tracking costs, which the default comparison (a C pager that tracks nothing) includes.
   * @default false
   */
  cTracksDirty?: boolean;
  quiet?: boolean;
}

/**
 * The ratio pager/C of one cell: from the repetitions' paired ratios (pager and C alternate within
 * a repetition, so each pair saw the same moment of this noisy machine).
 */
export interface PairedRatio {
  /** pager/C of each repetition, in run order. */
  pairs: number[];
  /** The median of `pairs`. */
  median: number;
  /**
   * A distribution-free confidence interval of the median paired ratio: order statistics of the
   * pairs (the sign test's interval), at the coverage `confidence` says. With 3 repetitions it is
   * [min, max] at 75 %; 5 give [min, max] at 94 %; 9 give the 2nd smallest to the 2nd largest at 96 %.
   */
  low: number;
  high: number;
  confidence: number;
  /** Against the target (<= 1.1x): 'meets' when `high` is within it, 'misses' when `low` is over it, else 'undecided'. */
  verdict: 'meets' | 'misses' | 'undecided';
}

/** The target of the pager suite: at most this many times the C pager's time. */
export const PAGER_TARGET = 1.1;

/**
 * Median of paired ratios and its order-statistic confidence interval (at least 90 % where the
 * number of pairs allows, else the widest there is: [min, max]). Exported for the tests.
 */
export function pairedRatio(pairs: readonly number[], target = PAGER_TARGET): PairedRatio {
  const s = [...pairs].sort((a, b) => a - b);
  const n = s.length;
  // P(Binomial(n, 1/2) <= k - 1): the chance the median lies below the k-th smallest.
  const tail = (k: number) => {
    let p = 0;
    let c = 1; // C(n, i)
    for (let i = 0; i < k; i++) {
      p += c;
      c = (c * (n - i)) / (i + 1);
    }
    return p / 2 ** n;
  };
  let k = 1;
  while (k + 1 <= Math.floor(n / 2) && 1 - 2 * tail(k + 1) >= 0.9) k++;
  const low = s[k - 1] ?? NaN;
  const high = s[n - k] ?? NaN;
  const verdict = high <= target ? 'meets' : low > target ? 'misses' : 'undecided';
  return { pairs: [...pairs], median: quantile(s, 0.5), low, high, confidence: n ? 1 - 2 * tail(k) : 0, verdict };
}

/** One pager-suite cell: pager(), the C pager and mmap on one workload, granule and limit. */
export interface PagerCell {
  fs: 'tmpfs' | 'disk';
  granule: number;
  threads: number;
  limit: 'unbounded' | '25%';
  workload: PagerWorkload;
  /** ns per 4 KiB page touched. */
  pager: Summary;
  c: Summary;
  mmap: Summary;
  /** median(pager) / median(C). */
  ratioC: number;
  /** pager/C repetition by repetition, with its interval and verdict. */
  paired: PairedRatio;
  ratioMmap: number;
}

/** One write-back measurement of the pager suite. */
export interface WritebackRow {
  fs: 'tmpfs' | 'disk';
  granule: number;
  /** MB/s of the pager's write-back under eviction (pwrite from the region + waits). */
  pager: Summary;
  /** MB/s of pwrite of the same bytes in the same batches, with the same waits. */
  pwrite: Summary;
  ratio: number;
}

function runC(args: string[]): Promise<Record<string, number>> {
  return new Promise((resolve, reject) => {
    execFile(helperPath('pager_c'), args, { timeout: 300_000, maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      if (err) return reject(Object.assign(new Error(`C pager ${args.join(' ')} failed: ${stderr || err.message}`), { code: 'ERR_PAGEMIRROR_BASELINE' }));
      resolve(JSON.parse(stdout) as Record<string, number>);
    });
  });
}

function diskDir(dir?: string): string {
  if (dir) return dir;
  const t = os.tmpdir();
  return fileSystemOf(t) === 'tmpfs' ? '/var/tmp' : t;
}

interface Cell {
  fsName: 'tmpfs' | 'disk';
  file: string;
  granule: number;
  threads: number;
  limit: boolean;
  workload: PagerWorkload;
}

const FILE_SYSTEMS = ['tmpfs', 'disk'] as const;
const granulesOf = (quick?: boolean) => (quick ? [64 << 10] : [4096, 64 << 10, 2 << 20]);
const kib = (g: number) => (g >= 1 << 20 ? `${g >> 20}M` : `${g >> 10}K`);
const cellLabel = (c: Omit<Cell, 'file'>) => `${c.fsName} ${kib(c.granule)} x${c.threads} ${c.limit ? '25%' : 'unbounded'} ${c.workload}`;
const writebackLabel = (fsName: string, granule: number) => `write-back ${fsName} ${kib(granule)}`;

/** The labels of the matrix's cells (pager and write-back), in the order the suite runs them. */
function matrix(quick?: boolean): { cells: Omit<Cell, 'file'>[]; writeback: { fsName: 'tmpfs' | 'disk'; granule: number }[] } {
  const cells: Omit<Cell, 'file'>[] = [];
  for (const fsName of FILE_SYSTEMS)
    for (const granule of granulesOf(quick))
      for (const threads of quick ? [1] : [1, 2])
        for (const limit of [false, true]) for (const workload of PAGER_WORKLOADS) cells.push({ fsName, granule, threads, limit, workload });
  return { cells, writeback: FILE_SYSTEMS.flatMap((fsName) => granulesOf(quick).map((granule) => ({ fsName, granule }))) };
}

/**
 * The filter of {@link PagerBenchOptions.cells}: a predicate on labels. Throws a TypeError
 * `ERR_INVALID_ARG_VALUE` for a word no label has or a pattern that matches no cell.
 */
export function pagerCellFilter(spec: string | undefined, quick?: boolean): (label: string) => boolean {
  if (spec === undefined) return () => true;
  if (typeof spec !== 'string') throw typeError('ERR_INVALID_ARG_TYPE', 'cells must be a string');
  const m = matrix(quick);
  const labels = [...m.cells.map(cellLabel), ...m.writeback.map((w) => writebackLabel(w.fsName, w.granule))];
  const words = new Set(labels.flatMap((l) => l.split(' ')));
  const patterns = spec.split(',').map((p) => p.trim().split(/\s+/).filter(Boolean));
  const which = quick ? 'the --quick matrix' : 'the matrix';
  for (const p of patterns) {
    if (p.length === 0) throw typeError('ERR_INVALID_ARG_VALUE', `cells has an empty pattern: '${spec}'`);
    const unknown = p.filter((w) => !words.has(w));
    if (unknown.length) throw typeError('ERR_INVALID_ARG_VALUE', `cells: '${unknown.join(' ')}' names nothing in ${which} (words: ${[...words].join(' ')})`);
    if (!labels.some((l) => p.every((w) => l.split(' ').includes(w)))) throw typeError('ERR_INVALID_ARG_VALUE', `cells: '${p.join(' ')}' matches no cell of ${which}`);
  }
  return (label) => patterns.some((p) => p.every((w) => label.split(' ').includes(w)));
}

function accessSpec(c: Cell) {
  return {
    op: c.workload.endsWith('write') ? ('write' as const) : ('read' as const),
    pattern: c.workload.startsWith('rand') ? ('random' as const) : ('sequential' as const),
    unit: PAGE,
    threads: c.threads,
  };
}

async function pagerRep(c: Cell, size: number, workers: number, writeback: 'pagecache' | 'confirmed', spinUs: number): Promise<number> {
  const p = await pager(c.file, { granule: c.granule, residentLimit: c.limit ? Math.max(c.granule, size / 4) : undefined, prefetch: false, workers, writeback, poll: spinUs ? { spinUs } : false });
  try {
    const r = await p.access(accessSpec(c));
    return r.elapsedNs / (size / PAGE);
  } finally {
    await p.close();
  }
}

async function mmapRep(c: Cell, size: number): Promise<number> {
  const m = mapFile(c.file);
  try {
    const r = await access(m, accessSpec(c));
    return r.elapsedNs / (size / PAGE);
  } finally {
    m.close();
  }
}

async function cRep(c: Cell, size: number, workers: number, spinUs: number, tracksDirty: boolean): Promise<number> {
  const s = accessSpec(c);
  const limit = c.limit ? Math.max(1, Math.floor(size / 4 / c.granule)) : 0;
  const r = await runC(['run', c.file, '--granule', String(c.granule), '--threads', String(c.threads), '--fillers', String(workers), '--op', s.op, '--pattern', s.pattern === 'random' ? 'random' : 'seq', '--limit', String(limit), '--spin-us', String(spinUs), '--track-dirty', tracksDirty ? '1' : '0']);
  return r.ns! / (size / PAGE);
}

/** The pager suite: pager() against a plain C pager and mmap. */
export async function runPager(o: PagerBenchOptions = {}): Promise<{ cells: PagerCell[]; writeback: WritebackRow[] }> {
  const size = o.size ?? 8 << 20;
  const reps = o.reps ?? 3;
  const workers = o.workers ?? 1;
  const spinUs = checkInteger('spinUs', o.spinUs ?? 0, 0, 1_000_000);
  const wanted = pagerCellFilter(o.cells, o.quick);
  const p = probe();
  if (!p.experiments.wp.ok) throw Object.assign(new Error(`the pager needs uffd-wp: ${p.experiments.wp.reason}`), { code: 'ERR_PAGEMIRROR_UNSUPPORTED' });
  const m = matrix(o.quick);
  const todo = m.cells.filter((c) => wanted(cellLabel(c)));
  const todoWriteback = m.writeback.filter((w) => wanted(writebackLabel(w.fsName, w.granule)));
  const files = [
    { fsName: 'tmpfs' as const, file: path.join('/dev/shm', `pagemirror-bench-pager-${process.pid}`) },
    { fsName: 'disk' as const, file: path.join(diskDir(o.dir), `pagemirror-bench-pager-${process.pid}`) },
  ].filter((f) => todo.some((c) => c.fsName === f.fsName) || todoWriteback.some((w) => w.fsName === f.fsName));
  const fileOf = (fsName: 'tmpfs' | 'disk') => files.find((f) => f.fsName === fsName)!.file;
  const content = Buffer.alloc(size);
  for (let i = 0; i < size; i += 8) content.writeBigUInt64LE(BigInt(i / 8), i);
  for (const f of files) {
    registerTempFile(f.file); // removed on exit and on SIGINT/SIGTERM/SIGHUP too
    fs.writeFileSync(f.file, content);
  }
  const cells: Cell[] = todo.map((c) => ({ ...c, file: fileOf(c.fsName) }));
  const progress = new Progress(cells.length + todoWriteback.length, 'pager', o.quiet);
  const out: PagerCell[] = [];
  const writeback: WritebackRow[] = [];
  try {
    for (const c of cells) {
      const t0 = performance.now();
      progress.start(cellLabel(c));
      const drop = () => (c.fsName === 'disk' ? runC(['drop', c.file]) : Promise.resolve({}));
      const ps: number[] = [];
      const cs: number[] = [];
      const ms: number[] = [];
      // The three alternate within each repetition, so drift of this noisy machine falls on all.
      for (let i = 0; i < reps; i++) {
        await drop();
        ps.push(await pagerRep(c, size, workers, o.writeback ?? 'pagecache', spinUs));
        await drop();
        cs.push(await cRep(c, size, workers, spinUs, o.cTracksDirty === true));
        await drop();
        ms.push(await mmapRep(c, size));
      }
      const cell: PagerCell = {
        fs: c.fsName,
        granule: c.granule,
        threads: c.threads,
        limit: c.limit ? '25%' : 'unbounded',
        workload: c.workload,
        pager: summarize(ps),
        c: summarize(cs),
        mmap: summarize(ms),
        ratioC: 0,
        paired: pairedRatio(ps.map((p, i) => p / cs[i]!)),
        ratioMmap: 0,
      };
      cell.ratioC = cell.pager.median / cell.c.median;
      cell.ratioMmap = cell.pager.median / cell.mmap.median;
      out.push(cell);
      const pr = cell.paired;
      progress.step(`${cellLabel(c)}: ${pr.median.toFixed(2)}x C [${pr.low.toFixed(2)}-${pr.high.toFixed(2)}] ${pr.verdict}, ${cell.ratioMmap.toFixed(2)}x mmap (${seconds(t0)})`);
    }
    for (const { fsName, granule } of todoWriteback) {
      const file = fileOf(fsName);
      const t0 = performance.now();
      progress.start(writebackLabel(fsName, granule));
      const limitGranules = Math.max(1, Math.floor(size / 4 / granule));
      const batch = Math.max(1, Math.floor(limitGranules / 8)); // the engine's eviction batch
      const pw: number[] = [];
      const cw: number[] = [];
      for (let i = 0; i < reps; i++) {
        const pg = await pager(file, { granule, residentLimit: limitGranules * granule, prefetch: false });
        try {
          await pg.access({ op: 'write', unit: PAGE, seed: i + 1 });
          const s = pg.stats();
          if (s.writebackNs > 0) pw.push(s.writebackBytes / (s.writebackNs / 1e9) / 1e6);
        } finally {
          await pg.close();
        }
        const r = await runC(['pwrite', file, '--granule', String(granule), '--batch', String(batch)]);
        cw.push(r.bytes! / (r.ns! / 1e9) / 1e6);
      }
      const row: WritebackRow = { fs: fsName, granule, pager: summarize(pw), pwrite: summarize(cw), ratio: 0 };
      row.ratio = row.pager.median / row.pwrite.median;
      writeback.push(row);
      progress.step(`${writebackLabel(fsName, granule)}: ${row.ratio.toFixed(2)}x pwrite (${seconds(t0)})`);
    }
  } finally {
    progress.end();
    for (const f of files) {
      fs.rmSync(f.file, { force: true });
      releaseTempFile(f.file);
    }
  }
  return { cells: out, writeback };
}

const seconds = (t0: number) => `${((performance.now() - t0) / 1000).toFixed(1)} s`;

export function pagerTable(cells: PagerCell[]): Table {
  return {
    columns: ['fs', 'granule', 'threads', 'limit', 'workload', 'pager ns/page', 'C pager', 'mmap', 'pager/C (paired median)', 'interval', 'pager/mmap', `target <= ${PAGER_TARGET}x C`],
    rows: cells.map((c) => [
      c.fs,
      kib(c.granule),
      c.threads,
      c.limit,
      c.workload,
      c.pager.median.toFixed(0),
      c.c.median.toFixed(0),
      c.mmap.median.toFixed(0),
      c.paired.median.toFixed(2) + 'x',
      `${c.paired.low.toFixed(2)}-${c.paired.high.toFixed(2)} (${Math.round(c.paired.confidence * 100)} %)`,
      c.ratioMmap.toFixed(2) + 'x',
      c.paired.verdict,
    ]),
  };
}

export function writebackTable(rows: WritebackRow[]): Table {
  return {
    columns: ['fs', 'granule', 'pager write-back MB/s', 'pwrite MB/s', 'ratio', 'target >= 0.8x'],
    rows: rows.map((r) => [r.fs, kib(r.granule), r.pager.median.toFixed(0), r.pwrite.median.toFixed(0), r.ratio.toFixed(2) + 'x', r.ratio >= 0.8 ? 'pass' : 'FAIL']),
  };
}

/** Runs the suite and writes its JSON + HTML report; returns the files and a text summary. */
export async function runPagerSuite(o: PagerBenchOptions & { out: string; stamp: string; version: string }): Promise<{ files: string[]; summary: string }> {
  const env = benchEnv(false, o.version);
  const size = o.size ?? 8 << 20;
  const { cells, writeback } = await runPager(o);
  const table = pagerTable(cells);
  const verdicts = { meets: 0, misses: 0, undecided: 0 };
  for (const c of cells) verdicts[c.paired.verdict]++;
  const spin = o.spinUs ? `both pagers' service threads poll for up to ${o.spinUs} µs before sleeping` : "both pagers' service threads sleep at once (no polling)";
  const confidence = cells.length ? Math.round(cells[0]!.paired.confidence * 100) : 0;
  const wtable = writebackTable(writeback);
  // One chart per file system and resident limit (24 cells each): 96 bars side by side are unreadable.
  const svgs: string[] = [];
  for (const fsName of ['tmpfs', 'disk'] as const)
    for (const limit of ['unbounded', '25%'] as const) {
      const mine = cells.filter((c) => c.fs === fsName && c.limit === limit);
      if (mine.length === 0) continue;
      svgs.push(
        barChartSvg(
          `Pager / C pager on ${fsName}, resident limit ${limit} (median of paired ratios; 1 = same; target <= ${PAGER_TARGET}x)`,
          'ratio',
          mine.map((c) => ({
            label: `${kib(c.granule)} x${c.threads} ${c.workload}`,
            bars: [{ series: 'pager/C', value: c.paired.median }, { series: 'pager/mmap', value: c.ratioMmap }],
            target: 1.1,
          })),
        ),
      );
    }
  const written = writeReport(path.resolve(o.out), `pager-${o.stamp}`, env, { size, reps: o.reps ?? 3, workers: o.workers ?? 1, spinUs: o.spinUs ?? 0, cTracksDirty: o.cTracksDirty === true, pagerWriteback: o.writeback ?? 'pagecache', only: o.cells ?? null, verdicts, cells, writeback }, [
    {
      title: 'Pager: reads and writes of a file through pager(), a plain C pager and mmap',
      text: `A ${size >> 20} MiB file, one word per 4 KiB page, ${o.reps ?? 3} repetitions; ${spin}. Ratios are the median of the repetitions' paired ratios (pager and C alternate within a repetition), with a ${confidence} % order-statistic interval; a cell meets the target when the whole interval is within it, misses when the whole interval is over it, and is undecided otherwise (more repetitions narrow it). Verdicts: ${verdicts.meets} meet, ${verdicts.misses} miss, ${verdicts.undecided} undecided. The pager runs with prefetch off (the C pager has no read-ahead), ${o.workers ?? 1} service thread(s) and writeback '${o.writeback ?? 'pagecache'}' (${(o.writeback ?? 'pagecache') === 'pagecache' ? 'an evicted granule is clean once pwrite returned, as in the C pager' : 'an evicted granule is clean only once its write is confirmed on disk: the cost of the write-error guarantee, which the C pager does not pay'}); the C pager with as many fill threads, FIFO eviction in the pager's batches, ${o.cTracksDirty ? "dirty tracking the pager's way (write-protect; only dirty granules written back) and no race protection" : 'no dirty tracking (every evicted granule of a write workload is written) and no race protection'}. The disk file's page cache is dropped before every run. mmap has no resident limit: its figure is the same work with the kernel's paging.${o.cells ? ` Only the cells matching --cells '${o.cells}'.` : ''}`,
      svg: svgs,
      table,
    },
    {
      title: 'Write-back under eviction against pwrite',
      text: 'A sequential write of the whole file through a pager limited to 25 % of it: MB/s of its write-back (pwrite from the region and the sync_file_range waits, per eviction batch) against pwrite of the same bytes in the same batches with the same waits.',
      table: wtable,
    },
  ]);
  return { files: [written.json, written.html], summary: [`pager (kernel ${env.kernel}, ${env.cpu}, node ${env.node}): ${verdicts.meets} cells meet <= ${PAGER_TARGET}x C, ${verdicts.misses} miss, ${verdicts.undecided} undecided (${confidence} % intervals)`, textTable(table), textTable(wtable)].join('\n') };
}
