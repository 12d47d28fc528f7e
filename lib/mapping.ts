// Mapping: one mmap()ed region, owned once. close() unmaps it and detaches the ArrayBuffer handed
// out by `bytes`, so no view can reach unmapped memory.
import { native, K, type NativeMapping, type NativeMappingInfo, type CacheStat, type StatxResult } from './native.js';
import { ADVICE, type Advice, parseProt, type Protection, categoryMask, categoryNames, type PageCategory } from './constants.js';
import { checkBytes, checkDecodedPages, checkInteger, checkOneOf, rangeError, typeError } from './errors.js';
import { checkBoolean, checkOptions, checkString, checkU64 } from './validate.js';
import { checkServed } from './served.js';

const BASE_PAGE = native.uname().pageSize;

/** The most advise('populateRead' | 'populateWrite') populates on the JavaScript thread: 1 GiB. */
export const POPULATE_SYNC_MAX_BYTES = 1 << 30;

/** Options every mapping function takes. */
export interface MapOptions {
  /** Protection; default 'rw'. */
  prot?: Protection;
  /** Pre-fault every page (MAP_POPULATE). @default false */
  populate?: boolean;
  /** MAP_NORESERVE. @default false */
  noReserve?: boolean;
}

/** Options of {@link mapAnonymous}. */
export interface AnonymousOptions extends MapOptions {
  /** MAP_SHARED (shmem-backed: survives fork shared, supports MINOR faults). @default false */
  shared?: boolean;
  /** Back with hugetlb pages (needs pages reserved in /proc/sys/vm/nr_hugepages). @default false */
  hugetlb?: boolean;
  /** Huge page size in bytes (2 MiB, 1 GiB); default the system's default huge page size. */
  hugePageSize?: number;
  /** Start address alignment in bytes (a power of two), e.g. 2 MiB for THP or fault-around experiments. Default: a page. */
  align?: number;
}

/** Options of {@link mapMemfd}. */
export interface MemfdOptions extends MapOptions {
  /** Name shown in /proc/self/maps. @default 'pagemirror' */
  name?: string;
  hugetlb?: boolean;
  hugePageSize?: number;
}

/** Options of {@link mapFile}. */
export interface FileOptions extends MapOptions {
  /** Bytes to map; default the file's size past `offset`, rounded up to pages. */
  length?: number;
  /** File offset, page aligned. @default 0 */
  offset?: number;
  /** MAP_SHARED (writes reach the file) or MAP_PRIVATE (copy on write). @default true */
  shared?: boolean;
  /** MAP_SYNC | MAP_SHARED_VALIDATE: only on DAX file systems (EOPNOTSUPP elsewhere). @default false */
  sync?: boolean;
  /** Create the file (and extend it to offset + length) if needed. @default false */
  create?: boolean;
  /** Mode for a created file. Default 0o600. */
  mode?: number;
}

/** A byte range of a mapping: `offset` (default 0) and `length` (default to the end). */
export interface RangeOptions {
  /** Byte offset into the mapping. @default 0 */
  offset?: number;
  /** Bytes; default to the end of the mapping. */
  length?: number;
}

/** What /proc/self/pagemap says about one page. */
export interface PageFlags {
  present: boolean;
  swapped: boolean;
  /** File-backed or shared anonymous page. */
  fileOrShared: boolean;
  /** Write-protected by userfaultfd. */
  uffdWp: boolean;
  /** Mapped by this process only. */
  exclusive: boolean;
  softDirty: boolean;
  /** Page frame number (0 unless CAP_SYS_ADMIN). */
  pfn: bigint;
}

/** @throws ERR_INVALID_ARG_TYPE (not a bigint), ERR_OUT_OF_RANGE (outside 64 bits). */
export function decodePagemapEntry(e: bigint): PageFlags {
  checkU64('entry', e);
  return {
    present: ((e >> 63n) & 1n) === 1n,
    swapped: ((e >> 62n) & 1n) === 1n,
    fileOrShared: ((e >> 61n) & 1n) === 1n,
    uffdWp: ((e >> 57n) & 1n) === 1n,
    exclusive: ((e >> 56n) & 1n) === 1n,
    softDirty: ((e >> 55n) & 1n) === 1n,
    pfn: e & ((1n << 55n) - 1n),
  };
}

