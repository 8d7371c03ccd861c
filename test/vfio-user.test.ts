// The vfio-user reach against real peers: vfio-mig's device server in separate processes (both data paths, a running
// workload, digests verified end to end, 8 in parallel), a killed and a stalled server, a hostile fake server, and
// the server against a hostile client. Devices are small so each case takes well under a second of work.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { EnginePool } from '../src/main/engine/pool.js';
import { saveDevices, loadStream, pendingRollback } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { DeviceServer, VfioUserClient, VfioUserTransport, connectVfioUser } from '../src/main/reach/vfio-user/index.js';
import type { MigDevice } from '../src/main/device/seam.js';
import { CMD } from '../src/main/reach/vfio-user/protocol.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import type { MigrationReport } from '../src/main/engine/migration.js';
import { rejectsCode, rm, runCli } from './helpers.js';
import { BIN, TMP, childReady, fdServer, fdsOn, hostile, kill, killAll, serverProcess, sockPath } from './vfu-procs.js';

const GUEST = { iova: 0, size: 4096 * 4096 };

const pool = new EnginePool({ threads: 2 });

async function roundTrip(mode: 'mmap' | 'trapped'): Promise<{ save: MigrationReport; requests: number; mapped: number }> {
  // slow-chunk keeps each round long enough (>= 16 x 2 ms) for the workload to dirty pages however busy the machine is.
  const src = await serverProcess(['--size', '4MiB', '--chunk', '256KiB', '--data-mode', mode, '--dirty-rate', '20000', '--dma-rate', '2000', '--seed', '5', '--fault', 'slow-chunk:2000']);
  const dst = await serverProcess(['--size', '4MiB', '--chunk', '256KiB', '--data-mode', mode, '--zero']);
  const stream = path.join(TMP, `rt-${mode}.vfmig`);
  const s = await VfioUserTransport.connect(src.socket, { guest: GUEST });
  const d = await VfioUserTransport.connect(dst.socket);
  try {
    // Let the workload dirty pages first, so pre-copy has a second round to send.
    await new Promise((r) => setTimeout(r, 100));
    const save = await saveDevices([s], stream, pool, { downtimeLimitMs: 0, maxRounds: 3, dirtyQueryIntervalMs: 10 });
    assert.ok(save.ok);
    const { report } = await loadStream(stream, pool, { verify: true, makeDestination: () => d });
    assert.is(report.devices[0].verified, true, 'destination digest (from the destination server) equals the source server digest');
    assert.ok(report.devices[0].digest?.startsWith('sha256:'));
    return { save, requests: s.client.requests, mapped: s.mappedAreas().length };
  } finally {
    s.close(); d.close(); kill(src.child, 'SIGTERM'); kill(dst.child, 'SIGTERM'); rm(stream);
  }
}

test('client vs device-server processes, mmap data path: pre-copy with a running workload, dirty pages, digests verified', async () => {
  const r = await roundTrip('mmap');
  assert.ok(r.mapped > 0, 'the sparse data area was mapped from the descriptor the server passed');
  const d = r.save.devices[0];
  assert.ok(d.precopyBytes + d.stopCopyBytes > 4 << 20, 'pages the workload dirtied during the save were sent again');
  assert.ok(r.save.dirty.pages[0] > 0, 'DIRTY_PAGES reported the DMA the device did');
  assert.ok(r.requests < 2000, `${r.requests} requests: data did not go through REGION_READ`);
});

test('client vs device-server processes, trapped data path (REGION_READ/WRITE only), digests verified', async () => {
  const r = await roundTrip('trapped');
  assert.is(r.mapped, 0);
  const d = r.save.devices[0];
  assert.ok(d.precopyBytes + d.stopCopyBytes > 4 << 20, 'pages the workload dirtied during the save were sent again');
});

test('8 devices served by 8 server processes, migrated in parallel into 8 in-process servers, verified', async () => {
  const srcs = await Promise.all(Array.from({ length: 8 }, (_, i) => serverProcess(['--size', '1MiB', '--chunk', '64KiB', '--seed', String(i + 1), '--dirty-rate', '500', '--data-mode', i % 2 ? 'trapped' : 'mmap'])));
  const dsts = srcs.map((_, i) => DeviceServer.start({ socket: sockPath('dst'), stateSize: 1 << 20, maxChunk: 64 << 10, zeroFill: true, dirtyRate: 0, dmaRate: 0, dataMode: i % 2 ? 'trapped' : 'mmap' }));
  const stream = path.join(TMP, 'eight.vfmig');
  const ts = await Promise.all(srcs.map((s) => VfioUserTransport.connect(s.socket)));
  const ds = await Promise.all(dsts.map((s) => VfioUserTransport.connect(s.socket)));
  try {
    const save = await saveDevices(ts, stream, pool, {});
    assert.ok(save.ok);
    const digests = new Set(save.devices.map((d) => d.digest));
    assert.is(digests.size, 8, 'eight different devices');
    const { report } = await loadStream(stream, pool, { verify: true, makeDestination: (e) => ds[e.index] });
    assert.equal(report.devices.map((d) => d.verified), Array(8).fill(true));
  } finally {
    for (const t of [...ts, ...ds]) t.close();
    for (const s of dsts) s.stop();
    for (const s of srcs) kill(s.child, 'SIGTERM');
    rm(stream);
  }
});

