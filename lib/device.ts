// Devices and mirrors: HMM in user space. A Device is an emulated GPU/NIC/FPGA with its own memory
// and native device threads; a Mirror is its page table over a range of a Mapping. Device accesses
// go through the mirror; a miss is a device page fault, serviced in batches and replayed.
import { readFileSync } from 'node:fs';
import { native, type NativeDevice, type NativeFileStats, type NativeForkDeviceResult, type NativeForkStepResult, type NativeMirror, type NativeDeviceCounters, type NativeMigrateResult, type NativeTraceEvent } from './native.js';
import { Mapping } from './mapping.js';
import { checkInteger, checkOneOf, checkBytes, checkDecodedPages, stateError, typeError } from './errors.js';
import { checkBoolean, checkNumber, checkOptions, checkString, checkU64 } from './validate.js';
import { checkServed } from './served.js';
import { resolveLink, type LinkOptions } from './link.js';
import { replayOnMirror, type ReplayOptions, type ReplayResult } from './replay.js';
import type { Trace } from './trace.js';

const PAGE = native.uname().pageSize;

/** Options of {@link Device.create}. */
export interface DeviceOptions {
  /** Shown in counters and traces. @default 'device' */
  name?: string;
  /** Device memory in bytes (a pool of page slots; real memory, committed as used). Default 64 MiB. */
  memory?: number;
  /** Faults serviced per round (the default is the kernel's test device's). @default 32 */
  faultBatch?: number;
  /** Fault-around granule in bytes: a miss faults the aligned block around it. Default one page. */
  faultAround?: number;
  /** How long a range fault retries while invalidations race it, then EBUSY. @default 1000 */
  timeoutMs?: number;
  /**
   * Where a device fault puts the data. 'host' (default): the device maps the host page (HMM
   * mirroring). 'device': the faulted range first migrates into device memory, as unified-memory
   * drivers do; what cannot move (shared, file-backed, full memory with eviction off) is mapped on
   * the host.
   */
  placement?: 'host' | 'device';
  /** When device memory is full: 'off' (default: the page stays on the host), 'fifo' (oldest allocation), 'lru' (second chance on the device's access bit). */
  eviction?: 'off' | 'fifo' | 'lru';
  /** With eviction on: after each migration, evict down to this fraction of device memory in use (1: evict only when full). @default 1 */
  watermark?: number;
  /**
   * Prefetch after each fault round, before the replay: 'sequential' fetches ahead, a window that
   * doubles as a stream goes on (up to 2 MiB); 'density' fetches the whole 2 MiB block once more than 51 % of it is
   * resident (the rule of NVIDIA's prefetch tree). Default 'off'.
   */
  prefetch?: 'off' | 'sequential' | 'density';
  /**
   * Allocate all device memory up front, as a GPU's is: migrations copy into pages that exist
   * (no allocation per page) and freed slots keep them. Default false (memory committed as used).
   */
  preallocate?: boolean;
  /** Record a trace of events (fault batches, migrations with their trigger, invalidations with their cause). @default false */
  trace?: boolean;
  /** Trace ring size in events; the oldest are dropped (and counted) past it. @default 65536 */
  traceCapacity?: number;
  /**
   * The link between host memory and this device, for "modeled device time": a preset
   * ('pcie3x16', 'pcie4x16', 'pcie5x16', 'nvlink-c2c', 'cxl') or {@link LinkParams} (optionally
   * `{ preset, ...overrides }`). Every fault round, migration, eviction, writeback of a device copy
   * and remote access the engine performs is then charged in modeled nanoseconds: counters()
   * gains `modeledNs` and `modeled`, kernel results `modeledNs`, trace events `modeledNs`
   * (docs/link-model.md). Nothing changes in what the engine does. Default: no link, nothing modeled.
   */
  link?: LinkOptions;
}

/**
 * One trace event. fault-batch: a service round (faults taken, pages faulted, time). migrate-*:
 * pages moved and why (explicit, device-fault, cpu-fault, prefetch, eviction, release, fork).
 * invalidate: entries cleared and the cause (protect, discard, unmap, remap, truncate,
 * writeback, fork, cpu-access...). tNs is CLOCK_MONOTONIC; offset is within the mirror's mapping range.
 * With a link, fault-batch and migrate-* events carry modeledNs: what the link model charged for
 * them (a batch: its round trip plus the transfers made in it).
 */
export type TraceEvent = NativeTraceEvent & { device: string };

/** One mirror entry, decoded. */
/** One device page-table entry: its permissions, dirty bit and where the data is (host page or device slot). */
export interface MirrorEntry {
  valid: boolean;
  write: boolean;
  atomic: boolean;
  dirty: boolean;
  onDevice: boolean;
  slot: number;
}

/** Decodes one raw 64-bit device page-table entry (what {@link Mirror.entries} decodes for you). */
export function decodeEntry(e: bigint): MirrorEntry {
  checkU64('entry', e);
  return {
    valid: (e & 1n) !== 0n,
    write: (e & 2n) !== 0n,
    atomic: (e & 4n) !== 0n,
    dirty: (e & 8n) !== 0n,
    onDevice: (e & 16n) !== 0n,
    slot: Number(e >> 20n),
  };
}

/** What an access kernel does to each unit: read, write, atomic add, verify a written pattern, copy. */
export type KernelOp = 'read' | 'write' | 'atomic' | 'verify' | 'copy';

