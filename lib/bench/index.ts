/**
 * The benchmark harness (`pagemirror/bench`): run any built-in suite programmatically, or define
 * a custom experiment over your own axes and get the same JSON and HTML report.
 *
 * @example
 * ```ts
 * import { runBench, runStrategies } from 'pagemirror/bench';
 * // Every report of one suite, as `pagemirror bench strategies --quick` writes them:
 * await runBench({ suites: ['strategies'], out: 'results', quick: true, version: '0.1.0' });
 * // Or the numbers only, with the suite's own options:
 * const { rows } = await runStrategies({ pages: 256, reps: 3, quiet: true });
 * ```
 *
 * @packageDocumentation
 * @module pagemirror/bench
 */
export { runBench, SUITES, SUITE_TEXT } from './cli.js';
export type { BenchOptions, Suite } from './cli.js';
export { defineExperiment, runExperiment, cells } from './experiment.js';
export type { Axes, Cell, Metrics, MetricSpec, ExperimentDefinition, ExperimentOptions, CellResult, ExperimentResult } from './experiment.js';
export { runFaults } from './faults.js';
export type { FaultsOptions, Comparison } from './faults.js';
export { runEngine } from './engine.js';
export type { EngineOptions as EngineBenchOptions, EngineRow } from './engine.js';
export { runBatching, runOversubscription, runDirtyTracking } from './policies.js';
export type { BatchingPoint, OversubPoint, DirtyRow } from './policies.js';
export { runStrategies, defaultPlaces, STRATEGY_NAMES, WORKLOADS } from './strategies.js';
export type { Place, StrategyRow, StrategiesResult, Workload, WritebackRow as StrategiesWritebackRow } from './strategies.js';
export { runService } from './service.js';
export type { ServiceOptions, ServiceRow } from './service.js';
export { runPager, PAGER_WORKLOADS } from './pager.js';
export type { PagerBenchOptions, PagerCell, PagerWorkload, WritebackRow as PagerWritebackRow } from './pager.js';
export { benchEnv } from './env.js';
export type { BenchEnv } from './env.js';
export { Progress } from './progress.js';
export { writeReport, barChartSvg, lineChartSvg, htmlTable, textTable } from './report.js';
export type { Bar, BarGroup, ChartOptions, Section, Series, Table } from './report.js';
export { summarize, quantile, percentiles } from './stats.js';
export type { Summary } from './stats.js';