/** A migration of a slow vfio-user device (server process) and an emulated device; `act` hits the server mid-save. */
async function failMidSave(act: (c: ChildProcess) => void, timeoutMs: number, code: string): Promise<void> {
  const src = await serverProcess(['--size', '4MiB', '--chunk', '64KiB', '--fault', 'slow-chunk:40000', '--dirty-rate', '0']);
  const other = EmulatedTransport.create({ name: 'other', stateSize: 4 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 });
  const t = await VfioUserTransport.connect(src.socket, { timeoutMs });
  const stream = path.join(TMP, 'fail.vfmig');
  const t0 = performance.now();
  try {
    const p = saveDevices([t, other], stream, pool, {}, (m) => m.on('phase', (_from, to) => {
      if (to === 'precopy') setTimeout(() => act(src.child), 150);
    }));
    const e = await rejectsCode(p, code);
    assert.is(e.device, src.socket, 'the error names the vfio-user device');
    const rep = (e as MigError & { report: MigrationReport }).report;
    assert.ok(rep.rollback!.some((r) => r.device === 'other' && (r.outcome === 'resumed' || r.outcome === 'was-running')), JSON.stringify(rep.rollback));
    assert.is(other.device.info().deviceState & 7, 1, 'the other device runs again');
    assert.ok(performance.now() - t0 < 20_000, 'bounded');
  } finally {
    t.close(); other.destroy(); kill(src.child, 'SIGCONT'); kill(src.child); rm(stream);
  }
}

test('a server killed mid-save: VFM_PEER_GONE naming the device, the other device rolled back', async () => {
  await failMidSave((c) => kill(c, 'SIGKILL'), 5000, ErrorCode.PEER_GONE);
});

test('a server that stalls mid-save: VFM_PEER_TIMEOUT within the per-request timeout, the other device rolled back', async () => {
  await failMidSave((c) => kill(c, 'SIGSTOP'), 400, ErrorCode.PEER_TIMEOUT);
});

test('a server killed mid-save next to a healthy vfio-user device: the request in flight of the healthy one is interrupted and drained, it is rolled back to RUNNING and migrates again, verified', async () => {
  const SLOW = ['--size', '4MiB', '--chunk', '64KiB', '--data-mode', 'trapped', '--fault', 'slow-chunk:20000', '--dirty-rate', '0'];
  const doomed = await serverProcess(SLOW);
  const healthy = await serverProcess([...SLOW, '--seed', '17']);
  const dst = DeviceServer.start({ socket: sockPath('healthy-dst'), stateSize: 4 << 20, maxChunk: 64 << 10, dataMode: 'trapped', zeroFill: true, dirtyRate: 0, dmaRate: 0 });
  const a = await VfioUserTransport.connect(doomed.socket, { timeoutMs: 5000 });
  const b = await VfioUserTransport.connect(healthy.socket, { name: 'healthy', timeoutMs: 5000 });
  const d = await VfioUserTransport.connect(dst.socket);
  const stream = path.join(TMP, 'healthy.vfmig');
  try {
    const p = saveDevices([a, b], stream, pool, {}, (m) => m.on('phase', (_from, to) => {
      if (to === 'precopy') setTimeout(() => kill(doomed.child, 'SIGKILL'), 150);
    }));
    const e = await rejectsCode(p, ErrorCode.PEER_GONE);
    const rep = (e as MigError & { report: MigrationReport }).report;
    const finals = await (pendingRollback(e) ?? Promise.resolve(rep.rollback!));
    const hb = finals.find((r) => r.device === 'healthy');
    assert.ok(hb && (hb.outcome === 'resumed' || hb.outcome === 'was-running'), JSON.stringify(finals));
    // The healthy device's connection is in step: it migrates again, end to end.
    const save = await saveDevices([b], stream, pool, { force: true });
    assert.ok(save.ok);
    const { report } = await loadStream(stream, pool, { verify: true, makeDestination: () => d });
    assert.is(report.devices[0].verified, true);
  } finally {
    a.close(); b.close(); d.close(); dst.stop(); kill(doomed.child); kill(healthy.child, 'SIGTERM'); rm(stream);
  }
});

