// Access kernels: the patterns touch exactly the words they promise, and the results add up.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, access, forkAccess } from '../lib/index.js';
import { PAGE, written } from './helpers.js';

const MASK = (1n << 64n) - 1n;

describe('access kernels', () => {
  it('sequential write then verify, one word per page, many threads', async () => {
    const m = mapAnonymous(64 * PAGE);
    try {
      const w = await access(m, { op: 'write', seed: 9, threads: 4 });
      expect(w.ops).toBe(64);
      let sum = 0n;
      for (let p = 0; p < 64; p++) sum += written(9, p * PAGE);
      expect(w.checksum).toBe(sum & MASK);
      const words = new BigUint64Array(m.bytes.buffer);
      expect(words[PAGE / 8]).toBe(written(9, PAGE));
      expect(words[1]).toBe(0n); // only the first word of each page
      const v = await access(m, { op: 'verify', seed: 9 });
      expect(v.mismatches).toBe(0);
      const bad = await access(m, { op: 'verify', seed: 10 });
      expect(bad.mismatches).toBe(64);
      expect(bad.firstMismatch).toBe(0);
    } finally {
      m.close();
    }
  });

  it('strided access wraps around the range; rmw increments in place', async () => {
    const m = mapAnonymous(8 * PAGE);
    try {
      await access(m, { op: 'rmw', pattern: 'strided', stride: 3 * PAGE, ops: 8 });
      const words = new BigUint64Array(m.bytes.buffer);
      // offsets 0, 3, 6, 9%8=1, 4, 7, 2, 5 pages: each page once
      for (let p = 0; p < 8; p++) expect(words[(p * PAGE) / 8]).toBe(1n);
    } finally {
      m.close();
    }
  });

  it('random reads touch only words inside the range and are reproducible by seed', async () => {
    const m = mapAnonymous(4 * PAGE);
    try {
      m.bytes.fill(1);
      const a = await access(m, { op: 'read', pattern: 'random', ops: 1000, seed: 5 });
      const b = await access(m, { op: 'read', pattern: 'random', ops: 1000, seed: 5 });
      expect(a.ops).toBe(1000);
      expect(a.checksum).toBe(b.checksum);
      expect(a.checksum).toBe((1000n * 0x0101010101010101n) & MASK);
    } finally {
      m.close();
    }
  });

  it('records one latency per access when asked', async () => {
    const m = mapAnonymous(16 * PAGE);
    try {
      const r = await access(m, { op: 'write', latency: true });
      expect(r.latencyNs).toBeInstanceOf(Uint32Array);
      expect(r.latencyNs!.length).toBe(16);
      expect(r.elapsedNs).toBeGreaterThan(0);
    } finally {
      m.close();
    }
  });

  it('forkAccess: the child sees a copy; its writes do not reach the parent (private memory)', async () => {
    const m = mapAnonymous(4 * PAGE);
    try {
      await access(m, { op: 'write', seed: 2 });
      const child = await forkAccess(m, { op: 'verify', seed: 2 });
      expect(child).toMatchObject({ exitCode: 0, ops: 4, mismatches: 0 });
      expect(child.pid).toBeGreaterThan(0);
      const w = await forkAccess(m, { op: 'write', seed: 77 });
      expect(w.exitCode).toBe(0);
      expect((await access(m, { op: 'verify', seed: 2 })).mismatches).toBe(0);
    } finally {
      m.close();
    }
  });

  it('forkAccess on shared memory: the child writes reach the parent', async () => {
    const m = mapAnonymous(4 * PAGE, { shared: true });
    try {
      await forkAccess(m, { op: 'write', seed: 31 });
      expect((await access(m, { op: 'verify', seed: 31 })).mismatches).toBe(0);
    } finally {
      m.close();
    }
  });
});
