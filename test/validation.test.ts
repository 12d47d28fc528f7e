// Argument validation of the public API (issue 9, section 4): each bad argument the audit found
// accepted, or refused with no code, is refused before any system call with Node's error shape.
import { describe, it, expect } from 'vitest';
import {
  mapAnonymous,
  mapMemfd,
  Userfaultfd,
  Device,
  decodePagemapEntry,
  decodeEntry,
  featureNames,
  ioctlNames,
  formatProbe,
  parseProt,
  probe,
  mapFile,
  fileSystemOf,
  access,
  forkAccess,
  _native,
  type Mapping,
} from '../lib/index.js';
import { P, PAGE, requireCap, cleanupAfterEach } from './helpers.js';

const closers = cleanupAfterEach();
function own<T extends { close(): void }>(x: T): T {
  closers.push(() => x.close());
  return x;
}
const typeErr = (code = 'ERR_INVALID_ARG_TYPE') => expect.objectContaining({ name: 'TypeError', code });
const rangeErr = (code = 'ERR_OUT_OF_RANGE') => expect.objectContaining({ name: 'RangeError', code });

describe('errors that had no code', () => {
  it('a bad protection string (protect, mapAnonymous, alias)', () => {
    const m = own(mapMemfd(PAGE));
    expect(() => m.protect('rwq')).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => mapAnonymous(PAGE, { prot: 'bogus' })).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => m.alias({ prot: 'q' })).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => m.protect(null as never)).toThrow(typeErr());
    expect(m.protection).toEqual([{ offset: 0, length: PAGE, prot: 3 }]);
  });

  it("scan({ require: ['bogus'] }) and a string where an array is expected", () => {
    const m = own(mapAnonymous(PAGE));
    expect(() => m.scan({ require: ['bogus' as never] })).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => m.scan({ require: 'present' as never })).toThrow(typeErr());
    expect(() => m.scan({ report: ['toString' as never] })).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => m.scan(null as never)).toThrow(typeErr());
  });

  it('unregister(null), resolveMany(action, m, null), has(bogus)', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = own(mapAnonymous(PAGE));
    const u = own(Userfaultfd.open());
    expect(() => u.unregister(null as never)).toThrow(typeErr());
    expect(() => u.resolveMany('zeropage', m, null as never)).toThrow(typeErr());
    expect(() => u.resolveMany('zeropage', m, [1.5])).toThrow(rangeErr());
    expect(() => u.resolveMany('zeropage', m, [0], { sourceOffsets: 'x' as never })).toThrow(typeErr());
    expect(() => u.has('bogus' as never)).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => u.has(5 as never)).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
  });

  it('non-bigint input to decodePagemapEntry, decodeEntry, featureNames, ioctlNames; formatProbe({})', () => {
    for (const f of [decodePagemapEntry, decodeEntry, featureNames, ioctlNames] as ((x: unknown) => unknown)[]) {
      expect(() => f(5)).toThrow(typeErr());
      expect(() => f('5')).toThrow(typeErr());
      expect(() => f(-1n)).toThrow(rangeErr());
      expect(() => f(1n << 64n)).toThrow(rangeErr());
      f((1n << 64n) - 1n);
    }
    expect(() => formatProbe({} as never)).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => formatProbe('x' as never)).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(formatProbe(probe())).toMatch(/^kernel /);
  });

  it('null options are refused with a code, not a property read', () => {
    expect(() => mapAnonymous(PAGE, null as never)).toThrow(typeErr());
    expect(() => probe(null as never)).toThrow(typeErr());
    expect(() => Device.create(true as never)).toThrow(typeErr());
    const m = own(mapAnonymous(PAGE));
    expect(() => m.residency(null as never)).toThrow(typeErr());
    expect(() => m.sync([] as never)).toThrow(typeErr());
  });
});

