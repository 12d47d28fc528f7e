// The API fuzzer's short seeded run (npm run fuzz makes 10,000+ calls): random bad and edge
// arguments to every export and method, in worker processes, so a crash or a hang is counted.
import { describe, it, expect } from 'vitest';
import * as lib from '../lib/index.js';
// @ts-expect-error plain JavaScript module (the workers run without a TypeScript step)
import { runFuzz, findings, summary } from './fuzz/runner.mjs';
// @ts-expect-error plain JavaScript module
import { targets, nativeTargets, NATIVE_OBJECTS } from './fuzz/targets.mjs';

const SEED = Number(process.env.PAGEMIRROR_FUZZ_SEED ?? 9);

type Fn = (...a: unknown[]) => unknown;
const isClass = (f: Fn) => /^class\b/.test(Function.prototype.toString.call(f));
/** Own methods (not getters, not the constructor) of a prototype or a class's statics. */
function methodsOf(o: object, skip: string[]): string[] {
  return Object.getOwnPropertyNames(o).filter((k) => !skip.includes(k) && typeof Object.getOwnPropertyDescriptor(o, k)!.value === 'function');
}

/**
 * What the public surface has and the fuzzer does not call: every function lib/index.ts exports,
 * every static and prototype method of every class it exports (Mirror and FileMirror, which
 * Device returns, among them; a subclass's inherited methods are the base class's entries), and
 * every function and method of the addon it exports as _native.
 */
function notFuzzed(): string[] {
  const names = new Set<string>([...targets(lib, {}), ...nativeTargets(lib, {})].map((t: { name: string }) => t.name));
  const missing: string[] = [];
  const want = (name: string) => {
    if (!names.has(name)) missing.push(name);
  };
  for (const [k, v] of Object.entries(lib)) {
    if (k === '_native' || typeof v !== 'function') continue;
    if (!isClass(v as Fn)) {
      want(k);
      continue;
    }
    for (const s of methodsOf(v, ['length', 'name', 'prototype'])) want(`${k}.${s}`);
    for (const m of methodsOf((v as { prototype: object }).prototype, ['constructor'])) want(`${k}.${m}`);
  }
  const native = lib._native as unknown as Record<string, Fn & { prototype: object }>;
  for (const [k, v] of Object.entries(native)) {
    if (typeof v !== 'function') continue;
    if (!names.has(`_native.${k}`) && !names.has(`new _native.${k}`)) missing.push(`_native.${k}`);
  }
  for (const [obj, cls] of Object.entries(NATIVE_OBJECTS as Record<string, string>))
    for (const m of methodsOf(native[cls].prototype, ['constructor'])) if (!names.has(`_native.${obj}.${m}`)) missing.push(`_native.${cls}.prototype.${m}`);
  return missing;
}

describe('API fuzz', () => {
  it('covers every export, every method of the exported classes and of the addon: an API added without fuzzing fails here', () => {
    expect(notFuzzed()).toEqual([]);
    // The check sees what it claims to: the classes the library hands out are among the exports.
    expect(Object.keys(lib)).toEqual(expect.arrayContaining(['Mapping', 'Userfaultfd', 'Device', 'Mirror', 'FileMirror']));
    expect(Object.keys(NATIVE_OBJECTS).length).toBe(6);
  });

  it(`2,000 seeded calls (seed ${SEED}): no crash, no hang, every error coded, no bad argument accepted`, { timeout: 120_000 }, async () => {
    const r = await runFuzz({ seed: SEED, calls: 2000 });
    console.log(summary(r));
    expect(findings(r), summary(r)).toEqual([]);
    // The run reached the library: most calls made it past set-up, and bad ones were refused.
    expect(r.calls).toBeGreaterThanOrEqual(1900);
    expect(r.byKind.bad).toBeGreaterThan(400);
    expect(r.byKind.valid).toBeGreaterThan(400);
    expect(r.codes.ERR_INVALID_ARG_TYPE).toBeGreaterThan(0);
  });
});
