// Argument generators for the API fuzzer. Each generator returns { value, kind, text }, where kind
// says what the public API must do with it:
//   'valid' - a value the call must take (it may still fail with a coded error: the kernel's say);
//   'edge'  - a value of the right type that may be accepted or refused (out of range for this
//             object, a closed object, null for an optional option): any coded outcome is fine;
//   'bad'   - a value the call must refuse with a coded TypeError/RangeError before doing anything.
// A call is 'bad' when any argument is; accepting it is a finding.

export const PAGE = 4096;

/** xorshift32: each call's arguments are reproducible from (seed, call index). */
export function rng(seed) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 0x100000000;
  };
}

export function describe(v) {
  if (typeof v === 'bigint') return `${v}n`;
  if (typeof v === 'symbol') return v.toString();
  if (typeof v === 'function') return 'function';
  if (typeof v === 'number') return Object.is(v, -0) ? '-0' : String(v);
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v);
  if (v === null || v === undefined) return String(v);
  if (v instanceof Uint8Array) return `${v.constructor.name}(${v.length})`;
  if (ArrayBuffer.isView(v)) return `${v.constructor.name}(${v.length})`;
  if (v?.__fuzzName) return v.__fuzzName;
  if (Array.isArray(v)) return `[${v.map(describe).join(', ')}]`;
  if (typeof v === 'object') {
    try {
      return `{${Object.entries(v)
        .map(([k, x]) => `${k}: ${describe(x)}`)
        .join(', ')}}`;
    } catch {
      return 'object';
    }
  }
  return String(v);
}

const v = (value, kind) => ({ value, kind });
const pick = (r, list) => list[Math.floor(r() * list.length)];

/** Values of the wrong type for almost any parameter. */
export function wrongType(r, exclude = []) {
  const all = [
    () => null,
    () => true,
    () => 'x',
    () => '',
    () => '4096',
    () => 'a\0b',
    () => 4096n,
    () => 2n ** 64n,
    () => Symbol('fuzz'),
    () => ({}),
    () => ({ bogus: 1, valueOf: () => 4096 }),
    () => [4096],
    () => [],
    () => () => 4096,
    () => new Uint8Array(8),
    () => new Date(0),
    () => NaN,
    () => 1.5,
    () => -1,
    () => Infinity,
    () => -Infinity,
    () => 2 ** 53,
    () => 2 ** 64,
    () => Number.MIN_SAFE_INTEGER,
  ];
  for (;;) {
    const x = pick(r, all)();
    if (!exclude.some((e) => Object.is(e, x) || (typeof e === 'string' && typeof x === e))) return x;
  }
}

/**
 * A non-negative integer parameter. valid/edge: lists of values of the right type; anything else
 * generated is bad. Numbers that are not safe integers or are negative are always bad.
 */
export function int(valid, edge = [], { optional = false } = {}) {
  return (r) => {
    const x = r();
    if (x < 0.45) return v(pick(r, valid), 'valid');
    if (x < 0.55 && edge.length) return v(pick(r, edge), 'edge');
    if (optional && x < 0.62) return v(undefined, 'valid');
    if (optional && x < 0.66) return v(null, 'edge');
    const w = wrongType(r, optional ? ['undefined', null] : []);
    return v(w, w === null && optional ? 'edge' : 'bad');
  };
}

export function bool({ optional = true } = {}) {
  return (r) => {
    const x = r();
    if (x < 0.6) return v(r() < 0.5, 'valid');
    if (optional && x < 0.7) return v(undefined, 'valid');
    if (optional && x < 0.74) return v(null, 'edge');
    return v(pick(r, ['x', 'true', 1, 0, {}, [], 1n, NaN]), 'bad');
  };
}

/** One of a set of names. */
export function oneOf(names, { optional = false, edge = [] } = {}) {
  return (r) => {
    const x = r();
    if (x < 0.5) return v(pick(r, names), 'valid');
    if (optional && x < 0.6) return v(undefined, 'valid');
    if (optional && x < 0.64) return v(null, 'edge');
    if (edge.length && x < 0.7) return v(pick(r, edge), 'edge');
    return v(pick(r, ['bogus', '', 'toString', '__proto__', 'constructor', names[0] + '\0', names[0].toUpperCase(), 5, {}, [names[0]], true]), 'bad');
  };
}

