// Live progress on a terminal (cli-progress): one line per device — its phase, bytes sent of its estimated total,
// rate and remaining-time estimate — and a total line, redrawn at most 10 times a second from the recorder's
// events. Only on a terminal: the CLI never creates it when stdout is not a TTY or with --quiet/--json.
import cliProgress from 'cli-progress';
import type { OperatorEvent, Recorder } from './recorder.js';
import { fmtBytes, fmtRate } from './units.js';

export interface ProgressOptions {
  stream: NodeJS.WriteStream;
  /** ANSI colour (off with NO_COLOR). */
  color: boolean;
  /** At most this many device lines (more devices: the total line only). */
  maxDeviceLines?: number;
  /** Device lines of a finished migration are removed (stress: migrations come and go). */
  transient?: boolean;
  /** Device names may come from a stream file: printed through this (escapes control characters). */
  escape?: (s: string) => string;
  /** Extra text for the total line (stress: iterations, failures). */
  totalLabel?: () => string;
}

/** What a person calls each engine state, per side. */
const PHASE: Record<string, Record<string, string>> = {
  source: { PRE_COPY: 'pre-copy', STOP_COPY: 'stop-copy', STOP: 'saved', RUNNING: 'rolled back', ERROR: 'error' },
  destination: { RESUMING: 'loading', RUNNING: 'running', STOP: 'loaded', ERROR: 'error' },
};
const COLOR: Record<string, string> = {
  'pre-copy': '36', 'stop-copy': '33', saved: '32', loading: '36', running: '32', loaded: '32', 'rolled back': '31', error: '31',
  setup: '2', failed: '31', cancelled: '31', completed: '32',
};

interface Row {
  migration: number; side: string; name: string; phase: string; bytes: number; total: number; rate: number; pending: number | null;
  bar?: cliProgress.SingleBar;
}

export class ProgressDisplay {
  private readonly multi: cliProgress.MultiBar;
  private readonly rows = new Map<string, Row>();
  private readonly total: cliProgress.SingleBar;
  private readonly off: () => void;
  private status = 'setup';
  private readonly width: number;

  constructor(rec: Recorder, private readonly o: ProgressOptions) {
    this.multi = new cliProgress.MultiBar({
      stream: o.stream, format: '{name} {phase} {bar} {pct} {sent} / {of}  {rate}  {left}', barsize: 20, hideCursor: true, fps: 10,
      clearOnComplete: false, stopOnComplete: false, autopadding: true, emptyOnZero: true, linewrap: false, gracefulExit: true,
      barCompleteChar: '#', barIncompleteChar: '.',
    });
    this.width = 12;
    this.total = this.multi.create(1, 0, this.payload({ migration: -1, side: '', name: 'total', phase: 'setup', bytes: 0, total: 0, rate: 0, pending: null }));
    this.off = rec.on((e) => this.onEvent(e));
  }

  private paint(code: string | undefined, s: string): string {
    return this.o.color && code ? `\x1b[${code}m${s}\x1b[0m` : s;
  }

  private payload(r: Row) {
    const left = r.pending ?? Math.max(0, r.total - r.bytes);
    const done = r.total > 0 ? Math.min(100, Math.floor((r.bytes / r.total) * 100)) : 0;
    const eta = r.rate > 0 && left > 0 ? `ETA ${(left / r.rate).toFixed(1)} s` : '';
    const name = (this.o.escape ?? String)(r.name);
    return {
      name: name.length > this.width ? name.slice(0, this.width) : name.padEnd(this.width),
      phase: this.paint(COLOR[r.phase], r.phase.padEnd(11)), pct: `${String(done).padStart(3)}%`,
      sent: fmtBytes(r.bytes).padStart(10), of: fmtBytes(r.total).padEnd(10), rate: fmtRate(r.rate).padStart(12), left: eta,
    };
  }

  private key(e: { migration: number; side: string; device: string }): string { return `${e.migration}/${e.side}/${e.device}`; }

  private row(e: { migration: number; side: string; device: string }): Row {
    const k = this.key(e);
    let r = this.rows.get(k);
    if (!r) {
      r = { migration: e.migration, side: e.side, name: e.device, phase: 'setup', bytes: 0, total: 0, rate: 0, pending: null };
      this.rows.set(k, r);
      const shown = [...this.rows.values()].filter((x) => x.bar).length;
      if (shown < (this.o.maxDeviceLines ?? 16)) r.bar = this.multi.create(1, 0, this.payload(r));
    }
    return r;
  }

  private onEvent(e: OperatorEvent): void {
    if (e.type === 'status') {
      this.status = e.status;
      if (this.o.transient && (e.status === 'completed' || e.status === 'failed' || e.status === 'cancelled')) {
        for (const [k, r] of this.rows) {
          if (r.migration !== e.migration) continue;
          if (r.bar) this.multi.remove(r.bar);
          this.rows.delete(k);
        }
      }
    } else if (e.type === 'device') {
      const r = this.row(e);
      r.phase = PHASE[e.side]?.[e.state] ?? e.state.toLowerCase();
      if (r.phase === 'saved' || r.phase === 'running' || r.phase === 'loaded') { r.pending = 0; r.total = Math.max(r.total, r.bytes); }
      this.draw(r);
    } else if (e.type === 'progress') {
      const r = this.row(e);
      r.bytes = e.bytes;
      if (e.totalBytes !== null) r.total = Math.max(e.totalBytes, e.bytes);
      r.pending = e.pendingBytes;
      // A smoothed rate: samples every ~200 ms jump with chunk timing.
      r.rate = r.rate ? 0.6 * r.rate + 0.4 * e.bytesPerSecond : e.bytesPerSecond;
      this.draw(r);
    } else {
      return;
    }
    this.drawTotal();
  }

  private draw(r: Row): void {
    r.bar?.setTotal(Math.max(1, r.total));
    r.bar?.update(r.bytes, this.payload(r));
  }

  private drawTotal(): void {
    let bytes = 0;
    let total = 0;
    let rate = 0;
    let pending = 0;
    for (const r of this.rows.values()) {
      bytes += r.bytes;
      total += Math.max(r.total, r.bytes);
      pending += r.pending ?? Math.max(0, r.total - r.bytes);
      if (r.phase !== 'saved' && r.phase !== 'running' && r.phase !== 'loaded') rate += r.rate;
    }
    const label = this.o.totalLabel?.() ?? this.status;
    const t: Row = { migration: -1, side: '', name: 'total', phase: label, bytes, total, rate, pending };
    this.total.setTotal(Math.max(1, total));
    this.total.update(bytes, this.payload(t));
  }

  /** A line printed above the live lines. */
  log(line: string): void { this.multi.log(line + '\n'); }

  /** Refresh the total line's label (stress counters) without an engine event. */
  refresh(): void { this.drawTotal(); }

  /** Final redraw, then the lines stay on the terminal above the summary. */
  stop(): void {
    this.drawTotal();
    this.off();
    this.multi.stop();
  }
}
