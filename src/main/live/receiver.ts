// The destination of a live migration (`vfio-mig receive`, receive()): listen, admit one session of N channels,
// check the device table against the destinations (refusing per device with a reason the source learns), then load
// through the same Loader as a file, applying pre-copy data as it arrives. The return path on channel 0 carries
// ACCEPT/REFUSE, PONG, PROGRESS, SWITCHOVER_ACK, DEVICE_ERROR, LOADED and SHUT. A library never exits the process:
// every outcome is a report (and, for failures, a MigError carrying it).
import os from 'node:os';
import type { Duplex } from 'node:stream';
import { FileSink } from '../container/sink.js';
import { MAX_CONFIG_BLOB } from '../protocol/config-blob.js';
import { type AbortRecord, type DeviceTable, type DeviceTableEntry, type RecordHeader } from '../container/format.js';
import { ErrorCode, MigError } from '../errors.js';
import { EnginePool } from '../engine/pool.js';
import { Loader, emulatedDestination, releaseDestination, type LoadReport } from '../engine/load.js';
import { DEFAULT_STAGING_CHUNK, type EngineDevice } from '../engine/source-device.js';
import { asMigDevice } from '../protocol/v1/device.js';
import { reachProvider } from '../device/registry.js';
import { MIGRATION_PRE_COPY } from '../protocol/v2/uapi.js';
import { testHooks } from '../engine/test-hooks.js';
import { trace } from '../trace.js';
import { allowed, listen, socketFd, tcpKeepalive, tuneInherited, type Listener } from './conn.js';
import { LiveEndpoint, type EndpointOptions, type LiveState } from './events.js';
import { LiveSource } from './source.js';
import {
  F_ACCEPT, F_DONE, F_LOADED, F_PING, F_PONG, F_PROGRESS, F_REFUSE, F_SHUT, F_SWITCHOVER, F_SWITCHOVER_ACK, F_DEVICE_ERROR,
  FRAME_NAMES, HELLO_BUSY, HELLO_CHANNEL, HELLO_NOT_ALLOWED, HELLO_OK, HELLO_SESSION, HELLO_SIZE, HELLO_STATUS_NAMES,
  HELLO_VERSION, SocketReader, WIRE_MIN_VERSION, WIRE_VERSION, chooseVersion, decodeFrameBody, decodeHello, encodeFrame,
  encodeReply, refusalMessage, writeAll, type Cause, type RefusedDevice, type ShutBody,
} from './wire.js';
import net from 'node:net';

export interface ReceiveOptions extends EndpointOptions {
  /** tcp:HOST:PORT, unix:PATH, fd:N (a connected socket) or file:PATH (load a saved stream). */
  listen: string;
  /**
   * Destinations for the source's devices (v1 transports or devices behind the seam, e.g. v2), matched by name, else
   * by order; default: emulated ones made from the table (v2 entries through their reach's provider).
   */
  destinations?: EngineDevice[];
  makeDestination?: (e: DeviceTableEntry) => EngineDevice | Promise<EngineDevice>;
  signal?: AbortSignal;
  verify?: boolean;
  /** Start the destinations after loading (default true). */
  start?: boolean;
  maxStateBytes?: number;
  /** Also write the received stream here as a container file (inspect/extract/load work on it). */
  save?: string;
  /** Keep the destinations this receiver created (emulated, from the table) after success; default: destroy them. */
  keepDestinations?: boolean;
  /** Called with the Loader before it runs (progress, status()). */
  onLoader?: (l: Loader) => void;
}

export interface ReceiveReport {
  ok: boolean;
  state: LiveState;
  uri: string;
  address?: string;
  session?: string;
  version?: number;
  channels: number;
  tls: boolean;
  peer?: string;
  peerIdentity?: string;
  refused?: RefusedDevice[];
  load?: LoadReport;
  /** End to end, as the source measured it: its first device stopped -> every destination device loaded. */
  downtimeMs?: number;
  /** This side's part: SWITCHOVER received -> every device loaded. */
  destinationDowntimeMs?: number;
  bytesReceived: number;
  /** Per channel. */
  channelBytes?: number[];
  /** Data channels received and applied by worker threads of their own (not TLS, not --save); 0 with 1 channel. */
  receiveWorkers?: number;
  totalMs: number;
  cause?: Cause;
  devices: { name: string; state: string; verified: boolean | null }[];
  saved?: string;
}

