// The device link model: modeled device time is exactly the documented function of the events the
// engine really performed (real faults, real migrations, real evictions, real writebacks), counted
// where they happen. Costs are round numbers so each expectation is computed from the counters.
import { describe, it, expect, afterEach } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { _native, Device, LINK_PRESETS, mapAnonymous, mapFile, access, type DeviceCounters, type LinkPreset } from '../lib/index.js';
import { P, PAGE, within, requireCap } from './helpers.js';
// The reports as a person sees them (the same renderer as test/reports.test.ts).
import { Browser, findChromium } from '../scripts/render-reports.mjs';

// 1 GB/s is 1 ns per byte, 0.5 GB/s 2 ns, 2 GB/s 0.5 ns: every charge is an exact integer.
const LINK = { latencyUs: 2, bandwidthGBs: 1, toHostBandwidthGBs: 0.5, faultRoundUs: 10, remoteAccessNs: 3, remoteBandwidthGBs: 2 };
const LAT = 2000;
const FAULT = 10_000;

const open: { close(): void }[] = [];
afterEach(() => {
  for (const o of open.splice(0).reverse()) o.close();
});
function own<T extends { close(): void }>(o: T): T {
  open.push(o);
  return o;
}

function modeled(c: DeviceCounters) {
  expect(c.modeled).toBeDefined();
  return c.modeled!;
}

