// The migration state machine (main thread): setup -> pre-copy rounds -> stop-and-copy -> complete, with cancel and
// failure rolling every source device back to RUNNING. Phases and their arcs are data (PHASE_ARCS); every change is
// a trace point and an event.
import { EventEmitter } from 'node:events';
import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';
import { ErrorCode, MigError, abortError, toMigError } from '../errors.js';
import { trace } from '../trace.js';
import type { ContainerWriter } from '../container/writer.js';
import type { DeviceGeometry, DeviceTable, EndRecord } from '../container/format.js';
import { digestTask } from '../transport/transport.js';
import { DirtyTracker } from './dirty.js';
import type { LatencySummary } from './histogram.js';
import { testHooks } from './test-hooks.js';
import { Estimate, addDirtyTracking, admit, memoryBudget } from './budget.js';
import { keepAlive, type EnginePool } from './pool.js';
import { RateLimiter } from './rate.js';
import { DEFAULT_STAGING_CHUNK, RollbackOutcome, SourceDevice, type DeviceStats, type EngineDevice, type RollbackResult, type VendorAnomaly } from './source-device.js';
import { DeviceClaims } from './claims.js';
import { asMigDevice } from '../protocol/v1/device.js';
import type { VendorMode } from '../../workers/tasks.js';
import type { TrappedAccess } from '../protocol/migration-region.js';
import type { ConfigHooks } from './config-hook.js';

export type StopCopyOrder = 'parallel' | 'sequential';
export const STOP_COPY_ORDERS: readonly StopCopyOrder[] = ['parallel', 'sequential'];

export type MigrationPhase = 'idle' | 'setup' | 'precopy' | 'stopcopy' | 'complete' | 'done' | 'failed' | 'cancelled';

/** Allowed phase arcs: [from] -> to[]. */
export const PHASE_ARCS: Record<MigrationPhase, MigrationPhase[]> = {
  idle: ['setup', 'failed'],
  setup: ['precopy', 'failed', 'cancelled'],
  precopy: ['stopcopy', 'failed', 'cancelled'],
  stopcopy: ['complete', 'failed', 'cancelled'],
  complete: ['done', 'failed', 'cancelled'],
  done: [],
  failed: [],
  cancelled: [],
};

/**
 * switchover-ack: the migration stops no device until `ready()`. It is asked only once pre-copy would switch over;
 * `initialSent` says every PRE_COPY device's DEV_INIT_DATA_SENT is out (or pre-copy ran past maxRounds), i.e. only the
 * destination can still hold the switchover back. `wait(ms)` resolves when ready or after ms.
 */
export interface SwitchoverGate { ready(initialSent: boolean): boolean; wait(ms: number): Promise<void> }

