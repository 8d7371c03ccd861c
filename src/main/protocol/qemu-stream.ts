// QEMU's VFIO device stream (hw/vfio/migration.c, v1): big-endian 64-bit tags around `be64 size + bytes` packets.
// Exact bytes per phase (vfio-facts §3.4):
//   setup      [SETUP][END]
//   iterate    [DATA][size][bytes][END]      and [DATA][0][END] when nothing is pending
//   complete   ([DATA][size][bytes])* [END]
//   save_state [CONFIG][be64 len][blob][END] (the blob is this project's own, length-prefixed: see config-blob.ts)
import { ErrorCode, MigError } from '../errors.js';

export const FLAG_END_OF_STATE = 0xffffffffef100001n;
export const FLAG_DEV_CONFIG_STATE = 0xffffffffef100002n;
export const FLAG_DEV_SETUP_STATE = 0xffffffffef100003n;
export const FLAG_DEV_DATA_STATE = 0xffffffffef100004n;
/** v2-only flags: recognised by name so an error can say why they are not accepted in a v1 stream. */
export const FLAG_DEV_INIT_DATA_SENT = 0xffffffffef100005n;
export const FLAG_DEV_CONFIG_LOAD_READY = 0xffffffffef100006n;

export const TAG_NAMES = new Map<bigint, string>([
  [FLAG_END_OF_STATE, 'END_OF_STATE'], [FLAG_DEV_CONFIG_STATE, 'DEV_CONFIG_STATE'],
  [FLAG_DEV_SETUP_STATE, 'DEV_SETUP_STATE'], [FLAG_DEV_DATA_STATE, 'DEV_DATA_STATE'],
  [FLAG_DEV_INIT_DATA_SENT, 'DEV_INIT_DATA_SENT (v2)'], [FLAG_DEV_CONFIG_LOAD_READY, 'DEV_CONFIG_LOAD_READY (v2)'],
]);

export const TAG_BYTES = 8;
/** Bytes of framing around a data packet inside an iterate section: [DATA][size] ... [END]. */
export const DATA_PREFIX = 16;

export function putBe64(buf: Uint8Array, off: number, v: bigint): number {
  new DataView(buf.buffer, buf.byteOffset, buf.byteLength).setBigUint64(off, v, false);
  return off + 8;
}

export function getBe64(buf: Uint8Array, off: number): bigint {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getBigUint64(off, false);
}

/** [SETUP][END] */
export function setupSection(): Uint8Array {
  const b = new Uint8Array(16);
  putBe64(b, 0, FLAG_DEV_SETUP_STATE);
  putBe64(b, 8, FLAG_END_OF_STATE);
  return b;
}

/** [CONFIG][be64 len][blob][END] */
export function configSection(blob: Uint8Array): Uint8Array {
  const b = new Uint8Array(24 + blob.length);
  putBe64(b, 0, FLAG_DEV_CONFIG_STATE);
  putBe64(b, 8, BigInt(blob.length));
  b.set(blob, 16);
  putBe64(b, 16 + blob.length, FLAG_END_OF_STATE);
  return b;
}

/** [DATA][0][END]: an iterate call that found nothing pending. */
export function emptyIterateSection(): Uint8Array {
  const b = new Uint8Array(24);
  putBe64(b, 0, FLAG_DEV_DATA_STATE);
  putBe64(b, 8, 0n);
  putBe64(b, 16, FLAG_END_OF_STATE);
  return b;
}

/** [END]: closes the complete (stop-and-copy) section. */
export function endTag(): Uint8Array {
  const b = new Uint8Array(8);
  putBe64(b, 0, FLAG_END_OF_STATE);
  return b;
}

// ---- parsing (load, inspect, extract) ----------------------------------------------------------------------------

export type QemuEvent =
  | { kind: 'setup'; at: number }
  | { kind: 'data'; at: number; size: number; dataAt: number }
  | { kind: 'config'; at: number; len: number; blobAt: number }
  | { kind: 'end'; at: number }
  /** v2 (QEMU 8.1+): the source's initial bytes have all been sent (switchover-ack's trigger); ends the section. */
  | { kind: 'init-data-sent'; at: number };

/** Parser state carried between container records (a record holds whole packets; a section may span records). */
export interface QemuParseState {
  inSection: boolean;
  /** After SETUP or CONFIG, QEMU requires END_OF_STATE next ("end flag incorrect" otherwise). */
  expectEnd: 'setup' | 'config' | null;
  sawSetup: boolean;
  sawConfig: boolean;
  sections: number;
  dataPackets: number;
  dataBytes: number;
  /** A v2 device stream: an iterate that read nothing is a lone [END]; DEV_INIT_DATA_SENT may close one iterate. */
  v2?: boolean;
  /** DEV_INIT_DATA_SENT tags seen (at most 1). */
  initDataSent?: number;
}

export function newParseState(v2 = false): QemuParseState {
  return { inSection: false, expectEnd: null, sawSetup: false, sawConfig: false, sections: 0, dataPackets: 0, dataBytes: 0, v2, initDataSent: 0 };
}

export interface QemuLimits {
  /** Largest data packet accepted: the destination's data area (never allocate from an untrusted size). */
  maxData: number;
  maxConfig: number;
}

/**
 * Parse whole packets in buf[start, end). `base` is the file offset of buf[start] so errors name the byte offset.
 * Returns events in order; throws MigError on any malformed input before the caller applies anything.
 */
