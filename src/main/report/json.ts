// The one JSON document every command prints with --json (docs/JSON.md, docs/vfio-mig.schema.json): the same
// envelope for success and failure, the command's result inside, every quantity's unit in its field name.
import fs from 'node:fs';
import type { MigrationReport } from '../engine/migration.js';
import type { LoadReport } from '../engine/load.js';
import type { SendReport } from '../live/sender.js';
import type { ReceiveReport } from '../live/receiver.js';

export const RESULT_SCHEMA = 'vfio-mig.result';
export const EVENTS_SCHEMA = 'vfio-mig.events';
export const SCHEMA_VERSION = 1;

function packageVersion(): string {
  try {
    return JSON.parse(fs.readFileSync(new URL('../../../../package.json', import.meta.url), 'utf8')).version as string;
  } catch {
    return '0.0.0';
  }
}
export const TOOL = { name: 'vfio-mig', version: packageVersion() };

export interface ErrorJson { code: string; message: string; device: string | null; offset: number | null; register: string | null }

export interface ResultDocument {
  schema: typeof RESULT_SCHEMA;
  schemaVersion: number;
  tool: { name: string; version: string };
  command: string;
  startedAt: string;
  endedAt: string;
  durationMs: number;
  params: Record<string, unknown>;
  ok: boolean;
  error: ErrorJson | null;
  /** The command's result (on failure: what was measured before it failed, or null). */
  result: Record<string, unknown> | null;
}

/** Flag names -> parameter names that carry their unit. */
const PARAM_UNITS: Record<string, string> = {
  size: 'sizeBytes', chunk: 'chunkBytes', downtime: 'downtimeLimitMs', bandwidth: 'bandwidthBytesPerSecond',
  timeout: 'timeoutMs', keepalive: 'keepaliveMs', switchoverAckTimeout: 'switchoverAckTimeoutMs', availSwitchoverBandwidth: 'availSwitchoverBandwidthBytesPerSecond', dirtyRate: 'dirtyPagesPerSecond', dmaRate: 'dmaPagesPerSecond', roundTime: 'roundTimeMs', roundBytes: 'roundBytes',
};

export function paramsJson(o: object): Record<string, unknown> {
  const p: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) {
    if (typeof v === 'function' || v === undefined || v instanceof AbortSignal) continue;
    p[PARAM_UNITS[k] ?? k] = v;
  }
  return p;
}

export function errorJson(e: { code?: unknown; message?: unknown; device?: unknown; offset?: unknown; register?: unknown }): ErrorJson {
  return {
    code: String(e.code ?? 'VFM_INTERNAL'), message: String(e.message ?? ''), device: typeof e.device === 'string' ? e.device : null,
    offset: typeof e.offset === 'number' ? e.offset : null, register: typeof e.register === 'string' ? e.register : null,
  };
}

const summary = (s: { count: number; p50: number; p99: number; max: number }) => ({ count: s.count, p50Ms: s.p50, p99Ms: s.p99, maxMs: s.max });

export function saveJson(r: MigrationReport): Record<string, unknown> {
  return {
    phase: r.phase, totalMs: r.totalMs, streamBytes: r.streamBytes, precopyBytes: r.precopyBytes, stopCopyBytes: r.stopCopyBytes,
    /** Devices stopped until all were drained: the source stop-and-copy time (not end-to-end downtime). */
    stopCopyMs: r.stopCopyMs, bytesPerSecond: r.throughputMBps * 1e6,
    rounds: r.rounds.map((x) => ({ round: x.round, pendingBytes: x.pendingBefore, bytes: x.bytes, ms: x.ms, bytesPerSecond: x.bandwidth })),
    devices: r.devices.map((d) => ({
      name: d.name, rounds: d.rounds, precopyBytes: d.precopyBytes, precopyChunks: d.precopyChunks, stopCopyBytes: d.stopCopyBytes,
      stopCopyChunks: d.stopCopyChunks, stopCopyMs: d.stopCopyMs, streamBytes: d.streamBytes, lastPendingBytes: d.lastPending,
      lockWaitMs: d.lockWaitMs, finalState: d.finalState ?? null, digest: d.digest ?? null,
    })),
    dirtyBitmap: {
      queries: r.dirty.queries, latency: summary(r.dirty.latencyMs), lockWait: summary(r.dirty.lockWaitMs), pagesDirtied: r.dirty.pages,
    },
    eventLoopDelay: { p50Ms: r.eventLoopDelayMs.p50, p99Ms: r.eventLoopDelayMs.p99, maxMs: r.eventLoopDelayMs.max },
    anomalies: r.anomalies ?? [],
    rollback: r.rollback ?? null,
  };
}

