// Moving a device's bytes through the seam's v2 pieces, in the order the engine uses them (save: PRE_COPY reads
// until "later", STOP_COPY reads until "end"; load: RESUMING writes), with the fd data path a worker would import.
import fdPath from '../../src/main/protocol/v2/fd-path.js';
import type { V2Device } from '../../src/main/protocol/v2/device.js';
import type { KernelVfioDevice } from '../../src/main/reach/kernel/device.js';
import { assert, eq } from './harness.js';

// V2Device's methods answer synchronously (a kernel fd): these helpers call them without await.
export const opsOf = (d: V2Device): KernelVfioDevice => d.ops as KernelVfioDevice;

export function drain(dev: V2Device, phase: 'precopy' | 'stopcopy', out: number[]): number {
  const desc = dev.dataPath();
  assert(desc, `${dev.name}: a data session is open`);
  const path = fdPath(desc);
  const buf = new Uint8Array(4096);
  let total = 0;
  for (;;) {
    const r = path.read(buf, 0, buf.length, phase);
    if (r.status !== 'data') {
      eq(r.status, phase === 'precopy' ? 'later' : 'end', `${dev.name}: how a ${phase} read ends`);
      return total;
    }
    out.push(...buf.subarray(0, r.n));
    total += r.n;
  }
}

/** Pre-copy phase of one source: enter PRE_COPY, read the initial bytes. */
export function precopy(src: V2Device, out: number[]): number {
  const ch = src.setState('PRE_COPY');
  assert(ch.newSession, 'RUNNING -> PRE_COPY opens a data session');
  const before = src.estimate();
  assert(before.initialBytes > 0, `PRE_COPY initial_bytes > 0 (got ${before.initialBytes})`);
  const n = drain(src, 'precopy', out);
  eq(n, before.initialBytes, 'bytes readable in PRE_COPY = initial_bytes');
  const after = src.estimate();
  eq([after.initialBytes, after.dirtyBytes], [0, 0], 'PRECOPY_INFO after draining');
  return n;
}

/** Stop-and-copy of one source, then STOP. */
export function stopcopy(src: V2Device, out: number[]): void {
  src.setState('STOP_COPY');
  drain(src, 'stopcopy', out);
  src.setState('STOP');
  eq(src.dataPath(), null, 'STOP_COPY -> STOP ends the session');
}

export function save(src: V2Device): { stream: Uint8Array; initial: number } {
  const bytes: number[] = [];
  const initial = precopy(src, bytes);
  stopcopy(src, bytes);
  return { stream: Uint8Array.from(bytes), initial };
}

/** Load: RESUMING, write the stream through the data path (in 40-byte pieces: v2 needs no segmentation), RUNNING. */
export function load(dst: V2Device, stream: Uint8Array, piece = 40): void {
  const ch = dst.setState('RESUMING');
  assert(ch.newSession, 'RESUMING opens a data session');
  const path = fdPath(dst.dataPath()!);
  for (let at = 0; at < stream.length; at += piece) path.write(stream, at, Math.min(piece, stream.length - at), at);
  dst.setState('STOP');
  dst.setState('RUNNING');
}
