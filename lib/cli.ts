#!/usr/bin/env node
// pagemirror command line: probe, demo (the README's main job), bench (the benchmark suites).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { probe, formatProbe } from './probe.js';

function version(): string {
  const pkg = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'package.json');
  try {
    return (JSON.parse(fs.readFileSync(pkg, 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

function option(rest: string[], name: string): string | undefined {
  const i = rest.indexOf(name);
  if (i < 0) return undefined;
  const v = rest[i + 1];
  if (v === undefined || v.startsWith('--')) throw Object.assign(new Error(`${name} needs a value`), { code: 'ERR_USAGE' });
  return v;
}

function intOption(rest: string[], name: string): number | undefined {
  const v = option(rest, name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n <= 0) throw Object.assign(new Error(`${name} must be a positive integer, got ${v}`), { code: 'ERR_USAGE' });
  return n;
}

const USAGE = `usage: pagemirror <command> [options]

commands:
  probe [--json]     what this kernel offers: userfaultfd features and ioctls per memory kind,
                     THP/hugetlb, PAGEMAP_SCAN, cachestat, tmpfs/ext4/DAX, and what can run here
  demo [--json]      real faults on built-in defaults (anonymous memory, memfd): each fault kind
                     resolved by the native fast path and by a TypeScript batch handler, timed
                     against the plain C baseline
  bench [suite...]   benchmarks against the plain C baseline, in one run; writes JSON (raw
                     samples + environment) and an HTML report with SVG plots to --out
                     suites: faults, engine, batching, strategies, oversubscription, dirty, service
                     (default: all)
                     --pages N (per repetition, default 4096)  --reps N (default 7; strategies 3)
                     --size BYTES (engine bandwidth runs, default 256 MiB; batching: memory read,
                     default 64 MiB; oversubscription: device memory = size / 8, default 8 MiB)
                     --dir DIR (strategies: where the disk file goes, default the OS temp dir)
                     --out DIR (default ./results)  --no-pin (do not pin to one CPU)  --quiet
  help               this text
`;

function replacer(_k: string, v: unknown): unknown {
  return typeof v === 'bigint' ? v.toString() : v;
}

async function main(argv: string[]): Promise<number> {
  const [cmd = 'help', ...rest] = argv;
  const json = rest.includes('--json');
  switch (cmd) {
    case 'probe': {
      const p = probe();
      process.stdout.write(json ? JSON.stringify(p, replacer, 2) + '\n' : formatProbe(p) + '\n');
      return 0;
    }
    case 'demo': {
      const { runDemo } = await import('./demo.js');
      return runDemo({ json, version: version() });
    }
    case 'bench': {
      const { runBench, SUITES } = await import('./bench/cli.js');
      const valued = new Set(['--pages', '--reps', '--out', '--size', '--dir']);
      const names = rest.filter((a, i) => !a.startsWith('--') && !valued.has(rest[i - 1] ?? ''));
      for (const n of names)
        if (!(SUITES as readonly string[]).includes(n))
          throw Object.assign(new Error(`unknown suite '${n}' (suites: ${SUITES.join(', ')})`), { code: 'ERR_USAGE' });
      const r = await runBench({
        suites: (names.length ? names : [...SUITES]) as (typeof SUITES)[number][],
        out: option(rest, '--out') ?? 'results',
        pages: intOption(rest, '--pages'),
        reps: intOption(rest, '--reps'),
        size: intOption(rest, '--size'),
        pin: !rest.includes('--no-pin'),
        quiet: rest.includes('--quiet'),
        dir: option(rest, '--dir'),
        version: version(),
      });
      process.stdout.write(r.summary + '\n\nwritten:\n' + r.files.map((f) => '  ' + f).join('\n') + '\n');
      return r.ok ? 0 : 3;
    }
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return 0;
    default:
      process.stderr.write(`pagemirror: unknown command '${cmd}'\n\n${USAGE}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    const e = err as { code?: string; message?: string };
    process.stderr.write(`pagemirror: ${e.code ? e.code + ': ' : ''}${e.message ?? String(err)}\n`);
    process.exitCode = 1;
  },
);
