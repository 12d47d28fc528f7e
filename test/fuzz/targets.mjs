// What the fuzzer calls: every exported function of lib/index.ts and every method of its classes,
// each with a generator per parameter (see values.mjs for valid / edge / bad). Valid values are
// small on purpose: the fuzzer must never map, allocate or run anything big for real.
import fs from 'node:fs';
import path from 'node:path';
import { PAGE, int, bool, oneOf, namesArray, bigintU64, bytes, str, fn, options, object, wrongType, describe } from './values.mjs';

const SMALL = [0, PAGE, 2 * PAGE];
const LEN = [PAGE, 2 * PAGE, 4 * PAGE];
// Right type, beyond the fixtures' 4 pages: must be refused with a code (or be a no-op).
const FAR = [PAGE - 1, 1, 64 * PAGE, 2 ** 40, Number.MAX_SAFE_INTEGER];
const NPAGES = [1, 2, 4];
const PROT_STRINGS = ['rw', 'r', 'rwx', '', 'none', 'r-', '-w-'];

const range = () => options({ offset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }) });

function prot({ optional = false } = {}) {
  return (r) => {
    const x = r();
    if (x < 0.3) return { value: PROT_STRINGS[Math.floor(r() * PROT_STRINGS.length)], kind: 'valid' };
    if (x < 0.45) return { value: Math.floor(r() * 8), kind: 'valid' };
    if (optional && x < 0.55) return { value: undefined, kind: 'valid' };
    const bad = ['bogus', 'rwq', 'R', 'w\0', -1, 8, 1.5, NaN, Infinity, 2 ** 53, 4n, {}, ['r'], true, Symbol('p')];
    if (!optional) bad.push(null, undefined);
    return { value: bad[Math.floor(r() * bad.length)], kind: 'bad' };
  };
}

// Targets: a Mapping (live or closed), a bigint address, or something else (bad).
const mappingOf = (kinds) => object((c, r) => c.pick(r, kinds.map((k) => c[k]).filter(Boolean)), (c) => c.closedMap);
const anyMapping = mappingOf(['anon', 'memfd', 'file']);
function target() {
  return (r, c) => {
    const x = r();
    if (x < 0.6) return anyMapping(r, c);
    if (x < 0.75) return { value: c.anon?.closed ? 0n : c.anon?.address ?? 0n, kind: 'edge' };
    return { value: [null, undefined, 5, 'x', {}, c.impostor][Math.floor(r() * 6)], kind: 'bad' };
  };
}

const call = (name, params, run, extra = {}) => ({ name, params, run, ...extra });

// A small valid trace (docs/trace-format.md) in the worker's directory: one fault, then the end.
function traceFile(c) {
  const p = path.join(c.dir, 'fuzz.pmtrace');
  if (fs.existsSync(p)) return p;
  let json = JSON.stringify({ format: 'pagemirror-trace', version: 1, pageSize: PAGE, clock: 'monotonic-ns-since-start', ranges: [{ index: 0, length: 4 * PAGE }], sampling: { method: 'none' } });
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const head = Buffer.alloc(16);
  head.write('PMTRACE\0', 0, 'latin1');
  head.writeUInt32LE(1, 8);
  head.writeUInt32LE(json.length, 12);
  const rec = Buffer.alloc(48);
  rec.writeUInt8(1, 0); // a write fault on page 1
  rec.writeUInt8(1, 1);
  rec.writeBigUInt64LE(1n, 8);
  rec.writeUInt8(4, 24); // end: one fault
  rec.writeBigUInt64LE(1n, 32);
  fs.writeFileSync(p, Buffer.concat([head, Buffer.from(json), rec]));
  return p;
}
// A trace to read: the valid one, a file that is not a trace or none (edge), or no path (bad).
function tracePath() {
  return (r, c) => {
    const x = r();
    if (x < 0.6) return { value: traceFile(c), kind: 'valid' };
    if (x < 0.75) return { value: [c.filePath, path.join(c.dir, 'missing.pmtrace')][Math.floor(r() * 2)], kind: 'edge' };
    return { value: [5, null, undefined, 'a\0b', {}, []][Math.floor(r() * 6)], kind: 'bad' };
  };
}
// A recorder over a page of the worker's memory on a userfaultfd of its own (stopped at cleanup).
function recorder(c, lib) {
  if (c.recorder) return c.recorder;
  const u = c.own(lib.Userfaultfd.open());
  const rec = lib.recordTrace(u, { path: path.join(c.dir, 'rec.pmtrace'), ranges: [{ address: c.anon3.address, length: PAGE }], sampleIntervalMs: 0 });
  c.own({ close: () => rec.stop() });
  return (c.recorder = rec);
}

