// v2 through the engine: save/load round trips alone and beside v1 devices in every data mode, QEMU 8.1+'s v2 device
// stream (DEV_INIT_DATA_SENT once the initial bytes drained), the multi-device P2P rules on both sides, and a
// refused stream leaving the destination reset.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import { EnginePool, Migration, Loader, ContainerWriter, FileSink, onTrace, ErrorCode, MigError } from '../src/main/index.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { emulatedV2, destroyEmulated } from '../src/main/reach/emulated/v2.js';
import { extractDevice } from '../src/main/container/inspect.js';
import { FLAG_DEV_INIT_DATA_SENT, FLAG_END_OF_STATE, FLAG_DEV_DATA_STATE, getBe64 } from '../src/main/protocol/qemu-stream.js';
import { readRecords, writeRecords } from './craft.js';
import { rm, tmpFile, rejectsCode } from './helpers.js';
import type { EngineDevice } from '../src/main/engine/source-device.js';
import { iterationPlan, runIteration } from '../src/main/stress/stress.js';

const pool = new EnginePool({ threads: 2 });
const V2 = { stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 500, dmaRate: 200 };


function sink(file: string) { return new ContainerWriter(FileSink.open(file, { force: true })); }

/** The QEMU packets of a device stream: [tag, size?] in order. */
function tags(stream: Uint8Array): string[] {
  const out: string[] = [];
  for (let p = 0; p < stream.length;) {
    const t = getBe64(stream, p);
    p += 8;
    if (t === FLAG_DEV_DATA_STATE) { const n = Number(getBe64(stream, p)); p += 8 + n; out.push('DATA'); }
    else if (t === FLAG_END_OF_STATE) out.push('END');
    else if (t === FLAG_DEV_INIT_DATA_SENT) out.push('INIT');
    else if (t === 0xffffffffef100003n) out.push('SETUP');
    else if (t === 0xffffffffef100002n) { const n = Number(getBe64(stream, p)); p += 8 + n; out.push('CONFIG'); }
    else throw new Error(`tag ${t.toString(16)}`);
  }
  return out;
}

test('v2 beside v1 devices in every data mode: one migration, one load, every device verified', async () => {
  const file = tmpFile('v2mix');
  const devs: EngineDevice[] = [
    emulatedV2({ ...V2, name: 'v2a', seed: 11 }),
    EmulatedTransport.create({ name: 'mmap', profile: 'linux-5.8', stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'mmap', seed: 12 }),
    EmulatedTransport.create({ name: 'trapped', profile: 'draft-2019', stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'trapped', seed: 13 }),
    EmulatedTransport.create({ name: 'mixed', profile: 'linux-5.8', stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'mixed', seed: 14 }),
    emulatedV2({ ...V2, name: 'v2b', seed: 15 }),
  ];
  let loader: Loader | undefined;
  try {
    const rep = await new Migration(devs, pool, sink(file), { maxRounds: 3 }).run();
    assert.ok(rep.ok);
    loader = new Loader(file, pool);
    const lr = await loader.run();
    assert.equal(lr.devices.map((d) => [d.name, d.verified, d.state]),
      [['v2a', true, 'RUNNING'], ['mmap', true, 'RUNNING'], ['trapped', true, 'RUNNING'], ['mixed', true, 'RUNNING'], ['v2b', true, 'RUNNING']]);
    assert.equal(lr.devices.map((d) => d.initDataSent), [true, undefined, undefined, undefined, true]);
  } finally {
    for (const d of devs) destroyEmulated(d);
    await loader?.close();
    rm(file);
  }
});

