// Access to one device's migration region: registers at their exact size and offset, state changes by
// read-modify-write through the state table, and every vendor-reported offset/size validated before any copy.
// Used on the main thread and in workers (it holds only a native region handle, which is process-global).
import fs from 'node:fs';
import { native, COPY_ALL, COPY_MMAP, COPY_TRAPPED } from '../../addon/native.js';
import { crc32c } from '../container/checksum.js';
import { ErrorCode, MigError, accessErrorCode } from '../errors.js';
import { trace } from '../trace.js';
import { DIRTY_PFNS_ALL, DIRTY_PFNS_NONE, type ProfileDef, type RegName } from './profiles.js';
import {
  STATE_BITS, arcFailure, checkedState, fmtState, stateName, statePath, withStateBits, type V1State,
} from './states.js';

export interface RegionDesc {
  device: string;
  handle: number;
  profile: ProfileDef;
  size: number;
}

/**
 * How trapped data pieces (outside the mmap'd areas) are read and written. `bulk` (default): one pread/pwrite per
 * piece. `aligned`: QEMU v1's vfio_mig_rw pattern, naturally aligned accesses of 8, 4, 2 or 1 bytes, for drivers that
 * were only ever driven by QEMU and refuse anything else.
 */
export type TrappedAccess = 'bulk' | 'aligned';
export const TRAPPED_ACCESS_MODES: readonly TrappedAccess[] = ['bulk', 'aligned'];

export interface ChunkInfo {
  /** pending_bytes as read at the start of this step (0: nothing copied). */
  pending: bigint;
  dataOffset: number;
  size: number;
}

export class MigrationRegion {
  readonly device: string;
  readonly handle: number;
  readonly profile: ProfileDef;
  readonly size: number;
  constructor(d: RegionDesc) {
    this.device = d.device; this.handle = d.handle; this.profile = d.profile; this.size = d.size;
  }

  get desc(): RegionDesc {
    return { device: this.device, handle: this.handle, profile: this.profile, size: this.size };
  }

  private reg(name: RegName) {
    const r = this.profile.regs[name];
    if (!r) throw new MigError(ErrorCode.BAD_ARGUMENT, `register ${name} does not exist in profile ${this.profile.name}`, { device: this.device });
    return r;
  }

  read(name: RegName): bigint {
    const r = this.reg(name);
    try {
      return native().regRead(this.handle, r.off, r.width);
    } catch (e) {
      throw this.regError('read', name, r.off, e);
    }
  }

  write(name: RegName, v: bigint): void {
    const r = this.reg(name);
    try {
      native().regWrite(this.handle, r.off, r.width, v);
    } catch (e) {
      throw this.regError('write', name, r.off, e);
    }
  }

  /**
   * The same registers on the libuv pool (one regionRwAsync per access, exact offset and width): for a region reached
   * over a socket (vfio-user) the main thread does not wait for the round trip. Errors as read()/write().
   */
  asyncRegisters(): { read(name: RegName): Promise<bigint>; write(name: RegName, v: bigint): Promise<void> } {
    return {
      read: async (name) => {
        const r = this.reg(name);
        try {
          const b = await native().regionRwAsync(this.handle, r.off, r.width);
          const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
          return r.width === 8 ? dv.getBigUint64(0, true) : BigInt(dv.getUint32(0, true));
        } catch (e) {
          throw this.regError('read', name, r.off, e);
        }
      },
      write: async (name, v) => {
        const r = this.reg(name);
        if (v < 0n || v >= 1n << BigInt(8 * r.width)) {
          throw this.regError('write', name, r.off, Object.assign(new Error(`value ${v} does not fit ${r.width} bytes`), { errno: 22 }));
        }
        const b = new Uint8Array(r.width);
        const dv = new DataView(b.buffer);
        if (r.width === 8) dv.setBigUint64(0, v, true); else dv.setUint32(0, Number(v), true);
        try {
          await native().regionRwAsync(this.handle, r.off, r.width, b);
        } catch (e) {
          throw this.regError('write', name, r.off, e);
        }
      },
    };
  }

