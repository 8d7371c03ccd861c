// What one CLI command shows while it runs and when it ends, the same way for every command: live progress on a
// terminal, `--events FILE|-` NDJSON, `--report FILE.html`, and the human summary or the `--json` document
// (docs/JSON.md). A command attaches its engine objects (Migration, Loader) and hands over its result; everything
// else is here, so a new command (send, receive) gets all of it by calling the same few methods.
import fs from 'node:fs';
import path from 'node:path';
import type { Migration } from '../engine/migration.js';
import type { Loader } from '../engine/load.js';
import type { LiveEvent } from '../live/events.js';
import { ErrorCode, MigError } from '../errors.js';
import { setTraceFilter } from '../trace.js';
import { EventLog } from '../report/events.js';
import { writeReport, reportData } from '../report/html.js';
import { ResultJson, errorJson, paramsJson, type ResultDocument } from '../report/json.js';
import { ProgressDisplay } from '../report/progress.js';
import { Recorder } from '../report/recorder.js';
import { printable, printableLines, safeJson } from '../text.js';
import { reportStream } from './io.js';
import { OutputFile } from '../container/output.js';

export interface OutputFlags { json?: boolean; quiet?: boolean; verbose?: boolean; events?: string; report?: string }

/** ANSI colour only on a terminal, and never when NO_COLOR is set to anything (https://no-color.org). */
export function colorAllowed(stream: NodeJS.WriteStream): boolean {
  return !!stream.isTTY && !process.env.NO_COLOR;
}

let current: CommandOutput | undefined;
/** The running command's output (main.ts reports a failure through it). */
export function currentOutput(): CommandOutput | undefined { return current; }

export class CommandOutput {
  readonly rec: Recorder;
  /** The parameters as the JSON document shows them (units in their names). */
  readonly params: Record<string, unknown>;
  private readonly json: ResultJson;
  private readonly events?: EventLog;
  private readonly reportFile?: OutputFile;
  private progress?: ProgressDisplay;
  private ended = false;

