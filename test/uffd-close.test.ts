// Closing a userfaultfd with threads asleep on it, POISON, process exit and failing handlers:
// nothing may be left asleep. Faults are taken by native access threads only.
import { describe, it, expect } from 'vitest';
import { mapAnonymous, Userfaultfd, access, type Fault } from '../lib/index.js';
import { P, PAGE, requireCap, waitFor, within, runFixture } from './helpers.js';

// dist/ (which the fixtures import) is compiled once per run by test/global-setup.ts.

/** N native threads, one page each, all asleep on MISSING faults that onFaults leaves unresolved. */
async function sleepers(n: number, features?: Parameters<typeof Userfaultfd.open>[0]) {
  const m = mapAnonymous(n * PAGE);
  const uffd = Userfaultfd.open(features);
  const handed: Fault[] = [];
  uffd.register(m);
  uffd.serve({ onFaults: (faults) => void handed.push(...faults) });
  let done = false;
  const p = access(m, { op: 'read', threads: n });
  p.then(
    () => (done = true),
    () => (done = true),
  );
  // outstanding() counts a fault when the service thread forwards it; onFaults sees it a little later.
  await waitFor(() => uffd.outstanding().length === n && handed.length === n, 5000, `${n} faults handed to JavaScript`);
  return { m, uffd, handed, p, isDone: () => done };
}

describe('close() with threads asleep', () => {
  it("close('wake') wakes every sleeping thread; anonymous pages then read as zero", async () => {
    const N = 4;
    const { m, uffd, handed, p, isDone } = await sleepers(N);
    try {
      expect(handed.map((f) => f.offset).sort((a, b) => a - b)).toEqual([0, 1, 2, 3].map((i) => i * PAGE));
      await new Promise((r) => setTimeout(r, 20));
      expect(isDone()).toBe(false); // really asleep: nobody resolved anything
      uffd.close('wake');
      expect(uffd.closed).toBe(true);
      const r = await within(p, 5000, 'access after close(wake)');
      expect(r.signal).toBeUndefined();
      expect(r.ops).toBe(N);
      expect(r.checksum).toBe(0n);
      expect(m.registered).toBe(false);
    } finally {
      uffd.close();
      await within(p, 5000, 'access').catch(() => {});
      m.close();
    }
  });

  it("close('zero') zero-fills the faults handed to JavaScript and the access completes", async () => {
    const N = 4;
    const { m, uffd, p, isDone } = await sleepers(N);
    try {
      const pending = uffd.outstanding().sort();
      expect(pending).toEqual([0, 1, 2, 3].map((i) => m.address + BigInt(i * PAGE)).sort());
      expect(isDone()).toBe(false);
      uffd.close('zero');
      const r = await within(p, 5000, 'access after close(zero)');
      expect(r.signal).toBeUndefined();
      expect(r.ops).toBe(N);
      expect(r.checksum).toBe(0n);
      expect(uffd.outstanding()).toEqual([]);
      // The pages are in place (zero pages), readable without any descriptor now.
      expect(m.residency().every(Boolean)).toBe(true);
      expect(Array.from(m.readSync(0, N * PAGE)).every((b) => b === 0)).toBe(true);
    } finally {
      uffd.close();
      await within(p, 5000, 'access').catch(() => {});
      m.close();
    }
  });

  it("close('sigbus') poisons the pending faults: the sleeping accesses get SIGBUS inside the mapping", async (ctx) => {
    requireCap(ctx, P.experiments.poison, 'UFFDIO_POISON');
    const N = 4;
    const { m, uffd, p } = await sleepers(N, { features: ['poison'] });
    try {
      expect(uffd.has('poison')).toBe(true);
      uffd.close('sigbus');
      const r = await within(p, 5000, 'access after close(sigbus)');
      expect(r.signal).toBe('SIGBUS');
      expect(r.signalAddress).toBeDefined();
      expect(r.signalAddress! >= m.address && r.signalAddress! < m.address + BigInt(N * PAGE)).toBe(true);
      expect(r.ops).toBe(0); // every thread stopped at its first (and only) page
      // The poison markers outlive the descriptor: every page still raises SIGBUS.
      for (let i = 0; i < N; i++) {
        const again = await within(access(m, { op: 'read', offset: i * PAGE, length: PAGE }), 5000, `re-read page ${i}`);
        expect(again.signal).toBe('SIGBUS');
        expect(again.signalAddress).toBe(m.address + BigInt(i * PAGE));
      }
    } finally {
      uffd.close();
      await within(p, 5000, 'access').catch(() => {});
      m.close();
    }
  });

  it("close('sigbus') without the poison feature is refused and leaves the descriptor open", async () => {
    const uffd = Userfaultfd.open({ features: [] });
    try {
      expect(() => uffd.close('sigbus')).toThrow(expect.objectContaining({ code: 'ERR_PAGEMIRROR_FEATURE' }));
      expect(uffd.closed).toBe(false);
    } finally {
      uffd.close();
    }
    expect(uffd.closed).toBe(true);
  });
});

