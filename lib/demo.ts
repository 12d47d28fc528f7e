// `pagemirror demo` (npm start): the main job on built-in defaults. It needs no set-up: anonymous
// memory and a memfd on this machine's tmpfs. It prints what the kernel offers, then measures each
// fault kind through the native fast path and a TypeScript batch handler, and the engine (a device
// streaming through memory it faults in, migrations, CPU faults on device memory), each against the
// plain C baseline in the same run; then the four file strategies over four workloads on memfd,
// tmpfs and a file in the OS temp dir, and bounce-page writeback against plain pwrite. Reports
// (JSON + HTML with plots) go under ./results.
import { probe, formatProbe } from './probe.js';
import { runBench } from './bench/cli.js';

export async function runDemo(o: { json: boolean; version: string }): Promise<number> {
  const p = probe();
  if (!o.json) process.stdout.write(formatProbe(p) + '\n\n');
  if (!p.experiments.uffd.ok) {
    process.stderr.write(`pagemirror: userfaultfd is not available here, so no fault can be measured: ${p.experiments.uffd.reason}\n`);
    return 1;
  }
  const r = await runBench({ suites: ['faults', 'engine', 'strategies'], out: 'results', pages: 4096, reps: 5, size: 128 << 20, pin: true, quiet: o.json, version: o.version });
  process.stdout.write(o.json ? JSON.stringify({ files: r.files, ok: r.ok }) + '\n' : r.summary + '\n\nreport:\n' + r.files.map((f) => '  ' + f).join('\n') + '\n');
  return 0;
}
