// The package as a user sees it through its "exports" map (node resolves 'pagemirror' from the repo
// root by the package's self-reference): the main entry carries only the documented API, internals
// sit in 'pagemirror/internal', and what the package ships is complete (licence, source maps whose
// sources are shipped).
import { describe, it, expect } from 'vitest';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));

/** The export names of a module specifier, imported by a separate node from the repo root. */
function exportsOf(specifier: string): string[] {
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', `console.log(JSON.stringify(Object.keys(await import(${JSON.stringify(specifier)}))))`], {
    cwd: root,
    encoding: 'utf8',
    timeout: 30_000,
  });
  return JSON.parse(out);
}

describe('the package entry points', () => {
  it("'pagemirror' exports no internals; 'pagemirror/internal' has the addon; dist/index.js (tests, fuzzer) is the public API plus _native", () => {
    const pub = exportsOf('pagemirror');
    expect(pub).toContain('mapAnonymous');
    expect(pub.filter((k) => k.startsWith('_'))).toEqual([]);
    expect(exportsOf('pagemirror/internal')).toEqual(['_native']);
    // A public export added to lib/index.ts instead of lib/api.ts would be invisible to users.
    expect(exportsOf('./dist/index.js').sort()).toEqual([...pub, '_native'].sort());
  });

  it('the type declarations of the public entry name no @internal member', () => {
    const dts = fs.readdirSync(path.join(root, 'dist')).filter((f) => f.endsWith('.d.ts'));
    for (const f of dts) {
      if (f === 'internal.d.ts' || f === 'native.d.ts' || f === 'index.d.ts') continue;
      const text = fs.readFileSync(path.join(root, 'dist', f), 'utf8');
      expect(text, f).not.toMatch(/@internal/);
    }
    expect(fs.readFileSync(path.join(root, 'dist', 'api.d.ts'), 'utf8')).not.toMatch(/_native/);
  });
});

describe('package metadata', () => {
  it('ships an MIT LICENSE matching package.json', () => {
    expect(pkg.license).toBe('MIT');
    const text = fs.readFileSync(path.join(root, 'LICENSE'), 'utf8');
    expect(text).toMatch(/^MIT License/);
    expect(text).toContain('the pagemirror authors');
  });

  it('every source map points at sources the package ships', () => {
    const shipped = (rel: string) => (pkg.files as string[]).some((f) => rel === f || rel.startsWith(f + '/'));
    const maps: string[] = [];
    const walk = (d: string) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) walk(p);
        else if (e.name.endsWith('.map')) maps.push(p);
      }
    };
    walk(path.join(root, 'dist'));
    expect(maps.length).toBeGreaterThan(0);
    for (const m of maps) {
      const { sources } = JSON.parse(fs.readFileSync(m, 'utf8')) as { sources: string[] };
      for (const s of sources) {
        const abs = path.resolve(path.dirname(m), s);
        expect(fs.existsSync(abs), `${m} -> ${s}`).toBe(true);
        expect(shipped(path.relative(root, abs)), `${path.relative(root, m)} -> ${s} is not in package.json "files"`).toBe(true);
      }
    }
  });
});

