#!/usr/bin/env node
// pagemirror command line: probe, demo (the README's main job), bench (the benchmark suites).
import { probe, formatProbe } from './probe.js';

const USAGE = `usage: pagemirror <command> [options]

commands:
  probe [--json]     what this kernel offers: userfaultfd features and ioctls per memory kind,
                     THP/hugetlb, PAGEMAP_SCAN, cachestat, tmpfs/ext4/DAX, and what can run here
  demo [--json]      real faults on built-in defaults (anonymous memory, memfd): each fault kind
                     resolved by the native fast path and by a TypeScript batch handler, timed
                     against the plain C baseline
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
      return runDemo({ json });
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
