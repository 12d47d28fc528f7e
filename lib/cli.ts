#!/usr/bin/env node
// pagemirror command line: probe, demo (the README's main job), bench (the benchmark suites).
// Each command parses its own flags strictly (node:util parseArgs): a flag nobody knows, or a value
// that cannot be used, stops the command before it runs anything, with one line on stderr and
// exit status 2. Everything that loads the addon is imported only once a command runs, so --help,
// --version and a usage error work without it, and a missing addon is one line, not a stack trace.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { LinkPreset } from './link.js';

const EXIT_OK = 0;
const EXIT_FAILURE = 1;
const EXIT_USAGE = 2;
const EXIT_TARGET_MISSED = 3;

const EXIT_CODES = `exit status:
  0  success
  1  failure (an error, or this machine cannot run what was asked; one line on stderr says why)
  2  usage error (an unknown command, flag or suite, or a bad value)
  3  a benchmark ran but missed one of its targets (bench)`;

function version(): string {
  const pkg = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'package.json');
  try {
    return (JSON.parse(fs.readFileSync(pkg, 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

/** A mistake in the command line: exit status 2, one line. */
class UsageError extends Error {
  constructor(
    message: string,
    readonly command?: string,
  ) {
    super(message);
  }
}

type Flags = Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }>;

const HELP_FLAG: Flags = { help: { type: 'boolean', short: 'h' } };

/** The closest known flag, for a typo such as --pagse. */
function closest(name: string, known: string[]): string | undefined {
  const dist = (a: string, b: string) => {
    const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
    for (let j = 1; j <= b.length; j++) d[0]![j] = j;
    for (let i = 1; i <= a.length; i++)
      for (let j = 1; j <= b.length; j++)
        d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    return d[a.length]![b.length]!;
  };
  let best: string | undefined;
  let bestD = 3;
  for (const k of known) {
    const n = dist(name, k);
    if (n < bestD) [best, bestD] = [k, n];
  }
  return best;
}

type Values<F extends Flags> = { [K in keyof F]?: F[K] extends { multiple: true } ? string[] : F[K]['type'] extends 'string' ? string : boolean } & { help?: boolean };

function parse<F extends Flags>(command: string, args: string[], flags: F, positionals: boolean): { values: Values<F>; positionals: string[] } {
  const options = { ...HELP_FLAG, ...flags };
  try {
    return parseArgs({ args, options, strict: true, allowPositionals: positionals }) as { values: Values<F>; positionals: string[] };
  } catch (err) {
    const e = err as { code?: string; message: string };
    if (!e.code?.startsWith('ERR_PARSE_ARGS_')) throw err;
    const unknown = /^Unknown option '(-{1,2})([^']*)'/.exec(e.message);
    if (unknown) {
      const near = unknown[1] === '--' ? closest(unknown[2]!.split('=')[0]!, Object.keys(options)) : undefined;
      throw new UsageError(`unknown option '${unknown[1]}${unknown[2]}'${near ? ` (did you mean --${near}?)` : ''}`, command);
    }
    const positional = /^Unexpected argument '([^']*)'/.exec(e.message);
    if (positional) throw new UsageError(`unexpected argument '${positional[1]}'`, command);
    // Node's text for a missing or ambiguous value: its first line says it.
    throw new UsageError(e.message.split('\n')[0]!.replace(/^Option/, 'option').replace(/\.$/, ''), command);
  }
}

function positiveInt(flag: string, v: string | undefined, max: number): number | undefined {
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v)) throw new UsageError(`--${flag} must be a positive integer, got '${v}'`, 'bench');
  const n = Number(v);
  if (n < 1 || n > max) throw new UsageError(`--${flag} must be from 1 to ${max}, got ${v}`, 'bench');
  return n;
}

/** Bytes, with an optional binary suffix: 8388608, 8M, 8MiB, 1G; whole MiB (so whole pages of any size). */
function bytes(flag: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const m = /^(\d+)(?:([KMG])(?:i?B)?)?$/i.exec(v);
  if (!m) throw new UsageError(`--${flag} must be a size in bytes (e.g. 8388608, 8M, 8MiB), got '${v}'`, 'bench');
  const n = Number(m[1]) * 1024 ** ' KMG'.indexOf((m[2] ?? ' ').toUpperCase());
  if (n < 1 << 20 || n % (1 << 20)) throw new UsageError(`--${flag} must be a whole number of MiB (at least 1), got ${v}`, 'bench');
  if (n > os.totalmem()) throw new UsageError(`--${flag} ${v} is more than this machine's memory (${os.totalmem()} bytes)`, 'bench');
  return n;
}

function replacer(_k: string, v: unknown): unknown {
  return typeof v === 'bigint' ? v.toString() : v;
}

