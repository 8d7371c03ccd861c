// Piscina worker: moves device data. save: region -> staging slots (framed as container CHUNK records with QEMU
// packets inside, checksummed here so the main thread never touches the bytes); load: staging slot -> region in
// the profile's write order; digest: hash an emulated device's state.
import { native } from '../addon/native.js';
import { MigError, ErrorCode, accessErrorCode, toMigError } from '../main/errors.js';
import { DeviceShared } from '../main/engine/device-shared.js';
import { OWNER_WORKER, type RegionLock } from '../main/engine/region-lock.js';
import { StagingRing } from '../main/engine/staging.js';
import { MigrationRegion } from '../main/protocol/migration-region.js';
import {
  DATA_PREFIX, FLAG_DEV_DATA_STATE, FLAG_END_OF_STATE, acceptData, parsePackets, putBe64,
} from '../main/protocol/qemu-stream.js';
import { RECORD_HEADER_SIZE, REC_CHUNK, decodeRecordHeader, fillRecordHeader, headerCrc } from '../main/container/format.js';
import { emulatedDigest } from '../main/emulated/device.js';
import { fillHole, reservePosition } from '../main/container/sink.js';
import { crc32c, nativeCrcAvailable, simulateNoSse42 } from '../main/container/checksum.js';
import { workerData } from 'node:worker_threads';
import fs from 'node:fs';
import { applyRecord, loadDataPath, loadPath, savePath } from './path-tasks.js';
import { importDefault } from '../main/device/registry.js';
import { emitRecord } from './emit-record.js';
import type { BaselineResult, BaselineTask, DataItem, DigestTask, LoadDataTask, LoadResult, LoadTask, SaveResult, SaveTask, Task, TaskError } from './tasks.js';


function now(): bigint { return process.hrtime.bigint(); }

// Bulk data threads run below the main thread, which answers dirty-bitmap queries and drives the state machine: on
// a machine with as many workers as cores, the main thread then gets the CPU as soon as it wakes.
// The test entry point's noSse42 pool (engine/test-hooks.ts): checksums and data paths as without SSE4.2.
if ((workerData as { noSse42?: boolean } | undefined)?.noSse42) simulateNoSse42();
/** The zero-copy record write and read need the addon's SSE4.2 CRC32C (they sum while they move the bytes). */
const zeroCopy = nativeCrcAvailable();

try { native().lowerThreadPriority(Number(process.env.VFIO_MIG_WORKER_NICE ?? 5)); } catch { /* best effort */ }

