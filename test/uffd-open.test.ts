// Userfaultfd.open({ via }): the descriptor from /dev/userfaultfd or from userfaultfd(2), each way
// on its own, as the kernel's uffd-unit-tests run every test with both; user-mode-only on demand;
// and the typed error of a way that is not available (ENOENT, EACCES, EPERM).
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mapAnonymous, access, Userfaultfd } from '../lib/index.js';
import { P, PAGE, FIXTURES_DIR, within, requireCap, cleanupAfterEach } from './helpers.js';
import path from 'node:path';

const cleanup = cleanupAfterEach();
const fixture = path.join(FIXTURES_DIR, 'uffd-via.mjs');
const NOBODY = 65534;

describe('Userfaultfd.open({ via })', () => {
  for (const via of ['device', 'syscall'] as const) {
    for (const userModeOnly of [false, true]) {
      it(`via ${via}${userModeOnly ? ', user-mode-only' : ''}: opens that way and serves a real fault`, async (ctx) => {
        requireCap(ctx, P.uffdVia[via], `userfaultfd via ${via}`);
        const u = Userfaultfd.open({ via, userModeOnly });
        cleanup.push(() => u.close());
        expect(u.openedBy).toBe(via);
        expect(u.userModeOnly).toBe(userModeOnly);
        const m = mapAnonymous(4 * PAGE);
        cleanup.push(() => m.close());
        const src = mapAnonymous(PAGE);
        cleanup.push(() => src.close());
        src.bytes.fill(0x3c);
        u.register(m);
        const seen: number[] = [];
        u.serve({
          onFaults: (faults, uf) =>
            faults.forEach((f) => {
              seen.push(f.offset);
              uf.copy(m, f.offset, PAGE, src);
            }),
        });
        const r = await within(access(m, { op: 'read', unit: 8 }), 10_000, `read through a uffd opened via ${via}`);
        expect(r.checksum).toBe(BigInt.asUintN(64, 0x3c3c3c3c3c3c3c3cn * BigInt((4 * PAGE) / 8)));
        expect(seen.sort((a, b) => a - b)).toEqual([0, PAGE, 2 * PAGE, 3 * PAGE]);
      });
    }
  }

  it('auto (the default) is the fallback chain: the device first where it opens', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const u = Userfaultfd.open();
    cleanup.push(() => u.close());
    expect(u.openedBy).toBe(P.uffdVia.device.ok ? 'device' : 'syscall');
    const umo = Userfaultfd.open({ via: 'auto', userModeOnly: true });
    cleanup.push(() => umo.close());
    expect(umo.userModeOnly).toBe(true);
  });

  it('bad options are typed errors before anything is opened', () => {
    expect(() => Userfaultfd.open({ via: 'ioctl' as 'device' })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE', name: 'TypeError' }));
    expect(() => Userfaultfd.open({ userModeOnly: 1 as unknown as boolean })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
  });

  it('as uid nobody: the device is EACCES, the full system call EPERM, user-mode-only by syscall serves faults', (ctx) => {
    if (P.euid !== 0) ctx.skip('needs root to start a child as uid nobody (this run is already unprivileged)');
    if (P.sysctl.unprivilegedUserfaultfd !== '0')
      ctx.skip(`vm.unprivileged_userfaultfd=${P.sysctl.unprivilegedUserfaultfd}: the system call is not refused here`);
    if (!P.devUserfaultfd.exists) ctx.skip('no /dev/userfaultfd on this machine');
    if (P.devUserfaultfd.mode !== '0600') ctx.skip(`/dev/userfaultfd has mode ${P.devUserfaultfd.mode}: it may be open to nobody`);
    const r = spawnSync(process.execPath, [fixture], { uid: NOBODY, gid: NOBODY, encoding: 'utf8', timeout: 30_000 });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.euid).toBe(NOBODY);
    expect(out.device.error).toMatchObject({ code: 'EACCES', errno: -13, syscall: 'open', path: '/dev/userfaultfd' });
    expect(out.device.error.message).toMatch(/read-write access to \/dev\/userfaultfd|via 'syscall'/);
    expect(out['device+umo'].error.code).toBe('EACCES');
    expect(out.syscall.error).toMatchObject({ code: 'EPERM', errno: -1, syscall: 'userfaultfd' });
    expect(out.syscall.error.message).toMatch(/userModeOnly/);
    expect(out['syscall+umo']).toEqual({ openedBy: 'syscall', userModeOnly: true, ops: 4, faults: 4 });
    expect(out.auto).toEqual({ openedBy: 'syscall', userModeOnly: true, ops: 4, faults: 4 });
    expect(out.probe.device.ok).toBe(false);
    expect(out.probe.syscall.ok).toBe(false);
  });

  it('where /dev/userfaultfd is absent (a mount namespace without it): via device is ENOENT, the system call still works', (ctx) => {
    if (P.euid !== 0) ctx.skip('needs root to make a mount namespace');
    const probeNs = spawnSync('unshare', ['-m', 'sh', '-c', 'mount -t tmpfs none /dev && test ! -e /dev/userfaultfd'], { encoding: 'utf8', timeout: 10_000 });
    if (probeNs.status !== 0) ctx.skip(`cannot make a mount namespace without /dev/userfaultfd: ${probeNs.stderr.trim() || `exit ${probeNs.status}`}`);
    const r = spawnSync('unshare', ['-m', 'sh', '-c', `mount -t tmpfs none /dev && exec "${process.execPath}" "${fixture}"`], {
      encoding: 'utf8',
      timeout: 30_000,
    });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.device.error).toMatchObject({ code: 'ENOENT', errno: -2, syscall: 'open', path: '/dev/userfaultfd' });
    expect(out.device.error.message).toMatch(/no \/dev\/userfaultfd/);
    expect(out.syscall).toEqual({ openedBy: 'syscall', userModeOnly: false, ops: 4, faults: 4 });
    expect(out.auto).toEqual({ openedBy: 'syscall', userModeOnly: false, ops: 4, faults: 4 });
    expect(out.probe.device.ok).toBe(false);
    expect(out.probe.syscall.ok).toBe(true);
  });
});
