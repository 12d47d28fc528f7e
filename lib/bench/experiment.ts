// Custom experiments: a typed cartesian product of axes, measured with repetitions, alternated
// against a baseline in the same run (ratios of medians, the project's rule), reported like the
// built-in suites (JSON with every sample, HTML with a table and charts).
import { benchEnv } from './env.js';
import { Progress } from './progress.js';
import { barChartSvg, seriesColors, writeReport, type BarGroup, type Section, type Table } from './report.js';
import { summarize, type Summary } from './stats.js';
import fs from 'node:fs';
import { checkOneOf, rangeError, typeError } from '../errors.js';
import { checkBoolean, checkFunction, checkNumber, checkOptions, checkString } from '../validate.js';

function packageVersion(): string {
  try {
    return (JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

/** The axes of an experiment: each a name and the values it takes. */
export type Axes = Record<string, readonly (string | number | boolean)[]>;

/** One point of the cartesian product of `A`: a value for every axis. */
export type Cell<A extends Axes> = { [K in keyof A]: A[K][number] };

/** What one run of a cell measured: metric name to number (the unit goes in {@link MetricSpec}). */
export type Metrics = Record<string, number>;

/** How to read and judge one metric. */
export interface MetricSpec {
  /** Shown after the numbers and on the chart's axis. @default '' */
  unit?: string;
  /** Whether a smaller value is the better one (latency) or a larger one (bandwidth). @default 'lower' */
  better?: 'lower' | 'higher';
  /**
   * The ratio to the baseline a cell must reach: at most this when `better` is 'lower', at least
   * this when 'higher'. Drawn as the target line of the ratio chart; a cell that misses it gets a
   * FAIL verdict. Needs {@link ExperimentDefinition.baseline}.
   */
  target?: number;
}

/** A custom experiment, made by {@link defineExperiment} and run by {@link runExperiment}. */
export interface ExperimentDefinition<A extends Axes> {
  /** The report's name: `<out>/<name>.json` and `.html`. Letters, digits, `-`, `_` and `.`. */
  name: string;
  /** A paragraph at the top of the report: what is measured and why. */
  description?: string;
  /** The axes; every combination of their values is a cell. Each axis needs at least one value. */
  axes: A;
  /** Measurements per cell; the report shows their median, min and max. @default 5 */
  reps?: number;
  /**
   * The axis values of the baseline a cell is compared with, e.g. `{ strategy: 'copy' }`: the cell
   * with these values and the cell's own values on the other axes. In each repetition the
   * baseline runs right before the cells compared with it, so both see the same machine state;
   * the ratio is the median of the per-repetition ratios.
   */
  baseline?: Partial<Cell<A>>;
  /** Units, direction and targets of the metrics `run` returns (a metric not listed: no unit, lower is better). */
  metrics?: Record<string, MetricSpec>;
  /** Called once before the first run (e.g. to create files), awaited. */
  setup?: () => void | Promise<void>;
  /** Called once after the last run, also when a run throws (e.g. to remove files). */
  teardown?: () => void | Promise<void>;
  /** Measures one cell once. Must return the same metric names for every cell. */
  run(cell: Cell<A>, rep: number): Promise<Metrics> | Metrics;
}

/** Options of {@link runExperiment}. */
export interface ExperimentOptions {
  /** The directory the JSON and HTML report go to (created). @default './results' */
  out?: string;
  /** No progress line on stderr. @default false */
  quiet?: boolean;
  /** The version recorded in the report's environment. @default the version in pagemirror's package.json */
  version?: string;
}

/** One cell's results. */
export interface CellResult<A extends Axes> {
  /** The cell's value on every axis. */
  cell: Cell<A>;
  /** Every sample, by metric, in repetition order. */
  samples: Record<string, number[]>;
  /** Per metric: median, min, max and mean of the samples. */
  summary: Record<string, Summary>;
  /** With a baseline, per metric: the per-repetition ratios cell / baseline, summarized. Absent for the baseline cells themselves. */
  ratio?: Record<string, Summary>;
  /** With targets: 'pass' or 'FAIL' per metric that has a target. */
  verdict?: Record<string, 'pass' | 'FAIL'>;
}

/** What {@link runExperiment} returns. */
export interface ExperimentResult<A extends Axes> {
  /** The experiment's name (the report's file name). */
  name: string;
  /** Every cell's results, in the order of {@link cells} (the first axis varying slowest). */
  cells: CellResult<A>[];
  /** The report files written. */
  files: { json: string; html: string };
  /** False when a cell missed a target. */
  ok: boolean;
}

const NAME = /^[A-Za-z0-9._-]+$/;

/**
 * Checks an experiment's definition and returns it, typed: the cells `run` receives are checked
 * against the axes at compile time.
 *
 * @throws {TypeError} `ERR_INVALID_ARG_TYPE` when `run` is not a function, `axes` not an object, or an
 *   option has the wrong type; `ERR_INVALID_ARG_VALUE` for a `better` other than 'lower' or 'higher'.
 * @throws {RangeError} `ERR_OUT_OF_RANGE` for a target that is not a positive number.
 * @throws {RangeError} `ERR_PAGEMIRROR_BAD_EXPERIMENT` when the name is not a file name, an axis has
 *   no values, `reps` is not a positive integer, or `baseline` names an unknown axis or value.
 * @example
 * ```ts
 * import { defineExperiment, runExperiment } from 'pagemirror/bench';
 * const exp = defineExperiment({
 *   name: 'sleep-vs-spin',
 *   axes: { how: ['sleep', 'spin'], us: [10, 100] },
 *   baseline: { how: 'sleep' },
 *   metrics: { time: { unit: 'us', target: 1.1 } },
 *   async run({ how, us }) {
 *     const t0 = performance.now();
 *     if (how === 'sleep') await new Promise((r) => setTimeout(r, us / 1000));
 *     else while (performance.now() - t0 < us / 1000);
 *     return { time: (performance.now() - t0) * 1000 };
 *   },
 * });
 * const { files } = await runExperiment(exp, { out: 'results', quiet: true });
 * ```
 */
export function defineExperiment<const A extends Axes>(def: ExperimentDefinition<A>): ExperimentDefinition<A> {
  if (typeof def !== 'object' || def === null || typeof def.run !== 'function' || typeof def.axes !== 'object' || def.axes === null) {
    throw typeError('ERR_INVALID_ARG_TYPE', 'an experiment needs axes (an object) and run (a function)');
  }
  if (typeof def.name !== 'string' || !NAME.test(def.name)) {
    throw rangeError('ERR_PAGEMIRROR_BAD_EXPERIMENT', `experiment name ${JSON.stringify(def.name)} must be a file name (letters, digits, '-', '_', '.')`);
  }
  for (const [k, v] of Object.entries(def.axes)) {
    if (!Array.isArray(v) || v.length === 0) throw rangeError('ERR_PAGEMIRROR_BAD_EXPERIMENT', `axis '${k}' needs at least one value`);
  }
  if (def.reps !== undefined && !(Number.isInteger(def.reps) && def.reps >= 1)) {
    throw rangeError('ERR_PAGEMIRROR_BAD_EXPERIMENT', `reps must be a positive integer, got ${String(def.reps)}`);
  }
  checkFunction('setup', def.setup);
  checkFunction('teardown', def.teardown);
  for (const [k, m] of Object.entries(checkOptions('metrics', def.metrics))) {
    checkOptions(`metrics.${k}`, m);
    if (m.unit !== undefined) checkString(`metrics.${k}.unit`, m.unit);
    if (m.better !== undefined) checkOneOf(`metrics.${k}.better`, m.better, ['lower', 'higher'] as const);
    if (m.target !== undefined) checkNumber(`metrics.${k}.target`, m.target, Number.MIN_VALUE, Number.MAX_VALUE);
  }
  for (const [k, v] of Object.entries(checkOptions('baseline', def.baseline))) {
    const values = def.axes[k];
    if (!values || !values.includes(v as never)) {
      throw rangeError('ERR_PAGEMIRROR_BAD_EXPERIMENT', `baseline ${k}=${JSON.stringify(v)} is not a value of an axis of the experiment`);
    }
  }
  return def;
}

/** Every combination of the axes' values, the first axis varying slowest. */
export function cells<A extends Axes>(axes: A): Cell<A>[] {
  let out: Record<string, unknown>[] = [{}];
  for (const [k, values] of Object.entries(axes)) out = out.flatMap((c) => values.map((v) => ({ ...c, [k]: v })));
  return out as Cell<A>[];
}

const key = (c: object): string => JSON.stringify(c);
const label = (c: object, skip: string[] = []): string =>
  Object.entries(c)
    .filter(([k]) => !skip.includes(k))
    .map(([, v]) => String(v))
    .join(' ') || 'all';

/**
 * Runs every cell of `exp` `reps` times (each repetition goes once over all cells, each baseline
 * right before the cells compared with it), shows progress on stderr, records the environment and
 * writes `<out>/<name>.json` (every sample) and `<out>/<name>.html` (a table with every median,
 * min, max and ratio; a chart per metric; with a baseline, a ratio chart with its target line per
 * metric that has a target).
 *
 * @throws what {@link defineExperiment} throws, and `ERR_INVALID_ARG_TYPE` for options of the wrong
 *   type, before anything runs.
 * @throws whatever `run`, `setup` or `teardown` throws (teardown still runs); `ERR_PAGEMIRROR_BAD_EXPERIMENT`
 *   when `run` returns something other than an object of finite numbers, or other metrics than the first run.
 */
export async function runExperiment<A extends Axes>(exp: ExperimentDefinition<A>, options: ExperimentOptions = {}): Promise<ExperimentResult<A>> {
  defineExperiment(exp);
  options = checkOptions('options', options);
  const out = options.out === undefined ? 'results' : checkString('options.out', options.out);
  const quiet = checkBoolean('options.quiet', options.quiet, false);
  const version = options.version === undefined ? packageVersion() : checkString('options.version', options.version);
  const reps = exp.reps ?? 5;
  const all = cells(exp.axes);
  const base = exp.baseline && Object.keys(exp.baseline).length > 0 ? exp.baseline : undefined;
  const baseOf = (c: Cell<A>): Cell<A> | undefined => (base ? { ...c, ...base } : undefined);
  // Each baseline first, then the cells compared with it: the order of one repetition.
  const order: Cell<A>[] = [];
  const seen = new Set<string>();
  for (const c of all) {
    const b = baseOf(c);
    for (const x of b ? [b, c] : [c]) if (!seen.has(key(x)) && seen.add(key(x))) order.push(x);
  }
  const samples = new Map<string, Record<string, number[]>>(order.map((c) => [key(c), {}]));
  let names: string[] | undefined;
  const progress = new Progress(order.length * reps, exp.name, quiet);
  await exp.setup?.();
  try {
    for (let rep = 0; rep < reps; rep++) {
      for (const c of order) {
        const m = await exp.run(c, rep);
        const got = typeof m === 'object' && m !== null ? Object.keys(m).sort() : [];
        if (got.length === 0 || got.some((k) => !Number.isFinite(m[k]))) {
          throw rangeError('ERR_PAGEMIRROR_BAD_EXPERIMENT', `run(${label(c)}) must return an object of finite numbers, got ${JSON.stringify(m)}`);
        }
        names ??= got;
        if (key(got) !== key(names)) throw rangeError('ERR_PAGEMIRROR_BAD_EXPERIMENT', `run(${label(c)}) returned metrics ${got.join(', ')}, the first run ${names.join(', ')}`);
        const s = samples.get(key(c))!;
        for (const k of got) (s[k] ??= []).push(m[k]!);
        progress.step(label(c));
      }
    }
  } finally {
    progress.end();
    await exp.teardown?.();
  }
  const metricNames = names ?? [];
  const spec = (k: string): MetricSpec => exp.metrics?.[k] ?? {};
  let ok = true;
  const results: CellResult<A>[] = all.map((c) => {
    const s = samples.get(key(c))!;
    const r: CellResult<A> = { cell: c, samples: s, summary: Object.fromEntries(metricNames.map((k) => [k, summarize(s[k]!)])) };
    const b = baseOf(c);
    if (b && key(b) !== key(c)) {
      const bs = samples.get(key(b))!;
      r.ratio = Object.fromEntries(metricNames.map((k) => [k, summarize(s[k]!.map((v, i) => v / bs[k]![i]!))]));
      const judged = metricNames.filter((k) => spec(k).target !== undefined);
      if (judged.length) {
        r.verdict = Object.fromEntries(
          judged.map((k) => {
            const { target, better = 'lower' } = spec(k);
            const med = r.ratio![k]!.median;
            const pass = better === 'lower' ? med <= target! : med >= target!;
            ok &&= pass;
            return [k, pass ? 'pass' : 'FAIL'];
          }),
        );
      }
    }
    return r;
  });
  const sections = reportSections(exp, results, metricNames, spec);
  const files = writeReport(out, exp.name, benchEnv(false, version), { name: exp.name, axes: exp.axes, reps, baseline: base ?? null, metrics: exp.metrics ?? {}, cells: results }, sections);
  return { name: exp.name, cells: results, files, ok };
}

function reportSections<A extends Axes>(exp: ExperimentDefinition<A>, results: CellResult<A>[], metricNames: string[], spec: (k: string) => MetricSpec): Section[] {
  const axisNames = Object.keys(exp.axes);
  const withRatio = exp.baseline !== undefined && Object.keys(exp.baseline).length > 0;
  const unit = (k: string) => (spec(k).unit ? ` (${spec(k).unit})` : '');
  const table: Table = {
    columns: [
      ...axisNames,
      ...metricNames.flatMap((k) => [`${k}${unit(k)} median`, 'min', 'max', ...(withRatio ? ['ratio', 'target', 'verdict'] : [])]),
    ],
    rows: results.map((r) => [
      ...axisNames.map((a) => String(r.cell[a])),
      ...metricNames.flatMap((k) => {
        const s = r.summary[k]!;
        const cols: (string | number)[] = [s.median.toFixed(2), s.min.toFixed(2), s.max.toFixed(2)];
        if (withRatio) {
          const t = spec(k).target;
          const sign = (spec(k).better ?? 'lower') === 'lower' ? '<=' : '>=';
          cols.push(r.ratio ? `${r.ratio[k]!.median.toFixed(2)}x` : 'baseline', t === undefined ? '-' : `${sign} ${t}x`, r.verdict?.[k] ?? '-');
        }
        return cols;
      }),
    ]),
  };
  // Bars: the last axis with more than one value gives the series (colours), the other axes the groups.
  const seriesAxis = [...axisNames].reverse().find((a) => exp.axes[a]!.length > 1) ?? axisNames[axisNames.length - 1]!;
  const groupsOf = (value: (r: CellResult<A>) => { value: number; min: number; max: number } | undefined, target?: number): BarGroup[] => {
    const groups = new Map<string, BarGroup>();
    for (const r of results) {
      const v = value(r);
      if (!v) continue;
      const g = label(r.cell, [seriesAxis]);
      if (!groups.has(g)) groups.set(g, { label: g, bars: [], ...(target !== undefined ? { target } : {}) });
      groups.get(g)!.bars.push({ series: String(r.cell[seriesAxis]), ...v });
    }
    return [...groups.values()];
  };
  // One colour per value of the series axis in every chart, also where a ratio chart lacks the baseline's value.
  const colors = { colors: Object.fromEntries(seriesColors(exp.axes[seriesAxis]!.map(String))) };
  const svg: string[] = [];
  for (const k of metricNames) {
    svg.push(barChartSvg(`${exp.name}: ${k} (median, min-max)`, spec(k).unit || k, groupsOf((r) => ({ value: r.summary[k]!.median, min: r.summary[k]!.min, max: r.summary[k]!.max })), colors));
    // A ratio chart only where a target says what the ratio should be (its line); the table has every ratio.
    if (withRatio && spec(k).target !== undefined) {
      const groups = groupsOf((r) => (r.ratio ? { value: r.ratio[k]!.median, min: r.ratio[k]!.min, max: r.ratio[k]!.max } : undefined), spec(k).target);
      if (groups.length) svg.push(barChartSvg(`${exp.name}: ${k} ratio to the baseline (${label(exp.baseline!)})`, 'x', groups, colors));
    }
  }
  const reps = exp.reps ?? 5;
  return [
    {
      title: exp.name,
      text: `${exp.description ? exp.description + ' ' : ''}${results.length} cells x ${reps} repetitions; medians with min and max${withRatio ? `; ratios are the median of per-repetition ratios against the baseline (${label(exp.baseline!)}), measured in the same repetition right before` : ''}.`,
      svg,
      table,
    },
  ];
}
