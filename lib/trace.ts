// Access traces: the versioned binary format (docs/trace-format.md), its reader and writer, and
// the recorder that captures a served Userfaultfd's faults natively (native/engine/
// trace_recorder.cc) with periodic written-page samples from PAGEMAP_SCAN.
import { constants } from 'node:fs';
import { open, writeFile, type FileHandle } from 'node:fs/promises';
import { availableParallelism, hostname } from 'node:os';
import { native, type NativeRecorderStats, type NativeTraceRecorder } from './native.js';
import { Mapping } from './mapping.js';
import { Userfaultfd, nativeUffd } from './uffd.js';
import { checkAligned, checkInteger, checkOneOf, rangeError, stateError, typeError } from './errors.js';
import { checkBoolean, checkOptions, checkString, checkU64 } from './validate.js';
import { REGISTER_MODES, type RegisterMode } from './constants.js';

const PAGE = native.uname().pageSize;
let nativeRecorder: (r: TraceRecorder) => NativeTraceRecorder;
/** @internal The native recorder behind a TraceRecorder (the fault server hands it to a client). */
export const recorderNative = (r: TraceRecorder): NativeTraceRecorder => nativeRecorder(r);

/** The format's name in every header. */
export const TRACE_FORMAT = 'pagemirror-trace';
/**
 * The newest format version this library reads and the one it writes. Version 2 added the range
 * records (a range that appears or goes while recording), version 3 the write-protect-round sample
 * method ('wp-rounds'); version 1 and 2 files still read.
 */
export const TRACE_VERSION = 3;

const MAGIC = Buffer.from('PMTRACE\0', 'latin1');
const RECORD = 24;
const RUN = 16;
const MAX_HEADER = 1 << 20;
const MAX_SAMPLE_BYTES = 256 << 20;
const KINDS = ['missing', 'wp', 'minor'] as const;
const T_FAULT = 1, T_SAMPLE = 2, T_DROPPED = 3, T_END = 4, T_RANGE_ADDED = 5, T_RANGE_REMOVED = 6;
// A range-added record's flags: bits 0-2 the modes (UFFDIO_REGISTER_MODE_* bits), bit 3 shared.
const RANGE_MODES = [['missing', 1], ['wp', 2], ['minor', 4]] as const;
const RANGE_SHARED = 8;

/**
 * How the access samples of a trace were taken: 'pagemap-scan-written', PAGEMAP_SCAN's written
 * bits every interval (uffd-wp async; atomic); 'wp-rounds', write-protect rounds made by the
 * recorder's owner (sync uffd-wp: the pages whose write faults were recorded between two rounds;
 * a write between a round's start and its page's protection is in neither interval); 'none'.
 */
export type SampleMethod = 'pagemap-scan-written' | 'wp-rounds' | 'none';
const SAMPLE_METHODS = ['pagemap-scan-written', 'wp-rounds'] as const;

/** One recorded range: trace records name it by its index. */
export interface TraceRange {
  index: number;
  /** Bytes (a multiple of the header's pageSize). */
  length: number;
  /** The start address as recorded, hexadecimal ('0x7f...'); replay does not use it. */
  start?: string;
  /** What the memory was: 'anonymous', 'memfd', 'file', or 'address' (given as a bare address). */
  kind?: string;
  shared?: boolean;
  hugetlb?: boolean;
  /** The userfaultfd modes it was registered with, when known. */
  modes?: string[];
  /** A range that appeared while recording (a range-added record, version 2): when, in ns. Absent for the header's ranges, there from the start. */
  addedNs?: number;
  /** A range released while recording (a range-removed record): when, in ns. Its index is never used again. */
  removedNs?: number;
}

/** The first part of a trace file: what was recorded, how, and where. */
export interface TraceHeader {
  format: typeof TRACE_FORMAT;
  version: number;
  /** Page indices count pages of this size. */
  pageSize: number;
  /** Record times: nanoseconds of CLOCK_MONOTONIC since the recording started. */
  clock: 'monotonic-ns-since-start';
  /** Wall-clock time the recording started (ISO 8601). */
  startedAt: string;
  /** The ranges recorded from the start (the file's range records add later ones: {@link Trace.ranges}). */
  ranges: TraceRange[];
  /** The recorder's options. */
  recorder: { sampleIntervalMs: number; ringCapacity: number; rings: number; threadIds: boolean };
  /** How access samples were taken ('none': why not, in reason). */
  sampling: { method: SampleMethod; reason?: string };
  host: { kernel: string; machine: string; node: string; cpus: number; hostname: string };
}

/** A fault as the fault service read it (before any rule resolved it). */
export interface TraceFault {
  type: 'fault';
  kind: 'missing' | 'wp' | 'minor';
  write: boolean;
  range: number;
  /** Page index within the range. */
  page: number;
  tNs: number;
  /** The faulting thread (UFFD_FEATURE_THREAD_ID), 0 when the kernel did not say. */
  tid: number;
}
/** The pages written during [startNs, endNs), as runs of page indices within the range. */
export interface TraceSample {
  type: 'sample';
  method: Exclude<SampleMethod, 'none'>;
  range: number;
  startNs: number;
  endNs: number;
  runs: { first: number; count: number }[];
}
/** Faults the recorder lost here (its rings were full). */
export interface TraceDropped {
  type: 'dropped';
  count: number;
  tNs: number;
}
/** The last record: the recording ended cleanly. */
export interface TraceEnd {
  type: 'end';
  faults: number;
  tNs: number;
}
/**
 * A range registered while recording (format version 2): recorded from tNs on under index
 * `range`, the next index unused so far (indices are never reused: a range released and
 * registered again at the same addresses is a new index).
 */