const FORK_OPS = ['read', 'write', 'verify', 'migrate', 'migrate-back', 'cpu-read', 'cpu-write', 'cpu-verify'];
// forkRun()'s step list: up to three small steps, or something that is no list of steps. A step out
// of the range is its own error, not a rejection (edge).
function forkSteps() {
  const step = options(
    { op: oneOf(FORK_OPS), offset: int([0, PAGE], [2 ** 40], { optional: true }), npages: int([1, 2], [0, 2 ** 40], { optional: true }), seed: int([1, 7], [], { optional: true }) },
    { optional: false, required: ['op'] },
  );
  return (r, c) => {
    if (r() < 0.15) return { value: [null, undefined, 'x', 5, {}, [null], [5]][Math.floor(r() * 7)], kind: 'bad' };
    const steps = [];
    const texts = [];
    let kind = 'valid';
    for (let i = Math.floor(r() * 4); i > 0; i--) {
      const g = step(r, c);
      steps.push(g.value);
      texts.push(g.text ?? describe(g.value));
      if (g.kind === 'bad') kind = 'bad';
      else if (g.kind === 'edge' && kind === 'valid') kind = 'edge';
    }
    return { value: steps, kind, text: `[${texts.join(', ')}]` };
  };
}
// ServeOptions.poll / EngineOptions.poll: false, 'adaptive' or { spinUs }.
function pollOption() {
  return (r) => {
    const x = r();
    if (x < 0.3) return { value: undefined, kind: 'valid' };
    if (x < 0.6) return { value: [false, 'adaptive', { spinUs: 10 }, {}][Math.floor(r() * 4)], kind: 'valid' };
    if (x < 0.7) return { value: { spinUs: [0, 10 ** 9][Math.floor(r() * 2)] }, kind: 'edge' };
    return { value: ['x', true, 5, [], { spinUs: -1 }, { spinUs: 'x' }][Math.floor(r() * 6)], kind: 'bad' };
  };
}
// DeviceOptions.link: a preset, parameters (from a preset or not), or something no link is.
function linkOption() {
  return (r) => {
    const x = r();
    if (x < 0.3) return { value: undefined, kind: 'valid' };
    if (x < 0.6)
      return { value: ['pcie3x16', 'cxl', {}, { latencyUs: 1, bandwidthGBs: 2, faultRoundUs: 3, remoteAccessNs: 4 }, { preset: 'pcie4x16', curvePerKiB: 0.1 }][Math.floor(r() * 5)], kind: 'valid' };
    const bad = ['pcie9', '', 5, true, [], null, { latencyUs: -1 }, { bandwidthGBs: 0 }, { faultRoundUs: NaN }, { remoteAccessNs: Infinity }, { latencyMs: 1 }, { preset: 'x' }, { bandwidthGBs: '1' }];
    return { value: bad[Math.floor(r() * bad.length)], kind: 'bad' };
  };
}
// The child is killed well inside the worker's bound on an async call.
const forkOptions = { memory: int([16 * PAGE], [1, PAGE + 1], { optional: true }), timeoutMs: int([1000, 2500], [0, 600_001], { optional: true }) };

// The receiver: a live object or a closed one. A foreign `this` is not an argument: not fuzzed.
const self = (getLive, getClosed) => (r, c) => {
  const closed = r() < 0.2 ? getClosed(c) : undefined;
  return closed ? { value: closed, kind: 'edge' } : { value: getLive(c, r), kind: 'valid' };
};

