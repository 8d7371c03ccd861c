// vfio-mig send / receive: a live migration between two processes (or hosts).
import { EmulatedTransport } from '../transport/emulated.js';
import { ErrorCode, MigError } from '../errors.js';
import { PROFILES, type ProfileName } from '../protocol/profiles.js';
import { send, type SendReport } from '../live/sender.js';
import { receive, type ReceiveReport } from '../live/receiver.js';
import type { LiveEvent } from '../live/events.js';
import { fmtBytes, parseSize } from './args.js';
import { deviceOpts, loadText, migOpts, saveText, type DeviceFlags } from './run.js';
import { CommandOutput, type OutputFlags } from './output.js';
import { openDevices } from './devices.js';
import { destroyEmulated, emulatedDeviceOf, emulatedV2 } from '../reach/emulated/v2.js';
import type { EngineDevice } from '../engine/source-device.js';
import { receiveJson, sendJson } from '../report/json.js';

/** One stderr line per event worth a human's attention (progress is left to --json consumers and the report). */
function eventLine(side: string, e: LiveEvent): string | null {
  switch (e.type) {
    case 'listening': return `listening on ${e.address}`;
    case 'connected': return `channel ${e.channel}/${e.channels} up (${e.peer}${e.identity ? `, ${e.identity}` : ''}, protocol ${e.version})`;
    case 'rejected': return `rejected a connection from ${e.address}: ${e.code}: ${e.message}`;
    case 'state': return `state: ${e.state}`;
    case 'refused': return `refused: ${e.devices.map((d) => `${d.name}: ${d.reason}`).join('; ')}`;
    case 'switchover-ack': return 'switchover-ack';
    case 'init-data-loaded': return `${e.device}: initial data loaded (DEV_INIT_DATA_SENT)`;
    case 'downtime': return `downtime ${e.downtimeMs.toFixed(1)} ms (end to end)`;
    case 'device-error': return `device error: ${e.cause.code}: ${e.cause.message}`;
    default: return null;
  }
  void side;
}

function logger(side: string, quiet: boolean) {
  return (e: LiveEvent) => {
    const l = eventLine(side, e);
    // The listening address always goes out: with port 0 it is how a caller learns the port.
    if (l && (!quiet || e.type === 'listening')) process.stderr.write(`vfio-mig ${side}: ${l}\n`);
  };
}

export interface SendFlags extends DeviceFlags {
  signal?: AbortSignal; to: string; channels: number; tlsDir?: string; timeout: number; keepalive?: number; switchoverAckTimeout?: number; availSwitchoverBandwidth?: number;
}

export function sendText(r: SendReport): string {
  const lines: string[] = [];
  if (r.save) lines.push(saveText(r.save));
  lines.push(`send: ${r.uri}, ${r.channels} channel(s)${r.tls ? ', mutual TLS 1.3' : ''}, ${fmtBytes(r.bytesSent)} in ${r.totalMs.toFixed(0)} ms`);
  if (r.downtimeMs !== undefined) {
    lines.push(`downtime: ${r.downtimeMs.toFixed(1)} ms end to end (first source device stopped -> every destination device loaded; destination part ${r.destinationDowntimeMs?.toFixed(1) ?? '?'} ms)`);
  }
  for (const d of r.destination ?? []) lines.push(`${d.name}: destination ${d.state}, verified: ${d.verified}`);
  return lines.join('\n');
}

export async function cmdSend(o: SendFlags): Promise<void> {
  const dev = deviceOpts(o);
  const cmd = new CommandOutput('send', o, o);
  const sources: EngineDevice[] = [];
  try {
    if (o.device?.length) sources.push(...await openDevices(o.device, o));
    else {
      for (let i = 0; i < o.devices; i++) {
        const d = { ...dev, name: `emu${i}`, seed: o.seed + i };
        sources.push(d.profile === 'v2' ? emulatedV2(d) : EmulatedTransport.create(d));
      }
    }
    const r = await send(sources, {
      ...migOpts(o), to: o.to, channels: o.channels, tlsDir: o.tlsDir, timeoutMs: o.timeout, threads: o.threads,
      switchoverAckTimeoutMs: o.switchoverAckTimeout, keepaliveMs: o.keepalive,
      availSwitchoverBandwidth: o.availSwitchoverBandwidth, signal: o.signal, onEvent: logger('send', !!o.json || !!o.quiet),
      onMigration: (m) => { cmd.attachMigration(m); },
    });
    const j = sendJson(r);
    cmd.done(j, sendText(r), r.ok, `verified: ${j.verified}`);
  } finally {
    for (const s of sources) if (emulatedDeviceOf(s)) destroyEmulated(s); else s.close();
  }
}

