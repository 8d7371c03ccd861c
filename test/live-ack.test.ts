// switchover-ack (QEMU 8.1+) on a live migration: the destination acknowledges only once every PRE_COPY (v2) device's
// DEV_INIT_DATA_SENT has been applied, the source stops no device before that ack, devices without pre-copy initial
// data do not hold it back, and a destination that never acknowledges makes the source give up and resume.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { Receiver, type ReceiveOptions, type ReceiveReport } from '../src/main/live/receiver.js';
import { send, type SendOptions, type SendReport } from '../src/main/live/sender.js';
import { emulatedDeviceOf, emulatedV2, destroyEmulated } from '../src/main/reach/emulated/v2.js';
import { withTestHooks } from '../src/main/engine/test-hooks.js';
import type { EngineDevice } from '../src/main/engine/source-device.js';

const srcPool = new EnginePool({ threads: 2 });
const dstPool = new EnginePool({ threads: 2 });
test.after(async () => { await srcPool.close(); await dstPool.close(); });

/** One timeline for both ends (one process, so push order is time order). */
type Ev = { side: 'tx' | 'rx'; type: string; device?: string; state?: string };

async function pair(srcs: EngineDevice[], so: Partial<SendOptions>, ro: Partial<ReceiveOptions> = {}) {
  const tl: Ev[] = [];
  const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool: dstPool, timeoutMs: 10_000, ...ro,
    onEvent: (e) => tl.push({ side: 'rx', type: e.type, device: (e as { device?: string }).device }) });
  const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const rp = rx.run().catch((e: MigError) => e);
  const to = await listening;
  const stop = new AbortController(); // a hung pair is cancelled, so the suite can end
  const tp = send(srcs, {
    to, pool: srcPool, timeoutMs: 10_000, signal: stop.signal, ...so,
    onEvent: (e) => tl.push({ side: 'tx', type: e.type }),
    onMigration: (m) => m.on('state', (s) => tl.push({ side: 'tx', type: 'device-state', device: s.device, state: s.state })),
  }).catch((e: MigError) => e);
  // A hang is a failure here, not a stalled suite (the gate's whole risk is waiting forever).
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, j) => { timer = setTimeout(() => j(new Error('live migration did not end within 60 s')), 60_000); });
  try {
    const [tx, rxr] = await Promise.race([Promise.all([tp, rp]), hang]);
    return { tx: tx as SendReport | MigError, rx: rxr as ReceiveReport | MigError, tl };
  } catch (e) {
    stop.abort();
    await Promise.all([tp, rp]);
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

function ok<T>(x: T | MigError): T {
  if (x instanceof MigError) throw new Error(`expected success, got ${x.code}: ${x.message}`);
  return x;
}

/** A device leaving RUNNING / PRE_COPY on the source: the switchover has begun for it (P2P quiescing included). */
const isStop = (e: Ev) => e.side === 'tx' && e.type === 'device-state' && !['RUNNING', 'PRE_COPY'].includes(e.state!);
const at = (tl: Ev[], f: (e: Ev) => boolean, what: string) => {
  const i = tl.findIndex(f);
  assert.ok(i >= 0, `no ${what} in ${tl.map((e) => `${e.side}:${e.type}${e.device ? `(${e.device})` : ''}${e.state ? `=${e.state}` : ''}`).join(' ')}`);
  return i;
};

test('switchover-ack waits for the slowed v2 device\'s DEV_INIT_DATA_SENT to be loaded; the source stops nothing before the ack', async () => {
  // The v2 PRE_COPY device reads its initial bytes slowly (3 ms per fill, 20 ms rounds): with a 60 s downtime limit
  // the source would switch over after its first round, long before those bytes are all out.
  const slow = emulatedV2({ name: 'slow', stateSize: 4 << 20, maxChunk: 256 << 10, seed: 5, dirtyRate: 2000 });
  emulatedDeviceOf(slow)!.setFault('slow-chunk', 3000);
  const nopre = emulatedV2({ name: 'nopre', migFlags: 3, stateSize: 4 << 20, maxChunk: 256 << 10, seed: 6 });
  const v1 = EmulatedTransport.create({ name: 'v1', stateSize: 4 << 20, maxChunk: 256 << 10, seed: 7 });
  const srcs = [slow, nopre, v1];
  try {
    const p = await pair(srcs, { maxRounds: 30, downtimeLimitMs: 60_000, roundTimeMs: 20 });
    const tx = ok(p.tx);
    const rx = ok(p.rx);
    assert.equal(rx.load!.devices.map((d) => d.verified), [true, true, true]);
    const loadedInit = p.tl.filter((e) => e.type === 'init-data-loaded').map((e) => e.device);
    assert.equal(loadedInit, ['slow'], 'only the PRE_COPY device sends DEV_INIT_DATA_SENT');
    const iInit = at(p.tl, (e) => e.side === 'rx' && e.type === 'init-data-loaded', 'marker loaded');
    const iRxAck = at(p.tl, (e) => e.side === 'rx' && e.type === 'switchover-ack', 'destination ack');
    const iTxAck = at(p.tl, (e) => e.side === 'tx' && e.type === 'switchover-ack', 'ack at the source');
    const iStop = at(p.tl, isStop, 'first source device stop');
    assert.ok(iInit < iRxAck, 'the destination acknowledges only after the marker was loaded');
    assert.ok(iRxAck < iTxAck && iTxAck < iStop, 'the source stops its first device only after the ack');
    // The gate held pre-copy back: it went on iterating beyond the round after which it had converged.
    assert.ok(tx.save!.rounds.length >= 2, `rounds: ${tx.save!.rounds.length}`);
    assert.type(tx.switchoverAckMs, 'number');
  } finally {
    for (const s of srcs) destroyEmulated(s);
  }
});

test('no device with pre-copy initial data (v1, v2 without PRE_COPY): nothing holds the ack back', async () => {
  const srcs = [emulatedV2({ name: 'nopre', migFlags: 3, stateSize: 2 << 20, maxChunk: 256 << 10, seed: 8 }),
    EmulatedTransport.create({ name: 'v1', stateSize: 2 << 20, maxChunk: 256 << 10, seed: 9 })];
  try {
    const p = await pair(srcs, { maxRounds: 4, downtimeLimitMs: 300, switchoverAckTimeoutMs: 20_000 });
    ok(p.tx);
    assert.equal(ok(p.rx).load!.devices.map((d) => d.verified), [true, true]);
    assert.is(p.tl.filter((e) => e.type === 'init-data-loaded').length, 0);
    const iAccept = at(p.tl, (e) => e.side === 'rx' && e.type === 'accepted', 'accept');
    assert.is(p.tl[iAccept + 2]?.type, 'switchover-ack', 'ACCEPT, state active, then the ack at once');
  } finally {
    for (const s of srcs) destroyEmulated(s);
  }
});

test('a destination that never acknowledges: the source keeps iterating, gives up after its ack timeout and resumes; no device stopped', async () => {
  const dev = emulatedV2({ name: 'v2a', stateSize: 4 << 20, maxChunk: 256 << 10, seed: 11, dirtyRate: 2000 });
  const srcs = [dev, EmulatedTransport.create({ name: 'v1', stateSize: 2 << 20, maxChunk: 256 << 10, seed: 12 })];
  try {
    // A downtime limit every round meets: pre-copy converges at its first round whatever the machine's speed, so the
    // ack wait (and its timeout) always begins; the rounds go on while it waits.
    const p = await pair(srcs, { maxRounds: 1000, downtimeLimitMs: 1e6, switchoverAckTimeoutMs: 1500 },
      withTestHooks({}, { withholdSwitchoverAck: true }));
    assert.instance(p.tx, MigError);
    assert.instance(p.rx, MigError);
    const tx = p.tx as MigError & { report: SendReport };
    const rx = p.rx as MigError & { report: ReceiveReport };
    assert.is(tx.code, ErrorCode.PEER_TIMEOUT, tx.message);
    assert.match(tx.message, /no SWITCHOVER_ACK/);
    assert.is(rx.code, ErrorCode.PEER_TIMEOUT, 'the destination reports the source\'s cause');
    const c = (x: { code: string; message: string; side: string }) => [x.code, x.message, x.side];
    assert.equal(c(rx.report.cause!), c(tx.report.cause!), 'the same cause on both sides');
    assert.is(p.tl.filter((e) => e.type === 'init-data-loaded').length, 1, 'the marker did arrive and load');
    assert.is(p.tl.filter(isStop).length, 0, 'no source device ever left RUNNING / PRE_COPY');
    assert.ok(!p.tl.some((e) => e.side === 'tx' && e.type === 'switchover'), 'no SWITCHOVER');
    assert.ok(tx.report.save!.rounds.length >= 2, `pre-copy went on while waiting (${tx.report.save!.rounds.length} rounds)`);
    assert.is(dev.state(), 'RUNNING');
    assert.is((srcs[1] as EmulatedTransport).openRegion().state(), 'RUNNING');
    assert.ok(rx.report.devices.every((d) => d.state.split('reset').length === 2 && d.state.endsWith(', released')), rx.report.devices.map((d) => d.state).join(' | '));
  } finally {
    for (const s of srcs) destroyEmulated(s);
  }
});

test('v1 devices have no init-data marker: waiting for a late ack with max rounds 0, they move no pre-copy data', async () => {
  // The ack is withheld: the source must only wait (v1 never writes DEV_INIT_DATA_SENT, so no "marker round" is due),
  // then give up after its ack timeout, with every byte still unsent (max rounds 0: all of it is stop-and-copy data).
  const srcs = [0, 1].map((i) => EmulatedTransport.create({ name: `v1w${i}`, stateSize: 2 << 20, maxChunk: 256 << 10, seed: 20 + i }));
  try {
    const p = await pair(srcs, { maxRounds: 0, switchoverAckTimeoutMs: 800 }, withTestHooks({}, { withholdSwitchoverAck: true }));
    const tx = p.tx as MigError & { report: SendReport };
    assert.instance(tx, MigError);
    assert.is(tx.code, ErrorCode.PEER_TIMEOUT, tx.message);
    assert.is(tx.report.save!.rounds.length, 0, `${tx.report.save!.rounds.length} pre-copy rounds, ${tx.report.save!.precopyBytes} bytes`);
    assert.is(tx.report.save!.precopyBytes, 0);
    for (const s of srcs) assert.is(s.openRegion().state(), 'RUNNING');
  } finally {
    for (const s of srcs) destroyEmulated(s);
  }
});

test.run();