describe('POISON', () => {

  it('poison() on a fault makes the accessing thread report SIGBUS at that page', async (ctx) => {
    requireCap(ctx, P.experiments.poison, 'UFFDIO_POISON');
    const m = mapAnonymous(4 * PAGE);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(m);
      const seen: number[] = [];
      uffd.serve({
        onFaults(faults, u) {
          for (const f of faults) {
            seen.push(f.offset);
            if (f.offset === 2 * PAGE) expect(u.poison(m, f.offset, PAGE)).toEqual({ bytes: PAGE, exists: false });
            else u.zeropage(m, f.offset, PAGE);
          }
        },
      });
      const r = await within(access(m, { op: 'read' }), 10_000, 'read into poison');
      expect(r.signal).toBe('SIGBUS');
      expect(r.signalAddress).toBe(m.address + BigInt(2 * PAGE));
      expect(r.ops).toBe(2); // pages 0 and 1 read; the thread stopped at page 2
      expect(r.checksum).toBe(0n);
      expect(seen).toEqual([0, PAGE, 2 * PAGE]);
      expect(uffd.stats().faults).toBe(3);
      // Poison is not a fault any more: a second access gets SIGBUS without reaching the handler,
      // and the pages around it still work.
      const again = await within(access(m, { op: 'read', offset: 2 * PAGE, length: PAGE }), 5000, 're-read poison');
      expect(again.signal).toBe('SIGBUS');
      const after = await within(access(m, { op: 'read', offset: 3 * PAGE, length: PAGE }), 5000, 'read past poison');
      expect(after.signal).toBeUndefined();
      expect(uffd.stats().faults).toBe(4);
    } finally {
      uffd.close();
      m.close();
    }
  });

  it('a poisoned page touched from the JavaScript thread after close() kills the process with SIGBUS', (ctx) => {
    requireCap(ctx, P.experiments.poison, 'UFFDIO_POISON');
    const res = runFixture('close-poison.mjs');
    expect(res.error, String(res.error)).toBeUndefined();
    // The access thread caught its SIGBUS; the JavaScript thread's touch could not be caught.
    expect(res.lines).toContain(`access ops=2 signal=SIGBUS at=${2 * PAGE}`);
    expect(res.lines).toContain('page0=0 page1=0');
    expect(res.lines).toContain('touching');
    expect(res.lines.some((l) => l.startsWith('survived'))).toBe(false);
    expect(res.signal, res.stdout + res.stderr).toBe('SIGBUS');
  });
});

describe('process exit', () => {

  it('process.exit() with threads asleep on unresolved faults exits promptly with its status', () => {
    const res = runFixture('close-exit.mjs');
    expect(res.error, `the child hung: ${String(res.error)}; stdout: ${res.stdout}`).toBeUndefined();
    expect(res.lines).toContain('asleep 4');
    expect(res.signal, res.stderr).toBeNull();
    expect(res.status, res.stdout + res.stderr).toBe(0);
    expect(res.ms).toBeLessThan(5000);
  });
});

