// One fuzz worker: node test/fuzz/worker.mjs SEED FROM TO DIR PROGRESS_FILE
// Runs calls FROM..TO-1, each generated from (SEED, index) alone, against a few small live objects
// (recreated every RESET calls). Before each call it appends "S <index> <call>" to the progress file
// and after it "E <index> <outcome json>", with synchronous writes, so the runner knows the call a
// crash or a hang happened in. Exits 0 when done; 3 when an async call did not settle in time.
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { rng, describe, PAGE } from './values.mjs';
import { targets, nativeTargets } from './targets.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const lib = await import(path.join(here, '..', '..', 'dist', 'index.js'));

const [seed, from, to] = process.argv.slice(2, 5).map(Number);
const dir = process.argv[5];
const progress = fs.openSync(process.argv[6], 'a');
const RESET = 40;
const ASYNC_BOUND_MS = Number(process.env.PAGEMIRROR_FUZZ_ASYNC_MS ?? 4000);

function log(line) {
  fs.writeSync(progress, line + '\n');
}

const owned = [];
const ctx = {
  dir,
  filePath: path.join(dir, 'file'),
  probe: lib.probe(),
  impostor: { address: 0n, length: PAGE, native: { address: 0n } },
  pick: (r, list) => {
    const l = list.filter(Boolean);
    return l.length ? l[Math.floor(r() * l.length)] : undefined;
  },
  own(x) {
    owned.push(x);
    return x;
  },
};

/** A Mapping, or the addon's mapping object, registered with some userfaultfd. */
function registered(m) {
  if (m instanceof lib.Mapping) return attempt(() => m.registered) ?? false;
  if (m instanceof lib._native.Mapping) return attempt(() => m.info().registered) ?? false;
  return false;
}

function attempt(f) {
  try {
    return f();
  } catch {
    return undefined;
  }
}

function settle(x) {
  if (x && typeof x.then === 'function') x.then(undefined, () => {});
}

function closeAll() {
  // Userfaultfds first (wakes anything asleep), then mirrors and devices, then the memory.
  const order = [ctx.uffd, ctx.nUffd, ...owned.filter((o) => o instanceof lib.Userfaultfd || o instanceof lib._native.Userfaultfd), ctx.mirror, ctx.fileMirror, ctx.nMirror, ...owned.filter((o) => o instanceof lib.Mirror || o instanceof lib._native.Mirror), ctx.device, ctx.nDevice, ...owned.filter((o) => o instanceof lib.Device || o instanceof lib._native.Device), ...owned, ctx.anon, ctx.anon2, ctx.anon3, ctx.memfd, ctx.memfd2, ctx.memfd3, ctx.file];
  for (const o of order) if (o) settle(attempt(() => o.close()));
  // Pagers close asynchronously (write-back first); a rejection is not this worker's finding.
  if (ctx.pager) settle(ctx.pager.then((p) => p.close()));
  if (ctx.server) settle(ctx.server.then((s) => s.close()));
  if (ctx.nServer) attempt(() => ctx.nServer.close());
  owned.length = 0;
}

// One client process for the whole worker (the C demo, idle once its memory is written): its
// RemoteClient, or undefined where it cannot run (no userfaultfd, not built).
const DEMO = path.join(here, '..', '..', 'build', 'Release', 'pagemirror_client_demo');
async function remoteClient(sockPath) {
  if (!fs.existsSync(DEMO)) return undefined;
  let resolve;
  const got = new Promise((r) => (resolve = r));
  const server = await lib.FaultServer.listen(sockPath, { onClient: (c) => resolve(c) });
  const child = spawn(DEMO, [sockPath, '4', 'alloc'], { stdio: ['pipe', 'ignore', 'ignore'] });
  child.on('exit', () => resolve(undefined));
  child.unref();
  child.stdin.unref?.();
  const c = await Promise.race([got, new Promise((r) => setTimeout(r, 3000).unref())]);
  if (c) {
    ctx.remoteAddress = c.ranges[0]?.address;
    ctx.nRemote = c.native;
  }
  ctx.remoteServer = server;
  return c;
}

