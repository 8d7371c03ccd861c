// Worker tasks that move a device's data through the device seam's DataPath (src/main/device/seam.ts): the module
// named in the task's descriptor is imported here, so a new protocol or reach needs no edit to this file.
import { openDataPath } from '../main/device/registry.js';
import type { DataPath } from '../main/device/seam.js';
import { DeviceShared } from '../main/engine/device-shared.js';
import { OWNER_WORKER } from '../main/engine/region-lock.js';
import { StagingRing } from '../main/engine/staging.js';
import { ErrorCode, MigError } from '../main/errors.js';
import {
  DATA_PREFIX, FLAG_DEV_DATA_STATE, FLAG_DEV_INIT_DATA_SENT, FLAG_END_OF_STATE, parsePackets, putBe64,
} from '../main/protocol/qemu-stream.js';
import { decodeConfigBlob } from '../main/protocol/config-blob.js';
import { RECORD_HEADER_SIZE, decodeRecordHeader, verifyRecord } from '../main/container/format.js';
import { reservePosition } from '../main/container/sink.js';
import { applyConfig, loadConfigModule, type ConfigTarget } from '../main/transport/config.js';
import { emitRecord } from './emit-record.js';
import type { LoadDataPathTask, LoadPathTask, LoadResult, LoadTask, SavePathTask, SaveResult } from './tasks.js';

export async function savePath(t: SavePathTask): Promise<SaveResult> {
  const path = await openDataPath(t.path);
  if (path.save) return path.save(t);
  const ring = new StagingRing(t.ring);
  const shared = new DeviceShared(t.shared);
  const lock = shared.lock;
  const iterate = t.phase === 'iterate';
  const r: SaveResult = {
    chunks: 0, bytes: 0, emptyChunks: 0, endedEmpty: false, emptyPending: 0, pending: 0, aborted: false, lockWaitNs: 0, lockHoldNs: 0,
    initSent: false,
  };
  let initialLeft = t.initialBytes;
  let initPending = t.initPending;
  const stop = () => shared.done || ring.aborted;
  try {
    for (;;) {
      if (shared.done) break;
      if (iterate && shared.sent > 0 && shared.sent >= t.budget) { r.bounded = 'bytes'; break; }
      if (iterate && shared.sent > 0 && t.deadline !== undefined && Date.now() > t.deadline) { r.bounded = 'time'; break; }
      const s = t.direct ? 0 : ring.acquireSync();
      if (s < 0 || ring.aborted) { r.aborted = true; break; }
      const view = ring.slot(s);
      const at = RECORD_HEADER_SIZE + DATA_PREFIX;
      const t0 = process.hrtime.bigint();
      lock.lockSync(OWNER_WORKER);
      const t1 = process.hrtime.bigint();
      let n = 0;
      let status: string;
      let bodyLen = 0;
      let rec = { seq: 0n, offset: 0n };
      let pos = -1;
      try {
        if (shared.done) break;
        const res = path.read(view, at, Math.min(t.maxRead, view.length - at - 8), iterate ? 'precopy' : 'stopcopy', stop);
        status = res.status;
        n = res.n;
        // QEMU's vfio_save_iterate: one block, then DEV_INIT_DATA_SENT once the initial bytes are all read, else END;
        // an iterate that read nothing still writes its tag (the first lane's empty round only).
        const tagOnly = iterate && n === 0 && shared.sent === 0 && shared.claimEmpty();
        if (n > 0 || tagOnly) {
          bodyLen = (n > 0 ? DATA_PREFIX + n : 0) + (iterate ? 8 : 0);
          rec = shared.reserve(bodyLen);
          if (n > 0) shared.addSent(n);
          if (t.direct) pos = reservePosition(t.direct, RECORD_HEADER_SIZE + bodyLen);
        }
        if (status !== 'data') shared.setDone();
      } catch (e) {
        shared.setDone();
        throw e;
      } finally {
        lock.unlock();
      }
      r.lockWaitNs += Number(t1 - t0);
      r.lockHoldNs += Number(process.hrtime.bigint() - t1);
      if (bodyLen) {
        let p = RECORD_HEADER_SIZE;
        if (n > 0) {
          p = putBe64(view, p, FLAG_DEV_DATA_STATE);
          putBe64(view, p, BigInt(n));
          p = at + n;
          initialLeft = Math.max(0, initialLeft - n);
        }
        if (iterate) {
          const init = initPending && initialLeft === 0;
          if (init) { initPending = false; r.initSent = true; }
          putBe64(view, p, init ? FLAG_DEV_INIT_DATA_SENT : FLAG_END_OF_STATE);
        }
        emitRecord(view, t.deviceIndex, rec, bodyLen, t.direct, pos, ring);
        if (n > 0) { r.chunks++; r.bytes += n; }
      }
      if (status !== 'data') break;
    }
  } finally {
    ring.finish();
  }
  return r;
}

