// The package as a user sees it through its "exports" map (node resolves 'pagemirror' from the repo
// root by the package's self-reference): the main entry carries only the documented API, internals
// sit in 'pagemirror/internal', and what the package ships is complete (licence, source maps whose
// sources are shipped).
import { describe, it, expect } from 'vitest';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
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
