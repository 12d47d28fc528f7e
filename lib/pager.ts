// A user-space pager in one call: a file (or a memfd, or nothing) paged into a region on demand by
// the native fault service, with a bounded resident set, eviction, write-back and read-ahead.
// The engine is native/engine/pager.cc; this file validates, names and forwards. See docs/pager.md.
import * as fs from 'node:fs';
import { native, type NativePager, type NativePagerStats } from './native.js';
import { Mapping, mapAnonymous, mapFile, mapMemfd } from './mapping.js';
import { Userfaultfd, setHandlerRule, serviceArgs, type Fault, type PollOption, type ServiceStats } from './uffd.js';
import { access as runAccess, type AccessOptions, type AccessResult } from './access.js';
import { fileSystemOf } from './probe.js';
import { checkBytes, checkInteger, checkOneOf, rangeError, stateError, typeError } from './errors.js';
import { checkOptions } from './validate.js';

const PAGE = native.uname().pageSize;
const MAX_GRANULE = 2 << 20;

/** How a {@link pager} holds a file's pages: 'private' (copies, written back) or 'shared' (the file's own pages). */
export type PagerMode = 'private' | 'shared';
/** The order in which a {@link pager} evicts granules over its resident limit. */
export type PagerEviction = 'fifo' | 'clock';
/** A fill for anonymous pagers: zeros, the word pattern seed + word index, or a callback. */
export type PagerFill = 'zero' | { seed: number } | ((offset: number, out: Uint8Array) => void);

/** Options of {@link pager}. */
export interface PagerOptions {
  /**
   * Bytes filled per fault, and the unit of residency and write-back: a power of two from 4 KiB to
   * 2 MiB. The region is aligned to it. Default 64 KiB.
   */
  granule?: number;
  /**
   * 'private' (default): the region is private memory filled by pread + UFFDIO_COPY, and dirty
   * granules are written back with pwrite. 'shared': the region maps the file's own pages (tmpfs or
   * memfd only: MINOR faults + UFFDIO_CONTINUE); writes are in the file at once.
   */
  mode?: PagerMode;
  /**
   * Most bytes resident at once (rounded down to granules, at least one). Default: unbounded. The
   * granule a thread last faulted on stays until that thread faults again or exits, so a fault's
   * fill may pass the limit by one granule per such thread (docs/pager.md, "Progress").
   */
  residentLimit?: number;
  /** Which granule leaves first: 'fifo' (default) or 'clock' (second chance; see docs/pager.md). */
  eviction?: PagerEviction;
  /**
   * Sequential read-ahead: the window doubles with each fault of a stream, up to this many bytes
   * (true: 16 granules, at most a quarter of the resident limit). Default true; false turns it off.
   */
  prefetch?: boolean | number;
  /**
   * 'confirmed' (default): a written granule counts as clean only after a sync_file_range wait on
   * it returned 0. 'pagecache': once pwrite returned (faster on disks); flush() and close() then end
   * with an fdatasync, and an I/O error the kernel's writeback met since the last one rejects them:
   * granules still in memory are kept dirty, evicted ones are named in the error's `lost`
   * (ERR_PAGEMIRROR_DATA_LOST). false: writes stay in the pager's memory and
   * never reach the file, as with MAP_PRIVATE (dirty granules are evicted to a memfd of the
   * pager's own); the descriptor may then be read-only (a path is opened read-only). Private mode
   * only. With write-back on, a read-only descriptor is refused (EACCES), as mmap refuses a
   * writable MAP_SHARED mapping of one.
   */
  writeback?: 'confirmed' | 'pagecache' | false;
  /**
   * Fault service threads reading the pager's userfaultfd (1..64). Default 1. Passed to
   * Userfaultfd.serve({ workers }): each worker fills the granules of the faults it reads.
   */
  workers?: number;
  /**
   * How the service threads wait for the next fault: Userfaultfd.serve({ poll }). false (default):
   * they sleep at once. { spinUs } or 'adaptive': they poll first, which saves the wake-up of a
   * sleeping thread (tens of µs per fault on an idle machine) at the cost of that CPU time
   * (stats().service.cpuNs, spinNs).
   */
  poll?: PollOption;
  /** File offset of the first byte paged, page aligned. @default 0 */
  offset?: number;
  /** Bytes paged. Default: the file's size past `offset`. Required for an anonymous pager. */
  length?: number;
  /** Anonymous pagers only: how a granule never written is filled. @default 'zero' */
  fill?: PagerFill;
}

