// A node-gyp build of the project's binding.gyp in a directory of its own (node-gyp always builds
// into <dir>/build), over the same sources, so that build/Release, which the tests load, is left
// alone: the sanitizer build (test-sanitize.mjs) and the prebuilt binaries (prebuild.mjs).
import fs from 'node:fs';
import path from 'node:path';

/** Makes `work` a copy of root's binding.gyp with links to its sources; returns `work`. */
export function gypWorkdir(root, work) {
  fs.mkdirSync(work, { recursive: true });
  fs.copyFileSync(path.join(root, 'binding.gyp'), path.join(work, 'binding.gyp'));
  for (const dir of ['native', 'bench']) {
    const link = path.join(work, dir);
    fs.rmSync(link, { force: true, recursive: true });
    fs.symlinkSync(path.relative(work, path.join(root, dir)), link);
  }
  return work;
}

/**
 * node-gyp's `--nodedir` for the headers of the node that runs this, when they are installed and
 * npm has not named a nodedir: node-gyp would otherwise download them, and only the package
 * registries are reachable from the machines that build this project.
 */
export function nodedirArgs() {
  const prefix = path.join(path.dirname(process.execPath), '..');
  return !process.env.npm_config_nodedir && fs.existsSync(path.join(prefix, 'include', 'node', 'common.gypi')) ? [`--nodedir=${prefix}`] : [];
}
