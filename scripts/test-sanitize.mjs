#!/usr/bin/env node
// npm run test:sanitize [-- vitest arguments]
//
// Builds the addon with AddressSanitizer + UndefinedBehaviorSanitizer into build-sanitize/ (the
// plain build/Release the other tests load is left alone), then runs the test suite in stock node
// with the sanitizer runtimes preloaded and PAGEMIRROR_ADDON pointing at the sanitized addon.
// Every process of the run (vitest's workers, the fixtures' node children, forked access children)
// inherits the environment and writes its reports to its own file under build-sanitize/logs; the
// run fails if any report was written, whatever vitest said. LeakSanitizer runs at each exit, with
// suppressions (test/sanitize/lsan.supp) for allocations node and V8 keep to the end on purpose.
//
// Options (before any vitest arguments): --no-build reuses the sanitized build as it is.
import { spawn, spawnSync, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gypWorkdir, nodedirArgs } from './gyp-workdir.mjs';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const work = path.join(root, 'build-sanitize');
const addon = path.join(work, 'build', 'Release', 'pagemirror.node');
const logs = path.join(work, 'logs');
const suppressions = path.join(root, 'test', 'sanitize', 'lsan.supp');

let args = process.argv.slice(2);
const build = args[0] !== '--no-build';
if (!build) args = args.slice(1);

function runtime(name) {
  const p = execFileSync(process.env.CXX || 'g++', [`-print-file-name=${name}`], { encoding: 'utf8' }).trim();
  // g++ prints the bare name back when it has no such library.
  if (!path.isAbsolute(p) || !fs.existsSync(p)) {
    console.error(`test:sanitize: ${name} not found (g++ -print-file-name=${name} said ${p}): install the compiler's sanitizer runtimes (Debian: libasan8 libubsan1 with g++ 12)`);
    process.exit(2);
  }
  return p;
}
const asan = runtime('libasan.so');
const ubsan = runtime('libubsan.so');

const started = Date.now();
if (build) {
  gypWorkdir(root, work);
  const gyp = path.join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
  const nodedir = nodedirArgs();
  const r = spawnSync(process.execPath, [gyp, 'rebuild', '-j', 'max', ...nodedir], {
    cwd: work,
    stdio: 'inherit',
    env: { ...process.env, GYP_DEFINES: `${process.env.GYP_DEFINES ?? ''} sanitize=1`.trim() },
  });
  if (r.status !== 0) {
    console.error('test:sanitize: the sanitized build failed');
    process.exit(r.status ?? 2);
  }
}
if (!fs.existsSync(addon)) {
  console.error(`test:sanitize: ${addon} is missing (run without --no-build)`);
  process.exit(2);
}

fs.rmSync(logs, { recursive: true, force: true });
fs.mkdirSync(logs, { recursive: true });
const env = {
  ...process.env,
  PAGEMIRROR_ADDON: addon,
  // Tests whose work, not whose bound, is sized for the plain build read this (fork-heavy loops).
  PAGEMIRROR_SANITIZED: '1',
  // libasan must come first in the library list of a program that was not built with it.
  LD_PRELOAD: [asan, ubsan, process.env.LD_PRELOAD].filter(Boolean).join(':'),
  // SIGSEGV belongs to node (its WebAssembly trap handler) and SIGBUS to the addon's guarded
  // accesses: ASan must not take them over.
  ASAN_OPTIONS: [
    `log_path=${path.join(logs, 'asan')}`,
    'detect_leaks=1',
    // Symbolizing node's own leak stacks (its debug info is large) takes minutes per process: stacks
    // keep module+offset, and the reports that name the addon are symbolized below with addr2line.
    'symbolize=0',
    // Eight frames name the code that allocated; a deeper stack per leak makes each exit slow.
    'malloc_context_size=8',
    // A leak found at exit must not change the exit code of the tools the tests run (tsc, mkfs):
    // every report is collected from the logs below instead.
    'exitcode=0',
    'handle_segv=0',
    'handle_sigbus=0',
    'allow_user_segv_handler=1',
    'detect_odr_violation=0',
    process.env.ASAN_OPTIONS,
  ]
    .filter(Boolean)
    .join(':'),
  // The suppressions are applied below, to the addon's frames only: handed to LSan they would make
  // it symbolize every stack of node's at each exit.
  UBSAN_OPTIONS: [`log_path=${path.join(logs, 'ubsan')}`, 'halt_on_error=1', 'abort_on_error=1', 'print_stacktrace=1', process.env.UBSAN_OPTIONS].filter(Boolean).join(':'),
};

