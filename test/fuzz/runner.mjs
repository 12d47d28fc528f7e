// The API fuzzer's runner: spawns worker processes (worker.mjs) that make the calls, so a crash or a
// hang is counted instead of taking the run down. A worker that dies or stops making progress is
// killed if need be, its call recorded, and a new worker goes on from the next call.
//
//   npm run fuzz -- [--seed N] [--calls N] [--batch N] [--verbose]
//
// Prints calls made, crashes, hangs, uncoded errors and accepted bad arguments; exits 1 if any.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const WORKER = path.join(here, 'worker.mjs');

/** A thrown error is Node-shaped: an Error with a string code; a kernel one has errno < 0 and syscall. */
export function shapeProblem(o) {
  if (o.nonError) return `threw a non-Error: ${o.text}`;
  if (typeof o.code !== 'string' || !o.code) return `${o.name} with no code: ${o.message}`;
  if (/^E[A-Z0-9]+$/.test(o.code) && !(typeof o.errno === 'number' && o.errno < 0 && typeof o.syscall === 'string'))
    return `${o.code} without errno < 0 and syscall: ${o.message}`;
  if (/^ERR_/.test(o.code) && o.name === 'Error' && /ARG|RANGE/.test(o.code)) return `${o.code} is not a TypeError/RangeError`;
  return undefined;
}

function runWorker(seed, from, to, dir, progressFile, hangMs) {
  return new Promise((resolve) => {
    fs.writeFileSync(progressFile, '');
    const child = spawn(process.execPath, [WORKER, String(seed), String(from), String(to), dir, progressFile], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d) => {
      if (stderr.length < 20000) stderr += d;
    });
    let size = 0;
    let since = Date.now();
    let killedForHang = false;
    const watch = setInterval(() => {
      const s = fs.statSync(progressFile).size;
      if (s !== size) {
        size = s;
        since = Date.now();
      } else if (Date.now() - since > hangMs) {
        killedForHang = true;
        child.kill('SIGKILL');
      }
    }, 100);
    child.on('exit', (code, signal) => {
      clearInterval(watch);
      resolve({ code, signal, killedForHang, stderr, lines: fs.readFileSync(progressFile, 'utf8').split('\n').filter(Boolean) });
    });
  });
}

/**
 * Runs `calls` calls from `seed` in workers of `batch` calls each (a crash costs one worker).
 * Returns the counts and every finding with the call that caused it.
 */
