// The worker pool (piscina) plus a device-task semaphore. At most `threads` device tasks hold staging rings at
// once, across every migration sharing the pool, which keeps staging memory bounded by threads x ring size.
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { Piscina } from 'piscina';
import { ErrorCode, MigError, toMigError } from '../errors.js';
import { RingPool } from './staging.js';
import { markNoSse42, testHooks } from './test-hooks.js';
import type { BaselineResult, BaselineTask, DigestTask, LoadDataPathTask, LoadPathTask, LoadResult, SavePathTask, SaveResult, Task, TaskError } from '../../workers/tasks.js';

export interface EnginePoolOptions {
  threads?: number;
  /** Slots per staging ring. */
  ringSlots?: number;
}

/** Worker threads when none are asked for: one per core. */
export function defaultThreads(): number { return Math.max(1, os.availableParallelism?.() ?? os.cpus().length); }

export class EnginePool {
  readonly threads: number;
  readonly rings: RingPool;
  private readonly piscina: Piscina;
  private active = 0;
  private waiters: { n: number; go: () => void }[] = [];
  /** Live destinations loading through this pool now (holdForLoads). */
  private loads = 0;

  constructor(o: EnginePoolOptions = {}) {
    this.threads = o.threads ?? defaultThreads();
    if (!Number.isInteger(this.threads) || this.threads < 1 || this.threads > 256) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `threads must be 1..256, got ${o.threads}`);
    }
    const slots = o.ringSlots ?? 3;
    if (!Number.isInteger(slots) || slots < 2 || slots > 64) throw new MigError(ErrorCode.BAD_ARGUMENT, `ring slots must be 2..64, got ${slots}`);
    this.rings = new RingPool(slots);
    const noSse42 = testHooks(o)?.noSse42 === true;
    if (noSse42) markNoSse42(this);
    this.piscina = new Piscina({
      workerData: noSse42 ? { noSse42 } : undefined,
      filename: fileURLToPath(new URL('../../workers/worker.js', import.meta.url)),
      minThreads: this.threads,
      maxThreads: this.threads,
      idleTimeout: 60_000,
      // piscina loads the task module with require() first; on Node 20.19+ that is require(esm), which can abort the
      // whole process (V8 "IsGraphAsync must be used on an instantiated module") when it races the import() of the
      // same module in a fresh worker. Without it piscina goes straight to import().
      execArgv: process.allowedNodeEnvironmentFlags.has('--no-experimental-require-module')
        ? [...process.execArgv, '--no-experimental-require-module'] : undefined,
    });
  }

  /**
   * A live destination loads through this pool while a source in the same process may save through it: a save task
   * occupies its worker for a whole round and blocks there when the connection is full, which only the load can
   * drain. While a hold is active, device saves leave one worker free for the load tasks (a 1-thread pool cannot do
   * both: acquire() then refuses). Returns the release.
   */
  holdForLoads(): () => void {
    this.loads++;
    let held = true;
    return () => { if (held) { held = false; this.loads--; this.release(0); } };
  }

  /** Places device saves may hold now. */
  private get capacity(): number { return this.loads > 0 ? this.threads - 1 : this.threads; }

  private fits(k: number): boolean { return this.active + k <= this.capacity || (this.active === 0 && this.capacity > 0); }

  /** Hold `n` of the `threads` device-task places at once (all or nothing, so two devices cannot deadlock). */
  async acquire(n = 1): Promise<void> {
    if (this.capacity < 1) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, 'this EnginePool has 1 worker thread and a live receive() loads through it: '
        + 'a save and a load in one process need a pool of 2+ threads (or separate pools)');
    }
    const k = Math.min(n, this.threads);
    if (this.waiters.length === 0 && this.fits(k)) { this.active += k; return; }
    await new Promise<void>((r) => this.waiters.push({ n: k, go: r }));
  }

  release(n = 1): void {
    this.active -= Math.min(n, this.threads);
    // FIFO: the oldest waiter goes first once its places are free.
    while (this.waiters.length && this.fits(this.waiters[0].n)) {
      const w = this.waiters.shift()!;
      this.active += w.n;
      w.go();
    }
  }

  private async run<R>(task: Task): Promise<R> {
    let out: unknown;
    try {
      out = await this.piscina.run(task);
    } catch (e) {
      const dev = 'path' in task ? task.path.device : undefined;
      throw new MigError(ErrorCode.WORKER_FAILED, `worker failed during ${task.op}: ${(e as Error).message}`, { device: dev, cause: e });
    }
    if (out && typeof out === 'object' && (out as TaskError).__migError) {
      // The worker normalised it; toMigError keeps a VFM_ code and turns anything else into one.
      throw toMigError(out);
    }
    return out as R;
  }

  save(t: SavePathTask): Promise<SaveResult> { return this.run<SaveResult>(t); }
  loadPath(t: LoadPathTask): Promise<LoadResult> { return this.run<LoadResult>(t); }
  loadData(t: LoadDataPathTask): Promise<LoadResult | null> { return this.run<LoadResult | null>(t); }
  digest(t: DigestTask): Promise<string> { return this.run<string>(t); }
  baseline(t: BaselineTask): Promise<BaselineResult> { return this.run<BaselineResult>(t); }

  get stats() {
    return { threads: this.threads, completed: this.piscina.completed, stagingBytes: this.rings.allocatedBytes, rings: this.rings.ringsCreated };
  }

  /** Stop the worker threads and free staging memory. */
  async close(): Promise<void> {
    await this.piscina.destroy();
    this.rings.clear();
  }

  /** `await using pool = new EnginePool()`: close() at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> { await this.close(); }
}

/**
 * Atomics.waitAsync, and piscina's replacement of a crashed worker, hold no reference on the event loop: while the
 * engine waits only on those, Node would exit mid-migration. Migrations and loads hold this for their duration.
 */
export function keepAlive(): () => void {
  const t = setInterval(() => undefined, 1 << 30);
  return () => clearInterval(t);
}
