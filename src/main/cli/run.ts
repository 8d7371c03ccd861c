// vfio-mig run / save / load.
import { EnginePool, defaultThreads } from '../engine/pool.js';
import { admitEmulated } from '../engine/budget.js';
import { pendingRollback, runEmulated, saveDevices, loadStream } from '../api.js';
import { EmulatedTransport } from '../transport/emulated.js';
import type { MigrationReport, StopCopyOrder } from '../engine/migration.js';
import type { VendorMode } from '../../workers/tasks.js';
import { RollbackOutcome, type RollbackResult } from '../engine/source-device.js';
import { releaseDestination, type LoadReport, type Loader } from '../engine/load.js';
import { reachForSpec } from '../device/registry.js';
import type { SendReport } from '../live/sender.js';
import type { ReceiveReport } from '../live/receiver.js';
import type { ProfileName } from '../protocol/profiles.js';
import type { TrappedAccess } from '../protocol/migration-region.js';
import type { EngineDevice } from '../engine/source-device.js';
import { emulatedV2 } from '../reach/emulated/v2.js';
import type { DataMode, OffsetPolicy, EmulatedDeviceOptions } from '../emulated/device.js';
import { table } from './args.js';
import { fmtBytes, fmtRate } from '../report/units.js';
import { inspectJson, loadJson, receiveJson, saveJson, sendJson } from '../report/json.js';
import { CommandOutput, type OutputFlags } from './output.js';
import { ErrorCode, MigError } from '../errors.js';
import { printable as p } from '../text.js';
import { claimOutput } from './io.js';
import { finishBeforeExit, noteCleanup } from './signals.js';
import { openDevices, type ReachFlags } from './devices.js';
import { cmdRunLive } from './live.js';
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';

export interface DeviceFlags extends ReachFlags, OutputFlags {
  devices: number; size: number; profile: ProfileName | 'v2'; allowNoP2p?: boolean; chunk: number; dataMode: DataMode; offsetPolicy: OffsetPolicy;
  dirtyRate: number; dmaRate: number; seed: number; threads?: number; downtime: number; maxRounds: number;
  bandwidth?: number; vendorMode: VendorMode; roundTime: number; roundBytes: number; device?: string[]; dest?: string[];
  memoryBudget?: number; trappedAccess?: TrappedAccess; vendorStall?: number; stopCopyOrder?: StopCopyOrder;
}

/** `count` emulated source devices emu0.. with consecutive seeds (v2 or v1 by the profile in `dev`). */
export function emulatedSources(dev: EmulatedDeviceOptions, count: number, seed: number): EngineDevice[] {
  return Array.from({ length: count }, (_, i) => {
    const d = { ...dev, name: `emu${i}`, seed: seed + i };
    return d.profile === 'v2' ? emulatedV2(d) : EmulatedTransport.create(d);
  });
}

export function deviceOpts(o: DeviceFlags): EmulatedDeviceOptions {
  if (o.size % 4096 || o.size < 8192) throw new MigError(ErrorCode.BAD_ARGUMENT, `--size: ${o.size} must be a multiple of 4096 and at least 8 KiB`);
  if (o.chunk % 4096 || o.chunk < 8192) throw new MigError(ErrorCode.BAD_ARGUMENT, `--chunk: ${o.chunk} must be a multiple of 4096 and at least 8 KiB`);
  return {
    profile: o.profile, stateSize: o.size, maxChunk: o.chunk, dataMode: o.dataMode, offsetPolicy: o.offsetPolicy,
    dirtyRate: o.dirtyRate, dmaRate: o.dmaRate,
  };
}

export function migOpts(o: DeviceFlags) {
  return {
    downtimeLimitMs: o.downtime, maxRounds: o.maxRounds, bandwidthCap: o.bandwidth, vendorMode: o.vendorMode,
    roundTimeMs: o.roundTime, roundBytes: o.roundBytes, memoryBudget: o.memoryBudget, allowWithoutP2P: o.allowNoP2p,
    trappedAccess: o.trappedAccess, vendorStallMs: o.vendorStall, stopCopyOrder: o.stopCopyOrder,
  };
}

