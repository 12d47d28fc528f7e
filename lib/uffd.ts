// Userfaultfd: open, negotiate, register, resolve, and serve faults in batches.
//
// The threading rule (DESIGN.md): the JavaScript thread never touches registered memory itself.
// Faults are read by a native service thread; those a rule covers are resolved there without
// entering JavaScript (the fast path), the rest reach `onFaults` in batches.
import { native, K, type NativePager, type NativeUserfaultfd, type NativeBatch, type NativeRule, type NativeStats, type ResolveResult } from './native.js';
import {
  FEATURES,
  OPT_IN_FEATURES,
  EVENT_FEATURES,
  REGISTER_MODES,
  featureNames,
  ioctlNames,
  type FeatureName,
  type IoctlName,
  type RegisterMode,
} from './constants.js';
import { Mapping } from './mapping.js';
import { checkInteger, checkOneOf, stateError, typeError } from './errors.js';
import { checkBoolean, checkFunction, checkOffsets, checkOptions, checkU64 } from './validate.js';
import { noteRegistered, noteUnregistered, type ServedHolder } from './served.js';

export type { ResolveResult } from './native.js';

/** Options of {@link Userfaultfd.open}. */
export interface OpenOptions {
  /**
   * Features to negotiate. 'default' (the default): every feature the kernel offers except those
   * that change what a fault means or make the kernel wait on the handler (sigbus, wpAsync and the
   * four events), which must be named. 'all': everything offered.
   */
  features?: 'default' | 'all' | FeatureName[];
  /**
   * Open a user-mode-only userfaultfd (UFFD_USER_MODE_ONLY: faults raised inside the kernel, such
   * as read(2) into registered memory, fail with EFAULT instead) even when a full one is allowed.
   * Default false.
   */
  userModeOnly?: boolean;
  /**
   * How the descriptor is obtained. 'device': USERFAULTFD_IOC_NEW on /dev/userfaultfd (6.1+; for
   * whoever may open the node, whatever vm.unprivileged_userfaultfd says); 'syscall':
   * userfaultfd(2) (CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 for full faults). Either uses
   * that way only, as the kernel's selftests run each test both ways. 'auto' (the default): the
   * device, then the system call, then (unless userModeOnly already asks for it) the user-mode-only
   * variants, the most any caller can get.
   */
  via?: 'auto' | 'device' | 'syscall';
}

/** Options of {@link Userfaultfd.register}. */
export interface RegisterOptions {
  /** Byte offset into the mapping (page aligned). @default 0 */
  offset?: number;
  /** Bytes to register. @default to the end of the mapping */
  length?: number;
  /** Default ['missing']. */
  modes?: RegisterMode[];
}

/** A registered range, as {@link Userfaultfd.register} returns it. */
export interface Registration {
  /** The mapping registered. */
  mapping: Mapping;
  /** Byte offset of the range in the mapping. */
  offset: number;
  /** Bytes registered. */
  length: number;
  /** The fault kinds registered for. */
  modes: RegisterMode[];
  /** Ioctls the kernel allows on this range (not every ioctl works on every memory kind). */
  ioctls: Set<IoctlName>;
}

/** A fault's kind: a missing page, a write to a write-protected page, a minor fault (page in the page cache, not mapped). */
export type FaultKind = 'missing' | 'wp' | 'minor';

/** One page fault as the kernel reported it. */
export class Fault {
  constructor(
    /** Faulting address (exact with the exactAddress feature, else page aligned). */
    readonly address: bigint,
    /** UFFD_PAGEFAULT_FLAG_* bits. */
    readonly flags: number,
    /** Faulting thread id (threadId feature), else 0. */
    readonly tid: number,
    /** The registered mapping the address lies in (undefined for an adopted child's descriptor). */
    readonly mapping: Mapping | undefined,
    /** Byte offset within `mapping` of the page that faulted (page aligned: ready for copy/zeropage). */
    readonly offset: number,
  ) {}
  /** A write fault. */
  get write(): boolean {
    return (this.flags & K.UFFD_PAGEFAULT_FLAG_WRITE!) !== 0;
  }
  /** What kind of fault it is. */
  get kind(): FaultKind {
    if (this.flags & K.UFFD_PAGEFAULT_FLAG_MINOR!) return 'minor';
    if (this.flags & K.UFFD_PAGEFAULT_FLAG_WP!) return 'wp';
    return 'missing';
  }
}

/** A non-fault event the kernel queues when the matching feature is negotiated (eventFork, eventRemap, eventRemove, eventUnmap). */
export type UffdEvent =
  | { type: 'fork'; fd: number; /** Take ownership of the child's userfaultfd (else it is closed, which wakes the child's faults). */ adopt(): Userfaultfd }
  | { type: 'remap'; from: bigint; to: bigint; length: number }
  | { type: 'remove'; start: bigint; end: bigint }
  | { type: 'unmap'; start: bigint; end: bigint };