interface PendingChannel { index: number; reader: SocketReader; sock: Duplex }

function causeOf(e: MigError, side: Cause['side']): Cause {
  return { code: e.code, message: e.message, device: e.device, side };
}

export class Receiver extends LiveEndpoint {
  /** Destinations in device-table order (valid once admitted). */
  destinations: EngineDevice[] = [];
  private created = new Set<EngineDevice>();
  private socks: Duplex[] = [];
  private listener: Listener | undefined;
  private session: Buffer | undefined;
  private nChannels = 1;
  private chans: PendingChannel[] = [];
  private main: { resolve: (c: PendingChannel) => void; reject: (e: MigError) => void } | undefined;
  private allUp: (() => void) | undefined;
  private source: LiveSource | undefined;
  private sock0: Duplex | undefined;
  private version = 0;
  private peer: string | undefined;
  private identity: string | undefined;
  private tSwitch = 0;
  private tLoaded = 0;
  private sourceDowntime: number | undefined;
  private sourceCause: Cause | undefined;
  private loader: Loader | undefined;
  private doneWait: { resolve: () => void; reject: (e: MigError) => void } | undefined;
  private gotDone = false;
  private loaded = 0;
  private acked = false;

  constructor(private readonly o: ReceiveOptions) {
    super('destination', o.listen, '--listen', o);
  }

  /** The bound address (tcp: with the real port when 0 was asked for), once listening. */
  get address(): string | undefined { return this.listener?.address; }

