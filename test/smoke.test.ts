import { describe, it, expect } from 'vitest';
import { mapAnonymous, Userfaultfd, access } from '../lib/index.js';
import { PAGE, within, fillPattern } from './helpers.js';

describe('smoke', () => {
  it('missing faults resolved by a TypeScript batch handler with COPY', async () => {
    const n = 64;
    const dst = mapAnonymous(n * PAGE);
    const src = mapAnonymous(n * PAGE);
    fillPattern(src.bytes, 7);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(dst, { modes: ['missing'] });
      let batches = 0;
      uffd.serve({
        onFaults(faults, u) {
          batches++;
          for (const f of faults) u.copy(dst, f.offset, PAGE, src, { sourceOffset: f.offset });
        },
      });
      const r = await within(access(dst, { op: 'verify', seed: 7, unit: 8 }), 10_000, 'verify');
      expect(r.mismatches).toBe(0);
      expect(uffd.stats().faults).toBe(n);
      expect(batches).toBeGreaterThan(0);
    } finally {
      uffd.close();
      dst.close();
      src.close();
    }
  });
});
