// Where the CLI's human or JSON report goes: standard output, unless the command's data goes there (save --stream -,
// extract -o -, or an output path that is standard output's file), then standard error: a report never shares a
// descriptor with stream data. Everything printed goes through the escaping of ../text.ts.
import { isStdout } from '../container/output.js';
import { printableLines, safeJson } from '../text.js';

let dataOnStdout = false;

/** Call before writing data to `target`; returns whether it is standard output. */
export function claimOutput(target: string): boolean {
  if (isStdout(target)) dataOnStdout = true;
  return dataOnStdout;
}

export function reportStream(): NodeJS.WritableStream { return dataOnStdout ? process.stderr : process.stdout; }

/** A line (or lines) of the human report; external fields must already be `printable`. */
export function out(s: string): void { reportStream().write(printableLines(s) + '\n'); }

export function outJson(v: unknown): void { reportStream().write(safeJson(v, 2) + '\n'); }
