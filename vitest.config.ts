import { defineConfig } from 'vitest/config';

// Each test file runs in its own process (forks): a bug here is a hung or killed thread, and it
// must take down one file, not the run. Every test has a timeout for the same reason.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/global-setup.ts'],
    setupFiles: ['test/watchdog.ts'],
    pool: 'forks',
    testTimeout: 20_000,
    hookTimeout: 20_000,
    teardownTimeout: 10_000,
    // verbose: every test is listed, and a skipped one shows the probe's reason.
    reporters: ['verbose'],
  },
});
