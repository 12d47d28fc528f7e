import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { mapAnonymous, mapMemfd, mapFile, isSystemError, access, type Mapping } from '../lib/index.js';
import { FIXTURES_DIR, P, PAGE, requireCap } from './helpers.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-map-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

function expectSystemError(fn: () => unknown, code: string, syscall?: string): void {
  try {
    fn();
  } catch (err) {
    expect(isSystemError(err), String(err)).toBe(true);
    expect((err as { code: string }).code).toBe(code);
    if (syscall) expect((err as { syscall: string }).syscall).toBe(syscall);
    expect((err as { errno: number }).errno).toBeLessThan(0);
    return;
  }
  throw new Error(`expected ${code}`);
}

describe('anonymous mappings', () => {
  it('maps private memory, reads and writes through bytes, and close() detaches the buffer', () => {
    const m = mapAnonymous(4 * PAGE);
    const b = m.bytes;
    b[0] = 1;
    b[4 * PAGE - 1] = 2;
    expect(m.readSync(0, 1)[0]).toBe(1);
    expect(m.length).toBe(4 * PAGE);
    expect(m.kind).toBe('anonymous');
    m.close();
    expect(b.byteLength).toBe(0); // detached: no view reaches unmapped memory
    expect(m.closed).toBe(true);
    m.close(); // idempotent
    expect(() => m.bytes).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
  });

  it('align places the start on a boundary; a bad one is a RangeError', () => {
    const m = mapAnonymous(3 * PAGE, { align: 2 << 20 });
    try {
      expect(m.address % BigInt(2 << 20)).toBe(0n);
      expect(m.length).toBe(3 * PAGE);
      m.bytes[3 * PAGE - 1] = 1;
    } finally {
      m.close();
    }
    expect(() => mapAnonymous(PAGE, { align: 3 * PAGE })).toThrow(RangeError);
  });

  it('rounds the length up to whole pages', () => {
    const m = mapAnonymous(PAGE + 1);
    try {
      expect(m.length).toBe(2 * PAGE);
    } finally {
      m.close();
    }
  });

  it('populate pre-faults every page', () => {
    const m = mapAnonymous(8 * PAGE, { populate: true });
    try {
      expect(m.residency().every(Boolean)).toBe(true);
    } finally {
      m.close();
    }
  });

  it('shared anonymous memory is shmem (pagemap: file/shared)', () => {
    const m = mapAnonymous(PAGE, { shared: true });
    try {
      m.bytes[0] = 9;
      expect(m.pagemap()[0]!.fileOrShared).toBe(true);
    } finally {
      m.close();
    }
  });
});

describe('protection', () => {
  it('protect() read-only: bytes is refused and writeSync is EACCES, never a crash', () => {
    const m = mapAnonymous(2 * PAGE);
    try {
      const view = m.bytes;
      m.protect('r');
      expect(view.byteLength).toBe(0); // the old view was detached
      expect(() => m.bytes).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_NOT_WRITABLE' }));
      expectSystemError(() => m.writeSync(0, new Uint8Array([1])), 'EACCES', 'write');
      expect(m.readSync(0, 4)).toEqual(Buffer.alloc(4));
      m.protect('rw');
      m.bytes[0] = 3;
      expect(m.readSync(0, 1)[0]).toBe(3);
    } finally {
      m.close();
    }
  });

  it('tracks protection per range and refuses native access to PROT_NONE', async () => {
    const m = mapAnonymous(4 * PAGE);
    try {
      m.protect('none', { offset: PAGE, length: PAGE });
      expect(m.protection).toEqual([
        { offset: 0, length: PAGE, prot: 3 },
        { offset: PAGE, length: PAGE, prot: 0 },
        { offset: 2 * PAGE, length: 2 * PAGE, prot: 3 },
      ]);
      await expect(access(m, { op: 'read' })).rejects.toMatchObject({ code: 'EACCES', syscall: 'access' });
      const ok = await access(m, { offset: 2 * PAGE, length: 2 * PAGE, op: 'write' });
      expect(ok.ops).toBe(2);
    } finally {
      m.close();
    }
  });

  it('rejects unaligned and out-of-range arguments before any system call', () => {
    const m = mapAnonymous(2 * PAGE);
    try {
      expect(() => m.protect('r', { offset: 1, length: PAGE })).toThrow(
        expect.objectContaining({ name: 'RangeError', code: 'ERR_PAGEMIRROR_UNALIGNED' }),
      );
      expect(() => m.protect('r', { offset: 0, length: 3 * PAGE })).toThrow(
        expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }),
      );
      expect(() => m.protect('q' as never)).toThrow(TypeError);
      expect(() => m.readSync(-1, 1)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(() => m.advise('bogus' as never)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
      expect(m.protection).toEqual([{ offset: 0, length: 2 * PAGE, prot: 3 }]); // nothing changed
    } finally {
      m.close();
    }
  });
});

