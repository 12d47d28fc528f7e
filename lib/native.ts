// The compiled addon, typed. Everything below this file is thin: it validates, names things and
// forwards. The addon is a source build (build/Release) or a prebuilt binary (prebuilds/): see
// addon-path.ts for the order.
import { createRequire } from 'node:module';
import path from 'node:path';
import { loadAddon } from './addon-path.js';

const require = createRequire(import.meta.url);

export interface NativeMapping {
  readonly address: bigint;
  readonly length: number;
  info(): NativeMappingInfo;
  buffer(offset?: number, length?: number): ArrayBuffer;
  protect(offset: number, length: number, prot: number): void;
  advise(offset: number, length: number, advice: number): void;
  sync(offset: number, length: number, flags: number): void;
  /** A bigint address, or with dontUnmap the old range as a new native mapping. */
  remap(length: number, mayMove: boolean, address?: bigint, dontUnmap?: boolean): bigint | NativeMapping;
  fallocate(mode: number, offset: number, length: number): void;
  truncate(length: number): void;
  residency(offset: number, length: number): Uint8Array;
  cachestat(offset: number, length: number): CacheStat;
  pagemap(offset: number, length: number): BigUint64Array;
  statx(): StatxResult;
  readInto(offset: number, target: Uint8Array): number;
  writeFrom(offset: number, source: Uint8Array): number;
  unmap(offset: number, length: number): void;
  close(): void;
}

/** @inline */
export interface NativeFileStats {
  strategy: 'remote' | 'copy' | 'bounce' | 'pin';
  /** shmem (tmpfs, memfd) copy/bounce: CPU mmap accesses fault and pull device pages back. */
  cpuFaultsIntercepted: boolean;
  leaseHeld: boolean;
  /** Pages whose data is in this device's memory now (copy, bounce). */
  devicePages: number;
  /** Pages the device wrote since they were last written back. */
  dirtyPages: number;
  /** bounce on tmpfs: pages the file has no copy of (their host page was freed). */
  soleCopies: number;
  /** Pages read from the file into device memory (A into A'). */
  loadedPages: number;
  /** Host pages given up after loading (bounce: punched on tmpfs, dropped from the page cache elsewhere). */
  freedPages: number;
  /** Device pages brought back by a CPU fault or by read()/write() (copy's pull-back). */
  pulledBack: number;
  /** copy/bounce on shmem: CPU read faults served from the page cache (write-protected) while the device kept its clean copy. */
  sharedReads: number;
  writebacks: number;
  /** Pages the library wrote to the file (remote/pin: pages the kernel wrote while held stable). */
  writtenPages: number;
  /** Bytes copied into bounce pages by writeback. */
  snapshotBytes: number;
  readBytes: number;
  writeBytes: number;
  leaseBreaks: number;
  /** Device pages the file could not take (ENOSPC, EIO): they stayed on the device, dirty. */
  storeErrors: number;
  /** Writeback errors the kernel reported to a wait of the library (sync_file_range, fdatasync, msync). */
  writeErrors: number;
  /** Pages written to the page cache whose write no wait has confirmed yet (not on tmpfs/memfd, where the page cache is the file). */
  unconfirmedPages: number;
  /** Pages whose data may be lost to a write error (the page cache held the only copy): sticky until acknowledgeLoss(). */
  lostPages: number;
  /** The error that lost them ('ENOSPC', 'EIO'...), null if nothing is lost; set with lostPages 0 when the lost data is not the library's to name. */
  loss: string | null;
  writebackNs: number;
}

/** Pages of a write error: how many, and where (byte ranges of the mirror). */
/** @inline */
export interface NativeWriteErrorPages {
  pages: number;
  ranges: { offset: number; length: number }[];
}

export interface NativeMappingInfo {
  kind: 'anonymous' | 'memfd' | 'file';
  address: bigint;
  length: number;
  pageSize: number;
  shared: boolean;
  hugetlb: boolean;
  fd: number;
  fileOffset: number;
  path?: string;
  name?: string;
  closed: boolean;
  registered: boolean;
  pins: number;
  protection: { offset: number; length: number; prot: number }[];
  holes: { offset: number; length: number }[];
}

/** @inline */
export interface CacheStat {
  cache: number;
  dirty: number;
  writeback: number;
  evicted: number;
  recentlyEvicted: number;
}

/** @inline */
export interface StatxResult {
  size: number;
  blocks: number;
  blksize: number;
  mode: number;
  attributes: bigint;
  attributesMask: bigint;
  dax: boolean;
  devMajor: number;
  devMinor: number;
}

