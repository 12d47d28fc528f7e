// Synchronous calls that fault pages in on the JavaScript thread, over memory a JavaScript handler
// serves: each once slept for good (its fault could be resolved only by the thread it stopped).
// They must refuse at once with ERR_PAGEMIRROR_WOULD_FAULT, and go through once the range was
// faulted in on a native thread (Mapping.populate()). Each runs in a child process, killed if it
// hangs.
import { describe, it, expect } from 'vitest';
import { P, requireCap, runFixture } from './helpers.js';

// dist/ (which the fixture imports) is compiled once per run by test/global-setup.ts.
function run(what: string, populated: boolean) {
  const res = runFixture('js-thread-faults.mjs', [what, ...(populated ? ['populated'] : [])]);
  if (res.signal) throw new Error(`${what}: the child was killed by ${res.signal} (hung on the JavaScript thread?); stderr: ${res.stderr}`);
  expect(res.status, res.stderr).toBe(0);
  return JSON.parse(res.stdout.trim().split('\n').at(-1)!) as Record<string, unknown>;
}

const CASES = ['pin', 'pin-wp', 'pin-file', 'advise-populate-read', 'advise-populate-write', 'copy-source'];

describe('no synchronous call faults on the JavaScript thread over memory JavaScript serves', () => {
  for (const what of CASES) {
    it(`${what}: refused at once with ERR_PAGEMIRROR_WOULD_FAULT`, { timeout: 20_000 }, (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      if (what === 'pin-wp') requireCap(ctx, P.experiments.wp, 'userfaultfd write protection');
      const out = run(what, false);
      expect(out).toMatchObject({ ok: false, code: 'ERR_PAGEMIRROR_WOULD_FAULT', faults: 0 });
      expect(out.message).toMatch(/populate\(/);
    });

    it(`${what}: goes through after await mapping.populate({ write: true })`, { timeout: 20_000 }, (ctx) => {
      requireCap(ctx, P.experiments.uffd, 'userfaultfd');
      // A user-mode-only descriptor fails faults raised inside the kernel (a populate's) with EFAULT.
      if (what === 'pin-wp') requireCap(ctx, P.experiments.wp, 'userfaultfd write protection');
      if (P.uffd.userModeOnly) ctx.skip('user-mode-only userfaultfd: a populate of registered memory is EFAULT, not served');
      const out = run(what, true);
      expect(out).toMatchObject({ ok: true, faults: 4 });
      if (what.startsWith('pin')) expect(out.pinned).toBe(true);
    });
  }
});
