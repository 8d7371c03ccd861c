// Stress: rounds of concurrent migrations sharing one pool, each with random device geometry, data-area mode,
// data_offset policy, chunk size, dirty rate and dirty-bitmap query rate; every device verified by digest.
// Deterministic per seed: a failure reports the iteration seed that reproduces it.
import { pendingRollback, runEmulated, type RunReport } from '../api.js';
import { EnginePool, defaultThreads } from '../engine/pool.js';
import { admitEmulated } from '../engine/budget.js';
import { ErrorCode, MigError } from '../errors.js';
import { checkStressOptions } from '../options.js';
import type { DataMode, OffsetPolicy } from '../emulated/device.js';
import type { ProfileName } from '../protocol/profiles.js';
import type { Migration } from '../engine/migration.js';
import type { Loader } from '../engine/load.js';
import type { VendorMode } from '../../workers/tasks.js';

export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface StressOptions {
  /** Refuse to start above this many bytes of memory for the largest iteration (default: half of available memory). */
  memoryBudget?: number;
  seconds: number; seed: number; count?: number; threads?: number; concurrent?: number; onIteration?: (s: IterationSummary) => void;
  /** Default strict: stress exists to find vendor misbehaviour, so nothing is tolerated. */
  vendorMode?: VendorMode;
  /** Cancel: the running iteration's migrations roll back, no further iteration starts. */
  signal?: AbortSignal;
  /** Called once per migration of every iteration: hooks to observe it (progress, events, report). */
  observe?: () => RunHooks;
}

/** Observers of one emulated run's two engine objects. */
export interface RunHooks { onMigration?: (m: Migration) => void; onLoader?: (l: Loader) => void }
export interface IterationSummary { iteration: number; seed: number; migrations: number; devices: number; bytes: number; chunks: number; ok: boolean; error?: string }
export interface StressSummary {
  seed: number; iterations: number; migrations: number; devices: number; bytes: number; chunks: number; failures: number;
  failed: IterationSummary[]; seconds: number;
}

function pick<T>(r: () => number, xs: readonly T[]): T { return xs[Math.floor(r() * xs.length)]; }

export function iterationPlan(seed: number, concurrent: number) {
  const r = mulberry32(seed);
  return Array.from({ length: concurrent }, () => {
    const chunk = pick(r, [8192, 16384, 65536, 262144, 1 << 20]);
    return {
      devices: 1 + Math.floor(r() * 3),
      device: {
        profile: pick(r, ['draft-2019', 'linux-5.8', 'v2'] as (ProfileName | 'v2')[]),
        stateSize: (1 + Math.floor(r() * 16)) << 20,
        maxChunk: chunk,
        dataMode: pick(r, ['mmap', 'trapped', 'mixed'] as DataMode[]),
        offsetPolicy: pick(r, ['fixed', 'moving'] as OffsetPolicy[]),
        dirtyRate: pick(r, [0, 500, 5000, 20000]),
        dmaRate: pick(r, [0, 1000, 20000]),
        guestPages: pick(r, [256, 4096, 16384]),
      },
      seed: Math.floor(r() * 2 ** 31),
      dirtyQueryIntervalMs: pick(r, [1, 2, 5, 20]),
      // Timing faults: a vendor that is slow to stage chunks on one device of some migrations.
      faults: r() < 0.25 ? [{ device: 0, kind: 'slow-chunk', arg: pick(r, [50, 200, 1000]) }] : [],
      maxRounds: 1 + Math.floor(r() * 6),
      downtimeLimitMs: pick(r, [5, 50, 300]),
    };
  });
}

/** The largest iteration iterationPlan can make (all draws at their maximum), for admission before the first. */
export function worstIteration(concurrent: number) {
  return { devices: 3 * concurrent, device: { stateSize: 16 << 20, maxChunk: 1 << 20, guestPages: 16384, dirtyRate: 20000, dmaRate: 20000, offsetPolicy: 'moving' as OffsetPolicy } };
}

export async function stress(o: StressOptions): Promise<StressSummary> {
  checkStressOptions(o);
  const w = worstIteration(o.concurrent ?? 2);
  admitEmulated({ what: `stress (${w.devices} devices at once at most)`, ...w, destinations: true, newPoolThreads: o.threads ?? defaultThreads(), memoryBudget: o.memoryBudget });
  return stressLoop(o, (pool, seed, iteration) => runIteration(pool, seed, o.concurrent ?? 2, iteration, o.vendorMode, o.signal, o.memoryBudget, o.observe));
}

/**
 * The loop every stress shares: iterations drawn from the master seed on one pool, until `seconds` or `count`;
 * a cancel throws CANCELLED with what ran so far as its report.
 */
export async function stressLoop<I extends IterationSummary>(
  o: { seconds: number; seed: number; count?: number; threads?: number; signal?: AbortSignal; onIteration?: (s: I) => void },
  runOne: (pool: EnginePool, seed: number, iteration: number) => Promise<I>): Promise<StressSummary> {
  const pool = new EnginePool({ threads: o.threads });
  const t0 = performance.now();
  const master = mulberry32(o.seed);
  const sum: StressSummary = { seed: o.seed, iterations: 0, migrations: 0, devices: 0, bytes: 0, chunks: 0, failures: 0, failed: [], seconds: 0 };
  const cancelled = () => Object.assign(new MigError(ErrorCode.CANCELLED, 'stress cancelled'), { report: sum });
  try {
    while ((performance.now() - t0) / 1000 < o.seconds && (o.count === undefined || sum.iterations < o.count)) {
      if (o.signal?.aborted) throw cancelled();
      const seed = Math.floor(master() * 2 ** 32);
      const it = await runOne(pool, seed, sum.iterations);
      if (o.signal?.aborted) throw cancelled();
      sum.iterations++;
      sum.migrations += it.migrations;
      sum.devices += it.devices;
      sum.bytes += it.bytes;
      sum.chunks += it.chunks;
      if (!it.ok) { sum.failures++; sum.failed.push(it); }
      o.onIteration?.(it);
    }
  } finally {
    await pool.close();
  }
  sum.seconds = (performance.now() - t0) / 1000;
  return sum;
}

/** One iteration: `concurrent` migrations at once on the shared pool. */
export async function runIteration(pool: EnginePool, seed: number, concurrent: number, iteration = 0,
  vendorMode: VendorMode = 'strict', signal?: AbortSignal, memoryBudget?: number, observe?: () => RunHooks): Promise<IterationSummary> {
  const plans = iterationPlan(seed, concurrent);
  const res = await Promise.allSettled(plans.map((p) => runEmulated({ ...p, pool, vendorMode, signal, memoryBudget, ...observe?.() })));
  // A migration that rejected while a vendor call stalled: the next iteration (or the exit) waits for its rollback.
  await Promise.all(res.map((r) => (r.status === 'rejected' ? pendingRollback(r.reason)?.catch(() => undefined) : undefined)));
  const s: IterationSummary = { iteration, seed, migrations: plans.length, devices: 0, bytes: 0, chunks: 0, ok: true };
  for (const r of res) {
    if (r.status === 'rejected') { s.ok = false; s.error ??= (r.reason as Error).message; continue; }
    const rep: RunReport = r.value;
    s.devices += rep.save.devices.length;
    s.bytes += rep.save.precopyBytes + rep.save.stopCopyBytes;
    s.chunks += rep.save.devices.reduce((a, d) => a + d.precopyChunks + d.stopCopyChunks, 0);
    if (!rep.ok) { s.ok = false; s.error ??= 'a device did not verify'; }
  }
  return s;
}
