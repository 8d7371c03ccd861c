// Live migration events in the `--events` NDJSON file (docs/JSON.md): send and receive write their live state
// (QEMU's setup, active, device, completed, failed, cancelling, cancelled, with the cause), the channels, the
// switchover, the end-to-end downtime, refusals and per-device errors, under the same migration id as the
// Migration / Loader they drive. Two CLI processes for the wiring; one process (the CLI's Recorder and EventLog) for
// the failure paths that need a fault injected into a device.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ROOT, runCli, type CliResult } from './helpers.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { Receiver, type ReceiveOptions } from '../src/main/live/receiver.js';
import { send, type SendOptions } from '../src/main/live/sender.js';
import { Recorder } from '../src/main/report/recorder.js';
import type { LiveEvent } from '../src/main/live/events.js';
import { EventLog } from '../src/main/report/events.js';

const BIN = path.join(ROOT, 'bin/vfio-mig.js');
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-live-events-'));
const SMALL = ['--size', '4MiB', '--chunk', '256KiB', '--devices', '2'];
test.after(() => { fs.rmSync(TMP, { recursive: true, force: true }); });

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Ev = { event: string; data: any };
function events(file: string): Ev[] {
  return fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as Ev);
}
const named = (ev: Ev[], name: string) => ev.filter((e) => e.event === name);
const states = (ev: Ev[]) => named(ev, 'VFIO_MIG_LIVE_STATE').map((e) => e.data.status as string);

/** `vfio-mig receive` in a child (bounded), then `vfio-mig send` to it; both results. */
async function livePair(sendArgs: string[], recvArgs: string[]): Promise<{ send: CliResult; receive: CliResult }> {
  const sock = path.join(TMP, `s-${process.hrtime.bigint()}.sock`);
  const child = spawn(process.execPath, [BIN, 'receive', '--listen', `unix:${sock}`, '--timeout', '5000', ...recvArgs],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
  const closed = new Promise<CliResult>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  try {
    await new Promise<void>((resolve, reject) => {
      child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; if (stderr.includes('listening on')) resolve(); });
      void closed.then((r) => reject(new Error(`receive ended before listening: ${r.stderr}`)));
    });
    const s = await runCli(['send', '--to', `unix:${sock}`, '--timeout', '5000', ...sendArgs]);
    return { send: s, receive: await closed };
  } finally {
    clearTimeout(timer);
  }
}

