// `pagemirror bench [suite...]`: runs suites, shows progress, writes JSON + HTML, prints a summary.
import path from 'node:path';
import { runFaults, type Comparison } from './faults.js';
import { runEngine, type EngineRow } from './engine.js';
import { benchEnv } from './env.js';
import { barChartSvg, lineChartSvg, textTable, tint, writeReport, type Table } from './report.js';
import { runBatching, runDirtyTracking, runOversubscription } from './policies.js';
import { runStrategies, STRATEGY_NAMES, WORKLOADS, WORKLOAD_TEXT } from './strategies.js';
import { runService, type ServiceRow } from './service.js';
import { runPagerSuite } from './pager.js';
import type { LinkPreset } from '../link.js';

/** The built-in benchmark suites, in the order `pagemirror bench` runs them. */
export const SUITES = ['faults', 'engine', 'batching', 'strategies', 'oversubscription', 'dirty', 'service', 'pager'] as const;
/** A name of {@link SUITES}. */
export type Suite = (typeof SUITES)[number];

/** Options of {@link runBench} (the command line's flags). */
export interface BenchOptions {
  suites: Suite[];
  out: string;
  pages?: number;
  reps?: number;
  /** engine suite: bytes per bandwidth repetition. */
  size?: number;
  pin?: boolean;
  quiet?: boolean;
  version: string;
  /** strategies suite: directory for the disk file (default: the OS temp dir). */
  dir?: string;
  /** --quick: suites whose matrix is long (pager) run a smoke-sized subset of it. */
  quick?: boolean;
  /** --link: engine, batching and oversubscription also report modeled device time under each preset. */
  links?: LinkPreset[];
  /** pager suite: only these cells (see PagerBenchOptions.cells). */
  cells?: string;
  /** pager suite: the pager's writeback mode (see PagerBenchOptions.writeback). */
  writeback?: 'pagecache' | 'confirmed';
  /** pager suite: both pagers' service threads poll this long before sleeping (see PagerBenchOptions.spinUs). */
  spinUs?: number;
  /** pager suite: the C pager tracks dirty granules too (see PagerBenchOptions.cTracksDirty). */
  cTracksDirty?: boolean;
}

/** One line per suite for `pagemirror bench --help` (a suite without one is listed bare). */
export const SUITE_TEXT: Partial<Record<string, string>> = {
  faults: 'cost per fault kind: native fast path and TypeScript handler vs plain C',
  engine: 'device faults, migration to device memory and back, CPU faults on device pages',
  batching: 'device read bandwidth by fault batch size, fault-around and prefetch',
  strategies: 'remote, copy, bounce and pin over four workloads on memfd, tmpfs and a disk file',
  oversubscription: 'working sets of 50 % to 200 % of device memory: eviction and prefetch',
  dirty: 'the same writes tracked three ways: cost per dirty page',
  service: 'the fault service: one 4 KiB fault with and without polling, 2 MiB copies with 1 and 2 workers',
  pager: 'pager() against a plain C pager and mmap, 96 cells: about 3 minutes (--quick: seconds)',
};

/** One colour per file strategy, the same in every chart of the strategies report. */
const STRATEGY_COLORS: Record<(typeof STRATEGY_NAMES)[number], string> = { remote: '#3366cc', copy: '#dc3912', bounce: '#ff9900', pin: '#109618' };

/** The number in an engine target ('>= 0.7x', '<= 1.3x'), for its line on the ratio chart. */
function targetRatio(target: string | null): number | undefined {
  const m = target === null ? null : /([\d.]+)x/.exec(target);
  return m ? Number(m[1]) : undefined;
}

/** The modeled-time cells of a row, one per link (the median, 2 decimals; '-' where none). */
function modeledCells(links: readonly string[], m: Record<string, { n: number; median: number }> | undefined, digits = 2): string[] {
  return links.map((l) => (m?.[l]?.n ? m[l]!.median.toFixed(digits) : '-'));
}

