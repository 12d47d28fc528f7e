// The API fuzzer's short seeded run (npm run fuzz makes 10,000+ calls): random bad and edge
// arguments to every export and method, in worker processes, so a crash or a hang is counted.
import { describe, it, expect } from 'vitest';
// @ts-expect-error plain JavaScript module (the workers run without a TypeScript step)
import { runFuzz, findings, summary } from './fuzz/runner.mjs';

const SEED = Number(process.env.PAGEMIRROR_FUZZ_SEED ?? 9);

describe('API fuzz', () => {
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
