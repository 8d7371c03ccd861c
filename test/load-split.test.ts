// Issue 7 §1.4: a destination whose data area is smaller than the source's takes the source's data packets in several
// vendor writes (QEMU's vfio_load_buffer), each bounded by the room after the vendor's own data_offset, and the
// emulated vendor reassembles records split across data_size writes. Both layouts, every data mode, the zero-copy
// (file) and the slot (no descriptor) load paths, and a vfio-user destination; verified by digest.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { Loader, type LoadReport } from '../src/main/engine/load.js';
import { saveDevices } from '../src/main/api.js';
import { ContainerReader, type RecordSource } from '../src/main/container/reader.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import type { DataMode, EmulatedDeviceOptions, OffsetPolicy } from '../src/main/emulated/device.js';
import type { DeviceTableEntry } from '../src/main/container/format.js';
import { PROFILES, type ProfileName } from '../src/main/protocol/profiles.js';
import { DeviceServer, VfioUserTransport } from '../src/main/reach/vfio-user/index.js';
import { ErrorCode } from '../src/main/errors.js';
import { rejectsCode, rm, tmpFile } from './helpers.js';
import { readRecords, writeRecords } from './craft.js';
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';

const pool = new EnginePool({ threads: 2 });
const IDLE = { dirtyRate: 0, dmaRate: 0 } as const;
/** Sources stage 256 KiB chunks: every data packet is many times a 4 KiB destination area. */
const SRC = { stateSize: 2 << 20, maxChunk: 256 << 10, ...IDLE } as const;

/** The file's records without its descriptor: the loader then takes every record through a slot (no zero-copy). */
function withoutDescriptor(file: string): RecordSource {
  const r = ContainerReader.open(file);
  return {
    get offset() { return r.offset; },
    get size() { return r.size; },
    readPreamble: () => r.readPreamble(),
    next: () => r.next(),
    body: (x, dst, off, dev, verify) => r.body(x, dst, off, dev, verify),
    metaBody: (x) => r.metaBody(x),
    skip: () => { throw new Error('no descriptor: nothing is skipped'); },
    checkEnd: () => r.checkEnd(),
    close: () => r.close(),
  };
}

async function save(profile: ProfileName, dataMode: DataMode, seed: number): Promise<{ file: string }> {
  const src = EmulatedTransport.create({ profile, dataMode, seed, ...SRC });
  const file = tmpFile('split');
  try {
    const rep = await saveDevices([src], file, pool, { maxRounds: 1 });
    assert.ok(rep.ok);
    return { file };
  } finally {
    src.destroy();
  }
}

type Geo = { dataMode: DataMode; offsetPolicy: OffsetPolicy; dataArea: number };
// The destination has the source's device model (chunk size) but a small data area: 4 KiB (data_offset 4096, not the
// region start: the room is less than the region size minus the header); a data_offset that moves with every write
// in 64 KiB (so each piece needs a fresh data_offset read, and the room after it varies); 192 KiB of 64 KiB mapped /
// trapped stripes at moving offsets (pieces straddle mapped and trapped ranges).
const GEOS: Geo[] = [
  { dataMode: 'mmap', offsetPolicy: 'fixed', dataArea: 4096 },
  { dataMode: 'trapped', offsetPolicy: 'fixed', dataArea: 4096 },
  { dataMode: 'trapped', offsetPolicy: 'moving', dataArea: 64 << 10 },
  { dataMode: 'mixed', offsetPolicy: 'moving', dataArea: 192 << 10 },
];

async function loadInto(file: string, o: (e: DeviceTableEntry) => EmulatedDeviceOptions, slotPath: boolean):
  Promise<{ report: LoadReport; dst: EmulatedTransport }> {
  let dst: EmulatedTransport | undefined;
  const loader = new Loader(slotPath ? withoutDescriptor(file) : file, pool, {
    verify: true,
    makeDestination: (e) => (dst = EmulatedTransport.create({
      name: e.name, stateSize: e.geometry.stateSize, maxChunk: e.geometry.maxChunk, zeroFill: true, ...IDLE, ...o(e),
    })),
  });
  try {
    return { report: await loader.run(), dst: dst! };
  } catch (e) {
    dst?.destroy();
    throw e;
  }
}