  async run(): Promise<ReceiveReport> {
    const t0 = performance.now();
    const rep: ReceiveReport = {
      ok: false, state: 'setup', uri: this.uri.text, channels: 0, tls: !!this.tlsc, bytesReceived: 0, totalMs: 0, devices: [],
    };
    if (this.uri.kind === 'file') return this.runFile(rep, t0);
    const pool = this.o.pool ?? new EnginePool({ threads: this.o.threads });
    let save: FileSink | undefined;
    const onAbort = () => this.abortAll(new MigError(ErrorCode.CANCELLED, 'migration cancelled on the destination', { cause: this.o.signal?.reason }));
    this.o.signal?.addEventListener('abort', onAbort, { once: true });
    let watchdog: NodeJS.Timeout | undefined;
    let progress: NodeJS.Timeout | undefined;
    let releaseLoads: (() => void) | undefined;
    try {
      this.setState('setup');
      if (this.o.signal?.aborted) throw new MigError(ErrorCode.CANCELLED, 'migration cancelled on the destination');
      const mainP = new Promise<PendingChannel>((resolve, reject) => { this.main = { resolve, reject }; });
      mainP.catch(() => undefined);
      if (this.uri.kind === 'fd') {
        let s: net.Socket;
        try { s = new net.Socket({ fd: this.uri.fd, readable: true, writable: true }); } catch (e) {
          throw new MigError(ErrorCode.BAD_ARGUMENT, `${this.uri.text}: ${(e as Error).message}`, { cause: e });
        }
        tuneInherited(s, this.uri.fd, tcpKeepalive(this.keepaliveMs, this.timeoutMs), this.uri.text);
        this.onConnection(s, { address: this.uri.text });
      } else {
        this.listener = await listen(this.uri, this.tlsc, tcpKeepalive(this.keepaliveMs, this.timeoutMs), (s, peer) => this.onConnection(s, peer),
          (e, address) => this.event({ type: 'rejected', address, code: e.code, message: e.message }));
        rep.address = this.listener.address;
        this.event({ type: 'listening', address: this.listener.address });
      }
      const c0 = await mainP;
      this.sock0 = c0.sock;
      rep.session = this.session!.toString('hex');
      rep.version = this.version;
      rep.peer = this.peer;
      rep.peerIdentity = this.identity;
      if (this.o.save) save = FileSink.open(this.o.save);
      const src = new LiveSource({
        onControl: (h, hb, b, at) => this.onControl(h, hb, b, at), waitDone: () => this.waitDone(), onAbort: (a) => this.noteAbort(a), save,
      });
      this.source = src;
      // The source's silence is noticed on channel 0 (it pings every keepalive), unless this side is the slow one.
      watchdog = setInterval(() => {
        const r = c0.reader;
        if (!r.backpressured && performance.now() - r.lastRx > this.timeoutMs) {
          this.abortAll(new MigError(ErrorCode.PEER_TIMEOUT, `the source sent nothing for ${this.timeoutMs} ms`));
        }
      }, Math.min(250, this.timeoutMs / 4));
      const table = await this.withTimeout(src.openMain(c0.reader), 'the device table');
      await this.withTimeout(new Promise<void>((r) => { this.allUp = r; if (this.chans.length === this.nChannels) r(); }),
        `all ${this.nChannels} channels`);
      // Data channels are received by worker threads (QEMU's multifd recv threads): each reads its socket's fd and
      // applies its devices' CHUNKs, so the main thread no longer carries every byte. Not under TLS (node:tls decrypts
      // on the main thread) and not with --save (the saved file takes every record through here, in order).
      const offThread = !this.tlsc && !this.o.save;
      for (const c of this.chans) if (c.index > 0) src.addChannel(c.index, c.reader, offThread ? socketFd(c.sock) : undefined);
      rep.channels = this.nChannels;
      const refused = await this.admit(table);
      if (refused.length) {
        rep.refused = refused;
        this.event({ type: 'refused', devices: refused });
        await writeAll(c0.sock, encodeFrame(F_REFUSE, { devices: refused }), 'return path').catch(() => undefined);
        throw new MigError(ErrorCode.PEER_REFUSED, refusalMessage(refused),
          { device: refused[0].name });
      }
      // A CHUNK body is one packet of the source's staging chunk: a v1 region's data area, a seam device's chunk.
      const maxBody = Math.max(24 + MAX_CONFIG_BLOB + 8, ...this.destinations.map((d) => (asMigDevice(d).caps.protocol === 'v2'
        ? Math.min(Math.max(d.geometry().maxChunk, DEFAULT_STAGING_CHUNK), 64 << 20) : d.geometry().regionSize) + 64));
      src.start(maxBody);
      // switchover-ack (QEMU 8.1+ qemu_loadvm_approve_switchover): the source may stop its devices once every device
      // it declared PRE_COPY-capable (v2 migFlags) has had its DEV_INIT_DATA_SENT applied here. Devices without
      // pre-copy initial data (v1, v2 without PRE_COPY) do not hold it back; with none, the ack follows ACCEPT.
      const gating = new Set(table.devices.filter(needsAck).map((e) => e.index));
      const withhold = !!testHooks(this.o)?.withholdSwitchoverAck;
      let accepted = false;
      const ackIfReady = async () => {
        if (!accepted || gating.size > 0 || this.acked || withhold) return;
        this.acked = true;
        await this.send(F_SWITCHOVER_ACK, {});
        this.event({ type: 'switchover-ack' });
      };
      const loader = new Loader(src, pool, {
        makeDestination: (e) => this.destinations[e.index], verify: this.o.verify ?? true, start: this.o.start,
        maxStateBytes: this.o.maxStateBytes,
        onSetup: async () => {
          await this.send(F_ACCEPT, { devices: table.devices.map((d) => ({ index: d.index, name: d.name })) });
          this.event({ type: 'accepted', devices: table.devices.map((d) => ({ index: d.index, name: d.name })) });
          this.setState('active');
          accepted = true;
          await ackIfReady();
        },
        onInitDataLoaded: (d) => {
          this.event({ type: 'init-data-loaded', device: d.entry.name, index: d.entry.index });
          trace('live_init_data_loaded', { device: d.entry.name });
          if (!gating.delete(d.entry.index)) return; // a marker from a device not declared PRE_COPY: nothing waits on it
          void ackIfReady().catch(() => undefined);
        },
        onDeviceLoaded: () => {
          if (++this.loaded < table.devices.length) return;
          this.tLoaded = performance.now();
          const destinationMs = this.tSwitch ? this.tLoaded - this.tSwitch : 0;
          this.event({ type: 'loaded', destinationMs });
          void this.send(F_LOADED, { destinationMs }).catch(() => undefined);
        },
      });

      // A source in this process may share the pool: its saves leave a worker to this load (EnginePool.holdForLoads).
      releaseLoads = pool.holdForLoads();
      progress = setInterval(() => {
        const devices = loader.dests.map((d) => ({ index: d.entry.index, name: d.entry.name, bytes: d.stats.dataBytes }));
        this.event({ type: 'progress', side: 'destination', devices });
        void this.send(F_PROGRESS, { devices }).catch(() => undefined);
      }, 250);
      this.o.onLoader?.(loader);
      this.loader = loader;
      const lr = await loader.run();
      rep.load = lr;
      rep.downtimeMs = this.sourceDowntime;
      rep.destinationDowntimeMs = this.tSwitch && this.tLoaded ? this.tLoaded - this.tSwitch : undefined;
      rep.devices = lr.devices.map((d) => ({ name: d.name, state: d.state, verified: d.verified }));
      if (this.sourceDowntime !== undefined) this.event({ type: 'downtime', side: 'destination', downtimeMs: this.sourceDowntime });
      const shut: ShutBody = { status: 'completed', devices: rep.devices };
      await this.send(F_SHUT, shut);
      rep.ok = true;
      this.setState('completed');
    } catch (e) {
      const err = e instanceof MigError ? e : new MigError(ErrorCode.WORKER_FAILED, (e as Error)?.message ?? String(e), { cause: e });
      this.source?.fail(err);
      // The cause both sides report: the source's own (its ABORT), the network, or this side's failure.
      const cause: Cause = this.sourceCause
        ?? (err.code === ErrorCode.PEER_GONE || err.code === ErrorCode.PEER_TIMEOUT ? causeOf(err, 'network') : causeOf(err, 'destination'));
      rep.cause = cause;
      const cancelled = cause.code === ErrorCode.CANCELLED;
      if (cancelled) this.setState('cancelling', cause);
      trace('live_failed', { side: 'destination', code: cause.code, message: cause.message });
      // A device's own failure, on either side (the source's came in its ABORT record).
      if (cause.device && cause.side !== 'network') this.event({ type: 'device-error', side: cause.side, cause });
      if (cause.side === 'destination' && this.sock0) {
        if (cause.device) await this.send(F_DEVICE_ERROR, cause).catch(() => undefined);
        await this.send(F_SHUT, { status: cancelled ? 'cancelled' : 'failed', cause } satisfies ShutBody).catch(() => undefined);
      }
      const lr = (err as { report?: LoadReport }).report ?? (e as { report?: LoadReport }).report;
      if (lr) rep.load = lr;
      rep.devices = await this.releaseAll(lr, this.loader);
      this.setState(cancelled ? 'cancelled' : 'failed', cause);
      rep.state = this.state;
      rep.bytesReceived = this.source?.bytesReceived ?? 0;
      rep.totalMs = performance.now() - t0;
      // err's message already names its device (MigError formats it in): not twice.
      const own = cause.device && err.message.startsWith(`${cause.device}: `) ? err.message.slice(cause.device.length + 2) : err.message;
      const out = new MigError(cause.code as MigError['code'], cause.side === 'destination' ? own : `${cause.side}: ${cause.message}`,
        { device: cause.device, cause: err });
      Object.assign(out, { report: rep, offset: cause.side === 'destination' ? err.offset : undefined });
      throw out;
    } finally {
      clearInterval(watchdog);
      clearInterval(progress);
      releaseLoads?.();
      this.o.signal?.removeEventListener('abort', onAbort);
      await this.source?.stopWorkers();
      this.closeSockets();
      this.listener?.close();
      await save?.close().catch(() => undefined);
      if (!this.o.pool) await pool.close();
    }
    rep.state = this.state;
    rep.bytesReceived = this.source?.bytesReceived ?? 0;
    rep.channelBytes = this.source?.channelBytes;
    rep.receiveWorkers = this.source?.receiveWorkers;
    rep.totalMs = performance.now() - t0;
    if (this.o.save) rep.saved = this.o.save;
    if (!this.o.keepDestinations) for (const d of this.created) await releaseDestination(d);
    return rep;
  }

