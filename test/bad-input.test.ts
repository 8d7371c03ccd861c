// Bad input: malformed streams, impossible vendor values and vendor faults. Each is rejected with a stable code
// naming the device and the offset; no source device is left stopped, no destination runs with partial state.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { inspectContainer } from '../src/main/container/inspect.js';
import { ErrorCode, type MigError } from '../src/main/errors.js';
import { FLAG_DEV_DATA_STATE, getBe64, putBe64 } from '../src/main/protocol/qemu-stream.js';
import type { Loader } from '../src/main/engine/load.js';
import { readRecords, renumber, writeRecords, type Rec } from './craft.js';
import { fillHole } from '../src/main/container/sink.js';
import { rejectsCode, rm, saveInPlace, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
const good = tmpFile('good');
test.before(async () => {
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `src${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, seed: 3 + i, dirtyRate: 5000, dmaRate: 0, guestPages: 64 }));
  try {
    const r = await saveDevices(devs, good, pool, { maxRounds: 2, downtimeLimitMs: 1 });
    assert.ok(r.ok);
  } finally {
    for (const d of devs) d.destroy();
  }
});
test.after(async () => { rm(good); await pool.close(); });

/** Load `file`; expect `code`; check no destination is RUNNING; clean up. */
async function loadFails(file: string, code: string | string[]): Promise<MigError> {
  let loader: Loader | undefined;
  try {
    const e = await rejectsCode(loadStream(file, pool, { verify: true }).then((r) => { loader = r.loader; }), code);
    loader = (e as unknown as { loader?: Loader }).loader;
    for (const d of loader?.dests ?? []) {
      const st = await d.dev.state();
      assert.is.not(st, 'RUNNING', `${d.entry.name} must not run`);
      assert.is.not(st, 'RESUMING', `${d.entry.name} must not be left half-resumed`);
    }
    return e;
  } finally {
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
  }
}

async function crafted(tag: string, edit: (recs: Rec[], header: Uint8Array) => Rec[] | void, code: string | string[]): Promise<MigError> {
  const { header, recs } = readRecords(good);
  const out = edit(recs, header) ?? recs;
  const f = tmpFile(tag);
  writeRecords(f, header, out);
  try { return await loadFails(f, code); } finally { rm(f); }
}

const firstData = (recs: Rec[], dev = 0) => recs.find((r) => r.type === 2 && r.device === dev && r.body.length > 64 && getBe64(r.body, 0) === FLAG_DEV_DATA_STATE)!;

test('the unmodified stream loads and verifies', async () => {
  const { report, loader } = await loadStream(good, pool, { verify: true });
  try {
    assert.ok(report.devices.every((d) => d.verified === true));
  } finally {
    for (const d of loader.dests) (d.transport as EmulatedTransport).destroy();
  }
});

test('truncated files: error names the byte offset, destinations never run', async () => {
  const full = fs.readFileSync(good);
  const { recs } = readRecords(good);
  const cuts = [10, 40, recs[1].at + 5, recs[3].at + 100, recs[recs.length - 1].at, full.length - 3];
  for (const cut of cuts) {
    const f = tmpFile('trunc');
    fs.writeFileSync(f, full.subarray(0, cut));
    try {
      const e = await loadFails(f, ErrorCode.STREAM_TRUNCATED);
      assert.type(e.offset, 'number', `cut ${cut}: ${e.message}`);
      assert.ok(e.offset! <= cut, `cut ${cut}: offset ${e.offset}`);
    } finally { rm(f); }
  }
});

test('a flipped byte anywhere in a record fails its checksum', async () => {
  const full = new Uint8Array(fs.readFileSync(good));
  const { recs } = readRecords(good);
  for (const r of [recs[2], recs[5], recs[recs.length - 1]]) {
    const f = tmpFile('flip');
    const b = full.slice();
    b[r.at + 32 + Math.floor(r.body.length / 2)] ^= 0x01;
    fs.writeFileSync(f, b);
    try {
      const e = await loadFails(f, ErrorCode.STREAM_CHECKSUM);
      assert.is(e.offset, r.at);
    } finally { rm(f); }
  }
});

test('bad file magic and version', async () => {
  const b = new Uint8Array(fs.readFileSync(good));
  const f = tmpFile('magic');
  try {
    const m = b.slice(); m[0] = 0x58; fs.writeFileSync(f, m);
    await loadFails(f, ErrorCode.STREAM_BAD_MAGIC);
    const v = b.slice(); v[8] = 9; fs.writeFileSync(f, v);
    await loadFails(f, ErrorCode.STREAM_BAD_VERSION);
  } finally { rm(f); }
});

test('crafted records with valid checksums: unknown tag, reorder, bad device, oversize, abort, trailing bytes', async () => {
  // Unknown QEMU tag inside a device stream: named with its stream byte offset.
  let e = await crafted('tag', (recs) => { putBe64(firstData(recs).body, 0, 0xffffffffef10ffffn); }, ErrorCode.STREAM_UNKNOWN_TAG);
  assert.match(e.message, /0xffffffffef10ffff/);
  assert.type(e.offset, 'number');
  // Two chunks of one device swapped.
  e = await crafted('reorder', (recs) => {
    const idx = recs.map((r, i) => [r, i] as const).filter(([r]) => r.type === 2 && r.device === 1).map(([, i]) => i);
    [recs[idx[1]], recs[idx[2]]] = [recs[idx[2]], recs[idx[1]]];
  }, ErrorCode.STREAM_BAD_RECORD);
  assert.match(e.message, /reordered/);
  // A chunk for a device the table does not have.
  await crafted('dev', (recs) => { firstData(recs).device = 7; }, ErrorCode.STREAM_BAD_RECORD);
  // A data packet claiming more than the destination's data area.
  e = await crafted('big', (recs) => { putBe64(firstData(recs).body, 8, 1n << 40n); }, ErrorCode.STREAM_TOO_LARGE);
  assert.type(e.offset, 'number');
  // The source aborted.
  e = await crafted('abort', (recs) => {
    const end = recs.findIndex((r) => r.type === 3);
    recs[end] = { ...recs[end], type: 4, body: new Uint8Array(Buffer.from(JSON.stringify({ code: 'VFM_CANCELLED', message: 'operator cancel' }))) };
  }, ErrorCode.STREAM_ABORTED);
  assert.match(e.message, /operator cancel/);
  // A record after END.
  await crafted('after-end', (recs) => [...recs, recs[2]], ErrorCode.STREAM_BAD_RECORD);
  // A missing chunk (gap in a device's sequence).
  await crafted('gap', (recs) => recs.filter((r) => r !== firstData(recs, 1)), ErrorCode.STREAM_BAD_RECORD);
  // No END record.
  await crafted('no-end', (recs) => recs.filter((r) => r.type !== 3), ErrorCode.STREAM_TRUNCATED);
});

test('vendor rejects a stream with a wrong device magic or wrong geometry; the destinations are reset and stopped', async () => {
  // The first data packet of device 0 starts with the vendor HEADER record: payload magic at 16 + 24.
  let e = await crafted('vmagic', (recs) => { firstData(recs).body[16 + 24] ^= 0xff; }, ErrorCode.LOAD_REJECTED);
  assert.is(e.device, 'src0');
  assert.match(e.message, /magic/i);
  // Geometry: the device table says 2 MiB, the stream's header says 1 MiB.
  e = await crafted('geom', (recs) => {
    const t = JSON.parse(Buffer.from(recs[0].body).toString());
    t.devices[1].geometry.stateSize = 2 << 20;
    recs[0].body = new Uint8Array(Buffer.from(JSON.stringify(t)));
  }, ErrorCode.LOAD_REJECTED);
  assert.is(e.device, 'src1');
  // A device stream cut short (its last chunks dropped, sequence kept continuous): resume validation refuses RUNNING,
  // or, when the dropped chunks were all of stop-and-copy's DATA, the parser finds its closing END alone (BAD_END).
  e = await crafted('short', (recs) => {
    const d0 = recs.filter((r) => r.type === 2 && r.device === 0 && getBe64(r.body, 0) === FLAG_DEV_DATA_STATE);
    const drop = new Set(d0.slice(-2));
    const out = recs.filter((r) => !drop.has(r));
    renumber(out);
    return out;
  }, [ErrorCode.LOAD_REJECTED, ErrorCode.STREAM_BAD_RECORD, ErrorCode.STREAM_BAD_END]);
});

test('an END record without source digests: nothing is started, the load fails verification', async () => {
  const e = await crafted('nodigest', (recs) => {
    const end = recs.find((r) => r.type === 3)!;
    end.body = new Uint8Array(Buffer.from(JSON.stringify({ devices: [] })));
  }, ErrorCode.VERIFY_FAILED);
  assert.match(e.message, /no source digest/);
});

test('a device table asking for more state than allowed is refused before any destination exists', async () => {
  let created = 0;
  const e = await rejectsCode(loadStream(good, pool, { maxStateBytes: 1 << 20, makeDestination: () => { created++; throw new Error('must not be called'); } }),
    ErrorCode.STREAM_TOO_LARGE);
  assert.is(created, 0);
  assert.match(e.message, /2097152 bytes of device state/);
});

test('device table transports: unknown is malformed; a kernel source needs a caller-supplied destination', async () => {
  const retarget = (transport: string) => (recs: Rec[]) => {
    const t = JSON.parse(Buffer.from(recs[0].body).toString());
    t.devices[0].transport = transport;
    recs[0].body = new Uint8Array(Buffer.from(JSON.stringify(t)));
  };
  await crafted('transport', retarget('carrier-pigeon'), ErrorCode.STREAM_BAD_RECORD);
  const e = await crafted('vfio', retarget('vfio-v1'), ErrorCode.BAD_ARGUMENT);
  assert.match(e.message, /makeDestination/);
});

test('a device table that is not JSON or has absurd geometry is rejected before allocation', async () => {
  await crafted('json', (recs) => { recs[0].body = new Uint8Array(Buffer.from('{nope')); }, ErrorCode.STREAM_BAD_RECORD);
  await crafted('huge', (recs) => {
    const t = JSON.parse(Buffer.from(recs[0].body).toString());
    t.devices[0].geometry.stateSize = 2 ** 50;
    recs[0].body = new Uint8Array(Buffer.from(JSON.stringify(t)));
  }, ErrorCode.STREAM_BAD_RECORD);
});

/** Save one device with a fault; expect `code`; the source must be RUNNING afterwards and the stream ends in ABORT. */
async function saveFails(fault: string, arg: number, code: string, opts: Record<string, unknown> = {}) {
  const f = tmpFile('fault');
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `f${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, guestPages: 64, ...opts }));
  devs[1].device.setFault(fault, arg);
  try {
    const e = await rejectsCode(saveInPlace(devs, f, pool, { maxRounds: 2, maxEmptyChunks: 8, maxNoProgress: 16, vendorMode: 'strict' }), code);
    for (const d of devs) assert.is(d.device.info().deviceState & 7, 1, `${d.name} must be RUNNING after rollback (${fault})`);
    const ins = await inspectContainer(f);
    assert.is(ins.abort?.code, code);
    return e;
  } finally {
    for (const d of devs) d.destroy();
    rm(f);
  }
}

