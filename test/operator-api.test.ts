// What an embedder observes while a migration runs: sampled progress inside one long round, device-state events,
// query-migrate-like status(), AbortError on cancel (save and load), load progress, close()/asyncDispose.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import type { Migration, MigrationProgress, MigrationStatus } from '../src/main/engine/migration.js';
import type { Loader, LoadProgress } from '../src/main/engine/load.js';
import { rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
test.after(async () => { await pool.close(); });

const MiB = 1 << 20;

/** One device whose single pre-copy round takes ~0.6 s (64 chunks of 64 KiB, 10 ms each). */
function slowDevice(name: string): EmulatedTransport {
  const d = EmulatedTransport.create({ name, stateSize: 4 * MiB, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 });
  d.device.setFault('slow-chunk', 10_000);
  return d;
}

test('progress is sampled inside a long round (not one event per round); status() follows it like query-migrate', async () => {
  const f = tmpFile('progress');
  const dev = slowDevice('p0');
  const ev: MigrationProgress[] = [];
  const statuses: MigrationStatus[] = [];
  const rounds: number[] = [];
  let mig: Migration | undefined;
  try {
    const rep = await saveDevices([dev], f, pool, { maxRounds: 1, downtimeLimitMs: 0, progressIntervalMs: 25 }, (m) => {
      mig = m;
      assert.is(m.status().status, 'none');
      m.on('progress', (p) => {
        ev.push(p);
        if (p.sample && p.phase === 'precopy') statuses.push(m.status());
      });
      m.on('round', (r) => rounds.push(r.round));
    });
    assert.equal(rounds, [1], 'one pre-copy round');
    const inRound = ev.filter((p) => p.sample && p.phase === 'precopy');
    assert.ok(inRound.length >= 5, `only ${inRound.length} sampled events during a ~600 ms round`);
    for (let i = 1; i < inRound.length; i++) assert.ok(inRound[i].bytes > inRound[i - 1].bytes, 'sampled bytes grow');
    assert.ok(inRound[0].bytes < 4 * MiB && inRound[0].bytes > 0, `first sample ${inRound[0].bytes} is mid-round`);
    assert.ok(inRound.every((p) => p.bytesPerSecond > 0), 'every sample has a rate');
    // pending_bytes is read at the round's start (state plus the vendor's own framing); between reads it is
    // estimated as that value less what went out since.
    const total = inRound[0].pending + inRound[0].bytes;
    assert.ok(total >= 4 * MiB && inRound[0].pending > 0, `pending estimated between reads: ${JSON.stringify(inRound[0])}`);
    assert.ok(inRound.every((p) => p.pending + p.bytes === total), 'estimate consistent');
    const last = ev[ev.length - 1];
    assert.is(last.sample, false);
    assert.is(last.bytes, rep.precopyBytes + rep.stopCopyBytes);
    // status() in the middle of the round: active, and transferred + remaining adds up to the device's state.
    assert.ok(statuses.length > 0);
    const mid = statuses[Math.floor(statuses.length / 2)];
    assert.is(mid.status, 'active');
    assert.ok(mid.transferredBytes > 0 && mid.remainingBytes > 0, JSON.stringify(mid));
    assert.is(mid.transferredBytes + mid.remainingBytes, total);
    assert.is(mid.devices[0].state, 'PRE_COPY');
    assert.ok(mid.bytesPerSecond > 0);
    const end = mig!.status();
    assert.is(end.status, 'completed');
    assert.is(end.remainingBytes, 0);
    assert.is(end.transferredBytes, rep.precopyBytes + rep.stopCopyBytes);
    assert.is(end.rounds, 1);
    assert.ok(end.setupTimeMs > 0 && end.totalTimeMs >= end.setupTimeMs);
    assert.ok(Math.abs(end.stopCopyMs - rep.stopCopyMs) < 1e-6, 'status stop-and-copy time is the report\'s');
    assert.is(end.devices[0].state, 'STOP');
  } finally {
    dev.destroy();
    rm(f);
  }
});

test('device-state events: PRE_COPY, STOP_COPY, STOP on the source; RESUMING, STOP, RUNNING on the destination', async () => {
  const f = tmpFile('states');
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `s${i}`, stateSize: MiB, dirtyRate: 0, dmaRate: 0, seed: i + 1 }));
  const src: Record<string, string[]> = {};
  const dst: Record<string, string[]> = {};
  let loader: Loader | undefined;
  try {
    await saveDevices(devs, f, pool, { maxRounds: 1 }, (m) => m.on('state', (e) => (src[e.device] ??= []).push(e.state)));
    const res = await loadStream(f, pool, { verify: true }, (l) => l.on('state', (e) => (dst[e.device] ??= []).push(e.state)));
    loader = res.loader;
    for (const n of ['s0', 's1']) {
      assert.equal(src[n], ['PRE_COPY', 'STOP_COPY', 'STOP'], n);
      assert.equal(dst[n], ['RESUMING', 'STOP', 'RUNNING'], n); // every destination STOP (validated, verified) before any starts
    }
    assert.is(loader.status().status, 'completed');
    assert.is(loader.status().remainingBytes, 0);
  } finally {
    for (const d of devs) d.destroy();
    await loader?.close();
    rm(f);
  }
});