export function saveText(r: MigrationReport): string {
  const lines: string[] = [];
  lines.push(`pre-copy: ${r.rounds.length} round(s), ${fmtBytes(r.precopyBytes)}`);
  if (r.rounds.length) {
    lines.push(table(['round', 'pending', 'sent', 'ms', 'rate'],
      r.rounds.map((x) => [x.round, fmtBytes(x.pendingBefore), fmtBytes(x.bytes), x.ms.toFixed(1), fmtRate(x.bandwidth)])));
  }
  // Not end to end (the destination is not part of a save): "source stop-and-copy time", never "downtime".
  lines.push(`stop-and-copy: ${fmtBytes(r.stopCopyBytes)}; source stop-and-copy time ${r.stopCopyMs.toFixed(1)} ms (devices stopped until all were drained)`);
  lines.push(table(['device', 'rounds', 'pre-copy', 'stop-copy', 'stop-copy ms', 'stream', 'lock wait ms', 'state'],
    r.devices.map((d) => [d.name, d.rounds, fmtBytes(d.precopyBytes), fmtBytes(d.stopCopyBytes), d.stopCopyMs.toFixed(1),
      fmtBytes(d.streamBytes), d.lockWaitMs.toFixed(2), d.finalState ?? ''])));
  const q = r.dirty.latencyMs;
  lines.push(`save: ${fmtBytes(r.streamBytes)} stream in ${r.totalMs.toFixed(0)} ms in all (setup, rounds, stop-and-copy, digests): ${fmtRate(r.throughputMBps * 1e6)} of device data`);
  lines.push(`dirty bitmap: ${r.dirty.queries} queries, latency p50 ${q.p50.toFixed(3)} ms, p99 ${q.p99.toFixed(3)} ms, max ${q.max.toFixed(3)} ms; guest pages dirtied: ${r.dirty.pages.join(', ')}`);
  for (const a of r.anomalies) lines.push(`vendor anomaly: ${a.device}: ${a.message}${a.chunks > 1 ? ` (${a.chunks} empty chunks in all)` : ''}`);
  const el = r.eventLoopDelayMs;
  lines.push(`main-thread event-loop delay: p50 ${el.p50.toFixed(2)} ms, p99 ${el.p99.toFixed(2)} ms, max ${el.max.toFixed(2)} ms`);
  return lines.join('\n');
}

export function loadText(r: LoadReport): string {
  return [
    table(['device', 'packets', 'data', 'state', 'verified'],
      r.devices.map((d) => [d.name, d.dataPackets, fmtBytes(d.dataBytes), d.state, String(d.verified)])),
    `load: ${fmtBytes(r.bytesRead)} read in ${r.totalMs.toFixed(0)} ms (data phase ${r.dataMs.toFixed(0)} ms, ${fmtRate(r.throughputMBps * 1e6)} of device data)`,
  ].join('\n');
}

type Cancel = { signal?: AbortSignal };

/** Verified by digest, or (a device that cannot digest its state, like a kernel device) loaded and started. */
const loadedOk = (d: { verified: boolean | null; state: string }) => d.verified === true || (d.verified === null && d.state === 'RUNNING');

/** run with --device: those sources, saved through a stream file into the --dest devices, verified by digest. */
async function runReached(o: DeviceFlags & { stream?: string; force?: boolean } & Cancel): Promise<void> {
  const cmd = new CommandOutput('run', o, o);
  if ((o.dest ?? []).length !== o.device!.length) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `--dest: ${o.dest?.length ?? 0} destination(s) for ${o.device!.length} --device source(s)`);
  }
  const stream = o.stream ?? path.join(os.tmpdir(), `vfio-mig-${process.pid}-${Date.now()}.vfmig`);
  const pool = new EnginePool({ threads: o.threads });
  const all: EngineDevice[] = [];
  let failure: unknown;
  try {
    const sources = await openDevices(o.device!, o);
    all.push(...sources);
    const dests = await openDevices(o.dest!, o);
    all.push(...dests);
    let save;
    let src = -1;
    let dst = -1;
    try {
      save = await saveDevices(sources, stream, pool, { ...migOpts(o), force: o.force, signal: o.signal }, (m) => { src = cmd.attachMigration(m); });
    } catch (e) {
      failure = e;
      noteCleanup(`; ${rollbackText(e)}${o.stream ? `nothing written to ${p(o.stream)}` : 'temporary stream removed'}`);
      throw e;
    }
    const { report } = await loadStream(stream, pool, { verify: true, signal: o.signal, makeDestination: (e) => dests[e.index], trappedAccess: o.trappedAccess, vendorStallMs: o.vendorStall },
      (l) => { dst = cmd.attachLoader(l, src); });
    // A kernel device has no digest (verified null): it counts as loaded when it was started.
    const ok = save.ok && report.ok && report.devices.every(loadedOk);
    runDone(cmd, `vfio-mig run: ${sources.length} device(s) reached by ${p(o.device!.join(', '))}`, o.stream ?? stream, save, report, dst, ok);
  } finally {
    await afterRollback(failure, async () => {
      for (const t of all) await t.close();
      if (!o.stream) fs.rmSync(stream, { force: true });
      await pool.close();
    });
  }
}

/** run's --live options (the live demo's connection: parallel channels, mutual TLS). */
export interface LiveRunFlags { channels?: number; tls?: boolean; tlsDir?: string }

