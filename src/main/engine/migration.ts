// The migration state machine (main thread): setup -> pre-copy rounds -> stop-and-copy -> complete, with cancel and
// failure rolling every source device back to RUNNING. Phases and their arcs are data (PHASE_ARCS); every change is
// a trace point and an event.
import { EventEmitter } from 'node:events';
import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';
import { ErrorCode, MigError } from '../errors.js';
import { trace } from '../trace.js';
import type { ContainerWriter } from '../container/writer.js';
import type { DeviceTable, EndRecord } from '../container/format.js';
import type { DeviceTransport } from '../transport/transport.js';
import { DirtyTracker } from './dirty.js';
import { keepAlive, type EnginePool } from './pool.js';
import { RateLimiter } from './rate.js';
import { SourceDevice, type DeviceStats } from './source-device.js';

export type MigrationPhase = 'idle' | 'setup' | 'precopy' | 'stopcopy' | 'complete' | 'done' | 'failed' | 'cancelled';

/** Allowed phase arcs: [from] -> to[]. */
export const PHASE_ARCS: Record<MigrationPhase, MigrationPhase[]> = {
  idle: ['setup'],
  setup: ['precopy', 'failed', 'cancelled'],
  precopy: ['stopcopy', 'failed', 'cancelled'],
  stopcopy: ['complete', 'failed', 'cancelled'],
  complete: ['done', 'failed', 'cancelled'],
  done: [],
  failed: [],
  cancelled: [],
};

export interface MigrationOptions {
  /** Stop pre-copy when the total pending fits this downtime at the measured bandwidth. */
  downtimeLimitMs?: number;
  maxRounds?: number;
  /** Optional cap on stream bandwidth, bytes/s. */
  bandwidthCap?: number;
  /** Dirty-bitmap query period during pre-copy (0: only at round boundaries). */
  dirtyQueryIntervalMs?: number;
  signal?: AbortSignal;
  /** Bounds for a vendor that never drains. */
  maxEmptyChunks?: number;
  maxNoProgress?: number;
  /** Compute each source device's final digest into the END record (emulated devices). */
  digests?: boolean;
  /** Worker lanes per device when the sink takes positioned writes (default 1). */
  lanesPerDevice?: number;
  /** Test only. */
  testExitAfterChunks?: { device: number; chunks: number };
}

export interface RoundStats { round: number; pendingBefore: number; bytes: number; ms: number; bandwidth: number }

export interface MigrationReport {
  ok: boolean;
  phase: MigrationPhase;
  devices: DeviceStats[];
  rounds: RoundStats[];
  precopyBytes: number;
  stopCopyBytes: number;
  stopCopyMs: number;
  totalMs: number;
  streamBytes: number;
  throughputMBps: number;
  dirty: { queries: number; latencyMs: ReturnType<DirtyTracker['latencyMs']['summary']>; lockWaitMs: ReturnType<DirtyTracker['latencyMs']['summary']>; pages: number[] };
  /** Main-thread responsiveness during the migration (perf_hooks.monitorEventLoopDelay). */
  eventLoopDelayMs: { p50: number; p99: number; max: number };
  error?: Record<string, unknown>;
  rollback?: string[];
}

export interface MigrationEvents {
  phase: [MigrationPhase, MigrationPhase];
  round: [RoundStats & { pendingAfter: number }];
  /** After each device's pre-copy round and its stop-and-copy: cumulative data bytes, pending, and its rate. */
  progress: [{ device: string; phase: 'precopy' | 'stopcopy'; bytes: number; pending: number; throughputMBps: number }];
}

export class Migration extends EventEmitter<MigrationEvents> {
  phase: MigrationPhase = 'idle';
  readonly devices: SourceDevice[];
  readonly dirty: DirtyTracker;
  private readonly o: Required<Omit<MigrationOptions, 'signal' | 'bandwidthCap' | 'testExitAfterChunks' | 'lanesPerDevice'>> & MigrationOptions;
  private cancelled = false;
  private rounds: RoundStats[] = [];
  private eld: IntervalHistogram = monitorEventLoopDelay({ resolution: 1 });

