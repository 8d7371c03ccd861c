// Every error that leaves the API is a MigError with a stable VFM_ code. One scenario per ErrorCode produces it
// from an input (a flag, a file, a vendor fault, a device) through the public calls, and stream damage names the
// byte offset. A code without a scenario here fails the first test: add one when you add a code.
// Raw Node and addon errors (ENOENT, ERR_ARG, TypeError) are normalised where they happen (worker, engine, API).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, runEmulated, saveDevices } from '../src/main/api.js';
import { EmulatedTransport, emulatedDestination } from '../src/main/index.js';
import { extractDevice, inspectContainer } from '../src/main/container/inspect.js';
import { ErrorCode, MigError, toMigError } from '../src/main/errors.js';
import { profileDef } from '../src/main/protocol/profiles.js';
import { FLAG_DEV_DATA_STATE, getBe64, putBe64 } from '../src/main/protocol/qemu-stream.js';
import { withTestHooks } from '../src/main/engine/test-hooks.js';
import type { Loader } from '../src/main/engine/load.js';
import { readRecords, writeRecords, type Rec } from './craft.js';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { VfioUserTransport } from '../src/main/reach/vfio-user/index.js';
import { Receiver, type ReceiveOptions } from '../src/main/live/receiver.js';
import { send, type SendOptions } from '../src/main/live/sender.js';
import { makePki, type Pki } from './tls-pki.js';

const pool = new EnginePool({ threads: 2 });
const DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-codes-'));
const f = (n: string) => path.join(DIR, n);
const GOOD = f('good.vfmig');
let n = 0;

