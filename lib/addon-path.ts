// Where the native code of this package is, without loading it (the CLI, the benchmarks and
// `pagemirror run` find their files through here). Order, for the addon and every helper file:
//   1. PAGEMIRROR_ADDON, when set (native.ts: the sanitizer build of `npm run test:sanitize`), and
//      for the helpers its directory;
//   2. build/Release, then build/Debug: a source build, the checkout's (what the tests load) or one
//      made on install where no prebuilt binary loads;
//   3. prebuilds/<platform>-<arch>/: the binaries shipped in the package (scripts/prebuild.mjs),
//      chosen by node-gyp-build from the tags in their names (libc, libuv major).
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const packageRoot = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const platformArch = `${os.platform()}-${os.arch()}`;

/** The remedy a missing build names: a checkout builds with npm install, a dependency is rebuilt. */
function remedy(fromSource = false): string {
  return packageRoot.split(path.sep).includes('node_modules')
    ? `run \`npm rebuild pagemirror${fromSource ? ' --build-from-source' : ''}\` in your project (a source build: python3, make and a C++17 compiler)`
    : 'run `npm install` (or `npx node-gyp rebuild`); it needs python3, make and a C++17 compiler';
}

function notBuilt(what: string, cause?: unknown, fromSource = false): Error {
  return Object.assign(new Error(`pagemirror: ${what}: ${remedy(fromSource)}`), { code: 'ERR_PAGEMIRROR_NOT_BUILT', cause });
}

/** The addon file to load (PAGEMIRROR_ADDON aside); `ERR_PAGEMIRROR_NOT_BUILT` when there is none. */
export function addonPath(): string {
  const nodeGypBuild = require('node-gyp-build') as { resolve(dir: string): string };
  try {
    return nodeGypBuild.resolve(packageRoot);
  } catch (err) {
    throw notBuilt(
      `the native addon is not built for ${platformArch} (no build/Release/pagemirror.node, and no prebuilt binary in prebuilds/${platformArch}/ for this libc)`,
      err,
    );
  }
}

/**
 * Loads the addon (PAGEMIRROR_ADDON aside). A source build that does not load throws as it is (the
 * loader's message says why); a prebuilt binary that does not load on this machine (an older
 * glibc or libstdc++ than it was built against, when the install's source-build fallback did not
 * run) is `ERR_PAGEMIRROR_NOT_BUILT` with the reason and the remedy.
 */
export function loadAddon(): unknown {
  const file = addonPath();
  try {
    return require(file);
  } catch (err) {
    if (path.relative(packageRoot, file).split(path.sep)[0] !== 'prebuilds') throw err;
    const why = String((err as Error).message).split('\n')[0];
    throw notBuilt(`the prebuilt binary ${path.relative(packageRoot, file)} does not load here (${why})`, err, true);
  }
}

/** The native files built and shipped with the addon, found by {@link helperPath}. */
export type HelperName = 'uffd_baseline' | 'pager_c' | 'pagemirror_preload.so' | 'pagemirror_client.a';

const HELPER_WHAT: Record<HelperName, string> = {
  uffd_baseline: 'the C benchmark uffd_baseline',
  pager_c: 'the C benchmark pager_c',
  'pagemirror_preload.so': 'the preload shim pagemirror_preload.so (pagemirror run)',
  'pagemirror_client.a': 'the C client library pagemirror_client.a',
};

/**
 * A native file built with the addon (the C benchmarks, the preload shim, the client library),
 * looked for in the addon's order: the directory of the build PAGEMIRROR_ADDON names (the sanitizer
 * build builds them all beside its addon), build/Release, build/Debug, prebuilds/<platform>-<arch>.
 * A file is taken from the first directory that has it.
 */
export function helperPath(name: HelperName): string {
  const dirs = [path.join('build', 'Release'), path.join('build', 'Debug'), path.join('prebuilds', platformArch)].map((d) => path.join(packageRoot, d));
  const chosen = process.env.PAGEMIRROR_ADDON;
  if (chosen) dirs.unshift(path.dirname(path.resolve(chosen)));
  for (const d of dirs) {
    const p = path.join(d, name);
    if (fs.existsSync(p)) return p;
  }
  throw notBuilt(`${HELPER_WHAT[name]} is not built for ${platformArch} (looked in ${dirs.map((d) => path.relative(packageRoot, d) || '.').join(', ')})`);
}