export interface NativeBatch {
  addresses: BigUint64Array;
  flags: Uint32Array;
  tids: Uint32Array;
  events: NativeEvent[];
}

export type NativeEvent =
  | { type: 'fork'; fd: number }
  | { type: 'remap'; from: bigint; to: bigint; length: number }
  | { type: 'remove'; start: bigint; end: bigint }
  | { type: 'unmap'; start: bigint; end: bigint };

/** @inline */
export interface NativeStats {
  reads: number;
  messages: number;
  faults: number;
  fastResolved: number;
  fastPages: number;
  forwarded: number;
  events: number;
  batches: number;
  maxBatch: number;
  eexist: number;
  /**
   * Pages a `zero` rule filled over a uffd-wp marker: a page write-protected while it was not
   * present, which UFFDIO_ZEROPAGE refuses (EEXIST); it gets a write-protected zero page by
   * UFFDIO_COPY instead, so a write to it is still a WP fault. Published just after the fill
   * (which wakes the faulter), so it may lag an access that has just finished by microseconds.
   */
  markerFills: number;
  eagain: number;
  errors: number;
  serviceNs: number;
  /** CPU time of the service threads (CLOCK_THREAD_CPUTIME_ID), ns: what polling costs shows here. */
  cpuNs: number;
  /** Wall time spent polling the descriptor without sleeping, ns. */
  spinNs: number;
  /** Spins that found a message (a sleep and a wake-up saved). */
  spinHits: number;
  /** Times a worker slept in poll(). */
  sleeps: number;
  /** The spin budget now (adaptive: the largest of the workers'), ns. */
  spinBudgetNs: number;
  /** One entry per running worker. */
  workers: NativeWorkerStats[];
}

/** @inline */
export interface NativeWorkerStats {
  /** The worker's thread id (/proc/self/task/<tid>). */
  tid: number;
  reads: number;
  faults: number;
  fastResolved: number;
  forwarded: number;
  cpuNs: number;
  spinNs: number;
  spinHits: number;
  sleeps: number;
  spinBudgetNs: number;
}

export type NativePollMode = 'off' | 'fixed' | 'adaptive';

/** @inline */
export interface NativeEngineStats {
  faults: number;
  reads: number;
  batches: number;
  maxBatch: number;
  cpuNs: number;
  spinNs: number;
  spinHits: number;
  sleeps: number;
  spinBudgetNs: number;
  workerCount: number;
  workers: NativeWorkerStats[];
}

export interface NativeRule {
  mapping: NativeMapping | bigint;
  offset?: number;
  length?: number;
  action: 'copy' | 'zero' | 'move' | 'poison' | 'unprotect' | 'continue' | 'handler';
  /** handler: the pager (or the fault server's remote client) whose engine resolves every fault in the range. */
  handler?: NativePager | NativeRemoteClient;
  source?: NativeMapping;
  sourceOffset?: number;
  granule?: number;
  mode?: number;
}

type Target = NativeMapping | bigint;

export interface NativePagerStats {
  faults: number; missing: number; wp: number; minor: number;
  fills: number; fillBytes: number; prefetched: number;
  evictions: number; evictAborts: number;
  writebacks: number; writebackBytes: number; waits: number;
  resident: number; dirty: number; limit: number;
  writeErrors: number; fillErrors: number;
  /** Fills that found the file shorter than at pager() (truncated under it): pages past its end poisoned. */
  shortFills: number;
  /** Dirty granules given up by acknowledgeLoss(). */
  discarded: number;
  /** writeback 'pagecache': evicted granules whose write flush()'s fdatasync found failed (no copy left). */
  lost: number;
  fillNs: number; writebackNs: number;
}
export interface NativePager {
  attach(uffdFd: number): void;
  flush(): Promise<void>;
  prefetch(firstGranule: number, endGranule: number): Promise<number>;
  install(granule: number, data: Uint8Array): void;
  poison(address: bigint): void;
  stats(): NativePagerStats;
  lastError(): (Error & { granules: number[] }) | null;
  acknowledgeLoss(): Promise<(Error & { granules: number[] }) | null>;
  close(): void;
}
/** What a resolve ioctl did: bytes resolved, and whether a page already existed (EEXIST). */
export interface ResolveResult {
  /** Bytes resolved by this call. */
  bytes: number;
  /** The kernel found a page already present (another thread's fault won the race): success. */
  exists: boolean;
}