const vitest = path.join(root, 'node_modules', 'vitest', 'vitest.mjs');
const testStart = Date.now();
// GCC's libubsan writes to stderr whatever log_path says: the run's output is scanned too, and
// abort_on_error makes a process that hit one die visibly even where a parent swallows its stderr.
const seen = [];
let tail = '';
const t = await new Promise((resolve) => {
  const child = spawn(process.execPath, [vitest, 'run', ...args], { cwd: root, stdio: ['inherit', 'pipe', 'pipe'], env });
  const scan = (chunk, out) => {
    out.write(chunk);
    const text = tail + chunk.toString('utf8');
    const lines = text.split('\n');
    tail = lines.pop();
    for (const l of lines) if (/runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer/.test(l)) seen.push(l.trim());
  };
  child.stdout.on('data', (c) => scan(c, process.stdout));
  child.stderr.on('data', (c) => scan(c, process.stderr));
  child.on('exit', (status, signal) => resolve({ status, signal }));
});
const seconds = (ms) => (ms / 1000).toFixed(0);

// Reports: every ASan error and UBSan report counts. Leak reports are split into their records; a
// record none of whose frames is in the addon is node's or V8's own (they free nothing at exit) and
// is dropped; the addon's frames of the others are symbolized and matched against the suppressions.
const supp = fs
  .readFileSync(suppressions, 'utf8')
  .split('\n')
  .filter((l) => l.startsWith('leak:'))
  .map((l) => new RegExp(l.slice(5).trim().replace(/[.+?^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*')));
const addonName = path.basename(addon);
function symbolize(record) {
  const frames = [...record.matchAll(/^\s+#\d+ 0x[0-9a-f]+ +\((\S+)\+(0x[0-9a-f]+)\)$/gm)].filter((m) => path.basename(m[1]) === addonName);
  if (!frames.length) return undefined;
  const out = spawnSync('addr2line', ['-f', '-C', '-i', '-e', frames[0][1], ...frames.map((m) => m[2])], { encoding: 'utf8' });
  return (out.stdout ?? '').split('\n').filter(Boolean);
}
const findings = [];
let nodeOwn = 0;
let suppressed = 0;
for (const f of fs.readdirSync(logs)) {
  const text = fs.readFileSync(path.join(logs, f), 'utf8');
  if (!text.trim()) continue;
  if (!/LeakSanitizer: detected memory leaks/.test(text) || /ERROR: AddressSanitizer|runtime error/.test(text)) {
    findings.push(`${f}:\n${text}`);
    continue;
  }
  for (const record of text.split(/\n\n+/).filter((r) => /^(Direct|Indirect) leak/.test(r.trim()))) {
    const names = symbolize(record);
    if (!names) nodeOwn++;
    else if (names.some((n) => supp.some((re) => re.test(n)))) suppressed++;
    else findings.push(`${f}: ${record.trim()}\n  in the addon: ${names.join(' <- ')}`);
  }
}
// Reports printed in the run's output (UBSan's, and any a child wrote to an inherited stderr); an
// ASan error there is also in a log file, so only the ones the logs lack are added.
for (const l of seen) if (!/LeakSanitizer/.test(l) && !findings.some((x) => x.includes(l))) findings.push(`in the test output: ${l}`);
for (const x of findings) console.error(`\n===== sanitizer report ${x}`);
console.log(
  `\ntest:sanitize: ${findings.length} sanitizer report(s) (leak records dropped: ${nodeOwn} of node's own, ${suppressed} suppressed by ${path.relative(root, suppressions)}; logs in ${path.relative(root, logs)}); ` +
    `vitest exit ${t.status ?? t.signal}; build + tests ${seconds(Date.now() - started)} s (tests ${seconds(Date.now() - testStart)} s)`,
);
process.exit(t.status !== 0 ? t.status ?? 1 : findings.length ? 1 : 0);
