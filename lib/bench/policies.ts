// Policy suites: where device-fault speed comes from (batch size, fault-around, prefetch), and
// what oversubscription costs per eviction policy. Each point is the median of repetitions.
import { mapAnonymous, type Mapping } from '../mapping.js';
import { Device, type DeviceOptions } from '../device.js';
import { access } from '../access.js';
import { native } from '../native.js';
import { summarize, type Summary } from './stats.js';
import { Progress } from './progress.js';

const PAGE = native.uname().pageSize;

export interface BatchingPoint {
  faultBatch: number;
  faultAround: number;
  prefetch: 'off' | 'sequential';
  gbps: Summary & { samples: number[] };
  rounds: Summary & { samples: number[] };
}

function anon(bytes: number): Mapping {
  const m = mapAnonymous(bytes, { noReserve: true });
  m.advise('nohugepage');
  return m;
}

/** Device threads streaming through never-mirrored memory: GB/s and fault rounds per setting. */
export async function runBatching(o: { size?: number; reps?: number; threads?: number; quiet?: boolean } = {}): Promise<BatchingPoint[]> {
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
        for (let i = 0; i < reps; i++) {
          const m = anon(size);
          const dev = Device.create({ memory: PAGE * 16, faultBatch, faultAround, prefetch });
          try {
            const mir = dev.mirror(m);
            const res = await mir.run({ op: 'read', unit: PAGE, threads });
            g.push(size / res.elapsedNs);
            r.push(dev.counters().faultRounds);
            mir.close();
          } finally {
            dev.close();
            m.close();
          }
        }
        out.push({ faultBatch, faultAround, prefetch, gbps: { ...summarize(g), samples: g }, rounds: { ...summarize(r), samples: r } });
        progress.step(`batch ${faultBatch}, around ${faultAround / 1024} KiB, prefetch ${prefetch}`);
      }
  progress.end();
  return out;
}

export interface OversubPoint {
  eviction: 'fifo' | 'lru';
  prefetch: 'off' | 'density';
  /** Working set as a fraction of device memory. */
  ratio: number;
  /** Time per pass over the working set, ns per page. */
  nsPerPage: Summary & { samples: number[] };
  /** Bytes migrated, by direction and trigger, in the last repetition. */
  migrated: { toDevice: Record<string, number>; toHost: Record<string, number> };
}

/** A device sweeping a working set of 50 % to 200 % of its memory, twice, per eviction policy. */
export async function runOversubscription(o: { deviceMemory?: number; reps?: number; quiet?: boolean } = {}): Promise<OversubPoint[]> {
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
      let migrated = { toDevice: {} as Record<string, number>, toHost: {} as Record<string, number> };
      for (let i = 0; i < reps; i++) {
        const m = anon(bytes);
        const opts: DeviceOptions = { memory, placement: 'device', eviction: s.eviction, prefetch: s.prefetch };
        const dev = Device.create(opts);
        try {
          await access(m, { op: 'write', seed: 1, unit: PAGE });
          const mir = dev.mirror(m);
          await mir.run({ op: 'read', unit: PAGE }); // first touch: everything faults
          const r = await mir.run({ op: 'read', unit: PAGE }); // second pass: what stays resident helps
          samples.push(r.elapsedNs / (bytes / PAGE));
          const c = dev.counters();
          const bytesOf = (x: Record<string, number>) => Object.fromEntries(Object.entries(x).map(([k, v]) => [k, v * PAGE]));
          migrated = { toDevice: bytesOf(c.migratedToDevice), toHost: bytesOf(c.migratedToHost) };
          mir.close();
        } finally {
          dev.close();
          m.close();
        }
      }
      out.push({ ...s, ratio, nsPerPage: { ...summarize(samples), samples }, migrated });
      progress.step(`${s.eviction}/${s.prefetch} at ${Math.round(ratio * 100)} %`);
    }
  progress.end();
  return out;
}