// What npm pack puts in the tarball (listed without running prepack: scripts/test-package.sh, `npm
// run test:package`, packs and installs it for real, in CI). The prebuilt binaries are build
// output, made by prepack, so they are checked when this checkout has them.
describe('the packed tarball', () => {
  it('ships the install script and the prebuilt binaries with their executables executable, and no build output or tests', () => {
    const out = execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: root, encoding: 'utf8', timeout: 60_000 });
    const files = new Map((JSON.parse(out)[0].files as { path: string; mode: number }[]).map((f) => [f.path, f.mode]));
    expect(pkg.scripts.install).toBe('node scripts/install.mjs');
    expect(pkg.scripts.prepack).toBe('node scripts/prebuild.mjs');
    expect(pkg.dependencies['node-gyp-build']).toBeDefined();
    // The client library's header: users compile against it (the library itself is in prebuilds/).
    for (const f of ['scripts/install.mjs', 'binding.gyp', 'dist/api.js', 'dist/addon-path.js', 'native/binding/addon.cc', 'bench/c/uffd_baseline.c', 'native/client/pagemirror_client.h', 'native/client/pm_demo.c'])
      expect(files.has(f), f).toBe(true);
    expect([...files.keys()].filter((f) => /^(build|build-prebuild|build-sanitize|test|node_modules)\//.test(f))).toEqual([]);
    const prebuilds = path.join(root, 'prebuilds');
    if (fs.existsSync(prebuilds)) {
      for (const dir of fs.readdirSync(prebuilds)) {
        expect(files.get(`prebuilds/${dir}/pagemirror.uv1.glibc.node`), dir).toBeDefined();
        for (const exe of ['uffd_baseline', 'pager_c']) expect(files.get(`prebuilds/${dir}/${exe}`)! & 0o111, `${dir}/${exe}`).toBe(0o111);
        // pagemirror run's shim and the client library: without them run needs a source build.
        expect(files.get(`prebuilds/${dir}/pagemirror_preload.so`), `${dir}/pagemirror_preload.so`).toBeDefined();
        expect(files.get(`prebuilds/${dir}/pagemirror_client.a`), `${dir}/pagemirror_client.a`).toBeDefined();
      }
    }
    // CI runs the real thing.
    expect(fs.readFileSync(path.join(root, '.ci', 'run'), 'utf8')).toMatch(/npm run test:package -- --source-build --arm64/);
  });
});

