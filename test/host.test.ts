// The host survives many devices and slow vendors: emulated devices share a small workload pool and one guest RAM
// allocated on demand (issue 7 §2.2); cancel never waits for a stalled vendor call (§2.4).
import fs from 'node:fs';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { native } from '../src/addon/native.js';
import { EmulatedDevice } from '../src/main/emulated/device.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { Migration, type MigrationReport } from '../src/main/engine/migration.js';
import { ContainerWriter } from '../src/main/container/writer.js';
import { FileSink } from '../src/main/container/sink.js';
import { inspectContainer } from '../src/main/container/inspect.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { OWNER_WORKER } from '../src/main/engine/region-lock.js';
import { ErrorCode } from '../src/main/errors.js';
import type { ProfileName } from '../src/main/protocol/profiles.js';
import { MigrationRegion } from '../src/main/protocol/migration-region.js';
import { loadStream, runEmulated, saveDevices } from '../src/main/api.js';
import { admitEmulated } from '../src/main/engine/budget.js';
import { readRecords, writeRecords } from './craft.js';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { rejectsCode, rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
test.after(async () => { await pool.close(); });

const status = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('128 devices with a workload share at most 4 pool threads, and every device runs its workload', async () => {
  const before = status('Threads');
  const devs = Array.from({ length: 128 }, (_, i) => new EmulatedDevice({ stateSize: 8192, dirtyRate: 2000, dmaRate: 0, seed: i }));
  try {
    await sleep(150);
    const grew = status('Threads') - before;
    assert.ok(grew <= 4, `threads grew by ${grew} for 128 devices`);
    assert.ok(native().emuStats().workloadThreads <= 4);
    for (const d of devs) assert.ok(d.info().workloadWrites > 0, `${d.name} made no workload writes`);
  } finally {
    for (const d of devs) d.destroy();
  }
});

test('a destroyed device leaves the pool: its workload stops', async () => {
  const d = new EmulatedDevice({ stateSize: 8192, dirtyRate: 100000, dmaRate: 0 });
  const other = new EmulatedDevice({ stateSize: 8192, dirtyRate: 100000, dmaRate: 0 });
  try {
    await sleep(30);
    d.destroy();
    const n = other.info().workloadWrites;
    await sleep(30);
    assert.ok(other.info().workloadWrites > n, 'the pool still serves the other device');
  } finally {
    d.destroy();
    other.destroy();
  }
});

test('guest RAM is one per process and allocated by DMA: 32 devices writing 1024 guest pages cost ~4 MiB, not 32x', async () => {
  const shmem0 = status('RssShmem');
  // Devices without DMA never create guest RAM pages.
  const quiet = Array.from({ length: 32 }, () => new EmulatedDevice({ stateSize: 8192, dirtyRate: 0, dmaRate: 0, guestPages: 1024 }));
  for (const d of quiet) d.destroy();
  const devs = Array.from({ length: 32 }, (_, i) => new EmulatedDevice({ stateSize: 8192, dirtyRate: 0, dmaRate: 200000, guestPages: 1024, seed: i }));
  try {
    await sleep(250); // 200k DMA writes/s over 1024 pages: each device has written (nearly) every page by now
    for (const d of devs) assert.ok(d.info().dmaWrites > 2048, `${d.name}: ${d.info().dmaWrites} DMA writes`);
    const grewKiB = status('RssShmem') - shmem0;
    assert.ok(grewKiB < 16 * 1024, `shared memory grew by ${grewKiB} KiB (32 private guest memories would be 128 MiB)`);
    assert.ok(native().emuStats().guestRamBytes >= 1024 * 4096);
  } finally {
    for (const d of devs) d.destroy();
  }
});

async function cancelWhileStalled(profile: ProfileName) {
  const STALL_US = 1_500_000;
  const f = tmpFile('stall');
  const ac = new AbortController();
  // s0's vendor sleeps 1.5 s inside every chunk it stages (the device lock held, as a slow driver would); s1 is fine.
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `s${i}`, profile, stateSize: 4 << 20, maxChunk: 64 << 10, dirtyRate: 1000, dmaRate: 2000, guestPages: 1024 }));
  devs[0].device.setFault('slow-chunk', STALL_US);
  // The main thread stays responsive throughout: a 5 ms timer never waits long.
  let last = performance.now();
  let maxGap = 0;
  const beat = setInterval(() => { const t = performance.now(); maxGap = Math.max(maxGap, t - last); last = t; }, 5);
  const m = new Migration(devs, pool, new ContainerWriter(FileSink.open(f)), { signal: ac.signal, maxRounds: 100, downtimeLimitMs: 0, dirtyQueryIntervalMs: 5 });
  const rolled: string[] = [];
  m.on('rollback', (r) => rolled.push(`${r.device}: ${r.outcome}: ${r.detail}`));
  let tAbort = 0;
  m.on('phase', (_from, to) => {
    if (to === 'precopy') setTimeout(() => { tAbort = performance.now(); ac.abort(); }, 200); // s0 is inside its first stall
  });
  try {
    const e = await rejectsCode(m.run(), ErrorCode.CANCELLED);
    const tSettled = performance.now();
    const rep = (e as unknown as { report: MigrationReport }).report;
    // Settled while the vendor call is still in progress: its worker still holds s0's region lock.
    assert.is(m.devices[0].shared.lock.owner, OWNER_WORKER, 'the stalled vendor call is still in progress');
    assert.is(rep.phase, 'cancelled');
    assert.equal(rep.rollbackPending, ['s0']);
    assert.is(rep.rollback![0].outcome, 'deferred');
    assert.match(rep.rollback![0].detail, /^deferred: a worker is inside a vendor call/);
    assert.match(`${rep.rollback![1].device}: ${rep.rollback![1].detail}`, /^s1: (PRE_COPY -> RUNNING|was RUNNING)/);
    assert.is(devs[1].device.info().deviceState & 7, 1, 's1 RUNNING at once');
    assert.equal(rolled, [], 'no deferred rollback has run yet');
    assert.ok(tSettled - tAbort < STALL_US / 1000 / 2, `settled ${(tSettled - tAbort).toFixed(0)} ms after the abort, stall is ${STALL_US / 1000} ms`);
    // When the vendor returns, s0 goes back to RUNNING and the outcome says so.
    const finals = await m.settled;
    assert.is(finals[0].outcome, 'resumed');
    assert.match(finals[0].detail, /^PRE_COPY -> RUNNING \(after the vendor call returned\)$/);
    assert.equal(rolled, ['s0: resumed: PRE_COPY -> RUNNING (after the vendor call returned)']);
    assert.is(devs[0].device.info().deviceState & 7, 1, 's0 RUNNING after its vendor call returned');
    assert.is(m.devices[0].shared.lock.held, false);
    assert.ok(maxGap < STALL_US / 1000 / 3, `the event loop stalled ${maxGap.toFixed(0)} ms (${profile})`);
    const ins = await inspectContainer(f);
    assert.is(ins.abort?.code, ErrorCode.CANCELLED);
  } finally {
    clearInterval(beat);
    await m.settled;
    for (const d of devs) d.destroy();
    rm(f);
  }
}