  constructor(readonly command: string, params: object, readonly flags: OutputFlags,
    progress: { transient?: boolean; totalLabel?: () => string } = {}) {
    const p = paramsJson(params);
    this.params = p;
    this.json = new ResultJson(command, p);
    if (flags.events === '-' && (flags.json || reportStream() !== process.stdout)) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, '--events -: standard output already carries the --json document or the stream data');
    }
    // Refusals (an existing file without --force, an input named as an output) come before any work.
    const force = !!(params as { force?: boolean }).force;
    const inputs = [(params as { file?: string }).file].filter((x): x is string => typeof x === 'string');
    if (flags.report !== undefined) {
      checkReportPath(flags.report);
      this.reportFile = OutputFile.open(flags.report, { force, inputs });
    }
    if (flags.verbose) setTraceFilter(process.env.VFIO_MIG_TRACE || '1');
    // A long stress run keeps only what the report draws; without a report nothing is kept.
    this.rec = new Recorder(flags.report ? (command === 'stress' ? 'report' : 'all') : 'none');
    if (flags.events !== undefined) this.events = new EventLog(openEvents(flags.events, force, inputs), this.rec, command, p, { dirty: flags.verbose });
    const tty = !!process.stdout.isTTY && !!process.stderr.isTTY;
    if (tty && !flags.quiet && !flags.json && flags.events !== '-') {
      this.progress = new ProgressDisplay(this.rec, { stream: process.stderr, color: colorAllowed(process.stderr), escape: printable, ...progress });
    }
    current = this; // only once every refusal is past: a failure from here on ends through this object
  }

  /** Human text goes where the report goes (stderr when stdout carries stream data), or stderr under `--events -`. */
  private get text(): NodeJS.WritableStream { return this.flags.events === '-' ? process.stderr : reportStream(); }
  private write(s: string): void { this.text.write(printableLines(s) + '\n'); }

  attachMigration(m: Migration, id?: number): number { return this.rec.attachMigration(m, id); }
  attachLoader(l: Loader, source?: number, id?: number): number { return this.rec.attachLoader(l, source, id); }
  /** A live endpoint (send, receive): its events go to --events under the id its Migration / Loader then shares. */
  attachLive(side: 'source' | 'destination'): { migration: number; onEvent: (e: LiveEvent) => void } { return this.rec.attachLive(side); }
  /** Stress: refresh the total line's counters. */
  tick(): void { this.progress?.refresh(); }

  /** A line of human output now (a stress failure, a note); nothing with --json or --quiet. */
  line(s: string): void {
    if (this.flags.json || this.flags.quiet) return;
    if (this.progress) this.progress.log(s); // above the live lines (both are the terminal)
    else this.write(s);
  }

  private stopProgress(): void {
    this.progress?.stop();
    this.progress = undefined;
  }

  /**
   * The command finished (ok or not: `ok` false when, say, a device did not verify). `verdict`: the one line that
   * --quiet still prints (the overall `verified: ...`).
   */
  done(result: Record<string, unknown>, summary: string, ok = true, verdict?: string): void {
    this.finish(ok, result, null, summary, verdict);
    if (!ok) process.exitCode = 1;
  }

  /** The command failed with `err`; `partial`: what was measured before (JSON `result`), `summary` the same as text. */
  failed(err: MigError, partial: Record<string, unknown> | null = null, summary = ''): void {
    this.finish(false, partial, err, summary);
  }

  private finish(ok: boolean, result: Record<string, unknown> | null, err: MigError | null, summary: string, verdict?: string): void {
    if (this.ended) return;
    this.ended = true;
    this.stopProgress();
    const ej = err ? errorJson(err) : null;
    if (this.reportFile) {
      // Written for a failed command too: what happened before the failure is what one wants to see.
      const errText = err ? `${err.code}: ${err.message}` : null;
      writeReport(this.reportFile, reportData(this.rec, { command: this.command, params: this.json.params, summary, ok, error: errText }));
    }
    this.events?.end(ok, ej);
    if (this.flags.json) this.text.write(safeJson(this.document(ok, result, ej), 2) + '\n');
    else if (!this.flags.quiet) { if (summary) this.write(summary); }
    else if (verdict) this.write(verdict);
    if (this.flags.report !== undefined && !this.flags.json && !this.flags.quiet) this.write(`report: ${printable(this.flags.report)}`);
    current = undefined;
  }

  document(ok: boolean, result: Record<string, unknown> | null, error: ReturnType<typeof errorJson> | null): ResultDocument {
    return this.json.document(ok, result, error);
  }
}

/**
 * The events file is written in place as events happen (so `tail -f` follows it), but like every output it never
 * replaces an existing file without --force, nor an input.
 */
function openEvents(target: string, force: boolean, inputs: string[]): number {
  if (target === '-') return 1;
  const file = path.resolve(target);
  for (const i of inputs) {
    if (fs.existsSync(i) && fs.existsSync(file) && fs.statSync(i).ino === fs.statSync(file).ino && fs.statSync(i).dev === fs.statSync(file).dev) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `--events ${target} is the input ${i}: choose another file`);
    }
  }
  try {
    return fs.openSync(file, force ? 'w' : 'wx', 0o666);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw new MigError(ErrorCode.OUTPUT_EXISTS, `--events ${target} exists: pass --force to replace it`);
    throw new MigError(ErrorCode.IO, `--events ${target}: ${(e as Error).message}`, { cause: e });
  }
}

/** Before any work: the report's folder exists and the name ends in .html (a typo must not cost a long run). */
function checkReportPath(file: string): void {
  if (!/\.html?$/i.test(file)) throw new MigError(ErrorCode.BAD_ARGUMENT, `--report: '${file}' must end in .html`);
  const dir = path.dirname(path.resolve(file));
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new MigError(ErrorCode.BAD_ARGUMENT, `--report: folder ${dir} does not exist`);
}

/** A failure before any command started (a bad flag): the same JSON document, with what is known. */
export function earlyFailureDocument(command: string, err: MigError): ResultDocument {
  return new ResultJson(command, {}).document(false, null, errorJson(err));
}
