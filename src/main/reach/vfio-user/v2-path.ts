// Worker-side data path of a v2 device over vfio-user: MIG_DATA_READ until a short read (PRE_COPY: nothing more for
// now; STOP_COPY: the end), MIG_DATA_WRITE in pieces of at most the write bound. The connection id is process-global.
import { native } from '../../../addon/native.js';
import { ErrorCode, MigError, accessErrorCode } from '../../errors.js';
import type { DataPath, DataPathDesc, ReadResult } from '../../device/seam.js';
import { CMD } from './protocol.js';

export interface VfuPathParams { conn: number; maxRead: number; writeBound: number; short: SharedArrayBuffer }

export default function vfuV2Path(desc: DataPathDesc): DataPath {
  const { conn, maxRead, writeBound, short } = desc.params as VfuPathParams;
  const flag = new Int32Array(short);
  const device = desc.device;
  const fail = (e: unknown, what: string, code: ErrorCode, offset?: number) => new MigError(accessErrorCode((e as { errno?: number }).errno, code),
    `vfio-user ${what}: ${(e as Error).message}`, { device, offset, errno: (e as { errno?: number }).errno, cause: e });
  return {
    read(dst: Uint8Array, at: number, max: number, phase: 'precopy' | 'stopcopy'): ReadResult {
      const size = Math.min(max, maxRead);
      const q = new Uint8Array(8);
      const qv = new DataView(q.buffer);
      qv.setUint32(0, 8 + size, true);
      qv.setUint32(4, size, true);
      let r;
      try { r = native().vfuRequest(conn, CMD.MIG_DATA_READ, q, 8, 8 + size, 0); } catch (e) { throw fail(e, 'MIG_DATA_READ', ErrorCode.NATIVE); }
      // Trust the reply's size field, bounded by the request and by the bytes that came (padding is tolerated).
      const n = new DataView(r.reply.buffer, r.reply.byteOffset, r.reply.byteLength).getUint32(4, true);
      if (n > size || n > r.reply.length - 8) {
        throw new MigError(ErrorCode.PEER_PROTOCOL, `MIG_DATA_READ reply says ${n} bytes for a ${size}-byte read with ${r.reply.length - 8} bytes`, { device });
      }
      dst.set(r.reply.subarray(8, 8 + n), at);
      Atomics.store(flag, 0, n < size ? 1 : 0); // the main thread's estimate: a short read means nothing more for now
      if (n > 0) return { status: 'data', n, pending: -1 };
      return { status: phase === 'precopy' ? 'later' : 'end', n: 0, pending: -1 };
    },
    write(src: Uint8Array, at: number, n: number, streamOffset: number): void {
      for (let done = 0; done < n;) {
        const k = Math.min(writeBound, n - done);
        const q = new Uint8Array(8 + k);
        const qv = new DataView(q.buffer);
        qv.setUint32(0, 8 + k, true);
        qv.setUint32(4, k, true);
        q.set(src.subarray(at + done, at + done + k), 8);
        try { native().vfuRequest(conn, CMD.MIG_DATA_WRITE, q, 0, 8, 0); } catch (e) {
          throw fail(e, `MIG_DATA_WRITE at stream offset ${streamOffset + done}`, ErrorCode.LOAD_REJECTED, streamOffset + done);
        }
        done += k;
      }
    },
  };
}
