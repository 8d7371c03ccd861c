// vfio-user message codec for the control plane (QEMU docs/interop/vfio-user.rst; /work/shared/vfio-user-facts.md).
// Framing, msg_id/cmd matching and reply bounds are native (addon/src/vfio-user/conn.cc); this file builds request
// bodies and parses reply bodies, trusting nothing in them.
import { ErrorCode, MigError, accessErrorCode } from '../../errors.js';

export const CMD = {
  VERSION: 1, DMA_MAP: 2, DMA_UNMAP: 3, DEVICE_GET_INFO: 4, DEVICE_GET_REGION_INFO: 5, DEVICE_GET_REGION_IO_FDS: 6,
  DEVICE_GET_IRQ_INFO: 7, DEVICE_SET_IRQS: 8, REGION_READ: 9, REGION_WRITE: 10, DMA_READ: 11, DMA_WRITE: 12,
  DEVICE_RESET: 13, DIRTY_PAGES: 14, REGION_WRITE_MULTI: 15, DEVICE_FEATURE: 16, MIG_DATA_READ: 17, MIG_DATA_WRITE: 18,
} as const;
export const CMD_NAME: Record<number, string> = Object.fromEntries(Object.entries(CMD).map(([k, v]) => [v, k]));

export const DIRTY_START = 1;
export const DIRTY_STOP = 2;
export const DIRTY_GET_BITMAP = 4;

/** The device server's digest region: PCI vendor-specific type 'VM', subtype 1 (addon/src/vfio-user/proto.h). */
export const DIGEST_REGION_TYPE = (0x80000000 | 0x564d) >>> 0;
export const DIGEST_REGION_SUBTYPE = 1;
export const VFIO_PCI_CONFIG_REGION_INDEX = 7;

/** Bounds on what a server may send back during negotiation and discovery (nothing is allocated beyond them). */
export const MAX_VERSION_REPLY = 4 + 16384;
export const MAX_REGION_INFO = 65536;
export const MAX_REGIONS = 256;

export interface Negotiated {
  major: number;
  minor: number;
  /** REGION_READ/WRITE count limit the server enforces. */
  maxDataXfer: number;
  maxMsgFds: number;
  pgsize?: number;
}

export function encodeVersion(caps: { maxMsgFds: number; maxDataXfer: number }): Uint8Array {
  const json = JSON.stringify({ capabilities: { max_msg_fds: caps.maxMsgFds, max_data_xfer_size: caps.maxDataXfer, migration: { pgsize: 4096 } } });
  const b = new Uint8Array(4 + Buffer.byteLength(json) + 1);
  const dv = new DataView(b.buffer);
  dv.setUint16(0, 0, true);
  dv.setUint16(2, 2, true);
  b.set(Buffer.from(json), 4);
  return b; // NUL-terminated: the last byte stays 0
}

function proto(device: string, msg: string): MigError {
  return new MigError(ErrorCode.PEER_PROTOCOL, msg, { device });
}

/** VERSION reply: major 0, minor <= ours, optional NUL-terminated JSON whose capabilities must include migration. */
export function parseVersionReply(b: Uint8Array, device: string): Negotiated {
  if (b.length < 4) throw proto(device, `VERSION reply of ${b.length} bytes`);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const major = dv.getUint16(0, true);
  const minor = dv.getUint16(2, true);
  if (major !== 0) throw proto(device, `server speaks vfio-user major ${major} (0 expected)`);
  if (minor > 2) throw proto(device, `server answered minor ${minor}, more than the 2 offered`);
  let caps: Record<string, unknown> = {};
  if (b.length > 4) {
    const nul = b.indexOf(0, 4);
    if (nul !== b.length - 1) throw proto(device, 'VERSION JSON is not NUL-terminated at the end of the reply');
    try {
      const j = JSON.parse(Buffer.from(b.subarray(4, nul)).toString('utf8')) as { capabilities?: Record<string, unknown> };
      if (j === null || typeof j !== 'object' || Array.isArray(j)) throw new Error('not an object');
      caps = (j.capabilities && typeof j.capabilities === 'object') ? j.capabilities : {};
    } catch (e) {
      throw proto(device, `VERSION JSON does not parse: ${(e as Error).message}`);
    }
  }
  const mig = caps.migration as Record<string, unknown> | undefined;
  if (!mig || typeof mig !== 'object') {
    throw new MigError(ErrorCode.PEER_NO_MIGRATION, 'server offers no migration capability in VERSION: this device cannot migrate', { device });
  }
  const int = (v: unknown, name: string, lo: number, hi: number, dflt: number): number => {
    if (v === undefined) return dflt;
    if (!Number.isSafeInteger(v) || (v as number) < lo || (v as number) > hi) throw proto(device, `VERSION ${name} ${String(v)} out of range ${lo}..${hi}`);
    return v as number;
  };
  const pgsize = mig.pgsize === undefined ? undefined : int(mig.pgsize, 'migration.pgsize', 1, 2 ** 30, 4096);
  if (pgsize !== undefined && pgsize !== 4096) throw proto(device, `server migration pgsize ${pgsize}, this host uses 4096`);
  return {
    major, minor, pgsize,
    maxDataXfer: int(caps.max_data_xfer_size, 'max_data_xfer_size', 1, 2 ** 31, 1 << 20),
    maxMsgFds: int(caps.max_msg_fds, 'max_msg_fds', 0, 1024, 1),
  };
}

/** A native vfio-user failure as a MigError naming the device and the command (errno kept). */
export function peerError(e: unknown, device: string, cmd: number): MigError {
  if (e instanceof MigError) return e;
  const ne = e as { errno?: number; message?: string };
  const msg = ne?.message ?? String(e);
  const code = /server error reply/.test(msg) ? ErrorCode.PEER_ERROR : accessErrorCode(ne?.errno, ErrorCode.NATIVE);
  return new MigError(code, `vfio-user ${CMD_NAME[cmd] ?? cmd}: ${msg}`, { device, errno: ne?.errno, cause: e });
}
