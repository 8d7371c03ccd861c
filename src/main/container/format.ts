// The vfio-mig stream container (docs/FORMAT.md): one file carrying any number of device streams, interleaved.
// Little-endian framing around opaque payloads; each CHUNK payload is a run of whole QEMU packets of one device, so a
// device's exact QEMU byte stream is the concatenation of its CHUNK payloads in sequence order.
import { crc32c } from './checksum.js';
import { ErrorCode, MigError } from '../errors.js';
import { registeredReaches } from '../device/registry.js';

export const FILE_MAGIC = 'VFMIGSTR';
export const FILE_VERSION = 1;
export const FILE_HEADER_SIZE = 32;
export const RECORD_HEADER_SIZE = 32;

export const REC_DEVICE_TABLE = 1;
export const REC_CHUNK = 2;
export const REC_END = 3;
export const REC_ABORT = 4;
export const RECORD_NAMES: Record<number, string> = { 1: 'DEVICE_TABLE', 2: 'CHUNK', 3: 'END', 4: 'ABORT' };
export const NO_DEVICE = 0xffffffff;

/** Metadata records (JSON bodies) are small; never read more than this for one. */
export const MAX_META_BODY = 1 << 20;
/** Hard ceiling for any CHUNK body, whatever a device table claims. */
export const MAX_CHUNK_BODY = (256 << 20) + 64;

export interface RecordHeader {
  type: number;
  length: number;
  device: number;
  crc: number;
  seq: bigint;
  streamOffset: bigint;
}

export interface DeviceGeometry {
  stateSize: number;
  maxChunk: number;
  dataMode: string;
  offsetPolicy: string;
  guestPages: number;
  regionSize: number;
  /** v2: the VFIO_MIGRATION_* flags of the source (a destination is made with the same). */
  migFlags?: number;
}

export interface DeviceTableEntry {
  index: number;
  name: string;
  profile: string;
  transport: string;
  geometry: DeviceGeometry;
}
export interface DeviceTable { version: number; devices: DeviceTableEntry[] }

export interface EndDevice {
  index: number;
  name: string;
  finalState: string;
  digest: string;
  streamBytes: number;
  records: number;
}
export interface EndRecord { devices: EndDevice[] }
export interface AbortRecord { code: string; message: string; device?: string }

export function encodeFileHeader(createdMs: number): Uint8Array {
  const b = new Uint8Array(FILE_HEADER_SIZE);
  const dv = new DataView(b.buffer);
  b.set(Buffer.from(FILE_MAGIC, 'latin1'), 0);
  dv.setUint32(8, FILE_VERSION, true);
  dv.setUint32(12, FILE_HEADER_SIZE, true);
  dv.setBigUint64(16, BigInt(createdMs), true);
  dv.setUint32(24, 0, true);
  dv.setUint32(28, crc32c(b.subarray(0, 28)), true);
  return b;
}

export function decodeFileHeader(b: Uint8Array): { version: number; createdMs: number } {
  if (b.length < FILE_HEADER_SIZE) {
    throw new MigError(ErrorCode.STREAM_TRUNCATED, `file is ${b.length} bytes, shorter than the ${FILE_HEADER_SIZE}-byte header`, { offset: b.length });
  }
  const magic = Buffer.from(b.subarray(0, 8)).toString('latin1');
  if (magic !== FILE_MAGIC) throw new MigError(ErrorCode.STREAM_BAD_MAGIC, `bad file magic ${JSON.stringify(magic)} (expected ${FILE_MAGIC})`, { offset: 0 });
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const version = dv.getUint32(8, true);
  if (version !== FILE_VERSION) throw new MigError(ErrorCode.STREAM_BAD_VERSION, `unsupported container version ${version}`, { offset: 8 });
  if (dv.getUint32(12, true) !== FILE_HEADER_SIZE) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'bad file header size', { offset: 12 });
  if (dv.getUint32(28, true) !== crc32c(b.subarray(0, 28))) throw new MigError(ErrorCode.STREAM_CHECKSUM, 'file header checksum mismatch', { offset: 28 });
  return { version, createdMs: Number(dv.getBigUint64(16, true)) };
}

/**
 * Write a record header into dst[0..32) for `body`, including the checksum over body and header. `bodyCrc`, when the
 * caller already has crc32c(body) (computed while copying it), saves a pass over the bytes.
 */
