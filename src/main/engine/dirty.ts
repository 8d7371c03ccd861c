// Guest dirty pages, queried from the main thread and kept as a union per device for the embedder (the VMM migrates
// guest RAM; vfio-mig tells it which pages the devices dirtied), through each device's DirtyLog: draft-2019 queries
// the migration region (pfn registers, bitmap in the data area) under the device lock; linux-5.8 asks the type1
// container; v2 the device's DMA logging.
import { OWNER_MAIN } from './region-lock.js';
import { Histogram } from './histogram.js';
import type { SourceDevice } from './source-device.js';

export class DirtyTracker {
  readonly latencyMs = new Histogram();
  readonly lockWaitMs = new Histogram();
  queries = 0;
  private readonly union = new Map<number, Uint8Array>();
  private scratch = new Map<number, Uint8Array>();

  constructor(private readonly devices: SourceDevice[],
    private readonly onQuery?: (d: SourceDevice, ms: number, pages: number) => void) {
    for (const d of devices) {
      const bytes = Math.ceil(pagesOf(d) / 64) * 8;
      this.union.set(d.index, new Uint8Array(bytes));
      this.scratch.set(d.index, new Uint8Array(bytes));
    }
  }

  async start(): Promise<void> {
    for (const d of this.devices) await d.dev.dirtyLog?.start();
  }

  async stop(): Promise<void> {
    for (const d of this.devices) {
      try {
        await d.dev.dirtyLog?.stop();
      } catch { /* stopping is best effort during rollback */ }
    }
  }

  /** One query of one device; returns the pages it reported dirty. */
  async query(d: SourceDevice, signal?: AbortSignal): Promise<number> {
    const pages = pagesOf(d);
    if (!pages) return 0;
    const out = this.union.get(d.index)!;
    const t0 = performance.now();
    let found = 0;
    // The device's own log (v2 DMA logging) and the container's need no device lock; a log read through the data
    // channel (draft-2019's region pfns) does, held across the report (which may answer later, over a socket).
    const log = d.dev.dirtyLog!;
    const bm = this.scratch.get(d.index)!;
    bm.fill(0);
    if (log.sharesDataChannel) {
      const lock = d.shared.lock;
      await lock.lockAsync(OWNER_MAIN, signal); // abandoned on cancel: the lock may be held by a stalled vendor call
      this.lockWaitMs.record(performance.now() - t0);
      try { await log.report(bm); } finally { lock.unlock(); }
    } else {
      await log.report(bm);
    }
    // Pages this query reported (a page dirtied again since an earlier query counts again: the dirty rate).
    for (let i = 0; i < bm.length; i++) {
      if (bm[i]) { out[i] |= bm[i]; found += popcount8(bm[i]); }
    }
    const ms = performance.now() - t0;
    this.latencyMs.record(ms);
    this.queries++;
    this.onQuery?.(d, ms, found);
    return found;
  }

  async queryAll(signal?: AbortSignal): Promise<void> {
    for (const d of this.devices) await this.query(d, signal);
  }

  /** Union of dirty guest pages of a device (bit i = pfn i). */
  bitmap(index: number): Uint8Array | undefined { return this.union.get(index); }

  count(index: number): number {
    const b = this.union.get(index);
    let n = 0;
    if (b) for (const x of b) n += popcount8(x);
    return n;
  }
}

/** Guest pages a device reports dirty through its tracking (0: none). */
function pagesOf(d: SourceDevice): number {
  return d.dev.dirtyLog?.pages ?? 0;
}

function popcount8(x: number): number {
  x = x - ((x >> 1) & 0x55);
  x = (x & 0x33) + ((x >> 2) & 0x33);
  return (x + (x >> 4)) & 0x0f;
}
