// Trace replay: a recorded trace's accesses run through a device mirror on device threads
// (native/engine/replay.cc), deterministic for a given trace, options and starting state.
import type { NativeMirror, NativeReplayResult } from './native.js';
import type { Mirror } from './device.js';
import { readTrace, Trace } from './trace.js';
import { checkInteger, rangeError, typeError } from './errors.js';
import { checkBoolean, checkOptions } from './validate.js';
import { checkServed } from './served.js';

/** Options of {@link Mirror.replay}. */
export interface ReplayOptions {
  /**
   * What is replayed onto this mirror: one trace range (its page i is the mirror's page i; the
   * others are skipped), or 'all': every range of the trace, each on pages of its own, one after
   * another in index order ({@link ReplayResult.layout}), so the device sees the whole program. A
   * range the program released keeps its pages: they are never accessed again and leave device
   * memory only as eviction takes them (the replay does not free them, as the program's munmap
   * would).
   * @default 'all'
   */
  range?: number | 'all';
  /**
   * Device threads (1..64). Recorded threads map to them by order of first fault: the n-th thread
   * seen goes to device thread n mod threads. Default: as many as the trace has threads (at most 64).
   */
  threads?: number;
  /** Accesses per step (each step's misses are one group in the fault buffer). Default the device's faultBatch. */
  window?: number;
  /** Replay each sample's written pages as writes, after the faults before it. @default true */
  samples?: boolean;
  /** Written words are seed + access index. @default 1 */
  seed?: number;
}

/** Pages migrated, by trigger ('device-fault', 'prefetch', 'eviction', 'cpu-fault', ...). */
export type MigrationCounts = Record<string, number>;

/** What a replay did on the device ({@link Mirror.replay}). */
export interface ReplayResult extends Omit<NativeReplayResult, 'toDevice' | 'toHost'> {
  /** Accesses taken from the trace: faults, and sampled writes when samples are replayed. */
  fromFaults: number;
  fromSamples: number;
  /** Device threads used. */
  threads: number;
  /** Where each replayed range lies on the mirror, in pages (one entry, at 0, for a single range). */
  layout: { range: number; firstPage: number; pages: number }[];
  toDevice: MigrationCounts;
  toHost: MigrationCounts;
  /** Pages evicted from device memory (toHost['eviction']). */
  evictions: number;
  /**
   * With a device link (`Device.create({ link })`, docs/link-model.md) only: modeled device time in
   * ns, `modeledFaultNs + modeledRemoteNs`. The fault rounds that served the replay's faults, each
   * once, with the migrations and evictions made in them; plus, per step, its slowest device
   * thread's accesses to host-resident pages (8 bytes each), steps one after another. `hostNs` is
   * the time the replay took on this machine. Deterministic for a trace, its options and the link.
   */
  modeledNs?: number;
  modeledFaultNs?: number;
  modeledRemoteNs?: number;
  /** With a link: replayed accesses that hit a page not in device memory, and their bytes. */
  remoteAccesses?: number;
  remoteBytes?: number;
}

/** A trace's accesses to one range, in replay order: page, op (bit 0 write, bits 1.. device thread). */
export interface TraceAccesses {
  pages: Float64Array;
  ops: Uint8Array;
  fromFaults: number;
  fromSamples: number;
  writes: boolean;
}

/** Where replay puts each range: one range at page 0, or 'all' of them one after another. */
export function replayLayout(trace: Trace, range: number | 'all'): { range: number; firstPage: number; pages: number }[] {
  const page = trace.header.pageSize;
  if (range !== 'all') {
    const info = trace.ranges[range];
    if (!info) throw rangeError('ERR_OUT_OF_RANGE', `range ${range} is not in the trace (it has ${trace.ranges.length})`);
    return [{ range, firstPage: 0, pages: info.length / page }];
  }
  let next = 0;
  return trace.ranges.map((r) => {
    const at = { range: r.index, firstPage: next, pages: r.length / page };
    next += at.pages;
    return at;
  });
}

/**
 * The accesses a trace makes to one of its ranges, or to all of them laid out as
 * {@link replayLayout} says: each fault (a write fault or a wp fault is a write), then at each
 * sample its written pages in page order, as writes. Recorded thread n (by first fault) is device
 * thread n mod threads; a sample's page p goes to thread p mod threads.
 */
