// The destination's record source over N connections: each channel is pumped into a small bounded queue, and the
// loader is handed records so that every device's CHUNKs come in sequence order whatever channel they used. END is
// handed over only when every other channel has ended. Control frames on channel 0 go to `onControl`. The offsets
// the loader sees are those of the same stream saved to a file (`save`), so errors name a byte a user can inspect.
import {
  FILE_HEADER_SIZE, RECORD_HEADER_SIZE, REC_ABORT, REC_CHUNK, REC_DEVICE_TABLE, REC_END, type AbortRecord, decodeFileHeader, decodeJson,
  validateDeviceTable, verifyRecord, type DeviceTable, type RecordHeader, RECORD_NAMES,
} from '../container/format.js';
import type { AdoptedDevice, AppliedDelta, RecordRef, RecordSource } from '../container/reader.js';
import type { FileSink } from '../container/sink.js';
import { ErrorCode, MigError } from '../errors.js';
import { FRAME_NAMES, SocketReader, decodeFrameHeader } from './wire.js';
import { ChannelRx } from './channel-rx.js';

interface Rec {
  h: RecordHeader; header: Uint8Array; body: Uint8Array; channel: number;
  /** A CHUNK received straight into shared memory, laid out as the loader's staging slot (header at 0, body at 32). */
  sab?: SharedArrayBuffer;
}

interface Chan {
  index: number;
  reader: SocketReader;
  /** Received off the main thread: the fd a worker reads once the loader hands over the devices (adopt). */
  offThread?: { fd: number; rx: ChannelRx; begun?: boolean };
  queue: Rec[];
  queuedBytes: number;
  ended: boolean;
  /** Bytes of frames read on this connection (after the HELLO), for error offsets. */
  rx: number;
  space: (() => void) | null;
  pumping?: boolean;
}

/** Bytes of records a channel may read ahead of the loader (at least one record). */
const CHANNEL_QUEUE_BYTES = 8 << 20;
/**
 * CHUNKs from this size up are received into shared memory that the loader hands to its worker as is (no copy on the
 * main thread, which reads every channel and is the destination's busiest thread); smaller ones are copied.
 */
const SHARED_BODY_MIN = 64 << 10;

/**
 * Reused shared buffers in power-of-two size classes. What is held at once is bounded by the channels' read-ahead
 * and the loader's records in flight, so the free lists stay small.
 */
class SharedBodies {
  private free = new Map<number, SharedArrayBuffer[]>();
  get(size: number): SharedArrayBuffer {
    const cls = 2 ** Math.ceil(Math.log2(size));
    return this.free.get(cls)?.pop() ?? new SharedArrayBuffer(cls);
  }
  put(b: SharedArrayBuffer): void {
    const l = this.free.get(b.byteLength);
    if (l) l.push(b); else this.free.set(b.byteLength, [b]);
  }
}

export class LiveSource implements RecordSource {
  offset = FILE_HEADER_SIZE;
  private chans: Chan[] = [];
  private err: MigError | undefined;
  private waiter: (() => void) | null = null;
  private nextSeq: bigint[] = [];
  private table: DeviceTable | undefined;
  private maxBody = 0;
  private rr = 0;
  /** The record loader asked for a body of (body is in memory already). */
  private current: Rec | undefined;
  private done: Promise<void> | undefined;
  private readonly bodies = new SharedBodies();

  constructor(private readonly hooks: {
    onControl: (h: RecordHeader, header: Uint8Array, body: Buffer, at: number) => void;
    /** After END: resolves when the source's closing frame arrived. */
    waitDone: () => Promise<void>;
    onAbort: (a: AbortRecord) => void;
    save?: FileSink;
  }) {
    this.save = hooks.save;
  }
  private readonly save: FileSink | undefined;

