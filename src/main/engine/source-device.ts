// One source device's migration, one small function per phase as in QEMU's hw/vfio/migration.c: setup, pending,
// iterate, complete (stop-and-copy), save_state (config) and rollback. Data moves in workers; this object runs on
// the main thread and only touches registers (under the region lock) and the staging ring's bookkeeping.
import { ErrorCode, MigError } from '../errors.js';
import { trace } from '../trace.js';
import { configBlob, type ConfigHooks } from './config-hook.js';
import type { TrappedAccess } from '../protocol/migration-region.js';
import { configSection, endTag, setupSection } from '../protocol/qemu-stream.js';
import type { ContainerWriter } from '../container/writer.js';
import type { DeviceTransport } from '../transport/transport.js';
import { asMigDevice } from '../protocol/v1/device.js';
import { withStallBound, type Awaitable, type MigDevice, type TargetState } from '../device/seam.js';
import type { SaveResult, VendorMode } from '../../workers/tasks.js';
import { DeviceShared } from './device-shared.js';
import type { EnginePool } from './pool.js';
import { OWNER_MAIN, OWNER_WORKER } from './region-lock.js';
import type { StagingRing } from './staging.js';
import type { RateLimiter } from './rate.js';

const ABORTED = Symbol('aborted');

/**
 * What an embedder may hand the engine: a device behind the seam, or a v1 DeviceTransport as before the seam (the
 * engine sees it through its V1Device adapter: asMigDevice). Inside the engine every device is a MigDevice.
 */
export type EngineDevice = MigDevice | DeviceTransport;
/** Staging per chunk when the device does not declare its chunk size (QEMU v2 reads the data fd in 1 MiB pieces). */
export const DEFAULT_STAGING_CHUNK = 1 << 20;

export type DevicePhase = 'idle' | 'setup' | 'precopy' | 'stopcopy' | 'saved' | 'failed' | 'rolled-back';

export interface DeviceStats {
  name: string;
  rounds: number;
  precopyBytes: number;
  precopyChunks: number;
  stopCopyBytes: number;
  stopCopyChunks: number;
  stopCopyMs: number;
  streamBytes: number;
  lastPending: number;
  lockWaitMs: number;
  finalState?: string;
  digest?: string;
}

/** A vendor behaviour that QEMU tolerates and a strict driver test would not: reported, never silent. */
export interface VendorAnomaly {
  device: string;
  phase: 'precopy' | 'stopcopy';
  /**
   * empty-chunk: a pre-copy chunk came back with data_size 0 while pending_bytes > 0 (compatible: the round ended);
   * drain-ended-early: the same in stop-and-copy (compatible: the drain ended there, as QEMU does);
   * empty-retried: strict mode retried such chunks until data came.
   */
  kind: 'empty-chunk' | 'drain-ended-early' | 'empty-retried';
  /** pending_bytes when it happened. */
  pending: number;
  /** Empty chunks seen. */
  chunks: number;
  message: string;
}

/** How a source device's rollback ended (issue 7 §4.2). */
export const RollbackOutcome = {
  /** setup never reached the device (its first state read failed or never ran): the device was not touched. */
  NOT_OPENED: 'not-opened',
  WAS_RUNNING: 'was-running',
  /** Its state was set back to RUNNING. */
  RESUMED: 'resumed',
  /** Writing RUNNING failed or the device was in ERROR: reset, then RUNNING. */
  RESET: 'reset',
  /** Still not RUNNING after reset and retry: `error` (VFM_ROLLBACK_FAILED) says why. */
  FAILED: 'failed',
  /** A worker is inside a vendor call: rollback runs when it returns (Migration.settled, the `rollback` event). */
  DEFERRED: 'deferred',
} as const;
export type RollbackOutcome = (typeof RollbackOutcome)[keyof typeof RollbackOutcome];

export interface RollbackResult {
  device: string;
  outcome: RollbackOutcome;
  /** The state rollback found (ERROR included), when it could read one. */
  from?: string;
  detail: string;
  error?: MigError;
}

