// The pager at the file's edges, held to what a user of mmap expects of the kernel: a read-only
// descriptor, a file truncated (or grown, or renamed) under the pager, a write-back that can
// never succeed. Real files, real truncation from another descriptor and another process.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pager } from '../lib/index.js';
import { P, PAGE, requireCap, within, cleanupAfterEach, fillPattern } from './helpers.js';

const cleanup = cleanupAfterEach();
const TMPFS = '/dev/shm';
const DISK = os.tmpdir() === '/dev/shm' ? '/var/tmp' : os.tmpdir();
const G = 64 * 1024;

function tmpFile(dir: string, name: string, bytes: Uint8Array): string {
  const f = path.join(dir, `pagemirror-pager-edges-${name}-${process.pid}`);
  fs.writeFileSync(f, bytes);
  cleanup.push(() => fs.rmSync(f, { force: true }));
  return f;
}

function pattern(bytes: number, seed: number): Uint8Array {
  return fillPattern(new Uint8Array(bytes), seed);
}

function needPager(ctx: { skip: (note?: string) => void }): void {
  requireCap(ctx, P.experiments.wp, 'uffd-wp');
  requireCap(ctx, P.experiments.poison, 'UFFDIO_POISON');
}

function openFd(file: string, flags: string): number {
  const fd = fs.openSync(file, flags);
  cleanup.push(() => {
    try {
      fs.closeSync(fd);
    } catch {
      /* closed by the test */
    }
  });
  return fd;
}

