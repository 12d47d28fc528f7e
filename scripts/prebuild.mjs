#!/usr/bin/env node
// npm run build:prebuilds [-- --force] (and npm pack, through "prepack"): the prebuilt binaries the package
// ships, in prebuilds/linux-<arch>/:
//   pagemirror.uv1.glibc.node    the addon, named with the tags node-gyp-build matches
//                                (lib/addon-path.ts, scripts/install.mjs): glibc, and libuv 1
//                                (the fault service wakes the JavaScript thread with a uv_async_t)
//   uffd_baseline, pager_c       the C benchmark baselines (`pagemirror bench`)
//   pagemirror_preload.so        the preload shim of `pagemirror run` (docs/attach.md)
//   pagemirror_client.a          the C client library users link into their own programs, with
//                                native/client/pagemirror_client.h (shipped as source)
// all stripped (the static library of its debug information only: linking needs its symbols). The addon is pure Node-API (NAPI_VERSION 8 in binding.gyp): one build per
// architecture loads on every supported Node, so it is built once, against the headers of the node
// that runs this. Each architecture is built by prebuildify in build-prebuild/<arch>/, a copy of
// binding.gyp over the same sources, so build/Release (what the tests load) stays as it is.
//
// Architectures: PAGEMIRROR_PREBUILD_ARCHS (comma-separated), default "x64,arm64"; one that is not
// this machine's is cross-compiled with Debian's g++-<triple> (g++-aarch64-linux-gnu), and a
// missing cross compiler is an error, not a smaller package. An architecture whose outputs are
// newer than every source file is not rebuilt (--force rebuilds it).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gypWorkdir, nodedirArgs } from './gyp-workdir.mjs';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const EXECUTABLES = ['uffd_baseline', 'pager_c'];
const SHIM = 'pagemirror_preload.so';
const CLIENT_LIBRARY = 'pagemirror_client.a';
const ADDON = 'pagemirror.uv1.glibc.node';
// The shim is preloaded into any dynamically linked program, which may carry nothing but libc: it
// may need glibc's libraries only (libpthread and libdl are in libc since 2.34, stubs before).
const SHIM_LIBRARIES = /^(libc\.so\.6|libpthread\.so\.0|libdl\.so\.2)$/;
// What makes it a shim: the wrappers a stripped or mislinked build would silently lose.
const SHIM_WRAPPERS = ['malloc', 'calloc', 'realloc', 'free', 'mmap', 'munmap', 'mremap', 'madvise', 'mprotect'];
const TRIPLES = { x64: 'x86_64-linux-gnu', arm64: 'aarch64-linux-gnu' };
// ELF e_machine of each architecture: a cross build that silently used the host compiler is caught.
// The addon is also checked to import nothing of node's but Node-API and libuv (nodeImports).
const MACHINES = { x64: 62, arm64: 183 };

const force = process.argv.includes('--force');
const archs = (process.env.PAGEMIRROR_PREBUILD_ARCHS || 'x64,arm64').split(',').map((a) => a.trim()).filter(Boolean);

function fail(message) {
  console.error(`prebuild: ${message}`);
  process.exit(1);
}

function newestSource() {
  let newest = fs.statSync(path.join(root, 'binding.gyp')).mtimeMs;
  const walk = (dir) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else newest = Math.max(newest, fs.statSync(p).mtimeMs);
    }
  };
  walk(path.join(root, 'native'));
  walk(path.join(root, 'bench', 'c'));
  return newest;
}

function elfMachine(file) {
  const fd = fs.openSync(file, 'r');
  try {
    const head = Buffer.alloc(20);
    fs.readSync(fd, head, 0, 20, 0);
    if (head.readUInt32BE(0) !== 0x7f454c46) return -1;
    return head.readUInt16LE(18);
  } finally {
    fs.closeSync(fd);
  }
}

/** The ELF e_machine of each ELF member of an ar archive (a static library). */
function archiveMachines(file) {
  const data = fs.readFileSync(file);
  if (data.toString('latin1', 0, 8) !== '!<arch>\n') return [];
  const machines = [];
  // Each member: a 60-byte header whose size field is decimal at bytes 48..57, the data padded to
  // an even offset. The symbol and name tables are not ELF and are passed over.
  for (let at = 8; at + 60 <= data.length; ) {
    const size = Number(data.toString('latin1', at + 48, at + 58).trim());
    const body = at + 60;
    if (data.readUInt32BE(body) === 0x7f454c46) machines.push(data.readUInt16LE(body + 18));
    at = body + size + (size % 2);
  }
  return machines;
}

function readelf(args, file) {
  const r = spawnSync('readelf', [...args, '--wide', file], { encoding: 'utf8' });
  if (r.status !== 0) fail(`readelf ${args.join(' ')} ${file} failed: ${r.stderr || r.error?.message}`);
  return r.stdout.split('\n').map((l) => l.trim().split(/\s+/));
}

/**
 * The dynamic symbols a file imports (undefined, not weak) and those it defines (global functions),
 * each with its version (`getenv@GLIBC_2.2.5`: the version after the @), or '' when it has none.
 */
function dynamicSymbols(file) {
  const rows = readelf(['--dyn-syms'], file).filter((c) => c[4] === 'GLOBAL' && c[7]);
  const named = (c) => ({ name: c[7].split('@')[0], version: c[7].split('@').filter(Boolean)[1] ?? '' });
  return {
    imports: rows.filter((c) => c[6] === 'UND').map(named),
    defines: rows.filter((c) => c[6] !== 'UND' && c[3] === 'FUNC').map(named),
  };
}

/**
 * The symbols the addon expects from the process that loads it (with no library version): node's.
 * Versioned ones (GLIBC_, GLIBCXX_, CXXABI_, GCC_) are the libraries'.
 */
