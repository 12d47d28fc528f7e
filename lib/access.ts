// Access kernels on native threads: how tests, benchmarks and the engine touch registered memory
// without ever faulting on the JavaScript thread.
import { native, type NativeAccessResult, type NativeForkResult } from './native.js';
import { Mapping } from './mapping.js';
import { checkInteger, checkOneOf, rangeError, typeError } from './errors.js';
import { checkBoolean, checkOptions } from './validate.js';
import { checkServed } from './served.js';

/** What an {@link access} kernel does to each word: read, write, read-modify-write, or verify a written pattern. */
export type AccessOp = 'read' | 'write' | 'rmw' | 'verify';
/** The order in which an {@link access} kernel visits its units. */
export type AccessPattern = 'sequential' | 'strided' | 'random';

/** Options of {@link access}: the kernel native threads run over a mapping. */
export interface AccessOptions {
  /** Byte offset into the mapping, a multiple of 8 (the kernels use 8-byte words). @default 0 */
  offset?: number;
  /** Bytes; default to the end. */
  length?: number;
  /**
   * read: sum the words. write: store seed + word index. rmw: increment. verify: read and count
   * words that differ from seed + word index (what a write with the same seed stored).
   * Default 'read'.
   */
  op?: AccessOp;
  /** @default 'sequential' */
  pattern?: AccessPattern;
  /** Sequential: bytes between touched words. Default the base page size (one word per page). */
  unit?: number;
  /** Strided: bytes between consecutive accesses, wrapping around. Default `unit`. */
  stride?: number;
  /** Accesses in all. Default length / unit. */
  ops?: number;
  /** Random-pattern seed and write/verify value base. @default 1 */
  seed?: number;
  /** Threads sharing the accesses (contiguous shares). @default 1 */
  threads?: number;
  /** Record each access's latency (ns). @default false */
  latency?: boolean;
  /** Start all threads together, so their faults arrive at once. @default true */
  barrier?: boolean;
}

/** What {@link access} did and measured. */
export interface AccessResult {
  ops: number;
  /** Wrapping 64-bit sum of words read (read/rmw/verify) or written (write). */
  checksum: bigint;
  /** verify: words that did not hold seed + word index. */
  mismatches: number;
  firstMismatch?: number;
  elapsedNs: number;
  /** Set when an access hit SIGBUS (poisoned page, truncated file...): that thread stopped there. */
  signal?: 'SIGBUS';
  signalAddress?: bigint;
  latencyNs?: Uint32Array;
}

function spec(mapping: Mapping, o: AccessOptions): [number, number, Record<string, unknown>] {
  if (!(mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'mapping must be a Mapping');
  o = checkOptions('options', o);
  const offset = checkInteger('offset', o.offset ?? 0);
  if (offset % 8 !== 0) throw rangeError('ERR_PAGEMIRROR_UNALIGNED', `offset (${offset}) must be a multiple of 8: the access kernels use 8-byte words`);
  const length = checkInteger('length', o.length ?? mapping.length - offset, 8);
  return [
    offset,
    length,
    {
      op: checkOneOf('op', o.op ?? 'read', ['read', 'write', 'rmw', 'verify'] as const),
      pattern: checkOneOf('pattern', o.pattern ?? 'sequential', ['sequential', 'strided', 'random'] as const),
      unit: o.unit === undefined ? undefined : checkInteger('unit', o.unit, 8),
      stride: o.stride === undefined ? undefined : checkInteger('stride', o.stride),
      ops: o.ops === undefined ? undefined : checkInteger('ops', o.ops),
      seed: o.seed === undefined ? undefined : checkInteger('seed', o.seed),
      threads: checkInteger('threads', o.threads ?? 1, 1, 1024),
      latency: checkBoolean('latency', o.latency, false),
      barrier: checkBoolean('barrier', o.barrier, true),
    },
  ];
}

/**
 * Runs an access kernel on native threads and resolves when every thread is done. Faults they take
 * are served meanwhile (the JavaScript thread stays free). Errors: EACCES before starting when the
 * protection forbids the access (it would SIGSEGV); ERR_PAGEMIRROR_NOT_SERVED before starting when
 * the range is registered with a library userfaultfd that nothing serves and a page would fault
 * (the access would sleep forever); a SIGBUS is reported in the result.
 *
 * @throws {SystemError} `EACCES` (the protection forbids the access).
 * @throws {Error} `ERR_PAGEMIRROR_NOT_SERVED`, `ERR_PAGEMIRROR_CLOSED`, `ERR_PAGEMIRROR_FILE_STRATEGY`.
 * @throws {RangeError} `ERR_OUT_OF_RANGE`, `ERR_PAGEMIRROR_UNALIGNED` (offset not a multiple of 8);
 *   {TypeError} `ERR_INVALID_ARG_VALUE` (op, pattern), before anything starts.
 * @example
 * ```ts
 * import { mapAnonymous, access } from 'pagemirror';
 * const m = mapAnonymous(64 << 20);
 * const w = await access(m, { op: 'write', seed: 3, threads: 2 });     // first touch: real faults
 * const r = await access(m, { op: 'verify', seed: 3, pattern: 'random', latency: true });
 * console.log(w.elapsedNs, r.checksum);
 * ```
 */
export async function access(mapping: Mapping, options: AccessOptions = {}): Promise<AccessResult> {
  const [offset, length, s] = spec(mapping, options);
  checkServed(mapping, offset, length, s.op !== 'read' && s.op !== 'verify', 'access()');
  return native.runAccess(mapping.native, offset, length, s) as Promise<NativeAccessResult>;
}

/** What {@link forkAccess} measured in the parent and the child. */
export interface ForkResult {
  pid: number;
  exitCode?: number;
  termSignal?: string;
  ops?: number;
  checksum?: bigint;
  mismatches?: number;
  signal?: 'SIGBUS';
  signalAddress?: bigint;
}

/** The longest forkAccess() lets its child sleep first (delayMs): one minute. */
export const FORK_DELAY_MAX_MS = 60_000;

/**
 * fork()s; the child runs one access kernel on one thread (Node cannot run JavaScript in a forked
 * child), reports through a pipe and exits. The fork happens on a native thread, because with the
 * eventFork feature fork() sleeps until the handler reads the event. The child never outlives this
 * process: it gets SIGKILL when the process exits or dies (PR_SET_PDEATHSIG).
 * delayMs: the child sleeps this long before its access (default 0; at most FORK_DELAY_MAX_MS,
 * else RangeError ERR_OUT_OF_RANGE).
 */
export async function forkAccess(mapping: Mapping, options: AccessOptions & { delayMs?: number } = {}): Promise<ForkResult> {
  const [offset, length, s] = spec(mapping, options);
  s.delayMs = checkInteger('delayMs', options?.delayMs ?? 0, 0, FORK_DELAY_MAX_MS);
  return native.forkRun(mapping.native, offset, length, s) as Promise<NativeForkResult>;
}