export interface NativeUserfaultfd {
  info(): {
    fd: number;
    features: bigint;
    ioctls: bigint;
    negotiated: boolean;
    userModeOnly: boolean;
    openedBy: 'device' | 'syscall' | 'adopted';
    deviceError: string;
    syscallError: string;
    serving: boolean;
  };
  api(features: bigint): { features: bigint; ioctls: bigint };
  register(m: NativeMapping, offset: number, length: number, mode: number): bigint;
  unregister(m: Target, offset: number, length: number): void;
  copy(dst: Target, offset: number, length: number, src: NativeMapping | Uint8Array | bigint, srcOffset: number, mode: number): ResolveResult;
  zeropage(dst: Target, offset: number, length: number, mode: number): ResolveResult;
  continue(dst: Target, offset: number, length: number, mode: number): ResolveResult;
  move(dst: Target, offset: number, length: number, src: NativeMapping | bigint, srcOffset: number, mode: number): ResolveResult;
  poison(dst: Target, offset: number, length: number, mode: number): ResolveResult;
  writeProtect(dst: Target, offset: number, length: number, mode: number): void;
  wake(dst: Target, offset: number, length: number): void;
  fallback(addresses: BigUint64Array, flags: Uint32Array): void;
  setTap(recorder: NativeTraceRecorder | null): void;
  resolveMany(
    action: 'copy' | 'zeropage' | 'continue' | 'move' | 'unprotect' | 'poison',
    dst: Target,
    offsets: Float64Array,
    length: number,
    src: NativeMapping | Uint8Array | undefined,
    srcOffsets: Float64Array | undefined,
    mode: number,
    replay: boolean,
  ): { bytes: number; exists: number };
  serve(callback: (batch: NativeBatch) => void, maxBatch: number, workers?: number, pollMode?: NativePollMode, spinUs?: number): void;
  reconfigure(maxBatch: number, workers?: number, pollMode?: NativePollMode, spinUs?: number): void;
  setRules(rules: NativeRule[]): void;
  stats(): NativeStats;
  outstanding(): BigUint64Array;
  ref(): void;
  unref(): void;
  close(outcome: 'wake' | 'zero' | 'sigbus'): void;
}

export interface NativeAccessOptions {
  op?: 'read' | 'write' | 'rmw' | 'verify';
  pattern?: 'sequential' | 'strided' | 'random';
  unit?: number;
  stride?: number;
  ops?: number;
  seed?: number;
  threads?: number;
  latency?: boolean;
  barrier?: boolean;
  delayMs?: number;
}

export interface NativeAccessResult {
  ops: number;
  checksum: bigint;
  mismatches: number;
  firstMismatch?: number;
  elapsedNs: number;
  signal?: 'SIGBUS';
  signalAddress?: bigint;
  latencyNs?: Uint32Array;
}

export interface NativeForkResult {
  pid: number;
  exitCode?: number;
  termSignal?: string;
  ops?: number;
  checksum?: bigint;
  mismatches?: number;
  signal?: 'SIGBUS';
  signalAddress?: bigint;
}

/** @inline */
export interface NativeForkStepResult {
  op: string;
  offset: number;
  npages: number;
  checksum: bigint;
  mismatches: number;
  faults: number;
  cpages: number;
  moved: number;
  byMove: number;
  byCopy: number;
  zeroFilled: number;
  cpuFaults: number;
  skipped: Record<string, number>;
  elapsedNs: number;
  error?: Error & { code: string; errno: number; syscall: string; step: number; page: number };
}

export interface NativeForkDeviceResult {
  pid: number;
  exitCode?: number;
  termSignal?: string;
  steps: NativeForkStepResult[];
  counters?: { faultRounds: number; faultedPages: number; migratedToDevice: number; migratedToHost: { explicit: number; 'cpu-fault': number } };
}

export interface NativeUffdProbe {
  available: boolean;
  error?: string;
  deviceError: string;
  syscallError: string;
  openedBy?: 'device' | 'syscall';
  userModeOnly?: boolean;
  apiError?: string;
  /** Asking for EVENT_FORK failed with this (EPERM: user-mode-only without CAP_SYS_PTRACE). */
  eventForkError?: string;
  features?: bigint;
  ioctls?: bigint;
  register?: Record<string, Record<string, bigint | string>>;
}

/** @inline */
export interface NativeDeviceCounters {
  faultRounds: number;
  faultRequests: number;
  faultedPages: number;
  maxBatch: number;
  serviceNs: number;
  invalidatedPages: number;
  prefetchedPages: number;
  invalidations: Record<string, number>;
  migratedToDevice: Record<string, number>;
  migratedToHost: Record<string, number>;
  /** With a link: modeled device time in all (the sum of `modeled`'s categories), ns. */
  modeledNs?: number;
  /**
   * With a link: modeled time by what was charged. count: fault rounds, transfers (migrations,
   * evictions, writeback runs) or remote accesses; bytes: what crossed the link.
   */
  modeled?: Record<'faults' | 'migrateToDevice' | 'migrateToHost' | 'evictions' | 'writeback' | 'remoteAccess', { ns: number; count: number; bytes: number }>;
}

