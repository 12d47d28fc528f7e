// Checks on recorded traces shared by the trace and record tests.
import { expect } from 'vitest';
import { readTrace, type TraceRecord, type TraceSample } from '../lib/index.js';

/**
 * The write-round samples of a trace agree with its write faults: each sampled page has a write
 * fault in its range within the sample's interval, and each write fault is in the sample of its
 * range whose interval holds it. Returns the samples.
 */
export async function checkWriteRounds(tracePath: string): Promise<TraceSample[]> {
  const t = await readTrace(tracePath);
  const records: TraceRecord[] = [];
  for await (const r of t.records()) records.push(r);
  const samples = records.filter((r): r is TraceSample => r.type === 'sample');
  // Write-fault times by range and page.
  const writes = new Map<string, number[]>();
  for (const r of records)
    if (r.type === 'fault' && r.write) {
      const k = `${r.range}:${r.page}`;
      const times = writes.get(k);
      if (times) times.push(r.tNs);
      else writes.set(k, [r.tNs]);
    }
  const sampled = new Map<string, TraceSample[]>();
  for (const s of samples) {
    expect(s.method).toBe('wp-rounds');
    for (const run of s.runs)
      for (let p = run.first; p < run.first + run.count; p++) {
        const k = `${s.range}:${p}`;
        expect((writes.get(k) ?? []).some((t) => t >= s.startNs && t <= s.endNs), `range ${s.range} page ${p} sampled in [${s.startNs}, ${s.endNs}] without a write fault there`).toBe(true);
        const inSamples = sampled.get(k);
        if (inSamples) inSamples.push(s);
        else sampled.set(k, [s]);
      }
  }
  for (const [k, times] of writes)
    for (const t of times)
      expect((sampled.get(k) ?? []).some((s) => t >= s.startNs && t <= s.endNs), `the write fault on range:page ${k} at ${t} ns is in no sample`).toBe(true);
  return samples;
}
