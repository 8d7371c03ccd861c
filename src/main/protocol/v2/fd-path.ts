// Worker-side data path for a v2 data fd (kernel and emulated reaches alike): read() chunks while saving, write()
// chunks while resuming. The kernel's rules (vfio-facts §4, kernel-guest.md): in PRE_COPY a read of 0 or ENOMSG (a
// non-blocking fd: EAGAIN) means "nothing more for now"; in STOP_COPY only a read of 0 ends the stream; data fds cannot
// seek; a destination refuses a bad stream at write() (mtty: EFAULT; the emulated vendor closes its pipe: EPIPE).
import { native } from '../../../addon/native.js';
import { ErrorCode, MigError } from '../../errors.js';
import type { AbortProbe, DataPath, DataPathDesc, ReadResult } from '../../device/seam.js';

export interface FdPathParams {
  fd: number;
  /** STOP_COPY: a device that produces no byte for this long is stuck (VFM_VENDOR_STUCK). */
  stallMs?: number;
}

/** The descriptor a reach hands to workers for a session on `fd`. */
export function fdPathDesc(device: string, fd: number, stallMs?: number): DataPathDesc<FdPathParams> {
  return { module: new URL('./fd-path.js', import.meta.url).href, device, params: { fd, stallMs } };
}

const POLL_MS = 50; // how often a waiting worker looks at the abort flag

export default function fdPath(desc: DataPathDesc): DataPath {
  const { fd } = desc.params as FdPathParams;
  const stallMs = desc.stallMs ?? (desc.params as FdPathParams).stallMs ?? 30_000;
  const device = desc.device;
  const n = native();
  const fail = (e: unknown, what: string, offset?: number): MigError => new MigError(ErrorCode.NATIVE, `${what}: ${(e as Error).message}`,
    { device, offset, errno: (e as { errno?: number }).errno, cause: e });
  return {
    read(dst: Uint8Array, at: number, max: number, phase: 'precopy' | 'stopcopy', aborted?: AbortProbe): ReadResult {
      const t0 = performance.now();
      for (;;) {
        let got: number;
        try {
          got = n.dataFdRead(fd, dst, at, max, phase === 'precopy' ? 1 : POLL_MS);
        } catch (e) {
          throw fail(e, 'reading the data fd');
        }
        if (got > 0) return { status: 'data', n: got, pending: -1 };
        if (got === 0) return { status: phase === 'precopy' ? 'later' : 'end', n: 0, pending: -1 };
        if (phase === 'precopy') return { status: 'later', n: 0, pending: -1 };
        if (aborted?.()) throw new MigError(ErrorCode.CANCELLED, 'stop-and-copy cancelled while waiting for the device', { device });
        if (performance.now() - t0 > stallMs) {
          throw new MigError(ErrorCode.VENDOR_STUCK, `no data from the data fd for ${stallMs} ms in STOP_COPY (and no end of stream)`, { device });
        }
      }
    },
    write(src: Uint8Array, at: number, len: number, streamOffset: number, aborted?: AbortProbe): void {
      let done = 0;
      const t0 = performance.now();
      while (done < len) {
        let w: number;
        try {
          w = n.dataFdWrite(fd, src, at + done, len - done, POLL_MS);
        } catch (e) {
          throw new MigError(ErrorCode.LOAD_REJECTED,
            `the device refused the stream at stream offset ${streamOffset + done}: ${(e as Error).message}`,
            { device, offset: streamOffset + done, errno: (e as { errno?: number }).errno, cause: e });
        }
        done += w;
        if (w > 0) continue;
        if (aborted?.()) throw new MigError(ErrorCode.CANCELLED, 'load cancelled while the device was not taking data', { device, offset: streamOffset + done });
        if (performance.now() - t0 > stallMs) {
          throw new MigError(ErrorCode.VENDOR_STUCK, `the data fd took no data for ${stallMs} ms`, { device, offset: streamOffset + done });
        }
      }
    },
  };
}
