// The parallel engine: many devices at once, cancel mid-phase, a worker dying mid-chunk, bounded staging memory,
// two migrations sharing one pool.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, runEmulated, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { inspectContainer } from '../src/main/container/inspect.js';
import { ErrorCode } from '../src/main/errors.js';
import type { Migration } from '../src/main/engine/migration.js';
import { rejectsCode, rm, saveInPlace, tmpFile } from './helpers.js';
import { withTestHooks } from '../src/main/engine/test-hooks.js';

const pool = new EnginePool({ threads: 2 });
test.after(async () => { await pool.close(); });

test('8 devices migrate in parallel and all verify; progress events per device and phase', async () => {
  const progress: { device: string; phase: string; bytes: number }[] = [];
  const phases: string[] = [];
  const r = await runEmulated({
    pool, devices: 8, seed: 100, maxRounds: 3, downtimeLimitMs: 5,
    device: { stateSize: 4 << 20, maxChunk: 256 << 10, dirtyRate: 10000, profile: 'linux-5.8' },
    onMigration: (m) => {
      m.on('progress', (p) => progress.push(p));
      m.on('phase', (_from, to) => phases.push(to));
    },
  });
  assert.equal(phases, ['setup', 'precopy', 'stopcopy', 'complete', 'done']);
  for (const d of r.save.devices) {
    const mine = progress.filter((p) => p.device === d.name);
    assert.ok(mine.some((p) => p.phase === 'precopy') && mine.some((p) => p.phase === 'stopcopy'), d.name);
    assert.is(mine[mine.length - 1].bytes, d.precopyBytes + d.stopCopyBytes);
  }
  assert.ok(r.ok);
  assert.is(r.load.devices.length, 8);
  assert.ok(r.load.devices.every((d) => d.verified === true));
  // Chunks of different devices interleave in the file (they were produced concurrently).
  const digests = new Set(r.save.devices.map((d) => d.digest));
  assert.is(digests.size, 8);
});

test('chunks of different devices interleave in the container', async () => {
  const f = tmpFile('interleave');
  const devs = [0, 1, 2, 3].map((i) => EmulatedTransport.create({ name: `i${i}`, stateSize: 4 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 }));
  // Each chunk takes >= 0.5 ms in the vendor (a sleep, not CPU): devices saved concurrently then interleave whatever
  // the machine's load, instead of one worker finishing a whole 4 MiB device in a few ms before the next starts.
  for (const d of devs) d.device.setFault('slow-chunk', 500);
  try {
    await saveDevices(devs, f, pool, { maxRounds: 1 });
    const ins = await inspectContainer(f, true);
    // Walk packets by file offset: the device of consecutive data packets must change more often than once per device.
    const all = ins.devices.flatMap((d) => (d.packets ?? []).filter((p) => p.tag === 'DEV_DATA_STATE').map((p) => ({ d: d.index, o: p.offset })));
    all.sort((a, b) => a.o - b.o);
    let switches = 0;
    for (let i = 1; i < all.length; i++) if (all[i].d !== all[i - 1].d) switches++;
    assert.ok(switches > 8, `only ${switches} device switches among ${all.length} data packets`);
  } finally {
    for (const d of devs) d.destroy();
    rm(f);
  }
});

async function cancelDuring(phase: 'precopy' | 'stopcopy') {
  const f = tmpFile('cancel');
  const ac = new AbortController();
  const devs = [0, 1, 2].map((i) => EmulatedTransport.create({ name: `c${i}`, stateSize: 8 << 20, maxChunk: 64 << 10, dirtyRate: 50000, dmaRate: 1000 }));
  // Slow chunks keep the phase long enough (>= 100 ms of chunks per device) to cancel 30 ms into it.
  for (const d of devs) d.device.setFault('slow-chunk', phase === 'precopy' ? 300 : 2000);
  let stopCopyStarted = false;
  try {
    const p = saveInPlace(devs, f, pool, { maxRounds: phase === 'precopy' ? 100 : 2, downtimeLimitMs: 0, signal: ac.signal }, (m: Migration) => {
      m.on('phase', (_from, to) => { if (to === 'stopcopy') stopCopyStarted = true; });
      m.on('phase', (_from, to) => { if (to === phase) setTimeout(() => ac.abort(), 30); });
    });
    const e = await rejectsCode(p, ErrorCode.CANCELLED);
    const rep = (e as unknown as { report: { phase: string; rollback: string[] } }).report;
    assert.is(rep.phase, 'cancelled');
    assert.is(stopCopyStarted, phase === 'stopcopy', 'cancelled in the intended phase');
    for (const d of devs) assert.is(d.device.info().deviceState & 7, 1, `${d.name} RUNNING after cancel in ${phase}`);
    for (const d of devs) assert.is(d.device.info().lastError, '');
    const ins = await inspectContainer(f);
    assert.is(ins.abort?.code, ErrorCode.CANCELLED);
    assert.is(ins.end, undefined);
  } finally {
    for (const d of devs) d.destroy();
    rm(f);
  }
}

