// pagemirror record (docs/attach.md, docs/trace-format.md): a trace recorded from an unmodified
// program attached through the preload shim, its output checked against a run without the shim,
// then replayed under two device-memory sizes and two link presets.
import { describe, it, expect } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FIXTURES_DIR, P, PAGE, USER_MODE_ONLY, attachEnv, requireCap } from './helpers.js';
import { checkWriteRounds } from './trace-checks.js';
import { FaultServer, readTrace, type TraceFault, type TraceRecord, type TraceRecorder } from '../lib/index.js';
import { finish, needUffd, sockPath, startDemo } from './fault-server-helpers.js';
import { formatRun, type RunResult } from '../lib/run.js';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(root, 'dist', 'cli.js');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-record-test-'));

// Asynchronous: a recording under load outlasts the watchdog's 60 s bound on a blocked JavaScript thread.
const pm = (args: string[], timeout = 180_000) =>
  new Promise<{ status: number | null; stdout: Buffer; stderr: Buffer }>((resolve, reject) => {
    const child = spawn(process.execPath, [cli, ...args], { env: attachEnv(), cwd: tmp, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [], err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeout);
    child.on('error', reject);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout: Buffer.concat(out), stderr: Buffer.concat(err) });
    });
  });

interface Row {
  policy: string;
  device: { memory: number; link: string };
  result: { accesses: number; hostNs: number; modeledNs: number; toHost: { eviction: number } };
}