export interface MigrationOptions {
  /** Stop pre-copy when the total pending fits this downtime at the measured bandwidth. */
  downtimeLimitMs?: number;
  maxRounds?: number;
  /** Optional cap on stream bandwidth, bytes/s. */
  bandwidthCap?: number;
  /** Dirty-bitmap query period during pre-copy (0: only at round boundaries). */
  dirtyQueryIntervalMs?: number;
  signal?: AbortSignal;
  /**
   * How vendor hints that turn out wrong are treated (docs/VENDOR-MODES.md). `compatible` (default; QEMU's
   * behaviour): a chunk with data_size 0 while pending_bytes > 0 ends the pre-copy round ([DATA][0][END]) or the
   * stop-and-copy drain, and becomes a `vendor` event and a report line. `strict` (driver testing): such chunks are
   * retried and too many in a row fail with VFM_VENDOR_STUCK.
   */
  vendorMode?: VendorMode;
  /**
   * Trapped data access of v1 devices (docs/CONFIG.md): `bulk` (default) one pread/pwrite per trapped piece;
   * `aligned` QEMU's naturally aligned 8/4/2/1-byte accesses, for drivers only ever driven by QEMU.
   */
  trappedAccess?: TrappedAccess;
  /**
   * Config space save as an embedder hook (docs/CONFIG.md): `config.save(device)` returns the bytes to carry in the
   * device's CONFIG section (a VMM's own PCI config / MSI-X state, as QEMU's vmstate_vfio_pci_config), or undefined
   * for the reach's default. Called on the main thread after stop-and-copy; may be async.
   */
  config?: ConfigHooks;
  /** Bounds of one pre-copy round per device, whatever pending_bytes says (default 2 GiB, 2000 ms). */
  roundBytes?: number;
  roundTimeMs?: number;
  /**
   * Switchover is allowed only once `ready()` (a live destination's switchover-ack): pre-copy goes on until then.
   * `wait(ms)` resolves when ready or after ms.
   */
  switchoverGate?: SwitchoverGate;
  /** strict mode: empty chunks in a row tolerated in a pre-copy round (default 64) and in stop-and-copy (default 256). */
  maxEmptyChunks?: number;
  maxNoProgress?: number;
  /**
   * A data fd that gives no data in STOP_COPY (and no end of stream) for this long fails with VFM_VENDOR_STUCK
   * naming the device (default 30000 ms; a PRE_COPY fd with nothing to give is "nothing more for now").
   */
  vendorStallMs?: number;
  /**
   * How the stop-and-copy data of several devices is saved. `parallel` (default; QEMU 10's multifd device state
   * transfer): every device drains at once, each through its own worker (and, live, its own channel). `sequential`
   * (QEMU's legacy save order): every device stops at once, then one device after another is drained whole, so the
   * destination (or the link) takes one device's state at a time: one device's staging and CPU instead of N, and each
   * device's final state contiguous in a stream file.
   */
  stopCopyOrder?: StopCopyOrder;
  /** Compute each source device's final digest into the END record (emulated devices). */
  digests?: boolean;
  /** Worker lanes per device when the sink takes positioned writes (default 1). */
  lanesPerDevice?: number;
  /** Migrate several devices even if some v2 device cannot be quiesced to P2P first (QEMU refuses that). */
  allowWithoutP2P?: boolean;
  /** Period of the sampled `progress` events while a round or the stop-and-copy runs (default 200 ms; 0: off). */
  progressIntervalMs?: number;
  /**
   * Largest vendor chunk the engine stages, bytes (default: the chunk size the device declares, else 1 MiB). Staging
   * never follows the region size a vendor advertises; a vendor staging more fails with VFM_VENDOR_BAD_VALUE.
   */
  stagingChunk?: number;
  /**
   * Refuse (VFM_OVER_BUDGET) a migration whose engine memory (dirty-page bitmaps, staging) exceeds this many bytes
   * (default: half of the memory available now). run / save / load check their devices against it too.
   */
  memoryBudget?: number;
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
  dirty: { queries: number; latencyMs: LatencySummary; lockWaitMs: LatencySummary; pages: number[] };
  /** Main-thread responsiveness during the migration (perf_hooks.monitorEventLoopDelay). */
  eventLoopDelayMs: { p50: number; p99: number; max: number };
  /** Vendor behaviour tolerated in compatible mode (or retried in strict mode), one entry per device and kind. */
  anomalies: VendorAnomaly[];
  error?: Record<string, unknown>;
  /** Per source device after a failure or cancel: how rollback ended (`deferred` while a vendor call is in progress). */
  rollback?: RollbackResult[];
  /** Devices whose rollback waits for a vendor call to return; `Migration.settled` resolves when they are done. */
  rollbackPending?: string[];
}

/** One device's progress: cumulative data bytes sent, the vendor's pending bytes (estimated between reads). */
export interface MigrationProgress {
  device: string;
  index: number;
  phase: 'precopy' | 'stopcopy';
  bytes: number;
  pending: number;
  /** Rate since the previous event of this device (a round's rate at a round's end). */
  bytesPerSecond: number;
  /** true: sampled while a round or the stop-and-copy runs; false: at the end of a device's round or stop-and-copy. */
  sample: boolean;
}