test('cancel by signal rejects with an AbortError carrying the reason; the VFM code stays; device back to RUNNING', async () => {
  const f = tmpFile('abort');
  const dev = slowDevice('a0');
  const ac = new AbortController();
  const reason = new Error('operator pressed ^C');
  const states: string[] = [];
  try {
    const p = saveDevices([dev], f, pool, { maxRounds: 1, downtimeLimitMs: 0, progressIntervalMs: 20, signal: ac.signal }, (m) => {
      m.on('progress', (e) => { if (e.sample) ac.abort(reason); });
      m.on('state', (e) => states.push(e.state));
    });
    let err: unknown;
    try { await p; } catch (e) { err = e; }
    assert.instance(err, MigError);
    const e = err as MigError;
    assert.is(e.name, 'AbortError');
    assert.is(e.code, ErrorCode.CANCELLED);
    assert.is(e.cause, reason);
    assert.is((e as unknown as { report: { phase: string } }).report.phase, 'cancelled');
    assert.is(states[states.length - 1], 'RUNNING', `state events ${states.join(' ')}`);
    assert.is(dev.device.info().deviceState & 7, 1);
  } finally {
    dev.destroy();
    rm(f);
  }
});

test('load: progress events add up to the report; a signal cancels it with an AbortError and nothing runs', async () => {
  const f = tmpFile('load');
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `l${i}`, stateSize: 16 * MiB, maxChunk: 256 << 10, dirtyRate: 0, dmaRate: 0, seed: i + 7 }));
  const loaders: Loader[] = [];
  try {
    await saveDevices(devs, f, pool, { maxRounds: 1 });
    const ev: LoadProgress[] = [];
    const res = await loadStream(f, pool, { verify: true, progressIntervalMs: 1 }, (l) => { loaders.push(l); l.on('progress', (p) => ev.push(p)); });
    for (const d of res.report.devices) {
      const mine = ev.filter((p) => p.device === d.name);
      assert.ok(mine.length >= 1);
      for (let i = 1; i < mine.length; i++) assert.ok(mine[i].bytes >= mine[i - 1].bytes);
      assert.is(mine[mine.length - 1].sample, false);
      assert.is(mine[mine.length - 1].bytes, d.dataBytes);
      assert.ok(d.dataBytes >= 16 * MiB);
    }
    // Cancel as soon as the destinations are RESUMING: no record is applied after, and no destination runs.
    const ac = new AbortController();
    const reason = new Error('stop loading');
    let err: unknown;
    try {
      await loadStream(f, pool, { verify: true, signal: ac.signal }, (l) => {
        loaders.push(l);
        l.on('state', (e) => { if (e.state === 'RESUMING') ac.abort(reason); });
      });
    } catch (e) { err = e; }
    assert.instance(err, MigError);
    assert.is((err as MigError).name, 'AbortError');
    assert.is((err as MigError).code, ErrorCode.CANCELLED);
    assert.is((err as MigError).cause, reason);
    const l = loaders[1];
    assert.is(l.status().status, 'cancelled');
    for (const d of l.dests) assert.not.equal(d.stats.state, 'RUNNING');
  } finally {
    for (const d of devs) d.destroy();
    for (const l of loaders) await l.close();
    rm(f);
  }
});

test('close() and Symbol.asyncDispose release pools, devices and loaded destinations', async () => {
  const f = tmpFile('dispose');
  let id = -1;
  let destIds: EmulatedTransport[] = [];
  {
    await using own = new EnginePool({ threads: 1 });
    await using dev = EmulatedTransport.create({ name: 'd0', stateSize: MiB, dirtyRate: 0, dmaRate: 0 });
    id = dev.device.id;
    await saveDevices([dev], f, own, { maxRounds: 1 });
    await using res = (await loadStream(f, own, { verify: true })).loader;
    destIds = res.dests.map((d) => d.transport as EmulatedTransport);
    assert.is(destIds.length, 1);
    assert.is(destIds[0].device.info().deviceState & 7, 1);
  }
  // Every emulated device was destroyed at the end of the scope: its native handle is gone.
  const { native } = await import('../src/addon/native.js');
  assert.throws(() => native().emuDeviceInfo(id));
  assert.throws(() => native().emuDeviceInfo(destIds[0].device.id));
  rm(f);
});

test.run();
