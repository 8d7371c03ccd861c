// The device config blob carried by [DEV_CONFIG_STATE][be64 len][blob][END]. QEMU writes its VFIOPCIDevice vmstate
// here; vfio-mig's blob is its own, documented in docs/FORMAT.md:
//   u32 magic 'VFMC' (0x434d4656 LE) | u16 version 1 | u16 flags | u32 n | n bytes | u32 crc32c(all before)
// flags 0: the n bytes are the reach's config space (its default save); CONFIG_FLAG_EMBEDDER: they are an embedder's
// own (a config save hook, docs/CONFIG.md) and only an embedder's restore hook may take them.
import { crc32c } from '../container/checksum.js';
import { ErrorCode, MigError } from '../errors.js';

export const CONFIG_MAGIC = 0x434d4656;
export const CONFIG_VERSION = 1;
export const CONFIG_SPACE_SIZE = 256;
/** Embedder bytes (up to 64 KiB: QEMU's VFIOPCIDevice vmstate with a 4 KiB config space and an MSI-X table fits). */
export const MAX_CONFIG_BYTES = 65536;
export const MAX_CONFIG_BLOB = 16 + MAX_CONFIG_BYTES;
export const CONFIG_FLAG_EMBEDDER = 1;

export interface ConfigBlob { bytes: Uint8Array; flags: number }

export function encodeConfigBlob(space: Uint8Array, flags = 0): Uint8Array {
  const b = new Uint8Array(12 + space.length + 4);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, CONFIG_MAGIC, true);
  dv.setUint16(4, CONFIG_VERSION, true);
  dv.setUint16(6, flags, true);
  dv.setUint32(8, space.length, true);
  b.set(space, 12);
  dv.setUint32(12 + space.length, crc32c(b.subarray(0, 12 + space.length)), true);
  return b;
}

/** Validate and return the config bytes and flags. `offset` is the blob's byte offset in the stream (for errors). */
export function decodeConfigBlob(blob: Uint8Array, device: string, offset: number): ConfigBlob {
  const err = (m: string, at = 0) => new MigError(ErrorCode.STREAM_BAD_RECORD, `config blob: ${m}`, { device, offset: offset + at });
  if (blob.length < 16) throw err(`${blob.length} bytes is too short`);
  const dv = new DataView(blob.buffer, blob.byteOffset, blob.byteLength);
  if (dv.getUint32(0, true) !== CONFIG_MAGIC) throw err(`bad magic 0x${dv.getUint32(0, true).toString(16)}`);
  if (dv.getUint16(4, true) !== CONFIG_VERSION) throw err(`unsupported version ${dv.getUint16(4, true)}`, 4);
  const flags = dv.getUint16(6, true);
  if (flags & ~CONFIG_FLAG_EMBEDDER) throw err(`unknown flags 0x${flags.toString(16)}`, 6);
  const n = dv.getUint32(8, true);
  if (n !== blob.length - 16) throw err(`length ${n} does not match the blob (${blob.length - 16})`, 8);
  const crc = dv.getUint32(12 + n, true);
  if (crc !== crc32c(blob.subarray(0, 12 + n))) throw err('checksum mismatch', 12 + n);
  return { bytes: blob.slice(12, 12 + n), flags };
}