interface Command {
  summary: string;
  help: () => Promise<string>;
  run: (args: string[]) => Promise<number>;
}

const PROBE_HELP = `usage: pagemirror probe [--json]

What this kernel offers: userfaultfd features and ioctls per memory kind, THP/hugetlb,
PAGEMAP_SCAN, cachestat, tmpfs/ext4/DAX, and which experiments can run here (and why not).

options:
  --json      the probe as JSON on stdout
  -h, --help  this text

${EXIT_CODES}
`;

const DEMO_HELP = `usage: pagemirror demo [--json]

Real faults on built-in defaults (anonymous memory, a memfd, files in /dev/shm and the temp dir):
the probe, then each fault kind resolved by the native fast path and by a TypeScript batch
handler, the engine, and the four file strategies, timed against the plain C baseline in the same
run (several minutes). Reports (JSON + HTML) go to ./results.

options:
  --json      only a JSON line on stdout (the report files and whether every target was met);
              progress on stderr
  -h, --help  this text

${EXIT_CODES}
`;

/** --quick: a smoke-sized run (seconds per suite): numbers too small to compare, output complete. */
const QUICK = { pages: 256, reps: 2, size: 8 << 20 };

async function benchHelp(): Promise<string> {
  let suites: string;
  try {
    const { SUITES, SUITE_TEXT } = await import('./bench/cli.js');
    const w = Math.max(...SUITES.map((s) => s.length));
    suites = SUITES.map((s) => `  ${s.padEnd(w)}  ${(SUITE_TEXT as Record<string, string | undefined>)[s] ?? ''}`.trimEnd()).join('\n');
  } catch (err) {
    suites = `  (the list needs the addon: ${(err as Error).message.replace(/^pagemirror: /, '')})`;
  }
  return `usage: pagemirror bench [suite...] [options]

Benchmarks against the plain C baseline, in one run: writes JSON (raw samples + environment) and
an HTML report with SVG plots per suite to --out, and prints a summary. No suite named: all.

suites:
${suites}

options:
  --pages N      pages per repetition (default 4096; 16 to 4194304)
  --reps N       repetitions (default 7; strategies and pager 3)
  --size BYTES   engine: bytes per bandwidth repetition (default 256M); batching: memory read
                 (default 64M); oversubscription: device memory = size / 8 (default 8M);
                 pager: the file (default 8M: about 3 minutes in all, two thirds of it in the
                 eight random cells at 2 MiB granules and a 25 % limit, which thrash: three of
                 four 4 KiB accesses refill 2 MiB, some 400 times the file's bytes per run)
                 (whole MiB: bytes, or with a suffix: 8M, 8MiB, 1G)
  --dir DIR      strategies, pager: where the disk file goes (default the OS temp dir)
  --cells SPEC   pager: only the cells whose label, as the progress shows it, holds every word of
                 SPEC; a comma between patterns means or. E.g. --cells '2M x2 25%',
                 --cells 'disk rand-write, write-back tmpfs'
  --writeback M  pager: the pager's write-back of evicted granules: pagecache (default: clean once
                 pwrite returned, as the C pager does) or confirmed (the pager's own default: clean
                 once on disk; what the write-error guarantee costs)
  --spin-us US   pager: both pagers' service threads poll for up to US µs before sleeping
                 (default 0: they sleep at once and pay an idle CPU's wake-up per fault)
  --c-tracks-dirty
                 pager: the C pager tracks dirty granules as the pager does (write-protect),
                 so the ratio leaves out what dirty tracking costs
  --out DIR      where the reports go (default ./results)
  --quick        a smoke-sized run: --pages ${QUICK.pages} --reps ${QUICK.reps} --size ${QUICK.size >> 20}M unless given
  --json         the results (every report's environment and data) as JSON on stdout; the
                 summary and progress go to stderr
  --no-pin       do not pin the benchmark and the C baseline to one CPU
  --link PRESET  engine, batching, oversubscription: also report modeled device time over this
                 link (pcie3x16, pcie4x16, pcie5x16, nvlink-c2c, cxl; docs/link-model.md);
                 repeat for several (each adds a run per repetition)
  --quiet        no progress and no summary on stderr
  -h, --help     this text

Temporary files (strategies) are removed on exit and on SIGINT/SIGTERM/SIGHUP.

${EXIT_CODES}
`;
}

