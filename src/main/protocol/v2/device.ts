// A VFIO migration v2 device behind the seam: VFIO_DEVICE_FEATURE state changes walked arc by arc through the FSM
// table, the data fd of each session, PRECOPY_INFO / MIG_DATA_SIZE estimates and DMA logging. The reach supplies the
// raw operations (V2Ops): ioctls on a kernel device fd, calls into the emulated vendor, or vfio-user messages.
// QEMU's hw/vfio/migration.c is the model: a returned data fd while one is open is "out of sync", a failed SET
// re-reads the state, and ERROR is left only by reset.
import { ErrorCode, MigError, accessErrorCode } from '../../errors.js';
import { trace } from '../../trace.js';
import type { DigestTarget } from '../../transport/transport.js';
import type { DeviceGeometry } from '../../container/format.js';
import type {
  Awaitable, ConfigTargetDesc, DataPathDesc, DeviceCaps, DirtyLog, MigDevice, MigState, SizeEstimate, StateChange, TargetState,
} from '../../device/seam.js';
import { closesSession, opensSession, v2Path } from './fsm.js';
import { drive, type Step } from '../../device/drive.js';
import {
  FEATURE, MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, V2_STATE, V2_STATE_NAMES, type V2StateName,
} from './uapi.js';

export interface IovaRange { iova: number; length: number }

/** The reach's half of a v2 device: one kernel operation per call, errors carrying the kernel's errno. */
export interface V2Ops {
  readonly name: string;
  readonly reach: string;
  /** GET VFIO_DEVICE_FEATURE_MIGRATION flags (throws with errno ENOTTY when the driver has no migration). */
  migrationFlags(): Awaitable<number>;
  /** PROBE of a feature id. */
  probe(feature: number): Awaitable<boolean>;
  getState(): Awaitable<number>;
  /** One SET of MIG_DEVICE_STATE: a new data fd (owned by the caller) or -1. */
  setState(state: number): Awaitable<number>;
  precopyInfo(dataFd: number): { initialBytes: number; dirtyBytes: number };
  dataSize(): number;
  dmaStart(pageSize: number, ranges: IovaRange[]): Awaitable<number>;
  dmaStop(): Awaitable<void>;
  dmaReport(iova: number, length: number, pageSize: number, bitmap: Uint8Array): Awaitable<void>;
  reset(): Awaitable<void>;
  closeFd(fd: number): void;
  /** The worker's way to this session's data (the fd path for a real fd; the reach's own module otherwise). */
  dataPath(fd: number): DataPathDesc;
  /** Guest IOVA ranges the device may DMA into (DMA logging covers these); empty: no dirty tracking. */
  guestRanges(): IovaRange[];
  readConfig(): Awaitable<Uint8Array>;
  writeConfig(space: Uint8Array): Awaitable<void>;
  configTarget(): ConfigTargetDesc;
  geometry(): DeviceGeometry;
  digestTarget(): DigestTarget | null;
  vendorError?(): string;
  close(): Awaitable<void>;
  /** Release a request in flight now (MigDevice.interrupt), where the reach can. */
  interrupt?(): void;
}

function errnoOf(e: unknown): number | undefined { return (e as { errno?: number })?.errno; }

/** What a V2Device answers with: plain values when its ops answer synchronously (A false), Promises when not. */
export type Answer<A extends boolean, T> = A extends true ? Promise<T> : T;

interface Probed { flags: number; logging: boolean }

/** GET MIGRATION (STOP_COPY is mandatory) and whether DMA logging can cover the device's guest ranges. */
function* probeCaps(ops: V2Ops): Step<Probed> {
  let flags: number;
  try {
    flags = yield ops.migrationFlags();
  } catch (e) {
    throw new MigError(ErrorCode.NO_MIGRATION_REGION, `VFIO migration v2 is not supported (GET MIGRATION: ${(e as Error).message})`,
      { device: ops.name, errno: errnoOf(e), cause: e });
  }
  if (!(flags & MIGRATION_STOP_COPY)) {
    throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `migration flags 0x${flags.toString(16)} lack the mandatory STOP_COPY`, { device: ops.name, value: flags });
  }
  const logging = ops.guestRanges().length > 0 && (yield ops.probe(FEATURE.DMA_LOGGING_START)) === true;
  return { flags, logging };
}

/**
 * The protocol logic is written once (generators run by drive()): with synchronous ops (kernel ioctls, the emulated
 * vendor) every method answers at once, with ops that return Promises (vfio-user messages) every method that touches
 * the device answers with a Promise and the main thread never waits on the device. A = true for the latter
 * (V2Device.open()).
 */
