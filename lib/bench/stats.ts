// Summary statistics for benchmark samples: medians (these machines are noisy), min, max, percentiles.

/** Median, min, max and mean of a set of samples. */
export interface Summary {
  /** Samples. */
  n: number;
  /** The median (what the reports compare). */
  median: number;
  /** The smallest sample. */
  min: number;
  /** The largest sample. */
  max: number;
  /** The arithmetic mean. */
  mean: number;
}

/** The q-quantile (0..1) of sorted samples, interpolated. */
export function quantile(sorted: ArrayLike<number>, q: number): number {
  if (sorted.length === 0) return NaN;
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo]! + (sorted[hi]! - sorted[lo]!) * (pos - lo);
}

/** The {@link Summary} of samples (any order). */
export function summarize(samples: readonly number[]): Summary {
  const s = [...samples].sort((a, b) => a - b);
  return {
    n: s.length,
    median: quantile(s, 0.5),
    min: s[0] ?? NaN,
    max: s[s.length - 1] ?? NaN,
    mean: s.reduce((a, b) => a + b, 0) / (s.length || 1),
  };
}

/** p50/p99 etc. of a latency array (ns), without copying into a JS array first. */
export function percentiles(lat: Uint32Array, qs: readonly number[]): number[] {
  const s = Uint32Array.from(lat).sort();
  return qs.map((q) => quantile(s, q));
}
