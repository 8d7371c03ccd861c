// A sender and a receiver in one process sharing one EnginePool: while a live receive() loads through the pool,
// device saves leave one worker to it (a save task blocks its worker when the connection is full, which only the
// load drains: with every worker saving, both ends would wait on each other until the timeouts fired). A 1-thread
// pool cannot do both and is refused with a clear error, the source devices left RUNNING.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { Receiver } from '../src/main/live/receiver.js';
import { send } from '../src/main/live/sender.js';

async function shared(threads: number, channels: number) {
  const pool = new EnginePool({ threads });
  const srcs = [0, 1, 2, 3].map((i) => EmulatedTransport.create({ name: `s${i}`, stateSize: 16 << 20, maxChunk: 1 << 20, seed: 500 + i, dirtyRate: 5000 }));
  try {
    const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool, timeoutMs: 8000 });
    const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
    const rp = rx.run().catch((e: MigError) => e);
    const to = await listening;
    const tx = await send(srcs, { to, pool, channels, timeoutMs: 8000, maxRounds: 4 }).catch((e: MigError) => e);
    return { tx, rx: await rp, states: srcs.map((s) => s.openRegion().state()) };
  } finally {
    for (const s of srcs) s.destroy();
    await pool.close();
  }
}

for (const channels of [1, 4]) {
  test(`one process, one 2-thread pool, ${channels} channel(s), 4 devices with the workload: both ends complete and verify`, async () => {
    const r = await shared(2, channels);
    const { tx, rx } = r;
    if (tx instanceof MigError) throw new Error(`send: ${tx.code}: ${tx.message}`);
    if (rx instanceof MigError) throw new Error(`receive: ${rx.code}: ${rx.message}`);
    assert.ok(tx.ok && rx.ok);
    assert.equal(rx.load!.devices.map((d) => d.verified), [true, true, true, true]);
  });
}

test('a 1-thread pool shared by send() and receive(): refused with a clear error, source devices RUNNING, both sides report it', async () => {
  const r = await shared(1, 1);
  assert.instance(r.tx, MigError);
  const tx = r.tx as MigError;
  assert.is(tx.code, ErrorCode.BAD_ARGUMENT);
  assert.match(tx.message, /1 worker thread.*2\+ threads/);
  assert.instance(r.rx, MigError);
  assert.is((r.rx as MigError).code, ErrorCode.BAD_ARGUMENT, 'the destination reports the source\'s cause');
  assert.equal(r.states, ['RUNNING', 'RUNNING', 'RUNNING', 'RUNNING']);
});

test.run();