export function writeRecordHeader(dst: Uint8Array, type: number, device: number, seq: bigint, streamOffset: bigint,
  body: Uint8Array, bodyCrc?: number): void {
  fillRecordHeader(dst, type, device, seq, streamOffset, body.length);
  new DataView(dst.buffer, dst.byteOffset, RECORD_HEADER_SIZE)
    .setUint32(12, headerCrc(dst.subarray(0, RECORD_HEADER_SIZE), bodyCrc ?? crc32c(body)), true);
}

/** The header fields with a zero checksum (the native zero-copy writer fills the checksum in). */
export function fillRecordHeader(dst: Uint8Array, type: number, device: number, seq: bigint, streamOffset: bigint, bodyLen: number): void {
  const dv = new DataView(dst.buffer, dst.byteOffset, RECORD_HEADER_SIZE);
  dv.setUint32(0, type, true);
  dv.setUint32(4, bodyLen, true);
  dv.setUint32(8, device, true);
  dv.setUint32(12, 0, true);
  dv.setBigUint64(16, seq, true);
  dv.setBigUint64(24, streamOffset, true);
}

/** crc32c over the body, then header bytes 0..11 and 16..31 (the body first, so it can be summed while copied). */
export function recordCrc(header: Uint8Array, body: Uint8Array): number {
  return headerCrc(header, crc32c(body));
}

export function headerCrc(header: Uint8Array, bodyCrc: number): number {
  return crc32c(header.subarray(16, 32), crc32c(header.subarray(0, 12), bodyCrc));
}

/** A CHUNK must be its device's next record, in sequence and in device stream offset (file loads and live channels alike). */
export function checkChunkOrder(h: { seq: bigint; streamOffset: bigint }, nextSeq: bigint, nextOffset: bigint, at: number, device: string): void {
  if (h.seq !== nextSeq || h.streamOffset !== nextOffset) {
    throw new MigError(ErrorCode.STREAM_BAD_RECORD,
      `CHUNK seq ${h.seq} at stream offset ${h.streamOffset}, expected seq ${nextSeq} at ${nextOffset} (missing or reordered record)`,
      { offset: at, device });
  }
}

export function decodeRecordHeader(b: Uint8Array, fileOffset: number): RecordHeader {
  const dv = new DataView(b.buffer, b.byteOffset, RECORD_HEADER_SIZE);
  const h: RecordHeader = {
    type: dv.getUint32(0, true), length: dv.getUint32(4, true), device: dv.getUint32(8, true), crc: dv.getUint32(12, true),
    seq: dv.getBigUint64(16, true), streamOffset: dv.getBigUint64(24, true),
  };
  if (!RECORD_NAMES[h.type]) {
    throw new MigError(ErrorCode.STREAM_BAD_RECORD, `unknown record type ${h.type}`, { offset: fileOffset, value: h.type });
  }
  const max = h.type === REC_CHUNK ? MAX_CHUNK_BODY : MAX_META_BODY;
  if (h.length > max) {
    throw new MigError(ErrorCode.STREAM_TOO_LARGE, `${RECORD_NAMES[h.type]} record claims ${h.length} bytes (limit ${max})`,
      { offset: fileOffset + 4, value: h.length });
  }
  return h;
}

export function verifyRecord(header: Uint8Array, body: Uint8Array, h: RecordHeader, fileOffset: number, device?: string): void {
  const got = recordCrc(header, body);
  if (got !== h.crc) {
    throw new MigError(ErrorCode.STREAM_CHECKSUM,
      `${RECORD_NAMES[h.type]} record checksum mismatch (stored 0x${h.crc.toString(16)}, computed 0x${got.toString(16)})`,
      { offset: fileOffset, device });
  }
}

export function encodeJson(o: unknown): Uint8Array {
  return new Uint8Array(Buffer.from(JSON.stringify(o), 'utf8'));
}

export function decodeJson<T>(body: Uint8Array, what: string, fileOffset: number): T {
  try {
    return JSON.parse(Buffer.from(body).toString('utf8')) as T;
  } catch (e) {
    throw new MigError(ErrorCode.STREAM_BAD_RECORD, `${what} is not valid JSON: ${(e as Error).message}`, { offset: fileOffset });
  }
}

const BUILTIN_TRANSPORTS: readonly unknown[] = ['emulated', 'vfio-v1', 'vfio-user', 'kernel'];