test('cancel in the middle of pre-copy returns every device to RUNNING and writes an ABORT record', async () => {
  await cancelDuring('precopy');
});

test('cancel in the middle of stop-and-copy returns every device to RUNNING', async () => {
  await cancelDuring('stopcopy');
});

test('a worker that dies holding the region lock fails the migration cleanly, devices RUNNING, lock freed', async () => {
  const f = tmpFile('die');
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `w${i}`, stateSize: 4 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 }));
  let mig: Migration | undefined;
  try {
    const e = await rejectsCode(saveDevices(devs, f, pool, withTestHooks({ maxRounds: 2 }, { exitAfterChunks: { device: 1, chunks: 3 } }), (m) => { mig = m; }),
      ErrorCode.WORKER_FAILED);
    assert.is(e.device, 'w1');
    for (const d of devs) assert.is(d.device.info().deviceState & 7, 1);
    for (const d of mig!.devices) assert.is(d.shared.lock.held, false);
    // The pool replaced the dead worker and still works.
    const r = await runEmulated({ pool, devices: 1, device: { stateSize: 1 << 20, dirtyRate: 0 } });
    assert.ok(r.ok);
  } finally {
    for (const d of devs) d.destroy();
    rm(f);
  }
});

test('staging memory does not grow with device state size', async () => {
  const own = new EnginePool({ threads: 2, ringSlots: 3 });
  try {
    const small = await runEmulated({ pool: own, devices: 4, device: { stateSize: 2 << 20, maxChunk: 256 << 10, dirtyRate: 0 } });
    const afterSmall = own.stats.stagingBytes;
    const big = await runEmulated({ pool: own, devices: 4, device: { stateSize: 64 << 20, maxChunk: 256 << 10, dirtyRate: 0 } });
    assert.ok(small.ok && big.ok);
    assert.is(own.stats.stagingBytes, afterSmall, 'no new staging for 32x the state');
    // Bounded by threads x slots x slot size (slot ~ the vendor's data area, 2 x 256 KiB here, plus framing).
    assert.ok(afterSmall <= 2 * 3 * (2 * (256 << 10) + 8192), `staging ${afterSmall}`);
  } finally {
    await own.close();
  }
});

test('a bandwidth cap paces the stream (records then go through the main thread\'s ring) and the result verifies', async () => {
  const cap = 40e6;
  const r = await runEmulated({ pool, devices: 2, bandwidthCap: cap, maxRounds: 1, device: { stateSize: 4 << 20, maxChunk: 128 << 10, dirtyRate: 0 } });
  assert.ok(r.ok);
  const bytes = r.save.precopyBytes + r.save.stopCopyBytes;
  // A lower bound only (never an upper one): at most ~50 ms of burst may go out unpaced.
  assert.ok(r.save.totalMs >= ((bytes / cap) * 1000) - 60, `${bytes} bytes in ${r.save.totalMs.toFixed(0)} ms at a ${cap / 1e6} MB/s cap`);
});

test('two migrations at once share one pool', async () => {
  const [a, b] = await Promise.all([
    runEmulated({ pool, devices: 3, seed: 1, device: { stateSize: 4 << 20, profile: 'draft-2019', dataMode: 'mixed', dirtyRate: 5000 }, maxRounds: 3 }),
    runEmulated({ pool, devices: 3, seed: 50, device: { stateSize: 4 << 20, profile: 'linux-5.8', dataMode: 'trapped', offsetPolicy: 'moving', dirtyRate: 5000 }, maxRounds: 3 }),
  ]);
  assert.ok(a.ok && b.ok);
  assert.ok([...a.load.devices, ...b.load.devices].every((d) => d.verified === true));
});

test('a stream saved by two workers loads with one (no deadlock between read slots and batch scratch)', async () => {
  const f = tmpFile('one');
  const devs = [0, 1, 2, 3].map((i) => EmulatedTransport.create({ name: `o${i}`, stateSize: 8 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, seed: i + 3 }));
  const one = new EnginePool({ threads: 1 });
  let loader: { dests: { transport: unknown }[] } | undefined;
  try {
    await saveDevices(devs, f, pool, { maxRounds: 1 });
    let timer: NodeJS.Timeout | undefined;
    const res = await Promise.race([
      loadStream(f, one, { verify: true }),
      new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new Error('load hung for 30 s')), 30_000); }),
    ]).finally(() => clearTimeout(timer));
    loader = res.loader;
    assert.ok(res.report.devices.every((d) => d.verified === true));
  } finally {
    for (const d of devs) d.destroy();
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
    await one.close();
    rm(f);
  }
});

test.run();
