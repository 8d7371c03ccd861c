// Bench rows of the vfio-user reach (`npm run bench`, section i): the cost of the socket. The same emulated device is
// saved and loaded in-process (EmulatedTransport) and through vfio-mig's device server (a native server thread in
// this process, so both sides share the same CPUs), paired run by run; then 1 versus N devices, and the effect of
// the write-request bound on a trapped load, and v1 against v2 on the same device. Stop-and-copy only (maxRounds 0), to /dev/null for saves.
import fs from 'node:fs';
import path from 'node:path';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { DeviceServer, VfioUserTransport, connectVfioUser } from '../src/main/reach/vfio-user/index.js';
import type { MigDevice } from '../src/main/device/seam.js';
import type { DeviceTransport } from '../src/main/transport/transport.js';
import type { Loader } from '../src/main/engine/load.js';

interface Stat { min: number; median: number; max: number; samples: number[] }
export interface BenchCtx {
  pool: EnginePool;
  dir: string;
  quick: boolean;
  row: (what: string, value: string, baseline: string, ratio: string, target: string) => void;
  measure: (fn: () => Promise<number> | number, repeats?: number) => Promise<Stat>;
  measurePair: (b: () => Promise<number> | number, e: () => Promise<number> | number) => Promise<{ base: Stat; engine: Stat; ratio: Stat }>;
  log: (s: string) => void;
}

const MiB = 1 << 20;
const gbps = (bytes: number, ms: number) => bytes / 1e9 / (ms / 1000);
const f2 = (s: Stat) => `${s.median.toFixed(2)} (${s.min.toFixed(2)}-${s.max.toFixed(2)})`;