const HOSTILE_CASES: [string, string | string[]][] = [
  ['wrong-id', ErrorCode.PEER_PROTOCOL], ['wrong-cmd', ErrorCode.PEER_PROTOCOL], ['truncated', [ErrorCode.PEER_GONE, ErrorCode.PEER_PROTOCOL]],
  ['huge-size', ErrorCode.PEER_PROTOCOL], ['error-flag-body', ErrorCode.PEER_PROTOCOL], ['short-count', ErrorCode.PEER_PROTOCOL],
  ['error-reply', [ErrorCode.NATIVE, ErrorCode.PEER_ERROR]], ['stall', ErrorCode.PEER_TIMEOUT], ['close', ErrorCode.PEER_GONE],
  ['huge-pending', ErrorCode.VENDOR_BAD_VALUE],
];

test('a hostile fake server mid-save (wrong msg_id/cmd, truncated, huge sizes, error flags, short replies, stalls): clear error, others rolled back', async () => {
  for (const [mode, code] of HOSTILE_CASES) {
    const h = await hostile(mode);
    const other = EmulatedTransport.create({ name: 'other', stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 });
    const t = await VfioUserTransport.connect(h.socket, { timeoutMs: 300 });
    const rss0 = process.memoryUsage().rss;
    try {
      const e = await rejectsCode(saveDevices([t, other], path.join(TMP, 'hostile.vfmig'), pool, {}), code);
      assert.is(e.device, h.socket, `${mode}: error names the device`);
      assert.is(other.device.info().deviceState & 7, 1, `${mode}: the other device was rolled back`);
      assert.ok(process.memoryUsage().rss - rss0 < 256 << 20, `${mode}: no allocation from the hostile size`);
    } finally {
      t.close(); other.destroy(); kill(h.child, 'SIGTERM');
    }
  }
});

test('a hostile server passing unexpected descriptors (on a register read, a state change, an error reply, a body; too many): VFM_PEER_PROTOCOL naming device and command, descriptors closed, others rolled back', async () => {
  const cases: [string, RegExp][] = [
    ['fd-on-read', /REGION_READ: reply carried file descriptors/], ['fd-on-state', /REGION_WRITE: reply carried file descriptors/],
    ['many-fds', /REGION_READ: reply carried more file descriptors than a message may/],
    ['fd-on-error', /REGION_READ: error reply carried file descriptors/], ['fd-on-body', /REGION_READ: reply carried file descriptors/],
  ];
  for (const [mode, why] of cases) {
    const h = await fdServer(mode);
    const other = EmulatedTransport.create({ name: 'other', stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 });
    const before = fdsOn('/dev/null');
    const t = await VfioUserTransport.connect(h.socket, { timeoutMs: 2000 });
    try {
      const e = await rejectsCode(saveDevices([t, other], path.join(TMP, 'fds.vfmig'), pool, {}), ErrorCode.PEER_PROTOCOL);
      assert.is(e.device, h.socket, `${mode}: the error names the device`);
      assert.match(e.message, why, `${mode}: the error names the command (${e.message})`);
      assert.is(other.device.info().deviceState & 7, 1, `${mode}: the other device was rolled back`);
      assert.is(fdsOn('/dev/null'), before, `${mode}: every descriptor the server passed was closed`);
    } finally {
      t.close(); other.destroy(); kill(h.child, 'SIGTERM');
    }
  }
});

test('hostile server during negotiation and discovery: refused clearly', async () => {
  for (const [mode, code] of [['no-migration', ErrorCode.PEER_NO_MIGRATION], ['version-error', ErrorCode.PEER_ERROR],
    ['version-huge', ErrorCode.PEER_PROTOCOL], ['cap-loop', ErrorCode.BAD_REGION_INFO], ['many-regions', ErrorCode.PEER_PROTOCOL]] as const) {
    const h = await hostile(mode);
    try {
      const e = await rejectsCode(VfioUserTransport.connect(h.socket, { timeoutMs: 500 }), code);
      assert.is(e.device, h.socket, mode);
    } finally {
      kill(h.child, 'SIGTERM');
    }
  }
  await rejectsCode(VfioUserTransport.connect(path.join(TMP, 'nobody.sock')), ErrorCode.PEER_GONE);
});

test('write-type requests carry at most the configured bound', async () => {
  for (const bound of [4096, 16384]) {
    const src = DeviceServer.start({ socket: sockPath('wb'), stateSize: 1 << 20, maxChunk: 256 << 10, dataMode: 'trapped', dirtyRate: 0, dmaRate: 0 });
    const dst = DeviceServer.start({ socket: sockPath('wb'), stateSize: 1 << 20, maxChunk: 256 << 10, dataMode: 'trapped', zeroFill: true, dirtyRate: 0, dmaRate: 0 });
    const s = await VfioUserTransport.connect(src.socket);
    const d = await VfioUserTransport.connect(dst.socket, { writeBound: bound });
    const stream = path.join(TMP, 'wb.vfmig');
    try {
      await saveDevices([s], stream, pool, {});
      const { report } = await loadStream(stream, pool, { verify: true, makeDestination: () => d });
      assert.is(report.devices[0].verified, true);
      assert.is(dst.stats().largestWrite, bound, `largest REGION_WRITE with bound ${bound}`);
      assert.ok(dst.stats().requests > (1 << 20) / bound, 'the data was split');
    } finally {
      s.close(); d.close(); src.stop(); dst.stop(); rm(stream);
    }
  }
});

