import { EnginePool } from '/work/main/dist/src/main/engine/pool.js';
import { EmulatedTransport } from '/work/main/dist/src/main/transport/emulated.js';
import { saveDevices, loadStream } from '/work/main/dist/src/main/api.js';
const pool = new EnginePool({ threads: 2 });
const ds = [0,1,2,3].map(i => EmulatedTransport.create({ stateSize: 64 << 20, maxChunk: 1 << 20, dirtyRate: 0, dmaRate: 0, seed: i+1 }));
await saveDevices(ds, '/tmp/l.vfmig', pool, { maxRounds: 0, digests: false });
for (let i = 0; i < 4; i++) {
  const t0 = performance.now();
  const { report, loader } = await loadStream('/tmp/l.vfmig', pool, { verify: false });
  const t1 = performance.now();
  for (const d of loader.dests) d.transport.destroy();
  console.log('load ms', (t1 - t0).toFixed(1), 'data ms', report.dataMs.toFixed(1), 'GB/s', (report.devices.reduce((a, d) => a + d.dataBytes, 0) / 1e9 / (report.dataMs / 1000)).toFixed(2));
}
for (const d of ds) d.destroy(); await pool.close();
