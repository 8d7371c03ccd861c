// High-level operations used by the CLI and embedders: save devices to a stream file, load a stream file, and the
// whole emulated round trip (`vfio-mig run`).
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';
import crypto from 'node:crypto';
import { ContainerWriter } from './container/writer.js';
import { FileSink } from './container/sink.js';
import { OutputFile, removeOnExit } from './container/output.js';
import { checkLoadOptions, checkMigrationOptions, checkPath, optBoolean, optFunction, optNumber, optionsObject } from './options.js';
import { ErrorCode, MigError, abortError, normalised } from './errors.js';
import { EnginePool, defaultThreads } from './engine/pool.js';
import { admitEmulated } from './engine/budget.js';
import { Migration, type MigrationOptions, type MigrationReport } from './engine/migration.js';
import { Loader, type LoadOptions, type LoadReport } from './engine/load.js';
import { EmulatedTransport } from './transport/emulated.js';
import type { EmulatedDeviceOptions } from './emulated/device.js';
import type { EngineDevice, RollbackResult } from './engine/source-device.js';
import { destroyEmulated, emulatedDeviceOf, emulatedV2 } from './reach/emulated/v2.js';

export interface SaveOptions extends MigrationOptions {
  /** Replace an existing file at the stream path (default: refuse with VFM_OUTPUT_EXISTS). Never an input. */
  force?: boolean;
}

/**
 * What a failed or cancelled saveDevices / runEmulated rejects with, besides its `report`, when a device's rollback
 * had to wait for a vendor call in progress (`report.rollbackPending` names those devices): `settled` resolves with
 * every device's final rollback outcome once no worker is left inside a vendor call (and, for runEmulated, once its
 * own devices and pool are released). The rejection itself does not wait for the vendor. `report.rollback` is
 * updated in place then, and `rollbackPending` removed. Await `settled` before destroying or reusing those devices.
 */
export interface PendingRollback {
  settled: Promise<RollbackResult[]>;
}

/** The pending rollback a rejection of saveDevices / runEmulated carries, if any (see PendingRollback). */
export function pendingRollback(e: unknown): Promise<RollbackResult[]> | undefined {
  const s = (e as Partial<PendingRollback> | null)?.settled;
  return s instanceof Promise ? s : undefined;
}

/** `e` carries `settled` (not enumerable: the error serialises as before). */
function withPending<E>(e: E, settled: Promise<RollbackResult[]>): E {
  if (e && typeof e === 'object') Object.defineProperty(e, 'settled', { value: settled, enumerable: false, configurable: true });
  return e;
}

/**
 * Save `transports` into a stream file ('-': standard output). The file is written under a temporary name in the
 * same folder and renamed when the save succeeds: a failed or cancelled save leaves nothing at `streamPath`. A
 * cancel rejects at once, even while a vendor call stalls: see PendingRollback.
 */
export async function saveDevices(transports: EngineDevice[], streamPath: string, pool: EnginePool,
  opts: SaveOptions = {}, onMigration?: (m: Migration) => void): Promise<MigrationReport> {
  return normalised(async () => {
    // Every argument is checked before the output is created.
    checkPath(streamPath, 'stream path');
    checkMigrationOptions(opts);
    if (!Array.isArray(transports) || transports.length === 0) throw new MigError(ErrorCode.BAD_ARGUMENT, 'a migration needs at least one device');
    if (!(pool instanceof EnginePool)) throw new MigError(ErrorCode.BAD_ARGUMENT, 'pool must be an EnginePool');
    if (onMigration !== undefined && typeof onMigration !== 'function') throw new MigError(ErrorCode.BAD_ARGUMENT, 'onMigration must be a function');
    const out = OutputFile.open(streamPath, { force: opts.force });
    let m: Migration | undefined;
    let writersLeft: Promise<unknown> | undefined;
    try {
      m = new Migration(transports, pool, new ContainerWriter(FileSink.onOutput(out)), opts);
      onMigration?.(m);
      const r = await m.run();
      // A cancel that lands after the last record still leaves no file: the caller asked to stop.
      if (opts.signal?.aborted) throw Object.assign(abortError(opts.signal, 'migration cancelled'), { report: r });
      out.commit();
      return r;
    } catch (e) {
      const rep = (e as { report?: MigrationReport }).report;
      if (m && rep?.rollbackPending?.length) {
        // A worker is still inside a stalled vendor call: reject now; its device's rollback runs when the call
        // returns (Migration.settled), and the report then gives the final outcomes.
        const settled = m.settled.then((finals) => {
          rep.rollback = finals;
          delete rep.rollbackPending;
          return finals;
        });
        writersLeft = settled.catch(() => undefined);
        throw withPending(e, settled);
      }
      throw e;
    } finally {
      // No-op once committed. A stalled worker may still hold the file's descriptor: it is closed after it returns.
      out.discard(writersLeft);
    }
  });
}