/** Every target; `run(ctx, args)` performs the call. `safe`: a fully valid call is harmless. */
export function targets(lib, ctx) {
  const { Mapping } = lib;
  const live = (k) => (c) => c[k];
  return [
    // Functions exported by lib/index.ts.
    call('mapAnonymous', [int(LEN, [1, 3 * PAGE + 1]), options({ prot: prot({ optional: true }), populate: bool(), noReserve: bool(), shared: bool(), hugetlb: bool(), hugePageSize: int([2 << 20], [12345], { optional: true }), align: int([PAGE, 65536, 2 << 20], [3, 3 * PAGE], { optional: true }) })], (c, a) => c.own(lib.mapAnonymous(...a))),
    call('mapMemfd', [int(LEN, [1]), options({ name: str(['fuzz', ''], ['a'.repeat(300)], { optional: true }), prot: prot({ optional: true }), populate: bool(), noReserve: bool(), hugetlb: bool(), hugePageSize: int([2 << 20], [12345], { optional: true }) })], (c, a) => c.own(lib.mapMemfd(...a))),
    call(
      'mapFile',
      [
        (r, c) => {
          const x = r();
          if (x < 0.4) return { value: c.filePath, kind: 'valid' };
          if (x < 0.5) return { value: path.join(c.dir, 'missing'), kind: 'edge' };
          if (x < 0.6) return { value: { fd: c.file?.closed ? 0 : c.file?.fd ?? 0 }, kind: 'valid' };
          if (x < 0.7) return { value: { fd: [-1, 1.5, 'x', null, 2 ** 40][Math.floor(r() * 5)] }, kind: 'bad' };
          return { value: [c.filePath + '\0x', 5, null, undefined, [], true][Math.floor(r() * 6)], kind: 'bad' };
        },
        options({ length: int(LEN, [1], { optional: true }), offset: int([0, PAGE], [PAGE + 1, 2 ** 40], { optional: true }), prot: prot({ optional: true }), shared: bool(), populate: bool(), noReserve: bool(), sync: bool(), create: bool(), mode: int([0o600, 0o644], [0o7777, 0o100000], { optional: true }) }),
      ],
      (c, a) => c.own(lib.mapFile(...a)),
    ),
    call('decodePagemapEntry', [bigintU64()], (c, a) => lib.decodePagemapEntry(...a)),
    call('decodeEntry', [bigintU64()], (c, a) => lib.decodeEntry(...a)),
    call('featureNames', [bigintU64()], (c, a) => lib.featureNames(...a)),
    call('ioctlNames', [bigintU64()], (c, a) => lib.ioctlNames(...a)),
    call('parseProt', [prot()], (c, a) => lib.parseProt(...a)),
    call('isSystemError', [(r) => ({ value: wrongType(r), kind: 'valid' })], (c, a) => lib.isSystemError(...a)),
    call(
      'formatProbe',
      [(r, c) => (r() < 0.4 ? { value: c.probe, kind: 'valid' } : { value: [undefined, null, {}, { kernel: {} }, 5, 'x', { ...c.probe, uffd: {} }][Math.floor(r() * 7)], kind: 'bad' })],
      (c, a) => lib.formatProbe(...a),
    ),
    call('probe', [options({ refresh: bool() })], (c, a) => lib.probe(...a)),
    call('fileSystemOf', [str(['/dev/shm', '/'], ['/nonexistent-pagemirror-fuzz'])], (c, a) => lib.fileSystemOf(...a)),
    call(
      'access',
      [mappingOf(['anon', 'memfd']), options({ offset: int(SMALL, FAR, { optional: true }), length: int([8, PAGE], FAR, { optional: true }), op: oneOf(['read', 'write', 'rmw', 'verify'], { optional: true }), pattern: oneOf(['sequential', 'strided', 'random'], { optional: true }), unit: int([8, PAGE], [7, 9], { optional: true }), stride: int([PAGE], [0], { optional: true }), ops: int([1, 16], [0], { optional: true }), seed: int([1, 7], [], { optional: true }), threads: int([1, 2], [], { optional: true }), latency: bool(), barrier: bool() })],
      (c, a) => lib.access(...a),
      { async: true, needsUnregistered: true },
    ),
    call(
      'forkAccess',
      [mappingOf(['anon', 'memfd']), options({ offset: int(SMALL, [], { optional: true }), length: int([8, PAGE], [], { optional: true }), op: oneOf(['read', 'write', 'rmw', 'verify'], { optional: true }), ops: int([1, 4], [], { optional: true }), delayMs: int([0, 1], [], { optional: true }) })],
      (c, a) => lib.forkAccess(...a),
      { async: true, needsUnregistered: true, rare: true },
    ),
    call('Userfaultfd.open', [options({ features: (r) => (r() < 0.4 ? oneOf(['default', 'all'])(r) : namesArray(['move', 'poison', 'pagefaultFlagWp'])(r)), userModeOnly: bool(), via: oneOf(['auto', 'device', 'syscall'], { optional: true }) })], (c, a) => c.own(lib.Userfaultfd.open(...a))),
    // adopt() takes any descriptor number this process has: only refusals are fuzzed.
    call('Userfaultfd.adopt', [(r) => ({ value: [-1, 1.5, 'x', null, undefined, NaN, 2 ** 53][Math.floor(r() * 7)], kind: 'bad' }), bigintU64()], (c, a) => c.own(lib.Userfaultfd.adopt(...a))),
    call('Device.create', [options({ name: str(['d'], [], { optional: true }), memory: int([16 * PAGE, 1 << 20], [PAGE + 1], { optional: true }), faultBatch: int([1, 32], [0, 65537], { optional: true }), faultAround: int([PAGE, 16 * PAGE], [PAGE + 1, 3 * PAGE], { optional: true }), timeoutMs: int([100, 1000], [0], { optional: true }), placement: oneOf(['host', 'device'], { optional: true }), eviction: oneOf(['off', 'fifo', 'lru'], { optional: true }), watermark: (r) => (r() < 0.5 ? { value: [0.5, 1][Math.floor(r() * 2)], kind: 'valid' } : r() < 0.6 ? { value: undefined, kind: 'valid' } : { value: [-1, 2, NaN, 'x', Infinity, {}][Math.floor(r() * 6)], kind: 'bad' }), prefetch: oneOf(['off', 'sequential', 'density'], { optional: true }), preallocate: bool(), trace: bool(), traceCapacity: int([16, 1024], [0], { optional: true }), link: linkOption() })], (c, a) => c.own(lib.Device.create(...a))),
    call(
      'pager',
      [
        (r, c) => {
          const x = r();
          if (x < 0.4) return { value: null, kind: 'valid' };
          if (x < 0.7) return { value: c.filePath, kind: 'valid' };
          if (x < 0.8) return { value: [path.join(c.dir, 'missing'), -1, 2 ** 31][Math.floor(r() * 3)], kind: 'edge' };
          return { value: [undefined, {}, [], true, 1.5, c.filePath + '\0'][Math.floor(r() * 6)], kind: 'bad' };
        },
        options({
          granule: int([PAGE, 4 * PAGE], [3 * PAGE, 4 << 20], { optional: true }),
          mode: oneOf(['private', 'shared'], { optional: true }),
          residentLimit: int([2 * PAGE, 4 * PAGE], [0, 1], { optional: true }),
          eviction: oneOf(['fifo', 'clock'], { optional: true }),
          prefetch: bool(),
          writeback: (r) => (r() < 0.8 ? oneOf(['confirmed', 'pagecache'], { optional: true })(r) : { value: false, kind: 'valid' }),
          workers: int([1, 2], [0, 65], { optional: true }),
          offset: int([0, PAGE], [1, 2 ** 40], { optional: true }),
          length: int([4 * PAGE], [0, 1, 2 ** 40], { optional: true }),
          fill: (r) => (r() < 0.5 ? { value: [undefined, 'zero', { seed: 3 }][Math.floor(r() * 3)], kind: 'valid' } : { value: ['bogus', { seed: 'x' }, 5][Math.floor(r() * 3)], kind: 'bad' }),
        }),
      ],
      async (c, a) => c.own(await lib.pager(...a)),
      { async: true },
    ),
    call('readTrace', [tracePath()], (c, a) => lib.readTrace(...a), { async: true }),
    call(
      'writeTrace',
      [
        str(['w.pmtrace']),
        options(
          {
            ranges: (r) => (r() < 0.6 ? { value: [{ length: PAGE }, { length: 4 * PAGE }].slice(0, 1 + Math.floor(r() * 2)), kind: 'valid' } : { value: [[], 'x', [{ length: 1 }], [{ length: -PAGE }], [null]][Math.floor(r() * 5)], kind: 'bad' }),
            pageSize: int([PAGE], [3, 1, 2 ** 31], { optional: true }),
          },
          { optional: false, required: ['ranges'] },
        ),
        (r) => {
          const fault = { type: 'fault', kind: 'missing', write: true, range: 0, page: 0, tNs: 1, tid: 0 };
          const added = { type: 'range-added', range: 2, start: '0x10000000', length: PAGE, modes: ['missing'], shared: false, tNs: 2 };
          const removed = { type: 'range-removed', range: 0, tNs: 3 };
          if (r() < 0.6) return { value: [[], [fault], [fault, { type: 'sample', method: 'pagemap-scan-written', range: 0, startNs: 0, endNs: 2, runs: [{ first: 0, count: 1 }] }], [fault, removed]][Math.floor(r() * 4)], kind: 'valid' };
          return { value: [5, null, [{ type: 'x' }], [{ ...fault, page: 2 ** 40 }], [{ ...fault, kind: 'y' }], [{ ...fault, range: 9 }], [null], [added], [{ ...added, range: 0 }], [{ ...added, start: 'x' }], [{ ...added, start: '0x1001' }], [{ ...added, modes: ['q'] }], [removed, removed], [removed, fault], [{ ...removed, range: 9 }]][Math.floor(r() * 15)], kind: 'bad' };
        },
      ],
      (c, [p, ...a]) => lib.writeTrace(typeof p === 'string' && !p.includes('\0') ? path.join(c.dir, p) : p, ...a),
      { async: true },
    ),
    call(
      'recordTrace',
      [
        object((c) => c.uffd, (c) => c.closedUffd),
        options(
          {
            path: (r, c) => (r() < 0.7 ? { value: path.join(c.dir, 'r.pmtrace'), kind: 'valid' } : { value: ['', 'a\0b', 5, null][Math.floor(r() * 4)], kind: 'bad' }),
            ranges: (r, c) => (r() < 0.6 ? { value: [{ address: c.anon3?.closed ? 4096n : c.anon3?.address ?? 4096n, length: PAGE }], kind: 'valid' } : { value: [[], 'x', [{ address: 1n, length: PAGE }], [{ mapping: 5 }], [{ address: 4096n, length: 1 }], [null]][Math.floor(r() * 6)], kind: 'bad' }),
            mapping: (r, c) => (r() < 0.8 ? { value: undefined, kind: 'valid' } : { value: [5, {}, null][Math.floor(r() * 3)], kind: 'bad' }),
            sampleIntervalMs: int([0, 10], [3600001], { optional: true }),
            sampleMethod: (r) => (r() < 0.8 ? { value: [undefined, 'pagemap-scan-written', 'wp-rounds'][Math.floor(r() * 3)], kind: 'valid' } : { value: ['none', 5, ''][Math.floor(r() * 3)], kind: 'bad' }),
            ringCapacity: int([16, 1024], [0, 2 ** 30], { optional: true }),
            pid: int([0], [2 ** 23], { optional: true }),
          },
          { optional: false, required: ['path', 'ranges'] },
        ),
      ],
      (c, a) => {
        const rec = lib.recordTrace(...a);
        c.own({ close: () => rec.stop() });
        return rec;
      },
    ),
    call('configureEngine', [options({ workers: int([1, 2], [0, 65], { optional: true }), poll: pollOption() })], (c, a) => lib.configureEngine(...a)),
    call('engineStats', [], () => lib.engineStats()),

    // Mapping.
    ...[
      ['protect', [prot(), range()]],
      ['advise', [oneOf(['normal', 'random', 'sequential', 'willneed', 'dontneed', 'cold', 'pageout'], { edge: ['remove', 'free', 'hugepage', 'collapse', 'populateRead', 'populateWrite'] }), range()]],
      ['sync', [options({ offset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }), async: bool(), invalidate: bool() })]],
      // address: the mapping's own start (overlaps: refused), or somewhere that may be taken (EEXIST) or free.
      ['remap', [int(LEN, [1, 64 * PAGE]), options({ mayMove: bool(), dontUnmap: bool(), address: (r, c) => (r() < 0.5 ? { value: undefined, kind: 'valid' } : r() < 0.7 ? { value: [c.anon?.closed ? 0n : c.anon?.address ?? 0n, 2n ** 46n, 4096n][Math.floor(r() * 3)], kind: 'edge' } : { value: [1n, -1n, 2n ** 64n, 4096, 'x', null][Math.floor(r() * 6)], kind: 'bad' }) })]],
      ['punchHole', [int(SMALL, FAR), int(LEN, [1])]],
      ['allocate', [int(SMALL, [1]), int(LEN, [1]), options({ keepSize: bool(), zero: bool() })]],
      ['truncateFile', [int(LEN, [0, 1])]],
      ['residency', [range()]],
      ['cachestat', [options({ fileOffset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }) })]],
      ['pagemap', [range()]],
      ['pagemapRaw', [range()]],
      [
        'scan',
        [
          options({
            offset: int(SMALL, FAR, { optional: true }),
            length: int(LEN, FAR, { optional: true }),
            require: namesArray(['present', 'written', 'file']),
            exclude: namesArray(['swapped', 'huge']),
            anyOf: namesArray(['present', 'pfnZero']),
            report: namesArray(['present', 'written']),
            writeProtect: bool(),
            checkWpAsync: bool(),
            maxPages: int([0, 1, 16], [], { optional: true }),
            maxRegions: int([1, 16], [0], { optional: true }),
          }),
        ],
      ],
      ['statx', []],
      ['view', [int(SMALL, FAR, { optional: true }), int([1, 8, PAGE], FAR, { optional: true })]],
      ['populate', [options({ offset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }), write: bool() })], { async: true, needsUnregistered: true }],
      ['readSync', [int(SMALL, FAR), int([0, 8, PAGE], FAR.filter((x) => x < 2 ** 31))]],
      ['writeSync', [int(SMALL, FAR), bytes([8, PAGE], [0])]],
      ['read', [int(SMALL, FAR), int([0, 8, PAGE], FAR.filter((x) => x < 2 ** 31))], { async: true, needsUnregistered: true }],
      ['write', [int(SMALL, FAR), bytes([8, PAGE], [0])], { async: true, needsUnregistered: true }],
      ['alias', [options({ prot: prot({ optional: true }), offset: int([0, PAGE], [1, 2 ** 40], { optional: true }), length: int(LEN, [1, 2 ** 40], { optional: true }) })]],
      ['unmap', [int([3 * PAGE], [1, 2 ** 40]), int([PAGE], [1])]],
      ['close', []],
    ].map(([m, params, extra]) =>
      call(`Mapping.${m}`, [self((c, r) => c.pick(r, [c.anon, c.memfd, c.file]), (c) => c.closedMap), ...params], (c, [self, ...a]) => {
        const out = self[m](...a);
        if (m === 'alias' || (m === 'remap' && out instanceof Mapping)) c.own(out);
        return out;
      }, { ...extra, self: true, rare: m === 'close' || m === 'unmap' || m === 'truncateFile' || m === 'remap' }),
    ),

    // Userfaultfd.
    ...[
      ['has', [oneOf(['move', 'poison', 'sigbus', 'threadId'])]],
      ['register', [anyMapping, options({ offset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }), modes: namesArray(['missing', 'wp', 'minor'], { empty: 'bad' }) })], { dangerous: true }],
      ['unregister', [anyMapping, range()]],
      ['copy', [target(), int(SMALL, FAR), int(LEN, [1]), (r, c) => (r() < 0.5 ? bytes([4 * PAGE])(r) : anyMapping(r, c)), options({ sourceOffset: int([0, PAGE], FAR, { optional: true }), dontWake: bool(), wp: bool() })]],
      ['zeropage', [target(), int(SMALL, FAR), int(LEN, [1]), options({ dontWake: bool() })]],
      ['continue', [target(), int(SMALL, FAR), int(LEN, [1]), options({ dontWake: bool(), wp: bool() })]],
      ['move', [target(), int(SMALL, FAR), int(LEN, [1]), anyMapping, options({ sourceOffset: int([0, PAGE], FAR, { optional: true }), dontWake: bool(), allowSrcHoles: bool() })]],
      ['poison', [target(), int(SMALL, FAR), int(LEN, [1]), options({ dontWake: bool() })]],
      ['writeProtect', [target(), int(SMALL, FAR), int(LEN, [1])]],
      ['unprotect', [target(), int(SMALL, FAR), int(LEN, [1]), options({ dontWake: bool() })]],
      ['wake', [target(), int(SMALL, FAR), int(LEN, [1])]],
      [
        'resolveMany',
        [
          oneOf(['copy', 'zeropage', 'continue', 'move', 'unprotect', 'poison']),
          target(),
          (r) => {
            const x = r();
            if (x < 0.4) return { value: [0, PAGE].slice(0, 1 + Math.floor(r() * 2)), kind: 'valid' };
            if (x < 0.5) return { value: Float64Array.of(0), kind: 'valid' };
            if (x < 0.55) return { value: [2 ** 40], kind: 'edge' };
            return { value: [null, undefined, 'x', 5, {}, [NaN], [-1], [1.5], ['0'], [Infinity], { length: 1, 0: 0 }][Math.floor(r() * 11)], kind: 'bad' };
          },
          options({ length: int([PAGE], [1], { optional: true }), source: (r, c) => (r() < 0.5 ? bytes([4 * PAGE])(r) : anyMapping(r, c)), sourceOffsets: (r) => (r() < 0.5 ? { value: [0], kind: 'valid' } : { value: [null, 'x', [NaN], [-1], [1.5], 5][Math.floor(r() * 6)], kind: 'bad' }), dontWake: bool(), wp: bool(), allowSrcHoles: bool(), replay: bool() }),
        ],
      ],
      ['serve', [options({ onFaults: fn(), onEvents: fn(), onError: fn(), maxBatch: int([1, 64], [0, 4097], { optional: true }), workers: int([1, 2], [0, 65], { optional: true }), poll: pollOption() })], { dangerous: true }],
      ['unref', []],
      ['ref', []],
      [
        'addRule',
        [
          (r, c) => {
            const g = options(
              {
                mapping: anyMapping,
                offset: int(SMALL, FAR, { optional: true }),
                length: int(LEN, FAR, { optional: true }),
                action: oneOf(['zero', 'poison', 'unprotect', 'continue', 'copy', 'move']),
                source: anyMapping,
                sourceOffset: int([0, PAGE], FAR, { optional: true }),
                granule: int([PAGE, 16 * PAGE], [3 * PAGE], { optional: true }),
                wp: bool(),
                allowSrcHoles: bool(),
              },
              { optional: false, required: ['mapping', 'action'] },
            );
            return g(r, c);
          },
        ],
      ],
      ['removeRule', [(r) => ({ value: [{}, null, undefined, 5][Math.floor(r() * 4)], kind: 'edge' })]],
      ['clearRules', []],
      ['stats', []],
      ['outstanding', []],
      ['close', [oneOf(['wake', 'zero', 'sigbus'], { optional: true })]],
    ].map(([m, params, extra]) =>
      call(`Userfaultfd.${m}`, [self((c) => c.uffd, (c) => c.closedUffd), ...params], (c, [self, ...a]) => {
        return self[m](...a);
      }, { ...extra, self: true, rare: m === 'close' }),
    ),

    // Device.
    ...[
      ['mirror', [anyMapping, options({ offset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }), writeMode: oneOf(['shared', 'single'], { optional: true }), pin: bool() })]],
      ['mirrorFile', [mappingOf(['memfd', 'file']), options({ offset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }), strategy: oneOf(['remote', 'copy', 'bounce', 'pin'], { optional: true }), snapshot: oneOf(['pagecache', 'buffer'], { optional: true }), writebackIntervalMs: int([0, 50], [], { optional: true }), chunkPages: int([1, 64], [0], { optional: true }), lease: (r) => ({ value: ['x', 1, {}][Math.floor(r() * 3)], kind: 'bad' }) })]],
      ['forkRun', [anyMapping, forkSteps(), options({ offset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }), ...forkOptions })], { async: true, rare: true }],
      ['counters', []],
      ['release', [], { async: true }],
      ['drainTrace', []],
      ['drainTraceLines', []],
      ['memory', []],
      ['close', []],
    ].map(([m, params, extra]) =>
      call(`Device.${m}`, [self(live('device'), (c) => c.closedDevice), ...params], (c, [self, ...a]) => {
        const out = self[m](...a);
        if (m === 'mirror' || m === 'mirrorFile') c.own(out);
        return out;
      }, { ...extra, self: true, rare: m === 'close' }),
    ),

    // Mirror (and FileMirror, which is one).
    ...[
      ['read', [int(SMALL, FAR), int(NPAGES, [0, 2 ** 40])], { async: true }],
      ['write', [int(SMALL, FAR), bytes([PAGE], [0, 1, PAGE + 1])], { async: true }],
      [
        'run',
        [
          options({
            offset: int(SMALL, FAR, { optional: true }),
            npages: int(NPAGES, [0, 2 ** 40], { optional: true }),
            op: oneOf(['read', 'write', 'atomic', 'verify'], { optional: true }),
            pattern: oneOf(['sequential', 'strided', 'random'], { optional: true }),
            unit: int([8, PAGE], [7], { optional: true }),
            stride: int([PAGE], [0], { optional: true }),
            ops: int([1, 16], [0], { optional: true }),
            seed: int([1], [], { optional: true }),
            threads: int([1, 2], [0, 65], { optional: true }),
          }),
        ],
        { async: true },
      ],
      ['entries', [int([0, 1], [2 ** 40], { optional: true }), int([1, 2], [0, 2 ** 40], { optional: true })]],
      ['migrateToDevice', [int(SMALL, FAR), int(NPAGES, [0]), options({ useMove: bool(), granule: int([PAGE, 2 << 20], [3 * PAGE], { optional: true }) })], { async: true }],
      ['exclusive', [int(SMALL, FAR), int(NPAGES, [0])], { async: true }],
      ['checkExclusive', [int(SMALL, FAR), int(NPAGES, [0])]],
      ['migrateToHost', [int(SMALL, FAR), int(NPAGES, [0])], { async: true }],
      ['snapshot', [int(SMALL, FAR, { optional: true }), int(NPAGES, [0, 2 ** 40], { optional: true })]],
      ['info', []],
      ['replay', [tracePath(), options({ range: (r, c) => (r() < 0.3 ? (r() < 0.5 ? { value: 'all', kind: 'valid' } : { value: 'every', kind: 'bad' }) : int([0], [1, 2 ** 40], { optional: true })(r, c)), threads: int([1, 2], [0, 65], { optional: true }), window: int([0, 4], [2 ** 21], { optional: true }), samples: bool(), seed: int([1], [], { optional: true }) })], { async: true }],
      ['forkRun', [forkSteps(), options(forkOptions)], { async: true, rare: true }],
      ['close', []],
    ].map(([m, params, extra]) =>
      call(`Mirror.${m}`, [self((c, r) => c.pick(r, [c.mirror, c.fileMirror]), (c) => c.closedMirror), ...params], (c, [self, ...a]) => {
        return self[m](...a);
      }, { ...extra, self: true, rare: m === 'close' }),
    ),
    ...[
      ['pread', [int(SMALL, FAR), int([0, 8, PAGE], [2 ** 31])], { async: true }],
      ['pwrite', [int(SMALL, FAR), bytes([8, PAGE], [0])], { async: true }],
      ['writeback', [options({ offset: int(SMALL, FAR, { optional: true }), length: int(LEN, FAR, { optional: true }), sync: bool() })], { async: true }],
      ['fsync', [], { async: true }],
      ['stats', []],
      ['accounting', []],
      ['acknowledgeLoss', []],
      ['takeLease', []],
    ].map(([m, params, extra]) =>
      call(`FileMirror.${m}`, [self(live('fileMirror'), (c) => c.closedFileMirror), ...params], (c, [self, ...a]) => {
        return self[m](...a);
      }, { ...extra, self: true }),
    ),

    // Trace and TraceRecorder: the worker's trace file, read once, and a recorder of its own.
    ...[
      ['records', []],
      ['jsonLines', []],
      ['exportJsonLines', [(r, c) => (r() < 0.6 ? { value: path.join(c.dir, 'out.jsonl'), kind: 'valid' } : { value: [5, null, 'a\0b'][Math.floor(r() * 3)], kind: 'bad' })]],
    ].map(([m, params]) =>
      call(`Trace.${m}`, [(r) => ({ value: 'trace', kind: 'valid', text: 'trace' }), ...params], async (c, [, ...a]) => {
        const t = await (c.traceP ??= lib.readTrace(traceFile(c)));
        const out = t[m](...a);
        if (typeof out?.[Symbol.asyncIterator] !== 'function') return out;
        const items = [];
        for await (const x of out) items.push(x);
        return items;
      }, { async: true, self: true }),
    ),
    ...[['stats', []], ['stop', []], ['writeRound', []]].map(([m, params]) =>
      call(`TraceRecorder.${m}`, [(r) => ({ value: 'recorder', kind: 'valid', text: 'recorder' }), ...params], (c) => recorder(c, lib)[m](), { self: true }),
    ),
    ...[
      ['addRange', [(r, c) => (r() < 0.6 ? { value: { address: (c.anon3?.address ?? 4096n) + BigInt(PAGE * (1 + Math.floor(r() * 2))), length: PAGE }, kind: 'valid' } : { value: [null, 5, {}, { address: 1n, length: PAGE }, { address: 4096n, length: 0 }, { address: 4096n, length: PAGE, modes: ['x'] }, { address: 4096n, length: PAGE, shared: 'y' }, { mapping: 5 }][Math.floor(r() * 8)], kind: 'bad' })]],
      ['removeRange', [int([0, 1, 2], [-1, 65535, 1.5])]],
    ].map(([m, params]) =>
      call(`TraceRecorder.${m}`, [(r) => ({ value: 'recorder', kind: 'valid', text: 'recorder' }), ...params], (c, [, ...a]) => recorder(c, lib)[m](...a), { self: true }),
    ),
    // The fault server: listen() on a fresh path in the worker's directory (or a bad one).
    call(
      'FaultServer.listen',
      [
        (r, c) => {
          const x = r();
          if (x < 0.6) return { value: path.join(c.dir, `s${Math.floor(r() * 1e9)}`), kind: 'valid' };
          if (x < 0.7) return { value: c.filePath, kind: 'edge' };
          if (x < 0.75) return { value: path.join(c.dir, 'x'.repeat(120)), kind: 'edge' };
          return { value: ['', 'a\0b', 5, null, undefined, {}][Math.floor(r() * 6)], kind: 'bad' };
        },
        options({
          allowUids: (r) => {
            const x = r();
            if (x < 0.5) return { value: undefined, kind: 'valid' };
            if (x < 0.7) return { value: [0, 65534], kind: 'valid' };
            return { value: [-1, 'x', {}, [-1], [1.5], [2 ** 32], ['0']][Math.floor(r() * 7)], kind: 'bad' };
          },
          maxClients: int([1, 4], [0, 4097], { optional: true }),
          helloTimeoutMs: int([100, 10000], [0, 600001], { optional: true }),
          policy: oneOf(['default'], { optional: true, edge: ['manual'] }),
          beforeServe: fn(),
          onClient: fn(),
          onRanges: fn(),
          onClientExit: fn(),
        }),
      ],
      async (c, a) => c.own(await lib.FaultServer.listen(...a)),
      { async: true },
    ),
    ...[
      ['stats', []],
      ['close', []],
    ].map(([m, params]) =>
      call(`FaultServer.${m}`, [(r) => ({ value: r() < 0.2 ? 'closedServer' : 'server', kind: 'valid', text: 'server' }), ...params], async (c, [which, ...a]) => {
        const s = await c[which];
        return s[m](...a);
      }, { async: true, self: true, rare: m === 'close' }),
    ),
    // A client process (the C demo) of the worker's own server: its RemoteClient.
    ...[
      ['evict', [(r, c) => (r() < 0.6 ? { value: c.remoteAddress ?? 0n, kind: 'valid' } : bigintU64()(r)), int(LEN, FAR)]],
      ['writeProtect', [(r, c) => (r() < 0.6 ? { value: c.remoteAddress ?? 0n, kind: 'valid' } : bigintU64()(r)), int(LEN, FAR)]],
      ['configure', [options({ prefetch: int([0, 7, 65536], [-1, 65537, 2 ** 40], { optional: true }), writeProtectReads: bool() })]],
      ['takeTouches', []],
      ['counters', []],
      ['stats', []],
      ['record', [options({ path: (r, c) => (r() < 0.7 ? { value: path.join(c.dir, 'client.pmtrace'), kind: 'valid' } : { value: ['', 'a\0b', 5, null][Math.floor(r() * 4)], kind: 'bad' }), sampleIntervalMs: int([0, 10], [-1], { optional: true }), ringCapacity: int([16], [0], { optional: true }) }, { optional: false, required: ['path'] })]],
    ].map(([m, params]) =>
      call(`RemoteClient.${m}`, [(r) => ({ value: 'remote', kind: 'valid', text: 'remote' }), ...params], async (c, [which, ...a]) => {
        const rc = await c[which];
        const out = rc?.[m](...a);
        if (m === 'record' && out) c.own({ close: () => out.stop() });
        return out;
      }, { async: true, self: true }),
    ),

    // Pager: the worker's anonymous pager of 4 pages (made asynchronously: each call waits for it).
    ...[
      ['read', [int(SMALL, FAR), int([0, 8, PAGE], [2 ** 31])]],
      ['write', [int(SMALL, FAR), bytes([8, PAGE], [0])]],
      ['access', [options({ offset: int(SMALL, FAR, { optional: true }), length: int([8, PAGE], FAR, { optional: true }), op: oneOf(['read', 'write', 'rmw', 'verify'], { optional: true }), ops: int([1, 16], [0], { optional: true }), threads: int([1, 2], [0, 65], { optional: true }) })]],
      ['prefetch', [int(SMALL, FAR), int(LEN, [0, 2 ** 40])]],
      ['flush', []],
      ['acknowledgeLoss', []],
      ['stats', []],
      ['close', []],
    ].map(([m, params]) =>
      call(`Pager.${m}`, [(r) => ({ value: r() < 0.2 ? 'closedPager' : 'pager', kind: 'valid', text: 'pager' }), ...params], async (c, [which, ...a]) => {
        const p = await c[which];
        return p[m](...a);
      }, { async: true, self: true, rare: m === 'close' }),
    ),
  ];
}

