// Every @example in the TSDoc (lib/**/*.ts) type-checks against the package as a user imports it
// ('pagemirror', 'pagemirror/bench' through package.json "exports" and dist/*.d.ts): the API
// reference cannot show a call the library no longer accepts.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');

function sources(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? sources(path.join(dir, e.name)) : e.name.endsWith('.ts') ? [path.join(dir, e.name)] : []));
}

/** The ```ts blocks of every @example, with the comment's leading ` * ` taken off. */
function examples(): { file: string; code: string }[] {
  const out: { file: string; code: string }[] = [];
  for (const f of sources(path.join(root, 'lib'))) {
    const text = fs.readFileSync(f, 'utf8');
    for (const m of text.matchAll(/@example\s*\n((?:[ \t]*\*.*\n)+?)[ \t]*\*\//g)) {
      const block = /```ts\n([\s\S]*?)\n[ \t]*\* ```/.exec(m[1]!);
      if (block) out.push({ file: path.relative(root, f), code: block[1]!.split('\n').map((l) => l.replace(/^[ \t]*\* ?/, '')).join('\n') });
    }
  }
  return out;
}

describe('TSDoc examples', () => {
  it('every @example imports from the package and type-checks', () => {
    const all = examples();
    // The main entry points carry one each (mapAnonymous, Userfaultfd.open/serve, Device.create/mirror/mirrorFile, pager, access, bench).
    expect(all.length).toBeGreaterThanOrEqual(12);
    // Inside the package (results/ is not tracked), so 'pagemirror' resolves by self-reference.
    const dir = path.join(root, 'results', 'doc-examples');
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    all.forEach((e, i) => {
      expect(e.code, `${e.file}: an example imports what it uses`).toMatch(/from 'pagemirror(\/bench)?'/);
      fs.writeFileSync(path.join(dir, `example-${i}.ts`), `// ${e.file}\n${e.code}\nexport {};\n`);
    });
    fs.writeFileSync(
      path.join(dir, 'tsconfig.json'),
      JSON.stringify({ compilerOptions: { target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, noEmit: true, types: ['node'], skipLibCheck: true }, include: ['*.ts'] }),
    );
    const r = spawnSync(process.execPath, [path.join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', dir], { encoding: 'utf8', timeout: 120_000 });
    expect(r.stdout + r.stderr).toBe('');
    expect(r.status).toBe(0);
  }, 150_000);
});
