// probe(): what this kernel and machine offer, learnt once per process by real attempts (open a
// userfaultfd, register each memory kind, run PAGEMAP_SCAN, call cachestat), never by version
// numbers. Tests skip by it and errors cite it.
import fs from 'node:fs';
import os from 'node:os';
import { native } from './native.js';
import { featureNames, ioctlNames, type FeatureName, type IoctlName } from './constants.js';
import { mapAnonymous, mapMemfd } from './mapping.js';
import { typeError } from './errors.js';
import { checkBoolean, checkOptions, checkString } from './validate.js';

/** Whether an experiment can run here and, if not, why. */
export interface Capability {
  ok: boolean;
  /** Why not (or a note when ok). */
  reason?: string;
}

/** What userfaultfd offers this process: how it can be opened, its features and ioctls. */
export interface UffdProbe extends Capability {
  openedBy?: 'device' | 'syscall';
  userModeOnly?: boolean;
  deviceError?: string;
  syscallError?: string;
  features: FeatureName[];
  ioctls: IoctlName[];
  /** Features the kernel lists but refuses to this caller, with the errno. */
  refused: Partial<Record<FeatureName, string>>;
  /** Per memory kind and mode: the ioctls allowed after UFFDIO_REGISTER, or the errno it failed with. */
  register: Record<string, Record<string, IoctlName[] | string>>;
}

/** A mounted file system the probe looked at. */
export interface FsProbe {
  path: string;
  type: string;
  magic: string;
  dax: boolean;
}

/** What this kernel and machine offer: {@link probe}. */
export interface Probe {
  kernel: { release: string; machine: string; version: string };
  pageSize: number;
  node: string;
  cpu: { model: string; count: number };
  euid: number;
  sysctl: { unprivilegedUserfaultfd: string | null };
  devUserfaultfd: { exists: boolean; mode: string | null; accessible: boolean };
  uffd: UffdProbe;
  /** What an unprivileged user gets (user-mode-only variant). */
  uffdUserModeOnly: UffdProbe;
  /**
   * Each way of obtaining a full userfaultfd on its own (Userfaultfd.open({ via })): the probe
   * above stops at the first that works. reason: the error of a way that fails.
   */
  uffdVia: Record<'device' | 'syscall', Capability>;
  pagemapScan: Capability;
  /**
   * Whether a read fault on untouched private anonymous memory maps the shared zero page (seen
   * through PAGEMAP_SCAN's PAGE_IS_PFNZERO), as Linux does unless the kernel is built or booted
   * without it (some virtual machines' kernels: `pvm_no_zero_page=1`); then it gets a private page.
   */
  zeroPage: Capability;
  cachestat: Capability;
  thp: { enabled: string | null; defrag: string | null; shmemEnabled: string | null };
  hugetlb: { defaultSize: number; total: number; free: number; sizes: { size: number; total: number; free: number }[] };
  filesystems: FsProbe[];
  dax: Capability & { candidates: string[] };
  /** Whether each kind of experiment can run here, and why not. */
  experiments: Record<'uffd' | 'wp' | 'minor' | 'move' | 'poison' | 'wpAsync' | 'events' | 'tmpfs' | 'ext4' | 'dax' | 'hugetlb' | 'thp' | 'fileCpuFaults' | 'leases', Capability>;
}

const FS_NAMES: Record<number, string> = {
  0x01021994: 'tmpfs',
  0xef53: 'ext4',
  0x58465342: 'xfs',
  0x9123683e: 'btrfs',
  0x958458f6: 'hugetlbfs',
  0x6969: 'nfs',
  0x794c7630: 'overlayfs',
  0x2fc12fc1: 'zfs',
};

function readText(p: string): string | null {
  try {
    return fs.readFileSync(p, 'utf8').trim();
  } catch {
    return null;
  }
}

function selected(s: string | null): string | null {
  const m = s?.match(/\[([^\]]+)\]/);
  return m ? m[1]! : s;
}

function uffdProbe(userModeOnly: boolean): UffdProbe {
  const p = native.probeUffd(userModeOnly);
  const register: UffdProbe['register'] = {};
  for (const [kind, modes] of Object.entries(p.register ?? {})) {
    register[kind] = {};
    for (const [mode, v] of Object.entries(modes)) register[kind]![mode] = typeof v === 'bigint' ? ioctlNames(v) : v;
  }
  const reason = p.available
    ? p.apiError
      ? `UFFDIO_API failed: ${p.apiError}`
      : undefined
    : `cannot open a userfaultfd (/dev/userfaultfd: ${p.deviceError || 'ok'}, userfaultfd(2): ${p.syscallError || 'ok'}, last: ${p.error}); ` +
      'needs read-write access to /dev/userfaultfd, sysctl vm.unprivileged_userfaultfd=1, or CAP_SYS_PTRACE';
  return {
    ok: p.available && !p.apiError,
    reason,
    openedBy: p.openedBy,
    userModeOnly: p.userModeOnly,
    deviceError: p.deviceError || undefined,
    syscallError: p.syscallError || undefined,
    features: featureNames(p.features ?? 0n),
    ioctls: ioctlNames(p.ioctls ?? 0n),
    refused: p.eventForkError ? { eventFork: p.eventForkError } : {},
    register,
  };
}