// ---- the server against a hostile client ------------------------------------------------------------------------
function rawClient(socket: string) {
  const c = net.connect(socket);
  let buf = Buffer.alloc(0);
  let closed = false;
  const waiters: (() => void)[] = [];
  c.on('data', (d) => { buf = Buffer.concat([buf, d]); waiters.splice(0).forEach((w) => w()); });
  c.on('close', () => { closed = true; waiters.splice(0).forEach((w) => w()); });
  c.on('error', () => undefined);
  let id = 100;
  return {
    async send(cmd: number, body: Buffer, o: { size?: number; flags?: number } = {}) {
      const h = Buffer.alloc(16);
      h.writeUInt16LE(++id, 0); h.writeUInt16LE(cmd, 2); h.writeUInt32LE(o.size ?? 16 + body.length, 4); h.writeUInt32LE(o.flags ?? 0, 8);
      c.write(Buffer.concat([h, body]));
      const t0 = Date.now();
      while (buf.length < 16 || buf.length < buf.readUInt32LE(4)) {
        if (closed) return { closed: true, flags: 0, errno: 0, body: Buffer.alloc(0), id: -1 };
        if (Date.now() - t0 > 5000) throw new Error('no reply');
        await new Promise<void>((r) => { waiters.push(r); setTimeout(r, 50); });
      }
      const size = buf.readUInt32LE(4);
      const m = { closed: false, id: buf.readUInt16LE(0), flags: buf.readUInt32LE(8), errno: buf.readUInt32LE(12), body: buf.subarray(16, size) };
      buf = buf.subarray(size);
      assert.is(m.id, id, 'the reply echoes msg_id');
      return m;
    },
    async closedSoon() {
      for (let i = 0; i < 100 && !closed; i++) await new Promise((r) => setTimeout(r, 20));
      return closed;
    },
    end() { c.destroy(); },
  };
}
const ver = () => Buffer.concat([Buffer.from([0, 0, 2, 0]), Buffer.from('{"capabilities":{"migration":{"pgsize":4096}}}\0')]);
const access = (off: number, count: number, region = 9, data?: Buffer) => {
  const b = Buffer.alloc(16);
  b.writeBigUInt64LE(BigInt(off), 0); b.writeUInt32LE(region, 8); b.writeUInt32LE(count, 12);
  return data ? Buffer.concat([b, data]) : b;
};

test('device server vs a hostile client: error replies for malformed requests, state kept, one client at a time', async () => {
  const srv = DeviceServer.start({ socket: sockPath('hc'), stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, maxDataXfer: 65536 });
  try {
    const c = rawClient(srv.socket);
    let r = await c.send(4, Buffer.alloc(16));
    assert.ok(r.flags & 0x20, 'a command before VERSION is refused'); assert.is(r.errno, 22);
    r = await c.send(1, Buffer.from([1, 0, 0, 0]));
    assert.ok(r.flags & 0x20, 'major 1 refused');
    assert.ok(await c.closedSoon(), 'a failed VERSION ends the connection');

    const c2 = rawClient(srv.socket);
    r = await c2.send(1, ver());
    assert.not.ok(r.flags & 0x20);
    assert.match(r.body.subarray(4).toString(), /"max_data_xfer_size":65536/);
    const c3 = rawClient(srv.socket);
    assert.ok(await c3.closedSoon(), 'a second client is refused while one is served');
    const refusals: [string, number, Buffer, number][] = [
      ['second VERSION', 1, ver(), 22],
      ['whole header in one read', 9, access(0, 32), 22],
      ['write to pending_bytes', 10, access(8, 8, 9, Buffer.alloc(8)), 22],
      ['device_state read at 8 bytes', 9, access(0, 8), 22],
      ['read of reserved space', 9, access(32, 8), 22],
      ['read beyond max_data_xfer_size', 9, access(4096, 65537), 22],
      ['write count != data', 10, access(4096, 100, 9, Buffer.alloc(10)), 22],
      ['unknown region', 9, access(0, 4, 3), 22],
      ['digest region read in part', 9, access(0, 8, 10), 22],
      ['invalid device_state RUNNING|RESUMING', 10, access(0, 4, 9, Buffer.from([5, 0, 0, 0])), 22],
      ['unknown command', 99, Buffer.alloc(0), 95],
      ['DMA_MAP', 2, Buffer.alloc(32), 95],
      ['RESET with a body', 13, Buffer.alloc(4), 22],
      ['DIRTY_PAGES bitmap of the wrong size', 14, Buffer.concat([Buffer.from([40, 0, 0, 0, 4, 0, 0, 0]), access(0, 0).subarray(0, 16), Buffer.from([0, 16, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])]), 22],
    ];
    for (const [what, cmd, body, errno] of refusals) {
      r = await c2.send(cmd, body);
      assert.ok(r.flags & 0x20, `${what}: error reply (${JSON.stringify(r)} ${srv.stats().lastError})`);
      assert.is(r.errno, errno, what);
      assert.is(r.body.length, 0, `${what}: an error reply is the header alone`);
    }
    r = await c2.send(4, Buffer.alloc(16), { flags: 1 });
    assert.ok(r.flags & 0x20, 'a reply-typed message is refused');
    r = await c2.send(9, access(0, 4));
    assert.is(r.body.readUInt32LE(16), 1, 'device_state still RUNNING after all that');
    // Fencing: stopped, discovery is refused; region I/O still works.
    r = await c2.send(10, access(0, 4, 9, Buffer.from([0, 0, 0, 0])));
    assert.not.ok(r.flags & 0x20, 'RUNNING -> STOP');
    r = await c2.send(5, Buffer.from(access(0, 0).fill(0).map((_, i) => (i === 0 ? 32 : i === 8 ? 9 : 0))));
    assert.is(r.errno, 16, 'DEVICE_GET_REGION_INFO while stopped: EBUSY');
    r = await c2.send(10, access(0, 4, 9, Buffer.from([1, 0, 0, 0])));
    assert.not.ok(r.flags & 0x20, 'STOP -> RUNNING');
    // Broken framing: a size below the header is refused and the client dropped.
    r = await c2.send(4, Buffer.alloc(0), { size: 8 });
    assert.ok(r.closed || (r.flags & 0x20));
    assert.ok(await c2.closedSoon(), 'dropped after broken framing');
    c.end(); c3.end();
    const st = srv.stats();
    assert.ok(st.refused >= 1 && st.dropped >= 1 && st.errorReplies >= refusals.length, JSON.stringify(st));
    // The server still serves, and its device migrates.
    const t = await VfioUserTransport.connect(srv.socket);
    try {
      const stream = path.join(TMP, 'after-hostile.vfmig');
      const rep = await saveDevices([t], stream, pool, {});
      assert.ok(rep.ok);
      rm(stream);
    } finally {
      t.close();
    }
  } finally {
    srv.stop();
  }
});

