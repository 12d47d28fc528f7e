// Errors: kernel failures arrive from the addon as Errors with Node's system-error fields; misuse
// is caught here, before any system call, as TypeError/RangeError with Node's ERR_* codes.

/** The shape of a kernel error, as Node's own fs errors have it. */
export interface SystemError extends Error {
  /** e.g. 'ENOENT', 'EEXIST', 'EAGAIN'. */
  code: string;
  /** Negative errno, as libuv reports it (-2 for ENOENT). */
  errno: number;
  /** The system call or ioctl, e.g. 'mmap', 'ioctl(UFFDIO_COPY)'. */
  syscall: string;
  /** The file concerned, when there is one. */
  path?: string;
  /** Partial progress of a resolve ioctl before it failed, in bytes. */
  bytes?: number;
  /** The address concerned, when there is one. */
  address?: bigint;
}

/** True for errors that came from the kernel (they carry errno and syscall). */
export function isSystemError(err: unknown): err is SystemError {
  return (
    err instanceof Error &&
    typeof (err as Partial<SystemError>).errno === 'number' &&
    typeof (err as Partial<SystemError>).syscall === 'string'
  );
}

/**
 * Every `code` the library's own errors carry (besides the kernel's `E*` codes and Node's
 * `ERR_INVALID_ARG_TYPE`/`ERR_OUT_OF_RANGE`/`ERR_INVALID_ARG_VALUE`...). What each means and what
 * to do: docs/errors.md. test/error-codes.test.ts fails when a code in lib/ or native/ is missing
 * here or there.
 *
 * @example
 * ```ts
 * import { PAGEMIRROR_ERROR_CODES, type PagemirrorErrorCode } from 'pagemirror';
 * function isOurs(err: unknown): err is Error & { code: PagemirrorErrorCode } {
 *   return PAGEMIRROR_ERROR_CODES.includes((err as { code?: never }).code!);
 * }
 * ```
 */
export const PAGEMIRROR_ERROR_CODES = [
  'ERR_PAGEMIRROR_BAD_EXPERIMENT',
  'ERR_PAGEMIRROR_BASELINE',
  'ERR_PAGEMIRROR_CLOSED',
  'ERR_PAGEMIRROR_CLOSING',
  'ERR_PAGEMIRROR_DATA_LOST',
  'ERR_PAGEMIRROR_FEATURE',
  'ERR_PAGEMIRROR_FILE_STRATEGY',
  'ERR_PAGEMIRROR_NOT_ATTACHABLE',
  'ERR_PAGEMIRROR_NOT_BUILT',
  'ERR_PAGEMIRROR_NOT_NEGOTIATED',
  'ERR_PAGEMIRROR_NOT_SERVED',
  'ERR_PAGEMIRROR_NOT_SERVING',
  'ERR_PAGEMIRROR_NOT_WRITABLE',
  'ERR_PAGEMIRROR_NO_FILE',
  'ERR_PAGEMIRROR_RECORDING',
  'ERR_PAGEMIRROR_REGISTERED',
  'ERR_PAGEMIRROR_SERVING',
  'ERR_PAGEMIRROR_TRACE_CORRUPT',
  'ERR_PAGEMIRROR_TRACE_VERSION',
  'ERR_PAGEMIRROR_UNALIGNED',
  'ERR_PAGEMIRROR_UNSUPPORTED',
  'ERR_PAGEMIRROR_VIEW_TOO_LARGE',
  'ERR_PAGEMIRROR_WOULD_FAULT',
] as const;

/** One of {@link PAGEMIRROR_ERROR_CODES}: the `code` of an error the library raises itself. */
export type PagemirrorErrorCode = (typeof PAGEMIRROR_ERROR_CODES)[number];

type Coded<E extends Error> = E & { code: string };

export function typeError(code: string, message: string): Coded<TypeError> {
  const err = new TypeError(message) as Coded<TypeError>;
  err.code = code;
  return err;
}

export function rangeError(code: string, message: string): Coded<RangeError> {
  const err = new RangeError(message) as Coded<RangeError>;
  err.code = code;
  return err;
}

/** An error for a state that is not a kernel error (closed object, feature not negotiated...). */
export function stateError(code: string, message: string): Coded<Error> {
  const err = new Error(message) as Coded<Error>;
  err.code = code;
  return err;
}

export function checkInteger(name: string, value: unknown, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number') throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be a number, got ${typeof value}`);
  if (!Number.isSafeInteger(value) || value < min || value > max)
    throw rangeError('ERR_OUT_OF_RANGE', `${name} must be an integer in [${min}, ${max}], got ${value}`);
  return value;
}

export function checkAligned(name: string, value: number, page: number): number {
  if (value % page !== 0)
    throw rangeError('ERR_PAGEMIRROR_UNALIGNED', `${name} (${value}) is not a multiple of the page size ${page}`);
  return value;
}

export function checkOneOf<T extends string>(name: string, value: unknown, allowed: readonly T[]): T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value))
    throw typeError('ERR_INVALID_ARG_VALUE', `${name} must be one of ${allowed.join(', ')}, got ${String(value)}`);
  return value as T;
}

export function checkBytes(name: string, value: unknown): Uint8Array {
  if (!(value instanceof Uint8Array)) throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be a Uint8Array or Buffer`);
  return value;
}

/** Pages decoded into one JavaScript array at the most: a whole terabyte-sized mapping would exhaust the heap (a fatal error, not an exception). */
export const MAX_DECODED_PAGES = 1 << 22;

/** Throws ERR_OUT_OF_RANGE when `pages` per-page objects would be more than MAX_DECODED_PAGES; `raw` names the typed-array alternative. */
export function checkDecodedPages(what: string, pages: number, raw: string): void {
  if (pages > MAX_DECODED_PAGES)
    throw rangeError(
      'ERR_OUT_OF_RANGE',
      `${what} of ${pages} pages would decode more than ${MAX_DECODED_PAGES} at once; ask for a smaller range (offset, length) or use ${raw}`,
    );
}
