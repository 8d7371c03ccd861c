// Live migration in one process (two engine pools, as two processes would have): loopback TCP with 1 and 4
// channels, a UNIX socket, the received stream saved and inspected, refusal with reasons, failures and cancel on
// either side (source devices back to RUNNING, destinations never running, the same cause on both sides), a
// destination that stops answering, wire-version negotiation, the hello's bounds.
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { inspectContainer } from '../src/main/container/inspect.js';
import { FILE_HEADER_SIZE, RECORD_HEADER_SIZE, REC_DEVICE_TABLE, decodeRecordHeader } from '../src/main/container/format.js';
import { Receiver, type ReceiveOptions, type ReceiveReport } from '../src/main/live/receiver.js';
import { send, type SendOptions, type SendReport } from '../src/main/live/sender.js';
import type { LiveEvent } from '../src/main/live/events.js';
import {
  HELLO_OK, HELLO_SIZE, HELLO_VERSION, WIRE_VERSION, chooseVersion, decodeHello, decodeReply, encodeHello, encodeReply,
} from '../src/main/live/wire.js';
import { parseUri } from '../src/main/live/uri.js';
import type { DeviceTransport } from '../src/main/transport/transport.js';
import { rm, tmpFile } from './helpers.js';
import { saveDevices } from '../src/main/api.js';

const srcPool = new EnginePool({ threads: 2 });
const dstPool = new EnginePool({ threads: 2 });
test.after(async () => { await srcPool.close(); await dstPool.close(); });

function sources(n: number, o: { size?: number; seed?: number; dirtyRate?: number; profile?: 'linux-5.8' | 'draft-2019' } = {}): EmulatedTransport[] {
  return Array.from({ length: n }, (_, i) => EmulatedTransport.create({
    name: `emu${i}`, stateSize: o.size ?? 8 << 20, maxChunk: 256 << 10, seed: (o.seed ?? 10) + i, dirtyRate: o.dirtyRate ?? 5000,
    dmaRate: 500, profile: o.profile ?? 'linux-5.8',
  }));
}

function stateOf(t: DeviceTransport): string {
  const r = t.openRegion();
  return r.state();
}

interface Pair {
  tx: SendReport | MigError; rx: ReceiveReport | MigError; txEvents: LiveEvent[]; rxEvents: LiveEvent[];
}

/** A receiver on `listen` and a sender to wherever it listens; both outcomes, settled. */
async function pair(srcs: DeviceTransport[], listen: string, so: Partial<SendOptions> = {}, ro: Partial<ReceiveOptions> = {},
  during?: (rx: Receiver) => void): Promise<Pair> {
  const rxEvents: LiveEvent[] = [];
  const txEvents: LiveEvent[] = [];
  const rx = new Receiver({ listen, pool: dstPool, timeoutMs: 5000, ...ro, onEvent: (e) => rxEvents.push(e) });
  const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const rp = rx.run().catch((e: MigError) => e);
  const to = await Promise.race([listening, rp.then((e) => { throw e; })]);
  during?.(rx);
  const tx = await send(srcs, { to, pool: srcPool, timeoutMs: 5000, maxRounds: 4, downtimeLimitMs: 20, ...so, onEvent: (e) => txEvents.push(e) })
    .catch((e: MigError) => e);
  return { tx, rx: await rp, txEvents, rxEvents };
}

function ok<T>(x: T | MigError): T {
  if (x instanceof MigError) throw new Error(`expected success, got ${x.code}: ${x.message}`);
  return x;
}

function failed(x: unknown, code: string): MigError & { report: Record<string, unknown> } {
  assert.instance(x, MigError, `expected a MigError ${code}, got ${JSON.stringify(x)?.slice(0, 200)}`);
  assert.is((x as MigError).code, code, (x as MigError).message);
  return x as MigError & { report: Record<string, unknown> };
}