  private regError(op: string, name: RegName, off: number, e: unknown): MigError {
    const ne = e as { errno?: number; code?: string; message?: string };
    return new MigError(accessErrorCode(ne?.errno), `${op} failed: ${ne?.message ?? String(e)}`,
      { device: this.device, register: name, offset: off, errno: ne?.errno, cause: e });
  }

  /** Set how this region's trapped data pieces are accessed (the native region handle keeps it for every thread). */
  setTrappedAccess(mode: TrappedAccess = 'bulk'): void {
    if (!TRAPPED_ACCESS_MODES.includes(mode)) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `trapped access '${String(mode)}' is not bulk or aligned`, { device: this.device });
    }
    native().regionSetAccess(this.handle, mode === 'aligned' ? 1 : 0);
    trace('vfio_region_trapped_access', { device: this.device, mode });
  }

  // ---- device_state -------------------------------------------------------------------------------------------

  rawState(): number {
    return Number(this.read('device_state'));
  }

  /** Current state, refusing a value the profile calls invalid; ERROR is reported as such (needs a reset). */
  state(): V1State {
    const raw = this.rawState();
    if (checkedState(raw, this.profile.name, this.device) === 'ERROR') {
      throw new MigError(ErrorCode.DEVICE_ERROR_STATE, `device is in the error state ${fmtState(raw)}; a reset is required`,
        { device: this.device, register: 'device_state', value: raw });
    }
    return stateName(raw) as V1State;
  }

  /** Walk the state table to `target`, one read-modify-write per arc. */
  setState(target: Exclude<V1State, 'ERROR'>): void {
    const from = this.state() as Exclude<V1State, 'ERROR'>;
    const path = statePath(from, target);
    if (!path) {
      throw new MigError(ErrorCode.BAD_STATE, `no allowed transition ${from} -> ${target}`, { device: this.device });
    }
    for (const next of path) {
      const cur = this.rawState();
      const val = withStateBits(cur, STATE_BITS[next]);
      try {
        this.write('device_state', BigInt(val));
      } catch (e) {
        // The 5.8 uAPI: on failure re-read; the driver keeps the old state unless it went to ERROR.
        let after: number | undefined;
        try { after = this.rawState(); } catch { /* reported below */ }
        trace('vfio_migration_set_state_failed', { device: this.device, from: fmtState(cur), to: next, after });
        throw arcFailure(this.device, cur, next, after, e);
      }
      trace('vfio_migration_set_state', { device: this.device, from: stateName(cur), to: next, raw: val });
    }
  }

  // ---- data ------------------------------------------------------------------------------------------------------

  /** Validate a vendor-reported data_offset/data_size pair against the region and the caller's buffer capacity. */
  checkData(dataOffset: bigint, dataSize: bigint, capacity: number): { off: number; size: number } {
    const hdr = BigInt(this.profile.headerSize);
    const size = BigInt(this.size);
    if (dataOffset < hdr) {
      throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `data_offset 0x${dataOffset.toString(16)} lies inside the ${hdr}-byte header`,
        { device: this.device, register: 'data_offset', value: dataOffset });
    }
    if (dataOffset >= size) {
      throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `data_offset 0x${dataOffset.toString(16)} is past the region (size 0x${size.toString(16)})`,
        { device: this.device, register: 'data_offset', value: dataOffset });
    }
    if (dataSize > size - dataOffset) {
      throw new MigError(ErrorCode.VENDOR_BAD_VALUE,
        `data_size 0x${dataSize.toString(16)} at data_offset 0x${dataOffset.toString(16)} runs past the region end 0x${size.toString(16)}`,
        { device: this.device, register: 'data_size', value: dataSize });
    }
    if (dataSize > BigInt(capacity)) {
      throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `data_size 0x${dataSize.toString(16)} exceeds the staging capacity ${capacity}`,
        { device: this.device, register: 'data_size', value: dataSize });
    }
    return { off: Number(dataOffset), size: Number(dataSize) };
  }

  /**
   * One save step (vfio-facts §2.3 a-d): pending_bytes (which also marks the previous chunk consumed), then
   * data_offset (the vendor stages), data_size, and the copy into dst[dstOff..]. Caller holds the region lock.
   */
  saveChunk(dst: Uint8Array, dstOff: number, capacity: number): ChunkInfo {
    const c = this.nextChunk(capacity);
    if (c.size > 0) this.copyOut(c.dataOffset, c.size, dst, dstOff);
    return c;
  }

  /** saveChunk without the copy: the staged chunk's validated place, for a caller that moves the bytes itself. */
  nextChunk(capacity: number): ChunkInfo {
    const pending = this.read('pending_bytes');
    if (pending === 0n) return { pending, dataOffset: 0, size: 0 };
    const dataOffset = this.read('data_offset');
    const dataSize = this.read('data_size');
    const { off, size } = this.checkData(dataOffset, dataSize, capacity);
    return { pending, dataOffset: off, size };
  }

  /** Zero-copy record write (native sendRecord); -1 if unavailable (nothing written). */
  sendRecord(off: number, len: number, buf: Uint8Array, fd: number, pos: number, trailer: boolean): number {
    try {
      return native().regionSendRecord(this.handle, off, len, buf, fd, pos, trailer);
    } catch (e) {
      const ne = e as { errno?: number; message?: string };
      throw new MigError(ne?.errno === 5 || (ne?.message ?? '').includes('pwritev') ? ErrorCode.IO : accessErrorCode(ne?.errno),
        `sending ${len} bytes of data: ${ne?.message ?? String(e)}`, { device: this.device, offset: off, errno: ne?.errno, cause: e });
    }
  }

  /** data_offset in RESUMING, validated: the vendor's data area starts there and runs to the region end. */
  private resumeOffset(): number {
    const dataOffset = this.read('data_offset');
    return this.checkData(dataOffset, 0n, 0).off;
  }

  /**
   * Resume one data packet (QEMU's vfio_load_buffer): a packet larger than the room the vendor gives after its own
   * data_offset (to the region end) goes in several writes, each re-reading data_offset, writing at most that room
   * and then data_size, so a destination with a smaller data area than the source's takes the source's packets.
   * Each write in the profile's order: 5.8 writes the data then data_size; the 2019 drafts write mmap'd pieces, then
   * data_size, then the trapped pieces (QEMU v4 09/13). Caller holds the region lock. Returns the first data_offset.
   */
  loadChunk(src: Uint8Array, srcOff: number, size: number): number {
    return this.loadPieces(src, srcOff, size, this.resumeOffset());
  }

  /** loadChunk's loop, the first data_offset already read. */
  private loadPieces(src: Uint8Array, srcOff: number, size: number, first: number): number {
    let off = first;
    for (let done = 0; ;) {
      const n = Math.min(size - done, this.size - off);
      if (this.profile.resumeOrder === 'data-then-size') {
        this.copyIn(off, n, src, srcOff + done, COPY_ALL);
        this.write('data_size', BigInt(n));
      } else {
        this.copyIn(off, n, src, srcOff + done, COPY_MMAP);
        this.write('data_size', BigInt(n));
        this.copyIn(off, n, src, srcOff + done, COPY_TRAPPED);
      }
      done += n;
      if (done === size) return first;
      off = this.resumeOffset();
    }
  }

  /**
   * Zero-copy resume step: the packet's `size` data bytes at file position `pos` go straight into the data area
   * (trapped pieces through `scratch`, which holds `size` bytes), `verify` checks the record checksum before the
   * vendor is told, then the profile's order as in loadChunk. A packet larger than the vendor's room is read whole
   * into `scratch`, verified, and written in pieces as loadChunk does. Returns false (nothing done) if the addon
   * cannot (no SSE4.2).
   */
  loadFromFile(fd: number, pos: number, size: number, scratch: Uint8Array, crcInit: number, verify: (crc: number) => void): boolean {
    if (size > scratch.length) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `a ${size}-byte data packet does not fit the ${scratch.length}-byte scratch`, { device: this.device, offset: pos });
    }
    const off = this.resumeOffset();
    const truncated = (e: unknown) => {
      const ne = e as { errno?: number; message?: string };
      return new MigError(ErrorCode.STREAM_TRUNCATED, `reading a ${size}-byte data packet: ${ne?.message ?? String(e)}`,
        { device: this.device, offset: pos, errno: ne?.errno, cause: e });
    };
    if (size > this.size - off) {
      let got = 0;
      try {
        while (got < size) {
          const n = fs.readSync(fd, scratch, got, size - got, pos + got);
          if (n === 0) throw new Error(`stream ends at ${pos + got} inside a data packet`);
          got += n;
        }
      } catch (e) {
        throw truncated(e);
      }
      verify(crc32c(scratch.subarray(0, size), crcInit));
      this.loadPieces(scratch, 0, size, off);
      return true;
    }
    let crc: number;
    try {
      crc = native().regionRecvData(this.handle, off, size, fd, pos, scratch, crcInit);
    } catch (e) {
      throw truncated(e);
    }
    if (crc < 0) return false;
    verify(crc);
    if (this.profile.resumeOrder === 'data-then-size') {
      this.copyIn(off, size, scratch, 0, COPY_TRAPPED);
      this.write('data_size', BigInt(size));
    } else {
      this.write('data_size', BigInt(size));
      this.copyIn(off, size, scratch, 0, COPY_TRAPPED);
    }
    return true;
  }

  copyOut(off: number, len: number, dst: Uint8Array, dstOff: number): number {
    try {
      return native().regionCopyOut(this.handle, off, len, dst, dstOff);
    } catch (e) {
      const errno = (e as { errno?: number }).errno;
      throw new MigError(accessErrorCode(errno), `reading ${len} bytes of data: ${(e as Error).message}`, { device: this.device, offset: off, errno, cause: e });
    }
  }

  copyIn(off: number, len: number, src: Uint8Array, srcOff: number, which: number): number {
    try {
      return native().regionCopyIn(this.handle, off, len, src, srcOff, which);
    } catch (e) {
      const errno = (e as { errno?: number }).errno;
      throw new MigError(accessErrorCode(errno), `writing ${len} bytes of data: ${(e as Error).message}`, { device: this.device, offset: off, errno, cause: e });
    }
  }

  // ---- dirty pages through the region (2019 design, vfio-facts §1.5) -------------------------------------------

  /**
   * Query pfns [startPfn, startPfn+total) and OR them into `out` (bit i = pfn startPfn+i). Follows QEMU v5: rewrite
   * start_pfn / page_size / the remaining total_pfns each step, read copied_pfns (NONE / ALL / count), then the bitmap
   * at data_offset. Bounded: every step must make progress. Caller holds the region lock. Returns dirty pages found.
   */
  queryDirtyPfns(startPfn: number, total: number, pageSize: number, out: Uint8Array, scratch: Uint8Array): number {
    let done = 0;
    let found = 0;
    while (done < total) {
      this.write('start_pfn', BigInt(startPfn + done));
      this.write('page_size', BigInt(pageSize));
      this.write('total_pfns', BigInt(total - done));
      const copied = this.read('copied_pfns');
      if (copied === DIRTY_PFNS_NONE) break;
      if (copied === DIRTY_PFNS_ALL) {
        for (let i = done; i < total; i++) out[i >> 3] |= 1 << (i & 7);
        found += total - done;
        break;
      }
      if (copied > BigInt(total - done)) {
        throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `copied_pfns ${copied} exceeds the ${total - done} pfns requested`,
          { device: this.device, register: 'copied_pfns', value: copied });
      }
      const n = Number(copied);
      const bytes = Math.ceil(n / 64) * 8;
      if (bytes > scratch.length) {
        throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `copied_pfns ${n} needs a ${bytes}-byte bitmap, more than the ${scratch.length} allowed`,
          { device: this.device, register: 'copied_pfns', value: copied });
      }
      const dataOffset = this.read('data_offset');
      const { off } = this.checkData(dataOffset, BigInt(bytes), scratch.length);
      this.copyOut(off, bytes, scratch, 0);
      for (let i = 0; i < n; i++) {
        if (scratch[i >> 3] & (1 << (i & 7))) {
          const bit = done + i;
          out[bit >> 3] |= 1 << (bit & 7);
          found++;
        }
      }
      done += n;
    }
    return found;
  }
}