/** @inline */
export type NativeTraceEvent =
  | { type: 'fault-batch'; tNs: number; mirror: bigint; faults: number; pages: number; serviceNs: number; modeledNs?: number }
  | { type: 'migrate-to-device' | 'migrate-to-host'; tNs: number; mirror: bigint; offset: number; pages: number; bytes: number; trigger: string; modeledNs?: number }
  | { type: 'invalidate'; tNs: number; mirror: bigint; offset: number; pages: number; cause: string };

export interface NativeKernelResult {
  ops: number;
  checksum: bigint;
  mismatches: number;
  faults: number;
  cpages: number;
  elapsedNs: number;
  modeledNs?: number;
  modeledFaultNs?: number;
  modeledRemoteNs?: number;
  remoteAccesses?: number;
  remoteBytes?: number;
  data?: Buffer;
}

export interface NativeMirror {
  run(kernel: Record<string, unknown>): Promise<NativeKernelResult>;
  read(offset: number, npages: number): Promise<NativeKernelResult & { data: Buffer }>;
  write(offset: number, data: Uint8Array): Promise<NativeKernelResult>;
  entries(page: number, npages: number): BigUint64Array;
  migrateToDevice(offset: number, npages: number, useMove: boolean, atomic?: boolean, granule?: number): Promise<NativeMigrateResult>;
  exclusiveCount(offset: number, npages: number): number;
  migrateToHost(offset: number, npages: number): Promise<{ cpages: number; elapsedNs: number }>;
  snapshot(offset: number, npages: number): Uint8Array;
  info(): {
    closed: boolean;
    dead?: boolean;
    address?: bigint;
    npages?: number;
    pageSize?: number;
    /** Host memory the page table really holds: 4 KiB blocks of 512 entries, allocated where entries were set, and a small directory. */
    tableBytes?: number;
    invalidations?: number;
    invalidatedPages?: number;
    rangeFaults?: number;
    retries?: number;
    pinned?: boolean;
    diverged?: number;
  };
  close(): void;
  fileRead(offset: number, length: number): Promise<Buffer>;
  fileWrite(offset: number, data: Uint8Array): Promise<void>;
  writeback(offset: number, length: number, sync: boolean): Promise<{ pages: number; bytesCopied: number; elapsedNs: number }>;
  fileStats(): NativeFileStats;
  takeLease(): void;
  acknowledgeLoss(): (NativeWriteErrorPages & { code: string; errno: number; syscall: string }) | null;
  replay(pages: Float64Array, ops: Uint8Array, options: { threads: number; window: number; seed: number }): Promise<NativeReplayResult>;
}

/** What a trace recorder counted (lib/trace.ts). */
export interface NativeRecorderStats {
  /** Records written: faults, samples, dropped and the end record. */
  records: number;
  faults: number;
  samples: number;
  sampleRuns: number;
  dropped: number;
  ignored: number;
  bytes: number;
  writerCpuNs: number;
  sampleNs: number;
  tapNs: number;
  tapped: number;
  /** Range indices given out: the first ranges and those added while recording. */
  ranges: number;
  /** Ranges that could not be added (a trace names at most 65535): their faults are ignored. */
  rangesRefused: number;
}
export interface NativeTraceRecorder {
  stop(): NativeRecorderStats;
  stats(): NativeRecorderStats;
  addRange(range: { start: bigint; length: number; modes: number; shared: boolean }): number;
  removeRange(index: number): void;
  writeRound(): void;
}
/** What a replay counted (lib/replay.ts); migrations are pages, by trigger. */
export interface NativeReplayResult {
  accesses: number;
  hits: number;
  misses: number;
  refaults: number;
  windows: number;
  deviceFaults: number;
  faultRounds: number;
  faultedPages: number;
  prefetchedPages: number;
  invalidatedPages: number;
  toDevice: Record<string, number>;
  toHost: Record<string, number>;
  checksum: bigint;
  hostNs: number;
  /** With the device's link model only (docs/link-model.md). */
  modeledNs?: number;
  modeledFaultNs?: number;
  modeledRemoteNs?: number;
  remoteAccesses?: number;
  remoteBytes?: number;
}

export interface NativeMigrateResult {
  cpages: number;
  moved: number;
  byMove: number;
  byCopy: number;
  zeroFilled: number;
  elapsedNs: number;
  skipped: { offset: number; reason: string }[];
}

