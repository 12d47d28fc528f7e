// The same workload under each file strategy, on each file system this machine has (tmpfs, the
// disk's file system, DAX when one is mounted), with a comparison table: time, host page cache,
// device memory, bytes copied, faults, writebacks.
//
// Run: npm run experiment -- [--size BYTES] [--dir DIR]      (compiled to dist/examples/)
//
// The workload: a device reads the dataset once and works on it (three read-modify-write passes)
// while periodic writeback runs; the CPU then reads it with read() and rewrites an eighth with
// write(); the device writes it all again; fsync().
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Device, mapFile, probe, fileSystemOf, type FileStrategy } from 'pagemirror';

const args = process.argv.slice(2);
const arg = (name: string) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const PAGE = probe().pageSize;
const size = Number(arg('--size') ?? 8 << 20);
const places = [
  { fs: 'tmpfs', dir: '/dev/shm' },
  { fs: fileSystemOf(arg('--dir') ?? os.tmpdir()), dir: arg('--dir') ?? os.tmpdir() },
  ...probe().dax.candidates.slice(0, 1).map((dir) => ({ fs: 'dax', dir })),
];
const strategies: FileStrategy[] = ['remote', 'copy', 'bounce', 'pin'];

type Row = Record<string, string | number>;
const rows: Row[] = [];
for (const place of places) {
  for (const strategy of strategies) {
    const file = path.join(place.dir, `pagemirror-experiment-${process.pid}-${strategy}`);
    fs.writeFileSync(file, Buffer.alloc(size, 1));
    const m = mapFile(file);
    const dev = Device.create({ name: strategy, memory: size + (2 << 20), faultAround: 64 << 10, preallocate: true });
    const t0 = process.hrtime.bigint();
    try {
      const fm = dev.mirrorFile(m, { strategy, writebackIntervalMs: 20 });
      await fm.run({ op: 'read', unit: PAGE, threads: 2 });
      for (let pass = 0; pass < 3; pass++) await fm.run({ op: 'atomic', unit: 64, threads: 2 });
      const resident = fm.accounting(); // the dataset on the device, the CPU not involved yet
      await fm.pread(0, size);
      await fm.pwrite(0, Buffer.alloc(size / 8, 2));
      await fm.run({ op: 'write', unit: 8, seed: 9, threads: 2 });
      const synced = await fm.fsync();
      const a = fm.accounting();
      rows.push({
        'file system': place.fs,
        strategy,
        'time ms': (Number(process.hrtime.bigint() - t0) / 1e6).toFixed(1),
        'page cache MiB (device phase)': ((resident.pageCache.cachedPages * PAGE) / 2 ** 20).toFixed(1),
        'device MiB (device phase)': ((resident.devicePages * PAGE) / 2 ** 20).toFixed(1),
        'copied MiB': (((a.loadedPages + a.writtenPages + a.pulledBack) * PAGE + a.snapshotBytes) / 2 ** 20).toFixed(1),
        'fault rounds': dev.counters().faultRounds,
        writebacks: a.writebacks,
        'pages at fsync': synced.pages,
        'pulled back': a.pulledBack,
      });
      fm.close();
    } catch (err) {
      // DAX refuses copy and bounce by design (the pages are device-addressable already); anything
      // else is a failure of the experiment.
      const e = err as { code?: string; message?: string };
      if (!(place.fs === 'dax' && e.code === 'EOPNOTSUPP')) throw err;
      rows.push({ 'file system': place.fs, strategy, 'time ms': `refused: ${e.code}`, 'page cache MiB (device phase)': e.message?.split(';')[0] ?? '' });
    } finally {
      dev.close();
      m.close();
      fs.rmSync(file, { force: true });
    }
  }
}

const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))];
const width = columns.map((c) => Math.max(c.length, ...rows.map((r) => String(r[c] ?? '').length)));
const line = (cells: string[]) => cells.map((c, i) => c.padStart(width[i]!)).join('  ');
console.log(`dataset ${(size / 2 ** 20).toFixed(0)} MiB per file; kernel ${probe().kernel.release}; page ${PAGE} B`);
console.log(line(columns));
for (const r of rows) console.log(line(columns.map((c) => String(r[c] ?? ''))));
if (!probe().dax.candidates.length) console.log('(no DAX file system mounted: the DAX row is left out)');