// Where the addon comes from (lib/addon-path.ts): PAGEMIRROR_ADDON, then a source build
// (build/Release), then the prebuilt binaries in prebuilds/<platform>-<arch>/. Each case lays out a
// package the way an install leaves it (dist/, package.json, its dependencies, and the native files
// the case is about) in a temp dir, under a node_modules directory as a dependency is; the
// prebuilt addon is a copy of this checkout's build/Release one, as prebuildify's is of its build.
describe('the addon loader: source build, then prebuilt binaries', () => {
  const arch = `${process.platform}-${process.arch}`;
  const other = process.arch === 'arm64' ? 'linux-x64' : 'linux-arm64';
  const built = path.join(root, 'build', 'Release');
  // PAGEMIRROR_ADDON (the sanitizer run's) would name a build and hide what the loader chooses.
  const env = { ...process.env, PAGEMIRROR_ADDON: '', PREBUILDS_ONLY: '' };

  function layout(files: Record<string, string | Buffer>): string {
    const top = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-loader-'));
    const dir = path.join(top, 'node_modules', 'pagemirror');
    fs.mkdirSync(dir, { recursive: true });
    fs.cpSync(path.join(root, 'dist'), path.join(dir, 'dist'), { recursive: true });
    fs.copyFileSync(path.join(root, 'package.json'), path.join(dir, 'package.json'));
    fs.mkdirSync(path.join(dir, 'scripts'));
    fs.copyFileSync(path.join(root, 'scripts', 'install.mjs'), path.join(dir, 'scripts', 'install.mjs'));
    // Its dependencies, hoisted beside it as npm installs them.
    for (const dep of ['node-gyp-build']) fs.symlinkSync(path.join(root, 'node_modules', dep), path.join(top, 'node_modules', dep));
    for (const [rel, content] of Object.entries(files)) {
      fs.mkdirSync(path.dirname(path.join(dir, rel)), { recursive: true });
      if (typeof content === 'string') fs.copyFileSync(content, path.join(dir, rel));
      else fs.writeFileSync(path.join(dir, rel), content);
      fs.chmodSync(path.join(dir, rel), 0o755);
    }
    return dir;
  }

  const HELPERS = ['uffd_baseline', 'pager_c', 'pagemirror_preload.so', 'pagemirror_client.a'] as const;
  type Helpers = Record<(typeof HELPERS)[number], string>;

  /**
   * What the package at `dir` loads: the addon file, one call into the addon, and where each helper
   * file is found, relative to `dir` (or the error code and message when it is not).
   */
  function loads(dir: string, extraEnv: Record<string, string> = {}) {
    const code = `
      const { addonPath, helperPath } = await import('./dist/addon-path.js');
      const { _native } = await import('./dist/internal.js');
      const path = await import('node:path');
      const helpers = {};
      for (const h of ${JSON.stringify(HELPERS)}) {
        try { helpers[h] = path.relative(process.cwd(), helperPath(h)); } catch (e) { helpers[h] = e.code + ': ' + e.message; }
      }
      console.log(JSON.stringify({ addon: addonPath(), helper: helperPath('uffd_baseline'), helpers, machine: _native.uname().machine }));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], { cwd: dir, encoding: 'utf8', timeout: 30_000, env: { ...env, ...extraEnv } });
    return { ...r, json: r.status === 0 ? (JSON.parse(r.stdout) as { addon: string; helper: string; helpers: Helpers; machine: string }) : undefined };
  }

  function probeFails(dir: string, pattern: RegExp): void {
    const r = spawnSync(process.execPath, [path.join(dir, 'dist', 'cli.js'), 'probe'], { cwd: dir, encoding: 'utf8', timeout: 30_000, env });
    expect(r.status, r.stderr).toBe(1);
    expect(r.stderr.trimEnd().split('\n'), r.stderr).toHaveLength(1);
    expect(r.stderr).toMatch(pattern);
  }

  const prebuilt = (a = arch) => ({
    [`prebuilds/${a}/pagemirror.uv1.glibc.node`]: path.join(built, 'pagemirror.node'),
    [`prebuilds/${a}/uffd_baseline`]: path.join(built, 'uffd_baseline'),
    [`prebuilds/${a}/pager_c`]: path.join(built, 'pager_c'),
    [`prebuilds/${a}/pagemirror_preload.so`]: path.join(built, 'pagemirror_preload.so'),
    [`prebuilds/${a}/pagemirror_client.a`]: path.join(built, 'pagemirror_client.a'),
  });

  it('a package with prebuilt binaries and no build/ loads the prebuilt addon and C helpers, the preload shim and the client library', () => {
    const dir = layout(prebuilt());
    try {
      const r = loads(dir);
      expect(r.status, r.stderr).toBe(0);
      expect(r.json!.addon).toBe(path.join(dir, 'prebuilds', arch, 'pagemirror.uv1.glibc.node'));
      expect(r.json!.helper).toBe(path.join(dir, 'prebuilds', arch, 'uffd_baseline'));
      expect(r.json!.helpers).toEqual(Object.fromEntries(HELPERS.map((h) => [h, path.join('prebuilds', arch, h)])));
      expect(r.json!.machine).toBe(execFileSync('uname', ['-m'], { encoding: 'utf8' }).trim());
    } finally {
      fs.rmSync(path.dirname(path.dirname(dir)), { recursive: true, force: true });
    }
  });

  it('a source build (build/Release) comes before the prebuilt binaries; PAGEMIRROR_ADDON before both', () => {
    // A prebuilt addon that cannot load: choosing it would fail.
    const dir = layout({
      ...prebuilt(),
      [`prebuilds/${arch}/pagemirror.uv1.glibc.node`]: Buffer.from('not an ELF file'),
      'build/Release/pagemirror.node': path.join(built, 'pagemirror.node'),
      'build/Release/uffd_baseline': path.join(built, 'uffd_baseline'),
    });
    try {
      const r = loads(dir);
      expect(r.status, r.stderr).toBe(0);
      expect(r.json!.addon).toBe(path.join(dir, 'build', 'Release', 'pagemirror.node'));
      expect(r.json!.helper).toBe(path.join(dir, 'build', 'Release', 'uffd_baseline'));
      fs.rmSync(path.join(dir, 'build'), { recursive: true });
      const chosen = loads(dir, { PAGEMIRROR_ADDON: path.join(built, 'pagemirror.node') });
      expect(chosen.status, chosen.stderr).toBe(0);
    } finally {
      fs.rmSync(path.dirname(path.dirname(dir)), { recursive: true, force: true });
    }
  });

  it("helper files are found in the addon's order: PAGEMIRROR_ADDON's directory, build/Release, build/Debug, prebuilds/", () => {
    // Each helper sits first in a different place, and everywhere after it, so the one taken shows the order.
    const dir = layout({
      ...prebuilt(),
      'alt/pagemirror.node': path.join(built, 'pagemirror.node'),
      'alt/uffd_baseline': path.join(built, 'uffd_baseline'),
      'build/Release/pagemirror.node': path.join(built, 'pagemirror.node'),
      'build/Release/uffd_baseline': path.join(built, 'uffd_baseline'),
      'build/Release/pager_c': path.join(built, 'pager_c'),
      'build/Debug/uffd_baseline': path.join(built, 'uffd_baseline'),
      'build/Debug/pager_c': path.join(built, 'pager_c'),
      'build/Debug/pagemirror_preload.so': path.join(built, 'pagemirror_preload.so'),
    });
    try {
      const alt = loads(dir, { PAGEMIRROR_ADDON: path.join(dir, 'alt', 'pagemirror.node') });
      expect(alt.status, alt.stderr).toBe(0);
      expect(alt.json!.helpers).toEqual({
        uffd_baseline: path.join('alt', 'uffd_baseline'),
        pager_c: path.join('build', 'Release', 'pager_c'),
        'pagemirror_preload.so': path.join('build', 'Debug', 'pagemirror_preload.so'),
        'pagemirror_client.a': path.join('prebuilds', arch, 'pagemirror_client.a'),
      });
      const plain = loads(dir);
      expect(plain.status, plain.stderr).toBe(0);
      expect(plain.json!.helpers.uffd_baseline).toBe(path.join('build', 'Release', 'uffd_baseline'));
    } finally {
      fs.rmSync(path.dirname(path.dirname(dir)), { recursive: true, force: true });
    }
  });

  it('a package without the preload shim: pagemirror run fails with ERR_PAGEMIRROR_NOT_BUILT in one line, naming the shim and where it looked', () => {
    const files: Record<string, string> = prebuilt();
    delete files[`prebuilds/${arch}/pagemirror_preload.so`];
    const dir = layout(files);
    try {
      const r = spawnSync(process.execPath, [path.join(dir, 'dist', 'cli.js'), 'run', '--', 'true'], { cwd: dir, encoding: 'utf8', timeout: 30_000, env });
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr.trimEnd().split('\n'), r.stderr).toHaveLength(1);
      expect(r.stderr).toMatch(
        new RegExp(`^pagemirror: ERR_PAGEMIRROR_NOT_BUILT: the preload shim pagemirror_preload.so \\(pagemirror run\\) is not built for ${arch} \\(looked in build/Release, build/Debug, prebuilds/${arch}\\): .*npm rebuild pagemirror`),
      );
    } finally {
      fs.rmSync(path.dirname(path.dirname(dir)), { recursive: true, force: true });
    }
  });

  it('prebuilt binaries for another architecture or libc only: ERR_PAGEMIRROR_NOT_BUILT in one line, naming npm rebuild', () => {
    const dir = layout({
      ...prebuilt(other),
      [`prebuilds/${arch}/pagemirror.uv1.musl.node`]: path.join(built, 'pagemirror.node'),
    });
    try {
      probeFails(dir, new RegExp(`^pagemirror: ERR_PAGEMIRROR_NOT_BUILT: the native addon is not built for ${arch} .*npm rebuild pagemirror`));
    } finally {
      fs.rmSync(path.dirname(path.dirname(dir)), { recursive: true, force: true });
    }
  });

  it('a prebuilt addon that does not load here: ERR_PAGEMIRROR_NOT_BUILT in one line with the reason and --build-from-source', () => {
    const dir = layout({ ...prebuilt(), [`prebuilds/${arch}/pagemirror.uv1.glibc.node`]: Buffer.from('not an ELF file') });
    try {
      probeFails(dir, /^pagemirror: ERR_PAGEMIRROR_NOT_BUILT: the prebuilt binary prebuilds\/.* does not load here \(.*\): .*npm rebuild pagemirror --build-from-source/);
    } finally {
      fs.rmSync(path.dirname(path.dirname(dir)), { recursive: true, force: true });
    }
  });
});

// scripts/install.mjs as npm runs it for a dependency. The source build is node-gyp's, run from
// PATH: here a stand-in that leaves what node-gyp leaves (objects, makefiles, dependency files and
// the client's test programs beside the files that run or are linked), so the choice and the clean-up are tested without a compile.
// scripts/test-package.sh does the real thing from the packed tarball (npm run test:package).
describe('the install script of an installed package', () => {
  const built = path.join(root, 'build', 'Release');
  const arch = `${process.platform}-${process.arch}`;

  function installIn(files: Record<string, string>, extraEnv: Record<string, string> = {}) {
    const top = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-install-'));
    const dir = path.join(top, 'node_modules', 'pagemirror');
    fs.mkdirSync(path.join(dir, 'scripts'), { recursive: true });
    fs.copyFileSync(path.join(root, 'scripts', 'install.mjs'), path.join(dir, 'scripts', 'install.mjs'));
    fs.copyFileSync(path.join(root, 'package.json'), path.join(dir, 'package.json'));
    fs.symlinkSync(path.join(root, 'node_modules', 'node-gyp-build'), path.join(top, 'node_modules', 'node-gyp-build'));
    for (const [rel, src] of Object.entries(files)) {
      fs.mkdirSync(path.dirname(path.join(dir, rel)), { recursive: true });
      fs.copyFileSync(src, path.join(dir, rel));
    }
    const bin = path.join(top, 'bin');
    fs.mkdirSync(bin);
    fs.writeFileSync(
      path.join(bin, 'node-gyp'),
      `#!/bin/sh\n[ "$1" = rebuild ] || exit 9\necho "gyp info stand-in $*"\nmkdir -p build/Release/obj.target/pagemirror build/Release/.deps\n` +
        `touch build/Makefile build/config.gypi build/pagemirror.target.mk build/Release/obj.target/pagemirror/addon.o build/Release/.deps/addon.o.d\n` +
        `cp ${built}/pagemirror.node ${built}/uffd_baseline ${built}/pager_c ${built}/pagemirror_preload.so ${built}/pagemirror_client.a ` +
        `${built}/pagemirror_client_demo ${built}/pagemirror_client_fuzz build/Release/\n`,
      { mode: 0o755 },
    );
    const r = spawnSync(process.execPath, [path.join(dir, 'scripts', 'install.mjs')], {
      cwd: dir,
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, ...extraEnv, PATH: `${bin}:${process.env.PATH}`, PREBUILDS_ONLY: '' },
    });
    const left = (d: string): string[] =>
      fs.existsSync(d) ? fs.readdirSync(d, { recursive: true, encoding: 'utf8' }).sort() : [];
    const result = { ...r, build: left(path.join(dir, 'build')), prebuilds: left(path.join(dir, 'prebuilds')) };
    fs.rmSync(top, { recursive: true, force: true });
    return result;
  }

  it('a prebuilt binary that loads here: no compile, no build/, and the prebuilt binaries of other machines removed', () => {
    const r = installIn({
      [`prebuilds/${arch}/pagemirror.uv1.glibc.node`]: path.join(built, 'pagemirror.node'),
      [`prebuilds/${arch}/uffd_baseline`]: path.join(built, 'uffd_baseline'),
      [`prebuilds/${arch}/pagemirror_preload.so`]: path.join(built, 'pagemirror_preload.so'),
      [`prebuilds/linux-none/pagemirror.uv1.glibc.node`]: path.join(built, 'pagemirror.node'),
      [`prebuilds/linux-none/pagemirror_preload.so`]: path.join(built, 'pagemirror_preload.so'),
    });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(`pagemirror: using the prebuilt binary prebuilds/${arch}/pagemirror.uv1.glibc.node (no compile)`);
    expect(r.stdout).not.toContain('gyp info');
    expect(r.build).toEqual([]);
    expect(r.prebuilds).toEqual([arch, `${arch}/pagemirror.uv1.glibc.node`, `${arch}/pagemirror_preload.so`, `${arch}/uffd_baseline`]);
  });

  it('no prebuilt binary for this machine, or --build-from-source: node-gyp rebuild, then build/ keeps only what runs or is linked (the shim and client library too), and no prebuilds/', () => {
    for (const [files, extraEnv, why] of [
      [{ [`prebuilds/linux-none/pagemirror.uv1.glibc.node`]: path.join(built, 'pagemirror.node') }, {}, /No native build was found/],
      [{ [`prebuilds/${arch}/pagemirror.uv1.glibc.node`]: path.join(built, 'pagemirror.node') }, { npm_config_build_from_source: 'true' }, /a source build was asked for/],
    ] as const) {
      const r = installIn(files, extraEnv);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/pagemirror: building from source/);
      expect(r.stdout).toMatch(why);
      expect(r.stdout).toContain('gyp info stand-in rebuild');
      expect(r.build).toEqual([
        'Release',
        'Release/pagemirror.node',
        'Release/pagemirror_client.a',
        'Release/pagemirror_preload.so',
        'Release/pager_c',
        'Release/uffd_baseline',
      ]);
      expect(r.prebuilds).toEqual([]);
    }
  });
});