export interface NativeDevice {
  release(): Promise<number>;
  drainTrace(): { events: NativeTraceEvent[]; dropped: number };
  mirror(m: NativeMapping, offset: number, length: number, writeMode?: 'shared' | 'single', pin?: boolean, file?: Record<string, unknown>): NativeMirror;
  counters(): NativeDeviceCounters;
  memory(): { pageSize: number; slots: number; used: number; tableBytes: number };
  close(): void;
}

export interface NativeRemoteRange {
  address: bigint;
  length: number;
  modes: number;
  shared: boolean;
  offset: number;
}
export interface NativeRemoteClient {
  info(): { id: number; pid: number; uid: number; gid: number; fd: number; features: bigint; poolPages: number; poolHeld: number; ranges: NativeRemoteRange[] };
  evict(address: bigint, length: number): number;
  writeProtect(address: bigint, length: number): number;
  configure(prefetch: number, protectReads: boolean): void;
  takeTouches(): BigUint64Array;
  counters(): { evicted: number; restored: number; restoredOnRelease: number; zeroFilled: number; continued: number; unprotected: number; retried: number; raced: number; prefetched: number; protectedPages: number; touchesDropped: number };
  release(): void;
  setRecorder(recorder: NativeTraceRecorder | null): void;
}
export interface NativeServerEvent {
  type: 'register' | 'unregister' | 'closed';
  first: boolean;
  client: NativeRemoteClient;
}
export interface NativeFaultServer {
  drop(id: number): void;
  stats(): { accepted: number; refusedUid: number; refusedFull: number; protocolErrors: number; refusals: number; ended: number; helloTimeouts: number; connections: number };
  close(): void;
}

export interface NativeAddon {
  listenFaultServer(path: string, allowUids: number[] | undefined, maxClients: number, callback: (events: NativeServerEvent[]) => void, helloTimeoutMs?: number): NativeFaultServer;
  createDevice(options: Record<string, unknown>): NativeDevice;
  createPager(region: NativeMapping, options: Record<string, unknown>): NativePager;
  map(options: Record<string, unknown>): NativeMapping;
  openUserfaultfd(options: { nonBlocking?: boolean; userModeOnly?: boolean; via?: 'auto' | 'device' | 'syscall' }): NativeUserfaultfd;
  adoptUserfaultfd(fd: number, features: bigint, take?: boolean): NativeUserfaultfd;
  runAccess(m: NativeMapping, offset: number, length: number, options: NativeAccessOptions): Promise<NativeAccessResult>;
  forkRun(m: NativeMapping, offset: number, length: number, options: NativeAccessOptions): Promise<NativeForkResult>;
  forkDevice(
    m: NativeMapping,
    offset: number,
    length: number,
    steps: { op: string; offset?: number; npages?: number; seed?: number }[],
    options: { memory: number; timeoutMs: number },
  ): Promise<NativeForkDeviceResult>;
  copyAsync(m: NativeMapping, offset: number, data: Uint8Array, toMapping: boolean): Promise<number>;
  populateAsync(m: NativeMapping, offset: number, length: number, write: boolean): Promise<void>;
  pagemapScan(
    m: NativeMapping,
    offset: number,
    length: number,
    options: Record<string, number>,
  ): { regions: { offset: number; length: number; categories: number }[]; walkEnd: number };
  statx(path: string): StatxResult;
  fsType(path: string): number;
  uname(): { sysname: string; release: string; version: string; machine: string; pageSize: number };
  probeUffd(userModeOnly: boolean): NativeUffdProbe;
  TraceRecorder: new (options: {
    ranges: { start: bigint; length: number }[];
    path: string;
    header: string;
    rings: number;
    ringCapacity: number;
    sampleIntervalMs: number;
    writeRounds: boolean;
    pid: number;
  }) => NativeTraceRecorder;
  probeTraceSampling(start: bigint, length: number, pid: number): number;
  configureEngine(workers?: number, pollMode?: NativePollMode, spinUs?: number): void;
  engineStats(): NativeEngineStats;
  setAffinity(cpus: number[]): void;
  getAffinity(): number[];
  constants: Record<string, number>;
}

function load(): NativeAddon {
  // PAGEMIRROR_ADDON names another build of the addon (the sanitizer build of `npm run
  // test:sanitize`); it must load, or the run would silently test the plain addon instead.
  const chosen = process.env.PAGEMIRROR_ADDON;
  if (chosen) return require(path.resolve(chosen)) as NativeAddon;
  return loadAddon() as NativeAddon;
}

export const native: NativeAddon = load();
export const K = native.constants;