/** Options of {@link Userfaultfd.serve}. */
export interface ServeOptions {
  /** Faults that no rule resolved, one call per batch. May be async: faults stay asleep until resolved. */
  onFaults?: (faults: Fault[], uffd: Userfaultfd) => void | Promise<void>;
  /** Events (fork, remap, remove, unmap) in the order the kernel queued them. */
  onEvents?: (events: UffdEvent[], uffd: Userfaultfd) => void;
  /**
   * A handler that throws (or rejects) must not leave threads asleep: its batch is resolved with
   * the fallback (zero-fill missing faults, un-protect WP faults, continue minor faults), and the
   * error goes here. Default: the error is reported with process.emitWarning.
   */
  onError?: (err: unknown, faults: Fault[]) => void;
  /** Most messages read per read(2), per worker (1..4096). @default 64 */
  maxBatch?: number;
  /**
   * Native worker threads reading the descriptor (each reads and resolves its own batches; rules
   * are shared; batches handed to JavaScript still coalesce while it is busy). Default 1, at most
   * MAX_SERVICE_WORKERS (64): RangeError ERR_OUT_OF_RANGE otherwise.
   */
  workers?: number;
  /**
   * How a worker waits for the next fault. false (default): it sleeps in poll() at once.
   * { spinUs }: it polls the descriptor without sleeping for up to spinUs microseconds first
   * (0..1000000), which saves the wake-up of a sleeping thread (tens of µs on an idle machine) at
   * the cost of that much CPU. 'adaptive': spins for a budget, at most ADAPTIVE_SPIN_MAX_US, that
   * follows the recent gaps between faults (it grows while faults come soon after a worker went to
   * sleep, halves when they do not). stats() reports the CPU it costs (cpuNs, spinNs).
   */
  poll?: PollOption;
}

/** A worker's way to wait (ServeOptions.poll). */
export type PollOption = false | 'adaptive' | { spinUs?: number };

/** The most service workers a descriptor (or the engine) can have. */
export const MAX_SERVICE_WORKERS = 64;
/** The cap of the adaptive spin budget, µs. */
export const ADAPTIVE_SPIN_MAX_US = 200;

/** Checks ServeOptions.workers / poll before anything starts; the native (workers, mode, spinUs). */
export function serviceArgs(workers: unknown, poll: unknown): [number, 'off' | 'fixed' | 'adaptive', number] {
  const w = checkInteger('workers', workers ?? 1, 1, MAX_SERVICE_WORKERS);
  if (poll === undefined || poll === false) return [w, 'off', 0];
  if (poll === 'adaptive') return [w, 'adaptive', ADAPTIVE_SPIN_MAX_US];
  if (typeof poll !== 'object' || poll === null || Array.isArray(poll))
    throw typeError('ERR_INVALID_ARG_TYPE', "poll must be false, 'adaptive' or { spinUs }");
  const us = checkInteger('poll.spinUs', (poll as { spinUs?: unknown }).spinUs ?? 0, 0, 1_000_000);
  return [w, us === 0 ? 'off' : 'fixed', us];
}

/** How a {@link Rule} resolves its faults natively (UFFDIO_COPY, ZEROPAGE, MOVE, POISON, WRITEPROTECT off, CONTINUE). */
export type RuleAction = 'copy' | 'zero' | 'move' | 'poison' | 'unprotect' | 'continue';

/** A fast-path rule: faults of the right kind in the range are resolved natively, never in JS. */
export interface Rule {
  /** The registered mapping the rule serves; or, for an adopted descriptor of another process (a FaultServer client), `address`. */
  mapping?: Mapping;
  /** Instead of `mapping`: the page-aligned start of the range in the descriptor's own address space (with `length`). */
  address?: bigint;
  offset?: number;
  length?: number;
  /**
   * copy: UFFDIO_COPY from `source` (missing faults). zero: UFFDIO_ZEROPAGE (missing; a page
   * holding a uffd-wp marker gets a write-protected zero page instead, counted in
   * `stats().markerFills`: see {@link Userfaultfd.zeropage}). move:
   * UFFDIO_MOVE from `source` (missing, private anonymous). poison: UFFDIO_POISON (missing; later
   * accesses SIGBUS). unprotect: clear uffd-wp (WP faults). continue: UFFDIO_CONTINUE (minor).
   */
  action: RuleAction;
  source?: Mapping;
  sourceOffset?: number;
  /** Fault-around: resolve the aligned block of this many bytes around the fault. Default one page. */
  granule?: number;
  /** copy/continue: install pages write-protected (MODE_WP). */
  wp?: boolean;
  /** move: tolerate holes in the source (ALLOW_SRC_HOLES). */
  allowSrcHoles?: boolean;
}

/** Options every resolve call takes. */
export interface ResolveOptions {
  /** Do not wake the faulting threads (resolve several ranges, then wake() once). */
  dontWake?: boolean;
}

/** What {@link Userfaultfd.close} does to threads still asleep on a fault: wake them to retry, resolve with zero pages, or poison (SIGBUS). */
export type CloseOutcome = 'wake' | 'zero' | 'sigbus';

/** Counters of the native fault service: {@link Userfaultfd.stats}. */
export type ServiceStats = NativeStats;

