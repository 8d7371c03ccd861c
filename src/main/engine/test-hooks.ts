// Test-only switches, kept out of the public API: they are not in src/main/index.ts, not in any options type, and
// not reachable through the package's exports. The suite imports this module by path. A hook rides on an options
// object under a module-private symbol, which no embedder's plain object can carry by accident.
import { LOCK_WORD_DISABLED, type RegionLock } from './region-lock.js';

const TEST_HOOKS = Symbol('vfio-mig test hooks');

export interface TestHooks {
  /** The worker saving this device exits while holding its region lock after this many chunks (a thread death). */
  exitAfterChunks?: { device: number; chunks: number };
}

/** `opts` plus test hooks (for saveDevices / new Migration). */
export function withTestHooks<T extends object>(opts: T, hooks: TestHooks): T {
  return { ...opts, [TEST_HOOKS]: hooks };
}

/** The hooks riding on `opts`, if a test put any there. */
export function testHooks(opts: object): TestHooks | undefined {
  return (opts as { [TEST_HOOKS]?: TestHooks })[TEST_HOOKS];
}

/** Run `lock` without mutual exclusion, to show the corruption it prevents (test/lock.test.ts). */
export function disableRegionLock(lock: RegionLock, off: boolean): void {
  Atomics.store(new Int32Array(lock.buffer), lock.index + LOCK_WORD_DISABLED, off ? 1 : 0);
}