export class V2Device<A extends boolean = false> implements MigDevice {
  readonly caps: DeviceCaps;
  readonly dirtyLog: V2DirtyLog<A> | null;
  private fd = -1;

  /** A device whose ops answer synchronously. */
  constructor(readonly ops: V2Ops, probed?: Probed) {
    const p = probed ?? drive(probeCaps(ops));
    if (p instanceof Promise) {
      p.catch(() => undefined);
      throw new MigError(ErrorCode.BAD_ARGUMENT, 'these v2 ops answer asynchronously: use V2Device.open()', { device: ops.name });
    }
    const { flags, logging } = p;
    this.caps = {
      protocol: 'v2', reach: ops.reach, precopy: (flags & MIGRATION_PRE_COPY) !== 0, p2p: (flags & MIGRATION_P2P) !== 0,
      dirty: logging ? 'dma-logging' : 'none', migrationFlags: flags,
    };
    this.dirtyLog = logging ? new V2DirtyLog<A>(ops, ops.guestRanges()) : null;
  }

  /** A device whose ops may answer later (over a socket): probed without blocking. */
  static async open(ops: V2Ops): Promise<V2Device<true>> {
    return new V2Device<true>(ops, await drive(probeCaps(ops)));
  }

  get name(): string { return this.ops.name; }

  state(): Answer<A, MigState> { return drive(this.stateStep()) as Answer<A, MigState>; }
  setState(target: TargetState): Answer<A, StateChange> { return drive(this.setStateStep(target)) as Answer<A, StateChange>; }
  estimate(): Answer<A, SizeEstimate> { return drive(this.estimateStep()) as Answer<A, SizeEstimate>; }

  private *stateStep(): Step<MigState> {
    const s: number = yield this.ops.getState();
    const n = V2_STATE_NAMES[s];
    if (n === undefined) throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `MIG_DEVICE_STATE reads ${s}, not a state`, { device: this.name, value: s });
    return n;
  }

  private *setStateStep(target: TargetState): Step<StateChange> {
    const from: MigState = yield* this.stateStep();
    const path = from === 'ERROR' ? null : v2Path(this.caps.migrationFlags, from, target);
    if (!path) {
      throw new MigError(from === 'ERROR' ? ErrorCode.DEVICE_ERROR_STATE : ErrorCode.BAD_STATE,
        from === 'ERROR' ? 'device is in the ERROR state; a reset is required' : `no allowed transition ${from} -> ${target}`, { device: this.name });
    }
    let cur: V2StateName = from as V2StateName;
    let newSession = false;
    for (const next of path) {
      let fd: number;
      try {
        fd = yield this.ops.setState(V2_STATE[next]);
      } catch (e) {
        let after: MigState | undefined;
        try { after = yield* this.stateStep(); } catch { /* reported below */ }
        trace('vfio_migration_set_state_failed', { device: this.name, from: cur, to: next, after });
        const why = `${(e as Error).message}${this.vendorText()}`;
        if (after === 'ERROR') {
          this.dropFd();
          throw new MigError(ErrorCode.DEVICE_ERROR_STATE, `transition ${cur} -> ${next} put the device in ERROR: ${why}`,
            { device: this.name, errno: errnoOf(e), cause: e });
        }
        // A peer that died, stalled or broke the protocol (vfio-user) did not refuse anything: say which it was.
        const code = accessErrorCode(errnoOf(e), ErrorCode.TRANSITION_FAILED);
        throw new MigError(code, `${code === ErrorCode.TRANSITION_FAILED ? 'vendor refused' : 'connection to the device failed during'} ${cur} -> ${next}${after ? ` (state now ${after})` : ''}: ${why}`,
          { device: this.name, errno: errnoOf(e), cause: e });
      }
      if (closesSession(cur, next)) this.dropFd();
      if (fd >= 0) {
        if (this.fd >= 0) {
          this.ops.closeFd(fd);
          throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `data_fd out of sync: ${cur} -> ${next} returned a second data fd`, { device: this.name });
        }
        this.fd = fd;
        newSession = true;
      } else if (opensSession(cur, next)) {
        throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `${cur} -> ${next} returned no data fd`, { device: this.name });
      }
      trace('vfio_migration_set_state', { device: this.name, from: cur, to: next, dataFd: fd });
      cur = next;
    }
    return { from, to: cur, path, newSession };
  }

  private *estimateStep(): Step<SizeEstimate> {
    let stopCopyBytes: number | null = null;
    try { stopCopyBytes = yield this.ops.dataSize(); } catch { /* QEMU falls back to a large default; null says "unknown" */ }
    const s: MigState = yield* this.stateStep();
    if ((s === 'PRE_COPY' || s === 'PRE_COPY_P2P') && this.fd >= 0) {
      let p: { initialBytes: number; dirtyBytes: number };
      try {
        p = this.ops.precopyInfo(this.fd);
      } catch (e) {
        throw new MigError(ErrorCode.NATIVE, `VFIO_MIG_GET_PRECOPY_INFO: ${(e as Error).message}`, { device: this.name, errno: errnoOf(e), cause: e });
      }
      return { pending: p.initialBytes + p.dirtyBytes, initialBytes: p.initialBytes, dirtyBytes: p.dirtyBytes, stopCopyBytes };
    }
    return { pending: s === 'STOP_COPY' ? (stopCopyBytes ?? 1) : 0, initialBytes: 0, dirtyBytes: 0, stopCopyBytes };
  }

  dataPath(): DataPathDesc | null { return this.fd >= 0 ? this.ops.dataPath(this.fd) : null; }
  readConfig(): Answer<A, Uint8Array> { return this.ops.readConfig() as Answer<A, Uint8Array>; }
  writeConfig(space: Uint8Array): Answer<A, void> { return this.ops.writeConfig(space) as Answer<A, void>; }
  configTarget(): ConfigTargetDesc { return this.ops.configTarget(); }
  geometry(): DeviceGeometry { return this.ops.geometry(); }
  digestTarget() { return this.ops.digestTarget(); }
  vendorError(): string { return this.ops.vendorError?.() ?? ''; }

  reset(): Answer<A, void> {
    this.dropFd();
    return drive((function* (d: V2Device<A>): Step<void> {
      yield d.ops.reset();
      trace('vfio_device_reset', { device: d.name });
    })(this)) as Answer<A, void>;
  }

  interrupt(): void { this.ops.interrupt?.(); }

  close(): Answer<A, void> {
    this.dropFd();
    return this.ops.close() as Answer<A, void>;
  }

  private dropFd(): void {
    if (this.fd >= 0) this.ops.closeFd(this.fd);
    this.fd = -1;
  }

  private vendorText(): string {
    const v = this.vendorError();
    return v ? ` (vendor: ${v})` : '';
  }
}