/** --device name=emu0,profile=linux-5.8,size=64MiB,chunk=1MiB: an emulated destination of that shape. */
export function parseDeviceSpec(spec: string): EngineDevice {
  const kv = new Map<string, string>();
  for (const part of spec.split(',')) {
    const i = part.indexOf('=');
    if (i <= 0) throw new MigError(ErrorCode.BAD_ARGUMENT, `--device: '${part}' is not key=value (name, profile, size, chunk)`);
    kv.set(part.slice(0, i), part.slice(i + 1));
  }
  for (const k of kv.keys()) if (!['name', 'profile', 'size', 'chunk'].includes(k)) throw new MigError(ErrorCode.BAD_ARGUMENT, `--device: unknown key '${k}'`);
  const name = kv.get('name');
  if (!name) throw new MigError(ErrorCode.BAD_ARGUMENT, '--device: name= is required');
  const profile = (kv.get('profile') ?? 'linux-5.8') as ProfileName | 'v2';
  if (![...PROFILES, 'v2'].includes(profile)) throw new MigError(ErrorCode.BAD_ARGUMENT, `--device: profile '${profile}' is not one of ${[...PROFILES, 'v2'].join(', ')}`);
  const stateSize = parseSize('--device size', kv.get('size') ?? '64MiB');
  const maxChunk = parseSize('--device chunk', kv.get('chunk') ?? '1MiB');
  if (stateSize % 4096 || stateSize < 8192 || maxChunk % 4096 || maxChunk < 8192) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `--device ${name}: size and chunk must be multiples of 4096, at least 8 KiB`);
  }
  const o = { name, stateSize, maxChunk, zeroFill: true, dirtyRate: 0, dmaRate: 0 };
  return profile === 'v2' ? emulatedV2(o) : EmulatedTransport.create({ ...o, profile });
}

export interface ReceiveFlags extends OutputFlags { signal?: AbortSignal; listen: string; device?: string[]; tlsDir?: string; save?: string; timeout: number; keepalive?: number; threads?: number; verify: boolean; force?: boolean }

export function receiveText(r: ReceiveReport): string {
  const lines: string[] = [];
  if (r.load) lines.push(loadText(r.load));
  lines.push(`receive: ${r.uri}, ${r.channels} channel(s)${r.tls ? `, mutual TLS 1.3 (client ${r.peerIdentity ?? '?'})` : ''}, ${fmtBytes(r.bytesReceived)} in ${r.totalMs.toFixed(0)} ms`);
  if (r.downtimeMs !== undefined) lines.push(`downtime: ${r.downtimeMs.toFixed(1)} ms end to end (as the source measured it; this side's part ${r.destinationDowntimeMs?.toFixed(1) ?? '?'} ms)`);
  if (r.saved) lines.push(`stream saved: ${r.saved}`);
  for (const d of r.devices) lines.push(`${d.name}: ${d.state}, verified: ${d.verified}`);
  return lines.join('\n');
}

export async function cmdReceive(o: ReceiveFlags): Promise<void> {
  const cmd = new CommandOutput('receive', o, o);
  const dests = (o.device ?? []).map(parseDeviceSpec);
  try {
    const r = await receive({
      listen: o.listen, destinations: dests.length ? dests : undefined, tlsDir: o.tlsDir, save: o.save, timeoutMs: o.timeout, keepaliveMs: o.keepalive,
      threads: o.threads, verify: o.verify, signal: o.signal, onEvent: logger('receive', !!o.json || !!o.quiet),
      onLoader: (l) => { cmd.attachLoader(l); },
    });
    const ok = r.ok && r.devices.every((d) => d.verified !== false);
    const j = receiveJson(r);
    cmd.done(j, receiveText(r), ok, `verified: ${j.verified}`);
  } finally {
    for (const d of dests) destroyEmulated(d);
  }
}