export function engineTable(rows: EngineRow[], links: readonly string[] = []): Table {
  return {
    columns: ['scenario', 'metric', 'addon (median)', 'min', 'max', 'C baseline', 'C (median)', 'ratio', 'target', 'verdict', ...links.map((l) => `modeled ${l} (median)`)],
    rows: rows.map((r) => [
      r.scenario,
      r.metric,
      r.addon.n ? r.addon.median.toFixed(2) : 'skipped',
      r.addon.n ? r.addon.min.toFixed(2) : '-',
      r.addon.n ? r.addon.max.toFixed(2) : '-',
      r.baseline,
      r.c ? r.c.median.toFixed(2) : '-',
      r.ratio === null ? '-' : r.ratio.toFixed(2) + 'x',
      r.target ?? '-',
      r.pass === null ? (r.skipped ? `skipped: ${r.skipped}` : 'reported') : r.pass ? 'pass' : 'FAIL',
      ...modeledCells(links, r.modeled),
    ]),
  };
}

export function faultsTable(rows: Comparison[]): Table {
  return {
    columns: ['scenario', 'path', 'addon ns/page (median)', 'min', 'max', 'C ns/page (median)', 'ratio', 'target', 'verdict'],
    rows: rows.map((r) => [
      r.scenario,
      r.path,
      r.skipped && !r.addon.n ? 'skipped' : r.addon.median.toFixed(0),
      r.addon.n ? r.addon.min.toFixed(0) : '-',
      r.addon.n ? r.addon.max.toFixed(0) : '-',
      r.c ? r.c.median.toFixed(0) : '-',
      r.ratio === null ? '-' : r.ratio.toFixed(2) + 'x',
      r.target === null ? '-' : `<= ${r.target}x`,
      r.pass === null ? (r.skipped ? `skipped: ${r.skipped}` : 'reported') : r.pass ? 'pass' : 'FAIL',
    ]),
  };
}

export function serviceTable(rows: ServiceRow[]): Table {
  return {
    columns: ['scenario', 'config', 'ns per unit (median)', 'min', 'max', 'worker CPU ns/fault', 'C ns/page (median)', 'ratio', 'target', 'verdict'],
    rows: rows.map((r) => [
      r.scenario,
      r.config,
      r.addon.n ? r.addon.median.toFixed(0) : 'skipped',
      r.addon.n ? r.addon.min.toFixed(0) : '-',
      r.addon.n ? r.addon.max.toFixed(0) : '-',
      r.cpuPerFault.n ? r.cpuPerFault.median.toFixed(0) : '-',
      r.c ? r.c.median.toFixed(0) : '-',
      r.ratio === null ? '-' : `${r.ratio.toFixed(2)}x ${r.versus}`,
      r.target === null ? '-' : `<= ${r.target.toFixed(2)}x`,
      r.pass === null ? (r.skipped ? `skipped: ${r.skipped}` : 'reported') : r.pass ? 'pass' : 'FAIL',
    ]),
  };
}

