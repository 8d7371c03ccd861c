// The guest side of `npm run test:kernel`: a tiny runner whose results cross the VM boundary as JSON lines in the
// results share (one line per test as it finishes, so a guest that dies mid-run still reports what ran).
import fs from 'node:fs';
import path from 'node:path';

export interface GuestTest { name: string; fn: () => void | Promise<void> }
const tests: GuestTest[] = [];
export function test(name: string, fn: () => void | Promise<void>): void { tests.push({ name, fn }); }

export class AssertionError extends Error {}
export function assert(cond: unknown, msg: string): asserts cond {
  if (!cond) throw new AssertionError(msg);
}
export function eq<T>(actual: T, expected: T, what: string): void {
  const a = JSON.stringify(actual), e = JSON.stringify(expected);
  if (a !== e) throw new AssertionError(`${what}: expected ${e}, got ${a}`);
}
export async function rejects(f: () => unknown, check: (e: Error & Record<string, unknown>) => boolean, what: string): Promise<Error & Record<string, unknown>> {
  try {
    await f();
  } catch (e) {
    if (!check(e as Error & Record<string, unknown>)) throw new AssertionError(`${what}: wrong error: ${(e as Error).stack ?? e}`);
    return e as Error & Record<string, unknown>;
  }
  throw new AssertionError(`${what}: did not fail`);
}

export async function runAll(outDir: string, filter: string): Promise<void> {
  const out = path.join(outDir, 'results.jsonl');
  const put = (o: object) => fs.appendFileSync(out, JSON.stringify(o) + '\n');
  let passed = 0, failed = 0;
  for (const t of tests) {
    if (filter && filter !== '-' && !t.name.includes(filter)) continue;
    const t0 = performance.now();
    try {
      await t.fn();
      passed++;
      put({ name: t.name, ok: true, ms: Math.round(performance.now() - t0) });
      console.log(`VFM-GUEST: ok   ${t.name}`);
    } catch (e) {
      failed++;
      put({ name: t.name, ok: false, ms: Math.round(performance.now() - t0), error: (e as Error)?.stack ?? String(e) });
      console.log(`VFM-GUEST: FAIL ${t.name}: ${(e as Error)?.message ?? e}`);
    }
  }
  put({ done: true, passed, failed });
}
