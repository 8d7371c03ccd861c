// The migration mutex of QEMU's 2019 patches, in shared memory: a 3-state futex-style lock (0 free, 1 held,
// 2 held with waiters) over an Int32Array on a SharedArrayBuffer. Workers take it synchronously around one data chunk
// (data_offset -> data_size -> copy); the main thread takes it asynchronously (Atomics.waitAsync, so the event loop
// keeps running) around a dirty-bitmap query or a state change. Without it a bitmap query can land in the data area
// between a worker's data_offset read and its copy (test/lock.test.ts shows the corruption).

import { ErrorCode, MigError } from '../errors.js';

const STATE = 0;   // lock word
const OWNER = 1;   // who holds it (debugging, forced release after a worker death)
const DISABLED = 2; // test-only switch (engine/test-hooks.ts): 1 turns the lock into a no-op
export const LOCK_WORD_DISABLED = DISABLED;
const PRIORITY = 3; // main-thread waiters: workers step aside so a query waits at most one chunk (the lock is unfair otherwise)
const HOLDS = 4;    // worker acquisitions so far: the main thread tells one long hold (a stalled vendor call) from many short ones
export const LOCK_INTS = 6; // 5 used; even, so what follows a lock in shared memory stays 8-byte aligned
export const OWNER_MAIN = 1;
export const OWNER_WORKER = 2;

export class RegionLock {
  private readonly i32: Int32Array;
  private readonly base: number;

  /** `sab` holds the lock at Int32 index `index` (LOCK_INTS words). */
  constructor(sab: SharedArrayBuffer, index = 0) {
    this.i32 = new Int32Array(sab);
    this.base = index;
  }

  static create(): RegionLock {
    return new RegionLock(new SharedArrayBuffer(LOCK_INTS * 4), 0);
  }

  get buffer(): SharedArrayBuffer { return this.i32.buffer as SharedArrayBuffer; }
  get index(): number { return this.base; }

  // An ES private method: not on the prototype, so not even a runtime surface.
  #off(): boolean { return Atomics.load(this.i32, this.base + DISABLED) === 1; }

  /** Blocking acquire (worker threads only: Atomics.wait is not allowed on the main thread). */
  lockSync(owner = OWNER_WORKER): void {
    if (this.#off()) return;
    // A worker that just unlocked would win the race against the main thread, whose wake-up goes through its event
    // loop; while the main thread waits, workers wait for it (bounded: 20 ms, in case its event loop is stalled).
    for (let v = Atomics.load(this.i32, this.base + PRIORITY), n = 0; v > 0 && n < 20; v = Atomics.load(this.i32, this.base + PRIORITY), n++) {
      Atomics.wait(this.i32, this.base + PRIORITY, v, 1);
    }
    const s = this.base + STATE;
    let c = Atomics.compareExchange(this.i32, s, 0, 1);
    if (c !== 0) {
      if (c !== 2) c = Atomics.exchange(this.i32, s, 2);
      while (c !== 0) {
        Atomics.wait(this.i32, s, 2);
        c = Atomics.exchange(this.i32, s, 2);
      }
    }
    Atomics.store(this.i32, this.base + OWNER, owner);
    Atomics.add(this.i32, this.base + HOLDS, 1);
  }

  /** Worker acquisitions so far (the same value and a worker owner across a wait: one hold lasted that long). */
  get holds(): number { return Atomics.load(this.i32, this.base + HOLDS); }

  /**
   * Non-blocking acquire for the main thread: waits with Atomics.waitAsync, never stalling the event loop. With
   * `signal`, the wait ends (CANCELLED, lock not taken) when it aborts: a worker stuck inside a vendor call holds
   * the lock for as long as the vendor likes, and nobody on the main thread may wait for that.
   */
  async lockAsync(owner = OWNER_MAIN, signal?: AbortSignal): Promise<void> {
    if (this.#off()) return;
    const s = this.base + STATE;
    let c = Atomics.compareExchange(this.i32, s, 0, 1);
    if (c !== 0) {
      Atomics.add(this.i32, this.base + PRIORITY, 1);
      try {
        if (c !== 2) c = Atomics.exchange(this.i32, s, 2);
        while (c !== 0) {
          if (signal?.aborted) throw new MigError(ErrorCode.CANCELLED, 'wait for the region lock cancelled');
          const w = Atomics.waitAsync(this.i32, s, 2);
          if (w.async) await (signal ? untilAborted(w.value, signal) : w.value);
          c = Atomics.exchange(this.i32, s, 2);
        }
      } finally {
        Atomics.sub(this.i32, this.base + PRIORITY, 1);
        Atomics.notify(this.i32, this.base + PRIORITY);
      }
    }
    Atomics.store(this.i32, this.base + OWNER, owner);
  }

  tryLock(owner: number): boolean {
    if (this.#off()) return true;
    if (Atomics.compareExchange(this.i32, this.base + STATE, 0, 1) !== 0) return false;
    Atomics.store(this.i32, this.base + OWNER, owner);
    return true;
  }

  unlock(): void {
    if (this.#off()) return;
    Atomics.store(this.i32, this.base + OWNER, 0);
    if (Atomics.sub(this.i32, this.base + STATE, 1) !== 1) {
      Atomics.store(this.i32, this.base + STATE, 0);
      Atomics.notify(this.i32, this.base + STATE, 1);
    }
  }

  get held(): boolean { return Atomics.load(this.i32, this.base + STATE) !== 0; }
  get owner(): number { return Atomics.load(this.i32, this.base + OWNER); }

  /** After a worker died holding the lock (nobody else can own it then): free it and wake waiters. */
  forceRelease(): void {
    Atomics.store(this.i32, this.base + OWNER, 0);
    Atomics.store(this.i32, this.base + STATE, 0);
    Atomics.notify(this.i32, this.base + STATE);
  }

  async withAsync<T>(fn: () => T | Promise<T>): Promise<T> {
    await this.lockAsync();
    try { return await fn(); } finally { this.unlock(); }
  }
}

/** `p`, or a CANCELLED rejection as soon as `signal` aborts (the abandoned wait holds no reference). */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(new MigError(ErrorCode.CANCELLED, 'wait for the region lock cancelled'));
    if (signal.aborted) { onAbort(); return; }
    signal.addEventListener('abort', onAbort, { once: true });
    p.then((v) => { signal.removeEventListener('abort', onAbort); resolve(v); });
  });
}
