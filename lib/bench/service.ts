// The service suite: what the fault service's polling and workers buy. (1) The idle-machine 4 KiB
// fault: one thread faults page after page through a copy rule, unpinned, so a worker that sleeps
// between faults pays the wake-up of an idle CPU; polling off, a fixed spin, and adaptive, with the
// C baseline's MISSING+COPY round trip (also unpinned) in the same run; then the same on a busy
// machine (one spinning process per CPU). (2) 2 MiB-granule copy rule under 2 application threads,
// 1 worker against 2. Ratios of medians; the workers' CPU time per
// fault shows what the spinning costs.
import { spawn } from 'node:child_process';
import { mapAnonymous, type Mapping } from '../mapping.js';
import { Userfaultfd, type PollOption } from '../uffd.js';
import { access } from '../access.js';
import { native } from '../native.js';
import { probe } from '../probe.js';
import { summarize, type Summary } from './stats.js';
import { runBaseline } from './baseline.js';
import { Progress } from './progress.js';

/** Options of {@link runService}. */
export interface ServiceOptions {
  /** Pages per repetition of the 4 KiB case. @default 2048 */
  pages?: number;
  /** Repetitions (median of). @default 7 */
  reps?: number;
  /** Bytes of the 2 MiB-granule case. Default 256 MiB. */
  size?: number;
  quiet?: boolean;
}

/** One fault-service configuration's measurement. */
export interface ServiceRow {
  scenario: 'wake-4k' | 'wake-4k-busy' | 'workers-2m';
  config: string;
  /** ns per page (wake-4k) or per granule (workers-2m), median over repetitions. */
  addon: Summary & { samples: number[] };
  /** The workers' CPU time per fault, ns. */
  cpuPerFault: Summary;
  /** What the ratio compares with: 'off' (polling) or '1 worker'. */
  versus: string | null;
  /** addon median / the compared row's median (lower is better). */
  ratio: number | null;
  target: number | null;
  pass: boolean | null;
  /** C baseline (wake-4k): unpinned MISSING+COPY round trip, ns per page. */
  c?: Summary & { samples: number[] };
  skipped?: string;
}

const PAGE = native.uname().pageSize;

function anon(bytes: number): Mapping {
  const m = mapAnonymous(bytes, { align: 2 << 20 });
  m.advise('nohugepage');
  return m;
}

/** One repetition: a fresh target and descriptor; returns [ns per unit, CPU ns per fault]. */
async function rep(src: Mapping, bytes: number, granule: number, threads: number, workers: number, poll: PollOption): Promise<[number, number]> {
  const t = anon(bytes);
  const u = Userfaultfd.open();
  try {
    u.register(t);
    u.serve({ workers, poll });
    u.addRule({ mapping: t, action: 'copy', source: src, granule: granule > PAGE ? granule : undefined });
    const units = bytes / granule;
    const r = await access(t, { op: 'read', threads, unit: granule, ops: units });
    if (r.signal) throw new Error(`access hit ${r.signal}`);
    const s = u.stats();
    return [r.elapsedNs / units, s.faults ? s.cpuNs / s.faults : 0];
  } finally {
    u.close();
    t.close();
  }
}

interface Config {
  name: string;
  /** The most this configuration's median may be of the first one's (null: reported only). */
  target: number | null;
  run: () => Promise<[number, number]>;
}

/**
 * Warm-up, then `reps` rounds in which every configuration runs once (after `each`, the C baseline
 * where there is one), so the machine's drift falls on all alike. Rows compare with the first.
 */
async function compare(scenario: ServiceRow['scenario'], configs: Config[], reps: number, progress: Progress, each?: () => Promise<void>): Promise<ServiceRow[]> {
  const per = configs.map(() => ({ ns: [] as number[], cpu: [] as number[] }));
  for (const c of configs) await c.run();
  for (let i = 0; i < reps; i++) {
    await each?.();
    for (let k = 0; k < configs.length; k++) {
      const [ns, cpu] = await configs[k]!.run();
      per[k]!.ns.push(ns);
      per[k]!.cpu.push(cpu);
    }
  }
  const first = summarize(per[0]!.ns).median;
  return configs.map(({ name, target }, k) => {
    const addon = { ...summarize(per[k]!.ns), samples: per[k]!.ns };
    const ratio = k === 0 ? null : addon.median / first;
    progress.step(`${scenario} ${name}: ${addon.median.toFixed(0)} ns${ratio === null ? '' : `, ${ratio.toFixed(2)}x ${configs[0]!.name}`}`);
    return {
      scenario,
      config: name,
      addon,
      cpuPerFault: summarize(per[k]!.cpu),
      versus: k === 0 ? null : configs[0]!.name,
      ratio,
      target,
      pass: ratio === null || target === null ? null : ratio <= target,
    };
  });
}

/** The service suite: one fault with and without polling, large copies with one and two workers. */
export async function runService(options: ServiceOptions = {}): Promise<ServiceRow[]> {
  const pages = options.pages ?? 2048;
  const reps = options.reps ?? 7;
  const size = options.size ?? 256 << 20;
  const p = probe();
  const progress = new Progress(8, 'service', options.quiet);
  if (!p.experiments.uffd.ok) {
    progress.end();
    const none = { ...summarize([]), samples: [] };
    return [{ scenario: 'wake-4k', config: '-', addon: none, cpuPerFault: summarize([]), versus: null, ratio: null, target: null, pass: null, skipped: p.experiments.uffd.reason }];
  }
  // Not pinned (unlike the faults suite): the cost measured is that of waking a worker asleep on
  // another, idle CPU, and two workers need two CPUs.
  try {
    const src4k = anon(pages * PAGE);
    src4k.bytes.fill(3);
    const wake = (poll: PollOption) => () => rep(src4k, pages * PAGE, PAGE, 1, 1, poll);
    const wakeRuns = async (scenario: 'wake-4k' | 'wake-4k-busy') => {
      const cSamples: number[] = [];
      const rows = await compare(
        scenario,
        [
          { name: 'poll off', target: null, run: wake(false) },
          { name: 'spin 50 us', target: null, run: wake({ spinUs: 50 }) },
          { name: 'adaptive', target: scenario === 'wake-4k' ? 0.5 : null, run: wake('adaptive') },
        ],
        reps,
        progress,
        async () => {
          const c = await runBaseline('missing-copy', { pages, reps: 1 });
          if (c.samplesNsPerPage) cSamples.push(...c.samplesNsPerPage);
        },
      );
      const c = cSamples.length ? { ...summarize(cSamples), samples: cSamples } : undefined;
      for (const r of rows) r.c = c;
      return rows;
    };
    const wakeRows = await wakeRuns('wake-4k');
    // Busy: one spinning process per CPU for the length of these runs (killed right after).
    const hogs = Array.from({ length: p.cpu.count }, () => spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' }));
    let busyRows: ServiceRow[];
    try {
      busyRows = await wakeRuns('wake-4k-busy');
    } finally {
      for (const h of hogs) h.kill('SIGKILL');
    }
    src4k.close();

    const granule = 2 << 20;
    const src = anon(size);
    src.bytes.fill(5);
    const fill = (workers: number) => () => rep(src, size, granule, 2, workers, false);
    // Target: at least 1.4x faster with 2 workers, i.e. at most 1/1.4 of the time.
    const workerRows = await compare(
      'workers-2m',
      [
        { name: '1 worker', target: null, run: fill(1) },
        { name: '2 workers', target: 1 / 1.4, run: fill(2) },
      ],
      reps,
      progress,
    );
    src.close();
    return [...wakeRows, ...busyRows, ...workerRows];
  } finally {
    progress.end();
  }
}