export async function traceAccesses(trace: Trace, range: number | 'all', threads: number, samples: boolean): Promise<TraceAccesses> {
  // Each replayed range's first page on the mirror; -1: not replayed.
  const first = new Float64Array(trace.ranges.length).fill(-1);
  for (const l of replayLayout(trace, range)) first[l.range] = l.firstPage;
  let pages = new Float64Array(1024), ops = new Uint8Array(1024), n = 0, fromFaults = 0, fromSamples = 0, writes = false;
  const stream = new Map<number, number>(trace.summary.threads.map((tid, i) => [tid, i % threads]));
  const push = (page: number, op: number) => {
    if (n === pages.length) {
      const p = new Float64Array(n * 2), o = new Uint8Array(n * 2);
      p.set(pages);
      o.set(ops);
      pages = p;
      ops = o;
    }
    pages[n] = page;
    ops[n++] = op;
    if (op & 1) writes = true;
  };
  for await (const r of trace.records()) {
    if (r.type === 'fault' && first[r.range]! >= 0) {
      push(first[r.range]! + r.page, ((stream.get(r.tid) ?? 0) << 1) | (r.write || r.kind === 'wp' ? 1 : 0));
      fromFaults++;
    } else if (r.type === 'sample' && samples && first[r.range]! >= 0) {
      for (const run of r.runs)
        for (let p = run.first; p < run.first + run.count; p++) {
          push(first[r.range]! + p, ((p % threads) << 1) | 1);
          fromSamples++;
        }
    }
  }
  return { pages: pages.subarray(0, n), ops: ops.subarray(0, n), fromFaults, fromSamples, writes };
}

/** @internal Mirror.replay() (lib/device.ts). */
export async function replayOnMirror(mirror: Mirror, n: NativeMirror, trace: Trace | string, options: ReplayOptions = {}): Promise<ReplayResult> {
  if (!(trace instanceof Trace) && typeof trace !== 'string') throw typeError('ERR_INVALID_ARG_TYPE', 'trace must be a Trace (readTrace()) or a path');
  const o = checkOptions('options', options);
  const t = trace instanceof Trace ? trace : undefined;
  const range = o.range === 'all' || o.range === undefined ? 'all' : checkInteger('range', o.range, 0, 65534);
  const threadsOpt = o.threads === undefined ? undefined : checkInteger('threads', o.threads, 1, 64);
  const window = checkInteger('window', o.window ?? 0, 0, 1 << 20);
  const samples = checkBoolean('samples', o.samples, true);
  const seed = checkInteger('seed', o.seed ?? 1);
  const tr = t ?? (await readTrace(trace as string));
  const layout = replayLayout(tr, range);
  const pages = layout.reduce((n, l) => n + l.pages, 0);
  const mirrorPages = (mirror.length / tr.header.pageSize) | 0;
  if (pages > mirrorPages)
    throw rangeError(
      'ERR_OUT_OF_RANGE',
      `${range === 'all' ? `the trace's ${layout.length} ranges have` : `the trace's range ${range} has`} ${pages} pages of ${tr.header.pageSize} bytes; the mirror covers only ${mirrorPages}: mirror a larger range${range === 'all' ? ' (or replay one range: option range)' : ''}`,
    );
  if (tr.header.pageSize !== mirror.length / mirror.npages)
    throw rangeError('ERR_OUT_OF_RANGE', `the trace counts pages of ${tr.header.pageSize} bytes, this machine's are ${mirror.length / mirror.npages}`);
  const threads = threadsOpt ?? Math.min(64, Math.max(1, tr.summary.threads.length));
  const acc = await traceAccesses(tr, range, threads, samples);
  checkServed(mirror.mapping, mirror.offset, mirror.length, acc.writes, 'Mirror.replay()');
  const r = await n.replay(acc.pages, acc.ops, { threads, window, seed });
  return { ...r, fromFaults: acc.fromFaults, fromSamples: acc.fromSamples, threads, layout, evictions: r.toHost['eviction'] ?? 0 };
}