export interface SourceDeviceOptions {
  /** Worker lanes this device may use at once (when the sink takes positioned writes). */
  lanes?: number;
  vendorMode: VendorMode;
  /** The embedder's config save hook (docs/CONFIG.md). */
  config?: ConfigHooks;
  /** v1: how trapped data pieces are accessed (default bulk). */
  trappedAccess?: TrappedAccess;
  /** Per pre-copy round: data bytes and milliseconds at most (at least one chunk moves). */
  roundBytes: number;
  roundTimeMs: number;
  maxEmptyChunks: number;
  maxNoProgress: number;
  /** Stall bound of the device's data channel (DataPathDesc.stallMs). */
  vendorStallMs?: number;
  testExitAfterChunks?: number;
  /** Largest vendor chunk staged (bytes); default: the device's declared chunk size, else DEFAULT_STAGING_CHUNK. */
  stagingChunk?: number;
  /** Called after each device_state the engine sets (events, status). */
  onState?: (state: string) => void;
  /** Called for each vendor anomaly (compatible mode tolerates them, never silently). */
  onAnomaly?: (a: VendorAnomaly) => void;
}

export class SourceDevice {
  readonly shared = DeviceShared.create();
  phase: DevicePhase = 'idle';
  stats: DeviceStats;
  private ring: StagingRing | null = null;
  private declaredChunk = 0;
  private taskActive = false;
  /** Settles once every worker task of the last phase has ended (a phase cut short by abort leaves it running). */
  private inflight: Promise<void> = Promise.resolve();
  private inflightDone = true;
  private readonly abortedP: Promise<typeof ABORTED>;
  private wakeAbort!: () => void;
  /** Resolves once no worker of this device runs (a phase cut short by abort may leave one in a vendor call). */
  get stopped(): Promise<void> { return this.inflight; }
  /** Set when rollback had to wait for a worker stuck inside a vendor call: its final outcome. */
  deferredRollback?: Promise<RollbackResult>;

  /** The device, whatever its protocol and reach. */
  readonly dev: MigDevice;
  /** setup read the device's state: rollback has something to undo. */
  private touched = false;
  /** The data session's largest chunk, when the device says (v1: its region's data area). */
  private areaChunk = Number.MAX_SAFE_INTEGER;
  /** v2: PRECOPY_INFO initial_bytes at the last estimate, and whether DEV_INIT_DATA_SENT went out. */
  private initialBytes = 0;
  initDataSent = false;
  /** v2 with PRE_COPY, in its pre-copy session, and DEV_INIT_DATA_SENT not yet written: the next iterate writes it. */
  get initPending(): boolean {
    // v1 has no DEV_INIT_DATA_SENT (its PRE_COPY is SAVING|RUNNING): a v1 device never holds a switchover back.
    return this.dev.caps.protocol === 'v2' && !!this.dev.caps.precopy && !!this.dev.dataPath() && !this.initDataSent;
  }

  constructor(readonly index: number, device: EngineDevice, private readonly pool: EnginePool,
    private readonly writer: ContainerWriter, private readonly opts: SourceDeviceOptions, private readonly limiter?: RateLimiter) {
    this.dev = asMigDevice(device);
    this.stats = {
      name: device.name, rounds: 0, precopyBytes: 0, precopyChunks: 0, stopCopyBytes: 0, stopCopyChunks: 0,
      stopCopyMs: 0, streamBytes: 0, lastPending: 0, lockWaitMs: 0,
    };
    this.abortedP = new Promise((r) => { this.wakeAbort = () => r(ABORTED); });
  }

  get name(): string { return this.dev.name; }

  /** A seam device's state change, one arc at a time (traced by the protocol), reported like a v1 write. */
  private async devSet(target: TargetState): Promise<void> {
    await this.dev.setState(target);
    this.opts.onState?.(target);
  }

  /** Data bytes sent so far, including the phase now running (shared counter): for progress between rounds. */
  get liveBytes(): number {
    return this.stats.precopyBytes + this.stats.stopCopyBytes + (this.taskActive ? this.shared.sent : 0);
  }

  /** pending_bytes as last read, less what the running phase sent since (an estimate until the next read). */
  get livePending(): number {
    if (this.phase === 'saved' || this.phase === 'rolled-back') return 0;
    return Math.max(0, this.stats.lastPending - (this.taskActive ? this.shared.sent : 0));
  }


  private setPhase(p: DevicePhase): void {
    trace('vfio_device_phase', { device: this.name, from: this.phase, to: p });
    this.phase = p;
  }

  /** A register operation under the region lock; refused once the device was aborted. */
  private async locked<T>(fn: () => Awaitable<T>, what = 'state change'): Promise<T> {
    this.checkAborted(what);
    return this.withLock(fn);
  }