  /** file:PATH — today's container, loaded as `vfio-mig load` does. */
  private async runFile(rep: ReceiveReport, t0: number): Promise<ReceiveReport> {
    const pool = this.o.pool ?? new EnginePool({ threads: this.o.threads });
    const loader = new Loader((this.uri as { path: string }).path, pool, {
      makeDestination: this.o.makeDestination, verify: this.o.verify ?? true, start: this.o.start, maxStateBytes: this.o.maxStateBytes,
      signal: this.o.signal,
    });
    this.o.onLoader?.(loader);
    try {
      this.setState('active');
      rep.load = await loader.run();
      rep.devices = rep.load.devices.map((d) => ({ name: d.name, state: d.state, verified: d.verified }));
      rep.ok = true;
      this.setState('completed');
    } catch (e) {
      const err = e as MigError;
      rep.cause = causeOf(err, 'destination');
      this.setState(err.code === ErrorCode.CANCELLED ? 'cancelled' : 'failed');
      Object.assign(err, { report: rep });
      throw err;
    } finally {
      rep.state = this.state;
      rep.totalMs = performance.now() - t0;
      if (!this.o.keepDestinations || !rep.ok) await loader.close();
      if (!this.o.pool) await pool.close();
    }
    return rep;
  }

  private withTimeout<T>(p: Promise<T>, what: string): Promise<T> {
    let timer: NodeJS.Timeout;
    return Promise.race([
      p,
      new Promise<T>((_, reject) => {
        timer = setTimeout(() => reject(new MigError(ErrorCode.PEER_TIMEOUT, `${what} did not arrive within ${this.timeoutMs} ms`)), this.timeoutMs);
      }),
    ]).finally(() => clearTimeout(timer));
  }