test('CLI: run --device vfio-user: --dest vfio-user:, then save --device and load --device', async () => {
  const src = await serverProcess(['--size', '2MiB', '--chunk', '128KiB', '--dirty-rate', '3000']);
  const dst = await serverProcess(['--size', '2MiB', '--chunk', '128KiB', '--zero']);
  const stream = path.join(TMP, 'cli.vfmig');
  const cli = (...args: string[]) => new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
    const c = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = ''; let err = '';
    c.stdout.on('data', (d) => { out += d; }); c.stderr.on('data', (d) => { err += d; });
    c.on('close', (code) => resolve({ code, out, err }));
  });
  const src2 = await serverProcess(['--size', '2MiB', '--chunk', '128KiB', '--dirty-rate', '3000', '--seed', '9']);
  try {
    let r = await cli('run', '--device', `vfio-user:${src.socket}`, '--dest', `vfio-user:${dst.socket}`, '--json');
    assert.is(r.code, 0, r.err);
    assert.is(JSON.parse(r.out).result.load.devices[0].verified, true);
    // The migrated source is stopped, and a stopped server fences discovery: it cannot be saved again.
    r = await cli('save', '--device', `vfio-user:${src.socket}`, '--stream', stream);
    assert.is(r.code, 1);
    assert.match(r.err, /VFM_PEER_ERROR: .*DEVICE_GET_INFO.*EBUSY/);
    r = await cli('save', '--device', `vfio-user:${src2.socket}`, '--stream', stream, '--json');
    assert.is(r.code, 0, r.err);
    r = await cli('load', stream, '--device', `vfio-user:${dst.socket}`, '--json');
    assert.is(r.code, 0, r.err);
    assert.is(JSON.parse(r.out).result.load.devices[0].verified, true);
    r = await cli('run', '--device', `vfio-user:${src.socket}`);
    assert.is(r.code, 2, 'a --device without a --dest is bad usage');
    assert.match(r.err, /VFM_BAD_ARGUMENT/);
    r = await cli('device-server', '--socket', src.socket);
    assert.is(r.code, 2, 'an existing socket path is not replaced');
  } finally {
    kill(src.child, 'SIGTERM'); kill(src2.child, 'SIGTERM'); kill(dst.child, 'SIGTERM'); rm(stream);
  }
});

