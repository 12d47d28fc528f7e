/**
 * Internals for tests and tools (`pagemirror/internal`): the compiled addon, typed, with no
 * validation in front of it. Not part of the public API; it may change in any release.
 *
 * @packageDocumentation
 * @module pagemirror/internal
 */
export { native as _native } from './native.js';
export type * from './native.js';
