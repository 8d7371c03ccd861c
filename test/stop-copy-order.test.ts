// stopCopyOrder (MigrationOptions, CLI --stop-copy-order): `parallel` drains every device's stop-and-copy data at
// once; `sequential` (QEMU's legacy save order) stops every device at once, then drains one device after another,
// so each device's final state is contiguous in the stream. Also live over one TCP channel, verified.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { inspectContainer } from '../src/main/container/inspect.js';
import { ErrorCode } from '../src/main/errors.js';
import { Receiver } from '../src/main/live/receiver.js';
import { send } from '../src/main/live/sender.js';
import type { StopCopyOrder } from '../src/main/engine/migration.js';
import { rejectsCode, rm, runCli, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
test.after(async () => { await pool.close(); });

function devices(tag: string): EmulatedTransport[] {
  const ds = [0, 1, 2].map((i) => EmulatedTransport.create({ name: `${tag}${i}`, stateSize: 2 << 20, maxChunk: 64 << 10, seed: 40 + i, dirtyRate: 0, dmaRate: 0 }));
  // Each chunk takes >= 0.3 ms in the vendor (a sleep): devices drained at once interleave whatever the machine's load.
  for (const d of ds) d.device.setFault('slow-chunk', 300);
  return ds;
}

/** Save with maxRounds 0 (all data is stop-and-copy); the device of each data packet in file order, and state events. */
async function save(order: StopCopyOrder): Promise<{ seq: number[]; states: string[] }> {
  const f = tmpFile(`order-${order}`);
  const ds = devices(order.slice(0, 3));
  const states: string[] = [];
  try {
    await saveDevices(ds, f, pool, { maxRounds: 0, stopCopyOrder: order }, (m) => m.on('state', (e) => states.push(`${e.index}:${e.state}`)));
    const ins = await inspectContainer(f, true);
    const all = ins.devices.flatMap((d) => (d.packets ?? []).filter((p) => p.tag === 'DEV_DATA_STATE' && p.size).map((p) => ({ d: d.index, o: p.offset })));
    all.sort((a, b) => a.o - b.o);
    return { seq: all.map((x) => x.d), states };
  } finally {
    for (const d of ds) d.destroy();
    rm(f);
  }
}

const runs = (seq: number[]) => seq.filter((d, i) => i === 0 || seq[i - 1] !== d);

test('sequential: every device stops first, then each device\'s stop-and-copy data is saved whole, in table order', async () => {
  const { seq, states } = await save('sequential');
  assert.ok(seq.length >= 3 * 32, `${seq.length} data packets`);
  assert.equal(runs(seq), [0, 1, 2], 'one contiguous run of data packets per device, device 0 first');
  // vm_stop first: all three STOP_COPY before any device finishes its drain (STOP).
  const firstStop = states.findIndex((s) => s.endsWith(':STOP'));
  const stopCopy = states.map((s, i) => (s.endsWith(':STOP_COPY') ? i : -1)).filter((i) => i >= 0);
  assert.is(stopCopy.length, 3, states.join(' '));
  assert.ok(firstStop > Math.max(...stopCopy), `a device finished draining before every device stopped: ${states.join(' ')}`);
});

test('parallel (the default): the devices\' stop-and-copy data interleave', async () => {
  const { seq } = await save('parallel');
  assert.ok(runs(seq).length > 8, `only ${runs(seq).length} runs among ${seq.length} data packets`);
});

test('a bad stop-copy order is refused before anything is touched (API and CLI)', async () => {
  const ds = devices('bad');
  const f = tmpFile('order-bad');
  try {
    await rejectsCode(saveDevices(ds, f, pool, { stopCopyOrder: 'random' as StopCopyOrder }), ErrorCode.BAD_ARGUMENT);
    assert.is(ds[0].openRegion().state(), 'RUNNING');
  } finally {
    for (const d of ds) d.destroy();
    rm(f);
  }
  const r = await runCli(['save', '--stream', f, '--stop-copy-order', 'random', '--size', '64KiB', '--devices', '1']);
  assert.is(r.code, 2, r.stderr);
  assert.match(r.stderr, /--stop-copy-order/);
  rm(f);
});

test('live, one TCP channel, sequential stop-and-copy: every destination verifies', async () => {
  const ds = devices('live');
  const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool, timeoutMs: 10_000 });
  const to = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const rp = rx.run();
  try {
    const tx = await send(ds, { to: await to, pool, maxRounds: 0, stopCopyOrder: 'sequential', timeoutMs: 10_000 });
    const rr = await rp;
    assert.ok(tx.ok && rr.ok);
    assert.equal(rr.devices.map((d) => d.verified), [true, true, true]);
    assert.ok(tx.save!.devices.every((d) => d.stopCopyBytes >= 2 << 20), JSON.stringify(tx.save!.devices.map((d) => [d.precopyBytes, d.stopCopyBytes])));
  } finally {
    await rp.catch(() => undefined);
    for (const d of ds) d.destroy();
  }
});

test.run();