const REPLAY_HELP = `usage: pagemirror replay TRACE [options]

Replays an access trace (recordTrace(), docs/trace-format.md) through an emulated device, on a
fresh device and mirror for each policy, and prints what the device did: misses, device faults,
fault rounds, migrations both ways, evictions, prefetches, host time (and modeled device time when
the device has a link model). Counts are deterministic for a trace and its options. A flag given a
comma-separated list replays every combination, e.g. --eviction fifo,lru --device-memory 1M,4M.

options:
  --device-memory SIZE   device memory (default 64M; bytes or with K/M/G, whole pages)
  --placement P          host (map the host page, default) or device (migrate on fault)
  --eviction E           off (default), fifo or lru
  --prefetch P           off (default), sequential or density
  --fault-around SIZE    fault-around granule (default one page)
  --fault-batch N        faults per service round (default 32)
  --link PRESET          model the device link and report modeled device time: pcie3x16,
                         pcie4x16, pcie5x16, nvlink-c2c or cxl (docs/link-model.md; default none)
  --threads N            device threads (default: the trace's threads, at most 64)
  --window N             accesses per replay step (default: the fault batch)
  --range N|all          what to replay: all (default) puts every range of the trace on pages of
                         its own, one after another, so the device sees the whole program; N one
                         range (any index, a range added while recording too: the JSON output
                         lists the trace's ranges and each result's layout)
  --no-samples           replay only the faults, not the sampled writes
  --json                 the results as JSON on stdout
  --out DIR              also write a JSON + HTML report to DIR
  -h, --help             this text

${EXIT_CODES}
`;

const SERVE_HELP = `usage: pagemirror serve --socket PATH [--allow-uid UID]... [--max-clients N] [--json]

Serves other processes' page faults (docs/fault-server.md): programs linked with the C client
library (native/client/pagemirror_client.h; pm_connect, pm_alloc, pm_attach) hand their
userfaultfd and ranges over the Unix socket PATH (created 0600; a stale socket there is replaced,
anything else refused). Policy: a missing page gets a zero page (or its copy from the client's
pool, when the server took it there), a minor fault is continued (the client's memfd page), a
write-protect fault is lifted. Runs until SIGINT or SIGTERM, then prints each client's counters.
Clients connecting and leaving are reported on stderr.

options:
  --socket PATH      where to listen (at most 107 bytes)
  --allow-uid UID    a user allowed to connect (SO_PEERCRED); repeat for more. Default: only
                     the user running the server
  --max-clients N    connections at once (1 to 4096, default 64)
  --json             the counters as JSON on stdout
  -h, --help         this text

${EXIT_CODES}
`;

/** A comma-separated list of flag values, each checked by `one`; [undefined] when the flag is absent. */
function list<T>(flag: string, v: string | undefined, one: (x: string) => T): (T | undefined)[] {
  if (v === undefined) return [undefined];
  const items = v.split(',');
  if (items.some((x) => x === '')) throw new UsageError(`--${flag} has an empty item: '${v}'`, 'replay');
  return [...new Set(items)].map(one);
}

function choice<T extends string>(flag: string, allowed: readonly T[], command = 'replay'): (x: string) => T {
  return (x) => {
    if (!(allowed as readonly string[]).includes(x)) throw new UsageError(`--${flag} must be ${allowed.join(', ')}, got '${x}'`, command);
    return x as T;
  };
}

/** A size in bytes (K/M/G suffixes, binary), a whole number of pages. */
function pageBytes(flag: string, command = 'replay'): (x: string) => number {
  return (x) => {
    const m = /^(\d+)(?:([KMG])(?:i?B)?)?$/i.exec(x);
    const n = m ? Number(m[1]) * 1024 ** ' KMG'.indexOf((m[2] ?? ' ').toUpperCase()) : NaN;
    const page = 4096;
    if (!(n >= page) || n % page || n > os.totalmem()) throw new UsageError(`--${flag} must be a size in whole pages up to this machine's memory (e.g. 65536, 256K, 4M), got '${x}'`, command);
    return n;
  };
}

function count(flag: string, max: number, command = 'replay', min = 1): (x: string) => number {
  return (x) => {
    if (!/^\d+$/.test(x) || Number(x) < min || Number(x) > max) throw new UsageError(`--${flag} must be from ${min} to ${max}, got '${x}'`, command);
    return Number(x);
  };
}

