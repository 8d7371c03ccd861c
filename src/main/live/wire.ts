// The live wire protocol (docs/PROTOCOL.md): a 64-byte HELLO / HELLO_REPLY per connection, then container records
// (docs/FORMAT.md) as frames, plus control frames in the same 32-byte framing: source -> destination on channel 0
// (PING, SWITCHOVER, DONE) and the return path destination -> source on channel 0 (ACCEPT, REFUSE, PONG, PROGRESS,
// SWITCHOVER_ACK, DEVICE_ERROR, LOADED, SHUT). Control frames carry small JSON bodies and are never saved to files.
import type { Duplex } from 'node:stream';
import { crc32c } from '../container/checksum.js';
import {
  MAX_META_BODY, NO_DEVICE, RECORD_HEADER_SIZE, RECORD_NAMES, decodeJson, decodeRecordHeader, verifyRecord, writeRecordHeader,
  type RecordHeader,
} from '../container/format.js';
import { ErrorCode, MigError } from '../errors.js';
import { socketError } from './conn.js';

/** Wire protocol versions this build speaks (the destination accepts the current one and the previous one). */
export const WIRE_VERSION = 1;
export const WIRE_MIN_VERSION = Math.max(1, WIRE_VERSION - 1);
export const HELLO_SIZE = 64;
export const HELLO_MAGIC = 'VFMIGNET';
export const REPLY_MAGIC = 'VFMIGACK';
export const MAX_CHANNELS = 64;

/** HELLO_REPLY status. */
export const HELLO_OK = 0;
export const HELLO_VERSION = 1;
export const HELLO_SESSION = 2;
export const HELLO_BUSY = 3;
export const HELLO_CHANNEL = 4;
export const HELLO_NOT_ALLOWED = 5;
export const HELLO_STATUS_NAMES: Record<number, string> = {
  0: 'ok', 1: 'no common protocol version', 2: 'unknown session', 3: 'destination busy with another migration',
  4: 'bad or duplicate channel number', 5: 'client identity not on the destination\'s allow list',
};

// Source -> destination control frames (channel 0).
export const F_PING = 16;
export const F_SWITCHOVER = 17;
export const F_DONE = 18;
// Destination -> source (the return path, channel 0).
export const F_ACCEPT = 32;
export const F_REFUSE = 33;
export const F_PONG = 34;
export const F_PROGRESS = 35;
export const F_SWITCHOVER_ACK = 36;
export const F_DEVICE_ERROR = 37;
export const F_LOADED = 38;
export const F_SHUT = 39;
export const FRAME_NAMES: Record<number, string> = {
  ...RECORD_NAMES, 16: 'PING', 17: 'SWITCHOVER', 18: 'DONE', 32: 'ACCEPT', 33: 'REFUSE', 34: 'PONG', 35: 'PROGRESS',
  36: 'SWITCHOVER_ACK', 37: 'DEVICE_ERROR', 38: 'LOADED', 39: 'SHUT',
};

export interface Hello { minVersion: number; maxVersion: number; session: Buffer; channel: number; channels: number; flags: number }
export interface HelloReply { status: number; version: number; session: Buffer; channel: number; serverMin: number; serverMax: number }

/** The cause of a failed migration as both sides report it. */
export interface Cause { code: string; message: string; device?: string; side: 'source' | 'destination' | 'network' }
export interface RefusedDevice { index: number; name: string; code: string; reason: string }
/** The one text both ends give a refusal (the destination's cause and what the source learns from REFUSE are equal). */
export function refusalMessage(devices: RefusedDevice[]): string {
  return `the destination refused: ${devices.map((d) => `${d.name}: ${d.reason}`).join('; ') || 'no reason given'}`;
}
export interface ShutBody { status: 'completed' | 'failed' | 'cancelled'; cause?: Cause; devices?: { name: string; state: string; verified: boolean | null }[] }

// HELLO and HELLO_REPLY share one 64-byte layout: magic (8), u32 words at 8 and 12, the 16-byte session at 16, u32
// words at 32, 36 and 40, reserved zeros, crc32c of bytes 0..59 at 60 (docs/PROTOCOL.md).
const WORDS = [8, 12, 32, 36, 40] as const;
type Words = [number, number, number, number, number];

function encode64(magic: string, w: Words, session: Buffer): Buffer {
  const b = Buffer.alloc(HELLO_SIZE);
  b.write(magic, 0, 'latin1');
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  WORDS.forEach((off, i) => dv.setUint32(off, w[i], true));
  session.copy(b, 16, 0, 16);
  dv.setUint32(60, crc32c(b.subarray(0, 60)), true);
  return b;
}

