// `pagemirror replay`: one trace replayed under each device policy asked for (a fresh device and
// mirror for each, so the counts are comparable and reproducible), printed as a table and, when
// asked, written as a JSON + HTML report (lib/bench/report.ts).
import path from 'node:path';
import { Device, type DeviceOptions } from './device.js';
import { mapAnonymous } from './mapping.js';
import { readTrace } from './trace.js';
import { replayLayout, type ReplayOptions, type ReplayResult } from './replay.js';
import { barChartSvg, textTable, writeReport, type Table } from './bench/report.js';
import { benchEnv } from './bench/env.js';

/** One policy (device options) and what its replay counted. */
export interface ReplayRow {
  policy: string;
  device: DeviceOptions;
  result: ReplayResult;
}

/** The policy without its link: rows that differ only by link are one group in the modeled-time chart. */
function policyLabel(d: DeviceOptions): string {
  const kib = (b: number | undefined) => (b === undefined ? '64M' : b % 2 ** 20 === 0 ? `${b / 2 ** 20}M` : `${b / 1024}K`);
  return [`mem ${kib(d.memory)}`, d.placement ?? 'host', `evict ${d.eviction ?? 'off'}`, `prefetch ${d.prefetch ?? 'off'}`, ...(d.faultAround ? [`around ${kib(d.faultAround)}`] : []), ...(d.faultBatch ? [`batch ${d.faultBatch}`] : [])].join(', ');
}

function linkLabel(d: DeviceOptions): string | undefined {
  return d.link === undefined ? undefined : typeof d.link === 'string' ? d.link : 'custom link';
}

function label(d: DeviceOptions): string {
  const link = linkLabel(d);
  return link === undefined ? policyLabel(d) : `${policyLabel(d)}, link ${link}`;
}

/** Replays the trace under each policy in turn. */
export async function replayPolicies(tracePath: string, policies: DeviceOptions[], options: ReplayOptions, progress?: (line: string) => void): Promise<{ trace: Awaited<ReturnType<typeof readTrace>>; rows: ReplayRow[] }> {
  const trace = await readTrace(tracePath);
  // The mirror covers what is replayed: one range, or all of them one after another.
  const bytes = replayLayout(trace, options.range ?? 'all').reduce((n, l) => n + l.pages, 0) * trace.header.pageSize;
  const rows: ReplayRow[] = [];
  for (const device of policies) {
    const policy = label(device);
    progress?.(`replaying under ${policy}`);
    const dev = Device.create(device);
    const m = mapAnonymous(bytes, { noReserve: true });
    try {
      rows.push({ policy, device, result: await dev.mirror(m).replay(trace, options) });
    } finally {
      dev.close();
      m.close();
    }
  }
  return { trace, rows };
}

const ms = (ns: number | undefined) => (ns === undefined ? '-' : (ns / 1e6).toFixed(2));

/** The counters of each policy, one row each. */
export function replayTable(rows: ReplayRow[]): Table {
  return {
    columns: ['policy', 'accesses', 'misses', 'device faults', 'fault rounds', 'faulted pages', 'to device', 'to host', 'evictions', 'prefetched', 'host ms', 'modeled device ms'],
    rows: rows.map(({ policy, result: r }) => [
      policy,
      r.accesses,
      r.misses,
      r.deviceFaults,
      r.faultRounds,
      r.faultedPages,
      Object.values(r.toDevice).reduce((a, b) => a + b, 0),
      Object.values(r.toHost).reduce((a, b) => a + b, 0),
      r.evictions,
      r.prefetchedPages,
      ms(r.hostNs),
      ms(r.modeledNs),
    ]),
  };
}

/** The table as text, then the JSON + HTML report in `out` when given (files listed). */
export function reportReplay(tracePath: string, trace: Awaited<ReturnType<typeof readTrace>>, rows: ReplayRow[], out: string | undefined, version: string): { text: string; files: string[] } {
  const table = replayTable(rows);
  const s = trace.summary;
  const text = `${tracePath}: ${s.faults} faults (${s.writes} writes), ${s.samples} samples, ${s.threads.length} threads, sampling ${trace.header.sampling.method}\n\n${textTable(table)}\n`;
  if (out === undefined) return { text, files: [] };
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const groups = rows.map((r) => ({
    label: r.policy,
    bars: [
      { series: 'device faults', value: r.result.deviceFaults },
      { series: 'fault rounds', value: r.result.faultRounds },
      { series: 'pages to device', value: Object.values(r.result.toDevice).reduce((a, b) => a + b, 0) },
      { series: 'evictions', value: r.result.evictions },
      { series: 'prefetched', value: r.result.prefetchedPages },
    ],
  }));
  // Modeled device time: one group per policy, one bar per link, side by side.
  const links = [...new Set(rows.map((r) => linkLabel(r.device)).filter((l): l is string => l !== undefined))];
  const modeled = new Map<string, { series: string; value: number }[]>();
  for (const r of rows) {
    const link = linkLabel(r.device);
    if (link === undefined || r.result.modeledNs === undefined) continue;
    const key = policyLabel(r.device);
    modeled.set(key, [...(modeled.get(key) ?? []), { series: link, value: r.result.modeledNs / 1e6 }]);
  }
  const svg = [barChartSvg('What each policy did', 'pages or events', groups)];
  if (modeled.size) svg.push(barChartSvg(`Modeled device time by policy and link (${links.join(', ')})`, 'modeled ms', [...modeled].map(([label, bars]) => ({ label, bars }))));
  const written = writeReport(path.resolve(out), `replay-${stamp}`, benchEnv(false, version), { trace: { path: tracePath, header: trace.header, ranges: trace.ranges, summary: s }, rows }, [
    {
      title: `Replay of ${path.basename(tracePath)}`,
      text: `${s.faults} recorded faults and ${s.samples} samples, replayed in trace order under each policy on a fresh device (counts, and modeled device time, are deterministic for a trace and its options; host time is not). ${links.length ? `Modeled device time under ${links.join(', ')} (docs/link-model.md): the fault rounds that served the replay, with their migrations, and each step's slowest device thread's accesses to host memory.` : 'Modeled device time needs a link: --link PRESET.'}`,
      svg,
      table,
    },
  ]);
  return { text, files: [written.json, written.html] };
}