  /**
   * `fn` under the device lock, held until what it returns settles: a seam device that answers over a socket keeps
   * the workers off its channel for the whole round trip while the event loop runs on.
   */
  private async withLock<T>(fn: () => Awaitable<T>): Promise<T> {
    await this.shared.lock.lockAsync(OWNER_MAIN);
    try { return await fn(); } finally { this.shared.lock.unlock(); }
  }

  /** save_setup: [SETUP][END]; RUNNING -> PRE_COPY (a stopped device goes straight to STOP_COPY). */
  async setup(): Promise<void> {
    this.setPhase('setup');
    const dev = this.dev;
    this.declaredChunk = dev.geometry().maxChunk;
    dev.setTrappedAccess?.(this.opts.trappedAccess ?? 'bulk');
    await this.locked(async () => {
      const st = await dev.state();
      this.touched = true;
      if (st !== 'RUNNING' && st !== 'STOP') {
        throw new MigError(ErrorCode.BAD_STATE, `cannot start saving from ${st} (expected RUNNING or STOP)`, { device: this.name });
      }
      // QEMU 8+: a running device with PRE_COPY enters it (RUNNING is the recovery); without, it stays RUNNING.
      // A v1 device always has pre-copy (SAVING|RUNNING).
      if (st === 'RUNNING' && dev.caps.precopy) await this.devSet('PRE_COPY');
      if (st === 'STOP') await this.devSet('STOP_COPY');
    });
    await this.writer.deviceBytes(this.index, this.shared, setupSection());
    this.setPhase('precopy');
  }

  /** save_pending: pending_bytes as the vendor reports it. */
  async pending(): Promise<number> {
    const dev = this.dev;
    const e = await this.locked(() => dev.estimate());
    this.initialBytes = e.initialBytes;
    // Nothing to read outside a data session (a v2 device without PRE_COPY stays RUNNING until stop-and-copy).
    this.stats.lastPending = dev.dataPath() ? e.pending : 0;
    return this.stats.lastPending;
  }

  /**
   * save_live_iterate for one round: chunks until `pending` bytes went out, nothing is pending, or the round's byte
   * or time bound is reached.
   */
  /** An iterate that did not run. */
  static readonly NOTHING: Readonly<SaveResult> = Object.freeze({
    chunks: 0, bytes: 0, emptyChunks: 0, endedEmpty: false, emptyPending: 0, pending: 0, aborted: false, lockWaitNs: 0, lockHoldNs: 0,
  });

  async iterate(pending: number): Promise<SaveResult> {
    // QEMU's vfio_is_active_iterate: a v2 device that is not in pre-copy does not iterate.
    if (!this.dev.dataPath()) return { ...SourceDevice.NOTHING };
    const r = await this.runPhase('iterate', Math.min(pending, this.opts.roundBytes), Date.now() + this.opts.roundTimeMs);
    this.stats.rounds++;
    this.stats.precopyBytes += r.bytes;
    this.stats.precopyChunks += r.chunks;
    this.stats.lastPending = r.pending;
    return r;
  }

  private tStopped = 0;

  /** The VM stops this device (QEMU's vfio_vmstate_change): STOP_COPY, not yet drained. complete() drains it. */
  async stop(): Promise<void> {
    if (this.phase === 'stopcopy') return;
    this.tStopped = performance.now();
    this.setPhase('stopcopy');
    await this.locked(() => this.devSet('STOP_COPY'));
  }

  /** save_live_complete_precopy: SAVING (stop() if not yet), drain while pending_bytes > 0, [END], then STOP. */
  async complete(): Promise<void> {
    await this.stop();
    const t0 = this.tStopped;
    const r = await this.runPhase('complete', Number.MAX_SAFE_INTEGER);
    await this.writer.deviceBytes(this.index, this.shared, endTag());
    await this.locked(() => this.devSet('STOP'));
    this.stats.stopCopyBytes += r.bytes;
    this.stats.stopCopyChunks += r.chunks;
    this.stats.stopCopyMs = performance.now() - t0;
  }

