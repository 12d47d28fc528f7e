// The plain C baseline (bench/c/uffd_baseline.c, built by node-gyp next to the addon), run in the
// same benchmark run as the addon and under the same CPU pinning.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface BaselineResult {
  scenario: string;
  pages?: number;
  reps?: number;
  samplesNsPerPage?: number[];
  medianNsPerPage?: number;
  skipped?: string;
}

export function baselinePath(): string {
  for (const p of [path.join(root, 'build', 'Release', 'uffd_baseline'), path.join(root, 'build', 'Debug', 'uffd_baseline')])
    if (fs.existsSync(p)) return p;
  throw Object.assign(new Error('the C baseline is not built (build/Release/uffd_baseline): run npm install'), {
    code: 'ERR_PAGEMIRROR_NOT_BUILT',
  });
}

export function runBaseline(
  scenario: string,
  opts: { pages: number; reps: number; threads?: number; cpu?: number },
): Promise<BaselineResult> {
  const args = [scenario, '--pages', String(opts.pages), '--reps', String(opts.reps)];
  if (opts.threads) args.push('--threads', String(opts.threads));
  let cmd = baselinePath();
  if (opts.cpu !== undefined) {
    args.unshift('-c', String(opts.cpu), cmd);
    cmd = 'taskset';
  }
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: 120_000, maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      if (err) return reject(Object.assign(new Error(`C baseline ${scenario} failed: ${stderr || err.message}`), { code: 'ERR_PAGEMIRROR_BASELINE' }));
      try {
        resolve(JSON.parse(stdout) as BaselineResult);
      } catch {
        reject(new Error(`C baseline ${scenario} printed no JSON: ${stdout.slice(0, 200)}`));
      }
    });
  });
}