function fixtures() {
  closeAll();
  fs.writeFileSync(ctx.filePath, Buffer.alloc(4 * PAGE, 1));
  ctx.anon = lib.mapAnonymous(4 * PAGE);
  ctx.anon2 = lib.mapAnonymous(4 * PAGE);
  ctx.memfd = lib.mapMemfd(4 * PAGE);
  ctx.memfd2 = lib.mapMemfd(4 * PAGE);
  ctx.file = lib.mapFile(ctx.filePath);
  ctx.anon3 = lib.mapAnonymous(4 * PAGE);
  ctx.memfd3 = lib.mapMemfd(4 * PAGE);
  ctx.nUffd = attempt(() => {
    const u = lib._native.openUserfaultfd({});
    u.api(0n);
    return u;
  });
  ctx.nDevice = lib._native.createDevice({ memory: 64 * PAGE });
  ctx.nMirror = ctx.nDevice.mirror(ctx.anon3.native, 0, 4 * PAGE);
  ctx.closedMap ??= (() => {
    const m = lib.mapAnonymous(PAGE);
    m.close();
    return m;
  })();
  ctx.uffd = attempt(() => lib.Userfaultfd.open());
  ctx.closedUffd ??= attempt(() => {
    const u = lib.Userfaultfd.open();
    u.close();
    return u;
  });
  // Made asynchronously: the Pager calls await it (a rejection is their outcome).
  ctx.pager = lib.pager(null, { length: 4 * PAGE, granule: PAGE });
  settle(ctx.pager);
  ctx.closedPager ??= lib.pager(null, { length: PAGE, granule: PAGE }).then(async (p) => {
    await p.close();
    return p;
  });
  settle(ctx.closedPager);
  // Fault servers: a fresh one per round (listen() is asynchronous), a closed one, the addon's own.
  const sock = (k) => path.join(dir, `${k}-${Math.random().toString(36).slice(2)}`);
  ctx.server = lib.FaultServer.listen(sock('server'));
  settle(ctx.server);
  ctx.closedServer ??= lib.FaultServer.listen(sock('closed')).then(async (s) => {
    await s.close();
    return s;
  });
  settle(ctx.closedServer);
  ctx.nServer = attempt(() => lib._native.listenFaultServer(sock('native'), undefined, 2, () => {}));
  ctx.remote ??= remoteClient(sock('remote'));
  ctx.device = lib.Device.create({ memory: 64 * PAGE });
  ctx.mirror = attempt(() => ctx.device.mirror(ctx.anon2));
  ctx.fileMirror = attempt(() => ctx.device.mirrorFile(ctx.memfd2, { strategy: 'copy' }));
  if (!ctx.closedDevice) {
    const d = lib.Device.create({ memory: 16 * PAGE });
    ctx.closedMirror = d.mirror(ctx.own(lib.mapAnonymous(PAGE)));
    ctx.closedFileMirror = d.mirrorFile(ctx.own(lib.mapMemfd(PAGE)));
    ctx.closedMirror.close();
    ctx.closedFileMirror.close();
    d.close();
    ctx.closedDevice = d;
  }
  for (const [k, o] of [['anon', ctx.anon], ['anon2', ctx.anon2], ['memfd', ctx.memfd], ['file', ctx.file], ['closedMap', ctx.closedMap], ['uffd', ctx.uffd], ['closedUffd', ctx.closedUffd], ['device', ctx.device], ['mirror', ctx.mirror], ['fileMirror', ctx.fileMirror], ['closedDevice', ctx.closedDevice], ['closedMirror', ctx.closedMirror], ['closedFileMirror', ctx.closedFileMirror]])
    if (o) Object.defineProperty(o, '__fuzzName', { value: k, configurable: true });
}

const list = [...targets(lib, ctx), ...nativeTargets(lib, ctx)];
// Calls that close or reshape the fixtures run less often, so the rest mostly meets live objects;
// the addon's own entry points (many, and behind the TypeScript layer) less often than the API.
const weighted = list.flatMap((t) => (t.rare || t.edgeOnly ? [t] : [t, t, t]));

/** The call at `index`: target, arguments and their kinds, from (seed, index) alone. */
function generate(index) {
  const r = rng((seed * 0x9e3779b1) ^ (index * 0x85ebca6b) ^ 0x5bd1e995);
  const t = weighted[Math.floor(r() * weighted.length)];
  const args = [];
  const texts = [];
  let kind = 'valid';
  const bad = [];
  for (let i = 0; i < t.params.length; i++) {
    const g = t.params[i](r, ctx);
    args.push(g.value);
    texts.push(g.text ?? describe(g.value));
    if (g.kind === 'bad') {
      kind = 'bad';
      bad.push(i);
    } else if (g.kind === 'edge' && kind === 'valid') kind = 'edge';
  }
  // Trim trailing undefined: a call with fewer arguments is the same call.
  if (t.edgeOnly) {
    // The addon's own checks: anything but a crash, a hang or an uncoded error is fine.
    kind = 'edge';
    bad.length = 0;
  }
  while (args.length && args[args.length - 1] === undefined && !bad.includes(args.length - 1)) {
    args.pop();
    texts.pop();
  }
  return { t, args, kind, bad, text: `${t.name}(${texts.join(', ')})` };
}

function outcomeOf(err) {
  if (!(err instanceof Error)) return { t: 'threw', nonError: true, text: describe(err) };
  const e = err;
  return { t: 'threw', name: e.name, code: e.code, errno: e.errno, syscall: e.syscall, message: String(e.message).slice(0, 300) };
}

process.on('unhandledRejection', (err) => {
  log(`U ${JSON.stringify(outcomeOf(err))}`);
});

try {
  fixtures();
  for (let i = from; i < to; i++) {
    if ((i - from) % RESET === 0 && i !== from) fixtures();
    const c = generate(i);
    const m = c.args[c.t.needsUnregistered === true ? 0 : c.t.needsUnregistered];
    if (c.t.needsUnregistered !== undefined && registered(m)) {
      // Touching registered memory nobody serves sleeps for good, by design: not fuzzed.
      log(`S ${i} ${JSON.stringify({ text: c.text, kind: c.kind, bad: c.bad })}`);
      log(`E ${i} ${JSON.stringify({ t: 'skipped', kind: c.kind })}`);
      continue;
    }
    log(`S ${i} ${JSON.stringify({ text: c.text, kind: c.kind, bad: c.bad })}`);
    let out;
    try {
      const ret = c.t.run(ctx, c.args);
      if (ret && typeof ret.then === 'function') {
        let timer;
        const bound = new Promise((resolve) => {
          timer = setTimeout(() => resolve('hang'), ASYNC_BOUND_MS);
        });
        const settled = await Promise.race([ret.then(() => 'ok', (err) => outcomeOf(err)), bound]);
        clearTimeout(timer);
        if (settled === 'hang') {
          log(`E ${i} ${JSON.stringify({ t: 'hang', kind: c.kind })}`);
          process.exit(3);
        }
        out = settled === 'ok' ? { t: 'ok' } : settled;
      } else out = { t: 'ok' };
    } catch (err) {
      out = outcomeOf(err);
    }
    out.kind = c.kind;
    log(`E ${i} ${JSON.stringify(out)}`);
  }
} finally {
  closeAll();
  // The worker's client process and its server live for the whole run.
  if (ctx.remoteServer) settle(ctx.remoteServer.close());
}
