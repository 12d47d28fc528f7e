// The engine suite: device bandwidth through batched device faults, migration bandwidth (copy and
// UFFDIO_MOVE paths), and the CPU fault on a device-resident page, each against the plain C
// baseline measured in the same run.
import { mapAnonymous, type Mapping } from '../mapping.js';
import { Device } from '../device.js';
import type { LinkPreset } from '../link.js';
import { access } from '../access.js';
import { native } from '../native.js';
import { probe } from '../probe.js';
import { summarize, type Summary } from './stats.js';
import { runBaseline } from './baseline.js';
import { Progress } from './progress.js';

const PAGE = native.uname().pageSize;

/** Options of {@link runEngine}. */
export interface EngineOptions {
  /** Bytes per repetition for the bandwidth scenarios. Default 256 MiB. */
  size?: number;
  /** Pages for the CPU-fault scenario. @default 4096 */
  pages?: number;
  reps?: number;
  pin?: boolean;
  cpu?: number;
  quiet?: boolean;
  /**
   * Link presets to model: each scenario then also reports its modeled metric under each (the
   * scenario runs once more per extra link; host time comes from the first). Default none.
   */
  links?: LinkPreset[];
}

/** One engine scenario's metric, against its C baseline and target. */
export interface EngineRow {
  scenario: string;
  metric: 'GB/s' | 'ns/page';
  baseline: string;
  addon: Summary & { samples: number[] };
  c: (Summary & { samples: number[] }) | null;
  /** For GB/s: addon / C (higher is better); for ns/page: addon / C (lower is better). */
  ratio: number | null;
  target: string | null;
  pass: boolean | null;
  skipped?: string;
  note?: string;
  /** With links: the same metric in modeled device time, per link preset. */
  modeled?: Record<string, Summary & { samples: number[] }>;
}

/** One run of a scenario: its host metric, and its modeled metric when a link was given. */
interface Sample {
  host: number;
  modeled?: number;
}

function anon(bytes: number): Mapping {
  const m = mapAnonymous(bytes, { noReserve: true });
  m.advise('nohugepage');
  return m;
}

async function deviceRead(size: number, link?: LinkPreset): Promise<Sample> {
  const m = anon(size);
  const dev = Device.create({ memory: PAGE * 16, faultAround: 2 << 20, faultBatch: 32, link });
  try {
    const mir = dev.mirror(m);
    // Every word of every page: a device streaming through memory it has never mirrored.
    const r = await mir.run({ op: 'read', unit: 8 });
    mir.close();
    return { host: size / r.elapsedNs, modeled: link && size / r.modeledNs! }; // bytes per ns = GB/s
  } finally {
    dev.close();
    m.close();
  }
}

async function migrateRoundTrip(size: number, useMove: boolean, link?: LinkPreset): Promise<Sample> {
  const m = anon(size);
  // The copy path copies into device memory that exists (as a GPU's does); the MOVE path moves
  // the pages themselves, so its device memory starts empty.
  const dev = Device.create({ memory: size, preallocate: !useMove, link });
  try {
    m.advise('populateWrite');
    const mir = dev.mirror(m);
    const to = await mir.migrateToDevice(0, size / PAGE, { useMove, granule: 2 << 20 });
    const back = await mir.migrateToHost(0, size / PAGE);
    mir.close();
    const k = dev.counters().modeled;
    return { host: (2 * size) / (to.elapsedNs + back.elapsedNs), modeled: k && (2 * size) / (k.migrateToDevice.ns + k.migrateToHost.ns) };
  } finally {
    dev.close();
    m.close();
  }
}

async function cpuFaultOnDevicePage(pages: number, link?: LinkPreset): Promise<Sample> {
  const m = anon(pages * PAGE);
  const dev = Device.create({ memory: pages * PAGE, link });
  try {
    m.advise('populateWrite');
    const mir = dev.mirror(m);
    await mir.migrateToDevice(0, pages, { granule: PAGE });
    // One faulting CPU thread, one word per page: each access is a MISSING fault that the engine
    // resolves by moving the page home.
    const r = await access(m, { op: 'write', unit: PAGE });
    mir.close();
    // Modeled: each page's trip home over the link (the CPU side's fault is host time either way).
    const k = dev.counters().modeled;
    return { host: r.elapsedNs / pages, modeled: k && k.migrateToHost.ns / pages };
  } finally {
    dev.close();
    m.close();
  }
}

function gbps(nsPerPage: number): number {
  return PAGE / nsPerPage;
}

