// mremap as the kernel has it: moving to a chosen address (MREMAP_FIXED), keeping the old range
// (MREMAP_DONTUNMAP), and mirrors that follow their mapping when it moves, shrinks or grows (the
// kernel's mirror follows the address space: its entries are invalidated, faults re-resolve at the
// new address, device-private pages travel with the page tables).
import { describe, it, expect } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { mapAnonymous, mapMemfd, mapFile, Device, Userfaultfd, type Mapping, type FileStrategy } from '../lib/index.js';
import { P, PAGE, within, requireCap, cleanupAfterEach } from './helpers.js';

const cleanup = cleanupAfterEach();

/** The /proc/self/maps lines that overlap [addr, addr + len). */
function vmasAt(addr: bigint, len: number): string[] {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => {
      const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(l);
      return m !== null && BigInt('0x' + m[1]) < addr + BigInt(len) && addr < BigInt('0x' + m[2]);
    });
}

/** A free, `align`-aligned range of len bytes about a terabyte below the mapping: far from everything. */
function farFrom(m: Mapping, len: number, align = 2 << 20): bigint {
  for (let tb = 1n; tb < 16n; tb++) {
    const a = (m.address - (tb << 40n)) & ~BigInt(align - 1);
    if (vmasAt(a, len).length === 0) return a;
  }
  throw new Error('no free range found below the mapping');
}

function fillPages(m: Mapping, value: (i: number) => bigint): void {
  const w = new BigUint64Array(m.bytes.buffer);
  for (let i = 0; i < m.length / PAGE; i++) w[(i * PAGE) / 8] = value(i);
}

/** The first word of each page of a device read. */
function words(data: Buffer, npages: number): bigint[] {
  return Array.from({ length: npages }, (_, i) => data.readBigUInt64LE(i * PAGE));
}

const V = (i: number) => BigInt(1000 + i);

function setup(npages: number, shared = false): { m: Mapping; dev: Device } {
  const m = shared ? mapMemfd(npages * PAGE) : mapAnonymous(npages * PAGE);
  cleanup.push(() => m.close());
  fillPages(m, V);
  const dev = Device.create({ memory: 1 << 20 });
  cleanup.push(() => dev.close());
  return { m, dev };
}