  /** Channel 0 first: file header + DEVICE_TABLE are read here, before any other channel is pumped. */
  async openMain(reader: SocketReader): Promise<DeviceTable> {
    const fh = (await reader.read(FILE_HEADER_SIZE, 'container header'))!;
    decodeFileHeader(fh);
    const hb = (await reader.read(RECORD_HEADER_SIZE, 'DEVICE_TABLE header'))!;
    const h = decodeFrameHeader(hb, FILE_HEADER_SIZE);
    if (h.type !== REC_DEVICE_TABLE) {
      throw new MigError(ErrorCode.STREAM_BAD_RECORD, `the first record must be the DEVICE_TABLE, got ${FRAME_NAMES[h.type]}`, { offset: FILE_HEADER_SIZE });
    }
    const body = (await reader.read(h.length, 'DEVICE_TABLE'))!;
    verifyRecord(hb, body, h, FILE_HEADER_SIZE);
    this.table = validateDeviceTable(decodeJson<DeviceTable>(body, 'DEVICE_TABLE', FILE_HEADER_SIZE + RECORD_HEADER_SIZE), FILE_HEADER_SIZE);
    this.offset = FILE_HEADER_SIZE + RECORD_HEADER_SIZE + h.length;
    this.nextSeq = this.table.devices.map(() => 0n);
    if (this.save) {
      await this.save.write(fh);
      await this.save.write(Buffer.concat([hb, body]));
    }
    this.chans.push({ index: 0, reader, queue: [], queuedBytes: 0, ended: false, rx: this.offset, space: null });
    return this.table;
  }

  /**
   * A data channel (1..N-1). With `fd` (a plain TCP or UNIX socket) it is received off the main thread once the
   * loader hands over its devices (adopt): a worker reads the fd and applies the CHUNKs of the devices pinned to it.
   */
  addChannel(index: number, reader: SocketReader, fd?: number): void {
    // Its receive worker starts now: the thread loads its modules while the destinations are made.
    const offThread = fd !== undefined && fd >= 0 ? { fd, rx: new ChannelRx(index) } : undefined;
    this.chans[index] = { index, reader, queue: [], queuedBytes: 0, ended: false, rx: 0, space: null, offThread };
  }

  /** Start reading every channel; `maxBody` bounds a CHUNK body (from the destinations' own geometry). */
  start(maxBody: number): void {
    this.maxBody = maxBody;
    for (const c of this.chans) if (!c.offThread) this.startPump(c);
  }

  private startPump(c: Chan): void {
    this.pump(c).catch((e) => this.fail(e instanceof MigError ? e : new MigError(ErrorCode.PEER_GONE, String(e))));
  }

  /**
   * The loader's devices, once every destination is RESUMING (before ACCEPT, so no CHUNK has been sent yet): each
   * off-thread channel gets a receive worker with the devices pinned to it (device mod N), and their completion.
   */
  async adopt(devices: AdoptedDevice[], applied: (index: number, r: AppliedDelta) => void): Promise<Map<number, Promise<void>>> {
    const taken = new Map<number, Promise<void>>();
    const ready: Promise<void>[] = [];
    const n = this.chans.length;
    for (const c of this.chans) {
      const off = c.offThread;
      if (!off || this.err) continue;
      const mine = devices.filter((d) => d.index % n === c.index);
      const prefix = c.reader.detach((e) => this.fail(e));
      ready.push(off.rx.begin({
        channel: c.index, channels: n, fd: off.fd, prefix, tableDevices: this.nextSeq.length, maxBody: this.maxBody, devices: mine,
      }, {
        applied,
        ended: () => { c.ended = true; this.wake(); },
        failed: (e) => this.fail(e),
      }));
      off.begun = true;
      for (const d of mine) taken.set(d.index, off.rx.done);
    }
    await Promise.all(ready);
    return taken;
  }

  /** Is this device's channel received off the main thread (its CHUNKs never come through here)? */
  private offThreadDevice(device: number): boolean {
    return device < this.nextSeq.length && !!this.chans[device % this.chans.length]?.offThread?.begun;
  }

  fail(e: MigError): void {
    this.err ??= e;
    for (const c of this.chans) { c.reader.fail(e); c.space?.(); c.offThread?.rx.stop(); }
    this.wake();
  }

  /** Stop every receive worker and wait until each thread is gone (their sockets may then be closed). */
  async stopWorkers(): Promise<void> {
    await Promise.all(this.chans.map((c) => c.offThread?.rx.close()));
  }

