// docs/api/ is what `npm run docs` (typedoc) makes of the TSDoc today: a change to a documented
// export that was not followed by `npm run docs` fails here, so the committed reference cannot drift.
import { describe, it, expect } from 'vitest';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');

function files(dir: string, base = dir): Map<string, string> {
  const out = new Map<string, string>();
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) for (const [k, v] of files(p, base)) out.set(k, v);
    else out.set(path.relative(base, p), fs.readFileSync(p, 'utf8'));
  }
  return out;
}

describe('API reference (docs/api)', () => {
  it('is up to date with the TSDoc (run `npm run docs` after changing it)', () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'pagemirror-apidocs-'));
    try {
      const r = spawnSync(process.execPath, [path.join(root, 'node_modules', 'typedoc', 'bin', 'typedoc'), '--out', out, '--logLevel', 'Error'], {
        cwd: root,
        encoding: 'utf8',
        timeout: 120_000,
      });
      expect(r.status, r.stdout + r.stderr).toBe(0);
      const fresh = files(out);
      const committed = files(path.join(root, 'docs', 'api'));
      expect([...committed.keys()].sort()).toEqual([...fresh.keys()].sort());
      for (const [k, v] of fresh) expect(committed.get(k), `docs/api/${k} is stale: npm run docs`).toBe(v);
      // The reference covers both public entries and leaves the internals out.
      expect(committed.has('pagemirror/README.md') && committed.has('pagemirror/bench/README.md')).toBe(true);
      expect([...committed.values()].some((t) => t.includes('_native'))).toBe(false);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  }, 150_000);
});
