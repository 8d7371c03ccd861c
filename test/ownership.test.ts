// Who may touch a device (issue 7 §4): one active migration or load per device, refused before anything is touched;
// rollback resets and retries and says how it ended (typed); rollback waits for every device's phase; a destination
// never runs before it is complete and verified, and an embedder can start loaded devices itself.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { onTrace } from '../src/main/trace.js';
import type { Loader } from '../src/main/engine/load.js';
import { Migration, type MigrationReport } from '../src/main/engine/migration.js';
import { ContainerWriter } from '../src/main/container/writer.js';
import type { Sink } from '../src/main/container/sink.js';
import { RollbackOutcome } from '../src/main/engine/source-device.js';
import { readRecords, writeRecords } from './craft.js';
import { rejectsCode, rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
test.after(async () => { await pool.close(); });

const small = { stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, guestPages: 64 };
const running = (t: EmulatedTransport) => (t.device.info().deviceState & 7) === 1;
const reportOf = (e: unknown) => (e as { report: MigrationReport }).report;

test('a device in an active migration: a second migration is refused before it touches anything, and the first completes', async () => {
  const [fa, fb] = [tmpFile('own-a'), tmpFile('own-b')];
  const a = EmulatedTransport.create({ name: 'busyA', seed: 5, ...small });
  const b = EmulatedTransport.create({ name: 'freeB', seed: 6, ...small });
  a.device.setFault('slow-chunk', 20_000); // the first migration is still in pre-copy when the second one starts
  let loader: Loader | undefined;
  try {
    const first = saveDevices([a], fa, pool, { maxRounds: 1 });
    first.catch(() => undefined); // awaited below; a failure must fail the assertions, not crash the runner
    // Until A is in PRE-COPY (not a fixed delay: a busy machine may take longer to get there).
    for (let t0 = Date.now(); (a.device.info().deviceState & 7) !== 3 && Date.now() - t0 < 20_000;) await new Promise((r) => setTimeout(r, 5));
    assert.is(a.device.info().deviceState & 7, 3, 'A is in PRE-COPY for the first migration');
    const e = await rejectsCode(saveDevices([b, a], fb, pool, { maxRounds: 1 }), ErrorCode.DEVICE_BUSY);
    assert.is(e.device, 'busyA');
    // B was free but the refused migration took nothing: never set to saving, never staged, never rolled back.
    assert.ok(running(b));
    assert.is(b.device.info().chunksStaged, 0);
    assert.is(a.device.info().deviceState & 7, 3, 'the refused migration did not roll A back');
    a.device.clearFault();
    const r = await first;
    assert.ok(r.ok);
    const res = await loadStream(fa, pool, { verify: true });
    loader = res.loader;
    assert.is(res.report.devices[0].verified, true);
    // Released on completion: A (and B) can be migrated again.
    const again = await saveDevices([b, a], fb, pool, { maxRounds: 0 });
    assert.ok(again.ok);
  } finally {
    a.destroy(); b.destroy();
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
    rm(fa, fb);
  }
});

test('the same device twice in one migration, or as a load destination while it is being saved, is refused', async () => {
  const [f1, f2, f3] = [tmpFile('twice'), tmpFile('ld-src'), tmpFile('ld-busy')];
  const a = EmulatedTransport.create({ name: 'twiceA', ...small });
  const alias = new EmulatedTransport(a.device); // a second transport of the same device
  let loader: Loader | undefined;
  try {
    const e = await rejectsCode(saveDevices([a, alias], f1, pool, { maxRounds: 0 }), ErrorCode.DEVICE_BUSY);
    assert.match(e.message, /listed twice/);
    assert.ok(running(a));
    // A stream to load, and a load whose destination is a device an active migration holds.
    const src = EmulatedTransport.create({ name: 'twiceA', ...small });
    await saveDevices([src], f2, pool, { maxRounds: 0 });
    src.destroy();
    a.device.setFault('slow-chunk', 20_000);
    const saving = saveDevices([a], f3, pool, { maxRounds: 1 });
    saving.catch(() => undefined);
    await new Promise((r) => setTimeout(r, 50));
    const le = await rejectsCode(loadStream(f2, pool, { makeDestination: () => alias }), ErrorCode.DEVICE_BUSY);
    loader = (le as unknown as { loader: Loader }).loader;
    assert.is(loader.dests.length, 0, 'the refused load took no destination');
    assert.is(a.device.info().deviceState & 7, 3, 'the refused load did not touch the device');
    a.device.clearFault();
    assert.ok((await saving).ok);
  } finally {
    a.destroy();
    rm(f1, f2, f3);
  }
});

/** Two sources: rb0 fails (eio-on-chunk 2) unless `rb1fails`, rb1 carries `fault`. Returns the error and the report. */
async function failWith(fault: [string, number], rb1fails = false) {
  const f = tmpFile('rb');
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `rb${i}`, ...small }));
  if (!rb1fails) devs[0].device.setFault('eio-on-chunk', 2);
  devs[1].device.setFault(...fault);
  try {
    const e = await rejectsCode(saveDevices(devs, f, pool, { maxRounds: 2 }), ErrorCode.NATIVE);
    return { e, rep: reportOf(e), devs: devs.map((d) => ({ running: running(d), state: d.device.info().deviceState & 7 })) };
  } finally {
    for (const d of devs) d.destroy();
    rm(f);
  }
}