test('v2 in every feature set (STOP_COPY only, +P2P, +PRE_COPY, all): alone and beside v1 devices, one migration and one load each, verified', async () => {
  for (const migFlags of [1, 3, 5, 7]) {
    const p2p = (migFlags & 2) !== 0;
    const pre = (migFlags & 4) !== 0;
    for (const withV1 of [false, true]) {
      const file = tmpFile(`v2f${migFlags}`);
      const devs: EngineDevice[] = [emulatedV2({ ...V2, name: `v2f${migFlags}`, seed: 30 + migFlags, migFlags })];
      if (withV1) {
        devs.push(EmulatedTransport.create({ name: 'v1mmap', profile: 'linux-5.8', stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'mmap', seed: 40 }));
        devs.push(EmulatedTransport.create({ name: 'v1trap', profile: 'draft-2019', stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'trapped', seed: 41 }));
      }
      const seen: string[] = [];
      const off = onTrace((ev, f) => { if (ev === 'vfio_migration_set_state' && f.device === `v2f${migFlags}`) seen.push(String(f.to)); });
      let loader: Loader | undefined;
      try {
        const rep = await new Migration(devs, pool, sink(file), { maxRounds: 3, allowWithoutP2P: !p2p }).run();
        assert.ok(rep.ok, `flags ${migFlags}`);
        // The source walked only states its feature set has: P2P ones only with P2P, PRE_COPY ones only with PRE_COPY.
        assert.is(seen.some((x) => x.endsWith('_P2P')), p2p, `flags ${migFlags}: ${seen.join(' ')}`);
        assert.is(seen.some((x) => x.startsWith('PRE_COPY')), pre, `flags ${migFlags}: ${seen.join(' ')}`);
        loader = new Loader(file, pool);
        const lr = await loader.run();
        const want = withV1 ? [[`v2f${migFlags}`, true, 'RUNNING'], ['v1mmap', true, 'RUNNING'], ['v1trap', true, 'RUNNING']] : [[`v2f${migFlags}`, true, 'RUNNING']];
        assert.equal(lr.devices.map((d) => [d.name, d.verified, d.state]), want, `flags ${migFlags}${withV1 ? ' with v1' : ''}`);
        assert.is(lr.devices[0].initDataSent, pre, `DEV_INIT_DATA_SENT only with PRE_COPY (flags ${migFlags})`);
      } finally {
        off();
        for (const d of devs) destroyEmulated(d);
        await loader?.close();
        rm(file);
      }
    }
  }
});

test('v2 stream: QEMU 8.1+ packets, DEV_INIT_DATA_SENT once after the initial bytes (not at all without PRE_COPY)', async () => {
  for (const migFlags of [7, 1]) {
    const file = tmpFile('v2tags');
    const out = tmpFile('v2dev');
    const d = emulatedV2({ ...V2, dirtyRate: 0, migFlags });
    try {
      await new Migration([d], pool, sink(file), { maxRounds: 5 }).run();
      await extractDevice(file, 0, out);
      const t = tags(new Uint8Array(fs.readFileSync(out)));
      assert.equal(t.slice(0, 2), ['SETUP', 'END']);
      assert.equal(t.slice(-3), ['END', 'CONFIG', 'END']);
      const inits = t.filter((x) => x === 'INIT').length;
      if (migFlags === 7) {
        assert.is(inits, 1, t.join(' '));
        // Every iterate packet before INIT is DATA END; INIT closes the packet that drained the initial bytes.
        const i = t.indexOf('INIT');
        assert.is(t[i - 1], 'DATA');
        const dataBefore = t.slice(0, i).filter((x) => x === 'DATA').length;
        assert.ok(dataBefore >= (1 << 20) / (64 << 10), `initial bytes span ${dataBefore} packets`);
      } else {
        assert.is(inits, 0);
        assert.not.ok(t.slice(2, -3).includes('END') && t.indexOf('DATA') > 2 && t[2] !== 'DATA', 'no iterate packets without pre-copy');
      }
    } finally {
      destroyEmulated(d);
      rm(file, out);
    }
  }
});

