// The source of a live migration (`vfio-mig send`, send()): connect N channels, each with its own HELLO (session id
// + channel number) and, over TCP, its own mutual-TLS handshake; run the ordinary Migration into a sink that frames
// container records onto the channels (each device pinned to one channel, so its records keep their order; TCP
// back-pressure paces the workers, no per-chunk acknowledgements). Switchover waits for the destination's
// SWITCHOVER_ACK; success waits for its SHUT "completed" (after it verified every device). Any failure on either side
// returns every source device to RUNNING and both sides report the same cause.
import crypto from 'node:crypto';
import type { Duplex } from 'node:stream';
import { ContainerWriter } from '../container/writer.js';
import { FileSink, type Sink } from '../container/sink.js';
import { RECORD_HEADER_SIZE, REC_ABORT, REC_CHUNK, REC_DEVICE_TABLE, REC_END, type RecordHeader } from '../container/format.js';
import { ErrorCode, MigError } from '../errors.js';
import { EnginePool } from '../engine/pool.js';
import { Migration, type MigrationOptions, type MigrationReport } from '../engine/migration.js';
import type { EngineDevice } from '../engine/source-device.js';
import { trace } from '../trace.js';
import { connect, tcpKeepalive } from './conn.js';
import { LiveEndpoint, type EndpointOptions, type LiveState } from './events.js';
import {
  F_ACCEPT, F_DEVICE_ERROR, F_DONE, F_LOADED, F_PING, F_PONG, F_PROGRESS, F_REFUSE, F_SHUT, F_SWITCHOVER, F_SWITCHOVER_ACK,
  FRAME_NAMES, HELLO_OK, HELLO_SIZE, HELLO_STATUS_NAMES, HELLO_NOT_ALLOWED, HELLO_VERSION, MAX_CHANNELS, SocketReader,
  WIRE_MIN_VERSION, WIRE_VERSION, decodeFrameBody, decodeFrameHeader, decodeReply, encodeFrame, encodeHello, refusalMessage, writeAll,
  type Cause, type RefusedDevice, type ShutBody,
} from './wire.js';

export interface SendOptions extends MigrationOptions, EndpointOptions {
  /** tcp:HOST:PORT, unix:PATH, fd:N (a connected socket) or file:PATH (write a container file). */
  to: string;
  /** Parallel connections (QEMU multifd channels); each device's records use one of them. */
  channels?: number;
  /**
   * switchover-ack: once pre-copy would switch over and every PRE_COPY device's DEV_INIT_DATA_SENT is out, the
   * destination must acknowledge within this many ms (default: timeoutMs); pre-copy goes on meanwhile. Without the ack
   * the migration fails with VFM_PEER_TIMEOUT and every source device resumes: none was stopped.
   */
  switchoverAckTimeoutMs?: number;
  /** Bytes/s the link can take during switchover, for the downtime estimate only (QEMU avail-switchover-bandwidth). */
  availSwitchoverBandwidth?: number;
  /** Called with the Migration before it runs (progress, status()). */
  onMigration?: (m: Migration) => void;
}

export interface SendReport {
  ok: boolean;
  state: LiveState;
  uri: string;
  session?: string;
  version?: number;
  channels: number;
  tls: boolean;
  save?: MigrationReport;
  /** End to end: the first source device stopped -> the destination reported every device loaded (this clock). */
  downtimeMs?: number;
  /** The destination's part: SWITCHOVER received -> every device loaded (its clock). */
  destinationDowntimeMs?: number;
  /** Pre-copy wait for SWITCHOVER_ACK, ms after pre-copy began. */
  switchoverAckMs?: number;
  /** Expected downtime from the last round's pending bytes and the switchover bandwidth. */
  expectedDowntimeMs?: number;
  bytesSent: number;
  totalMs: number;
  refused?: RefusedDevice[];
  cause?: Cause;
  destination?: ShutBody['devices'];
  rollback?: string[];
}

interface Chan { index: number; sock: Duplex; reader: SocketReader }

/** Container records onto channels: the header, the table and END/ABORT on channel 0, CHUNKs by device. */
class ChannelSink implements Sink {
  bytes = 0;
  private first = true;
  constructor(private readonly chans: Chan[], private readonly afterTable: () => Promise<void>) {}

