// Bounded staging between workers and the stream writer: a ring of fixed-size SharedArrayBuffer slots. A worker
// (producer) fills slots in a device's order; the main thread (consumer) writes them to the sink and frees them. A
// full ring blocks the producer: backpressure, never growth. Rings are borrowed from a RingPool and reused, because
// first touch of fresh shared memory costs ~5x the copy (toolchain-notes).

const HEAD = 0;   // slots published (monotonic)
const TAIL = 1;   // slots released (monotonic)
const ABORT = 2;  // 1: producer must stop
const DONE = 3;   // 1: producer finished
const EVENT = 4;  // bumped on every publish / done / abort, so the consumer never misses a wake-up
const LEN0 = 8;   // per-slot byte lengths follow

export interface RingDesc { data: SharedArrayBuffer; ctrl: SharedArrayBuffer; nslots: number; slotSize: number }

export class StagingRing {
  readonly ctrl: Int32Array;
  readonly bytes: Uint8Array;
  constructor(readonly desc: RingDesc) {
    this.ctrl = new Int32Array(desc.ctrl);
    this.bytes = new Uint8Array(desc.data);
  }

  static create(nslots: number, slotSize: number): StagingRing {
    return new StagingRing({
      data: new SharedArrayBuffer(nslots * slotSize), ctrl: new SharedArrayBuffer((LEN0 + nslots) * 4), nslots, slotSize,
    });
  }

  get nslots(): number { return this.desc.nslots; }
  get slotSize(): number { return this.desc.slotSize; }

  reset(): void {
    for (let i = 0; i < LEN0 + this.nslots; i++) Atomics.store(this.ctrl, i, 0);
  }

  slot(i: number): Uint8Array {
    return this.bytes.subarray(i * this.slotSize, (i + 1) * this.slotSize);
  }

  // ---- producer (worker thread) ----
  /** Wait for a free slot; -1 if the ring was aborted. */
  acquireSync(): number {
    for (;;) {
      if (Atomics.load(this.ctrl, ABORT)) return -1;
      const head = Atomics.load(this.ctrl, HEAD);
      const tail = Atomics.load(this.ctrl, TAIL);
      if (head - tail < this.nslots) return head % this.nslots;
      Atomics.wait(this.ctrl, TAIL, tail, 1000);
    }
  }

  publish(len: number): void {
    const head = Atomics.load(this.ctrl, HEAD);
    Atomics.store(this.ctrl, LEN0 + (head % this.nslots), len);
    Atomics.store(this.ctrl, HEAD, head + 1);
    this.bump();
  }

  finish(): void {
    Atomics.store(this.ctrl, DONE, 1);
    this.bump();
  }

  get aborted(): boolean { return Atomics.load(this.ctrl, ABORT) === 1; }

  // ---- consumer (main thread) ----
  /** Next published slot in order, or null once the producer is done (or the ring aborted) and all is drained. */
  async next(): Promise<{ index: number; len: number } | null> {
    for (;;) {
      const ev = Atomics.load(this.ctrl, EVENT);
      const head = Atomics.load(this.ctrl, HEAD);
      const tail = Atomics.load(this.ctrl, TAIL);
      if (tail < head) {
        const index = tail % this.nslots;
        return { index, len: Atomics.load(this.ctrl, LEN0 + index) };
      }
      if (Atomics.load(this.ctrl, DONE) || Atomics.load(this.ctrl, ABORT)) return null;
      const w = Atomics.waitAsync(this.ctrl, EVENT, ev);
      if (w.async) await w.value;
    }
  }

  release(): void {
    Atomics.add(this.ctrl, TAIL, 1);
    Atomics.notify(this.ctrl, TAIL);
  }

  /** Stop the producer and wake everyone (cancel, or a worker that died). */
  abort(): void {
    Atomics.store(this.ctrl, ABORT, 1);
    Atomics.notify(this.ctrl, TAIL);
    this.bump();
  }

  private bump(): void {
    Atomics.add(this.ctrl, EVENT, 1);
    Atomics.notify(this.ctrl, EVENT);
  }
}

/** Reusable rings keyed by geometry; memory is bounded by how many rings are borrowed at once. */
export class RingPool {
  private free = new Map<string, StagingRing[]>();
  private created = 0;
  private bytes = 0;
  constructor(readonly nslots: number) {}

  borrow(slotSize: number): StagingRing {
    const key = `${this.nslots}x${slotSize}`;
    const r = this.free.get(key)?.pop() ?? (this.created++, this.bytes += this.nslots * slotSize, StagingRing.create(this.nslots, slotSize));
    r.reset();
    return r;
  }

  giveBack(r: StagingRing): void {
    const key = `${r.nslots}x${r.slotSize}`;
    const list = this.free.get(key) ?? [];
    list.push(r);
    this.free.set(key, list);
  }

  /** Bytes of staging ever allocated (the memory bound the bench checks). */
  get allocatedBytes(): number { return this.bytes; }
  get ringsCreated(): number { return this.created; }

  clear(): void { this.free.clear(); }
}