describe('pagemirror record', () => {
  it('--help, and usage errors with exit status 2', { timeout: 60_000 }, async () => {
    const h = await pm(['record', '--help']);
    expect(h.status).toBe(0);
    expect(h.stdout.toString()).toMatch(/usage: pagemirror record/);
    expect((await pm(['record'])).status).toBe(2);
    expect((await pm(['record', '--sample-interval', 'x', '--', 'true'])).status).toBe(2);
    // Samples are the write-protect rounds: one interval, not two.
    const both = await pm(['record', '--sample-interval', '100', '--wp-interval', '200', '--', 'true']);
    expect(both.status).toBe(2);
    expect(both.stderr.toString()).toMatch(/--sample-interval 100 and --wp-interval 200 differ/);
    expect((await pm(['record', '--out', '', '--', 'true'])).status).toBe(2);
    expect((await pm(['record', '--no-such', '--', 'true'])).status).toBe(2);
  });

  it('the text report is headed by the command and counts bytes in the result\'s page size', () => {
    const result: RunResult = {
      pageSize: 65536, program: '/usr/bin/sort', args: [], exitCode: 0, wallMs: 12, processes: 1, attachedBytes: 8 << 20,
      faults: { total: 0, missingZero: 0, missingFromDevice: 0, minor: 0, wp: 0, retried: 0, raced: 0, fallback: 0, other: 0 },
      migrations: { toDevice: { total: 0, residentLimit: 0 }, toHost: { total: 0, cpuFault: 0, prefetch: 0, release: 0 } },
      eviction: { policy: 'fifo', secondChances: 0, examined: 0 },
      writes: { method: 'wp-rounds', intervalMs: 1000, rounds: 0, roundMs: 0, protectedPages: 0, wpFaults: 0, distinctPages: 0, perInterval: [], lost: 0, raced: 0 },
      residentLimitPages: 32, peakResidentPages: 48, poolFull: 0, evictRaced: 0, samples: [], ranges: [], notes: [],
    };
    const text = formatRun(result, 'record');
    expect(text).toMatch(/^pagemirror record: sort exited 0 after 12 ms/);
    // 48 and 32 pages of 64 KiB: 3 and 2 MiB (not 0.2 and 0.1, as in pages of 4 KiB).
    expect(text).toContain('attached: 1 process(es), 0 range(s), 8.0 MiB; peak resident 3.0 MiB (limit 2.0 MiB)');
    expect(formatRun(result, 'run')).toMatch(/^pagemirror run: /);
  });

  it('records GNU sort attached (same output), and the trace replays deterministically under two memories and two links', { timeout: 400_000 }, async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    // The run's policy migrates to the client's memfd pool: MISSING and WP on shared memory.
    requireCap(ctx, P.experiments.fileCpuFaults, 'userfaultfd on shared memory');
    if (P.uffd.userModeOnly) ctx.skip(USER_MODE_ONLY);
    if (spawnSync('sort', ['--version']).status !== 0) ctx.skip('no sort on PATH');
    const lines: string[] = [];
    let x = 4242;
    let size = 0;
    while (size < 12 << 20) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      const l = `${x.toString(16).padStart(8, '0')} ${(x % 99991).toString().padStart(5, '0')}`;
      lines.push(l);
      size += l.length + 1;
    }
    const input = path.join(tmp, 'sort.in');
    fs.writeFileSync(input, lines.join('\n') + '\n');
    const argv = ['sort', '-S', '8M', '--parallel=1', input];
    const plain = spawnSync(argv[0]!, argv.slice(1), { cwd: tmp, timeout: 120_000, maxBuffer: 1 << 30 });
    expect(plain.status).toBe(0);

    const trace = path.join(tmp, 'sort.pmtrace');
    const rec = await pm(['record', '--resident', '4M', '--threshold', '1M', '--out', trace, '--sample-interval', '500', '--json', '--', ...argv]);
    const err = rec.stderr.toString();
    expect(rec.status, err.slice(0, 2000)).toBe(0);
    expect(Buffer.compare(rec.stdout, plain.stdout)).toBe(0);
    const report = JSON.parse(err.split('\n').filter((l) => l.startsWith('{')).pop()!) as {
      processes: number;
      pageSize: number;
      ranges: { pid: number; address: string; bytes: number }[];
      faults: { total: number };
      recordings: { path: string; pid: number; faults: number; bytes: number; tapped: number; tapNsPerFault: number; samples: number; sampling: { method: string } }[];
      writes: { rounds: number };
    };
    expect(report.processes).toBeGreaterThan(0);
    expect(report.recordings.length).toBeGreaterThan(0);
    const first = report.recordings[0]!;
    expect(first.path).toBe(trace);
    expect(first.faults).toBeGreaterThan(0);
    // The tap saw each fault the service read; it recorded those in its ranges.
    expect(first.faults).toBeLessThanOrEqual(report.faults.total);
    expect(first.bytes).toBe(fs.statSync(trace).size);
    expect(first.tapNsPerFault).toBeGreaterThan(0);
    // Written-page samples from run's write-protect rounds: one per range per round and a last one
    // at the end, each agreeing with the trace's write faults.
    expect(first.sampling).toEqual({ method: 'wp-rounds' });
    const samples = await checkWriteRounds(trace);
    expect(samples.length).toBe(first.samples);
    expect(first.samples).toBeGreaterThan(report.writes.rounds);
    expect(samples.some((x) => x.runs.length > 0)).toBe(true);
    expect(report.pageSize).toBe(PAGE);
    // Every range the run attached is in its process's trace, those registered after the first too.
    expect(report.ranges.length).toBeGreaterThan(0);
    for (const rec of report.recordings) {
      const t = await readTrace(rec.path);
      const have = new Set(t.ranges.map((x) => `${x.start}:${x.length}`));
      for (const x of report.ranges.filter((y) => y.pid === rec.pid)) expect(have, `${x.address} (${x.bytes} bytes)`).toContain(`${x.address}:${x.bytes}`);
    }
    expect(new Set(report.ranges.map((x) => x.pid))).toEqual(new Set(report.recordings.map((x) => x.pid)));

    // The replay is of the whole program (every range, one after another). Device memory: a
    // quarter of all the recorded ranges (it must evict) and four times them (it never does).
    const t = await readTrace(trace);
    const rangeBytes = t.ranges.reduce((n, r) => n + r.length, 0);
    const allFaults = (await faultsOf(trace)).faults.length;
    expect(allFaults).toBe(first.faults);
    const small = Math.max(4, Math.floor(rangeBytes / 4 / 4096) * 4);
    const large = (rangeBytes * 4) / 1024;
    const replay = async (out: string) => {
      const r = await pm(['replay', trace, '--link', 'pcie3x16,nvlink-c2c', '--device-memory', `${small}K,${large}K`, '--placement', 'device', '--eviction', 'fifo', '--json', '--out', path.join(tmp, out)], 300_000);
      expect(r.status, r.stderr.toString().slice(0, 2000)).toBe(0);
      return JSON.parse(r.stdout.toString()) as { rows: (Row & { result: { layout: { range: number; firstPage: number; pages: number }[]; fromFaults: number } })[]; files: string[]; trace: { header: { ranges: { length: number }[] } } };
    };
    const a = await replay('a');
    const b = await replay('b');
    const strip = (rows: Row[]) => rows.map((r) => ({ ...r, result: { ...r.result, hostNs: 0 } }));
    expect(a.rows.length).toBe(4);
    expect(strip(a.rows)).toEqual(strip(b.rows));
    const row = (mem: number, link: string) => a.rows.find((r) => r.device.memory === mem * 1024 && r.device.link === link)!;
    expect(a.rows[0]!.result.layout.map((l) => l.range)).toEqual(t.ranges.map((r) => r.index));
    expect(a.rows[0]!.result.fromFaults).toBe(allFaults);
    for (const link of ['pcie3x16', 'nvlink-c2c']) {
      expect(row(small, link).result.accesses).toBeGreaterThanOrEqual(allFaults);
      expect(row(small, link).result.toHost.eviction).toBeGreaterThan(0);
      expect(row(large, link).result.toHost.eviction).toBe(0);
      expect(row(small, link).result.modeledNs).toBeGreaterThan(row(large, link).result.modeledNs);
    }
    for (const mem of [small, large]) expect(row(mem, 'pcie3x16').result.modeledNs).not.toBe(row(mem, 'nvlink-c2c').result.modeledNs);
    const html = fs.readFileSync(a.files.find((f) => f.endsWith('.html'))!, 'utf8');
    expect(html).toMatch(/Modeled device time by policy and link \(pcie3x16, nvlink-c2c\)/);
    expect(html).toContain('<svg');
  });
});