// The addon itself (exported as _native): a direct caller must not be able to crash or hang the
// process either, though the bindings may coerce what the TypeScript layer refuses. Every argument
// is drawn from one pool, so every outcome but a crash, a hang or an uncoded error is accepted.
// Numbers stay small (a length is at most 4 pages); descriptors are never valid numbers (adopting
// or mapping the worker's own descriptors would close or truncate them).
function raw() {
  return (r, c) => {
    const pool = [0, 1, 8, PAGE, 2 * PAGE, 4 * PAGE, -1, 1.5, NaN, Infinity, 2 ** 53, 0n, 8n, -1n, 2n ** 64n, '', 'x', 'a\0b', null, undefined, true, {}, [], [0], new Uint8Array(8), Buffer.alloc(PAGE), Float64Array.of(0), BigUint64Array.of(0n), Uint32Array.of(0), () => {}, c.anon?.native, c.memfd3?.native, c.nUffd, c.nDevice, c.nMirror];
    return { value: pool[Math.floor(r() * pool.length)], kind: 'edge' };
  };
}

/** The worker's objects of the addon's own classes, by the class each is an instance of. */
export const NATIVE_OBJECTS = { memfd3: 'Mapping', nUffd: 'Userfaultfd', nDevice: 'Device', nMirror: 'Mirror', nServer: 'FaultServer', nRemote: 'RemoteClient' };