  constructor(transports: DeviceTransport[], private readonly pool: EnginePool, private readonly writer: ContainerWriter,
    opts: MigrationOptions = {}) {
    super();
    this.o = {
      downtimeLimitMs: 300, maxRounds: 30, dirtyQueryIntervalMs: 50, maxEmptyChunks: 64, maxNoProgress: 256, digests: true,
      ...opts,
    };
    if (transports.length === 0) throw new MigError(ErrorCode.BAD_ARGUMENT, 'a migration needs at least one device');
    if (!(this.o.downtimeLimitMs >= 0)) throw new MigError(ErrorCode.BAD_ARGUMENT, `downtime limit ${this.o.downtimeLimitMs} ms is invalid`);
    if (!Number.isInteger(this.o.maxRounds) || this.o.maxRounds < 0) throw new MigError(ErrorCode.BAD_ARGUMENT, `max rounds ${this.o.maxRounds} is invalid`);
    const limiter = this.o.bandwidthCap ? new RateLimiter(this.o.bandwidthCap) : undefined;
    // Extra lanes per device share one device's chunks between workers; measured no faster here (PERFORMANCE.md).
    const lanes = this.o.lanesPerDevice ?? 1;
    this.devices = transports.map((t, i) => new SourceDevice(i, t, pool, writer, {
      lanes, maxEmptyChunks: this.o.maxEmptyChunks, maxNoProgress: this.o.maxNoProgress,
      testExitAfterChunks: this.o.testExitAfterChunks?.device === i ? this.o.testExitAfterChunks.chunks : undefined,
    }, limiter));
    this.dirty = new DirtyTracker(this.devices);
  }

  private to(next: MigrationPhase): void {
    if (!PHASE_ARCS[this.phase].includes(next)) {
      throw new MigError(ErrorCode.BAD_STATE, `migration cannot go from ${this.phase} to ${next}`);
    }
    trace('migration_phase', { from: this.phase, to: next });
    const prev = this.phase;
    this.phase = next;
    this.emit('phase', prev, next);
  }

  private checkCancel(): void {
    if (this.cancelled || this.o.signal?.aborted) {
      this.cancelled = true;
      throw new MigError(ErrorCode.CANCELLED, 'migration cancelled');
    }
  }

  deviceTable(): DeviceTable {
    return {
      version: 1,
      devices: this.devices.map((d) => ({
        index: d.index, name: d.name, profile: d.transport.profile.name, transport: d.transport.kind, geometry: d.transport.geometry(),
      })),
    };
  }

  async run(): Promise<MigrationReport> {
    const t0 = performance.now();
    const onAbort = () => { this.cancelled = true; for (const d of this.devices) d.abort(); };
    this.eld.reset();
    this.eld.enable();
    const release = keepAlive();
    this.o.signal?.addEventListener('abort', onAbort, { once: true });
    let dirtyLoop: Promise<void> | undefined;
    let stopDirty = false;
    try {
      this.checkCancel();
      this.to('setup');
      await this.writer.begin(this.deviceTable());
      await this.onAll((d) => d.setup());
      this.dirty.start();
      this.to('precopy');
      if (this.o.dirtyQueryIntervalMs > 0) {
        dirtyLoop = (async () => {
          while (!stopDirty) {
            await new Promise((r) => setTimeout(r, this.o.dirtyQueryIntervalMs));
            if (!stopDirty) await this.dirty.queryAll();
          }
        })();
      }
      await this.precopy();
      stopDirty = true;
      await dirtyLoop;
      dirtyLoop = undefined;
      this.checkCancel();
      this.to('stopcopy');
      const s0 = performance.now();
      await this.onAll(async (d) => {
        await d.complete();
        this.emit('progress', {
          device: d.name, phase: 'stopcopy', bytes: d.stats.precopyBytes + d.stats.stopCopyBytes, pending: 0,
          throughputMBps: d.stats.stopCopyBytes / 1e3 / Math.max(d.stats.stopCopyMs, 0.001),
        });
      });
      await this.dirty.queryAll(); // final dirty set, devices stopped
      for (const d of this.devices) await d.saveState();
      const stopCopyMs = performance.now() - s0;
      this.to('complete');
      const end: EndRecord = { devices: [] };
      for (const d of this.devices) {
        d.stats.digest = this.o.digests ? await this.digest(d) : '';
        end.devices.push({
          index: d.index, name: d.name, finalState: d.stats.finalState ?? '', digest: d.stats.digest,
          streamBytes: d.shared.streamBytes, records: d.shared.records,
        });
      }
      await this.writer.end(end);
      await this.writer.sink.close();
      this.dirty.stop();
      this.to('done');
      return this.report(true, t0, stopCopyMs);
    } catch (e) {
      stopDirty = true;
      const err = e instanceof MigError ? e
        : new MigError(ErrorCode.WORKER_FAILED, (e as Error)?.message ?? String(e), { cause: e });
      const cancelled = this.cancelled || err.code === ErrorCode.CANCELLED;
      const final = cancelled ? 'cancelled' : 'failed';
      trace('migration_failed', { code: err.code, message: err.message });
      for (const d of this.devices) d.abort();
      await dirtyLoop?.catch(() => undefined);
      const rollback: string[] = [];
      for (const d of this.devices) rollback.push(`${d.name}: ${await d.rollback()}`);
      this.dirty.stop();
      try {
        await this.writer.abort({ code: err.code, message: err.message, device: err.device });
        await this.writer.sink.close();
      } catch { /* the sink itself may be what failed */ }
      if (PHASE_ARCS[this.phase].includes(final)) this.to(final);
      const rep = this.report(false, t0, 0);
      rep.error = err.toJSON();
      rep.rollback = rollback;
      Object.assign(err, { report: rep });
      throw err;
    } finally {
      release();
      this.eld.disable();
      this.o.signal?.removeEventListener('abort', onAbort);
    }
  }