test('cancel takes effect while a vendor call stalls (linux-5.8: container dirty queries keep running)', async () => {
  await cancelWhileStalled('linux-5.8');
});

test('cancel takes effect while a vendor call stalls (draft-2019: the region-lock dirty query is abandoned)', async () => {
  await cancelWhileStalled('draft-2019');
});

/** A vendor that advertises a 1 GiB migration region but stages ordinary chunks (the region past its real end is never touched). */
class HugeRegionTransport extends EmulatedTransport {
  override openRegion(): MigrationRegion {
    const r = super.openRegion();
    return new MigrationRegion({ ...r.desc, size: 2 ** 30 + 4096 });
  }
}

test('staging follows the chunk size used, not a 1 GiB region the vendor advertises (save)', async () => {
  const f = tmpFile('huge-region');
  const own = new EnginePool({ threads: 2, ringSlots: 3 });
  const dev = new HugeRegionTransport(new EmulatedDevice({ name: 'huge', stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 }));
  try {
    const r = await saveDevices([dev], f, own, { maxRounds: 1 });
    assert.ok(r.ok);
    const staging = own.stats.stagingBytes;
    assert.ok(staging > 0 && staging <= 2 * 3 * (128 << 10), `staging ${staging} bytes for 64 KiB chunks`);
    // The engine's own chunk limit: a vendor staging more than it is refused, naming the register and the limit.
    const g = tmpFile('huge-region-limit');
    const small = EmulatedTransport.create({ name: 'big-chunks', stateSize: 1 << 20, maxChunk: 256 << 10, dirtyRate: 0, dmaRate: 0 });
    try {
      const e = await rejectsCode(saveDevices([small], g, own, { maxRounds: 1, stagingChunk: 64 << 10 }), ErrorCode.VENDOR_BAD_VALUE);
      assert.is(e.register, 'data_size');
      assert.match(e.message, /staging capacity/);
      assert.is(small.device.info().deviceState & 7, 1, 'rolled back to RUNNING');
    } finally {
      small.destroy();
      rm(g);
    }
  } finally {
    dev.destroy();
    await own.close();
    rm(f);
  }
});

