// Records the page-access trace of a workload that faults on memory a userfaultfd serves, then
// replays the trace through an emulated device under different policies and prints what each did:
// the same accesses, a different number of device faults, migrations and evictions.
//
// Run: node dist/examples/trace-replay.js [--pages N] [--out FILE]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { access, Device, mapAnonymous, probe, readTrace, recordTrace, Userfaultfd, type DeviceOptions } from 'pagemirror';

const args = process.argv.slice(2);
const arg = (name: string) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const pages = Number(arg('--pages') ?? 2048);
const keep = arg('--out');
const file = keep ?? path.join(os.tmpdir(), `pagemirror-trace-example-${process.pid}.pmtrace`);
const page = probe().pageSize;

// The workload's memory, served by a native rule: each missing page is copied in from `data`,
// write-protected, so that a later write is an asynchronous WP fault (no message, no cost to the
// workload) that PAGEMAP_SCAN then reports as written in the trace's samples.
const m = mapAnonymous(pages * page);
const data = mapAnonymous(pages * page, { populate: true });
const uffd = Userfaultfd.open({ features: ['threadId', 'wpAsync', 'wpUnpopulated'] });
uffd.register(m, { modes: ['missing', 'wp'] });
uffd.addRule({ mapping: m, action: 'copy', source: data, wp: true });

const rec = recordTrace(uffd, { path: file, ranges: [{ mapping: m }], sampleIntervalMs: 10 });
// A scan of the first half by two threads, a random reader over all of it, then an update pass.
await access(m, { length: (pages / 2) * page, op: 'read', threads: 2 });
await access(m, { op: 'read', pattern: 'random', ops: pages, seed: 7 });
await access(m, { op: 'write', unit: page });
const recording = rec.stop();
uffd.close();
m.close();
data.close();
console.log(
  `recorded ${recording.faults} faults and ${recording.samples} samples (${recording.sampling.method}) in ${recording.bytes} bytes; ` +
    `writer CPU ${(recording.writerCpuNs / 1e6).toFixed(1)} ms, ${recording.tapNsPerFault.toFixed(0)} ns per fault on the service thread`,
);

const trace = await readTrace(file);
const policies: Record<string, DeviceOptions> = {
  'mirror host memory': { memory: pages * page },
  'migrate, 1/4 memory, FIFO': { memory: (pages / 4) * page, placement: 'device', eviction: 'fifo' },
  'migrate, 1/4 memory, LRU': { memory: (pages / 4) * page, placement: 'device', eviction: 'lru' },
  'migrate, 1/4 memory, LRU + prefetch': { memory: (pages / 4) * page, placement: 'device', eviction: 'lru', prefetch: 'sequential' },
};
const rows = [];
// Each policy under two links (docs/link-model.md): the same counts, different modeled device time.
for (const [name, options] of Object.entries(policies))
  for (const link of ['pcie3x16', 'nvlink-c2c'] as const) {
    const device = Device.create({ ...options, link });
    const mem = mapAnonymous(pages * page);
    try {
      const r = await device.mirror(mem).replay(trace);
      rows.push({
        policy: name,
        link,
        accesses: r.accesses,
        'device faults': r.deviceFaults,
        'fault rounds': r.faultRounds,
        'to device': Object.values(r.toDevice).reduce((a, b) => a + b, 0),
        evictions: r.evictions,
        prefetched: r.prefetchedPages,
        'host ms': +(r.hostNs / 1e6).toFixed(1),
        'modeled ms': +((r.modeledNs ?? 0) / 1e6).toFixed(2),
      });
    } finally {
      device.close();
      mem.close();
    }
  }
console.table(rows);
if (keep) console.log(`trace kept in ${file}: try pagemirror replay ${file} --device-memory 1M,4M --placement device --eviction fifo,lru --link pcie3x16,nvlink-c2c --out reports`);
else fs.rmSync(file);
