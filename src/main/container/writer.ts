// Writes the container: file header, device table, CHUNK records (from worker-filled staging slots, or small ones
// built here), END with each device's final digest, or ABORT.
import type { DeviceShared } from '../engine/device-shared.js';
import type { Sink } from './sink.js';
import {
  NO_DEVICE, RECORD_HEADER_SIZE, REC_ABORT, REC_CHUNK, REC_DEVICE_TABLE, REC_END, encodeFileHeader, encodeJson,
  writeRecordHeader, type AbortRecord, type DeviceTable, type EndRecord,
} from './format.js';

export class ContainerWriter {
  records = 0;
  constructor(readonly sink: Sink) {}

  async begin(table: DeviceTable): Promise<void> {
    await this.sink.write(encodeFileHeader(Date.now()));
    await this.meta(REC_DEVICE_TABLE, encodeJson(table));
  }

  /** A CHUNK record whose 32-byte header a worker already filled (slot view is header + body). */
  slot(view: Uint8Array): Promise<void> {
    this.records++;
    return this.sink.write(view);
  }

  /** A small CHUNK of QEMU bytes produced on the main thread (setup, complete END, config). */
  deviceBytes(device: number, shared: DeviceShared, body: Uint8Array): Promise<void> {
    const rec = new Uint8Array(RECORD_HEADER_SIZE + body.length);
    rec.set(body, RECORD_HEADER_SIZE);
    const { seq, offset } = shared.reserve(body.length);
    writeRecordHeader(rec, REC_CHUNK, device, seq, offset, rec.subarray(RECORD_HEADER_SIZE));
    this.records++;
    return this.sink.write(rec);
  }

  end(e: EndRecord): Promise<void> { return this.meta(REC_END, encodeJson(e)); }
  abort(a: AbortRecord): Promise<void> { return this.meta(REC_ABORT, encodeJson(a)); }

  private meta(type: number, body: Uint8Array): Promise<void> {
    const rec = new Uint8Array(RECORD_HEADER_SIZE + body.length);
    rec.set(body, RECORD_HEADER_SIZE);
    writeRecordHeader(rec, type, NO_DEVICE, 0n, 0n, rec.subarray(RECORD_HEADER_SIZE));
    this.records++;
    return this.sink.write(rec);
  }
}
