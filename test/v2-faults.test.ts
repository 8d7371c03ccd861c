// The emulated v2 vendor's fault kinds (addon/src/emu/v2.cc), each through the engine: the specific VFM_ code, the
// device named, every source RUNNING again after a failed save, a destination that failed a load reset (never left
// RESUMING, never started); and the fd data path's STOP_COPY stall bound. v2 implements fail-transition,
// error-on-transition, stuck, eio-on-chunk and slow-chunk (slow-chunk: test/v2-engine.test.ts stress and
// test/vendor.test.ts for v1); the v1 register faults are refused on a v2 device.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool, Migration, Loader, ContainerWriter, FileSink, ErrorCode, MigError } from '../src/main/index.js';
import { emulatedV2, destroyEmulated, emulatedV2Destination, type EmulatedV2Ops } from '../src/main/reach/emulated/v2.js';
import type { V2Device } from '../src/main/protocol/v2/device.js';
import type { MigrationOptions } from '../src/main/engine/migration.js';
import { rm, tmpFile, rejectsCode } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
const V2 = { stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, guestPages: 64 };
/** enum vfio_device_mig_state: the fault argument of the transition faults is the arc's target state. */
const S = { STOP: 1, RUNNING: 2, STOP_COPY: 3, RESUMING: 4, RUNNING_P2P: 5, PRE_COPY: 6, PRE_COPY_P2P: 7 } as const;

const sink = (file: string) => new ContainerWriter(FileSink.open(file, { force: true }));
const emu = (d: V2Device) => (d.ops as EmulatedV2Ops).device;

/** Two v2 sources (fault on the second, `f1`), saved with `opts`: the failure, and both sources after it. */
async function failedSave(fault: [string, number], opts: MigrationOptions, setup?: (d: V2Device) => void, migFlags = 7) {
  const file = tmpFile('v2fault');
  const devs = [0, 1].map((i) => emulatedV2({ ...V2, name: `f${i}`, seed: 40 + i, migFlags }));
  emu(devs[1]!).setFault(...fault);
  setup?.(devs[1]!);
  try {
    const m = new Migration(devs, pool, sink(file), { signal: AbortSignal.timeout(60_000), ...opts });
    const e = await rejectsCode(m.run(), Object.values(ErrorCode));
    await m.settled;
    return { e, states: devs.map((d) => d.state()), vendor: emu(devs[1]!).info().lastError };
  } finally {
    devs.forEach(destroyEmulated);
    rm(file);
  }
}

test('v2 fail-transition: the vendor refuses an arc (PRE_COPY_P2P, STOP_COPY; RUNNING_P2P without PRE_COPY): VFM_TRANSITION_FAILED naming the arc and device; both sources RUNNING', async () => {
  // migFlags 3 = STOP_COPY | P2P: no pre-copy, so the quiescing arc is RUNNING -> RUNNING_P2P.
  for (const [state, flags] of [[S.PRE_COPY_P2P, 7], [S.STOP_COPY, 7], [S.RUNNING_P2P, 3], [S.STOP_COPY, 1]] as const) {
    const r = await failedSave(['fail-transition', state], { maxRounds: 2, allowWithoutP2P: flags === 1 }, undefined, flags);
    assert.is(r.e.code, ErrorCode.TRANSITION_FAILED, `${state}: ${r.e.message}`);
    assert.is(r.e.device, 'f1');
    const name = Object.entries(S).find(([, v]) => v === state)![0];
    assert.match(r.e.message, new RegExp(`-> ${name}\\b`));
    assert.match(r.e.message, /injected fault/, 'the vendor\'s reason is carried');
    assert.equal(r.states, ['RUNNING', 'RUNNING'], `after a refused arc to ${name}`);
  }
});

test('v2 error-on-transition: an arc puts the device in ERROR: VFM_DEVICE_ERROR_STATE naming it; it is reset back to RUNNING, the other resumed', async () => {
  for (const state of [S.PRE_COPY_P2P, S.STOP_COPY]) {
    const r = await failedSave(['error-on-transition', state], { maxRounds: 2 });
    assert.is(r.e.code, ErrorCode.DEVICE_ERROR_STATE, r.e.message);
    assert.is(r.e.device, 'f1');
    assert.match(r.e.message, /ERROR/);
    assert.equal(r.states, ['RUNNING', 'RUNNING']);
  }
});

test('v2 stuck in STOP_COPY: the fd path\'s stall bound fails it with VFM_VENDOR_STUCK naming the device; both sources RUNNING', async () => {
  // Two fills, then the vendor never produces again nor ends the stream: without the bound the read waits forever
  // (the 60 s signal turns that into a CANCELLED failure here, not a hang).
  const r = await failedSave(['stuck', 2], { maxRounds: 0 }, (d) => { (d.ops as EmulatedV2Ops).stallMs = 300; });
  assert.is(r.e.code, ErrorCode.VENDOR_STUCK, r.e.message);
  assert.is(r.e.device, 'f1');
  assert.match(r.e.message, /no data from the data fd for 300 ms in STOP_COPY/);
  assert.equal(r.states, ['RUNNING', 'RUNNING']);
});

test('v2 stuck in pre-copy is "nothing more for now", not an error: only the STOP_COPY that follows is bounded', async () => {
  const r = await failedSave(['stuck', 1], { maxRounds: 3, downtimeLimitMs: 0 }, (d) => { (d.ops as EmulatedV2Ops).stallMs = 300; });
  assert.is(r.e.code, ErrorCode.VENDOR_STUCK, r.e.message);
  assert.match(r.e.message, /in STOP_COPY/);
  assert.equal(r.states, ['RUNNING', 'RUNNING']);
});

