// Per-device shared memory: the region lock plus the device's stream counters (next chunk sequence number and
// stream byte offset). Only one party produces a device's stream at a time (main thread between phases, one worker
// inside a phase), so the counters need visibility (Atomics), not mutual exclusion.
import { LOCK_INTS, RegionLock } from './region-lock.js';

const SEQ = 0;
const OFFSET = 1;

export class DeviceShared {
  readonly lock: RegionLock;
  private readonly counters: BigInt64Array;
  constructor(readonly sab: SharedArrayBuffer) {
    this.lock = new RegionLock(sab, 0);
    this.counters = new BigInt64Array(sab, LOCK_INTS * 4, 2);
  }
  static create(): DeviceShared {
    return new DeviceShared(new SharedArrayBuffer(LOCK_INTS * 4 + 16));
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
}
