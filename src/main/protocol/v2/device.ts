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
  ConfigTargetDesc, DataPathDesc, DeviceCaps, DirtyLog, MigDevice, MigState, SizeEstimate, StateChange, TargetState,
} from '../../device/seam.js';
import { closesSession, opensSession, v2Path } from './fsm.js';
import {
  FEATURE, MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, V2_STATE, V2_STATE_NAMES, type V2StateName,
} from './uapi.js';

export interface IovaRange { iova: number; length: number }

/** The reach's half of a v2 device: one kernel operation per call, errors carrying the kernel's errno. */
export interface V2Ops {
  readonly name: string;
  readonly reach: string;
  /** GET VFIO_DEVICE_FEATURE_MIGRATION flags (throws with errno ENOTTY when the driver has no migration). */
  migrationFlags(): number;
  /** PROBE of a feature id. */
  probe(feature: number): boolean;
  getState(): number;
  /** One SET of MIG_DEVICE_STATE: a new data fd (owned by the caller) or -1. */
  setState(state: number): number;
  precopyInfo(dataFd: number): { initialBytes: number; dirtyBytes: number };
  dataSize(): number;
  dmaStart(pageSize: number, ranges: IovaRange[]): number;
  dmaStop(): void;
  dmaReport(iova: number, length: number, pageSize: number, bitmap: Uint8Array): void;
  reset(): void;
  closeFd(fd: number): void;
  /** The worker's way to this session's data (the fd path for a real fd; the reach's own module otherwise). */
  dataPath(fd: number): DataPathDesc;
  /** Guest IOVA ranges the device may DMA into (DMA logging covers these); empty: no dirty tracking. */
  guestRanges(): IovaRange[];
  readConfig(): Uint8Array;
  writeConfig(space: Uint8Array): void;
  configTarget(): ConfigTargetDesc;
  geometry(): DeviceGeometry;
  digestTarget(): DigestTarget | null;
  vendorError?(): string;
  close(): void;
}

function errnoOf(e: unknown): number | undefined { return (e as { errno?: number })?.errno; }

export class V2Device implements MigDevice {
  readonly caps: DeviceCaps;
  /** Answers synchronously (ioctls or in-process calls), like every V2Device method. */
  readonly dirtyLog: V2DirtyLog | null;
  private fd = -1;

  constructor(readonly ops: V2Ops) {
    let flags: number;
    try {
      flags = ops.migrationFlags();
    } catch (e) {
      throw new MigError(ErrorCode.NO_MIGRATION_REGION, `VFIO migration v2 is not supported (GET MIGRATION: ${(e as Error).message})`,
        { device: ops.name, errno: errnoOf(e), cause: e });
    }
    if (!(flags & MIGRATION_STOP_COPY)) {
      throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `migration flags 0x${flags.toString(16)} lack the mandatory STOP_COPY`, { device: ops.name, value: flags });
    }
    const ranges = ops.guestRanges();
    const logging = ranges.length > 0 && ops.probe(FEATURE.DMA_LOGGING_START);
    this.caps = {
      protocol: 'v2', reach: ops.reach, precopy: (flags & MIGRATION_PRE_COPY) !== 0, p2p: (flags & MIGRATION_P2P) !== 0,
      dirty: logging ? 'dma-logging' : 'none', migrationFlags: flags,
    };
    this.dirtyLog = logging ? new V2DirtyLog(ops, ranges) : null;
  }

  get name(): string { return this.ops.name; }

  state(): MigState {
    const s = this.ops.getState();
    const n = V2_STATE_NAMES[s];
    if (n === undefined) throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `MIG_DEVICE_STATE reads ${s}, not a state`, { device: this.name, value: s });
    return n;
  }

  setState(target: TargetState): StateChange {
    const from = this.state();
    const path = from === 'ERROR' ? null : v2Path(this.caps.migrationFlags, from, target);
    if (!path) {
      throw new MigError(from === 'ERROR' ? ErrorCode.DEVICE_ERROR_STATE : ErrorCode.BAD_STATE,
        from === 'ERROR' ? 'device is in the ERROR state; a reset is required' : `no allowed transition ${from} -> ${target}`, { device: this.name });
    }
    let cur: V2StateName = from;
    let newSession = false;
    for (const next of path) {
      let fd: number;
      try {
        fd = this.ops.setState(V2_STATE[next]);
      } catch (e) {
        let after: MigState | undefined;
        try { after = this.state(); } catch { /* reported below */ }
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

  estimate(): SizeEstimate {
    let stopCopyBytes: number | null = null;
    try { stopCopyBytes = this.ops.dataSize(); } catch { /* QEMU falls back to a large default; null says "unknown" */ }
    const s = this.state();
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
  readConfig(): Uint8Array { return this.ops.readConfig(); }
  writeConfig(space: Uint8Array): void { this.ops.writeConfig(space); }
  configTarget(): ConfigTargetDesc { return this.ops.configTarget(); }
  geometry(): DeviceGeometry { return this.ops.geometry(); }
  digestTarget() { return this.ops.digestTarget(); }
  vendorError(): string { return this.ops.vendorError?.() ?? ''; }

  reset(): void {
    this.dropFd();
    this.ops.reset();
    trace('vfio_device_reset', { device: this.name });
  }

  close(): void {
    this.dropFd();
    this.ops.close();
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
export class V2DirtyLog implements DirtyLog {
  readonly kind = 'dma-logging' as const;
  readonly sharesDataChannel = false;
  readonly pages: number;
  pageSize = 4096;
  private scratch: Uint8Array;
  constructor(private readonly ops: V2Ops, private readonly ranges: IovaRange[]) {
    this.pages = ranges.reduce((a, r) => a + r.length / 4096, 0);
    this.scratch = new Uint8Array(Math.ceil(Math.max(...ranges.map((r) => r.length / 4096)) / 64) * 8);
  }
  start(): void {
    try {
      this.pageSize = this.ops.dmaStart(4096, this.ranges);
    } catch (e) {
      throw new MigError(ErrorCode.NATIVE, `DMA_LOGGING_START: ${(e as Error).message}`, { device: this.ops.name, errno: errnoOf(e), cause: e });
    }
    if (this.pageSize !== 4096) {
      throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `DMA logging page size ${this.pageSize} (4096 expected)`, { device: this.ops.name, value: this.pageSize });
    }
  }
  report(bitmap: Uint8Array): number {
    let base = 0;
    let found = 0;
    for (const r of this.ranges) {
      const pages = r.length / 4096;
      const bm = this.scratch.subarray(0, Math.ceil(pages / 64) * 8);
      bm.fill(0);
      try {
        this.ops.dmaReport(r.iova, r.length, 4096, bm);
      } catch (e) {
        throw new MigError(ErrorCode.NATIVE, `DMA_LOGGING_REPORT: ${(e as Error).message}`, { device: this.ops.name, errno: errnoOf(e), cause: e });
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
  stop(): void {
    try { this.ops.dmaStop(); } catch { /* stopping is best effort during rollback */ }
  }
}