  /**
   * Run a phase on every device. The first failure aborts the others' data tasks, and this returns only when every
   * device's operation has settled: rollback must never race a device still finishing its phase (which would then
   * stop a device that rollback had just returned to RUNNING). The first real error wins over the CANCELLED errors
   * it caused.
   */
  private async onAll<T>(fn: (d: SourceDevice) => Promise<T>): Promise<T[]> {
    let first: unknown;
    const rs = await Promise.allSettled(this.devices.map((d) => fn(d).catch((e) => {
      if (first === undefined) {
        first = e;
        for (const x of this.devices) x.abort();
      }
      throw e;
    })));
    if (first !== undefined) throw first;
    return rs.map((r) => (r as PromiseFulfilledResult<T>).value);
  }

  private async precopy(): Promise<void> {
    let bandwidth = 0; // bytes/ms measured so far
    for (let round = 1; ; round++) {
      this.checkCancel();
      const pend = await this.onAll((d) => d.pending());
      const total = pend.reduce((a, b) => a + b, 0);
      if (total === 0) return;
      if (round > this.o.maxRounds) return;
      if (bandwidth > 0 && total <= bandwidth * this.o.downtimeLimitMs) return;
      const r0 = performance.now();
      const res = await this.onAll(async (d) => {
        const t = performance.now();
        const r = await d.iterate(pend[d.index]);
        this.emit('progress', {
          device: d.name, phase: 'precopy', bytes: d.stats.precopyBytes, pending: r.pending,
          throughputMBps: r.bytes / 1e3 / Math.max(performance.now() - t, 0.001),
        });
        return r;
      });
      const ms = performance.now() - r0;
      const bytes = res.reduce((a, r) => a + r.bytes, 0);
      bandwidth = bytes / Math.max(ms, 0.001);
      const rs: RoundStats = { round, pendingBefore: total, bytes, ms, bandwidth: bandwidth * 1000 };
      this.rounds.push(rs);
      this.emit('round', { ...rs, pendingAfter: res.reduce((a, r) => a + r.pending, 0) });
      trace('migration_round', { round, pending: total, bytes, ms: ms.toFixed(1) });
      if (this.o.dirtyQueryIntervalMs === 0) await this.dirty.queryAll();
    }
  }

  private async digest(d: SourceDevice): Promise<string> {
    const t = d.transport.digestTarget();
    if (!t) return '';
    return this.pool.digest({ op: 'digest', id: t.id, stateSize: t.stateSize });
  }

  private report(ok: boolean, t0: number, stopCopyMs: number): MigrationReport {
    const totalMs = performance.now() - t0;
    const precopyBytes = this.devices.reduce((a, d) => a + d.stats.precopyBytes, 0);
    const stopCopyBytes = this.devices.reduce((a, d) => a + d.stats.stopCopyBytes, 0);
    return {
      ok, phase: this.phase, devices: this.devices.map((d) => ({ ...d.stats })), rounds: this.rounds, precopyBytes, stopCopyBytes,
      stopCopyMs, totalMs, streamBytes: this.writer.sink.bytes,
      throughputMBps: (precopyBytes + stopCopyBytes) / 1e6 / (totalMs / 1000),
      dirty: {
        queries: this.dirty.queries, latencyMs: this.dirty.latencyMs.summary(), lockWaitMs: this.dirty.lockWaitMs.summary(),
        pages: this.devices.map((d) => this.dirty.count(d.index)),
      },
      eventLoopDelayMs: {
        p50: this.eld.count ? this.eld.percentile(50) / 1e6 : 0, p99: this.eld.count ? this.eld.percentile(99) / 1e6 : 0,
        max: this.eld.count ? this.eld.max / 1e6 : 0,
      },
    };
  }
}
