// Policy suites: where device-fault speed comes from (batch size, fault-around, prefetch), and
// what oversubscription costs per eviction policy. Each point is the median of repetitions.
import { mapAnonymous, type Mapping } from '../mapping.js';
import { Device, type DeviceOptions } from '../device.js';
import type { LinkPreset } from '../link.js';
import { access } from '../access.js';
import { native } from '../native.js';
import { summarize, type Summary } from './stats.js';
import { Progress } from './progress.js';

const PAGE = native.uname().pageSize;

/** One point of {@link runBatching}: bandwidth at one batch size and fault-around. */
export interface BatchingPoint {
  faultBatch: number;
  faultAround: number;
  prefetch: 'off' | 'sequential';
  gbps: Summary & { samples: number[] };
  rounds: Summary & { samples: number[] };
  /** With links: GB/s in modeled device time, per link preset. */
  modeledGbps?: Record<string, Summary & { samples: number[] }>;
}

/** Per link preset, the summary of its samples (undefined without links). */
function byLink(links: LinkPreset[], samples: Record<string, number[]>): Record<string, Summary & { samples: number[] }> | undefined {
  return links.length ? Object.fromEntries(links.map((l) => [l, { ...summarize(samples[l] ?? []), samples: samples[l] ?? [] }])) : undefined;
}

function anon(bytes: number): Mapping {
  const m = mapAnonymous(bytes, { noReserve: true });
  m.advise('nohugepage');
  return m;
}

/** Device threads streaming through never-mirrored memory: GB/s and fault rounds per setting. */
/** The batching suite: device read bandwidth by fault batch size, fault-around and prefetch. */
export async function runBatching(o: { size?: number; reps?: number; threads?: number; quiet?: boolean; links?: LinkPreset[] } = {}): Promise<BatchingPoint[]> {
  // With links, each repetition runs once per link (host time from every run).
  const links = o.links ?? [];
  const size = o.size ?? 64 << 20;
  const reps = o.reps ?? 5;
  const threads = o.threads ?? 8;
  const batches = [1, 4, 16, 64, 256];
  const arounds = [PAGE, 64 << 10, 2 << 20];
  const prefetches = ['off', 'sequential'] as const;
  const total = batches.length * arounds.length * prefetches.length;
  const progress = new Progress(total, 'batching', o.quiet);
  const out: BatchingPoint[] = [];
  for (const prefetch of prefetches)
    for (const faultAround of arounds)
      for (const faultBatch of batches) {
        const g: number[] = [];
        const r: number[] = [];
        const mg: Record<string, number[]> = Object.fromEntries(links.map((l) => [l, []]));
        for (let i = 0; i < reps * Math.max(1, links.length); i++) {
          const m = anon(size);
          const link = links[i % Math.max(1, links.length)] as LinkPreset | undefined;
          const dev = Device.create({ memory: PAGE * 16, faultBatch, faultAround, prefetch, link });
          try {
            const mir = dev.mirror(m);
            const res = await mir.run({ op: 'read', unit: PAGE, threads });
            g.push(size / res.elapsedNs);
            r.push(dev.counters().faultRounds);
            if (link) mg[link]!.push(size / res.modeledNs!);
            mir.close();
          } finally {
            dev.close();
            m.close();
          }
        }
        out.push({ faultBatch, faultAround, prefetch, gbps: { ...summarize(g), samples: g }, rounds: { ...summarize(r), samples: r }, modeledGbps: byLink(links, mg) });
        progress.step(`batch ${faultBatch}, around ${faultAround / 1024} KiB, prefetch ${prefetch}`);
      }
  progress.end();
  return out;
}

/** One point of {@link runOversubscription}: a working set as a fraction of device memory. */
export interface OversubPoint {
  eviction: 'fifo' | 'lru';
  prefetch: 'off' | 'density';
  /** Working set as a fraction of device memory. */
  ratio: number;
  /** Time per pass over the working set, ns per page. */
  nsPerPage: Summary & { samples: number[] };
  /** Bytes migrated, by direction and trigger, in the last repetition. */
  migrated: { toDevice: Record<string, number>; toHost: Record<string, number> };
  /** With links: the second pass in modeled device time, ns per page, per link preset. */
  modeledNsPerPage?: Record<string, Summary & { samples: number[] }>;
}

