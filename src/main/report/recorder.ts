// The operator's view of one command: every engine event of every migration (source) and load (destination) it
// ran, normalised into one timeline. The progress display, the --events NDJSON and the HTML report are all built
// from this, so any command that runs Migrations and Loaders (run, save, load, stress, send, receive) gets them by
// attaching its engine objects here.
import type { Migration } from '../engine/migration.js';
import type { Loader } from '../engine/load.js';
import type { LiveEvent } from '../live/events.js';

export type Side = 'source' | 'destination';

interface Base { /** ms since the recorder started */ t: number; /** wall clock, ms since the epoch */ wall: number; migration: number; side: Side }
/** The migration's status changed (QEMU MIGRATION). */
export interface StatusEvent extends Base { type: 'status'; status: string }
/** A pre-copy round ended (QEMU MIGRATION_PASS). */
export interface PassEvent extends Base {
  type: 'pass'; pass: number; pendingBytes: number; bytes: number; ms: number; bytesPerSecond: number;
  devices: { device: string; pendingBytes: number }[];
}
/** A device's migration state changed (QEMU VFIO_MIGRATION). */
export interface DeviceEvent extends Base { type: 'device'; device: string; state: string }
export interface ProgressEvent extends Base {
  type: 'progress'; device: string; phase: string; bytes: number; pendingBytes: number | null; totalBytes: number | null;
  bytesPerSecond: number; sample: boolean;
}
export interface DirtyEvent extends Base { type: 'dirty'; device: string; ms: number; pages: number }
/** A live migration's own event (send/receive: state, channels, switchover, downtime, per-device errors). */
export interface LiveRecEvent extends Base { type: 'live'; event: LiveEvent }
export type OperatorEvent = StatusEvent | PassEvent | DeviceEvent | ProgressEvent | DirtyEvent | LiveRecEvent;
type Payload<E> = E extends OperatorEvent ? Omit<E, 't' | 'wall'> : never;

/** QEMU's MigrationStatus names for the engine's phases. */
const STATUS: Record<string, string> = {
  setup: 'setup', precopy: 'active', stopcopy: 'device', complete: 'device', done: 'completed', failed: 'failed', cancelled: 'cancelled',
};

export class Recorder {
  readonly t0 = performance.now();
  readonly startedAt = new Date();
  readonly events: OperatorEvent[] = [];
  private readonly listeners = new Set<(e: OperatorEvent) => void>();
  private nextId = 0;
  /** Destination loads paired with the migration that produced their stream (end-to-end downtime). */
  readonly pairs = new Map<number, number>();
  /** Keep every event (the HTML report needs them); a long stress run keeps only what the report draws. */
  constructor(private readonly keep: 'all' | 'report' | 'none' = 'all') {}

  on(fn: (e: OperatorEvent) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  private readonly firstStop = new Map<number, number>();
  private readonly lastRunning = new Map<number, number>();

  /**
   * End-to-end downtime of a load whose source this process also ran: from the first source device's stop
   * (stop-and-copy began) to the last destination device running. null when this process did not see both ends.
   */
  downtimeMs(destination: number): number | null {
    const src = this.pairs.get(destination);
    const a = src === undefined ? undefined : this.firstStop.get(src);
    const b = this.lastRunning.get(destination);
    return a === undefined || b === undefined ? null : b - a;
  }

  private push(p: Payload<OperatorEvent>): void {
    const t = performance.now() - this.t0;
    const e = { ...p, t, wall: this.startedAt.getTime() + t } as OperatorEvent;
    if (e.type === 'device' && e.side === 'source' && e.state === 'STOP_COPY' && !this.firstStop.has(e.migration)) this.firstStop.set(e.migration, t);
    if (e.type === 'device' && e.side === 'destination' && e.state === 'RUNNING') this.lastRunning.set(e.migration, t);
    // Samples of a long run are thinned for the report (every event still reaches the listeners).
    if (this.keep === 'all' || (this.keep === 'report' && (e.type !== 'progress' || !e.sample || this.keepSample(e)))) this.events.push(e);
    for (const fn of this.listeners) fn(e);
  }

  private lastKept = new Map<string, number>();
  private keepSample(e: ProgressEvent): boolean {
    const k = `${e.migration}/${e.side}/${e.device}`;
    const last = this.lastKept.get(k) ?? -Infinity;
    if (e.t - last < 250) return false;
    this.lastKept.set(k, e.t);
    return true;
  }

  /**
   * A live endpoint's events (send: source, receive: destination), under a new id; the endpoint's Migration or Loader
   * is then attached with the same id (attachMigration(m, id) / attachLoader(l, source, id)).
   */
  attachLive(side: Side): { migration: number; onEvent: (e: LiveEvent) => void } {
    const migration = this.nextId++;
    return { migration, onEvent: (event) => this.push({ type: 'live', migration, side, event }) };
  }

  /** Record a source-side migration; returns its id in the events (`id`: one attachLive gave). */
  attachMigration(m: Migration, id?: number): number {
    const migration = id ?? this.nextId++;
    const side = 'source' as const;
    const names = m.devices.map((d) => d.name);
    // stopcopy and complete are both QEMU's 'device': one event for the two.
    m.on('phase', (from, to) => { if (STATUS[to] && STATUS[to] !== STATUS[from]) this.push({ type: 'status', migration, side, status: STATUS[to] }); });
    m.on('state', (e) => this.push({ type: 'device', migration, side, device: e.device, state: e.state }));
    m.on('round', (r) => this.push({
      type: 'pass', migration, side, pass: r.round, pendingBytes: r.pendingBefore, bytes: r.bytes, ms: r.ms, bytesPerSecond: r.bandwidth,
      devices: names.map((device, i) => ({ device, pendingBytes: r.devicesPending?.[i] ?? 0 })),
    }));
    m.on('progress', (p) => this.push({
      type: 'progress', migration, side, device: p.device, phase: p.phase, bytes: p.bytes, pendingBytes: p.pending,
      totalBytes: p.bytes + p.pending, bytesPerSecond: p.bytesPerSecond, sample: p.sample,
    }));
    m.on('dirty', (d) => this.push({ type: 'dirty', migration, side, device: d.device, ms: d.ms, pages: d.pages }));
    return migration;
  }

  /** Record a destination-side load; `source`: the migration whose stream it loads, when this process ran both. */
  attachLoader(l: Loader, source?: number, id?: number): number {
    const migration = id ?? this.nextId++;
    if (source !== undefined) this.pairs.set(migration, source);
    const side = 'destination' as const;
    let started = false;
    const total = new Map<string, number>();
    l.on('state', (e) => {
      if (!started) { started = true; this.push({ type: 'status', migration, side, status: 'active' }); }
      const entry = l.table?.devices.find((d) => d.name === e.device);
      if (entry) total.set(e.device, entry.geometry.stateSize);
      this.push({ type: 'device', migration, side, device: e.device, state: e.state });
    });
    l.on('end', (e) => this.loadEnded(migration, e.status));
    l.on('progress', (p) => this.push({
      type: 'progress', migration, side, device: p.device, phase: 'resuming', bytes: p.bytes, pendingBytes: null,
      totalBytes: total.get(p.device) ?? null, bytesPerSecond: p.bytesPerSecond, sample: p.sample,
    }));
    return migration;
  }

  /** A destination load ended. */
  loadEnded(migration: number, status: 'completed' | 'failed' | 'cancelled'): void {
    this.push({ type: 'status', migration, side: 'destination', status });
  }

  get elapsedMs(): number { return performance.now() - this.t0; }
}
