// The fault server: other processes hand their userfaultfd and ranges over a Unix socket
// (docs/fault-server.md); each client is served by an adopted Userfaultfd, with the same rules,
// batch handlers and counters as a local one. The socket side is native (an I/O thread with
// epoll): no JavaScript thread ever blocks on a client.
import { native, type NativeFaultServer, type NativeRemoteClient, type NativeServerEvent } from './native.js';
import { REGISTER_MODES, type RegisterMode } from './constants.js';
import { checkInteger, checkOneOf, stateError, typeError } from './errors.js';
import { checkBoolean, checkFunction, checkOptions, checkString, checkU64 } from './validate.js';
import { Userfaultfd, setRemoteHandlerRules, type Fault, type ServiceStats } from './uffd.js';
import { recordTrace, recorderNative, type RecordTraceOptions, type TraceRecorder } from './trace.js';

/** Options of {@link RemoteClient.record}: those of recordTrace but the ranges and pid, which are the client's. */
export type ClientRecordOptions = Pick<RecordTraceOptions, 'path' | 'sampleIntervalMs' | 'sampleMethod' | 'ringCapacity'>;

/** Options of {@link FaultServer.listen}. */
export interface FaultServerOptions {
  /**
   * Users (uids) allowed to connect, checked with SO_PEERCRED at connect time; a refused peer gets
   * an EACCES reply and is closed. Default: the server's own effective uid only.
   */
  allowUids?: number[];
  /** Connections at once (1..4096); one more gets an EUSERS reply and is closed. @default 64 */
  maxClients?: number;
  /**
   * A connection that sends no HELLO within this many ms of being accepted (1..600000) gets an
   * ETIMEDOUT reply and is closed, so peers that connect and stay silent cannot hold the
   * maxClients slots. The C client says HELLO as soon as it connects.
   * @default 10000
   */
  helloTimeoutMs?: number;
  /**
   * Policy 'default': a client whose threads keep faulting, for this many ms (1..600000), on memory
   * it registered with its userfaultfd but never described in a REGISTER is ended (a warning says
   * so, and {@link FaultServerStats.staleFaultEnds} counts it). Such a fault can only be woken (the
   * server does not know the memory), and the thread faults again at once: left alone, one such
   * client would keep the server's JavaScript thread waking it for good. Faults of a range the
   * client has just released, or just registered and not yet described, stop within milliseconds.
   * @default 2000
   */
  staleFaultLimitMs?: number;
  /**
   * 'default' (the default): each client is served at once by a native policy: a missing page comes
   * back from the pool when the server took it there ({@link RemoteClient.evict}), else a zero page;
   * a minor fault is continued (the page of the client's memfd); a WP fault is un-protected.
   * 'manual': nothing is served until `onClient` does it (rules by address, serve({ onFaults })).
   */
  policy?: 'default' | 'manual';
  /**
   * Called once per client, after its first accepted REGISTER and before any of its faults is
   * read: nothing serves it yet (its faulting threads wait until this returns). The place for what
   * must see every fault from the first one, a recording ({@link RemoteClient.record}). Then the
   * policy's rules are set and `onClient` is called.
   */
  beforeServe?: (client: RemoteClient) => void;
  /** Called once per client, after its first accepted REGISTER (its `uffd` exists from then on). Required with policy 'manual'. */
  onClient?: (client: RemoteClient) => void;
  /** Called when a client's ranges change (REGISTER or UNREGISTER after the first). */
  onRanges?: (client: RemoteClient) => void;
  /** Called when a client's connection ended (it exited, said goodbye, or broke the protocol), after its Userfaultfd was closed. */
  onClientExit?: (client: RemoteClient) => void;
}

/** A range a client handed over, in the client's address space. */
export interface RemoteRange {
  /** Start address (page aligned) in the client. */
  address: bigint;
  /** Bytes. */
  length: number;
  /** The modes the client registered the range with. */
  modes: RegisterMode[];
  /** Shared memory (a memfd the client passed): the server can take its pages away (evict). */
  shared: boolean;
  /** Shared memory: the range's offset in its memfd. */
  offset: number;
}