/** Options of {@link Mapping.scan}. */
export interface ScanOptions extends RangeOptions {
  /** Pages must have all of these. */
  require?: PageCategory[];
  /** Pages must lack all of these. */
  exclude?: PageCategory[];
  /** Pages must have at least one of these. */
  anyOf?: PageCategory[];
  /** Categories reported per region. Default: all. */
  report?: PageCategory[];
  /** Write-protect the matching pages in the same walk (PM_SCAN_WP_MATCHING): the dirty-tracking reset. */
  writeProtect?: boolean;
  /**
   * Fail with EPERM unless the range is registered with WP_ASYNC (PM_SCAN_CHECK_WPASYNC). Default:
   * on when writeProtect is, because the kernel silently skips memory it cannot protect and a
   * dirty tracker would then miss every write.
   */
  checkWpAsync?: boolean;
  /** Stop after this many matching pages. Default: no limit. */
  maxPages?: number;
  /** Stop after this many regions. @default 1024 */
  maxRegions?: number;
}

/** One run of pages of the same categories, as {@link Mapping.scan} reports it. */
export interface ScanRegion {
  offset: number;
  length: number;
  categories: PageCategory[];
}

/** Options of {@link Mapping.remap}. */
export interface RemapOptions {
  /** Let the kernel move the mapping when it cannot grow in place (MREMAP_MAYMOVE). Default true; `address` and `dontUnmap` need it. */
  mayMove?: boolean;
  /**
   * Move to exactly this address (MREMAP_FIXED): aligned to the mapping's page size, not
   * overlapping the mapping, and free: the range is reserved first (MAP_FIXED_NOREPLACE), so the
   * move never unmaps other memory (EEXIST instead). Default: the kernel chooses.
   */
  address?: bigint;
  /**
   * MREMAP_DONTUNMAP: move the pages and leave the old range mapped. The length must not change;
   * not for hugetlb. This Mapping (and its mirrors) follow the data to the new address; the old
   * range comes back as a new Mapping that owns it (its own close()): empty for private memory
   * (reads as zeros), the same pages for shared memory (memfd, shared files). If part of the
   * mapping was registered with a userfaultfd, the old range stays registered with it (faults there
   * go to its handler, as a garbage collector using DONTUNMAP expects), and the old range's Mapping never hands
   * out `bytes` (the library cannot tell when every userfaultfd has let it go).
   * Default false.
   */
  dontUnmap?: boolean;
}

/** What a {@link Mapping} maps: anonymous memory, a memfd, or a file. */
export type MappingKind = 'anonymous' | 'memfd' | 'file';

/**
 * A range of this process's address space made by {@link mapAnonymous}, {@link mapMemfd} or
 * {@link mapFile}: protect, advise, sync, remap, inspect (residency, pagemap, cachestat) and read
 * or write it without faulting the JavaScript thread. Closing it unmaps it and closes its mirrors.
 */
export class Mapping {
  /** @internal */
  readonly native: NativeMapping;
  /** What is mapped: anonymous memory, a memfd or a file. */
  readonly kind: MappingKind;
  /** The page size of this mapping in bytes (the huge page size for hugetlb). */
  readonly pageSize: number;
  /** MAP_SHARED (true) or MAP_PRIVATE. */
  readonly shared: boolean;
  /** Backed by hugetlb pages. */
  readonly hugetlb: boolean;
  /** The file's path (mapFile by path), else undefined. */
  readonly path: string | undefined;
  #info: NativeMappingInfo;

  /** @internal use mapAnonymous(), mapMemfd() or mapFile(). */
  constructor(n: NativeMapping) {
    this.native = n;
    this.#info = n.info();
    this.kind = this.#info.kind;
    this.pageSize = this.#info.pageSize;
    this.shared = this.#info.shared;
    this.hugetlb = this.#info.hugetlb;
    this.path = this.#info.path;
  }