export async function cmdRun(o: DeviceFlags & { stream?: string; force?: boolean; live?: 'tcp' | 'unix' | true } & LiveRunFlags & Cancel): Promise<void> {
  if (o.live) return cmdRunLive({ ...o, live: o.live === true ? 'tcp' : o.live });
  if (o.channels !== undefined || o.tls || o.tlsDir) throw new MigError(ErrorCode.BAD_ARGUMENT, '--channels, --tls and --tls-dir go with --live');
  if (o.device?.length) return runReached(o);
  if (o.dest?.length) throw new MigError(ErrorCode.BAD_ARGUMENT, '--dest needs --device sources');
  const dev = deviceOpts(o);
  const cmd = new CommandOutput('run', o, o);
  let src = -1;
  let dst = -1;
  let r;
  try {
    r = await runEmulated({
      ...migOpts(o), devices: o.devices, device: dev, seed: o.seed, stream: o.stream, threads: o.threads, force: o.force, signal: o.signal,
      onMigration: (m) => { src = cmd.attachMigration(m); },
      onLoader: (l) => { dst = cmd.attachLoader(l, src); },
    });
  } catch (e) {
    noteCleanup(`; ${rollbackText(e)}${o.stream ? `nothing written to ${p(o.stream)}` : 'temporary stream removed'}`);
    await afterRollback(e, async () => undefined); // runEmulated releases its own devices and pool after it
    throw e;
  }
  const head = `vfio-mig run: ${o.devices} device(s) x ${fmtBytes(o.size)}, profile ${o.profile}, data area ${o.dataMode}, data_offset ${o.offsetPolicy}, chunk ${fmtBytes(o.chunk)}, workload ${o.dirtyRate} pages/s`;
  runDone(cmd, head, r.stream, r.save, r.load, dst, r.ok);
}

/** run's summary: the save, the load, the end-to-end downtime, and `verified` once per device and once overall. */
function runDone(cmd: CommandOutput, head: string, stream: string, save: MigrationReport, load: LoadReport, dst: number, ok: boolean): void {
  const downtimeMs = cmd.rec.downtimeMs(dst);
  const downtime = downtimeMs === null ? ''
    : `downtime (end to end: first source device stopped until the last destination device ran): ${downtimeMs.toFixed(1)} ms`;
  const text = [head, saveText(save), loadText(load), downtime, `verified: ${ok}`].filter(Boolean).join('\n');
  cmd.done({ stream, save: saveJson(save), load: loadJson(load), downtimeMs, verified: ok }, text, ok, `verified: ${ok}`);
}

/**
 * A failed command's JSON `result` in the same shape as its success (what was measured before it failed, null
 * where nothing was), and the same as text. `rep` is the report the engine attached to the error.
 */
export function partialReport(command: string, params: Record<string, unknown>, rep: unknown): { result: Record<string, unknown> | null; text: string } {
  const r = rep && typeof rep === 'object' ? rep : {};
  const save = 'rounds' in r ? r as MigrationReport : null;
  const load = 'bytesRead' in r ? r as LoadReport : null;
  const text = save ? saveText(save) : load ? loadText(load) : '';
  const stream = (params.stream ?? params.file ?? null) as string | null;
  switch (command) {
    case 'run': return { result: { stream: null, save: save && saveJson(save), load: load && loadJson(load), downtimeMs: null, verified: false }, text };
    case 'save': return { result: { stream, save: save && saveJson(save) }, text };
    case 'load': return { result: { stream, load: load && loadJson(load) }, text };
    case 'inspect': return { result: 'records' in r && 'size' in r ? inspectJson(r as unknown as Parameters<typeof inspectJson>[0]) : null, text };
    case 'stress': {
      if (!('iterations' in r)) return { result: null, text };
      const { seconds, ...rest } = r as unknown as { seconds: number };
      return { result: { ...rest, durationMs: seconds * 1000 }, text };
    }
    // The live report rides on the error (send/receive): the same result as on success, with the cause.
    case 'send': return { result: 'bytesSent' in r ? sendJson(r as SendReport) : null, text };
    case 'receive': return { result: 'bytesReceived' in r ? receiveJson(r as ReceiveReport) : null, text };
    default: return { result: null, text };
  }
}