/** The engine suite: device faults, migration to device memory and back, CPU faults on device pages. */
export async function runEngine(o: EngineOptions = {}): Promise<EngineRow[]> {
  const size = o.size ?? 256 << 20;
  const pages = o.pages ?? 4096;
  const reps = o.reps ?? 7;
  const pin = o.pin ?? true;
  const cpu = o.cpu ?? 0;
  const p = probe();
  const before = native.getAffinity();
  if (pin) native.setAffinity([cpu]);
  const progress = new Progress(4, 'engine', o.quiet);
  const rows: EngineRow[] = [];
  const cpin = pin ? cpu : undefined;
  const links = o.links ?? [];
  let modeled: Record<string, number[]> = {};
  const row = (scenario: string, metric: EngineRow['metric'], baseline: string, addon: number[], c: number[] | null, target: string | null, better: 'higher' | 'lower', threshold: number | null, note?: string): EngineRow => {
    const a = { ...summarize(addon), samples: addon };
    const cs = c ? { ...summarize(c), samples: c } : null;
    const ratio = cs ? a.median / cs.median : null;
    const pass = ratio === null || threshold === null ? null : better === 'higher' ? ratio >= threshold : ratio <= threshold;
    const out: EngineRow = { scenario, metric, baseline, addon: a, c: cs, ratio, target, pass, note };
    if (links.length) out.modeled = Object.fromEntries(Object.entries(modeled).map(([k, v]) => [k, { ...summarize(v), samples: v }]));
    return out;
  };
  try {
    if (!p.experiments.uffd.ok) {
      for (const s of ['device-read-2m', 'migrate-copy', 'migrate-move', 'cpu-fault-on-device-page'])
        rows.push({ scenario: s, metric: 'GB/s', baseline: '-', addon: { ...summarize([]), samples: [] }, c: null, ratio: null, target: null, pass: null, skipped: p.experiments.uffd.reason });
      return rows;
    }
    const cPages = Math.max(512, Math.floor(size / PAGE));
    // Each addon repetition alternates with one of its C baseline, so drift of this noisy machine
    // over the run falls on both sides of the ratio alike.
    const measure = async (f: (link?: LinkPreset) => Promise<Sample>, scenario: string, cp: number, toMetric: (ns: number) => number) => {
      await f(links[0]); // warm-up
      const out: number[] = [];
      const c: number[] = [];
      modeled = Object.fromEntries(links.map((l) => [l, [] as number[]]));
      for (let i = 0; i < reps; i++) {
        const b = await runBaseline(scenario, { pages: cp, reps: 1, cpu: cpin });
        if (b.samplesNsPerPage) c.push(...b.samplesNsPerPage.map(toMetric));
        const s = await f(links[0]);
        out.push(s.host);
        if (links[0]) modeled[links[0]]!.push(s.modeled!);
        for (const l of links.slice(1)) modeled[l]!.push((await f(l)).modeled!);
      }
      return [out, c.length ? c : null] as const;
    };
    const same = (ns: number) => ns;
    let [a, c] = await measure((l) => deviceRead(size, l), 'bulk-copy', cPages, gbps);
    rows.push(row('device-read-2m', 'GB/s', 'bulk UFFDIO_COPY', [...a], c && [...c], '>= 0.7x', 'higher', 0.7, 'device threads read every word of never-mirrored anonymous memory; 2 MiB fault-around, batches of 32'));
    progress.step('device read');
    [a, c] = await measure((l) => migrateRoundTrip(size, false, l), 'memcpy', cPages, gbps);
    rows.push(row('migrate-copy', 'GB/s', 'memcpy', [...a], c && [...c], '>= 0.8x', 'higher', 0.8, 'to preallocated device memory (copy under write protection) and back, 2 MiB units'));
    progress.step('migrate (copy)');
    if (p.experiments.move.ok) {
      [a, c] = await measure((l) => migrateRoundTrip(size, true, l), 'memcpy', cPages, gbps);
      rows.push(row('migrate-move', 'GB/s', 'memcpy', [...a], c && [...c], '> 1x', 'higher', 1.0, 'to device and back with UFFDIO_MOVE, 2 MiB units'));
    } else rows.push({ scenario: 'migrate-move', metric: 'GB/s', baseline: 'memcpy', addon: { ...summarize([]), samples: [] }, c: null, ratio: null, target: '> 1x', pass: null, skipped: p.experiments.move.reason });
    progress.step('migrate (move)');
    [a, c] = await measure((l) => cpuFaultOnDevicePage(pages, l), 'missing-copy', pages, same);
    rows.push(row('cpu-fault-on-device-page', 'ns/page', 'MISSING+COPY round trip', [...a], c && [...c], '<= 1.3x', 'lower', 1.3, 'a CPU write to a device-resident page: the engine moves it home'));
    progress.step('CPU fault on a device page');
  } finally {
    if (pin) native.setAffinity(before);
    progress.end();
  }
  return rows;
}
