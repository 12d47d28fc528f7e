// UFFDIO_UNREGISTER racing a fault, with nobody reading the descriptor (a fault server's client
// taking over after the server died): since Linux 6.6 a userfault can be taken under the per-VMA
// lock, and UNREGISTER's own wake runs before it write-locks the VMA, so the faulting thread can
// queue after the wake and sleep for good. sys::uffd_unregister (and the C client library) wake
// the range once UNREGISTER returned. The fixture measures both in one run: the bare ioctl as the
// control (it shows whether this kernel has the race at all), the wrapper as the subject.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { FIXTURES_DIR, P, requireCap } from './helpers.js';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const ITERATIONS = 20_000; // half of them each way: the bare ioctl strands 2-4 in 10,000 here

function build(ctx: { skip: (note?: string) => void }): string {
  const exe = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'pm-unreg-')), 'unregister-race');
  const sys = ['uffd', 'mem', 'pagemap'].map((f) => path.join(ROOT, 'native', 'sys', `${f}.cc`));
  const r = spawnSync('g++', ['-O2', '-std=c++17', '-pthread', `-I${path.join(ROOT, 'native')}`, '-o', exe, path.join(FIXTURES_DIR, 'unregister-race.cc'), ...sys], { encoding: 'utf8', timeout: 120_000 });
  if (r.error || r.status !== 0) ctx.skip(`cannot compile with the system g++: ${r.error?.message ?? r.stderr.split('\n')[0]}`);
  return exe;
}

function run(exe: string, args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(exe, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const t = setTimeout(() => child.kill('SIGKILL'), 100_000);
    child.on('error', reject);
    child.on('close', (status) => {
      clearTimeout(t);
      resolve({ status, stdout, stderr });
    });
  });
}

describe('UFFDIO_UNREGISTER racing a fault nobody reads', () => {
  for (const [name, shared, wp] of [['private anonymous memory, MISSING', '0', '0'], ['shared memory (a memfd), MISSING | WP', '1', '1']] as const) {
    it(`${name}: no thread stays asleep once sys::uffd_unregister returned`, { timeout: 150_000 }, async (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      if (shared === '1') requireCap(ctx, P.experiments.fileCpuFaults, 'userfaultfd on shared memory');
      const exe = build(ctx);
      const r = await run(exe, [String(ITERATIONS), shared, wp]);
      expect(r.status, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout) as { iterations: number; bare: number; wrapper: number };
      if (out.bare === 0) console.info(`${name}: the bare ioctl stranded no thread in ${ITERATIONS / 2} either (a kernel that takes userfaults under mmap_lock only has no race)`);
      expect(out).toMatchObject({ iterations: ITERATIONS, wrapper: 0 });
    });
  }
});