export async function cmdSave(o: DeviceFlags & { stream: string; force?: boolean } & Cancel): Promise<void> {
  const dev = deviceOpts(o);
  claimOutput(o.stream);
  if (o.stream === '-' && process.stdout.isTTY) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, '--stream -: standard output is a terminal; redirect it to a file or a pipe');
  }
  if (!o.device?.length) {
    admitEmulated({ what: `save of ${o.devices} device(s)`, devices: o.devices, device: dev, destinations: false,
      newPoolThreads: o.threads ?? defaultThreads(), memoryBudget: o.memoryBudget });
  }
  const cmd = new CommandOutput('save', o, o);
  const pool = new EnginePool({ threads: o.threads });
  const sources: EngineDevice[] = [];
  let failure: unknown;
  try {
    sources.push(...(o.device?.length ? await openDevices(o.device, o) : emulatedSources(dev, o.devices, o.seed)));
    let r;
    try {
      r = await saveDevices(sources, o.stream, pool, { ...migOpts(o), force: o.force, signal: o.signal }, (m) => cmd.attachMigration(m));
    } catch (e) {
      failure = e;
      noteCleanup(`; ${rollbackText(e)}${o.stream === '-' ? 'standard output holds a stream ending in ABORT' : `nothing written to ${p(o.stream)}`}`);
      throw e;
    }
    const where = `stream: ${p(o.stream === '-' ? 'standard output' : o.stream)}`;
    cmd.done({ stream: o.stream, save: saveJson(r) }, `${saveText(r)}\n${where}`, r.ok, where);
  } finally {
    await afterRollback(failure, async () => {
      for (const s of sources) await releaseDestination(s);
      await pool.close();
    });
  }
}

export async function cmdLoad(file: string, o: { threads?: number; device?: string[]; memoryBudget?: number; trappedAccess?: TrappedAccess; vendorStall?: number } & OutputFlags & ReachFlags & Cancel): Promise<void> {
  const cmd = new CommandOutput('load', { file, ...o }, o);
  const pool = new EnginePool({ threads: o.threads });
  let loader;
  // Devices whose reach provides destinations are opened (and closed) by the loader; others are opened here.
  const destinations = o.device?.length && o.device.every((x) => reachForSpec(x)?.provider.destination) ? o.device : undefined;
  const reached = o.device?.length && !destinations ? await openDevices(o.device, o) : [];
  try {
    const makeDestination = reached.length ? (e: { index: number; name: string }) => {
      const t = reached[e.index];
      if (!t) throw new MigError(ErrorCode.BAD_ARGUMENT, `the stream has more devices than the ${reached.length} --device destination(s)`, { device: e.name });
      return t;
    } : undefined;
    const res = await loadStream(file, pool, { verify: true, signal: o.signal, makeDestination, destinations, memoryBudget: o.memoryBudget, trappedAccess: o.trappedAccess, vendorStallMs: o.vendorStall }, (l) => cmd.attachLoader(l));
    loader = res.loader;
    const ok = res.report.devices.every(loadedOk);
    cmd.done({ stream: file, load: loadJson(res.report) }, `${loadText(res.report)}\nverified: ${ok}`, ok, `verified: ${ok}`);
  } catch (e) {
    loader = (e as { loader?: Loader }).loader;
    const n = loader?.dests.length ?? 0;
    noteCleanup(`; no destination started${n ? ` (${n} reset and stopped)` : ''}`);
    throw e;
  } finally {
    if (!reached.length) for (const d of loader?.dests ?? []) await releaseDestination(d.dev);
    for (const t of reached) await t.close();
    await pool.close();
  }
}

/**
 * "2 of 2 source device(s) RUNNING again, " from a failed save's rollback (empty when the save was not reached), and
 * "1 waiting for its vendor call to return (emu0), " for a rollback deferred behind a stalled vendor call.
 */
function rollbackText(e: unknown): string {
  const rb = (e as { report?: { rollback?: RollbackResult[] } }).report?.rollback;
  if (!Array.isArray(rb)) return '';
  const ok = rb.filter((x) => x.outcome !== RollbackOutcome.FAILED && x.outcome !== RollbackOutcome.DEFERRED).length;
  const waiting = rb.filter((x) => x.outcome === RollbackOutcome.DEFERRED).map((x) => p(x.device));
  return `${ok} of ${rb.length} source device(s) RUNNING again, ${waiting.length ? `${waiting.length} waiting for its vendor call to return (${waiting.join(', ')}), ` : ''}`;
}

/**
 * After a failed save: `release` runs now, or, when a rollback waits for a stalled vendor call (the save rejected
 * without waiting for it), once that rollback is done; the process exits only after it, printing each such device's
 * final outcome (main.ts drains it after the command's own line).
 */
async function afterRollback(failure: unknown, release: () => Promise<void>): Promise<void> {
  const settled = failure === undefined ? undefined : pendingRollback(failure);
  if (!settled) { await release(); return; }
  const waiting = new Set(((failure as { report?: { rollbackPending?: string[] } }).report?.rollbackPending ?? []));
  finishBeforeExit(settled.finally(release).then((finals) => finals.filter((r) => waiting.has(r.device))
    .map((r) => `${p(r.device)}: rollback after its vendor call returned: ${r.outcome}${r.outcome === RollbackOutcome.FAILED ? ' (NOT RUNNING)' : ''}: ${p(r.detail)}`)));
}
