// Progress on stderr for long runs: a single rewritten line on a terminal, plain lines otherwise.
/** Progress on stderr: one rewritten line on a terminal, plain lines otherwise, nothing when quiet. */
export class Progress {
  #done = 0;
  readonly #tty = process.stderr.isTTY === true;
  constructor(
    /** Steps in all (100 %). */
    readonly total: number,
    /** Shown before the bar. */
    readonly label: string,
    /** Show nothing. */
    readonly quiet = false,
  ) {}

  /** Counts one step done and shows `what` beside the bar. */
  step(what: string): void {
    this.#done++;
    if (this.quiet) return;
    const line = this.#line(what);
    if (this.#tty) process.stderr.write(`\r\x1b[K${line}`);
    else process.stderr.write(line + '\n');
  }

  /**
   * Shows the step that starts now (`what`), on a terminal only: a long step is then named while
   * it runs. A log gets one line per step, from step().
   */
  start(what: string): void {
    if (!this.quiet && this.#tty) process.stderr.write(`\r\x1b[K${this.#line(`running ${what}`)}`);
  }

  #line(what: string): string {
    const pct = Math.round((100 * this.#done) / this.total);
    const width = 24;
    const filled = Math.round((width * this.#done) / this.total);
    const bar = '#'.repeat(filled) + '.'.repeat(width - filled);
    return `${this.label} [${bar}] ${String(pct).padStart(3)}% ${what}`;
  }

  /** Ends the line on a terminal (call once after the last step). */
  end(): void {
    if (!this.quiet && this.#tty) process.stderr.write('\n');
  }
}
