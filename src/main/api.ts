// High-level operations used by the CLI and embedders: save devices to a stream file, load a stream file, and the
// whole emulated round trip (`vfio-mig run`).
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';
import { ContainerWriter } from './container/writer.js';
import { FileSink } from './container/sink.js';
import { EnginePool } from './engine/pool.js';
import { Migration, type MigrationOptions, type MigrationReport } from './engine/migration.js';
import { Loader, type LoadOptions, type LoadReport } from './engine/load.js';
import { EmulatedTransport } from './transport/emulated.js';
import type { EmulatedDeviceOptions } from './emulated/device.js';
import type { DeviceTransport } from './transport/transport.js';

export async function saveDevices(transports: DeviceTransport[], streamPath: string, pool: EnginePool,
  opts: MigrationOptions = {}, onMigration?: (m: Migration) => void): Promise<MigrationReport> {
  const writer = new ContainerWriter(FileSink.open(streamPath));
  const m = new Migration(transports, pool, writer, opts);
  onMigration?.(m);
  return m.run();
}

export async function loadStream(streamPath: string, pool: EnginePool, opts: LoadOptions = {},
  onLoader?: (l: Loader) => void): Promise<{ report: LoadReport; loader: Loader }> {
  const loader = new Loader(streamPath, pool, opts);
  onLoader?.(loader);
  try {
    return { report: await loader.run(), loader };
  } catch (e) {
    Object.assign(e as object, { loader });
    throw e;
  }
}

export interface RunOptions extends MigrationOptions {
  devices: number;
  device: EmulatedDeviceOptions;
  /** Per-device seed = seed + index, so devices differ. */
  seed?: number;
  stream?: string;
  keepStream?: boolean;
  pool?: EnginePool;
  threads?: number;
  onMigration?: (m: Migration) => void;
  /** Called with the destination side before it starts (events, status()). */
  onLoader?: (l: Loader) => void;
  /** Vendor faults to inject into source devices before the migration (docs/EMULATED-DEVICE.md). */
  faults?: { device: number; kind: string; arg: number }[];
}

export interface RunReport {
  ok: boolean;
  stream: string;
  save: MigrationReport;
  load: LoadReport;
}

/** Create emulated sources, migrate them live through a stream file into fresh destinations, verify digests. */
export async function runEmulated(o: RunOptions): Promise<RunReport> {
  const pool = o.pool ?? new EnginePool({ threads: o.threads });
  const stream = o.stream ?? path.join(os.tmpdir(), `vfio-mig-${process.pid}-${Date.now()}.vfmig`);
  const sources: EmulatedTransport[] = [];
  let loader: Loader | undefined;
  try {
    for (let i = 0; i < o.devices; i++) {
      sources.push(EmulatedTransport.create({ ...o.device, name: `${o.device.name ?? 'emu'}${i}`, seed: (o.seed ?? 1) + i }));
    }
    for (const f of o.faults ?? []) sources[f.device]?.device.setFault(f.kind, f.arg);
    const save = await saveDevices(sources, stream, pool, o, o.onMigration);
    const res = await loadStream(stream, pool, { verify: true, signal: o.signal, progressIntervalMs: o.progressIntervalMs }, o.onLoader);
    loader = res.loader;
    return { ok: save.ok && res.report.ok && res.report.devices.every((d) => d.verified === true), stream, save, load: res.report };
  } catch (e) {
    loader = (e as { loader?: Loader }).loader;
    throw e;
  } finally {
    for (const s of sources) s.destroy();
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy?.();
    if (!o.stream && !o.keepStream) fs.rmSync(stream, { force: true });
    if (!o.pool) await pool.close();
  }
}
