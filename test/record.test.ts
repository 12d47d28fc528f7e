// pagemirror record (docs/attach.md, docs/trace-format.md): a trace recorded from an unmodified
// program attached through the preload shim, its output checked against a run without the shim,
// then replayed under two device-memory sizes and two link presets.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { P, PAGE, USER_MODE_ONLY, attachEnv, requireCap, within } from './helpers.js';
import { FaultServer, readTrace, type TraceFault, type TraceRecord, type TraceRecorder } from '../lib/index.js';
import { finish, needUffd, sockPath, startDemo } from './fault-server-helpers.js';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const cli = path.join(root, 'dist', 'cli.js');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-record-test-'));

const pm = (args: string[], timeout = 180_000) => spawnSync(process.execPath, [cli, ...args], { env: attachEnv(), cwd: tmp, timeout, maxBuffer: 1 << 30 });

interface Row {
  policy: string;
  device: { memory: number; link: string };
  result: { accesses: number; hostNs: number; modeledNs: number; toHost: { eviction: number } };
}

describe('pagemirror record', () => {
  it('--help, and usage errors with exit status 2', { timeout: 60_000 }, () => {
    const h = pm(['record', '--help']);
    expect(h.status).toBe(0);
    expect(h.stdout.toString()).toMatch(/usage: pagemirror record/);
    expect(pm(['record']).status).toBe(2);
    expect(pm(['record', '--sample-interval', 'x', '--', 'true']).status).toBe(2);
    expect(pm(['record', '--out', '', '--', 'true']).status).toBe(2);
    expect(pm(['record', '--no-such', '--', 'true']).status).toBe(2);
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
    const rec = pm(['record', '--resident', '4M', '--threshold', '1M', '--out', trace, '--sample-interval', '20', '--json', '--', ...argv]);
    const err = rec.stderr.toString();
    expect(rec.status, err.slice(0, 2000)).toBe(0);
    expect(Buffer.compare(rec.stdout, plain.stdout)).toBe(0);
    const report = JSON.parse(err.split('\n').filter((l) => l.startsWith('{')).pop()!) as {
      processes: number;
      faults: { total: number };
      recordings: { path: string; pid: number; faults: number; bytes: number; tapped: number; tapNsPerFault: number }[];
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

    // Device memory: a quarter of the recorded range (it must evict) and four times it (it never does).
    const rangeBytes = (await readTrace(trace)).header.ranges[0]!.length;
    const small = Math.max(4, Math.floor(rangeBytes / 4 / 4096) * 4);
    const large = (rangeBytes * 4) / 1024;
    const replay = (out: string) => {
      const r = pm(['replay', trace, '--link', 'pcie3x16,nvlink-c2c', '--device-memory', `${small}K,${large}K`, '--placement', 'device', '--eviction', 'fifo', '--json', '--out', path.join(tmp, out)], 300_000);
      expect(r.status, r.stderr.toString().slice(0, 2000)).toBe(0);
      return JSON.parse(r.stdout.toString()) as { rows: Row[]; files: string[]; trace: { header: { ranges: { length: number }[] } } };
    };
    const a = replay('a');
    const b = replay('b');
    const strip = (rows: Row[]) => rows.map((r) => ({ ...r, result: { ...r.result, hostNs: 0 } }));
    expect(a.rows.length).toBe(4);
    expect(strip(a.rows)).toEqual(strip(b.rows));
    const row = (mem: number, link: string) => a.rows.find((r) => r.device.memory === mem * 1024 && r.device.link === link)!;
    for (const link of ['pcie3x16', 'nvlink-c2c']) {
      expect(row(small, link).result.accesses).toBeGreaterThanOrEqual(first.faults);
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