describe('remap to a chosen address (MREMAP_FIXED)', () => {
  it('a mirror follows its mapping far away: valid entries go, device pages stay in device memory, device and CPU read the data at the new address', async () => {
    const { m, dev } = setup(64);
    const mir = dev.mirror(m);
    cleanup.push(() => mir.close());
    expect(words((await mir.read(0, 64)).data, 64)).toEqual(Array.from({ length: 64 }, (_, i) => V(i)));
    await mir.migrateToDevice(32 * PAGE, 16);
    await mir.exclusive(56 * PAGE, 4);
    expect(dev.memory().used).toBe(20);
    const old = m.address;
    const far = farFrom(m, 64 * PAGE);
    expect(m.remap(64 * PAGE, { address: far })).toBe(far);
    expect(m.address).toBe(far);
    expect(vmasAt(old, 64 * PAGE)).toEqual([]); // the old range is gone
    const info = mir.info();
    expect(info.dead).toBe(false);
    expect(info.address).toBe(far);
    // Invalidated first: no entry is valid, and no exclusive access survives the move.
    expect(mir.entries().filter((e) => e.valid)).toEqual([]);
    expect(() => mir.checkExclusive(0, 64)).not.toThrow();
    // Device pages travelled with the page tables: still in device memory.
    expect(dev.memory().used).toBe(20);
    const d = await within(mir.read(0, 64), 10_000, 'device read after the move');
    expect(words(d.data, 64)).toEqual(Array.from({ length: 64 }, (_, i) => V(i)));
    // The CPU reads the data at the new address: device pages fault back from there.
    const cpu = await within(m.read(0, 64 * PAGE), 10_000, 'CPU read after the move');
    for (let i = 0; i < 64; i++) expect(cpu.readBigUInt64LE(i * PAGE)).toBe(V(i));
    expect(dev.memory().used).toBe(0);
    // Later migrations go on at the new address.
    await mir.migrateToDevice(0, 8);
    await m.write(3 * PAGE, Buffer.from(new BigUint64Array([77n]).buffer));
    expect((await mir.read(3 * PAGE, 1)).data.readBigUInt64LE()).toBe(77n);
  });

  it('a move the kernel chooses (mayMove) also keeps the mirror alive, with device pages on the device', async () => {
    const { m, dev } = setup(16);
    const mir = dev.mirror(m);
    cleanup.push(() => mir.close());
    await mir.migrateToDevice(0, 16);
    const before = m.address;
    const to = m.remap(1 << 30, { mayMove: true });
    expect(m.length).toBe(1 << 30);
    expect(mir.info().dead).toBe(false);
    expect(mir.info().address).toBe(to);
    if (to !== before) expect(dev.memory().used).toBe(16);
    const d = await within(mir.read(0, 16), 10_000, 'device read after the move');
    expect(words(d.data, 16)).toEqual(Array.from({ length: 16 }, (_, i) => V(i)));
    expect((await m.read(5 * PAGE, 8)).readBigUInt64LE()).toBe(V(5));
  });

  it('refuses a destination that is taken (EEXIST), and leaves that memory alone', async () => {
    const { m } = setup(4);
    const other = mapAnonymous(4 * PAGE);
    cleanup.push(() => other.close());
    other.bytes[0] = 42;
    const before = m.address;
    expect(() => m.remap(4 * PAGE, { address: other.address })).toThrow(
      expect.objectContaining({ code: 'EEXIST', syscall: 'mmap', errno: -17 }),
    );
    expect(other.bytes[0]).toBe(42);
    expect(m.address).toBe(before);
    expect(new BigUint64Array(m.bytes.buffer)[0]).toBe(V(0));
  });

  it('misuse is a typed error before any system call', () => {
    const { m } = setup(4);
    const far = farFrom(m, 4 * PAGE);
    const code = (c: string) => expect.objectContaining({ code: c });
    expect(() => m.remap(4 * PAGE, { address: far + 100n })).toThrow(code('ERR_PAGEMIRROR_UNALIGNED'));
    expect(() => m.remap(4 * PAGE, { address: m.address + BigInt(PAGE) })).toThrow(code('ERR_OUT_OF_RANGE'));
    expect(() => m.remap(8 * PAGE, { address: m.address - BigInt(PAGE) })).toThrow(code('ERR_OUT_OF_RANGE'));
    expect(() => m.remap(4 * PAGE, { address: Number(far) as unknown as bigint })).toThrow(code('ERR_INVALID_ARG_TYPE'));
    expect(() => m.remap(4 * PAGE, { address: far, mayMove: false })).toThrow(code('ERR_INVALID_ARG_VALUE'));
    expect(() => m.remap(4 * PAGE, { dontUnmap: true, mayMove: false })).toThrow(code('ERR_INVALID_ARG_VALUE'));
    expect(() => m.remap(8 * PAGE, { dontUnmap: true })).toThrow(code('ERR_OUT_OF_RANGE'));
    expect(() => m.remap(4 * PAGE, { dontUnmap: 'yes' as unknown as boolean })).toThrow(code('ERR_INVALID_ARG_TYPE'));
    expect(() => m.remap(4 * PAGE, { address: 2n ** 64n - BigInt(PAGE) })).toThrow(code('ERR_OUT_OF_RANGE'));
    // Nothing happened.
    expect(new BigUint64Array(m.bytes.buffer)[0]).toBe(V(0));
  });
});