describe('bad arguments that were accepted', () => {
  it('a memfd name containing NUL (the kernel would cut it there)', () => {
    expect(() => mapMemfd(PAGE, { name: 'a\0b' })).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => mapMemfd(PAGE, { name: 5 as never })).toThrow(typeErr());
  });

  it('non-boolean options (pin: "x", populate: 1, lease: "yes")', () => {
    const m = own(mapMemfd(PAGE));
    const d = own(Device.create({ memory: 16 * PAGE }));
    expect(() => d.mirror(m, { pin: 'x' as never })).toThrow(typeErr());
    expect(() => mapAnonymous(PAGE, { populate: 1 as never })).toThrow(typeErr());
    expect(() => d.mirrorFile(m, { lease: 'yes' as never })).toThrow(typeErr());
    expect(() => m.sync({ async: 'no' as never })).toThrow(typeErr());
    expect(() => Device.create({ trace: 'on' as never })).toThrow(typeErr());
    expect(() => Device.create({ watermark: 2 })).toThrow(rangeErr());
  });

  it('sourceOffset of -Infinity, 1.5 or ""', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = own(mapAnonymous(PAGE));
    const src = own(mapAnonymous(PAGE));
    const u = own(Userfaultfd.open());
    for (const bad of [-Infinity, 1.5, '']) {
      expect(() => u.addRule({ mapping: m, action: 'copy', source: src, sourceOffset: bad as never })).toThrow(expect.objectContaining({ code: expect.stringMatching(/^ERR_(OUT_OF_RANGE|INVALID_ARG_TYPE)$/) }));
      expect(() => u.copy(m, 0, PAGE, src, { sourceOffset: bad as never })).toThrow(expect.objectContaining({ code: expect.stringMatching(/^ERR_(OUT_OF_RANGE|INVALID_ARG_TYPE)$/) }));
    }
    expect(u.rules).toEqual([]);
    expect(() => u.addRule({ mapping: m, action: 'zero', wp: 'x' as never })).toThrow(typeErr());
  });

  it('parseProt(-1 | 8 | 1.5) and other numbers that are no protection', () => {
    for (const p of [-1, 8, 1.5, NaN, Infinity]) expect(() => parseProt(p)).toThrow(rangeErr());
    expect(() => parseProt(4n as never)).toThrow(typeErr());
    expect([parseProt(0), parseProt(7), parseProt('rw'), parseProt('none'), parseProt('r-x')]).toEqual([0, 7, 3, 0, 5]);
  });

  it('numbers given as bigints to a device kernel, and a bad outcome to close() on a closed userfaultfd', async (ctx) => {
    const m = own(mapAnonymous(PAGE));
    const d = own(Device.create({ memory: 16 * PAGE }));
    const mi = own(d.mirror(m));
    await expect(mi.run({ stride: 4096n as never })).rejects.toThrow(typeErr());
    expect(() => mi.entries(0n as never)).toThrow(typeErr());
    expect(() => mi.snapshot(0n as never)).toThrow(typeErr());
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const u = Userfaultfd.open();
    u.close();
    expect(() => u.close('bogus' as never)).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
  });

  it('a path with NUL (mapFile, fileSystemOf), and unchecked numbers (hugePageSize, alias offset)', () => {
    expect(() => mapFile('/dev/shm/x\0y', { create: true, length: PAGE })).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => fileSystemOf('/\0')).toThrow(typeErr('ERR_INVALID_ARG_VALUE'));
    expect(() => mapAnonymous(PAGE, { hugePageSize: 'x' as never })).toThrow(typeErr());
    const m = own(mapMemfd(PAGE));
    expect(() => (m as Mapping).alias({ offset: 1.5 })).toThrow(rangeErr());
  });
});

describe('found by the fuzzer', () => {
  it('an access kernel at an offset that is not a multiple of 8 is refused (misaligned 8-byte words: UBSan)', async () => {
    const m = own(mapAnonymous(2 * PAGE));
    await expect(access(m, { offset: PAGE - 1, op: 'write', ops: 16 })).rejects.toThrow(rangeErr('ERR_PAGEMIRROR_UNALIGNED'));
    await expect(forkAccess(m, { offset: 4 })).rejects.toThrow(rangeErr('ERR_PAGEMIRROR_UNALIGNED'));
    // The addon refuses it too, for a caller that goes around the TypeScript layer.
    expect(() => _native.runAccess(m.native, 12, 64, { op: 'write' })).toThrow(rangeErr('ERR_PAGEMIRROR_UNALIGNED'));
    expect(m.readSync(0, PAGE).every((b) => b === 0)).toBe(true);
    await access(m, { offset: 8, length: 64, op: 'write' });
  });
});
