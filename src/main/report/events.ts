// `--events FILE|-`: the recorder's timeline as NDJSON, one event per line as it happens, shaped like QEMU's QMP
// events ({"timestamp": {"seconds", "microseconds"}, "event", "data"}): MIGRATION (status), MIGRATION_PASS (a
// pre-copy round), VFIO_MIGRATION (a device's state), plus VFIO_MIG_PROGRESS (throttled byte counts) and a first
// VFIO_MIG_START / last VFIO_MIG_END line that carry the schema, the tool version and the command's result.
// send and receive add their live session's VFIO_MIG_LIVE_* events (state, channels, switchover, downtime, errors).
// docs/JSON.md lists every field.
import fs from 'node:fs';
import type { LiveRecEvent, OperatorEvent, Recorder } from './recorder.js';
import type { LiveEvent } from '../live/events.js';
import { EVENTS_SCHEMA, SCHEMA_VERSION, TOOL, type ErrorJson } from './json.js';
import { safeJson } from '../text.js';

/** QEMU's VFIO_MIGRATION device-state names for the v1 device_state values the engine sets. */
const DEVICE_STATE: Record<string, string> = {
  RUNNING: 'running', STOP: 'stop', PRE_COPY: 'pre-copy', STOP_COPY: 'stop-copy', RESUMING: 'resuming', ERROR: 'error',
};

export function qmpEvent(e: OperatorEvent): { event: string; data: Record<string, unknown> } {
  const base = { migration: e.migration, side: e.side };
  switch (e.type) {
    case 'status': return { event: 'MIGRATION', data: { ...base, status: e.status } };
    case 'pass': return {
      event: 'MIGRATION_PASS',
      data: { ...base, pass: e.pass, pendingBytes: e.pendingBytes, bytes: e.bytes, ms: e.ms, bytesPerSecond: e.bytesPerSecond, devices: e.devices },
    };
    case 'device': return {
      event: 'VFIO_MIGRATION',
      data: { ...base, 'device-id': e.device, 'device-state': DEVICE_STATE[e.state] ?? e.state.toLowerCase() },
    };
    case 'progress': return {
      event: 'VFIO_MIG_PROGRESS',
      data: {
        ...base, 'device-id': e.device, phase: e.phase, bytes: e.bytes, pendingBytes: e.pendingBytes, totalBytes: e.totalBytes,
        bytesPerSecond: e.bytesPerSecond, sample: e.sample,
      },
    };
    case 'dirty': return { event: 'VFIO_MIG_DIRTY_QUERY', data: { ...base, 'device-id': e.device, ms: e.ms, pages: e.pages } };
    case 'live': return liveEvent(e, base);
  }
}

/** A live endpoint's events, one name per kind (docs/JSON.md); `side` is always the endpoint's own. */
const LIVE_NAMES: Record<LiveEvent['type'], string> = {
  state: 'VFIO_MIG_LIVE_STATE', listening: 'VFIO_MIG_LIVE_LISTENING', connected: 'VFIO_MIG_LIVE_CONNECTED',
  rejected: 'VFIO_MIG_LIVE_REJECTED', accepted: 'VFIO_MIG_LIVE_ACCEPTED', refused: 'VFIO_MIG_LIVE_REFUSED',
  progress: 'VFIO_MIG_LIVE_PROGRESS', 'switchover-ack': 'VFIO_MIG_LIVE_SWITCHOVER_ACK', 'init-data-loaded': 'VFIO_MIG_LIVE_INIT_DATA_LOADED',
  switchover: 'VFIO_MIG_LIVE_SWITCHOVER', loaded: 'VFIO_MIG_LIVE_LOADED', 'device-error': 'VFIO_MIG_LIVE_DEVICE_ERROR',
  downtime: 'VFIO_MIG_LIVE_DOWNTIME',
};

function liveEvent(r: LiveRecEvent, base: { migration: number; side: string }): { event: string; data: Record<string, unknown> } {
  const e = r.event;
  const rest: Record<string, unknown> = { ...e };
  delete rest.type;
  delete rest.side; // the endpoint's side is in base; a peer's (progress, device-error) is named by the event or its cause
  if (e.type === 'state') { delete rest.state; Object.assign(rest, { status: e.state }); }
  if (e.type === 'init-data-loaded') { delete rest.device; Object.assign(rest, { 'device-id': e.device }); }
  if (e.type === 'device-error') Object.assign(rest, { 'device-id': e.cause.device ?? null });
  return { event: LIVE_NAMES[e.type], data: { ...base, ...rest } };
}

function timestamp(wall: number) {
  const us = Math.round(wall * 1000);
  return { seconds: Math.floor(us / 1e6), microseconds: us % 1e6 };
}

export class EventLog {
  private readonly fd: number;
  private readonly off: () => void;
  private closed = false;

  /** `fd`: an open file (closed by end()), or 1 for standard output. */
  constructor(fd: number, rec: Recorder, command: string, params: Record<string, unknown>, opts: { dirty?: boolean } = {}) {
    this.fd = fd;
    this.line(Date.now(), 'VFIO_MIG_START', {
      schema: EVENTS_SCHEMA, schemaVersion: SCHEMA_VERSION, tool: TOOL, command, params, startedAt: rec.startedAt.toISOString(),
    });
    // Dirty-bitmap queries come every few ms: only when asked for (--verbose).
    this.off = rec.on((e) => { if (e.type !== 'dirty' || opts.dirty) { const q = qmpEvent(e); this.line(e.wall, q.event, q.data); } });
  }

  private line(wall: number, event: string, data: Record<string, unknown>): void {
    if (this.closed) return;
    // Synchronous: an event is on disk (or in the pipe) when the engine moves on, and a crash loses nothing before it.
    fs.writeSync(this.fd, safeJson({ timestamp: timestamp(wall), event, data }) + '\n');
  }

  /** The last line: ok, the error if any, the end time. */
  end(ok: boolean, error: ErrorJson | null): void {
    this.line(Date.now(), 'VFIO_MIG_END', { ok, error, endedAt: new Date().toISOString() });
    this.off();
    this.closed = true;
    if (this.fd !== 1) fs.closeSync(this.fd);
  }
}
