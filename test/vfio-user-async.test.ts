// The main thread never waits on a vfio-user socket: requests that the engine makes on the main thread (register
// reads and writes, state changes, DEVICE_FEATURE, DIRTY_PAGES, resets) run on the libuv pool, so a server that is
// slow to answer stalls the device, never the event loop. A proxy process holds the matching request for 1.5 s; a
// 5 ms interval measures the largest gap between event-loop turns meanwhile. Each case also runs the synchronous
// call against the same stall, which shows the measurement catches a blocked loop.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { native } from '../src/addon/native.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, pendingRollback, saveDevices } from '../src/main/api.js';
import { asMigDevice } from '../src/main/protocol/v1/device.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import type { MigDevice } from '../src/main/device/seam.js';
import type { MigrationReport } from '../src/main/engine/migration.js';
import { DeviceServer, VfioUserClient, VfioUserTransport, connectVfioUser } from '../src/main/reach/vfio-user/index.js';
import { CMD } from '../src/main/reach/vfio-user/protocol.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { rm } from './helpers.js';
import { TMP, childReady, kill, killAll, loopGap, serverProcess, sockPath, stallProxy } from './vfu-procs.js';

const pool = new EnginePool({ threads: 2 });

const STALL_MS = 1500;
/** Far below the stall, far above any event-loop turn on a loaded 2-core machine. */
const FREE_MS = 500;

test('native regionRwAsync: a register read the server answers 1.5 s late leaves the event loop free; the sync read blocks it', async () => {
  const srv = DeviceServer.start({ socket: sockPath('async'), stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'trapped', dirtyRate: 0, dmaRate: 0 });
  const proxy = await stallProxy(srv.socket, CMD.REGION_READ, 8, STALL_MS); // pending_bytes
  const t = await VfioUserTransport.connect(proxy.socket, { timeoutMs: 5000 });
  try {
    const region = t.openRegion();
    const a = await loopGap(() => native().regionRwAsync(region.handle, 8, 8));
    assert.is(a.value.length, 8);
    assert.ok(a.gapMs < FREE_MS, `async: largest event-loop gap ${a.gapMs.toFixed(0)} ms during a ${STALL_MS} ms stall`);
    assert.ok(proxy.out().includes('stall 1'), 'the proxy did hold the read');
    const w = await loopGap(() => native().regionRwAsync(region.handle, 0, 4, new Uint8Array([1, 0, 0, 0]))); // RUNNING again
    assert.is(w.value.length, 0);
    // The control: the synchronous read of the same register waits the stall out on the main thread.
    const s = await loopGap(async () => native().regRead(region.handle, 8, 8));
    assert.ok(s.gapMs >= STALL_MS - 100, `sync: gap ${s.gapMs.toFixed(0)} ms (the measurement sees a blocked loop)`);
    assert.is(s.value, new DataView(a.value.buffer).getBigUint64(0, true), 'the same register, the same value');
  } finally {
    t.close(); kill(proxy.child, 'SIGTERM'); srv.stop();
  }
});

test('native regionRwAsync: errors carry errno and the region error text; bad arguments are refused at the call', async () => {
  const srv = DeviceServer.start({ socket: sockPath('async'), stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 });
  const t = await VfioUserTransport.connect(srv.socket, { timeoutMs: 5000 });
  try {
    const h = t.openRegion().handle;
    // A write to pending_bytes is refused by the server (EINVAL): the rejection names the access and the command.
    const e = await native().regionRwAsync(h, 8, 8, new Uint8Array(8)).then(() => null, (x: unknown) => x as { code: string; errno: number; message: string });
    assert.ok(e, 'rejected');
    assert.is(e!.code, 'EINVAL');
    assert.is(e!.errno, 22);
    assert.match(e!.message, /regionRwAsync\(h=\d+,off=8,len=8\).*REGION_WRITE/);
    assert.throws(() => native().regionRwAsync(h, 0, 0), /'len' must be an integer/);
    assert.throws(() => native().regionRwAsync(h, 2 ** 40, 8), /exceeds the region size/);
    assert.throws(() => native().regionRwAsync(h, 0, 4, new Uint8Array(8)), /'data' holds 8 bytes/);
    assert.throws(() => native().regionRwAsync(987654, 0, 4), /EBADF/);
    // The connection is still usable after a refused access (an error reply keeps the stream in step).
    const v = await native().regionRwAsync(h, 0, 4);
    assert.is(new DataView(v.buffer).getUint32(0, true), 1, 'device_state RUNNING');
  } finally {
    t.close(); srv.stop();
  }
});