function viaProbe(via: 'device' | 'syscall'): Capability {
  return tryCap(() => native.openUserfaultfd({ via }).close('wake'));
}

function tryCap(fn: () => void): Capability {
  try {
    fn();
    return { ok: true };
  } catch (err) {
    const e = err as { code?: string; message?: string };
    const message = e.message ?? String(err);
    // A SystemError's message already starts with its code ("EPERM: Operation not permitted, ...").
    const code = e.code ?? 'error';
    return { ok: false, reason: message.startsWith(`${code}:`) ? message : `${code}: ${message}` };
  }
}

/** The file system type of a path ('tmpfs', 'ext4', 'xfs', ...; 'other' when unknown). */
export function fileSystemOf(p: string): string {
  return FS_NAMES[native.fsType(checkString('path', p))] ?? 'other';
}

function fsProbe(p: string): FsProbe | null {
  try {
    const magic = native.fsType(p);
    let dax = false;
    try {
      dax = native.statx(p).dax;
    } catch {
      /* no statx on this path */
    }
    return { path: p, type: FS_NAMES[magic] ?? 'other', magic: '0x' + magic.toString(16), dax };
  } catch {
    return null;
  }
}

function hugetlbInfo(): Probe['hugetlb'] {
  const meminfo = readText('/proc/meminfo') ?? '';
  const num = (k: string) => Number(meminfo.match(new RegExp(`^${k}:\\s+(\\d+)`, 'm'))?.[1] ?? 0);
  const sizes: Probe['hugetlb']['sizes'] = [];
  try {
    for (const d of fs.readdirSync('/sys/kernel/mm/hugepages')) {
      const kb = Number(d.match(/hugepages-(\d+)kB/)?.[1] ?? 0);
      if (!kb) continue;
      sizes.push({
        size: kb * 1024,
        total: Number(readText(`/sys/kernel/mm/hugepages/${d}/nr_hugepages`) ?? 0),
        free: Number(readText(`/sys/kernel/mm/hugepages/${d}/free_hugepages`) ?? 0),
      });
    }
  } catch {
    /* no hugetlb support */
  }
  return { defaultSize: num('Hugepagesize') * 1024, total: num('HugePages_Total'), free: num('HugePages_Free'), sizes };
}

function daxCandidates(): string[] {
  const out: string[] = [];
  for (const line of (readText('/proc/mounts') ?? '').split('\n')) {
    const [dev, mnt, , opts] = line.split(' ');
    if (opts && /(^|,)dax(=always)?(,|$)/.test(opts)) out.push(mnt!);
    else if (dev && /^\/dev\/pmem/.test(dev)) out.push(mnt!);
  }
  try {
    for (const d of fs.readdirSync('/dev')) if (/^(pmem|dax)\d/.test(d)) out.push('/dev/' + d);
  } catch {
    /* no /dev */
  }
  return out;
}

let cached: Probe | undefined;

