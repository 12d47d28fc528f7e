// Sizes at the edges: zero-length I/O, mappings past Node's ArrayBuffer limit (windows through
// view()), and mirrors of ranges far larger than memory (a sparse page table).
import { describe, it, expect } from 'vitest';
import path from 'node:path';
import { constants as bufferConstants } from 'node:buffer';
import { spawnSync } from 'node:child_process';
import { mapAnonymous, mapMemfd, Userfaultfd, Device } from '../lib/index.js';
import { FIXTURES_DIR, PAGE, cleanupAfterEach, within } from './helpers.js';

const closers = cleanupAfterEach();
const GiB = 2 ** 30;

/** Runs test/fixtures/huge-ranges.mjs `what` in a child: an abort is a dead child, not a dead run. */
function inChild(what: string, timeout = 60_000): Record<string, unknown> {
  const r = spawnSync(process.execPath, [path.join(FIXTURES_DIR, 'huge-ranges.mjs'), what], { encoding: 'utf8', timeout, killSignal: 'SIGKILL' });
  expect(r.signal, `child died: ${r.stderr}`).toBe(null);
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout.trim().split('\n').pop()!);
}

describe('zero-length I/O', () => {
  // Under UndefinedBehaviorSanitizer these handed memcpy the null pointer of an empty ArrayBuffer.
  it('read, readSync, write and writeSync of nothing succeed and return nothing', async () => {
    const m = mapAnonymous(PAGE);
    closers.push(() => m.close());
    m.writeSync(0, new Uint8Array([9]));
    expect(m.readSync(0, 0)).toEqual(Buffer.alloc(0));
    expect(m.readSync(PAGE, 0)).toEqual(Buffer.alloc(0)); // the very end is a valid empty range
    expect(m.writeSync(0, new Uint8Array(0))).toBe(0);
    expect(m.writeSync(PAGE, Buffer.alloc(0))).toBe(0);
    expect(await within(m.read(0, 0), 5000, 'read of nothing')).toEqual(Buffer.alloc(0));
    expect(await within(m.write(PAGE, new Uint8Array(0)), 5000, 'write of nothing')).toBe(0);
    expect(m.readSync(0, 1)[0]).toBe(9);
  });
});