  private send(type: number, body: unknown): Promise<void> {
    if (!this.sock0) return Promise.resolve();
    return writeAll(this.sock0, encodeFrame(type, body), `return path ${FRAME_NAMES[type]}`);
  }

  private abortAll(e: MigError): void {
    this.main?.reject(e);
    this.source?.fail(e);
    this.doneWait?.reject(e);
    for (const c of this.chans) c.reader.fail(e);
  }

  private closeSockets(): void {
    // end() lets a SHUT already written reach the source; destroy after a grace period.
    for (const s of this.socks) {
      s.end();
      setTimeout(() => s.destroy(), 1000).unref();
    }
  }

  /** A new connection: TLS identity, HELLO, version, session and channel checks, then HELLO_REPLY. */
  private onConnection(sock: Duplex, peer: { address: string; identity?: { cn: string; fingerprint: string } }): void {
    const reader = new SocketReader(sock, `connection from ${peer.address}`);
    sock.on('error', () => undefined);
    const reply = (status: number, h: { session: Buffer; channel: number }, version = 0) =>
      writeAll(sock, encodeReply({ status, version, session: h.session, channel: h.channel, serverMin: WIRE_MIN_VERSION, serverMax: WIRE_VERSION }), 'HELLO_REPLY');
    const refuse = async (status: number, h: { session: Buffer; channel: number }, code: string) => {
      this.event({ type: 'rejected', address: peer.address, code, message: HELLO_STATUS_NAMES[status] });
      await reply(status, h).catch(() => undefined);
      sock.end();
      setTimeout(() => sock.destroy(), 1000).unref();
    };
    const timer = setTimeout(() => reader.fail(new MigError(ErrorCode.PEER_TIMEOUT, 'no HELLO')), this.timeoutMs);
    (async () => {
      const hb = (await reader.read(HELLO_SIZE, 'HELLO'))!;
      clearTimeout(timer);
      const h = decodeHello(hb);
      const idText = peer.identity ? peer.identity.cn || peer.identity.fingerprint : undefined;
      if (this.tlsc && !(peer.identity && allowed(this.tlsc.allow, peer.identity))) {
        return refuse(HELLO_NOT_ALLOWED, h, ErrorCode.PEER_NOT_ALLOWED);
      }
      const version = chooseVersion(h);
      if (!version) return refuse(HELLO_VERSION, h, ErrorCode.PEER_PROTOCOL);
      if (h.channel === 0) {
        if (this.session || this.state !== 'setup') return refuse(HELLO_BUSY, h, ErrorCode.PEER_REFUSED);
        if (this.uri.kind === 'fd' && h.channels !== 1) return refuse(HELLO_CHANNEL, h, ErrorCode.PEER_PROTOCOL);
        this.session = h.session;
        this.nChannels = h.channels;
        this.version = version;
        this.peer = peer.address;
        this.identity = idText;
      } else if (!this.session || !this.session.equals(h.session)) {
        return refuse(HELLO_SESSION, h, ErrorCode.PEER_PROTOCOL);
      } else if (h.channel >= this.nChannels || this.chans.some((c) => c.index === h.channel) || h.channels !== this.nChannels) {
        return refuse(HELLO_CHANNEL, h, ErrorCode.PEER_PROTOCOL);
      }
      const c: PendingChannel = { index: h.channel, reader, sock };
      this.chans.push(c);
      this.socks.push(sock);
      await reply(HELLO_OK, h, version);
      this.event({ type: 'connected', side: 'destination', channel: h.channel, channels: this.nChannels, peer: peer.address, identity: idText, version });
      if (h.channel === 0) this.main?.resolve(c);
      if (this.chans.length === this.nChannels) this.allUp?.();
    })().catch((e: MigError) => {
      clearTimeout(timer);
      this.event({ type: 'rejected', address: peer.address, code: e.code ?? ErrorCode.PEER_PROTOCOL, message: e.message });
      sock.destroy();
    });
  }