const RUN_HELP = `usage: pagemirror run [options] -- PROGRAM [ARGS...]

Runs an unmodified, dynamically linked PROGRAM with the preload shim (pagemirror_preload.so,
docs/attach.md): its large allocations and anonymous mappings are handed to a fault server on a
private socket, which keeps at most --resident of them in host memory and migrates the rest to
"device memory" (the process's pool); a CPU access brings a page back. stdin, stdout and stderr are
the program's; the exit status is the program's (128 + signal if a signal ended it), or 1 if
nothing could be attached. Static and set-user-ID/set-group-ID programs are refused: no preload
reaches them. A report (faults by kind, migrations both ways with their triggers, pages written,
the resident set over time, per range) goes to stderr, or to --out as JSON and HTML.

options:
  --resident SIZE       host resident-set limit over all attached memory (K/M/G; default: none)
  --device-memory SIZE  pool of each process (default 64M)
  --threshold SIZE      attach allocations of at least SIZE (default 1M)
  --eviction POLICY     which resident pages go first: fifo (default: the first seen resident) or
                        clock (second chance; its reference bit is any fault the page took since
                        the hand last passed: first touch, refault, WP fault of a round; reads of
                        a mapped page are invisible to the server)
  --interval MS         sample the resident set (and enforce the limit) every MS ms (1-1000, default 10)
  --wp-interval MS      write-protect every resident page every MS ms and count the pages written
                        in each interval by their WP faults (0-60000, default 1000; 0: no rounds)
  --prefetch N          a fault that brings a page back from device memory also brings back those
                        of the next N pages of its range that are there (0-512, default 0)
  --compare             also run PROGRAM without the shim (output discarded) and report both times
  --out DIR             write run-<time>.json and .html into DIR
  --json                the report as JSON on stderr
  -h, --help            this text

${EXIT_CODES}
`;

const RUN_FLAGS = {
  resident: { type: 'string' },
  'device-memory': { type: 'string' },
  threshold: { type: 'string' },
  eviction: { type: 'string' },
  interval: { type: 'string' },
  'wp-interval': { type: 'string' },
  prefetch: { type: 'string' },
  compare: { type: 'boolean' },
  out: { type: 'string' },
  json: { type: 'boolean' },
} as const;

/** `run`'s options (and `record`'s, which adds its own `extra` flags): the program and how to attach it. */
async function parseRun<F extends Flags>(command: string, args: string[], extra: F) {
  const dash = args.indexOf('--');
  const values = parse(command, dash < 0 ? args : args.slice(0, dash), { ...RUN_FLAGS, ...extra }, false).values as Values<typeof RUN_FLAGS> & Values<F>;
  if (values.help) return { help: true as const };
  const argv = dash < 0 ? [] : args.slice(dash + 1);
  if (!argv.length) throw new UsageError('PROGRAM is required after --', command);
  const size = (flag: string, v: string | undefined, dflt: number) => (v === undefined ? dflt : pageBytes(flag, command)(v));
  const resident = values.resident === undefined ? undefined : size('resident', values.resident, 0);
  const deviceMemory = size('device-memory', values['device-memory'], 64 << 20);
  const threshold = size('threshold', values.threshold, 1 << 20);
  const eviction = choice('eviction', ['fifo', 'clock'] as const, command)(values.eviction ?? 'fifo');
  const intervalMs = values.interval === undefined ? 10 : count('interval', 1000, command)(values.interval);
  const wpIntervalMs = values['wp-interval'] === undefined ? 1000 : count('wp-interval', 60000, command, 0)(values['wp-interval']);
  const prefetch = values.prefetch === undefined ? 0 : count('prefetch', 512, command, 0)(values.prefetch);
  const run = await import('./run.js');
  const program = run.resolveProgram(argv[0]!);
  if (!program) throw Object.assign(new Error(`${argv[0]}: no such executable (looked in PATH)`), { code: 'ENOENT' });
  const refused = run.refusal(program);
  if (refused) throw Object.assign(new Error(`refused: ${refused}`), { code: 'ERR_PAGEMIRROR_NOT_ATTACHABLE' });
  const options = { program, args: argv.slice(1), resident, deviceMemory, threshold, eviction, intervalMs, wpIntervalMs, prefetch, compare: values.compare === true };
  return { help: false as const, values, options, run };
}

/** The program's exit status, or 1 (with why) if nothing was attached. */
function attachedExit(command: string, r: import('./run.js').RunResult): number {
  if (r.processes === 0) {
    process.stderr.write(`pagemirror ${command}: nothing was attached (no process connected and registered memory): see the line above from the shim, or lower --threshold\n`);
    return EXIT_FAILURE;
  }
  return r.exitCode;
}

async function runCommand(args: string[]): Promise<number> {
  const p = await parseRun('run', args, {});
  if (p.help) return help('run');
  const { values, options, run } = p;
  const r = await run.runAttached(options);
  const files = values.out ? run.writeRunReport(values.out, r, version()) : undefined;
  process.stderr.write(values.json ? JSON.stringify({ ...r, ...(files ? { files } : {}) }) + '\n' : run.formatRun(r, 'run') + (files ? `written: ${files.json} ${files.html}\n` : ''));
  return attachedExit('run', r);
}