/** The v1 region's save loop (reached through protocol/v1/region-path.ts). */
export function save(t: SaveTask): SaveResult {
  const ring = new StagingRing(t.ring);
  const shared = new DeviceShared(t.shared);
  const region = new MigrationRegion(t.region);
  const lock = shared.lock;
  const iterate = t.phase === 'iterate';
  const trailer = iterate ? 8 : 0;
  const payloadAt = RECORD_HEADER_SIZE + DATA_PREFIX;
  const r: SaveResult = { chunks: 0, bytes: 0, zeroCopyChunks: 0, emptyChunks: 0, endedEmpty: false, emptyPending: 0, pending: 0, aborted: false, lockWaitNs: 0, lockHoldNs: 0 };
  const compatible = t.vendorMode === 'compatible';
  const maxEmpty = iterate ? t.maxEmptyChunks : t.maxNoProgress;
  let empty = 0;
  try {
    for (;;) {
      if (shared.done) break;
      // A round is bounded by bytes and time, whatever pending_bytes promised (an over-estimating vendor with a busy
      // workload would otherwise never end it). Each round moves at least one chunk.
      if (iterate && shared.sent > 0) {
        if (shared.sent >= t.budget) { r.bounded = 'bytes'; break; }
        if (t.deadline !== undefined && Date.now() >= t.deadline) { r.bounded = 'time'; break; }
      }
      // Direct mode: each lane owns one slot (records go straight to the file); ring mode: wait for a free slot.
      const s = t.direct ? t.lane : ring.acquireSync();
      if (s < 0 || ring.aborted) { r.aborted = true; break; }
      const view = ring.slot(s);
      const capacity = view.length - 64; // [0, 64): record head; the data (or trapped scratch) from 48 or 64 on
      const t0 = now();
      lock.lockSync(OWNER_WORKER);
      const t1 = now();
      // Under the lock: one protocol step (pending -> data_offset -> data_size -> copy), and the record's place in
      // the device's sequence and in the file, so lanes of one device keep its order.
      let info;
      let bodyLen = 0;
      let rec = { seq: 0n, offset: 0n };
      let pos = -1;
      let written = false;
      try {
        if (shared.done) break;
        info = region.nextChunk(capacity);
        // Cancelled while the vendor staged (perhaps slowly): nothing more goes to the file, and the main thread,
        // which did not wait for this call, owns the device again once the lock is free.
        if (ring.aborted) { r.aborted = true; break; }
        if (info.pending === 0n) {
          shared.setDone();
          // QEMU: an iterate call that finds nothing pending still writes [DATA][0][END].
          if (iterate && shared.sent === 0 && shared.claimEmpty()) bodyLen = 24;
        } else if (info.size > 0) {
          bodyLen = DATA_PREFIX + info.size + trailer;
          shared.addSent(info.size);
        } else if (compatible) {
          // QEMU: data_size 0 ends the drain (complete writes [DATA][0]) or the iterate call ([DATA][0][END]).
          shared.setDone();
          if (shared.claimEmpty()) bodyLen = DATA_PREFIX + trailer;
        }
        if (bodyLen) {
          rec = shared.reserve(bodyLen);
          if (t.direct) pos = reservePosition(t.direct, RECORD_HEADER_SIZE + bodyLen);
        }
        if (info.size > 0) {
          frame(view, info.size, iterate);
          if (t.direct && zeroCopy) {
            // Zero-copy: data area -> file in one pwritev, checksummed on the way (the lock covers the write, since
            // the bytes are read from the device's data area).
            fillRecordHeader(view, REC_CHUNK, t.deviceIndex, rec.seq, rec.offset, bodyLen);
            written = region.sendRecord(info.dataOffset, info.size, view, t.direct.fd, pos, iterate) >= 0;
          }
          if (!written) region.copyOut(info.dataOffset, info.size, view, payloadAt);
        }
      } catch (e) {
        shared.setDone(); // stop the other lanes too
        if (pos >= 0 && t.direct) fillHole(t.direct, pos, RECORD_HEADER_SIZE + bodyLen, (e as MigError).code ?? ErrorCode.IO);
        throw e;
      } finally {
        if (t.testExitAfterChunks !== undefined && r.chunks >= t.testExitAfterChunks) process.exit(86); // dies holding the lock
        lock.unlock();
      }
      r.lockWaitNs += Number(t1 - t0);
      r.lockHoldNs += Number(now() - t1);
      r.pending = Number(info.pending);
      // Only a chunk that moves no data is a lack of progress: pending_bytes is a hint, and a vendor that reports an
      // upper bound (constant while data flows) is draining fine.
      if (info.pending > 0n && info.size === 0) {
        r.emptyChunks++;
        r.emptyPending = r.pending;
        if (compatible) r.endedEmpty = true;
        else if (++empty > maxEmpty) {
          shared.setDone();
          throw new MigError(ErrorCode.VENDOR_STUCK,
            `${iterate ? 'pre-copy' : 'stop-and-copy'}: vendor staged ${empty} chunks in a row with data_size 0 while pending_bytes is ${info.pending}: it never drains (strict vendor mode; compatible mode ends the ${iterate ? 'round' : 'drain'} there as QEMU does)`,
            { device: region.device, register: 'data_size', value: 0 });
        } else continue;
      } else empty = 0;
      if (bodyLen && !written) {
        // Outside the lock: frame, checksum, write or hand to the main thread.
        putBe64(view, RECORD_HEADER_SIZE, FLAG_DEV_DATA_STATE);
        putBe64(view, RECORD_HEADER_SIZE + 8, BigInt(info.size));
        if (iterate) putBe64(view, payloadAt + info.size, FLAG_END_OF_STATE);
        emitRecord(view, t.deviceIndex, rec, bodyLen, t.direct, pos, ring);
      }
      if (info.size > 0) { r.chunks++; r.bytes += info.size; if (written) r.zeroCopyChunks!++; }
      if (info.pending === 0n || r.endedEmpty) break;
    }
    if (!r.aborted && !ring.aborted && r.pending !== 0 && t.lane === 0) {
      // Re-reading pending_bytes marks the last chunk consumed and tells the main thread what is left.
      lock.lockSync(OWNER_WORKER);
      try { r.pending = Number(region.read('pending_bytes')); } finally { lock.unlock(); }
    }
  } finally {
    ring.finish();
  }
  return r;
}

export function load(t: LoadTask): LoadResult {
  const region = new MigrationRegion(t.region);
  return applyRecord(t, t.region.device, (slot, e) => {
    try {
      region.loadChunk(slot, e.dataAt, e.size);
    } catch (err) {
      throw rejected(err, region.device, e.at);
    }
  });
}

export function loadData(t: LoadDataTask): LoadResult | null {
  const region = new MigrationRegion(t.region);
  const lock = new DeviceShared(t.shared).lock;
  const scratch = new Uint8Array(t.scratch);
  const res: LoadResult = { parse: t.parse, dataPackets: 0, dataBytes: 0, configLoaded: false };
  for (const it of t.items) {
    if (!loadDataItem(t, it, region, lock, scratch)) return null;
    res.dataPackets++;
    res.dataBytes += it.size;
  }
  return res;
}