  /** Control frames from the source on channel 0. */
  private onControl(h: RecordHeader, hb: Uint8Array, body: Buffer, at: number): void {
    const msg = decodeFrameBody<Record<string, unknown>>(hb, body, h, at);
    switch (h.type) {
      case F_PING: void this.send(F_PONG, { id: msg.id }).catch(() => undefined); return;
      case F_SWITCHOVER:
        this.tSwitch = performance.now();
        this.setState('device');
        this.event({ type: 'switchover', side: 'destination' });
        return;
      case F_DONE:
        if (typeof msg.downtimeMs === 'number' && Number.isFinite(msg.downtimeMs)) this.sourceDowntime = msg.downtimeMs;
        this.gotDone = true;
        this.doneWait?.resolve();
        return;
      default:
        throw new MigError(ErrorCode.PEER_PROTOCOL, `the source sent ${FRAME_NAMES[h.type]}, a destination-to-source frame`, { offset: at });
    }
  }

  /** After END: DONE follows (the source's end-to-end downtime). */
  private waitDone(): Promise<void> {
    if (this.gotDone) return Promise.resolve();
    return this.withTimeout(new Promise<void>((resolve, reject) => { this.doneWait = { resolve, reject }; }), 'DONE after END');
  }

  /** Match destinations to the table; every device that cannot be taken is refused with its reason. */
  private async admit(table: DeviceTable): Promise<RefusedDevice[]> {
    const refused: RefusedDevice[] = [];
    const given = this.o.destinations;
    const total = table.devices.reduce((a, d) => a + d.geometry.stateSize, 0);
    const max = this.o.maxStateBytes ?? os.totalmem();
    for (const e of table.devices) {
      const no = (code: string, reason: string) => refused.push({ index: e.index, name: e.name, code, reason });
      let d: EngineDevice | undefined;
      if (given) {
        d = given.find((x) => x.name === e.name) ?? (given.some((x) => table.devices.some((t) => t.name === x.name)) ? undefined : given[e.index]);
        if (!d) { no('no-destination', `no destination device matches '${e.name}'`); continue; }
      } else if (total > max) {
        no('budget', `the table's devices need ${total} bytes of state, more than the ${max} this destination allows`);
        continue;
      } else {
        try {
          const reach = e.profile === 'v2' && !this.o.makeDestination ? reachProvider(e.transport, e.name) : undefined;
          if (reach && !reach.destination) { no('no-destination', `the ${e.transport} reach makes no destinations: pass --device`); continue; }
          d = await (this.o.makeDestination ? this.o.makeDestination(e) : reach ? reach.destination!(e) : emulatedDestination(e));
          this.created.add(d);
        } catch (err) {
          no('no-destination', (err as Error).message);
          continue;
        }
      }
      this.destinations[e.index] = d;
      const dev = asMigDevice(d); // a v1 DeviceTransport is seen through its V1Device, as the loader sees it
      const profile = dev.caps.protocol;
      const kind = dev.caps.reach;
      if (profile !== e.profile) { no('profile', `source speaks ${e.profile}, destination ${profile}`); continue; }
      if (kind !== e.transport && !(this.created.has(d))) {
        no('transport', `source is ${e.transport}, destination ${kind}`);
        continue;
      }
      const g = d.geometry();
      if (e.transport === 'emulated' && kind === 'emulated' && (g.stateSize !== e.geometry.stateSize || g.maxChunk < e.geometry.maxChunk)) {
        no('geometry', `source state ${e.geometry.stateSize} B / chunk ${e.geometry.maxChunk} B, destination ${g.stateSize} B / chunk ${g.maxChunk} B`);
        continue;
      }
      if (profile !== 'v2' && g.regionSize < e.geometry.regionSize) {
        no('geometry', `source migration region ${e.geometry.regionSize} B is larger than the destination's ${g.regionSize} B`);
      }
    }
    return refused;
  }

