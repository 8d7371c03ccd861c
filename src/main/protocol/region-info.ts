// Parsing VFIO_DEVICE_GET_REGION_INFO results: struct vfio_region_info (32 bytes) and its capability chain
// (vfio-facts §2.4). The same parser serves the kernel and the emulated device; it trusts nothing in the buffer.
import { ErrorCode, MigError } from '../errors.js';

export const REGION_INFO_SIZE = 32;
export const REGION_INFO_FLAG_READ = 1 << 0;
export const REGION_INFO_FLAG_WRITE = 1 << 1;
export const REGION_INFO_FLAG_MMAP = 1 << 2;
export const REGION_INFO_FLAG_CAPS = 1 << 3;
export const CAP_SPARSE_MMAP = 1;
export const CAP_TYPE = 2;
export const CAP_HEADER_SIZE = 8;
/** VFIO_PCI_NUM_REGIONS: device-specific regions start here and are identified by CAP_TYPE. */
export const VFIO_PCI_NUM_REGIONS = 9;
const MAX_CAPS = 64;

export interface SparseArea { offset: number; size: number }
export interface RegionInfo {
  index: number;
  flags: number;
  size: number;
  /** Offset of the region within the device fd (pread/pwrite/mmap use offset + x). */
  offset: number;
  type?: { type: number; subtype: number };
  sparse?: SparseArea[];
}

function bad(device: string, msg: string, offset?: number): MigError {
  return new MigError(ErrorCode.BAD_REGION_INFO, msg, { device, offset });
}

function u64(dv: DataView, off: number, device: string, what: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(device, `${what} 0x${v.toString(16)} is too large`, off);
  return Number(v);
}

export function parseRegionInfo(buf: Uint8Array, device: string): RegionInfo {
  if (buf.length < REGION_INFO_SIZE) throw bad(device, `region info of ${buf.length} bytes is shorter than ${REGION_INFO_SIZE}`);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const argsz = dv.getUint32(0, true);
  const info: RegionInfo = {
    flags: dv.getUint32(4, true),
    index: dv.getUint32(8, true),
    size: u64(dv, 16, device, 'region size'),
    offset: u64(dv, 24, device, 'region offset'),
  };
  const capOffset = dv.getUint32(12, true);
  if (!(info.flags & REGION_INFO_FLAG_CAPS) || capOffset === 0) return info;
  const limit = Math.min(argsz, buf.length);
  let off = capOffset;
  const seen = new Set<number>();
  for (let n = 0; off !== 0; n++) {
    // Each header must lie after the fixed struct, inside the buffer, and the chain must move forward (no loops).
    if (n >= MAX_CAPS) throw bad(device, `more than ${MAX_CAPS} capabilities`, off);
    if (off < REGION_INFO_SIZE || off + CAP_HEADER_SIZE > limit || off % 4 !== 0 || seen.has(off)) {
      throw bad(device, `capability header at ${off} is outside the ${limit}-byte info buffer or loops`, off);
    }
    seen.add(off);
    const id = dv.getUint16(off, true);
    const version = dv.getUint16(off + 2, true);
    const next = dv.getUint32(off + 4, true);
    if (next !== 0 && next <= off) throw bad(device, `capability chain goes backwards (${off} -> ${next})`, off);
    if (id === CAP_TYPE) {
      if (off + 16 > limit) throw bad(device, 'truncated CAP_TYPE', off);
      info.type = { type: dv.getUint32(off + 8, true), subtype: dv.getUint32(off + 12, true) };
    } else if (id === CAP_SPARSE_MMAP) {
      if (version !== 1) throw bad(device, `SPARSE_MMAP version ${version} unsupported`, off);
      if (off + 16 > limit) throw bad(device, 'truncated SPARSE_MMAP', off);
      const nr = dv.getUint32(off + 8, true);
      const end = off + 16 + nr * 16;
      if (nr > 4096 || end > limit) throw bad(device, `SPARSE_MMAP claims ${nr} areas beyond the buffer`, off);
      const areas: SparseArea[] = [];
      for (let i = 0; i < nr; i++) {
        const a = { offset: u64(dv, off + 16 + i * 16, device, 'area offset'), size: u64(dv, off + 24 + i * 16, device, 'area size') };
        if (a.size === 0) continue;
        if (a.offset + a.size > info.size) throw bad(device, `sparse area [${a.offset}, +${a.size}) exceeds the region size ${info.size}`, off);
        areas.push(a);
      }
      areas.sort((x, y) => x.offset - y.offset);
      for (let i = 1; i < areas.length; i++) {
        if (areas[i].offset < areas[i - 1].offset + areas[i - 1].size) throw bad(device, 'sparse areas overlap', off);
      }
      info.sparse = areas;
    }
    off = next;
  }
  return info;
}

/** QEMU's vfio_get_dev_region_info(): walk the device-specific regions for the wanted type/subtype. */
export function findRegionByType(numRegions: number, getInfo: (index: number) => Uint8Array, type: number,
  subtype: number, device: string): RegionInfo | undefined {
  for (let i = VFIO_PCI_NUM_REGIONS; i < numRegions; i++) {
    const info = parseRegionInfo(getInfo(i), device);
    if (info.type && info.type.type === type && info.type.subtype === subtype) return info;
  }
  return undefined;
}
