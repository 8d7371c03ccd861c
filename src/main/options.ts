// Checks of API options, run before anything is opened or created: a bad option must never leave a truncated file
// or a leaked descriptor behind. Unknown keys are ignored (options grow); every known key has its type and range.
import { ErrorCode, MigError } from './errors.js';
import { checkConfigHooks } from './engine/config-hook.js';

const bad = (what: string, v: unknown, want: string) =>
  new MigError(ErrorCode.BAD_ARGUMENT, `${what}: ${describe(v)} is invalid (${want})`);

function describe(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v);
  if (typeof v === 'bigint') return `${v}n`;
  if (v === null || typeof v !== 'object') return String(v);
  return Array.isArray(v) ? 'an array' : 'an object';
}

export function optNumber(o: Record<string, unknown>, key: string, lo: number, hi: number, integer = false): void {
  const v = o[key];
  if (v === undefined) return;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
    throw bad(key, v, `${integer ? 'an integer' : 'a number'} in ${lo}..${hi}`);
  }
}

export function optBoolean(o: Record<string, unknown>, key: string): void {
  const v = o[key];
  if (v !== undefined && typeof v !== 'boolean') throw bad(key, v, 'true or false');
}

export function optFunction(o: Record<string, unknown>, key: string): void {
  const v = o[key];
  if (v !== undefined && typeof v !== 'function') throw bad(key, v, 'a function');
}

export function optSignal(o: Record<string, unknown>, key = 'signal'): void {
  const v = o[key];
  if (v !== undefined && !(v instanceof AbortSignal)) throw bad(key, v, 'an AbortSignal');
}

export function optionsObject(o: unknown, what: string): Record<string, unknown> {
  if (o === undefined) return {};
  if (o === null || typeof o !== 'object' || Array.isArray(o)) throw bad(what, o, 'an options object');
  return o as Record<string, unknown>;
}

/** MigrationOptions (engine/migration.ts). */
export function checkMigrationOptions(opts: unknown): void {
  const o = optionsObject(opts, 'migration options');
  optNumber(o, 'downtimeLimitMs', 0, 1e9);
  optNumber(o, 'maxRounds', 0, 1e6, true);
  optNumber(o, 'bandwidthCap', 0, 2 ** 53); // 0: no cap
  optNumber(o, 'dirtyQueryIntervalMs', 0, 3.6e6);
  optNumber(o, 'maxEmptyChunks', 1, 1e9, true);
  optNumber(o, 'maxNoProgress', 1, 1e9, true);
  optNumber(o, 'vendorStallMs', 1, 8.64e7);
  optNumber(o, 'lanesPerDevice', 1, 64, true);
  optNumber(o, 'progressIntervalMs', 0, 3.6e6);
  optNumber(o, 'roundBytes', 1, 2 ** 53, true);
  optNumber(o, 'roundTimeMs', 1, 8.64e7);
  optNumber(o, 'stagingChunk', 4096, 256 << 20, true);
  optNumber(o, 'memoryBudget', 1 << 20, 2 ** 53, true);
  if (o.vendorMode !== undefined && o.vendorMode !== 'compatible' && o.vendorMode !== 'strict') throw bad('vendorMode', o.vendorMode, 'compatible or strict');
  if (o.stopCopyOrder !== undefined && o.stopCopyOrder !== 'parallel' && o.stopCopyOrder !== 'sequential') throw bad('stopCopyOrder', o.stopCopyOrder, 'parallel or sequential');
  optTrappedAccess(o);
  checkConfigHooks(o.config);
  optBoolean(o, 'digests');
  optBoolean(o, 'force');
  optSignal(o);
}

/** LoadOptions (engine/load.ts). */
export function checkLoadOptions(opts: unknown): void {
  const o = optionsObject(opts, 'load options');
  optFunction(o, 'makeDestination');
  if (o.destinations !== undefined) {
    if (!Array.isArray(o.destinations) || o.destinations.some((x) => typeof x !== 'string' || !x.includes(':'))) throw bad('destinations', o.destinations, 'an array of device specs (<scheme>:<target>)');
    if (o.makeDestination !== undefined) throw bad('destinations', o.destinations, 'either destinations or makeDestination, not both');
  }
  optBoolean(o, 'verify');
  optBoolean(o, 'start');
  optNumber(o, 'maxStateBytes', 0, 2 ** 53);
  optNumber(o, 'memoryBudget', 1 << 20, 2 ** 53, true);
  optNumber(o, 'progressIntervalMs', 0, 3.6e6);
  optNumber(o, 'vendorStallMs', 1, 8.64e7);
  optTrappedAccess(o);
  checkConfigHooks(o.config);
  optSignal(o);
}

/** StressOptions and ReachedStressOptions (stress/): the loop's bounds, the seed every iteration is drawn from. */
export function checkStressOptions(opts: unknown): void {
  const o = optionsObject(opts, 'stress options');
  for (const k of ['seconds', 'seed'] as const) if (o[k] === undefined) throw bad(k, o[k], 'required');
  optNumber(o, 'seconds', 0, 8.64e5);
  optNumber(o, 'seed', 0, 2 ** 32 - 1, true);
  optNumber(o, 'count', 0, 1e9, true);
  optNumber(o, 'threads', 1, 256, true);
  optNumber(o, 'concurrent', 1, 1024, true);
  optNumber(o, 'memoryBudget', 1 << 20, 2 ** 53, true);
  if (o.vendorMode !== undefined && o.vendorMode !== 'compatible' && o.vendorMode !== 'strict') throw bad('vendorMode', o.vendorMode, 'compatible or strict');
  optBoolean(o, 'allowWithoutP2P');
  optFunction(o, 'observe');
  optFunction(o, 'onIteration');
  optSignal(o);
}

function optTrappedAccess(o: Record<string, unknown>): void {
  if (o.trappedAccess !== undefined && o.trappedAccess !== 'bulk' && o.trappedAccess !== 'aligned') throw bad('trappedAccess', o.trappedAccess, 'bulk or aligned');
}

export function checkPath(p: unknown, what: string): asserts p is string {
  if (typeof p !== 'string' || p === '' || p.includes('\0')) throw bad(what, p, 'a non-empty path');
}