export async function benchVfioUser(c: BenchCtx): Promise<Record<string, unknown>> {
  const size = (c.quick ? 64 : 128) * MiB;
  const dev = { profile: 'linux-5.8' as const, maxChunk: MiB, dirtyRate: 0, dmaRate: 0, guestPages: 1024 };
  let n = 0;
  const sock = () => path.join(c.dir, `vfu-${n++}.sock`);
  const servers: DeviceServer[] = [];
  const clients: DeviceTransport[] = [];
  const local: EmulatedTransport[] = [];
  const others: MigDevice[] = [];
  const results: Record<string, unknown> = {};
  const serve = async (o: Record<string, unknown>, writeBound?: number) => {
    const s = DeviceServer.start({ ...dev, stateSize: size, ...o, socket: sock() });
    servers.push(s);
    const t = await VfioUserTransport.connect(s.socket, { writeBound });
    clients.push(t);
    return { s, t };
  };
  const saveOnce = async (ts: (DeviceTransport | MigDevice)[], resetAll: () => void, out = '/dev/null') => {
    resetAll();
    const r = await saveDevices(ts, out, c.pool, { maxRounds: 0, digests: false, dirtyQueryIntervalMs: 0, force: true });
    return gbps(r.stopCopyBytes, r.stopCopyMs);
  };
  const loadOnce = async (file: string, dests: (DeviceTransport | MigDevice)[] | null) => {
    let loader: Loader | undefined;
    try {
      const r = await loadStream(file, c.pool, { verify: false, makeDestination: dests ? (e) => dests[e.index] : undefined });
      loader = r.loader;
      return r.report.devices.reduce((a, d) => a + d.dataBytes, 0) / 1e9 / (r.report.dataMs / 1000);
    } finally { if (!dests) for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy(); }
  };
  try {
    for (const mode of ['mmap', 'trapped'] as const) {
      c.log(`i. vfio-user ${mode}`);
      const inproc = EmulatedTransport.create({ ...dev, stateSize: size, dataMode: mode, name: `local-${mode}`, seed: 3 });
      local.push(inproc);
      const { s, t } = await serve({ dataMode: mode, seed: 3 });
      const save = await c.measurePair(() => saveOnce([inproc], () => inproc.device.reset()), () => saveOnce([t], () => s.device.reset()));
      c.row(`vfio-user save, 1 x ${size / MiB} MiB, ${mode} data area`, `${save.engine.median.toFixed(2)} GB/s`,
        `${save.base.median.toFixed(2)} GB/s same device in-process`, f2(save.ratio), '');
      // The same bytes twice: a stream from the in-process device (for in-process destinations) and one from the served
      // device (whose device table names vfio-user, for the served destination).
      const file = path.join(c.dir, `vfu-${mode}.vfmig`);
      const fileLocal = path.join(c.dir, `local-${mode}.vfmig`);
      s.device.reset();
      inproc.device.reset();
      await saveDevices([t], file, c.pool, { maxRounds: 0, digests: false, force: true });
      await saveDevices([inproc], fileLocal, c.pool, { maxRounds: 0, digests: false, force: true });
      const { t: dt } = await serve({ dataMode: mode, zeroFill: true });
      const load = await c.measurePair(() => loadOnce(fileLocal, null), () => loadOnce(file, [dt]));
      c.row(`vfio-user load, 1 x ${size / MiB} MiB, ${mode} data area (data phase)`, `${load.engine.median.toFixed(2)} GB/s`,
        `${load.base.median.toFixed(2)} GB/s in-process destination`, f2(load.ratio), '');
      results[mode] = { save, load };
      fs.rmSync(file, { force: true });
      fs.rmSync(fileLocal, { force: true });
    }

    c.log('i. vfio-user 1 vs N');
    const N = 4;
    const each = size / N;
    const many = await Promise.all(Array.from({ length: N }, (_, i) => serve({ dataMode: 'mmap', stateSize: each, seed: 10 + i })));
    const one = await serve({ dataMode: 'mmap', stateSize: size, seed: 20 });
    const nVs1 = await c.measurePair(() => saveOnce([one.t], () => one.s.device.reset()),
      () => saveOnce(many.map((m) => m.t), () => many.forEach((m) => m.s.device.reset())));
    c.row(`vfio-user save, ${N} devices x ${each / MiB} MiB vs 1 x ${size / MiB} MiB (mmap)`, `${nVs1.engine.median.toFixed(2)} GB/s`,
      `${nVs1.base.median.toFixed(2)} GB/s one device`, f2(nVs1.ratio), '');
    results.nVs1 = nVs1;

    c.log('i. vfio-user write bound');
    const src = await serve({ dataMode: 'trapped', seed: 30 });
    const file = path.join(c.dir, 'vfu-wb.vfmig');
    await saveDevices([src.t], file, c.pool, { maxRounds: 0, digests: false, force: true });
    const bounds: Record<string, Stat> = {};
    for (const wb of [4096, 32768, 262144, MiB]) {
      const d = await serve({ dataMode: 'trapped', zeroFill: true }, wb);
      bounds[wb] = await c.measure(() => loadOnce(file, [d.t]));
    }
    const k = (b: number) => (b >= MiB ? `${b / MiB} MiB` : `${b / 1024} KiB`);
    c.row('vfio-user trapped load by write bound (data phase)', Object.entries(bounds).map(([b, s]) => `${k(Number(b))}: ${s.median.toFixed(2)}`).join(', ') + ' GB/s',
      '32 KiB is the default (libvfio-user issue #306)', '', '');
    results.writeBound = bounds;
    fs.rmSync(file, { force: true });

    // v1 (REGION_READ/WRITE of a trapped data area, registers per chunk) against v2 (DEVICE_FEATURE, MIG_DATA_READ
    // until a short read, MIG_DATA_WRITE of write-bound pieces) over the same socket, the same emulated device (size,
    // seed, chunk), paired run by run: the protocol's cost over vfio-user.
    c.log('i. vfio-user v1 vs v2');
    const v1 = await serve({ dataMode: 'trapped', seed: 40 });
    const v2s = DeviceServer.start({ ...dev, profile: 'v2', stateSize: size, seed: 40, socket: sock() });
    servers.push(v2s);
    const v2 = await connectVfioUser(v2s.socket) as MigDevice;
    others.push(v2);
    const v2save = await c.measurePair(() => saveOnce([v1.t], () => v1.s.device.reset()), () => saveOnce([v2], () => v2s.device.reset()));
    c.row(`vfio-user v2 vs v1 save, 1 x ${size / MiB} MiB (v1 trapped data area)`, `${v2save.engine.median.toFixed(2)} GB/s v2`,
      `${v2save.base.median.toFixed(2)} GB/s v1 same device`, f2(v2save.ratio), '');
    const f1 = path.join(c.dir, 'vfu-v1.vfmig');
    const f2file = path.join(c.dir, 'vfu-v2.vfmig');
    v1.s.device.reset();
    v2s.device.reset();
    await saveDevices([v1.t], f1, c.pool, { maxRounds: 0, digests: false, force: true });
    await saveDevices([v2], f2file, c.pool, { maxRounds: 0, digests: false, force: true });
    const d1 = await serve({ dataMode: 'trapped', zeroFill: true });
    const d2s = DeviceServer.start({ ...dev, profile: 'v2', stateSize: size, zeroFill: true, socket: sock() });
    servers.push(d2s);
    const d2 = await connectVfioUser(d2s.socket) as MigDevice;
    others.push(d2);
    const v2load = await c.measurePair(() => loadOnce(f1, [d1.t]), () => loadOnce(f2file, [d2]));
    c.row(`vfio-user v2 vs v1 load, 1 x ${size / MiB} MiB (data phase, 32 KiB write bound)`, `${v2load.engine.median.toFixed(2)} GB/s v2`,
      `${v2load.base.median.toFixed(2)} GB/s v1 same device`, f2(v2load.ratio), '');
    results.v1VsV2 = { save: v2save, load: v2load };
    fs.rmSync(f1, { force: true });
    fs.rmSync(f2file, { force: true });
  } finally {
    for (const t of clients) t.close();
    for (const d of others) await d.close();
    for (const s of servers) s.stop();
    for (const l of local) l.destroy();
  }
  return results;
}