export interface TraceRangeAdded {
  type: 'range-added';
  range: number;
  /** Start address, hexadecimal ('0x7f...'); replay does not use it. */
  start: string;
  /** Bytes (a multiple of the header's pageSize). */
  length: number;
  /** The userfaultfd modes it was registered with (none when not known). */
  modes: ('missing' | 'wp' | 'minor')[];
  shared: boolean;
  tNs: number;
}
/** A range released while recording (unregistered): no record names its index after this one. */
export interface TraceRangeRemoved {
  type: 'range-removed';
  range: number;
  tNs: number;
}
/** One record of a trace. */
export type TraceRecord = TraceFault | TraceSample | TraceDropped | TraceEnd | TraceRangeAdded | TraceRangeRemoved;

/** What a pass over a trace found. */
export interface TraceSummary {
  faults: number;
  /** Faults by kind and by access. */
  byKind: { missing: number; wp: number; minor: number };
  writes: number;
  samples: number;
  dropped: number;
  /** Distinct thread ids, in order of first fault. */
  threads: number[];
  /** Time of the last record. */
  durationNs: number;
  bytes: number;
}

function corrupt(path: string, offset: number, what: string): Error {
  return Object.assign(stateError('ERR_PAGEMIRROR_TRACE_CORRUPT', `${path}: not a valid trace at byte ${offset}: ${what}`), { path, offset });
}

