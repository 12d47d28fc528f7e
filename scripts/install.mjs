#!/usr/bin/env node
// npm's install step ("install": "node scripts/install.mjs").
//
// In a checkout (this package is not inside a node_modules directory): `node-gyp rebuild` into
// build/Release, as always: the tests load that build, and a change to the C++ must be built.
//
// Installed as a dependency: a prebuilt binary (prebuilds/<platform>-<arch>/) that loads on this
// machine is used as it is, and nothing is compiled. Otherwise (another architecture or libc, a
// glibc or libstdc++ older than the prebuilt binary needs, or `--build-from-source`) it is built
// from source with node-gyp, and build/ is then cut down to what runs or is linked: the addon, the
// two C benchmark executables, the preload shim of `pagemirror run` and the C client library users
// link (the files prebuilds/ would have had). The objects, dependency files, makefiles and the
// client's demo and fuzz programs left beside them (2.5 MB) serve only the tests of a checkout and
// an incremental rebuild, which a dependency never gets. Either way the prebuilt
// binaries that will not run here (other architectures; all of them after a source build, which
// the loader takes first) are removed, about 1 MB each.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const KEEP = ['pagemirror.node', 'uffd_baseline', 'pager_c', 'pagemirror_preload.so', 'pagemirror_client.a'];
const dependency = root.split(path.sep).includes('node_modules');
const fromSource = process.env.npm_config_build_from_source === 'true' || process.argv.includes('--build-from-source');

/** Whether a prebuilt addon for this machine exists and loads, tried in a child: a bad binary may crash. */
function prebuildLoads() {
  // node -e resolves require() from its working directory: node-gyp-build as this package sees it.
  const probe = `const f = require('node-gyp-build').resolve(${JSON.stringify(root)}); require(f); console.log(f)`;
  const r = spawnSync(process.execPath, ['-e', probe], {
    cwd: root,
    encoding: 'utf8',
    env: { ...process.env, PREBUILDS_ONLY: '1' },
    timeout: 60_000,
  });
  if (r.status === 0) return { ok: true, file: r.stdout.trim() };
  return { ok: false, why: (r.stderr || r.error?.message || `exit ${r.status}`).trim().split('\n').find((l) => /Error|error|not found/.test(l)) ?? 'it did not load' };
}

function nodeGyp(args) {
  // npm puts its own node-gyp on PATH for install scripts (and the checkout's devDependency first).
  const r = spawnSync('node-gyp', args, { cwd: root, stdio: 'inherit' });
  if (r.error?.code === 'ENOENT') {
    console.error('pagemirror: node-gyp not found: run this through npm (`npm rebuild pagemirror`), which provides it');
    process.exit(1);
  }
  if (r.status !== 0) {
    console.error('pagemirror: the source build failed (see above): it needs python3, make and a C++17 compiler');
    process.exit(r.status ?? 1);
  }
}

function prune() {
  const build = path.join(root, 'build');
  const release = path.join(build, 'Release');
  for (const e of fs.readdirSync(build)) if (e !== 'Release') fs.rmSync(path.join(build, e), { recursive: true, force: true });
  for (const e of fs.readdirSync(release)) if (!KEEP.includes(e)) fs.rmSync(path.join(release, e), { recursive: true, force: true });
}

/** Removes every prebuilds/ directory but `chosen` (all of them when undefined). */
function keepPrebuilds(chosen) {
  const dir = path.join(root, 'prebuilds');
  if (!fs.existsSync(dir)) return;
  for (const e of fs.readdirSync(dir)) if (path.join(dir, e) !== chosen) fs.rmSync(path.join(dir, e), { recursive: true, force: true });
  if (!chosen) fs.rmSync(dir, { recursive: true, force: true });
}

if (!dependency) {
  nodeGyp(['rebuild']);
} else {
  const prebuilt = fromSource ? { ok: false, why: 'a source build was asked for' } : prebuildLoads();
  if (prebuilt.ok) {
    // A build left by an earlier source install would be loaded first, and it is not what this
    // install chose.
    fs.rmSync(path.join(root, 'build'), { recursive: true, force: true });
    keepPrebuilds(path.dirname(prebuilt.file));
    console.log(`pagemirror: using the prebuilt binary ${path.relative(root, prebuilt.file)} (no compile)`);
  } else {
    console.log(`pagemirror: building from source (${prebuilt.why})`);
    nodeGyp(['rebuild']);
    prune();
    keepPrebuilds(undefined);
  }
}
