// Mutual TLS 1.3 for live migration: a migration of 4 devices over 4 TLS channels verifies and the destination
// knows the client's identity; a client the CA signed but the allow list does not name is denied; a client
// certificate from another CA is refused in the handshake; TLS on a UNIX socket and a missing allow list are errors.
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { Receiver } from '../src/main/live/receiver.js';
import { send } from '../src/main/live/sender.js';
import type { LiveEvent } from '../src/main/live/events.js';
import { usePki } from './tls-pki.js';

const srcPool = new EnginePool({ threads: 2 });
const dstPool = new EnginePool({ threads: 2 });
const pki = usePki(test);
test.after(async () => { await srcPool.close(); await dstPool.close(); });

function sources(n: number, seed: number): EmulatedTransport[] {
  return Array.from({ length: n }, (_, i) => EmulatedTransport.create({
    name: `emu${i}`, stateSize: 8 << 20, maxChunk: 256 << 10, seed: seed + i, dirtyRate: 5000, dmaRate: 500,
  }));
}

/** A TLS receiver; the test aborts it when the client was meant to be turned away (a server keeps listening). */
async function tlsReceiver(ac = new AbortController()) {
  const events: LiveEvent[] = [];
  const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool: dstPool, tlsDir: pki.server, timeoutMs: 5000, signal: ac.signal, onEvent: (e) => events.push(e) });
  const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const done = rx.run().catch((e: MigError) => e);
  return { to: await listening, done, events, ac };
}

test('mutual TLS 1.3, 4 channels, 4 devices with the workload running: all verify; the destination names the client', async () => {
  const srcs = sources(4, 300);
  try {
    const r = await tlsReceiver();
    const tx = await send(srcs, { to: r.to, pool: srcPool, tlsDir: pki.client, channels: 4, maxRounds: 4, downtimeLimitMs: 20 });
    const rx = await r.done;
    assert.not.instance(rx, MigError, String(rx));
    if (rx instanceof MigError) return;
    assert.ok(tx.ok && tx.tls && rx.tls);
    assert.is(rx.peerIdentity, pki.allowedCn);
    assert.equal(rx.load!.devices.map((d) => d.verified), [true, true, true, true]);
    const conns = r.events.filter((e) => e.type === 'connected') as { identity?: string }[];
    assert.is(conns.length, 4, 'every channel did its own handshake');
    assert.ok(conns.every((c) => c.identity === pki.allowedCn));
  } finally {
    for (const s of srcs) s.destroy();
  }
});

test('a client certificate the CA signed but the allow list does not name is denied; the destination keeps listening', async () => {
  const srcs = sources(2, 320);
  try {
    const r = await tlsReceiver();
    const e = await send(srcs, { to: r.to, pool: srcPool, tlsDir: pki.intruder, maxRounds: 2 }).catch((x) => x);
    assert.instance(e, MigError);
    assert.is((e as MigError).code, ErrorCode.PEER_NOT_ALLOWED, (e as Error).message);
    for (const s of srcs) assert.is(s.openRegion().state(), 'RUNNING');
    const rej = r.events.find((x) => x.type === 'rejected') as { code: string } | undefined;
    assert.is(rej?.code, ErrorCode.PEER_NOT_ALLOWED);
    // Still listening: the allowed client migrates after the intruder was turned away.
    const tx = await send(srcs, { to: r.to, pool: srcPool, tlsDir: pki.client, maxRounds: 2 });
    assert.ok(tx.ok);
    const rx = await r.done;
    assert.not.instance(rx, MigError, String(rx));
  } finally {
    for (const s of srcs) s.destroy();
  }
});

test('a client certificate from another CA fails the handshake (VFM_TLS on the source, a rejected connection on the destination)', async () => {
  const srcs = sources(1, 340);
  try {
    const r = await tlsReceiver();
    const e = await send(srcs, { to: r.to, pool: srcPool, tlsDir: pki.wrongCa, maxRounds: 2, timeoutMs: 3000 }).catch((x) => x);
    assert.instance(e, MigError);
    assert.is((e as MigError).code, ErrorCode.TLS, (e as Error).message);
    assert.is(srcs[0].openRegion().state(), 'RUNNING');
    await new Promise((res) => setTimeout(res, 100));
    assert.ok(r.events.some((x) => x.type === 'rejected' && x.code === ErrorCode.TLS), JSON.stringify(r.events));
    r.ac.abort();
    const rx = await r.done;
    assert.is((rx as MigError).code, ErrorCode.CANCELLED);
  } finally {
    for (const s of srcs) s.destroy();
  }
});

test('a destination whose certificate the source\'s CA did not sign is refused by the source', async () => {
  const srcs = sources(1, 360);
  const dir = path.join(pki.root, 'trusts-other');
  fs.mkdirSync(dir);
  for (const f of ['client-cert.pem', 'client-key.pem']) fs.copyFileSync(path.join(pki.client, f), path.join(dir, f));
  fs.copyFileSync(path.join(pki.root, 'other-ca', 'ca-cert.pem'), path.join(dir, 'ca-cert.pem'));
  try {
    const r = await tlsReceiver();
    const e = await send(srcs, { to: r.to, pool: srcPool, tlsDir: dir, timeoutMs: 3000 }).catch((x) => x);
    assert.is((e as MigError).code, ErrorCode.TLS, (e as Error).message);
    r.ac.abort();
    await r.done;
  } finally {
    for (const s of srcs) s.destroy();
  }
});

test('TLS setup errors: a UNIX socket, a missing allow list', () => {
  assert.throws(() => new Receiver({ listen: 'unix:/tmp/x.sock', tlsDir: pki.server }), (e: MigError) => e.code === ErrorCode.BAD_ARGUMENT);
  const noAllow = path.join(pki.root, 'no-allow');
  fs.mkdirSync(noAllow);
  for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']) fs.copyFileSync(path.join(pki.server, f), path.join(noAllow, f));
  assert.throws(() => new Receiver({ listen: 'tcp:127.0.0.1:0', tlsDir: noAllow }), (e: MigError) => e.code === ErrorCode.TLS && /allow/.test(e.message));
});

test.run();