  /** Channels received by worker threads (off the main thread). */
  get receiveWorkers(): number { return this.chans.filter((c) => c.offThread?.begun).length; }
  get failed(): MigError | undefined { return this.err; }
  get channels(): number { return this.chans.length; }
  get bytesReceived(): number { return this.channelBytes.reduce((a, b) => a + b, 0); }
  /** Bytes received on each channel (its HELLO included). */
  get channelBytes(): number[] { return this.chans.map((c) => c.reader.bytes + (c.offThread?.rx.bytes ?? 0)); }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private async pump(c: Chan): Promise<void> {
    const what = `channel ${c.index}`;
    for (;;) {
      if (this.err) return;
      const hb = await c.reader.read(RECORD_HEADER_SIZE, `${what}: frame header`, true);
      if (!hb) { c.ended = true; this.wake(); return; }
      const at = c.rx;
      const h = decodeFrameHeader(hb, at);
      const name = FRAME_NAMES[h.type];
      if (!RECORD_NAMES[h.type]) {
        if (c.index !== 0) throw new MigError(ErrorCode.PEER_PROTOCOL, `${what}: control frame ${name} outside channel 0`, { offset: at });
        const body = (await c.reader.read(h.length, `${what}: ${name}`))!;
        c.rx += RECORD_HEADER_SIZE + h.length;
        this.hooks.onControl(h, hb, body, at);
        continue;
      }
      if (h.type === REC_DEVICE_TABLE) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'a second DEVICE_TABLE', { offset: at });
      if (h.type === REC_CHUNK && this.offThreadDevice(h.device)) {
        throw new MigError(ErrorCode.PEER_PROTOCOL, `${what}: CHUNK of device ${h.device}, whose records travel on channel ${h.device % this.chans.length} (device mod ${this.chans.length})`,
          { offset: at + 8, device: this.table?.devices[h.device]?.name });
      }
      if (c.index !== 0 && h.type !== REC_CHUNK) {
        throw new MigError(ErrorCode.PEER_PROTOCOL, `${what}: ${name} record outside channel 0 (channels 1..N carry CHUNKs only)`, { offset: at });
      }
      const limit = h.type === REC_CHUNK ? this.maxBody : 1 << 20;
      if (h.length > limit) {
        throw new MigError(ErrorCode.STREAM_TOO_LARGE, `${name} of ${h.length} bytes exceeds what the destination can take (${limit})`,
          { offset: at + 4, value: h.length, device: this.table?.devices[h.device]?.name });
      }
      // Bounded read-ahead per channel: wait for the loader before buffering another record.
      while (c.queue.length > 0 && c.queuedBytes + h.length > CHANNEL_QUEUE_BYTES && !this.err) {
        await new Promise<void>((r) => { c.space = r; });
        c.space = null;
      }
      let rec: Rec;
      if (h.type === REC_CHUNK && h.length >= SHARED_BODY_MIN) {
        const sab = this.bodies.get(RECORD_HEADER_SIZE + h.length);
        const slot = new Uint8Array(sab, 0, RECORD_HEADER_SIZE + h.length);
        slot.set(hb, 0);
        await c.reader.readInto(slot, RECORD_HEADER_SIZE, h.length, `${what}: ${name} body`);
        rec = { h, header: slot.subarray(0, RECORD_HEADER_SIZE), body: slot.subarray(RECORD_HEADER_SIZE), channel: c.index, sab };
      } else {
        rec = { h, header: hb, body: (await c.reader.read(h.length, `${what}: ${name} body`))!, channel: c.index };
      }
      c.rx += RECORD_HEADER_SIZE + h.length;
      c.queue.push(rec);
      c.queuedBytes += h.length;
      this.wake();
    }
  }

  async readPreamble(): Promise<DeviceTable> {
    if (!this.table) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'no DEVICE_TABLE received');
    return this.table;
  }

  private take(c: Chan): RecordRef {
    const r = c.queue.shift()!;
    c.queuedBytes -= r.h.length;
    c.space?.();
    const at = this.offset;
    this.offset += RECORD_HEADER_SIZE + r.h.length;
    if (r.h.type === REC_CHUNK && r.h.device < this.nextSeq.length) this.nextSeq[r.h.device]++;
    this.current = r;
    if (this.save) {
      const failed = (e: unknown) => this.fail(new MigError(ErrorCode.IO, `saving the received stream: ${(e as Error).message}`, { cause: e }));
      // Shared bodies are reused once the loader is done with them: the file gets its own copy.
      this.save.write(r.sab ? Buffer.from(r.header) : r.header).catch(failed);
      this.save.write(r.sab ? Buffer.from(r.body) : r.body).catch(failed);
    }
    if (r.h.type === REC_ABORT) {
      try { verifyRecord(r.header, r.body, r.h, at); this.hooks.onAbort(decodeJson<AbortRecord>(r.body, 'ABORT', at + RECORD_HEADER_SIZE)); } catch { /* the loader reports it */ }
    }
    return { h: r.h, header: r.header, at, peek: r.body.subarray(0, 16) };
  }

  private ready(c: Chan): boolean {
    const r = c.queue[0];
    if (!r) return false;
    if (r.h.type === REC_CHUNK) return r.h.device >= this.nextSeq.length || r.h.seq === this.nextSeq[r.h.device];
    // END closes the stream: only once every other channel has delivered everything.
    if (r.h.type === REC_END) return this.chans.every((x) => x === c || (x.ended && x.queue.length === 0));
    return true; // ABORT
  }

  async next(): Promise<RecordRef | null> {
    // Off-thread channels the loader did not adopt (it had a reason to keep every record) are read here after all.
    for (const c of this.chans) {
      if (c.offThread && !c.offThread.begun && !c.pumping) { c.pumping = true; void c.offThread.rx.close(); this.startPump(c); }
    }
    for (;;) {
      if (this.err) throw this.err;
      const n = this.chans.length;
      for (let k = 0; k < n; k++) {
        const c = this.chans[(this.rr + k) % n];
        if (this.ready(c)) { this.rr = (c.index + 1) % n; return this.take(c); }
      }
      if (this.chans.every((c) => c.ended && c.queue.length === 0)) {
        // A live stream ends with END (or ABORT): a connection closed before it is a lost source, not a short file.
        throw new MigError(ErrorCode.PEER_GONE, `the source closed the connection before END (after ${this.bytesReceived} bytes)`, { offset: this.offset });
      }
      // Nothing can go next although every channel is ended or full: the sender skipped or reordered a record.
      // Hand over the first head anyway; the loader names the sequence error.
      if (this.chans.every((c) => c.ended || c.space !== null)) {
        const c = this.chans.find((x) => x.queue.length > 0);
        if (c) return this.take(c);
      }
      await new Promise<void>((r) => { this.waiter = r; });
    }
  }

  /**
   * The current record as a staging slot the loader may hand to a worker as is (header at 0, body at 32), or null
   * when it has none (then `body()` copies). `release()` once the worker is done with it.
   */
  takeSlot(r: RecordRef): { sab: SharedArrayBuffer; release: () => void } | null {
    const rec = this.current;
    if (!rec?.sab || rec.header !== r.header) return null;
    const sab = rec.sab;
    rec.sab = undefined;
    return { sab, release: () => this.bodies.put(sab) };
  }

  async body(r: RecordRef, dst: Uint8Array, dstOff: number, device?: string, verify = true): Promise<Uint8Array> {
    const rec = this.current;
    if (!rec || rec.header !== r.header) throw new MigError(ErrorCode.BAD_STATE, 'body() for a record that is not the current one');
    if (rec.body.length > dst.length - dstOff) {
      throw new MigError(ErrorCode.STREAM_TOO_LARGE, `${RECORD_NAMES[r.h.type]} record of ${r.h.length} bytes exceeds the ${dst.length - dstOff}-byte buffer for it`,
        { offset: r.at + 4, device, value: r.h.length });
    }
    dst.set(rec.body, dstOff);
    const view = dst.subarray(dstOff, dstOff + rec.body.length);
    if (verify) verifyRecord(r.header, view, r.h, r.at, device);
    return view;
  }

  async metaBody<T>(r: RecordRef): Promise<T> {
    const rec = this.current!;
    verifyRecord(r.header, rec.body, r.h, r.at);
    return decodeJson<T>(rec.body, RECORD_NAMES[r.h.type], r.at + RECORD_HEADER_SIZE);
  }

  skip(): void {
    throw new MigError(ErrorCode.BAD_STATE, 'a live source has no file to skip in');
  }

  /** After END: the source's DONE (with the measured downtime) must follow, and no record after it. */
  checkEnd(): Promise<void> {
    this.done ??= this.hooks.waitDone();
    return this.done;
  }

  close(): void { /* the session owns the sockets */ }
}