/** What the server did to a client's pages ({@link RemoteClient.counters}). */
export interface RemoteClientCounters {
  /** Pages taken to the pool by evict(). */
  evicted: number;
  /** Pages brought back from the pool (a fault on them, or an UNREGISTER). */
  restored: number;
  /** Of those, pages brought back because the client took their range back (UNREGISTER). */
  restoredOnRelease: number;
  /** Of those, pages brought back along with a faulting page before them ({@link RemoteClient.configure}, prefetch). */
  prefetched: number;
  /** Pages write-protected by {@link RemoteClient.writeProtect}. */
  protectedPages: number;
  /** Resolved faults the touch log had no room for ({@link RemoteClient.takeTouches} was not called often enough). */
  touchesDropped: number;
  /** Missing faults the default policy resolved with a zero page. */
  zeroFilled: number;
  /** Minor faults continued. */
  continued: number;
  /** WP faults un-protected. */
  unprotected: number;
  /** Resolves that failed and woke the faulter to fault again (a race with evict or an unmap). */
  retried: number;
  /**
   * Faults whose page was already there when the server resolved them (EEXIST): another thread's
   * fault on the same page was resolved first. The faulter is woken; nothing else is counted for it.
   */
  raced: number;
  /** Slots of the client's pool, and slots in use now. */
  poolPages: number;
  poolHeld: number;
}

/** Options of {@link RemoteClient.configure}. */
export interface RemoteClientPolicy {
  /**
   * When a fault brings a page back from the pool, also bring back those of the next `prefetch`
   * pages of the same range that are in the pool (one UFFDIO_COPY each, in the same fault's round
   * trip, before the faulting thread is woken). Counted in `restored` and `prefetched`. 0..65536.
   * @default 0
   */
  prefetch?: number;
  /**
   * A read fault (missing or minor) maps its page write-protected, in ranges registered for WP, and
   * so do prefetched pages: a write after it is a WP fault too, so write tracking by
   * {@link RemoteClient.writeProtect} rounds misses no page that was read, then written. Costs a WP
   * fault per such page (and a zero page is copied rather than mapped). @default false
   */
  writeProtectReads?: boolean;
}

/** One entry of {@link RemoteClient.takeTouches}. */
export interface RemoteTouch {
  /** The page (its first address, in the client). */
  address: bigint;
  /** How it was resolved: 'zero' (missing, zero page), 'pool' (missing, copied back from the pool), 'minor' (continued), 'wp' (protection lifted). */
  kind: 'zero' | 'pool' | 'minor' | 'wp';
  /** The access was a write (always so for 'wp'). */
  write: boolean;
  /** Not a fault: brought back from the pool with the fault on a page before it. */
  prefetch: boolean;
}

const TOUCH_KINDS = ['zero', 'pool', 'minor', 'wp'] as const;

/** Counters of the server's socket side ({@link FaultServer.stats}). */
export interface FaultServerStats {
  accepted: number;
  /** Peers refused by uid (SO_PEERCRED). */
  refusedUid: number;
  /** Peers refused because maxClients were connected. */
  refusedFull: number;
  /** Messages refused with an errno reply. */
  refusals: number;
  /** Refusals that ended their connection (malformed framing, wrong version, bad descriptors). */
  protocolErrors: number;
  /** Connections ended. */
  ended: number;
  /** Of those, connections that sent no HELLO within helloTimeoutMs (each got an ETIMEDOUT reply). */
  helloTimeouts: number;
  /** Connections open now. */
  connections: number;
  /** Clients ended for faulting on memory they never described, for longer than staleFaultLimitMs. */
  staleFaultEnds: number;
}

const MODE_NAMES = Object.keys(REGISTER_MODES) as RegisterMode[];
// The server's hooks into its clients (not methods: nothing outside this file calls them).
let makeClient: (n: NativeRemoteClient) => RemoteClient;
let refreshClient: (c: RemoteClient) => void;
let endClient: (c: RemoteClient) => void;