function decode64(b: Uint8Array, magic: string, what: string): { w: Words; session: Buffer } {
  const got = Buffer.from(b.subarray(0, 8)).toString('latin1');
  if (got !== magic) {
    throw new MigError(ErrorCode.PEER_PROTOCOL, `${what}: bad magic ${JSON.stringify(got)} (expected ${magic}): not a vfio-mig peer`, { offset: 0 });
  }
  const dv = new DataView(b.buffer, b.byteOffset, HELLO_SIZE);
  if (dv.getUint32(60, true) !== crc32c(b.subarray(0, 60))) throw new MigError(ErrorCode.PEER_PROTOCOL, `${what}: checksum mismatch`, { offset: 60 });
  for (let i = 44; i < 60; i++) if (b[i] !== 0) throw new MigError(ErrorCode.PEER_PROTOCOL, `${what}: reserved byte ${i} is not zero`, { offset: i });
  return { w: WORDS.map((off) => dv.getUint32(off, true)) as Words, session: Buffer.from(b.subarray(16, 32)) };
}

export function encodeHello(h: Hello): Buffer {
  return encode64(HELLO_MAGIC, [h.minVersion, h.maxVersion, h.channel, h.channels, h.flags], h.session);
}

export function decodeHello(b: Uint8Array): Hello {
  const { w: [minVersion, maxVersion, channel, channels, flags], session } = decode64(b, HELLO_MAGIC, 'HELLO');
  const h: Hello = { minVersion, maxVersion, session, channel, channels, flags };
  if (h.minVersion > h.maxVersion || h.minVersion === 0) throw new MigError(ErrorCode.PEER_PROTOCOL, `HELLO: version range ${h.minVersion}..${h.maxVersion}`, { offset: 8 });
  if (h.channels < 1 || h.channels > MAX_CHANNELS) throw new MigError(ErrorCode.PEER_PROTOCOL, `HELLO: ${h.channels} channels (1..${MAX_CHANNELS})`, { offset: 36 });
  if (h.flags !== 0) throw new MigError(ErrorCode.PEER_PROTOCOL, `HELLO: unknown flags 0x${h.flags.toString(16)}`, { offset: 40 });
  return h;
}

export function encodeReply(r: HelloReply): Buffer {
  return encode64(REPLY_MAGIC, [r.status, r.version, r.channel, r.serverMin, r.serverMax], r.session);
}

export function decodeReply(b: Uint8Array): HelloReply {
  const { w: [status, version, channel, serverMin, serverMax], session } = decode64(b, REPLY_MAGIC, 'HELLO_REPLY');
  return { status, version, session, channel, serverMin, serverMax };
}

/** The version both speak: the highest in both ranges, or 0. */
export function chooseVersion(h: { minVersion: number; maxVersion: number }, min = WIRE_MIN_VERSION, max = WIRE_VERSION): number {
  const v = Math.min(h.maxVersion, max);
  return v >= Math.max(h.minVersion, min) ? v : 0;
}

export function encodeFrame(type: number, body: unknown, device = NO_DEVICE): Buffer {
  const json = Buffer.from(JSON.stringify(body ?? {}), 'utf8');
  const rec = Buffer.alloc(RECORD_HEADER_SIZE + json.length);
  json.copy(rec, RECORD_HEADER_SIZE);
  writeRecordHeader(rec, type, device, 0n, 0n, rec.subarray(RECORD_HEADER_SIZE));
  return rec;
}

/** A container record header or a control frame header; every length is bounded before a byte of body is read. */
export function decodeFrameHeader(b: Uint8Array, at: number): RecordHeader {
  const dv = new DataView(b.buffer, b.byteOffset, RECORD_HEADER_SIZE);
  const type = dv.getUint32(0, true);
  if (RECORD_NAMES[type]) return decodeRecordHeader(b, at);
  if (!FRAME_NAMES[type]) throw new MigError(ErrorCode.PEER_PROTOCOL, `unknown frame type ${type}`, { offset: at, value: type });
  const length = dv.getUint32(4, true);
  if (length > MAX_META_BODY) {
    throw new MigError(ErrorCode.STREAM_TOO_LARGE, `${FRAME_NAMES[type]} frame claims ${length} bytes (limit ${MAX_META_BODY})`, { offset: at + 4, value: length });
  }
  return { type, length, device: dv.getUint32(8, true), crc: dv.getUint32(12, true), seq: dv.getBigUint64(16, true), streamOffset: dv.getBigUint64(24, true) };
}

export function decodeFrameBody<T>(header: Uint8Array, body: Uint8Array, h: RecordHeader, at: number): T {
  verifyRecord(header, body, h, at);
  return decodeJson<T>(body, FRAME_NAMES[h.type] ?? String(h.type), at + RECORD_HEADER_SIZE);
}

/**
 * Pull-style reading of exact byte counts from a socket. Reading pauses the socket once `highWater` bytes are
 * buffered (TCP back-pressure then reaches the sender) and resumes below half of it.
 */
export class SocketReader {
  private bufs: Buffer[] = [];
  private len = 0;
  private ended = false;
  private err: MigError | undefined;
  private waiter: (() => void) | null = null;
  /** performance.now() of the last byte received. */
  lastRx = performance.now();
  bytes = 0;
  private pausedByUs = false;
  private detached: ((e: MigError) => void) | undefined;