/** An array of names (categories, modes, features). */
export function namesArray(names, { optional = true, empty = 'valid' } = {}) {
  return (r) => {
    const x = r();
    if (x < 0.45) {
      const n = 1 + Math.floor(r() * 2);
      return v(Array.from({ length: n }, () => pick(r, names)), 'valid');
    }
    if (x < 0.52) return v([], empty);
    if (optional && x < 0.6) return v(undefined, 'valid');
    if (optional && x < 0.63) return v(null, 'edge');
    return v(pick(r, [names[0], 'bogus', ['bogus'], [names[0], 'bogus'], [5], [null], [['x']], {}, 5, { 0: names[0], length: 1 }, ['toString'], ['__proto__']]), 'bad');
  };
}

export function bigintU64({ optional = false } = {}) {
  return (r) => {
    const x = r();
    if (x < 0.5) return v(pick(r, [0n, 1n, 0x8000000000000000n, 2n ** 64n - 1n, 0x1234n]), 'valid');
    if (optional && x < 0.6) return v(undefined, 'valid');
    return v(pick(r, [-1n, 2n ** 64n, 5, '5', null, undefined, 1.5, {}, [1n], true]), 'bad');
  };
}

export function bytes(validLengths, edgeLengths = []) {
  return (r) => {
    const x = r();
    if (x < 0.5) {
      const b = r() < 0.5 ? new Uint8Array(pick(r, validLengths)) : Buffer.alloc(pick(r, validLengths));
      return v(b, 'valid');
    }
    if (x < 0.6 && edgeLengths.length) return v(new Uint8Array(pick(r, edgeLengths)), 'edge');
    return v(pick(r, [() => 'abcd', () => [1, 2, 3], () => new ArrayBuffer(PAGE), () => new Uint16Array(PAGE / 2), () => new DataView(new ArrayBuffer(8)), () => null, () => undefined, () => 5, () => ({ length: PAGE })])(), 'bad');
  };
}

/** A string (names, paths). NUL is always bad: the kernel would cut the string there. */
export function str(valid, edge = [], { optional = false } = {}) {
  return (r) => {
    const x = r();
    if (x < 0.5) return v(pick(r, valid), 'valid');
    if (edge.length && x < 0.6) return v(pick(r, edge), 'edge');
    if (optional && x < 0.66) return v(undefined, 'valid');
    return v(pick(r, ['a\0b', '\0', 5, {}, ['x'], true, Symbol('s'), ...(optional ? [] : [null, undefined])]), 'bad');
  };
}

/** A function parameter (callbacks). */
export function fn({ optional = true } = {}) {
  return (r) => {
    const x = r();
    if (x < 0.5) return v(() => {}, 'valid');
    if (optional && x < 0.7) return v(undefined, 'valid');
    return v(pick(r, [5, 'x', {}, [], true]), 'bad');
  };
}

/**
 * An options object: undefined, or an object with some of the fields (and maybe a bogus key, which
 * is ignored, as Node ignores unknown options). null, arrays and scalars are bad.
 */
export function options(fields, { optional = true, required = [] } = {}) {
  return (r, ctx) => {
    const x = r();
    if (optional && x < 0.12) return { value: undefined, kind: 'valid', text: 'undefined' };
    if (x < 0.2) {
      const w = pick(r, [null, 5, 'x', [], [{}], true, () => ({})]);
      return { value: w, kind: 'bad', text: describe(w) };
    }
    const o = {};
    let kind = 'valid';
    const parts = [];
    for (const [k, gen] of Object.entries(fields)) {
      if (!required.includes(k) && r() < 0.5) continue;
      const g = gen(r, ctx);
      o[k] = g.value;
      parts.push(`${k}: ${g.text ?? describe(g.value)}`);
      if (g.kind === 'bad') kind = 'bad';
      else if (g.kind === 'edge' && kind === 'valid') kind = 'edge';
    }
    if (r() < 0.15) {
      o.bogusKey = 'x';
      parts.push('bogusKey: "x"');
    }
    return { value: o, kind, text: `{${parts.join(', ')}}` };
  };
}

/** One of the worker's live objects (valid), a closed one (edge), or an impostor (bad). */
export function object(getLive, getClosed, { optional = false } = {}) {
  return (r, ctx) => {
    const x = r();
    if (x < 0.6) {
      const o = getLive(ctx, r);
      if (o) return v(o, 'valid');
    }
    if (x < 0.75) {
      const o = getClosed?.(ctx, r);
      if (o) return v(o, 'edge');
    }
    if (optional && x < 0.8) return v(undefined, 'valid');
    return v(pick(r, [null, undefined, {}, { native: {} }, 5, 'm', 1n, [], ctx.impostor]), 'bad');
  };
}