function loadDataItem(t: LoadDataTask, it: DataItem, region: MigrationRegion, lock: RegionLock, scratch: Uint8Array): boolean {
  const header = it.head.subarray(0, RECORD_HEADER_SIZE);
  const prefix = it.head.subarray(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + DATA_PREFIX);
  const h = decodeRecordHeader(header, it.recordAt);
  const st = t.parse;
  const bodyAt = it.recordAt + RECORD_HEADER_SIZE;
  // Validate everything that is not the data before the device is touched: the packet head, then the trailer.
  acceptData(st, BigInt(it.size), bodyAt, bodyAt + 8, t.limits, region.device);
  let tail: Uint8Array | undefined;
  if (it.trailer) {
    tail = new Uint8Array(8);
    const n = fs.readSync(t.fd, tail, 0, 8, bodyAt + DATA_PREFIX + it.size);
    if (n !== 8) throw new MigError(ErrorCode.STREAM_TRUNCATED, 'stream ends inside a record', { device: region.device, offset: bodyAt + DATA_PREFIX + it.size + n });
    parsePackets(st, tail, 0, 8, bodyAt + DATA_PREFIX + it.size, t.limits, region.device);
  }
  lock.lockSync(OWNER_WORKER);
  try {
    return region.loadFromFile(t.fd, bodyAt + DATA_PREFIX, it.size, scratch, crc32c(prefix), (crc) => {
      const body = tail ? crc32c(tail, crc) : crc;
      if (headerCrc(header, body) !== h.crc) {
        throw new MigError(ErrorCode.STREAM_CHECKSUM, 'CHUNK record checksum mismatch', { offset: it.recordAt, device: region.device });
      }
    });
  } catch (err) {
    if ((err as MigError).code === ErrorCode.STREAM_CHECKSUM || (err as MigError).code === ErrorCode.STREAM_TRUNCATED) throw err;
    throw rejected(err, region.device, bodyAt);
  } finally {
    lock.unlock();
  }
}

/** A vendor refusal while loading: name the stream byte offset and the vendor's own reason. */
function rejected(err: unknown, device: string, offset: number): MigError {
  // The addon's message already carries the emulated vendor's own reason (its lastError). A destination server that
  // died, stalled or broke the protocol keeps its own code: that is not the vendor judging the data.
  return new MigError(accessErrorCode((err as MigError).errno, ErrorCode.LOAD_REJECTED), `destination rejected the data packet at stream offset ${offset}: ${(err as Error).message}`,
    { device, offset, errno: (err as MigError).errno, cause: err });
}

function baseline(t: BaselineTask): BaselineResult {
  const fd = fs.openSync(t.outPath, 'w');
  try {
    const buf = new Uint8Array(t.bufSize);
    const t0 = process.hrtime.bigint();
    const bytes = native().baselineSequentialSave(t.handles, t.profile, buf, fd);
    return { bytes, ns: Number(process.hrtime.bigint() - t0) };
  } finally {
    fs.closeSync(fd);
  }
}

let digestScratch: Uint8Array | undefined; // reused across tasks: fresh 4 MiB per device would be paged in every time

async function digest(t: DigestTask): Promise<string> {
  if ('digestModule' in t) {
    // A reach's own digest (DigestTarget.module), imported once per thread as data-path modules are.
    const url = t.digestModule.module;
    const d = (await importDefault<(t: unknown) => string>(url, 'digest module', 'default export'))(t.digestModule);
    if (typeof d !== 'string' || !/^sha256:[0-9a-f]{64}$/.test(d)) throw new MigError(ErrorCode.WORKER_FAILED, `digest module ${url} returned ${String(d).slice(0, 80)}, not sha256:<64 hex>`);
    return d;
  }
  if ('digestRegion' in t) {
    // A device that reports its own digest (the vfio-user device server's digest region): 32 bytes, read whole.
    const b = new Uint8Array(32);
    native().regionCopyOut(t.digestRegion, 0, 32, b, 0);
    return 'sha256:' + Buffer.from(b).toString('hex');
  }
  digestScratch ??= new Uint8Array(4 << 20);
  return emulatedDigest(t.id, t.stateSize, digestScratch);
}

/** Normalised here, where it happens: an ENOENT, an addon ERR_ARG or a TypeError never crosses as a raw code. */
function toTaskError(e: unknown, device?: string): TaskError {
  const m = toMigError(e, { device });
  return {
    __migError: true, code: m.code, message: m.message, device: m.device, offset: m.offset, register: m.register, errno: m.errno,
  };
}

/** The [DATA][size] prefix at 32 and the [END] trailer at 48 for the zero-copy writer's record head. */
function frame(view: Uint8Array, size: number, iterate: boolean): void {
  putBe64(view, RECORD_HEADER_SIZE, FLAG_DEV_DATA_STATE);
  putBe64(view, RECORD_HEADER_SIZE + 8, BigInt(size));
  if (iterate) putBe64(view, RECORD_HEADER_SIZE + DATA_PREFIX, FLAG_END_OF_STATE);
}

export default async function run(task: Task): Promise<unknown> {
  try {
    switch (task.op) {
      case 'save-path': return await savePath(task);
      case 'load-path': return await loadPath(task);
      case 'load-data-path': return await loadDataPath(task);
      case 'digest': return await digest(task);
      case 'baseline': return baseline(task);
      default: throw new Error(`unknown task ${(task as { op: string }).op}`);
    }
  } catch (e) {
    // Returned, not thrown: piscina would flatten a thrown MigError into a plain Error and lose the code.
    return toTaskError(e, 'path' in task ? task.path.device : undefined);
  }
}
