// The engine in one page: a device mirrors a buffer, faults it in batches, migrates part of it to
// its memory, a CPU touch brings a page home, an mprotect invalidates, and the trace shows it all.
// Run: node examples/hmm-tour.mjs
import { mapAnonymous, Device, access } from 'pagemirror';

const PAGE = 4096;
const m = mapAnonymous(64 << 20);
const gpu = Device.create({ name: 'gpu0', memory: 32 << 20, faultAround: 64 << 10, trace: true });
const mirror = gpu.mirror(m);

await access(m, { op: 'write', seed: 7 }); // the CPU fills it
const read = await mirror.run({ op: 'verify', seed: 7, threads: 4 });
console.log(`device read: ${read.ops} pages verified (${read.mismatches} bad) in ${read.faults} fault rounds, ${(read.elapsedNs / 1e6).toFixed(1)} ms`);

const mig = await mirror.migrateToDevice(0, 4096); // 16 MiB into device memory
console.log(`migrated ${mig.moved} pages (${mig.byMove} by UFFDIO_MOVE) in ${(mig.elapsedNs / 1e6).toFixed(1)} ms; device memory used: ${gpu.memory().used} pages`);

await access(m, { length: 16 * PAGE, op: 'read' }); // CPU touches: real faults, pages come home
m.protect('r', { offset: 32 << 20, length: 1 << 20 }); // an invalidation
console.log('counters:', JSON.stringify(gpu.counters()));
const { events, dropped } = gpu.drainTrace();
const kinds = {};
for (const e of events) kinds[e.type] = (kinds[e.type] ?? 0) + 1;
console.log(`trace: ${events.length} events (${dropped} dropped):`, kinds);

mirror.close();
gpu.close();
m.close();
