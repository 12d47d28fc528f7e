// The error table cannot drift: every ERR_PAGEMIRROR_* code the sources (lib/, native/) throw is in
// the exported PAGEMIRROR_ERROR_CODES (and so in the PagemirrorErrorCode union) and has a row in
// docs/errors.md, and neither lists a code the sources no longer throw.
import { describe, it, expect } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PAGEMIRROR_ERROR_CODES, type PagemirrorErrorCode } from '../lib/index.js';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return sourceFiles(p);
    return /\.(ts|h|cc|c)$/.test(e.name) ? [p] : [];
  });
}

const CODE = /ERR_PAGEMIRROR_[A-Z0-9_]*[A-Z0-9]/g;

describe('ERR_PAGEMIRROR_* codes', () => {
  const inSources = new Set<string>();
  for (const f of [...sourceFiles(path.join(root, 'lib')), ...sourceFiles(path.join(root, 'native'))]) {
    // lib/errors.ts holds the list itself: counting it would make a stale entry look used.
    if (f === path.join(root, 'lib', 'errors.ts')) continue;
    for (const m of fs.readFileSync(f, 'utf8').matchAll(CODE)) inSources.add(m[0]);
  }
  const table = new Set(
    fs
      .readFileSync(path.join(root, 'docs', 'errors.md'), 'utf8')
      .split('\n')
      .filter((l) => l.startsWith('| `ERR_PAGEMIRROR_'))
      .map((l) => /`(ERR_PAGEMIRROR_[A-Z0-9_]+)`/.exec(l)![1]!),
  );

  it('the sources throw codes (the grep works)', () => {
    expect(inSources.size).toBeGreaterThan(10);
  });

  it('every code in the sources is in PAGEMIRROR_ERROR_CODES and docs/errors.md, and nothing else is', () => {
    expect([...PAGEMIRROR_ERROR_CODES].sort()).toEqual([...inSources].sort());
    expect([...table].sort()).toEqual([...inSources].sort());
  });

  it('PagemirrorErrorCode is the union of the array', () => {
    const c: PagemirrorErrorCode = 'ERR_PAGEMIRROR_CLOSED';
    // @ts-expect-error not a code the library throws
    const bad: PagemirrorErrorCode = 'ERR_PAGEMIRROR_NO_SUCH_CODE';
    expect(PAGEMIRROR_ERROR_CODES).toContain(c);
    expect(PAGEMIRROR_ERROR_CODES).not.toContain(bad);
  });
});