test('rollback: writing RUNNING fails -> reset and retry; the outcome is typed', async () => {
  const r = await failWith(['fail-transition', 1]); // every write of RUNNING fails EIO on rb1
  assert.is(r.e.code, ErrorCode.NATIVE, 'the first failure stays the error');
  assert.is(r.e.device, 'rb0');
  assert.ok(r.devs.every((d) => d.running), 'both RUNNING');
  const [r0, r1] = r.rep.rollback!;
  assert.is(r0.outcome, RollbackOutcome.RESUMED);
  assert.is(r1.outcome, RollbackOutcome.RESET);
  assert.is(r1.from, 'PRE_COPY');
  assert.match(r1.detail, /writing RUNNING failed \(VFM_TRANSITION_FAILED\)/);
});

test('rollback: writing RUNNING lands in ERROR -> reset and retry', async () => {
  const r = await failWith(['error-on-transition', 1]);
  assert.ok(r.devs.every((d) => d.running));
  assert.is(r.rep.rollback![1].outcome, RollbackOutcome.RESET);
  assert.match(r.rep.rollback![1].detail, /VFM_DEVICE_ERROR_STATE/);
});

test('rollback: a device still not RUNNING after reset and retry is a typed error (VFM_ROLLBACK_FAILED), not a string', async () => {
  const r = await failWith(['wedged', 1], true); // rb1 wedges (and so fails the migration) at its second chunk
  assert.instance(r.e, MigError);
  assert.is(r.e.code, ErrorCode.NATIVE, 'the first failure keeps its code');
  assert.is(r.e.device, 'rb1');
  assert.match(r.e.message, /NOT RUNNING after rollback: rb1: not RUNNING after rollback \(reset and retry failed\)/);
  const rb = r.rep.rollback!;
  assert.is(rb[1].outcome, RollbackOutcome.FAILED);
  assert.instance(rb[1].error, MigError);
  assert.is(rb[1].error!.code, ErrorCode.ROLLBACK_FAILED);
  assert.is(rb[1].error!.device, 'rb1');
  assert.is(rb[0].outcome, RollbackOutcome.RESUMED);
  assert.is(r.devs[1].running, false);
  assert.ok(r.devs[0].running);
});

test('rollback waits for every device\'s phase to settle before touching any device (deterministic)', async () => {
  // wt1 finishes its stop-and-copy data and is held inside the write of its closing [END] (a sink the test gates);
  // then wt0 fails. Rollback must not begin until wt1's phase has settled, which it can only do once the test opens
  // the gate, 200 ms after wt0's phase settled: whatever the timing, every rollback trace must come after that.
  // The order does not depend on scheduling: wt0's stop-and-copy records wait in the sink until wt1 is held, so wt0
  // can neither finish nor fail first.
  const devs = [EmulatedTransport.create({ name: 'wt0', ...small, stateSize: 16 << 20 }), EmulatedTransport.create({ name: 'wt1', ...small })];
  let open!: () => void;
  const gate = new Promise<void>((r) => { open = r; });
  let wt1Held!: () => void;
  const held1 = new Promise<void>((r) => { wt1Held = r; });
  let held = false;
  let stopcopy = false;
  const sink: Sink = {
    bytes: 0,
    async write(b: Uint8Array) {
      const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
      const chunkOf = (dev: number) => b.length >= 32 && dv.getUint32(0, true) === 2 && dv.getUint32(8, true) === dev;
      // wt1's stop-and-copy [END]: a CHUNK record (type 2) of device 1 whose body is 8 bytes.
      if (stopcopy && chunkOf(1) && b.length === 40 && dv.getUint32(4, true) === 8 && !held) {
        held = true;
        const at = devs[0].device.info().chunksStaged;
        devs[0].device.setFault('eio-on-chunk', at + 1); // wt0 is still draining 16 MiB: it fails at its next chunk
        wt1Held();
        await gate;
      } else if (stopcopy && chunkOf(0) && !held) {
        await held1;
      }
      (this as { bytes: number }).bytes += b.length;
    },
    async close() { /* nothing kept */ },
  };
  const seen: string[] = [];
  const off = onTrace((ev, f) => {
    if (ev === 'vfio_device_rollback' || (ev === 'vfio_device_op_settled' && f.phase === 'stopcopy')) seen.push(`${ev}:${String(f.device)}`);
    if (ev === 'vfio_device_op_settled' && f.device === 'wt0' && f.phase === 'stopcopy' && held) setTimeout(() => { seen.push('gate'); open(); }, 200);
  });
  // Never a hang: should wt0 not settle at all, the gate opens anyway and the order assertions below fail.
  const fallback = setTimeout(() => { seen.push('gate-timeout'); open(); }, 30_000);
  try {
    const m = new Migration(devs, pool, new ContainerWriter(sink), { maxRounds: 0 });
    m.on('phase', (_from, to) => { if (to === 'stopcopy') stopcopy = true; });
    await rejectsCode(m.run(), ErrorCode.NATIVE);
    assert.ok(held, 'wt1 reached its [END] write while wt0 was still draining');
    const firstRollback = seen.findIndex((x) => x.startsWith('vfio_device_rollback'));
    const settled = seen.indexOf('vfio_device_op_settled:wt1');
    const gateAt = seen.indexOf('gate');
    assert.ok(firstRollback >= 0, seen.join(' '));
    assert.ok(gateAt >= 0 && gateAt < settled && settled < firstRollback, `rollback began before wt1's stop-and-copy settled: ${seen.join(' ')}`);
    for (const d of devs) assert.ok(running(d));
  } finally {
    clearTimeout(fallback);
    off();
    open();
    wt1Held();
    for (const d of devs) d.destroy();
  }
});