/** SET of MIG_DEVICE_STATE (DEVICE_FEATURE flags: SET | feature 2). */
const SET_MIG_STATE = (1 << 17) | 2;

test('v2 over vfio-user through the engine: the server answers a state change 1.5 s late, the event loop stays free, the migration verifies', async () => {
  const src = await serverProcess(['--profile', 'v2', '--size', '2MiB', '--chunk', '128KiB', '--dirty-rate', '2000', '--seed', '4']);
  const dst = DeviceServer.start({ socket: sockPath('v2a'), profile: 'v2', stateSize: 2 << 20, maxChunk: 128 << 10, zeroFill: true, dirtyRate: 0, dmaRate: 0 });
  // The first two SETs of the save (RUNNING -> PRE_COPY, then the stop-and-copy transition) are held.
  const proxy = await stallProxy(src.socket, CMD.DEVICE_FEATURE, SET_MIG_STATE, STALL_MS, 2);
  const stream = path.join(TMP, 'v2-async.vfmig');
  const s = await connectVfioUser(proxy.socket) as MigDevice;
  const d = await connectVfioUser(dst.socket) as MigDevice;
  try {
    const t0 = performance.now();
    const save = await loopGap(() => saveDevices([s], stream, pool, {}));
    assert.ok(save.value.ok);
    assert.ok(proxy.out().includes('stall 2'), 'the proxy held both state changes');
    assert.ok(performance.now() - t0 >= 2 * STALL_MS, 'the save waited for the stalled server');
    assert.ok(save.gapMs < FREE_MS, `largest event-loop gap ${save.gapMs.toFixed(0)} ms while the server stalled ${STALL_MS} ms twice`);
    const { report } = await loadStream(stream, pool, { verify: true, makeDestination: () => d });
    assert.is(report.devices[0].verified, true);
  } finally {
    await s.close(); await d.close(); dst.stop(); kill(proxy.child, 'SIGTERM'); kill(src.child, 'SIGTERM'); rm(stream);
  }
});