function devices(o: Record<string, unknown> = {}, count = 2): EmulatedTransport[] {
  return Array.from({ length: count }, (_, i) => EmulatedTransport.create({
    name: `e${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, seed: 5 + i, dirtyRate: 0, dmaRate: 0, guestPages: 64, ...o,
  }));
}

/** Run `fn`; it must reject with a MigError. Resources it reports (devices, loaders) are released. */
async function caught(fn: () => Promise<unknown>): Promise<MigError> {
  try {
    await fn();
  } catch (e) {
    for (const d of (e as { loader?: Loader }).loader?.dests ?? []) (d.transport as EmulatedTransport).destroy?.();
    return e as MigError;
  }
  throw new Error('expected a failure, the call succeeded');
}

/** Save devices (optionally with a vendor fault on the second) and return the error. */
function saveError(fault?: [string, number], o: Record<string, unknown> = {}, tweak?: (ds: EmulatedTransport[]) => void) {
  return caught(async () => {
    const ds = devices();
    try {
      if (fault) ds[1].device.setFault(fault[0], fault[1]);
      tweak?.(ds);
      await saveDevices(ds, f(`s${n++}.vfmig`), pool, { maxRounds: 2, vendorMode: 'strict', maxEmptyChunks: 8, maxNoProgress: 16, ...o } as never);
    } finally {
      for (const d of ds) d.destroy();
    }
  });
}

/** Load a copy of GOOD edited by `edit` (records re-checksummed unless `raw` edits bytes). */
function loadCrafted(edit: (recs: Rec[]) => Rec[] | void, o: Record<string, unknown> = {}) {
  const { header, recs } = readRecords(GOOD);
  const file = f(`c${n++}.vfmig`);
  writeRecords(file, header, edit(recs) ?? recs);
  return caught(async () => { const r = await loadStream(file, pool, { verify: true, ...o }); for (const d of r.loader.dests) (d.transport as EmulatedTransport).destroy(); });
}
function loadBytes(edit: (b: Buffer) => Buffer) {
  const file = f(`b${n++}.vfmig`);
  fs.writeFileSync(file, edit(Buffer.from(fs.readFileSync(GOOD))));
  return caught(() => loadStream(file, pool, { verify: true }));
}
/** A vfio-user server process that misbehaves in `mode` (test/fixtures/vfu-hostile-server.ts), for `fn`. */
async function hostilePeer(mode: string, fn: (socket: string) => Promise<unknown>): Promise<MigError> {
  const socket = f(`peer${n++}.sock`);
  const fixture = path.resolve(path.dirname(fileURLToPath(import.meta.url)), 'fixtures/vfu-hostile-server.js');
  const child = spawn(process.execPath, [fixture, socket, mode], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    await new Promise<void>((resolve, reject) => {
      child.stdout!.on('data', (d) => { if (String(d).includes('ready')) resolve(); });
      child.on('exit', (c) => reject(new Error(`hostile server exited ${c}`)));
    });
    return await caught(() => fn(socket));
  } finally {
    child.kill('SIGKILL');
  }
}
const connectError = (mode: string) => hostilePeer(mode, (s) => VfioUserTransport.connect(s, { timeoutMs: 500 }));

const firstData = (recs: Rec[]) => recs.find((r) => r.type === 2 && r.body.length > 64 && getBe64(r.body, 0) === FLAG_DEV_DATA_STATE)!;
const lastChunk = (recs: Rec[], dev: number) => [...recs].reverse().find((r) => r.type === 2 && r.device === dev)!;

let pki: Pki | undefined;
/** A live destination on loopback that turns the source away; the source's error. */
async function liveError(ro: Partial<ReceiveOptions>, so: Partial<SendOptions>): Promise<MigError> {
  const ac = new AbortController();
  const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool, signal: ac.signal, ...ro });
  const listening = new Promise<string>((r) => rx.on('event', (e) => { if (e.type === 'listening') r(e.address); }));
  const done = rx.run().catch(() => undefined);
  const ds = devices();
  try {
    const to = await listening;
    return await caught(() => send(ds, { to, pool, timeoutMs: 3000, ...so }));
  } finally {
    ac.abort();
    await done;
    for (const d of [...ds, ...((ro.destinations ?? []) as EmulatedTransport[])]) d.destroy();
  }
}
const tls = () => (pki ??= makePki());

const SCENARIOS: Record<ErrorCode, () => Promise<MigError>> = {
  [ErrorCode.BAD_ARGUMENT]: () => saveError(undefined, { maxRounds: -1 }),
  [ErrorCode.NATIVE]: () => saveError(['eio-on-chunk', 3]),
  // A source that is not RUNNING or STOP (left RESUMING) cannot be saved.
  [ErrorCode.BAD_STATE]: () => saveError(undefined, {}, (ds) => ds[0].openRegion().setState('RESUMING')),
  [ErrorCode.DEVICE_ERROR_STATE]: () => saveError(['error-on-transition', 2]),
  [ErrorCode.TRANSITION_FAILED]: () => saveError(['fail-transition', 3]),
  [ErrorCode.VENDOR_BAD_VALUE]: () => saveError(['bad-data-offset', 3]),
  [ErrorCode.VENDOR_STUCK]: () => saveError(['stuck', 2]),
  // A linux-5.8 device driven as draft-2019 has no migration region of that type.
  [ErrorCode.NO_MIGRATION_REGION]: () => saveError(undefined, {}, (ds) => Object.assign(ds[1], { profile: profileDef('draft-2019') })),
  // A migration region smaller than its protocol header.
  [ErrorCode.BAD_REGION_INFO]: () => saveError(undefined, {}, (ds) => Object.assign(ds[1], { profile: { ...profileDef('linux-5.8'), headerSize: 1 << 30 } })),
  [ErrorCode.STREAM_TRUNCATED]: () => loadBytes((b) => b.subarray(0, b.length - 5)),
  [ErrorCode.STREAM_BAD_MAGIC]: () => loadBytes((b) => { b[0] = 0x58; return b; }),
  [ErrorCode.STREAM_BAD_VERSION]: () => loadBytes((b) => { b[8] = 9; return b; }),
  [ErrorCode.STREAM_BAD_RECORD]: () => loadCrafted((recs) => { recs.push(recs[2]); }),
  [ErrorCode.STREAM_CHECKSUM]: () => loadBytes((b) => { b[b.length - 40] ^= 1; return b; }),
  [ErrorCode.STREAM_TOO_LARGE]: () => loadCrafted((recs) => { putBe64(firstData(recs).body, 8, 1n << 40n); }),
  [ErrorCode.STREAM_UNKNOWN_TAG]: () => loadCrafted((recs) => { putBe64(firstData(recs).body, 0, 0xffffffffef10ffffn); }),
  // The config section's closing END_OF_STATE replaced by a DATA tag.
  [ErrorCode.STREAM_BAD_END]: () => loadCrafted((recs) => { const c = lastChunk(recs, 1); putBe64(c.body, c.body.length - 8, FLAG_DEV_DATA_STATE); }),
  [ErrorCode.STREAM_ABORTED]: () => loadCrafted((recs) => {
    const e = recs.findIndex((r) => r.type === 3);
    recs[e] = { ...recs[e], type: 4, body: new Uint8Array(Buffer.from(JSON.stringify({ code: 'VFM_NATIVE', message: 'vendor died' }))) };
  }),
  // The destination speaks another profile than the stream.
  [ErrorCode.LOAD_REJECTED]: () => loadCrafted(() => undefined, { makeDestination: (e: never) => emulatedDestination({ ...(e as object), profile: 'draft-2019' } as never) }),
  [ErrorCode.VERIFY_FAILED]: () => loadCrafted((recs) => {
    const e = recs.find((r) => r.type === 3)!;
    const end = JSON.parse(Buffer.from(e.body).toString());
    end.devices[0].digest = 'sha256:' + '0'.repeat(64);
    e.body = new Uint8Array(Buffer.from(JSON.stringify(end)));
  }),
  [ErrorCode.CANCELLED]: () => saveError(undefined, { signal: AbortSignal.abort() }),
  // A worker thread that dies holding a device's region lock.
  [ErrorCode.WORKER_FAILED]: () => saveError(undefined, withTestHooks({}, { exitAfterChunks: { device: 1, chunks: 2 } })),
  [ErrorCode.IO]: () => caught(() => loadStream(f('missing.vfmig'), pool)),
  // A migration whose own dirty-page bitmaps and staging exceed its memory budget.
  [ErrorCode.OVER_BUDGET]: () => saveError(undefined, { memoryBudget: 1 << 20 }),
  [ErrorCode.OUTPUT_EXISTS]: () => caught(() => extractDevice(GOOD, 0, GOOD + '.exists')),
  [ErrorCode.OUTPUT_BUSY]: () => caught(async () => {
    fs.symlinkSync(`vfio-mig.${process.pid}`, f('.#busy.vfmig'));
    try { await extractDevice(GOOD, 0, f('busy.vfmig')); } finally { fs.rmSync(f('.#busy.vfmig')); }
  }),
  [ErrorCode.PEER_GONE]: () => caught(() => VfioUserTransport.connect(f('nobody.sock'))),
  // A server that stops answering in the middle of a save.
  [ErrorCode.PEER_TIMEOUT]: () => hostilePeer('stall', async (s) => {
    const t = await VfioUserTransport.connect(s, { timeoutMs: 300 });
    try { await saveDevices([t], f(`p${n++}.vfmig`), pool, { maxRounds: 1 }); } finally { t.close(); }
  }),
  [ErrorCode.PEER_PROTOCOL]: () => connectError('version-huge'),
  [ErrorCode.PEER_ERROR]: () => connectError('version-error'),
  [ErrorCode.PEER_NO_MIGRATION]: () => connectError('no-migration'),
  // The same device in two migrations at once (a second transport of one emulated device).
  [ErrorCode.DEVICE_BUSY]: () => caught(async () => {
    const ds = devices({}, 1);
    try { await saveDevices([ds[0], new EmulatedTransport(ds[0].device)], f(`b${n++}.vfmig`), pool, { maxRounds: 0 }); } finally { ds[0].destroy(); }
  }),
  // A device wedged mid-save (reset fails too) stays stopped: its rollback result carries the typed error.
  [ErrorCode.ROLLBACK_FAILED]: async () => {
    const e = await saveError(['wedged', 1]);
    const rb = (e as unknown as { report?: { rollback?: { error?: MigError }[] } }).report?.rollback ?? [];
    return rb.find((r) => r.error)?.error ?? e;
  },
  // An embedder's callback with a bug: still a coded error, flagged as a defect.
  // A live destination whose device speaks another profile refuses it (and says why).
  [ErrorCode.PEER_REFUSED]: () => liveError({ destinations: devices({ profile: 'draft-2019' }) }, {}),
  [ErrorCode.PEER_NOT_ALLOWED]: () => liveError({ tlsDir: tls().server }, { tlsDir: tls().intruder }),
  [ErrorCode.TLS]: () => liveError({ tlsDir: tls().server }, { tlsDir: tls().wrongCa }),
  // An embedder's config save hook that fails: the migration fails with the device named, sources RUNNING again.
  [ErrorCode.CONFIG_HOOK]: () => saveError(undefined, { config: { save: () => { throw new Error('vmm state unavailable'); } } }),
  [ErrorCode.INTERNAL]: () => caught(() => loadStream(GOOD, pool, { makeDestination: () => (null as unknown as { x: number }).x as never })),
};

test.before(async () => {
  const ds = devices();
  try { assert.ok((await saveDevices(ds, GOOD, pool, { maxRounds: 1 })).ok); } finally { for (const d of ds) d.destroy(); }
  fs.writeFileSync(GOOD + '.exists', 'x');
});
test.after(async () => {
  fs.rmSync(DIR, { recursive: true, force: true });
  if (pki) fs.rmSync(pki.root, { recursive: true, force: true });
  await pool.close();
});

test('every ErrorCode has a scenario, and each scenario yields a MigError with exactly that code', async () => {
  const codes = Object.values(ErrorCode);
  const missing = codes.filter((c) => !(c in SCENARIOS));
  assert.equal(missing, [], `codes without a scenario in test/error-codes.test.ts: ${missing.join(', ')}`);
  for (const code of codes) {
    const e = await SCENARIOS[code]();
    assert.instance(e, MigError, `${code}: got ${String(e)}`);
    assert.is(e.code, code, `${code}: got ${e.code}: ${e.message}`);
    assert.ok(e.message.length > 0);
    // Stream damage names the byte offset in the file.
    if (code.startsWith('VFM_STREAM_')) assert.type(e.offset, 'number', `${code}: ${e.message}`);
    if (code === ErrorCode.INTERNAL) assert.match(e.message, /internal error.*TypeError/);
  }
});

test('raw errors are normalised: ENOENT, addon ERR_ARG, Node ERR_INVALID_ARG_TYPE, TypeError, AbortError', () => {
  const enoent = Object.assign(new Error("ENOENT: no such file or directory, open 'x'"), { code: 'ENOENT', errno: -2, syscall: 'open' });
  assert.is(toMigError(enoent).code, ErrorCode.IO);
  assert.is(toMigError(enoent).errno, 2);
  assert.is(toMigError(Object.assign(new Error('ERR_ARG: unknown fault'), { code: 'ERR_ARG' })).code, ErrorCode.BAD_ARGUMENT);
  assert.is(toMigError(Object.assign(new TypeError('bad'), { code: 'ERR_INVALID_ARG_TYPE' })).code, ErrorCode.BAD_ARGUMENT);
  assert.is(toMigError(new TypeError("Cannot read properties of null (reading 'devices')")).code, ErrorCode.INTERNAL);
  assert.is(toMigError(new DOMException('aborted', 'AbortError')).code, ErrorCode.CANCELLED);
  assert.is(toMigError('a string').code, ErrorCode.INTERNAL);
  // A worker's serialised MigError keeps its code, device and offset.
  const m = toMigError({ __migError: true, code: 'VFM_STREAM_CHECKSUM', message: 'd: offset 7: bad', device: 'd', offset: 7 });
  assert.equal([m.code, m.device, m.offset, m.message], ['VFM_STREAM_CHECKSUM', 'd', 7, 'd: offset 7: bad']);
  // ... an unknown code does not pass through as if it were one of ours.
  assert.is(toMigError({ code: 'ERR_SOMETHING', message: 'x' }).code, ErrorCode.INTERNAL);
});

test('at the API: a null END body, an unknown fault kind, a bad worker task and a bad emulated device are coded', async () => {
  // A null END body used to surface as "Cannot read properties of null".
  for (const body of ['null', '{"devices":null}', '{"devices":[null]}', '{"devices":[{"index":"0"}]}', '[]']) {
    const e = await loadCrafted((recs) => { recs.find((r) => r.type === 3)!.body = new Uint8Array(Buffer.from(body)); });
    assert.is(e.code, ErrorCode.STREAM_BAD_RECORD, `END ${body}: ${e.message}`);
    assert.type(e.offset, 'number');
    const i = await caught(async () => {
      const file = f(`end${n++}.vfmig`);
      const { header, recs } = readRecords(GOOD);
      recs.find((r) => r.type === 3)!.body = new Uint8Array(Buffer.from(body));
      writeRecords(file, header, recs);
      await inspectContainer(file);
    });
    assert.is(i.code, ErrorCode.STREAM_BAD_RECORD, `inspect END ${body}: ${i.message}`);
  }
  const abortNull = await loadCrafted((recs) => {
    const e = recs.findIndex((r) => r.type === 3);
    recs[e] = { ...recs[e], type: 4, body: new Uint8Array(Buffer.from('null')) };
  });
  assert.is(abortNull.code, ErrorCode.STREAM_BAD_RECORD);
  const ds = devices({}, 1);
  try {
    const e = await caught(async () => ds[0].device.setFault('no-such-fault', 1));
    assert.is(e.code, ErrorCode.BAD_ARGUMENT);
    assert.is(e.device, 'e0');
  } finally { ds[0].destroy(); }
  // A digest task for a device that does not exist fails inside the worker: coded, not a raw addon error.
  const w = await caught(() => pool.digest({ op: 'digest', id: 987654, stateSize: 1 << 20 }));
  assert.instance(w, MigError);
  assert.ok(Object.values(ErrorCode).includes(w.code), w.code);
  assert.is.not(w.code, ErrorCode.INTERNAL, w.message);
  const r = await caught(() => runEmulated({ devices: 1, device: { stateSize: 5 }, pool }));
  assert.is(r.code, ErrorCode.BAD_ARGUMENT);
});

test.run();