test('loopback TCP, 1 channel, 4 devices with the workload running: every destination verifies, downtime reported on both sides, the received stream is a container', async () => {
  const srcs = sources(4);
  const saved = tmpFile('live-save');
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', {}, { save: saved });
    const tx = ok(p.tx);
    const rx = ok(p.rx);
    assert.ok(tx.ok && rx.ok);
    assert.is(rx.channels, 1);
    assert.equal(rx.load!.devices.map((d) => d.verified), [true, true, true, true]);
    assert.equal(tx.destination!.map((d) => d.verified), [true, true, true, true]);
    // The workload kept dirtying during pre-copy: some data was sent twice.
    assert.ok(tx.save!.precopyBytes + tx.save!.stopCopyBytes > 4 * (8 << 20), 'workload dirtied pages during pre-copy');
    assert.type(tx.downtimeMs, 'number');
    assert.is(rx.downtimeMs, tx.downtimeMs, 'both sides report the same end-to-end downtime');
    assert.ok(tx.downtimeMs! >= rx.destinationDowntimeMs! - 50, 'end to end includes the destination part');
    // QEMU's states in order on both sides.
    const states = (ev: LiveEvent[]) => ev.filter((e) => e.type === 'state').map((e) => (e as { state: string }).state);
    assert.equal(states(p.txEvents), ['setup', 'active', 'device', 'completed']);
    assert.equal(states(p.rxEvents), ['setup', 'active', 'device', 'completed']);
    // Pipelined: the destination loaded pre-copy data before the switchover.
    const firstSwitch = p.rxEvents.findIndex((e) => e.type === 'switchover');
    const progressBefore = p.rxEvents.slice(0, firstSwitch).filter((e) => e.type === 'progress')
      .some((e) => (e as { devices: { bytes: number }[] }).devices.some((d) => d.bytes > 0));
    assert.ok(progressBefore || rx.destinationDowntimeMs! < rx.load!.dataMs, 'pre-copy data applied while the source iterated');
    // The saved stream is an ordinary container: inspect sees every device complete, with the END digests.
    const ins = await inspectContainer(saved);
    assert.ok(ins.devices.every((d) => d.complete), 'saved stream complete');
    assert.equal(ins.end!.devices.map((d) => d.digest), tx.save!.devices.map((d) => d.digest));
    for (const s of srcs) assert.is(stateOf(s), 'STOP', 'a migrated source stays stopped');
  } finally {
    for (const s of srcs) s.destroy();
    rm(saved);
  }
});

test('loopback TCP, 4 channels: one device per channel, records reassembled, all verify', async () => {
  const srcs = sources(4, { seed: 40 });
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', { channels: 4 });
    const tx = ok(p.tx);
    const rx = ok(p.rx);
    assert.is(rx.channels, 4);
    assert.is(p.rxEvents.filter((e) => e.type === 'connected').length, 4);
    // Each device's data went over its own connection.
    assert.is(rx.channelBytes!.length, 4);
    for (const b of rx.channelBytes!) assert.ok(b > 8 << 20, `every channel carried a device's state (${rx.channelBytes})`);
    assert.equal(rx.load!.devices.map((d) => d.verified), [true, true, true, true]);
    assert.ok(tx.ok);
  } finally {
    for (const s of srcs) s.destroy();
  }
});

test('UNIX socket, draft-2019 devices', async () => {
  const sock = path.join(os.tmpdir(), `vfm-live-${process.pid}.sock`);
  const srcs = sources(2, { profile: 'draft-2019', seed: 70 });
  try {
    const p = await pair(srcs, `unix:${sock}`, { channels: 2 });
    assert.equal(ok(p.rx).load!.devices.map((d) => d.verified), [true, true]);
    assert.ok(ok(p.tx).ok);
    assert.not.ok(fs.existsSync(sock), 'the socket file is removed afterwards');
  } finally {
    for (const s of srcs) s.destroy();
  }
});