/** The probe, computed once per process (pass refresh to recompute). */
export function probe(options: { refresh?: boolean } = {}): Probe {
  const refresh = checkBoolean('refresh', checkOptions('options', options).refresh, false);
  if (cached && !refresh) return cached;
  const u = native.uname();
  const uffd = uffdProbe(false);
  const umo = uffdProbe(true);
  const devMode = (() => {
    try {
      return '0' + (fs.statSync('/dev/userfaultfd').mode & 0o777).toString(8);
    } catch {
      return null;
    }
  })();
  const devAccessible = (() => {
    try {
      fs.accessSync('/dev/userfaultfd', fs.constants.R_OK | fs.constants.W_OK);
      return true;
    } catch {
      return false;
    }
  })();

  const pagemapScan = tryCap(() => {
    const m = mapAnonymous(u.pageSize * 4);
    try {
      m.scan({ require: ['present'] });
    } finally {
      m.close();
    }
  });
  const zeroPage: Capability = (() => {
    if (!pagemapScan.ok) return { ok: false, reason: `PAGEMAP_SCAN tells the zero page: ${pagemapScan.reason}` };
    const m = mapAnonymous(u.pageSize * 2);
    try {
      if (m.bytes[0] !== 0) return { ok: false, reason: 'untouched anonymous memory did not read zeros' };
      if (m.scan({ require: ['pfnZero'] }).regions.length) return { ok: true };
      const flag = (readText('/proc/cmdline') ?? '').split(/\s+/).find((w) => /zero_page/.test(w));
      return { ok: false, reason: `a read fault on untouched private anonymous memory maps a private page here, not the shared zero page${flag ? ` (the kernel was booted with ${flag})` : ''}` };
    } catch (err) {
      return { ok: false, reason: (err as Error).message };
    } finally {
      m.close();
    }
  })();
  const cachestat = tryCap(() => {
    const m = mapMemfd(u.pageSize);
    try {
      m.cachestat();
    } finally {
      m.close();
    }
  });

  const seen = new Set<string>();
  const filesystems: FsProbe[] = [];
  for (const p of ['/dev/shm', os.tmpdir(), process.cwd(), '/']) {
    const f = fsProbe(p);
    if (f && !seen.has(p)) {
      seen.add(p);
      filesystems.push(f);
    }
  }
  const candidates = daxCandidates();
  const dax: Probe['dax'] = {
    ok: candidates.length > 0,
    reason: candidates.length
      ? `DAX candidates: ${candidates.join(', ')}`
      : 'no DAX file system mounted (no mount with -o dax, no /dev/pmem* or /dev/dax*): DAX paths are detected at run time and exercised only where one exists',
    candidates,
  };
  const hugetlb = hugetlbInfo();
  const thp = {
    enabled: selected(readText('/sys/kernel/mm/transparent_hugepage/enabled')),
    defrag: selected(readText('/sys/kernel/mm/transparent_hugepage/defrag')),
    shmemEnabled: selected(readText('/sys/kernel/mm/transparent_hugepage/shmem_enabled')),
  };
  const has = (f: FeatureName) => uffd.features.includes(f);
  const need = (ok: boolean, why: string): Capability => (ok ? { ok } : { ok, reason: why });
  const tmpfs = filesystems.find((f) => f.path === '/dev/shm');
  const ext4 = filesystems.find((f) => f.type === 'ext4');

  cached = {
    kernel: { release: u.release, machine: u.machine, version: u.version },
    pageSize: u.pageSize,
    node: process.version,
    cpu: { model: os.cpus()[0]?.model ?? 'unknown', count: os.cpus().length },
    euid: process.geteuid?.() ?? -1,
    sysctl: { unprivilegedUserfaultfd: readText('/proc/sys/vm/unprivileged_userfaultfd') },
    devUserfaultfd: { exists: devMode !== null, mode: devMode, accessible: devAccessible },
    uffd,
    uffdUserModeOnly: umo,
    uffdVia: { device: viaProbe('device'), syscall: viaProbe('syscall') },
    pagemapScan,
    zeroPage,
    cachestat,
    thp,
    hugetlb,
    filesystems,
    dax,
    experiments: {
      uffd: uffd.ok ? { ok: true, reason: uffd.userModeOnly ? 'user-mode-only: faults raised inside the kernel (read(2) into registered memory) fail with EFAULT' : undefined } : { ok: false, reason: uffd.reason },
      wp: need(uffd.ok && has('pagefaultFlagWp'), 'the kernel lacks UFFD_FEATURE_PAGEFAULT_FLAG_WP'),
      minor: need(uffd.ok && has('minorShmem'), 'the kernel lacks UFFD_FEATURE_MINOR_SHMEM'),
      move: need(uffd.ok && has('move'), 'the kernel lacks UFFDIO_MOVE (6.8+)'),
      poison: need(uffd.ok && has('poison'), 'the kernel lacks UFFDIO_POISON (6.6+)'),
      wpAsync: need(uffd.ok && has('wpAsync') && pagemapScan.ok, 'needs UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (6.7+)'),
      events: need(
        uffd.ok && has('eventFork') && !uffd.refused.eventFork && has('eventRemap') && has('eventRemove') && has('eventUnmap'),
        uffd.refused.eventFork ? `EVENT_FORK refused (${uffd.refused.eventFork}): a user-mode-only descriptor needs CAP_SYS_PTRACE for it` : 'the kernel lacks uffd events',
      ),
      tmpfs: need(tmpfs?.type === 'tmpfs', '/dev/shm is not a tmpfs here'),
      // copy/bounce intercepting CPU mmap accesses on tmpfs/memfd: MISSING, MINOR and WP on shmem.
      fileCpuFaults: need(
        uffd.ok && has('missingShmem') && has('minorShmem') && has('wpHugetlbfsShmem') && tmpfs?.type === 'tmpfs',
        !uffd.ok ? `userfaultfd: ${uffd.reason}` : 'the kernel lacks MISSING/MINOR/WP on shmem (UFFD_FEATURE_MISSING_SHMEM, MINOR_SHMEM, WP_HUGETLBFS_SHMEM) or /dev/shm is not tmpfs',
      ),
      leases: need(readText('/proc/sys/fs/leases-enable') !== '0', 'fs.leases-enable is 0: the kernel grants no file leases'),
      ext4: ext4 ? { ok: true, reason: `ext4 at ${ext4.path}` } : { ok: false, reason: `no ext4 among ${filesystems.map((f) => `${f.path} (${f.type})`).join(', ')}; tests may loop-mount an image as root` },
      dax,
      hugetlb: need(hugetlb.free > 0, `no free hugetlb pages (HugePages_Total=${hugetlb.total}): as root, echo N > /proc/sys/vm/nr_hugepages`),
      thp: need(thp.enabled === 'always' || thp.enabled === 'madvise', `transparent hugepages are ${thp.enabled ?? 'absent'}`),
    },
  };
  return cached;
}

