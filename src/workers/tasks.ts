// Messages between the main thread and the worker pool. Everything here survives structured cloning; shared
// memory (locks, counters, staging) travels as SharedArrayBuffers.
import type { RegionDesc } from '../main/protocol/migration-region.js';
import type { QemuLimits, QemuParseState } from '../main/protocol/qemu-stream.js';
import type { RingDesc } from '../main/engine/staging.js';
import type { DirectTarget } from '../main/container/sink.js';
import type { ConfigTarget } from '../main/transport/config.js';
import type { ConfigBlob } from '../main/protocol/config-blob.js';
import type { DataPathDesc } from '../main/device/seam.js';

export interface SaveTask {
  op: 'save';
  region: RegionDesc;
  deviceIndex: number;
  shared: SharedArrayBuffer;
  ring: RingDesc;
  /** iterate: QEMU save_live_iterate packets ([DATA][size][bytes][END]); complete: stop-and-copy ([DATA][size][bytes]). */
  phase: 'iterate' | 'complete';
  /** iterate: stop once this many data bytes were sent (the pending seen at round start, capped by the round's byte bound). */
  budget: number;
  /** iterate: stop after the chunk that passes this time (Date.now() ms; comparable across threads). */
  deadline?: number;
  /**
   * How a chunk with data_size 0 while pending_bytes > 0 is treated. compatible (QEMU): iterate writes [DATA][0][END]
   * and ends the round, complete writes [DATA][0] and ends the drain. strict: retried, and too many in a row is
   * VFM_VENDOR_STUCK.
   */
  vendorMode: VendorMode;
  /** strict, iterate: bound on consecutive empty chunks while pending_bytes > 0. */
  maxEmptyChunks: number;
  /** strict, complete: bound on consecutive stop-and-copy chunks that move no data while pending_bytes > 0. */
  maxNoProgress: number;
  /** This task's lane (0..lanes-1): several lanes may work one device's chunks, one chunk each under the lock. */
  lane: number;
  lanes: number;
  /** Positioned sink: write each record straight from staging to the fd instead of handing it to the main thread. */
  direct?: DirectTarget;
  /** Test only: the worker thread exits while holding the region lock after this many chunks. */
  testExitAfterChunks?: number;
}

export type VendorMode = 'compatible' | 'strict';

/**
 * Save through the device seam's DataPath (v2 data fd, vfio-user v2, ...): the worker imports the module `path`
 * names. QEMU 8.1+'s v2 packets: iterate writes [DATA][n][bytes] then [END], or [DEV_INIT_DATA_SENT] once the
 * initial bytes have drained; an iterate that reads nothing writes the tag alone; complete writes [DATA][n][bytes].
 */
export interface SavePathTask {
  op: 'save-path';
  path: DataPathDesc;
  deviceIndex: number;
  shared: SharedArrayBuffer;
  ring: RingDesc;
  phase: 'iterate' | 'complete';
  budget: number;
  deadline?: number;
  /** Largest read (QEMU's data buffer: the staging chunk). */
  maxRead: number;
  /** PRECOPY_INFO initial_bytes at the round's start (QEMU's precopy_init_size), counted down by each read. */
  initialBytes: number;
  /** Emit DEV_INIT_DATA_SENT when the initial bytes reach 0 (a pre-copy device; not yet sent). */
  initPending: boolean;
  direct?: DirectTarget;
  /** For a data path with its own save (v1 region): see SaveTask. */
  vendorMode?: VendorMode;
  maxEmptyChunks?: number;
  maxNoProgress?: number;
  lane?: number;
  lanes?: number;
  testExitAfterChunks?: number;
}

/** Load one record through the seam's DataPath. */
export interface LoadPathTask extends Omit<LoadTask, 'op' | 'region'> {
  op: 'load-path';
  path: DataPathDesc;
  device: string;
  /** Device-stream offset of the record's body (errors name it). */
  streamOffset: number;
}

export interface SaveResult {
  chunks: number;
  bytes: number;
  /** Chunks written straight from the device's data area to the file (zero-copy; v1 region path only). */
  zeroCopyChunks?: number;
  /** Chunks that came back with data_size 0 while pending_bytes > 0. */
  emptyChunks: number;
  /** compatible: the phase ended on such a chunk. */
  endedEmpty: boolean;
  /** pending_bytes read with the last such chunk. */
  emptyPending: number;
  /** iterate: the round stopped at its byte budget or time bound with data still flowing. */
  bounded?: 'bytes' | 'time';
  /** pending_bytes read after the last chunk (0 in complete). */
  pending: number;
  aborted: boolean;
  lockWaitNs: number;
  lockHoldNs: number;
  /** save-path: DEV_INIT_DATA_SENT was written in this round. */
  initSent?: boolean;
}

export interface LoadTask {
  op: 'load';
  region: RegionDesc;
  deviceIndex: number;
  shared: SharedArrayBuffer;
  /** The slot holding the record: header at [0, 32), body after. */
  slot: SharedArrayBuffer;
  bodyLen: number;
  /** File offset of the record (errors name byte offsets). */
  fileOffset: number;
  parse: QemuParseState;
  limits: QemuLimits;
  config: ConfigTarget;
}

/** One record that is exactly one data packet, loaded zero-copy: the worker reads its data from the file itself. */
export interface DataItem {
  /** File offset of the record header. */
  recordAt: number;
  /** The 32-byte record header followed by the body's first 16 bytes ([DATA][size]). */
  head: Uint8Array;
  size: number;
  /** The body ends with an 8-byte tag after the data (an iterate packet's END). */
  trailer: boolean;
}

/** A batch of consecutive data records of one device (batching hides the per-task round trip). */
export interface LoadDataTask {
  op: 'load-data';
  region: RegionDesc;
  shared: SharedArrayBuffer;
  fd: number;
  items: DataItem[];
  parse: QemuParseState;
  limits: QemuLimits;
  /** Receives trapped pieces. */
  scratch: SharedArrayBuffer;
}

export interface LoadResult {
  parse: QemuParseState;
  dataPackets: number;
  dataBytes: number;
  configLoaded: boolean;
  /** The CONFIG section for the main thread's restore hook (target `hook`), with its blob offset in the stream. */
  config?: ConfigBlob & { offset: number };
}

/** load-data through a data path that loads from the file itself (DataPathDesc.fileLoad: the v1 region). */
export interface LoadDataPathTask extends Omit<LoadDataTask, 'op' | 'region'> {
  op: 'load-data-path';
  path: DataPathDesc;
}

/** Hash an emulated device's state, or read a device's own digest region (handle of a 32-byte region). */
export type DigestTask = { op: 'digest'; id: number; stateSize: number } | { op: 'digest'; digestRegion: number }
  | { op: 'digest'; digestModule: { kind: string; module: string; [k: string]: unknown } };

/** Bench only: the seed's sequential algorithm run natively in this worker (a second thread for the 2-thread limit). */
export interface BaselineTask { op: 'baseline'; handles: number[]; profile: number; bufSize: number; outPath: string }
export interface BaselineResult { bytes: number; ns: number }

export type Task = SavePathTask | LoadPathTask | LoadDataPathTask | DigestTask | BaselineTask;

/** Errors cross the thread boundary as plain objects carrying the MigError fields. */
export interface TaskError { __migError: true; code: string; message: string; device?: string; offset?: number; register?: string; errno?: number }
