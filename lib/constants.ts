// Names for the kernel's bits, so users write 'wp' and 'minorShmem' rather than 1 << 10.
import { K } from './native.js';
import { checkInteger, typeError } from './errors.js';
import { checkNames, checkU64 } from './validate.js';

/** The PROT_* bits for {@link Mapping.protect} (which also takes 'rwx' letters). */
export const Prot = { none: K.PROT_NONE!, read: K.PROT_READ!, write: K.PROT_WRITE!, exec: K.PROT_EXEC! } as const;

/** A protection: a PROT_* number or a string of 'r', 'w', 'x' ('' or 'none' for PROT_NONE). */
export type Protection = number | string;

/**
 * A protection as a PROT_* number. @throws ERR_INVALID_ARG_TYPE (neither number nor string),
 * ERR_INVALID_ARG_VALUE (a letter other than r, w, x, -), ERR_OUT_OF_RANGE (a number outside
 * PROT_READ | PROT_WRITE | PROT_EXEC).
 */
export function parseProt(p: Protection): number {
  const all = K.PROT_READ! | K.PROT_WRITE! | K.PROT_EXEC!;
  if (typeof p === 'number') {
    // PROT_READ | PROT_WRITE | PROT_EXEC are 1, 2 and 4: every other value has a bit mprotect rejects.
    return checkInteger('protection', p, 0, all);
  }
  if (typeof p !== 'string') throw typeError('ERR_INVALID_ARG_TYPE', `protection must be a string of r, w, x or a PROT_* number, got ${p === null ? 'null' : typeof p}`);
  if (p === 'none' || p === '') return 0;
  let v = 0;
  for (const ch of p) {
    if (ch === 'r') v |= K.PROT_READ!;
    else if (ch === 'w') v |= K.PROT_WRITE!;
    else if (ch === 'x') v |= K.PROT_EXEC!;
    else if (ch !== '-') throw typeError('ERR_INVALID_ARG_VALUE', `protection ${JSON.stringify(p)}: use r, w, x (or 'none')`);
  }
  return v;
}

/** madvise(2) advice by name, for {@link Mapping.advise}. */
export const ADVICE = {
  normal: K.MADV_NORMAL!,
  random: K.MADV_RANDOM!,
  sequential: K.MADV_SEQUENTIAL!,
  willneed: K.MADV_WILLNEED!,
  dontneed: K.MADV_DONTNEED!,
  free: K.MADV_FREE!,
  remove: K.MADV_REMOVE!,
  dontfork: K.MADV_DONTFORK!,
  dofork: K.MADV_DOFORK!,
  hugepage: K.MADV_HUGEPAGE!,
  nohugepage: K.MADV_NOHUGEPAGE!,
  cold: K.MADV_COLD!,
  pageout: K.MADV_PAGEOUT!,
  populateRead: K.MADV_POPULATE_READ!,
  populateWrite: K.MADV_POPULATE_WRITE!,
  collapse: K.MADV_COLLAPSE!,
} as const;
/** A name of {@link ADVICE}. */
export type Advice = keyof typeof ADVICE;

/** userfaultfd features by name (UFFD_FEATURE_*). */
export const FEATURES = {
  pagefaultFlagWp: K.UFFD_FEATURE_PAGEFAULT_FLAG_WP!,
  eventFork: K.UFFD_FEATURE_EVENT_FORK!,
  eventRemap: K.UFFD_FEATURE_EVENT_REMAP!,
  eventRemove: K.UFFD_FEATURE_EVENT_REMOVE!,
  missingHugetlbfs: K.UFFD_FEATURE_MISSING_HUGETLBFS!,
  missingShmem: K.UFFD_FEATURE_MISSING_SHMEM!,
  eventUnmap: K.UFFD_FEATURE_EVENT_UNMAP!,
  sigbus: K.UFFD_FEATURE_SIGBUS!,
  threadId: K.UFFD_FEATURE_THREAD_ID!,
  minorHugetlbfs: K.UFFD_FEATURE_MINOR_HUGETLBFS!,
  minorShmem: K.UFFD_FEATURE_MINOR_SHMEM!,
  exactAddress: K.UFFD_FEATURE_EXACT_ADDRESS!,
  wpHugetlbfsShmem: K.UFFD_FEATURE_WP_HUGETLBFS_SHMEM!,
  wpUnpopulated: K.UFFD_FEATURE_WP_UNPOPULATED!,
  poison: K.UFFD_FEATURE_POISON!,
  wpAsync: K.UFFD_FEATURE_WP_ASYNC!,
  move: K.UFFD_FEATURE_MOVE!,
} as const;
/** A userfaultfd feature by name (a key of {@link FEATURES}). */
export type FeatureName = keyof typeof FEATURES;

