// Placement on device faults, eviction and oversubscription: working sets larger than device memory.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, mapMemfd, Device, access } from '../lib/index.js';
import { PAGE, within } from './helpers.js';

const DEVICE_PAGES = 64;

async function oversubscribed(eviction: 'fifo' | 'lru', pages: number) {
  const dev = Device.create({ memory: DEVICE_PAGES * PAGE, placement: 'device', eviction, trace: true });
  const m = mapAnonymous(pages * PAGE);
  try {
    await access(m, { op: 'write', seed: 5, unit: PAGE });
    const mir = dev.mirror(m);
    const r = await within(mir.run({ op: 'verify', seed: 5, unit: PAGE }), 20_000, 'device verify');
    const r2 = await within(mir.run({ op: 'verify', seed: 5, unit: PAGE }), 20_000, 'second pass');
    const c = dev.counters();
    const mem = dev.memory();
    mir.close();
    // Every write survived the round trips through device memory.
    expect((await access(m, { op: 'verify', seed: 5, unit: PAGE })).mismatches).toBe(0);
    return { r, r2, c, mem };
  } finally {
    dev.close();
    m.close();
  }
}

describe('placement and eviction', () => {
  it("placement 'device': a device fault migrates the range into device memory", async () => {
    const dev = Device.create({ memory: 1 << 20, placement: 'device' });
    const m = mapAnonymous(32 * PAGE);
    try {
      await access(m, { op: 'write', seed: 2 });
      const mir = dev.mirror(m);
      const r = await mir.run({ op: 'verify', seed: 2 });
      expect(r.mismatches).toBe(0);
      expect(dev.memory().used).toBe(32);
      expect(dev.counters().migratedToDevice).toEqual({ 'device-fault': 32 });
      expect(mir.entries().every((e) => e.onDevice)).toBe(true);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it("placement 'device' on shared memory maps the host page (nothing can move)", async () => {
    const dev = Device.create({ memory: 1 << 20, placement: 'device' });
    const m = mapMemfd(8 * PAGE);
    try {
      const mir = dev.mirror(m);
      await mir.run({ op: 'write', seed: 4 });
      expect(dev.memory().used).toBe(0);
      expect((await access(m, { op: 'verify', seed: 4 })).mismatches).toBe(0);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  for (const eviction of ['fifo', 'lru'] as const) {
    it(`${eviction}: a working set of 200% of device memory runs, with evictions, and nothing is lost`, async () => {
      const { r, r2, c, mem } = await oversubscribed(eviction, 2 * DEVICE_PAGES);
      expect(r.mismatches).toBe(0);
      expect(r2.mismatches).toBe(0);
      expect(mem.used).toBeLessThanOrEqual(DEVICE_PAGES);
      expect(c.migratedToHost.eviction).toBeGreaterThanOrEqual(DEVICE_PAGES);
      expect(c.migratedToDevice['device-fault']).toBeGreaterThanOrEqual(2 * DEVICE_PAGES);
    });
  }

  it('eviction off: what does not fit stays on the host and is mapped there', async () => {
    const dev = Device.create({ memory: DEVICE_PAGES * PAGE, placement: 'device' });
    const m = mapAnonymous(2 * DEVICE_PAGES * PAGE);
    try {
      await access(m, { op: 'write', seed: 8 });
      const mir = dev.mirror(m);
      expect((await mir.run({ op: 'verify', seed: 8 })).mismatches).toBe(0);
      expect(dev.memory().used).toBe(DEVICE_PAGES);
      const e = mir.entries();
      expect(e.filter((x) => x.onDevice)).toHaveLength(DEVICE_PAGES);
      expect(e.every((x) => x.valid)).toBe(true);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('a watermark keeps device memory below it', async () => {
    const dev = Device.create({ memory: DEVICE_PAGES * PAGE, placement: 'device', eviction: 'fifo', watermark: 0.5 });
    const m = mapAnonymous(DEVICE_PAGES * PAGE);
    try {
      const mir = dev.mirror(m);
      await mir.run({ op: 'write', seed: 1 });
      expect(dev.memory().used).toBeLessThanOrEqual(DEVICE_PAGES / 2);
      mir.close();
      expect((await access(m, { op: 'verify', seed: 1 })).mismatches).toBe(0);
    } finally {
      dev.close();
      m.close();
    }
  });

  it('prefetch sequential: a streaming device takes far fewer fault rounds', async () => {
    const m = mapAnonymous(256 * PAGE);
    const plain = Device.create();
    const pre = Device.create({ prefetch: 'sequential', trace: true });
    try {
      const a = plain.mirror(m);
      const b = pre.mirror(m);
      const ra = await a.run({ op: 'read', unit: PAGE });
      const rb = await b.run({ op: 'read', unit: PAGE });
      expect(ra.faults).toBe(256);
      expect(rb.faults).toBeLessThan(20); // the prefetched range doubles each round
      expect(pre.counters().prefetchedPages).toBeGreaterThan(200);
      a.close();
      b.close();
    } finally {
      plain.close();
      pre.close();
      m.close();
    }
  });

  it("prefetch density with placement 'device': past 51 % of a 2 MiB block the rest migrates too", async () => {
    const dev = Device.create({ memory: 4 << 20, placement: 'device', prefetch: 'density' });
    const m = mapAnonymous(4 << 20);
    try {
      await access(m, { op: 'write', seed: 3 });
      const mir = dev.mirror(m);
      const block = (2 << 20) / PAGE;
      await mir.run({ op: 'verify', seed: 3, npages: Math.ceil(block * 0.6) }); // 60 % of the first block
      const c = dev.counters();
      expect(c.migratedToDevice.prefetch ?? 0).toBeGreaterThan(0);
      expect(mir.entries(0, block).filter((e) => e.valid).length).toBeGreaterThan(block * 0.9);
      expect((await mir.run({ op: 'verify', seed: 3 })).mismatches).toBe(0);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('bad options are typed errors', () => {
    expect(() => Device.create({ placement: 'gpu' as never })).toThrow(TypeError);
    expect(() => Device.create({ eviction: 'random' as never })).toThrow(TypeError);
    expect(() => Device.create({ eviction: 'lru', watermark: 0 })).toThrow(RangeError);
    expect(() => Device.create({ memory: 100 })).toThrow(RangeError);
    expect(() => Device.create({ faultAround: 3 * PAGE })).toThrow(RangeError);
    expect(() => Device.create({ prefetch: 'always' as never })).toThrow(TypeError);
  });
});