/** A mapping, or a raw address for an adopted descriptor. @inline */
type Target = Mapping | bigint;

/**
 * @internal The pager's hook (lib/pager.ts): one rule that hands every fault of `mapping` to the
 * pager's native engine, on the service thread(s). Not exported from the package.
 */
export let setHandlerRule: (u: Userfaultfd, mapping: Mapping, handler: NativePager) => void;
/** @internal The trace recorder's hook (lib/trace.ts): the addon object, to attach a tap to its service. */
export let nativeUffd: (u: Userfaultfd) => NativeUserfaultfd;
/** @internal The fault server's hook (lib/server.ts): its default policy over a client's ranges. */
export let setRemoteHandlerRules: (u: Userfaultfd, ranges: readonly { address: bigint; length: number }[], handler: NativeRule['handler']) => void;

/**
 * A userfaultfd: register ranges of mappings, resolve their faults (copy, zeropage, continue, move,
 * poison, write-protect) by hand, by native rules ({@link Userfaultfd.addRule}) or in JavaScript
 * batches ({@link Userfaultfd.serve}), on native service threads. Made by {@link Userfaultfd.open}.
 */
export class Userfaultfd implements ServedHolder {
  readonly #n: NativeUserfaultfd;
  #features = 0n;
  #registrations: Registration[] = [];
  #rules: Rule[] = [];
  #serving = false;
  // Started by addRule() rather than serve(): a later serve() takes it over.
  #autoServed = false;
  #options: ServeOptions = {};
  #closed = false;

  private constructor(n: NativeUserfaultfd) {
    this.#n = n;
  }

  static {
    setHandlerRule = (u, mapping, handler) => {
      u.#live();
      u.#n.setRules([{ mapping: mapping.native, action: 'handler', handler }]);
      u.#rules = [];
    };
    nativeUffd = (u) => {
      u.#live();
      return u.#n;
    };
    setRemoteHandlerRules = (u, ranges, handler) => {
      u.#live();
      u.#n.setRules(ranges.map((r) => ({ mapping: r.address, length: r.length, action: 'handler', handler })));
      u.#rules = [];
    };
  }

  /**
   * Opens a userfaultfd and negotiates features. By default (via 'auto') tries /dev/userfaultfd,
   * then userfaultfd(2), then the user-mode-only variants (all that vm.unprivileged_userfaultfd=0
   * allows an unprivileged user); `via` picks one way with no fallback.
   * @throws SystemError EPERM (auto: with a message that names each attempt and the three ways to
   *   get access; syscall: full faults refused to this user), ENOENT / EACCES with path
   *   '/dev/userfaultfd' (via 'device': no node here, or not open to this user), EINVAL when a
   *   requested feature is missing.
   * @throws TypeError ERR_INVALID_ARG_VALUE (via not 'auto', 'device' or 'syscall'),
   *   ERR_INVALID_ARG_TYPE (userModeOnly not a boolean).
   * @example
   * ```ts
   * import { Userfaultfd, mapAnonymous } from 'pagemirror';
   * const uffd = Userfaultfd.open();              // every feature the kernel offers, by default
   * console.log(uffd.openedBy, [...uffd.features]);
   * uffd.register(mapAnonymous(1 << 20), { modes: ['missing'] });
   * ```
   */
  static open(options: OpenOptions = {}): Userfaultfd {
    options = checkOptions('options', options);
    const via = checkOneOf('via', options.via ?? 'auto', ['auto', 'device', 'syscall'] as const);
    const n = native.openUserfaultfd({ userModeOnly: checkBoolean('userModeOnly', options.userModeOnly, false), via });
    const u = new Userfaultfd(n);
    try {
      u.#negotiate(options.features ?? 'default');
    } catch (err) {
      n.close('wake');
      throw err;
    }
    return u;
  }

  /**
   * Wraps a userfaultfd this process holds (one received from a FORK event: see UffdEvent.adopt(),
   * or passed in some other way), whose features were negotiated as `features`. The object owns a
   * duplicate (F_DUPFD_CLOEXEC): `fd` stays the caller's to close. Errors: ERR_INVALID_ARG_VALUE
   * (fd is open but not a userfaultfd), EBADF (fd is not open).
   */
  static adopt(fd: number, features: bigint): Userfaultfd {
    return Userfaultfd.#wrap(checkInteger('fd', fd), features, false);
  }

