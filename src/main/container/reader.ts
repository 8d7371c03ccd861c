// Sequential, bounds-checked reading of a container file. Every length is checked against fixed limits before a
// byte is read into memory, and a short read is an error naming the byte offset.
import fs from 'node:fs';
import { ErrorCode, MigError } from '../errors.js';
import {
  FILE_HEADER_SIZE, MAX_META_BODY, RECORD_HEADER_SIZE, RECORD_NAMES, REC_DEVICE_TABLE, decodeFileHeader, decodeJson,
  decodeRecordHeader, validateDeviceTable, verifyRecord, type DeviceTable, type RecordHeader,
} from './format.js';
import type { DataPathDesc } from '../device/seam.js';
import type { QemuLimits, QemuParseState } from '../protocol/qemu-stream.js';
import type { ConfigTarget } from '../transport/config.js';

export interface RecordRef {
  h: RecordHeader;
  header: Uint8Array;
  /** File offset of the record header. */
  at: number;
  /** Up to the first 16 bytes of the body, read with the header (a data packet's [DATA][size]). */
  peek: Uint8Array;
}

/**
 * Where the loader's records come from: a container file (ContainerReader) or a live connection (src/main/live).
 * Records arrive with each device's CHUNKs in sequence order; `at` is the record's offset in the stream as a file
 * would hold it (the received stream saved to a file has the same offsets).
 */
export interface RecordSource {
  readonly offset: number;
  /** Total bytes, when known in advance (a file). */
  readonly size?: number;
  /** A file descriptor the workers may read bodies from directly (zero-copy load), if the source is a file. */
  readonly descriptor?: number;
  readPreamble(): Promise<DeviceTable>;
  /** The next record header, or null at a clean end. */
  next(): Promise<RecordRef | null>;
  body(r: RecordRef, dst: Uint8Array, dstOff: number, device?: string, verify?: boolean): Promise<Uint8Array>;
  /**
   * Optional: the current record already in shared memory laid out as a staging slot (header at 0, body at 32), for
   * a worker to take without a copy (a network source receives bodies there); null when it has none.
   */
  takeSlot?(r: RecordRef): { sab: SharedArrayBuffer; release: () => void } | null;
  /**
   * Optional: the source applies some devices' records itself, off the main thread (a live receiver's data channels
   * received by worker threads). Called once every destination is RESUMING, before the source is accepted. Returns,
   * per device it took (by table index), a promise that settles once its last record is applied (or it failed and
   * nothing touches the device any more), once the source is ready to apply them; `applied` reports what was applied
   * as it goes (deltas).
   */
  adopt?(devices: AdoptedDevice[], applied: (index: number, r: AppliedDelta) => void): Promise<Map<number, Promise<void>>>;
  /** Optional: the load failed; stop reading (and applying) and wake a pending next() with `e`. */
  fail?(e: MigError): void;
  metaBody<T>(r: RecordRef): Promise<T>;
  /** Skip a body (only called when `descriptor` is set: a worker reads it from there). */
  skip(r: RecordRef): void;
  /** After END: nothing may follow it. */
  checkEnd(): Promise<void>;
  close(): void;
}

/** A destination as a source that applies its records needs it (engine/load.ts Dest). */
export interface AdoptedDevice {
  index: number;
  name: string;
  path: DataPathDesc;
  shared: SharedArrayBuffer;
  limits: QemuLimits;
  parse: QemuParseState;
  config: ConfigTarget;
}

/** Records applied since the last report: the parse state after them and what they moved. */
export interface AppliedDelta {
  parse: QemuParseState;
  dataPackets: number;
  dataBytes: number;
  /** Offset just past the device's last record, in the source's own offsets (a live channel's bytes). */
  streamEnd: number;
}

export class ContainerReader implements RecordSource {
  offset = 0;
  readonly size: number;
  private hdrBuf = new Uint8Array(RECORD_HEADER_SIZE + 16);
  private constructor(private fd: number, readonly path: string) {
    this.size = fs.fstatSync(fd).size;
  }

  static open(path: string): ContainerReader {
    try {
      return new ContainerReader(fs.openSync(path, 'r'), path);
    } catch (e) {
      throw new MigError(ErrorCode.IO, `cannot open stream ${path}: ${(e as Error).message}`, { cause: e });
    }
  }

