// The addon's CRC32C (SSE4.2, three interleaved lanes) must be the same function as the @node-rs/crc32 library.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { native } from '../src/addon/native.js';
import { crc32c, crc32cLibrary } from '../src/main/container/checksum.js';
import { mulberry32 } from '../src/main/stress/stress.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { runEmulated } from '../src/main/api.js';

test('native CRC32C equals the library on lengths around the lane boundaries, any start and seed', () => {
  const rnd = mulberry32(42);
  const big = new Uint8Array(200_000).map(() => Math.floor(rnd() * 256));
  const lens = [0, 1, 7, 8, 9, 63, 64, 65, 24575, 24576, 24577, 49152, 3 * 8192 * 2 + 13, 100_000, 199_000];
  let checked = 0;
  for (const len of lens) {
    for (const start of [0, 1, 3, 8]) {
      if (start + len > big.length) continue;
      const v = big.subarray(start, start + len);
      for (const init of [0, 1, 0xdeadbeef]) {
        const n = native().crc32cNative(v, init);
        if (n < 0) return; // no SSE4.2: the library is used, nothing to compare
        assert.is(n, crc32cLibrary(v, init), `len ${len} start ${start} init ${init}`);
        assert.is(crc32c(v, init), crc32cLibrary(v, init));
        checked++;
      }
    }
  }
  assert.ok(checked > 100);
  // Known answer: CRC32C("123456789") = 0xE3069283.
  assert.is(crc32c(new Uint8Array(Buffer.from('123456789'))), 0xe3069283);
});

test('two worker lanes on one device keep its order and verify', async () => {
  const pool = new EnginePool({ threads: 2 });
  try {
    const r = await runEmulated({ pool, devices: 1, lanesPerDevice: 2, maxRounds: 3, device: { stateSize: 8 << 20, maxChunk: 64 << 10, dirtyRate: 20000 } });
    assert.ok(r.ok);
    assert.is(r.load.devices[0].verified, true);
  } finally {
    await pool.close();
  }
});

test.run();