  // take: the library's own fork-event descriptors, which the returned object owns as they are.
  static #wrap(fd: number, features: bigint, take: boolean): Userfaultfd {
    const u = new Userfaultfd(native.adoptUserfaultfd(fd, checkU64('features', features), take));
    u.#features = features;
    return u;
  }

  #negotiate(features: 'default' | 'all' | FeatureName[]): void {
    let want = 0n;
    if (features === 'default' || features === 'all') {
      // What the kernel offers is known only after UFFDIO_API, which can be called once per fd:
      // ask the process-wide probe (it used a throw-away descriptor).
      const offered = offeredFeatures(this.#n.info().userModeOnly);
      for (const name of featureNames(offered)) {
        if (features === 'default' && OPT_IN_FEATURES.includes(name)) continue;
        want |= BigInt(FEATURES[name]);
      }
    } else {
      if (!Array.isArray(features)) throw typeError('ERR_INVALID_ARG_TYPE', 'features must be an array of names');
      for (const name of features) want |= BigInt(FEATURES[checkOneOf('feature', name, Object.keys(FEATURES) as FeatureName[])]);
    }
    // UFFDIO_API answers with every feature the kernel has; what this descriptor enabled is what
    // was asked for (the call fails with EINVAL if any of it is missing).
    this.#n.api(want);
    this.#features = want;
  }

  /** The descriptor's number (owned by this object: closed by close()). */
  get fd(): number {
    return this.#n.info().fd;
  }
  /** Negotiated features. */
  get features(): Set<FeatureName> {
    return new Set(featureNames(this.#features));
  }
  /** The negotiated features as the kernel's UFFD_FEATURE_* bit mask. */
  get featureMask(): bigint {
    return this.#features;
  }
  has(feature: FeatureName): boolean {
    checkOneOf('feature', feature, Object.keys(FEATURES) as FeatureName[]);
    return (this.#features & BigInt(FEATURES[feature])) !== 0n;
  }
  /** How the descriptor was obtained, and whether faults raised inside the kernel are excluded. */
  get openedBy(): 'device' | 'syscall' | 'adopted' {
    return this.#n.info().openedBy;
  }
  /** Opened with UFFD_USER_MODE_ONLY: faults raised inside the kernel fail with EFAULT instead of waiting. */
  get userModeOnly(): boolean {
    return this.#n.info().userModeOnly;
  }
  /** The ranges registered, in registration order. */
  get registrations(): readonly Registration[] {
    return this.#registrations;
  }
  /** Whether close() was called. */
  get closed(): boolean {
    return this.#closed;
  }
  /** Whether a native service reads this descriptor (serve(), or addRule() on an unserved one). */
  get serving(): boolean {
    return this.#serving;
  }

  #live(): void {
    if (this.#closed) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the userfaultfd is closed');
  }

  /**
   * UFFDIO_REGISTER. Errors: EINVAL (mode unsupported for this memory: MINOR needs shmem or
   * hugetlbfs), EBUSY (registered with another userfaultfd), ENOMEM (too many ranges).
   * With event features negotiated, serve() must run first: the kernel makes munmap/madvise/fork
   * wait until the event is read, and only the service thread reads it.
   */
  register(mapping: Mapping, options: RegisterOptions = {}): Registration {
    this.#live();
    if (!(mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'mapping must be a Mapping');
    options = checkOptions('options', options);
    if (!this.#serving && EVENT_FEATURES.some((f) => this.has(f)))
      throw stateError(
        'ERR_PAGEMIRROR_NOT_SERVING',
        'event features are negotiated: call serve() before register(), or munmap/madvise/fork would wait forever for the event to be read',
      );
    const offset = checkInteger('offset', options.offset ?? 0);
    const length = checkInteger('length', options.length ?? mapping.length - offset, 1);
    const modes = options.modes ?? ['missing'];
    if (!Array.isArray(modes) || modes.length === 0) throw typeError('ERR_INVALID_ARG_VALUE', 'modes must name at least one mode');
    let mode = 0;
    for (const m of modes) mode |= REGISTER_MODES[checkOneOf('mode', m, Object.keys(REGISTER_MODES) as RegisterMode[])];
    const ioctls = this.#n.register(mapping.native, offset, length, mode);
    const reg: Registration = { mapping, offset, length, modes: [...modes], ioctls: new Set(ioctlNames(ioctls)) };
    this.#registrations.push(reg);
    noteRegistered(mapping, this);
    return reg;
  }

  /**
   * UFFDIO_UNREGISTER a range (default: the whole mapping); its faults go back to the kernel's
   * default handling. Then UFFDIO_WAKE over the range: a thread asleep on a fault there (one the
   * kernel's own wake in UNREGISTER missed, since Linux 6.6 takes userfaults under the per-VMA
   * lock) faults again, unregistered.
   */
  unregister(mapping: Mapping, options: { offset?: number; length?: number } = {}): void {
    this.#live();
    if (!(mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'mapping must be a Mapping');
    options = checkOptions('options', options);
    const offset = checkInteger('offset', options.offset ?? 0);
    const length = checkInteger('length', options.length ?? mapping.length - offset, 1);
    this.#n.unregister(mapping.native, offset, length);
    this.#registrations = this.#registrations.filter(
      (r) => !(r.mapping === mapping && r.offset >= offset && r.offset + r.length <= offset + length),
    );
    if (!this.#registrations.some((r) => r.mapping === mapping)) noteUnregistered(mapping, this);
  }

  #t(target: Target): Mapping['native'] | bigint {
    if (target instanceof Mapping) return target.native;
    if (typeof target === 'bigint') return target;
    throw typeError('ERR_INVALID_ARG_TYPE', 'target must be a Mapping or a bigint address');
  }

  /**
   * UFFDIO_COPY: atomically installs `length` bytes from `source` and wakes the faulters.
   * Returns {bytes, exists}; exists=true (EEXIST) means another thread's fault already resolved a
   * page: success. Other errors throw with err.bytes = partial progress: EAGAIN (an event is
   * unread: retry), ENOENT (the mapping changed), ESRCH (the process exited), EFAULT.
   * The ioctl reads `source` on the JavaScript thread: a source Mapping registered with a
   * Userfaultfd must be present there (ERR_PAGEMIRROR_WOULD_FAULT otherwise, as for resolveMany()'s
   * copy; `await source.populate()` first). A bigint source is the caller's to keep present.
   */
  copy(target: Target, offset: number, length: number, source: Mapping | Uint8Array | bigint, options: ResolveOptions & { sourceOffset?: number; wp?: boolean } = {}): ResolveResult {
    this.#live();
    const f = flags(options);
    let mode = f.dontWake ? K.UFFDIO_COPY_MODE_DONTWAKE! : 0;
    if (f.wp) mode |= K.UFFDIO_COPY_MODE_WP!;
    const src = source instanceof Mapping ? source.native : source;
    return this.#n.copy(this.#t(target), checkInteger('offset', offset), checkInteger('length', length, 1), src, checkInteger('sourceOffset', options.sourceOffset ?? 0), mode);
  }

  /**
   * UFFDIO_ZEROPAGE: maps the zero page (anonymous) or a zeroed page (shmem). Errors as copy().
   * A page that holds a uffd-wp marker (write-protected while not present: anonymous memory with
   * wpUnpopulated, shmem, hugetlb) gets a write-protected zero page by UFFDIO_COPY instead, which
   * the kernel's ZEROPAGE would refuse (EEXIST) or, on shared shmem, install writable; so a write
   * to it is still a WP fault, and `exists` means a page really was present. On shared shmem
   * registered for WP that costs a read of /proc/self/pagemap first. See docs/architecture.md,
   * *Zero pages over uffd-wp markers*.
   */
  zeropage(target: Target, offset: number, length: number, options: ResolveOptions = {}): ResolveResult {
    this.#live();
    return this.#n.zeropage(this.#t(target), checkInteger('offset', offset), checkInteger('length', length, 1), flags(options).dontWake ? K.UFFDIO_ZEROPAGE_MODE_DONTWAKE! : 0);
  }

  /** UFFDIO_CONTINUE: maps the page already in the page cache (MINOR faults). Errors as copy(). */
  continue(target: Target, offset: number, length: number, options: ResolveOptions & { wp?: boolean } = {}): ResolveResult {
    this.#live();
    const f = flags(options);
    let mode = f.dontWake ? K.UFFDIO_CONTINUE_MODE_DONTWAKE! : 0;
    if (f.wp) mode |= K.UFFDIO_CONTINUE_MODE_WP!;
    return this.#n.continue(this.#t(target), checkInteger('offset', offset), checkInteger('length', length, 1), mode);
  }

  /**
   * UFFDIO_MOVE: moves pages (no copy) from a private anonymous source; the source becomes a hole.
   * Errors as copy(), plus EBUSY (source page shared after fork), ENOENT (source hole without
   * allowSrcHoles).
   */
  move(target: Target, offset: number, length: number, source: Mapping | bigint, options: ResolveOptions & { sourceOffset?: number; allowSrcHoles?: boolean } = {}): ResolveResult {
    this.#live();
    const f = flags(options);
    let mode = f.dontWake ? K.UFFDIO_MOVE_MODE_DONTWAKE! : 0;
    if (f.allowSrcHoles) mode |= K.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES!;
    const src = source instanceof Mapping ? source.native : source;
    return this.#n.move(this.#t(target), checkInteger('offset', offset), checkInteger('length', length, 1), src, checkInteger('sourceOffset', options.sourceOffset ?? 0), mode);
  }

  /** UFFDIO_POISON: resolves with a poison marker; every later access gets SIGBUS. */
  poison(target: Target, offset: number, length: number, options: ResolveOptions = {}): ResolveResult {
    this.#live();
    return this.#n.poison(this.#t(target), checkInteger('offset', offset), checkInteger('length', length, 1), flags(options).dontWake ? K.UFFDIO_POISON_MODE_DONTWAKE! : 0);
  }

  /** UFFDIO_WRITEPROTECT with MODE_WP: CPU writes to the range now raise WP faults. */
  writeProtect(target: Target, offset: number, length: number): void {
    this.#live();
    this.#n.writeProtect(this.#t(target), checkInteger('offset', offset), checkInteger('length', length, 1), K.UFFDIO_WRITEPROTECT_MODE_WP!);
  }

  /** UFFDIO_WRITEPROTECT without MODE_WP: lifts write protection and wakes WP faulters. */
  unprotect(target: Target, offset: number, length: number, options: ResolveOptions = {}): void {
    this.#live();
    this.#n.writeProtect(this.#t(target), checkInteger('offset', offset), checkInteger('length', length, 1), flags(options).dontWake ? K.UFFDIO_WRITEPROTECT_MODE_DONTWAKE! : 0);
  }

  /** UFFDIO_WAKE: wakes threads waiting on the range (after DONTWAKE resolves). */
  wake(target: Target, offset: number, length: number): void {
    this.#live();
    this.#n.wake(this.#t(target), checkInteger('offset', offset), checkInteger('length', length, 1));
  }

  /**
   * Resolves a whole batch in one call: `action` applied to each [offset, offset + length) of
   * `target` (length: one page of the target by default). The way a driver services its fault
   * buffer: one crossing into native code per batch instead of one per fault. With `replay`
   * (default true) nothing is woken until the whole batch is resolved, then each resolved run is
   * woken once: the faulting threads replay together instead of preempting the handler one by one.
   * Everything is validated before the first ioctl. Returns {bytes, exists} (exists: pages found
   * present, which is success); an error stops the loop with err.bytes and err.index. 'zeropage'
   * fills pages holding a uffd-wp marker write-protected, as {@link Userfaultfd.zeropage} does.
   */
  resolveMany(
    action: 'copy' | 'zeropage' | 'continue' | 'move' | 'unprotect' | 'poison',
    target: Target,
    offsets: readonly number[] | Float64Array,
    options: ResolveOptions & {
      length?: number;
      source?: Mapping | Uint8Array;
      sourceOffsets?: readonly number[] | Float64Array;
      wp?: boolean;
      allowSrcHoles?: boolean;
      replay?: boolean;
    } = {},
  ): { bytes: number; exists: number } {
    this.#live();
    checkOneOf('action', action, ['copy', 'zeropage', 'continue', 'move', 'unprotect', 'poison'] as const);
    const page = target instanceof Mapping ? target.pageSize : BASE_PAGE;
    const { dontWake: dw, wp, allowSrcHoles } = flags(options);
    let mode = 0;
    switch (action) {
      case 'copy':
        mode = (dw ? K.UFFDIO_COPY_MODE_DONTWAKE! : 0) | (wp ? K.UFFDIO_COPY_MODE_WP! : 0);
        break;
      case 'continue':
        mode = (dw ? K.UFFDIO_CONTINUE_MODE_DONTWAKE! : 0) | (wp ? K.UFFDIO_CONTINUE_MODE_WP! : 0);
        break;
      case 'move':
        mode = (dw ? K.UFFDIO_MOVE_MODE_DONTWAKE! : 0) | (allowSrcHoles ? K.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES! : 0);
        break;
      case 'unprotect':
        mode = dw ? K.UFFDIO_WRITEPROTECT_MODE_DONTWAKE! : 0;
        break;
      default:
        mode = dw ? K.UFFDIO_ZEROPAGE_MODE_DONTWAKE! : 0;
    }
    const offs = checkOffsets('offsets', offsets);
    const srcOffs = options.sourceOffsets === undefined ? undefined : checkOffsets('sourceOffsets', options.sourceOffsets);
    const src = options.source instanceof Mapping ? options.source.native : options.source;
    if ((action === 'copy' || action === 'move') && src === undefined) throw typeError('ERR_INVALID_ARG_TYPE', `${action} needs a source`);
    const replay = !dw && checkBoolean('replay', options.replay, true);
    return this.#n.resolveMany(action, this.#t(target), offs, checkInteger('length', options.length ?? page, 1), src, srcOffs, mode, replay);
  }

  /**
   * Starts the native service (`workers` threads, default 1). Faults no rule covers go to onFaults,
   * in batches. Errors: ERR_PAGEMIRROR_SERVING (serve() was called already), RangeError
   * ERR_OUT_OF_RANGE (maxBatch, workers, poll.spinUs), TypeError ERR_INVALID_ARG_TYPE (poll), all
   * before anything starts; EAGAIN (pthread_create) when the threads cannot be created. After
   * addRule() started the service with no handler, serve() takes it over (with its options).
   * @throws `ERR_PAGEMIRROR_SERVING`, `ERR_OUT_OF_RANGE`, `ERR_INVALID_ARG_TYPE`; SystemError `EAGAIN`.
   * @example
   * ```ts
   * import { Userfaultfd, mapAnonymous, access } from 'pagemirror';
   * const src = mapAnonymous(1 << 20), dst = mapAnonymous(1 << 20);
   * const uffd = Userfaultfd.open();
   * uffd.register(dst, { modes: ['missing'] });
   * uffd.serve({
   *   onFaults(faults) {                          // a batch; the faulting threads sleep meanwhile
   *     uffd.resolveMany('copy', dst, faults.map((f) => f.offset), { source: src });
   *   },
   * });
   * await access(dst, { op: 'read', threads: 4 });  // native threads fault, JavaScript resolves
   * uffd.close();
   * ```
   */
  serve(options: ServeOptions = {}): this {
    this.#live();
    if (this.#serving && !this.#autoServed) throw stateError('ERR_PAGEMIRROR_SERVING', 'already serving');
    options = checkOptions('options', options);
    for (const k of ['onFaults', 'onEvents', 'onError'] as const) checkFunction(k, options[k]);
    const maxBatch = checkInteger('maxBatch', options.maxBatch ?? 64, 1, 4096);
    const [workers, mode, spinUs] = serviceArgs(options.workers, options.poll);
    if (this.#autoServed) {
      this.#n.reconfigure(maxBatch, workers, mode, spinUs);
      this.#autoServed = false;
    } else {
      this.#n.serve((batch) => this.#dispatch(batch), maxBatch, workers, mode, spinUs);
    }
    this.#options = options;
    this.#serving = true;
    return this;
  }

  /** Lets the process exit while serving (the service keeps it alive by default). */
  unref(): this {
    this.#n.unref();
    return this;
  }
  /** Keeps the event loop alive while serving (the default; undoes unref()). */
  ref(): this {
    this.#n.ref();
    return this;
  }

  #locate(address: bigint): [Mapping | undefined, number] {
    for (const r of this.#registrations) {
      const start = r.mapping.address;
      if (address >= start + BigInt(r.offset) && address < start + BigInt(r.offset + r.length))
        return [r.mapping, Number((address - start) & ~BigInt(r.mapping.pageSize - 1))];
    }
    return [undefined, 0];
  }

  #dispatch(batch: NativeBatch): void {
    if (batch.events.length) this.#dispatchEvents(batch);
    const n = batch.addresses.length;
    if (n === 0) return;
    const faults: Fault[] = new Array(n);
    for (let i = 0; i < n; i++) {
      const a = batch.addresses[i]!;
      const [m, off] = this.#locate(a);
      faults[i] = new Fault(a, batch.flags[i]!, batch.tids[i]!, m, off);
    }
    const handler = this.#options.onFaults;
    if (!handler) return this.#fallback(new Error('no onFaults handler: faults resolved by the fallback'), faults);
    try {
      const r = handler(faults, this);
      if (r && typeof (r as Promise<void>).then === 'function')
        (r as Promise<void>).then(undefined, (err: unknown) => this.#fallback(err, faults));
    } catch (err) {
      this.#fallback(err, faults);
    }
  }

  #dispatchEvents(batch: NativeBatch): void {
    // A registered mapping that moved or grew: its registration follows it (faults in the new
    // range then still name their mapping).
    for (const e of batch.events) {
      if (e.type !== 'remap') continue;
      for (const r of this.#registrations) {
        if (r.mapping.address === e.to && r.offset === 0) r.length = Math.max(r.length, Math.min(r.mapping.length, e.length));
      }
    }
    const events: UffdEvent[] = batch.events.map((e) => {
      if (e.type !== 'fork') return e;
      let adopted: Userfaultfd | undefined;
      return {
        type: 'fork',
        fd: e.fd,
        adopt: () => (adopted ??= Userfaultfd.#wrap(e.fd, this.#features, true)),
        get adopted() {
          return adopted;
        },
      } as UffdEvent & { adopted?: Userfaultfd };
    });
    try {
      this.#options.onEvents?.(events, this);
    } catch (err) {
      this.#report(err, []);
    }
    // A child's descriptor nobody took is closed: the kernel then wakes its faults (they proceed as
    // unregistered memory) instead of leaving the child asleep.
    for (const e of events) {
      if (e.type === 'fork' && !(e as { adopted?: Userfaultfd }).adopted) Userfaultfd.#wrap(e.fd, this.#features, true).close();
    }
  }

  #report(err: unknown, faults: Fault[]): void {
    if (this.#options.onError) this.#options.onError(err, faults);
    else process.emitWarning(`pagemirror: fault handler failed (${faults.length} faults resolved by fallback): ${String(err)}`);
  }

  #fallback(err: unknown, faults: Fault[]): void {
    if (this.#closed) return;
    // The native fallback (the one close() and a full batch use too): a zero page for a missing
    // fault (write-protected where the range is also registered for WP), un-protect for WP,
    // continue for minor, each at its memory's page size; every faulter is woken.
    const flags = Uint32Array.from(faults, (f) => (f.kind === 'wp' ? K.UFFD_PAGEFAULT_FLAG_WP! : f.kind === 'minor' ? K.UFFD_PAGEFAULT_FLAG_MINOR! : 0));
    this.#n.fallback(BigUint64Array.from(faults, (f) => f.address), flags);
    this.#report(err, faults);
  }

  /**
   * Adds a fast-path rule; returns it (pass it to removeRule()). On a descriptor that is not served
   * yet it starts the native service (one worker, no handler), so faults the rule covers are
   * resolved at once instead of sleeping: faults no rule covers then get the fallback (what the
   * kernel would do without userfaultfd: a zero page, un-protect, continue) with a warning
   * (process.emitWarning), until serve() takes the service over with a handler. Errors:
   * ERR_PAGEMIRROR_CLOSED; TypeError/RangeError for a bad rule, before anything changes.
   */
  addRule(rule: Rule): Rule {
    this.#live();
    if (rule?.mapping !== undefined || typeof rule?.address !== 'bigint') {
      if (!(rule?.mapping instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'rule.mapping must be a Mapping (or give rule.address, a bigint, and rule.length)');
    } else if (rule.length === undefined) throw typeError('ERR_INVALID_ARG_TYPE', 'a rule by address needs a length');
    else checkU64('address', rule.address);
    checkOneOf('action', rule.action, ['copy', 'zero', 'move', 'poison', 'unprotect', 'continue'] as const);
    if (rule.granule !== undefined) checkInteger('granule', rule.granule, 1);
    if (rule.offset !== undefined) checkInteger('offset', rule.offset);
    if (rule.length !== undefined) checkInteger('length', rule.length, 1);
    if (rule.sourceOffset !== undefined) checkInteger('sourceOffset', rule.sourceOffset);
    if (rule.source !== undefined && !(rule.source instanceof Mapping)) throw typeError('ERR_INVALID_ARG_TYPE', 'rule.source must be a Mapping');
    checkBoolean('wp', rule.wp, false);
    checkBoolean('allowSrcHoles', rule.allowSrcHoles, false);
    const next = [...this.#rules, rule];
    this.#n.setRules(next.map(toNativeRule));
    this.#rules = next;
    if (!this.#serving) {
      this.#n.serve((batch) => this.#dispatch(batch), 64);
      this.#serving = true;
      this.#autoServed = true;
    }
    return rule;
  }

  /**
   * Removes a fast-path rule. Returns once no batch the service thread started before still uses
   * it (microseconds; a handshake with the service thread), so the rule's source mapping can be
   * closed right after.
   */
  removeRule(rule: Rule): void {
    this.#live();
    const next = this.#rules.filter((r) => r !== rule);
    this.#n.setRules(next.map(toNativeRule));
    this.#rules = next;
  }

  /** Removes every rule: their faults go to onFaults (or the default resolution) from now on. */
  clearRules(): void {
    this.#live();
    this.#n.setRules([]);
    this.#rules = [];
  }

  /** The rules in force, in the order they are tried. */
  get rules(): readonly Rule[] {
    return this.#rules;
  }

  /**
   * Counters of the service, summed over its workers (maxBatch and spinBudgetNs: the largest), with
   * one entry per running worker in `workers`. cpuNs is the workers' CPU time (what polling costs).
   */
  stats(): ServiceStats {
    return this.#n.stats();
  }

  /** Faults handed to onFaults and not yet seen resolved through this object. */
  outstanding(): bigint[] {
    return Array.from(this.#n.outstanding());
  }

  /**
   * Stops the service and closes the descriptor; every thread asleep on it wakes. 'wake' (default):
   * the kernel retries each fault as unregistered memory (zero-fill for anonymous memory, the file's
   * page for shmem). 'zero': faults read but unresolved are zero-filled / un-protected / continued
   * first. 'sigbus': they are poisoned, so the faulting accesses get SIGBUS (needs 'poison').
   */
  close(outcome: CloseOutcome = 'wake'): void {
    checkOneOf('outcome', outcome, ['wake', 'zero', 'sigbus'] as const);
    if (this.#closed) return;
    this.#n.close(outcome);
    this.#closed = true;
    this.#serving = false;
    for (const r of this.#registrations) noteUnregistered(r.mapping, this);
    this.#registrations = [];
    this.#rules = [];
  }

  /** close('wake'), for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }
}

const BASE_PAGE = native.uname().pageSize;

/** The flags of the resolve calls, checked: options is undefined or an object of booleans. */
function flags(options: ResolveOptions & { wp?: boolean; allowSrcHoles?: boolean } | undefined): { dontWake: boolean; wp: boolean; allowSrcHoles: boolean } {
  const o = checkOptions('options', options);
  return { dontWake: checkBoolean('dontWake', o.dontWake, false), wp: checkBoolean('wp', o.wp, false), allowSrcHoles: checkBoolean('allowSrcHoles', o.allowSrcHoles, false) };
}
const offered = new Map<boolean, bigint>();
/** Features the kernel offers, learnt once per process on a throw-away descriptor. */
function offeredFeatures(userModeOnly: boolean): bigint {
  let f = offered.get(userModeOnly);
  if (f === undefined) {
    f = native.probeUffd(userModeOnly).features ?? 0n;
    offered.set(userModeOnly, f);
  }
  return f;
}

function toNativeRule(r: Rule): NativeRule {
  let mode = 0;
  if (r.wp && r.action === 'copy') mode |= K.UFFDIO_COPY_MODE_WP!;
  if (r.wp && r.action === 'continue') mode |= K.UFFDIO_CONTINUE_MODE_WP!;
  if (r.allowSrcHoles && r.action === 'move') mode |= K.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES!;
  if ((r.action === 'copy' || r.action === 'move') && !(r.source instanceof Mapping))
    throw typeError('ERR_INVALID_ARG_TYPE', `a ${r.action} rule needs a source Mapping`);
  return {
    mapping: r.mapping ? r.mapping.native : r.address!,
    offset: r.offset ?? 0,
    length: r.length,
    action: r.action,
    source: r.source?.native,
    sourceOffset: r.sourceOffset ?? 0,
    granule: r.granule ?? 0,
    mode,
  };
}