  close(): void {
    if (this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
  }

  private readExact(dst: Uint8Array, len: number, what: string): Promise<void> {
    const at = this.offset;
    return new Promise((resolve, reject) => {
      let done = 0;
      const step = () => {
        fs.read(this.fd, dst, done, len - done, at + done, (err, n) => {
          if (err) return reject(new MigError(ErrorCode.IO, `reading ${what}: ${err.message}`, { offset: at + done, cause: err }));
          if (n === 0) {
            return reject(new MigError(ErrorCode.STREAM_TRUNCATED, `stream truncated in ${what}: needed ${len} bytes, file ends after ${done}`,
              { offset: at + done }));
          }
          done += n;
          if (done < len) step(); else { this.offset = at + len; resolve(); }
        });
      };
      if (len === 0) resolve(); else step();
    });
  }

  async readFileHeader(): Promise<void> {
    const b = new Uint8Array(FILE_HEADER_SIZE);
    await this.readExact(b, FILE_HEADER_SIZE, 'file header');
    decodeFileHeader(b);
  }

  /**
   * Next record header, or null at a clean end of file. Headers are read synchronously: 48 bytes from the page
   * cache cost microseconds, while a libuv round trip per record cost ~0.3 ms here when the workers kept both cores
   * busy (it was the load path's bottleneck).
   */
  async next(): Promise<RecordRef | null> {
    if (this.offset === this.size) return null;
    const at = this.offset;
    const want = Math.min(this.hdrBuf.length, this.size - at);
    let n: number;
    try {
      n = fs.readSync(this.fd, this.hdrBuf, 0, want, at);
    } catch (e) {
      throw new MigError(ErrorCode.IO, `reading record header: ${(e as Error).message}`, { offset: at, cause: e });
    }
    if (n < RECORD_HEADER_SIZE) {
      throw new MigError(ErrorCode.STREAM_TRUNCATED, `stream truncated in record header: needed ${RECORD_HEADER_SIZE} bytes, file ends after ${n}`,
        { offset: at + n });
    }
    this.offset = at + RECORD_HEADER_SIZE;
    const h = decodeRecordHeader(this.hdrBuf, at);
    const peek = this.hdrBuf.slice(RECORD_HEADER_SIZE, Math.min(n, RECORD_HEADER_SIZE + Math.min(h.length, 16)));
    return { h, header: this.hdrBuf.slice(0, RECORD_HEADER_SIZE), at, peek };
  }

  /** Read the body of `r` into dst[dstOff..] (caller bounded dst from trusted geometry) and verify its checksum. */
  async body(r: RecordRef, dst: Uint8Array, dstOff: number, device?: string, verify = true): Promise<Uint8Array> {
    if (r.h.length > dst.length - dstOff) {
      throw new MigError(ErrorCode.STREAM_TOO_LARGE,
        `${RECORD_NAMES[r.h.type]} record of ${r.h.length} bytes exceeds the ${dst.length - dstOff}-byte buffer for it`,
        { offset: r.at + 4, device, value: r.h.length });
    }
    const view = dst.subarray(dstOff, dstOff + r.h.length);
    await this.readExact(view, r.h.length, `${RECORD_NAMES[r.h.type]} body`);
    // Load defers the check to the worker that consumes the body, keeping hashing off the main thread.
    if (verify) verifyRecord(r.header, view, r.h, r.at, device);
    return view;
  }

  async metaBody<T>(r: RecordRef): Promise<T> {
    const buf = new Uint8Array(Math.min(r.h.length, MAX_META_BODY));
    return decodeJson<T>(await this.body(r, buf, 0), RECORD_NAMES[r.h.type], r.at + RECORD_HEADER_SIZE);
  }

  /** Are `len` bytes at `at` all zero (a region a writer reserved but never filled)? */
  isZero(at: number, len: number): boolean {
    const b = new Uint8Array(len);
    const n = fs.readSync(this.fd, b, 0, len, at);
    return n === len && b.every((x) => x === 0);
  }

  /** The open file descriptor (workers read data packets from it directly). */
  get descriptor(): number { return this.fd; }

  async checkEnd(): Promise<void> {
    if (this.offset !== this.size) {
      throw new MigError(ErrorCode.STREAM_BAD_RECORD, `${this.size - this.offset} bytes follow the END record`, { offset: this.offset });
    }
  }

  /** Skip a body without reading it (inspect of huge files). */
  skip(r: RecordRef): void {
    if (this.offset + r.h.length > this.size) {
      throw new MigError(ErrorCode.STREAM_TRUNCATED, `stream truncated: record at ${r.at} claims ${r.h.length} bytes, file ends at ${this.size}`,
        { offset: this.size });
    }
    this.offset += r.h.length;
  }

  /** Header + device table, which must come first. */
  async readPreamble(): Promise<DeviceTable> {
    await this.readFileHeader();
    const r = await this.next();
    if (!r || r.h.type !== REC_DEVICE_TABLE) {
      throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'the first record must be the DEVICE_TABLE', { offset: FILE_HEADER_SIZE });
    }
    return validateDeviceTable(await this.metaBody<DeviceTable>(r), r.at);
  }
}
