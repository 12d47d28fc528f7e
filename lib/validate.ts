// Argument checks shared by the public API, in Node's own terms: a wrong type is a TypeError with
// ERR_INVALID_ARG_TYPE, a wrong value ERR_INVALID_ARG_VALUE, a number out of range a RangeError with
// ERR_OUT_OF_RANGE; all raised before any system call. (Integers, names and byte buffers: errors.ts.)
import { checkInteger, checkOneOf, rangeError, typeError } from './errors.js';

const U64_MAX = (1n << 64n) - 1n;

function kind(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value;
}

/**
 * An options argument: undefined (every default) or an object. null, arrays, functions and scalars
 * are refused, as Node's validateObject does, instead of failing later on a property read.
 */
export function checkOptions<T extends object>(name: string, value: T | undefined): T {
  if (value === undefined) return {} as T;
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be an object, got ${kind(value)}`);
  return value;
}

/** An optional boolean option (undefined or null: the default). */
export function checkBoolean(name: string, value: unknown, def: boolean): boolean {
  if (value === undefined || value === null) return def;
  if (typeof value !== 'boolean') throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be a boolean, got ${kind(value)}`);
  return value;
}

/** A string the kernel will see: a NUL byte would silently cut it short there. */
export function checkString(name: string, value: unknown): string {
  if (typeof value !== 'string') throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be a string, got ${kind(value)}`);
  if (value.includes('\0')) throw typeError('ERR_INVALID_ARG_VALUE', `${name} must not contain null bytes, got ${JSON.stringify(value)}`);
  return value;
}

/** A 64-bit unsigned value (a mask, a pagemap or mirror entry) as a bigint. */
export function checkU64(name: string, value: unknown): bigint {
  if (typeof value !== 'bigint') throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be a bigint, got ${kind(value)}`);
  if (value < 0n || value > U64_MAX) throw rangeError('ERR_OUT_OF_RANGE', `${name} must be in [0, 2^64 - 1], got ${value}`);
  return value;
}

/** A finite number in [min, max] (fractions allowed). */
export function checkNumber(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number') throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be a number, got ${kind(value)}`);
  if (!(value >= min && value <= max)) throw rangeError('ERR_OUT_OF_RANGE', `${name} must be in [${min}, ${max}], got ${value}`);
  return value;
}

/** An optional callback. */
export function checkFunction(name: string, value: unknown): void {
  if (value !== undefined && typeof value !== 'function') throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be a function, got ${kind(value)}`);
}

/** An array (undefined: none) whose items are each one of `allowed`. */
export function checkNames<T extends string>(name: string, value: unknown, allowed: readonly T[]): T[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be an array of names (${allowed.join(', ')}), got ${kind(value)}`);
  return value.map((v, i) => checkOneOf(`${name}[${i}]`, v, allowed));
}

/** An array of byte offsets or a Float64Array of them (a batch), each a non-negative safe integer. */
export function checkOffsets(name: string, value: unknown): Float64Array {
  if (!(value instanceof Float64Array) && !Array.isArray(value))
    throw typeError('ERR_INVALID_ARG_TYPE', `${name} must be an array of numbers or a Float64Array, got ${kind(value)}`);
  const list = value as ArrayLike<unknown>;
  for (let i = 0; i < list.length; i++) checkInteger(`${name}[${i}]`, list[i]);
  return value instanceof Float64Array ? value : Float64Array.from(value as number[]);
}