test('load staging is sized by the records in the stream, not by the destination region (64 MiB chunks declared)', async () => {
  const f = tmpFile('load-staging');
  const src = EmulatedTransport.create({ name: 'wide', stateSize: 1 << 20, maxChunk: 64 << 20, dirtyRate: 0, dmaRate: 0 });
  try {
    await saveDevices([src], f, pool, { maxRounds: 0, stagingChunk: 2 << 20 });
    const { report, loader } = await loadStream(f, pool, { verify: true });
    try {
      assert.ok(report.devices[0].verified);
      // The destination region is 128 MiB (two 64 MiB chunk slots); the stream's records are ~1 MiB.
      assert.ok(loader.stagingBytes > 0 && loader.stagingBytes <= 8 * (2 << 20), `load staging ${loader.stagingBytes} bytes`);
    } finally {
      for (const d of loader.dests) (d.transport as EmulatedTransport).destroy();
    }
  } finally {
    src.destroy();
    rm(f);
  }
});

// saveDevices / runEmulated / the CLI rejecting at once while a vendor call stalls: test/cancel.test.ts.

// ---- admission control (§2.1) -------------------------------------------------------------------------------------

test('run refuses what would exceed the memory budget before creating anything (VFM_OVER_BUDGET)', async () => {
  const threads0 = status('Threads');
  // (The bogus data mode makes a broken admission fail safely in the device constructor, before any allocation.)
  const e = await rejectsCode(runEmulated({ devices: 1024, device: { stateSize: 2 ** 34, dataMode: 'bogus' as 'mmap' } }), ErrorCode.OVER_BUDGET);
  assert.match(e.message, /run of 1024 device\(s\) would commit .*sources state 16384\.00 GiB.*destinations state.*more than the memory budget/);
  assert.is(status('Threads'), threads0, 'no pool, no device, no thread was made');
  // An explicit budget below what the devices need.
  await rejectsCode(runEmulated({ devices: 4, device: { stateSize: 16 << 20, dirtyRate: 0, dmaRate: 0 }, memoryBudget: 64 << 20, pool }), ErrorCode.OVER_BUDGET);
  // The options are checked before they are trusted: no NaN or negative size slips past the sum.
  await rejectsCode(runEmulated({ devices: 2, device: { stateSize: NaN }, pool }), ErrorCode.BAD_ARGUMENT);
  await rejectsCode(runEmulated({ devices: 2, device: { stateSize: -4096 }, pool }), ErrorCode.BAD_ARGUMENT);
  // 1024 x 8 KiB with the default workload fits well under 1 GiB (measured: ~0.14 MiB per device, npm run bench).
  admitEmulated({ what: 'run', devices: 1024, device: { stateSize: 8192 }, destinations: true, newPoolThreads: 2, memoryBudget: 1 << 30 });
});