  /**
   * QEMU's vfio_vmstate_change_prepare: a P2P-capable device leaves peer-to-peer DMA (RUNNING_P2P / PRE_COPY_P2P)
   * before any device of the migration enters STOP_COPY. No-op for devices without P2P.
   */
  async quiesce(): Promise<void> {
    const dev = this.dev;
    if (!dev.caps.p2p) return;
    await this.locked(async () => {
      const st = await dev.state();
      if (st === 'PRE_COPY') await this.devSet('PRE_COPY_P2P');
      else if (st === 'RUNNING') await this.devSet('RUNNING_P2P');
    });
  }

  /** save_state: [CONFIG][len][blob][END] after all iterables (QEMU 6.0+ placement). */
  async saveState(): Promise<void> {
    const blob = await configBlob(this.opts.config, { name: this.name, index: this.index, device: this.dev },
      () => this.locked(() => this.dev.readConfig(), 'config read'));
    await this.writer.deviceBytes(this.index, this.shared, configSection(blob));
    this.stats.streamBytes = this.shared.streamBytes;
    this.stats.finalState = await this.locked(() => this.dev.state());
    this.setPhase('saved');
  }

  private aborted = false;

  /** Stop the running data task and refuse further phases (cancel, or another device failed). Sticky. */
  abort(): void {
    this.aborted = true;
    this.ring?.abort();
    this.wakeAbort();
    // A call waiting for a device that stopped answering (a stalled vfio-user server) is released now, not at its
    // timeout: the lock comes back for the rollback, which then waits for that device on its own terms.
    this.dev.interrupt?.();
  }

  private checkAborted(what: string): void {
    if (this.aborted) throw new MigError(ErrorCode.CANCELLED, `${what} cancelled`, { device: this.name });
  }

  /**
   * After a failure or cancel: back to RUNNING. When writing RUNNING fails, or the device is (or lands) in ERROR, the
   * device is reset (VFIO_DEVICE_RESET; QEMU's v1 hw_error()s here) and RUNNING is retried. Never throws: a device
   * still not RUNNING comes back as outcome `failed` with a VFM_ROLLBACK_FAILED error. A worker of the cut-short
   * phase gets `graceMs` to stop (it stops at its next chunk); one still inside a vendor call then cannot be waited
   * for: the rollback is deferred until the call returns (`deferredRollback` holds its result) and this returns at
   * once with outcome `deferred`.
   */
  async rollback(graceMs = 100): Promise<RollbackResult> {
    this.abort();
    const lock = this.shared.lock;
    while (!this.inflightDone) {
      // A worker between chunks stops at its next check, however long the scheduler makes that take: wait for it.
      // One that holds the lock through the whole grace period without a new acquisition is inside one vendor call.
      const owner = lock.owner;
      const holds = lock.holds;
      let timer: NodeJS.Timeout | undefined;
      const stopped = await Promise.race([this.inflight.then(() => true),
        new Promise<boolean>((r) => { timer = setTimeout(() => r(false), graceMs); })]);
      clearTimeout(timer);
      if (stopped) break;
      if (owner === OWNER_WORKER && lock.owner === OWNER_WORKER && lock.holds === holds) {
        trace('vfio_rollback_deferred', { device: this.name });
        this.deferredRollback = this.inflight.then(() => this.rollbackNow()).then((r) => ({ ...r, detail: `${r.detail} (after the vendor call returned)` }));
        return {
          device: this.name, outcome: RollbackOutcome.DEFERRED,
          detail: 'deferred: a worker is inside a vendor call; the device returns to RUNNING when the call returns',
        };
      }
    }
    return this.rollbackNow();
  }

  private async rollbackNow(): Promise<RollbackResult> {
    if (this.shared.lock.owner === OWNER_WORKER && !this.taskActive) this.shared.lock.forceRelease();
    let r: RollbackResult;
    if (!this.touched) r = { device: this.name, outcome: RollbackOutcome.NOT_OPENED, detail: 'the device was never reached: nothing changed' };
    else {
      try {
        r = await this.withLock(() => this.backToRunning());
      } catch (e) {
        const err = new MigError(ErrorCode.ROLLBACK_FAILED, `not RUNNING after rollback (reset and retry failed): ${(e as Error).message}`,
          { device: this.name, cause: e });
        r = { device: this.name, outcome: RollbackOutcome.FAILED, detail: err.message, error: err };
      }
    }
    trace('vfio_device_rollback', { device: this.name, outcome: r.outcome, from: r.from });
    this.setPhase('rolled-back');
    return r;
  }

