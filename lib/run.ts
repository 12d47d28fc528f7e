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
  eviction: 'fifo';
  /** How often the resident set is sampled (and the limit enforced), ms. */
  intervalMs: number;
  compare: boolean;
  /**
   * Record a page-access trace of each attached process (RemoteClient.record: recordTrace tapping
   * the service, so the rules are unchanged), from its first fault on. The first process writes
   * `path`, each later one `path.PID`. A trace holds every range its process registered, each
   * from its REGISTER to its release.
   */
  record?: { path: string; sampleIntervalMs: number };
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
   * service's fallback; `other` is what none of these explains (0 when the counters agree).
   */
  faults: { total: number; missingZero: number; missingFromDevice: number; minor: number; wp: number; retried: number; fallback: number; other: number };
  migrations: {
    toDevice: { total: number; residentLimit: number };
    toHost: { total: number; cpuFault: number; release: number };
  };
  /** Pages written after the server write-protected them (WP faults): the pages dirtied under it. */
  pagesDirtied: number;
  residentLimitPages?: number;
  peakResidentPages: number;
  poolFull: number;
  /** Evictions that found the page's range gone (released by the program since the sample). */
  evictRaced: number;
  samples: { ms: number; residentPages: number; devicePages: number }[];
  ranges: RangeReport[];
  /** With `record`: what each process's recorder wrote and cost (its stop() summary). */
  recordings?: (RecordingSummary & { pid: number })[];
  notes: string[];
}

/** Pages of [address, address + length) mapped in pid (pagemap's present bit). */
function presentPages(fd: number, address: bigint, length: number, buf: Buffer): bigint[] {
  const n = length / PAGE;
  const need = n * 8;
  const b = buf.length >= need ? buf : Buffer.alloc(need);
  const got = fs.readSync(fd, b, 0, need, Number(address / BigInt(PAGE)) * 8);
  const out: bigint[] = [];
  for (let i = 0; i < got / 8; i++) if (b.readBigUInt64LE(i * 8) >> 63n) out.push(address + BigInt(i * PAGE));
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
  const pagemaps = new Map<number, number>();
  const rangeInfo = new Map<string, RangeReport>();
  // Host-resident pages, oldest first (FIFO): key "client id:address".
  const fifo = new Map<string, { c: RemoteClient; a: bigint; r: RangeReport }>();
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
      recorders.set(c.id, { pid: c.pid, rec: c.record({ path: file, sampleIntervalMs: o.record.sampleIntervalMs }) });
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
      try {
        pagemaps.set(c.id, fs.openSync(`/proc/${c.pid}/pagemap`, 'r'));
      } catch (err) {
        notes.push(`client ${c.pid}: no pagemap (${(err as Error).message}): its resident set is not sampled`);
      }
    },
    onClientExit: (c) => {
      stopRecording(c.id);
      const fd = pagemaps.get(c.id);
      if (fd !== undefined) fs.closeSync(fd);
      pagemaps.delete(c.id);
      for (const [k, v] of fifo) if (v.c === c) fifo.delete(k);
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
        let pages: bigint[];
        try {
          pages = presentPages(fd, r.address, r.length, buf);
        } catch {
          continue; // the process is exiting
        }
        info.peakResidentPages = Math.max(info.peakResidentPages, pages.length);
        resident += pages.length;
        for (const a of pages) {
          const k = `${c.id}:${a}`;
          seen.add(k);
          if (!fifo.has(k) && r.shared) fifo.set(k, { c, a, r: info });
        }
      }
    }
    for (const k of fifo.keys()) if (!seen.has(k)) fifo.delete(k);
    peak = Math.max(peak, resident);
    if (limit !== undefined && resident > limit) {
      let excess = resident - limit;
      for (const [k, v] of fifo) {
        if (excess <= 0) break;
        fifo.delete(k);
        try {
          const n = v.c.evict(v.a, PAGE);
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
          if (code === 'EINVAL' || code === 'ERR_PAGEMIRROR_CLOSED') evictRaced++;
          else if (!notes.includes(`evict failed: ${(err as Error).message}`)) notes.push(`evict failed: ${(err as Error).message}`);
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
  let exit: { code: number; signal?: string };
  const timer = setInterval(sample, o.intervalMs);
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
  }
  const wallMs = Number(process.hrtime.bigint() - started) / 1e6;
  // The last clients' exits arrive from the server's I/O thread: wait for them briefly.
  for (let i = 0; i < 200 && server.clients.length; i++) await new Promise((r) => setTimeout(r, 10));
  await shutdown();
  const all = [...server.exited];
  const sum = (f: (c: RemoteClient) => number) => all.reduce((n, c) => n + f(c), 0);
  const restored = sum((c) => c.counters().restored);
  const release = sum((c) => c.counters().restoredOnRelease);
  const total = sum((c) => c.stats().faults);
  const missingZero = sum((c) => c.counters().zeroFilled);
  const minor = sum((c) => c.counters().continued);
  const wp = sum((c) => c.counters().unprotected);
  const retried = sum((c) => c.counters().retried);
  const fallback = sum((c) => c.stats().forwarded);
  const cpuFault = restored - release;
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
    faults: { total, missingZero, missingFromDevice: cpuFault, minor, wp, retried, fallback, other: total - missingZero - cpuFault - minor - wp - retried - fallback },
    migrations: { toDevice: { total: sum((c) => c.counters().evicted), residentLimit: evictedByLimit }, toHost: { total: restored, cpuFault, release } },
    pagesDirtied: wp,
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
    `  faults: ${r.faults.total} (missing: ${r.faults.missingZero} zero-filled, ${r.faults.missingFromDevice} from device; minor ${r.faults.minor}; wp ${r.faults.wp}; retried ${r.faults.retried}; before their rule ${r.faults.fallback}; other ${r.faults.other})`,
    `  migrations: to device ${r.migrations.toDevice.total} pages (resident limit ${r.migrations.toDevice.residentLimit}); to host ${r.migrations.toHost.total} (cpu fault ${r.migrations.toHost.cpuFault}, release ${r.migrations.toHost.release})`,
    `  pages dirtied under write protection (WP faults): ${r.pagesDirtied}${r.poolFull ? `; device memory full ${r.poolFull} time(s)` : ''}`,
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
      ],
      table: {
        columns: ['what', 'pages'],
        rows: [
          ['faults', r.faults.total],
          ['missing, zero-filled', r.faults.missingZero],
          ['missing, from device (migration to host, trigger: cpu fault)', r.faults.missingFromDevice],
          ['minor', r.faults.minor],
          ['write-protect (pages dirtied under protection)', r.faults.wp],
          ['retried', r.faults.retried],
          ['migrated to device (trigger: resident limit)', r.migrations.toDevice.residentLimit],
          ['migrated to host on release (munmap, mremap, madvise, fork, free)', r.migrations.toHost.release],
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
