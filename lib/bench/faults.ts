// The faults suite: the cost of each fault kind through the addon's native fast path and through a
// TypeScript batch handler, against the plain C baseline in the same run. Ratios of medians.
import { mapAnonymous, mapMemfd, type Mapping } from '../mapping.js';
import { Userfaultfd, type Rule } from '../uffd.js';
import { access } from '../access.js';
import { native } from '../native.js';
import { probe } from '../probe.js';
import { summarize, type Summary } from './stats.js';
import { runBaseline } from './baseline.js';
import { Progress } from './progress.js';

/** Options of {@link runFaults}. */
export interface FaultsOptions {
  /** Pages per repetition (16 MiB). @default 4096 */
  pages?: number;
  /** Repetitions (median of). Default 7, at least 5 for a reported ratio. */
  reps?: number;
  /** Pin this process and the C baseline to one CPU (faulter and handler share it). @default true */
  pin?: boolean;
  /** CPU to pin to. @default 0 */
  cpu?: number;
  quiet?: boolean;
}

/** One fault kind through the addon against the plain C baseline: medians and their ratio. */
export interface Comparison {
  scenario: string;
  path: 'native' | 'typescript';
  /** C baseline scenario it is compared with. */
  baseline: string;
  pages: number;
  addon: Summary & { samples: number[] };
  c: (Summary & { samples: number[] }) | null;
  /** addon median / C median (lower is better). */
  ratio: number | null;
  /** The ratio the issue asks for, when there is one. */
  target: number | null;
  pass: boolean | null;
  skipped?: string;
}

type Rep = () => Promise<number>; // ns per page for one repetition

const PAGE = native.uname().pageSize;

function fill(m: Mapping, seed: number): void {
  const w = new BigUint64Array(m.bytes.buffer);
  for (let i = 0; i < w.length; i++) w[i] = BigInt(seed) + BigInt(i);
}

async function timed(m: Mapping, op: 'read' | 'write', threads = 1, pages = m.length / PAGE): Promise<number> {
  const r = await access(m, { op, threads, ops: pages, unit: PAGE });
  if (r.signal) throw new Error(`access hit ${r.signal}`);
  return r.elapsedNs / pages;
}

function anon(pages: number): Mapping {
  // 2 MiB aligned, as the C baseline's regions are: fault-around blocks then start where it does.
  const m = mapAnonymous(pages * PAGE, { align: 2 << 20 });
  m.advise('nohugepage');
  return m;
}

/** One repetition: fresh memory, fresh userfaultfd, time only the faulting accesses. */
async function withUffd(
  make: () => { target: Mapping; others: Mapping[]; modes: ('missing' | 'wp' | 'minor')[]; before?: (u: Userfaultfd) => void },
  configure: (u: Userfaultfd, target: Mapping, others: Mapping[]) => void,
  run: (target: Mapping) => Promise<number>,
): Promise<number> {
  const { target, others, modes, before } = make();
  const u = Userfaultfd.open();
  try {
    u.register(target, { modes });
    before?.(u);
    configure(u, target, others);
    return await run(target);
  } finally {
    u.close();
    target.close();
    for (const o of others) o.close();
  }
}

function missingSetup(pages: number) {
  return () => {
    const src = anon(pages);
    fill(src, 3);
    return { target: anon(pages), others: [src], modes: ['missing' as const] };
  };
}

function rule(action: Rule['action'], granule?: number) {
  return (u: Userfaultfd, t: Mapping, others: Mapping[]) => {
    u.addRule({ mapping: t, action, source: others[0], granule });
    u.serve();
  };
}

/** The TypeScript batch handler: the whole batch resolved in one call, then replayed together. */
function tsCopy(u: Userfaultfd, t: Mapping, others: Mapping[]): void {
  const src = others[0]!;
  u.serve({
    onFaults(faults) {
      const offsets = new Float64Array(faults.length);
      for (let i = 0; i < faults.length; i++) offsets[i] = faults[i]!.offset;
      u.resolveMany('copy', t, offsets, { source: src });
    },
  });
}