/** A device's migration state changed (the v1 device_state the engine just set, QEMU's VFIO_MIGRATION). */
export interface DeviceStateEvent { device: string; index: number; state: string }

/** One dirty-bitmap query: its latency and the pages it newly found. */
export interface DirtyQueryEvent { device: string; index: number; ms: number; pages: number }

export interface MigrationEvents {
  phase: [MigrationPhase, MigrationPhase];
  /** A pre-copy round ended; devicesPending: each device's pending_bytes when the round started. */
  round: [RoundStats & { pendingAfter: number; devicesPending: number[] }];
  progress: [MigrationProgress];
  state: [DeviceStateEvent];
  dirty: [DirtyQueryEvent];
  /** A vendor anomaly (see MigrationOptions.vendorMode). */
  vendor: [VendorAnomaly];
  /** A rollback that waited for a vendor call (report.rollbackPending) is done: the device's final outcome. */
  rollback: [RollbackResult & { index: number }];
}

/** Like QEMU's query-migrate, for one migration; every time in ms, every size in bytes. */
export interface MigrationStatus {
  /** QEMU's names: setup, active (pre-copy), device (stop-and-copy), completed, failed, cancelled; none before run(). */
  status: 'none' | 'setup' | 'active' | 'device' | 'completed' | 'failed' | 'cancelled';
  totalTimeMs: number;
  setupTimeMs: number;
  /** Pending bytes at the measured bandwidth: what the stop-and-copy would take now. */
  expectedDowntimeMs: number;
  /** Source stop-and-copy time (devices stopped until all were drained); not end to end, so not called downtime. */
  stopCopyMs: number;
  transferredBytes: number;
  remainingBytes: number;
  bytesPerSecond: number;
  /** Guest pages newly reported dirty per second (all devices, since pre-copy began). */
  dirtyPagesRate: number;
  rounds: number;
  devices: { name: string; phase: string; state: string; transferredBytes: number; remainingBytes: number; rounds: number; stopCopyMs: number }[];
}

export class Migration extends EventEmitter<MigrationEvents> {
  phase: MigrationPhase = 'idle';
  readonly devices: SourceDevice[];
  readonly dirty: DirtyTracker;
  private readonly o: Required<Omit<MigrationOptions, 'signal' | 'switchoverGate' | 'bandwidthCap' | 'lanesPerDevice' | 'stagingChunk' | 'vendorStallMs' | 'memoryBudget' | 'allowWithoutP2P' | 'trappedAccess' | 'config'>> & MigrationOptions;
  private cancelled = false;
  private rounds: RoundStats[] = [];
  private anomalies: VendorAnomaly[] = [];
  private readonly claims = new DeviceClaims('migration');
  private eld: IntervalHistogram = monitorEventLoopDelay({ resolution: 1 });
  private times = { start: 0, precopy: 0, stopcopy: 0, end: 0 };
  private bandwidth = 0; // bytes/ms, last round
  private stopMs = 0;
  private dirtyPages = 0;
  private readonly deviceState: string[];
  private readonly lastSample: { bytes: number; at: number }[];
  /** Aborted on cancel or failure: main-thread waits for a region lock end (a stalled vendor call may hold it). */
  private readonly stopWaits = new AbortController();
  private settledP: Promise<RollbackResult[]> = Promise.resolve([]);

  /**
   * Resolves when nothing of this migration runs any more: after a cancel or failure, once every worker has left
   * its vendor call, every deferred rollback is done and the stream is closed. Its value: each device's final
   * rollback outcome (empty after a success). run() itself settles without waiting for a stalled vendor.
   */
  get settled(): Promise<RollbackResult[]> { return this.settledP; }