  /** Start address (changes after remap() with mayMove). */
  get address(): bigint {
    return this.native.address;
  }
  /** The mapped length in bytes (remap() changes it; unmap() leaves a hole and does not). */
  get length(): number {
    return this.native.length;
  }
  /** Offset of the mapping's first byte in its file (0 for anonymous memory). */
  get fileOffset(): number {
    return this.#info.fileOffset;
  }
  /** The owned file descriptor (memfd or file), -1 for anonymous memory and after close(). */
  get fd(): number {
    return this.native.info().fd;
  }
  /** Whether close() was called. */
  get closed(): boolean {
    return this.native.info().closed;
  }
  /** Whether part of the mapping is registered with a userfaultfd. */
  get registered(): boolean {
    return this.native.info().registered;
  }
  /** Protection segments as the library set them. */
  get protection(): { offset: number; length: number; prot: number }[] {
    return this.native.info().protection;
  }

  /**
   * A Uint8Array over the whole mapping (the same one each time until it is detached). Refused
   * (ERR_PAGEMIRROR_NOT_WRITABLE, ERR_PAGEMIRROR_REGISTERED) while a JavaScript access could kill or
   * hang the process; detached by close(), remap(), unmap(), register() and any protect() that takes
   * read or write away. A mapping larger than Node's largest ArrayBuffer (buffer.constants.MAX_LENGTH,
   * 4 GiB on Node 20) has no `bytes`: RangeError ERR_PAGEMIRROR_VIEW_TOO_LARGE; use view().
   */
  get bytes(): Uint8Array {
    return new Uint8Array(this.native.buffer());
  }

  /**
   * A Uint8Array over the window [offset, offset + length) of the mapping (a new one each call), for
   * mappings too large for `bytes` or when only a part is wanted. Same rules as `bytes`: refused
   * while the window is not read-write (ERR_PAGEMIRROR_NOT_WRITABLE) or the mapping is registered
   * (ERR_PAGEMIRROR_REGISTERED); detached, with every other view, by close(), remap(), unmap(),
   * register() and any protect() that takes read or write away, so no view reaches unmapped memory.
   *
   * @param offset byte offset (any byte), default 0.
   * @param length bytes, default to the end of the mapping.
   * @throws TypeError ERR_INVALID_ARG_TYPE, RangeError ERR_OUT_OF_RANGE (outside the mapping),
   *   RangeError ERR_PAGEMIRROR_VIEW_TOO_LARGE (longer than buffer.constants.MAX_LENGTH),
   *   Error ERR_PAGEMIRROR_CLOSED.
   */
  view(offset = 0, length?: number): Uint8Array {
    const o = checkInteger('offset', offset);
    const l = checkInteger('length', length ?? Math.max(0, this.length - o));
    return new Uint8Array(this.native.buffer(o, l));
  }