/** A device sweeping a working set of 50 % to 200 % of its memory, twice, per eviction policy. */
/** The oversubscription suite: working sets of 50 % to 200 % of device memory, with eviction and prefetch. */
export async function runOversubscription(o: { deviceMemory?: number; reps?: number; quiet?: boolean; links?: LinkPreset[] } = {}): Promise<OversubPoint[]> {
  const links = o.links ?? [];
  const memory = o.deviceMemory ?? 8 << 20;
  const reps = o.reps ?? 5;
  const ratios = [0.5, 0.75, 1, 1.25, 1.5, 2];
  const settings: { eviction: 'fifo' | 'lru'; prefetch: 'off' | 'density' }[] = [
    { eviction: 'fifo', prefetch: 'off' },
    { eviction: 'lru', prefetch: 'off' },
    { eviction: 'lru', prefetch: 'density' },
  ];
  const progress = new Progress(ratios.length * settings.length, 'oversubscription', o.quiet);
  const out: OversubPoint[] = [];
  for (const s of settings)
    for (const ratio of ratios) {
      const bytes = Math.round((memory * ratio) / PAGE) * PAGE;
      const samples: number[] = [];
      const ms: Record<string, number[]> = Object.fromEntries(links.map((l) => [l, []]));
      let migrated = { toDevice: {} as Record<string, number>, toHost: {} as Record<string, number> };
      for (let i = 0; i < reps * Math.max(1, links.length); i++) {
        const m = anon(bytes);
        const link = links[i % Math.max(1, links.length)] as LinkPreset | undefined;
        const opts: DeviceOptions = { memory, placement: 'device', eviction: s.eviction, prefetch: s.prefetch, link };
        const dev = Device.create(opts);
        try {
          await access(m, { op: 'write', seed: 1, unit: PAGE });
          const mir = dev.mirror(m);
          await mir.run({ op: 'read', unit: PAGE }); // first touch: everything faults
          const r = await mir.run({ op: 'read', unit: PAGE }); // second pass: what stays resident helps
          samples.push(r.elapsedNs / (bytes / PAGE));
          if (link) ms[link]!.push(r.modeledNs! / (bytes / PAGE));
          const c = dev.counters();
          const bytesOf = (x: Record<string, number>) => Object.fromEntries(Object.entries(x).map(([k, v]) => [k, v * PAGE]));
          migrated = { toDevice: bytesOf(c.migratedToDevice), toHost: bytesOf(c.migratedToHost) };
          mir.close();
        } finally {
          dev.close();
          m.close();
        }
      }
      out.push({ ...s, ratio, nsPerPage: { ...summarize(samples), samples }, migrated, modeledNsPerPage: byLink(links, ms) });
      progress.step(`${s.eviction}/${s.prefetch} at ${Math.round(ratio * 100)} %`);
    }
  progress.end();
  return out;
}

/** One way of tracking dirty pages and its cost per page. */
export interface DirtyRow {
  method: 'uffd-wp' | 'wp-async+scan' | 'mprotect';
  /** ns per written page: the writes plus collecting the dirty set and re-arming tracking. */
  nsPerDirtyPage: (Summary & { samples: number[] }) | null;
  /** Pages found dirty in the last repetition (must equal the pages written). */
  found: number;
  skipped?: string;
}

/**
 * Dirty tracking over the same write pattern (a quarter of the pages, strided): synchronous
 * userfaultfd write protection (a fault per first write, resolved natively) against WP_ASYNC with
 * PAGEMAP_SCAN (no fault messages: the kernel records, a scan collects and re-protects).
 */
/** The dirty suite: the same writes tracked three ways. */
export async function runDirtyTracking(o: { pages?: number; reps?: number; quiet?: boolean } = {}): Promise<DirtyRow[]> {
  const pages = o.pages ?? 4096;
  const reps = o.reps ?? 5;
  const { Userfaultfd } = await import('../uffd.js');
  const { probe } = await import('../probe.js');
  const p = probe();
  const progress = new Progress(2, 'dirty tracking', o.quiet);
  const written = pages / 4;
  const rows: DirtyRow[] = [];

  // Synchronous uffd-wp: each first write to a protected page is a fault; the fast path records it
  // (stats) and un-protects. Collecting = the fault count; re-arming = one writeProtect call.
  if (p.experiments.wp.ok) {
    const samples: number[] = [];
    let found = 0;
    for (let i = 0; i < reps + 1; i++) {
      const m = anon(pages * PAGE);
      const u = Userfaultfd.open();
      try {
        m.advise('populateWrite');
        u.register(m, { modes: ['wp'] });
        u.addRule({ mapping: m, action: 'unprotect' });
        u.serve();
        u.writeProtect(m, 0, m.length);
        const t0 = process.hrtime.bigint();
        await access(m, { op: 'write', pattern: 'strided', stride: 4 * PAGE, ops: written });
        found = u.stats().fastResolved;
        u.writeProtect(m, 0, m.length); // re-arm
        if (i > 0) samples.push(Number(process.hrtime.bigint() - t0) / written);
      } finally {
        u.close();
        m.close();
      }
    }
    rows.push({ method: 'uffd-wp', nsPerDirtyPage: { ...summarize(samples), samples }, found });
  } else rows.push({ method: 'uffd-wp', nsPerDirtyPage: null, found: 0, skipped: p.experiments.wp.reason });
  progress.step('uffd-wp');

  if (p.experiments.wpAsync.ok) {
    const samples: number[] = [];
    let found = 0;
    for (let i = 0; i < reps + 1; i++) {
      const m = anon(pages * PAGE);
      const u = Userfaultfd.open({ features: ['pagefaultFlagWp', 'wpAsync', 'wpUnpopulated'] });
      try {
        m.advise('populateWrite');
        u.register(m, { modes: ['wp'] });
        u.writeProtect(m, 0, m.length);
        const t0 = process.hrtime.bigint();
        await access(m, { op: 'write', pattern: 'strided', stride: 4 * PAGE, ops: written });
        const scan = m.scan({ require: ['written'], writeProtect: true, maxRegions: pages });
        found = scan.regions.reduce((a, r) => a + r.length / PAGE, 0);
        if (i > 0) samples.push(Number(process.hrtime.bigint() - t0) / written);
      } finally {
        u.close();
        m.close();
      }
    }
    rows.push({ method: 'wp-async+scan', nsPerDirtyPage: { ...summarize(samples), samples }, found });
  } else rows.push({ method: 'wp-async+scan', nsPerDirtyPage: null, found: 0, skipped: p.experiments.wpAsync.reason });
  progress.step('wp-async + PAGEMAP_SCAN');

  rows.push({
    method: 'mprotect',
    nsPerDirtyPage: null,
    found: 0,
    skipped: 'needs a SIGSEGV handler, which belongs to Node (its WebAssembly trap handler); pagemirror installs none',
  });
  progress.end();
  return rows;
}
