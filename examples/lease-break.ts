// A lease in action: a device holds a file's pages (bounce: the only copy is in device memory);
// another process truncates the file; the kernel holds that process back and signals us; the
// engine revokes the device's access, writes the pages back and releases the lease, and only then
// does the truncate go on. The other process truncated the device's data, not stale pages.
//
// Run: npm run experiment:lease      (compiled to dist/examples/)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Device, mapFile, probe } from 'pagemirror';

const PAGE = probe().pageSize;
const file = path.join(os.tmpdir(), `pagemirror-lease-${process.pid}`);
fs.writeFileSync(file, Buffer.alloc(64 * PAGE));
const m = mapFile(file);
const dev = Device.create({ name: 'gpu0' });
const fm = dev.mirrorFile(m, { strategy: 'bounce', lease: true });
try {
  await fm.run({ op: 'write', seed: 42, unit: 8 });
  console.log('device wrote 64 pages; on the device:', fm.stats().devicePages, '; dirty:', fm.stats().dirtyPages, '; lease held:', fm.stats().leaseHeld);
  // spawnSync blocks this thread: the lease break is handled by a native thread, not JavaScript.
  const t0 = Date.now();
  const r = spawnSync(process.execPath, ['-e', `require('fs').truncateSync(${JSON.stringify(file)}, ${32 * PAGE})`]);
  console.log(`another process truncated to 32 pages in ${Date.now() - t0} ms (exit ${r.status}); lease-break-time is ${fs.readFileSync('/proc/sys/fs/lease-break-time', 'utf8').trim()} s`);
  const s = fm.stats();
  console.log('lease breaks:', s.leaseBreaks, '; pages written back:', s.writtenPages, '; on the device now:', s.devicePages);
  const data = fs.readFileSync(file);
  console.log(`file: ${data.length / PAGE} pages; first word ${data.readBigUInt64LE(0)} (the device wrote 42)`);
  try {
    await fm.run({ op: 'write', seed: 43, unit: 8 });
  } catch (err) {
    console.log(`a device write past the new end: ${(err as Error).message}`);
  }
} finally {
  fm.close();
  dev.close();
  m.close();
  fs.rmSync(file, { force: true });
}