  /** Under the lock. Throws if the device cannot be brought back to RUNNING. */
  private async backToRunning(): Promise<RollbackResult> {
    const dev = this.dev;
    const read = async (): Promise<string> => dev.state();
    const running = () => this.devSet('RUNNING');
    const from = await read();
    if (from === 'RUNNING') return { device: this.name, outcome: RollbackOutcome.WAS_RUNNING, from, detail: 'was RUNNING' };
    let first: MigError | undefined;
    if (from !== 'ERROR') {
      try {
        await running();
        return { device: this.name, outcome: RollbackOutcome.RESUMED, from, detail: `${from} -> RUNNING` };
      } catch (e) {
        first = e as MigError;
        trace('vfio_rollback_set_failed', { device: this.name, error: first.message });
      }
    }
    // ERROR, or RUNNING refused: VFIO_DEVICE_RESET (QEMU's v1 hw_error()s here), then RUNNING again if need be.
    await dev.reset();
    trace('vfio_device_reset', { device: this.name, from, after: first?.code });
    if (await read() !== 'RUNNING') await running();
    const now = await read();
    if (now !== 'RUNNING') throw new MigError(ErrorCode.BAD_STATE, `device is ${now} after reset`, { device: this.name });
    this.opts.onState?.('RUNNING');
    return {
      device: this.name, outcome: RollbackOutcome.RESET, from,
      detail: first ? `writing RUNNING failed (${first.code ?? 'error'}): reset, then RUNNING` : 'in ERROR: reset, then RUNNING',
    };
  }

  private slotSize(): number {
    // A slot holds one whole QEMU packet of the chunk size the device actually uses: the one it declares (the
    // emulated vendor's maxChunk) or the engine's (stagingChunk, 1 MiB by default as QEMU v2's buffer), never the
    // region size a vendor advertises (a 1 GiB region must not cost GiBs of shared memory). A vendor that stages a
    // bigger chunk is refused with VENDOR_BAD_VALUE naming the limit.
    const area = this.areaChunk;
    const chunk = Math.min(area, this.opts.stagingChunk ?? (this.declaredChunk || DEFAULT_STAGING_CHUNK));
    return Math.ceil((64 + chunk + 64) / 4096) * 4096; // head (or zero-copy scratch offset) + data + trailer
  }

  /** Turn what the worker saw into anomaly events (compatible mode's tolerance is never silent). */
  private noteAnomalies(phase: 'iterate' | 'complete', r: SaveResult): void {
    if (!r.emptyChunks) return;
    const p = phase === 'iterate' ? 'precopy' : 'stopcopy';
    const pending = r.emptyPending;
    let a: Pick<VendorAnomaly, 'kind' | 'message'>;
    if (r.endedEmpty && phase === 'iterate') {
      a = { kind: 'empty-chunk', message: `pre-copy chunk with data_size 0 while pending_bytes is ${pending}: round ended with [DATA][0][END] (QEMU behaviour)` };
    } else if (r.endedEmpty) {
      a = { kind: 'drain-ended-early', message: `stop-and-copy chunk with data_size 0 while pending_bytes is ${pending}: drain ended there (QEMU behaviour); the destination decides whether the state is complete` };
    } else {
      a = { kind: 'empty-retried', message: `${r.emptyChunks} chunk(s) with data_size 0 while pending_bytes > 0 retried in ${p} (strict mode)` };
    }
    const an: VendorAnomaly = { device: this.name, phase: p, pending, chunks: r.emptyChunks, ...a };
    trace('vfio_vendor_anomaly', { ...an });
    this.opts.onAnomaly?.(an);
  }