export function nativeTargets(lib, ctx) {
  const n = lib._native;
  const fns = [
    ['runAccess', 4, { async: true, needsUnregistered: true }],
    ['copyAsync', 4, { async: true, needsUnregistered: true }],
    ['pagemapScan', 4],
    ['statx', 1],
    ['fsType', 1],
    ['uname', 0],
    ['probeUffd', 1],
    ['getAffinity', 0],
    ['setAffinity', 1],
    ['populateAsync', 4, { async: true, needsUnregistered: true }],
    ['forkRun', 4, { async: true, needsUnregistered: true, rare: true }],
    ['forkDevice', 5, { async: true, needsUnregistered: true, rare: true }],
    ['configureEngine', 3],
    ['engineStats', 0],
    ['probeTraceSampling', 3],
  ];
  const methods = {
    memfd3: ['info', 'buffer', 'protect:3', 'advise:3', 'sync:3', 'remap:4', 'fallocate:3', 'truncate:1', 'residency:2', 'cachestat:2', 'pagemap:2', 'statx', 'readInto:2', 'writeFrom:2', 'unmap:2', 'close'],
    nUffd: ['info', 'api:1', 'register:4', 'unregister:3', 'copy:6', 'zeropage:4', 'continue:4', 'move:6', 'poison:4', 'writeProtect:4', 'wake:3', 'fallback:2', 'resolveMany:8', 'setRules:1', 'setTap:1', 'stats', 'outstanding', 'serve:5', 'reconfigure:4', 'ref', 'unref', 'close:1'],
    nDevice: ['mirror:6', 'counters', 'memory', 'drainTrace', 'release', 'close'],
    nServer: ['drop:1', 'stats', 'close'],
    nRemote: ['info', 'evict:2', 'writeProtect:2', 'configure:2', 'takeTouches', 'counters', 'release', 'setRecorder:1'],
    nMirror: ['run:1', 'read:2', 'write:2', 'entries:2', 'migrateToDevice:5', 'migrateToHost:2', 'snapshot:2', 'exclusiveCount:2', 'info', 'fileRead:2', 'fileWrite:2', 'writeback:3', 'fileStats', 'takeLease', 'acknowledgeLoss', 'replay:3', 'close'],
  };
  const out = fns.map(([name, arity, extra = {}]) =>
    call(`_native.${name}`, Array.from({ length: arity }, raw), (c, a) => n[name](...a), { ...extra, edgeOnly: true }),
  );
  out.push(
    call('_native.map', [options({ kind: oneOf(['anonymous', 'memfd', 'file']), length: int(LEN, [0, 1]), prot: raw(), populate: raw(), shared: raw(), path: (r, c) => ({ value: [c.filePath, 'a\0b', 5][Math.floor(r() * 3)], kind: 'edge' }), name: raw(), hugetlb: raw(), offset: int([0], [1]) })], (c, [o]) => c.own(n.map(o)), { edgeOnly: true }),
    call('_native.createDevice', [options({ memory: int([16 * PAGE], [1]), faultBatch: raw(), placement: raw(), eviction: raw(), trace: raw(), name: raw() })], (c, [o]) => c.own(n.createDevice(o)), { edgeOnly: true }),
    call('_native.openUserfaultfd', [options({ userModeOnly: raw(), nonBlocking: raw() })], (c, [o]) => c.own(n.openUserfaultfd(o)), { edgeOnly: true }),
    call('_native.adoptUserfaultfd', [(r) => ({ value: [-1, 1.5, 'x', null, NaN, 2 ** 53][Math.floor(r() * 6)], kind: 'edge' }), raw()], (c, a) => c.own(n.adoptUserfaultfd(...a)), { edgeOnly: true }),
    // createPager() over a region nobody serves makes a pager object only: nothing faults.
    call('_native.createPager', [raw(), raw()], (c, a) => c.own(n.createPager(...a)), { edgeOnly: true }),
    call('_native.listenFaultServer', [(r, c) => ({ value: [path.join(c.dir ?? '/tmp', `n${Math.floor(r() * 1e9)}`), '', 5][Math.floor(r() * 3)], kind: 'edge' }), raw(), raw(), raw()], (c, a) => c.own(n.listenFaultServer(...a)), { edgeOnly: true }),
    ...['Mapping', 'Userfaultfd', 'Device', 'Mirror', 'Pager', 'TraceRecorder', 'FaultServer', 'RemoteClient'].map((k) => call(`new _native.${k}`, [raw()], (c, a) => new n[k](...a), { edgeOnly: true })),
  );
  for (const [obj, list] of Object.entries(methods)) {
    for (const spec of list) {
      const [m, arity = '0'] = spec.split(':');
      const isAsync = ['release', 'run', 'read', 'write', 'migrateToDevice', 'migrateToHost', 'fileRead', 'fileWrite', 'writeback', 'replay'].includes(m);
      out.push(
        call(`_native.${obj}.${m}`, Array.from({ length: Number(arity) }, raw), (c, a) => {
          const self = obj === 'memfd3' ? c.memfd3?.native : c[obj];
          if (!self) return undefined;
          const ret = self[m](...a);
          if (obj === 'nDevice' && m === 'mirror') c.own(ret);
          return ret;
        }, { edgeOnly: true, async: isAsync, rare: m === 'close' || m === 'unmap' || m === 'truncate' || m === 'remap'}),
      );
    }
  }
  return out;
}
