// Per-device shared memory: the region lock, the device's stream counters (next chunk sequence number and stream
// byte offset) and the control words of the current phase, which several worker lanes of one device may share.
// Counters are only advanced under the region lock (or by the main thread between phases), so they need
// visibility (Atomics), not more exclusion.
import { LOCK_INTS, RegionLock } from './region-lock.js';

const SEQ = 0;
const OFFSET = 1;
const SENT = 2;      // data bytes sent in the current phase, all lanes
const DONE = 0;      // Int32: 1 once a lane saw pending_bytes == 0 (or failed): every lane stops
const EMPTY = 1;     // Int32: 1 once the [DATA][0][END] packet of an empty iterate was claimed

export class DeviceShared {
  readonly lock: RegionLock;
  private readonly counters: BigInt64Array;
  private readonly flags: Int32Array;
  constructor(readonly sab: SharedArrayBuffer) {
    this.lock = new RegionLock(sab, 0);
    this.counters = new BigInt64Array(sab, LOCK_INTS * 4, 3);
    this.flags = new Int32Array(sab, LOCK_INTS * 4 + 24, 2);
  }
  static create(): DeviceShared {
    return new DeviceShared(new SharedArrayBuffer(LOCK_INTS * 4 + 24 + 8));
  }
  /** Reserve the next record: returns its sequence number and stream offset, advancing by `len` bytes. */
  reserve(len: number): { seq: bigint; offset: bigint } {
    const seq = Atomics.load(this.counters, SEQ);
    const offset = Atomics.load(this.counters, OFFSET);
    Atomics.store(this.counters, SEQ, seq + 1n);
    Atomics.store(this.counters, OFFSET, offset + BigInt(len));
    return { seq, offset };
  }
  get streamBytes(): number { return Number(Atomics.load(this.counters, OFFSET)); }
  get records(): number { return Number(Atomics.load(this.counters, SEQ)); }

  /** Main thread, before dispatching a phase's lanes. */
  resetPhase(): void {
    Atomics.store(this.counters, SENT, 0n);
    Atomics.store(this.flags, DONE, 0);
    Atomics.store(this.flags, EMPTY, 0);
  }
  addSent(n: number): void { Atomics.add(this.counters, SENT, BigInt(n)); }
  get sent(): number { return Number(Atomics.load(this.counters, SENT)); }
  setDone(): void { Atomics.store(this.flags, DONE, 1); }
  get done(): boolean { return Atomics.load(this.flags, DONE) === 1; }
  /** True for exactly one caller per phase. */
  claimEmpty(): boolean { return Atomics.compareExchange(this.flags, EMPTY, 0, 1) === 0; }
}
