// The statistics the benchmark verdicts rest on: pure functions, checked against values worked by hand.
import { describe, it, expect } from 'vitest';
import { pairedRatio } from '../lib/bench/pager.js';

describe('pairedRatio: median of paired ratios and its sign-test interval', () => {
  it('5 pairs: [min, max] at 1 - 2/32 = 93.75 %; an interval across the target is undecided', () => {
    const r = pairedRatio([1.0, 1.05, 1.2, 0.9, 1.08]);
    expect(r.median).toBe(1.05);
    expect([r.low, r.high]).toEqual([0.9, 1.2]);
    expect(r.confidence).toBeCloseTo(0.9375, 10);
    expect(r.verdict).toBe('undecided');
    expect(r.pairs).toEqual([1.0, 1.05, 1.2, 0.9, 1.08]); // run order kept
  });

  it('9 pairs: the 2nd smallest to the 2nd largest, at 1 - 2 * 10/512 (96 %)', () => {
    const meets = pairedRatio([0.7, 1.0, 1.02, 0.95, 1.09, 0.98, 1.3, 1.01, 0.99]);
    expect([meets.low, meets.high]).toEqual([0.95, 1.09]); // 0.7 and 1.3 fall outside
    expect(meets.confidence).toBeCloseTo(1 - 20 / 512, 10);
    expect(meets.verdict).toBe('meets');
    const misses = pairedRatio([1.2, 1.15, 1.4, 1.12, 1.05, 1.3, 1.25, 1.18, 1.22]);
    expect(misses.low).toBe(1.12);
    expect(misses.verdict).toBe('misses');
  });

  it('3 pairs give only [min, max] at 75 %; one pair is its own interval at 0 %', () => {
    const r = pairedRatio([1.3, 0.8, 1.0]);
    expect([r.low, r.median, r.high]).toEqual([0.8, 1.0, 1.3]);
    expect(r.confidence).toBeCloseTo(0.75, 10);
    const one = pairedRatio([1.2]);
    expect([one.low, one.high, one.confidence, one.verdict]).toEqual([1.2, 1.2, 0, 'misses']);
  });
});