describe('pagemirror record: ranges that come and go', () => {
  it('records every range the program maps, each under its own index, a released one removed, its addresses reused by a new index; the report says "pagemirror record:"', { timeout: 120_000 }, async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    requireCap(ctx, P.experiments.fileCpuFaults, 'userfaultfd on shared memory');
    if (P.uffd.userModeOnly) ctx.skip(USER_MODE_ONLY);
    const exe = path.join(tmp, 'record-ranges');
    const cc = spawnSync('cc', ['-O2', '-o', exe, path.join(FIXTURES_DIR, 'record-ranges.c')], { encoding: 'utf8', timeout: 60_000 });
    if (cc.error || cc.status !== 0) ctx.skip(`cannot compile with the system cc: ${cc.error?.message ?? cc.stderr.split('\n')[0]}`);
    const trace = path.join(tmp, 'ranges.pmtrace');
    const r = await pm(['record', '--threshold', '1M', '--out', trace, '--sample-interval', '0', '--', exe]);
    const err = r.stderr.toString();
    expect(r.status, err.slice(0, 2000)).toBe(0);
    // The text report is record's (run's report counts C, at A's address and length, as A again).
    expect(err).toMatch(/^pagemirror record: record-ranges exited 0 /);
    expect(err).toMatch(/attached: 1 process\(es\), [23] range\(s\), (6|10)\.0 MiB/);
    const out = Object.fromEntries(r.stdout.toString().trim().split('\n').filter((l) => /^[ABC] 0x/.test(l)).map((l) => {
      const [name, address, pages] = l.split(' ');
      return [name!, { address: address!, pages: Number(pages) }];
    }));
    const t = await readTrace(trace);
    const { records, faults } = await faultsOf(trace);
    const indexOf = (name: string, from = 0) => t.ranges.findIndex((x, i) => i >= from && x.start === out[name]!.address);
    const a = indexOf('A'), b = indexOf('B'), c = indexOf('C', a + 1);
    expect([a, b, c].every((i) => i >= 0)).toBe(true);
    expect(new Set([a, b, c]).size).toBe(3);
    expect(t.ranges[a]!.removedNs).toBeGreaterThan(0); // munmap released it
    expect(t.ranges[b]!.addedNs).toBeGreaterThan(0); // registered after the first REGISTER
    expect(c).toBeGreaterThan(a);
    // Every page each one wrote is a first touch in its own range.
    for (const [name, i] of [['A', a], ['B', b], ['C', c]] as const) {
      const pages = new Set(faults.filter((f) => f.range === i && f.kind === 'missing').map((f) => f.page));
      expect(pages.size, name).toBe(out[name]!.pages);
    }
    expect(records.findIndex((x) => x.type === 'range-removed' && x.range === a)).toBeGreaterThan(records.findLastIndex((x) => x.type === 'fault' && x.range === a));
    // pagemirror replay takes a range added while recording, under two policies: C's 1024 first
    // touches in 256 pages of device memory evict; in 4096 they do not.
    const rp = await pm(['replay', trace, '--range', String(c), '--device-memory', `${256 * PAGE},${4096 * PAGE}`, '--placement', 'device', '--eviction', 'fifo', '--json'], 120_000);
    expect(rp.status, rp.stderr.toString().slice(0, 2000)).toBe(0);
    const j = JSON.parse(rp.stdout.toString()) as { rows: Row[]; trace: { ranges: { index: number; start: string }[] } };
    expect(j.trace.ranges[c]).toMatchObject({ index: c, start: out['C']!.address });
    expect(j.rows).toHaveLength(2);
    expect(j.rows[0]!.result.accesses).toBeGreaterThanOrEqual(out['C']!.pages);
    expect(j.rows[0]!.result.toHost.eviction).toBeGreaterThan(0);
    expect(j.rows[1]!.result.toHost.eviction).toBe(0);
  });
});