test('impossible vendor values are caught, named, and every device rolls back to RUNNING', async () => {
  let e = await saveFails('bad-data-offset', 3, ErrorCode.VENDOR_BAD_VALUE);
  assert.is(e.register, 'data_offset');
  assert.is(e.device, 'f1');
  assert.match(e.message, /inside the 32-byte header/);
  e = await saveFails('huge-data-offset', 0, ErrorCode.VENDOR_BAD_VALUE);
  assert.is(e.register, 'data_offset');
  e = await saveFails('bad-data-size', 2, ErrorCode.VENDOR_BAD_VALUE);
  assert.is(e.register, 'data_size');
});

test('a vendor that never drains is caught within a bounded number of steps', async () => {
  const e = await saveFails('stuck', 2, ErrorCode.VENDOR_STUCK);
  assert.is(e.device, 'f1');
});

test('vendor I/O error and the ERROR state (reset) roll back cleanly', async () => {
  let e = await saveFails('eio-on-chunk', 4, ErrorCode.NATIVE);
  assert.is(e.errno, 5);
  e = await saveFails('error-on-transition', 2, ErrorCode.DEVICE_ERROR_STATE); // STOP_COPY (010) -> ERROR
  assert.match(e.message, /error state/);
  e = await saveFails('fail-transition', 3, ErrorCode.TRANSITION_FAILED); // refuses PRE_COPY at setup
  assert.is(e.device, 'f1');
});

