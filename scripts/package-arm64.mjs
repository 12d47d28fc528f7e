// Run by scripts/test-package.sh --arm64 in a project that installed the packed tarball, with an
// arm64 node under qemu-aarch64: the arm64 prebuilt addon, C baseline, preload shim and client
// library must be the ones chosen, and the addon's native threads must write and verify real
// memory. (qemu-user has no userfaultfd, so no userfaultfd fault here: the x64 run of the same
// tarball takes one. Nor does it run an arm64 child that node starts: the script runs the C
// baseline, and a program with the shim preloaded, under qemu itself.)
import { mapAnonymous, access } from 'pagemirror';
import { addonPath, helperPath } from './node_modules/pagemirror/dist/addon-path.js';

const m = mapAnonymous(64 * 4096);
const w = await access(m, { op: 'write', unit: 8, threads: 2 });
const v = await access(m, { op: 'verify', unit: 8, threads: 2 });
m.close();
const rel = (p) => p.split('node_modules/pagemirror/')[1];
const seen = {
  arch: process.arch,
  addon: rel(addonPath()),
  baseline: rel(helperPath('uffd_baseline')),
  shim: rel(helperPath('pagemirror_preload.so')),
  clientLibrary: rel(helperPath('pagemirror_client.a')),
  wrote: w.ops,
  mismatches: v.mismatches,
};
console.log(JSON.stringify(seen));
const ok =
  seen.arch === 'arm64' &&
  seen.addon === 'prebuilds/linux-arm64/pagemirror.uv1.glibc.node' &&
  seen.baseline === 'prebuilds/linux-arm64/uffd_baseline' &&
  seen.shim === 'prebuilds/linux-arm64/pagemirror_preload.so' &&
  seen.clientLibrary === 'prebuilds/linux-arm64/pagemirror_client.a' &&
  w.ops > 0 &&
  v.mismatches === 0;
if (!ok) process.exit(1);