test('v1 over vfio-user through the engine: the server answers device_state writes and DIRTY_PAGES 1.5 s late, the event loop stays free, the migration verifies', async () => {
  const src = await serverProcess(['--size', '2MiB', '--chunk', '128KiB', '--data-mode', 'trapped', '--dirty-rate', '2000', '--dma-rate', '500', '--seed', '6']);
  const dst = DeviceServer.start({ socket: sockPath('v1a'), stateSize: 2 << 20, maxChunk: 128 << 10, dataMode: 'trapped', zeroFill: true, dirtyRate: 0, dmaRate: 0 });
  // Two proxies in a row: the first two device_state writes of the save (RUNNING -> PRE_COPY, then -> STOP_COPY),
  // and the first DIRTY_PAGES request (START), are held STALL_MS each.
  const states = await stallProxy(src.socket, CMD.REGION_WRITE, 0, STALL_MS, 2);
  const dirty = await stallProxy(states.socket, CMD.DIRTY_PAGES, -1, STALL_MS, 1);
  const stream = path.join(TMP, 'v1-async.vfmig');
  const s = await VfioUserTransport.connect(dirty.socket, { guest: { iova: 0, size: 4096 * 4096 }, timeoutMs: 10_000 });
  const d = await VfioUserTransport.connect(dst.socket);
  try {
    const t0 = performance.now();
    const save = await loopGap(() => saveDevices([s], stream, pool, { maxRounds: 2, dirtyQueryIntervalMs: 10 }));
    assert.ok(save.value.ok);
    assert.ok(states.out().includes('stall 2'), 'the proxy held both state changes');
    assert.ok(dirty.out().includes('stall 1'), 'the proxy held DIRTY_PAGES');
    assert.ok(performance.now() - t0 >= 3 * STALL_MS, 'the save waited for the stalled server');
    assert.ok(save.value.dirty.pages[0] > 0, 'DIRTY_PAGES reported the DMA the device did');
    assert.ok(save.gapMs < FREE_MS, `largest event-loop gap ${save.gapMs.toFixed(0)} ms while the server stalled ${STALL_MS} ms three times`);
    const { report } = await loadStream(stream, pool, { verify: true, makeDestination: () => d });
    assert.is(report.devices[0].verified, true);
  } finally {
    s.close(); d.close(); dst.stop(); kill(dirty.child, 'SIGTERM'); kill(states.child, 'SIGTERM'); kill(src.child, 'SIGTERM'); rm(stream);
  }
});

test('connect to a server that does not accept (its listen backlog full): retried on the libuv pool until the timeout, the event loop stays free, VFM_PEER_GONE naming the device', async () => {
  // A listener with a backlog of 0 that never accepts: the first connection fills it, the next cannot complete.
  const socket = sockPath('backlog');
  const py = spawn('python3', ['-c', 'import socket,sys,time\ns=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);s.listen(0)\nprint("ready",flush=True)\ntime.sleep(60)', socket],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  const srv = await childReady(py, socket);
  const filler = net.connect(socket);
  await new Promise((r) => filler.once('connect', r));
  try {
    const c = await loopGap(() => VfioUserClient.connect(socket, { name: 'deaf', timeoutMs: STALL_MS }).then(() => null, (e: unknown) => e as MigError));
    assert.is(c.value?.code, ErrorCode.PEER_GONE);
    assert.is(c.value?.device, 'deaf');
    assert.match(c.value!.message, /cannot connect to vfio-user server: .*did not accept within 1500 ms \(its backlog is full\)/);
    assert.ok(c.gapMs < FREE_MS, `largest event-loop gap ${c.gapMs.toFixed(0)} ms while connecting for ${STALL_MS} ms`);
  } finally {
    filler.destroy(); kill(srv.child);
  }
});

/** pending_bytes by REGION_READ (16-byte access header: offset, region 9, count 8). */
const PENDING_READ = (() => { const b = Buffer.alloc(16); b.writeBigUInt64LE(8n, 0); b.writeUInt32LE(9, 8); b.writeUInt32LE(8, 12); return b; })();
const pbkdf2 = promisify(crypto.pbkdf2);
/** How long one job of the libuv pool takes to run from now (it waits for a free pool thread). */
async function poolJobMs(): Promise<number> {
  const t0 = performance.now();
  await pbkdf2('x', 'y', 1, 32, 'sha256');
  return performance.now() - t0;
}
async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 2000 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(cond(), what);
}