  async write(b: Uint8Array): Promise<void> {
    this.bytes += b.length;
    if (this.first) {
      this.first = false;
      return writeAll(this.chans[0].sock, b, 'channel 0');
    }
    const dv = new DataView(b.buffer, b.byteOffset, 12);
    const type = dv.getUint32(0, true);
    if (type === REC_CHUNK) {
      const c = this.chans[dv.getUint32(8, true) % this.chans.length];
      return writeAll(c.sock, b, `channel ${c.index}`);
    }
    if (type === REC_END || type === REC_ABORT) {
      // Data channels end first: the destination takes END only once every channel has delivered everything.
      for (const c of this.chans.slice(1)) c.sock.end();
    }
    await writeAll(this.chans[0].sock, b, 'channel 0');
    if (type === REC_DEVICE_TABLE) await this.afterTable();
  }

  async close(): Promise<void> { /* the session closes the connections */ }
}

export class Sender extends LiveEndpoint {
  migration: Migration | undefined;
  private chans: Chan[] = [];
  private readonly nChannels: number;
  private readonly session = crypto.randomBytes(16);
  private version = 0;
  private accepted: { resolve: () => void; reject: (e: MigError) => void } | undefined;
  private acceptedP: Promise<void>;
  private ack = false;
  private ackWaiters: (() => void)[] = [];
  private tPrecopy = 0;
  private tAck = 0;
  /** When pre-copy first wanted to switch over with every initial-data marker out (the ack timeout counts from here). */
  private tAckWait = 0;
  private readonly ackTimeoutMs: number;
  private tStop = 0;
  private tLoaded = 0;
  private destinationMs: number | undefined;
  private loadedWait: (() => void) | undefined;
  private shut: ShutBody | undefined;
  private shutWait: ((s: ShutBody) => void) | undefined;
  private remote: Cause | undefined;
  private refused: RefusedDevice[] | undefined;
  private internal = new AbortController();
  private lastRx = performance.now();
  private pingId = 0;