describe('failing handlers', () => {
  it('a handler that throws: the batch is zero-filled by the fallback and onError gets the error', async () => {
    const m = mapAnonymous(4 * PAGE);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(m);
      const errors: { err: unknown; faults: Fault[] }[] = [];
      let calls = 0;
      uffd.serve({
        onFaults() {
          calls++;
          throw new Error('handler failed');
        },
        onError: (err, faults) => void errors.push({ err, faults }),
      });
      const r = await within(access(m, { op: 'read', threads: 2 }), 10_000, 'access with a throwing handler');
      expect(r.signal).toBeUndefined();
      expect(r.ops).toBe(4);
      expect(r.checksum).toBe(0n);
      expect(errors.length).toBe(calls);
      expect(calls).toBeGreaterThan(0);
      for (const e of errors) expect((e.err as Error).message).toBe('handler failed');
      expect(errors.flatMap((e) => e.faults.map((f) => f.offset)).sort((a, b) => a - b)).toEqual([0, 1, 2, 3].map((i) => i * PAGE));
      expect(uffd.stats().faults).toBe(4);
      expect(uffd.outstanding()).toEqual([]);
    } finally {
      uffd.close();
      m.close();
    }
  });

  it('an async handler that rejects: same fallback, after the rejection', async () => {
    const m = mapAnonymous(4 * PAGE);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(m);
      const errors: unknown[] = [];
      let handled = 0;
      uffd.serve({
        async onFaults(faults) {
          await new Promise((r) => setTimeout(r, 5));
          handled += faults.length;
          throw new Error('async handler failed');
        },
        onError: (err) => void errors.push(err),
      });
      const r = await within(access(m, { op: 'read' }), 10_000, 'access with a rejecting handler');
      expect(r.ops).toBe(4);
      expect(r.checksum).toBe(0n);
      expect(handled).toBe(4);
      expect(errors.length).toBeGreaterThan(0);
      for (const e of errors) expect((e as Error).message).toBe('async handler failed');
    } finally {
      uffd.close();
      m.close();
    }
  });
});

describe('after close()', () => {
  it('closing twice is a no-op; every resolve call afterwards throws ERR_PAGEMIRROR_CLOSED', async () => {
    const m = mapAnonymous(4 * PAGE);
    const src = mapAnonymous(PAGE);
    const uffd = Userfaultfd.open();
    try {
      uffd.register(m);
      uffd.serve({ onFaults: (faults, u) => faults.forEach((f) => u.zeropage(m, f.offset, PAGE)) });
      const r = await within(access(m, { op: 'read', length: PAGE }), 5000, 'one fault');
      expect(r.checksum).toBe(0n);
      uffd.close();
      expect(() => uffd.close()).not.toThrow();
      expect(() => uffd.close('zero')).not.toThrow();
      expect(uffd.closed).toBe(true);
      expect(m.registered).toBe(false);
      expect(uffd.registrations).toEqual([]);

      const closed = expect.objectContaining({ code: 'ERR_PAGEMIRROR_CLOSED' });
      const calls: [string, () => unknown][] = [
        ['copy', () => uffd.copy(m, PAGE, PAGE, src)],
        ['copy(address)', () => uffd.copy(m.address + BigInt(PAGE), 0, PAGE, new Uint8Array(PAGE))],
        ['zeropage', () => uffd.zeropage(m, PAGE, PAGE)],
        ['continue', () => uffd.continue(m, PAGE, PAGE)],
        ['move', () => uffd.move(m, PAGE, PAGE, src)],
        ['poison', () => uffd.poison(m, PAGE, PAGE)],
        ['writeProtect', () => uffd.writeProtect(m, 0, PAGE)],
        ['unprotect', () => uffd.unprotect(m, 0, PAGE)],
        ['wake', () => uffd.wake(m, 0, PAGE)],
        ['register', () => uffd.register(m)],
        ['unregister', () => uffd.unregister(m)],
        ['serve', () => uffd.serve({})],
        ['addRule', () => uffd.addRule({ mapping: m, action: 'zero' })],
        ['clearRules', () => uffd.clearRules()],
      ];
      for (const [name, call] of calls) {
        let thrown: unknown;
        try {
          call();
        } catch (err) {
          thrown = err;
        }
        expect(thrown, name).toBeInstanceOf(Error);
        expect(thrown, name).toEqual(closed);
      }
      // The memory itself is ordinary again: JavaScript may touch it.
      expect(m.bytes[0]).toBe(0);
    } finally {
      uffd.close();
      m.close();
      src.close();
    }
  });
});