test('interrupt: requests held by stalled servers fill every libuv pool thread; interrupted, they fail at once with VFM_CANCELLED naming device and command, the pool runs again, and each connection stays in step', async () => {
  const STALL = 3000;
  const n = Number(process.env.UV_THREADPOOL_SIZE) || 4; // the pool's size: every thread of it gets a stalled request
  const servers = Array.from({ length: n }, (_, i) => DeviceServer.start({ socket: sockPath(`intr${i}`), stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'trapped', dirtyRate: 0, dmaRate: 0 }));
  const proxies = await Promise.all(servers.map((srv) => stallProxy(srv.socket, CMD.REGION_READ, 8, STALL, 2)));
  const clients = await Promise.all(proxies.map((p, i) => VfioUserClient.connect(p.socket, { name: `stalled${i}`, timeoutMs: 30_000 })));
  try {
    // The control: n held reads occupy the whole pool, so a pool job queued behind them waits for the servers.
    const held = clients.map((c) => c.ask(CMD.REGION_READ, PENDING_READ, 24, 24));
    const control = await poolJobMs();
    assert.ok(control >= STALL - 300, `control: a pool job waited ${control.toFixed(0)} ms behind ${n} stalled requests`);
    await Promise.all(held);
    // Again, and this time the requests are interrupted once every server holds its read.
    const again = clients.map((c) => c.ask(CMD.REGION_READ, PENDING_READ, 24, 24).then(() => null, (e: unknown) => e as MigError));
    await until(() => proxies.every((p) => p.out().includes('stall 2')), 'every proxy holds its second read');
    const job = poolJobMs();
    const t0 = performance.now();
    for (const c of clients) c.interrupt();
    const errs = await Promise.all(again);
    const settled = performance.now() - t0;
    errs.forEach((e, i) => {
      assert.ok(e instanceof MigError, `stalled${i}: rejected`);
      assert.is(e!.code, ErrorCode.CANCELLED);
      assert.is(e!.device, `stalled${i}`);
      assert.match(e!.message, /REGION_READ: interrupted while waiting for the reply/);
    });
    const jobMs = await job;
    // Generous bounds that only say "not the stall": the pool thread was released by the interrupt.
    assert.ok(settled < STALL / 2, `interrupted requests settled ${settled.toFixed(0)} ms after the interrupt (stall ${STALL} ms)`);
    assert.ok(jobMs < STALL / 2, `a pool job queued behind them ran after ${jobMs.toFixed(0)} ms (stall ${STALL} ms)`);
    // In step: the next request drops the reply owed to the interrupted one and gets its own.
    for (const c of clients) {
      const r = await c.ask(CMD.REGION_READ, PENDING_READ, 24, 24);
      assert.is(Buffer.from(r.reply).readBigUInt64LE(16), 0n, 'pending_bytes of a running device');
    }
  } finally {
    for (const c of clients) c.close();
    for (const p of proxies) kill(p.child, 'SIGTERM');
    for (const srv of servers) srv.stop();
  }
});

test('close during a stalled request: it fails at once with VFM_CANCELLED ("closed by this client"), naming device and command; a region still holding the connection fails at once', async () => {
  const srv = DeviceServer.start({ socket: sockPath('intr-close'), stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'trapped', dirtyRate: 0, dmaRate: 0 });
  const proxy = await stallProxy(srv.socket, CMD.REGION_READ, 8, 3000, 1);
  const c = await VfioUserClient.connect(proxy.socket, { name: 'closing', timeoutMs: 30_000 });
  // A region handle (as a worker's data path holds one) keeps the connection object alive after the close.
  const h = c.openRegion(c.findByType(3, 1)!);
  try {
    const p = c.ask(CMD.REGION_READ, PENDING_READ, 24, 24).then(() => null, (e: unknown) => e as MigError);
    await until(() => proxy.out().includes('stall 1'), 'the proxy holds the read');
    const t0 = performance.now();
    c.close();
    const e = await p;
    assert.ok(performance.now() - t0 < 1500, 'settled at the close, not at the stall');
    assert.is(e?.code, ErrorCode.CANCELLED);
    assert.is(e?.device, 'closing');
    assert.match(e!.message, /REGION_READ: the connection was closed by this client while waiting for the reply/);
    const e2 = await native().regionRwAsync(h, 0, 4).then(() => null, (x: { code: string; message: string }) => x);
    assert.is(e2?.code, 'ECANCELED');
    assert.match(e2!.message, /closed by this client/);
  } finally {
    native().regionClose(h); c.close(); kill(proxy.child, 'SIGTERM'); srv.stop();
  }
});