const RECORD_HELP = `usage: pagemirror record [run's options] [--out FILE] [--sample-interval MS] -- PROGRAM [ARGS...]

Runs PROGRAM attached as \`pagemirror run\` does (same options, same policy; see pagemirror run
--help) and records a page-access trace of its attached memory (docs/trace-format.md): the faults
the server reads, by kind, in order, and every MS ms the pages written since the last sample,
taken by run's write-protect rounds (sampling method wp-rounds: --sample-interval sets
--wp-interval).
The first attached process writes FILE, each later one (a fork, a child) FILE.PID. A trace holds
every range its process registers, from its first fault, each from its REGISTER to its release.
Recording taps the fault service: the server resolves every fault as it would without it. The
recording summary (faults, samples, bytes, the recorder's cost) goes to stderr with run's report;
replay the trace with \`pagemirror replay FILE\`. The exit status is the program's, or 1 if
nothing was attached or recorded.

options:
  --out FILE              the trace file (default record-<time>.pmtrace)
  --sample-interval MS    a write-protect round, and so a sample of the pages written, every MS ms;
                          0 for none (0-60000, default 1000: --wp-interval is the same setting).
                          Shorter intervals give finer samples and cost a WP fault per page
                          written again in each interval (the report gives the rounds' cost)
  --resident, --device-memory, --threshold, --eviction, --interval, --wp-interval, --prefetch,
  --compare, --json: as for run
  -h, --help              this text

${EXIT_CODES}
`;

async function recordCommand(args: string[]): Promise<number> {
  const p = await parseRun('record', args, { 'sample-interval': { type: 'string' } });
  if (p.help) return help('record');
  const { values, options, run } = p;
  if (values.out === '') throw new UsageError('--out needs a file', 'record');
  const file = path.resolve(values.out ?? `record-${new Date().toISOString().replace(/[:.]/g, '-')}.pmtrace`);
  // Samples are run's write-protect rounds: one interval, which either flag sets.
  const sample = values['sample-interval'] === undefined ? undefined : count('sample-interval', 60000, 'record', 0)(values['sample-interval']);
  if (sample !== undefined && values['wp-interval'] !== undefined && sample !== options.wpIntervalMs)
    throw new UsageError(`--sample-interval ${sample} and --wp-interval ${options.wpIntervalMs} differ: a recording samples at each write-protect round (give one of them)`, 'record');
  const wpIntervalMs = sample ?? options.wpIntervalMs;
  const r = await run.runAttached({ ...options, wpIntervalMs, record: { path: file } });
  const recordings = r.recordings ?? [];
  process.stderr.write(values.json ? JSON.stringify(r) + '\n' : run.formatRun(r, 'record') + recordings.map(formatRecording).join(''));
  const status = attachedExit('record', r);
  if (r.processes > 0 && !recordings.length) {
    process.stderr.write('pagemirror record: no trace was written (see the notes above)\n');
    return EXIT_FAILURE;
  }
  return status;
}

function formatRecording(s: NonNullable<import('./run.js').RunResult['recordings']>[number]): string {
  const ms = (ns: number) => (ns / 1e6).toFixed(1);
  return (
    `  trace ${s.path} (pid ${s.pid}): ${s.faults} faults, ${s.samples} samples (${s.sampling.method === 'none' ? `none: ${s.sampling.reason}` : s.sampling.method}), ${s.bytes} bytes` +
    `${s.dropped ? `, ${s.dropped} dropped` : ''}${s.ignored ? `, ${s.ignored} outside its ranges` : ''}\n` +
    `    cost: ${s.tapNsPerFault.toFixed(0)} ns per fault in the service, writer ${ms(s.writerCpuNs)} ms CPU, sampling ${ms(s.sampleNs)} ms, over ${ms(s.durationNs)} ms\n`
  );
}

