// Pin mode (long-term GUP) against mirror mode: the same CPU-side changes, one device that is
// invalidated (coherent) and one that holds its pages (diverges). The hazards are the point.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, Device, access } from '../lib/index.js';
import { PAGE } from './helpers.js';

describe('pin mode', () => {
  it('after a discard the mirror sees what the CPU sees; the pinned device keeps the old pages, and its writes are lost to the CPU', async () => {
    const mirrorDev = Device.create({ name: 'mirror' });
    const pinDev = Device.create({ name: 'pin' });
    const m = mapAnonymous(8 * PAGE);
    try {
      await access(m, { op: 'write', seed: 10, unit: 8 });
      const mir = mirrorDev.mirror(m);
      const pin = pinDev.mirror(m, { pin: true });
      expect(pin.info()).toMatchObject({ pinned: true, diverged: 0 });
      expect(pin.entries().every((e) => e.valid && e.write)).toBe(true); // faulted in for write at pin time
      m.advise('dontneed', { offset: 0, length: 4 * PAGE }); // the CPU drops pages 0-3

      // Mirror mode: invalidated, refaults, sees zeros like the CPU.
      expect((await mir.read(0, 4)).data.equals(Buffer.alloc(4 * PAGE))).toBe(true);
      // Pin mode: not invalidated; the device still has the old data.
      expect((await pin.run({ op: 'verify', seed: 10, npages: 4, unit: 8 })).mismatches).toBe(0);
      expect(pin.info().diverged).toBe(4);
      expect((await pin.run({ op: 'read', npages: 4 })).faults).toBe(0); // never refaults

      // A pinned device's write does not reach the CPU; a mirror's does.
      await pin.write(0, Buffer.alloc(PAGE, 0xaa));
      expect(m.readSync(0, 8)).toEqual(Buffer.alloc(8));
      await mir.write(PAGE, Buffer.alloc(PAGE, 0xbb));
      expect(m.readSync(PAGE, 8)).toEqual(Buffer.alloc(8, 0xbb));
      // Pages the CPU did not touch stay shared: both see the pinned device's writes there.
      await pin.write(5 * PAGE, Buffer.alloc(PAGE, 0xcc));
      expect(m.readSync(5 * PAGE, 8)).toEqual(Buffer.alloc(8, 0xcc));

      // Pinned pages cannot migrate: every page is reported as pinned.
      const err = await pin.migrateToDevice(6 * PAGE, 2).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ENOENT', skipped: [{ offset: 0, reason: 'pinned' }, { offset: PAGE, reason: 'pinned' }] });

      // munmap: the mirror closes with its mapping; the pinned device works on, on pages nobody else sees.
      m.close();
      await expect(mir.read(0, 1)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_CLOSED' });
      expect((await pin.read(0, 1)).data).toEqual(Buffer.alloc(PAGE, 0xaa));
      expect(pin.info().diverged).toBe(8);
      mir.close();
      pin.close();
      expect(pinDev.memory().used).toBe(0); // unpinning gives the kept pages back
    } finally {
      mirrorDev.close();
      pinDev.close();
      m.close();
    }
  });

  it('a page another device pins cannot migrate: skipped as pinned', async () => {
    const a = Device.create({ name: 'a' });
    const b = Device.create({ name: 'b' });
    const m = mapAnonymous(4 * PAGE);
    try {
      await access(m, { op: 'write', seed: 1 });
      const pin = a.mirror(m, { pin: true });
      const mir = b.mirror(m);
      const err = await mir.migrateToDevice(0, 4).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'ENOENT' });
      expect((err as { skipped: { reason: string }[] }).skipped.map((s) => s.reason)).toEqual(Array(4).fill('pinned'));
      expect((await pin.run({ op: 'verify', seed: 1 })).mismatches).toBe(0);
      mir.close();
      pin.close();
    } finally {
      a.close();
      b.close();
      m.close();
    }
  });

  it('pinning read-only memory is EPERM (a pin takes write access)', () => {
    const dev = Device.create();
    const m = mapAnonymous(PAGE, { prot: 'r' });
    try {
      expect(() => dev.mirror(m, { pin: true })).toThrow(expect.objectContaining({ code: 'EPERM', syscall: 'pin' }));
    } finally {
      dev.close();
      m.close();
    }
  });
});
