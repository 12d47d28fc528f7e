// No silent hang: which registered memory nothing serves. A thread that faults on memory registered
// with a userfaultfd sleeps until someone reads and resolves the fault; if the descriptor is not
// being served, nobody ever will. The library's own descriptors note here what they register, and
// every call that runs an access on native threads asks first (before any system call).
import { stateError } from './errors.js';
import { native } from './native.js';

/** What a library userfaultfd tells about itself (lib/uffd.ts implements it). */
export interface ServedHolder {
  readonly fd: number;
  readonly closed: boolean;
  /** A native service is reading the descriptor. */
  readonly serving: boolean;
  /** The kernel resolves these faults itself (sigbus: all of them; wpAsync: write-protect faults). */
  has(feature: 'sigbus' | 'wpAsync'): boolean;
  readonly registrations: readonly { mapping: object; offset: number; length: number; modes: readonly string[] }[];
}

interface PagemapSource {
  readonly native: { pagemap(offset: number, length: number): BigUint64Array };
}

const holders = new WeakMap<object, Set<ServedHolder>>();

/** register() notes the holder against the mapping; close() and unregister() take it back. */
export function noteRegistered(mapping: object, holder: ServedHolder): void {
  let set = holders.get(mapping);
  if (!set) holders.set(mapping, (set = new Set()));
  set.add(holder);
}

export function noteUnregistered(mapping: object, holder: ServedHolder): void {
  holders.get(mapping)?.delete(holder);
}

// Past this many bytes the presence of every page is not checked (a pagemap read per 8 bytes of
// entries): the access is refused on the registration alone.
const PRESENCE_CHECK_MAX = 1 << 30;
const PAGE = native.uname().pageSize;

/**
 * Throws ERR_PAGEMIRROR_NOT_SERVED when [offset, offset + length) of mapping overlaps a range
 * registered with a library userfaultfd that nothing serves and the access could fault there: a
 * page not present (missing, minor), or, for a write, write-protected by userfaultfd. Faults the
 * kernel resolves itself (sigbus, wpAsync) do not count. `what` names the call for the message.
 */
export function checkServed(mapping: PagemapSource, offset: number, length: number, write: boolean, what: string): void {
  const set = holders.get(mapping);
  if (!set || set.size === 0) return;
  for (const h of set) {
    if (h.closed || h.serving || h.has('sigbus')) continue;
    for (const r of h.registrations) {
      if (r.mapping !== mapping) continue;
      const modes = r.modes.filter((m) => !(m === 'wp' && (h.has('wpAsync') || !write)));
      if (modes.length === 0) continue;
      const start = Math.max(offset, r.offset);
      const end = Math.min(offset + length, r.offset + r.length);
      if (start >= end) continue;
      const at = wouldFault(mapping, start, end, write && modes.includes('wp'));
      if (at === undefined) continue;
      throw stateError(
        'ERR_PAGEMIRROR_NOT_SERVED',
        `${what}: offset ${at} is registered with userfaultfd ${h.fd} (${modes.join(', ')}), which nothing serves: ` +
          'the access would sleep forever on its fault. Call serve() (or addRule(), which starts the service) on that ' +
          'userfaultfd first, or unregister the range',
      );
    }
  }
}

// The first offset in [start, end) where an access would fault, or undefined.
function wouldFault(mapping: PagemapSource, start: number, end: number, wp: boolean): number | undefined {
  const first = start - (start % PAGE);
  const last = Math.ceil(end / PAGE) * PAGE;
  if (last - first > PRESENCE_CHECK_MAX) return start;
  const entries = mapping.native.pagemap(first, last - first);
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i]!;
    const present = (e >> 63n) & 1n;
    const uffdWp = (e >> 57n) & 1n;
    if (!present || (wp && uffdWp)) return first + i * PAGE;
  }
  return undefined;
}