/** Options of {@link Mirror.run}: the access kernel the device threads run. */
export interface KernelOptions {
  /** Byte offset into the mirror (page aligned). @default 0 */
  offset?: number;
  /**
   * Pages covered, in base pages (the system page size): a hugetlb mirror's kernels cover whole
   * huge pages (ERR_PAGEMIRROR_UNALIGNED otherwise). Default to the end of the mirror.
   */
  npages?: number;
  /**
   * read: sum words; write: store seed + word index; atomic: atomic increment; verify: count words
   * that differ from seed + word index; copy: each word read is written copyTo bytes further.
   * Default 'read'.
   */
  op?: KernelOp;
  /** gather: the words at `indices` (word indices within the range), in order, repeated. */
  pattern?: 'sequential' | 'strided' | 'random' | 'gather';
  indices?: Uint32Array;
  /** copy: destination distance in bytes (a page multiple; may be negative), inside the mirror. */
  copyTo?: number;
  /** Sequential: bytes between touched words. Default one page. */
  unit?: number;
  stride?: number;
  /** Accesses in all. Default npages * pageSize / unit. */
  ops?: number;
  seed?: number;
  /** Device threads. @default 1 */
  threads?: number;
}

/** What {@link Mirror.run} measured. */
export interface KernelResult {
  ops: number;
  checksum: bigint;
  mismatches: number;
  /** Fault rounds the kernel's threads waited for (the kernel device's `faults`). */
  faults: number;
  /** Pages copied (read/write), the kernel device's `cpages`: base pages (a 2 MiB hugetlb page counts 512). */
  cpages: number;
  elapsedNs: number;
  /**
   * With a link: the kernel's modeled device time, `modeledFaultNs + modeledRemoteNs`. Fault rounds
   * are serialised on the device's service thread, so each round that served the kernel counts
   * once; device threads run side by side, so the remote share is the slowest thread's.
   */
  modeledNs?: number;
  /** With a link: the fault rounds the kernel waited for (round trip and the transfers made in them). */
  modeledFaultNs?: number;
  /** With a link: accesses to host-resident pages, the slowest thread's. */
  modeledRemoteNs?: number;
  /** With a link: accesses to host-resident pages (words; pages for read/write), all threads. */
  remoteAccesses?: number;
  /** With a link: their bytes (8 per word, a page per page copied). */
  remoteBytes?: number;
}

/** A device's fault, migration and invalidation counters, and with a link its modeled time: {@link Device.counters}. */
export type DeviceCounters = NativeDeviceCounters;

/**
 * Why a page did not move to device memory. 'file-backed': the page is the file's (a page-cache
 * page, or never touched, in a private file mapping). 'userfaultfd-unsupported': a page the CPU
 * copied on write in a private mapping of a file system userfaultfd cannot register (ext4, xfs):
 * nothing would catch the CPU's next touch of the hole it leaves, which would read the file again.
 */
export type SkipReason = 'shared' | 'file-backed' | 'dax' | 'other-device' | 'device-memory-full' | 'pinned' | 'error' | 'userfaultfd-unsupported';

/** What a migration moved and what it skipped, and why. */
export interface MigrateResult extends NativeMigrateResult {
  /** Pages on this device afterwards (the kernel device's cpages), not only those moved now. */
  cpages: number;
  /** Pages whose data moved now: byMove (UFFDIO_MOVE, no copy) + byCopy + zeroFilled (never touched). */
  moved: number;
  /** Every page that did not move, with the reason: never silently. */
  skipped: { offset: number; reason: SkipReason }[];
}

/**
 * The kernel test device's snapshot encoding (HMM_DMIRROR_PROT_*): one byte per base page. ERROR:
 * no mapping or PROT_NONE; NONE: not present (or in another device's memory); otherwise a base
 * or'ed with READ/WRITE, and PMD (a THP, a 2 MiB hugetlb page) or PUD (a 1 GiB hugetlb page) on
 * every base page of a page the CPU maps huge.
 */
export const SNAPSHOT = {
  ERROR: 0xff,
  NONE: 0x00,
  READ: 0x01,
  WRITE: 0x02,
  PMD: 0x04,
  PUD: 0x08,
  ZERO: 0x10,
  DEV_PRIVATE_LOCAL: 0x20,
  DEV_PRIVATE_REMOTE: 0x30,
  DEV_COHERENT_LOCAL: 0x40,
  DEV_COHERENT_REMOTE: 0x50,
} as const;

/**
 * One step of a device kernel sequence in a forked child (device.forkRun()). Words are
 * seed + word index within the step's range, as the device kernels write them.
 * - 'read' / 'write' / 'verify': the child's device reads (checksum), writes, or reads and counts
 *   words that differ, through its own page table; a miss faults the rest of the step's range in
 *   one round (`faults`), as the kernel's test device does.
 * - 'migrate' / 'migrate-back': into the child's device memory and home again. As in the parent:
 *   private anonymous pages move; in a private file mapping, pages copied on write (tmpfs, memfd);
 *   shared and file pages are skipped with the reason.
 * - 'cpu-read' / 'cpu-write' / 'cpu-verify': the child's own CPU touches every word; a page in the
 *   child's device memory faults (a real userfaultfd fault) and comes home (`cpuFaults`).
 */
export interface ForkStep {
  op: 'read' | 'write' | 'verify' | 'migrate' | 'migrate-back' | 'cpu-read' | 'cpu-write' | 'cpu-verify';
  /** Byte offset within the forked range (page aligned). @default 0 */
  offset?: number;
  /** Pages. Default to the end of the range. */
  npages?: number;
  /** @default 1 */
  seed?: number;
}