  private async runPhase(phase: 'iterate' | 'complete', budget: number, deadline?: number): Promise<SaveResult> {
    this.checkAborted(phase);
    // A positioned sink without a bandwidth cap takes records straight from the workers (no main-thread hop), and
    // then several lanes may share one device: each takes the lock for one chunk, checksums and writes outside it.
    const direct = this.limiter ? undefined : this.writer.sink.direct?.() ?? undefined;
    const open = this.dev.dataPath();
    if (!open) throw new MigError(ErrorCode.BAD_STATE, `${phase}: no data session is open`, { device: this.name });
    const path = withStallBound(open, this.opts.vendorStallMs);
    this.areaChunk = path.maxChunk ?? Number.MAX_SAFE_INTEGER;
    const lanes = direct && path.lanes ? Math.max(1, Math.min(this.opts.lanes ?? 1, this.pool.rings.nslots)) : 1;
    await this.pool.acquire(lanes);
    if (this.aborted) {
      this.pool.release(lanes); // aborted while waiting for a place: give it straight back
      this.checkAborted(phase);
    }
    const ring = this.pool.rings.borrow(this.slotSize());
    this.ring = ring;
    this.shared.resetPhase(); // before taskActive: progress must not count the previous phase's bytes twice
    this.taskActive = true;
    let handedOff = false; // the ring and pool places go back when the workers end, not here
    try {
      const tasks = Array.from({ length: lanes }, (_, lane) => this.pool.save({
        op: 'save-path', path, maxRead: this.opts.stagingChunk ?? (this.declaredChunk || DEFAULT_STAGING_CHUNK), deviceIndex: this.index,
        shared: this.shared.sab, ring: ring.desc, phase, budget, deadline, direct,
        initialBytes: this.initialBytes, initPending: this.dev.caps.precopy && !this.initDataSent,
        vendorMode: this.opts.vendorMode, maxEmptyChunks: this.opts.maxEmptyChunks, maxNoProgress: this.opts.maxNoProgress,
        testExitAfterChunks: lane === 0 ? this.opts.testExitAfterChunks : undefined, lane, lanes,
      }));
      const task = Promise.all(tasks).finally(() => { this.taskActive = false; });
      const drain = this.drain(ring);
      // Whichever side fails first stops the other: the ring abort wakes a blocked producer or consumer.
      task.catch(() => { this.shared.setDone(); ring.abort(); });
      drain.catch(() => ring.abort());
      const settled = Promise.allSettled([task, drain]);
      // Every lane has stopped (or died) before the device is touched again.
      const stopped = settled.then(() => Promise.allSettled(tasks)).then(() => {
        if (this.shared.lock.owner === OWNER_WORKER) this.shared.lock.forceRelease(); // a worker died holding it
      });
      this.inflightDone = false;
      this.inflight = stopped.then(() => { this.inflightDone = true; });
      // Abort does not wait for the workers: one may be inside a vendor call for as long as the vendor likes. They
      // stop at their next chunk; rollback() waits for them briefly and defers itself past a stuck one.
      const first = await Promise.race([settled, this.abortedP]);
      if (first === ABORTED) {
        handedOff = true;
        void this.inflight.finally(() => { this.pool.rings.giveBack(ring); this.pool.release(lanes); });
        throw new MigError(ErrorCode.CANCELLED, `${phase} cancelled`, { device: this.name });
      }
      await stopped;
      const [t, d] = first;
      if (t.status === 'rejected') throw t.reason;
      if (d.status === 'rejected') throw d.reason;
      const rs = t.value;
      const r: SaveResult = {
        chunks: rs.reduce((a, x) => a + x.chunks, 0), bytes: rs.reduce((a, x) => a + x.bytes, 0), pending: rs[0].pending,
        emptyChunks: rs.reduce((a, x) => a + x.emptyChunks, 0), endedEmpty: rs.some((x) => x.endedEmpty),
        emptyPending: Math.max(...rs.map((x) => x.emptyPending)), bounded: rs.find((x) => x.bounded)?.bounded,
        aborted: rs.some((x) => x.aborted), lockWaitNs: rs.reduce((a, x) => a + x.lockWaitNs, 0), lockHoldNs: rs.reduce((a, x) => a + x.lockHoldNs, 0),
      };
      this.stats.lockWaitMs += r.lockWaitNs / 1e6;
      if (rs.some((x) => x.initSent)) {
        this.initDataSent = true;
        trace('vfio_save_init_data_sent', { device: this.name });
      }
      if (r.aborted) throw new MigError(ErrorCode.CANCELLED, `${phase} cancelled`, { device: this.name });
      this.noteAnomalies(phase, r);
      return r;
    } finally {
      this.ring = null;
      if (!handedOff) {
        this.pool.rings.giveBack(ring);
        this.pool.release(lanes);
      }
    }
  }

  private async drain(ring: StagingRing): Promise<void> {
    for (;;) {
      const s = await ring.next();
      if (!s) return;
      if (this.limiter) await this.limiter.take(s.len);
      await this.writer.slot(ring.slot(s.index).subarray(0, s.len));
      ring.release();
    }
  }
}
