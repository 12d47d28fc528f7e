// A user-space pager in a dozen lines: faults on `dst` are served from `src`, in batches, by
// TypeScript/JavaScript; the accesses run on native threads (the JS thread never faults).
// Run: node examples/fault-handler.mjs
import { mapAnonymous, Userfaultfd, access } from 'pagemirror';

const PAGE = 4096;
const pages = 1024;
const src = mapAnonymous(pages * PAGE);
const dst = mapAnonymous(pages * PAGE);
new BigUint64Array(src.bytes.buffer).forEach((_, i, a) => (a[i] = BigInt(i)));

const uffd = Userfaultfd.open();
uffd.register(dst, { modes: ['missing'] });
let batches = 0;
uffd.serve({
  onFaults(faults) {
    batches++;
    uffd.resolveMany('copy', dst, faults.map((f) => f.offset), { source: src });
  },
});

const r = await access(dst, { op: 'read', unit: 8, threads: 8 });
const s = uffd.stats();
console.log(`read ${pages} pages on 8 native threads: ${s.faults} faults in ${batches} JavaScript batches (largest read: ${s.maxBatch}), checksum ${r.checksum}`);
uffd.close();
dst.close();
src.close();
