// Round trips of emulated devices in every profile x data-area mode x data_offset policy, verified by digests,
// and the byte-exact QEMU stream of a small known device.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import { EnginePool } from '../src/main/engine/pool.js';
import { runEmulated, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { extractDevice } from '../src/main/container/inspect.js';
import { encodeConfigBlob } from '../src/main/protocol/config-blob.js';
import { configSection, endTag, putBe64, setupSection, FLAG_DEV_DATA_STATE, FLAG_END_OF_STATE } from '../src/main/protocol/qemu-stream.js';
import type { ProfileName } from '../src/main/protocol/profiles.js';
import type { DataMode, OffsetPolicy } from '../src/main/emulated/device.js';
import { expectedConfig, expectedState, rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
test.after(async () => { await pool.close(); });

for (const profile of ['draft-2019', 'linux-5.8'] as ProfileName[]) {
  for (const dataMode of ['mmap', 'trapped', 'mixed'] as DataMode[]) {
    for (const offsetPolicy of ['fixed', 'moving'] as OffsetPolicy[]) {
      test(`round trip ${profile} ${dataMode} ${offsetPolicy} with the workload running`, async () => {
        const r = await runEmulated({
          pool, devices: 2, seed: 11, maxRounds: 4, downtimeLimitMs: 5,
          device: { profile, dataMode, offsetPolicy, stateSize: 2 << 20, maxChunk: 96 << 10, dirtyRate: 20000, dmaRate: 5000, guestPages: 1024 },
        });
        assert.ok(r.ok);
        assert.is(r.load.devices.length, 2);
        for (const d of r.load.devices) {
          assert.is(d.verified, true, d.name);
          assert.is(d.state, 'RUNNING');
          assert.match(d.digest!, /^sha256:[0-9a-f]{64}$/);
        }
        // The workload ran during pre-copy, so the devices' final digests differ from each other and from zero state.
        assert.is.not(r.load.devices[0].digest, r.load.devices[1].digest);
        assert.ok(r.save.precopyBytes >= 2 * (2 << 20), 'first pass sends every page');
        assert.ok(r.save.stopCopyBytes > 0, 'stop-and-copy sends the rest (at least the END record)');
      });
    }
  }
}

function be64(v: bigint): Uint8Array { const b = new Uint8Array(8); putBe64(b, 0, v); return b; }
function le(words: [number, number | bigint][]): Uint8Array {
  const size = words.reduce((a, [w]) => a + w, 0);
  const b = new Uint8Array(size);
  const dv = new DataView(b.buffer);
  let o = 0;
  for (const [w, v] of words) {
    if (w === 4) dv.setUint32(o, Number(v), true); else dv.setBigUint64(o, BigInt(v), true);
    o += w;
  }
  return b;
}
const cat = (...p: Uint8Array[]) => new Uint8Array(Buffer.concat(p));

/** The vendor stream of docs/EMULATED-DEVICE.md, built independently of the device. */
function vendorRecords(seed: number, stateSize: number, maxChunk: number) {
  const state = expectedState(seed, stateSize);
  const header = cat(le([[4, 0x48444d56], [4, 0], [8, stateSize], [8, 4096n | (1n << 32n)]]), le([[8, 0x3156454455454d46n], [4, maxChunk], [4, 0], [8, 0]]));
  const page = (seq: number, p: number) => cat(le([[4, 0x53454750], [4, seq], [8, p], [8, 1]]), state.subarray(p * 4096, (p + 1) * 4096));
  const end = (seq: number, pages: number) => le([[4, 0x21444e45], [4, seq], [8, seq], [8, pages]]);
  return { header, page, end };
}

test('byte-exact QEMU stream of a small known device (16 KiB, 8 KiB chunks, one pre-copy round)', async () => {
  const seed = 7;
  const file = tmpFile('exact');
  const out = file + '.qemu';
  const dev = EmulatedTransport.create({ name: 'known', profile: 'linux-5.8', stateSize: 16384, maxChunk: 8192, seed, dirtyRate: 0, dmaRate: 0, guestPages: 64 });
  try {
    const rep = await saveDevices([dev], file, pool, { maxRounds: 1, downtimeLimitMs: 0 });
    assert.ok(rep.ok);
    await extractDevice(file, 0, out);
    const got = new Uint8Array(fs.readFileSync(out));
    const { header, page, end } = vendorRecords(seed, 16384, 8192);
    // One chunk holds whole records: header + 1 page, then 1 page each; the END record goes out in stop-and-copy.
    const chunks = [cat(header, page(1, 0)), page(2, 1), page(3, 2), page(4, 3)];
    const iterate = chunks.map((c) => cat(be64(FLAG_DEV_DATA_STATE), be64(BigInt(c.length)), c, be64(FLAG_END_OF_STATE)));
    const endChunk = end(5, 4);
    const complete = cat(be64(FLAG_DEV_DATA_STATE), be64(BigInt(endChunk.length)), endChunk, endTag());
    const expected = cat(setupSection(), ...iterate, complete, configSection(encodeConfigBlob(expectedConfig(seed))));
    assert.is(got.length, expected.length, 'stream length');
    assert.ok(Buffer.compare(Buffer.from(got), Buffer.from(expected)) === 0, 'stream bytes differ');
  } finally {
    dev.destroy();
    rm(file, out);
  }
});

test.run();