  /**
   * Failure: no destination runs; each is reset once (back to a clean RUNNING-capable state: by the failed load, which
   * resets every one it did not leave validated in STOP, else here) and those made here released.
   */
  private async releaseAll(lr?: LoadReport, loader?: Loader): Promise<ReceiveReport['devices']> {
    const out: ReceiveReport['devices'] = [];
    for (const [i, d] of this.destinations.entries()) {
      if (!d) continue;
      let state = lr?.devices[i]?.state ?? 'not loaded';
      if (!loader?.dests.some((x) => x.entry.index === i && x.discarded)) {
        try { await d.reset(); state = `${state}, reset`; } catch (e) { state = `${state}, reset failed: ${(e as Error).message}`; }
      }
      if (this.created.has(d)) {
        await releaseDestination(d);
        state += ', released';
      }
      out.push({ name: d.name, state, verified: null });
    }
    return out;
  }

  /** The ABORT record of the source: remember its cause (the loader reports STREAM_ABORTED with it). */
  noteAbort(a: AbortRecord): void {
    this.sourceCause = { code: a.code, message: a.message, device: a.device, side: 'source' };
  }
}

/** The source declared this device PRE_COPY-capable: its DEV_INIT_DATA_SENT gates the switchover-ack. */
function needsAck(e: DeviceTableEntry): boolean {
  return e.profile === 'v2' && ((e.geometry.migFlags ?? 0) & MIGRATION_PRE_COPY) !== 0;
}

/** Receive one live migration (or load file:PATH). Resolves with the report; rejects with a MigError carrying it. */
export async function receive(o: ReceiveOptions): Promise<ReceiveReport> {
  return new Receiver(o).run();
}
