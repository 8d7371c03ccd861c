import { EnginePool } from '/work/main/dist/src/main/engine/pool.js';
import { EmulatedTransport } from '/work/main/dist/src/main/transport/emulated.js';
import { saveDevices } from '/work/main/dist/src/main/api.js';
import { crc32c } from '/work/main/node_modules/@node-rs/crc32/index.js';
const pool = new EnginePool({ threads: 2 });
const d = EmulatedTransport.create({ stateSize: 256 << 20, maxChunk: 1 << 20, dirtyRate: 0, dmaRate: 0 });
for (let i = 0; i < 3; i++) {
  d.device.reset();
  const r = await saveDevices([d], '/dev/null', pool, { maxRounds: 0, digests: false, dirtyQueryIntervalMs: 0 });
  console.log('GB/s', (r.stopCopyBytes / 1e9 / (r.stopCopyMs / 1000)).toFixed(2), 'ms', r.stopCopyMs.toFixed(1), 'chunks', r.devices[0].stopCopyChunks);
}
const b = new Uint8Array(new SharedArrayBuffer(1 << 20)); b.fill(3);
let t = performance.now(); for (let i = 0; i < 1000; i++) crc32c(b); console.log('crc 1MiB hot ms', ((performance.now() - t) / 1000).toFixed(3));
d.destroy(); await pool.close();
