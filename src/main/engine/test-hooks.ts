// Test-only switches, kept out of the public API: they are not in src/main/index.ts, not in any options type, and
// not reachable through the package's exports. The suite imports this module by path. A hook rides on an options
// object under a module-private symbol, which no embedder's plain object can carry by accident.
import { LOCK_WORD_DISABLED, type RegionLock } from './region-lock.js';
import { native } from '../../addon/native.js';

const TEST_HOOKS = Symbol('vfio-mig test hooks');

export interface TestHooks {
  /** The worker saving this device exits while holding its region lock after this many chunks (a thread death). */
  exitAfterChunks?: { device: number; chunks: number };
  /**
   * EnginePool: its workers and the loads it runs behave as on a CPU without SSE4.2 (library CRC32C, no zero-copy
   * record write or read: every chunk goes through a staging slot), so that path is tested where SSE4.2 exists.
   */
  noSse42?: boolean;
  /** A live receiver that never sends SWITCHOVER_ACK (the source's ack timeout). */
  withholdSwitchoverAck?: boolean;
}

/** `opts` plus test hooks (for saveDevices / new Migration / new Receiver). */
export function withTestHooks<T extends object>(opts: T, hooks: TestHooks): T {
  return { ...opts, [TEST_HOOKS]: hooks };
}

/** The hooks riding on `opts`, if a test put any there. */
export function testHooks(opts: object): TestHooks | undefined {
  return (opts as { [TEST_HOOKS]?: TestHooks })[TEST_HOOKS];
}

const noSse42Pools = new WeakSet<object>();

/** Mark a pool created with the noSse42 hook (the loader then never plans zero-copy loads on it). */
export function markNoSse42(pool: object): void { noSse42Pools.add(pool); }

/** Whether `pool` was created with the noSse42 hook. */
export function noSse42(pool: object): boolean { return noSse42Pools.has(pool); }

/** Run `lock` without mutual exclusion, to show the corruption it prevents (test/lock.test.ts). */
export function disableRegionLock(lock: RegionLock, off: boolean): void {
  Atomics.store(new Int32Array(lock.buffer), lock.index + LOCK_WORD_DISABLED, off ? 1 : 0);
}

/**
 * The emulated vendor refuses trapped data accesses that are not naturally aligned 1, 2, 4 or 8-byte ones, as a
 * driver only ever driven by QEMU's vfio_mig_rw may (test/trapped-access.test.ts): a strictness knob of the emulated
 * device that is not part of its public options or fault kinds.
 */
export function strictTrappedAccess(deviceId: number, on: boolean): void {
  native().emuSetStrictTrapped(deviceId, on);
}
