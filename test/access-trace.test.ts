// Access traces (issue 12 §3): recording a served userfaultfd's faults natively, the file format's
// reader on good and hostile files, and deterministic replay through a device.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it, expect } from 'vitest';
import { access, Device, mapAnonymous, mapMemfd, readTrace, recordTrace, Userfaultfd, writeTrace, TRACE_VERSION, type TraceFault, type TraceRecord, type TraceSample } from '../lib/index.js';
import { FIXTURES_DIR, P, PAGE, cleanupAfterEach, requireCap, within } from './helpers.js';
import { checkWriteRounds } from './trace-checks.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-trace-'));
const file = (name: string) => path.join(dir, name);

async function all(records: AsyncIterable<TraceRecord>): Promise<TraceRecord[]> {
  const out: TraceRecord[] = [];
  for await (const r of records) out.push(r);
  return out;
}

function written(samples: TraceSample[]): number[] {
  const pages = new Set<number>();
  for (const s of samples) for (const r of s.runs) for (let p = r.first; p < r.first + r.count; p++) pages.add(p);
  return [...pages].sort((a, b) => a - b);
}

const cli = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('recording a served userfaultfd', () => {
  const closers = cleanupAfterEach();

  it('records each fault natively: first-touch order, write vs read, thread ids, as many as the service counted; samples catch writes that raise no fault', async (ctx) => {
    requireCap(ctx, P.experiments.wpAsync, 'uffd-wp async');
    requireCap(ctx, P.pagemapScan, 'PAGEMAP_SCAN');
    const n = 64;
    const m = mapAnonymous(n * PAGE);
    const src = mapAnonymous(n * PAGE);
    closers.push(() => m.close(), () => src.close());
    src.bytes.fill(7);
    const uffd = Userfaultfd.open({ features: ['threadId', 'wpAsync', 'wpUnpopulated'] });
    closers.push(() => uffd.close());
    uffd.register(m, { modes: ['missing', 'wp'] });
    // Pages arrive write-protected: a write after the copy is an async WP fault the kernel resolves
    // itself (no message), and the page then reads as written to PAGEMAP_SCAN.
    uffd.addRule({ mapping: m, action: 'copy', source: src, wp: true });
    const rec = recordTrace(uffd, { path: file('workload.pmtrace'), ranges: [{ mapping: m }], sampleIntervalMs: 20 });
    expect(rec.header.sampling).toEqual({ method: 'pagemap-scan-written' });
    await within(access(m, { length: 32 * PAGE, op: 'write', seed: 3 }), 10000, 'sequential writer');
    await within(access(m, { offset: 32 * PAGE, length: 32 * PAGE, op: 'read' }), 10000, 'sequential reader');
    await sleep(60); // past a sample: the next one sees only what follows
    await within(access(m, { offset: 40 * PAGE, length: 4 * PAGE, op: 'write', seed: 5 }), 10000, 'writes without faults');
    const served = uffd.stats().faults;
    const summary = rec.stop();
    // Recording changed nothing the rule did: every fault resolved natively, the data is the workload's.
    expect(uffd.stats()).toMatchObject({ fastResolved: 64, forwarded: 0 });
    const check = await within(access(m, { length: 32 * PAGE, op: 'verify', seed: 3 }), 10000, 'verify');
    expect(check.mismatches).toBe(0);
    expect(summary).toMatchObject({ faults: 64, dropped: 0, ignored: 0, tapped: 64 });
    expect(served).toBe(64);
    expect(summary.samples).toBeGreaterThanOrEqual(2);
    expect(summary.writerCpuNs).toBeGreaterThan(0);
    expect(summary.tapNsPerFault).toBeGreaterThan(0);
    expect(summary.bytes).toBe(fs.statSync(rec.path).size);
    expect(summary.records).toBe(64 + summary.samples + 1); // and the end record

    const trace = await readTrace(rec.path);
    expect(trace.header).toMatchObject({ format: 'pagemirror-trace', version: TRACE_VERSION, pageSize: PAGE, sampling: { method: 'pagemap-scan-written' } });
    expect(trace.header.ranges).toEqual([expect.objectContaining({ index: 0, length: n * PAGE, kind: 'anonymous', modes: ['missing', 'wp'] })]);
    expect(trace.summary).toMatchObject({ faults: served, byKind: { missing: 64, wp: 0, minor: 0 }, writes: 32, dropped: 0 });
    const records = await all(trace.records());
    const faults = records.filter((r): r is TraceFault => r.type === 'fault');
    // First touch order of two sequential jobs, the writer's then the reader's.
    expect(faults.map((f) => f.page)).toEqual([...Array(n).keys()]);
    expect(faults.map((f) => f.write)).toEqual([...Array(n).keys()].map((i) => i < 32));
    const tids = new Set(faults.map((f) => f.tid));
    expect(tids.has(0)).toBe(false);
    expect(new Set(faults.slice(0, 32).map((f) => f.tid)).size).toBe(1);
    expect(trace.summary.threads.length).toBe(tids.size);
    for (let i = 1; i < faults.length; i++) expect(faults[i]!.tNs).toBeGreaterThanOrEqual(faults[i - 1]!.tNs);
    const samples = records.filter((r): r is TraceSample => r.type === 'sample');
    // Written: the writer's pages, and the four pages written later with no fault at all; never a page only read.
    expect(written(samples)).toEqual([...[...Array(32).keys()], 40, 41, 42, 43]);
    // Those four came in samples of their own (one, or two when the writes straddled a scan).
    const late = samples.filter((s) => s.runs.some((r) => r.first <= 43 && r.first + r.count > 40));
    expect(late.length).toBeGreaterThanOrEqual(1);
    expect(written(late)).toEqual([40, 41, 42, 43]);
    expect(records.at(-1)).toMatchObject({ type: 'end', faults: 64 });
    // JSON lines: the header, then each record.
    const lines: string[] = [];
    for await (const l of trace.jsonLines()) lines.push(l);
    expect(lines.length).toBe(records.length + 1);
    expect(JSON.parse(lines[1]!)).toEqual(records[0]);
    // The recorded trace replays, the same way twice.
    const replays = [];
    for (let i = 0; i < 2; i++) {
      const dev = Device.create({ memory: 16 * PAGE, placement: 'device', eviction: 'lru' });
      const mem = mapAnonymous(n * PAGE);
      try {
        replays.push({ ...(await within(dev.mirror(mem).replay(trace), 20000, 'replay')), hostNs: 0 });
      } finally {
        dev.close();
        mem.close();
      }
    }
    expect(replays[0]).toEqual(replays[1]);
    // A page written across a sample's scan shows in both samples: 36 sampled writes at least.
    expect(replays[0]!.fromFaults).toBe(64);
    expect(replays[0]!.fromSamples).toBeGreaterThanOrEqual(36);
    expect(replays[0]!.accesses).toBe(64 + replays[0]!.fromSamples);
    expect(replays[0]!.evictions).toBeGreaterThan(0);
  }, 30000);

  it('records without samples when the range is not wp-async, and says why in the header', async () => {
    const m = mapAnonymous(8 * PAGE);
    closers.push(() => m.close());
    const uffd = Userfaultfd.open();
    closers.push(() => uffd.close());
    uffd.register(m);
    uffd.addRule({ mapping: m, action: 'zero' });
    const rec = recordTrace(uffd, { path: file('nosample.pmtrace'), mapping: m });
    expect(rec.header.sampling.method).toBe('none');
    expect(() => recordTrace(uffd, { path: file('second.pmtrace'), mapping: m })).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_RECORDING' }));
    expect(rec.header.sampling.reason).toMatch(/wpAsync|PAGEMAP_SCAN/);
    await within(access(m, { op: 'read' }), 10000, 'reader');
    const s = rec.stop();
    expect(s).toMatchObject({ faults: 8, samples: 0 });
    expect(rec.stop()).toBe(s); // once
    const t = await readTrace(rec.path);
    expect(t.summary.faults).toBe(8);
  }, 20000);

  it('with two workers and a JavaScript handler: every fault once, in time order; closing the descriptor first leaves stop() working', async () => {
    const n = 256;
    const m = mapAnonymous(n * PAGE);
    closers.push(() => m.close());
    const uffd = Userfaultfd.open({ features: ['threadId'] });
    closers.push(() => uffd.close());
    uffd.register(m);
    let handled = 0;
    uffd.serve({
      workers: 2,
      onFaults: (faults) => {
        for (const f of faults) {
          uffd.zeropage(m, f.offset, PAGE);
          handled++;
        }
      },
    });
    const rec = recordTrace(uffd, { path: file('workers.pmtrace'), ranges: [{ mapping: m }], sampleIntervalMs: 0 });
    expect(rec.header.recorder.rings).toBe(2);
    await within(access(m, { op: 'read', threads: 4 }), 20000, 'four readers');
    const served = uffd.stats().faults;
    uffd.close(); // the recorder outlives the descriptor's service
    const s = rec.stop();
    expect(s.faults).toBe(served);
    expect(s.faults).toBe(handled);
    expect(s.dropped).toBe(0);
    const t = await readTrace(rec.path);
    const faults = (await all(t.records())).filter((r): r is TraceFault => r.type === 'fault');
    expect(new Set(faults.map((f) => f.page)).size).toBe(faults.length); // each page faulted once
    for (let i = 1; i < faults.length; i++) expect(faults[i]!.tNs).toBeGreaterThanOrEqual(faults[i - 1]!.tNs);
    expect(t.summary.threads.length).toBeGreaterThanOrEqual(1);
  }, 30000);

  it('a ring too small for the burst drops faults, counts them and says where, and the trace still reads', async () => {
    const n = 2048;
    const m = mapAnonymous(n * PAGE);
    closers.push(() => m.close());
    const uffd = Userfaultfd.open();
    closers.push(() => uffd.close());
    uffd.register(m);
    uffd.addRule({ mapping: m, action: 'zero' });
    const rec = recordTrace(uffd, { path: file('small-ring.pmtrace'), ranges: [{ mapping: m }], sampleIntervalMs: 0, ringCapacity: 16 });
    await within(access(m, { op: 'read' }), 20000, 'reader');
    const s = rec.stop();
    expect(s.faults + s.dropped).toBe(n);
    // 2048 faults in a burst against 16 slots: the writer would have to run every 8 faults.
    expect(s.dropped).toBeGreaterThan(0);
    const t = await readTrace(rec.path);
    expect(t.summary.faults).toBe(s.faults);
    expect(t.summary.dropped).toBe(s.dropped);
    expect((await all(t.records())).some((r) => r.type === 'dropped')).toBe(true);
  }, 30000);

  it('records MINOR faults on shared memory as minor, with their access', async (ctx) => {
    requireCap(ctx, P.experiments.minor, 'userfaultfd MINOR');
    const n = 16;
    const m = mapMemfd(n * PAGE);
    closers.push(() => m.close());
    const alias = m.alias();
    closers.push(() => alias.close());
    await within(access(alias, { op: 'write', seed: 9 }), 10000, 'page cache filled through an alias');
    const uffd = Userfaultfd.open();
    closers.push(() => uffd.close());
    uffd.register(m, { modes: ['minor'] });
    uffd.addRule({ mapping: m, action: 'continue' });
    const rec = recordTrace(uffd, { path: file('minor.pmtrace'), mapping: m, sampleIntervalMs: 0 });
    await within(access(m, { length: 8 * PAGE, op: 'read' }), 10000, 'reader');
    await within(access(m, { offset: 8 * PAGE, length: 8 * PAGE, op: 'write', seed: 9 }), 10000, 'writer');
    expect(rec.stop().faults).toBe(n);
    const t = await readTrace(rec.path);
    expect(t.summary.byKind).toEqual({ missing: 0, wp: 0, minor: n });
    const faults = (await all(t.records())).filter((r): r is TraceFault => r.type === 'fault');
    expect(faults.map((f) => [f.page, f.write])).toEqual([...Array(n).keys()].map((p) => [p, p >= 8]));
    expect(t.header.ranges[0]).toMatchObject({ kind: 'memfd', shared: true, modes: ['minor'] });
  }, 30000);

  it('refuses bad options before any system call, with codes', () => {
    const m = mapAnonymous(4 * PAGE);
    closers.push(() => m.close());
    const uffd = Userfaultfd.open();
    closers.push(() => uffd.close());
    const p = file('never.pmtrace');
    expect(() => recordTrace(uffd, { path: p, ranges: [{ mapping: m }] })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' })); // not registered
    uffd.register(m);
    expect(() => recordTrace({} as Userfaultfd, { path: p, ranges: [{ mapping: m }] })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => recordTrace(uffd, { path: p, ranges: [] })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => recordTrace(uffd, { path: p, ranges: [{ mapping: m }], mapping: m })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => recordTrace(uffd, { path: p })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => recordTrace(uffd, { path: p, ranges: [{ mapping: m }], sampleIntervalMs: -1 })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => recordTrace(uffd, { path: p, ranges: [{ mapping: m, offset: 1 }] })).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_UNALIGNED' }));
    expect(() => recordTrace(uffd, { path: p, ranges: [{ address: 4096n, length: 0 }] })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => recordTrace(uffd, { path: 'a\0b', ranges: [{ mapping: m }] })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
    expect(fs.existsSync(p)).toBe(false);
    expect(() => recordTrace(uffd, { path: path.join(dir, 'no', 'such', 'dir'), ranges: [{ mapping: m }] })).toThrow(expect.objectContaining({ code: 'ENOENT', syscall: 'open' }));
    // A FIFO nobody reads: refused at once (opening it for writing would block this thread for good).
    const fifo = file('out-fifo');
    expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
    expect(() => recordTrace(uffd, { path: fifo, ranges: [{ mapping: m }] })).toThrow(expect.objectContaining({ code: 'ENXIO', path: fifo }));
  });
});

describe('the trace reader on hostile files', () => {
  const good = file('good.pmtrace');
  const records: TraceRecord[] = [
    { type: 'fault', kind: 'missing', write: true, range: 0, page: 3, tNs: 10, tid: 7 },
    { type: 'sample', method: 'pagemap-scan-written', range: 0, startNs: 0, endNs: 20, runs: [{ first: 0, count: 4 }] },
  ];

  it('reads what writeTrace wrote', async () => {
    await writeTrace(good, { ranges: [{ index: 0, length: 8 * PAGE }] }, records);
    const t = await readTrace(good);
    expect(await all(t.records())).toEqual([...records, { type: 'end', faults: 1, tNs: 20 }]);
  });

  it('every truncation and a future version give typed errors, never a crash or a hang', async () => {
    await writeTrace(good, { ranges: [{ index: 0, length: 8 * PAGE }] }, records);
    const bytes = fs.readFileSync(good);
    const bad = file('bad.pmtrace');
    for (let len = 0; len < bytes.length; len++) {
      fs.writeFileSync(bad, bytes.subarray(0, len));
      await expect(readTrace(bad), `truncated to ${len}`).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT', path: bad });
    }
    const future = Buffer.from(bytes);
    future.writeUInt32LE(TRACE_VERSION + 1, 8);
    fs.writeFileSync(bad, future);
    await expect(readTrace(bad)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_VERSION', version: TRACE_VERSION + 1 });
    // Flipping any single byte of the records either still reads or is refused with the code.
    const dataStart = 16 + bytes.readUInt32LE(12);
    for (let i = dataStart; i < bytes.length; i++) {
      const b = Buffer.from(bytes);
      b[i] = b[i]! ^ 0xff;
      fs.writeFileSync(bad, b);
      await readTrace(bad).then(
        (t) => expect(t.summary.faults).toBeGreaterThanOrEqual(0),
        (err) => expect(err.code, `byte ${i}`).toBe('ERR_PAGEMIRROR_TRACE_CORRUPT'),
      );
    }
    // A sample claiming 2^32-1 runs is refused before anything that size is allocated.
    const huge = Buffer.from(bytes);
    huge.writeUInt32LE(0xffffffff, dataStart + 24 + 4);
    fs.writeFileSync(bad, huge);
    await expect(readTrace(bad)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT' });
    fs.writeFileSync(bad, 'not a trace at all');
    await expect(readTrace(bad)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT', offset: 0 });
    await expect(readTrace(file('missing.pmtrace'))).rejects.toMatchObject({ code: 'ENOENT' });
    // Not a regular file: refused at once, never waited on (a FIFO with no writer would block an open).
    const fifo = file('fifo');
    expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
    await expect(within(readTrace(fifo), 5000, 'readTrace(FIFO)')).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT' });
    await expect(within(readTrace('/dev/zero'), 5000, 'readTrace(/dev/zero)')).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT' });
    await expect(readTrace(dir)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT' });
  }, 60000);
});

describe('replay through a device', () => {
  // A synthetic trace with the shape of a real one: two threads streaming over 256 pages twice,
  // then a random sweep, faults and samples.
  const tracePath = file('replay.pmtrace');
  const pages = 256;
  async function makeTrace(): Promise<void> {
    const recs: TraceRecord[] = [];
    let t = 0;
    for (let pass = 0; pass < 2; pass++)
      for (let p = 0; p < pages; p++) recs.push({ type: 'fault', kind: 'missing', write: pass === 1, range: 0, page: p, tNs: t++, tid: 100 + (p % 2) });
    let x = 12345;
    for (let k = 0; k < 512; k++) {
      x = (x * 1103515245 + 12345) % 2147483648;
      recs.push({ type: 'fault', kind: 'wp', write: true, range: 0, page: x % pages, tNs: t++, tid: 100 });
    }
    recs.push({ type: 'sample', method: 'pagemap-scan-written', range: 0, startNs: 0, endNs: t, runs: [{ first: 0, count: 64 }, { first: 128, count: 16 }] });
    await writeTrace(tracePath, { ranges: [{ index: 0, length: pages * PAGE }] }, recs);
  }

  async function replayWith(options: Parameters<typeof Device.create>[0]) {
    const dev = Device.create(options);
    const m = mapAnonymous(pages * PAGE);
    try {
      const mirror = dev.mirror(m);
      return await within(mirror.replay(tracePath, { threads: 2 }), 30000, 'replay');
    } finally {
      dev.close();
      m.close();
    }
  }

  it('is deterministic, and a small evicting device memory gives more faults and evictions than a large one', async () => {
    await makeTrace();
    const small = { memory: 64 * PAGE, placement: 'device' as const, eviction: 'fifo' as const };
    const large = { memory: 1024 * PAGE, placement: 'device' as const, eviction: 'fifo' as const };
    const a = await replayWith(small);
    const b = await replayWith(small);
    const counts = (r: Awaited<ReturnType<typeof replayWith>>) => ({ ...r, hostNs: 0 });
    expect(counts(a)).toEqual(counts(b));
    expect(a.accesses).toBe(2 * pages + 512 + 80);
    expect(a.fromSamples).toBe(80);
    expect(a.threads).toBe(2);
    const c = await replayWith(large);
    // A large memory: each page faults in once (first pass), everything after hits.
    expect(c.misses).toBe(pages);
    expect(c.evictions).toBe(0);
    expect(c.toDevice['device-fault']).toBe(pages);
    // 64 pages of device memory under a 256-page stream: every page of the second pass was
    // evicted by the first, so it misses again; evictions carry the pages out.
    expect(a.misses).toBeGreaterThan(2 * pages);
    expect(a.evictions).toBeGreaterThan(pages);
    expect(a.toDevice['device-fault']! - a.evictions).toBeLessThanOrEqual(64);
    expect(a.modeledNs).toBeUndefined(); // no link, no modeled time
    // Device threads only run the hits of a step: their number changes no count.
    const one = await (async () => {
      const dev = Device.create(small);
      const m = mapAnonymous(pages * PAGE);
      try {
        return await within(dev.mirror(m).replay(tracePath, { threads: 1 }), 30000, 'replay');
      } finally {
        dev.close();
        m.close();
      }
    })();
    expect({ ...counts(one), threads: 2 }).toEqual(counts(a));
    // Host placement: the first pass maps pages read-only, so each write of the second pass is an
    // upgrade fault; a sequential prefetcher maps ahead of the stream and takes most first-pass misses.
    const d = await replayWith({ memory: 1024 * PAGE });
    expect(d.misses).toBe(2 * pages);
    const e = await replayWith({ memory: 1024 * PAGE, prefetch: 'sequential' });
    expect(e.accesses).toBe(d.accesses);
    expect(e.prefetchedPages).toBeGreaterThan(0);
    expect(e.misses + e.prefetchedPages).toBe(d.misses); // each page prefetched is one read miss saved
    expect(e.checksum).toBe(d.checksum); // the same accesses, whatever the policy
  }, 60000);

  it('with a device link: modeled time is the rounds that served the replay plus its remote accesses, deterministic, and follows the link', async () => {
    await makeTrace();
    const run = async (options: Parameters<typeof Device.create>[0], threads = 2) => {
      const dev = Device.create(options);
      const m = mapAnonymous(pages * PAGE);
      try {
        const r = await within(dev.mirror(m).replay(tracePath, { threads }), 30000, 'replay');
        return { r, c: dev.counters() };
      } finally {
        dev.close();
        m.close();
      }
    };
    // Round figures: a round 10 µs, a transfer 1 µs + 1 ns per byte, a remote access 100 ns + 8 ns.
    const link = { faultRoundUs: 10, latencyUs: 1, bandwidthGBs: 1, remoteAccessNs: 100 };
    const evicting = { memory: 64 * PAGE, placement: 'device' as const, eviction: 'fifo' as const };
    const { r: a, c } = await run({ ...evicting, link });
    const m = c.modeled!;
    expect(m.faults.ns).toBe(a.faultRounds * 10_000);
    // Device placement: every migration and eviction happens inside a round that served the replay.
    expect(a.modeledFaultNs).toBe(m.faults.ns + m.migrateToDevice.ns + m.migrateToHost.ns + m.evictions.ns);
    expect(m.migrateToDevice.ns).toBe(m.migrateToDevice.count * 1000 + m.migrateToDevice.bytes);
    expect(a.remoteAccesses).toBe(0); // every access hit a page in device memory
    expect(a.modeledNs).toBe(a.modeledFaultNs! + a.modeledRemoteNs!);
    const again = await run({ ...evicting, link });
    expect({ ...again.r, hostNs: 0 }).toEqual({ ...a, hostNs: 0 });
    // Host placement, one device thread: every access that completes is remote, one after another.
    const { r: h } = await run({ memory: 1024 * PAGE, link }, 1);
    expect(h.remoteAccesses).toBe(h.accesses);
    expect(h.modeledRemoteNs).toBe(h.accesses * 108);
    // The same counts under another link, a different modeled time: NVLink-C2C's transfers are
    // cheaper than PCIe 3.0's at 4 KiB, with the same 45 µs round.
    const p3 = await run({ ...evicting, link: 'pcie3x16' });
    const c2c = await run({ ...evicting, link: 'nvlink-c2c' });
    const counts = (r: typeof a) => ({ ...r, hostNs: 0, modeledNs: 0, modeledFaultNs: 0, modeledRemoteNs: 0 });
    expect(counts(p3.r)).toEqual(counts(a));
    expect(counts(c2c.r)).toEqual(counts(a));
    expect(p3.r.modeledNs!).toBeGreaterThan(c2c.r.modeledNs!);
    expect(c2c.r.modeledFaultNs).toBeGreaterThanOrEqual(a.faultRounds * 45_000);
  }, 60000);

  it('refuses a trace larger than the mirror, and bad options, with codes', async () => {
    await makeTrace();
    const dev = Device.create();
    const m = mapAnonymous(16 * PAGE);
    try {
      const mirror = dev.mirror(m);
      await expect(mirror.replay(tracePath)).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
      await expect(mirror.replay(tracePath, { range: 1 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
      await expect(mirror.replay(tracePath, { range: 'every' as never })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_TYPE' });
      await expect(mirror.replay(tracePath, { threads: 0 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
      await expect(mirror.replay(42 as unknown as string)).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_TYPE' });
      await expect(mirror.replay(file('missing.pmtrace'))).rejects.toMatchObject({ code: 'ENOENT' });
    } finally {
      dev.close();
      m.close();
    }
  });
});

describe('pagemirror replay', () => {
  const run = (...args: string[]) => spawnSync(process.execPath, [cli, 'replay', ...args], { encoding: 'utf8', timeout: 60_000 });

  it('replays under each combination of policies: counts as JSON, the same twice, a JSON + HTML report when asked', async () => {
    const t = file('cli.pmtrace');
    const recs: TraceRecord[] = [];
    for (let pass = 0; pass < 2; pass++) for (let p = 0; p < 128; p++) recs.push({ type: 'fault', kind: 'missing', write: pass === 1, range: 0, page: p, tNs: p, tid: 1 });
    await writeTrace(t, { ranges: [{ index: 0, length: 128 * PAGE }] }, recs);
    const out = file('reports');
    const r = run(t, '--device-memory', `${32 * PAGE},${256 * PAGE}`, '--placement', 'device', '--eviction', 'fifo', '--json', '--out', out);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.rows.map((x: { device: { memory: number } }) => x.device.memory)).toEqual([32 * PAGE, 256 * PAGE]);
    const [small, large] = j.rows.map((x: { result: { misses: number; evictions: number } }) => x.result);
    expect(large).toMatchObject({ misses: 128, evictions: 0 });
    expect(small.misses).toBe(256); // the second pass finds every page evicted
    expect(small.evictions).toBeGreaterThan(128);
    expect(j.files.map((f: string) => path.extname(f))).toEqual(['.json', '.html']);
    expect(fs.readFileSync(j.files[1], 'utf8')).toContain('<svg');
    const again = JSON.parse(run(t, '--device-memory', `${32 * PAGE},${256 * PAGE}`, '--placement', 'device', '--eviction', 'fifo', '--json').stdout);
    const strip = (rows: { result: { hostNs: number } }[]) => rows.map((x) => ({ ...x, result: { ...x.result, hostNs: 0 } }));
    expect(strip(again.rows)).toEqual(strip(j.rows));
    const text = run(t, '--prefetch', 'sequential');
    expect(text.status).toBe(0);
    expect(text.stdout).toMatch(/^policy\s+accesses\s+misses/m);
    // Two policies under two links: modeled time per row, and a chart of it, links side by side.
    const linked = run(t, '--device-memory', `${32 * PAGE},${256 * PAGE}`, '--placement', 'device', '--eviction', 'fifo', '--link', 'pcie3x16,nvlink-c2c', '--json', '--out', out);
    expect(linked.status, linked.stderr).toBe(0);
    const lj = JSON.parse(linked.stdout);
    expect(lj.rows.map((x: { device: { link: string } }) => x.device.link)).toEqual(['pcie3x16', 'nvlink-c2c', 'pcie3x16', 'nvlink-c2c']);
    for (const x of lj.rows) expect(x.result.modeledNs).toBeGreaterThanOrEqual(x.result.faultRounds * 45_000);
    expect(lj.rows[0].result.modeledNs).toBeGreaterThan(lj.rows[1].result.modeledNs);
    expect(fs.readFileSync(lj.files[1], 'utf8')).toContain('Modeled device time by policy and link (pcie3x16, nvlink-c2c)');
  }, 60000);

  it('usage errors exit 2 with one line, a bad trace exits 1 with its code, --help exits 0', () => {
    for (const args of [[], ['a', 'b'], [file('x'), '--eviction', 'bogus'], [file('x'), '--device-memory', '12'], [file('x'), '--threads', '0'], [file('x'), '--link', 'pcie9'], [file('x'), '--bogus']]) {
      const r = run(...args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    const bad = file('not-a-trace');
    fs.writeFileSync(bad, 'hello');
    const r = run(bad);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^pagemirror: ERR_PAGEMIRROR_TRACE_CORRUPT: /);
    const h = run('--help');
    expect(h.status).toBe(0);
    expect(h.stdout).toMatch(/^usage: pagemirror replay TRACE/);
  }, 60000); // 10 processes: under the sanitizers on a loaded machine one takes seconds to start
});

describe('ranges that come and go while recording (format version 2)', () => {
  const closers = cleanupAfterEach();

  it('a range added after the start is recorded under a new index; a removed one stops; the same addresses again get a new index; replay takes any of them', async () => {
    const n = 16;
    const a = mapAnonymous(n * PAGE), b = mapAnonymous(n * PAGE);
    closers.push(() => a.close(), () => b.close());
    const uffd = Userfaultfd.open();
    closers.push(() => uffd.close());
    uffd.register(a);
    uffd.register(b);
    uffd.addRule({ mapping: a, action: 'zero' });
    uffd.addRule({ mapping: b, action: 'zero' });
    const rec = recordTrace(uffd, { path: file('grow.pmtrace'), mapping: a, sampleIntervalMs: 0 });
    await within(access(a, { length: 4 * PAGE, op: 'read' }), 10000, 'a: 4 pages');
    expect(rec.addRange({ mapping: b })).toBe(1);
    await within(access(b, { length: 6 * PAGE, op: 'write' }), 10000, 'b: 6 pages');
    rec.removeRange(0);
    // a is released from the recorder's point of view: its faults now count as ignored.
    await within(access(a, { offset: 4 * PAGE, length: 4 * PAGE, op: 'read' }), 10000, 'a: 4 more pages, unrecorded');
    // The same addresses come back (a new registration): a new index, never 0 again.
    a.advise('dontneed');
    expect(rec.addRange({ mapping: a })).toBe(2);
    await within(access(a, { length: 2 * PAGE, op: 'write' }), 10000, 'a again: 2 pages');
    expect(() => rec.removeRange(0)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => rec.addRange({ mapping: b })).toThrow(expect.objectContaining({ code: 'EEXIST' }));
    const s = rec.stop();
    expect(s).toMatchObject({ faults: 4 + 6 + 2, ignored: 4, ranges: 3, rangesRefused: 0, dropped: 0 });
    expect(() => rec.addRange({ mapping: b })).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));

    const t = await readTrace(rec.path);
    expect(t.header.version).toBe(TRACE_VERSION);
    expect(t.header.ranges).toHaveLength(1);
    const hex = (x: bigint) => '0x' + x.toString(16);
    expect(t.ranges.map((r) => [r.index, r.start, r.length])).toEqual([[0, hex(a.address), n * PAGE], [1, hex(b.address), n * PAGE], [2, hex(a.address), n * PAGE]]);
    expect(t.ranges[0]!.removedNs).toBeGreaterThan(0);
    expect(t.ranges[1]!.addedNs).toBeGreaterThan(0);
    expect(t.ranges[1]!.removedNs).toBeUndefined(); // still recorded when the recording ended
    expect(t.ranges[2]!.addedNs).toBeGreaterThanOrEqual(t.ranges[0]!.removedNs!);
    const records = await all(t.records());
    const shape = records.filter((r) => r.type !== 'end').map((r) => (r.type === 'fault' ? `f${r.range}:${r.page}` : r.type === 'range-added' ? `+${r.range}` : r.type === 'range-removed' ? `-${r.range}` : r.type));
    expect(shape).toEqual(['f0:0', 'f0:1', 'f0:2', 'f0:3', '+1', 'f1:0', 'f1:1', 'f1:2', 'f1:3', 'f1:4', 'f1:5', '-0', '+2', 'f2:0', 'f2:1']);
    for (let i = 1; i < records.length; i++) expect((records[i] as { tNs: number }).tNs).toBeGreaterThanOrEqual((records[i - 1] as { tNs: number }).tNs);
    // Replay places any range on a mirror of its size, those added later included.
    const dev = Device.create({ memory: 64 * PAGE });
    const mem = mapAnonymous(n * PAGE);
    try {
      const mirror = dev.mirror(mem);
      const r1 = await within(mirror.replay(t, { range: 1 }), 20000, 'replay of range 1');
      expect(r1).toMatchObject({ fromFaults: 6, accesses: 6, layout: [{ range: 1, firstPage: 0, pages: n }] });
      await expect(dev.mirror(mapAnonymous(PAGE)).replay(t, { range: 3 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
      // The default is the whole program: every range on pages of its own, one after another. A
      // mirror that covers one range is refused, saying how many pages all of them need.
      await expect(mirror.replay(t)).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE', message: expect.stringMatching(new RegExp(`3 ranges have ${3 * n} pages`)) });
    } finally {
      dev.close();
      mem.close();
    }
    const whole = mapAnonymous(3 * n * PAGE);
    const dev2 = Device.create({ memory: 64 * PAGE, placement: 'device' });
    try {
      const all = await within(dev2.mirror(whole).replay(t, { range: 'all', threads: 1 }), 20000, 'replay of all ranges');
      expect(all).toMatchObject({ fromFaults: 4 + 6 + 2, accesses: 12, layout: [{ range: 0, firstPage: 0, pages: n }, { range: 1, firstPage: n, pages: n }, { range: 2, firstPage: 2 * n, pages: n }] });
      // Each range's pages went to its own place: 12 distinct pages migrated to the device.
      expect(all.toDevice['device-fault']).toBe(12);
    } finally {
      dev2.close();
      whole.close();
    }
  }, 30000);

  it('workers tapping while ranges come and go: every fault is in a range live at its time, none after its removal, and tapped = recorded + ignored', async () => {
    const n = 2048, half = n / 2;
    const m = mapAnonymous(n * PAGE);
    closers.push(() => m.close());
    const uffd = Userfaultfd.open({ features: ['threadId'] });
    closers.push(() => uffd.close());
    uffd.register(m);
    uffd.serve({ workers: 2, onFaults: () => {} });
    uffd.addRule({ mapping: m, action: 'zero' });
    const rec = recordTrace(uffd, { path: file('churn.pmtrace'), ranges: [{ mapping: m, length: half * PAGE }], sampleIntervalMs: 0 });
    // Four readers fault the second half in, pass after pass (DONTNEED between passes: without
    // eventRemove that is no event, and the next pass faults again), until the churn below has
    // run at least 64 times: the overlap must not depend on how fast faults are against the
    // event loop (under the sanitizers one pass ended before 5 churns).
    const second = { offset: half * PAGE, length: half * PAGE };
    let churns = 0, passes = 0, readersDone = false;
    const readers = (async () => {
      do {
        await access(m, { ...second, op: 'read', threads: 4 });
        m.advise('dontneed', second);
        passes++;
      } while (churns < 64);
    })().finally(() => (readersDone = true));
    // Meanwhile the second half is added and removed again and again, in 4 slices.
    while (!readersDone && churns < 20000) {
      const slice = churns % 4;
      const idx = rec.addRange({ mapping: m, offset: (half + (slice * half) / 4) * PAGE, length: (half / 4) * PAGE });
      await new Promise((r) => setImmediate(r));
      rec.removeRange(idx);
      churns++;
    }
    await within(readers, 30000, 'four readers');
    expect(churns).toBeGreaterThanOrEqual(64);
    expect(passes).toBeGreaterThan(0);
    await within(access(m, { length: half * PAGE, op: 'read' }), 20000, 'the first half');
    const s = rec.stop();
    expect(s.dropped).toBe(0);
    expect(s.faults + s.ignored).toBe(s.tapped);
    expect(s.tapped).toBe(uffd.stats().faults);
    expect(s.ranges).toBe(1 + churns);
    const t = await readTrace(rec.path); // the reader refuses a fault in a range not live
    const faults = (await all(t.records())).filter((r): r is TraceFault => r.type === 'fault');
    expect(faults.filter((f) => f.range === 0).length).toBe(half);
    expect(faults.length).toBe(s.faults);
    expect(t.ranges.length).toBe(1 + churns);
  }, 60000);

  it('reads a version 1 trace (made by the version 1 writer)', async () => {
    const t = await readTrace(path.join(FIXTURES_DIR, 'trace-v1.pmtrace'));
    expect(t.header.version).toBe(1);
    expect(t.ranges.map((r) => [r.index, r.start, r.length])).toEqual([[0, '0x10000000', 4 * 4096], [1, '0x20000000', 4 * 4096]]);
    expect(t.summary).toMatchObject({ faults: 8, samples: 1, writes: 4, threads: [42] });
    const records = await all(t.records());
    expect(records.filter((r) => r.type === 'fault').map((r) => (r as TraceFault).range)).toEqual([0, 0, 0, 0, 1, 1, 1, 1]);
    expect(records.at(-1)).toMatchObject({ type: 'end', faults: 8 });
    // A version 1 file cannot hold range records: type 5 there is refused as unknown.
    const bytes = fs.readFileSync(path.join(FIXTURES_DIR, 'trace-v1.pmtrace'));
    const forged = Buffer.from(bytes);
    forged.writeUInt8(5, 16 + bytes.readUInt32LE(12));
    fs.writeFileSync(file('v1-forged.pmtrace'), forged);
    await expect(readTrace(file('v1-forged.pmtrace'))).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT' });
  });

  it('writeTrace writes range records; the reader refuses a reused index, a fault after its range went, a removal of an unknown range', async () => {
    const p = file('ranges.pmtrace');
    const records: TraceRecord[] = [
      { type: 'fault', kind: 'missing', write: false, range: 0, page: 1, tNs: 1, tid: 1 },
      { type: 'range-added', range: 1, start: '0x7f0000000000', length: 8 * PAGE, modes: ['missing', 'wp'], shared: true, tNs: 2 },
      { type: 'fault', kind: 'wp', write: true, range: 1, page: 7, tNs: 3, tid: 1 },
      { type: 'range-removed', range: 0, tNs: 4 },
      { type: 'sample', method: 'pagemap-scan-written', range: 1, startNs: 0, endNs: 5, runs: [{ first: 7, count: 1 }] },
    ];
    await writeTrace(p, { ranges: [{ index: 0, length: 4 * PAGE }] }, records);
    const t = await readTrace(p);
    expect(await all(t.records())).toEqual([...records, { type: 'end', faults: 2, tNs: 5 }]);
    expect(t.ranges[1]).toMatchObject({ index: 1, start: '0x7f0000000000', length: 8 * PAGE, modes: ['missing', 'wp'], shared: true, addedNs: 2 });
    expect(t.ranges[0]).toMatchObject({ removedNs: 4 });
    const head = { ranges: [{ index: 0, length: 4 * PAGE }] };
    const w = (recs: TraceRecord[]) => writeTrace(file('refused.pmtrace'), head, recs);
    await expect(w([{ type: 'range-added', range: 0, start: '0x1000', length: PAGE, modes: [], shared: false, tNs: 0 }])).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await expect(w([{ type: 'range-removed', range: 0, tNs: 0 }, { type: 'fault', kind: 'missing', write: false, range: 0, page: 0, tNs: 1, tid: 0 }])).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await expect(w([{ type: 'range-removed', range: 1, tNs: 0 }])).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    await expect(w([{ type: 'range-added', range: 1, start: '0x1001', length: PAGE, modes: [], shared: false, tNs: 0 }])).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_UNALIGNED' });
    await expect(w([{ type: 'range-added', range: 1, start: 'x', length: PAGE, modes: [], shared: false, tNs: 0 }])).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_VALUE' });
    // The same refusals from the reader, on bytes forged from a good file.
    const good = fs.readFileSync(p);
    const at = (k: number) => 16 + good.readUInt32LE(12) + k * 24; // record k (no sample before k = 4)
    const forge = async (edit: (b: Buffer) => void, what: string) => {
      const b = Buffer.from(good);
      edit(b);
      fs.writeFileSync(file('forged.pmtrace'), b);
      await expect(readTrace(file('forged.pmtrace')), what).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT' });
    };
    await forge((b) => b.writeUInt16LE(0, at(1) + 2), 'an index used again');
    await forge((b) => b.writeUInt16LE(0, at(2) + 2), 'a fault after its range went');
    await forge((b) => b.writeUInt16LE(5, at(3) + 2), 'removing a range never added');
    await forge((b) => b.writeUInt32LE(0, at(1) + 4), 'a range of 0 pages');
    await forge((b) => b.writeUInt8(0x10, at(1) + 1), 'unknown range flags');
  });
});

describe('write-protect-round samples (format version 3)', () => {
  const closers = cleanupAfterEach();

  it('each round samples the pages whose write faults came since the round before; a range that goes gets its last sample before its removal; stop() takes a last one', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const n = 16;
    const m = mapAnonymous(n * PAGE);
    const b = mapAnonymous(4 * PAGE);
    closers.push(() => m.close(), () => b.close());
    const uffd = Userfaultfd.open();
    closers.push(() => uffd.close());
    uffd.register(m, { modes: ['missing', 'wp'] });
    uffd.register(b, { modes: ['missing', 'wp'] });
    uffd.addRule({ mapping: m, action: 'zero' });
    uffd.addRule({ mapping: m, action: 'unprotect' });
    uffd.addRule({ mapping: b, action: 'zero' });
    const rec = recordTrace(uffd, { path: file('rounds.pmtrace'), mapping: m, sampleMethod: 'wp-rounds', sampleIntervalMs: 50 });
    expect(rec.header.sampling).toEqual({ method: 'wp-rounds' });
    expect(rec.header.recorder.sampleIntervalMs).toBe(50);
    const write = (mm: typeof m, first: number, count: number) => {
      if (mm === m) for (let p = first; p < first + count; p++) present.add(p);
      return within(access(mm, { offset: first * PAGE, length: count * PAGE, op: 'write', seed: first }), 10000, `write ${first}+${count}`);
    };
    // As `pagemirror run` does, a round protects the pages present only (a none pte protected
    // would hold a marker, which is no part of this test).
    const present = new Set<number>();
    const round = () => {
      rec.writeRound();
      for (const p of present) uffd.writeProtect(m, p * PAGE, PAGE);
    };
    await write(m, 0, 8); // 8 missing faults, writes
    round();
    await write(m, 2, 2); // 2 WP faults
    await within(access(m, { offset: 5 * PAGE, length: PAGE, op: 'read' }), 10000, 'read'); // protected, read: no fault
    await write(m, 10, 1); // never touched: a missing fault, a write
    round();
    round(); // nothing written
    const bi = rec.addRange({ mapping: b });
    await write(b, 1, 2);
    rec.removeRange(bi); // its writes since the round: a last sample before the removal
    await write(m, 4, 1);
    const s = rec.stop();
    expect(() => rec.writeRound()).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    expect(s).toMatchObject({ faults: 8 + 2 + 1 + 2 + 1, samples: 5, dropped: 0 });

    const t = await readTrace(rec.path);
    expect(t.header.version).toBe(3);
    const shape = (await all(t.records()))
      .filter((r) => r.type === 'sample' || r.type === 'range-added' || r.type === 'range-removed')
      .map((r) => (r.type === 'sample' ? `s${r.range}:${r.runs.map((x) => `${x.first}+${x.count}`).join(',')}` : r.type === 'range-added' ? `+${r.range}` : `-${r.range}`));
    expect(shape).toEqual(['s0:0+8', 's0:2+2,10+1', 's0:', '+1', 's1:1+2', '-1', 's0:4+1']);
    const samples = await checkWriteRounds(rec.path);
    for (let i = 1; i < samples.length; i++) expect(samples[i]!.startNs).toBeGreaterThanOrEqual(samples[i - 1]!.startNs);
    expect(t.summary.samples).toBe(5);
    // Replay takes the sampled pages as writes too.
    const dev = Device.create({ memory: 64 * PAGE });
    closers.push(() => dev.close());
    const mem = mapAnonymous(n * PAGE);
    closers.push(() => mem.close());
    const mirror = dev.mirror(mem);
    const withSamples = await within(mirror.replay(t, { range: 0 }), 20000, 'replay');
    const faultsOnly = await within(mirror.replay(t, { range: 0, samples: false }), 20000, 'replay without samples');
    expect(withSamples).toMatchObject({ fromFaults: 8 + 2 + 1 + 1, fromSamples: 8 + 3 + 1 });
    expect(withSamples.accesses).toBe(faultsOnly.accesses + 8 + 3 + 1);
  }, 60000);

  it('writeRound() on a recorder that samples otherwise is ERR_INVALID_STATE; a range without mode wp gets no samples, and the header says why', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = mapAnonymous(4 * PAGE);
    closers.push(() => m.close());
    const uffd = Userfaultfd.open();
    closers.push(() => uffd.close());
    uffd.register(m);
    uffd.addRule({ mapping: m, action: 'zero' });
    const none = recordTrace(uffd, { path: file('no-wp.pmtrace'), mapping: m, sampleMethod: 'wp-rounds' });
    expect(none.header.sampling).toMatchObject({ method: 'none', reason: expect.stringMatching(/mode 'wp'/) });
    expect(() => none.writeRound()).toThrow(expect.objectContaining({ code: 'ERR_INVALID_STATE' }));
    none.stop();
    const scan = recordTrace(uffd, { path: file('scan.pmtrace'), mapping: m, sampleIntervalMs: 0 });
    expect(() => scan.writeRound()).toThrow(expect.objectContaining({ code: 'ERR_INVALID_STATE' }));
    scan.stop();
    expect(() => recordTrace(uffd, { path: file('bad.pmtrace'), mapping: m, sampleMethod: 'sometimes' as never })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
  });

  it('the reader refuses method 2 in a version 2 file; writeTrace writes wp-rounds samples', async () => {
    const p = file('v3-written.pmtrace');
    const sample: TraceSample = { type: 'sample', method: 'wp-rounds', range: 0, startNs: 0, endNs: 5, runs: [{ first: 1, count: 2 }] };
    await writeTrace(p, { ranges: [{ index: 0, length: 4 * PAGE }] }, [sample]);
    const t = await readTrace(p);
    expect(await all(t.records())).toEqual([sample, { type: 'end', faults: 0, tNs: 5 }]);
    await expect(writeTrace(file('bad-method.pmtrace'), { ranges: [{ index: 0, length: 4 * PAGE }] }, [{ ...sample, method: 'often' as never }])).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_VALUE' });
    // The same file called version 2 (in its version field and its header): method 2 is unknown there.
    const bytes = fs.readFileSync(p);
    const json = bytes.subarray(16, 16 + bytes.readUInt32LE(12)).toString('utf8');
    expect(json).toContain('"version":3');
    const forged = Buffer.from(bytes);
    forged.writeUInt32LE(2, 8);
    forged.write(json.replace('"version":3', '"version":2'), 16, 'utf8');
    fs.writeFileSync(file('v2-method2.pmtrace'), forged);
    await expect(readTrace(file('v2-method2.pmtrace'))).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_TRACE_CORRUPT', message: expect.stringMatching(/sample method 2/) });
  });
});
