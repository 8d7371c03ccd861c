// Main-thread side of a live data channel received off the main thread (src/workers/channel-rx.ts): QEMU's multifd
// receive threads. The socket was accepted and handshaken here (HELLO, TLS excluded: node:tls decrypts on the main
// thread); Node stops reading it, whatever it had buffered is handed over, and a worker thread of its own reads the
// fd and applies the CHUNKs of the devices pinned to the channel (device mod N). This side only relays the worker's
// messages (progress, the end with each device's final parse state, the first error) and stops it: the abort word
// is seen within 50 ms while the socket is quiet, or after the vendor call in progress.
import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import { ErrorCode, MigError } from '../errors.js';
import type { AdoptedDevice, AppliedDelta } from '../container/reader.js';

export interface ChannelRxInit {
  channel: number;
  channels: number;
  fd: number;
  /** Bytes Node had read from the socket before the hand-over: the channel's stream starts with them. */
  prefix: Uint8Array;
  /** Devices in the table (a CHUNK naming one beyond is a bad record, one pinned elsewhere a protocol error). */
  tableDevices: number;
  /** Largest CHUNK body the destinations take (their own geometry, never the stream's word). */
  maxBody: number;
  devices: AdoptedDevice[];
}

/** What the thread is started with (before the devices are known). */
export interface ChannelRxWorkerData {
  channel: number;
  /** Int32[1]: set to stop. */
  abort: SharedArrayBuffer;
  /** BigInt64[1]: bytes read from the socket by the worker. */
  bytes: BigInt64Array;
}

export interface RxDeviceDelta extends AppliedDelta { index: number }
export type ChannelRxMessage =
  | { t: 'ready' }
  | { t: 'progress'; devices: RxDeviceDelta[] }
  | { t: 'end'; devices: RxDeviceDelta[] }
  | { t: 'stopped' }
  | { t: 'error'; error: Record<string, unknown> };

export class ChannelRx {
  private readonly worker: Worker;
  private readonly abortWord = new Int32Array(new SharedArrayBuffer(4));
  private readonly counter = new BigInt64Array(new SharedArrayBuffer(8));
  /** Settles when the worker has left its loop (no device is touched by it any more): rejects with its error. */
  readonly done: Promise<void>;
  private settled = false;
  private begun = false;
  private closing = false;
  private readyWait: { resolve: () => void; reject: (e: MigError) => void } | undefined;
  private hooks: { applied: (index: number, r: AppliedDelta) => void; ended: () => void; failed: (e: MigError) => void } | undefined;

  /**
   * The thread starts at once (its modules load while the destinations are made); it waits for begin() to know its
   * devices.
   */
  constructor(readonly channel: number) {
    const wd: ChannelRxWorkerData = { channel, abort: this.abortWord.buffer as SharedArrayBuffer, bytes: this.counter };
    this.worker = new Worker(fileURLToPath(new URL('../../workers/channel-rx.js', import.meta.url)), { workerData: wd });
    this.worker.unref();
    this.done = new Promise<void>((resolve, reject) => {
      const finish = (e?: MigError) => {
        this.readyWait?.reject(e ?? new MigError(ErrorCode.WORKER_FAILED, `channel ${channel}: receive worker ended before it was ready`));
        if (this.settled) return;
        this.settled = true;
        if (e) { if (!this.closing) this.hooks?.failed(e); reject(e); } else resolve();
      };
      this.worker.on('message', (m: ChannelRxMessage) => {
        if (m.t === 'ready') this.readyWait?.resolve();
        if (m.t === 'progress' || m.t === 'end') for (const d of m.devices) this.hooks?.applied(d.index, d);
        if (m.t === 'end') { finish(); this.hooks?.ended(); }
        if (m.t === 'stopped') finish(new MigError(ErrorCode.CANCELLED, `channel ${channel}: receive stopped`));
        if (m.t === 'error') finish(MigError.fromJSON(m.error));
      });
      this.worker.on('error', (e) => finish(new MigError(ErrorCode.WORKER_FAILED, `channel ${channel}: receive worker failed: ${e.message}`, { cause: e })));
      this.worker.on('exit', (code) => finish(new MigError(ErrorCode.WORKER_FAILED, `channel ${channel}: receive worker exited (${code}) before the channel ended`)));
    });
    this.done.catch(() => undefined);
  }

  /**
   * Hand over the connection and its devices. Resolves once the worker has opened every device's data path and
   * reads the socket (before ACCEPT, so no data waits on a thread still loading its modules).
   */
  begin(init: ChannelRxInit, hooks: NonNullable<ChannelRx['hooks']>): Promise<void> {
    this.hooks = hooks;
    this.begun = true;
    const ready = new Promise<void>((resolve, reject) => { this.readyWait = { resolve, reject }; });
    this.worker.postMessage(init);
    return ready;
  }

  /** Bytes the worker read from the socket. */
  get bytes(): number { return Number(Atomics.load(this.counter, 0)); }

  /** Ask the worker to stop (cancel, or another channel failed); `done` settles once it has. */
  stop(): void { Atomics.store(this.abortWord, 0, 1); }

  /** Stop and wait until the thread is gone (its fd may then be closed). */
  async close(): Promise<void> {
    this.closing = true;
    this.stop();
    if (this.begun) await this.done.catch(() => undefined);
    await this.worker.terminate().catch(() => undefined);
  }
}
