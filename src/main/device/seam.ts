// The device seam: how the engine sees a migratable device, whatever the protocol (v1 region in its draft-2019 or
// linux-5.8 layout; v2 feature ioctls + data fd) and whatever the reach (the in-process emulated vendor, a kernel
// VFIO device, a vfio-user server). Two halves:
//   - MigDevice, on the main thread: capabilities, state changes in one vocabulary, size estimates, config, reset,
//     dirty logging, close. It never moves bulk data.
//   - DataPath, in a worker thread: moves the device's stream bytes in chunks (v1: a region chunk; v2: read()/write()
//     on the data fd; vfio-user: socket messages). A worker gets a structured-cloneable DataPathDesc and imports the
//     module it names, so a new reach or protocol needs no edit to the engine and no switch in the worker.
// Each protocol lives in src/main/protocol/<p>/ and each reach in its own folder; docs/ARCHITECTURE.md shows how one
// chunk travels for each combination. This file is types only: it is the contract the reaches are coded against.
import type { TrappedAccess } from '../protocol/migration-region.js';
import type { DigestTarget } from '../transport/transport.js';
import type { DeviceGeometry, DeviceTableEntry } from '../container/format.js';
import type { LoadDataPathTask, LoadPathTask, LoadResult, SavePathTask, SaveResult } from '../../workers/tasks.js';

/**
 * A value now or later. Main-thread seam methods that touch the device return one: an in-process or kernel device
 * answers at once (a plain value, no extra tick), a vfio-user device answers after a socket round trip (a Promise,
 * so the main thread never blocks on the socket). The engine awaits every such call.
 */
export type Awaitable<T> = T | Promise<T>;

/**
 * One vocabulary for device states: the v2 names (enum vfio_device_mig_state). A v1 device has the subset STOP,
 * RUNNING, PRE_COPY (SAVING|RUNNING), STOP_COPY (SAVING), RESUMING and ERROR (SAVING|RESUMING); it has no P2P states.
 */
export type MigState = 'ERROR' | 'STOP' | 'RUNNING' | 'STOP_COPY' | 'RESUMING' | 'RUNNING_P2P' | 'PRE_COPY' | 'PRE_COPY_P2P';
/** A state the engine may ask for: ERROR is entered by a failing device and left only by reset(). */
export type TargetState = Exclude<MigState, 'ERROR'>;

/** The protocol axis. */
export type ProtocolName = 'draft-2019' | 'linux-5.8' | 'v2';
export const PROTOCOLS: readonly ProtocolName[] = ['draft-2019', 'linux-5.8', 'v2'];

/** The reach axis: an open set, each reach registers itself (registry.ts). Known: 'emulated', 'kernel', 'vfio-user'. */
export type ReachKind = string;

/**
 * How guest pages dirtied by the device's DMA are found:
 *  - 'region-pfns'     draft-2019: pfn registers in the migration region, bitmap in its data area (shares the data
 *                      channel, so the engine takes the device lock around a query);
 *  - 'type1-container' linux-5.8: VFIO_IOMMU_DIRTY_PAGES on the container (or the emulated one);
 *  - 'dma-logging'     v2: VFIO_DEVICE_FEATURE_DMA_LOGGING_START / REPORT / STOP on the device;
 *  - 'none'            the device cannot say (QEMU blocks migration unless told otherwise).
 */
export type DirtyTrackingKind = 'none' | 'region-pfns' | 'type1-container' | 'dma-logging';

export interface DeviceCaps {
  protocol: ProtocolName;
  reach: ReachKind;
  /** Live pre-copy exists: v1 always (SAVING|RUNNING); v2 when VFIO_MIGRATION_PRE_COPY is advertised. */
  precopy: boolean;
  /** RUNNING_P2P (and PRE_COPY_P2P with precopy) exist: v2 VFIO_MIGRATION_P2P; never v1. */
  p2p: boolean;
  dirty: DirtyTrackingKind;
  /** v2: the raw VFIO_DEVICE_FEATURE_MIGRATION flags (reports, and the FSM walk). v1: 0. */
  migrationFlags: number;
}

/** Size estimates, as the protocol can give them (all in bytes of the device's opaque stream). */
export interface SizeEstimate {
  /** Still to read in the current saving state: v1 pending_bytes; v2 initial + dirty in a pre-copy state. */
  pending: number;
  /** v2 VFIO_MIG_GET_PRECOPY_INFO initial_bytes (0 outside PRE_COPY / PRE_COPY_P2P and on v1). */
  initialBytes: number;
  /** v2 VFIO_MIG_GET_PRECOPY_INFO dirty_bytes (0 outside PRE_COPY / PRE_COPY_P2P and on v1). */
  dirtyBytes: number;
  /** v2 VFIO_DEVICE_FEATURE_MIG_DATA_SIZE stop_copy_length; null where the device cannot say (v1, or ENOTTY). */
  stopCopyBytes: number | null;
}

