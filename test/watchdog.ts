// A bug here is a hung thread, and one that blocks the JavaScript thread inside native code cannot
// be timed out by vitest (its timers never run). A worker thread watches a heartbeat the main
// thread beats every 500 ms; after 60 s without one it names the test file and kills the process,
// so the run fails in a minute with a pointer instead of hanging until CI's limit.
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, expect } from 'vitest';

const beat = new Int32Array(new SharedArrayBuffer(4));
let worker: Worker | undefined;
let timer: NodeJS.Timeout | undefined;

beforeAll(() => {
  const file = expect.getState().testPath ?? 'a test file';
  worker = new Worker(
    `
    const { workerData } = require('node:worker_threads');
    const beat = new Int32Array(workerData.sab);
    let last = Atomics.load(beat, 0), since = Date.now();
    setInterval(() => {
      const now = Atomics.load(beat, 0);
      if (now !== last) { last = now; since = Date.now(); return; }
      if (Date.now() - since > 60000) {
        process._rawDebug('pagemirror watchdog: the JavaScript thread has been blocked for 60 s in ' + workerData.file + ' (a native deadlock?): killing the process');
        process.kill(process.pid, 'SIGKILL');
      }
    }, 1000);
    `,
    { eval: true, workerData: { sab: beat.buffer, file } },
  );
  worker.unref();
  timer = setInterval(() => Atomics.add(beat, 0, 1), 500);
  timer.unref();
});

afterAll(async () => {
  if (timer) clearInterval(timer);
  await worker?.terminate();
});