describe('remap keeping the old range (MREMAP_DONTUNMAP)', () => {
  it('private memory: the data and the mirror move, the old range stays mapped, empty, owned by a new Mapping', async () => {
    const { m, dev } = setup(16);
    const mir = dev.mirror(m);
    cleanup.push(() => mir.close());
    await mir.read(0, 16);
    await mir.migrateToDevice(8 * PAGE, 8);
    const oldAddr = m.address;
    const old = m.remap(16 * PAGE, { dontUnmap: true });
    cleanup.push(() => old.close());
    expect(old.address).toBe(oldAddr);
    expect(old.length).toBe(16 * PAGE);
    expect(old.kind).toBe('anonymous');
    expect(m.address).not.toBe(oldAddr);
    expect(mir.info().address).toBe(m.address);
    expect(dev.memory().used).toBe(8);
    const d = await within(mir.read(0, 16), 10_000, 'device read after the move');
    expect(words(d.data, 16)).toEqual(Array.from({ length: 16 }, (_, i) => V(i)));
    const cpu = await within(m.read(0, 16 * PAGE), 10_000, 'CPU read after the move');
    for (let i = 0; i < 16; i++) expect(cpu.readBigUInt64LE(i * PAGE)).toBe(V(i));
    // The old range: still mapped, and empty (the kernel moved its pages), not registered with the
    // engine any more (a JavaScript view of it is safe).
    expect(vmasAt(oldAddr, 16 * PAGE).length).toBeGreaterThan(0);
    expect(old.registered).toBe(false);
    expect(old.bytes.every((b) => b === 0)).toBe(true);
    old.bytes[0] = 9; // ordinary private memory from now on
    expect((await m.read(0, 8)).readBigUInt64LE()).toBe(V(0));
    old.close();
    expect(vmasAt(oldAddr, 16 * PAGE)).toEqual([]);
    expect(m.closed).toBe(false);
  });

  it('shared memory: both ranges map the same pages; the mirror follows the new one', async () => {
    const { m, dev } = setup(8, true);
    const mir = dev.mirror(m);
    cleanup.push(() => mir.close());
    await mir.read(0, 8);
    const old = m.remap(8 * PAGE, { dontUnmap: true });
    cleanup.push(() => old.close());
    expect(old.kind).toBe('memfd');
    expect(old.fd).not.toBe(m.fd); // its own descriptor: each Mapping closes its own
    expect(new BigUint64Array(old.bytes.buffer)[3 * (PAGE / 8)]).toBe(V(3));
    old.writeSync(2 * PAGE, Buffer.from(new BigUint64Array([555n]).buffer));
    expect((await within(mir.read(2 * PAGE, 1), 10_000, 'device read')).data.readBigUInt64LE()).toBe(555n);
    old.close();
    expect((await m.read(2 * PAGE, 8)).readBigUInt64LE()).toBe(555n);
  });
});

describe('remap keeping the old range of a registered mapping', () => {
  it('the old range stays registered with the user\'s userfaultfd (the kernel keeps it there), so it hands out no view', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = mapAnonymous(4 * PAGE);
    cleanup.push(() => m.close());
    const u = Userfaultfd.open();
    cleanup.push(() => u.close());
    u.register(m);
    const old = m.remap(4 * PAGE, { dontUnmap: true });
    cleanup.push(() => old.close());
    expect(old.registered).toBe(true);
    expect(() => old.bytes).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_REGISTERED' }));
    expect(vmasAt(old.address, 4 * PAGE).join('\n')).toBeTruthy();
    u.unregister(old);
  });
});

