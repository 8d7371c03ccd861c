// CRC32C for records and blobs. The addon's SSE4.2 three-lane implementation runs at ~17 GB/s here against ~3.6 GB/s
// for the @node-rs/crc32 library (docs/PERFORMANCE.md); both compute the same function (test/checksum.test.ts),
// and the library is the fallback on CPUs without SSE4.2.
import { crc32c as libCrc32c } from '@node-rs/crc32';
import { native } from '../../addon/native.js';

let useNative: boolean | undefined;

/** The addon's SSE4.2 paths (this checksum, and the zero-copy load that sums while it reads) are available. */
export function nativeCrcAvailable(): boolean {
  if (useNative === undefined) {
    try { useNative = native().crc32cNative(new Uint8Array(1), 0) >= 0; } catch { useNative = false; }
  }
  return useNative;
}

/** Test entry point (engine/test-hooks.ts noSse42): this thread computes as on a CPU without SSE4.2. */
export function simulateNoSse42(): void { useNative = false; }

export function crc32c(buf: Uint8Array, init = 0): number {
  if (nativeCrcAvailable() && buf.length >= 64) return native().crc32cNative(buf, init);
  return libCrc32c(buf as Buffer, init);
}

/** The library's answer, for cross-checks. */
export function crc32cLibrary(buf: Uint8Array, init = 0): number {
  return libCrc32c(buf as Buffer, init);
}
