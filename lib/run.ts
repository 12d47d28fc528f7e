// `pagemirror run -- PROGRAM`: an unmodified program attached to a fault server through the preload
// shim (native/client/preload.c, docs/attach.md), with a device-like policy: a host resident-set
// limit whose excess the server migrates to "device memory" (the client's pool), and a report.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { helperPath } from './addon-path.js';
import { native } from './native.js';
import type { RemoteClient } from './server.js';
import type { RecordingSummary, TraceRecorder } from './trace.js';
import { lineChartSvg, writeReport } from './bench/report.js';
import { benchEnv } from './bench/env.js';

// The pagemap and the client's pool count pages of this machine's size (64 KiB on some arm64 kernels).
const PAGE = native.uname().pageSize;

export interface RunOptions {
  program: string;
  args: string[];
  /** Host resident-set limit over all attached memory, bytes; undefined: no limit. */
  resident?: number;
  /** Pool ("device memory") per process, bytes. */
  deviceMemory: number;
  /** Attach anonymous mappings and malloc blocks of at least this many bytes. */
  threshold: number;
  /**
   * Which host-resident pages go to device memory first. 'fifo': in the order they were first seen
   * resident. 'clock': second chance, the reference bit being any fault the page took since the hand
   * last passed (a refault from the pool, a missing or minor fault, a WP fault of a round): reads of
   * a page already mapped are invisible to the server, so clock sees first touches, refaults and
   * (with write-protect rounds) writes only.
   */
  eviction: 'fifo' | 'clock';
  /** How often the resident set is sampled (and the limit enforced), ms. */
  intervalMs: number;
  /**
   * Every this many ms, a write-protect round: the server write-protects every host-resident page
   * of every attached range, and each page's next write is a WP fault, resolved natively and counted
   * as a page written in that interval (`writes` in the result). 0: no rounds. Each round costs a
   * UFFDIO_WRITEPROTECT per run of resident pages and then a WP fault (a round trip to the server)
   * per page written again, so short intervals slow a program that writes a large working set.
   * @default 1000
   */
  wpIntervalMs?: number;
  /**
   * When a CPU fault brings a page back from device memory, also bring back those of the next
   * `prefetch` pages of the same range that are there (migrations to host with trigger 'prefetch').
   * @default 0
   */
  prefetch?: number;
  compare: boolean;
  /**
   * Record a page-access trace of each attached process (RemoteClient.record: recordTrace tapping
   * the service, so the rules are unchanged), from its first fault on. The first process writes
   * `path`, each later one `path.PID`. A trace holds every range its process registered, each
   * from its REGISTER to its release. Its written-page samples are the write-protect rounds'
   * (sampling method 'wp-rounds', one sample per range per round, every `wpIntervalMs`; none with
   * 0): the pages whose write faults the trace holds between two rounds.
   */
  record?: { path: string };
}

/** Why `program` cannot be attached (no preload reaches it), or undefined. */
export function refusal(file: string): string | undefined {
  const st = fs.statSync(file);
  if (st.mode & 0o6000 /* S_ISUID | S_ISGID */)
    return `${file} is set-user-ID or set-group-ID: the dynamic loader ignores LD_PRELOAD for it, so it would run unattached`;
  const fd = fs.openSync(file, 'r');
  try {
    const h = Buffer.alloc(64);
    const n = fs.readSync(fd, h, 0, 64, 0);
    if (n >= 2 && h.toString('latin1', 0, 2) === '#!') return undefined; // its interpreter is what runs
    if (n < 52 || h.readUInt32BE(0) !== 0x7f454c46) return `${file} is neither an ELF program nor a #! script`;
    const is64 = h[4] === 2;
    const le = h[5] === 1;
    const u16 = (b: Buffer, o: number) => (le ? b.readUInt16LE(o) : b.readUInt16BE(o));
    const u32 = (b: Buffer, o: number) => (le ? b.readUInt32LE(o) : b.readUInt32BE(o));
    const phoff = is64 ? Number(le ? h.readBigUInt64LE(32) : h.readBigUInt64BE(32)) : u32(h, 28);
    const phentsize = u16(h, is64 ? 54 : 42);
    const phnum = u16(h, is64 ? 56 : 44);
    const ph = Buffer.alloc(phentsize * phnum);
    fs.readSync(fd, ph, 0, ph.length, phoff);
    const PT_INTERP = 3;
    for (let i = 0; i < phnum; i++) if (u32(ph, i * phentsize) === PT_INTERP) return undefined;
    return `${file} is statically linked (no PT_INTERP): no dynamic loader runs to preload the shim, so it would run unattached`;
  } finally {
    fs.closeSync(fd);
  }
}