  constructor(private readonly sources: EngineDevice[], private readonly o: SendOptions) {
    super('source', o.to, '--to', o);
    this.nChannels = o.channels ?? 1;
    this.ackTimeoutMs = o.switchoverAckTimeoutMs ?? this.timeoutMs;
    if (!Number.isInteger(this.nChannels) || this.nChannels < 1 || this.nChannels > MAX_CHANNELS) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `--channels: ${this.nChannels} is out of range 1..${MAX_CHANNELS}`);
    }
    if (this.nChannels > 1 && (this.uri.kind === 'fd' || this.uri.kind === 'file')) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `--channels ${this.nChannels}: ${this.uri.kind}: URIs carry one channel`);
    }
    if (!(this.ackTimeoutMs > 0)) throw new MigError(ErrorCode.BAD_ARGUMENT, `switchover-ack timeout ${this.ackTimeoutMs} ms is invalid`);
    this.acceptedP = new Promise<void>((resolve, reject) => { this.accepted = { resolve, reject }; });
    this.acceptedP.catch(() => undefined);
  }

  /** Fail whatever waits on the destination, and stop the migration (its devices go back to RUNNING). */
  private fail(e: MigError, cause?: Cause): void {
    if (cause) this.remote ??= cause;
    this.accepted?.reject(e);
    for (const c of this.chans) c.reader.fail(e);
    this.loadedWait?.();
    this.shutWait?.({ status: 'failed', cause: this.remote ?? { code: e.code, message: e.message, side: 'network' } });
    for (const w of this.ackWaiters.splice(0)) w();
    if (!this.internal.signal.aborted) this.internal.abort(e);
  }

  private async openChannel(index: number): Promise<Chan> {
    const what = `channel ${index}`;
    const sock = await connect(this.uri, this.tlsc, this.timeoutMs, tcpKeepalive(this.keepaliveMs, this.timeoutMs), what);
    sock.on('error', () => undefined);
    const reader = new SocketReader(sock, what);
    const c: Chan = { index, sock, reader };
    this.chans[index] = c;
    await writeAll(sock, encodeHello({ minVersion: WIRE_MIN_VERSION, maxVersion: WIRE_VERSION, session: this.session, channel: index, channels: this.nChannels, flags: 0 }), what);
    const t = setTimeout(() => reader.fail(new MigError(ErrorCode.PEER_TIMEOUT, `${what}: no HELLO_REPLY within ${this.timeoutMs} ms`)), this.timeoutMs);
    let r;
    try {
      r = decodeReply((await reader.read(HELLO_SIZE, 'HELLO_REPLY'))!);
    } catch (e) {
      // TLS 1.3: our handshake completes before the destination has judged our certificate. A connection that
      // closes before HELLO_REPLY was refused by the destination's TLS layer (its explicit reply is the proof).
      if (this.tlsc && (e as MigError).code === ErrorCode.PEER_GONE) {
        throw new MigError(ErrorCode.TLS, `${what}: the destination closed the TLS connection without accepting it: it refused this `
          + `source's certificate (signed by a CA it does not trust?): ${(e as Error).message}`, { cause: e });
      }
      throw e;
    } finally {
      clearTimeout(t);
    }
    if (r.status !== HELLO_OK) {
      const code = r.status === HELLO_NOT_ALLOWED ? ErrorCode.PEER_NOT_ALLOWED : r.status === HELLO_VERSION ? ErrorCode.PEER_PROTOCOL : ErrorCode.PEER_REFUSED;
      const extra = r.status === HELLO_VERSION ? ` (destination speaks ${r.serverMin}..${r.serverMax}, source ${WIRE_MIN_VERSION}..${WIRE_VERSION})` : '';
      throw new MigError(code, `${what}: the destination refused the connection: ${HELLO_STATUS_NAMES[r.status] ?? `status ${r.status}`}${extra}`);
    }
    if (!r.session.equals(this.session) || r.channel !== index) throw new MigError(ErrorCode.PEER_PROTOCOL, `${what}: HELLO_REPLY for another session or channel`);
    this.version = r.version;
    this.event({ type: 'connected', side: 'source', channel: index, channels: this.nChannels, peer: this.uri.text, version: r.version });
    return c;
  }

  /** The return path: frames from the destination on channel 0. */
  private async returnPath(c: Chan): Promise<void> {
    let at = HELLO_SIZE;
    for (;;) {
      const hb = await c.reader.read(RECORD_HEADER_SIZE, 'return path', true);
      if (!hb) {
        if (this.shut) return;
        throw new MigError(ErrorCode.PEER_GONE, 'the destination closed the connection before reporting the outcome');
      }
      const h: RecordHeader = decodeFrameHeader(hb, at);
      const body = (await c.reader.read(h.length, `return path ${FRAME_NAMES[h.type]}`))!;
      const msg = decodeFrameBody<Record<string, unknown>>(hb, body, h, at);
      at += RECORD_HEADER_SIZE + h.length;
      this.lastRx = performance.now();
      this.onReturn(h.type, msg, at);
    }
  }

  private onReturn(type: number, msg: Record<string, unknown>, at: number): void {
    switch (type) {
      case F_ACCEPT:
        this.event({ type: 'accepted', devices: (msg.devices as { index: number; name: string }[]) ?? [] });
        this.accepted?.resolve();
        return;
      case F_REFUSE: {
        const devs = (Array.isArray(msg.devices) ? msg.devices : []) as RefusedDevice[];
        this.refused = devs.map((d) => ({ index: Number(d.index), name: String(d.name), code: String(d.code), reason: String(d.reason) }));
        this.event({ type: 'refused', devices: this.refused });
        const e = new MigError(ErrorCode.PEER_REFUSED, refusalMessage(this.refused), { device: this.refused[0]?.name });
        this.fail(e, { code: e.code, message: e.message, device: e.device, side: 'destination' });
        return;
      }
      case F_PONG: return;
      case F_PROGRESS:
        this.event({ type: 'progress', side: 'destination', devices: (msg.devices as { index: number; name: string; bytes: number }[]) ?? [] });
        return;
      case F_SWITCHOVER_ACK:
        this.ack = true;
        this.tAck = performance.now();
        this.event({ type: 'switchover-ack' });
        for (const w of this.ackWaiters.splice(0)) w();
        return;
      case F_DEVICE_ERROR:
        this.remote ??= { ...(msg as unknown as Cause), side: 'destination' };
        this.event({ type: 'device-error', side: 'destination', cause: this.remote });
        return;
      case F_LOADED:
        this.tLoaded = performance.now();
        this.destinationMs = typeof msg.destinationMs === 'number' ? msg.destinationMs : undefined;
        this.loadedWait?.();
        return;
      case F_SHUT: {
        const s = msg as unknown as ShutBody;
        this.shut = s;
        if (s.status !== 'completed') {
          const cause: Cause = { code: String(s.cause?.code ?? ErrorCode.PEER_GONE), message: String(s.cause?.message ?? 'the destination failed'), device: s.cause?.device, side: s.cause?.side ?? 'destination' };
          this.fail(new MigError(cause.code as MigError['code'], cause.message, { device: cause.device }), cause);
        }
        this.shutWait?.(s);
        return;
      }
      default:
        this.fail(new MigError(ErrorCode.PEER_PROTOCOL, `the destination sent ${FRAME_NAMES[type]}, a source-to-destination frame`, { offset: at }));
    }
  }

  private control(type: number, body: unknown): void {
    const c = this.chans[0];
    if (c) writeAll(c.sock, encodeFrame(type, body), `channel 0 ${FRAME_NAMES[type]}`).catch(() => undefined);
  }

  private until<T>(p: Promise<T>, what: string): Promise<T> {
    let timer: NodeJS.Timeout;
    return Promise.race([p, new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new MigError(ErrorCode.PEER_TIMEOUT, `${what}: nothing from the destination within ${this.timeoutMs} ms`)), this.timeoutMs);
    })]).finally(() => clearTimeout(timer));
  }

  async run(): Promise<SendReport> {
    const t0 = performance.now();
    const rep: SendReport = { ok: false, state: 'setup', uri: this.uri.text, channels: this.nChannels, tls: !!this.tlsc, bytesSent: 0, totalMs: 0 };
    const pool = this.o.pool ?? new EnginePool({ threads: this.o.threads });
    const onAbort = () => {
      const cause: Cause = { code: ErrorCode.CANCELLED, message: 'migration cancelled on the source', side: 'source' };
      this.setState('cancelling', cause);
      this.fail(new MigError(ErrorCode.CANCELLED, cause.message, { cause: this.o.signal?.reason }), cause);
    };
    this.o.signal?.addEventListener('abort', onAbort, { once: true });
    let timers: NodeJS.Timeout | undefined;
    let sink: Sink | undefined;
    try {
      this.setState('setup');
      if (this.o.signal?.aborted) throw new MigError(ErrorCode.CANCELLED, 'migration cancelled on the source');
      if (this.uri.kind === 'file') {
        sink = FileSink.open(this.uri.path);
      } else {
        const c0 = await this.openChannel(0);
        rep.session = this.session.toString('hex');
        const rp = this.returnPath(c0);
        rp.catch((e: MigError) => this.fail(e, this.shut ? undefined : { code: e.code, message: e.message, side: 'network' }));
        await Promise.all(Array.from({ length: this.nChannels - 1 }, (_, i) => this.openChannel(i + 1)));
        rep.version = this.version;
        timers = setInterval(() => {
          this.control(F_PING, { id: ++this.pingId });
          this.checkAck();
          if (performance.now() - this.lastRx > this.timeoutMs) {
            const e = new MigError(ErrorCode.PEER_TIMEOUT, `the destination answered nothing for ${this.timeoutMs} ms`);
            this.fail(e, { code: e.code, message: e.message, side: 'network' });
            // Writes to a peer that stopped reading never complete: break them so the migration can roll back.
            for (const c of this.chans) c.sock.destroy();
          }
        }, this.keepaliveMs);
        sink = new ChannelSink(this.chans, () => this.until(this.acceptedP, 'ACCEPT'));
      }
      const live = this.uri.kind !== 'file';
      const m = new Migration(this.sources, pool, new ContainerWriter(sink), {
        ...this.o, signal: this.internalSignal(),
        switchoverGate: live ? {
          ready: (initialSent) => {
            if (!this.ack && initialSent && !this.tAckWait) this.tAckWait = performance.now();
            this.checkAck();
            return this.ack;
          },
          wait: (ms) => new Promise<void>((r) => { const t = setTimeout(r, ms); this.ackWaiters.push(() => { clearTimeout(t); r(); }); }),
        } : undefined,
      });
      this.migration = m;
      this.o.onMigration?.(m);
      m.on('phase', (_from, to) => {
        if (to === 'precopy') { this.tPrecopy = performance.now(); this.setState('active'); }
        if (to === 'stopcopy') {
          this.tStop = performance.now();
          if (live) this.control(F_SWITCHOVER, {});
          this.event({ type: 'switchover', side: 'source' });
          this.setState('device');
        }
      });
      const save = await m.run();
      rep.save = save;
      if (this.tAck && this.tPrecopy) rep.switchoverAckMs = Math.max(0, this.tAck - this.tPrecopy);
      const last = save.rounds.at(-1);
      const bw = this.o.availSwitchoverBandwidth ?? (last ? last.bandwidth : 0);
      if (bw > 0) rep.expectedDowntimeMs = (save.stopCopyBytes / bw) * 1000;
      if (live) {
        if (!this.tLoaded) await this.until(new Promise<void>((r) => { this.loadedWait = r; }), 'LOADED');
        if (this.remote || !this.tLoaded) throw new MigError((this.remote?.code ?? ErrorCode.PEER_GONE) as MigError['code'], this.remote?.message ?? 'no LOADED');
        rep.downtimeMs = this.tLoaded - this.tStop;
        rep.destinationDowntimeMs = this.destinationMs;
        this.control(F_DONE, { downtimeMs: rep.downtimeMs });
        this.event({ type: 'downtime', side: 'source', downtimeMs: rep.downtimeMs });
        const shut = this.shut ?? await this.until(new Promise<ShutBody>((r) => { this.shutWait = r; }), 'SHUT');
        if (shut.status !== 'completed') {
          throw new MigError((shut.cause?.code ?? ErrorCode.PEER_GONE) as MigError['code'], shut.cause?.message ?? 'the destination failed');
        }
        rep.destination = shut.devices;
      }
      rep.ok = true;
      this.setState('completed');
    } catch (e) {
      let err = e instanceof MigError ? e : new MigError(ErrorCode.WORKER_FAILED, (e as Error)?.message ?? String(e), { cause: e });
      const inner = err as MigError & { report?: MigrationReport };
      if (inner.report) rep.save = inner.report;
      const cause: Cause = this.remote ?? { code: err.code, message: err.message, device: err.device, side: 'source' };
      const cancelled = cause.code === ErrorCode.CANCELLED;
      if (cancelled) this.setState('cancelling', cause);
      // The migration itself rolled its devices back; after a completed save (the destination failed at the end)
      // they are stopped: resume them here.
      if (this.migration && this.migration.phase === 'done') {
        rep.rollback = [];
        for (const d of this.migration.devices) { const r = await d.rollback(); rep.rollback.push(`${d.name}: ${r.detail ?? r.outcome}`); }
      } else if (inner.report?.rollback) rep.rollback = inner.report.rollback.map((r) => `${r.device}: ${r.detail ?? r.outcome}`);
      // Failed before the migration took its devices (no connection, a refused HELLO, a device claimed elsewhere):
      // every device is as it was; the report says so for each, as a rollback of a device never opened does.
      else rep.rollback = this.sources.map((s) => `${s.name}: the device was never reached: nothing changed (the migration failed before its setup)`);
      rep.cause = cause;
      rep.refused = this.refused;
      if (cause.side !== 'source') {
        err = new MigError(cause.code as MigError['code'], `${cause.side}: ${cause.message}`, { device: cause.device, cause: err });
      } else if (this.remote && err.code !== cause.code) {
        // This side's own decision that aborted the migration (the switchover-ack timeout), not the abort it caused.
        err = new MigError(cause.code as MigError['code'], cause.message, { device: cause.device, cause: err });
      }
      // A source device's own failure (the destination's came as DEVICE_ERROR on the return path).
      if (cause.side === 'source' && cause.device) this.event({ type: 'device-error', side: 'source', cause });
      this.setState(cancelled ? 'cancelled' : 'failed', cause);
      trace('live_failed', { side: 'source', code: cause.code, message: cause.message });
      rep.state = this.state;
      rep.bytesSent = sink?.bytes ?? 0;
      rep.totalMs = performance.now() - t0;
      Object.assign(err, { report: rep });
      throw err;
    } finally {
      clearInterval(timers);
      this.o.signal?.removeEventListener('abort', onAbort);
      for (const c of this.chans) { c.sock.end(); setTimeout(() => c.sock.destroy(), 1000).unref(); }
      await sink?.close().catch(() => undefined);
      if (!this.o.pool) await pool.close();
    }
    rep.state = this.state;
    rep.bytesSent = sink?.bytes ?? 0;
    rep.totalMs = performance.now() - t0;
    return rep;
  }

  /** The switchover-ack timeout: the source's own decision (it stops nothing, resumes, and tells the destination). */
  private checkAck(): void {
    if (this.ack || !this.tAckWait || performance.now() - this.tAckWait <= this.ackTimeoutMs) return;
    const e = new MigError(ErrorCode.PEER_TIMEOUT, `no SWITCHOVER_ACK from the destination ${this.ackTimeoutMs} ms after pre-copy `
      + 'converged with every device\'s initial data sent; no source device was stopped');
    this.fail(e, { code: e.code, message: e.message, side: 'source' });
  }

  private internalSignal(): AbortSignal {
    return this.internal.signal;
  }
}

/** Migrate `sources` live to a destination (or into file:PATH). Rejects with a MigError carrying the report. */
export function send(sources: EngineDevice[], o: SendOptions): Promise<SendReport> {
  return new Sender(sources, o).run();
}