test('one device failing in stop-and-copy while the others still drain: all end RUNNING, the real error is reported', async () => {
  for (const k of [0, 2, 5]) {
    for (const mib of [1, 3]) {
      const f = tmpFile('race');
      const srcs = [EmulatedTransport.create({ name: 'ra', seed: 1, stateSize: 8 << 20, maxChunk: 1 << 20, dirtyRate: 0, dmaRate: 0 }),
        EmulatedTransport.create({ name: 'rb', seed: 2, stateSize: mib << 20, maxChunk: 1 << 20, dirtyRate: 0, dmaRate: 0 })];
      srcs[0].device.setFault('eio-on-chunk', k);
      try {
        const e = await rejectsCode(saveDevices(srcs, f, pool, { maxRounds: 0 }), ErrorCode.NATIVE);
        assert.is(e.device, 'ra');
        for (const d of srcs) assert.is(d.device.info().deviceState & 7, 1, `${d.name} (k ${k}, ${mib} MiB) must be RUNNING`);
      } finally {
        for (const d of srcs) d.destroy();
        rm(f);
      }
    }
  }
});

test('a record place reserved by a worker that then failed reads as ABORT, not garbage', async () => {
  const { header, recs } = readRecords(good);
  const f = tmpFile('hole');
  // Keep the table and a few chunks, then a hole of the size of one chunk record filled the way a failing worker does.
  writeRecords(f, header, recs.slice(0, 3));
  const size = fs.statSync(f).size;
  const fd = fs.openSync(f, 'r+');
  try {
    fillHole({ fd, counters: new SharedArrayBuffer(16) }, size, 32 + 4000, ErrorCode.IO);
  } finally { fs.closeSync(fd); }
  const e = await loadFails(f, ErrorCode.STREAM_ABORTED);
  assert.match(e.message, /VFM_IO/);
  rm(f);
});

test.run();
