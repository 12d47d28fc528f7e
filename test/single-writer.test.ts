// Write-protect faults both ways: with writeMode 'single', a device write takes the CPU's write
// access away (uffd-wp on the CPU mapping), and a CPU write is a real WP fault that revokes the
// device's write access before the CPU goes on.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, mapMemfd, Device, access } from '../lib/index.js';
import { P, PAGE, within, requireCap } from './helpers.js';

describe("writeMode 'single'", () => {
  it('device write: the CPU mapping is write-protected; CPU write: the device loses write access first', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const dev = Device.create();
    const m = mapMemfd(16 * PAGE);
    try {
      const mir = dev.mirror(m, { writeMode: 'single' });
      await mir.run({ op: 'write', seed: 1 });
      expect(mir.entries().every((e) => e.valid && e.write)).toBe(true);
      expect(m.pagemap().every((p) => p.uffdWp)).toBe(true);
      // A CPU write to 4 pages: 4 real WP faults, each revoking the device first.
      await within(access(m, { op: 'write', seed: 2, length: 4 * PAGE }), 10_000, 'CPU write');
      // The device gave those 4 pages up (it refaults them, for reading or writing); the rest it keeps.
      expect(mir.entries().map((e) => e.valid && e.write)).toEqual([...Array(4).fill(false), ...Array(12).fill(true)]);
      expect(dev.counters().invalidations['cpu-write']).toBe(4);
      // The device sees the CPU's data, then takes write access back (an upgrade fault).
      expect((await mir.run({ op: 'verify', seed: 2, npages: 4 })).mismatches).toBe(0);
      const again = await mir.run({ op: 'write', seed: 3, npages: 4 });
      expect(again.faults).toBeGreaterThan(0);
      expect(m.pagemap().slice(0, 4).every((p) => p.uffdWp)).toBe(true);
      expect((await access(m, { op: 'verify', seed: 3, length: 4 * PAGE })).mismatches).toBe(0);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('CPU and device writers alternating on one page: every value lands, no hang', async (ctx) => {
    requireCap(ctx, P.experiments.wp, 'uffd-wp');
    const dev = Device.create();
    const m = mapMemfd(PAGE);
    try {
      const mir = dev.mirror(m, { writeMode: 'single' });
      for (let i = 0; i < 50; i++) {
        await mir.run({ op: 'write', seed: 2 * i, npages: 1 });
        expect((await access(m, { op: 'verify', seed: 2 * i, length: PAGE })).mismatches).toBe(0);
        await within(access(m, { op: 'write', seed: 2 * i + 1, length: PAGE }), 5000, 'CPU write');
        expect((await mir.run({ op: 'verify', seed: 2 * i + 1, npages: 1 })).mismatches).toBe(0);
      }
      expect(dev.counters().invalidations['cpu-write']).toBe(50);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('private anonymous memory has no second view: EOPNOTSUPP that points to exclusive()', () => {
    const dev = Device.create();
    const m = mapAnonymous(PAGE);
    try {
      expect(() => dev.mirror(m, { writeMode: 'single' })).toThrow(
        expect.objectContaining({ code: 'EOPNOTSUPP', message: expect.stringMatching(/exclusive\(\)/) }),
      );
      expect(() => dev.mirror(m, { writeMode: 'both' as never })).toThrow(TypeError);
    } finally {
      dev.close();
      m.close();
    }
  });
});
