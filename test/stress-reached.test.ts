// stress of named devices (src/main/stress/reached.ts, `stress --device`): the same devices saved and loaded again and
// again, one way or the other, verified by digest where the device has one and always by the fixed point (a device's
// saved data bytes equal the first iteration's). Emulated devices stand in for kernel ones here; the kernel guest
// test (test/kernel/engine.guest.ts) runs it on mtty through the CLI.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { emulatedV2, destroyEmulated, type EmulatedV2Ops } from '../src/main/reach/emulated/v2.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { stressReached, reachedPlan, deviceDataDigests, type ReachedIteration } from '../src/main/stress/reached.js';
import { EnginePool, Migration, ContainerWriter, FileSink, ErrorCode } from '../src/main/index.js';
import { rm, tmpFile } from './helpers.js';

const V2 = { stateSize: 256 << 10, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, guestPages: 64 };

test('ping-pong between two pairs of v2 devices: every iteration verifies (digest and fixed point), both directions, grouped and per pair; all RUNNING after', async () => {
  const a = [0, 1].map((i) => emulatedV2({ ...V2, name: `a${i}`, seed: 70 + i }));
  const b = [0, 1].map((i) => emulatedV2({ ...V2, name: `b${i}`, zeroFill: true }));
  const its: ReachedIteration[] = [];
  try {
    const s = await stressReached({ sources: a, dests: b, seconds: 600, count: 8, seed: 5, threads: 2, onIteration: (it) => its.push(it) });
    assert.is(s.failures, 0, JSON.stringify(s.failed));
    assert.is(s.iterations, 8);
    assert.ok(its.every((it) => it.verifiedBy.every((v) => v === 'digest')));
    assert.equal(new Set(its.map((it) => it.direction)), new Set(['a-to-b', 'b-to-a']), 'both directions drawn');
    assert.ok(its.some((it) => it.migrations === 1) && its.some((it) => it.migrations === 2), 'grouped and per-pair iterations');
    assert.ok(s.bytes > 8 * 2 * (256 << 10), `${s.bytes} bytes moved`);
    for (const d of [...a, ...b]) assert.is(d.state(), 'RUNNING', d.name);
  } finally {
    [...a, ...b].forEach(destroyEmulated);
  }
});

test('self mode (no partner): a v1 device saved and loaded back into itself, verified each time', async () => {
  const d = EmulatedTransport.create({ name: 'self', profile: 'linux-5.8', stateSize: 256 << 10, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, seed: 3 });
  try {
    const its: ReachedIteration[] = [];
    const s = await stressReached({ sources: [d], seconds: 600, count: 3, seed: 9, threads: 2, onIteration: (it) => its.push(it) });
    assert.is(s.failures, 0, JSON.stringify(s.failed));
    assert.equal(its.map((it) => it.direction), ['self', 'self', 'self']);
    assert.is(d.device.info().deviceState & 7, 1, 'RUNNING');
  } finally {
    d.destroy();
  }
});

test('the fixed point catches a device whose saved state changed between iterations (named, with the seed to replay)', async () => {
  // A running workload changes the source's state between iterations: each load verifies by digest, but the
  // device's saved data bytes are not those of the first iteration any more.
  const a = emulatedV2({ ...V2, name: 'busy', seed: 4, dirtyRate: 20000 });
  const b = emulatedV2({ ...V2, name: 'partner', zeroFill: true });
  try {
    const s = await stressReached({ sources: [a], dests: [b], seconds: 600, count: 3, seed: 2, threads: 2 });
    assert.ok(s.failures >= 1, 'a failure');
    assert.match(s.failed[0]!.error!, /(busy|partner): its saved device state \(sha256 [0-9a-f]{16}\) differs from the first iteration's/);
    assert.type(s.failed[0]!.seed, 'number');
  } finally {
    destroyEmulated(a);
    destroyEmulated(b);
  }
});

test('a destination that refuses the stream fails the iteration with its code and name; the sources run again', async () => {
  const a = emulatedV2({ ...V2, name: 'src', seed: 8 });
  const b = emulatedV2({ ...V2, name: 'dst', zeroFill: true });
  (b.ops as EmulatedV2Ops).device.setFault('fail-transition', 4); // RESUMING
  (a.ops as EmulatedV2Ops).device.setFault('fail-transition', 4);
  try {
    const s = await stressReached({ sources: [a], dests: [b], seconds: 600, count: 2, seed: 1, threads: 2 });
    assert.is(s.failures, 2);
    for (const it of s.failed) assert.match(it.error!, new RegExp(`^${ErrorCode.TRANSITION_FAILED}: (src|dst):`));
    for (const d of [a, b]) assert.is(d.state(), 'RUNNING', d.name);
  } finally {
    destroyEmulated(a);
    destroyEmulated(b);
  }
});

test('plans are a function of the seed; device data digests ignore how the stream was cut', async () => {
  assert.equal(reachedPlan(123, 2, true), reachedPlan(123, 2, true));
  const pool = new EnginePool({ threads: 2 });
  const d = emulatedV2({ ...V2, name: 'cut', seed: 12 });
  const f1 = tmpFile('cut1'), f2 = tmpFile('cut2');
  try {
    await new Migration([d], pool, new ContainerWriter(FileSink.open(f1, { force: true })), { maxRounds: 0, stagingChunk: 4096 }).run();
    d.setState('RUNNING');
    await new Migration([d], pool, new ContainerWriter(FileSink.open(f2, { force: true })), { maxRounds: 3, stagingChunk: 1 << 20 }).run();
    const [x, y] = [await deviceDataDigests(f1), await deviceDataDigests(f2)];
    assert.equal(x, y);
    assert.is(x[0]!.length, 64);
  } finally {
    destroyEmulated(d);
    rm(f1, f2);
    await pool.close();
  }
});


test('the package exports both stresses; bad options are VFM_BAD_ARGUMENT before any device is touched or a pool made', async () => {
  const api = await import('../src/main/index.js');
  const d = emulatedV2({ ...V2, name: 'opt', seed: 1 });
  try {
    const bad: [string, Record<string, unknown>][] = [
      ['seconds', { seconds: -1, seed: 1 }], ['seconds', { seconds: Number.NaN, seed: 1 }], ['seed', { seconds: 1 }],
      ['seed', { seconds: 1, seed: 'x' }], ['count', { seconds: 1, seed: 1, count: 1.5 }], ['threads', { seconds: 1, seed: 1, threads: 0 }],
      ['vendorMode', { seconds: 1, seed: 1, vendorMode: 'lax' }], ['onIteration', { seconds: 1, seed: 1, onIteration: 3 }],
    ];
    for (const [key, o] of bad) {
      for (const run of [() => api.stressReached({ sources: [d], ...o } as never), () => api.stress(o as never)]) {
        const e = await run().then(() => null, (x) => x);
        assert.ok(api.isMigError(e), `${key}: ${String(e)}`);
        assert.is(e.code, ErrorCode.BAD_ARGUMENT, `${key}: ${e.message}`);
        assert.match(e.message, new RegExp(`^${key}:`), e.message);
      }
    }
    const e = await api.stressReached({ sources: 'opt' as never, seconds: 1, seed: 1 }).then(() => null, (x) => x);
    assert.is(e?.code, ErrorCode.BAD_ARGUMENT);
    assert.is(d.state(), 'RUNNING', 'never touched');
    const s = await api.stressReached({ sources: [d], seconds: 600, count: 1, seed: 2, threads: 1 });
    assert.is(s.iterations, 1);
    assert.is(s.failures, 0, JSON.stringify(s.failed));
  } finally {
    destroyEmulated(d);
  }
});

test.run();