test('cancel while a v1 state change waits for a stalled server: the request is released (no timeout breaks the connection), the rollback gets the late answer and the device runs again', async () => {
  // The server answers the first device_state write after 4 s; the client's timeout is 3 s. Cancelled 2 s into the
  // stall, the request is released at once (without the interrupt it times out at 3 s, the connection is broken and
  // the device stays in PRE_COPY); the rollback's first request reads and drops the owed answer (at 4 s, within its
  // own timeout) and walks the device back to RUNNING.
  const STALL = 4000;
  const src = await serverProcess(['--size', '1MiB', '--chunk', '64KiB', '--data-mode', 'trapped', '--dirty-rate', '0', '--dma-rate', '0', '--seed', '8']);
  const proxy = await stallProxy(src.socket, CMD.REGION_WRITE, 0, STALL, 1);
  const s = await VfioUserTransport.connect(proxy.socket, { name: 'slow', timeoutMs: 3000 });
  const other = EmulatedTransport.create({ name: 'other', stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 });
  const ac = new AbortController();
  try {
    const p = saveDevices([s, other], path.join(TMP, 'cancel-v1.vfmig'), pool, { signal: ac.signal }).then(() => null, (e: unknown) => e as MigError);
    await until(() => proxy.out().includes('stall 1'), 'the proxy holds the state change');
    await new Promise((r) => setTimeout(r, STALL / 2));
    ac.abort();
    const e = await p;
    assert.is(e?.code, ErrorCode.CANCELLED, e?.message);
    const finals = await pendingRollback(e) ?? (e as MigError & { report: MigrationReport }).report.rollback!;
    const slow = finals.find((r) => r.device === 'slow');
    assert.is(slow?.outcome, 'resumed', JSON.stringify(finals));
    assert.is(await asMigDevice(s).state(), 'RUNNING');
    assert.is(other.device.info().deviceState & 7, 1, 'the other device runs again');
  } finally {
    s.close(); other.destroy(); kill(proxy.child, 'SIGTERM'); kill(src.child, 'SIGTERM');
  }
});

test('cancel while the RESUMING write of a v1 destination waits for a stalled server: released, the load is cancelled and the destination is left stopped, not RESUMING', async () => {
  const STALL = 4000;
  const stream = path.join(TMP, 'cancel-load.vfmig');
  const src = DeviceServer.start({ socket: sockPath('cl-src'), stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'trapped', seed: 9, dirtyRate: 0, dmaRate: 0 });
  const dst = DeviceServer.start({ socket: sockPath('cl-dst'), stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'trapped', zeroFill: true, dirtyRate: 0, dmaRate: 0 });
  const proxy = await stallProxy(dst.socket, CMD.REGION_WRITE, 0, STALL, 1);
  const ac = new AbortController();
  try {
    const s = await VfioUserTransport.connect(src.socket);
    assert.ok((await saveDevices([s], stream, pool, {})).ok);
    s.close();
    const d = await VfioUserTransport.connect(proxy.socket, { name: 'dest', timeoutMs: 3000 });
    try {
      const p = loadStream(stream, pool, { signal: ac.signal, makeDestination: () => d }).then(() => null, (e: unknown) => e as MigError);
      await until(() => proxy.out().includes('stall 1'), 'the proxy holds RESUMING');
      await new Promise((r) => setTimeout(r, STALL / 2));
      ac.abort();
      const e = await p;
      assert.is(e?.code, ErrorCode.CANCELLED, e?.message);
      // The failed load reset and stopped its destination through the same connection (in step after the interrupt).
      assert.is(await asMigDevice(d).state(), 'STOP');
    } finally {
      d.close();
    }
  } finally {
    kill(proxy.child, 'SIGTERM'); src.stop(); dst.stop(); rm(stream);
  }
});

test.after(async () => {
  killAll();
  await pool.close();
});
test.run();