test('CLI with v2 device-server processes: run --device vfio-user: --dest vfio-user:, save --device, then load without --device into the server the device table names', async () => {
  const V2 = ['--profile', 'v2', '--size', '2MiB', '--chunk', '128KiB'];
  const a = await serverProcess([...V2, '--dirty-rate', '3000', '--seed', '11']);
  const b = await serverProcess([...V2, '--zero']);
  const c = await serverProcess([...V2, '--dirty-rate', '3000', '--seed', '12']);
  const stream = path.join(TMP, 'cli-v2.vfmig');
  let c2: Awaited<ReturnType<typeof childReady>> | undefined;
  try {
    let r = await runCli(['run', '--device', `vfio-user:${a.socket}`, '--dest', `vfio-user:${b.socket}`, '--json']);
    assert.is(r.code, 0, r.stderr);
    let j = JSON.parse(r.stdout).result;
    assert.is(j.load.devices[0].verified, true);
    r = await runCli(['save', '--device', `vfio-user:${c.socket}`, '--stream', stream, '--json']);
    assert.is(r.code, 0, r.stderr);
    // The destination host serves a zeroed v2 device at the path the table names.
    await new Promise<void>((resolve) => { c.child.once('exit', () => resolve()); kill(c.child, 'SIGTERM'); });
    c2 = await childReady(spawn(process.execPath, [BIN, 'device-server', '--socket', c.socket, '--json', ...V2, '--zero'], { stdio: ['ignore', 'pipe', 'pipe'] }), c.socket);
    r = await runCli(['load', stream, '--json']);
    assert.is(r.code, 0, r.stderr);
    j = JSON.parse(r.stdout).result;
    assert.is(j.load.devices[0].verified, true, 'verified against the source server digest');
    assert.is(j.load.devices[0].name, c.socket);
  } finally {
    for (const x of [a, b, c, c2]) if (x) kill(x.child, 'SIGTERM');
    rm(stream);
  }
});

// ---- v2 over vfio-user: DEVICE_FEATURE, MIG_DATA_READ until a short read, MIG_DATA_WRITE ------------------------
const feat = (flags: number, data: number[] = []) => {
  const b = Buffer.alloc(8 + data.length * 4);
  b.writeUInt32LE(16, 0); b.writeUInt32LE(flags >>> 0, 4);
  data.forEach((v, i) => b.writeUInt32LE(v >>> 0, 8 + i * 4));
  return b;
};
const GET = 1 << 16;
const SET = 1 << 17;
async function v2State(c: VfioUserClient, target?: number): Promise<number> {
  // A SET reply may only echo the request: the state is what a GET says afterwards.
  if (target !== undefined) await c.ask(CMD.DEVICE_FEATURE, feat(SET | 2, [target, 0xffffffff]), 8, 16);
  const r = await c.ask(CMD.DEVICE_FEATURE, feat(GET | 2), 16, 16);
  return Buffer.from(r.reply).readUInt32LE(8);
}
const digestOf = async (c: VfioUserClient) => Buffer.from((await c.ask(CMD.REGION_READ, access(0, 32, 10), 48, 48)).reply.subarray(16)).toString('hex');

test('v2 device server: DEVICE_FEATURE walk, MIG_DATA_READ until a short read, MIG_DATA_WRITE into a second server, digests equal', async () => {
  const src = await serverProcess(['--profile', 'v2', '--size', '2MiB', '--chunk', '64KiB', '--dirty-rate', '0', '--seed', '6']);
  const dst = DeviceServer.start({ socket: sockPath('v2dst'), profile: 'v2', stateSize: 2 << 20, maxChunk: 64 << 10, zeroFill: true, dirtyRate: 0, dmaRate: 0 });
  const s = await VfioUserClient.connect(src.socket);
  const d = await VfioUserClient.connect(dst.socket);
  try {
    const mig = await s.ask(CMD.DEVICE_FEATURE, feat(GET | 1, [0, 0]), 16, 16);
    assert.ok(Buffer.from(mig.reply).readUInt32LE(8) & 1, 'MIGRATION flags carry STOP_COPY');
    await rejectsCode(s.ask(CMD.MIG_DATA_READ, Buffer.from([8 + 16, 0, 0, 0, 16, 0, 0, 0]), 8, 24), ErrorCode.PEER_ERROR);
    assert.is(await v2State(s, 3), 3, 'RUNNING -> STOP_COPY walked by the server (GET after SET)');
    const parts: Buffer[] = [];
    for (let i = 0; ; i++) {
      assert.ok(i < 10_000, 'bounded');
      const q = Buffer.alloc(8);
      q.writeUInt32LE(8 + 65536, 0); q.writeUInt32LE(65536, 4);
      const r = Buffer.from((await s.ask(CMD.MIG_DATA_READ, q, 8, 8 + 65536)).reply);
      const n = r.readUInt32LE(4);
      assert.ok(n <= 65536 && r.length >= 8 + n, 'reply size bounded by the request');
      parts.push(Buffer.from(r.subarray(8, 8 + n)));
      if (n < 65536) break; // a short read ends STOP_COPY's stream
    }
    const stream = Buffer.concat(parts);
    assert.ok(stream.length > 2 << 20, `${stream.length} stream bytes for 2 MiB of state`);
    assert.is(await v2State(d, 4), 4, 'destination RESUMING');
    const bad = Buffer.alloc(16); bad.writeUInt32LE(8, 0); bad.writeUInt32LE(8, 4);
    await rejectsCode(d.ask(CMD.MIG_DATA_WRITE, bad, 0, 8), ErrorCode.PEER_ERROR); // argsz 8 < 8 + size
    for (let at = 0; at < stream.length; at += 32768) {
      const piece = stream.subarray(at, at + 32768);
      const q = Buffer.alloc(8 + piece.length);
      q.writeUInt32LE(8 + piece.length, 0); q.writeUInt32LE(piece.length, 4); piece.copy(q, 8);
      await d.ask(CMD.MIG_DATA_WRITE, q, 0, 8);
    }
    assert.is(await v2State(d, 1), 1, 'RESUMING -> STOP: the vendor validated the stream');
    assert.is(await v2State(d, 2), 2);
    assert.not.equal(await digestOf(d), await digestOf(s), 'config space is not in the v2 stream');
    // Config space travels apart (QEMU's config section): region 7 read on the source, written on the destination.
    const cfg = Buffer.from((await s.ask(CMD.REGION_READ, access(0, 256, 7), 16 + 256, 16 + 256)).reply.subarray(16));
    await d.ask(CMD.REGION_WRITE, access(0, 256, 7, cfg), 16, 16);
    assert.is(await digestOf(d), await digestOf(s), 'destination state and config equal the source');
    assert.ok(dst.stats().largestWrite <= 32768);
  } finally {
    s.close(); d.close(); dst.stop(); kill(src.child, 'SIGTERM');
  }
});