export function parsePackets(st: QemuParseState, buf: Uint8Array, start: number, end: number, base: number,
  limits: QemuLimits, device: string): QemuEvent[] {
  const ev: QemuEvent[] = [];
  let p = start;
  const need = (n: number, what: string) => {
    if (end - p < n) {
      throw new MigError(ErrorCode.STREAM_TRUNCATED,
        `${what} needs ${n} bytes but the record has ${end - p} left (a packet may not span records)`,
        { device, offset: base + (p - start) });
    }
  };
  while (p < end) {
    const at = base + (p - start);
    need(8, 'tag');
    const tag = getBe64(buf, p);
    p += 8;
    if (st.expectEnd && tag !== FLAG_END_OF_STATE) {
      throw new MigError(ErrorCode.STREAM_BAD_END,
        `end flag incorrect after ${st.expectEnd === 'setup' ? 'DEV_SETUP_STATE' : 'DEV_CONFIG_STATE'}: got ${tagName(tag)}`,
        { device, offset: at });
    }
    switch (tag) {
      case FLAG_END_OF_STATE:
        // v2: vfio_save_iterate writes its tag even when the read found nothing (a lone END between setup and config).
        if (!st.inSection && !(st.v2 && st.sawSetup && !st.sawConfig)) {
          throw new MigError(ErrorCode.STREAM_BAD_END, 'END_OF_STATE outside a section', { device, offset: at });
        }
        st.inSection = false; st.expectEnd = null; st.sections++;
        ev.push({ kind: 'end', at });
        break;
      case FLAG_DEV_SETUP_STATE:
        if (st.inSection) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'DEV_SETUP_STATE inside a section', { device, offset: at });
        if (st.sawSetup) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'second DEV_SETUP_STATE', { device, offset: at });
        st.inSection = true; st.expectEnd = 'setup'; st.sawSetup = true;
        ev.push({ kind: 'setup', at });
        break;
      case FLAG_DEV_CONFIG_STATE: {
        if (!st.sawSetup) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'DEV_CONFIG_STATE before DEV_SETUP_STATE', { device, offset: at });
        if (st.inSection) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'DEV_CONFIG_STATE inside a section', { device, offset: at });
        need(8, 'config length');
        const len = getBe64(buf, p);
        if (len > BigInt(limits.maxConfig)) {
          throw new MigError(ErrorCode.STREAM_TOO_LARGE, `config blob of ${len} bytes exceeds the limit ${limits.maxConfig}`,
            { device, offset: base + (p - start), value: len });
        }
        p += 8;
        need(Number(len), 'config blob');
        ev.push({ kind: 'config', at, len: Number(len), blobAt: p });
        p += Number(len);
        st.inSection = true; st.expectEnd = 'config'; st.sawConfig = true;
        break;
      }
      case FLAG_DEV_DATA_STATE: {
        need(8, 'data size');
        const size = getBe64(buf, p);
        acceptData(st, size, at, base + (p - start), limits, device);
        p += 8;
        const n = Number(size);
        need(n, 'data packet');
        ev.push({ kind: 'data', at, size: n, dataAt: p });
        p += n;
        break;
      }
      case FLAG_DEV_INIT_DATA_SENT:
        if (!st.v2) throw new MigError(ErrorCode.STREAM_UNKNOWN_TAG, `Unknown tag ${tagName(tag)}`, { device, offset: at, value: tag });
        if (!st.sawSetup || st.sawConfig) {
          throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'DEV_INIT_DATA_SENT outside the iterate phase', { device, offset: at });
        }
        if (st.initDataSent) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'second DEV_INIT_DATA_SENT', { device, offset: at });
        st.initDataSent = 1; st.inSection = false; st.sections++;
        ev.push({ kind: 'init-data-sent', at });
        break;
      default:
        throw new MigError(ErrorCode.STREAM_UNKNOWN_TAG, `Unknown tag ${tagName(tag)}`, { device, offset: at, value: tag });
    }
  }
  return ev;
}

/**
 * The checks and state change of one [DATA][size] packet at file offset `at` (size field at `sizeAt`), shared by the
 * parser and the zero-copy load path, which reads only the packet's 16-byte head before the data goes to the device.
 */
export function acceptData(st: QemuParseState, size: bigint, at: number, sizeAt: number, limits: QemuLimits, device: string): void {
  if (st.expectEnd) {
    throw new MigError(ErrorCode.STREAM_BAD_END,
      `end flag incorrect after ${st.expectEnd === 'setup' ? 'DEV_SETUP_STATE' : 'DEV_CONFIG_STATE'}: got DEV_DATA_STATE`, { device, offset: at });
  }
  if (!st.sawSetup) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'DEV_DATA_STATE before DEV_SETUP_STATE', { device, offset: at });
  if (st.sawConfig) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'DEV_DATA_STATE after the config state', { device, offset: at });
  if (size > BigInt(limits.maxData)) {
    throw new MigError(ErrorCode.STREAM_TOO_LARGE, `data packet of ${size} bytes exceeds the largest this load takes (${limits.maxData} bytes: what the source's data area could stage)`,
      { device, offset: sizeAt, value: size });
  }
  st.inSection = true; st.dataPackets++; st.dataBytes += Number(size);
}

export function tagName(tag: bigint): string {
  return TAG_NAMES.get(tag) ?? `0x${tag.toString(16).padStart(16, '0')}`;
}

/** A complete device stream must have ended cleanly: setup seen, config seen, no open section. */
export function checkStreamEnd(st: QemuParseState, device: string, offset: number): void {
  if (st.inSection) throw new MigError(ErrorCode.STREAM_TRUNCATED, 'device stream ends inside a section', { device, offset });
  if (!st.sawSetup) throw new MigError(ErrorCode.STREAM_TRUNCATED, 'device stream has no DEV_SETUP_STATE', { device, offset });
  if (!st.sawConfig) throw new MigError(ErrorCode.STREAM_TRUNCATED, 'device stream ended without DEV_CONFIG_STATE', { device, offset });
}