describe('mappings larger than an ArrayBuffer', () => {
  // On Node 20 the largest ArrayBuffer is 4 GiB; asking for more used to free the finalizer's
  // data twice ("free(): double free", SIGABRT). From Node 22 on it is 2^53 - 1 bytes, more than
  // any mapping: there the same mapping's `bytes` is all of it.
  const HUGE = 4 * GiB + PAGE;
  const pastLimit = HUGE > bufferConstants.MAX_LENGTH;
  it('bytes of a mapping past the limit is a RangeError, not an abort (Node 22+: within it, the whole mapping)', () => {
    const r = inChild('bytes');
    if (!pastLimit) {
      expect(r).toEqual({ ok: true, length: HUGE });
      return;
    }
    expect(r).toMatchObject({ ok: false, name: 'RangeError', code: 'ERR_PAGEMIRROR_VIEW_TOO_LARGE' });
    expect(r.message).toMatch(/MAX_LENGTH.*view\(offset, length\)/);
  }, 90_000);

  it('view() windows reach every part of a 4 GiB + 1 page mapping and see the same memory', () => {
    const m = mapAnonymous(HUGE, { noReserve: true });
    closers.push(() => m.close());
    if (pastLimit) expect(() => m.bytes).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_VIEW_TOO_LARGE' }));
    else expect(m.bytes.length).toBe(HUGE);
    const tail = m.view(4 * GiB - 8, PAGE + 8); // across the 4 GiB boundary, to the very end
    expect(tail.length).toBe(PAGE + 8);
    tail[0] = 1;
    tail[8] = 2;
    tail[PAGE + 7] = 3;
    expect([...m.readSync(4 * GiB - 8, 1), ...m.readSync(4 * GiB, 1), ...m.readSync(4 * GiB + PAGE - 1, 1)]).toEqual([1, 2, 3]);
    const again = m.view(4 * GiB, PAGE); // another window over the same pages
    expect(again[0]).toBe(2);
    expect(m.view(4 * GiB + PAGE).length).toBe(0); // the empty window at the end
    expect(m.view(5, 3).byteOffset).toBe(0);
  });

  it('view() arguments: typed errors before anything is mapped or created', () => {
    const m = mapAnonymous(2 * PAGE);
    closers.push(() => m.close());
    expect(() => m.view(-1)).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }));
    expect(() => m.view(0, 1.5)).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }));
    expect(() => m.view('0' as unknown as number)).toThrow(expect.objectContaining({ name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' }));
    expect(() => m.view(PAGE, PAGE + 1)).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }));
    expect(() => m.view(2 * PAGE + 1)).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }));
    m.protect('r', { offset: PAGE, length: PAGE });
    expect(() => m.view(PAGE, 1)).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_NOT_WRITABLE' }));
    expect(m.view(0, PAGE).length).toBe(PAGE); // the read-write part is fine
    m.close();
    expect(() => m.view(0, 1)).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
  });

  it('every view is detached, as bytes is, by close, remap, unmap, register and protect', () => {
    const make = () => {
      const m = mapAnonymous(4 * PAGE);
      closers.push(() => m.close());
      return { m, views: [m.bytes, m.view(0, PAGE), m.view(PAGE + 3, 10), m.view(2 * PAGE)] };
    };
    const detached = (views: Uint8Array[]) => views.every((v) => v.byteLength === 0);
    let t = make();
    t.m.close();
    expect(detached(t.views)).toBe(true);
    t = make();
    t.m.remap(8 * PAGE);
    expect(detached(t.views)).toBe(true);
    t = make();
    t.m.unmap(3 * PAGE, PAGE);
    expect(detached(t.views)).toBe(true);
    t = make();
    t.m.protect('r', { offset: 3 * PAGE, length: PAGE }); // elsewhere than most views: still all go
    expect(detached(t.views)).toBe(true);
    t = make();
    const uffd = Userfaultfd.open();
    closers.push(() => uffd.close());
    uffd.register(t.m, { offset: 3 * PAGE, length: PAGE });
    expect(detached(t.views)).toBe(true);
    expect(() => t.m.view(0, 1)).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_REGISTERED' }));
  });
});