/** What one setState() did, arc by arc (each arc is one SET / one device_state write, each traced). */
export interface StateChange {
  from: MigState;
  to: MigState;
  /** The states entered, in order (empty if already there). */
  path: MigState[];
  /** A new data session began on the way (v2: SET returned a data fd). dataPath() describes it. */
  newSession: boolean;
}

/**
 * What a worker needs to reach the device's data: the module to import and its parameters. Structured-cloneable
 * (it crosses to piscina workers); native handles inside it (fds, region handles, emulated ids) are process-global.
 * The module's default export is a DataPathFactory.
 */
export interface DataPathDesc<P = unknown> {
  /** URL of the worker-side module (e.g. new URL('./fd-path.js', import.meta.url).href). */
  module: string;
  /** Device name: every error a data path raises names it. */
  device: string;
  /** Protocol/reach-specific parameters (a data fd, a region descriptor, a socket handle...). */
  params: P;
  /** Several workers may share one phase of this session, each taking the device lock per chunk (v1 region). */
  lanes?: boolean;
  /** Largest chunk the device can stage at once (v1: the region's data area): staging is never sized above it. */
  maxChunk?: number;
  /** The module loads a record that is one data packet straight from the stream file (DataPath.loadFromFile). */
  fileLoad?: boolean;
  /**
   * How long the data channel may make no progress in STOP_COPY or RESUMING before VFM_VENDOR_STUCK (a data fd that
   * neither gives nor takes data): the engine sets it from the migration's or load's vendorStallMs.
   */
  stallMs?: number;
}

/** The session's data path with the caller's stall bound, when it gives one. */
export function withStallBound<P>(path: DataPathDesc<P>, stallMs: number | undefined): DataPathDesc<P> {
  return stallMs === undefined ? path : { ...path, stallMs };
}

/** Outcome of one save read (DataPath.read). */
export type ReadStatus =
  /** `n` > 0 bytes were read. */
  | 'data'
  /** Nothing more for now (v2 PRE_COPY: read 0 or ENOMSG/EAGAIN; v1: pending_bytes 0 in PRE_COPY). */
  | 'later'
  /** The saving state's stream is complete (v2 STOP_COPY: read 0 = EOF; v1: pending_bytes 0 when stopped). */
  | 'end';

export interface ReadResult {
  status: ReadStatus;
  n: number;
  /** The protocol's own pending figure after this read where it has one (v1 pending_bytes), else -1. */
  pending: number;
}

/**
 * Worker-side access to one device's data for one session. All calls happen under the device's Atomics lock
 * (DeviceShared.lock), which serialises them with the main thread's state changes, estimates and dirty queries.
 */
export interface DataPath {
  /**
   * Save: read the next bytes of the device's stream into dst[at, at + max). `phase` says which rule ends the
   * stream: 'precopy' (nothing more for now is normal), 'stopcopy' (only the stream's end ends it; a device that
   * has nothing yet is waited for, bounded by `signal`).
   */
  read(dst: Uint8Array, at: number, max: number, phase: 'precopy' | 'stopcopy', signal?: AbortProbe): ReadResult;
  /**
   * Load: give src[at, at + n) to the device, in order, split as the device needs. A refusal throws MigError
   * LOAD_REJECTED naming the device and `streamOffset` (the device-stream offset of src[at]).
   */
  write(src: Uint8Array, at: number, n: number, streamOffset: number, signal?: AbortProbe): void;
  /** Release per-session worker resources (never the device's own fd: the main thread owns that). */
  close?(): void;
  /**
   * Optional whole-task forms, for a protocol whose hot path is not read()/write() into staging: the v1 region
   * writes a record straight from its mmap'd data area to the file and loads one straight from the file into it,
   * checks vendor hints (vendor modes) and serves several lanes. When present the worker hands it the task.
   */
  save?(task: SavePathTask): SaveResult;
  load?(task: LoadPathTask): LoadResult;
  /** Zero-copy load of records that are each one data packet (null: the addon cannot, e.g. no SSE4.2). */
  loadFromFile?(task: LoadDataPathTask): LoadResult | null;
}

/** Polled while a data path waits for a slow device, so a cancel lands within ~100 ms. */
export type AbortProbe = () => boolean;

/** Default export of a data-path module. */
export type DataPathFactory = (desc: DataPathDesc) => DataPath;

