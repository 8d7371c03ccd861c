// Bench rows of VFIO migration v2 (`npm run bench`, section j): the emulated v2 device's data fd (a pipe fed by the
// vendor I/O thread) beside the v1 region path against the same copy limit (the seed's native v1 loop on a device of
// the same size), and the stop-and-copy time of a v2 device whose initial bytes went out during pre-copy versus one
// without PRE_COPY (everything in the downtime). Stop-and-copy only saves go to /dev/null.
import fs from 'node:fs';
import { native } from '../src/addon/native.js';
import { saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { destroyEmulated, emulatedV2 } from '../src/main/reach/emulated/v2.js';
import type { V2Device } from '../src/main/protocol/v2/device.js';
import type { BenchCtx } from './vfio-user.js';

const MiB = 1 << 20;
const gbps = (bytes: number, ms: number) => bytes / 1e9 / (ms / 1000);

export async function benchV2(c: BenchCtx): Promise<Record<string, unknown>> {
  c.log('j. VFIO migration v2');
  const size = (c.quick ? 64 : 256) * MiB;
  const chunk = 1 << 20;
  const v1 = EmulatedTransport.create({ name: 'v1', profile: 'linux-5.8', stateSize: size, maxChunk: chunk, dirtyRate: 0, dmaRate: 0, seed: 1 });
  const v2 = emulatedV2({ name: 'v2', stateSize: size, maxChunk: chunk, dirtyRate: 0, dmaRate: 0, seed: 1 });
  const out: Record<string, unknown> = {};
  const nul = fs.openSync('/dev/null', 'w');
  try {
    // The copy limit: the seed's v1 protocol loop, natively, one thread, same state size and chunk.
    const limit = () => {
      v1.device.reset();
      const h = native().regionOpenEmu(v1.device.id);
      const buf = new Uint8Array(4 * chunk);
      try {
        const t0 = performance.now();
        const bytes = native().baselineSequentialSave([h], 1, buf, nul);
        return gbps(bytes, performance.now() - t0);
      } finally { native().regionClose(h); }
    };
    const save = async (d: EmulatedTransport | V2Device) => {
      if (d instanceof EmulatedTransport) d.device.reset(); else d.reset();
      const r = await saveDevices([d], '/dev/null', c.pool, { maxRounds: 0, digests: false, dirtyQueryIntervalMs: 0, force: true });
      return gbps(r.stopCopyBytes, r.stopCopyMs);
    };
    const p1 = await c.measurePair(limit, () => save(v1));
    const p2 = await c.measurePair(limit, () => save(v2));
    out.v1 = p1;
    out.v2 = p2;
    c.row('engine save, 1 v1 device (region, mmap) -> /dev/null', `${p1.engine.median.toFixed(2)} GB/s`, `${p1.base.median.toFixed(2)} GB/s native v1 loop`, p1.ratio.median.toFixed(2), 'beside v2');
    c.row('engine save, 1 v2 device (data fd) -> /dev/null', `${p2.engine.median.toFixed(2)} GB/s`, `${p2.base.median.toFixed(2)} GB/s native v1 loop`, p2.ratio.median.toFixed(2), 'same copy limit');

    // Downtime: initial bytes during pre-copy (PRE_COPY) versus none (STOP_COPY only), under a running workload.
    const dsize = (c.quick ? 32 : 128) * MiB;
    const downtime = async (migFlags: number) => {
      const d = emulatedV2({ name: `dt${migFlags}`, stateSize: dsize, maxChunk: chunk, dirtyRate: 2000, dmaRate: 0, seed: 3, migFlags });
      try {
        const r = await saveDevices([d], '/dev/null', c.pool, { maxRounds: 10, digests: false, force: true });
        return r.stopCopyMs;
      } finally { destroyEmulated(d); }
    };
    const withPre = await c.measure(() => downtime(7));
    const without = await c.measure(() => downtime(3));
    out.stopCopyMs = { precopy: withPre, noPrecopy: without };
    c.row(`v2 stop-and-copy time, ${dsize / MiB} MiB device, initial bytes sent in pre-copy`, `${withPre.median.toFixed(1)} ms`,
      `${without.median.toFixed(1)} ms without PRE_COPY`, (withPre.median / without.median).toFixed(3), 'pre-copy shrinks the downtime');
  } finally {
    fs.closeSync(nul);
    v1.destroy();
    destroyEmulated(v2);
  }
  return out;
}