describe('shrink and grow', () => {
  it('a shrink drops the tail (device pages too); device accesses there fail with EFAULT at once; a grow brings fresh pages back', async () => {
    const { m, dev } = setup(16);
    const mir = dev.mirror(m);
    cleanup.push(() => mir.close());
    const dev2 = Device.create({ memory: 1 << 20 });
    cleanup.push(() => dev2.close());
    const tail = dev2.mirror(m, { offset: 12 * PAGE, length: 4 * PAGE });
    cleanup.push(() => tail.close());
    await mir.read(0, 16);
    await mir.migrateToDevice(10 * PAGE, 6);
    expect(dev.memory().used).toBe(6);
    m.remap(8 * PAGE);
    expect(m.length).toBe(8 * PAGE);
    expect(dev.memory().used).toBe(0); // the tail's device pages went with it, as munmap takes them
    expect(mir.info().dead).toBe(false);
    expect(tail.info().dead).toBe(true); // everything it mirrored is gone
    expect(words((await mir.read(0, 8)).data, 8)).toEqual(Array.from({ length: 8 }, (_, i) => V(i)));
    const t0 = Date.now();
    await expect(within(mir.read(8 * PAGE, 1), 10_000, 'read past the end')).rejects.toMatchObject({ code: 'EFAULT' });
    expect(Date.now() - t0).toBeLessThan(900); // refused, not retried until the fault timeout
    m.remap(16 * PAGE);
    const d = await within(mir.read(0, 16), 10_000, 'device read after the grow');
    expect(words(d.data, 16)).toEqual(Array.from({ length: 16 }, (_, i) => (i < 8 ? V(i) : 0n)));
    await mir.migrateToDevice(12 * PAGE, 4);
    expect((await m.read(12 * PAGE, 8)).readBigUInt64LE()).toBe(0n);
  });
});

describe('mirror modes follow a move', () => {
  it('pin mode: the pinned pages move with the mapping, nothing diverges', async () => {
    const { m, dev } = setup(8);
    const mir = dev.mirror(m, { pin: true });
    cleanup.push(() => mir.close());
    const far = farFrom(m, 8 * PAGE);
    expect(m.remap(8 * PAGE, { address: far })).toBe(far);
    expect(mir.info()).toMatchObject({ dead: false, address: far });
    expect(mir.info().diverged).toBe(0);
    await m.write(PAGE, Buffer.from(new BigUint64Array([31n]).buffer));
    expect((await within(mir.read(PAGE, 1), 10_000, 'device read')).data.readBigUInt64LE()).toBe(31n);
  });

  it('single-writer mode on a memfd: write protection follows the move', async () => {
    const { m, dev } = setup(8, true);
    const mir = dev.mirror(m, { writeMode: 'single' });
    cleanup.push(() => mir.close());
    await mir.write(0, Buffer.alloc(PAGE, 1));
    const far = farFrom(m, 8 * PAGE);
    expect(m.remap(8 * PAGE, { address: far })).toBe(far);
    expect(mir.info()).toMatchObject({ dead: false, address: far });
    await within(mir.write(PAGE, Buffer.alloc(PAGE, 2)), 10_000, 'device write after the move');
    // The CPU's write at the new address must take the device's write access first (a WP fault
    // served by the engine), and then both agree.
    await within(m.write(PAGE, Buffer.from(new BigUint64Array([9n]).buffer)), 10_000, 'CPU write after the move');
    expect(mir.entries(1, 1)[0]!.write).toBe(false);
    expect((await mir.read(PAGE, 1)).data.readBigUInt64LE()).toBe(9n);
    expect((await m.read(0, 1)).readUInt8()).toBe(1);
  });
});