function scenarios(pages: number): { name: string; path: 'native' | 'typescript'; baseline: string; target: number | null; rep: Rep; needs?: keyof ReturnType<typeof probe>['experiments']; threads?: number }[] {
  const batchThreads = 64;
  return [
    { name: 'missing-copy', path: 'native', baseline: 'missing-copy', target: 1.2, rep: () => withUffd(missingSetup(pages), rule('copy'), (t) => timed(t, 'write')) },
    { name: 'zeropage', path: 'native', baseline: 'zeropage', target: null, rep: () => withUffd(missingSetup(pages), rule('zero'), (t) => timed(t, 'read')) },
    { name: 'move', path: 'native', baseline: 'move', target: null, needs: 'move', rep: () => withUffd(missingSetup(pages), rule('move'), (t) => timed(t, 'write')) },
    {
      name: 'wp',
      path: 'native',
      baseline: 'wp',
      target: 1.2,
      needs: 'wp',
      rep: () =>
        withUffd(
          () => {
            const t = anon(pages);
            t.advise('populateWrite');
            return { target: t, others: [], modes: ['wp'], before: (u) => u.writeProtect(t, 0, t.length) };
          },
          rule('unprotect'),
          (t) => timed(t, 'write'),
        ),
    },
    {
      name: 'minor-continue',
      path: 'native',
      baseline: 'minor-continue',
      target: 1.2,
      needs: 'minor',
      rep: () =>
        withUffd(
          () => {
            const t = mapMemfd(pages * PAGE);
            const alias = t.alias();
            alias.advise('populateWrite');
            return { target: t, others: [alias], modes: ['minor'] };
          },
          (u, t) => {
            u.addRule({ mapping: t, action: 'continue' });
            u.serve();
          },
          (t) => timed(t, 'read'),
        ),
    },
    { name: 'around-64k', path: 'native', baseline: 'around-64k', target: 1.2, rep: () => withUffd(missingSetup(pages), rule('copy', 64 << 10), (t) => timed(t, 'write')) },
    { name: 'around-2m', path: 'native', baseline: 'around-2m', target: 1.2, rep: () => withUffd(missingSetup(Math.max(pages, 4096)), rule('copy', 2 << 20), (t) => timed(t, 'write')) },
    { name: 'missing-copy', path: 'typescript', baseline: 'missing-copy', target: null, rep: () => withUffd(missingSetup(pages), tsCopy, (t) => timed(t, 'write')) },
    {
      name: 'batch-64',
      path: 'typescript',
      baseline: 'batch',
      target: 2.0,
      threads: batchThreads,
      rep: () => batchRep(pages, batchThreads, tsCopy),
    },
    { name: 'batch-64', path: 'native', baseline: 'batch', target: null, threads: batchThreads, rep: () => batchRep(pages, batchThreads, rule('copy')) },
  ];
}

/** Rounds of 64 threads faulting 64 distinct fresh pages at once, as the C `batch` scenario. */
async function batchRep(pages: number, threads: number, configure: (u: Userfaultfd, t: Mapping, o: Mapping[]) => void): Promise<number> {
  const rounds = Math.max(1, Math.ceil(pages / threads));
  const t = anon(rounds * threads);
  const src = anon(rounds * threads);
  fill(src, 5);
  const u = Userfaultfd.open();
  try {
    u.register(t);
    configure(u, t, [src]);
    let ns = 0;
    for (let r = 0; r < rounds; r++) {
      const res = await access(t, { offset: r * threads * PAGE, length: threads * PAGE, op: 'write', threads, unit: PAGE });
      ns += res.elapsedNs;
    }
    return ns / (rounds * threads);
  } finally {
    u.close();
    t.close();
    src.close();
  }
}

/** The faults suite: the cost of each fault kind through the native fast path and a TypeScript handler against plain C. */
export async function runFaults(options: FaultsOptions = {}): Promise<Comparison[]> {
  const pages = options.pages ?? 4096;
  const reps = options.reps ?? 7;
  const pin = options.pin ?? true;
  const cpu = options.cpu ?? 0;
  const p = probe();
  const before = native.getAffinity();
  if (pin) native.setAffinity([cpu]);
  const list = scenarios(pages);
  const progress = new Progress(list.length, 'faults', options.quiet);
  const out: Comparison[] = [];
  try {
    for (const s of list) {
      if (!p.experiments.uffd.ok || (s.needs && !p.experiments[s.needs].ok)) {
        const why = !p.experiments.uffd.ok ? p.experiments.uffd.reason : p.experiments[s.needs!].reason;
        out.push({ scenario: s.name, path: s.path, baseline: s.baseline, pages, addon: { ...summarize([]), samples: [] }, c: null, ratio: null, target: s.target, pass: null, skipped: why });
        progress.step(`${s.name} (${s.path}) skipped`);
        continue;
      }
      // C and addon repetitions alternate, so drift of this noisy machine over the run (which moves
      // absolute times by 30 % and more) falls on both sides of the ratio alike.
      const cOpts = { pages: s.name === 'around-2m' ? Math.max(pages, 4096) : pages, reps: 1, threads: s.threads, cpu: pin ? cpu : undefined };
      await s.rep(); // warm-up, not recorded
      const samples: number[] = [];
      const cSamples: number[] = [];
      let skipped: string | undefined;
      for (let i = 0; i < reps; i++) {
        const c = await runBaseline(s.baseline, cOpts);
        if (c.skipped) skipped = c.skipped;
        if (c.samplesNsPerPage) cSamples.push(...c.samplesNsPerPage);
        samples.push(await s.rep());
      }
      const addon = { ...summarize(samples), samples };
      const cs = cSamples.length ? { ...summarize(cSamples), samples: cSamples } : null;
      const ratio = cs ? addon.median / cs.median : null;
      out.push({
        scenario: s.name,
        path: s.path,
        baseline: s.baseline,
        pages,
        addon,
        c: cs,
        ratio,
        target: s.target,
        pass: ratio === null || s.target === null ? null : ratio <= s.target,
        skipped,
      });
      progress.step(`${s.name} (${s.path}) ${addon.median.toFixed(0)} ns/page${ratio ? `, ${ratio.toFixed(2)}x C` : ''}`);
    }
  } finally {
    if (pin) native.setAffinity(before);
    progress.end();
  }
  return out;
}
