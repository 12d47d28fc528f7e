// The environment every benchmark result carries: numbers without it cannot be compared.
import os from 'node:os';
import { probe } from '../probe.js';
import { native } from '../native.js';

/** The environment every report records: numbers without it cannot be compared. */
export interface BenchEnv {
  date: string;
  kernel: string;
  machine: string;
  cpu: string;
  cpus: number;
  node: string;
  pageSize: number;
  thp: string | null;
  filesystems: { path: string; type: string }[];
  affinity: number[];
  pinned: boolean;
  pagemirror: string;
}

/** Probes the environment now (kernel, CPU, Node, page size, THP, file systems, affinity). */
export function benchEnv(pinned: boolean, version: string): BenchEnv {
  const p = probe();
  return {
    date: new Date().toISOString(),
    kernel: p.kernel.release,
    machine: p.kernel.machine,
    cpu: os.cpus()[0]?.model ?? 'unknown',
    cpus: os.cpus().length,
    node: process.version,
    pageSize: p.pageSize,
    thp: p.thp.enabled,
    filesystems: p.filesystems.map((f) => ({ path: f.path, type: f.type })),
    affinity: native.getAffinity(),
    pinned,
    pagemirror: version,
  };
}