/** Runs suites as `pagemirror bench` does: progress on stderr, a JSON and an HTML report per suite in `out`. `ok` is false when a target was missed. */
export async function runBench(o: BenchOptions): Promise<{ files: string[]; ok: boolean; summary: string }> {
  const files: string[] = [];
  const summary: string[] = [];
  let ok = true;
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  for (const suite of o.suites) {
    if (suite === 'faults') {
      const pin = o.pin ?? true;
      const env = benchEnv(pin, o.version);
      const rows = await runFaults({ pages: o.pages, reps: o.reps, pin, quiet: o.quiet });
      const table = faultsTable(rows);
      const measured = rows.filter((r) => r.addon.n > 0);
      const svg = barChartSvg(
        'Fault round trip per page: addon vs plain C (median, min-max)',
        'ns per page',
        measured.map((r) => ({
          label: `${r.scenario} (${r.path})`,
          bars: [
            { series: 'pagemirror', value: r.addon.median, min: r.addon.min, max: r.addon.max },
            ...(r.c ? [{ series: 'plain C baseline', value: r.c.median, min: r.c.min, max: r.c.max }] : []),
          ],
        })),
      );
      const ratioSvg = barChartSvg(
        'Ratio to the C baseline (lower is better; targets 1.2x native, 2x TypeScript batch)',
        'ratio',
        measured.filter((r) => r.ratio !== null).map((r) => ({ label: `${r.scenario} (${r.path})`, bars: [{ series: 'addon / C', value: r.ratio! }], target: r.target ?? undefined })),
      );
      const written = writeReport(path.resolve(o.out), `faults-${stamp}`, env, rows, [
        {
          title: 'Faults: cost per fault kind',
          text:
            `Each repetition maps fresh memory, registers it and times only the faulting accesses (native threads). ` +
            `The C baseline ran in the same run${pin ? ', pinned to the same CPU' : ''}. ${o.reps ?? 7} repetitions, ${o.pages ?? 4096} pages each.`,
          svg: [svg, ratioSvg],
          table,
        },
      ]);
      files.push(written.json, written.html);
      ok &&= rows.every((r) => r.pass !== false);
      summary.push(`faults (kernel ${env.kernel}, ${env.cpu}, node ${env.node}, page ${env.pageSize} B${pin ? ', pinned to one CPU' : ''})`);
      summary.push(textTable(table));
    }
    if (suite === 'service') {
      const env = benchEnv(false, o.version);
      const rows = await runService({ pages: o.pages, reps: o.reps, size: o.size, quiet: o.quiet });
      const table = serviceTable(rows);
      const measured = rows.filter((r) => r.addon.n > 0);
      const bars = (scenario: ServiceRow['scenario'], unit: number) =>
        measured.filter((r) => r.scenario === scenario).map((r) => ({
          label: r.config,
          bars: [
            { series: 'pagemirror', value: r.addon.median / unit, min: r.addon.min / unit, max: r.addon.max / unit },
            ...(r.c ? [{ series: 'plain C baseline (no spin)', value: r.c.median / unit, min: r.c.min / unit, max: r.c.max / unit }] : []),
          ],
        }));
      const written = writeReport(path.resolve(o.out), `service-${stamp}`, env, rows, [
        {
          title: 'Fault service: polling and workers',
          text:
            `wake-4k: one thread reads one word per page of ${o.pages ?? 2048} fresh pages through a 4 KiB copy rule, not pinned, so a worker that sleeps between ` +
            `faults pays the wake-up of an idle CPU; the C baseline's MISSING+COPY handler (poll() then read(), never spinning) runs in the same run, also unpinned. ` +
            `wake-4k-busy: the same while one spinning process per CPU keeps the machine busy. ` +
            `workers-2m: 2 threads read one word per 2 MiB granule of ${(o.size ?? 256 << 20) >> 20} MiB through a 2 MiB copy rule, 1 worker against 2. ` +
            `${o.reps ?? 7} repetitions, alternating. Worker CPU ns/fault: the workers' thread CPU time over the faults they read (spinning shows here).`,
          svg: [
            barChartSvg('Idle-machine 4 KiB fault (median, min-max)', 'us per page', bars('wake-4k', 1000)),
            barChartSvg('Busy-machine 4 KiB fault (median, min-max)', 'us per page', bars('wake-4k-busy', 1000)),
            barChartSvg('2 MiB-granule copy rule, 2 threads (median, min-max)', 'us per granule', bars('workers-2m', 1000)),
          ],
          table,
        },
      ]);
      files.push(written.json, written.html);
      ok &&= rows.every((r) => r.pass !== false);
      summary.push(`service (kernel ${env.kernel}, ${env.cpu}, ${env.cpus} CPUs, node ${env.node}, page ${env.pageSize} B, not pinned)`);
      summary.push(textTable(table));
    }
    if (suite === 'engine') {
      const pin = o.pin ?? true;
      const env = benchEnv(pin, o.version);
      const links = o.links ?? [];
      const rows = await runEngine({ size: o.size, pages: o.pages, reps: o.reps, pin, quiet: o.quiet, links });
      const table = engineTable(rows, links);
      const measured = rows.filter((r) => r.addon.n > 0);
      const bw = barChartSvg(
        'Bandwidth: device reads and migrations vs the C baselines (median, min-max)',
        'GB/s',
        measured.filter((r) => r.metric === 'GB/s').map((r) => ({
          label: r.scenario,
          bars: [
            { series: 'pagemirror', value: r.addon.median, min: r.addon.min, max: r.addon.max },
            ...(r.c ? [{ series: `C: ${r.baseline}`, value: r.c.median, min: r.c.min, max: r.c.max }] : []),
            ...links.flatMap((l) => (r.modeled?.[l]?.n ? [{ series: `modeled: ${l}`, value: r.modeled[l]!.median, min: r.modeled[l]!.min, max: r.modeled[l]!.max }] : [])),
          ],
        })),
      );
      const lat = barChartSvg(
        'CPU fault on a device-resident page vs the C MISSING+COPY round trip',
        'ns per page',
        measured.filter((r) => r.metric === 'ns/page').map((r) => ({
          label: r.scenario,
          bars: [
            { series: 'pagemirror', value: r.addon.median, min: r.addon.min, max: r.addon.max },
            ...(r.c ? [{ series: 'C baseline', value: r.c.median, min: r.c.min, max: r.c.max }] : []),
            ...links.flatMap((l) => (r.modeled?.[l]?.n ? [{ series: `modeled: ${l}`, value: r.modeled[l]!.median, min: r.modeled[l]!.min, max: r.modeled[l]!.max }] : [])),
          ],
        })),
      );
      const ratio = barChartSvg(
        'Ratio to the C baseline (GB/s: higher is better; ns/page: lower is better)',
        'ratio',
        measured.filter((r) => r.ratio !== null).map((r) => ({ label: r.scenario, bars: [{ series: 'addon / C', value: r.ratio! }], target: targetRatio(r.target) })),
      );
      const written = writeReport(path.resolve(o.out), `engine-${stamp}`, env, rows, [
        {
          title: 'Engine: device faults, migration, CPU faults on device memory',
          text:
            rows.map((r) => `${r.scenario}: ${r.note ?? ''}`).join(' | ') +
            (links.length ? ` | modeled: the same metric in modeled device time under ${links.join(', ')} (docs/link-model.md)` : ''),
          svg: [bw, lat, ratio],
          table,
        },
      ]);
      files.push(written.json, written.html);
      ok &&= rows.every((r) => r.pass !== false);
      summary.push(`engine (kernel ${env.kernel}, ${env.cpu}, node ${env.node}, page ${env.pageSize} B${pin ? ', pinned to one CPU' : ''})`);
      summary.push(textTable(table));
    }
    if (suite === 'batching') {
      const env = benchEnv(false, o.version);
      const size = o.size ?? 64 << 20;
      const links = o.links ?? [];
      const rows = await runBatching({ size, reps: o.reps, quiet: o.quiet, links });
      const label = (r: (typeof rows)[number]) => `around ${r.faultAround / 1024} KiB${r.prefetch === 'off' ? '' : ', prefetch'}`;
      const keys = [...new Set(rows.map(label))];
      const series = (metric: 'gbps' | 'rounds') =>
        keys.map((k) => ({
          name: k,
          points: rows.filter((r) => label(r) === k).map((r) => ({ x: r.faultBatch, y: r[metric].median, min: r[metric].min, max: r[metric].max })),
        }));
      const modeledSeries = (l: string) =>
        keys.map((k) => ({ name: k, points: rows.filter((r) => label(r) === k).map((r) => ({ x: r.faultBatch, y: r.modeledGbps![l]!.median, min: r.modeledGbps![l]!.min, max: r.modeledGbps![l]!.max })) }));
      const table: Table = {
        columns: ['fault batch', 'fault-around', 'prefetch', 'GB/s (median)', 'min', 'max', 'fault rounds', ...links.map((l) => `modeled GB/s ${l}`)],
        rows: rows.map((r) => [r.faultBatch, `${r.faultAround / 1024} KiB`, r.prefetch, r.gbps.median.toFixed(2), r.gbps.min.toFixed(2), r.gbps.max.toFixed(2), r.rounds.median, ...modeledCells(links, r.modeledGbps, 3)]),
      };
      const written = writeReport(path.resolve(o.out), `batching-${stamp}`, env, rows, [
        {
          title: 'Batching: where device-fault speed comes from',
          text: `8 device threads read one word per page of ${size >> 20} MiB of never-mirrored anonymous memory. Fault batch size on the x axis; one line per fault-around granule, with and without sequential prefetch.`,
          svg: [
            lineChartSvg('Device read bandwidth', 'fault batch size', 'GB/s', series('gbps')),
            lineChartSvg('Fault rounds (service batches)', 'fault batch size', 'rounds', series('rounds')),
            ...links.map((l) => lineChartSvg(`Modeled device read bandwidth, link ${l}`, 'fault batch size', 'GB/s (modeled)', modeledSeries(l))),
          ],
          table,
        },
      ]);
      files.push(written.json, written.html);
      summary.push(`batching (kernel ${env.kernel}, ${env.cpu}, node ${env.node}, page ${env.pageSize} B)`);
      summary.push(textTable(table));
    }
    if (suite === 'strategies') {
      const env = benchEnv(false, o.version);
      const r = await runStrategies({ pages: o.pages, reps: o.reps ?? 3, dir: o.dir, quiet: o.quiet });
      const mib = (pages: number) => ((pages * env.pageSize) / 2 ** 20).toFixed(1);
      const table: Table = {
        columns: ['file system', 'strategy', 'workload', 'throughput (median)', 'min', 'max', 'unit', 'p50 µs', 'p99 µs', 'latency of', 'page cache MiB', 'RSS MiB', 'device MiB', 'copied MiB', 'fault rounds', 'writebacks', 'pages written'],
        rows: r.rows.map((x) =>
          x.skipped
            ? [x.fs, x.strategy, x.workload, `skipped: ${x.skipped}`, '-', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-']
            : [x.fs, x.strategy, x.workload, x.throughput.median.toFixed(1), x.throughput.min.toFixed(1), x.throughput.max.toFixed(1), x.throughput.unit, x.latency.p50.toFixed(1), x.latency.p99.toFixed(1), x.latency.what, mib(x.pageCachePages), x.rssMiB.toFixed(0), mib(x.devicePages), x.bytesCopiedMiB.toFixed(1), x.faultRounds, x.writebacks, x.writtenPages],
        ),
      };
      const wbTable: Table = {
        columns: ['file system', 'snapshot', 'pages', 'bounce writeback MB/s (median)', 'min', 'max', 'plain pwrite MB/s (median)', 'min', 'max', 'ratio', 'target', 'verdict'],
        rows: r.writeback.map((w) => [w.fs, w.snapshot, w.pages, w.writeback.median.toFixed(0), w.writeback.min.toFixed(0), w.writeback.max.toFixed(0), w.pwrite.median.toFixed(0), w.pwrite.min.toFixed(0), w.pwrite.max.toFixed(0), w.ratio.toFixed(2) + 'x', w.target === null ? '-' : `>= ${w.target}x`, w.pass === null ? 'reported' : w.pass ? 'pass' : 'FAIL']),
      };
      const fsNames = r.places.map((p) => p.fs);
      const byWorkload = WORKLOADS.map((w) =>
        barChartSvg(
          `${w}: throughput by strategy (${r.rows.find((x) => x.workload === w)?.throughput.unit ?? ''}, median, min-max)`,
          r.rows.find((x) => x.workload === w)?.throughput.unit ?? '',
          fsNames.map((f) => ({
            label: f,
            bars: STRATEGY_NAMES.map((s) => {
              const x = r.rows.find((y) => y.fs === f && y.strategy === s && y.workload === w)!;
              return { series: s, value: x.throughput.median || 0, min: x.throughput.min || 0, max: x.throughput.max || 0 };
            }),
          })),
          { colors: STRATEGY_COLORS },
        ),
      );
      const memory = barChartSvg(
        'read-once: host page cache and device memory at the end (MiB)',
        'MiB',
        fsNames.flatMap((f) =>
          STRATEGY_NAMES.map((s) => {
            const x = r.rows.find((y) => y.fs === f && y.strategy === s && y.workload === 'read-once')!;
            return { label: `${f} ${s}`, bars: [{ series: 'page cache', value: Number(mib(x.pageCachePages)) }, { series: 'device memory', value: Number(mib(x.devicePages)) }] };
          }),
        ),
        { colors: { 'page cache': '#7f7f7f', 'device memory': '#990099' } }, // not a strategy's colour
      );
      const latency = barChartSvg(
        'fsync() latency by strategy (µs, p50 and p99)',
        'µs',
        fsNames.map((f) => ({
          label: f,
          bars: STRATEGY_NAMES.flatMap((s) => {
            const x = r.rows.find((y) => y.fs === f && y.strategy === s && y.workload === 'fsync')!;
            return [{ series: `${s} p50`, value: x.latency.p50 || 0 }, { series: `${s} p99`, value: x.latency.p99 || 0 }];
          }),
        })),
        // Each strategy keeps its colour from the other charts: p99 in it, p50 a lighter shade.
        { colors: Object.fromEntries(STRATEGY_NAMES.flatMap((s) => [[`${s} p50`, tint(STRATEGY_COLORS[s], 0.55)], [`${s} p99`, STRATEGY_COLORS[s]]])) },
      );
      const wbSvg = barChartSvg(
        'Bounce-page writeback vs plain pwrite of the same pages (+ fdatasync), MB/s',
        'MB/s',
        r.writeback.map((w) => ({
          label: `${w.fs} (${w.snapshot})`,
          bars: [
            { series: 'bounce writeback', value: w.writeback.median, min: w.writeback.min, max: w.writeback.max },
            { series: 'plain pwrite', value: w.pwrite.median, min: w.pwrite.min, max: w.pwrite.max },
          ],
        })),
      );
      const wbRatio = barChartSvg(
        'Ratio of bounce writeback to plain pwrite (higher is better)',
        'ratio',
        r.writeback.map((w) => ({ label: `${w.fs} (${w.snapshot})`, bars: [{ series: 'writeback / pwrite', value: w.ratio }], target: w.target ?? undefined })),
      );
      const written = writeReport(path.resolve(o.out), `strategies-${stamp}`, env, r, [
        {
          title: 'File strategies side by side',
          text:
            `Dataset ${r.dataset.pages} pages (${(r.dataset.bytes / 2 ** 20).toFixed(0)} MiB) per file; ${o.reps ?? 3} repetitions, each on a fresh file, device and mirror. ` +
            WORKLOADS.map((w) => `${w}: ${WORKLOAD_TEXT[w]}.`).join(' ') +
            ' Latency percentiles pool every sample of every repetition; accounting columns are from the last repetition.',
          svg: [...byWorkload, memory, latency],
          table,
        },
        {
          title: 'Bounce-page writeback against plain pwrite',
          text: "All pages dirty in device memory; writeback writes a consistent image of each, then fdatasync. snapshot 'pagecache' (default): the page-cache page pwrite fills is the bounce page, the device's writes to those pages waiting while pwrite copies them; 'buffer': a private bounce buffer first (one more copy, shorter waits). The baseline writes the same number of pages from a buffer with pwrite, in the same 64-page pieces, then fdatasync, alternating with the writeback in the same run.",
          svg: [wbSvg, wbRatio],
          table: wbTable,
        },
      ]);
      files.push(written.json, written.html);
      ok &&= r.writeback.every((w) => w.pass !== false);
      summary.push(`strategies (kernel ${env.kernel}, ${env.cpu}, node ${env.node}, page ${env.pageSize} B)`);
      summary.push(textTable(table));
      summary.push(textTable(wbTable));
    }
    if (suite === 'oversubscription') {
      const env = benchEnv(false, o.version);
      const deviceMemory = o.size ? Math.max(1 << 20, o.size / 8) : 8 << 20;
      const links = o.links ?? [];
      const rows = await runOversubscription({ deviceMemory, reps: o.reps, quiet: o.quiet, links });
      const label = (r: (typeof rows)[number]) => `${r.eviction}${r.prefetch === 'off' ? '' : ' + density prefetch'}`;
      const keys = [...new Set(rows.map(label))];
      const base = new Map(keys.map((k) => [k, rows.find((r) => label(r) === k && r.ratio === 0.5)!.nsPerPage.median]));
      const slowdown = keys.map((k) => ({
        name: k,
        points: rows.filter((r) => label(r) === k).map((r) => ({ x: Math.round(r.ratio * 100), y: r.nsPerPage.median / base.get(k)!, min: r.nsPerPage.min / base.get(k)!, max: r.nsPerPage.max / base.get(k)! })),
      }));
      const mb = (x: Record<string, number>) => Object.entries(x).map(([k, v]) => `${k} ${(v / 2 ** 20).toFixed(1)}`).join(', ') || '-';
      const table: Table = {
        columns: ['policy', 'working set', 'ns/page (median)', 'slowdown vs 50 %', 'MiB to device', 'MiB to host', ...links.map((l) => `modeled ns/page ${l}`)],
        rows: rows.map((r) => [label(r), `${Math.round(r.ratio * 100)} %`, r.nsPerPage.median.toFixed(0), (r.nsPerPage.median / base.get(label(r))!).toFixed(2) + 'x', mb(r.migrated.toDevice), mb(r.migrated.toHost), ...modeledCells(links, r.modeledNsPerPage, 0)]),
      };
      const modeledPerPage = (l: string) =>
        keys.map((k) => ({ name: k, points: rows.filter((r) => label(r) === k).map((r) => ({ x: Math.round(r.ratio * 100), y: r.modeledNsPerPage![l]!.median, min: r.modeledNsPerPage![l]!.min, max: r.modeledNsPerPage![l]!.max })) }));
      const written = writeReport(path.resolve(o.out), `oversubscription-${stamp}`, env, rows, [
        {
          title: 'Oversubscription: working set against device memory',
          text: `A device with ${deviceMemory >> 20} MiB of memory migrates on faults (placement 'device') and reads a working set of 50 % to 200 % of its memory twice; the second pass is timed. Migrated bytes by trigger show what eviction and prefetch did.`,
          svg: [
            lineChartSvg('Slowdown of the second pass', 'working set, % of device memory', 'x of the 50 % case', slowdown),
            ...links.map((l) => lineChartSvg(`Second pass in modeled device time, link ${l}`, 'working set, % of device memory', 'ns per page (modeled)', modeledPerPage(l))),
          ],
          table,
        },
      ]);
      files.push(written.json, written.html);
      summary.push(`oversubscription (kernel ${env.kernel}, ${env.cpu}, node ${env.node}, page ${env.pageSize} B)`);
      summary.push(textTable(table));
    }
    if (suite === 'dirty') {
      const env = benchEnv(false, o.version);
      const pages = o.pages ?? 4096;
      const rows = await runDirtyTracking({ pages, reps: o.reps, quiet: o.quiet });
      const table: Table = {
        columns: ['method', 'ns per dirty page (median)', 'min', 'max', 'pages found dirty', 'note'],
        rows: rows.map((r) => [
          r.method,
          r.nsPerDirtyPage ? r.nsPerDirtyPage.median.toFixed(0) : '-',
          r.nsPerDirtyPage ? r.nsPerDirtyPage.min.toFixed(0) : '-',
          r.nsPerDirtyPage ? r.nsPerDirtyPage.max.toFixed(0) : '-',
          r.found,
          r.skipped ? `not measured: ${r.skipped}` : `of ${pages / 4} written`,
        ]),
      };
      const measured = rows.filter((r) => r.nsPerDirtyPage);
      const written = writeReport(path.resolve(o.out), `dirty-${stamp}`, env, rows, [
        {
          title: 'Dirty tracking: the same writes, tracked three ways',
          text: `A quarter of ${pages} populated pages written (strided), then the dirty set collected and tracking re-armed.`,
          svg: [barChartSvg('Cost per dirty page (writes + collection + re-arming)', 'ns per page', measured.map((r) => ({ label: r.method, bars: [{ series: 'median', value: r.nsPerDirtyPage!.median, min: r.nsPerDirtyPage!.min, max: r.nsPerDirtyPage!.max }] })))],
          table,
        },
      ]);
      files.push(written.json, written.html);
      summary.push(`dirty tracking (kernel ${env.kernel}, ${env.cpu}, node ${env.node}, page ${env.pageSize} B)`);
      summary.push(textTable(table));
    }
    if (suite === 'pager') {
      const r = await runPagerSuite({ size: o.size, reps: o.reps, dir: o.dir, quick: o.quick, cells: o.cells, writeback: o.writeback, spinUs: o.spinUs, cTracksDirty: o.cTracksDirty, quiet: o.quiet, out: o.out, stamp, version: o.version });
      files.push(...r.files);
      summary.push(r.summary);
    }
  }
  return { files, ok, summary: summary.join('\n') };
}