async function serve(args: string[]): Promise<number> {
  const { values } = parse('serve', args, { socket: { type: 'string' }, 'allow-uid': { type: 'string', multiple: true }, 'max-clients': { type: 'string' }, json: { type: 'boolean' } }, false);
  if (values.help) return help('serve');
  if (!values.socket) throw new UsageError('--socket PATH is required', 'serve');
  const uids = (values['allow-uid'] as unknown as string[] | undefined)?.map((u) => {
    if (!/^\d+$/.test(u) || Number(u) > 0xfffffffe) throw new UsageError(`--allow-uid must be a uid (0 to 4294967294), got '${u}'`, 'serve');
    return Number(u);
  });
  const maxClients = values['max-clients'] === undefined ? undefined : Number(values['max-clients']);
  if (maxClients !== undefined && (!/^\d+$/.test(values['max-clients']!) || maxClients < 1 || maxClients > 4096))
    throw new UsageError(`--max-clients must be from 1 to 4096, got '${values['max-clients']}'`, 'serve');
  const { FaultServer } = await import('./server.js');
  const say = (line: string) => process.stderr.write(`pagemirror serve: ${line}\n`);
  const server = await FaultServer.listen(values.socket, {
    ...(uids ? { allowUids: uids } : {}),
    ...(maxClients ? { maxClients } : {}),
    onClient: (c) => say(`client ${c.pid} (uid ${c.uid}) connected: ${c.ranges.length} range(s), ${c.ranges.reduce((n, r) => n + r.length, 0)} bytes`),
    onClientExit: (c) => say(`client ${c.pid} left: ${c.stats().faults} faults`),
  });
  say(`listening on ${values.socket}`);
  await new Promise<void>((resolve) => {
    const stop = () => resolve();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  const live = server.clients;
  await server.close();
  const clients = [...server.exited].map((c) => {
    const s = c.stats();
    return {
      pid: c.pid,
      uid: c.uid,
      connectedAtExit: live.includes(c),
      ranges: c.ranges.length,
      bytes: c.ranges.reduce((n, r) => n + r.length, 0),
      faults: s.faults,
      resolvedNatively: s.fastResolved,
      ...c.counters(),
    };
  });
  if (values.json) process.stdout.write(JSON.stringify({ socket: values.socket, server: server.stats(), clients }) + '\n');
  else {
    const head = ['pid', 'uid', 'bytes', 'faults', 'zeroFilled', 'continued', 'unprotected', 'restored', 'evicted'] as const;
    const rows = clients.map((c) => head.map((k) => String(c[k])));
    const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
    const line = (cells: readonly string[]) => cells.map((x, i) => x.padStart(w[i]!)).join('  ');
    process.stdout.write([line(head), ...rows.map(line)].join('\n') + '\n');
  }
  return EXIT_OK;
}

const COMMANDS: Record<string, Command> = {
  probe: {
    summary: 'what this kernel offers, and which experiments can run here',
    help: async () => PROBE_HELP,
    async run(args) {
      const { values } = parse('probe', args, { json: { type: 'boolean' } }, false);
      if (values.help) return help('probe');
      const { probe, formatProbe } = await import('./probe.js');
      const p = probe();
      process.stdout.write(values.json ? JSON.stringify(p, replacer, 2) + '\n' : formatProbe(p) + '\n');
      return EXIT_OK;
    },
  },
  demo: {
    summary: 'real faults on built-in defaults, timed against the plain C baseline',
    help: async () => DEMO_HELP,
    async run(args) {
      const { values } = parse('demo', args, { json: { type: 'boolean' } }, false);
      if (values.help) return help('demo');
      const { runDemo } = await import('./demo.js');
      return runDemo({ json: values.json === true, version: version() });
    },
  },
  bench: {
    summary: 'the benchmark suites against the plain C baseline, with JSON and HTML reports',
    help: benchHelp,
    async run(args) {
      const { values, positionals } = parse(
        'bench',
        args,
        {
          pages: { type: 'string' },
          reps: { type: 'string' },
          size: { type: 'string' },
          dir: { type: 'string' },
          out: { type: 'string' },
          quick: { type: 'boolean' },
          cells: { type: 'string' },
          writeback: { type: 'string' },
          'spin-us': { type: 'string' },
          'c-tracks-dirty': { type: 'boolean' },
          json: { type: 'boolean' },
          'no-pin': { type: 'boolean' },
          quiet: { type: 'boolean' },
          link: { type: 'string', multiple: true },
        },
        true,
      );
      if (values.help) return help('bench');
      const { LINK_PRESETS } = await import('./link.js');
      const presets = Object.keys(LINK_PRESETS);
      for (const l of values.link ?? [])
        if (!presets.includes(l)) throw new UsageError(`unknown --link preset '${l}' (presets: ${presets.join(', ')})`, 'bench');
      const pages = positiveInt('pages', values.pages, 1 << 22);
      // 16: one device window of the strategies suite, a dirty page in each quarter.
      if (pages !== undefined && pages < 16) throw new UsageError(`--pages must be from 16 to ${1 << 22}, got ${pages}`, 'bench');
      const reps = positiveInt('reps', values.reps, 1000);
      const size = bytes('size', values.size);
      for (const f of ['dir', 'out'] as const) if (values[f] === '') throw new UsageError(`--${f} needs a directory`, 'bench');
      if (values.dir !== undefined && !fs.statSync(values.dir, { throwIfNoEntry: false })?.isDirectory())
        throw new UsageError(`--dir ${values.dir} is not an existing directory`, 'bench');
      const { runBench, SUITES } = await import('./bench/cli.js');
      for (const n of positionals)
        if (!(SUITES as readonly string[]).includes(n)) throw new UsageError(`unknown suite '${n}' (suites: ${SUITES.join(', ')})`, 'bench');
      const json = values.json === true;
      const quiet = values.quiet === true;
      const quick = values.quick === true;
      if (values.cells !== undefined) {
        if (positionals.length && !positionals.includes('pager')) throw new UsageError('--cells applies to the pager suite: name it (bench pager --cells ...)', 'bench');
        const { pagerCellFilter } = await import('./bench/pager.js');
        try {
          pagerCellFilter(values.cells, quick);
        } catch (err) {
          throw new UsageError(`--${(err as Error).message}`, 'bench');
        }
      }
      if (values.writeback !== undefined) {
        if (positionals.length && !positionals.includes('pager')) throw new UsageError('--writeback applies to the pager suite: name it (bench pager --writeback ...)', 'bench');
        if (values.writeback !== 'pagecache' && values.writeback !== 'confirmed') throw new UsageError(`--writeback must be pagecache or confirmed, got '${values.writeback}'`, 'bench');
      }
      let spinUs: number | undefined;
      if (values['spin-us'] !== undefined) {
        if (positionals.length && !positionals.includes('pager')) throw new UsageError('--spin-us applies to the pager suite: name it (bench pager --spin-us ...)', 'bench');
        if (!/^\d+$/.test(values['spin-us']) || Number(values['spin-us']) > 1_000_000) throw new UsageError(`--spin-us must be an integer from 0 to 1000000, got '${values['spin-us']}'`, 'bench');
        spinUs = Number(values['spin-us']);
      }
      if (values['c-tracks-dirty'] && positionals.length && !positionals.includes('pager'))
        throw new UsageError('--c-tracks-dirty applies to the pager suite: name it (bench pager --c-tracks-dirty)', 'bench');
      const r = await runBench({
        suites: (positionals.length ? [...new Set(positionals)] : [...SUITES]) as (typeof SUITES)[number][],
        out: values.out ?? 'results',
        pages: pages ?? (quick ? QUICK.pages : undefined),
        reps: reps ?? (quick ? QUICK.reps : undefined),
        size: size ?? (quick ? QUICK.size : undefined),
        pin: values['no-pin'] !== true,
        quiet,
        dir: values.dir,
        quick,
        cells: values.cells,
        writeback: values.writeback as 'pagecache' | 'confirmed' | undefined,
        spinUs,
        cTracksDirty: values['c-tracks-dirty'] === true,
        version: version(),
        links: values.link ? ([...new Set(values.link)] as (keyof typeof LINK_PRESETS)[]) : undefined,
      });
      const text = r.summary + '\n\nwritten:\n' + r.files.map((f) => '  ' + f).join('\n') + '\n';
      if (json) {
        // The same objects as the JSON reports, read back: stdout is exactly what was written.
        const reports = r.files
          .filter((f) => f.endsWith('.json'))
          .map((f) => ({ suite: path.basename(f).replace(/-\d{4}-\d\d-\d\dT[\d-]+Z\.json$/, ''), file: f, html: f.replace(/\.json$/, '.html'), ...JSON.parse(fs.readFileSync(f, 'utf8')) }));
        process.stdout.write(JSON.stringify({ version: version(), ok: r.ok, reports }) + '\n');
        if (!quiet) process.stderr.write(text);
      } else process.stdout.write(text);
      return r.ok ? EXIT_OK : EXIT_TARGET_MISSED;
    },
  },
  replay: {
    summary: 'replay an access trace through a device under one or more policies',
    help: async () => REPLAY_HELP,
    async run(args) {
      const { values, positionals } = parse(
        'replay',
        args,
        {
          'device-memory': { type: 'string' },
          placement: { type: 'string' },
          eviction: { type: 'string' },
          prefetch: { type: 'string' },
          'fault-around': { type: 'string' },
          'fault-batch': { type: 'string' },
          link: { type: 'string' },
          threads: { type: 'string' },
          window: { type: 'string' },
          range: { type: 'string' },
          'no-samples': { type: 'boolean' },
          json: { type: 'boolean' },
          out: { type: 'string' },
        },
        true,
      );
      if (values.help) return help('replay');
      if (positionals.length !== 1) throw new UsageError(positionals.length ? `one trace file, got ${positionals.length}` : 'which trace? pagemirror replay TRACE', 'replay');
      if (values.out === '') throw new UsageError('--out needs a directory', 'replay');
      const one = <T>(flag: string, v: string | undefined, f: (x: string) => T): T | undefined => (v === undefined ? undefined : f(v));
      const replay = {
        threads: one('threads', values.threads, count('threads', 64)),
        window: one('window', values.window, count('window', 1 << 20)),
        range: one('range', values.range, (x): number | 'all' => {
          if (x === 'all') return x;
          if (!/^\d+$/.test(x) || Number(x) > 65534) throw new UsageError(`--range must be all or a range index from 0 to 65534, got '${x}'`, 'replay');
          return Number(x);
        }),
        samples: values['no-samples'] !== true,
      };
      const { LINK_PRESETS } = await import('./link.js');
      const policies = [];
      for (const memory of list('device-memory', values['device-memory'], pageBytes('device-memory')))
        for (const placement of list('placement', values.placement, choice('placement', ['host', 'device'] as const)))
          for (const eviction of list('eviction', values.eviction, choice('eviction', ['off', 'fifo', 'lru'] as const)))
            for (const prefetch of list('prefetch', values.prefetch, choice('prefetch', ['off', 'sequential', 'density'] as const)))
              for (const faultAround of list('fault-around', values['fault-around'], pageBytes('fault-around')))
                for (const faultBatch of list('fault-batch', values['fault-batch'], count('fault-batch', 65536)))
                  for (const link of list('link', values.link, choice('link', Object.keys(LINK_PRESETS) as LinkPreset[])))
                    policies.push(Object.fromEntries(Object.entries({ memory, placement, eviction, prefetch, faultAround, faultBatch, link }).filter(([, v]) => v !== undefined)));
      if (policies.length > 64) throw new UsageError(`${policies.length} combinations of policies; at most 64 in one run`, 'replay');
      const { replayPolicies, reportReplay } = await import('./replay-report.js');
      const json = values.json === true;
      const { trace, rows } = await replayPolicies(positionals[0]!, policies, replay, json ? undefined : (l) => process.stderr.write(l + '\n'));
      const r = reportReplay(positionals[0]!, trace, rows, values.out, version());
      if (json) process.stdout.write(JSON.stringify({ version: version(), trace: { path: positionals[0], header: trace.header, ranges: trace.ranges, summary: trace.summary }, rows, files: r.files }, replacer) + '\n');
      else process.stdout.write(r.text + (r.files.length ? '\nwritten:\n' + r.files.map((f) => '  ' + f).join('\n') + '\n' : ''));
      return EXIT_OK;
    },
  },
  serve: {
    summary: "serve other processes' page faults over a Unix socket (the C client library)",
    help: async () => SERVE_HELP,
    run: serve,
  },
  run: {
    summary: 'run an unmodified program attached to a fault server (preload shim) and report',
    help: async () => RUN_HELP,
    run: runCommand,
  },
  record: {
    summary: 'run an unmodified program attached and record a page-access trace of it',
    help: async () => RECORD_HELP,
    run: recordCommand,
  },
};

function usage(): string {
  const w = Math.max(...Object.keys(COMMANDS).map((c) => c.length));
  return `usage: pagemirror <command> [options]
       pagemirror <command> --help
       pagemirror --version

commands:
${Object.entries(COMMANDS)
  .map(([name, c]) => `  ${name.padEnd(w)}  ${c.summary}`)
  .join('\n')}
  ${'help'.padEnd(w)}  this text, or a command's: pagemirror help <command>

${EXIT_CODES}
`;
}

async function help(command?: string): Promise<number> {
  const c = command === undefined ? undefined : COMMANDS[command];
  if (command !== undefined && !c) throw new UsageError(`unknown command '${command}'`);
  process.stdout.write(c ? await c.help() : usage());
  return EXIT_OK;
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === undefined || cmd === '--help' || cmd === '-h') return help();
  if (cmd === 'help') {
    if (rest.length > 1) throw new UsageError(`help takes one command, got ${rest.join(' ')}`);
    return help(rest[0]);
  }
  if (cmd === '--version' || cmd === '-V') {
    process.stdout.write(version() + '\n');
    return EXIT_OK;
  }
  const c = COMMANDS[cmd];
  if (!c) throw new UsageError(cmd.startsWith('-') ? `unknown option '${cmd}'` : `unknown command '${cmd}'`);
  return c.run(rest);
}

// `pagemirror probe --json | head -1`: a reader that stops early is no error of ours (and its
// EPIPE, unhandled, would be a stack trace). Exiting still removes the bench's temp files.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code !== 'EPIPE') throw err;
  process.exit(process.exitCode ?? EXIT_OK);
});

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    if (err instanceof UsageError) {
      const where = err.command ? `pagemirror ${err.command}` : 'pagemirror';
      process.stderr.write(`${where}: ${err.message}; see '${where} --help'\n`);
      process.exitCode = EXIT_USAGE;
      return;
    }
    // A failure is one line: the code says what kind, the message what to do. The stack is for
    // reporting a bug, on request.
    const e = err as { code?: string; message?: string; stack?: string };
    const message = (e.message ?? String(err)).replace(/^pagemirror: /, '').split('\n')[0];
    process.stderr.write(`pagemirror: ${e.code ? e.code + ': ' : ''}${message}\n`);
    if (process.env.PAGEMIRROR_DEBUG) process.stderr.write(`${e.stack ?? ''}\n`);
    process.exitCode = EXIT_FAILURE;
  },
);