async function faultsOf(file: string): Promise<{ records: TraceRecord[]; faults: TraceFault[] }> {
  const records: TraceRecord[] = [];
  for await (const r of (await readTrace(file)).records()) records.push(r);
  return { records, faults: records.filter((r): r is TraceFault => r.type === 'fault') };
}

describe('RemoteClient.record: a client of the fault server recorded', () => {
  it('from its first fault: a client that writes its memory the moment it is registered has every page in the trace', { timeout: 60_000 }, async (ctx) => {
    needUffd(ctx, false);
    const pages = 256;
    const recs: TraceRecorder[] = [];
    const server = await FaultServer.listen(sockPath('record-first'), {
      beforeServe: (c) => recs.push(c.record({ path: path.join(tmp, `first-${c.pid}.pmtrace`), sampleIntervalMs: 0 })),
    });
    try {
      // attach: private anonymous memory, MISSING only; the demo writes every page right after pm_attach returns.
      const demo = startDemo(server.path, pages, 'attach');
      await demo.next((l) => l.startsWith('READY'), 20_000, 'READY');
      expect(recs).toHaveLength(1);
      const s = recs[0]!.stop();
      expect(s).toMatchObject({ dropped: 0, ignored: 0 });
      const { faults } = await faultsOf(recs[0]!.path);
      const missing = new Set(faults.filter((f) => f.kind === 'missing').map((f) => f.page));
      expect(missing.size).toBe(pages);
      expect(faults[0]).toMatchObject({ kind: 'missing', page: 0, write: true });
      demo.send('GO');
      expect(await finish(demo, 20_000)).toEqual({ bad: 0, lost: 0 });
    } finally {
      await server.close();
    }
  });

  it('its ranges follow the client: a range it takes back (pm_detach) is removed in the trace, at its UNREGISTER', { timeout: 60_000 }, async (ctx) => {
    needUffd(ctx);
    const pages = 32;
    const recs: TraceRecorder[] = [];
    const server = await FaultServer.listen(sockPath('record-detach'), {
      beforeServe: (c) => recs.push(c.record({ path: path.join(tmp, `detach-${c.pid}.pmtrace`), sampleIntervalMs: 0 })),
    });
    try {
      const demo = startDemo(server.path, pages, 'detach');
      const [, addr] = (await demo.next((l) => l.startsWith('READY'), 20_000, 'READY')).split(' ');
      demo.send('GO');
      expect(await finish(demo, 20_000)).toEqual({ bad: 0, lost: 0 });
      const s = recs[0]!.stop();
      expect(s.ranges).toBe(1);
      const t = await readTrace(recs[0]!.path);
      expect(t.ranges).toHaveLength(1);
      expect(t.ranges[0]).toMatchObject({ start: addr, length: pages * PAGE, shared: true });
      expect(t.ranges[0]!.removedNs).toBeGreaterThan(0);
      const { records, faults } = await faultsOf(recs[0]!.path);
      expect(new Set(faults.map((f) => f.page)).size).toBe(pages);
      // The removal comes after every fault of the range.
      expect(records.findIndex((r) => r.type === 'range-removed')).toBeGreaterThan(records.lastIndexOf(faults.at(-1)!));
    } finally {
      await server.close();
    }
  });
});