test('v2 multi-device: P2P quiescing before any STOP_COPY on the source, every destination STOP before any RUNNING', async () => {
  const file = tmpFile('v2p2p');
  const devs = [emulatedV2({ ...V2, name: 'p0', seed: 1 }), emulatedV2({ ...V2, name: 'p1', seed: 2 }), emulatedV2({ ...V2, name: 'p2', seed: 3 })];
  const seen: string[] = [];
  const off = onTrace((ev, f) => { if (ev === 'vfio_migration_set_state') seen.push(`${f.device}:${f.to}`); });
  let loader: Loader | undefined;
  try {
    await new Migration(devs, pool, sink(file), { maxRounds: 2 }).run();
    const firstStopCopy = seen.findIndex((s) => s.endsWith(':STOP_COPY'));
    for (const d of ['p0', 'p1', 'p2']) {
      const q = seen.indexOf(`${d}:PRE_COPY_P2P`);
      assert.ok(q >= 0 && q < firstStopCopy, `${d} quiesced to PRE_COPY_P2P before any STOP_COPY: ${seen.join(' ')}`);
    }
    seen.length = 0;
    loader = new Loader(file, pool);
    await loader.run();
    // After load_setup (every device RESUMING), the finish: all leave RESUMING for STOP, then start.
    const fin = seen.slice(seen.map((s) => s.endsWith(':RESUMING')).lastIndexOf(true) + 1);
    const lastStop = Math.max(...['p0', 'p1', 'p2'].map((d) => fin.indexOf(`${d}:STOP`)));
    const firstRun = fin.findIndex((s) => s.endsWith(':RUNNING_P2P') || s.endsWith(':RUNNING'));
    assert.ok(Math.min(...['p0', 'p1', 'p2'].map((d) => fin.indexOf(`${d}:STOP`))) >= 0, fin.join(' '));
    assert.ok(lastStop < firstRun, `every destination STOP before any starts: ${fin.join(' ')}`);
    const lastP2P = Math.max(...['p0', 'p1', 'p2'].map((d) => fin.indexOf(`${d}:RUNNING_P2P`)));
    assert.ok(lastP2P >= 0 && lastP2P < fin.findIndex((s) => s.endsWith(':RUNNING')), `all RUNNING_P2P before any RUNNING: ${fin.join(' ')}`);
  } finally {
    off();
    for (const d of devs) destroyEmulated(d);
    await loader?.close();
    rm(file);
  }
});

test('v2 multi-device without P2P is refused unless allowed', async () => {
  const file = tmpFile('nop2p');
  const devs = [emulatedV2({ ...V2, name: 'n0', migFlags: 5 }), emulatedV2({ ...V2, name: 'n1', migFlags: 7 })];
  try {
    assert.throws(() => new Migration(devs, pool, sink(file)), (e: MigError) => e.code === ErrorCode.BAD_ARGUMENT && e.device === 'n0' && /P2P/.test(e.message));
    const rep = await new Migration(devs, pool, sink(file), { allowWithoutP2P: true, maxRounds: 2 }).run();
    assert.ok(rep.ok);
  } finally {
    for (const d of devs) destroyEmulated(d);
    rm(file);
  }
});

test('v2 refused stream: the destination names the device and stream offset, and is reset, never left RESUMING or started', async () => {
  const file = tmpFile('v2bad');
  const d = emulatedV2({ ...V2, dirtyRate: 0, name: 'victim' });
  let loader: Loader | undefined;
  try {
    await new Migration([d], pool, sink(file), { maxRounds: 2 }).run();
    const { header, recs } = readRecords(file);
    // The first data packet carries the vendor's HEADER record: damage its magic (record re-checksummed).
    const first = recs.find((r) => r.type === 2 && r.body.length > 64 && getBe64(r.body, 0) === FLAG_DEV_DATA_STATE)!;
    first.body[16 + 24] ^= 0xff;
    writeRecords(file, header, recs);
    loader = new Loader(file, pool);
    const e = await rejectsCode(loader.run(), [ErrorCode.LOAD_REJECTED]);
    assert.is(e.device, 'victim');
    assert.match(e.message, /bad magic/);
    assert.ok(typeof e.offset === 'number', 'names an offset');
    const dest = loader.dests[0];
    assert.is(await dest.dev!.state(), 'STOP', 'reset (its state discarded), then stopped: neither RESUMING nor RUNNING');
    assert.match(dest.stats.state, /^reset \(state discarded\), STOP$/);
  } finally {
    destroyEmulated(d);
    await loader?.close();
    rm(file);
  }
});

test('stress draws v2 devices too, and an iteration with them migrates and verifies (strict mode)', async () => {
  let seed = 1;
  while (!iterationPlan(seed, 2).some((p) => p.device.profile === 'v2')) seed++;
  const it = await runIteration(pool, seed, 2, 0, 'strict');
  assert.ok(it.ok, it.error);
  assert.ok(it.devices >= 2 && it.bytes > 0);
});

test.after(async () => { await pool.close(); });
test.run();