test('a destination that refuses (profile mismatch, no matching device): the source learns each reason, its devices stay RUNNING', async () => {
  const srcs = sources(2, { seed: 90 });
  const dst = [EmulatedTransport.create({ name: 'emu0', profile: 'draft-2019', stateSize: 8 << 20, maxChunk: 256 << 10, zeroFill: true })];
  const resets = countResets(dst);
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', {}, { destinations: dst });
    const tx = failed(p.tx, ErrorCode.PEER_REFUSED);
    const rx = failed(p.rx, ErrorCode.PEER_REFUSED);
    const refused = (tx.report.refused as { name: string; code: string; reason: string }[]);
    assert.equal(refused.map((r) => [r.name, r.code]), [['emu0', 'profile'], ['emu1', 'no-destination']]);
    assert.match(refused[0].reason, /linux-5\.8.*draft-2019/);
    assert.equal((rx.report.refused as unknown[]).length, 2);
    assert.is((tx.report.cause as { side: string }).side, 'destination');
    assert.equal(tx.report.cause, rx.report.cause, 'both sides report the same cause');
    for (const s of srcs) assert.is(stateOf(s), 'RUNNING');
    assert.is(stateOf(dst[0]), 'RUNNING', 'a refused destination was never put in RESUMING');
    assert.equal([...resets.values()], [1], 'no load ran: the receiver resets it, once');
  } finally {
    for (const s of srcs) s.destroy();
    for (const d of dst) d.destroy();
  }
});

test('refusal reasons per device reach the source: geometry (another state size) and budget (more state than the destination allows)', async () => {
  const srcs = sources(2, { seed: 95 });
  const dst = [0, 1].map((i) => EmulatedTransport.create({ name: `emu${i}`, stateSize: (i ? 8 : 4) << 20, maxChunk: 256 << 10, zeroFill: true }));
  try {
    const g = await pair(srcs, 'tcp:127.0.0.1:0', {}, { destinations: dst });
    const refused = (failed(g.tx, ErrorCode.PEER_REFUSED).report.refused as { name: string; code: string; reason: string }[]);
    assert.equal(refused.map((r) => [r.name, r.code]), [['emu0', 'geometry']], 'only the device whose state size differs');
    assert.match(refused[0].reason, /source state 8388608 B.*destination 4194304 B/);
    const b = await pair(srcs, 'tcp:127.0.0.1:0', {}, { maxStateBytes: 12 << 20 });
    const over = (failed(b.tx, ErrorCode.PEER_REFUSED).report.refused as { name: string; code: string; reason: string }[]);
    assert.equal(over.map((r) => [r.name, r.code]), [['emu0', 'budget'], ['emu1', 'budget']]);
    assert.match(over[0].reason, /16777216 bytes of state, more than the 12582912/);
    for (const x of srcs) assert.is(stateOf(x), 'RUNNING');
  } finally {
    for (const x of [...srcs, ...dst]) x.destroy();
  }
});

/** Counts VFIO_DEVICE_RESETs per device at the emulated vendor (whoever asks for them: the loader, the receiver). */
function countResets(devs: EmulatedTransport[]): Map<string, number> {
  const n = new Map(devs.map((d) => [d.name, 0]));
  for (const d of devs) {
    const reset = d.device.reset.bind(d.device);
    d.device.reset = () => { n.set(d.name, n.get(d.name)! + 1); reset(); };
  }
  return n;
}

test('the destination fails at the end (refuses to start): the source resumes its stopped devices and reports the destination\'s cause', async () => {
  const srcs = sources(2, { seed: 110 });
  const dst = [0, 1].map((i) => EmulatedTransport.create({ name: `emu${i}`, stateSize: 8 << 20, maxChunk: 256 << 10, zeroFill: true }));
  dst[1].device.setFault('fail-transition', 1); // RESUMING -> RUNNING fails EIO
  const resets = countResets(dst);
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', {}, { destinations: dst });
    const rx = failed(p.rx, ErrorCode.LOAD_REJECTED);
    const tx = failed(p.tx, ErrorCode.LOAD_REJECTED);
    assert.is((tx.report.cause as { device: string }).device, 'emu1');
    assert.equal(tx.report.cause, rx.report.cause, 'the same cause on both sides');
    for (const s of srcs) assert.is(stateOf(s), 'RUNNING', 'source resumed');
    // None is left running with the migrated state, and each is reset exactly once: by the failed load (what it
    // loaded is discarded, then STOP), the receiver not again.
    const states = (rx.report.devices as { state: string }[]).map((d) => d.state);
    assert.ok(states.every((st) => /^(reset \(state discarded\), STOP|STOP, reset)$/.test(st)), states.join(' | '));
    assert.equal([...resets.values()], [1, 1], `resets per destination: ${JSON.stringify([...resets])}`);
  } finally {
    for (const s of srcs) s.destroy();
    for (const d of dst) d.destroy();
  }
});