/**
 * The probe for a person: one line per fact, what works, and why not where it does not.
 * @throws ERR_INVALID_ARG_VALUE when `p` is not what probe() returns.
 */
export function formatProbe(p: Probe): string {
  try {
    return format(p);
  } catch (err) {
    // format() reads nothing but p: any failure means p is not what probe() returns.
    const e = typeError('ERR_INVALID_ARG_VALUE', `formatProbe() takes the object probe() returns (${(err as Error).message})`);
    (e as Error & { cause: unknown }).cause = err;
    throw e;
  }
}

function format(p: Probe): string {
  const yes = (c: Capability) => (c.ok ? 'yes' : 'no ') + (c.reason ? `  (${c.reason})` : '');
  const lines: string[] = [];
  lines.push(`kernel        ${p.kernel.release} ${p.kernel.machine}, page size ${p.pageSize}`);
  lines.push(`cpu           ${p.cpu.model} x${p.cpu.count}`);
  lines.push(`node          ${p.node}, euid ${p.euid}`);
  lines.push(`sysctl        vm.unprivileged_userfaultfd = ${p.sysctl.unprivilegedUserfaultfd ?? 'absent'}`);
  lines.push(`/dev/userfaultfd  ${p.devUserfaultfd.exists ? `mode ${p.devUserfaultfd.mode}, ${p.devUserfaultfd.accessible ? 'accessible' : 'not accessible'} to this user` : 'absent'}`);
  lines.push(`userfaultfd   ${p.uffd.ok ? `opened via ${p.uffd.openedBy}${p.uffd.userModeOnly ? ' (user-mode-only)' : ''}` : 'unavailable: ' + p.uffd.reason}`);
  lines.push(`  ways        ${(['device', 'syscall'] as const).map((w) => `${w}: ${p.uffdVia[w].ok ? 'ok' : 'no'}`).join(', ')}`);
  lines.push(`  features    ${p.uffd.features.join(' ') || '-'}`);
  lines.push(`  ioctls      ${p.uffd.ioctls.join(' ') || '-'}`);
  for (const [f, e] of Object.entries(p.uffd.refused)) lines.push(`  refused     ${f}: ${e}`);
  for (const [kind, modes] of Object.entries(p.uffd.register)) {
    const parts = Object.entries(modes).map(([m, v]) => `${m}: ${Array.isArray(v) ? v.join(',') : v}`);
    lines.push(`  ${kind.padEnd(16)} ${parts.join('  |  ')}`);
  }
  lines.push(`unprivileged  ${p.uffdUserModeOnly.ok ? `user-mode-only descriptor opens via ${p.uffdUserModeOnly.openedBy}` : p.uffdUserModeOnly.reason}`);
  lines.push(`PAGEMAP_SCAN  ${yes(p.pagemapScan)}`);
  lines.push(`zero page     ${yes(p.zeroPage)}`);
  lines.push(`cachestat     ${yes(p.cachestat)}`);
  lines.push(`THP           enabled=${p.thp.enabled} defrag=${p.thp.defrag} shmem=${p.thp.shmemEnabled}`);
  lines.push(`hugetlb       default ${p.hugetlb.defaultSize / 1024} kB, ${p.hugetlb.free}/${p.hugetlb.total} free` + (p.hugetlb.sizes.length ? `; sizes ${p.hugetlb.sizes.map((s) => `${s.size / 1024} kB: ${s.free}/${s.total}`).join(', ')}` : ''));
  for (const f of p.filesystems) lines.push(`fs            ${f.path.padEnd(14)} ${f.type} (${f.magic})${f.dax ? ' DAX' : ''}`);
  lines.push('experiments');
  for (const [k, c] of Object.entries(p.experiments)) lines.push(`  ${k.padEnd(10)} ${yes(c)}`);
  return lines.join('\n');
}