  constructor(readonly sock: Duplex, readonly what: string, private readonly highWater = 8 << 20) {
    sock.on('data', (b: Buffer) => {
      if (this.detached) {
        // Node read after the hand-over: those bytes belong to the worker's stream, which now has a hole.
        this.detached(new MigError(ErrorCode.BAD_STATE, `${what}: ${b.length} bytes read after the connection was handed to its receive worker`));
        return;
      }
      this.bufs.push(b);
      this.len += b.length;
      this.bytes += b.length;
      this.lastRx = performance.now();
      if (this.len >= this.highWater && !this.pausedByUs) { this.pausedByUs = true; sock.pause(); }
      this.wake();
    });
    sock.on('end', () => { this.ended = true; this.wake(); });
    sock.on('close', () => { this.ended = true; this.wake(); });
    sock.on('error', (e: NodeJS.ErrnoException) => this.fail(socketError(e, `${what}: connection failed`)));
  }

  /** True while the socket is paused because the consumer is behind (not the peer's fault). */
  get backpressured(): boolean { return this.pausedByUs; }
  get buffered(): number { return this.len; }
  get eof(): boolean { return this.ended && this.len === 0; }

  /**
   * Hand the connection's reading over (to a receive worker reading its fd): Node stops reading it now, and the bytes
   * it had already read come back, to be consumed first. Nothing is read here afterwards.
   */
  detach(onLate: (e: MigError) => void): Buffer {
    const h = (this.sock as unknown as { _handle?: { readStop?: () => number; reading?: boolean } })._handle;
    const stop = () => { if (h?.readStop) { h.reading = false; h.readStop(); } };
    this.sock.pause();
    stop();
    // Bytes Node read but has not emitted yet (paused in its readable buffer) belong to the stream too: read() emits
    // them to the 'data' listener above. It may restart reading on the handle: stopped again at once (nothing is read
    // before the event loop runs).
    while (this.sock.readableLength > 0 && this.sock.read() !== null) { /* collected by the 'data' listener */ }
    stop();
    this.pausedByUs = false;
    this.detached = onLate;
    const b = Buffer.concat(this.bufs);
    this.bufs = [];
    this.len = 0;
    return b;
  }

  /** Wake a pending read with this error (cancel, timeout, the other side failed). */
  fail(e: MigError): void {
    this.err ??= e;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private async need(n: number, what: string, eofOk: boolean): Promise<boolean> {
    while (this.len < n) {
      if (this.err) throw this.err;
      if (this.ended) {
        if (eofOk && this.len === 0) return false;
        throw new MigError(ErrorCode.PEER_GONE,
          `${this.what}: the peer closed the connection in ${what} (${this.len} of ${n} bytes after ${this.bytes - this.len} bytes)`);
      }
      if (this.pausedByUs) { this.pausedByUs = false; this.sock.resume(); }
      await new Promise<void>((r) => { this.waiter = r; });
    }
    if (this.err) throw this.err;
    return true;
  }

  /** Exactly n bytes into dst[off..]; a close before them is PEER_GONE. Copied as they arrive. */
  async readInto(dst: Uint8Array, off: number, n: number, what: string): Promise<void> {
    let done = 0;
    while (done < n) {
      if (this.len === 0) await this.need(1, what, false);
      if (this.err) throw this.err;
      done += this.take(dst, off + done, Math.min(n - done, this.len));
      this.maybeResume();
    }
  }

  /** Exactly n bytes, or null if `eofOk` and the peer closed cleanly before the first of them. */
  async read(n: number, what: string, eofOk = false): Promise<Buffer | null> {
    if (n > 0 && this.len === 0 && !(await this.need(1, what, eofOk))) return null;
    const b = Buffer.allocUnsafe(n);
    await this.readInto(b, 0, n, what);
    return b;
  }

  private take(dst: Uint8Array, off: number, n: number): number {
    let done = 0;
    while (done < n) {
      const h = this.bufs[0];
      const k = Math.min(h.length, n - done);
      dst.set(k === h.length ? h : h.subarray(0, k), off + done);
      done += k;
      if (k === h.length) this.bufs.shift(); else this.bufs[0] = h.subarray(k);
    }
    this.len -= n;
    return n;
  }

  private maybeResume(): void {
    if (this.pausedByUs && this.len < this.highWater >> 1) { this.pausedByUs = false; this.sock.resume(); }
  }
}

/** Write and resolve once the bytes are handed to the kernel (the caller's buffer may then be reused). */
export function writeAll(sock: Duplex, b: Uint8Array, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    if (sock.destroyed || sock.writableEnded) {
      reject(new MigError(ErrorCode.PEER_GONE, `${what}: the connection is closed`));
      return;
    }
    sock.write(b, (e) => {
      if (e) reject(new MigError(ErrorCode.PEER_GONE, `${what}: write failed: ${e.message}`, { cause: e }));
      else resolve();
    });
  });
}