describe('pager at the file\'s edges', () => {
  // Before: accepted; after a write, flush() and close() rejected with EBADF forever.
  it('a read-only descriptor with write-back on is refused with EACCES, as mmap refuses a writable MAP_SHARED one', async (ctx) => {
    needPager(ctx);
    const file = tmpFile(TMPFS, 'ro', pattern(1 << 20, 1));
    const fd = openFd(file, 'r');
    for (const writeback of [undefined, 'confirmed', 'pagecache'] as const) {
      const err = await pager(fd, { granule: G, writeback }).then(() => null, (e) => e);
      expect(err, String(writeback)).toMatchObject({ code: 'EACCES', errno: -13, syscall: 'mmap' });
      expect(err.message).toMatch(/read-write|writeback: false/);
    }
  }, 30_000);

  it('writeback: false keeps writes private (MAP_PRIVATE): a read-only descriptor or path, eviction to memory, the file never written', async (ctx) => {
    needPager(ctx);
    const size = 1 << 20;
    const file = tmpFile(DISK, 'private', pattern(size, 1));
    fs.chmodSync(file, 0o444);
    for (const target of [openFd(file, 'r'), file]) {
      const p = await pager(target, { granule: G, residentLimit: size / 4, writeback: false });
      cleanup.push(() => void p.close().catch(() => {}));
      expect((await within(p.access({ op: 'verify', seed: 1, unit: 8 }), 20_000, 'verify file')).mismatches).toBe(0);
      await within(p.access({ op: 'write', seed: 5, unit: 8 }), 20_000, 'write');
      // Most granules were written and evicted (a quarter fits): they come back from memory.
      const s = p.stats();
      expect(s.evictions).toBeGreaterThan(0);
      expect((await within(p.access({ op: 'verify', seed: 5, unit: 8 }), 20_000, 'verify writes')).mismatches).toBe(0);
      await within(p.flush(), 10_000, 'flush');
      await within(p.close(), 10_000, 'close');
      expect(p.closed).toBe(true);
      expect(Buffer.compare(fs.readFileSync(file), Buffer.from(pattern(size, 1)))).toBe(0);
    }
    await expect(pager(file, { mode: 'shared', writeback: false })).rejects.toMatchObject({ code: 'ERR_INVALID_ARG_VALUE' });
  }, 60_000);

  it('writeback: false and a truncation: a short granule evicted to memory comes back with its write, and SIGBUS past the end', async (ctx) => {
    needPager(ctx);
    const size = 1 << 20;
    const file = tmpFile(DISK, 'private-trunc', pattern(size, 1));
    const p = await pager(openFd(file, 'r'), { granule: G, residentLimit: 2 * G, prefetch: false, writeback: false });
    cleanup.push(() => void p.close().catch(() => {}));
    fs.truncateSync(file, 4 * G + PAGE);
    await within(p.write(4 * G, Buffer.from('mine')), 10_000, 'write the cut granule');
    // Evict it (to the pager's memfd): two other granules fill the limit.
    await within(p.access({ op: 'read', unit: PAGE, offset: 0, length: 2 * G }), 10_000, 'read others');
    expect(p.stats().evictions).toBeGreaterThan(0);
    expect((await within(p.read(4 * G, 4), 10_000, 'read back')).toString()).toBe('mine');
    expect(p.stats()).toMatchObject({ fills: 4, shortFills: 1 }); // the cut granule twice: evicted and filled from memory
    const r = await within(p.access({ op: 'read', unit: PAGE, offset: 4 * G, length: G }), 10_000, 'read past the end');
    expect(r.signal).toBe('SIGBUS');
    expect(Number(r.signalAddress! % BigInt(G))).toBe(PAGE);
    await within(p.close(), 10_000, 'close');
    expect(fs.statSync(file).size).toBe(4 * G + PAGE);
  }, 30_000);

  // A path the pager cannot open read-write (here: a read-only file system, which refuses root too).
  it('a path on a read-only file system: write-back on fails at open() with a hint; writeback: false pages it', async (ctx) => {
    needPager(ctx);
    if (process.getuid?.() !== 0) ctx.skip('mounting a tmpfs read-only needs root');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-pager-rofs-'));
    const mount = (o: string) => spawnSync('mount', ['-t', 'tmpfs', '-o', o, 'pagemirror-pager-rofs', dir], { encoding: 'utf8' });
    const m = mount('size=2m');
    if (m.status !== 0) ctx.skip(`mount tmpfs: ${m.stderr.trim()}`);
    cleanup.push(() => fs.rmdirSync(dir));
    cleanup.push(() => void spawnSync('umount', [dir]));
    const file = path.join(dir, 'data');
    fs.writeFileSync(file, pattern(4 * G, 2));
    const ro = mount('remount,ro');
    if (ro.status !== 0) throw new Error(`remount ro: ${ro.stderr}`);
    const err = await pager(file, { granule: G }).then(() => null, (e) => e);
    expect(err).toMatchObject({ code: 'EROFS', syscall: 'open', path: file });
    expect(err.message).toMatch(/writeback: false/);
    const p = await pager(file, { granule: G, writeback: false });
    cleanup.push(() => void p.close().catch(() => {}));
    await within(p.access({ op: 'write', seed: 4, unit: 8 }), 10_000, 'write');
    expect((await within(p.access({ op: 'verify', seed: 4, unit: 8 }), 10_000, 'verify')).mismatches).toBe(0);
    await within(p.close(), 10_000, 'close');
    expect(Buffer.compare(fs.readFileSync(file), Buffer.from(pattern(4 * G, 2)))).toBe(0);
  }, 30_000);

  it('shared mode of a read-only descriptor: the kernel\'s own EACCES', async (ctx) => {
    needPager(ctx);
    requireCap(ctx, P.experiments.minor, 'MINOR faults on shmem');
    const file = tmpFile(TMPFS, 'shared-ro', pattern(1 << 20, 1));
    await expect(pager(openFd(file, 'r'), { granule: G, mode: 'shared' })).rejects.toMatchObject({ code: 'EACCES', errno: -13, syscall: 'mmap' });
  }, 30_000);

  // Before: a write-back that could never succeed left close() rejecting forever.
  it('a write error that never heals: acknowledgeLoss() gives the granules up and close() succeeds', async (ctx) => {
    needPager(ctx);
    if (process.getuid?.() !== 0) ctx.skip('mounting a small tmpfs needs root');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-pager-ack-'));
    const r = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=256k', 'pagemirror-pager-ack', dir], { encoding: 'utf8' });
    if (r.status !== 0) ctx.skip(`mount tmpfs: ${r.stderr.trim()}`);
    cleanup.push(() => fs.rmdirSync(dir));
    cleanup.push(() => void spawnSync('umount', [dir]));
    const file = path.join(dir, 'sparse');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 1 << 20);
    const p = await pager(file, { granule: G });
    cleanup.push(() => void p.close().catch(() => {}));
    await within(p.access({ op: 'write', seed: 9, unit: 8 }), 20_000, 'write');
    await expect(within(p.close(), 20_000, 'close')).rejects.toMatchObject({ code: 'ENOSPC' });
    expect(p.closed).toBe(false);
    const lost = await within(p.acknowledgeLoss(), 10_000, 'acknowledgeLoss');
    expect(lost).toMatchObject({ code: 'ENOSPC', errno: -28, path: file });
    expect(lost!.granules.length).toBeGreaterThan(0);
    expect(lost!.ranges.reduce((n, x) => n + x.length, 0)).toBe(lost!.granules.length * G);
    const s = p.stats();
    expect(s.discarded).toBe(lost!.granules.length);
    expect(s.dirty).toBe(0);
    expect(await p.acknowledgeLoss()).toBeNull();
    await within(p.close(), 20_000, 'close after acknowledgeLoss');
    expect(p.closed).toBe(true);
  }, 60_000);

  // A 1 MiB file; granules 0-7 and 12 resident, then the file is cut to 10 granules + 100 bytes.
  async function truncatedUnder(cut: (file: string, size: number) => void) {
    const size = 1 << 20;
    const file = tmpFile(DISK, 'trunc', pattern(size, 1));
    const p = await pager(file, { granule: G, prefetch: false });
    cleanup.push(() => void p.close().catch(() => {}));
    await within(p.access({ op: 'read', unit: PAGE, offset: 0, length: 8 * G }), 10_000, 'read head');
    await within(p.access({ op: 'read', unit: PAGE, offset: 12 * G, length: G }), 10_000, 'read granule 12');
    const end = 10 * G + 100;
    cut(file, end);
    expect(fs.statSync(file).size).toBe(end);
    // A granule wholly past the new end: SIGBUS, as a mapping's access past EOF (before: zeros).
    const past = await within(p.access({ op: 'read', unit: PAGE, offset: 13 * G, length: G }), 10_000, 'read past EOF');
    expect(past.signal).toBe('SIGBUS');
    // The granule the end cuts: its first page holds the file's 100 bytes, then zeros; the next
    // page is wholly past the end: SIGBUS.
    const head = await within(p.read(10 * G, PAGE), 10_000, 'read the cut page');
    expect(Buffer.compare(head.subarray(0, 100), Buffer.from(pattern(size, 1).subarray(10 * G, 10 * G + 100)))).toBe(0);
    expect(head.subarray(100).every((b) => b === 0)).toBe(true);
    const cutG = await within(p.access({ op: 'read', unit: PAGE, offset: 10 * G, length: G }), 10_000, 'read cut granule');
    expect(cutG.signal).toBe('SIGBUS');
    expect(Number(cutG.signalAddress! % BigInt(G))).toBe(PAGE);
    expect(p.stats().shortFills).toBe(2);
    // A granule read before the cut keeps what it read, as MAP_PRIVATE's copied pages do.
    const kept = await within(p.read(12 * G, 16), 10_000, 'read resident past EOF');
    expect(Buffer.compare(kept, Buffer.from(pattern(size, 1).subarray(12 * G, 12 * G + 16)))).toBe(0);
    // Writes: one within the file, one in the resident granule past its end.
    await within(p.write(7 * G, Buffer.from('inside')), 10_000, 'write inside');
    await within(p.write(12 * G, Buffer.from('beyond')), 10_000, 'write beyond');
    // Before: flush() wrote granule 12 back and grew the file to 13 granules.
    const err = await within(p.flush().then(() => null, (e) => e), 10_000, 'flush');
    expect(err).toMatchObject({ code: 'ERR_PAGEMIRROR_DATA_LOST', cause: 'ENXIO', errno: -6, fileSize: end, granules: [12], ranges: [{ offset: 12 * G, length: G }], path: file });
    expect(fs.statSync(file).size).toBe(end);
    expect(fs.readFileSync(file).subarray(7 * G, 7 * G + 6).toString()).toBe('inside');
    await expect(within(p.close(), 10_000, 'close')).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_DATA_LOST' });
    expect(p.closed).toBe(false);
    return { p, file, end };
  }

  it('a file truncated from another descriptor: SIGBUS past its end, write-back never grows it back; acknowledgeLoss() then close()', async (ctx) => {
    needPager(ctx);
    const { p, file, end } = await truncatedUnder((f, n) => {
      const fd = openFd(f, 'r+');
      fs.ftruncateSync(fd, n);
    });
    const lost = await within(p.acknowledgeLoss(), 10_000, 'acknowledgeLoss');
    expect(lost).toMatchObject({ code: 'ERR_PAGEMIRROR_DATA_LOST', granules: [12] });
    // Given up: its next access reads the file again, which ends before it.
    expect((await within(p.access({ op: 'read', unit: PAGE, offset: 12 * G, length: G }), 10_000, 'reread')).signal).toBe('SIGBUS');
    await within(p.close(), 10_000, 'close');
    expect(fs.statSync(file).size).toBe(end);
  }, 60_000);

  it('a file truncated by another process: grown back, the next flush() writes what the pager held past the old end', async (ctx) => {
    needPager(ctx);
    if (spawnSync('truncate', ['--version']).error) ctx.skip('needs truncate (coreutils)');
    const run = (f: string, n: number) => {
      const r = spawnSync('truncate', ['-s', String(n), f], { encoding: 'utf8', timeout: 10_000 });
      if (r.status !== 0) throw new Error(`truncate: ${r.stderr}`);
    };
    const { p, file } = await truncatedUnder(run);
    run(file, 1 << 20);
    await within(p.flush(), 10_000, 'flush after growth');
    const after = fs.readFileSync(file);
    expect(after.subarray(12 * G, 12 * G + 6).toString()).toBe('beyond');
    // The rest of granule 12 is what the pager held (read before the cut), not the hole's zeros.
    expect(Buffer.compare(after.subarray(12 * G + 8, 13 * G), Buffer.from(pattern(1 << 20, 1).subarray(12 * G + 8, 13 * G)))).toBe(0);
    // Granule 11 was never resident and is not written: the growth's zeros.
    expect(after.subarray(11 * G, 12 * G).every((b) => b === 0)).toBe(true);
    await within(p.close(), 10_000, 'close');
  }, 60_000);

  // The truncation lands while two threads read at random under eviction: every word they read is
  // the file's or a SIGBUS, never zeros the file does not hold, and nothing hangs.
  it('a truncation by another process in the middle of a run: no zeros, no hang', async (ctx) => {
    needPager(ctx);
    if (spawnSync('truncate', ['--version']).error) ctx.skip('needs truncate (coreutils)');
    const size = 4 << 20;
    const file = tmpFile(DISK, 'trunc-run', pattern(size, 1));
    const p = await pager(file, { granule: G, residentLimit: size / 4, prefetch: false });
    cleanup.push(() => void p.close().catch(() => {}));
    const run = p.access({ op: 'verify', seed: 1, unit: 8, pattern: 'random', ops: 400_000, threads: 2 });
    await new Promise((r) => setTimeout(r, 20));
    const t = spawnSync('truncate', ['-s', String(size / 2), file], { encoding: 'utf8', timeout: 10_000 });
    expect(t.status, t.stderr).toBe(0);
    const r = await within(run, 30_000, 'random reads across the truncation');
    expect(r.mismatches).toBe(0);
    expect(r.signal, 'the run was still going when the file was cut (400,000 random reads, a quarter resident)').toBe('SIGBUS');
    // Past the end, whatever was resident then, a pass over every granule meets SIGBUS.
    const tail = await within(p.access({ op: 'verify', seed: 1, unit: PAGE, offset: size / 2, length: size / 2 }), 10_000, 'tail');
    expect(tail.signal).toBe('SIGBUS');
    await within(p.close(), 10_000, 'close');
    expect(fs.statSync(file).size).toBe(size / 2);
  }, 60_000);

  // A write fault past the end marks its granule dirty before the fill finds the end; the write
  // itself never lands (SIGBUS). Nothing of it may be reported as lost, however far the file shrinks.
  it('a write that got SIGBUS past the end is not reported lost when the file shrinks further', async (ctx) => {
    needPager(ctx);
    const file = tmpFile(DISK, 'sigbus-write', pattern(4 * G, 1));
    const p = await pager(file, { granule: G, prefetch: false });
    cleanup.push(() => void p.close().catch(() => {}));
    fs.truncateSync(file, 2 * G);
    const w = await within(p.access({ op: 'write', seed: 2, unit: 8, offset: 3 * G, length: 8 }), 10_000, 'write past the end');
    expect(w.signal).toBe('SIGBUS');
    fs.truncateSync(file, G);
    await within(p.flush(), 10_000, 'flush');
    await within(p.close(), 10_000, 'close');
    expect(fs.statSync(file).size).toBe(G);
  }, 30_000);

  it('shared mode on tmpfs: a truncation is the kernel\'s own (SIGBUS past the end, no hang)', async (ctx) => {
    needPager(ctx);
    requireCap(ctx, P.experiments.minor, 'MINOR faults on shmem');
    const size = 1 << 20;
    const file = tmpFile(TMPFS, 'shared-trunc', pattern(size, 1));
    const p = await pager(file, { granule: G, mode: 'shared', prefetch: false });
    cleanup.push(() => void p.close().catch(() => {}));
    await within(p.access({ op: 'read', unit: PAGE, offset: 0, length: 2 * G }), 10_000, 'read head');
    fs.truncateSync(file, G);
    // Mapped before the cut or not: past the end is SIGBUS, as in any shared mapping.
    for (const offset of [G, 8 * G]) {
      const r = await within(p.access({ op: 'read', unit: PAGE, offset, length: G }), 10_000, `read at ${offset}`);
      expect(r.signal, `offset ${offset}`).toBe('SIGBUS');
    }
    await within(p.close(), 10_000, 'close');
  }, 30_000);

  // The engine keeps its own duplicate of the descriptor (F_DUPFD_CLOEXEC at pager()).
  it('the caller may close its descriptor after pager(): the pager reads and writes back through its own', async (ctx) => {
    needPager(ctx);
    const size = 1 << 20;
    const file = tmpFile(DISK, 'dupfd', pattern(size, 1));
    const fd = fs.openSync(file, 'r+');
    const p = await pager(fd, { granule: G, residentLimit: size / 4 });
    cleanup.push(() => void p.close().catch(() => {}));
    fs.closeSync(fd);
    await within(p.access({ op: 'write', seed: 3, unit: 8 }), 20_000, 'write');
    await within(p.close(), 20_000, 'close');
    expect(Buffer.compare(fs.readFileSync(file), Buffer.from(pattern(size, 3)))).toBe(0);
  }, 30_000);

  // As an open mapping does, the pager holds the file it opened, not its name.
  it('a path replaced by rename: the pager goes on with the file it opened; the new one is untouched', async (ctx) => {
    needPager(ctx);
    const size = 256 * 1024;
    const file = tmpFile(DISK, 'renamed', pattern(size, 1));
    const moved = `${file}.old`;
    cleanup.push(() => fs.rmSync(moved, { force: true }));
    const p = await pager(file, { granule: G, prefetch: false });
    cleanup.push(() => void p.close().catch(() => {}));
    fs.renameSync(file, moved);
    fs.writeFileSync(file, pattern(size, 50));
    expect((await within(p.access({ op: 'verify', seed: 1, unit: 8 }), 10_000, 'verify')).mismatches).toBe(0);
    await within(p.write(0, Buffer.from('pager')), 10_000, 'write');
    await within(p.close(), 10_000, 'close');
    expect(fs.readFileSync(moved).subarray(0, 5).toString()).toBe('pager');
    expect(Buffer.compare(fs.readFileSync(file), Buffer.from(pattern(size, 50)))).toBe(0);
  }, 30_000);

  // The pager pages the length it was made with: bytes appended later are not its own.
  it('a file that grows under the pager: length stays, write-back leaves the new bytes alone', async (ctx) => {
    needPager(ctx);
    const size = 256 * 1024 + 100;
    const file = tmpFile(DISK, 'grows', pattern(size + 4, 1).subarray(0, size));
    const p = await pager(file, { granule: G, prefetch: false });
    cleanup.push(() => void p.close().catch(() => {}));
    fs.appendFileSync(file, Buffer.alloc(G, 0xab));
    expect(p.length).toBe(size);
    expect(() => p.read(size, 1)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
    await within(p.access({ op: 'write', seed: 8, unit: 4 * 1024, offset: 0, length: size - 100 }), 10_000, 'write');
    await within(p.write(size - 4, Buffer.from('tail')), 10_000, 'write tail');
    await within(p.close(), 10_000, 'close');
    const after = fs.readFileSync(file);
    expect(after.length).toBe(size + G);
    expect(after.subarray(size - 4, size).toString()).toBe('tail');
    expect(after.subarray(size).every((b) => b === 0xab)).toBe(true);
  }, 30_000);

  // A punched hole is zeros in the file, not an end: a granule filled after the punch reads them.
  it('a hole punched under the pager: granules filled afterwards read zeros (no SIGBUS); resident ones keep what they read', async (ctx) => {
    needPager(ctx);
    if (spawnSync('fallocate', ['--version']).error) ctx.skip('needs fallocate (util-linux)');
    const size = 1 << 20;
    const file = tmpFile(TMPFS, 'punch', pattern(size, 1));
    const p = await pager(file, { granule: G, prefetch: false });
    cleanup.push(() => void p.close().catch(() => {}));
    await within(p.read(0, 8), 10_000, 'read granule 0');
    const r = spawnSync('fallocate', ['--punch-hole', '--offset', '0', '--length', String(4 * G), file], { encoding: 'utf8', timeout: 10_000 });
    if (r.status !== 0) ctx.skip(`fallocate --punch-hole: ${r.stderr.trim()}`);
    const hole = await within(p.access({ op: 'read', unit: PAGE, offset: 2 * G, length: G }), 10_000, 'read the hole');
    expect(hole.signal).toBeUndefined();
    expect((await p.read(2 * G, G)).every((b) => b === 0)).toBe(true);
    expect(Buffer.compare(await p.read(0, 8), Buffer.from(pattern(8, 1)))).toBe(0);
    expect(p.stats().shortFills).toBe(0);
    await within(p.close(), 10_000, 'close');
  }, 30_000);
});
