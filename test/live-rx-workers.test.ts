// Data channels received off the destination's main thread (src/workers/channel-rx.ts, QEMU's multifd recv
// threads): each channel 1..N-1 of a plain TCP or UNIX connection is read by a worker thread of its own, which checks
// and applies its devices' CHUNKs. Digests verify through that path; a corrupted record on channel 3 is named (device,
// channel, offset) and ends the migration on both sides with the source RUNNING and no destination started; a cancel
// stops the workers.
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { Receiver, type ReceiveOptions, type ReceiveReport } from '../src/main/live/receiver.js';
import { send, type SendOptions, type SendReport } from '../src/main/live/sender.js';
import type { EngineDevice } from '../src/main/engine/source-device.js';
import { HELLO_SIZE, SocketReader } from '../src/main/live/wire.js';
import { socketFd } from '../src/main/live/conn.js';
import { native } from '../src/addon/native.js';
import { destroyEmulated, emulatedDeviceOf, emulatedV2 } from '../src/main/reach/emulated/v2.js';

const srcPool = new EnginePool({ threads: 2 });
const dstPool = new EnginePool({ threads: 2 });
test.after(async () => { await srcPool.close(); await dstPool.close(); });

function sources(n: number, size = 8 << 20): EmulatedTransport[] {
  return Array.from({ length: n }, (_, i) => EmulatedTransport.create({
    name: `emu${i}`, stateSize: size, maxChunk: 256 << 10, seed: 70 + i, dirtyRate: 5000, dmaRate: 500, profile: 'linux-5.8',
  }));
}

async function pair(srcs: EngineDevice[], listen: string, so: Partial<SendOptions> = {}, ro: Partial<ReceiveOptions> = {},
  via?: (to: string) => Promise<string>): Promise<{ tx: SendReport | MigError; rx: ReceiveReport | MigError }> {
  const rx = new Receiver({ listen, pool: dstPool, timeoutMs: 10_000, ...ro });
  const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const rp = rx.run().catch((e: MigError) => e);
  const at = await Promise.race([listening, rp.then((e) => { throw e; })]);
  const to = via ? await via(at) : at;
  const tx = await send(srcs, { to, pool: srcPool, timeoutMs: 10_000, maxRounds: 3, downtimeLimitMs: 20, ...so }).catch((e: MigError) => e);
  return { tx, rx: await rp };
}

function ok<T>(x: T | MigError): T {
  if (x instanceof MigError) throw new Error(`expected success, got ${x.code}: ${x.message}`);
  return x;
}

test('4 channels over TCP: channels 1..3 are received by worker threads, every destination verifies', async () => {
  const srcs = sources(4);
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', { channels: 4 });
    const rx = ok(p.rx);
    ok(p.tx);
    assert.is(rx.receiveWorkers, 3);
    assert.equal(rx.devices.map((d) => d.verified), [true, true, true, true]);
    // What the workers applied came back to the loader's report: every device's whole state.
    for (const d of rx.load!.devices) assert.ok(d.dataBytes >= 8 << 20, `${d.name}: ${d.dataBytes} bytes applied`);
    assert.ok(rx.channelBytes!.every((b) => b > 8 << 20), JSON.stringify(rx.channelBytes));
  } finally {
    for (const d of srcs) d.destroy();
  }
});

test('4 channels over a UNIX socket, 6 devices (channels 1 and 2 carry two each): received by workers, all verify', async () => {
  const srcs = sources(6, 4 << 20);
  const sock = path.join(os.tmpdir(), `vfm-rxw-${process.pid}.sock`);
  try {
    const p = await pair(srcs, `unix:${sock}`, { channels: 4 });
    const rx = ok(p.rx);
    assert.is(rx.receiveWorkers, 3);
    assert.equal(rx.devices.map((d) => d.verified), [true, true, true, true, true, true]);
  } finally {
    for (const d of srcs) d.destroy();
  }
});

test('4 channels, v2 PRE_COPY devices: the switchover-ack waits for every init-data marker, also those applied by workers', async () => {
  const srcs = [0, 1, 2, 3].map((i) => emulatedV2({ name: `v2d${i}`, stateSize: 4 << 20, maxChunk: 256 << 10, seed: 90 + i, dirtyRate: 2000 }));
  // Device 3 (channel 3, a worker's) reads its initial bytes slowly: the ack must wait for its marker.
  emulatedDeviceOf(srcs[3])!.setFault('slow-chunk', 2000);
  const events: string[] = [];
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', { channels: 4, maxRounds: 30, downtimeLimitMs: 60_000, roundTimeMs: 20 },
      { onEvent: (e) => events.push(e.type === 'init-data-loaded' ? `init:${e.device}` : e.type) });
    const rx = ok(p.rx);
    ok(p.tx);
    assert.is(rx.receiveWorkers, 3);
    assert.equal(rx.devices.map((d) => d.verified), [true, true, true, true]);
    const ack = events.indexOf('switchover-ack');
    const inits = events.filter((e) => e.startsWith('init:'));
    assert.equal([...inits].sort(), ['init:v2d0', 'init:v2d1', 'init:v2d2', 'init:v2d3']);
    assert.ok(ack > events.indexOf('init:v2d3'), `the ack came before v2d3's marker was applied: ${events.join(' ')}`);
  } finally {
    for (const d of srcs) destroyEmulated(d);
  }
});

