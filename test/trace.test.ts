// Observability: counters and a trace of events, from the API and as JSON lines.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, Device, access } from '../lib/index.js';
import { PAGE, within } from './helpers.js';

describe('trace and counters', () => {
  it('records fault batches, migrations with their trigger and invalidations with their cause', async () => {
    const dev = Device.create({ name: 'gpu0', memory: 1 << 20, trace: true });
    const m = mapAnonymous(32 * PAGE);
    try {
      m.bytes.fill(1);
      const mir = dev.mirror(m);
      await mir.read(0, 32); // one fault batch
      m.protect('r', { offset: 0, length: 4 * PAGE }); // invalidation: protect
      m.protect('rw', { offset: 0, length: 4 * PAGE });
      await mir.migrateToDevice(0, 16); // explicit
      await within(access(m, { length: 2 * PAGE, op: 'read' }), 5000, 'CPU read'); // cpu-fault x2
      await dev.release(); // release: the 14 left
      const { events, dropped } = dev.drainTrace();
      expect(dropped).toBe(0);
      const types = events.map((e) => e.type);
      expect(types).toContain('fault-batch');
      const batch = events.find((e) => e.type === 'fault-batch')!;
      expect(batch).toMatchObject({ device: 'gpu0', faults: 1, pages: 32 });
      const inv = events.filter((e) => e.type === 'invalidate');
      expect(inv.some((e) => e.type === 'invalidate' && e.cause === 'protect' && e.pages === 4)).toBe(true);
      const mig = events.filter((e) => e.type === 'migrate-to-device' || e.type === 'migrate-to-host') as { type: string; trigger: string; pages: number }[];
      expect(mig.filter((e) => e.type === 'migrate-to-device').map((e) => [e.trigger, e.pages])).toEqual([['explicit', 16]]);
      const home = mig.filter((e) => e.type === 'migrate-to-host');
      expect(home.filter((e) => e.trigger === 'cpu-fault').reduce((a, e) => a + e.pages, 0)).toBe(2);
      expect(home.filter((e) => e.trigger === 'release').reduce((a, e) => a + e.pages, 0)).toBe(14);
      // Times are monotonic.
      for (let i = 1; i < events.length; i++) expect(events[i]!.tNs).toBeGreaterThanOrEqual(events[i - 1]!.tNs);
      expect(dev.counters()).toMatchObject({
        migratedToDevice: { explicit: 16 },
        migratedToHost: { 'cpu-fault': 2, release: 14 },
      });
      expect(dev.drainTrace().events).toEqual([]); // drained
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('JSON lines: one parseable event per line; a full ring drops the oldest and says how many', async () => {
    const dev = Device.create({ trace: true, traceCapacity: 4 });
    const m = mapAnonymous(64 * PAGE);
    try {
      const mir = dev.mirror(m);
      for (let i = 0; i < 8; i++) {
        await mir.read(0, 1);
        m.advise('dontneed', { offset: 0, length: PAGE });
      }
      const text = dev.drainTraceLines();
      const lines = text.trim().split('\n').map((l) => JSON.parse(l));
      expect(lines).toHaveLength(5);
      expect(lines[4]).toMatchObject({ type: 'dropped', events: 12 });
      expect(lines[0].mirror).toMatch(/^0x[0-9a-f]+$/);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });

  it('without trace: true nothing is recorded (no cost on the fault path)', async () => {
    const dev = Device.create();
    const m = mapAnonymous(4 * PAGE);
    try {
      const mir = dev.mirror(m);
      await mir.read(0, 4);
      expect(dev.drainTrace()).toEqual({ events: [], dropped: 0 });
      expect(dev.counters().faultRounds).toBe(1);
      mir.close();
    } finally {
      dev.close();
      m.close();
    }
  });
});