test('cancel on the source mid pre-copy: both sides report cancelled with the same cause; destinations released', async () => {
  const srcs = sources(3, { size: 32 << 20, seed: 130 });
  const ac = new AbortController();
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', { signal: ac.signal, maxRounds: 1000, downtimeLimitMs: 0, bandwidthCap: 40 << 20,
      onEvent: undefined }, {}, (rx) => rx.on('event', (e) => { if (e.type === 'progress' && e.devices.some((d) => d.bytes > 0)) ac.abort(); }));
    const tx = failed(p.tx, ErrorCode.CANCELLED);
    const rx = failed(p.rx, ErrorCode.CANCELLED);
    assert.is((rx.report.cause as { side: string }).side, 'source');
    assert.is((tx.report.cause as { side: string }).side, 'source');
    assert.is(rx.report.state, 'cancelled');
    assert.is(tx.report.state, 'cancelled');
    for (const s of srcs) assert.is(stateOf(s), 'RUNNING');
    assert.ok((rx.report.devices as { state: string }[]).every((d) => d.state.split('reset').length === 2 && d.state.endsWith(', released')),
      'each reset once (by the failed load or the receiver), then released');
  } finally {
    for (const s of srcs) s.destroy();
  }
});

test('cancel on the destination: the source stops, resumes its devices and reports the destination\'s cancel', async () => {
  const srcs = sources(2, { size: 32 << 20, seed: 150 });
  const ac = new AbortController();
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', { maxRounds: 1000, downtimeLimitMs: 0, bandwidthCap: 40 << 20 }, { signal: ac.signal },
      (rx) => rx.on('event', (e) => { if (e.type === 'progress' && e.devices.some((d) => d.bytes > 0)) ac.abort(); }));
    failed(p.rx, ErrorCode.CANCELLED);
    const tx = failed(p.tx, ErrorCode.CANCELLED);
    assert.is((tx.report.cause as { side: string }).side, 'destination');
    for (const s of srcs) assert.is(stateOf(s), 'RUNNING');
  } finally {
    for (const s of srcs) s.destroy();
  }
});