/** Features that change what faults mean or make the kernel wait for the handler; opt-in only. */
export const OPT_IN_FEATURES: readonly FeatureName[] = [
  'sigbus',
  'wpAsync',
  'eventFork',
  'eventRemap',
  'eventRemove',
  'eventUnmap',
];
export const EVENT_FEATURES: readonly FeatureName[] = ['eventFork', 'eventRemap', 'eventRemove', 'eventUnmap'];

/** userfaultfd ioctls by name (bit numbers in the masks UFFDIO_API and UFFDIO_REGISTER return). */
export const IOCTLS = {
  register: K._UFFDIO_REGISTER!,
  unregister: K._UFFDIO_UNREGISTER!,
  wake: K._UFFDIO_WAKE!,
  copy: K._UFFDIO_COPY!,
  zeropage: K._UFFDIO_ZEROPAGE!,
  move: K._UFFDIO_MOVE!,
  writeProtect: K._UFFDIO_WRITEPROTECT!,
  continue: K._UFFDIO_CONTINUE!,
  poison: K._UFFDIO_POISON!,
  api: K._UFFDIO_API!,
} as const;
/** A userfaultfd ioctl by name (a key of {@link IOCTLS}). */
export type IoctlName = keyof typeof IOCTLS;

/** UFFDIO_REGISTER modes by name: missing, wp, minor. */
export const REGISTER_MODES = {
  missing: K.UFFDIO_REGISTER_MODE_MISSING!,
  wp: K.UFFDIO_REGISTER_MODE_WP!,
  minor: K.UFFDIO_REGISTER_MODE_MINOR!,
} as const;
/** A name of {@link REGISTER_MODES}. */
export type RegisterMode = keyof typeof REGISTER_MODES;

/** The names of the feature bits set in `mask`. */
export function featureNames(mask: bigint): FeatureName[] {
  checkU64('mask', mask);
  return (Object.keys(FEATURES) as FeatureName[]).filter((n) => (mask & BigInt(FEATURES[n])) !== 0n);
}

/** The names of the ioctl bits set in `mask`. */
export function ioctlNames(mask: bigint): IoctlName[] {
  checkU64('mask', mask);
  return (Object.keys(IOCTLS) as IoctlName[]).filter((n) => (mask >> BigInt(IOCTLS[n])) & 1n);
}

/** PAGEMAP_SCAN categories. */
export const PAGE_IS = {
  wpAllowed: K.PAGE_IS_WPALLOWED!,
  written: K.PAGE_IS_WRITTEN!,
  file: K.PAGE_IS_FILE!,
  present: K.PAGE_IS_PRESENT!,
  swapped: K.PAGE_IS_SWAPPED!,
  pfnZero: K.PAGE_IS_PFNZERO!,
  huge: K.PAGE_IS_HUGE!,
  softDirty: K.PAGE_IS_SOFT_DIRTY!,
  guard: K.PAGE_IS_GUARD!,
} as const;
/** A name of {@link PAGE_IS}: a page category PAGEMAP_SCAN reports. */
export type PageCategory = keyof typeof PAGE_IS;

export function categoryMask(names: readonly PageCategory[] | undefined, what = 'categories'): number {
  let m = 0;
  for (const n of checkNames(what, names, Object.keys(PAGE_IS) as PageCategory[])) m |= PAGE_IS[n];
  return m;
}

export function categoryNames(mask: number): PageCategory[] {
  return (Object.keys(PAGE_IS) as PageCategory[]).filter((n) => (mask & PAGE_IS[n]) !== 0);
}