/**
 * Dirty-page logging of guest memory the device DMA-writes (the VMM migrates guest RAM; vfio-mig says which pages
 * the devices dirtied). Bit i of a report = page i of the device's guest range.
 */
export interface DirtyLog {
  readonly kind: DirtyTrackingKind;
  readonly pageSize: number;
  /** Pages covered (bits in a full report). */
  readonly pages: number;
  /** The query goes through the device's data channel (draft-2019): the engine holds the device lock around it. */
  readonly sharesDataChannel: boolean;
  start(): Awaitable<void>;
  /** OR the pages dirtied since the last report into `bitmap` (>= ceil(pages/8) bytes) and clear them; returns pages. */
  report(bitmap: Uint8Array): Awaitable<number>;
  stop(): Awaitable<void>;
}

/** How a worker applies a loaded config blob (structured-cloneable, like DataPathDesc). */
export interface ConfigTargetDesc { module?: string; kind: string; [k: string]: unknown }

/**
 * The main thread's view of one device. Every method may throw (or reject with) MigError naming the device; none
 * moves bulk data. Calls that touch the device are made under the device's lock by the engine, which awaits each
 * Awaitable result and holds the lock across the await (workers wait for it; the main thread's event loop does not).
 * name, caps, dataPath, geometry, digestTarget, configTarget and vendorError answer from what the object knows.
 */
export interface MigDevice {
  readonly name: string;
  readonly caps: DeviceCaps;
  /** Current state (v2: MIG_DEVICE_STATE GET; v1: device_state). A device in ERROR reports 'ERROR'. */
  state(): Awaitable<MigState>;
  /**
   * Go to `target` through the protocol's FSM, one arc at a time (v2: the vfio_mig_get_next_state table; v1: its
   * NEXT_STATE table). A refused arc throws TRANSITION_FAILED naming it (DEVICE_ERROR_STATE if the device went to
   * ERROR); the device is then in whichever state the protocol reports.
   */
  setState(target: TargetState): Awaitable<StateChange>;
  /** Size estimates for the current state (cheap; called once per pre-copy round). */
  estimate(): Awaitable<SizeEstimate>;
  /** The current data session for workers, or null outside saving/resuming states. */
  dataPath(): DataPathDesc | null;
  /** Config space save/restore (the embedder may replace this with its own hook). */
  readConfig(): Awaitable<Uint8Array>;
  writeConfig(space: Uint8Array): Awaitable<void>;
  /** For a worker that restores config while loading. */
  configTarget(): ConfigTargetDesc;
  /** VFIO_DEVICE_RESET: back to RUNNING, data sessions closed; the only way out of ERROR. */
  reset(): Awaitable<void>;
  /** v1 region data: how trapped (non-mmap) pieces are accessed (docs/CONFIG.md); a data fd has no such choice. */
  setTrappedAccess?(mode: TrappedAccess): void;
  /** Dirty logging of its DMA, or null if it has none. */
  readonly dirtyLog: DirtyLog | null;
  /** What a destination needs to be made identical (recorded in the container's device table). */
  geometry(): DeviceGeometry;
  /** An emulated device can digest its state for verification; others return null. */
  digestTarget(): DigestTarget | null;
  /** Vendor's own text for the last failure, if the reach can tell (emulated lastError). */
  vendorError?(): string;
  /** Close sessions and handles this object opened (never fds an embedder handed over). */
  close(): Awaitable<void>;
  /**
   * Release a call to the device in progress now, without waiting for the device (the engine calls it on cancel and
   * when another device fails): the call fails with VFM_CANCELLED. Where the reach can (vfio-user: the request
   * waiting for a stalled server gives its libuv pool thread back); absent or a no-op elsewhere.
   */
  interrupt?(): void;
}

/** A reach's entry in the registry: how to make a destination for a device-table entry of this reach. */
export interface ReachProvider {
  readonly kind: ReachKind;
  /** The prefix that names one of its devices in a device spec (`vfio` for `vfio:<sysfs path>`), if it has one. */
  readonly scheme?: string;
  /**
   * A destination device for `entry` (protocol in entry.profile), or a MigError explaining why it cannot (a reach
   * that must connect first, e.g. over a socket, returns a Promise). `target` is where the caller says the
   * destination is (a spec without its `scheme:`); without it, the reach's default for the entry (emulated: a fresh
   * device of the entry's geometry; kernel: the device of the entry's name on this host). The loader that asked owns
   * what it gets and closes it.
   */
  destination?(entry: DeviceTableEntry, target?: string): Awaitable<MigDevice>;
}