test('a migration refuses dirty-page bitmaps and staging over its budget', () => {
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `b${i}`, stateSize: 8192, dirtyRate: 0, dmaRate: 0, guestPages: 1 << 24 }));
  try {
    const w = new ContainerWriter(FileSink.open(tmpFile('never')));
    let err: unknown;
    try { new Migration(devs, pool, w, { memoryBudget: 4 << 20 }); } catch (e) { err = e; }
    assert.is((err as { code?: string })?.code, ErrorCode.OVER_BUDGET, String(err));
    assert.match(String((err as Error).message), /dirty-page bitmaps 8\.0 MiB/);
    void w.sink.close();
  } finally {
    for (const d of devs) d.destroy();
  }
});

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

test('CLI: a request over --memory-budget exits 2 with VFM_OVER_BUDGET', () => {
  const r = spawnSync(process.execPath, [path.join(ROOT, 'bin/vfio-mig.js'), 'run', '--devices', '4', '--size', '16MiB', '--memory-budget', '64MiB'], { encoding: 'utf8' });
  assert.is(r.status, 2, r.stderr);
  assert.match(r.stderr, /^vfio-mig: VFM_OVER_BUDGET: run of 4 device\(s\) would commit/);
});

/** The saved stream with its device table rewritten by `edit`. */
async function withTable(tag: string, edit: (t: { devices: Record<string, any>[] }) => void): Promise<string> {
  const src = tmpFile('budget-src');
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `t${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, guestPages: 64 }));
  try {
    await saveDevices(devs, src, pool, { maxRounds: 0 });
  } finally {
    for (const d of devs) d.destroy();
  }
  const { header, recs } = readRecords(src);
  rm(src);
  const t = JSON.parse(Buffer.from(recs[0].body).toString());
  edit(t);
  recs[0].body = new Uint8Array(Buffer.from(JSON.stringify(t)));
  const f = tmpFile(tag);
  writeRecords(f, header, recs);
  return f;
}

test('load: a device table whose destinations exceed the budget is refused at the table, before any destination exists', async () => {
  const f = await withTable('budget-table', () => undefined);
  try {
    const e = await rejectsCode(loadStream(f, pool, { memoryBudget: 2 << 20 }), ErrorCode.STREAM_TOO_LARGE);
    assert.is(e.offset, 32);
    assert.match(e.message, /loading 2 device\(s\) would commit .*destinations state 2\.0 MiB/);
    assert.is((e as unknown as { loader: { dests: unknown[] } }).loader.dests.length, 0);
    const ok = await loadStream(f, pool, { verify: true });
    for (const d of ok.loader.dests) (d.transport as EmulatedTransport).destroy();
    assert.ok(ok.report.ok, 'the same stream loads within the default budget');
  } finally {
    rm(f);
  }
});

test('load: a missing, negative, NaN or huge size in a device table is an error, never a way around the limit', async () => {
  const bad: [string, unknown][] = [['missing', undefined], ['negative', -(2 ** 40)], ['NaN', null], ['huge', 1e300], ['string', '9999999999999']];
  for (const [what, v] of bad) {
    // A kernel-device entry: the table validator leaves its state size to the vendor; the budget must not.
    const f = await withTable(`size-${what}`, (t) => {
      t.devices[0].transport = 'vfio-v1';
      if (v === undefined) delete t.devices[0].geometry.stateSize; else t.devices[0].geometry.stateSize = v;
    });
    let made = 0;
    try {
      const e = await rejectsCode(loadStream(f, pool, { makeDestination: () => { made++; throw new Error('must not be called'); } }), ErrorCode.STREAM_BAD_RECORD);
      assert.is(e.offset, 32, what);
      assert.match(e.message, /stateSize .* is not a size/, what);
      assert.is(made, 0, `${what}: no destination was made`);
    } finally {
      rm(f);
    }
  }
});

test.run();
