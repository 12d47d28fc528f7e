#!/usr/bin/env bash
# The whole vitest suite as an unprivileged user, as most users run the library: uid nobody (or
# $PAGEMIRROR_TEST_USER), vm.unprivileged_userfaultfd=0 and /dev/userfaultfd root-only, so the
# only userfaultfd to be had is the user-mode-only one. Every test must pass or skip with its
# reason there. Run as root (it switches user and sets the sysctl, and puts both back, whatever
# the outcome); arguments go to vitest (test files, -t ...).
#
# The user gets a copy of this tree it owns (vitest and the TypeScript build write into it;
# node_modules, build/ and dist/ come along, so nothing is installed or compiled again but lib/).
set -euo pipefail

user=${PAGEMIRROR_TEST_USER:-nobody}
if [ "$(id -u)" != 0 ]; then
  echo "test-unprivileged: run as root (it runs the suite as '$user' and sets vm.unprivileged_userfaultfd)" >&2
  exit 2
fi
uid=$(id -u "$user")
gid=$(id -g "$user")
src=$(cd "$(dirname "$0")/.." && pwd)
[ -e "$src/build/Release/pagemirror.node" ] || { echo "test-unprivileged: build the addon first (npm ci)" >&2; exit 2; }

sysctl_file=/proc/sys/vm/unprivileged_userfaultfd
saved_sysctl=$(cat "$sysctl_file")
saved_mode=
[ -e /dev/userfaultfd ] && saved_mode=$(stat -c %a /dev/userfaultfd)
work=$(mktemp -d /tmp/pagemirror-unprivileged.XXXXXX)
restore() {
  echo "$saved_sysctl" > "$sysctl_file" || echo "test-unprivileged: could not restore $sysctl_file to $saved_sysctl" >&2
  if [ -n "$saved_mode" ]; then chmod "$saved_mode" /dev/userfaultfd || echo "test-unprivileged: could not restore /dev/userfaultfd mode $saved_mode" >&2; fi
  rm -rf "$work"
}
trap restore EXIT
trap 'exit 130' INT TERM HUP

tar -C "$src" --exclude=./.git -cf - . | tar -C "$work" -xf -
chown -R "$uid:$gid" "$work"
echo 0 > "$sysctl_file"
[ -n "$saved_mode" ] && chmod 600 /dev/userfaultfd

echo "test-unprivileged: uid $uid ($user), vm.unprivileged_userfaultfd=0, /dev/userfaultfd root-only, in $work"
cd "$work"
start=$(date +%s)
set +e
setpriv --reuid="$uid" --regid="$gid" --clear-groups \
  env HOME="$work" TMPDIR=/tmp npm_config_cache="$work/.npm" \
  node node_modules/vitest/vitest.mjs run "$@"
rc=$?
set -e
echo "test-unprivileged: vitest exited $rc after $(( $(date +%s) - start )) s"
exit "$rc"