test('v2 eio-on-chunk: the vendor cuts its stream and falls into ERROR: the source fails naming it (never a torn stream passed as saved), both sources RUNNING, the stream ends in ABORT', async () => {
  // Chunk 3 is cut while the arc to PRE_COPY prepares data; chunk 12 while the engine reads in STOP_COPY.
  for (const chunk of [3, 12]) await eioOnChunk(chunk);
});

async function eioOnChunk(chunk: number) {
  const file = tmpFile('v2eio');
  const devs = [0, 1].map((i) => emulatedV2({ ...V2, name: `c${i}`, seed: 50 + i }));
  emu(devs[1]!).setFault('eio-on-chunk', chunk);
  let loader: Loader | undefined;
  try {
    // The source sees the stream end early (a pipe cannot say EIO); the device's ERROR state says it was no end.
    const m = new Migration(devs, pool, sink(file), { maxRounds: 0 });
    const e = await rejectsCode(m.run(), [ErrorCode.DEVICE_ERROR_STATE, ErrorCode.TRANSITION_FAILED]);
    await m.settled;
    assert.is(e.device, 'c1', e.message);
    assert.match(e.message, /ERROR/);
    assert.match(e.message, new RegExp(`injected fault: saving chunk ${chunk} failed, stream cut, device in ERROR`), `the vendor's reason is carried: ${e.message}`);
    assert.equal(devs.map((d) => d.state()), ['RUNNING', 'RUNNING'], 'the failed device reset and resumed, the other resumed');
    loader = new Loader(file, pool);
    const a = await rejectsCode(loader.run(), ErrorCode.STREAM_ABORTED);
    assert.is(a.device, 'c1');
    for (const d of loader.dests) assert.is.not(await d.dev.state(), 'RUNNING', `${d.entry.name} not started`);
  } finally {
    devs.forEach(destroyEmulated);
    await loader?.close();
    rm(file);
  }
}

test('vendorStallMs: the public stall bound fails a kernel-like fd that stops giving data in STOP_COPY (no reach hook), naming the device', async () => {
  // 'stuck' after two fills: the fd neither gives data nor ends. The reach's own default (30 s) is not used.
  const r = await failedSave(['stuck', 2], { maxRounds: 0, vendorStallMs: 250 });
  assert.is(r.e.code, ErrorCode.VENDOR_STUCK, r.e.message);
  assert.is(r.e.device, 'f1');
  assert.match(r.e.message, /no data from the data fd for 250 ms in STOP_COPY/);
  assert.equal(r.states, ['RUNNING', 'RUNNING']);
});

/** Save two fault-free v2 sources; load into destinations made by `make` (fault set there). */
async function failedLoad(fault: [string, number]) {
  const file = tmpFile('v2dfault');
  const devs = [0, 1].map((i) => emulatedV2({ ...V2, name: `d${i}`, seed: 60 + i }));
  const dests: V2Device[] = [];
  let loader: Loader | undefined;
  try {
    await new Migration(devs, pool, sink(file), { maxRounds: 1 }).run();
    loader = new Loader(file, pool, {
      verify: true,
      makeDestination: (e) => {
        const d = emulatedV2Destination(e);
        if (e.index === 1) emu(d).setFault(...fault);
        dests.push(d);
        return d;
      },
    });
    const e = await rejectsCode(loader.run(), Object.values(ErrorCode));
    return { e, states: dests.map((d) => d.state()), stats: loader.dests.map((d) => d.stats.state) };
  } finally {
    devs.forEach(destroyEmulated);
    dests.forEach(destroyEmulated);
    rm(file);
  }
}

test('v2 destination faults: RESUMING refused (VFM_TRANSITION_FAILED), ERROR on RESUMING -> STOP (VFM_DEVICE_ERROR_STATE): named, reset, nothing started', async () => {
  const a = await failedLoad(['fail-transition', S.RESUMING]);
  assert.is(a.e.code, ErrorCode.TRANSITION_FAILED, a.e.message);
  assert.is(a.e.device, 'd1');
  assert.match(a.e.message, /-> RESUMING/);
  assert.ok(a.states.every((s) => s !== 'RESUMING'), `no destination left RESUMING: ${a.states}`);
  const b = await failedLoad(['error-on-transition', S.STOP]);
  assert.is(b.e.code, ErrorCode.DEVICE_ERROR_STATE, b.e.message);
  assert.is(b.e.device, 'd1');
  // Its STOP fails into ERROR even after the reset: reset again, left in the reset state (nothing loaded), not ERROR.
  assert.is(b.states[1], 'RUNNING', 'reset out of ERROR');
  assert.match(b.stats[1]!, /^reset \(state discarded\), RUNNING \(STOP refused: /);
  assert.ok(b.states.every((s) => s !== 'RESUMING' && s !== 'ERROR'), `${b.states}`);
  assert.not.equal(b.stats[0], 'RUNNING', 'the good destination was not started');
});

test('v1 register faults have no v2 meaning: setting one on a v2 device is refused, naming the device', () => {
  const d = emulatedV2({ ...V2, name: 'nofault' });
  try {
    for (const k of ['bad-data-offset', 'huge-data-offset', 'bad-data-size', 'bad-copied-pfns', 'over-estimate', 'upper-bound-pending', 'wedged']) {
      assert.throws(() => emu(d).setFault(k, 1), (e: MigError) => e.code === ErrorCode.BAD_ARGUMENT && e.device === 'nofault' && e.message.includes(k), k);
    }
    for (const k of ['fail-transition', 'error-on-transition', 'stuck', 'eio-on-chunk', 'slow-chunk']) emu(d).setFault(k, 1);
  } finally {
    destroyEmulated(d);
  }
});

test.after(async () => { await pool.close(); });
test.run();