/** Options of a fork scenario run by a device (parent, child and device touching the same pages). */
export interface ForkRunOptions {
  /** Byte offset of the range the child's device mirrors, within the mapping (page aligned). @default 0 */
  offset?: number;
  /** Bytes. Default to the end of the mapping. */
  length?: number;
  /** The child device's memory in bytes. Default this device's memory. */
  memory?: number;
  /** The child is killed (SIGKILL) past this, and the call rejects with ETIMEDOUT. Default 10000, at most 600000. */
  timeoutMs?: number;
}

/**
 * One step's outcome. cpages: pages the step accessed (read/write/verify/cpu-*), pages on the
 * child's device afterwards (migrate, the kernel device's cpages), or pages moved home
 * (migrate-back). error: the step's own failure, Node-shaped (code, errno, syscall 'forkRun',
 * step, page); later steps still ran.
 */
export type ForkStepResult = NativeForkStepResult & { op: ForkStep['op']; skipped: Partial<Record<SkipReason, number>> };

/** What a fork scenario measured, step by step. */
export interface ForkRunResult extends NativeForkDeviceResult {
  steps: ForkStepResult[];
}

const FORK_OPS = ['read', 'write', 'verify', 'migrate', 'migrate-back', 'cpu-read', 'cpu-write', 'cpu-verify'] as const;

/**
 * A device's mirror of a range of a mapping (its page table over it): run kernels, fault, migrate
 * and inspect entries. Made by {@link Device.mirror}; for files with a strategy, {@link FileMirror}.
 */
export class Mirror {
  readonly #n: NativeMirror;
  /** The mapping mirrored. */
  readonly mapping: Mapping;
  /** The device whose page table this is. */
  readonly device: Device;
  /** Byte offset of the mirrored range in the mapping. */
  readonly offset: number;
  /** Bytes mirrored. */
  readonly length: number;

  /** @internal use device.mirror() */
  constructor(n: NativeMirror, device: Device, mapping: Mapping, offset: number, length: number) {
    this.#n = n;
    this.device = device;
    this.mapping = mapping;
    this.offset = offset;
    this.length = length;
  }

  /** Base pages mirrored (a hugetlb mirror has one table entry per huge page: info().npages). */
  get npages(): number {
    return this.length / PAGE;
  }

  /**
   * The device reads [offset, offset + npages pages) through its page table into a new buffer. A
   * miss faults in everything from that page to the end of the range in one round. On error nothing
   * is copied out. npages counts base pages (a hugetlb mirror's reads cover whole huge pages:
   * ERR_PAGEMIRROR_UNALIGNED). Errors: EFAULT (no mapping or PROT_NONE), EBUSY (invalidations kept
   * racing), ENODEV (device closed); EINVAL for npages 0.
   */
  async read(offset: number, npages: number): Promise<KernelResult & { data: Buffer }> {
    checkServed(this.mapping, this.offset + checkInteger('offset', offset), checkInteger('npages', npages) * PAGE, false, 'Mirror.read()');
    return this.#n.read(checkInteger('offset', offset), checkInteger('npages', npages));
  }

  /** The device writes data (whole pages) at offset. EPERM if the range is not writable. */
  async write(offset: number, data: Uint8Array): Promise<KernelResult> {
    checkServed(this.mapping, this.offset + checkInteger('offset', offset), checkBytes('data', data).byteLength, true, 'Mirror.write()');
    return this.#n.write(checkInteger('offset', offset), checkBytes('data', data));
  }

  /** Runs an access kernel on device threads through the mirror. */
  async run(kernel: KernelOptions = {}): Promise<KernelResult> {
    kernel = checkOptions('kernel', kernel);
    // Numbers only: the addon would also take a bigint here.
    for (const f of ['offset', 'npages', 'unit', 'stride', 'ops', 'seed', 'threads'] as const) if (kernel[f] !== undefined) checkInteger(f, kernel[f]);
    if (kernel.copyTo !== undefined) checkInteger('copyTo', kernel.copyTo, -Number.MAX_SAFE_INTEGER);
    const k: Record<string, unknown> = { ...kernel };
    k.op = checkOneOf('op', kernel.op ?? 'read', ['read', 'write', 'atomic', 'verify', 'copy'] as const);
    if (kernel.pattern !== undefined) checkOneOf('pattern', kernel.pattern, ['sequential', 'strided', 'random', 'gather'] as const);
    if (k.op === 'copy' && typeof kernel.copyTo !== 'number') throw typeError('ERR_INVALID_ARG_TYPE', 'a copy kernel needs copyTo (bytes)');
    const from = kernel.offset === undefined ? 0 : checkInteger('offset', kernel.offset, 0, this.length);
    checkServed(this.mapping, this.offset + from, this.length - from, k.op !== 'read' && k.op !== 'verify', 'Mirror.run()');
    return this.#n.run(k);
  }