  constructor(given: EngineDevice[], private readonly pool: EnginePool, private readonly writer: ContainerWriter,
    opts: MigrationOptions = {}) {
    super();
    this.o = {
      downtimeLimitMs: 300, maxRounds: 30, dirtyQueryIntervalMs: 50, maxEmptyChunks: 64, maxNoProgress: 256, digests: true, progressIntervalMs: 200,
      vendorMode: 'compatible', roundBytes: 2 ** 31, roundTimeMs: 2000, stopCopyOrder: 'parallel',
      ...opts,
    };
    if (!Array.isArray(given) || given.length === 0) throw new MigError(ErrorCode.BAD_ARGUMENT, 'a migration needs at least one device');
    // The edge: a v1 transport as embedders passed before the seam becomes its V1Device; from here on, one path.
    const transports = given.map(asMigDevice);
    // QEMU (vfio_multiple_devices_migration_is_supported): several devices migrate together only if each can be
    // quiesced to P2P first, unless the user allows it. v1 predates P2P, and QEMU's v1 never asked: v2 devices only.
    const noP2P = transports.filter((d) => d.caps.protocol === 'v2' && !d.caps.p2p);
    if (transports.length > 1 && noP2P.length && !opts.allowWithoutP2P) {
      throw new MigError(ErrorCode.BAD_ARGUMENT,
        `multi-device migration needs P2P on every v2 device (${noP2P.map((d) => d!.name).join(', ')} lacks it): pass allowWithoutP2P (--allow-no-p2p) to migrate anyway`,
        { device: noP2P[0]!.name });
    }
    if (!(this.o.downtimeLimitMs >= 0)) throw new MigError(ErrorCode.BAD_ARGUMENT, `downtime limit ${this.o.downtimeLimitMs} ms is invalid`);
    if (!Number.isInteger(this.o.maxRounds) || this.o.maxRounds < 0) throw new MigError(ErrorCode.BAD_ARGUMENT, `max rounds ${this.o.maxRounds} is invalid`);
    if (this.o.stopCopyOrder !== undefined && !STOP_COPY_ORDERS.includes(this.o.stopCopyOrder)) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `stop-copy order '${String(this.o.stopCopyOrder)}' is not parallel or sequential`);
    }
    if (this.o.vendorMode !== 'compatible' && this.o.vendorMode !== 'strict') {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `vendor mode '${String(this.o.vendorMode)}' is not compatible or strict`);
    }
    for (const k of ['roundBytes', 'roundTimeMs', 'maxEmptyChunks', 'maxNoProgress'] as const) {
      if (!Number.isSafeInteger(this.o[k]) || this.o[k] < 1) throw new MigError(ErrorCode.BAD_ARGUMENT, `${k} ${this.o[k]} must be a positive integer`);
    }
    // Admission: what this migration allocates itself (the devices exist already; the caller admitted them).
    const cost = new Estimate();
    addDirtyTracking(cost, transports.map((t) => t.dirtyLog?.pages ?? 0));
    cost.add('save staging', pool.threads * pool.rings.nslots * Math.ceil((128 + Math.min(this.o.stagingChunk ?? DEFAULT_STAGING_CHUNK, 256 << 20)) / 4096) * 4096);
    admit(cost, memoryBudget(this.o.memoryBudget), `a migration of ${transports.length} device(s)`, 'options');
    const limiter = this.o.bandwidthCap ? new RateLimiter(this.o.bandwidthCap) : undefined;
    // Extra lanes per device share one device's chunks between workers; measured no faster here (PERFORMANCE.md).
    const lanes = this.o.lanesPerDevice ?? 1;
    const onAnomaly = (a: VendorAnomaly) => { this.anomalies.push(a); this.emit('vendor', a); };
    const exitAfter = testHooks(opts)?.exitAfterChunks;
    this.devices = transports.map((t, i) => new SourceDevice(i, t, pool, writer, {
      lanes, vendorMode: this.o.vendorMode, trappedAccess: this.o.trappedAccess, config: this.o.config, roundBytes: this.o.roundBytes, roundTimeMs: this.o.roundTimeMs,
      maxEmptyChunks: this.o.maxEmptyChunks, maxNoProgress: this.o.maxNoProgress, vendorStallMs: this.o.vendorStallMs, stagingChunk: this.o.stagingChunk,
      testExitAfterChunks: exitAfter?.device === i ? exitAfter.chunks : undefined,
      onState: (state) => { this.deviceState[i] = state; this.emit('state', { device: t.name, index: i, state }); },
      onAnomaly,
    }, limiter));
    this.deviceState = transports.map(() => 'RUNNING');
    this.lastSample = transports.map(() => ({ bytes: 0, at: 0 }));
    this.dirty = new DirtyTracker(this.devices, (d, ms, pages) => {
      this.dirtyPages += pages;
      this.emit('dirty', { device: d.name, index: d.index, ms, pages });
    });
  }

  /** A progress event for one device; samples never go backwards (a phase's bytes move into stats when it ends). */
  private progress(d: SourceDevice, sample: boolean, rate?: number): void {
    const last = this.lastSample[d.index];
    const bytes = Math.max(d.liveBytes, sample ? last.bytes : 0);
    const at = performance.now();
    if (sample && bytes === last.bytes) return; // nothing moved: no event
    const bytesPerSecond = rate ?? ((bytes - last.bytes) * 1000) / Math.max(at - (last.at || this.times.precopy), 0.001);
    this.lastSample[d.index] = { bytes, at };
    this.emit('progress', {
      device: d.name, index: d.index, phase: d.phase === 'stopcopy' || d.phase === 'saved' ? 'stopcopy' : 'precopy', bytes,
      pending: d.livePending, bytesPerSecond, sample,
    });
  }

  /** query-migrate for this migration, at any time. */
  status(): MigrationStatus {
    const now = performance.now();
    const t = this.times;
    const map: Record<MigrationPhase, MigrationStatus['status']> = {
      idle: 'none', setup: 'setup', precopy: 'active', stopcopy: 'device', complete: 'device', done: 'completed', failed: 'failed', cancelled: 'cancelled',
    };
    const remaining = this.devices.reduce((a, d) => a + d.livePending, 0);
    const transferred = this.devices.reduce((a, d) => a + d.liveBytes, 0);
    const end = t.end || now;
    const since = t.precopy ? end - t.precopy : 0;
    return {
      status: map[this.phase], totalTimeMs: t.start ? end - t.start : 0, setupTimeMs: t.precopy ? t.precopy - t.start : t.start ? end - t.start : 0,
      expectedDowntimeMs: this.bandwidth > 0 ? remaining / this.bandwidth : 0,
      stopCopyMs: this.phase === 'stopcopy' ? now - t.stopcopy : this.stopMs,
      transferredBytes: transferred, remainingBytes: remaining,
      bytesPerSecond: t.precopy && since > 0 ? (transferred * 1000) / since : 0,
      dirtyPagesRate: since > 0 ? (this.dirtyPages * 1000) / since : 0,
      rounds: this.rounds.length,
      devices: this.devices.map((d) => ({
        name: d.name, phase: d.phase, state: this.deviceState[d.index], transferredBytes: d.liveBytes, remainingBytes: d.livePending,
        rounds: d.stats.rounds, stopCopyMs: d.stats.stopCopyMs,
      })),
    };
  }

  private to(next: MigrationPhase): void {
    if (!PHASE_ARCS[this.phase].includes(next)) {
      throw new MigError(ErrorCode.BAD_STATE, `migration cannot go from ${this.phase} to ${next}`);
    }
    trace('migration_phase', { from: this.phase, to: next });
    const prev = this.phase;
    this.phase = next;
    const now = performance.now();
    if (next === 'precopy') this.times.precopy = now;
    if (next === 'stopcopy') this.times.stopcopy = now;
    if (next === 'done' || next === 'failed' || next === 'cancelled') this.times.end = now;
    this.emit('phase', prev, next);
  }

  private checkCancel(): void {
    if (this.cancelled || this.o.signal?.aborted) {
      this.cancelled = true;
      throw abortError(this.o.signal, 'migration cancelled');
    }
  }

  deviceTable(): DeviceTable {
    return {
      version: 1,
      devices: this.devices.map((d) => ({
        index: d.index, name: d.name, profile: d.dev.caps.protocol, transport: d.dev.caps.reach, geometry: tableGeometry(d),
      })),
    };
  }

  async run(): Promise<MigrationReport> {
    const t0 = performance.now();
    this.times.start = t0;
    const onAbort = () => { this.cancelled = true; for (const d of this.devices) d.abort(); this.stopWaits.abort(); };
    this.eld.reset();
    this.eld.enable();
    const release = keepAlive();
    this.o.signal?.addEventListener('abort', onAbort, { once: true });
    let dirtyLoop: Promise<void> | undefined;
    let dirtyError: unknown;
    let deferClaims = false;
    let stopDirty = false;
    const every = this.o.progressIntervalMs;
    const sampler = every > 0 ? setInterval(() => {
      for (const d of this.devices) if (d.phase === 'precopy' || d.phase === 'stopcopy') this.progress(d, true);
    }, every) : undefined;
    sampler?.unref();
    try {
      // All devices or none, before any is touched: a refused migration never rolls back devices it did not take.
      this.claims.claim(this.devices.map((d) => d.dev));
    } catch (e) {
      clearInterval(sampler);
      release();
      this.eld.disable();
      this.o.signal?.removeEventListener('abort', onAbort);
      try { await this.writer.sink.close(); } catch { /* nothing was written */ }
      this.to('failed');
      throw e;
    }
    try {
      this.checkCancel();
      this.to('setup');
      await this.writer.begin(this.deviceTable());
      await this.onAll((d) => d.setup());
      await this.dirty.start();
      this.to('precopy');
      if (this.o.dirtyQueryIntervalMs > 0) {
        dirtyLoop = (async () => {
          while (!stopDirty) {
            await new Promise((r) => setTimeout(r, this.o.dirtyQueryIntervalMs));
            if (!stopDirty) await this.dirty.queryAll(this.stopWaits.signal);
          }
        })();
        // A failed query fails the migration now (not an unhandled rejection): the devices stop, and the query's
        // error is the one reported.
        dirtyLoop.catch((qe) => { dirtyError = qe; for (const d of this.devices) d.abort(); });
      }
      await this.precopy();
      stopDirty = true;
      await dirtyLoop;
      dirtyLoop = undefined;
      this.checkCancel();
      this.to('stopcopy');
      const s0 = performance.now();
      // Every P2P-capable device stops peer-to-peer DMA before any device enters STOP_COPY (QEMU's prepare step).
      await this.onAll((d) => d.quiesce());
      const drained = (d: SourceDevice) => this.progress(d, false, (d.stats.stopCopyBytes * 1000) / Math.max(d.stats.stopCopyMs, 0.001));
      if (this.o.stopCopyOrder === 'sequential') {
        // QEMU's legacy order: vm_stop stops every device, then each one's state is saved whole, in table order.
        await this.onAll((d) => d.stop());
        for (const d of this.devices) {
          this.checkCancel();
          await d.complete();
          drained(d);
        }
      } else {
        await this.onAll(async (d) => { await d.complete(); drained(d); });
      }
      await this.dirty.queryAll(this.stopWaits.signal); // final dirty set, devices stopped
      for (const d of this.devices) await d.saveState();
      const stopCopyMs = performance.now() - s0;
      this.stopMs = stopCopyMs;
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
      await this.dirty.stop();
      this.to('done');
      return this.report(true, t0, stopCopyMs);
    } catch (e) {
      stopDirty = true;
      const first = dirtyError !== undefined && (e as MigError)?.code === ErrorCode.CANCELLED ? dirtyError : e;
      let err = toMigError(first);
      const cancelled = this.cancelled || err.code === ErrorCode.CANCELLED;
      // Cancelled by the caller's signal (not by another device's failure): an AbortError carrying the reason.
      if (this.o.signal?.aborted && err.code === ErrorCode.CANCELLED && err.name !== 'AbortError') {
        err = abortError(this.o.signal, err.message);
      }
      const final = cancelled ? 'cancelled' : 'failed';
      trace('migration_failed', { code: err.code, message: err.message });
      for (const d of this.devices) d.abort();
      this.stopWaits.abort();
      await dirtyLoop?.catch(() => undefined);
      // Every device at once: one whose worker is stuck in a vendor call is deferred, not waited for.
      const rollback: RollbackResult[] = await Promise.all(this.devices.map((d) => d.rollback()));
      const pending = this.devices.filter((d) => d.deferredRollback);
      await this.dirty.stop();
      try {
        // A cancel whose reason is a MigError (a live sender aborting on its own timeout) records that reason.
        const why = err.name === 'AbortError' && err.cause instanceof MigError && err.cause.code !== ErrorCode.CANCELLED ? err.cause : err;
        await this.writer.abort({ code: why.code, message: why.message, device: why.device });
      } catch { /* the sink itself may be what failed */ }
      // The stream closes once no worker can write to it any more (a stalled one stops right after its vendor call).
      const closed = Promise.all(this.devices.map((d) => d.stopped)).then(() => this.writer.sink.close()).catch(() => undefined);
      if (pending.length) {
        deferClaims = true; // a deferred rollback still touches its device: the claims last until settled
        const keep = keepAlive();
        this.settledP = Promise.all([closed, ...this.devices.map(async (d, i) => {
          if (!d.deferredRollback) return rollback[i];
          const r = await d.deferredRollback;
          this.emit('rollback', { ...r, index: d.index });
          return r;
        })]).then(([, ...rs]) => rs as RollbackResult[]).finally(() => { this.claims.release(); keep(); });
      } else {
        await closed;
        this.settledP = Promise.resolve(rollback);
      }
      if (PHASE_ARCS[this.phase].includes(final)) this.to(final);
      const rep = this.report(false, t0, 0);
      rep.error = err.toJSON();
      rep.rollback = rollback;
      if (pending.length) rep.rollbackPending = pending.map((d) => d.name);
      // A source left not RUNNING is the embedder's most urgent problem: the error says so (its code stays the first
      // failure's, which caused it); report.rollback has each device's typed outcome and VFM_ROLLBACK_FAILED error.
      const stuck = rollback.filter((r) => r.outcome === RollbackOutcome.FAILED);
      if (stuck.length) {
        const first = err;
        err = Object.assign(new MigError(first.code, `${first.message}; NOT RUNNING after rollback: ${stuck.map((r) => r.error?.message).join('; ')}`,
          { cause: first }), { name: first.name, device: first.device, offset: first.offset, register: first.register, value: first.value, errno: first.errno });
      }
      Object.assign(err, { report: rep });
      throw err;
    } finally {
      if (!deferClaims) this.claims.release();
      clearInterval(sampler);
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
    }).finally(() => trace('vfio_device_op_settled', { device: d.name, phase: d.phase }))));
    if (first !== undefined) throw first;
    return rs.map((r) => (r as PromiseFulfilledResult<T>).value);
  }

  private async precopy(): Promise<void> {
    let bandwidth = 0; // bytes/ms measured so far
    for (let round = 1; ; round++) {
      this.checkCancel();
      const pend = await this.onAll((d) => d.pending());
      const total = pend.reduce((a, b) => a + b, 0);
      const stuck = total === 0 || round > this.o.maxRounds;
      const gate = this.o.switchoverGate;
      if (stuck || (bandwidth > 0 && total <= bandwidth * this.o.downtimeLimitMs)) {
        // switchover-ack (QEMU 8.1+): the destination has not loaded every PRE_COPY device's initial data yet. Keep
        // iterating (as QEMU does: an iterate with nothing to read still writes a pending DEV_INIT_DATA_SENT); with
        // nothing pending (or past max rounds) and every marker out, wait for the ack instead, re-checking as it comes.
        const markersOut = this.devices.every((d) => !d.initPending);
        if (!gate || gate.ready(markersOut || round > this.o.maxRounds)) return;
        if (stuck && markersOut) { await gate.wait(50); round--; continue; }
      }
      // Nothing left to send but some DEV_INIT_DATA_SENT: only those devices iterate (a tag-only round).
      const markersOnly = stuck && !!gate;
      const r0 = performance.now();
      const res = await this.onAll(async (d) => {
        if (markersOnly && !d.initPending) return SourceDevice.NOTHING;
        const t = performance.now();
        const r = await d.iterate(pend[d.index]);
        this.progress(d, false, (r.bytes * 1000) / Math.max(performance.now() - t, 0.001));
        return r;
      });
      const ms = performance.now() - r0;
      const bytes = res.reduce((a, r) => a + r.bytes, 0);
      bandwidth = bytes / Math.max(ms, 0.001);
      this.bandwidth = bandwidth;
      const rs: RoundStats = { round, pendingBefore: total, bytes, ms, bandwidth: bandwidth * 1000 };
      this.rounds.push(rs);
      this.emit('round', { ...rs, pendingAfter: res.reduce((a, r) => a + r.pending, 0), devicesPending: pend });
      trace('migration_round', { round, pending: total, bytes, ms: ms.toFixed(1) });
      if (this.o.dirtyQueryIntervalMs === 0) await this.dirty.queryAll();
      // Every vendor claimed pending bytes and none staged any: more rounds will not converge, stop and copy (once
      // the destination acknowledged: until then wait for it between rounds).
      if (bytes === 0) {
        if (!gate || gate.ready(this.devices.every((d) => !d.initPending))) return;
        await gate.wait(50);
      }
    }
  }

  private async digest(d: SourceDevice): Promise<string> {
    const t = d.dev.digestTarget();
    if (!t) return '';
    return this.pool.digest(digestTask(t));
  }

  private report(ok: boolean, t0: number, stopCopyMs: number): MigrationReport {
    const totalMs = performance.now() - t0;
    const precopyBytes = this.devices.reduce((a, d) => a + d.stats.precopyBytes, 0);
    const stopCopyBytes = this.devices.reduce((a, d) => a + d.stats.stopCopyBytes, 0);
    return {
      ok, phase: this.phase, devices: this.devices.map((d) => ({ ...d.stats })), rounds: this.rounds, precopyBytes, stopCopyBytes,
      stopCopyMs, totalMs, streamBytes: this.writer.sink.bytes, anomalies: summarise(this.anomalies),
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

/** A v2 device's entry always says which VFIO_MIGRATION_* flags it has: PRE_COPY ones gate a live switchover-ack. */
function tableGeometry(d: SourceDevice): DeviceGeometry {
  const g = d.dev.geometry();
  return d.dev.caps.protocol === 'v2' && g.migFlags === undefined ? { ...g, migFlags: d.dev.caps.migrationFlags } : g;
}

/** One entry per device and kind: the last occurrence, with the empty chunks of all of them. */
function summarise(all: VendorAnomaly[]): VendorAnomaly[] {
  const m = new Map<string, VendorAnomaly>();
  for (const a of all) {
    const k = `${a.device}\0${a.kind}`;
    const prev = m.get(k);
    m.set(k, { ...a, chunks: a.chunks + (prev?.chunks ?? 0) });
  }
  return [...m.values()];
}