function u64(view: DataView, at: number): number | undefined {
  const lo = view.getUint32(at, true), hi = view.getUint32(at + 4, true);
  return hi < 0x200000 ? hi * 0x100000000 + lo : undefined;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function checkHeader(path: string, h: unknown, fileVersion: number): TraceHeader {
  const bad = (what: string) => corrupt(path, 16, `header: ${what}`);
  if (!isObject(h)) throw bad('not a JSON object');
  if (h.format !== TRACE_FORMAT) throw bad(`format is ${JSON.stringify(h.format)}, not '${TRACE_FORMAT}'`);
  if (h.version !== fileVersion) throw bad(`version ${String(h.version)} differs from the file's ${fileVersion}`);
  const ps = h.pageSize;
  if (typeof ps !== 'number' || !Number.isSafeInteger(ps) || ps < 512 || ps > 1 << 30 || (ps & (ps - 1)) !== 0) throw bad('pageSize must be a power of two');
  const ranges = h.ranges;
  if (!Array.isArray(ranges) || ranges.length === 0 || ranges.length > 65535) throw bad('ranges must be a non-empty array (at most 65535)');
  ranges.forEach((r: unknown, i) => {
    if (!isObject(r) || r.index !== i) throw bad(`ranges[${i}] must be an object with index ${i}`);
    const len = r.length;
    if (typeof len !== 'number' || !Number.isSafeInteger(len) || len <= 0 || len % ps !== 0) throw bad(`ranges[${i}].length must be a positive multiple of pageSize`);
  });
  if (!isObject(h.sampling) || !['pagemap-scan-written', 'wp-rounds', 'none'].includes(h.sampling.method as string) || (h.sampling.method === 'wp-rounds' && fileVersion < 3))
    throw bad('sampling.method is unknown');
  return h as unknown as TraceHeader;
}

// Opens without blocking (a FIFO would wait for a writer forever) and only a regular file.
async function openTrace(path: string): Promise<{ fh: FileHandle; size: number }> {
  const fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  const st = await fh.stat();
  if (!st.isFile()) {
    await fh.close();
    throw corrupt(path, 0, 'not a regular file');
  }
  return { fh, size: st.size };
}

/**
 * A trace file, opened and checked whole by {@link readTrace}: its header, a summary, and its
 * records again on demand (read in chunks, never the whole file at once).
 */
export class Trace {
  /** The file. */
  readonly path: string;
  readonly header: TraceHeader;
  readonly summary: TraceSummary;
  /**
   * Every range the trace names, by index: the header's, then those its range records added, each
   * with `addedNs` and, if it was released, `removedNs`.
   */
  readonly ranges: readonly TraceRange[];
  readonly #dataStart: number;

  /** @internal use readTrace() */
  constructor(path: string, header: TraceHeader, dataStart: number, summary: TraceSummary, ranges: TraceRange[]) {
    this.path = path;
    this.header = header;
    this.#dataStart = dataStart;
    this.summary = summary;
    this.ranges = ranges;
  }

  /** The records in file order (the recorder writes them in time order). */
  records(): AsyncGenerator<TraceRecord> {
    return readRecords(this.path, this.header, this.#dataStart, undefined);
  }

  /** The JSON-lines form: the header, then one record per line. */
  async *jsonLines(): AsyncGenerator<string> {
    yield JSON.stringify(this.header);
    for await (const r of this.records()) yield JSON.stringify(r);
  }

  /** Writes the JSON-lines form to a file; returns the lines written. */
  async exportJsonLines(path: string): Promise<number> {
    checkString('path', path);
    const out = await open(path, 'w');
    let lines = 0, chunk: string[] = [];
    try {
      for await (const line of this.jsonLines()) {
        chunk.push(line);
        lines++;
        if (chunk.length >= 4096) {
          await out.write(chunk.join('\n') + '\n');
          chunk = [];
        }
      }
      if (chunk.length) await out.write(chunk.join('\n') + '\n');
    } finally {
      await out.close();
    }
    return lines;
  }
}

/**
 * Opens a trace file and checks it whole (header, every record, the end record), so a trace that
 * reads here replays. Errors: `ERR_PAGEMIRROR_TRACE_VERSION` (a newer format than this library
 * reads: upgrade), `ERR_PAGEMIRROR_TRACE_CORRUPT` (not a trace, truncated, a record that does not
 * fit its header; `offset` names the byte), SystemError from open/read (ENOENT...), TypeError
 * `ERR_INVALID_ARG_TYPE` for a path that is not a string.
 * @example
 * ```ts
 * import { readTrace } from 'pagemirror';
 * const trace = await readTrace('run.pmtrace');
 * console.log(trace.summary.faults, trace.header.sampling.method);
 * for await (const r of trace.records()) if (r.type === 'fault' && r.write) console.log(r.page);
 * ```
 */
export async function readTrace(path: string): Promise<Trace> {
  checkString('path', path);
  const { fh, size } = await openTrace(path);
  let header: TraceHeader, dataStart: number;
  try {
    const head = Buffer.alloc(16);
    const { bytesRead } = await fh.read(head, 0, 16, 0);
    if (bytesRead < 16 || !head.subarray(0, 8).equals(MAGIC)) throw corrupt(path, 0, 'no pagemirror trace magic (PMTRACE)');
    const version = head.readUInt32LE(8), len = head.readUInt32LE(12);
    if (version > TRACE_VERSION)
      throw Object.assign(stateError('ERR_PAGEMIRROR_TRACE_VERSION', `${path}: trace format version ${version} is newer than this library reads (${TRACE_VERSION}); upgrade pagemirror`), { path, version });
    if (version === 0) throw corrupt(path, 8, 'version 0');
    if (len > MAX_HEADER || len % 8 !== 0 || 16 + len > size) throw corrupt(path, 12, `header length ${len} does not fit the file`);
    const json = Buffer.alloc(len);
    await fh.read(json, 0, len, 16);
    let parsed: unknown;
    try {
      parsed = JSON.parse(json.toString('utf8'));
    } catch (err) {
      throw corrupt(path, 16, `header is not JSON (${(err as Error).message})`);
    }
    header = checkHeader(path, parsed, version);
    dataStart = 16 + len;
  } finally {
    await fh.close();
  }
  const summary: TraceSummary = { faults: 0, byKind: { missing: 0, wp: 0, minor: 0 }, writes: 0, samples: 0, dropped: 0, threads: [], durationNs: 0, bytes: 0 };
  const seen = new Set<number>();
  const ranges: TraceRange[] = header.ranges.map((r) => ({ ...r }));
  for await (const r of readRecords(path, header, dataStart, summary)) {
    if (r.type === 'range-added') {
      ranges.push({ index: r.range, length: r.length, start: r.start, kind: 'address', shared: r.shared, modes: r.modes, addedNs: r.tNs });
    } else if (r.type === 'range-removed') {
      ranges[r.range]!.removedNs = r.tNs;
    } else if (r.type === 'fault') {
      summary.faults++;
      summary.byKind[r.kind]++;
      if (r.write) summary.writes++;
      if (!seen.has(r.tid)) {
        seen.add(r.tid);
        summary.threads.push(r.tid);
      }
      summary.durationNs = Math.max(summary.durationNs, r.tNs);
    } else if (r.type === 'sample') {
      summary.samples++;
      summary.durationNs = Math.max(summary.durationNs, r.endNs);
    } else if (r.type === 'dropped') {
      summary.dropped += r.count;
    } else {
      summary.durationNs = Math.max(summary.durationNs, r.tNs);
    }
  }
  return new Trace(path, header, dataStart, summary, ranges);
}

// The records after the header, checked as they are read. With `summary`, also the file's size
// and that the end record is last and agrees with the faults counted.
async function* readRecords(path: string, header: TraceHeader, dataStart: number, summary: TraceSummary | undefined): AsyncGenerator<TraceRecord> {
  const { fh, size } = await openTrace(path);
  try {
    if (summary) summary.bytes = size;
    // Pages of each range by index, and the ranges released (no record may name them again).
    const rangePages = header.ranges.map((r) => r.length / header.pageSize);
    const gone = new Set<number>();
    const released = (range: number) => gone.has(range);
    let buf = Buffer.alloc(1 << 20);
    let have = 0, at = dataStart; // bytes in buf; buf[0] is file offset `at`
    let pos = dataStart;
    let ended = false, faults = 0;
    const fill = async (need: number): Promise<boolean> => {
      // Ensures buf holds `need` bytes from pos.
      const off = pos - at;
      if (have - off >= need) return true;
      if (off >= have) {
        have = 0;
      } else if (off > 0) {
        buf.copy(buf, 0, off, have);
        have -= off;
      }
      at = pos;
      if (need > buf.length) {
        const bigger = Buffer.alloc(need);
        buf.copy(bigger, 0, 0, have);
        buf = bigger;
      }
      while (have < need) {
        const { bytesRead } = await fh.read(buf, have, buf.length - have, at + have);
        if (bytesRead === 0) return false;
        have += bytesRead;
      }
      return true;
    };
    while (pos < size) {
      if (ended) throw corrupt(path, pos, 'data after the end record');
      if (!(await fill(RECORD))) throw corrupt(path, pos, `truncated: ${size - pos} bytes where a ${RECORD}-byte record starts`);
      const view = new DataView(buf.buffer, buf.byteOffset + (pos - at), RECORD);
      const type = view.getUint8(0), flags = view.getUint8(1), range = view.getUint16(2, true), c = view.getUint32(4, true);
      // A range's start is an address: any 64-bit value, kept exact.
      const address = type === T_RANGE_ADDED ? view.getBigUint64(8, true) : 0n;
      const a = type === T_RANGE_ADDED ? 0 : u64(view, 8), b = u64(view, 16);
      if (a === undefined || b === undefined) throw corrupt(path, pos, 'a 64-bit field beyond 2^53');
      const recordAt = pos;
      pos += RECORD;
      if (type === T_FAULT) {
        const kind = KINDS[flags >> 1];
        if (kind === undefined || flags > 5) throw corrupt(path, recordAt, `fault flags ${flags}`);
        if (range >= rangePages.length) throw corrupt(path, recordAt, `range ${range} not in the header`);
        if (released(range)) throw corrupt(path, recordAt, `a fault in range ${range} after it was released`);
        if (a >= rangePages[range]!) throw corrupt(path, recordAt, `page ${a} beyond range ${range}'s ${rangePages[range]} pages`);
        faults++;
        yield { type: 'fault', kind, write: (flags & 1) === 1, range, page: a, tNs: b, tid: c };
      } else if (type === T_SAMPLE) {
        // Method 1 PAGEMAP_SCAN, 2 write-protect rounds (version 3).
        const method = SAMPLE_METHODS[flags - 1];
        if (method === undefined || (flags === 2 && header.version < 3)) throw corrupt(path, recordAt, `sample method ${flags}`);
        if (range >= rangePages.length) throw corrupt(path, recordAt, `range ${range} not in the header`);
        if (released(range)) throw corrupt(path, recordAt, `a sample of range ${range} after it was released`);
        const bytes = c * RUN;
        if (bytes > MAX_SAMPLE_BYTES || bytes > size - pos) throw corrupt(path, recordAt, `a sample of ${c} runs does not fit the file`);
        if (bytes && !(await fill(bytes))) throw corrupt(path, pos, 'truncated sample');
        const rv = new DataView(buf.buffer, buf.byteOffset + (pos - at), bytes);
        const runs: { first: number; count: number }[] = [];
        for (let k = 0, end = 0; k < c; k++) {
          const first = u64(rv, k * RUN), count = u64(rv, k * RUN + 8);
          if (first === undefined || count === undefined || count === 0 || first + count > rangePages[range]!)
            throw corrupt(path, pos + k * RUN, `sample run ${k} outside range ${range}`);
          if (first < end) throw corrupt(path, pos + k * RUN, `sample run ${k} overlaps or precedes the one before`);
          end = first + count;
          runs.push({ first, count });
        }
        pos += bytes;
        if (b < a) throw corrupt(path, recordAt, 'a sample that ends before it starts');
        yield { type: 'sample', method, range, startNs: a, endNs: b, runs };
      } else if (type === T_DROPPED) {
        yield { type: 'dropped', count: a, tNs: b };
      } else if (type === T_RANGE_ADDED && header.version >= 2) {
        if (range !== rangePages.length) throw corrupt(path, recordAt, `range ${range} added where range ${rangePages.length} is next (indices are never reused)`);
        if (flags & ~(RANGE_SHARED | 7)) throw corrupt(path, recordAt, `range flags ${flags}`);
        if (c === 0) throw corrupt(path, recordAt, 'a range of 0 pages');
        if (address % BigInt(header.pageSize) !== 0n) throw corrupt(path, recordAt, 'a range start that is not page aligned');
        rangePages.push(c);
        const modes = RANGE_MODES.filter(([, bit]) => (flags & bit) !== 0).map(([name]) => name);
        yield { type: 'range-added', range, start: '0x' + address.toString(16), length: c * header.pageSize, modes, shared: (flags & RANGE_SHARED) !== 0, tNs: b };
      } else if (type === T_RANGE_REMOVED && header.version >= 2) {
        if (flags !== 0 || c !== 0 || a !== 0) throw corrupt(path, recordAt, 'a range-removed record with fields set');
        if (range >= rangePages.length) throw corrupt(path, recordAt, `range ${range} removed but never recorded`);
        if (released(range)) throw corrupt(path, recordAt, `range ${range} removed twice`);
        gone.add(range);
        yield { type: 'range-removed', range, tNs: b };
      } else if (type === T_END) {
        if (a !== faults) throw corrupt(path, recordAt, `the end record counts ${a} faults, the file holds ${faults}`);
        ended = true;
        yield { type: 'end', faults: a, tNs: b };
      } else {
        throw corrupt(path, recordAt, `unknown record type ${type}`);
      }
    }
    if (!ended) throw corrupt(path, pos, 'truncated: no end record (the recording did not finish)');
  } finally {
    await fh.close();
  }
}

/**
 * Writes a trace file from a header and records (synthetic traces, conversions from other tools;
 * the recorder writes its own natively). Missing header fields get defaults; each record is
 * checked against the ranges (a sample's runs ascending and disjoint), and the end record is added. Errors: TypeError/RangeError with
 * ERR_INVALID_ARG_* / ERR_OUT_OF_RANGE before anything is written; SystemError from the write.
 */
export async function writeTrace(path: string, header: Pick<TraceHeader, 'ranges'> & Partial<TraceHeader>, records: Iterable<TraceRecord>): Promise<{ bytes: number; faults: number }> {
  checkString('path', path);
  header = checkOptions('header', header);
  const pageSize = checkInteger('pageSize', header.pageSize ?? PAGE, 512, 1 << 30);
  if ((pageSize & (pageSize - 1)) !== 0) throw rangeError('ERR_OUT_OF_RANGE', 'pageSize must be a power of two');
  if (!Array.isArray(header.ranges) || header.ranges.length === 0 || header.ranges.length > 65535)
    throw typeError('ERR_INVALID_ARG_TYPE', 'header.ranges must be a non-empty array of { length } (at most 65535)');
  const ranges: TraceRange[] = header.ranges.map((r, i) => {
    checkOptions(`ranges[${i}]`, r);
    return { ...r, index: i, length: checkAligned(`ranges[${i}].length`, checkInteger(`ranges[${i}].length`, r.length, pageSize), pageSize) };
  });
  const full: TraceHeader = {
    ...hostHeader(),
    ...header,
    format: TRACE_FORMAT,
    version: TRACE_VERSION,
    pageSize,
    clock: 'monotonic-ns-since-start',
    ranges,
    sampling: header.sampling ?? { method: 'none', reason: 'written by writeTrace()' },
    recorder: header.recorder ?? { sampleIntervalMs: 0, ringCapacity: 0, rings: 0, threadIds: false },
  };
  if (records === null || typeof (records as Iterable<TraceRecord>)?.[Symbol.iterator] !== 'function') throw typeError('ERR_INVALID_ARG_TYPE', 'records must be iterable');
  const parts: Buffer[] = [encodeHeader(full)];
  let faults = 0, lastT = 0;
  // Pages of every range by index (the header's, then each range-added record's), and those released.
  const pagesByIndex = ranges.map((r) => r.length / pageSize);
  const gone = new Set<number>();
  const pagesOf = (range: unknown, what: string): number => {
    const i = checkInteger(`${what}.range`, range, 0, pagesByIndex.length - 1);
    if (gone.has(i)) throw rangeError('ERR_OUT_OF_RANGE', `${what}.range ${i} was released by an earlier range-removed record`);
    return pagesByIndex[i]!;
  };
  for (const r of records) {
    checkOptions('record', r);
    const rec = Buffer.alloc(RECORD);
    if (r.type === 'fault') {
      const kind = KINDS.indexOf(r.kind);
      if (kind < 0) throw typeError('ERR_INVALID_ARG_VALUE', `fault kind must be one of ${KINDS.join(', ')}`);
      const page = checkInteger('fault.page', r.page, 0, pagesOf(r.range, 'fault') - 1);
      rec.writeUInt8(T_FAULT, 0);
      rec.writeUInt8((kind << 1) | (r.write === true ? 1 : 0), 1);
      rec.writeUInt16LE(r.range, 2);
      rec.writeUInt32LE(checkInteger('fault.tid', r.tid ?? 0, 0, 0xffffffff), 4);
      rec.writeBigUInt64LE(BigInt(page), 8);
      rec.writeBigUInt64LE(BigInt((lastT = checkInteger('fault.tNs', r.tNs))), 16);
      faults++;
      parts.push(rec);
    } else if (r.type === 'sample') {
      const pages = pagesOf(r.range, 'sample');
      if (!Array.isArray(r.runs)) throw typeError('ERR_INVALID_ARG_TYPE', 'sample.runs must be an array');
      const body = Buffer.alloc(r.runs.length * RUN);
      let end = 0;
      r.runs.forEach((run, k) => {
        const first = checkInteger('run.first', run?.first, end, pages - 1);
        const count = checkInteger('run.count', run?.count, 1, pages - first);
        end = first + count;
        body.writeBigUInt64LE(BigInt(first), k * RUN);
        body.writeBigUInt64LE(BigInt(count), k * RUN + 8);
      });
      const start = checkInteger('sample.startNs', r.startNs);
      lastT = checkInteger('sample.endNs', r.endNs, start);
      const method = SAMPLE_METHODS.indexOf(r.method ?? 'pagemap-scan-written');
      if (method < 0) throw typeError('ERR_INVALID_ARG_VALUE', `sample.method must be one of ${SAMPLE_METHODS.join(', ')}`);
      rec.writeUInt8(T_SAMPLE, 0);
      rec.writeUInt8(method + 1, 1);
      rec.writeUInt16LE(r.range, 2);
      rec.writeUInt32LE(r.runs.length, 4);
      rec.writeBigUInt64LE(BigInt(start), 8);
      rec.writeBigUInt64LE(BigInt(lastT), 16);
      parts.push(rec, body);
    } else if (r.type === 'range-added') {
      if (r.range !== pagesByIndex.length) throw rangeError('ERR_OUT_OF_RANGE', `range-added.range must be ${pagesByIndex.length}, the next index (indices are never reused)`);
      if (pagesByIndex.length >= 65535) throw rangeError('ERR_OUT_OF_RANGE', 'a trace names at most 65535 ranges');
      const start = checkString('range-added.start', r.start);
      if (!/^0x[0-9a-f]{1,16}$/i.test(start)) throw typeError('ERR_INVALID_ARG_VALUE', `range-added.start must be a hexadecimal address ('0x...'), got '${start}'`);
      const address = BigInt(start);
      if (address % BigInt(pageSize) !== 0n) throw rangeError('ERR_PAGEMIRROR_UNALIGNED', 'range-added.start is not page aligned');
      const length = checkAligned('range-added.length', checkInteger('range-added.length', r.length, pageSize, 0xffffffff * pageSize), pageSize);
      if (!Array.isArray(r.modes ?? [])) throw typeError('ERR_INVALID_ARG_TYPE', 'range-added.modes must be an array');
      let flags = r.shared === true ? RANGE_SHARED : 0;
      for (const m of r.modes ?? []) {
        const bit = RANGE_MODES.find(([name]) => name === m);
        if (!bit) throw typeError('ERR_INVALID_ARG_VALUE', `range-added.modes: '${String(m)}' is not one of missing, wp, minor`);
        flags |= bit[1];
      }
      rec.writeUInt8(T_RANGE_ADDED, 0);
      rec.writeUInt8(flags, 1);
      rec.writeUInt16LE(r.range, 2);
      rec.writeUInt32LE(length / pageSize, 4);
      rec.writeBigUInt64LE(address, 8);
      rec.writeBigUInt64LE(BigInt((lastT = checkInteger('range-added.tNs', r.tNs))), 16);
      pagesByIndex.push(length / pageSize);
      parts.push(rec);
    } else if (r.type === 'range-removed') {
      pagesOf(r.range, 'range-removed');
      gone.add(r.range);
      rec.writeUInt8(T_RANGE_REMOVED, 0);
      rec.writeUInt16LE(r.range, 2);
      rec.writeBigUInt64LE(BigInt((lastT = checkInteger('range-removed.tNs', r.tNs))), 16);
      parts.push(rec);
    } else if (r.type === 'dropped') {
      rec.writeUInt8(T_DROPPED, 0);
      rec.writeBigUInt64LE(BigInt(checkInteger('dropped.count', r.count)), 8);
      rec.writeBigUInt64LE(BigInt((lastT = checkInteger('dropped.tNs', r.tNs))), 16);
      parts.push(rec);
    } else if ((r as { type?: unknown }).type !== 'end') {
      throw typeError('ERR_INVALID_ARG_VALUE', `record type must be 'fault', 'sample', 'dropped', 'range-added', 'range-removed' or 'end', got ${String((r as { type?: unknown }).type)}`);
    }
  }
  const end = Buffer.alloc(RECORD);
  end.writeUInt8(T_END, 0);
  end.writeBigUInt64LE(BigInt(faults), 8);
  end.writeBigUInt64LE(BigInt(lastT), 16);
  parts.push(end);
  const data = Buffer.concat(parts);
  await writeFile(path, data);
  return { bytes: data.length, faults };
}

function encodeHeader(h: TraceHeader): Buffer {
  let json = JSON.stringify(h);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const head = Buffer.alloc(16);
  MAGIC.copy(head, 0);
  head.writeUInt32LE(TRACE_VERSION, 8);
  head.writeUInt32LE(Buffer.byteLength(json), 12);
  return Buffer.concat([head, Buffer.from(json, 'utf8')]);
}

function hostHeader(): Pick<TraceHeader, 'startedAt' | 'host'> {
  const u = native.uname();
  return {
    startedAt: new Date().toISOString(),
    host: { kernel: u.release, machine: u.machine, node: process.version, cpus: availableParallelism(), hostname: hostname() },
  };
}

/**
 * A range to record: part of a Mapping, or (memory of another process, served here) an address,
 * with the modes it was registered with and whether it is shared memory when known (they go into
 * the trace as they are given).
 */
export type RecordRange = { mapping: Mapping; offset?: number; length?: number } | { address: bigint; length: number; modes?: RegisterMode[]; shared?: boolean };

/** Options of {@link recordTrace}. */
export interface RecordTraceOptions {
  /** The trace file to write (created or truncated): a regular file, or a character device such as /dev/null (a FIFO is refused, EINVAL or ENXIO). */
  path: string;
  /** The ranges to record (faults elsewhere on the descriptor are counted as ignored). */
  ranges?: RecordRange[];
  /** Shorthand for `ranges: [{ mapping }]`: the whole mapping. One of ranges and mapping. */
  mapping?: Mapping;
  /**
   * Interval between access samples in ms (0: none). With 'pagemap-scan-written' the recorder
   * samples every interval, which needs the ranges registered for write-protect on a userfaultfd
   * with 'wpAsync' (otherwise the header says why there are none); with 'wp-rounds' it is the
   * interval of the caller's rounds, as the header states it.
   * @default 100
   */
  sampleIntervalMs?: number;
  /**
   * How written pages are sampled ({@link SampleMethod}). 'wp-rounds' is for a userfaultfd whose
   * write-protect faults are synchronous (no 'wpAsync'), as `pagemirror run` serves a program:
   * the caller write-protects the recorded pages every interval and calls
   * {@link TraceRecorder.writeRound} just before each round; each range then gets a sample of the
   * pages whose write faults were recorded since the round before. It needs every range
   * registered with mode 'wp' (otherwise the header says why there are none), and rules or a
   * handler that resolve the WP faults.
   * @default 'pagemap-scan-written'
   */
  sampleMethod?: Exclude<SampleMethod, 'none'>;
  /** Faults each worker's ring holds between drains (the writer drains every 20 ms, or when half full); past it faults are dropped and counted. @default 65536 */
  ringCapacity?: number;
  /** The process whose memory the ranges are (its /proc/PID/pagemap is scanned for samples). Default this process. */
  pid?: number;
}

/** What a recording cost and wrote ({@link TraceRecorder.stop}). */
export interface RecordingSummary extends NativeRecorderStats {
  path: string;
  /** Wall time recorded. */
  durationNs: number;
  /** tapNs / tapped: the time each fault's worker spent recording it (the latency recording adds). */
  tapNsPerFault: number;
  sampling: TraceHeader['sampling'];
}

/**
 * A recording in progress: made by {@link recordTrace}, ended by {@link TraceRecorder.stop}.
 */
export class TraceRecorder {
  /** The trace file. */
  readonly path: string;
  /** The header written. */
  readonly header: TraceHeader;
  readonly #n: NativeTraceRecorder;
  readonly #uffd: Userfaultfd;
  readonly #t0 = process.hrtime.bigint();
  #summary: RecordingSummary | undefined;

  /** @internal use recordTrace() */
  constructor(n: NativeTraceRecorder, uffd: Userfaultfd, path: string, header: TraceHeader) {
    this.#n = n;
    this.#uffd = uffd;
    this.path = path;
    this.header = header;
  }

  static {
    nativeRecorder = (r) => r.#n;
  }

  /**
   * Records one more range from now on (memory registered after recording started): it gets the
   * next index, never one used before, and the trace says when it appeared (a range-added
   * record). Returns the index. Errors: as {@link recordTrace}'s ranges (before any system call);
   * ERR_PAGEMIRROR_CLOSED (stopped); SystemError EEXIST (it overlaps a range recorded now),
   * ENOSPC (a trace names at most 65535 ranges).
   */
  addRange(range: RecordRange): number {
    const [r] = checkRanges(this.#uffd, [range]);
    if (this.#summary) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the recorder is stopped');
    const modes = (r!.info.modes ?? []).reduce((m, k) => m | (REGISTER_MODES[k as RegisterMode] ?? 0), 0);
    return this.#n.addRange({ start: r!.start, length: r!.length, modes, shared: r!.info.shared === true });
  }

  /**
   * Stops recording a range (its memory was released): its faults are ignored from now on, the
   * trace says when (a range-removed record), and its index is never used again, so the same
   * addresses may come back with {@link addRange} as a new range. Errors: ERR_OUT_OF_RANGE (no
   * range with this index is recorded now), ERR_PAGEMIRROR_CLOSED (stopped).
   */
  removeRange(index: number): void {
    checkInteger('index', index, 0, 65534);
    if (this.#summary) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the recorder is stopped');
    this.#n.removeRange(index);
  }

  /**
   * Marks a write-protect round (a recorder with sampleMethod 'wp-rounds'): call it just before
   * write-protecting the recorded pages again. Each range recorded now gets a sample record of
   * the pages whose write faults were recorded since the round before (or the start); stop()
   * takes a last one. Errors: ERR_INVALID_STATE (the recorder samples otherwise, or not at all),
   * ERR_PAGEMIRROR_CLOSED (stopped).
   */
  writeRound(): void {
    if (this.#summary) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the recorder is stopped');
    if (this.header.sampling.method !== 'wp-rounds')
      throw stateError('ERR_INVALID_STATE', `this recorder samples no write rounds (sampling: ${this.header.sampling.method}${this.header.sampling.reason ? `, ${this.header.sampling.reason}` : ''})`);
    this.#n.writeRound();
  }

  /** Whether stop() was called. */
  get stopped(): boolean {
    return this.#summary !== undefined;
  }

  /** Counters so far (faults written, dropped, the writer's CPU time, the time spent in the tap). */
  stats(): NativeRecorderStats {
    if (this.#summary) return this.#summary;
    return this.#n.stats();
  }

  /**
   * Detaches from the userfaultfd, drains what is left, takes a last sample, writes the end record
   * and closes the file. A second call returns the same summary. Errors: SystemError (write,
   * ENOSPC..., with `path`): the file holds what was written before the error and no end record.
   */
  stop(): RecordingSummary {
    if (this.#summary) return this.#summary;
    if (!this.#uffd.closed) nativeUffd(this.#uffd).setTap(null);
    const s = this.#n.stop();
    this.#summary = {
      ...s,
      path: this.path,
      durationNs: Number(process.hrtime.bigint() - this.#t0),
      tapNsPerFault: s.tapped ? s.tapNs / s.tapped : 0,
      sampling: this.header.sampling,
    };
    return this.#summary;
  }

  /** stop(), for `using`. */
  [Symbol.dispose](): void {
    this.stop();
  }
}

const SAMPLING_REASONS: Record<number, string> = {
  [-1]: 'the range is not registered for write-protect on a userfaultfd with wpAsync (open with features including \'wpAsync\' and register with modes including \'wp\')',
  [-25]: 'this kernel has no PAGEMAP_SCAN (6.7+)',
  [-13]: 'the recorded process\'s pagemap is not readable (ptrace access)',
  [-2]: 'the recorded process is gone',
};

/**
 * Records the faults a userfaultfd's service reads in the given ranges into a trace file
 * (docs/trace-format.md): natively, as each worker reads them (before any rule resolves them, and
 * without changing what the rules do), into a ring per worker that a writer thread drains; plus,
 * every `sampleIntervalMs`, the pages written since the last sample (PAGEMAP_SCAN on uffd-wp
 * async memory). Faults are recorded only while the descriptor is served (rules or serve()).
 * Errors: TypeError/RangeError (ERR_INVALID_ARG_*, ERR_OUT_OF_RANGE, ERR_PAGEMIRROR_UNALIGNED)
 * before any system call; ERR_PAGEMIRROR_CLOSED; ERR_PAGEMIRROR_RECORDING (a recorder of this
 * descriptor is running); SystemError from creating the file (`path`).
 * @example
 * ```ts
 * import { Userfaultfd, mapAnonymous, recordTrace, access } from 'pagemirror';
 * const m = mapAnonymous(1 << 20);
 * const uffd = Userfaultfd.open();
 * uffd.register(m);
 * uffd.addRule({ mapping: m, action: 'zero' });
 * const rec = recordTrace(uffd, { path: 'run.pmtrace', mapping: m });
 * await access(m, { op: 'write' });
 * console.log(rec.stop());
 * ```
 */
export function recordTrace(uffd: Userfaultfd, options: RecordTraceOptions): TraceRecorder {
  if (!(uffd instanceof Userfaultfd)) throw typeError('ERR_INVALID_ARG_TYPE', 'uffd must be a Userfaultfd');
  const o = checkOptions('options', options);
  const path = checkString('path', o.path);
  if (path === '') throw typeError('ERR_INVALID_ARG_VALUE', 'path must not be empty');
  if (o.mapping !== undefined && !(o.mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'mapping must be a Mapping');
  if ((o.mapping === undefined) === (o.ranges === undefined)) throw typeError('ERR_INVALID_ARG_TYPE', 'give ranges or mapping (one of them)');
  const given: RecordRange[] = o.mapping ? [{ mapping: o.mapping }] : (o.ranges as RecordRange[]);
  if (!Array.isArray(given) || given.length === 0 || given.length > 65535)
    throw typeError('ERR_INVALID_ARG_TYPE', 'ranges must be a non-empty array of { mapping, offset?, length? } or { address, length } (at most 65535)');
  const interval = checkInteger('sampleIntervalMs', o.sampleIntervalMs ?? 100, 0, 3600000);
  const method = checkOneOf('sampleMethod', o.sampleMethod ?? 'pagemap-scan-written', SAMPLE_METHODS);
  const ringCapacity = checkInteger('ringCapacity', o.ringCapacity ?? 65536, 16, 1 << 24);
  const pid = checkInteger('pid', o.pid ?? 0, 0, 4194304);
  const ranges = checkRanges(uffd, given);
  if (uffd.closed) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the userfaultfd is closed');
  if (recording.get(uffd)?.stopped === false)
    throw stateError('ERR_PAGEMIRROR_RECORDING', `this userfaultfd is already being recorded (to ${recording.get(uffd)!.path}): stop() that recorder first`);
  let sampling: TraceHeader['sampling'] = { method: 'none', reason: 'sampleIntervalMs is 0' };
  if (interval && method === 'wp-rounds') {
    const unprotected = ranges.find((r) => !r.info.modes?.includes('wp'));
    sampling = unprotected
      ? { method: 'none', reason: `range ${unprotected.info.index} is not registered for write-protect (mode 'wp'): write rounds cannot see its writes` }
      : { method: 'wp-rounds' };
  } else if (interval) {
    const failed = ranges.map((r) => native.probeTraceSampling(r.start, r.length, pid)).find((rc) => rc !== 0);
    sampling = failed === undefined ? { method: 'pagemap-scan-written' } : { method: 'none', reason: SAMPLING_REASONS[failed] ?? `PAGEMAP_SCAN failed (errno ${-failed})` };
  }
  const rings = Math.max(1, uffd.stats().workers.length);
  const header: TraceHeader = {
    format: TRACE_FORMAT,
    version: TRACE_VERSION,
    pageSize: PAGE,
    clock: 'monotonic-ns-since-start',
    ...hostHeader(),
    ranges: ranges.map((r) => r.info),
    recorder: { sampleIntervalMs: interval, ringCapacity, rings, threadIds: uffd.has('threadId') },
    sampling,
  };
  const n = new native.TraceRecorder({
    ranges: ranges.map((r) => ({ start: r.start, length: r.length })),
    path,
    header: JSON.stringify(header),
    rings,
    ringCapacity,
    sampleIntervalMs: sampling.method === 'pagemap-scan-written' ? interval : 0,
    writeRounds: sampling.method === 'wp-rounds',
    pid,
  });
  try {
    nativeUffd(uffd).setTap(n);
  } catch (err) {
    n.stop();
    throw err;
  }
  const rec = new TraceRecorder(n, uffd, path, header);
  recording.set(uffd, rec);
  return rec;
}

// Checks ranges to record (before any system call): their addresses, lengths, and for a Mapping
// that it is registered with uffd; with the header's description of each (index: its position).
function checkRanges(uffd: Userfaultfd, given: RecordRange[]): { start: bigint; length: number; info: TraceRange }[] {
  return given.map((r: RecordRange, i: number) => {
    checkOptions(`ranges[${i}]`, r);
    if ('mapping' in r && r.mapping !== undefined) {
      if (!(r.mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', `ranges[${i}].mapping must be a Mapping`);
      const m = r.mapping;
      const offset = checkAligned('offset', checkInteger(`ranges[${i}].offset`, r.offset ?? 0, 0, m.length), m.pageSize);
      const length = checkAligned('length', checkInteger(`ranges[${i}].length`, r.length ?? m.length - offset, PAGE, m.length - offset), m.pageSize);
      const reg = uffd.registrations.find((g) => g.mapping === m && g.offset <= offset && offset + length <= g.offset + g.length);
      if (!reg) throw typeError('ERR_INVALID_ARG_VALUE', `ranges[${i}] is not registered with this userfaultfd: nothing would fault there`);
      const start = m.address + BigInt(offset);
      return { start, length, info: { index: i, length, start: '0x' + start.toString(16), kind: m.kind, shared: m.shared, hugetlb: m.hugetlb, modes: [...reg.modes] } };
    }
    const start = checkU64(`ranges[${i}].address`, (r as { address?: unknown }).address);
    if (start % BigInt(PAGE) !== 0n) throw rangeError('ERR_PAGEMIRROR_UNALIGNED', `ranges[${i}].address is not page aligned`);
    const length = checkAligned('length', checkInteger(`ranges[${i}].length`, (r as { length?: unknown }).length, PAGE), PAGE);
    const a = r as { modes?: unknown; shared?: unknown };
    if (a.modes !== undefined && (!Array.isArray(a.modes) || a.modes.some((m) => !Object.hasOwn(REGISTER_MODES, m as string))))
      throw typeError('ERR_INVALID_ARG_VALUE', `ranges[${i}].modes must be an array of ${Object.keys(REGISTER_MODES).join(', ')}`);
    const shared = checkBoolean(`ranges[${i}].shared`, a.shared, false);
    return { start, length, info: { index: i, length, start: '0x' + start.toString(16), kind: 'address', ...(a.modes ? { modes: [...(a.modes as string[])] } : {}), ...(a.shared !== undefined ? { shared } : {}) } };
  });
}

// One recorder per descriptor at a time: the service has one tap, and a second would silently
// take the first one's faults.
const recording = new WeakMap<Userfaultfd, TraceRecorder>();