describe('advice', () => {
  it('dontneed drops private anonymous pages (they read back as zero)', () => {
    const m = mapAnonymous(4 * PAGE);
    try {
      m.bytes.fill(7);
      m.advise('dontneed', { offset: PAGE, length: PAGE });
      expect(m.residency()).toEqual([true, false, true, true]);
      expect(m.readSync(PAGE, 8)).toEqual(Buffer.alloc(8));
      expect(m.readSync(0, 1)[0]).toBe(7);
    } finally {
      m.close();
    }
  });

  it('populateWrite / populateRead / willneed / cold / pageout / free / hugepage / nohugepage are accepted', () => {
    const m = mapAnonymous(4 * PAGE);
    try {
      m.advise('populateWrite');
      expect(m.residency().every(Boolean)).toBe(true);
      for (const a of ['populateRead', 'willneed', 'cold', 'pageout', 'free', 'hugepage', 'nohugepage', 'random', 'sequential', 'normal'] as const)
        m.advise(a);
    } finally {
      m.close();
    }
  });

  it('remove punches shmem pages; on private anonymous memory it is EINVAL', () => {
    const s = mapMemfd(2 * PAGE);
    const a = mapAnonymous(PAGE);
    try {
      s.bytes.fill(1);
      s.advise('remove', { offset: 0, length: PAGE });
      expect(s.cachestat().cache).toBe(1);
      expect(s.readSync(0, 4)).toEqual(Buffer.alloc(4)); // a shmem read fault allocates the page again
      expectSystemError(() => a.advise('remove'), 'EINVAL', 'madvise');
    } finally {
      s.close();
      a.close();
    }
  });

  it('collapse on a 2 MiB aligned THP-advised range', (ctx) => {
    requireCap(ctx, P.experiments.thp, 'transparent hugepages');
    const m = mapAnonymous(4 << 20);
    try {
      // Find a 2 MiB aligned offset inside the mapping.
      const off = Number((2n << 20n) - (m.address % (2n << 20n))) % (2 << 20);
      m.advise('hugepage', { offset: off, length: 2 << 20 });
      m.advise('populateWrite', { offset: off, length: 2 << 20 });
      try {
        m.advise('collapse', { offset: off, length: 2 << 20 });
      } catch (err) {
        // EAGAIN/ENOMEM: no huge page could be allocated right now; the call itself is supported.
        expect(['EAGAIN', 'ENOMEM']).toContain((err as { code: string }).code);
      }
    } finally {
      m.close();
    }
  });
});

describe('memfd', () => {
  it('maps a fresh memfd, aliases it, and both views see the same pages', () => {
    const m = mapMemfd(2 * PAGE, { name: 'test' });
    const alias = m.alias();
    try {
      expect(m.kind).toBe('memfd');
      expect(m.fd).toBeGreaterThan(2);
      alias.bytes[10] = 42;
      expect(m.readSync(10, 1)[0]).toBe(42);
      expect(m.cachestat().cache).toBe(1);
    } finally {
      alias.close();
      m.close();
    }
    expect(m.fd).toBe(-1);
  });

  it('punchHole frees the page and it reads back as zero', () => {
    const m = mapMemfd(2 * PAGE);
    try {
      m.bytes.fill(5);
      m.punchHole(0, PAGE);
      expect(m.cachestat().cache).toBe(1);
      expect(m.readSync(0, 2)).toEqual(Buffer.alloc(2));
      expect(m.readSync(PAGE, 1)[0]).toBe(5);
    } finally {
      m.close();
    }
  });

  it('hugetlb: works where pages are free, else a clear ENOMEM that says how to reserve them', () => {
    // The pool is shared with test/hugetlb.test.ts (which may reserve pages meanwhile): both
    // outcomes are checked for what they must show, whichever this run gets.
    const size = P.hugetlb.defaultSize || 2 << 20;
    let m;
    try {
      m = mapMemfd(size, { hugetlb: true });
    } catch (err) {
      expect(isSystemError(err)).toBe(true);
      expect((err as Error & { code: string }).code).toBe('ENOMEM');
      expect((err as Error).message).toMatch(/nr_hugepages/);
      return;
    }
    try {
      expect(m.pageSize).toBe(size);
      m.writeSync(0, new Uint8Array([1]));
      expect(m.readSync(0, 1)[0]).toBe(1);
    } finally {
      m.close();
    }
  });
});

