// A peer that vanishes is noticed by the kernel too: every TCP connection of a live migration (both ends, TLS
// included) carries SO_KEEPALIVE, TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT and TCP_USER_TIMEOUT derived from
// keepaliveMs and timeoutMs. The options are read back independently of the code under test: this process's socket
// fds are found through /proc (by the listening port) and queried with getsockopt while the migration runs.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { native, type TcpKeepalive } from '../src/addon/native.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { Receiver } from '../src/main/live/receiver.js';
import { send } from '../src/main/live/sender.js';
import { socketFd, tcpKeepalive } from '../src/main/live/conn.js';
import { usePki } from './tls-pki.js';

const srcPool = new EnginePool({ threads: 2 });
const dstPool = new EnginePool({ threads: 2 });
const pki = usePki(test);
test.after(async () => { await srcPool.close(); await dstPool.close(); });

/** This process's established TCP sockets to or from `port`, with their options as getsockopt reads them. */
function connectionsOn(port: number): (TcpKeepalive & { end: 'destination' | 'source' })[] {
  const inodes = new Map<string, 'destination' | 'source'>();
  for (const f of ['/proc/self/net/tcp', '/proc/self/net/tcp6']) {
    for (const l of fs.readFileSync(f, 'utf8').split('\n').slice(1)) {
      const c = l.trim().split(/\s+/);
      if (c.length < 10 || c[3] !== '01') continue; // ESTABLISHED only
      const lp = parseInt(c[1].split(':')[1], 16);
      const rp = parseInt(c[2].split(':')[1], 16);
      if (lp === port) inodes.set(c[9], 'destination');
      else if (rp === port) inodes.set(c[9], 'source');
    }
  }
  const out: (TcpKeepalive & { end: 'destination' | 'source' })[] = [];
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    let link: string;
    try { link = fs.readlinkSync(`/proc/self/fd/${fd}`); } catch { continue; }
    const m = /^socket:\[(\d+)\]$/.exec(link);
    const end = m && inodes.get(m[1]);
    if (end) out.push({ end, ...native().tcpKeepalive(Number(fd), null) });
  }
  return out;
}

async function sampleDuringMigration(channels: number, tls: boolean) {
  const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool: dstPool, timeoutMs: 7000, keepaliveMs: 2000, tlsDir: tls ? pki.server : undefined });
  let port = 0;
  let seen: ReturnType<typeof connectionsOn> = [];
  // ACCEPT: every channel is up, nothing is sent yet; the sockets are sampled right there.
  rx.on('event', (e) => { if (e.type === 'accepted') seen = connectionsOn(port); });
  const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const rp = rx.run();
  const to = await listening;
  port = Number(to.split(':').pop());
  const srcs = Array.from({ length: channels }, (_, i) => EmulatedTransport.create({ name: `k${i}`, stateSize: 2 << 20, maxChunk: 256 << 10, seed: 300 + i }));
  try {
    const tx = await send(srcs, { to, pool: srcPool, channels, timeoutMs: 7000, keepaliveMs: 2000, maxRounds: 2, tlsDir: tls ? pki.client : undefined });
    assert.ok(tx.ok && (await rp).ok);
  } finally {
    for (const s of srcs) s.destroy();
  }
  return seen;
}

// keepaliveMs 2000, timeoutMs 7000: probes after 2 s idle, every 2 s, ceil((7 - 2) / 2) = 3 of them; 7 s user timeout.
const WANT = { keepalive: true, idleS: 2, intervalS: 2, count: 3, userTimeoutMs: 7000 };

test('the settings follow keepaliveMs and timeoutMs (bounded as the kernel bounds them)', () => {
  assert.equal(tcpKeepalive(2000, 7000), WANT);
  assert.equal(tcpKeepalive(1000, 10_000), { keepalive: true, idleS: 1, intervalS: 1, count: 9, userTimeoutMs: 10_000 });
  assert.equal(tcpKeepalive(100, 100), { keepalive: true, idleS: 1, intervalS: 1, count: 1, userTimeoutMs: 100 });
  assert.is(tcpKeepalive(1000, 3_600_000).count, 127);
});

test('plain TCP, 2 channels: both ends of every connection carry keepalive and TCP_USER_TIMEOUT', async () => {
  const seen = await sampleDuringMigration(2, false);
  assert.is(seen.filter((c) => c.end === 'source').length, 2, JSON.stringify(seen));
  assert.is(seen.filter((c) => c.end === 'destination').length, 2, JSON.stringify(seen));
  for (const c of seen) assert.equal({ ...c, end: undefined }, { ...WANT, end: undefined }, `${c.end}: ${JSON.stringify(c)}`);
});

test('mutual TLS, 2 channels: the TCP sockets under TLS carry the same options', async () => {
  const seen = await sampleDuringMigration(2, true);
  assert.is(seen.length, 4, JSON.stringify(seen));
  for (const c of seen) assert.equal({ ...c, end: undefined }, { ...WANT, end: undefined }, `${c.end}: ${JSON.stringify(c)}`);
});

test('the addon operation: bounds checked, non-TCP descriptors refused untouched', async () => {
  const bad = (s: Partial<TcpKeepalive>) => ({ ...WANT, ...s });
  const code = (f: () => unknown) => { try { f(); return 'none'; } catch (e) { return (e as { code?: string }).code; } };
  assert.is(code(() => native().tcpKeepalive(0, null)), 'ENOTSOCK', 'stdin is not a socket');
  for (const s of [{ idleS: 0 }, { intervalS: 40000 }, { count: 128 }, { userTimeoutMs: -1 }, { idleS: 1.5 }]) {
    assert.is(code(() => native().tcpKeepalive(0, bad(s))), 'ERR_ARG', JSON.stringify(s));
  }
  // A UNIX socket is a socket, but not TCP: refused, not touched.
  const sock = path.join(os.tmpdir(), `vfm-ka-${process.pid}.sock`);
  const server = net.createServer(() => undefined);
  await new Promise<void>((r) => server.listen(sock, r));
  const c = net.connect(sock);
  await new Promise((r) => c.once('connect', r));
  try {
    const fd = socketFd(c);
    assert.ok(fd > 2);
    assert.is(code(() => native().tcpKeepalive(fd, WANT)), 'EPROTONOSUPPORT');
  } finally {
    c.destroy();
    server.close();
    fs.rmSync(sock, { force: true });
  }
});

test.run();