test('v2 over vfio-user through the engine (device seam): save with a running workload from a server process, load into a server, verified', async () => {
  const src = await serverProcess(['--profile', 'v2', '--size', '4MiB', '--chunk', '128KiB', '--dirty-rate', '5000', '--seed', '8']);
  const dst = DeviceServer.start({ socket: sockPath('v2e'), profile: 'v2', stateSize: 4 << 20, maxChunk: 128 << 10, zeroFill: true, dirtyRate: 0, dmaRate: 0 });
  const stream = path.join(TMP, 'v2-engine.vfmig');
  const s = await connectVfioUser(src.socket) as MigDevice;
  const d = await connectVfioUser(dst.socket, { writeBound: 16384 }) as MigDevice;
  try {
    assert.is(s.caps.protocol, 'v2');
    assert.is(s.caps.reach, 'vfio-user');
    const save = await saveDevices([s], stream, pool, {});
    assert.ok(save.ok);
    assert.ok(save.devices[0].precopyBytes > 0 && save.devices[0].digest?.startsWith('sha256:'));
    const { report } = await loadStream(stream, pool, { verify: true, makeDestination: () => d });
    assert.is(report.devices[0].verified, true, 'the destination server digest equals the source server digest');
    assert.ok(dst.stats().largestWrite <= 16384, 'MIG_DATA_WRITE bounded by the write bound');
  } finally {
    s.close(); d.close(); dst.stop(); kill(src.child, 'SIGTERM'); rm(stream);
  }
});

test('v2 dirty tracking over vfio-user: DMA_LOGGING_START / REPORT / STOP as messages against a server process with DMA, pages found, verified', async () => {
  const src = await serverProcess(['--profile', 'v2', '--size', '2MiB', '--chunk', '64KiB', '--dirty-rate', '0', '--dma-rate', '5000', '--seed', '12', '--fault', 'slow-chunk:3000']);
  const dst = DeviceServer.start({ socket: sockPath('v2dma'), profile: 'v2', stateSize: 2 << 20, maxChunk: 64 << 10, zeroFill: true, dirtyRate: 0, dmaRate: 0 });
  const stream = path.join(TMP, 'v2-dma.vfmig');
  const s = await connectVfioUser(src.socket, { guest: GUEST }) as MigDevice;
  const none = await connectVfioUser(dst.socket) as MigDevice;
  try {
    assert.is(s.caps.dirty, 'dma-logging', 'the server offers DMA logging (PROBE with SET) and the client has a guest range');
    assert.is(none.caps.dirty, 'none', 'no guest range: no dirty tracking');
    const save = await saveDevices([s], stream, pool, { dirtyQueryIntervalMs: 5, downtimeLimitMs: 0, maxRounds: 3 });
    assert.ok(save.ok);
    assert.ok(save.dirty.pages[0] > 0, `DMA_LOGGING_REPORT found ${save.dirty.pages[0]} pages the device wrote`);
    const { report } = await loadStream(stream, pool, { verify: true, makeDestination: () => none });
    assert.is(report.devices[0].verified, true);
    // Logging was stopped with the save: a REPORT now is refused by the server.
    const q = Buffer.alloc(32);
    q.writeUInt32LE(32 + 512, 0); q.writeUInt32LE((1 << 16) | 8, 4); q.writeBigUInt64LE(BigInt(GUEST.size), 16); q.writeBigUInt64LE(4096n, 24);
    await rejectsCode((s as unknown as { ops: { client: VfioUserClient } }).ops.client.ask(CMD.DEVICE_FEATURE, q, 32 + 512, 32 + 512), ErrorCode.PEER_ERROR);
  } finally {
    await s.close(); await none.close(); dst.stop(); kill(src.child, 'SIGTERM'); rm(stream);
  }
});