  /**
   * Replays a recorded trace's accesses (see {@link recordTrace}, docs/trace-format.md) through
   * this mirror on device threads, under the device's policies (placement, faultBatch,
   * faultAround, eviction, prefetch, memory), and counts what the device did. Deterministic: the
   * same trace and options on a device and mirror in the same state (fresh ones) give the same
   * counts, whatever the timing; only the trace's order is used, not its times. Nothing else
   * should use the device meanwhile (its counters are shared).
   * @throws ERR_PAGEMIRROR_TRACE_CORRUPT / ERR_PAGEMIRROR_TRACE_VERSION (a path that is not a
   *   readable trace), RangeError ERR_OUT_OF_RANGE (range not in the trace, or larger than the
   *   mirror), TypeError ERR_INVALID_ARG_*; SystemError from a device fault (EFAULT, EPERM, ENODEV)
   *   with `access`, the index it failed on.
   * @example
   * ```ts
   * import { Device, mapAnonymous, readTrace } from 'pagemirror';
   * const trace = await readTrace('run.pmtrace');
   * const gpu = Device.create({ memory: 1 << 20, placement: 'device', eviction: 'lru' });
   * const r = await gpu.mirror(mapAnonymous(trace.header.ranges[0]!.length)).replay(trace);
   * console.log(r.deviceFaults, r.faultRounds, r.evictions);
   * ```
   */
  async replay(trace: Trace | string, options: ReplayOptions = {}): Promise<ReplayResult> {
    return replayOnMirror(this, this.#n, trace, options);
  }

  /**
   * The mirror's entries for base pages [page, page + npages) (a hugetlb page's entry repeats for
   * each of its pages). At most MAX_DECODED_PAGES (4194304) at once (ERR_OUT_OF_RANGE).
   */
  entries(page = 0, npages?: number): MirrorEntry[] {
    checkInteger('page', page);
    const n = checkInteger('npages', npages ?? this.npages - page, 1);
    checkDecodedPages('entries()', n, 'smaller windows (page, npages)');
    return Array.from(this.#n.entries(page, n), decodeEntry);
  }

  /**
   * migrate_vma to device memory: each page's data moves (UFFDIO_MOVE where it applies, else a
   * copy under write protection) into a device slot and the CPU mapping is zapped; a later CPU
   * touch faults and migrates it back. Only private anonymous pages move, and, in a private
   * mapping of a tmpfs file or memfd, pages the CPU already copied on write (copied, since
   * UFFDIO_MOVE takes anonymous mappings only; a CPU touch brings back the written data, not the
   * file's); the others are listed in `skipped` with the reason.
   * Errors: EINVAL (a page with no access, hugetlb), ENOENT (nothing on the device afterwards;
   * err.skipped says why), EBUSY (the range is registered with another userfaultfd).
   * granule (bytes, default 2 MiB): aligned chunks that can move whole go in one ioctl.
   */
  async migrateToDevice(offset: number, npages: number, options: { useMove?: boolean; granule?: number } = {}): Promise<MigrateResult> {
    options = checkOptions('options', options);
    return (await this.#n.migrateToDevice(
      checkInteger('offset', offset),
      checkInteger('npages', npages),
      checkBoolean('useMove', options.useMove, true),
      false,
      options.granule === undefined ? undefined : checkInteger('granule', options.granule, PAGE),
    )) as MigrateResult;
  }

  /**
   * make_device_exclusive: the device takes atomic access to the range; any CPU access (read or
   * write) revokes it, through a real fault. cpages: pages held exclusively afterwards. Errors as
   * migrateToDevice (only private anonymous memory can be taken).
   */
  async exclusive(offset: number, npages: number): Promise<MigrateResult> {
    return (await this.#n.migrateToDevice(checkInteger('offset', offset), checkInteger('npages', npages), true, true)) as MigrateResult;
  }

  /** The kernel device's checkExclusive: EPERM if any page of the range is still held exclusively. */
  checkExclusive(offset: number, npages: number): void {
    const n = this.#n.exclusiveCount(checkInteger('offset', offset), checkInteger('npages', npages));
    if (n > 0) {
      const err = new Error(`EPERM: ${n} pages are still held exclusively by the device`) as Error & Record<string, unknown>;
      Object.assign(err, { code: 'EPERM', errno: -1, syscall: 'checkExclusive', pages: n });
      throw err;
    }
  }

  /** Moves this device's pages in the range back to host memory. cpages: pages actually moved. */
  async migrateToHost(offset: number, npages: number): Promise<{ cpages: number; elapsedNs: number }> {
    return this.#n.migrateToHost(checkInteger('offset', offset), checkInteger('npages', npages));
  }

  /**
   * The CPU-side state of each base page of [offset, offset + npages pages) (see SNAPSHOT), without
   * faulting anything. offset: bytes, a multiple of the base page size, default 0; npages: default
   * to the end of the mirror. Errors: RangeError ERR_OUT_OF_RANGE / ERR_PAGEMIRROR_UNALIGNED.
   */
  snapshot(offset = 0, npages?: number): Uint8Array {
    checkInteger('offset', offset);
    return this.#n.snapshot(offset, checkInteger('npages', npages ?? this.npages - offset / PAGE));
  }

  /** Page-table size, invalidation and range-fault counts. */
  info(): ReturnType<NativeMirror['info']> {
    return this.#n.info();
  }

  /** device.forkRun() over this mirror's range: the child's own device mirrors the same pages. */
  forkRun(steps: ForkStep[], options: Omit<ForkRunOptions, 'offset' | 'length'> = {}): Promise<ForkRunResult> {
    return this.device.forkRun(this.mapping, steps, { ...checkOptions('options', options), offset: this.offset, length: this.length });
  }

  /**
   * Drops every entry (waiting for accesses in flight) and unhooks from the mapping. Idempotent;
   * Mapping.close() does it too. Calls on a closed mirror throw ERR_PAGEMIRROR_CLOSED. A file
   * mirror writes its device copies back first; closed either way, it throws
   * ERR_PAGEMIRROR_DATA_LOST if data is lost (copies the file could not take, or an
   * unacknowledged loss: see FileMirror.writeback()).
   */
  close(): void {
    this.#n.close();
  }
}

/** How a device's use of a file's pages stays right with the page cache, writeback and truncate. */
export type FileStrategy = 'remote' | 'copy' | 'bounce' | 'pin';

/** Options of {@link Device.mirrorFile}. */
export interface FileMirrorOptions {
  /** Byte offset into the mapping (page aligned). @default 0 */
  offset?: number;
  /** Bytes mirrored. Default to the end of the mapping. */
  length?: number;
  /**
   * - 'remote' (default): the device maps the page-cache pages; writeback through the library
   *   takes the device's entries away while the kernel writes the pages, and the device's next write
   *   faults again (page_mkwrite).
   * - 'copy' (Jan Kara's scheme): the page stays in the page cache (A) and the device works on its
   *   own copy (A'); pread()/pwrite() and, on tmpfs/memfd, CPU accesses through the mapping bring A'
   *   back into A first.
   * - 'bounce' (Jérôme Glisse's scheme): as copy, but A is freed once A' is loaded (hole punched on
   *   tmpfs; written and dropped from the page cache on a disk file): the device holds the only copy,
   *   and CPU access and writeback go through bounce pages. Saves the host memory copy spends.
   * - 'pin' (long-term GUP): the device maps the page-cache pages for good and is never
   *   invalidated; writeback holds the device's writes to the pages it writes (stable pages).
   *
   * copy and bounce on a file system userfaultfd cannot register (ext4, xfs): the CPU's mapping
   * is not handed to JavaScript (ERR_PAGEMIRROR_FILE_STRATEGY); use pread()/pwrite().
   */
  strategy?: FileStrategy;
  /**
   * Where writeback's consistent image of a page the device keeps writing is taken (copy, bounce).
   * 'pagecache' (default): the page-cache page that pwrite fills is the bounce page; the device's
   * writes to the pages being written wait while pwrite copies them (one copy). 'buffer': a private
   * bounce buffer; the device waits only for a memcpy into it, then the buffer is written (two
   * copies). pin always writes the shared page itself, held stable while the kernel writes it.
   */
  snapshot?: 'pagecache' | 'buffer';
  /** Periodic writeback every this many ms, as the kernel's flusher (dirty_writeback_centisecs). 0 (default): only writeback()/fsync(). */
  writebackIntervalMs?: number;
  /** Pages per writeback step: bounds how long a device write waits on a page under writeback. @default 64 */
  chunkPages?: number;
  /**
   * Take a write lease on the file (F_SETLEASE): another process opening or truncating it makes
   * the engine revoke the device's access, write back and release the lease before the kernel's
   * lease-break time. Needs the file open nowhere else. Default false.
   */
  lease?: boolean;
}

/** A file mirror's counters (loads, writebacks, snapshots, pull-backs). */
export type FileStats = NativeFileStats;

/** Host and device memory of one file mirror, and what its strategy has cost so far. */
export interface FileAccounting extends FileStats {
  /** The file range's page cache (cachestat, or mincore where cachestat is missing). */
  pageCache: { cachedPages: number; dirtyPages: number; writebackPages: number; source: 'cachestat' | 'mincore' };
  /** This process's resident set (/proc/self/statm). */
  rssBytes: number;
  /** Device memory holding this mirror's pages. */
  deviceBytes: number;
  /** Device fault rounds and range faults this mirror took. */
  rangeFaults: number;
}

/**
 * A mirror of a file's pages with a strategy (device.mirrorFile()). Device kernels run through it
 * as through any mirror; pread()/pwrite() are the CPU's read()/write() of the file with the
 * strategy in the loop; writeback()/fsync() write the device's data to the file.
 */
export class FileMirror extends Mirror {
  readonly #f: NativeMirror;
  /** The file strategy this mirror keeps (see FileMirrorOptions.strategy). */
  readonly strategy: FileStrategy;

  /** @internal use device.mirrorFile() */
  constructor(n: NativeMirror, device: Device, mapping: Mapping, offset: number, length: number, strategy: FileStrategy) {
    super(n, device, mapping, offset, length);
    this.#f = n;
    this.strategy = strategy;
  }

  /**
   * read() of the file range [offset, offset + length) of this mirror, through the strategy: copy
   * brings a page the device wrote back into the page cache first; bounce reads a snapshot of the
   * device's page. Short at end of file. Errors: those of pread(2); ERR_PAGEMIRROR_CLOSED when the
   * mirror (or its mapping) closed while it ran.
   */
  pread(offset: number, length: number): Promise<Buffer> {
    return this.#f.fileRead(checkInteger('offset', offset), checkInteger('length', length));
  }

  /**
   * write() into the file range of this mirror, through the strategy: copy brings the device's
   * page back and drops it (the device reloads it on its next access); bounce writes into the
   * device's page, which is the only copy. Errors: those of pwrite(2); ERR_PAGEMIRROR_CLOSED when
   * the mirror (or its mapping) closed while it ran.
   */
  pwrite(offset: number, data: Uint8Array): Promise<void> {
    return this.#f.fileWrite(checkInteger('offset', offset), checkBytes('data', data));
  }

  /**
   * Writes back the dirty pages of [offset, offset + length) (default: all): each page written is
   * a consistent snapshot while device threads keep writing. sync: and waits until the file
   * has them on its media (fdatasync). DAX: nothing to do (pages: 0).
   *
   * A page counts as written only once a wait on the file (sync_file_range, fdatasync) confirmed
   * it. See docs/file-strategies.md, "What the library promises after an I/O error".
   * @throws ENOSPC, EIO... (copy, bounce): the file could not take some device copies; they stay
   *   dirty on the device and the next writeback writes them again. `syscall` names the call that
   *   failed; `pages` and `ranges` ({offset, length} bytes of the mirror) the copies kept.
   * @throws ERR_PAGEMIRROR_DATA_LOST: data only the page cache held (remote, pin, or pwrite() of
   *   pages the device did not hold) may be lost to a failed writeback; `errno`/`cause` are the
   *   kernel's error, `pages`/`ranges` the pages. Sticky: every writeback, fsync() and close()
   *   reports it again until acknowledgeLoss().
   * @throws ERR_PAGEMIRROR_CLOSED after close().
   */
  writeback(range: { offset?: number; length?: number; sync?: boolean } = {}): Promise<{ pages: number; bytesCopied: number; elapsedNs: number }> {
    range = checkOptions('range', range);
    const offset = checkInteger('offset', range.offset ?? 0);
    const length = checkInteger('length', range.length ?? this.length - offset);
    return this.#f.writeback(offset, length, checkBoolean('sync', range.sync, false));
  }

  /**
   * fsync through the library: every page the device wrote is written back, then fdatasync.
   * Errors as writeback(): a rejection never leaves a device copy clean that the file lacks.
   */
  fsync(): Promise<{ pages: number; bytesCopied: number; elapsedNs: number }> {
    return this.writeback({ sync: true });
  }

  /**
   * Acknowledges a loss reported as ERR_PAGEMIRROR_DATA_LOST (after rewriting what was lost, or
   * giving it up): later writebacks, fsync() and close() stop reporting it. Returns what was lost
   * (the kernel's error code, errno, the call that reported it, pages and ranges), or null.
   */
  acknowledgeLoss(): ReturnType<NativeMirror['acknowledgeLoss']> {
    return this.#f.acknowledgeLoss();
  }

  /**
   * Takes a write lease on the file now (see FileMirrorOptions.lease); it is released by close()
   * of the mirror or of its mapping. Errors: EAGAIN (the file is open elsewhere),
   * ERR_PAGEMIRROR_CLOSED (the mirror or its mapping is closed), EBADF (the range was unmapped).
   */
  takeLease(): void {
    this.#f.takeLease();
  }

  /** The strategy's counters and the device's share of the pages. */
  stats(): FileStats {
    return this.#f.fileStats();
  }

  /** Host memory (page cache of the range, RSS), device memory and the strategy's counters. */
  accounting(): FileAccounting {
    const stats = this.stats();
    let pageCache: FileAccounting['pageCache'];
    try {
      const cs = this.mapping.cachestat({ fileOffset: this.mapping.fileOffset + this.offset, length: this.length });
      pageCache = { cachedPages: cs.cache, dirtyPages: cs.dirty, writebackPages: cs.writeback, source: 'cachestat' };
    } catch {
      const r = this.mapping.residency({ offset: this.offset, length: this.length });
      pageCache = { cachedPages: r.filter(Boolean).length, dirtyPages: 0, writebackPages: 0, source: 'mincore' };
    }
    const statm = readFileSync('/proc/self/statm', 'utf8').split(' ');
    return {
      ...stats,
      pageCache,
      rssBytes: Number(statm[1]) * PAGE,
      deviceBytes: stats.devicePages * PAGE,
      rangeFaults: this.info().rangeFaults ?? 0,
    };
  }
}

/**
 * An emulated device (a GPU, a NIC): native threads that run access kernels through mirrors of
 * this process's memory, with their own page table, device memory, batched device faults, eviction
 * and migration. Made by {@link Device.create}.
 */
export class Device {
  readonly #n: NativeDevice;
  /** The name given at create() (in counters and traces). */
  readonly name: string;
  #closed = false;

  private constructor(n: NativeDevice, name: string) {
    this.#n = n;
    this.name = name;
  }

  /**
   * Creates a device and starts its fault service thread.
   *
   * @throws {RangeError} `ERR_OUT_OF_RANGE` (memory, faultBatch, a link cost negative, NaN or
   *   infinite, ...), {TypeError} `ERR_INVALID_ARG_VALUE` (placement, eviction, an unknown link preset
   *   or field) or `ERR_INVALID_ARG_TYPE`, before any system call; SystemError `ENOMEM`
   *   (device memory) or `EAGAIN` (threads).
   * @example
   * ```ts
   * import { Device, mapAnonymous } from 'pagemirror';
   * const gpu = Device.create({ name: 'gpu0', memory: 32 << 20, faultAround: 64 << 10 });
   * const m = mapAnonymous(16 << 20);
   * const mirror = gpu.mirror(m);
   * await mirror.run({ op: 'write', seed: 7, threads: 4 });   // device threads fault the range in
   * await mirror.migrateToDevice(0, 1024);                      // 1024 pages into device memory
   * gpu.close();
   * ```
   */
  static create(options: DeviceOptions = {}): Device {
    options = checkOptions('options', options);
    const name = checkString('name', options.name ?? 'device');
    return new Device(
      native.createDevice({
        name,
        memory: checkInteger('memory', options.memory ?? 64 << 20, PAGE),
        faultBatch: checkInteger('faultBatch', options.faultBatch ?? 32, 1, 65536),
        faultAround: checkInteger('faultAround', options.faultAround ?? PAGE, PAGE),
        timeoutMs: checkInteger('timeoutMs', options.timeoutMs ?? 1000, 1),
        placement: checkOneOf('placement', options.placement ?? 'host', ['host', 'device'] as const),
        eviction: checkOneOf('eviction', options.eviction ?? 'off', ['off', 'fifo', 'lru'] as const),
        watermark: checkNumber('watermark', options.watermark ?? 1, 0, 1),
        preallocate: checkBoolean('preallocate', options.preallocate, false),
        prefetch: checkOneOf('prefetch', options.prefetch ?? 'off', ['off', 'sequential', 'density'] as const),
        trace: checkBoolean('trace', options.trace, false),
        traceCapacity: checkInteger('traceCapacity', options.traceCapacity ?? 1 << 16, 1, 1 << 24),
        link: resolveLink('link', options.link),
      }),
      name,
    );
  }

  /**
   * Mirrors [offset, offset + length) of a mapping (default: all of it) with this device's page table.
   * writeMode 'shared' (default): the device and the CPU may both write a page (coherent system
   * memory, as HMM). 'single': never both at once: device write access write-protects the CPU's
   * mapping, and a CPU write is a real uffd WP fault that revokes the device's write access before
   * the CPU goes on. Needs shared memory with a file userfaultfd can write-protect (memfd, tmpfs):
   * device threads are threads of this process, so the device writes through its own second
   * mapping of the file; private anonymous memory has no second view (EOPNOTSUPP: use exclusive()).
   *
   * pin (default false): long-term GUP emulation. The range is faulted in for write at once
   * (EPERM without write access) and the mirror is never invalidated: when the CPU side changes
   * (discard, unmap, truncate, protect, the tail a shrinking remap cuts), the device keeps the page
   * it had, in its own memory, and from then on the CPU and the device see different pages
   * (info().diverged counts them). A remap that moves the mapping moves the pinned pages with it:
   * nothing diverges, the entries are faulted again at the new address.
   * Mirror mode stays coherent through the same changes; pin mode shows what a pin costs.
   * The pin faults the range in on the JavaScript thread: over a range registered with a
   * Userfaultfd (whose faults JavaScript may have to resolve) every page must already be present
   * and not write-protected, else it throws ERR_PAGEMIRROR_WOULD_FAULT at once rather than wait for
   * itself; `await mapping.populate({ write: true })` first (a native thread, served meanwhile), or
   * pin before registering.
   *
   * @throws `ERR_PAGEMIRROR_WOULD_FAULT` (pin over registered memory that is not present),
   *   `ERR_PAGEMIRROR_CLOSED` (device or mapping), `ERR_OUT_OF_RANGE`, `ERR_PAGEMIRROR_UNALIGNED`;
   *   SystemError `EOPNOTSUPP` ('single' on private memory), `EPERM` (pin without write access),
   *   `EBUSY`, `EEXIST` (this device already mirrors part of the range).
   * @example
   * ```ts
   * import { Device, mapMemfd } from 'pagemirror';
   * const device = Device.create();
   * const m = mapMemfd(8 << 20);
   * const mirror = device.mirror(m, { writeMode: 'single' });  // CPU writes revoke device write access
   * await mirror.run({ op: 'atomic', unit: 64, threads: 2 });
   * m.bytes[0] = 1;                                              // a real uffd WP fault first
   * ```
   */
  mirror(mapping: Mapping, options: { offset?: number; length?: number; writeMode?: 'shared' | 'single'; pin?: boolean } = {}): Mirror {
    if (this.#closed) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the device is closed');
    if (!(mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'mapping must be a Mapping');
    options = checkOptions('options', options);
    const offset = checkInteger('offset', options.offset ?? 0);
    const length = checkInteger('length', options.length ?? mapping.length - offset, 1);
    const writeMode = checkOneOf('writeMode', options.writeMode ?? 'shared', ['shared', 'single'] as const);
    const pin = checkBoolean('pin', options.pin, false);
    return new Mirror(this.#n.mirror(mapping.native, offset, length, writeMode, pin), this, mapping, offset, length);
  }

  /**
   * Mirrors a shared mapping of a file (mapFile, mapMemfd) with a file strategy: see
   * FileMirrorOptions. Errors: EINVAL (not a shared file mapping), EOPNOTSUPP (copy/bounce on
   * hugetlbfs or DAX: use remote or pin), EBUSY (copy/bounce share their memory with no other
   * mirror), EAGAIN (lease: the file is open elsewhere); strategy 'pin' faults the range in on
   * the JavaScript thread as mirror({ pin: true }) does, and throws ERR_PAGEMIRROR_WOULD_FAULT as it
   * does over memory a Userfaultfd serves.
   * @throws `ERR_PAGEMIRROR_CLOSED`, `ERR_INVALID_ARG_VALUE` (strategy, snapshot), `ERR_OUT_OF_RANGE`.
   * @example
   * ```ts
   * import { Device, mapFile } from 'pagemirror';
   * const dev = Device.create({ memory: 64 << 20 });
   * const fm = dev.mirrorFile(mapFile('/tmp/data.bin'), { strategy: 'bounce', writebackIntervalMs: 20 });
   * await fm.run({ op: 'write', unit: 64, threads: 2 });
   * await fm.fsync();                  // the device's data, written through a stable snapshot
   * console.log(fm.accounting());
   * ```
   */
  mirrorFile(mapping: Mapping, options: FileMirrorOptions = {}): FileMirror {
    if (this.#closed) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the device is closed');
    if (!(mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'mapping must be a Mapping');
    options = checkOptions('options', options);
    const lease = checkBoolean('lease', options.lease, false);
    const offset = checkInteger('offset', options.offset ?? 0);
    const length = checkInteger('length', options.length ?? mapping.length - offset, 1);
    const strategy = checkOneOf('strategy', options.strategy ?? 'remote', ['remote', 'copy', 'bounce', 'pin'] as const);
    const file = {
      strategy,
      snapshot: checkOneOf('snapshot', options.snapshot ?? 'pagecache', ['pagecache', 'buffer'] as const),
      writebackIntervalMs: checkInteger('writebackIntervalMs', options.writebackIntervalMs ?? 0),
      chunkPages: checkInteger('chunkPages', options.chunkPages ?? 64, 1, 1 << 16),
    };
    const n = this.#n.mirror(mapping.native, offset, length, 'shared', false, file);
    const fm = new FileMirror(n, this, mapping, offset, length, strategy);
    if (lease) {
      try {
        fm.takeLease();
      } catch (err) {
        fm.close();
        throw err;
      }
    }
    return fm;
  }

  /**
   * fork()s, and the child runs `steps` natively (no JavaScript there) on a device of its own (a
   * fresh device with this one's memory size) that mirrors [offset, offset + length) of the
   * mapping in the child's copy of the address space: the kernel's anon_write_child. Before the
   * fork, every mirror's device pages come home and device write access to private pages goes,
   * so the child sees the parent's data and both sides copy on write. Each step's result comes
   * back through a pipe as it ends; the child never outlives this process (PR_SET_PDEATHSIG).
   * Errors: EACCES (a cpu-* step the protection forbids: it would SIGSEGV), ETIMEDOUT (the child
   * was killed at timeoutMs; err.steps has the steps it finished), those of fork(2). A step's own
   * failure is its `error`, not a rejection.
   */
  forkRun(mapping: Mapping, steps: ForkStep[], options: ForkRunOptions = {}): Promise<ForkRunResult> {
    if (this.#closed) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the device is closed');
    if (!(mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'mapping must be a Mapping');
    if (!Array.isArray(steps)) throw typeError('ERR_INVALID_ARG_TYPE', 'steps must be an array');
    options = checkOptions('options', options);
    const offset = checkInteger('offset', options.offset ?? 0);
    const length = checkInteger('length', options.length ?? mapping.length - offset, 1);
    const list = steps.map((st, k) => {
      if (typeof st !== 'object' || st === null) throw typeError('ERR_INVALID_ARG_TYPE', `steps[${k}] must be an object`);
      return {
        op: checkOneOf(`steps[${k}].op`, st.op, FORK_OPS),
        offset: checkInteger(`steps[${k}].offset`, st.offset ?? 0),
        npages: st.npages === undefined ? undefined : checkInteger(`steps[${k}].npages`, st.npages, 1),
        seed: checkInteger(`steps[${k}].seed`, st.seed ?? 1),
      };
    });
    const memory = checkInteger('memory', options.memory ?? this.memory().slots * this.memory().pageSize, PAGE);
    const timeoutMs = checkInteger('timeoutMs', options.timeoutMs ?? 10_000, 1, 600_000);
    return native.forkDevice(mapping.native, offset, length, list, { memory, timeoutMs }) as Promise<ForkRunResult>;
  }

  /**
   * Fault, migration and invalidation counters since create(); with a link, also `modeledNs` and
   * `modeled` (modeled device time by category: faults, migrateToDevice, migrateToHost, evictions,
   * writeback, remoteAccess, each with ns, count and bytes).
   */
  counters(): DeviceCounters {
    return this.#n.counters();
  }

  /** Evicts all of this device's memory back to the host (the kernel device's release). Returns pages moved. */
  release(): Promise<number> {
    return this.#n.release();
  }

  /** The trace events recorded since the last call (needs `trace: true`), and how many were dropped. */
  drainTrace(): { events: TraceEvent[]; dropped: number } {
    const t = this.#n.drainTrace();
    return { events: t.events.map((e) => ({ device: this.name, ...e })), dropped: t.dropped };
  }

  /** drainTrace() as JSON lines (one event per line; addresses as strings), for a stream or a file. */
  drainTraceLines(): string {
    const { events, dropped } = this.drainTrace();
    const lines = events.map((e) => JSON.stringify(e, (_k, v) => (typeof v === 'bigint' ? '0x' + v.toString(16) : v)));
    if (dropped) lines.push(JSON.stringify({ device: this.name, type: 'dropped', events: dropped }));
    return lines.length ? lines.join('\n') + '\n' : '';
  }

  /**
   * Device memory: slots (pages) in all and in use; tableBytes, the host memory its mirrors' page
   * tables hold (allocated per 2 MiB of mirrored range on first use, 8 B per entry).
   */
  memory(): { pageSize: number; slots: number; used: number; tableBytes: number } {
    return this.#n.memory();
  }

  /** Stops the fault service; threads still waiting for a fault fail with ENODEV. Idempotent. */
  close(): void {
    this.#closed = true;
    this.#n.close();
  }

  /** close(), for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }
}
