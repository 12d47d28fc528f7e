// The plain C baseline (bench/c/uffd_baseline.c, built by node-gyp next to the addon or shipped
// prebuilt with it), run in the same benchmark run as the addon and under the same CPU pinning.
import { execFile } from 'node:child_process';
import { helperPath } from '../addon-path.js';

export interface BaselineResult {
  scenario: string;
  pages?: number;
  reps?: number;
  samplesNsPerPage?: number[];
  medianNsPerPage?: number;
  skipped?: string;
}

export function runBaseline(
  scenario: string,
  opts: { pages: number; reps: number; threads?: number; cpu?: number },
): Promise<BaselineResult> {
  const args = [scenario, '--pages', String(opts.pages), '--reps', String(opts.reps)];
  if (opts.threads) args.push('--threads', String(opts.threads));
  let cmd = helperPath('uffd_baseline');
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