/** One process served by a {@link FaultServer}. */
export class RemoteClient {
  readonly #n: NativeRemoteClient;
  #ranges: RemoteRange[] = [];
  #closed = false;
  #final: ServiceStats | undefined;
  /** The client's process id, user and group (SO_PEERCRED, at connect time). */
  readonly pid: number;
  readonly uid: number;
  readonly gid: number;
  /** The connection's number on this server. */
  readonly id: number;
  /** The client's userfaultfd (adopted: faults carry the client's addresses; rules go by `address`). */
  readonly uffd: Userfaultfd;

  private constructor(n: NativeRemoteClient) {
    this.#n = n;
    const i = n.info();
    this.pid = i.pid;
    this.uid = i.uid;
    this.gid = i.gid;
    this.id = i.id;
    this.uffd = Userfaultfd.adopt(i.fd, i.features);
    this.#refresh();
  }

  static {
    makeClient = (n) => new RemoteClient(n);
    refreshClient = (c) => c.#refresh();
    endClient = (c) => c.#end();
  }

  #refresh(): void {
    this.#ranges = this.#n.info().ranges.map((r) => ({
      address: r.address,
      length: r.length,
      modes: MODE_NAMES.filter((m) => (r.modes & REGISTER_MODES[m]) !== 0),
      shared: r.shared,
      offset: r.offset,
    }));
  }

  /** @internal The native client (the default policy's resolver). */
  get native(): NativeRemoteClient {
    return this.#n;
  }

  /** The ranges the client handed over and has not taken back. */
  get ranges(): readonly RemoteRange[] {
    return this.#ranges;
  }

  /** Whether the connection ended. */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Takes the pages of [address, address + length) that the client's shared memory holds away into
   * the client's pool ("migrated to device memory"): write-protects each page, copies it to a free
   * slot, records it in the pool's table, punches it out of the client's memfd, lifts the
   * protection. The client's next access faults it back (the default policy), and if this server
   * dies first the client's watchdog restores it. Returns the pages taken (holes and pages held
   * already are skipped; stops early when the pool is full).
   * @throws TypeError ERR_INVALID_ARG_TYPE, RangeError ERR_OUT_OF_RANGE / ERR_PAGEMIRROR_UNALIGNED
   *   (before any system call); ERR_PAGEMIRROR_CLOSED (the client is gone); SystemError EINVAL (not
   *   inside shared ranges registered for WP), ENOSPC (the pool is full, or the client shared none).
   */
  evict(address: bigint, length: number): number {
    checkU64('address', address);
    checkInteger('length', length, 1);
    const page = BigInt(PAGE);
    if (address % page !== 0n || length % PAGE !== 0) throw rangeErrorUnaligned(address, length);
    if (this.#closed) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the client is gone');
    return this.#n.evict(address, length);
  }

  /**
   * Records this client's faults to a trace file (docs/trace-format.md), as
   * {@link recordTrace} on its `uffd` with its ranges and pid, and with ranges that follow the
   * client: each range it registers from now on is recorded under a new index from before the
   * client is answered, and each it takes back stops being recorded (the trace's range records
   * say when). Call it in {@link FaultServerOptions.beforeServe} to have the client's first faults.
   * The C client's userfaultfd has synchronous write-protect (no wpAsync), so PAGEMAP_SCAN samples
   * are none (the header says why); with `sampleMethod: 'wp-rounds'` the trace samples the writes
   * between the caller's rounds of {@link RemoteClient.writeProtect}, marked by
   * {@link TraceRecorder.writeRound}, as `pagemirror run` and `record` do. Errors: those of recordTrace;
   * ERR_PAGEMIRROR_CLOSED (the client is gone).
   */
  record(options: ClientRecordOptions): TraceRecorder {
    const o = checkOptions('options', options);
    if (this.#closed) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the client is gone');
    const rec = recordTrace(this.uffd, {
      path: o.path,
      ranges: this.#ranges.map((r) => ({ address: r.address, length: r.length, modes: r.modes, shared: r.shared })),
      pid: this.pid,
      ...(o.sampleIntervalMs !== undefined ? { sampleIntervalMs: o.sampleIntervalMs } : {}),
      ...(o.ringCapacity !== undefined ? { ringCapacity: o.ringCapacity } : {}),
      ...(o.sampleMethod !== undefined ? { sampleMethod: o.sampleMethod } : {}),
    });
    try {
      this.#n.setRecorder(recorderNative(rec));
    } catch (err) {
      rec.stop();
      throw err;
    }
    return rec;
  }

  /**
   * Write-protects the client's pages in [address, address + length) (UFFDIO_WRITEPROTECT on its
   * userfaultfd, which acts on the client's address space): the next write to each page is a WP
   * fault, which the default policy lifts and logs as a write ({@link RemoteClient.takeTouches}).
   * Protect only pages the client has mapped (an unmapped page would keep a protection marker that
   * nothing needs). Returns the pages protected.
   * @throws the same errors as {@link RemoteClient.evict} but ENOSPC; SystemError ENOENT (the
   *   client unmapped part of the range).
   */
  writeProtect(address: bigint, length: number): number {
    checkU64('address', address);
    checkInteger('length', length, 1);
    if (address % BigInt(PAGE) !== 0n || length % PAGE !== 0) throw rangeErrorUnaligned(address, length);
    if (this.#closed) throw stateError('ERR_PAGEMIRROR_CLOSED', 'the client is gone');
    return this.#n.writeProtect(address, length);
  }

  /**
   * Tunes the default policy for this client (each call sets every option: an omitted one goes back
   * to its default).
   * @throws TypeError ERR_INVALID_ARG_TYPE, RangeError ERR_OUT_OF_RANGE (before anything changes)
   */
  configure(options: RemoteClientPolicy): void {
    const o = checkOptions('options', options);
    const prefetch = checkInteger('prefetch', o.prefetch ?? 0, 0, 65536);
    const protectReads = checkBoolean('writeProtectReads', o.writeProtectReads, false);
    if (this.#closed) return;
    this.#n.configure(prefetch, protectReads);
  }

  /**
   * The touch log: each fault the default policy resolved, and each page it prefetched, since the
   * last call (oldest first; at most 65536 between calls, the rest counted in `touchesDropped`).
   * What the server can see of the client's accesses: a read of a page already mapped is not here.
   */
  takeTouches(): RemoteTouch[] {
    const raw = this.#n.takeTouches();
    const page = BigInt(PAGE);
    const out: RemoteTouch[] = new Array(raw.length);
    for (let i = 0; i < raw.length; i++) {
      const v = raw[i]!;
      const k = Number((v >> 1n) & 3n);
      out[i] = { address: v - (v % page), kind: TOUCH_KINDS[k]!, write: (v & 1n) === 1n, prefetch: (v & 8n) === 8n };
    }
    return out;
  }

  /** What the server did to this client's pages; kept after the client exits. */
  counters(): RemoteClientCounters {
    const i = this.#n.info();
    return { ...this.#n.counters(), poolPages: i.poolPages, poolHeld: i.poolHeld };
  }

  /** The fault service's counters for this client (faults, batches...); kept after the client exits. */
  stats(): ServiceStats {
    return this.#final ?? this.uffd.stats();
  }

  // The connection ended: stop serving (faults read and unresolved are left to the client's
  // watchdog, which unregisters them).
  #end(): void {
    if (this.#closed) return;
    this.#final = this.uffd.stats();
    // 'wake', never 'zero': a zero page for a page the pool holds would lose it.
    this.uffd.close('wake');
    this.#n.release();
    this.#closed = true;
  }
}

const PAGE = native.uname().pageSize;

function rangeErrorUnaligned(address: bigint, length: number): Error {
  const e = new RangeError(`address (${address}) and length (${length}) must be multiples of the page size ${PAGE}`) as RangeError & { code: string };
  e.code = 'ERR_PAGEMIRROR_UNALIGNED';
  return e;
}

/**
 * A fault server: listens on a Unix socket (SOCK_SEQPACKET, mode 0600) for processes that hand it
 * their userfaultfd and ranges (the C client library, `native/client/pagemirror_client.h`), and
 * serves them. Made by {@link FaultServer.listen}.
 */
export class FaultServer {
  readonly #n: NativeFaultServer;
  readonly #options: FaultServerOptions;
  readonly #policy: 'default' | 'manual';
  readonly #clients = new Map<number, RemoteClient>();
  readonly #exited: RemoteClient[] = [];
  readonly #staleFaultLimitMs: number;
  // Per client: when its current run of faults outside every range it described began, and its last.
  readonly #stale = new Map<number, { since: number; last: number; faults: number }>();
  #staleFaultEnds = 0;
  #closed = false;
  /** The socket's path. */
  readonly path: string;

  private constructor(path: string, options: FaultServerOptions, policy: 'default' | 'manual', allowUids: number[] | undefined, maxClients: number, helloTimeoutMs: number, staleFaultLimitMs: number) {
    this.path = path;
    this.#options = options;
    this.#policy = policy;
    this.#staleFaultLimitMs = staleFaultLimitMs;
    this.#n = native.listenFaultServer(path, allowUids, maxClients, (events) => this.#dispatch(events), helloTimeoutMs);
  }

  /**
   * Creates the socket at `path` (mode 0600) and starts serving. A path that exists is refused
   * unless it is a stale socket (nobody listens), which is replaced.
   * @throws TypeError ERR_INVALID_ARG_TYPE / ERR_INVALID_ARG_VALUE, RangeError ERR_OUT_OF_RANGE
   *   (before any system call); SystemError EEXIST (the path is not a socket), EADDRINUSE (a
   *   server listens there), ENAMETOOLONG (over 107 bytes), EACCES / ENOENT (the directory).
   * @example
   * ```ts
   * import { FaultServer } from 'pagemirror';
   * const server = await FaultServer.listen('/tmp/pm.sock', {
   *   onClient: (c) => console.log('client', c.pid, c.ranges.length, 'ranges'),
   *   onClientExit: (c) => console.log('exit', c.pid, c.stats().faults, 'faults'),
   * });
   * // ... later
   * await server.close();
   * ```
   */
  static async listen(path: string, options: FaultServerOptions = {}): Promise<FaultServer> {
    checkString('path', path);
    if (path.length === 0) throw typeError('ERR_INVALID_ARG_VALUE', 'path must not be empty');
    options = checkOptions('options', options);
    const policy = checkOneOf('policy', options.policy ?? 'default', ['default', 'manual'] as const);
    for (const k of ['beforeServe', 'onClient', 'onRanges', 'onClientExit'] as const) checkFunction(k, options[k]);
    if (policy === 'manual' && !options.onClient) throw typeError('ERR_INVALID_ARG_VALUE', "policy 'manual' needs onClient to serve each client");
    let allowUids: number[] | undefined;
    if (options.allowUids !== undefined) {
      if (!Array.isArray(options.allowUids)) throw typeError('ERR_INVALID_ARG_TYPE', 'allowUids must be an array of uids');
      allowUids = options.allowUids.map((u, i) => checkInteger(`allowUids[${i}]`, u, 0, 0xfffffffe));
    }
    const maxClients = checkInteger('maxClients', options.maxClients ?? 64, 1, 4096);
    const helloTimeoutMs = checkInteger('helloTimeoutMs', options.helloTimeoutMs ?? 10000, 1, 600000);
    const staleFaultLimitMs = checkInteger('staleFaultLimitMs', options.staleFaultLimitMs ?? 2000, 1, 600000);
    return new FaultServer(path, options, policy, allowUids, maxClients, helloTimeoutMs, staleFaultLimitMs);
  }

  /** Clients connected now (those past their first REGISTER). */
  get clients(): readonly RemoteClient[] {
    return [...this.#clients.values()];
  }
  /** Clients whose connection ended, with their final counters (the last 1024). */
  get exited(): readonly RemoteClient[] {
    return this.#exited;
  }
  /** Whether close() was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Counters of the socket side: connections, refusals, protocol errors. */
  stats(): FaultServerStats {
    return { ...this.#n.stats(), staleFaultEnds: this.#staleFaultEnds };
  }

  #dispatch(events: NativeServerEvent[]): void {
    for (const e of events) {
      const id = e.client.info().id;
      let c = this.#clients.get(id);
      if (e.type === 'closed') {
        if (c) this.#end(c);
        this.#n.drop(id);
        continue;
      }
      if (!c) {
        // The server already let go of this client (ended it from here): an event still queued for it.
        if (e.client.info().fd < 0) continue;
        c = makeClient(e.client);
        this.#clients.set(id, c);
        // Nothing reads the client's descriptor before this returns: its first faults wait in the kernel.
        this.#call(this.#options.beforeServe, c);
        if (this.#policy === 'default') {
          // Rules first: a fault read before them would go to the fallback (a zero page).
          this.#applyPolicy(c);
          const client = c;
          c.uffd.serve({
            onFaults: (faults, uffd) => this.#unruled(client, faults, uffd),
            onError: (err) => process.emitWarning(`pagemirror: client ${client.pid}: ${String(err)}`),
          });
        }
        this.#call(this.#options.onClient, c);
        continue;
      }
      refreshClient(c);
      if (this.#policy === 'default') this.#applyPolicy(c);
      this.#call(this.#options.onRanges, c);
    }
  }

  /**
   * Faults no rule covered: a range the client registered after the rules were set, whose event
   * is still on its way to this thread while the client, answered, already touches it. Set the
   * rules from the client's ranges as they are now and wake the faulting threads: they fault again,
   * into the native rule, which counts them as it counts every other fault. A fault outside every
   * range is one read after the client released its range (or one of a range it never described)
   * and is only woken too, never resolved: the address may by now be held by another userfaultfd
   * of the client's (the shim holds its threads' writes there while the range changes hands,
   * docs/attach.md), and the kernel would let a fill or an unprotect through this one lift that
   * hold. Such faults stop at once unless the client faults on memory it never described: after
   * staleFaultLimitMs of them without a pause, the client is ended.
   */
  #unruled(c: RemoteClient, faults: Fault[], uffd: Userfaultfd): void {
    this.#applyPolicy(c);
    const page = BigInt(PAGE);
    let outside = 0;
    for (const f of faults) {
      const a = f.address - (f.address % page);
      if (!c.ranges.some((r) => a >= r.address && a < r.address + BigInt(r.length))) outside++;
      uffd.wake(a, 0, PAGE);
    }
    if (outside) this.#countStale(c, outside);
  }

  // A run of faults outside the client's ranges ends after a pause of this long (the legitimate
  // ones, of a range just released or not yet described, are over within milliseconds).
  static readonly #STALE_PAUSE_MS = 100;

  #countStale(c: RemoteClient, n: number): void {
    const now = performance.now();
    let run = this.#stale.get(c.id);
    if (!run || now - run.last > FaultServer.#STALE_PAUSE_MS) this.#stale.set(c.id, (run = { since: now, last: now, faults: 0 }));
    run.last = now;
    run.faults += n;
    if (now - run.since < this.#staleFaultLimitMs) return;
    this.#stale.delete(c.id);
    // Not from inside the handler of the descriptor being closed: once this batch is done.
    setImmediate(() => {
      if (this.#clients.get(c.id) !== c) return;
      this.#staleFaultEnds++;
      process.emitWarning(
        `pagemirror: fault server: client ${c.pid} ended: its threads faulted for ${Math.round(now - run.since)} ms (${run.faults} faults) on memory it never described in a REGISTER`,
      );
      this.#end(c);
      this.#n.drop(c.id);
    });
  }

  #applyPolicy(c: RemoteClient): void {
    refreshClient(c);
    setRemoteHandlerRules(c.uffd, c.ranges, c.native);
  }

  #end(c: RemoteClient): void {
    this.#clients.delete(c.id);
    this.#stale.delete(c.id);
    endClient(c);
    this.#exited.push(c);
    if (this.#exited.length > 1024) this.#exited.shift();
    this.#call(this.#options.onClientExit, c);
  }

  #call(f: ((c: RemoteClient) => void) | undefined, c: RemoteClient): void {
    try {
      f?.(c);
    } catch (err) {
      process.emitWarning(`pagemirror: fault server callback failed: ${String(err)}`);
    }
  }

  /**
   * Stops serving: each client's Userfaultfd is closed first, then every connection, so each
   * client's watchdog takes its memory back (pages in the pool included); removes the socket file.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const c of [...this.#clients.values()]) this.#end(c);
    this.#n.close();
  }

  /** close(), for `await using`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