  #range(o: RangeOptions | undefined): [number, number] {
    o = checkOptions('range', o);
    const offset = checkInteger('offset', o?.offset ?? 0);
    const length = checkInteger('length', o?.length ?? Math.max(0, this.length - offset));
    return [offset, length];
  }

  /** mprotect. Errors: EACCES (file opened read-only), ENOMEM, EBUSY (native threads use the range). */
  protect(prot: Protection, range?: RangeOptions): void {
    const [o, l] = this.#range(range);
    this.native.protect(o, l, parseProt(prot));
  }

  /**
   * madvise. Errors: EINVAL (advice unsupported for this memory), EAGAIN, ENOMEM, EPERM, EFAULT;
   * RangeError ERR_OUT_OF_RANGE for populateRead/populateWrite of more than POPULATE_SYNC_MAX_BYTES
   * (1 GiB), which would hold the JavaScript thread for seconds: use populate() for those.
   * ERR_PAGEMIRROR_WOULD_FAULT for populateRead/populateWrite over a range registered with a
   * Userfaultfd where a page would fault: this thread would sleep on a fault only JavaScript may
   * resolve; populate() runs on a native thread instead.
   */
  advise(advice: Advice, range?: RangeOptions): void {
    const a = checkOneOf('advice', advice, Object.keys(ADVICE) as Advice[]);
    const [o, l] = this.#range(range);
    if ((a === 'populateRead' || a === 'populateWrite') && l > POPULATE_SYNC_MAX_BYTES)
      throw rangeError('ERR_OUT_OF_RANGE', `advise('${a}') of ${l} bytes would hold the JavaScript thread: at most ${POPULATE_SYNC_MAX_BYTES} bytes at once; use populate() (a native thread)`);
    this.native.advise(o, l, ADVICE[a]);
  }

  /**
   * Makes the range present (MADV_POPULATE_READ, or _WRITE with write: true) on a native thread:
   * any size, and safe on registered memory (its faults are served meanwhile). Default: the whole
   * mapping, read. Errors: EFAULT (a page could not be made present: PROT_NONE, SIGBUS), ENOMEM,
   * EBUSY from close() meanwhile (the range is pinned until it finishes); ERR_PAGEMIRROR_NOT_SERVED
   * before starting when a page would fault on a library userfaultfd that nothing serves.
   */
  async populate(options: RangeOptions & { write?: boolean } = {}): Promise<void> {
    const [o, l] = this.#range(options);
    const write = checkBoolean('write', options?.write, false);
    checkServed(this, o, l, write, 'populate()');
    await native.populateAsync(this.native, o, l, write);
  }

  /** msync. Default MS_SYNC. Errors: EBUSY (MS_INVALIDATE on locked pages), ENOMEM. */
  sync(range?: RangeOptions & { async?: boolean; invalidate?: boolean }): void {
    const [o, l] = this.#range(range);
    let flags = checkBoolean('async', range?.async, false) ? K.MS_ASYNC! : K.MS_SYNC!;
    if (checkBoolean('invalidate', range?.invalidate, false)) flags |= K.MS_INVALIDATE!;
    this.native.sync(o, l, flags);
  }

  /**
   * mremap the whole mapping to `length` bytes (a multiple of the page size; of the huge page size
   * for hugetlb). Returns the (possibly new) address; with `dontUnmap`, the old range as a new
   * Mapping (see {@link RemapOptions.dontUnmap}). The ArrayBuffer from `bytes` is detached. Mirrors
   * follow the mapping: their entries are invalidated first and re-faulted at the new address;
   * pages in device memory stay there (private memory) or come home first (shared memory). A mirror
   * keeps the range of the mapping it was given: after a shrink, device accesses to the part cut
   * off fail with EFAULT (a mirror cut off whole dies) until the mapping grows back over it.
   *
   * @throws TypeError ERR_INVALID_ARG_TYPE / ERR_INVALID_ARG_VALUE (bad options; `mayMove: false`
   *   with `address` or `dontUnmap`; `dontUnmap` on hugetlb), RangeError ERR_OUT_OF_RANGE (length
   *   0; destination overlapping the mapping; `dontUnmap` with a new length),
   *   ERR_PAGEMIRROR_UNALIGNED (length or address), ERR_PAGEMIRROR_CLOSED.
   * @throws SystemError EBUSY (native threads use the mapping), EEXIST (something is mapped at
   *   `address`), ENOMEM (cannot grow in place without mayMove), EINVAL (the kernel refuses: hugetlb
   *   mappings never grow; DONTUNMAP before 5.7, or on shared memory before 5.13), EFAULT (the
   *   mapping is split into several VMAs by unmap(), protect() or a partial registration).
   */
  remap(length: number, options: RemapOptions & { dontUnmap: true }): Mapping;
  remap(length: number, options?: RemapOptions): bigint;
  remap(length: number, options: RemapOptions = {}): bigint | Mapping {
    options = checkOptions('options', options);
    const len = checkInteger('length', length, 1);
    const address = options.address === undefined ? undefined : checkU64('address', options.address);
    const mayMove = checkBoolean('mayMove', options.mayMove, true);
    const dontUnmap = checkBoolean('dontUnmap', options.dontUnmap, false);
    if (!mayMove && (address !== undefined || dontUnmap))
      throw typeError('ERR_INVALID_ARG_VALUE', 'address and dontUnmap move the mapping: mayMove cannot be false');
    const r = this.native.remap(len, mayMove, address, dontUnmap);
    return typeof r === 'bigint' ? r : new Mapping(r);
  }

  /** fallocate(PUNCH_HOLE | KEEP_SIZE) on the backing file: frees the pages of a file range. */
  punchHole(fileOffset: number, length: number): void {
    this.native.fallocate(K.FALLOC_FL_PUNCH_HOLE! | K.FALLOC_FL_KEEP_SIZE!, checkInteger('fileOffset', fileOffset), checkInteger('length', length, 1));
  }

  /**
   * fallocate: reserve blocks for a file range (keepSize: do not extend the file). On a
   * memory-backed file (memfd, tmpfs) blocks are memory: a length beyond what the system has
   * available (MemAvailable + SwapFree) is refused with ENOMEM instead of waking the OOM killer.
   */
  allocate(fileOffset: number, length: number, options?: { keepSize?: boolean; zero?: boolean }): void {
    const o = checkOptions('options', options);
    let mode = checkBoolean('keepSize', o.keepSize, false) ? K.FALLOC_FL_KEEP_SIZE! : 0;
    if (checkBoolean('zero', o.zero, false)) mode |= K.FALLOC_FL_ZERO_RANGE!;
    this.native.fallocate(mode, checkInteger('fileOffset', fileOffset), checkInteger('length', length, 1));
  }

  /** ftruncate the backing file (pages past the end then SIGBUS on access). */
  truncateFile(length: number): void {
    this.native.truncate(checkInteger('length', length));
  }

  /** mincore: one entry per base page, true if resident. At most MAX_DECODED_PAGES (4194304) pages at once (ERR_OUT_OF_RANGE). */
  residency(range?: RangeOptions): boolean[] {
    const [o, l] = this.#range(range);
    checkDecodedPages('residency()', Math.ceil(l / BASE_PAGE), 'a smaller range');
    return Array.from(this.native.residency(o, l), (b) => (b & 1) === 1);
  }

  /** cachestat(2) over a file range (6.5+; ENOSYS elsewhere). Default: the mapped range. */
  cachestat(range?: { fileOffset?: number; length?: number }): CacheStat {
    const r = checkOptions('range', range);
    const off = checkInteger('fileOffset', r.fileOffset ?? this.#info.fileOffset);
    const len = checkInteger('length', r.length ?? this.length);
    return this.native.cachestat(off, len);
  }

  /** Per-page flags from /proc/self/pagemap. At most MAX_DECODED_PAGES (4194304) pages at once (ERR_OUT_OF_RANGE): pagemapRaw() for more. */
  pagemap(range?: RangeOptions): PageFlags[] {
    const [o, l] = this.#range(range);
    checkDecodedPages('pagemap()', Math.ceil(l / BASE_PAGE), 'pagemapRaw()');
    return Array.from(this.native.pagemap(o, l), decodePagemapEntry);
  }

  /** Raw /proc/self/pagemap entries. */
  pagemapRaw(range?: RangeOptions): BigUint64Array {
    const [o, l] = this.#range(range);
    return this.native.pagemap(o, l);
  }

  /** PAGEMAP_SCAN (6.7+): regions of pages matching the categories; optionally write-protect them. */
  scan(options: ScanOptions = {}): { regions: ScanRegion[]; walkEnd: number } {
    const [o, l] = this.#range(options);
    const req = categoryMask(options.require, 'require');
    const exc = categoryMask(options.exclude, 'exclude');
    const any = categoryMask(options.anyOf, 'anyOf');
    const wp = checkBoolean('writeProtect', options.writeProtect, false);
    const r = native.pagemapScan(this.native, o, l, {
      flags: (wp ? K.PM_SCAN_WP_MATCHING! : 0) | (checkBoolean('checkWpAsync', options.checkWpAsync, wp) ? K.PM_SCAN_CHECK_WPASYNC! : 0),
      categoryMask: req | exc,
      categoryInverted: exc,
      anyOf: any,
      returnMask: options.report === undefined ? 0x1ff : categoryMask(options.report, 'report'),
      maxPages: checkInteger('maxPages', options.maxPages ?? 0),
      maxRegions: checkInteger('maxRegions', options.maxRegions ?? 1024, 1),
    });
    return {
      regions: r.regions.map((x) => ({ offset: x.offset, length: x.length, categories: categoryNames(x.categories) })),
      walkEnd: r.walkEnd,
    };
  }

  /** statx of the backing file (dax: STATX_ATTR_DAX). */
  statx(): StatxResult {
    return this.native.statx();
  }

  /**
   * Copies bytes out on this thread. On registered memory it first checks (pagemap) that no page
   * would fault, and throws ERR_PAGEMIRROR_WOULD_FAULT otherwise: use read().
   */
  readSync(offset: number, length: number): Buffer {
    const out = Buffer.alloc(checkInteger('length', length));
    this.native.readInto(checkInteger('offset', offset), out);
    return out;
  }

  /** Copies bytes in on this thread; EACCES on read-only ranges; see readSync() for registered memory. */
  writeSync(offset: number, data: Uint8Array): number {
    return this.native.writeFrom(checkInteger('offset', offset), checkBytes('data', data));
  }

  /**
   * Copies bytes out on a native thread: safe on registered memory (the fault is served meanwhile).
   * ERR_PAGEMIRROR_NOT_SERVED before starting when a page would fault on a library userfaultfd
   * that nothing serves (the copy would sleep forever).
   */
  async read(offset: number, length: number): Promise<Buffer> {
    checkServed(this, checkInteger('offset', offset), checkInteger('length', length), false, 'read()');
    const out = Buffer.alloc(checkInteger('length', length));
    await native.copyAsync(this.native, checkInteger('offset', offset), out, false);
    return out;
  }

  /** Copies bytes in on a native thread. ERR_PAGEMIRROR_NOT_SERVED as read(). */
  write(offset: number, data: Uint8Array): Promise<number> {
    checkServed(this, checkInteger('offset', offset), checkBytes('data', data).byteLength, true, 'write()');
    return native.copyAsync(this.native, checkInteger('offset', offset), checkBytes('data', data), true);
  }

  /**
   * Maps the same memfd or file again (a second view of the same pages: how MINOR faults are
   * resolved, by writing the page cache through an unregistered alias and then UFFDIO_CONTINUE).
   */
  alias(options?: { prot?: Protection; offset?: number; length?: number }): Mapping {
    const o = checkOptions('options', options);
    const fd = this.fd;
    if (fd < 0) throw typeError('ERR_INVALID_ARG_VALUE', 'only memfd and file mappings can be aliased');
    return new Mapping(
      native.map({
        kind: 'file',
        fd,
        path: this.path,
        shared: true,
        prot: parseProt(o.prot ?? 'rw'),
        offset: checkInteger('offset', o.offset ?? this.#info.fileOffset),
        length: checkInteger('length', o.length ?? this.length, 1),
        hugetlb: this.hugetlb,
      }),
    );
  }

  /**
   * munmap part of the mapping (devices mirroring it are invalidated first). The hole reads as no
   * access (protection 0) from then on; its pages are freed, but its addresses stay reserved for
   * this mapping (an inaccessible PROT_NONE mapping) until close(), so no other mapping can be put
   * there and be unmapped with this one. EBUSY while native threads use it.
   */
  unmap(offset: number, length: number): void {
    this.native.unmap(checkInteger('offset', offset), checkInteger('length', length, 1));
  }

  /** Parts removed by unmap(). */
  get holes(): { offset: number; length: number }[] {
    return this.native.info().holes;
  }

  /**
   * Closes the mapping's mirrors (as Mirror.close() does: file mirrors write their device copies
   * back and release their leases; a pinned mirror stays with its pages and only gives up its
   * lease), then munmap and close the owned descriptor. Idempotent.
   * Errors: EBUSY while native threads or rules use it (nothing closed); EIO when device copies
   * could not be written back (closed anyway, as close(2) reports a failed writeback).
   */
  close(): void {
    this.native.close();
  }

  /** close(), for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Anonymous memory (private by default).
 *
 * @param length Bytes, at least 1 (rounded up to whole pages by the kernel).
 * @throws {RangeError} `ERR_OUT_OF_RANGE` (length, hugePageSize, align), before any system call.
 * @throws {TypeError} `ERR_INVALID_ARG_TYPE` (an option of the wrong type), `ERR_INVALID_ARG_VALUE` (prot).
 * @throws {SystemError} `ENOMEM` (mmap), `EINVAL` (hugetlb with a size the kernel has no pool for).
 * @example
 * ```ts
 * import { mapAnonymous } from 'pagemirror';
 * const m = mapAnonymous(1 << 20);          // 1 MiB, read-write, private
 * m.bytes.fill(7);                          // an ordinary Uint8Array over the mapping
 * m.protect('r', { length: m.pageSize });   // mprotect(2) the first page read-only
 * m.close();
 * ```
 */
export function mapAnonymous(length: number, options: AnonymousOptions = {}): Mapping {
  options = checkOptions('options', options);
  return new Mapping(
    native.map({
      kind: 'anonymous',
      length: checkInteger('length', length, 1),
      prot: parseProt(options.prot ?? 'rw'),
      shared: checkBoolean('shared', options.shared, false),
      populate: checkBoolean('populate', options.populate, false),
      noReserve: checkBoolean('noReserve', options.noReserve, false),
      hugetlb: checkBoolean('hugetlb', options.hugetlb, false),
      hugePageSize: checkInteger('hugePageSize', options.hugePageSize ?? 0),
      align: options.align === undefined ? 0 : checkInteger('align', options.align, 1),
    }),
  );
}

/**
 * A fresh memfd (shmem, or hugetlbfs with hugetlb), sized to `length` and mapped shared.
 *
 * @throws {RangeError} `ERR_OUT_OF_RANGE` (length, hugePageSize), before any system call.
 * @throws {TypeError} `ERR_INVALID_ARG_VALUE` (a name with a NUL byte, prot), `ERR_INVALID_ARG_TYPE`.
 * @throws {SystemError} `ENOMEM`, `EINVAL` (memfd_create, ftruncate, mmap).
 * @example
 * ```ts
 * import { mapMemfd } from 'pagemirror';
 * const m = mapMemfd(4 << 20, { name: 'dataset' });
 * console.log(m.fd, m.kind); // a descriptor another process can map; 'memfd'
 * m.close();
 * ```
 */
export function mapMemfd(length: number, options: MemfdOptions = {}): Mapping {
  options = checkOptions('options', options);
  return new Mapping(
    native.map({
      kind: 'memfd',
      length: checkInteger('length', length, 1),
      name: checkString('name', options.name ?? 'pagemirror'),
      prot: parseProt(options.prot ?? 'rw'),
      shared: true,
      populate: checkBoolean('populate', options.populate, false),
      noReserve: checkBoolean('noReserve', options.noReserve, false),
      hugetlb: checkBoolean('hugetlb', options.hugetlb, false),
      hugePageSize: checkInteger('hugePageSize', options.hugePageSize ?? 0),
    }),
  );
}

/**
 * A file by path or by descriptor (which is duplicated: the mapping owns its own).
 *
 * @throws {TypeError} `ERR_INVALID_ARG_TYPE` / `ERR_INVALID_ARG_VALUE` (a path with a NUL byte), before any system call.
 * @throws {SystemError} `ENOENT`, `EACCES` (with `path`), `EINVAL` (an empty file, offset not page aligned).
 * @example
 * ```ts
 * import { mapFile } from 'pagemirror';
 * const m = mapFile('/dev/shm/data.bin');        // shared, read-write
 * await m.write(0, Buffer.from('hello'));         // on a native thread
 * m.close();
 * ```
 */
export function mapFile(file: string | { fd: number; path?: string }, options: FileOptions = {}): Mapping {
  const byFd = typeof file === 'object' && file !== null && !Array.isArray(file);
  if (!byFd && typeof file !== 'string') throw typeError('ERR_INVALID_ARG_TYPE', 'file must be a path or { fd }');
  options = checkOptions('options', options);
  return new Mapping(
    native.map({
      kind: 'file',
      path: byFd ? (file.path === undefined ? undefined : checkString('path', file.path)) : checkString('file', file),
      fd: byFd ? checkInteger('fd', file.fd, 0, 0x7fffffff) : undefined,
      length: options.length === undefined ? 0 : checkInteger('length', options.length, 1),
      offset: checkInteger('offset', options.offset ?? 0),
      prot: parseProt(options.prot ?? 'rw'),
      shared: checkBoolean('shared', options.shared, true),
      populate: checkBoolean('populate', options.populate, false),
      noReserve: checkBoolean('noReserve', options.noReserve, false),
      sync: checkBoolean('sync', options.sync, false),
      create: checkBoolean('create', options.create, false),
      mode: checkInteger('mode', options.mode ?? 0o600, 0, 0o7777),
    }),
  );
}