describe('moves under load', () => {
  it('two devices verify and migrate while the mapping moves back and forth and leaves old ranges behind: no wrong data, no hang', async () => {
    const N = 128;
    const { m, dev } = setup(N);
    const dev2 = Device.create({ memory: 1 << 20 });
    cleanup.push(() => dev2.close());
    const mirrors = [dev.mirror(m), dev2.mirror(m)];
    for (const mir of mirrors) cleanup.push(() => mir.close());
    await mirrors[0]!.run({ op: 'write', seed: 7, unit: 8 });
    let a = m.address;
    let b = farFrom(m, N * PAGE);
    let stop = false;
    const verify = async (mir: (typeof mirrors)[0]) => {
      let runs = 0;
      let mismatches = 0;
      while (!stop || runs < 2) {
        mismatches += (await mir.run({ op: 'verify', seed: 7, unit: 64, threads: 2 })).mismatches;
        runs++;
      }
      return { runs, mismatches };
    };
    // Migrations and CPU reads (which pull device pages back) between the moves, on both devices.
    let migrated = 0;
    const migrate = async () => {
      let n = 0;
      for (; !stop; n++, migrated++) {
        const off = ((n * 37) % (N / 16)) * 16 * PAGE;
        const r = await mirrors[n % 2]!.migrateToDevice(off, 16).catch((e: { code: string }) => {
          if (e.code !== 'ENOENT') throw e; // every page on the other device already
        });
        if (r && n % 3 === 0) await m.read(off, PAGE);
      }
      return n;
    };
    const work = Promise.all([verify(mirrors[0]!), verify(mirrors[1]!), migrate()]);
    let moves = 0;
    for (let k = 0; (k < 150 || migrated < 20) && k < 5000; k++) {
      try {
        if (k % 5 === 4) m.remap(N * PAGE, { dontUnmap: true }).close();
        else m.remap(N * PAGE, { address: m.address === a ? b : a });
        moves++;
      } catch (err) {
        const code = (err as { code: string }).code;
        // EEXIST: the range the mapping left was given to someone else meanwhile (a thread stack,
        // the allocator: the library refuses to unmap it), so move elsewhere from now on.
        if (code === 'EEXIST') {
          if (m.address === a) b = farFrom(m, N * PAGE);
          else a = farFrom(m, N * PAGE);
        } else if (code !== 'EBUSY') throw err; // EBUSY: a CPU read holds the mapping
      }
      await new Promise((r) => setTimeout(r, 1));
    }
    stop = true;
    const [r0, r1, migrations] = await within(work, 15_000, 'kernels and migrations during the moves');
    expect(r0.mismatches + r1.mismatches).toBe(0);
    expect(moves).toBeGreaterThan(50);
    expect(migrations).toBeGreaterThanOrEqual(20);
    for (const mir of mirrors) expect(mir.info().address).toBe(m.address);
    const cpu = await within(m.read(0, N * PAGE), 10_000, 'CPU read after the moves');
    const w = new BigUint64Array(cpu.buffer, cpu.byteOffset, cpu.length / 8);
    let bad = 0;
    for (let i = 0; i < w.length; i++) if (w[i] !== 7n + BigInt(i)) bad++;
    expect(bad).toBe(0);
  });
});

describe('file mirrors follow a move', () => {
  for (const strategy of ['remote', 'copy', 'bounce', 'pin'] as FileStrategy[]) {
    it(`${strategy} on tmpfs: the device's data survives the move and the CPU reads it at the new address`, async () => {
      const file = path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), `pm-remap-${process.pid}-${strategy}`);
      fs.writeFileSync(file, Buffer.alloc(8 * PAGE, 3));
      cleanup.push(() => fs.rmSync(file, { force: true }));
      const m = mapFile(file);
      cleanup.push(() => m.close());
      const dev = Device.create({ memory: 1 << 20 });
      cleanup.push(() => dev.close());
      const mir = dev.mirrorFile(m, { strategy });
      cleanup.push(() => mir.close());
      await mir.write(2 * PAGE, Buffer.alloc(PAGE, 0x5a));
      const far = farFrom(m, 8 * PAGE);
      expect(m.remap(8 * PAGE, { address: far })).toBe(far);
      expect(mir.info()).toMatchObject({ dead: false, address: far });
      expect((await within(mir.read(2 * PAGE, 1), 10_000, 'device read')).data[17]).toBe(0x5a);
      await mir.write(3 * PAGE, Buffer.alloc(PAGE, 0x6b));
      const cpu = await within(m.read(2 * PAGE, 2 * PAGE), 10_000, 'CPU read at the new address');
      expect(cpu[5]).toBe(0x5a);
      expect(cpu[PAGE + 5]).toBe(0x6b);
      await mir.fsync();
      const disk = fs.readFileSync(file);
      expect(disk[2 * PAGE]).toBe(0x5a);
      expect(disk[3 * PAGE]).toBe(0x6b);
      expect(disk[0]).toBe(3);
    });
  }
});
