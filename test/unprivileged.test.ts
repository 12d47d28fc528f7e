// Users are often not root: with vm.unprivileged_userfaultfd=0 and /dev/userfaultfd not theirs,
// the library must still work (user-mode-only) or fail with a message that says what to do.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { P } from './helpers.js';

const fixture = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'unprivileged.mjs');
const NOBODY = 65534;

describe('unprivileged users', () => {
  it('as uid nobody: a user-mode-only userfaultfd that serves real faults; EVENT_FORK refused clearly', (ctx) => {
    if (P.euid !== 0) ctx.skip('needs root to start a child as uid nobody (this run is already unprivileged)');
    if (P.sysctl.unprivilegedUserfaultfd !== '0')
      ctx.skip(`vm.unprivileged_userfaultfd=${P.sysctl.unprivilegedUserfaultfd}: the restricted case does not arise here`);
    const r = spawnSync(process.execPath, [fixture], { uid: NOBODY, gid: NOBODY, encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.probe.euid).toBe(NOBODY);
    expect(out.error).toBeUndefined();
    expect(out.userModeOnly).toBe(true);
    expect(out.faults).toBe(4);
    expect(out.ops).toBe(4);
    expect(out.probe.uffd.ok).toBe(true);
    expect(out.probe.uffd.reason).toMatch(/user-mode-only/);
    // Events need CAP_SYS_PTRACE with a user-mode-only descriptor: a typed error, and the probe says so.
    expect(out.eventFork.code).toBe('EPERM');
    expect(out.eventFork.message).toMatch(/CAP_SYS_PTRACE/);
    expect(out.probe.events.ok).toBe(false);
    // File strategies work for the file's owner: CPU faults on tmpfs pull device pages back, leases.
    for (const s of ['copy', 'bounce']) expect(out.files[s], s).toEqual({ mismatches: 0, pulledBack: 8, lease: true });
  });
});
