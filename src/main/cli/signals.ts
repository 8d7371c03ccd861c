// SIGINT and SIGTERM cancel the running command through its AbortSignal, the same path as an API cancel: the
// engine rolls every source back to RUNNING and the partial output is removed. The command then ends with one
// line and exit 128 + the signal number (130, 143). A second signal exits at once (outputs' temporary files are
// still removed by their exit hook).
import os from 'node:os';
import { ErrorCode, MigError } from '../errors.js';

export interface Interrupt { name: NodeJS.Signals; exitCode: number; cleanup: string }

let got: Interrupt | undefined;

/** The signal that interrupted the command, if one did. */
export function interruptedBy(): Interrupt | undefined { return got; }

/** What the command left behind after the interrupt, appended to its one line (e.g. "; nothing written to F"). */
export function noteCleanup(s: string): void { if (got) got.cleanup = s; }

/** Work the process must finish before it exits (a rollback waiting for a stalled vendor call), with its lines. */
const beforeExit: Promise<string[]>[] = [];

/** `p` runs to its end before the process exits; the lines it resolves with are printed then (stderr). */
export function finishBeforeExit(p: Promise<string[]>): void { beforeExit.push(p); }

/** Whether anything is still to finish before exit (main waits for it, after the command's own line). */
export function pendingBeforeExit(): boolean { return beforeExit.length > 0; }

/** Wait for everything registered with finishBeforeExit; its lines, in order. */
export async function drainBeforeExit(): Promise<string[]> {
  const lines: string[] = [];
  while (beforeExit.length) {
    const r = await Promise.allSettled(beforeExit.splice(0));
    for (const x of r) lines.push(...(x.status === 'fulfilled' ? x.value : [`cleanup failed: ${(x.reason as Error)?.message ?? String(x.reason)}`]));
  }
  return lines;
}

export async function withSignals(fn: (signal: AbortSignal) => Promise<void>): Promise<void> {
  const ac = new AbortController();
  const on = (name: NodeJS.Signals) => {
    if (got) process.exit(got.exitCode);
    got = { name, exitCode: 128 + (os.constants.signals[name] ?? 0), cleanup: '' };
    ac.abort(new MigError(ErrorCode.CANCELLED, `interrupted by ${name}`));
  };
  const sigs: NodeJS.Signals[] = ['SIGINT', 'SIGTERM'];
  for (const s of sigs) process.on(s, on);
  try {
    await fn(ac.signal);
  } finally {
    for (const s of sigs) process.off(s, on);
  }
}
