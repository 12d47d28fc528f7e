// The in-repo entry the tests, their fixtures and the fuzzer load (dist/index.js): the public API
// (lib/api.ts, the package's "." export) plus the raw addon, which the fuzzer drives directly.
// Add public exports to lib/api.ts, not here. Once nothing imports `_native` from here, this file
// can become the public entry again.
export * from './api.js';
export { _native } from './internal.js';