describe('link model: modeled device time', () => {
  it('charges each fault round, each migration and each eviction exactly as documented', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd (migration to device memory)');
    const dev = own(Device.create({ memory: 16 * PAGE, placement: 'device', eviction: 'fifo', link: LINK, trace: true }));
    const m = own(mapAnonymous(32 * PAGE));
    await within(access(m, { op: 'write', seed: 3, unit: PAGE }), 20_000, 'device or CPU access');
    const mir = dev.mirror(m);
    // One access per page, one thread: each miss is its own round migrating one page; past 16
    // pages each migration evicts the oldest page first.
    const r = await within(mir.run({ op: 'verify', seed: 3, unit: PAGE }), 20_000, 'device verify');
    expect(r.mismatches).toBe(0);
    const c = dev.counters();
    const k = modeled(c);
    expect(c.faultRounds).toBeGreaterThanOrEqual(32);
    expect(k.faults).toEqual({ ns: c.faultRounds * FAULT, count: c.faultRounds, bytes: 0 });
    const toDevicePages = Object.values(c.migratedToDevice).reduce((a, b) => a + b, 0);
    expect(toDevicePages).toBeGreaterThanOrEqual(32);
    expect(k.migrateToDevice.bytes).toBe(toDevicePages * PAGE);
    expect(k.migrateToDevice.ns).toBe(k.migrateToDevice.count * LAT + k.migrateToDevice.bytes * 1);
    expect(c.migratedToHost.eviction).toBeGreaterThanOrEqual(16);
    expect(k.evictions).toEqual({ ns: k.evictions.count * LAT + c.migratedToHost.eviction * PAGE * 2, count: c.migratedToHost.eviction, bytes: c.migratedToHost.eviction * PAGE });
    expect(k.remoteAccess.count).toBe(0); // every page was in device memory when accessed
    const sum = Object.values(k).reduce((a, e) => a + e.ns, 0);
    expect(c.modeledNs).toBe(sum);
    // The kernel waited for every round: its modeled time is the rounds and what they moved.
    expect(r.modeledFaultNs).toBe(k.faults.ns + k.migrateToDevice.ns + k.evictions.ns);
    expect(r.modeledRemoteNs).toBe(0);
    expect(r.modeledNs).toBe(r.modeledFaultNs);
    // Each event in the trace carries its own charge; a batch's includes the transfers made in it.
    const { events } = dev.drainTrace();
    const batches = events.filter((e) => e.type === 'fault-batch');
    expect(batches.length).toBe(c.faultRounds);
    expect(batches.reduce((a, e) => a + e.modeledNs!, 0)).toBe(r.modeledFaultNs);
    for (const e of events)
      if (e.type === 'migrate-to-device') expect(e.modeledNs).toBe(LAT + e.bytes);
      else if (e.type === 'migrate-to-host') expect(e.modeledNs).toBe(LAT + 2 * e.bytes);
    // Explicit migrations outside any round are charged too, and to no kernel.
    mir.close();
    const mir2 = dev.mirror(m);
    const before = modeled(dev.counters());
    const moved = await within(mir2.migrateToDevice(0, 8), 20_000, 'device or CPU access');
    const after = modeled(dev.counters());
    expect(after.migrateToDevice.count - before.migrateToDevice.count).toBe(1); // one call, one transfer
    expect(after.migrateToDevice.ns - before.migrateToDevice.ns).toBe(LAT + moved.cpages * PAGE);
    expect(after.faults).toEqual(before.faults);
    const home = await within(mir2.migrateToHost(0, 8), 20_000, 'device or CPU access');
    const back = modeled(dev.counters());
    expect(back.migrateToHost.ns - after.migrateToHost.ns).toBe(LAT + home.cpages * PAGE * 2);
    mir2.close();
  });

  it('several device threads, prefetch and eviction: each round counts once for the kernel, and the parts add up', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd (migration to device memory)');
    const dev = own(Device.create({ memory: 256 * PAGE, placement: 'device', eviction: 'lru', prefetch: 'sequential', faultBatch: 8, link: LINK, trace: true }));
    const m = own(mapAnonymous(1024 * PAGE));
    await within(access(m, { op: 'write', seed: 4, unit: 512 }), 20_000, 'device or CPU access');
    const mir = dev.mirror(m);
    const r = await within(mir.run({ op: 'verify', seed: 4, unit: 512, threads: 4 }), 15_000, 'device verify');
    expect(r.mismatches).toBe(0);
    const c = dev.counters();
    const k = modeled(c);
    const { events, dropped } = dev.drainTrace();
    expect(dropped).toBe(0);
    const batches = events.filter((e) => e.type === 'fault-batch');
    // Every round served this kernel (the only one): its fault time is the rounds' sum, once each,
    // although rounds of up to 8 faults replayed several of its threads at once.
    expect(c.maxBatch).toBeGreaterThan(1);
    expect(r.modeledFaultNs).toBe(batches.reduce((a, e) => a + e.modeledNs!, 0));
    expect(k.faults.ns).toBe(c.faultRounds * FAULT);
    // Everything moved was moved inside a round (device faults, prefetches, the evictions they forced).
    expect(r.modeledFaultNs).toBe(k.faults.ns + k.migrateToDevice.ns + k.evictions.ns + k.migrateToHost.ns);
    expect(k.migrateToDevice.ns).toBe(k.migrateToDevice.count * LAT + k.migrateToDevice.bytes);
    expect(k.evictions.ns).toBe(k.evictions.count * LAT + 2 * k.evictions.bytes);
    expect(c.migratedToDevice.prefetch ?? 0).toBeGreaterThan(0);
    expect(c.migratedToHost.eviction ?? 0).toBeGreaterThan(0);
    // Remote: the slowest thread's, never more than all of them.
    expect(r.modeledRemoteNs).toBeLessThanOrEqual(k.remoteAccess.ns);
    expect(r.modeledNs).toBe(r.modeledFaultNs! + r.modeledRemoteNs!);
    mir.close();
  });

  it('charges remote accesses per access and per byte; threads in parallel, rounds once per kernel', async () => {
    const dev = own(Device.create({ memory: 1 << 20, link: LINK }));
    const m = own(mapAnonymous(8 * PAGE));
    m.bytes.fill(1);
    const mir = dev.mirror(m);
    const c0 = dev.counters();
    // 64 words per page over 8 pages, two threads: 256 host-resident accesses each.
    const r = await within(mir.run({ op: 'read', unit: 64, threads: 2 }), 20_000, 'remote read');
    const c = dev.counters();
    expect(r.ops).toBe(512);
    expect(r.remoteAccesses).toBe(512);
    expect(r.remoteBytes).toBe(512 * 8);
    const perAccess = 3 + 8 * 0.5;
    expect(modeled(c).remoteAccess).toEqual({ ns: 512 * perAccess, count: 512, bytes: 4096 });
    expect(r.modeledRemoteNs).toBe(256 * perAccess); // the slowest thread's
    const rounds = c.faultRounds - c0.faultRounds;
    expect(rounds).toBeGreaterThan(0);
    expect(r.modeledFaultNs).toBe(rounds * FAULT); // placement host: rounds map pages, nothing moves
    expect(r.modeledNs).toBe(r.modeledFaultNs! + r.modeledRemoteNs!);
    expect(modeled(c).migrateToDevice.count).toBe(0);
    // Pages the device already maps: no fault, all remote.
    const again = await within(mir.run({ op: 'read', unit: 64 }), 20_000, 'device or CPU access');
    expect(again.faults).toBe(0);
    expect(again.modeledNs).toBe(512 * perAccess);
    mir.close();
  });

  it('charges the writeback of a copy mirror\'s device pages to the file', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd (file strategy copy)');
    const file = path.join('/dev/shm', `pagemirror-link-${process.pid}`);
    fs.writeFileSync(file, Buffer.alloc(8 * PAGE, 1));
    try {
      const m = own(mapFile(file));
      const dev = own(Device.create({ memory: 1 << 20, link: LINK }));
      const fm = dev.mirrorFile(m, { strategy: 'copy' });
      await within(fm.run({ op: 'write', seed: 9 }), 20_000, 'device write');
      const before = modeled(dev.counters());
      expect(before.migrateToDevice.bytes).toBe(8 * PAGE); // the file's pages loaded into device copies
      const wb = await within(fm.writeback({ sync: true }), 20_000, 'writeback');
      expect(wb.pages).toBe(8);
      const k = modeled(dev.counters());
      expect(k.writeback.bytes - before.writeback.bytes).toBe(8 * PAGE);
      expect(k.writeback.ns - before.writeback.ns).toBe((k.writeback.count - before.writeback.count) * LAT + 8 * PAGE * 2);
      fm.close();
    } finally {
      fs.rmSync(file, { force: true });
    }
  });

  it('a zero-cost link models zero time while counting every event; no link adds nothing', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd (migration to device memory)');
    const dev = own(Device.create({ memory: 1 << 20, placement: 'device', link: {}, trace: true }));
    const m = own(mapAnonymous(8 * PAGE));
    const mir = dev.mirror(m);
    const r = await within(mir.run({ op: 'write', seed: 1, unit: PAGE }), 20_000, 'device or CPU access');
    const c = dev.counters();
    expect(c.modeledNs).toBe(0);
    expect(r.modeledNs).toBe(0);
    expect(modeled(c).faults.count).toBe(c.faultRounds);
    expect(modeled(c).migrateToDevice.bytes).toBe(8 * PAGE);
    expect(dev.drainTrace().events.every((e) => e.type === 'invalidate' || e.modeledNs === 0)).toBe(true);
    mir.close();

    const plain = own(Device.create({ memory: 1 << 20, trace: true }));
    const mir2 = plain.mirror(m);
    const r2 = await within(mir2.run({ op: 'read' }), 20_000, 'device or CPU access');
    expect(r2.modeledNs).toBeUndefined();
    expect(plain.counters().modeledNs).toBeUndefined();
    expect(plain.counters().modeled).toBeUndefined();
    expect(plain.drainTrace().events.some((e) => 'modeledNs' in e)).toBe(false);
    mir2.close();
  });

  it('presets load with their documented figures; PCIe 3.0 follows the fitted size curve', async (ctx) => {
    expect(Object.keys(LINK_PRESETS).sort()).toEqual(['cxl', 'nvlink-c2c', 'pcie3x16', 'pcie4x16', 'pcie5x16']);
    expect(LINK_PRESETS.pcie3x16).toMatchObject({ bandwidthGBs: 12, curvePerKiB: 0.07292, faultRoundUs: 45 });
    expect(LINK_PRESETS.pcie4x16.bandwidthGBs).toBe(32);
    expect(LINK_PRESETS.pcie5x16.bandwidthGBs).toBe(64);
    expect(LINK_PRESETS['nvlink-c2c'].bandwidthGBs).toBe(450);
    expect(Object.isFrozen(LINK_PRESETS.pcie3x16)).toBe(true);
    for (const name of Object.keys(LINK_PRESETS) as LinkPreset[]) own(Device.create({ link: name, memory: 16 * PAGE }));
    requireCap(ctx, P.experiments.uffd, 'userfaultfd (migration to device memory)');
    const dev = own(Device.create({ memory: 1 << 20, link: 'pcie3x16' }));
    const m = own(mapAnonymous(16 * PAGE));
    const mir = dev.mirror(m);
    await within(mir.run({ op: 'write', seed: 2, unit: PAGE }), 20_000, 'device or CPU access');
    const c = dev.counters();
    expect(modeled(c).faults.ns).toBe(c.faultRounds * 45_000);
    const curve = (bytes: number) => Math.round(bytes / (12 * (2 / Math.PI) * Math.atan((0.07292 * bytes) / 1024)));
    // One page (≈ 2.2 GB/s by the fit), then 15 pages in one transfer.
    await within(mir.migrateToDevice(0, 1), 20_000, 'device or CPU access');
    const one = modeled(dev.counters()).migrateToDevice.ns;
    expect(Math.abs(one - curve(PAGE))).toBeLessThanOrEqual(1);
    await within(mir.migrateToDevice(PAGE, 15), 20_000, 'device or CPU access');
    const two = modeled(dev.counters()).migrateToDevice.ns - one;
    expect(Math.abs(two - curve(15 * PAGE))).toBeLessThanOrEqual(1);
    if (PAGE === 4096) expect(Math.round(one / 10)).toBe(Math.round(4096 / 2.168 / 10)); // 4 KiB ≈ 2.17 GB/s
    // Overrides on a preset.
    const slow = own(Device.create({ memory: 16 * PAGE, link: { preset: 'pcie4x16', faultRoundUs: 1 } }));
    const m2 = own(mapAnonymous(PAGE));
    const mir2 = slow.mirror(m2);
    await within(mir2.run({ op: 'read' }), 20_000, 'device or CPU access');
    expect(modeled(slow.counters()).faults.ns).toBe(slow.counters().faultRounds * 1000);
    mir.close();
    mir2.close();
  });

  it('bad link options are typed errors raised before anything is created', () => {
    const bad: [unknown, string, string][] = [
      ['pcie9x16', 'TypeError', 'ERR_INVALID_ARG_VALUE'],
      [5, 'TypeError', 'ERR_INVALID_ARG_TYPE'],
      [null, 'TypeError', 'ERR_INVALID_ARG_TYPE'],
      [['pcie3x16'], 'TypeError', 'ERR_INVALID_ARG_TYPE'],
      [{ latencyUs: -1 }, 'RangeError', 'ERR_OUT_OF_RANGE'],
      [{ faultRoundUs: NaN }, 'RangeError', 'ERR_OUT_OF_RANGE'],
      [{ remoteAccessNs: Infinity }, 'RangeError', 'ERR_OUT_OF_RANGE'],
      [{ bandwidthGBs: 0 }, 'RangeError', 'ERR_OUT_OF_RANGE'],
      [{ bandwidthGBs: -Infinity }, 'RangeError', 'ERR_OUT_OF_RANGE'],
      [{ bandwidthGBs: '12' }, 'TypeError', 'ERR_INVALID_ARG_TYPE'],
      [{ latencyMs: 1 }, 'TypeError', 'ERR_INVALID_ARG_VALUE'],
      [{ preset: 'pcie6' }, 'TypeError', 'ERR_INVALID_ARG_VALUE'],
      [{ preset: 'pcie3x16', curvePerKiB: -0.1 }, 'RangeError', 'ERR_OUT_OF_RANGE'],
    ];
    for (const [link, type, code] of bad) {
      let err: (Error & { code?: string }) | undefined;
      try {
        own(Device.create({ link: link as never, memory: 16 * PAGE }));
      } catch (e) {
        err = e as Error & { code?: string };
      }
      expect(err, JSON.stringify(link)).toBeDefined();
      expect(err!.constructor.name, String(link)).toBe(type);
      expect(err!.code).toBe(code);
    }
    // An unknown preset's message lists the presets.
    expect(() => Device.create({ link: 'pcie9x16' as LinkPreset })).toThrow(/pcie3x16, pcie4x16, pcie5x16, nvlink-c2c, cxl/);
    // The addon checks again: a direct caller cannot hand the model a negative cost.
    expect(() => _native.createDevice({ memory: 16 * PAGE, link: { latencyUs: -1 } })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => _native.createDevice({ memory: 16 * PAGE, link: { faultRoundUs: NaN } })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    expect(() => _native.createDevice({ memory: 16 * PAGE, link: 'pcie3x16' })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
  });
});