/** PROGRAM as execvp would find it. */
export function resolveProgram(program: string): string | undefined {
  const dirs = program.includes('/') ? [''] : (process.env.PATH ?? '/usr/bin:/bin').split(':');
  for (const d of dirs) {
    const f = d ? path.join(d, program) : program;
    try {
      fs.accessSync(f, fs.constants.X_OK);
      if (fs.statSync(f).isFile()) return path.resolve(f);
    } catch {
      /* next */
    }
  }
  return undefined;
}

interface RangeReport {
  pid: number;
  address: string;
  bytes: number;
  peakResidentPages: number;
  migratedToDevice: number;
}

export interface RunResult {
  /** The page size every page count here is in (this machine's: 64 KiB on some arm64 kernels). */
  pageSize: number;
  program: string;
  args: string[];
  exitCode: number;
  /** The program's exit status as a shell reports it: its code, or 128 + signal. */
  signal?: string;
  wallMs: number;
  wallMsWithoutShim?: number;
  processes: number;
  attachedBytes: number;
  /**
   * Faults by kind and how they were resolved. `fallback`: faults the server's default rule had not
   * yet covered (a range registered a moment before its rule was installed), zero-filled by the
   * service's fallback; `raced`: faults on a page another thread's fault had just filled (woken,
   * EEXIST); `other` is what none of these explains (0 when the counters agree).
   */
  faults: { total: number; missingZero: number; missingFromDevice: number; minor: number; wp: number; retried: number; raced: number; fallback: number; other: number };
  migrations: {
    toDevice: { total: number; residentLimit: number };
    /** cpuFault: one per fault; prefetch: pages that came back with such a fault (RunOptions.prefetch). */
    toHost: { total: number; cpuFault: number; prefetch: number; release: number };
  };
  /** The eviction policy and what its hand did (the same counters for fifo and clock). */
  eviction: {
    policy: 'fifo' | 'clock';
    /** Pages the hand passed over because they had faulted since it last passed (always 0 for fifo). */
    secondChances: number;
    /** Resident pages the hand looked at. */
    examined: number;
  };
  /**
   * Pages written, measured by write-protect rounds (RunOptions.wpIntervalMs): a page counts as
   * written in an interval when it took a WP fault then, or a missing or minor fault flagged as a
   * write. With rounds, a page faulted in by a read comes in write-protected (RemoteClient.configure
   * writeProtectReads), so its first write is seen too.
   */
  writes: {
    /** 'wp-rounds', or 'none' with wpIntervalMs 0 (then only faults flagged as writes are counted). */
    method: 'wp-rounds' | 'none';
    intervalMs: number;
    rounds: number;
    /** Wall time spent in the rounds (reading pagemap, UFFDIO_WRITEPROTECT), ms. */
    roundMs: number;
    /** Pages write-protected over all rounds. */
    protectedPages: number;
    /** WP faults taken (rounds' and those hitting an eviction's protection): the cost on the program's side. */
    wpFaults: number;
    /** Distinct pages ever seen written. */
    distinctPages: number;
    /** Pages written in each interval, ending at `ms` (time since start). */
    perInterval: { ms: number; pages: number }[];
    /** Entries of the server's touch log lost between two drains (0 unless faults outran the sampling). */
    lost: number;
    /** Runs of pages a round could not protect: the program had let go of the range since the pagemap read. */
    raced: number;
  };
  residentLimitPages?: number;
  peakResidentPages: number;
  poolFull: number;
  /** Evictions that found the page's range gone (released by the program since the sample, or the process exiting: ESRCH). */
  evictRaced: number;
  samples: { ms: number; residentPages: number; devicePages: number }[];
  ranges: RangeReport[];
  /** With `record`: what each process's recorder wrote and cost (its stop() summary). */
  recordings?: (RecordingSummary & { pid: number })[];
  notes: string[];
}