test('a destination that stops answering: the source times out, its devices RUNNING', async () => {
  // Answers the HELLO, then reads and says nothing (no ACCEPT, no PONG): a hung peer.
  const server = net.createServer((s) => {
    s.once('data', (b) => {
      const h = decodeHello(b.subarray(0, HELLO_SIZE));
      s.write(encodeReply({ status: HELLO_OK, version: WIRE_VERSION, session: h.session, channel: h.channel, serverMin: 1, serverMax: WIRE_VERSION }));
      s.on('data', () => undefined);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  const srcs = sources(2, { seed: 170 });
  try {
    const t0 = performance.now();
    const e = await send(srcs, { to: `tcp:127.0.0.1:${port}`, pool: srcPool, timeoutMs: 800, keepaliveMs: 100 }).catch((x) => x);
    failed(e, ErrorCode.PEER_TIMEOUT);
    assert.ok(performance.now() - t0 < 20_000, 'bounded');
    for (const s of srcs) assert.is(stateOf(s), 'RUNNING');
  } finally {
    for (const s of srcs) s.destroy();
    server.close();
  }
});

/**
 * A destination that goes away at a fixed point: before answering the HELLO, or once the device table has arrived
 * (the source then waits for ACCEPT before it opens any device: what a kill -9 of the destination at that moment does).
 */
async function vanishingDestination(when: 'before-reply' | 'after-table'): Promise<{ to: string; close: () => void }> {
  const server = net.createServer((s) => {
    s.on('error', () => undefined);
    let got = Buffer.alloc(0);
    let replied = false;
    s.on('data', (b) => {
      got = Buffer.concat([got, b]);
      if (got.length < HELLO_SIZE) return;
      if (when === 'before-reply') { s.destroy(); return; }
      if (!replied) {
        replied = true;
        const h = decodeHello(got.subarray(0, HELLO_SIZE));
        s.write(encodeReply({ status: HELLO_OK, version: WIRE_VERSION, session: h.session, channel: h.channel, serverMin: 1, serverMax: WIRE_VERSION }));
      }
      // Then the container's file header and its DEVICE_TABLE record; the source sends nothing more before ACCEPT.
      const rest = got.subarray(HELLO_SIZE);
      if (rest.length < FILE_HEADER_SIZE + RECORD_HEADER_SIZE) return;
      const t = decodeRecordHeader(rest.subarray(FILE_HEADER_SIZE), FILE_HEADER_SIZE);
      assert.is(t.type, REC_DEVICE_TABLE);
      if (rest.length >= FILE_HEADER_SIZE + RECORD_HEADER_SIZE + t.length) s.destroy();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { to: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, close: () => server.close() };
}

for (const when of ['before-reply', 'after-table'] as const) {
  test(`a destination gone ${when === 'before-reply' ? 'before answering the HELLO' : 'after the device table, before ACCEPT'}: no source device was opened; the report says so for each, all RUNNING`, async () => {
    const d = await vanishingDestination(when);
    const srcs = sources(2, { seed: 175 });
    try {
      const e = failed(await send(srcs, { to: d.to, pool: srcPool, timeoutMs: 5000 }).catch((x) => x), ErrorCode.PEER_GONE);
      const rb = e.report.rollback as string[];
      assert.equal(rb.map((x) => x.split(':')[0]), ['emu0', 'emu1'], `one line per source device: ${JSON.stringify(e.report)}`.slice(0, 600));
      assert.ok(rb.every((x) => /never reached: nothing changed/.test(x)), rb.join(' | '));
      for (const s of srcs) assert.is(stateOf(s), 'RUNNING');
      // After the table the migration exists (it started, then rolled back devices it never opened); before, it never did.
      const save = e.report.save as { rollback: { outcome: string }[] } | undefined;
      assert.equal(save?.rollback.map((r) => r.outcome), when === 'after-table' ? ['not-opened', 'not-opened'] : undefined);
    } finally {
      for (const s of srcs) s.destroy();
      d.close();
    }
  });
}

test('a source that stops sending: the destination times out and releases its devices', async () => {
  const rxEvents: LiveEvent[] = [];
  const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool: dstPool, timeoutMs: 600, onEvent: (e) => rxEvents.push(e) });
  const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const rp = rx.run().catch((e) => e);
  const port = Number(parseUri(await listening).text.split(':').pop());
  const c = net.connect(port, '127.0.0.1');
  c.on('error', () => undefined);
  c.write(encodeHello({ minVersion: 1, maxVersion: WIRE_VERSION, session: Buffer.alloc(16, 7), channel: 0, channels: 1, flags: 0 }));
  const e = failed(await rp, ErrorCode.PEER_TIMEOUT);
  assert.is(e.report.state, 'failed');
  c.destroy();
});

test('wire version: the highest common one is chosen; a peer with none in common is refused and told the range', async () => {
  assert.is(chooseVersion({ minVersion: 1, maxVersion: 9 }), WIRE_VERSION);
  assert.is(chooseVersion({ minVersion: WIRE_VERSION + 1, maxVersion: WIRE_VERSION + 3 }), 0);
  const rxEvents: LiveEvent[] = [];
  const ac = new AbortController();
  const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool: dstPool, signal: ac.signal, onEvent: (e) => rxEvents.push(e) });
  const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const rp = rx.run().catch((e) => e);
  const port = Number((await listening).split(':').pop());
  const reply = await new Promise<Buffer>((resolve) => {
    const c = net.connect(port, '127.0.0.1', () => c.write(encodeHello({ minVersion: WIRE_VERSION + 1, maxVersion: WIRE_VERSION + 2, session: Buffer.alloc(16, 1), channel: 0, channels: 1, flags: 0 })));
    let got = Buffer.alloc(0);
    c.on('data', (b) => { got = Buffer.concat([got, b]); if (got.length >= HELLO_SIZE) { resolve(got); c.destroy(); } });
  });
  const r = decodeReply(reply);
  assert.is(r.status, HELLO_VERSION);
  assert.is(r.serverMax, WIRE_VERSION);
  assert.ok(rxEvents.some((e) => e.type === 'rejected'), 'the destination reports the rejected connection and keeps listening');
  ac.abort();
  failed(await rp, ErrorCode.CANCELLED);
});

test('HELLO is checked: bad magic, bad checksum, out-of-range channel count', () => {
  const h = encodeHello({ minVersion: 1, maxVersion: 1, session: Buffer.alloc(16), channel: 0, channels: 1, flags: 0 });
  assert.equal(decodeHello(h).channels, 1);
  const bad = Buffer.from(h); bad[0] ^= 1;
  assert.throws(() => decodeHello(bad), (e: MigError) => e.code === ErrorCode.PEER_PROTOCOL);
  const crc = Buffer.from(h); crc[20] ^= 1;
  assert.throws(() => decodeHello(crc), (e: MigError) => e.code === ErrorCode.PEER_PROTOCOL && /checksum/.test(e.message));
  assert.throws(() => decodeHello(encodeHello({ minVersion: 1, maxVersion: 1, session: Buffer.alloc(16), channel: 0, channels: 65, flags: 0 })),
    (e: MigError) => /65 channels/.test(e.message));
});

test('URIs: tcp (v4, v6, any host), unix, fd, file; bad ones name the flag', () => {
  assert.equal(parseUri('tcp:127.0.0.1:4444'), { kind: 'tcp', host: '127.0.0.1', port: 4444, text: 'tcp:127.0.0.1:4444' });
  assert.is((parseUri('tcp:[::1]:5') as { host: string }).host, '::1');
  assert.is((parseUri('tcp::5') as { host: string }).host, '');
  assert.is(parseUri('unix:/tmp/x').kind, 'unix');
  assert.is((parseUri('fd:3') as { fd: number }).fd, 3);
  assert.is(parseUri('file:/tmp/x.vfmig').kind, 'file');
  for (const b of ['tcp:host', 'tcp:h:99999', 'udp:h:1', 'fd:x', 'unix:', 'nothing']) {
    assert.throws(() => parseUri(b, '--to'), (e: MigError) => e.code === ErrorCode.BAD_ARGUMENT && e.message.startsWith('--to'), b);
  }
});

test('file: URIs: send writes a container, receive loads it', async () => {
  const f = tmpFile('live-file');
  const srcs = sources(2, { seed: 190 });
  try {
    const tx = await send(srcs, { to: `file:${f}`, pool: srcPool, maxRounds: 2 });
    assert.ok(tx.ok);
    const rx = await new Receiver({ listen: `file:${f}`, pool: dstPool }).run();
    assert.equal(rx.load!.devices.map((d) => d.verified), [true, true]);
  } finally {
    for (const s of srcs) s.destroy();
    rm(f);
  }
});

test('switchover waits for the ack: pre-copy goes on (and then waits) until the gate opens, never stops a device before', async () => {
  const srcs = sources(2, { seed: 210, dirtyRate: 20000 });
  const f = tmpFile('gate');
  let ready = false;
  let readyAt = 0;
  let stopAt = 0;
  const waiters: (() => void)[] = [];
  setTimeout(() => { ready = true; readyAt = performance.now(); for (const w of waiters.splice(0)) w(); }, 600);
  try {
    const r = await saveDevices(srcs, f, srcPool, {
      maxRounds: 2, downtimeLimitMs: 1000,
      switchoverGate: { ready: () => ready, wait: (ms) => new Promise<void>((res) => { const t = setTimeout(res, ms); waiters.push(() => { clearTimeout(t); res(); }); }) },
    }, (m) => m.on('phase', (_f, to) => { if (to === 'stopcopy') stopAt = performance.now(); }));
    assert.ok(r.ok);
    assert.ok(readyAt > 0 && stopAt >= readyAt, `stop-and-copy began ${(stopAt - readyAt).toFixed(0)} ms after the ack`);
    assert.ok(r.rounds.length >= 1);
  } finally {
    for (const s of srcs) s.destroy();
    rm(f);
  }
});

test.run();