describe('files', () => {
  it('maps a file shared: writes reach the file, sync() flushes, private writes do not', () => {
    const f = path.join(dir, 'shared.bin');
    fs.writeFileSync(f, Buffer.alloc(2 * PAGE, 1));
    const m = mapFile(f);
    const p = mapFile(f, { shared: false });
    try {
      expect(m.kind).toBe('file');
      expect(m.path).toBe(f);
      m.writeSync(0, Buffer.from('hello'));
      m.sync();
      expect(fs.readFileSync(f).subarray(0, 5).toString()).toBe('hello');
      p.writeSync(PAGE, Buffer.from('private'));
      expect(fs.readFileSync(f).subarray(PAGE, PAGE + 7)).toEqual(Buffer.alloc(7, 1));
      expect(p.statx().dax).toBe(false);
    } finally {
      m.close();
      p.close();
    }
  });

  it('maps by descriptor, owning a duplicate', () => {
    const f = path.join(dir, 'byfd.bin');
    fs.writeFileSync(f, Buffer.alloc(PAGE, 3));
    const fd = fs.openSync(f, 'r+');
    const m = mapFile({ fd, path: f });
    try {
      expect(m.fd).not.toBe(fd);
      fs.closeSync(fd); // the mapping keeps its own descriptor
      expect(m.readSync(0, 1)[0]).toBe(3);
      m.truncateFile(2 * PAGE);
      expect(fs.statSync(f).size).toBe(2 * PAGE);
    } finally {
      m.close();
    }
  });

  it('creates and extends a file with create: true', () => {
    const f = path.join(dir, 'created.bin');
    const m = mapFile(f, { create: true, length: 3 * PAGE });
    try {
      expect(fs.statSync(f).size).toBe(3 * PAGE);
    } finally {
      m.close();
    }
  });

  it('offsets and lengths beyond 2 GiB and 4 GiB', () => {
    const f = path.join(dir, 'big.bin');
    const fd = fs.openSync(f, 'w+');
    const five = 5 * 1024 ** 3;
    fs.ftruncateSync(fd, five + PAGE); // sparse
    fs.closeSync(fd);
    const whole = mapFile(f); // more than 4 GiB in one mapping
    const tail = mapFile(f, { offset: five, length: PAGE });
    try {
      expect(whole.length).toBe(five + PAGE);
      whole.writeSync(five + 8, Buffer.from('far'));
      expect(tail.readSync(8, 3).toString()).toBe('far');
      const fd2 = fs.openSync(f, 'r');
      const got = Buffer.alloc(3);
      fs.readSync(fd2, got, 0, 3, five + 8);
      fs.closeSync(fd2);
      expect(got.toString()).toBe('far');
    } finally {
      whole.close();
      tail.close();
    }
  });

  it('a nonexistent path is ENOENT with path and syscall', () => {
    const f = path.join(dir, 'nope', 'missing.bin');
    try {
      mapFile(f);
      throw new Error('mapped a missing file');
    } catch (err) {
      expect(err).toMatchObject({ code: 'ENOENT', errno: -2, syscall: 'open', path: f });
      expect((err as Error).message).toBe(`ENOENT: No such file or directory, open '${f}'`);
    }
  });

  it('MAP_SYNC on a non-DAX file is EOPNOTSUPP with a clear message', () => {
    const f = path.join(dir, 'sync.bin');
    fs.writeFileSync(f, Buffer.alloc(PAGE));
    expectSystemError(() => mapFile(f, { sync: true }), 'EOPNOTSUPP', 'mmap');
    try {
      mapFile(f, { sync: true });
    } catch (err) {
      expect((err as Error).message).toMatch(/DAX/);
    }
  });

  it('MAP_SYNC on a DAX file system', (ctx) => {
    requireCap(ctx, P.experiments.dax, 'DAX');
    const f = path.join(P.dax.candidates[0]!, `pagemirror-sync-${process.pid}`);
    fs.writeFileSync(f, Buffer.alloc(PAGE));
    const m = mapFile(f, { sync: true });
    try {
      expect(m.statx().dax).toBe(true);
    } finally {
      m.close();
      fs.rmSync(f);
    }
  });

  it('an empty file needs a length', () => {
    const f = path.join(dir, 'empty.bin');
    fs.writeFileSync(f, '');
    expect(() => mapFile(f)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
  });

  it('reading past the end of a truncated shared file is a typed error, not a SIGBUS death', async () => {
    const f = path.join(dir, 'trunc.bin');
    fs.writeFileSync(f, Buffer.alloc(4 * PAGE, 1));
    const m = mapFile(f);
    try {
      fs.truncateSync(f, PAGE);
      expect(() => m.readSync(2 * PAGE, 1)).toThrow(expect.objectContaining({ code: 'EFAULT', syscall: 'read' }));
      const r = await access(m, { op: 'read' });
      expect(r.signal).toBe('SIGBUS');
      expect(r.signalAddress).toBe(m.address + BigInt(PAGE));
      expect(r.ops).toBe(1); // page 0 read, page 1 faulted fatally
    } finally {
      m.close();
    }
  });
});

describe('remap', () => {
  it('grows and shrinks; the old view is detached and a new one sees the same data', () => {
    const m: Mapping = mapAnonymous(2 * PAGE);
    try {
      const old = m.bytes;
      old[0] = 77;
      const addr = m.remap(64 * PAGE, { mayMove: true });
      expect(old.byteLength).toBe(0);
      expect(m.address).toBe(addr);
      expect(m.length).toBe(64 * PAGE);
      expect(m.bytes[0]).toBe(77);
      m.remap(PAGE);
      expect(m.length).toBe(PAGE);
    } finally {
      m.close();
    }
  });

  it('without mayMove, growing into an occupied range fails with ENOMEM and loses nothing', () => {
    const a = mapAnonymous(PAGE);
    const before = a.address;
    try {
      a.bytes[0] = 1;
      try {
        a.remap(1 << 30, { mayMove: false });
      } catch (err) {
        expect((err as { code: string }).code).toBe('ENOMEM');
      }
      expect(a.address).toBe(before);
      expect(a.bytes[0]).toBe(1);
    } finally {
      a.close();
    }
  });
});

describe('ownership', () => {
  it("unmap()'s hole stays reserved: close() cannot unmap a mapping the kernel put there since (a child, which that would kill)", () => {
    // The fuzzer's sanitized workers died of this at teardown: ASan's per-thread state had been
    // mapped into such a hole, and close() unmapped it.
    const res = spawnSync(process.execPath, [path.join(FIXTURES_DIR, 'unmap-hole-reuse.mjs')], { encoding: 'utf8', timeout: 10_000, killSignal: 'SIGKILL' });
    expect(res.signal, `the child died: ${res.stderr}`).toBe(null);
    expect(res.status, res.stderr).toBe(0);
    expect(JSON.parse(res.stdout)).toEqual({ landed: false, mapped: 64, sum: (64 * 65) / 2 });
  }, 20_000);

  it("unmap()'s hole reads as an inaccessible reservation in /proc/self/maps until close()", () => {
    const m = mapAnonymous(4 * PAGE);
    const hole = m.address + BigInt(PAGE);
    const covering = () =>
      fs
        .readFileSync('/proc/self/maps', 'utf8')
        .split('\n')
        .map((l) => l.split(' '))
        .find(([range]) => range && BigInt('0x' + range.split('-')[0]) <= hole && hole < BigInt('0x' + range.split('-')[1]));
    try {
      m.unmap(PAGE, PAGE);
      expect(covering()?.[1]).toBe('---p');
      m.unmap(PAGE, PAGE); // again: only its own reservation is replaced
      expect(m.holes).toHaveLength(2);
    } finally {
      m.close();
    }
  });

  it('pins cover the range a native job uses: other parts can change meanwhile', async () => {
    const m = mapAnonymous(64 * PAGE);
    try {
      const job = access(m, { length: 32 * PAGE, op: 'write', unit: 8, ops: 4_000_000, pattern: 'random' });
      expect(() => m.protect('r', { offset: 0, length: PAGE })).toThrow(expect.objectContaining({ code: 'EBUSY' }));
      m.protect('r', { offset: 48 * PAGE, length: PAGE }); // not in use: fine
      m.unmap(60 * PAGE, 4 * PAGE);
      expect(() => m.unmap(0, PAGE)).toThrow(expect.objectContaining({ code: 'EBUSY', syscall: 'munmap' }));
      await job;
      m.protect('r', { offset: 0, length: PAGE });
    } finally {
      m.close();
    }
  });

  it('close() is refused while native threads use the mapping, then succeeds', async () => {
    const m = mapAnonymous(256 * PAGE);
    try {
      const job = access(m, { op: 'write', unit: 8, ops: 4_000_000, pattern: 'random' });
      expect(() => m.close()).toThrow(expect.objectContaining({ code: 'EBUSY', syscall: 'munmap' }));
      await job;
      m.close();
      expect(m.closed).toBe(true);
    } finally {
      m.close();
    }
  });
});