/** A saved stream of two devices. */
async function saved(tag: string): Promise<string> {
  const f = tmpFile(tag);
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `ld${i}`, seed: 20 + i, ...small }));
  try {
    await saveDevices(devs, f, pool, { maxRounds: 1 });
  } finally {
    for (const d of devs) d.destroy();
  }
  return f;
}

test('a destination whose digest does not match never runs: verified while stopped, never started', async () => {
  const f = await saved('badsum');
  const { header, recs } = readRecords(f);
  const end = recs[recs.length - 1];
  const body = JSON.parse(Buffer.from(end.body).toString());
  body.devices[1].digest = 'sha256:' + '0'.repeat(64);
  end.body = new Uint8Array(Buffer.from(JSON.stringify(body)));
  writeRecords(f, header, recs);
  let loader: Loader | undefined;
  try {
    const p = loadStream(f, pool, { verify: true });
    const e = await rejectsCode(p, ErrorCode.VERIFY_FAILED);
    loader = (e as unknown as { loader: Loader }).loader;
    assert.is(e.device, 'ld1');
    assert.equal(loader.dests.map((d) => d.stats.state), ['STOP', 'STOP'], 'validated by the vendor, never started');
    assert.equal(loader.dests.map((d) => (d.transport as EmulatedTransport).device.info().deviceState & 7), [0, 0]);
    assert.equal(loader.dests.map((d) => (d.transport as EmulatedTransport).device.info().workloadWrites), [0, 0]);
  } finally {
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
    rm(f);
  }
});

test('a destination never reaches RUNNING before it is verified (state events in order)', async () => {
  const f = await saved('order');
  const seen: string[] = [];
  let loader: Loader | undefined;
  try {
    const { Loader: L } = await import('../src/main/engine/load.js');
    loader = new L(f, pool, { verify: true });
    loader.on('state', (s) => seen.push(`${s.device}:${s.state}:${loader!.dests.find((d) => d.entry.name === s.device)?.stats.verified}`));
    await loader.run();
    assert.equal(seen, ['ld0:RESUMING:null', 'ld1:RESUMING:null', 'ld0:STOP:null', 'ld1:STOP:null', 'ld0:RUNNING:true', 'ld1:RUNNING:true']);
  } finally {
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
    rm(f);
  }
});

test('start: false keeps loaded devices ready but not running; Loader.start() starts them; a failed load cannot', async () => {
  const f = await saved('manual');
  let loader: Loader | undefined;
  try {
    const res = await loadStream(f, pool, { verify: true, start: false });
    loader = res.loader;
    assert.ok(res.report.devices.every((d) => d.verified === true && d.state === 'STOP'));
    assert.equal(loader.dests.map((d) => (d.transport as EmulatedTransport).device.info().deviceState & 7), [0, 0]);
    await loader.start();
    assert.equal(loader.dests.map((d) => (d.transport as EmulatedTransport).device.info().deviceState & 7), [1, 1]);
    assert.ok(loader.dests.every((d) => d.stats.state === 'RUNNING'));
  } finally {
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
  }
  // A load that failed refuses start().
  const { header, recs } = readRecords(f);
  writeRecords(f, header, recs.slice(0, -1));
  try {
    const e = await rejectsCode(loadStream(f, pool, { start: false }), ErrorCode.STREAM_TRUNCATED);
    loader = (e as unknown as { loader: Loader }).loader;
    await rejectsCode(loader.start(), ErrorCode.BAD_STATE);
    // Neither left RESUMING nor started: reset (what they loaded discarded) and stopped.
    assert.equal(loader.dests.map((d) => (d.transport as EmulatedTransport).device.info().deviceState & 7), [0, 0]);
    assert.ok(loader.dests.every((d) => d.stats.state === 'reset (state discarded), STOP'));
  } finally {
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
    rm(f);
  }
});

test.run();