export async function loadStream(streamPath: string, pool: EnginePool, opts: LoadOptions = {},
  onLoader?: (l: Loader) => void): Promise<{ report: LoadReport; loader: Loader }> {
  return normalised(async () => {
    checkPath(streamPath, 'stream path');
    checkLoadOptions(opts);
    if (!(pool instanceof EnginePool)) throw new MigError(ErrorCode.BAD_ARGUMENT, 'pool must be an EnginePool');
    const loader = new Loader(streamPath, pool, opts);
    onLoader?.(loader);
    try {
      return { report: await loader.run(), loader };
    } catch (e) {
      Object.assign(e as object, { loader });
      throw e;
    }
  });
}

export interface RunOptions extends MigrationOptions {
  devices: number;
  device: EmulatedDeviceOptions;
  /** Per-device seed = seed + index, so devices differ. */
  seed?: number;
  /** Keep the stream in this file (default: a temporary file, removed). */
  stream?: string;
  keepStream?: boolean;
  /** Replace an existing `stream` file. */
  force?: boolean;
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
  return normalised(async () => {
    const ro = optionsObject(o, 'run options');
    checkMigrationOptions(ro);
    optNumber(ro, 'devices', 1, 1024, true);
    if (o.devices === undefined) throw new MigError(ErrorCode.BAD_ARGUMENT, 'run options: devices is required');
    optNumber(ro, 'seed', 0, 2 ** 32 - 1, true);
    optNumber(ro, 'threads', 1, 256, true);
    optBoolean(ro, 'keepStream');
    optFunction(ro, 'onMigration');
    optionsObject(o.device, 'device options');
    if (o.stream !== undefined) {
      checkPath(o.stream, 'stream');
      if (o.stream === '-') throw new MigError(ErrorCode.BAD_ARGUMENT, 'run reads its stream back: it cannot go to standard output');
    }
    if (o.pool !== undefined && !(o.pool instanceof EnginePool)) throw new MigError(ErrorCode.BAD_ARGUMENT, 'pool must be an EnginePool');
    // Admission: sources, destinations, guest RAM, dirty logs, staging and threads, before anything exists.
    const memoryBudget = admitEmulated({
      what: `run of ${o.devices} device(s)`, devices: o.devices, device: o.device, destinations: true,
      newPoolThreads: o.pool ? 0 : o.threads ?? defaultThreads(), memoryBudget: o.memoryBudget,
    });
    const stream = o.stream ?? path.join(os.tmpdir(), `vfio-mig-${process.pid}-${crypto.randomBytes(6).toString('hex')}.vfmig`);
    const pool = o.pool ?? new EnginePool({ threads: o.threads });
    // A default stream is scratch: gone even if a second signal ends the process before the cleanup below.
    const forget = !o.stream && !o.keepStream ? removeOnExit(stream) : () => undefined;
    const sources: EngineDevice[] = [];
    let loader: Loader | undefined;
    let pending: Promise<RollbackResult[]> | undefined;
    try {
      for (let i = 0; i < o.devices; i++) {
        const dopts = { ...o.device, name: `${o.device.name ?? 'emu'}${i}`, seed: (o.seed ?? 1) + i };
        sources.push(o.device.profile === 'v2' ? emulatedV2(dopts) : EmulatedTransport.create(dopts));
      }
      for (const f of o.faults ?? []) if (sources[f.device]) emulatedDeviceOf(sources[f.device])?.setFault(f.kind, f.arg);
      const save = await saveDevices(sources, stream, pool, o, o.onMigration);
      const res = await loadStream(stream, pool, {
        verify: true, signal: o.signal, progressIntervalMs: o.progressIntervalMs, memoryBudget, trappedAccess: o.trappedAccess, vendorStallMs: o.vendorStallMs,
      }, o.onLoader);
      loader = res.loader;
      return { ok: save.ok && res.report.ok && res.report.devices.every((d) => d.verified === true), stream, save, load: res.report };
    } catch (e) {
      loader = (e as { loader?: Loader }).loader;
      const settled = pendingRollback(e);
      if (settled) {
        // Reject now; the sources (one still inside a vendor call) and the pool are released once it returns.
        pending = settled.finally(release);
        throw withPending(e, pending);
      }
      throw e;
    } finally {
      if (!pending) await release();
    }

    async function release(): Promise<void> {
      for (const s of sources) destroyEmulated(s);
      for (const d of loader?.dests ?? []) destroyEmulated(d.dev);
      if (!o.stream && !o.keepStream) fs.rmSync(stream, { force: true });
      forget();
      if (!o.pool) await pool.close();
    }
  });
}