for (const profile of PROFILES) {
  test(`${profile}: 256 KiB packets load into small destination data areas in pieces (zero-copy and slot paths), verified`, async () => {
    for (const [i, g] of GEOS.entries()) {
      const { file } = await save(profile, g.dataMode, 11 + i);
      try {
        for (const slotPath of [false, true]) {
          const what = `${g.dataMode}/${g.offsetPolicy}/${g.dataArea} ${slotPath ? 'slot' : 'zero-copy'}`;
          const { report, dst } = await loadInto(file, (e) => ({ profile: e.profile as ProfileName, ...g }), slotPath);
          try {
            const dev = report.devices[0];
            assert.is(dev.verified, true, `${what}: digest`);
            const info = dst.device.info();
            assert.is(info.dataAreaSize, g.dataArea);
            assert.is(info.pagesLoaded, SRC.stateSize / 4096, `${what}: every page`);
            // Each vendor write holds at most the area: many more writes than packets.
            assert.ok(info.chunksConsumed >= Math.ceil(dev.dataBytes / g.dataArea), `${what}: ${info.chunksConsumed} writes for ${dev.dataBytes} bytes`);
            assert.ok(dev.dataBytes >= SRC.stateSize && dev.dataPackets <= dev.dataBytes / (64 << 10), `${what}: ${dev.dataPackets} packets`);
            assert.ok(info.chunksConsumed > dev.dataPackets, `${what}: ${info.chunksConsumed} writes, ${dev.dataPackets} packets`);
          } finally {
            dst.destroy();
          }
        }
      } finally {
        rm(file);
      }
    }
  });
}

test('linux-5.8: a vfio-user destination with a 4 KiB data area takes 256 KiB packets in pieces, verified by its digest', async () => {
  for (const dataMode of ['mmap', 'trapped'] as const) {
    const { file } = await save('linux-5.8', dataMode, 31);
    const socket = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-split-')), 'dst.sock');
    const srv = DeviceServer.start({ socket, stateSize: SRC.stateSize, maxChunk: SRC.maxChunk, dataArea: 4096, dataMode, zeroFill: true, ...IDLE });
    const d = await VfioUserTransport.connect(socket);
    try {
      const report = await new Loader(file, pool, { verify: true, makeDestination: () => d }).run();
      assert.is(report.devices[0].verified, true, `${dataMode}: digest from the server`);
      assert.ok(srv.device.info().chunksConsumed > (SRC.stateSize / (256 << 10)), `${dataMode}: split into many writes`);
    } finally {
      d.close(); srv.stop(); rm(file);
    }
  }
});

test('a packet beyond what the source could stage is the stream\'s fault (VFM_STREAM_TOO_LARGE at its offset), the vendor gets nothing', async () => {
  const { file } = await save('linux-5.8', 'mmap', 41);
  const bad = tmpFile('split-bad');
  try {
    // The table now says the source's region was 64 KiB: its 256 KiB packets cannot have come from it.
    const { header, recs } = readRecords(file);
    const t = JSON.parse(Buffer.from(recs[0].body).toString());
    t.devices[0].geometry.regionSize = 64 << 10;
    recs[0].body = new Uint8Array(Buffer.from(JSON.stringify(t)));
    writeRecords(bad, header, recs);
    const dst = EmulatedTransport.create({ profile: 'linux-5.8', stateSize: SRC.stateSize, maxChunk: SRC.maxChunk, dataArea: 4096, zeroFill: true, ...IDLE });
    try {
      const e = await rejectsCode(new Loader(bad, pool, { makeDestination: () => dst }).run(), ErrorCode.STREAM_TOO_LARGE);
      assert.match(e.message, /(CHUNK|data packet) of \d+ bytes exceeds/, e.message);
      assert.ok(e.offset! > 0, 'names the offset');
      assert.ok(e.device, 'names the device');
      assert.is(dst.device.info().chunksConsumed, 0, 'the vendor was given nothing');
      assert.is(dst.device.info().lastError, '', 'nor refused anything');
    } finally {
      dst.destroy();
    }
  } finally {
    rm(file, bad);
  }
});

test.after(async () => { await pool.close(); });

test.run();