/** Check the device table's shape: it drives allocation on load, so every number is bounded here. */
export function validateDeviceTable(t: DeviceTable, fileOffset: number): DeviceTable {
  const bad = (m: string) => new MigError(ErrorCode.STREAM_BAD_RECORD, `device table: ${m}`, { offset: fileOffset });
  if (!t || t.version !== 1 || !Array.isArray(t.devices)) throw bad('missing version 1 or devices');
  if (t.devices.length === 0 || t.devices.length > 1024) throw bad(`${t.devices.length} devices (1..1024)`);
  const isInt = (v: unknown, lo: number, hi: number) => Number.isSafeInteger(v) && (v as number) >= lo && (v as number) <= hi;
  t.devices.forEach((d, i) => {
    if (d.index !== i) throw bad(`entry ${i} has index ${d.index}`);
    if (typeof d.name !== 'string' || d.name.length === 0 || d.name.length > 256) throw bad(`entry ${i}: bad name`);
    if (d.profile !== 'draft-2019' && d.profile !== 'linux-5.8' && d.profile !== 'v2') throw bad(`${d.name}: unknown profile ${String(d.profile)}`);
    const g = d.geometry;
    // The built-in reaches' names, and any reach registered in this process (a reach added without editing this file).
    if (!BUILTIN_TRANSPORTS.includes(d.transport) && !registeredReaches().includes(d.transport)) throw bad(`${d.name}: unknown transport ${String(d.transport)}`);
    // A v2 device reached other than in-process may have no migration region (regionSize 0): its data comes from a data fd.
    if (!g || !isInt(g.regionSize, d.profile === 'v2' && d.transport !== 'emulated' ? 0 : 64, 2 ** 40)) throw bad(`${d.name}: bad regionSize`);
    // A kernel device's state size is the vendor's secret; only an emulated source describes itself fully.
    if (d.transport !== 'emulated') return;
    if (!isInt(g.stateSize, 8192, 2 ** 36) || g.stateSize % 4096 !== 0) throw bad(`${d.name}: bad stateSize`);
    if (!isInt(g.maxChunk, 8192, 64 << 20) || g.maxChunk % 4096 !== 0) throw bad(`${d.name}: bad maxChunk`);
    if (!isInt(g.guestPages, 1, 1 << 24)) throw bad(`${d.name}: bad guestPages`);
    if (!['mmap', 'trapped', 'mixed'].includes(g.dataMode)) throw bad(`${d.name}: bad dataMode`);
    if (!['fixed', 'moving'].includes(g.offsetPolicy)) throw bad(`${d.name}: bad offsetPolicy`);
    if (g.migFlags !== undefined && (!isInt(g.migFlags, 1, 7) || !(g.migFlags & 1))) throw bad(`${d.name}: bad migFlags`);
  });
  return t;
}

/** Check an END record's shape (the loader compares digests from it; a null or odd body is stream damage). */
export function validateEnd(e: EndRecord, table: DeviceTable, fileOffset: number): EndRecord {
  const bad = (m: string) => new MigError(ErrorCode.STREAM_BAD_RECORD, `END record: ${m}`, { offset: fileOffset });
  if (!e || typeof e !== 'object' || !Array.isArray(e.devices)) throw bad('not an object with a devices array');
  if (e.devices.length > table.devices.length) throw bad(`${e.devices.length} entries for ${table.devices.length} devices`);
  const isCount = (v: unknown) => v === undefined || (Number.isSafeInteger(v) && (v as number) >= 0);
  const isText = (v: unknown, max: number) => v === undefined || (typeof v === 'string' && v.length <= max);
  e.devices.forEach((d, i) => {
    if (!d || typeof d !== 'object') throw bad(`entry ${i} is not an object`);
    if (!Number.isSafeInteger(d.index) || d.index < 0 || d.index >= table.devices.length) throw bad(`entry ${i}: bad device index ${String(d.index)}`);
    if (!isText(d.digest, 128) || !isText(d.name, 256) || !isText(d.finalState, 64)) throw bad(`entry ${i}: bad digest, name or finalState`);
    if (!isCount(d.streamBytes) || !isCount(d.records)) throw bad(`entry ${i}: bad streamBytes or records`);
  });
  return e;
}

/** Check an ABORT record's shape; its text is the source's, printed escaped. */
export function validateAbort(a: AbortRecord, fileOffset: number): AbortRecord {
  const bad = (m: string) => new MigError(ErrorCode.STREAM_BAD_RECORD, `ABORT record: ${m}`, { offset: fileOffset });
  if (!a || typeof a !== 'object' || Array.isArray(a)) throw bad('not an object');
  if (typeof a.code !== 'string' || a.code.length > 64) throw bad('bad code');
  if (a.message !== undefined && (typeof a.message !== 'string' || a.message.length > 4096)) throw bad('bad message');
  if (a.device !== undefined && (typeof a.device !== 'string' || a.device.length > 256)) throw bad('bad device');
  return { code: a.code, message: a.message ?? '', device: a.device };
}