function nodeImports(file) {
  return dynamicSymbols(file).imports.filter((s) => !s.version).map((s) => s.name);
}

/** Why the shim would not load into any program, or undefined: foreign libraries, symbols or a lost wrapper. */
function shimProblem(file) {
  const needed = readelf(['--dynamic'], file)
    .filter((c) => c[1] === '(NEEDED)')
    .map((c) => c.at(-1).replace(/^\[|\]$/g, ''));
  const foreign = needed.filter((l) => !SHIM_LIBRARIES.test(l));
  if (foreign.length) return `it needs ${foreign.join(' ')} (only libc, libpthread and libdl: a preloaded library must load into a program that has nothing else)`;
  const { imports, defines } = dynamicSymbols(file);
  const notGlibc = imports.filter((s) => !s.version.startsWith('GLIBC_')).map((s) => `${s.name}${s.version ? '@' + s.version : ''}`);
  if (notGlibc.length) return `it imports symbols that are not glibc's: ${notGlibc.join(' ')}`;
  const names = new Set(defines.map((s) => s.name));
  const lost = SHIM_WRAPPERS.filter((w) => !names.has(w));
  if (lost.length) return `it does not define ${lost.join(' ')}`;
  // --exclude-libs: the client library inside must not take over a program's own pm_* symbols.
  const leaked = [...names].filter((n) => n.startsWith('pm_'));
  if (leaked.length) return `it exports the client library's ${leaked.join(' ')}`;
  return undefined;
}

function tools(arch) {
  if (arch === os.arch()) return { env: {}, strip: 'strip' };
  const triple = TRIPLES[arch];
  if (!triple) fail(`no cross compiler known for ${arch} (known: ${Object.keys(TRIPLES).join(', ')})`);
  const cxx = `${triple}-g++`;
  if (spawnSync(cxx, ['--version'], { stdio: 'ignore' }).status !== 0)
    fail(`${cxx} not found: install it (Debian: apt-get install g++-${triple}) or build only this machine's architecture: PAGEMIRROR_PREBUILD_ARCHS=${os.arch()}`);
  return { env: { CC: `${triple}-gcc`, CXX: cxx, LINK: cxx, AR: `${triple}-ar` }, strip: `${triple}-strip` };
}

function build(arch) {
  const out = path.join(root, 'prebuilds', `linux-${arch}`);
  const outputs = [ADDON, ...EXECUTABLES, SHIM, CLIENT_LIBRARY].map((f) => path.join(out, f));
  if (!force && outputs.every((f) => fs.existsSync(f) && fs.statSync(f).mtimeMs > newestSource())) {
    console.log(`prebuild: prebuilds/linux-${arch} is up to date`);
    return;
  }
  const { env, strip } = tools(arch);
  const work = gypWorkdir(root, path.join(root, 'build-prebuild', arch));
  fs.rmSync(out, { recursive: true, force: true });
  const nodedir = nodedirArgs().map((a) => a.replace(/^--nodedir=/, ''));
  const started = Date.now();
  const r = spawnSync(
    process.execPath,
    [
      path.join(root, 'node_modules', 'prebuildify', 'bin.js'),
      '--napi', '--strip', '--tag-uv', '--tag-libc',
      `--strip-bin=${strip}`,
      `--arch=${arch}`,
      `--target=node@${process.versions.node}`,
      '--name=pagemirror',
      `--cwd=${work}`,
      `--out=${root}`,
      `--node-gyp=${path.join(root, 'node_modules', '.bin', 'node-gyp')}`,
    ],
    {
      stdio: 'inherit',
      env: {
        ...process.env,
        ...env,
        npm_config_jobs: 'max',
        ...(nodedir.length ? { npm_config_nodedir: nodedir[0] } : {}),
      },
    },
  );
  if (r.status !== 0) fail(`the ${arch} build failed (prebuildify exited ${r.status ?? r.signal})`);
  // prebuildify ships the .node file only: the other native files come from the same build.
  const copy = (name, mode, stripArgs) => {
    const dest = path.join(out, name);
    fs.copyFileSync(path.join(work, 'build', 'Release', name), dest);
    fs.chmodSync(dest, mode);
    if (spawnSync(strip, [...stripArgs, dest], { stdio: 'inherit' }).status !== 0) fail(`${strip} ${dest} failed`);
  };
  for (const exe of [...EXECUTABLES, SHIM]) copy(exe, 0o755, ['--strip-all']);
  copy(CLIENT_LIBRARY, 0o644, ['--strip-debug']);
  for (const f of outputs) {
    if (!fs.existsSync(f)) fail(`${path.relative(root, f)} was not built`);
    const machines = f.endsWith('.a') ? archiveMachines(f) : [elfMachine(f)];
    if (!machines.length || machines.some((m) => m !== MACHINES[arch]))
      fail(`${path.relative(root, f)} is not an ${arch} ELF file (e_machine ${machines.join(', ') || 'none'})`);
  }
  const internals = nodeImports(outputs[0]).filter((s) => !/^(napi_|uv_)/.test(s));
  if (internals.length) fail(`${path.relative(root, outputs[0])} needs symbols of node beyond Node-API and libuv, which change between majors: ${internals.join(' ')}`);
  const shimWrong = shimProblem(path.join(out, SHIM));
  if (shimWrong) fail(`prebuilds/linux-${arch}/${SHIM} cannot be preloaded everywhere: ${shimWrong}`);
  console.log(`prebuild: prebuilds/linux-${arch} built in ${((Date.now() - started) / 1000).toFixed(0)} s`);
}

for (const arch of archs) build(arch);
