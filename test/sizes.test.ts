// Sizes at the edges: zero-length I/O, mappings past Node's ArrayBuffer limit (windows through
// view()), and mirrors of ranges far larger than memory (a sparse page table).
import { describe, it, expect } from 'vitest';
import { mapAnonymous, mapMemfd } from '../lib/index.js';
import { PAGE, cleanupAfterEach, within } from './helpers.js';

const closers = cleanupAfterEach();

describe('zero-length I/O', () => {
  // Under UndefinedBehaviorSanitizer these handed memcpy the null pointer of an empty ArrayBuffer.
  it('read, readSync, write and writeSync of nothing succeed and return nothing', async () => {
    const m = mapAnonymous(PAGE);
    closers.push(() => m.close());
    m.writeSync(0, new Uint8Array([9]));
    expect(m.readSync(0, 0)).toEqual(Buffer.alloc(0));
    expect(m.readSync(PAGE, 0)).toEqual(Buffer.alloc(0)); // the very end is a valid empty range
    expect(m.writeSync(0, new Uint8Array(0))).toBe(0);
    expect(m.writeSync(PAGE, Buffer.alloc(0))).toBe(0);
    expect(await within(m.read(0, 0), 5000, 'read of nothing')).toEqual(Buffer.alloc(0));
    expect(await within(m.write(PAGE, new Uint8Array(0)), 5000, 'write of nothing')).toBe(0);
    expect(m.readSync(0, 1)[0]).toBe(9);
  });
});
