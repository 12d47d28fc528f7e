// Pages a file four times larger than the memory it may use and computes on it: a sum by native
// access threads, a maximum in JavaScript over chunks read through the pager, an in-place update
// written back under eviction, and a check of the file on disk afterwards.
//
// Run: npm run experiment:pager -- [--size BYTES] [--limit BYTES] [--dir DIR]   (dist/examples/)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pager } from 'pagemirror';

const args = process.argv.slice(2);
const arg = (name: string) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const size = Number(arg('--size') ?? 64 << 20);
const limit = Number(arg('--limit') ?? size / 4);
const file = path.join(arg('--dir') ?? os.tmpdir(), `pagemirror-pager-example-${process.pid}`);

// The dataset: word i holds i (little-endian 64-bit).
const chunk = Buffer.alloc(1 << 20);
const fd = fs.openSync(file, 'w');
for (let off = 0; off < size; off += chunk.length) {
  for (let i = 0; i < chunk.length; i += 8) chunk.writeBigUInt64LE(BigInt((off + i) / 8), i);
  fs.writeSync(fd, chunk, 0, chunk.length, off);
}
fs.closeSync(fd);

const words = BigInt(size / 8);
const p = await pager(file, { granule: 64 << 10, residentLimit: limit, eviction: 'clock' });
try {
  // 1. A sum over every word, on two native threads (the faults they take fill the pages).
  const sum = await p.access({ op: 'read', unit: 8, threads: 2 });
  const expected = (words * (words - 1n)) / 2n;
  console.log(`sum of ${words} words: ${sum.checksum} (${sum.checksum === expected ? 'correct' : `WRONG, expected ${expected}`}) in ${(sum.elapsedNs / 1e6).toFixed(1)} ms`);

  // 2. The maximum, computed in JavaScript over 1 MiB chunks copied out by native threads (the
  //    JavaScript thread never touches the paged memory itself).
  let max = 0n;
  for (let off = 0; off < size; off += chunk.length) {
    const b = await p.read(off, Math.min(chunk.length, size - off));
    for (let i = 0; i < b.length; i += 8) {
      const v = b.readBigUInt64LE(i);
      if (v > max) max = v;
    }
  }
  console.log(`max: ${max} (${max === words - 1n ? 'correct' : 'WRONG'})`);

  // 3. An update in place: every word incremented; dirty granules are written back as they are
  //    evicted, the rest by flush().
  await p.access({ op: 'rmw', unit: 8, threads: 2 });
  await p.flush();
  const s = p.stats();
  console.log(
    `resident ${(s.residentBytes / 2 ** 20).toFixed(1)} MiB of a ${(limit / 2 ** 20).toFixed(1)} MiB limit; ` +
      `${s.missing} missing + ${s.wp} write faults, ${s.fills} granules filled, ${s.evictions} evicted, ` +
      `${(s.writebackBytes / 2 ** 20).toFixed(1)} MiB written back`,
  );
} finally {
  await p.close();
}

// 4. The file on disk holds the update.
const back = fs.readFileSync(file);
let bad = 0;
for (let i = 0; i < back.length; i += 8) if (back.readBigUInt64LE(i) !== BigInt(i / 8) + 1n) bad++;
console.log(`file after close: ${bad === 0 ? 'every word updated' : `${bad} words WRONG`}`);
fs.unlinkSync(file);
process.exitCode = bad === 0 ? 0 : 1;