test('destinations from the device table (no makeDestination): a load connects to the socket the table names, v1 and v2, verified; a table name that is not a socket is refused', async () => {
  for (const profile of ['linux-5.8', 'v2'] as const) {
    const socket = sockPath(`dt-${profile}`);
    const stream = path.join(TMP, `dt-${profile}.vfmig`);
    const src = DeviceServer.start({ socket, profile, stateSize: 1 << 20, maxChunk: 64 << 10, seed: 21, dirtyRate: 0, dmaRate: 0 });
    let dst: DeviceServer | undefined;
    try {
      const s = await connectVfioUser(socket);
      const save = await saveDevices([s], stream, pool, {});
      await s.close();
      assert.ok(save.ok);
      // The destination host serves its (zeroed) device at the same path.
      src.stop();
      dst = DeviceServer.start({ socket, profile, stateSize: 1 << 20, maxChunk: 64 << 10, zeroFill: true, dirtyRate: 0, dmaRate: 0 });
      const { report, loader } = await loadStream(stream, pool, { verify: true });
      assert.is(report.devices[0].verified, true, `${profile}: verified against the source digest`);
      assert.is(dst.stats().connected, true, `${profile}: the loader connected to the socket the table names`);
      await loader.close();
      for (let i = 0; i < 50 && dst.stats().connected; i++) await new Promise((r) => setTimeout(r, 10));
      assert.is(dst.stats().connected, false, `${profile}: Loader.close() closed the connection it made`);
    } finally {
      src.stop(); dst?.stop(); rm(stream);
    }
  }
  const socket = sockPath('dt-named');
  const stream = path.join(TMP, 'dt-named.vfmig');
  const src = DeviceServer.start({ socket, stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 });
  try {
    const s = await VfioUserTransport.connect(socket, { name: 'nic0' });
    assert.ok((await saveDevices([s], stream, pool, {})).ok);
    s.close();
    const e = await rejectsCode(loadStream(stream, pool, { verify: true }), ErrorCode.BAD_ARGUMENT);
    assert.is(e.device, 'nic0');
    assert.match(e.message, /not a socket path: name the destination/);
  } finally {
    src.stop(); rm(stream);
  }
});

test('CLI load without --device: the vfio-user destinations the device table named are closed as soon as the load ends, loaded or failed (the server sees the client go before the command returns)', async () => {
  const { cmdLoad } = await import('../src/main/cli/run.js');
  for (const profile of ['linux-5.8', 'v2'] as const) {
    const socket = sockPath(`cl-${profile}`);
    const stream = path.join(TMP, `cl-${profile}.vfmig`);
    const cut = path.join(TMP, `cl-${profile}-cut.vfmig`);
    const src = DeviceServer.start({ socket, profile, stateSize: 1 << 20, maxChunk: 64 << 10, seed: 22, dirtyRate: 0, dmaRate: 0 });
    let dst: DeviceServer | undefined;
    const exitCode = process.exitCode;
    try {
      const s = await connectVfioUser(socket);
      assert.ok((await saveDevices([s], stream, pool, {})).ok);
      await s.close();
      src.stop();
      dst = DeviceServer.start({ socket, profile, stateSize: 1 << 20, maxChunk: 64 << 10, zeroFill: true, dirtyRate: 0, dmaRate: 0 });
      const closed = async () => {
        for (let i = 0; i < 100 && dst!.stats().connected; i++) await new Promise((r) => setTimeout(r, 10));
        return !dst!.stats().connected;
      };
      const clients = dst.stats().clients;
      await cmdLoad(stream, { quiet: true });
      assert.is(dst.stats().clients, clients + 1, `${profile}: the load connected to the socket the table names`);
      assert.ok(await closed(), `${profile}: connection closed once the load finished`);
      // A stream cut before its END: the destination was connected and put in RESUMING, then the load fails.
      const buf = fs.readFileSync(stream);
      fs.writeFileSync(cut, buf.subarray(0, buf.length - 200));
      await rejectsCode(cmdLoad(cut, { quiet: true }), ErrorCode.STREAM_TRUNCATED);
      assert.is(dst.stats().clients, clients + 2, `${profile}: the failed load connected too`);
      assert.ok(await closed(), `${profile}: connection closed once the load failed`);
    } finally {
      process.exitCode = exitCode;
      src.stop(); dst?.stop(); rm(stream, cut);
    }
  }
});

test.after(async () => {
  killAll();
  await pool.close();
});

test.run();
