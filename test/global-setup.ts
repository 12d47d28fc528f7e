// Once per test run: compile lib/ to dist/ (the CLI and the child-process fixtures load it) and the
// TypeScript examples to dist/examples/.
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export default function setup(): void {
  const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
  const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  execFileSync(process.execPath, [tsc, '-p', root], { stdio: 'inherit' });
  execFileSync(process.execPath, [tsc, '-p', path.join(root, 'tsconfig.examples.json')], { stdio: 'inherit' });
}
