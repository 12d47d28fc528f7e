// Files a benchmark creates for one repetition (a dataset-sized file in /dev/shm, which is RAM, and
// one in the temp dir) must not outlive the process when it is interrupted: an interrupted
// `pagemirror bench strategies` used to leave both behind. Every such file is registered here
// while it exists; on exit, SIGINT, SIGTERM or SIGHUP the registered files are removed and the
// signal is raised again, so the exit status still says which signal ended the run.
import fs from 'node:fs';

const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
const files = new Set<string>();
let installed = false;

function removeAll(): void {
  for (const f of files) {
    try {
      fs.rmSync(f, { force: true });
    } catch {
      /* nothing more can be done while exiting */
    }
  }
  files.clear();
}

function onSignal(sig: NodeJS.Signals): void {
  removeAll();
  uninstall();
  // Someone else listens (an embedding program): the signal is theirs to act on. Otherwise, with
  // our handler gone, raising it again ends the process the way the signal would have.
  if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
}

function install(): void {
  if (installed) return;
  installed = true;
  for (const s of SIGNALS) process.on(s, onSignal);
  process.on('exit', removeAll);
}

function uninstall(): void {
  if (!installed) return;
  installed = false;
  for (const s of SIGNALS) process.removeListener(s, onSignal);
  process.removeListener('exit', removeAll);
}

/** Registers a file to remove if the process exits or is interrupted before {@link releaseTempFile}. */
export function registerTempFile(file: string): void {
  files.add(file);
  install();
}

/** Removes the file (if it exists) and forgets it; the handlers go when no file is left. */
export function releaseTempFile(file: string): void {
  fs.rmSync(file, { force: true });
  files.delete(file);
  if (files.size === 0) uninstall();
}

/** The files registered now (for tests and diagnostics). */
export function tempFiles(): string[] {
  return [...files];
}