/** Pages of [address, address + length) mapped in pid (pagemap's present bit). */
function presentPages(fd: number, address: bigint, length: number, buf: Buffer): number[] {
  const n = length / PAGE;
  const need = n * 8;
  const b = buf.length >= need ? buf : Buffer.alloc(need);
  const got = fs.readSync(fd, b, 0, need, Number(address / BigInt(PAGE)) * 8);
  const out: number[] = [];
  // Bit 63 (present) is bit 31 of the entry's high word: read as a number, not a BigInt. This runs
  // every sampling interval over every attached page.
  for (let i = 0; i < got / 8; i++) if (b.readUInt32LE(i * 8 + 4) >>> 31) out.push(i);
  return out;
}

/** Ascending page indices as runs [first index, pages]. */
function runsOf(pages: number[]): [number, number][] {
  const out: [number, number][] = [];
  for (const i of pages) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === i) last[1]++;
    else out.push([i, 1]);
  }
  return out;
}

/** Runs the program attached and returns what happened; stdio is the caller's. */
export async function runAttached(o: RunOptions): Promise<RunResult> {
  const { FaultServer } = await import('./server.js');
  const shim = helperPath('pagemirror_preload.so');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-run-'));
  fs.chmodSync(dir, 0o700);
  const sock = path.join(dir, 'server.sock');
  const notes: string[] = [];
  // A failure that repeats every round is reported once.
  const noteOnce = (m: string): void => {
    if (!notes.includes(m)) notes.push(m);
  };
  const pagemaps = new Map<number, number>();
  const rangeInfo = new Map<string, RangeReport>();
  // Host-resident pages in the hand's order (fifo: oldest first; clock: the ring, the hand at the
  // front, a second chance moving a page to the back): key "client id:address".
  const queue = new Map<string, { c: RemoteClient; a: number; r: RangeReport }>();
  // Clock's reference bits: pages that faulted since the hand last passed them.
  const referenced = new Set<string>();
  let secondChances = 0;
  let examined = 0;
  const wpIntervalMs = o.wpIntervalMs ?? 1000;
  const writtenNow = new Set<string>();
  const writtenEver = new Set<string>();
  const perInterval: RunResult['writes']['perInterval'] = [];
  let rounds = 0;
  let roundNs = 0n;
  let roundRaced = 0;
  // The server's touch log: what each client's faults say about its accesses.
  const drain = (c: RemoteClient) => {
    let touches;
    try {
      touches = c.takeTouches();
    } catch {
      return;
    }
    for (const t of touches) {
      const k = `${c.id}:${t.address}`;
      if (!t.prefetch && o.eviction === 'clock' && o.resident !== undefined) referenced.add(k);
      if (t.write) writtenNow.add(k);
    }
  };
  const samples: RunResult['samples'] = [];
  let peak = 0;
  let evictedByLimit = 0;
  let poolFull = 0;
  let evictRaced = 0;
  const limit = o.resident === undefined ? undefined : o.resident / PAGE;
  const buf = Buffer.alloc(1 << 20);
  const recorders = new Map<number, { pid: number; rec: TraceRecorder }>();
  const recordings: NonNullable<RunResult['recordings']> = [];
  const startRecording = (c: RemoteClient) => {
    if (!o.record) return;
    const file = recorders.size || recordings.length ? `${o.record.path}.${c.pid}` : o.record.path;
    try {
      recorders.set(c.id, { pid: c.pid, rec: c.record({ path: file, sampleIntervalMs: wpIntervalMs, sampleMethod: 'wp-rounds' }) });
    } catch (err) {
      notes.push(`client ${c.pid}: not recorded (${(err as Error).message})`);
    }
  };
  const stopRecording = (id: number) => {
    const r = recorders.get(id);
    if (!r) return;
    recorders.delete(id);
    try {
      recordings.push({ ...r.rec.stop(), pid: r.pid });
    } catch (err) {
      notes.push(`client ${r.pid}: trace ${r.rec.path} incomplete (${(err as Error).message})`);
    }
  };
  const rangeOf = (c: RemoteClient, r: RemoteClient['ranges'][number]): RangeReport => {
    const rk = `${c.pid}:${r.address.toString(16)}:${r.length}`;
    let info = rangeInfo.get(rk);
    if (!info) rangeInfo.set(rk, (info = { pid: c.pid, address: '0x' + r.address.toString(16), bytes: r.length, peakResidentPages: 0, migratedToDevice: 0 }));
    return info;
  };
  // The server warns of each fault resolved by its fallback: a fault on a range in the moment
  // before its rule was installed, zero-filled, which is right for new memory. It is counted
  // (faults.fallback); as a warning it would land in the middle of the program's stderr.
  const printers = process.listeners('warning');
  process.removeAllListeners('warning');
  const onWarning = (w: Error) => {
    if (!/faults resolved by the fallback/.test(w.message)) for (const f of printers) f(w);
  };
  process.on('warning', onWarning);
  const server = await FaultServer.listen(sock, {
    maxClients: 1024,
    // Before the client is served: its trace has its first faults.
    beforeServe: startRecording,
    onRanges: (c) => {
      c.ranges.forEach((r) => rangeOf(c, r));
    },
    onClient: (c) => {
      c.ranges.forEach((r) => rangeOf(c, r));
      // With rounds, a page faulted in by a read comes in write-protected: a write after it, in the
      // same interval, is then a WP fault too and is counted.
      if (o.prefetch || wpIntervalMs) c.configure({ prefetch: o.prefetch ?? 0, writeProtectReads: wpIntervalMs > 0 });
      try {
        pagemaps.set(c.id, fs.openSync(`/proc/${c.pid}/pagemap`, 'r'));
      } catch (err) {
        notes.push(`client ${c.pid}: no pagemap (${(err as Error).message}): its resident set is not sampled`);
      }
    },
    onClientExit: (c) => {
      drain(c);
      stopRecording(c.id);
      const fd = pagemaps.get(c.id);
      if (fd !== undefined) fs.closeSync(fd);
      pagemaps.delete(c.id);
      for (const [k, v] of queue) if (v.c === c) queue.delete(k);
    },
  });
  const shutdown = async () => {
    await server.close();
    for (const id of [...recorders.keys()]) stopRecording(id);
    process.off('warning', onWarning);
    for (const f of printers) process.on('warning', f);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const started = process.hrtime.bigint();
  const sample = () => {
    let resident = 0;
    const seen = new Set<string>();
    for (const c of server.clients) {
      const fd = pagemaps.get(c.id);
      if (fd === undefined) continue;
      for (const r of c.ranges) {
        const info = rangeOf(c, r);
        let pages: number[];
        try {
          pages = presentPages(fd, r.address, r.length, buf);
        } catch {
          continue; // the process is exiting
        }
        info.peakResidentPages = Math.max(info.peakResidentPages, pages.length);
        resident += pages.length;
        if (limit === undefined) continue; // nothing is evicted: the counts are all
        // As numbers (exact: mmap without a high hint places memory below 2^47), keyed as the touch
        // log's bigints print.
        const base = Number(r.address);
        for (const i of pages) {
          const a = base + i * PAGE;
          const k = `${c.id}:${a}`;
          seen.add(k);
          if (!queue.has(k) && r.shared) queue.set(k, { c, a, r: info });
        }
      }
      drain(c);
    }
    for (const k of queue.keys()) if (!seen.has(k)) queue.delete(k);
    peak = Math.max(peak, resident);
    if (limit !== undefined && resident > limit) {
      let excess = resident - limit;
      // Clock goes round at most twice: by then every bit it found set is clear.
      let budget = 2 * queue.size;
      for (const [k, v] of queue) {
        if (excess <= 0 || budget-- <= 0) break;
        examined++;
        if (o.eviction === 'clock' && referenced.delete(k)) {
          queue.delete(k);
          queue.set(k, v); // visited again by this loop, after the rest of the ring
          secondChances++;
          continue;
        }
        queue.delete(k);
        referenced.delete(k);
        try {
          const n = v.c.evict(BigInt(v.a), PAGE);
          evictedByLimit += n;
          v.r.migratedToDevice += n;
          excess -= n;
        } catch (err) {
          const code = (err as { code?: string }).code;
          if (code === 'ENOSPC') {
            poolFull++;
            break;
          }
          // The program let go of the range since the sample (freed, unmapped): nothing to migrate.
          if (code === 'EINVAL' || code === 'ESRCH' || code === 'ERR_PAGEMIRROR_CLOSED') evictRaced++;
          else noteOnce(`evict failed: ${(err as Error).message}`);
        }
      }
    }
    const device = server.clients.reduce((n, c) => n + c.counters().poolHeld, 0);
    samples.push({ ms: Number(process.hrtime.bigint() - started) / 1e6, residentPages: resident, devicePages: device });
  };
  const env = {
    ...process.env,
    LD_PRELOAD: [shim, process.env.LD_PRELOAD].filter(Boolean).join(' '),
    PAGEMIRROR_SOCKET: sock,
    PAGEMIRROR_THRESHOLD: String(o.threshold),
    PAGEMIRROR_POOL_PAGES: String(o.deviceMemory / PAGE),
  };
  // A write-protect round: closes the interval (its written pages) and protects every host-resident
  // page again, so each page's next write is a WP fault of the next interval.
  const round = () => {
    const t0 = process.hrtime.bigint();
    // Each trace's interval ends here, before any page is protected again.
    for (const [, r] of recorders) {
      if (r.rec.header.sampling.method !== 'wp-rounds') continue;
      try {
        r.rec.writeRound();
      } catch (err) {
        noteOnce(`trace ${r.rec.path}: ${(err as Error).message}`);
      }
    }
    for (const c of server.clients) drain(c);
    perInterval.push({ ms: Number(t0 - started) / 1e6, pages: writtenNow.size });
    for (const k of writtenNow) writtenEver.add(k);
    writtenNow.clear();
    for (const c of server.clients) {
      const fd = pagemaps.get(c.id);
      if (fd === undefined) continue;
      for (const r of c.ranges) {
        if (!r.shared || !r.modes.includes('wp')) continue;
        let pages: number[];
        try {
          pages = presentPages(fd, r.address, r.length, buf);
        } catch {
          continue; // the process is exiting
        }
        for (const [first, n] of runsOf(pages)) {
          try {
            c.writeProtect(r.address + BigInt(first * PAGE), n * PAGE);
          } catch (err) {
            const code = (err as { code?: string }).code;
            // The program let go of the range (or part of it) since the pagemap read.
            if (code === 'EINVAL' || code === 'ENOENT' || code === 'ESRCH' || code === 'ERR_PAGEMIRROR_CLOSED') roundRaced++;
            else noteOnce(`write-protect round failed: ${(err as Error).message}`);
            break;
          }
        }
      }
    }
    rounds++;
    roundNs += process.hrtime.bigint() - t0;
  };
  let exit: { code: number; signal?: string };
  const timer = setInterval(sample, o.intervalMs);
  const wpTimer = wpIntervalMs ? setInterval(round, wpIntervalMs) : undefined;
  try {
    exit = await new Promise((resolve, reject) => {
      const child = spawn(o.program, o.args, { stdio: 'inherit', env });
      child.once('error', reject);
      child.once('exit', (code, signal) =>
        resolve(signal ? { code: 128 + (os.constants.signals[signal] ?? 0), signal } : { code: code ?? 1 }),
      );
    });
  } catch (err) {
    await shutdown();
    throw err;
  } finally {
    clearInterval(timer);
    clearInterval(wpTimer);
  }
  const wallMs = Number(process.hrtime.bigint() - started) / 1e6;
  // The last clients' exits arrive from the server's I/O thread: wait for them briefly.
  for (let i = 0; i < 200 && server.clients.length; i++) await new Promise((r) => setTimeout(r, 10));
  await shutdown();
  // The last interval: what the exits' drains added since the last round.
  if (writtenNow.size || !perInterval.length) perInterval.push({ ms: Number(process.hrtime.bigint() - started) / 1e6, pages: writtenNow.size });
  for (const k of writtenNow) writtenEver.add(k);
  const all = [...server.exited];
  const sum = (f: (c: RemoteClient) => number) => all.reduce((n, c) => n + f(c), 0);
  const restored = sum((c) => c.counters().restored);
  const release = sum((c) => c.counters().restoredOnRelease);
  const total = sum((c) => c.stats().faults);
  const missingZero = sum((c) => c.counters().zeroFilled);
  const minor = sum((c) => c.counters().continued);
  const wp = sum((c) => c.counters().unprotected);
  const retried = sum((c) => c.counters().retried);
  const raced = sum((c) => c.counters().raced);
  const fallback = sum((c) => c.stats().forwarded);
  const prefetched = sum((c) => c.counters().prefetched);
  const cpuFault = restored - release - prefetched;
  let wallMsWithoutShim: number | undefined;
  if (o.compare) {
    const t0 = process.hrtime.bigint();
    await new Promise<void>((resolve, reject) => {
      const child = spawn(o.program, o.args, { stdio: ['ignore', 'ignore', 'ignore'] });
      child.once('error', reject);
      child.once('exit', () => resolve());
    });
    wallMsWithoutShim = Number(process.hrtime.bigint() - t0) / 1e6;
  }
  return {
    pageSize: PAGE,
    program: o.program,
    args: o.args,
    exitCode: exit.code,
    ...(exit.signal ? { signal: exit.signal } : {}),
    wallMs,
    ...(wallMsWithoutShim !== undefined ? { wallMsWithoutShim } : {}),
    processes: all.length,
    attachedBytes: [...rangeInfo.values()].reduce((n, r) => n + r.bytes, 0),
    faults: { total, missingZero, missingFromDevice: cpuFault, minor, wp, retried, raced, fallback, other: total - missingZero - cpuFault - minor - wp - retried - raced - fallback },
    migrations: { toDevice: { total: sum((c) => c.counters().evicted), residentLimit: evictedByLimit }, toHost: { total: restored, cpuFault, prefetch: prefetched, release } },
    eviction: { policy: o.eviction, secondChances, examined },
    writes: {
      method: wpIntervalMs ? 'wp-rounds' : 'none',
      intervalMs: wpIntervalMs,
      rounds,
      roundMs: Number(roundNs) / 1e6,
      protectedPages: sum((c) => c.counters().protectedPages),
      wpFaults: wp,
      distinctPages: writtenEver.size,
      perInterval,
      lost: sum((c) => c.counters().touchesDropped),
      raced: roundRaced,
    },
    ...(limit !== undefined ? { residentLimitPages: limit } : {}),
    peakResidentPages: peak,
    poolFull,
    evictRaced,
    samples,
    ranges: [...rangeInfo.values()],
    ...(o.record ? { recordings } : {}),
    notes,
  };
}

/**
 * The run's report as text, headed by the command that ran it (`pagemirror run:`, `pagemirror
 * record:`); sizes in MiB from the page counts in the result's own page size.
 */
export function formatRun(r: RunResult, command: string): string {
  const mib = (pages: number) => `${((pages * r.pageSize) / 2 ** 20).toFixed(1)} MiB`;
  return [
    `pagemirror ${command}: ${path.basename(r.program)} exited ${r.signal ? `on ${r.signal}` : r.exitCode} after ${r.wallMs.toFixed(0)} ms${r.wallMsWithoutShim !== undefined ? ` (${r.wallMsWithoutShim.toFixed(0)} ms without the shim)` : ''}`,
    `  attached: ${r.processes} process(es), ${r.ranges.length} range(s), ${mib(r.attachedBytes / r.pageSize)}; peak resident ${mib(r.peakResidentPages)}${r.residentLimitPages !== undefined ? ` (limit ${mib(r.residentLimitPages)})` : ''}`,
    `  faults: ${r.faults.total} (missing: ${r.faults.missingZero} zero-filled, ${r.faults.missingFromDevice} from device; minor ${r.faults.minor}; wp ${r.faults.wp}; retried ${r.faults.retried}; raced ${r.faults.raced}; before their rule ${r.faults.fallback}; other ${r.faults.other})`,
    `  migrations: to device ${r.migrations.toDevice.total} pages (resident limit ${r.migrations.toDevice.residentLimit}, eviction ${r.eviction.policy}: ${r.eviction.examined} examined, ${r.eviction.secondChances} second chances); to host ${r.migrations.toHost.total} (cpu fault ${r.migrations.toHost.cpuFault}, prefetch ${r.migrations.toHost.prefetch}, release ${r.migrations.toHost.release})${r.poolFull ? `; device memory full ${r.poolFull} time(s)` : ''}`,
    r.writes.method === 'wp-rounds'
      ? `  pages written: ${r.writes.distinctPages} distinct; per ${r.writes.intervalMs} ms interval max ${Math.max(0, ...r.writes.perInterval.map((w) => w.pages))}; cost: ${r.writes.rounds} write-protect rounds (${r.writes.protectedPages} pages protected, ${r.writes.roundMs.toFixed(1)} ms), ${r.writes.wpFaults} WP faults`
      : `  pages written: ${r.writes.distinctPages} distinct, seen by faults flagged as writes only (no write-protect rounds)`,
    ...r.notes.map((n) => `  note: ${n}`),
  ].join('\n') + '\n';
}

/** Writes `<dir>/run-<time>.json` and `.html` (lib/bench/report.ts conventions). */
export function writeRunReport(dir: string, r: RunResult, version: string): { json: string; html: string } {
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const mib = (pages: number) => (pages * r.pageSize) / 2 ** 20;
  return writeReport(path.resolve(dir), `run-${stamp}`, benchEnv(false, version), r, [
    {
      title: `${path.basename(r.program)} ${r.args.join(' ')}`,
      text:
        `Exit status ${r.exitCode}; ${r.wallMs.toFixed(0)} ms attached` +
        (r.wallMsWithoutShim !== undefined ? `, ${r.wallMsWithoutShim.toFixed(0)} ms without the shim` : '') +
        `. ${r.processes} process(es) attached ${r.ranges.length} range(s), ${(r.attachedBytes / 2 ** 20).toFixed(1)} MiB.`,
      svg: [
        lineChartSvg(
          'Resident set over time',
          'ms',
          'MiB',
          [
            { name: 'host resident', points: r.samples.map((s) => ({ x: s.ms, y: mib(s.residentPages) })) },
            { name: 'device memory', points: r.samples.map((s) => ({ x: s.ms, y: mib(s.devicePages) })) },
          ],
          { linearX: true },
        ),
        lineChartSvg(
          r.writes.method === 'wp-rounds' ? `Pages written per ${r.writes.intervalMs} ms (write-protect rounds)` : 'Pages written (faults flagged as writes; no write-protect rounds)',
          'ms',
          'pages',
          [{ name: 'pages written in the interval', points: r.writes.perInterval.map((w) => ({ x: w.ms, y: w.pages })) }],
          { linearX: true },
        ),
      ],
      table: {
        columns: ['what', 'pages'],
        rows: [
          ['faults', r.faults.total],
          ['missing, zero-filled', r.faults.missingZero],
          ['missing, from device (migration to host, trigger: cpu fault)', r.faults.missingFromDevice],
          ['minor', r.faults.minor],
          ['write-protect (rounds and evictions)', r.faults.wp],
          ['retried', r.faults.retried],
          ['raced (page filled by another thread first)', r.faults.raced],
          [`migrated to device (trigger: resident limit, eviction ${r.eviction.policy})`, r.migrations.toDevice.residentLimit],
          ['  resident pages the hand examined', r.eviction.examined],
          ['  second chances (clock)', r.eviction.secondChances],
          ['migrated to host (trigger: prefetch)', r.migrations.toHost.prefetch],
          ['migrated to host on release (munmap, mremap, madvise, fork, free)', r.migrations.toHost.release],
          ['distinct pages written', r.writes.distinctPages],
          [`write-protect rounds (every ${r.writes.intervalMs} ms)`, r.writes.rounds],
          ['  pages write-protected', r.writes.protectedPages],
          ['  time in rounds, ms', r.writes.roundMs.toFixed(1)],
        ].map(([k, v]) => [String(k), String(v)]),
      },
    },
    {
      title: 'Attached ranges',
      table: {
        columns: ['pid', 'address', 'bytes', 'peak resident pages', 'migrated to device'],
        rows: r.ranges.map((x) => [String(x.pid), x.address, String(x.bytes), String(x.peakResidentPages), String(x.migratedToDevice)]),
      },
    },
  ]);
}