/** A pager's counters: {@link Pager.stats}. */
export interface PagerStats extends NativePagerStats {
  granule: number;
  /** Bytes resident now. */
  residentBytes: number;
  /** The fault service's own counters. */
  service: ServiceStats;
}

/**
 * The error flush() and close() reject with when the file did not take a write: a SystemError
 * (`code` the errno name), or `ERR_PAGEMIRROR_DATA_LOST` (`cause` 'ENXIO', `fileSize`) when the
 * granules hold data past the end of a file truncated under the pager. acknowledgeLoss() returns it.
 */
export interface PagerWriteError extends Error {
  code: string;
  /**
   * ERR_PAGEMIRROR_DATA_LOST: the errno name of the cause ('ENXIO': past the end of the file; with
   * `lost`, what the fdatasync of writeback 'pagecache' returned, e.g. 'EIO').
   */
  cause?: string;
  /**
   * writeback 'pagecache' only: granules written back and evicted before flush()'s fdatasync found
   * that the kernel's write failed. No copy is left (the kernel marks such pages clean): the file
   * may not hold what was written to them. Reported once, by the flush() that found it.
   */
  lost?: number[];
  /** ERR_PAGEMIRROR_DATA_LOST: the file's size when write-back found it truncated. */
  fileSize?: number;
  errno: number;
  syscall: string;
  path?: string;
  /** Granules kept resident and dirty. */
  granules: number[];
  /** The same, as byte ranges of the pager. */
  ranges: { offset: number; length: number }[];
}

const CONSTRUCT = Symbol('Pager');

/** A region paged from a file by native threads. Get one with pager(). */
export class Pager {
  readonly #n: NativePager;
  readonly #uffd: Userfaultfd;
  readonly #region: Mapping;
  readonly #length: number;
  readonly #granule: number;
  readonly #mode: PagerMode | 'anonymous';
  readonly #inflight = new Set<Promise<unknown>>();
  #closing = false;
  #closed = false;

  /** @internal use pager(). */
  constructor(token: symbol, n: NativePager, uffd: Userfaultfd, region: Mapping, length: number, granule: number, mode: PagerMode | 'anonymous') {
    if (token !== CONSTRUCT) throw typeError('ERR_ILLEGAL_CONSTRUCTOR', 'use pager() to create a Pager');
    this.#n = n;
    this.#uffd = uffd;
    this.#region = region;
    this.#length = length;
    this.#granule = granule;
    this.#mode = mode;
  }

  /** Bytes paged (the file's bytes: writes past them within the last granule are not kept). */
  get length(): number {
    return this.#length;
  }
  /** Bytes filled per fault and the unit of residency and write-back. */
  get granule(): number {
    return this.#granule;
  }
  /** 'private', 'shared', or 'anonymous' for a pager of anonymous memory. */
  get mode(): PagerMode | 'anonymous' {
    return this.#mode;
  }
  /** Whether close() was called. */
  get closed(): boolean {
    return this.#closed;
  }

  #live(): void {
    if (this.#closed || this.#closing) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the pager is closed');
  }

  #range(offset: unknown, length: unknown, min = 1): [number, number] {
    const o = checkInteger('offset', offset);
    const l = checkInteger('length', length, min);
    if (o + l > this.#length) throw rangeError('ERR_OUT_OF_RANGE', `[${o}, ${o + l}) is past the pager's ${this.#length} bytes`);
    return [o, l];
  }

