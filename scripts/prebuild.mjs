#!/usr/bin/env node
// npm run build:prebuilds [-- --force] (and npm pack, through "prepack"): the prebuilt binaries the package
// ships, in prebuilds/linux-<arch>/:
//   pagemirror.uv1.glibc.node    the addon, named with the tags node-gyp-build matches
//                                (lib/addon-path.ts, scripts/install.mjs): glibc, and libuv 1
//                                (the fault service wakes the JavaScript thread with a uv_async_t)
//   uffd_baseline, pager_c       the C benchmark baselines (`pagemirror bench`)
// all stripped. The addon is pure Node-API (NAPI_VERSION 8 in binding.gyp): one build per
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
const ADDON = 'pagemirror.uv1.glibc.node';
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

/**
 * The symbols the addon expects from the process that loads it (undefined, not weak, with no
 * library version): node's. Versioned ones (GLIBC_, GLIBCXX_, CXXABI_, GCC_) are the libraries'.
 */
function nodeImports(file) {
  const r = spawnSync('readelf', ['--dyn-syms', '--wide', file], { encoding: 'utf8' });
  if (r.status !== 0) fail(`readelf --dyn-syms ${file} failed: ${r.stderr || r.error?.message}`);
  return r.stdout
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter((c) => c[6] === 'UND' && c[4] === 'GLOBAL' && c[7] && !c[7].includes('@'))
    .map((c) => c[7]);
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
  const outputs = [ADDON, ...EXECUTABLES].map((f) => path.join(out, f));
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
  // prebuildify ships the .node file only: the benchmarks' executables come from the same build.
  for (const exe of EXECUTABLES) {
    const dest = path.join(out, exe);
    fs.copyFileSync(path.join(work, 'build', 'Release', exe), dest);
    fs.chmodSync(dest, 0o755);
    if (spawnSync(strip, ['--strip-all', dest], { stdio: 'inherit' }).status !== 0) fail(`${strip} ${dest} failed`);
  }
  for (const f of outputs) {
    if (!fs.existsSync(f)) fail(`${path.relative(root, f)} was not built`);
    if (elfMachine(f) !== MACHINES[arch]) fail(`${path.relative(root, f)} is not an ${arch} ELF file (e_machine ${elfMachine(f)})`);
  }
  const internals = nodeImports(outputs[0]).filter((s) => !/^(napi_|uv_)/.test(s));
  if (internals.length) fail(`${path.relative(root, outputs[0])} needs symbols of node beyond Node-API and libuv, which change between majors: ${internals.join(' ')}`);
  console.log(`prebuild: prebuilds/linux-${arch} built in ${((Date.now() - started) / 1000).toFixed(0)} s`);
}

for (const arch of archs) build(arch);