/** VFIO_DEVICE_FEATURE_DMA_LOGGING_* over the device's guest ranges; a report concatenates the ranges' bitmaps. */
export class V2DirtyLog<A extends boolean = false> implements DirtyLog {
  readonly kind = 'dma-logging' as const;
  readonly sharesDataChannel = false;
  readonly pages: number;
  pageSize = 4096;
  private scratch: Uint8Array;
  constructor(private readonly ops: V2Ops, private readonly ranges: IovaRange[]) {
    this.pages = ranges.reduce((a, r) => a + r.length / 4096, 0);
    this.scratch = new Uint8Array(Math.ceil(Math.max(...ranges.map((r) => r.length / 4096)) / 64) * 8);
  }
  start(): Answer<A, void> { return drive(this.startStep()) as Answer<A, void>; }
  report(bitmap: Uint8Array): Answer<A, number> { return drive(this.reportStep(bitmap)) as Answer<A, number>; }
  stop(): Answer<A, void> {
    return drive((function* (ops: V2Ops): Step<void> {
      try { yield ops.dmaStop(); } catch { /* stopping is best effort during rollback */ }
    })(this.ops)) as Answer<A, void>;
  }

  private *startStep(): Step<void> {
    try {
      this.pageSize = yield this.ops.dmaStart(4096, this.ranges);
    } catch (e) {
      throw new MigError(accessErrorCode(errnoOf(e)), `DMA_LOGGING_START: ${(e as Error).message}`, { device: this.ops.name, errno: errnoOf(e), cause: e });
    }
    if (this.pageSize !== 4096) {
      throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `DMA logging page size ${this.pageSize} (4096 expected)`, { device: this.ops.name, value: this.pageSize });
    }
  }

  private *reportStep(bitmap: Uint8Array): Step<number> {
    let base = 0;
    let found = 0;
    for (const r of this.ranges) {
      const pages = r.length / 4096;
      const bm = this.scratch.subarray(0, Math.ceil(pages / 64) * 8);
      bm.fill(0);
      try {
        yield this.ops.dmaReport(r.iova, r.length, 4096, bm);
      } catch (e) {
        throw new MigError(accessErrorCode(errnoOf(e)), `DMA_LOGGING_REPORT: ${(e as Error).message}`, { device: this.ops.name, errno: errnoOf(e), cause: e });
      }
      for (let i = 0; i < pages; i++) {
        if (bm[i >> 3] & (1 << (i & 7))) {
          const b = base + i;
          bitmap[b >> 3] |= 1 << (b & 7);
          found++;
        }
      }
      base += pages;
    }
    return found;
  }
}
