// Error paths, as carefully as success paths: every misuse is a typed error raised before any
// system call, every kernel failure has Node's system-error shape, and nothing is lost.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, mapMemfd, Userfaultfd, access, isSystemError, Mapping, _native } from '../lib/index.js';
import { P, PAGE, requireCap } from './helpers.js';

function thrown(fn: () => unknown): Error & Record<string, unknown> {
  try {
    fn();
  } catch (err) {
    return err as Error & Record<string, unknown>;
  }
  throw new Error('expected a throw');
}

describe('system errors', () => {
  it('have code, negative errno, syscall and a Node-style message', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = mapAnonymous(PAGE);
    const a = Userfaultfd.open();
    const b = Userfaultfd.open();
    try {
      a.register(m);
      const err = thrown(() => b.register(m)); // one range, one userfaultfd
      expect(isSystemError(err)).toBe(true);
      expect(err).toMatchObject({ code: 'EBUSY', errno: -16, syscall: 'ioctl(UFFDIO_REGISTER)' });
      expect(err.message).toMatch(/^EBUSY: Device or resource busy, ioctl\(UFFDIO_REGISTER\) \(the range is registered with another userfaultfd\)$/);
    } finally {
      a.close();
      b.close();
      m.close();
    }
  });

  it('COPY into a range no userfaultfd registered is ENOENT, with the address', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = mapAnonymous(PAGE);
    const u = Userfaultfd.open();
    try {
      const err = thrown(() => u.copy(m, 0, PAGE, new Uint8Array(PAGE)));
      expect(err).toMatchObject({ code: 'ENOENT', syscall: 'ioctl(UFFDIO_COPY)', address: m.address, bytes: 0 });
      expect(m.readSync(0, 1)[0]).toBe(0); // nothing was installed; the JS thread may still touch it
    } finally {
      u.close();
      m.close();
    }
  });

  it('registering before negotiation, twice-negotiated API, and event features without serve()', (ctx) => {
    requireCap(ctx, P.experiments.events, 'uffd events');
    const m = mapAnonymous(PAGE);
    const u = Userfaultfd.open({ features: ['eventUnmap'] });
    try {
      expect(thrown(() => u.register(m))).toMatchObject({ code: 'ERR_PAGEMIRROR_NOT_SERVING' });
      expect(m.registered).toBe(false);
      const raw = _native.openUserfaultfd({});
      expect(thrown(() => raw.register(m.native, 0, PAGE, 1))).toMatchObject({ code: 'ERR_PAGEMIRROR_NOT_NEGOTIATED' });
      raw.api(0n);
      expect(thrown(() => raw.api(0n))).toMatchObject({ code: 'EINVAL', syscall: 'ioctl(UFFDIO_API)' });
      raw.close('wake');
    } finally {
      u.close();
      m.close();
    }
  });
});

describe('misuse is caught before any system call', () => {
  it('unknown features, modes, actions and outcomes are TypeErrors', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    expect(() => Userfaultfd.open({ features: ['nope' as never] })).toThrow(expect.objectContaining({ name: 'TypeError', code: 'ERR_INVALID_ARG_VALUE' }));
    const m = mapAnonymous(PAGE);
    const u = Userfaultfd.open();
    try {
      expect(() => u.register(m, { modes: ['sometimes' as never] })).toThrow(TypeError);
      expect(() => u.register(m, { modes: [] })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_VALUE' }));
      expect(() => u.register({} as Mapping)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
      expect(() => u.addRule({ mapping: m, action: 'teleport' as never })).toThrow(TypeError);
      expect(() => u.addRule({ mapping: m, action: 'copy' })).toThrow(expect.objectContaining({ message: expect.stringMatching(/source/) }));
      expect(() => u.addRule({ mapping: m, action: 'zero', granule: 3 * PAGE })).toThrow(expect.objectContaining({ name: 'RangeError' }));
      expect(u.rules).toEqual([]); // a refused rule leaves the rule set as it was
      expect(() => u.close('explode' as never)).toThrow(TypeError);
      expect(u.closed).toBe(false);
    } finally {
      u.close();
      m.close();
    }
  });

  it('unaligned or out-of-range resolve arguments are RangeErrors', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = mapAnonymous(2 * PAGE);
    const u = Userfaultfd.open();
    try {
      u.register(m);
      expect(() => u.zeropage(m, 1, PAGE)).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_UNALIGNED' }));
      expect(() => u.zeropage(m, 0, 3 * PAGE)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(() => u.zeropage(m, 0, 0)).toThrow(RangeError);
      expect(() => u.copy(m, 0, PAGE, new Uint8Array(10))).toThrow(expect.objectContaining({ message: expect.stringMatching(/source is shorter/) }));
      expect(() => u.zeropage(m, -PAGE, PAGE)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(m.residency()).toEqual([false, false]); // nothing happened
    } finally {
      u.close();
      m.close();
    }
  });

  it('resolveMany validates the whole batch before the first ioctl', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = mapAnonymous(4 * PAGE);
    const u = Userfaultfd.open();
    try {
      u.register(m);
      expect(() => u.resolveMany('zeropage', m, [0, PAGE, 9 * PAGE])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(m.pagemap().some((p) => p.present)).toBe(false); // not even the first two
      expect(() => u.resolveMany('copy', m, [0])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
      expect(u.resolveMany('zeropage', m, [0, 2 * PAGE])).toEqual({ bytes: 2 * PAGE, exists: 0 });
      expect(u.resolveMany('zeropage', m, [0, PAGE])).toEqual({ bytes: PAGE, exists: 1 });
    } finally {
      u.close();
      m.close();
    }
  });

  it('closed objects say so', (ctx) => {
    requireCap(ctx, P.experiments.uffd, 'userfaultfd');
    const m = mapAnonymous(PAGE);
    const u = Userfaultfd.open();
    u.close();
    m.close();
    expect(() => u.register(m)).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    expect(() => u.serve()).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    expect(() => m.protect('r')).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    expect(() => m.readSync(0, 1)).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' }));
    return expect(access(m)).rejects.toMatchObject({ code: 'ERR_PAGEMIRROR_CLOSED' });
  });

  it('the native classes cannot be constructed directly', () => {
    expect(() => new (_native as unknown as { Mapping: new () => unknown }).Mapping()).toThrow(
      expect.objectContaining({ code: 'ERR_ILLEGAL_CONSTRUCTOR' }),
    );
    expect(() => _native.runAccess({} as never, 0, 8, {})).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARG_TYPE' }));
  });

  it('bad access options are refused before threads start', async () => {
    const m = mapMemfd(PAGE);
    try {
      await expect(access(m, { op: 'scribble' as never })).rejects.toThrow(TypeError);
      await expect(access(m, { threads: 0 })).rejects.toThrow(RangeError);
      await expect(access(m, { unit: 12 })).rejects.toThrow(RangeError);
      await expect(access(m, { length: 4 })).rejects.toThrow(RangeError);
      await expect(access(m, { offset: PAGE, length: 8 })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    } finally {
      m.close();
    }
  });
});
