// The engine's CPU-fault service, process-wide: the native threads that resolve CPU faults on
// pages devices took (migrate back, zero-fill, un-protect). One descriptor serves every mirror, so a
// pull-back from a slow disk holds up every other CPU fault unless there are several workers.
import { native, type NativeEngineStats } from './native.js';
import { serviceArgs, type PollOption } from './uffd.js';
import { checkOptions } from './validate.js';

/** Options of {@link configureEngine}: the engine's fault-service workers and polling. */
export interface EngineOptions {
  /** Worker threads reading the engine's userfaultfd. Default 1, 1..MAX_SERVICE_WORKERS (64). */
  workers?: number;
  /** How they wait for a fault: as ServeOptions.poll. Default false (sleep in poll() at once). */
  poll?: PollOption;
}

/** The engine's fault-service counters: {@link engineStats}. */
export type EngineStats = NativeEngineStats;

/**
 * Sets the engine's fault-service workers and polling for the whole process. Before the engine's
 * first use (the first migration or copy/bounce mirror) it only records them; afterwards the
 * workers finish the faults in hand, stop, and start again with the new setting (the call waits
 * for that, so a worker stuck on a slow pull-back delays it). Errors, before anything changes:
 * RangeError ERR_OUT_OF_RANGE (workers, poll.spinUs), TypeError ERR_INVALID_ARG_TYPE (options, poll);
 * EAGAIN (pthread_create) if the threads cannot be created (the engine then keeps one worker).
 */
export function configureEngine(options: EngineOptions = {}): void {
  options = checkOptions('options', options);
  const [workers, mode, spinUs] = serviceArgs(options.workers, options.poll);
  native.configureEngine(workers, mode, spinUs);
}

/** The engine's fault-service counters, summed over its workers, with one entry per worker. */
export function engineStats(): EngineStats {
  return native.engineStats();
}