export async function loadPath(t: LoadPathTask): Promise<LoadResult> {
  const path = await openDataPath(t.path);
  // A reach's own config restore (ConfigTargetDesc.module) is imported here, as its data path is.
  await loadConfigModule(t.config as ConfigTarget | undefined, t.path.device);
  return loadPathWith(path, t);
}

/** One record into a device through a data path already open (a live channel's receive worker keeps its own). */
export function loadPathWith(path: DataPath, t: LoadPathTask): LoadResult {
  if (path.load) return path.load(t);
  const base = t.fileOffset + RECORD_HEADER_SIZE;
  return applyRecord(t, t.device, (slot, e) => {
    // The device stream offset of these bytes: the record's stream offset plus their place in its body.
    try {
      path.write(slot, e.dataAt, e.size, t.streamOffset + (e.dataAt - RECORD_HEADER_SIZE));
    } catch (err) {
      (err as MigError & { fileOffset?: number }).fileOffset = base + (e.dataAt - RECORD_HEADER_SIZE);
      throw err;
    }
  });
}

/**
 * One staged record (header at [0, 32) of the slot, body after) into a device: checked and parsed whole before the
 * first byte reaches the device, then each data packet through `write` under the device lock, and the CONFIG
 * section applied to the task's config target. Shared by the seam's data paths and the v1 region loop.
 */
export function applyRecord(t: Pick<LoadTask, 'slot' | 'bodyLen' | 'fileOffset' | 'parse' | 'limits' | 'shared' | 'config'>, device: string,
  write: (slot: Uint8Array, e: { dataAt: number; size: number; at: number }) => void): LoadResult {
  const slot = new Uint8Array(t.slot);
  const header = slot.subarray(0, RECORD_HEADER_SIZE);
  const body = slot.subarray(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + t.bodyLen);
  const h = decodeRecordHeader(header, t.fileOffset);
  verifyRecord(header, body, h, t.fileOffset, device);
  const lock = new DeviceShared(t.shared).lock;
  const st = t.parse;
  const events = parsePackets(st, slot, RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + t.bodyLen, t.fileOffset + RECORD_HEADER_SIZE, t.limits, device);
  const res: LoadResult = { parse: st, dataPackets: 0, dataBytes: 0, configLoaded: false };
  for (const e of events) {
    if (e.kind === 'data' && e.size > 0) {
      lock.lockSync(OWNER_WORKER);
      try {
        write(slot, e);
      } finally {
        lock.unlock();
      }
      res.dataPackets++;
      res.dataBytes += e.size;
    } else if (e.kind === 'config') {
      const blobOff = t.fileOffset + e.blobAt;
      const blob = applyConfig(t.config as ConfigTarget, decodeConfigBlob(slot.subarray(e.blobAt, e.blobAt + e.len), device, blobOff), device, blobOff);
      if (blob) res.config = { ...blob, offset: blobOff };
      res.configLoaded = true;
    }
  }
  return res;
}

/** Records that are each one data packet, loaded straight from the stream file by a data path that can (fileLoad). */
export async function loadDataPath(t: LoadDataPathTask): Promise<LoadResult | null> {
  const path = await openDataPath(t.path);
  if (!path.loadFromFile) throw new MigError(ErrorCode.BAD_ARGUMENT, 'this data path cannot load from the stream file', { device: t.path.device });
  return path.loadFromFile(t);
}
