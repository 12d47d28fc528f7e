/**
 * pagemirror: userfaultfd, mprotect and mmap for TypeScript, and a user-space HMM page-mirroring
 * engine built on them. This is the package's main entry (`import ... from 'pagemirror'`); it
 * exports only the documented API. The addon itself is in `pagemirror/internal`, the benchmark
 * harness in `pagemirror/bench`.
 *
 * @packageDocumentation
 * @module pagemirror
 */
export { Mapping, mapAnonymous, mapMemfd, mapFile, decodePagemapEntry, POPULATE_SYNC_MAX_BYTES } from './mapping.js';
export type { MapOptions, AnonymousOptions, MemfdOptions, FileOptions, RangeOptions, PageFlags, ScanOptions, ScanRegion, MappingKind, RemapOptions } from './mapping.js';
export { Userfaultfd, Fault, MAX_SERVICE_WORKERS, ADAPTIVE_SPIN_MAX_US } from './uffd.js';
export type { OpenOptions, RegisterOptions, Registration, FaultKind, UffdEvent, ServeOptions, PollOption, Rule, RuleAction, ResolveOptions, ResolveResult, CloseOutcome, ServiceStats } from './uffd.js';
export { FaultServer, RemoteClient } from './server.js';
export type { FaultServerOptions, RemoteRange, RemoteClientCounters, RemoteClientPolicy, RemoteTouch, FaultServerStats, ClientRecordOptions } from './server.js';
export { configureEngine, engineStats } from './engine.js';
export type { EngineOptions, EngineStats } from './engine.js';
export { access, forkAccess, FORK_DELAY_MAX_MS } from './access.js';
export type { AccessOptions, AccessResult, AccessOp, AccessPattern, ForkResult } from './access.js';
export { probe, formatProbe, fileSystemOf } from './probe.js';
export type { Probe, Capability, UffdProbe, FsProbe } from './probe.js';
export { isSystemError, PAGEMIRROR_ERROR_CODES } from './errors.js';
export type { SystemError, PagemirrorErrorCode } from './errors.js';
export { Prot, ADVICE, FEATURES, IOCTLS, REGISTER_MODES, PAGE_IS, parseProt, featureNames, ioctlNames } from './constants.js';
export type { Protection, Advice, FeatureName, IoctlName, RegisterMode, PageCategory } from './constants.js';
export { Device, Mirror, FileMirror, decodeEntry, SNAPSHOT } from './device.js';
export type { DeviceOptions, MirrorEntry, KernelOp, KernelOptions, KernelResult, DeviceCounters, MigrateResult, SkipReason, TraceEvent, ForkStep, ForkRunOptions, ForkStepResult, ForkRunResult, FileStrategy, FileMirrorOptions, FileStats, FileAccounting } from './device.js';
export { LINK_PRESETS } from './link.js';
export type { LinkOptions, LinkParams, LinkPreset } from './link.js';
export { pager, Pager } from './pager.js';
export { readTrace, writeTrace, recordTrace, Trace, TraceRecorder, TRACE_FORMAT, TRACE_VERSION } from './trace.js';
export type { TraceHeader, TraceRange, TraceRecord, TraceFault, TraceSample, TraceDropped, TraceEnd, TraceRangeAdded, TraceRangeRemoved, TraceSummary, SampleMethod, RecordRange, RecordTraceOptions, RecordingSummary } from './trace.js';
export type { ReplayOptions, ReplayResult, MigrationCounts } from './replay.js';
export type { PagerOptions, PagerMode, PagerEviction, PagerFill, PagerStats, PagerWriteError } from './pager.js';