describe('bench --link: modeled device time beside host time in the reports', () => {
  const cli = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');

  it('an unknown preset is a usage error naming the presets', () => {
    const r = spawnSync(process.execPath, [cli, 'bench', 'engine', '--link', 'pcie9x16'], { encoding: 'utf8', timeout: 30_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/unknown --link preset 'pcie9x16' \(presets: pcie3x16, pcie4x16, pcie5x16, nvlink-c2c, cxl\)/);
  });

  it('engine, batching and oversubscription (smoke size): a modeled column and series per preset', async (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-link-bench-'));
    try {
      const r = spawnSync(
        process.execPath,
        [cli, 'bench', 'engine', 'batching', 'oversubscription', '--size', String(2 << 20), '--pages', '64', '--reps', '1', '--link', 'pcie3x16', '--link', 'cxl', '--out', out, '--quiet', '--no-pin'],
        { encoding: 'utf8', timeout: 150_000 },
      );
      expect([0, 3], r.stderr).toContain(r.status);
      const read = (prefix: string) => fs.readdirSync(out).find((f) => f.startsWith(prefix) && f.endsWith('.json'))!;
      const engine = JSON.parse(fs.readFileSync(path.join(out, read('engine-')), 'utf8'));
      for (const row of engine.data) {
        if (row.skipped) continue;
        expect(Object.keys(row.modeled)).toEqual(['pcie3x16', 'cxl']);
        for (const l of ['pcie3x16', 'cxl']) expect(row.modeled[l].median).toBeGreaterThan(0);
        // Migrations in 2 MiB units: CXL (64 GB/s) beats PCIe 3.0 (12 GB/s at best). (Single pages
        // need not: both cost about the same fixed ~1.9 µs, docs/link-model.md.)
        if (row.scenario.startsWith('migrate-')) expect(row.modeled.cxl.median).toBeGreaterThan(row.modeled.pcie3x16.median);
      }
      const html = fs.readFileSync(path.join(out, read('engine-').replace('.json', '.html')), 'utf8');
      expect(html).toContain('modeled pcie3x16 (median)');
      expect(html).toContain('modeled: cxl');
      const batching = JSON.parse(fs.readFileSync(path.join(out, read('batching-')), 'utf8'));
      expect(batching.data).toHaveLength(30);
      for (const p of batching.data) for (const l of ['pcie3x16', 'cxl']) expect(p.modeledGbps[l].samples).toHaveLength(1);
      expect(fs.readFileSync(path.join(out, read('batching-').replace('.json', '.html')), 'utf8')).toContain('Modeled device read bandwidth, link cxl');
      const over = JSON.parse(fs.readFileSync(path.join(out, read('oversubscription-')), 'utf8'));
      expect(over.data).toHaveLength(18);
      for (const p of over.data)
        for (const l of ['pcie3x16', 'cxl']) {
          // A working set that fits stays resident: its second pass costs the link nothing.
          if (p.ratio <= 0.5) expect(p.modeledNsPerPage[l].median).toBe(0);
          if (p.ratio > 1) expect(p.modeledNsPerPage[l].median).toBeGreaterThan(0);
        }
      const overHtml = fs.readFileSync(path.join(out, read('oversubscription-').replace('.json', '.html')), 'utf8');
      expect(overHtml).toContain('modeled ns/page pcie3x16');
      expect(overHtml).toContain('Second pass in modeled device time, link cxl');
      // Rendered: the extra columns and series break nothing (no wrapped cell, no shared colour, no
      // text outside a chart). A screenshot of each stays in results/link-render/.
      const chromium = findChromium() as { bin: string | null; reason?: string };
      if (!chromium.bin) return console.log(`reports not rendered: ${chromium.reason}`);
      const browser = new Browser(chromium.bin);
      try {
        const keep = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'results', 'link-render');
        fs.mkdirSync(keep, { recursive: true });
        for (const prefix of ['engine-', 'batching-', 'oversubscription-']) {
          const html = path.join(out, read(prefix).replace('.json', '.html'));
          const r = await within(browser.render(html), 60_000, `rendering ${prefix}`);
          fs.writeFileSync(path.join(keep, `${prefix}link.png`), r.png);
          expect(r.errors, prefix).toEqual([]);
          expect(r.problems, prefix).toEqual([]);
        }
      } finally {
        await browser.close();
      }
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 200_000);
});