  #track<T>(p: Promise<T>): Promise<T> {
    this.#inflight.add(p);
    const done = () => this.#inflight.delete(p);
    p.then(done, done);
    return p;
  }

  /** Copies bytes out on a native thread (the faults it takes are served meanwhile). */
  read(offset: number, length: number): Promise<Buffer> {
    this.#live();
    const [o, l] = this.#range(offset, length);
    return this.#track(this.#region.read(o, l));
  }

  /** Copies bytes in on a native thread. Resolves with the bytes written. */
  write(offset: number, data: Uint8Array): Promise<number> {
    this.#live();
    checkBytes('data', data);
    const [o] = this.#range(offset, data.byteLength);
    return this.#track(this.#region.write(o, data));
  }

  /** Runs an access kernel (see access()) over the pager's bytes on native threads. */
  access(options: AccessOptions = {}): Promise<AccessResult> {
    this.#live();
    options = checkOptions('options', options);
    const offset = options.offset ?? 0;
    const [o, l] = this.#range(offset, options.length ?? this.#length - checkInteger('offset', offset), 8);
    return this.#track(runAccess(this.#region, { ...options, offset: o, length: l }));
  }

  /**
   * A hint: reads the granules of [offset, offset + length) ahead, on a native thread (at most the
   * resident limit of them). Resolves with the granules read.
   */
  prefetch(offset: number, length: number): Promise<number> {
    this.#live();
    const [o, l] = this.#range(offset, length);
    const g0 = Math.floor(o / this.#granule);
    return this.#track(this.#n.prefetch(g0, Math.ceil((o + l) / this.#granule)));
  }

  /**
   * Writes every dirty granule back and waits for it (see `writeback`; with `writeback: false`
   * nothing goes to the file and it resolves). Rejects with a PagerWriteError (the kernel's code,
   * negative errno, syscall, path, granules and ranges kept dirty) when the file did not take them,
   * or with `ERR_PAGEMIRROR_DATA_LOST` for granules holding data past the end of a file truncated
   * under the pager (write-back never grows it back); a later flush() writes them again, and
   * acknowledgeLoss() gives them up.
   */
  async flush(): Promise<void> {
    this.#live();
    // Tracked: close() waits for it before it closes the file, which a flush still to come would
    // otherwise find closed (a spurious EBADF from its sync_file_range).
    await this.#track(this.#flush());
  }

  async #flush(): Promise<void> {
    try {
      await this.#n.flush();
    } catch (err) {
      throw this.#decorate(err);
    }
  }

  #decorate(err: unknown): unknown {
    const e = err as Partial<PagerWriteError>;
    if (Array.isArray(e.granules)) {
      const ranges: { offset: number; length: number }[] = [];
      for (const g of e.granules) {
        const last = ranges[ranges.length - 1];
        if (last && last.offset + last.length === g * this.#granule) last.length += this.#granule;
        else ranges.push({ offset: g * this.#granule, length: this.#granule });
      }
      e.ranges = ranges;
    }
    return err;
  }

  /**
   * Gives up the granules that the last write error (see flush()) keeps resident and dirty: they
   * are dropped, with any write made to them since, and their next access reads the file; the
   * error is cleared, so close() can succeed on a file that will never take them. Resolves with
   * that error (granules and ranges given up), or null when there was none.
   */
  async acknowledgeLoss(): Promise<PagerWriteError | null> {
    this.#live();
    const e = await this.#track(this.#n.acknowledgeLoss());
    return e && (this.#decorate(e) as PagerWriteError);
  }

  /** Counters of the engine (granules) and of the fault service. */
  stats(): PagerStats {
    this.#live();
    const s = this.#n.stats();
    return { ...s, granule: this.#granule, residentBytes: s.resident * this.#granule, service: this.#uffd.stats() };
  }

  /**
   * Waits for the pager's own reads, writes, accesses, prefetches and flushes, writes every dirty granule
   * back (as flush()), then stops the service and unmaps. If the write-back fails, close() rejects
   * with flush()'s error and the pager stays open with its dirty granules (call close() again once
   * the file can take them, or acknowledgeLoss() first to give them up). Idempotent once closed.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    if (this.#closing) throw stateError('ERR_PAGEMIRROR_CLOSING', 'close() is already running');
    this.#closing = true;
    try {
      await Promise.allSettled([...this.#inflight]);
      await this.#flush();
    } catch (err) {
      this.#closing = false;
      throw err;
    }
    // No thread of ours can fault any more: stop the service, then let the memory go.
    this.#uffd.close();
    this.#n.close();
    this.#region.close();
    this.#closed = true;
  }

  /** close(), for `await using`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function pow2(x: number): boolean {
  return x > 0 && (x & (x - 1)) === 0;
}

function isMemfd(fd: number): boolean {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`).startsWith('/memfd:');
  } catch {
    return false;
  }
}

/** Whether fd was opened read-only (its fdinfo flags: O_ACCMODE is 0). */
function readOnly(fd: number): boolean {
  try {
    const m = /^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
    return m !== null && (parseInt(m[1]!, 8) & 3) === 0;
  } catch {
    return false; // no /proc: the first write-back reports EBADF, which flush() names
  }
}

/** EACCES for write-back through a read-only descriptor: the kernel's answer to a writable MAP_SHARED mmap of one. */
function writeBackRefused(fd: number, path: string | undefined): Error {
  const err = new Error(
    `EACCES: permission denied, pager ${path ?? `fd ${fd}`}: the descriptor is open read-only and write-back would need to write it; ` +
      'open it read-write, or pass writeback: false (writes then stay in memory, as with MAP_PRIVATE)',
  );
  return Object.assign(err, { code: 'EACCES', errno: -13, syscall: 'mmap', ...(path === undefined ? {} : { path }) });
}

/**
 * Pages `target` (a path, an open descriptor, or null for anonymous memory) into a new region whose
 * pages the native fault service fills on demand. Misuse throws TypeError/RangeError with an
 * ERR_* code before any system call; the file's own errors are Node's (ENOENT, EACCES...).
 *
 * @throws {TypeError} `ERR_INVALID_ARG_TYPE` / `ERR_INVALID_ARG_VALUE`, {RangeError} `ERR_OUT_OF_RANGE` /
 *   `ERR_PAGEMIRROR_UNALIGNED` (granule, residentLimit), before any system call; SystemError `ENOENT`,
 *   `EACCES` (with `path`; also a read-only descriptor with write-back on, syscall 'mmap'), `EPERM`
 *   (no userfaultfd for this user).
 * @example
 * ```ts
 * import { pager } from 'pagemirror';
 * const p = await pager('/data/big.bin', { granule: 64 << 10, residentLimit: 64 << 20, eviction: 'clock' });
 * const { checksum } = await p.access({ op: 'read', unit: 8, threads: 2 });  // paged in on demand
 * await p.access({ op: 'rmw', unit: 8, threads: 2 });                        // dirty granules tracked by uffd-wp
 * await p.flush();                                                            // written back, confirmed
 * await p.close();
 * ```
 */
export async function pager(target: string | number | null, options: PagerOptions = {}): Promise<Pager> {
  if (target !== null && typeof target !== 'string' && typeof target !== 'number')
    throw typeError('ERR_INVALID_ARG_TYPE', 'target must be a path, a file descriptor or null (anonymous)');
  options = checkOptions('options', options);
  const granule = checkInteger('granule', options.granule ?? 64 * 1024, PAGE, MAX_GRANULE);
  if (!pow2(granule)) throw rangeError('ERR_OUT_OF_RANGE', `granule must be a power of two from ${PAGE} to ${MAX_GRANULE} bytes, got ${granule}`);
  const anonymous = target === null;
  const mode = checkOneOf('mode', options.mode ?? 'private', ['private', 'shared'] as const);
  if (anonymous && mode === 'shared') throw typeError('ERR_INVALID_ARG_VALUE', "an anonymous pager has no file to share: mode must be 'private'");
  if (!anonymous && options.fill !== undefined) throw typeError('ERR_INVALID_ARG_VALUE', 'fill applies to anonymous pagers (target null); a file pager fills from the file');
  const eviction = checkOneOf('eviction', options.eviction ?? 'fifo', ['fifo', 'clock'] as const);
  const writeback = options.writeback === false ? false : checkOneOf('writeback', options.writeback ?? 'confirmed', ['confirmed', 'pagecache'] as const);
  if (writeback === false && mode === 'shared')
    throw typeError('ERR_INVALID_ARG_VALUE', "writeback: false keeps writes private, which shared mode cannot (its writes are the file's own pages): use mode 'private'");
  const [workers] = serviceArgs(options.workers, options.poll); // checked before anything is made
  const offset = checkInteger('offset', options.offset ?? 0);
  if (offset % PAGE) throw rangeError('ERR_OUT_OF_RANGE', `offset must be a multiple of the page size (${PAGE})`);
  if (anonymous && offset) throw typeError('ERR_INVALID_ARG_VALUE', 'offset applies to file pagers');
  if (anonymous && options.length === undefined) throw typeError('ERR_MISSING_ARGS', 'an anonymous pager needs options.length');
  let limitGranules = 0;
  if (options.residentLimit !== undefined && options.residentLimit !== Infinity) {
    const limit = checkInteger('residentLimit', options.residentLimit, 1);
    if (limit < granule) throw rangeError('ERR_OUT_OF_RANGE', `residentLimit (${limit}) must hold at least one granule (${granule} bytes)`);
    limitGranules = Math.floor(limit / granule);
  }
  let prefetchGranules = 0;
  const pf = options.prefetch ?? true;
  if (pf === true) prefetchGranules = 16;
  else if (typeof pf === 'number') prefetchGranules = Math.floor(checkInteger('prefetch', pf) / granule);
  else if (pf !== false) throw typeError('ERR_INVALID_ARG_TYPE', 'prefetch must be a boolean or a number of bytes');
  if (limitGranules) prefetchGranules = Math.min(prefetchGranules, Math.floor(limitGranules / 4));
  let fill: 'zero' | 'pattern' | 'callback' = 'zero';
  let seed = 0;
  let callback: ((offset: number, out: Uint8Array) => void) | undefined;
  const f = options.fill ?? 'zero';
  if (typeof f === 'function') {
    fill = 'callback';
    callback = f;
  } else if (typeof f === 'object' && f !== null) {
    fill = 'pattern';
    seed = checkInteger('fill.seed', f.seed);
  } else if (f !== 'zero') throw typeError('ERR_INVALID_ARG_VALUE', "fill must be 'zero', { seed } or a function");

  // The file and its length (nothing is mapped yet: errors here leave nothing behind).
  let fd = -1;
  let ownFd = false;
  let path: string | undefined;
  let length: number;
  if (anonymous) {
    length = checkInteger('length', options.length, 1);
  } else {
    if (typeof target === 'string') {
      path = target;
      try {
        fd = fs.openSync(target, writeback === false ? 'r' : 'r+');
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        if (writeback !== false && (e.code === 'EACCES' || e.code === 'EROFS' || e.code === 'EPERM'))
          e.message += ': write-back needs the file open read-write; pass writeback: false to page it read-only (writes then stay in memory, as with MAP_PRIVATE)';
        throw err;
      }
      ownFd = true;
    } else {
      fd = checkInteger('fd', target);
    }
    try {
      const st = fs.fstatSync(fd);
      if (!st.isFile()) throw typeError('ERR_INVALID_ARG_VALUE', `${path ?? `fd ${fd}`} is not a regular file`);
      if (offset >= st.size && options.length === undefined)
        throw rangeError('ERR_OUT_OF_RANGE', `nothing to page: the file has ${st.size} bytes and offset is ${offset}`);
      length = options.length === undefined ? st.size - offset : checkInteger('length', options.length, 1);
      if (mode === 'private' && writeback !== false && readOnly(fd)) throw writeBackRefused(fd, path);
      if (mode === 'shared' && !isMemfd(fd)) {
        const where = path ?? fs.readlinkSync(`/proc/self/fd/${fd}`);
        let type = 'other';
        try {
          type = fileSystemOf(where);
        } catch {
          /* a deleted file: let the kernel decide at registration */
          type = 'tmpfs';
        }
        if (type !== 'tmpfs')
          throw typeError('ERR_INVALID_ARG_VALUE', `shared mode maps the file's own pages with MINOR faults, which only tmpfs and memfd files have (${where} is on ${type}): use mode 'private'`);
      }
    } catch (err) {
      if (ownFd) fs.closeSync(fd);
      throw err;
    }
  }
  const regionLength = Math.ceil(length / granule) * granule;

  // Undone in reverse if a later step fails.
  const cleanup: (() => void)[] = [];
  const undo = () => {
    for (const c of cleanup.reverse()) {
      try {
        c();
      } catch {
        /* already failing */
      }
    }
  };
  // Closed once the engine holds its own duplicate of the descriptor.
  const transient: (() => void)[] = [];
  if (ownFd) transient.push(() => fs.closeSync(fd));
  try {
    if (anonymous) {
      // Evicted granules of an anonymous pager go to a memfd of its own (swap-like, in memory).
      const m = mapMemfd(regionLength, { name: 'pagemirror-pager' });
      fd = m.fd;
      transient.push(() => m.close());
    }
    let swapFd: number | undefined;
    if (writeback === false && !anonymous) {
      // Dirty granules leave memory for a memfd of the pager's own, never for the file.
      const m = mapMemfd(regionLength, { name: 'pagemirror-pager-private' });
      swapFd = m.fd;
      transient.push(() => m.close());
    }
    const region =
      mode === 'shared'
        ? mapFile({ fd, path }, { offset, length: regionLength, shared: true })
        : mapAnonymous(regionLength, { align: granule });
    cleanup.push(() => region.close());
    const n = native.createPager(region.native, {
      fd,
      path,
      fileOffset: offset,
      dataLength: length,
      granule,
      mode: anonymous ? 'anonymous' : mode,
      residentLimit: limitGranules,
      policy: eviction,
      prefetch: prefetchGranules,
      fill,
      seed,
      confirm: writeback === 'confirmed' && !anonymous,
      ...(swapFd === undefined ? {} : { swapFd }),
    });
    cleanup.push(() => n.close());
    for (const c of transient.splice(0)) c();
    // User-mode-only: a fault raised inside the kernel (a pwrite from the region) fails with EFAULT
    // instead of waiting for a service that may be the very thread that made it. Thread ids: the
    // engine keeps the granule a thread faulted on until that thread comes back (docs/pager.md).
    const uffd = Userfaultfd.open({
      features: mode === 'shared' ? ['missingShmem', 'minorShmem', 'poison', 'threadId'] : ['pagefaultFlagWp', 'poison', 'threadId'],
      userModeOnly: true,
    });
    cleanup.push(() => uffd.close());
    uffd.register(region, { length: regionLength, modes: mode === 'shared' ? ['missing', 'minor'] : ['missing', 'wp'] });
    n.attach(uffd.fd);
    setHandlerRule(uffd, region, n);
    const p = new Pager(CONSTRUCT, n, uffd, region, length, granule, anonymous ? 'anonymous' : mode);
    uffd.serve({
      // The engine resolves every fault natively; what reaches here is a fill callback's granule,
      // or a fault the engine could not resolve. Nothing is ever resolved with silent zeros.
      onFaults: (faults) => forwarded(n, uffd, faults, granule, callback),
      maxBatch: 64,
      workers,
      poll: options.poll,
    });
    uffd.unref();
    return p;
  } catch (err) {
    for (const c of transient) c();
    undo();
    throw err;
  }
}

function forwarded(n: NativePager, uffd: Userfaultfd, faults: Fault[], granule: number, callback?: (offset: number, out: Uint8Array) => void): void {
  const done = new Set<number>();
  for (const f of faults) {
    if (f.kind === 'wp') {
      uffd.unprotect(f.address & ~BigInt(PAGE - 1), 0, PAGE);
      continue;
    }
    const g = Math.floor(f.offset / granule);
    try {
      if (!callback) throw new Error('the pager could not fill this page');
      if (done.has(g)) continue;
      const buf = new Uint8Array(granule);
      callback(g * granule, buf);
      n.install(g, buf);
      done.add(g);
    } catch (err) {
      // The access gets SIGBUS (its result says so) rather than zeros it never wrote.
      n.poison(f.address);
      process.emitWarning(`pagemirror: pager fill failed at offset ${g * granule}: ${String(err)}`);
    }
  }
}
