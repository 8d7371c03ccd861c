// The last step of every saved chunk, shared by the v1 region loop and the seam's data-path loop: checksum the
// CHUNK record staged in `view` (header at 0, body after), then write it at its reserved file position (a
// positioned sink) or hand it to the main thread through the staging ring.
import { RECORD_HEADER_SIZE, REC_CHUNK, writeRecordHeader } from '../main/container/format.js';
import { crc32c } from '../main/container/checksum.js';
import { fillHole, writeAt, type DirectTarget } from '../main/container/sink.js';
import { ErrorCode } from '../main/errors.js';
import type { StagingRing } from '../main/engine/staging.js';

export function emitRecord(view: Uint8Array, deviceIndex: number, rec: { seq: bigint; offset: bigint }, bodyLen: number,
  direct: DirectTarget | undefined, pos: number, ring: StagingRing): void {
  const body = view.subarray(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + bodyLen);
  writeRecordHeader(view, REC_CHUNK, deviceIndex, rec.seq, rec.offset, body, crc32c(body));
  if (!direct) { ring.publish(RECORD_HEADER_SIZE + bodyLen); return; }
  try {
    writeAt(direct, view, RECORD_HEADER_SIZE + bodyLen, pos);
  } catch (e) {
    fillHole(direct, pos, RECORD_HEADER_SIZE + bodyLen, ErrorCode.IO); // the reserved place never stays a hole
    throw e;
  }
}
