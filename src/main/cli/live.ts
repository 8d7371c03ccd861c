// vfio-mig send / receive: a live migration between two processes (or hosts).
import { EmulatedTransport } from '../transport/emulated.js';
import { ErrorCode, MigError } from '../errors.js';
import { PROFILES, type ProfileName } from '../protocol/profiles.js';
import { send, type SendReport } from '../live/sender.js';
import { receive, type ReceiveReport } from '../live/receiver.js';
import type { LiveEvent } from '../live/events.js';
import { fmtBytes, parseSize } from './args.js';
import { deviceOpts, emulatedSources, loadText, migOpts, saveText, type DeviceFlags, type LiveRunFlags } from './run.js';
import { loadTlsDir } from '../live/conn.js';
import { makeThrowawayPki } from '../live/pki.js';
import { CommandOutput, type OutputFlags } from './output.js';
import { openDevices } from './devices.js';
import { destroyEmulated, emulatedV2 } from '../reach/emulated/v2.js';
import { releaseDestination } from '../engine/load.js';
import type { EngineDevice } from '../engine/source-device.js';
import { receiveJson, saveJson, sendJson } from '../report/json.js';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

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

/** stderr lines, and every event into the command's --events file (`live`: from CommandOutput.attachLive). */
function logger(side: string, quiet: boolean, live: { onEvent: (e: LiveEvent) => void }) {
  return (e: LiveEvent) => {
    live.onEvent(e);
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
  const live = cmd.attachLive('source');
  const sources: EngineDevice[] = [];
  try {
    sources.push(...(o.device?.length ? await openDevices(o.device, o) : emulatedSources(dev, o.devices, o.seed)));
    const r = await send(sources, {
      ...migOpts(o), to: o.to, channels: o.channels, tlsDir: o.tlsDir, timeoutMs: o.timeout, threads: o.threads,
      switchoverAckTimeoutMs: o.switchoverAckTimeout, keepaliveMs: o.keepalive,
      availSwitchoverBandwidth: o.availSwitchoverBandwidth, signal: o.signal, onEvent: logger('send', !!o.json || !!o.quiet, live),
      onMigration: (m) => { cmd.attachMigration(m, live.migration); },
    });
    const j = sendJson(r);
    cmd.done(j, sendText(r), r.ok, `verified: ${j.verified}`);
  } finally {
    for (const s of sources) await releaseDestination(s);
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
  const live = cmd.attachLive('destination');
  const dests = (o.device ?? []).map(parseDeviceSpec);
  try {
    const r = await receive({
      listen: o.listen, destinations: dests.length ? dests : undefined, tlsDir: o.tlsDir, save: o.save, timeoutMs: o.timeout, keepaliveMs: o.keepalive,
      threads: o.threads, verify: o.verify, signal: o.signal, onEvent: logger('receive', !!o.json || !!o.quiet, live),
      onLoader: (l) => { cmd.attachLoader(l, undefined, live.migration); },
    });
    const ok = r.ok && r.devices.every((d) => d.verified !== false);
    const j = receiveJson(r);
    cmd.done(j, receiveText(r), ok, `verified: ${j.verified}`);
  } finally {
    for (const d of dests) destroyEmulated(d);
  }
}

/**
 * `run --live [tcp|unix]`: the main job as a live migration between two processes on this machine. A `vfio-mig
 * receive --json` child listens (loopback TCP on a free port, or a UNIX socket); this process sends its emulated
 * devices to it; both sides' end-to-end downtime and verification are reported (the child's JSON document as is).
 */
export async function cmdRunLive(o: DeviceFlags & LiveRunFlags & { live: 'tcp' | 'unix'; signal?: AbortSignal; timeout?: number }): Promise<void> {
  if (o.device?.length || o.dest?.length) throw new MigError(ErrorCode.BAD_ARGUMENT, '--live migrates emulated devices: no --device / --dest');
  if ((o as { stream?: string }).stream) throw new MigError(ErrorCode.BAD_ARGUMENT, '--live sends over a connection: no --stream');
  if ((o.tls || o.tlsDir) && o.live !== 'tcp') {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `--tls${o.tlsDir ? '-dir' : ''}: TLS is for --live tcp (a UNIX socket is protected by its file permissions)`);
  }
  if (o.tls && o.tlsDir) throw new MigError(ErrorCode.BAD_ARGUMENT, '--tls makes a throw-away PKI, --tls-dir uses yours: one of them');
  const dev = deviceOpts(o);
  const cmd = new CommandOutput('run', o, o);
  const live = cmd.attachLive('source');
  // Checked before anything starts: a bad folder is this process's error, not the child's.
  if (o.tlsDir) { loadTlsDir(o.tlsDir, 'server'); loadTlsDir(o.tlsDir, 'client'); }
  const pki = o.tls ? makeThrowawayPki() : undefined;
  const tlsDir = o.tlsDir ?? pki;
  const sock = path.join(os.tmpdir(), `vfio-mig-live-${process.pid}-${Date.now()}.sock`);
  const listenUri = o.live === 'unix' ? `unix:${sock}` : 'tcp:127.0.0.1:0';
  const bin = fileURLToPath(new URL('../../../../bin/vfio-mig.js', import.meta.url));
  const timeout = String(o.timeout ?? 10_000);
  const child = spawn(process.execPath, [bin, 'receive', '--listen', listenUri, '--json', '--timeout', timeout,
    ...(o.threads ? ['--threads', String(o.threads)] : []), ...(tlsDir ? ['--tls-dir', tlsDir] : [])], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (b) => { out += b; });
  const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)));
  const sources: EngineDevice[] = [];
  try {
    // The child prints its bound address (with the real port) on stderr once listening.
    const to = await new Promise<string>((resolve, reject) => {
      child.stderr.on('data', (b) => {
        err += b;
        const m = /listening on (\S+)/.exec(err);
        if (m) resolve(m[1]);
      });
      void exited.then((code) => reject(new MigError(ErrorCode.IO, `the destination process exited (${code}) before listening: ${err.trim()}`)));
      child.on('error', (e) => reject(new MigError(ErrorCode.IO, `cannot start the destination process: ${e.message}`, { cause: e })));
    });
    sources.push(...emulatedSources(dev, o.devices, o.seed));
    const r = await send(sources, {
      ...migOpts(o), to, channels: o.channels, tlsDir, threads: o.threads, timeoutMs: o.timeout, signal: o.signal, onEvent: logger('run', !!o.json || !!o.quiet, live),
      onMigration: (m) => { cmd.attachMigration(m, live.migration); },
    });
    const code = await exited;
    let rx: { ok?: boolean; result?: Record<string, unknown> | null } = {};
    try { rx = JSON.parse(out) as typeof rx; } catch { /* reported below */ }
    const rxr = rx.result as { verified?: boolean; downtimeMs?: number | null; load?: unknown } | null | undefined;
    if (code !== 0 || !rxr) {
      throw new MigError(ErrorCode.IO, `the destination process (pid ${child.pid}) ended with ${code}: ${err.trim().split('\n').pop() ?? ''}`);
    }
    const sj = sendJson(r);
    const ok = r.ok && rx.ok === true && rxr.verified === true && sj.verified === true;
    const text = [
      `vfio-mig run --live ${o.live}: ${o.devices} device(s) x ${fmtBytes(o.size)}, profile ${o.profile}, to a vfio-mig receive process (pid ${child.pid}) on ${to}`
        + `${pki ? ' (mutual TLS with a throw-away PKI)' : tlsDir ? ` (mutual TLS, ${tlsDir})` : ''}`,
      sendText(r),
      `destination process: downtime ${rxr.downtimeMs?.toFixed(1) ?? '?'} ms end to end as it reports it, verified: ${rxr.verified}`,
      `verified: ${ok}`,
    ].join('\n');
    cmd.done({
      stream: null, save: r.save ? saveJson(r.save) : null, load: rxr.load ?? null, downtimeMs: r.downtimeMs ?? null, verified: ok,
      live: { uri: to, send: sj, receive: rxr },
    }, text, ok, `verified: ${ok}`);
  } finally {
    for (const s of sources) destroyEmulated(s);
    // A destination left waiting (the send failed before connecting) is stopped; a finished one is already gone.
    if (child.exitCode === null) child.kill('SIGTERM');
    await exited;
    if (pki) fs.rmSync(pki, { recursive: true, force: true });
  }
}