export async function runFuzz({ seed = 1, calls = 10000, batch = 500, hangMs = 10000, onProgress } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-fuzz-'));
  const progressFile = path.join(dir, 'progress');
  const r = { seed, calls: 0, ok: 0, threw: 0, skipped: 0, byKind: { valid: 0, edge: 0, bad: 0 }, crashes: [], hangs: [], uncoded: [], acceptedBad: [], unhandled: [], codes: {} };
  try {
    let next = 0;
    while (next < calls) {
      const to = Math.min(calls, next + batch);
      const w = await runWorker(seed, next, to, dir, progressFile, hangMs);
      let current;
      let last = next - 1;
      for (const line of w.lines) {
        const sp = line.indexOf(' ');
        const tag = line.slice(0, sp);
        if (tag === 'S') {
          const sp2 = line.indexOf(' ', sp + 1);
          current = { index: Number(line.slice(sp + 1, sp2)), ...JSON.parse(line.slice(sp2 + 1)) };
        } else if (tag === 'E') {
          const sp2 = line.indexOf(' ', sp + 1);
          const o = JSON.parse(line.slice(sp2 + 1));
          const index = Number(line.slice(sp + 1, sp2));
          last = index;
          if (o.t === 'skipped') {
            r.skipped++;
            continue;
          }
          r.calls++;
          r.byKind[o.kind]++;
          if (o.t === 'hang') r.hangs.push({ ...current, note: 'an async call did not settle' });
          else if (o.t === 'ok') {
            r.ok++;
            if (o.kind === 'bad') r.acceptedBad.push(current);
          } else {
            r.threw++;
            r.codes[o.code ?? '(none)'] = (r.codes[o.code ?? '(none)'] ?? 0) + 1;
            const p = shapeProblem(o);
            if (p) r.uncoded.push({ ...current, problem: p });
          }
          current = undefined;
        } else if (tag === 'U') {
          r.unhandled.push({ after: last, error: line.slice(sp + 1) });
        }
      }
      if (!w.lines.length && w.code !== 0) throw new Error(`fuzz: a worker failed before its first call (exit ${w.signal ?? w.code}):\n${w.stderr}`);
      const finished = w.code === 0 && !w.killedForHang && last === to - 1;
      if (!finished) {
        if (current && current.index === last + 1) {
          r.calls++;
          r.byKind[current.kind]++;
          if (w.killedForHang) r.hangs.push({ ...current, note: `no progress for ${hangMs} ms: killed` });
          else r.crashes.push({ ...current, exit: w.signal ?? w.code, stderr: w.stderr.slice(-2000) });
        } else if (w.code !== 3) {
          r.crashes.push({ index: last + 1, text: '(between calls: set-up or teardown)', exit: w.signal ?? w.code, stderr: w.stderr.slice(-2000) });
        }
      }
      // Go on after the last call that ended; past the one a worker died in.
      next = finished ? to : Math.max(next + 1, current && current.index === last + 1 ? last + 2 : last + 1);
      onProgress?.(r, next);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return r;
}

export function summary(r) {
  return (
    `fuzz: seed ${r.seed}: ${r.calls} calls made (${r.byKind.valid} valid, ${r.byKind.edge} edge, ${r.byKind.bad} bad; ${r.skipped} skipped), ` +
    `${r.ok} returned, ${r.threw} threw; crashes ${r.crashes.length}, hangs ${r.hangs.length}, uncoded errors ${r.uncoded.length}, ` +
    `accepted bad args ${r.acceptedBad.length}, unhandled rejections ${r.unhandled.length}`
  );
}

export function findings(r) {
  const out = [];
  for (const c of r.crashes) out.push(`CRASH (exit ${c.exit}) #${c.index} ${c.text}\n${c.stderr ?? ''}`);
  for (const h of r.hangs) out.push(`HANG #${h.index} ${h.text} (${h.note})`);
  for (const u of r.uncoded) out.push(`UNCODED #${u.index} ${u.text}: ${u.problem}`);
  for (const a of r.acceptedBad) out.push(`ACCEPTED BAD #${a.index} ${a.text} (bad argument ${a.bad.join(', ')})`);
  for (const u of r.unhandled) out.push(`UNHANDLED REJECTION after #${u.after}: ${u.error}`);
  return out;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const opt = { seed: Date.now() % 100000, calls: 10000 };
  let verbose = false;
  const a = process.argv.slice(2);
  for (let i = 0; i < a.length; i++) {
    if (a[i] === '--seed') opt.seed = Number(a[++i]);
    else if (a[i] === '--calls') opt.calls = Number(a[++i]);
    else if (a[i] === '--batch') opt.batch = Number(a[++i]);
    else if (a[i] === '--verbose') verbose = true;
    else {
      console.error(`fuzz: unknown option ${a[i]} (use --seed N --calls N --batch N --verbose)`);
      process.exit(2);
    }
  }
  for (const k of ['seed', 'calls', 'batch'])
    if (opt[k] !== undefined && !(Number.isSafeInteger(opt[k]) && opt[k] >= (k === 'seed' ? 0 : 1))) {
      console.error(`fuzz: --${k} takes a whole number`);
      process.exit(2);
    }
  const started = Date.now();
  const r = await runFuzz({ ...opt, onProgress: verbose ? (x, n) => console.error(`  ${n} / ${opt.calls}`) : undefined });
  const f = findings(r);
  for (const line of f.slice(0, 200)) console.log(line);
  if (f.length > 200) console.log(`... and ${f.length - 200} more`);
  if (verbose) console.log('codes thrown:', r.codes);
  console.log(`${summary(r)} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  process.exit(f.length ? 1 : 0);
}