describe('mirrors of ranges far larger than memory', () => {
  // The page table was flat (8 bytes per page, allocated up front): 2 GiB of table for a 1 TiB
  // range, and an uncaught std::bad_alloc (abort) for 2^46 bytes.
  it('a 1 TiB noReserve range: the device touches pages far apart; the table holds only their blocks', async () => {
    const TiB = 2 ** 40;
    const m = mapAnonymous(TiB, { noReserve: true });
    closers.push(() => m.close());
    const dev = Device.create({ faultAround: 2 << 20 });
    closers.push(() => dev.close());
    const mir = dev.mirror(m);
    closers.push(() => mir.close());
    const fresh = mir.info().tableBytes!;
    expect(fresh).toBeLessThanOrEqual(64 << 10); // the top level only (8 bytes per GiB)
    const offsets = [0, 3 * GiB + 5 * PAGE, 517 * GiB, TiB - 2 * PAGE];
    for (const [k, offset] of offsets.entries())
      await within(mir.run({ op: 'write', offset, npages: 2, seed: 100 + k }), 10_000, `device write at ${offset}`);
    for (const [k, offset] of offsets.entries()) {
      const v = await within(mir.run({ op: 'verify', offset, npages: 2, seed: 100 + k }), 10_000, `verify at ${offset}`);
      expect(v.mismatches, `at ${offset}`).toBe(0);
      expect(v.faults).toBe(0); // still mapped: nothing was lost from the sparse table
      // The CPU sees the device's data (a write kernel stores seed + word index, one word per page).
      expect(m.readSync(offset + PAGE, 8).readBigUInt64LE()).toBe(BigInt(100 + k) + BigInt(PAGE / 8));
    }
    const r = await within(mir.read(TiB - 2 * PAGE, 2), 10_000, 'device read of the last pages');
    expect(r.data.readBigUInt64LE(PAGE)).toBe(BigInt(100 + 3) + BigInt(PAGE / 8));
    // Four 2 MiB stretches, far apart, were touched: at most one block and one middle page each.
    const used = mir.info().tableBytes! - fresh;
    expect(used).toBeGreaterThan(0);
    expect(used).toBeLessThanOrEqual(offsets.length * (4104 + 4096));
    expect(dev.memory().tableBytes).toBe(mir.info().tableBytes);
    // Per-page objects for all of it would exhaust the heap: refused, with the way out.
    expect(() => mir.entries()).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }));
    expect(() => m.pagemap()).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }));
    expect(() => m.residency()).toThrow(expect.objectContaining({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE' }));
    expect(mir.entries(TiB / PAGE - 2, 2).map((e) => e.valid)).toEqual([true, true]);
    // Scans over the whole range (a snapshot, a migration back of everything, close) read the
    // table without filling it.
    const moved = await within(mir.migrateToDevice(517 * GiB, 2), 10_000, 'migrateToDevice');
    expect(moved.cpages).toBe(2);
    // DEV_PRIVATE_LOCAL | WRITE, then a page the 2 MiB fault-around made present (WRITE).
    expect([...mir.snapshot(517 * GiB, 3)]).toEqual([0x22, 0x22, 0x02]);
    expect(mir.snapshot(512 * GiB, 2048).every((b) => b === 0)).toBe(true);
    expect((await within(mir.migrateToHost(0, TiB / PAGE), 30_000, 'migrateToHost over 1 TiB')).cpages).toBe(2);
    expect(mir.info().tableBytes).toBe(fresh + used);
    mir.close();
    expect(dev.memory().tableBytes).toBe(0);
  }, 90_000);

  it('2^46 bytes, anonymous or memfd: mirrored and written at the far end, or a typed error; never an abort', () => {
    for (const what of ['mirror-anonymous', 'mirror-memfd']) {
      const r = inChild(what);
      if (r.ok) {
        expect(r.byte, what).toBe(0x5a);
        expect(r.tableBytes as number, what).toBeLessThanOrEqual(4 << 20);
      } else {
        expect(r.code, `${what}: ${r.message}`).toMatch(/^(ENOMEM|ERR_[A-Z_]+)$/);
      }
    }
  }, 150_000);

  // The access protocol with blocks allocated under it: device threads take first faults in fresh
  // 2 MiB blocks (each allocated by the range fault) while the CPU flips the protection.
  it('device writers filling fresh blocks while the CPU flips protection: no write through a stale entry', async () => {
    const m = mapAnonymous(GiB, { noReserve: true });
    closers.push(() => m.close());
    const dev = Device.create();
    closers.push(() => dev.close());
    const STEP = (16 << 20) / 8; // one word every 16 MiB: 64 blocks far apart
    const indices = new Uint32Array(64).map((_, k) => ((k * 37) % 64) * STEP + k);
    const words = () => [...indices].map((w) => m.readSync(w * 8, 8).readBigUInt64LE());
    let runs = 0;
    for (let round = 0; round < 8; round++) {
      const mir = dev.mirror(m); // a fresh table: every block is allocated again
      let stop = false;
      const writers = (async () => {
        while (!stop) {
          try {
            await mir.run({ op: 'write', threads: 2, pattern: 'gather', indices, ops: 4096, seed: round });
          } catch (err) {
            expect((err as { code: string }).code).toBe('EPERM'); // met read-only: refused, not crashed
          }
          runs++;
        }
      })();
      for (let i = 0; i < 10; i++) {
        m.protect('r');
        const before = words();
        await new Promise((r) => setTimeout(r, 1));
        expect(words()).toEqual(before);
        m.protect('rw');
        await new Promise((r) => setImmediate(r));
      }
      stop = true;
      await within(writers, 10_000, 'writers');
      const blocks = mir.info().tableBytes!;
      expect(blocks).toBeLessThanOrEqual(64 * (4104 + 4096) + 64);
      mir.close();
    }
    expect(dev.counters().invalidations.protect).toBeGreaterThanOrEqual(80);
    expect(runs).toBeGreaterThanOrEqual(8); // the writers ran in every round
  }, 60_000);
});