test('hand-over: Node stops reading, the bytes it had come back, and the fd then yields exactly the rest', async () => {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = net.connect({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port });
  try {
    const s = await accepted;
    const reader = new SocketReader(s, 'test');
    client.write(Buffer.alloc(100, 1));
    while (reader.buffered < 100) await new Promise((r) => setTimeout(r, 5));
    let late: MigError | undefined;
    const prefix = reader.detach((e) => { late = e; });
    assert.equal([...prefix], Array(100).fill(1));
    client.write(Buffer.alloc(50, 2));
    await new Promise((r) => setTimeout(r, 100)); // an event loop turn or more: Node must not read them
    const buf = new Uint8Array(64);
    const n = native().dataFdRead(socketFd(s), buf, 0, 64, 1000);
    assert.is(n, 50);
    assert.equal([...buf.subarray(0, 50)], Array(50).fill(2));
    assert.is(late, undefined);
  } finally {
    client.destroy();
    server.close();
  }
});

/** A TCP proxy that flips one byte of channel `channel`'s source-to-destination stream, `at` bytes after its HELLO. */
async function corruptingProxy(target: string, channel: number, at: number): Promise<{ uri: string; close: () => void; flipped: () => boolean }> {
  const [, host, port] = /^tcp:(.*):(\d+)$/.exec(target)!;
  let flipped = false;
  const server = net.createServer((c) => {
    const up = net.connect({ host, port: Number(port) });
    let seen = 0;
    let chan = -1;
    const head: Buffer[] = [];
    c.on('data', (b: Buffer) => {
      if (chan < 0) {
        head.push(b);
        const h = Buffer.concat(head);
        if (h.length >= HELLO_SIZE) chan = h.readUInt32LE(32);
      }
      const pos = HELLO_SIZE + at - seen;
      if (chan === channel && pos >= 0 && pos < b.length) { b = Buffer.from(b); b[pos] ^= 0x5a; flipped = true; }
      seen += b.length;
      up.write(b);
    });
    up.on('data', (b) => c.write(b));
    c.on('end', () => up.end());
    up.on('end', () => c.end());
    c.on('error', () => up.destroy());
    up.on('error', () => c.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const a = server.address() as net.AddressInfo;
  return { uri: `tcp:127.0.0.1:${a.port}`, close: () => server.close(), flipped: () => flipped };
}

test('a corrupted CHUNK on channel 3 (received by its worker): the error names the device, the channel and the offset; source RUNNING, no destination started', async () => {
  const srcs = sources(4);
  let proxy: Awaited<ReturnType<typeof corruptingProxy>> | undefined;
  try {
    // 20000 bytes into channel 3: inside the body of emu3's first data CHUNK (after its small setup record).
    const p = await pair(srcs, 'tcp:127.0.0.1:0', { channels: 4 }, {}, async (to) => { proxy = await corruptingProxy(to, 3, 20_000); return proxy.uri; });
    assert.ok(proxy!.flipped(), 'the proxy flipped a byte');
    assert.instance(p.rx, MigError);
    const e = p.rx as MigError & { report: ReceiveReport };
    assert.is(e.code, ErrorCode.STREAM_CHECKSUM, e.message);
    assert.is(e.device, 'emu3');
    assert.match(e.message, /channel 3/);
    assert.ok(typeof e.offset === 'number' && e.offset > 0 && e.offset < 20_000, `offset ${e.offset}: ${e.message}`);
    // Both sides report the destination's cause; the source's devices are RUNNING again.
    assert.instance(p.tx, MigError);
    assert.is((p.tx as MigError).code, ErrorCode.STREAM_CHECKSUM, (p.tx as MigError).message);
    for (const d of srcs) assert.is(d.openRegion().state(), 'RUNNING', d.name);
    // No destination was started: each was reset and released.
    assert.is(e.report.devices.length, 4);
    for (const d of e.report.devices) assert.match(d.state, /reset/, `${d.name}: ${d.state}`);
  } finally {
    proxy?.close();
    for (const d of srcs) d.destroy();
  }
});

test('cancel on the destination while the workers apply: both sides report the cancel, workers stopped, destinations reset', async () => {
  const srcs = sources(4, 16 << 20);
  // 20 ms per source chunk, 64 chunks a device: the transfer takes over a second, so it is under way, not over, when
  // the first progress sample (200 ms) shows data applied by channel 3's worker and the cancel comes.
  for (const d of srcs) d.device.setFault('slow-chunk', 20_000);
  const ac = new AbortController();
  try {
    const p = await pair(srcs, 'tcp:127.0.0.1:0', { channels: 4, maxRounds: 0 }, {
      signal: ac.signal,
      // Once a worker-received device has data applied (it reports progress by message), cancel.
      onLoader: (l) => l.on('progress', (e) => { if (e.index === 3 && e.bytes > 0) ac.abort(); }),
    });
    assert.ok(ac.signal.aborted, 'cancelled mid-transfer');
    assert.instance(p.rx, MigError);
    const e = p.rx as MigError & { report: ReceiveReport };
    assert.is(e.code, ErrorCode.CANCELLED, e.message);
    assert.instance(p.tx, MigError);
    assert.is((p.tx as MigError).code, ErrorCode.CANCELLED, (p.tx as MigError).message);
    for (const d of srcs) assert.is(d.openRegion().state(), 'RUNNING', d.name);
    for (const d of e.report.devices) assert.match(d.state, /reset/, `${d.name}: ${d.state}`);
  } finally {
    for (const d of srcs) d.destroy();
  }
});

test.run();