/** inspect: the walk's fields, with the few unit-less names given their unit (new fields pass through). */
export function inspectJson<R extends { file: string; size: number; devices: { packets?: { offset: number; tag: string; size?: number }[] }[] }>(r: R): Record<string, unknown> {
  const { size, devices, ...rest } = r;
  return {
    ...rest, fileBytes: size,
    devices: devices.map(({ packets, ...d }) => ({
      ...d, ...(packets ? { packets: packets.map((p) => ({ fileOffsetBytes: p.offset, tag: p.tag, ...(p.size !== undefined ? { bytes: p.size } : {}) })) } : {}),
    })),
  };
}

export function loadJson(r: LoadReport): Record<string, unknown> {
  const bytes = r.devices.reduce((a, d) => a + d.dataBytes, 0);
  return {
    totalMs: r.totalMs, dataMs: r.dataMs, streamBytes: r.bytesRead, dataBytes: bytes, bytesPerSecond: r.throughputMBps * 1e6,
    devices: r.devices.map((d) => ({
      name: d.name, dataPackets: d.dataPackets, dataBytes: d.dataBytes, state: d.state, digest: d.digest ?? null,
      expectedDigest: d.expectedDigest ?? null, verified: d.verified,
      // v2 only: whether DEV_INIT_DATA_SENT arrived (the source's initial bytes all loaded; switchover-ack's trigger).
      ...(d.initDataSent !== undefined ? { initDataSent: d.initDataSent } : {}),
    })),
    verified: r.devices.length > 0 && r.devices.every((d) => d.verified === true),
  };
}

const ms = (v: number | undefined) => v ?? null;
const verifiedAll = (ds: { verified: boolean | null }[] | undefined) => !!ds && ds.length > 0 && ds.every((d) => d.verified === true);
const causeJson = (c: SendReport['cause']) => (c ? { ...errorJson(c), side: c.side } : null);

/** send: the live migration as the source saw it; `downtimeMs` is end to end (first source device stopped -> every destination device loaded). */
export function sendJson(r: SendReport): Record<string, unknown> {
  return {
    to: r.uri, state: r.state, session: r.session ?? null, version: r.version ?? null, channels: r.channels, tls: r.tls,
    bytes: r.bytesSent, totalMs: r.totalMs, downtimeMs: ms(r.downtimeMs), destinationDowntimeMs: ms(r.destinationDowntimeMs),
    expectedDowntimeMs: ms(r.expectedDowntimeMs), switchoverAckMs: ms(r.switchoverAckMs), save: r.save ? saveJson(r.save) : null,
    devices: (r.destination ?? []).map((d) => ({ name: d.name, state: d.state, verified: d.verified })),
    verified: verifiedAll(r.destination), refused: r.refused ?? [], cause: causeJson(r.cause), rollback: r.rollback ?? null,
  };
}

/** receive: the same migration as the destination saw it (`downtimeMs` as the source measured it, end to end). */
export function receiveJson(r: ReceiveReport): Record<string, unknown> {
  return {
    listen: r.uri, address: r.address ?? null, state: r.state, session: r.session ?? null, version: r.version ?? null,
    channels: r.channels, tls: r.tls, peer: r.peer ?? null, peerIdentity: r.peerIdentity ?? null, bytes: r.bytesReceived,
    channelBytes: r.channelBytes ?? null, totalMs: r.totalMs, downtimeMs: ms(r.downtimeMs), destinationDowntimeMs: ms(r.destinationDowntimeMs),
    load: r.load ? loadJson(r.load) : null, devices: r.devices.map((d) => ({ name: d.name, state: d.state, verified: d.verified })),
    verified: verifiedAll(r.devices), saved: r.saved ?? null, refused: r.refused ?? [], cause: causeJson(r.cause),
  };
}

/** Builds the document: `start()` when the command begins, `done()`/`failed()` when it ends. */
export class ResultJson {
  private readonly started = new Date();
  private readonly t0 = performance.now();
  constructor(readonly command: string, readonly params: Record<string, unknown>) {}

  document(ok: boolean, result: Record<string, unknown> | null, error: ErrorJson | null): ResultDocument {
    return {
      schema: RESULT_SCHEMA, schemaVersion: SCHEMA_VERSION, tool: TOOL, command: this.command, startedAt: this.started.toISOString(),
      endedAt: new Date().toISOString(), durationMs: performance.now() - this.t0, params: this.params, ok, error, result,
    };
  }
}
