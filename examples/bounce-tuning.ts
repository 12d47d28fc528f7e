// A custom experiment with the bench harness (pagemirror/bench), one the built-in suites do not
// run: how the bounce strategy's two knobs, the writeback step (chunkPages) and where the stable
// snapshot lives (snapshot: 'pagecache' or 'buffer'), change fsync() latency and the time a device
// writer loses to a concurrent fsync(), on tmpfs and on the disk's file system. Every cell is
// compared with the defaults (chunkPages 64, snapshot 'pagecache') in the same repetition.
//
// Run: npm run experiment:custom -- [--dir DIR] [--out DIR] [--reps N]   (about 20 s)
// Writes <out>/bounce-tuning.json and .html (default ./results).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Device, mapFile, probe, fileSystemOf } from 'pagemirror';
import { defineExperiment, runExperiment } from 'pagemirror/bench';

const { values: args } = parseArgs({ options: { dir: { type: 'string' }, out: { type: 'string' }, reps: { type: 'string' } } });
const PAGE = probe().pageSize;
const BYTES = 4 << 20;
const disk = args.dir ?? os.tmpdir();
const dirs = { tmpfs: '/dev/shm', disk } as const;
const files = Object.fromEntries(Object.entries(dirs).map(([k, d]) => [k, path.join(d, `pagemirror-bounce-tuning-${process.pid}-${k}`)]));

const exp = defineExperiment({
  name: 'bounce-tuning',
  description: `The bounce strategy over a ${BYTES >> 20} MiB file: a device rewrites it, then fsync() runs while a second device pass writes it again. tmpfs is /dev/shm, disk is ${disk} (${fileSystemOf(disk)}).`,
  axes: { fs: ['tmpfs', 'disk'], snapshot: ['pagecache', 'buffer'], chunkPages: [16, 64, 256] },
  reps: Number(args.reps ?? 5),
  baseline: { snapshot: 'pagecache', chunkPages: 64 },
  metrics: {
    fsync: { unit: 'ms', better: 'lower', target: 1.25 },
    'write during fsync': { unit: 'ms', better: 'lower', target: 1.25 },
  },
  setup() {
    for (const f of Object.values(files)) fs.writeFileSync(f, Buffer.alloc(BYTES, 0x5a));
  },
  teardown() {
    for (const f of Object.values(files)) fs.rmSync(f, { force: true });
  },
  async run({ fs: where, snapshot, chunkPages }, rep) {
    const m = mapFile(files[where]!);
    const dev = Device.create({ name: 'bounce', memory: BYTES + (2 << 20), preallocate: true });
    try {
      const fm = dev.mirrorFile(m, { strategy: 'bounce', snapshot, chunkPages });
      await fm.run({ op: 'write', unit: 64, seed: rep + 1 });
      const t0 = performance.now();
      let fsyncMs = 0;
      let writeMs = 0;
      await Promise.all([
        fm.fsync().then(() => (fsyncMs = performance.now() - t0)),
        fm.run({ op: 'write', unit: 64, seed: rep + 2 }).then(() => (writeMs = performance.now() - t0)),
      ]);
      await fm.fsync();
      fm.close();
      return { fsync: fsyncMs, 'write during fsync': writeMs };
    } finally {
      dev.close();
      m.close();
    }
  },
});

const result = await runExperiment(exp, { out: args.out ?? 'results' });
for (const c of result.cells) {
  const ratio = c.ratio ? `  fsync ${c.ratio.fsync!.median.toFixed(2)}x of the defaults` : '  (the defaults)';
  console.log(`${c.cell.fs.padEnd(5)} ${c.cell.snapshot.padEnd(9)} chunkPages ${String(c.cell.chunkPages).padStart(3)}: fsync ${c.summary.fsync!.median.toFixed(2)} ms${ratio}`);
}
console.log(`page ${PAGE} B; report: ${result.files.html}`);