test('send and receive --events: live states in QEMU order, channels, switchover and the same downtime on both ends', async () => {
  const ES = path.join(TMP, 'send.ndjson');
  const ER = path.join(TMP, 'receive.ndjson');
  const { send: s, receive: r } = await livePair([...SMALL, '--json', '--events', ES, '--switchover-ack-timeout', '4000'], ['--json', '--events', ER]);
  assert.is(s.code, 0, s.stderr);
  assert.is(r.code, 0, r.stderr);
  const downtime = JSON.parse(s.stdout).result.downtimeMs;
  for (const [file, side] of [[ES, 'source'], [ER, 'destination']] as const) {
    const ev = events(file);
    assert.equal(states(ev), ['setup', 'active', 'device', 'completed'], `${side}: live states`);
    assert.ok(ev.filter((e) => e.event.startsWith('VFIO_MIG_LIVE_')).every((e) => e.data.side === side), `${side}: the endpoint's side`);
    assert.is(named(ev, 'VFIO_MIG_LIVE_SWITCHOVER').length, 1, `${side}: one switchover`);
    assert.equal(named(ev, 'VFIO_MIG_LIVE_DOWNTIME').map((e) => e.data.downtimeMs), [downtime], `${side}: the end-to-end downtime`);
    assert.equal(named(ev, 'VFIO_MIG_LIVE_CONNECTED').map((e) => [e.data.channel, e.data.channels]), [[0, 1]], `${side}: channel 0 of 1`);
    assert.equal(named(ev, 'VFIO_MIG_LIVE_ACCEPTED')[0]?.data.devices.map((d: { name: string }) => d.name), ['emu0', 'emu1']);
    // One id for the live session and the engine object it drives (the source's Migration, the destination's Loader).
    const ids = new Set(ev.filter((e) => e.event !== 'VFIO_MIG_START' && e.event !== 'VFIO_MIG_END').map((e) => e.data.migration));
    assert.equal([...ids], [0], `${side}: one migration id`);
    assert.ok(named(ev, 'VFIO_MIGRATION').length >= 4, `${side}: the engine's device events are there too`);
    // The engine's own MIGRATION status ends too (the destination's Loader: active, then completed).
    assert.is(named(ev, 'MIGRATION').at(-1)?.data.status, 'completed', `${side}: the Migration / Loader ended`);
    // The switchover comes between active and device; the last live state is written before the END line.
    const at = (name: string, status?: string) => ev.findIndex((e) => e.event === name && (status === undefined || e.data.status === status));
    assert.ok(at('VFIO_MIG_LIVE_STATE', 'active') < at('VFIO_MIG_LIVE_SWITCHOVER'), `${side}: active before switchover`);
    assert.ok(at('VFIO_MIG_LIVE_DOWNTIME') < at('VFIO_MIG_LIVE_STATE', 'completed'), `${side}: downtime before completed`);
    assert.is(ev.at(-1)!.event, 'VFIO_MIG_END');
    // The settings as QEMU names them, each with its unit: downtime-limit in ms (default 300), the peer timeout.
    const params = ev[0].data.params;
    assert.equal([params.timeoutMs, params.keepaliveMs], [5000, 1000], `${side}: ${JSON.stringify(params)}`);
    if (side === 'source') assert.equal([params.downtimeLimitMs, params.switchoverAckTimeoutMs], [300, 4000]);
  }
  assert.match(named(events(ER), 'VFIO_MIG_LIVE_LISTENING')[0]?.data.address ?? '', /^unix:\//, 'the destination says where it listens');
});

test('a refusal is in both --events files: each device\'s reason, then failed with the one cause; never active', async () => {
  const ES = path.join(TMP, 'send-refused.ndjson');
  const ER = path.join(TMP, 'receive-refused.ndjson');
  const { send: s, receive: r } = await livePair([...SMALL, '--json', '--events', ES],
    ['--json', '--events', ER, '--device', 'name=emu0,profile=v2,size=4MiB,chunk=256KiB']);
  assert.is(s.code, 1, s.stderr);
  assert.is(r.code, 1, r.stderr);
  const causes: unknown[] = [];
  for (const file of [ES, ER]) {
    const ev = events(file);
    assert.equal(states(ev), ['setup', 'failed'], `${file}: live states`);
    const refused = named(ev, 'VFIO_MIG_LIVE_REFUSED');
    assert.is(refused.length, 1, file);
    assert.equal(refused[0].data.devices.map((d: { name: string; code: string }) => [d.name, d.code]), [['emu0', 'profile'], ['emu1', 'no-destination']]);
    const failed = named(ev, 'VFIO_MIG_LIVE_STATE').at(-1)!.data;
    assert.is(failed.cause.code, 'VFM_PEER_REFUSED', file);
    assert.is(failed.cause.side, 'destination', file);
    assert.is(ev.at(-1)!.data.ok, false);
    causes.push(failed.cause);
  }
  assert.equal(causes[0], causes[1], 'the same cause on both ends');
});

// The failure paths below need faults injected into devices: one process, the CLI's own Recorder and EventLog.
const srcPool = new EnginePool({ threads: 2 });
const dstPool = new EnginePool({ threads: 2 });
test.after(async () => { await srcPool.close(); await dstPool.close(); });

function devices(n: number, seed: number, zero = false): EmulatedTransport[] {
  return Array.from({ length: n }, (_, i) => EmulatedTransport.create({
    name: `emu${i}`, stateSize: 8 << 20, maxChunk: 256 << 10, seed: seed + i, zeroFill: zero, dirtyRate: zero ? 0 : 2000, dmaRate: 0,
  }));
}

/** A live pair in this process, each end recording into its own events file as `send` / `receive --events` do. */
async function recordedPair(srcs: EmulatedTransport[], so: Partial<SendOptions>, ro: Partial<ReceiveOptions>,
  watchRx?: (e: LiveEvent) => void): Promise<{ tx: Ev[]; rx: Ev[] }> {
  const log = (side: 'source' | 'destination', file: string) => {
    const rec = new Recorder('none');
    const live = rec.attachLive(side);
    return { rec, live, out: new EventLog(fs.openSync(file, 'w'), rec, side === 'source' ? 'send' : 'receive', {}) };
  };
  const fs1 = path.join(TMP, `tx-${process.hrtime.bigint()}.ndjson`);
  const fs2 = path.join(TMP, `rx-${process.hrtime.bigint()}.ndjson`);
  const tx = log('source', fs1);
  const rx = log('destination', fs2);
  const receiver = new Receiver({
    listen: 'tcp:127.0.0.1:0', pool: dstPool, timeoutMs: 5000, ...ro, onEvent: (e) => { rx.live.onEvent(e); watchRx?.(e); },
    onLoader: (l) => { rx.rec.attachLoader(l, undefined, rx.live.migration); },
  });
  const listening = new Promise<string>((res) => receiver.on('event', (e) => { if (e.type === 'listening') res(e.address); }));
  const rp = receiver.run().catch((e: MigError) => e);
  const to = await Promise.race([listening, rp.then((e) => { throw e; })]);
  const sp = await send(srcs, {
    to, pool: srcPool, timeoutMs: 5000, maxRounds: 4, downtimeLimitMs: 20, ...so, onEvent: tx.live.onEvent,
    onMigration: (m) => { tx.rec.attachMigration(m, tx.live.migration); },
  }).catch((e: MigError) => e);
  const rr = await rp;
  tx.out.end(!(sp instanceof MigError), null);
  rx.out.end(!(rr instanceof MigError), null);
  return { tx: events(fs1), rx: events(fs2) };
}

test('a destination device that fails: VFIO_MIG_LIVE_DEVICE_ERROR naming it in both files, the same cause in both failed states', async () => {
  const srcs = devices(2, 40);
  const dst = devices(2, 0, true);
  dst[1].device.setFault('fail-transition', 1); // RESUMING -> RUNNING fails EIO: the load is rejected at the end
  try {
    const { tx, rx } = await recordedPair(srcs, {}, { destinations: dst });
    for (const [ev, side] of [[tx, 'source'], [rx, 'destination']] as const) {
      const de = named(ev, 'VFIO_MIG_LIVE_DEVICE_ERROR');
      assert.is(de.length, 1, `${side}: one device error`);
      assert.is(de[0].data['device-id'], 'emu1', side);
      assert.is(de[0].data.cause.code, ErrorCode.LOAD_REJECTED, side);
      assert.is(de[0].data.cause.side, 'destination', side);
      assert.is(states(ev).at(-1), 'failed', side);
      assert.equal(named(ev, 'VFIO_MIG_LIVE_STATE').at(-1)!.data.cause, de[0].data.cause, `${side}: the failed state carries the cause`);
      // The destination's Loader failed; the source's save itself had completed (its live state is what failed).
      if (side === 'destination') assert.is(named(ev, 'MIGRATION').at(-1)?.data.status, 'failed', 'the Loader failed');
    }
  } finally {
    for (const d of [...srcs, ...dst]) d.destroy();
  }
});

test('a source device that fails mid pre-copy: the device error on both sides (the destination learns it from ABORT)', async () => {
  const srcs = devices(2, 60);
  srcs[0].device.setFault('eio-on-chunk', 3);
  try {
    const { tx, rx } = await recordedPair(srcs, {}, {});
    for (const [ev, side] of [[tx, 'source'], [rx, 'destination']] as const) {
      const de = named(ev, 'VFIO_MIG_LIVE_DEVICE_ERROR');
      assert.is(de.length, 1, `${side}: one device error ${JSON.stringify(ev.map((e) => e.event))}`);
      assert.is(de[0].data['device-id'], 'emu0', side);
      assert.is(de[0].data.cause.side, 'source', side);
      assert.equal(named(ev, 'VFIO_MIG_LIVE_STATE').at(-1)!.data, { migration: 0, side, status: 'failed', cause: de[0].data.cause }, side);
    }
  } finally {
    for (const d of srcs) d.destroy();
  }
});

test('cancel on the source: cancelling, then cancelled, with the one cause, in both files', async () => {
  const srcs = devices(2, 80);
  const ac = new AbortController();
  try {
    // Cancelled once the destination has applied pre-copy data (mid-migration, whatever the machine's speed).
    const { tx, rx } = await recordedPair(srcs, { signal: ac.signal, maxRounds: 1000, downtimeLimitMs: 0, bandwidthCap: 8 << 20 }, {},
      (e) => { if (e.type === 'progress' && e.devices.some((d) => d.bytes > 0)) ac.abort(); });
    for (const [ev, side] of [[tx, 'source'], [rx, 'destination']] as const) {
      assert.equal(states(ev), ['setup', 'active', 'cancelling', 'cancelled'], side);
      const [cancelling, cancelled] = named(ev, 'VFIO_MIG_LIVE_STATE').slice(-2).map((e) => e.data.cause);
      assert.equal(cancelling, cancelled, side);
      assert.equal([cancelled.code, cancelled.side], [ErrorCode.CANCELLED, 'source'], side);
    }
  } finally {
    for (const d of srcs) d.destroy();
  }
});

test.run();
