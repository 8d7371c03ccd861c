// The destination's record source over a connection (src/main/live/source.ts): large CHUNKs are received straight
// into shared memory laid out as the loader's staging slot and handed over without a copy; the buffers are reused,
// so a received stream being saved must not see a later record's bytes in an earlier one.
import { PassThrough } from 'node:stream';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ContainerWriter } from '../src/main/container/writer.js';
import type { Sink } from '../src/main/container/sink.js';
import type { FileSink } from '../src/main/container/sink.js';
import { RECORD_HEADER_SIZE } from '../src/main/container/format.js';
import { DeviceShared } from '../src/main/engine/device-shared.js';
import { LiveSource } from '../src/main/live/source.js';
import { SocketReader } from '../src/main/live/wire.js';

/** Container bytes, one Buffer per write: file header, DEVICE_TABLE, then each CHUNK. */
async function stream(bodies: Uint8Array[]): Promise<Buffer[]> {
  const out: Buffer[] = [];
  const sink: Sink = { bytes: 0, write: async (b) => { out.push(Buffer.from(b)); }, close: async () => undefined };
  const w = new ContainerWriter(sink);
  await w.begin({
    version: 1,
    devices: [{
      index: 0, name: 'd0', profile: 'linux-5.8', transport: 'emulated',
      geometry: { stateSize: 1 << 20, maxChunk: 1 << 20, guestPages: 16, dataMode: 'mmap', offsetPolicy: 'fixed', regionSize: 2 << 20 },
    }],
  } as never);
  const shared = DeviceShared.create();
  for (const b of bodies) await w.deviceBytes(0, shared, b);
  return out;
}

const filled = (n: number, v: number) => new Uint8Array(n).fill(v);

test('a large CHUNK is handed over in shared memory laid out as a staging slot; a small one is not', async () => {
  const big = filled(200 << 10, 0xab);
  const small = filled(100, 0x11);
  const recs = await stream([big, small]);
  const sock = new PassThrough();
  const src = new LiveSource({ onControl: () => undefined, waitDone: async () => undefined, onAbort: () => undefined });
  sock.write(Buffer.concat(recs));
  await src.openMain(new SocketReader(sock, 'channel 0'));
  src.start(1 << 21);
  const r1 = (await src.next())!;
  const slot = src.takeSlot(r1);
  assert.ok(slot, 'a 200 KiB CHUNK comes in shared memory');
  const v = new Uint8Array(slot!.sab);
  assert.equal(Buffer.from(v.subarray(0, RECORD_HEADER_SIZE)), recs[2].subarray(0, RECORD_HEADER_SIZE), 'the record header at 0');
  assert.equal(Buffer.from(v.subarray(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + big.length)), Buffer.from(big), 'the body at 32');
  assert.is(src.takeSlot(r1), null, 'handed over once');
  slot!.release();
  const r2 = (await src.next())!;
  assert.is(src.takeSlot(r2), null, 'a 100-byte CHUNK is copied, not handed over');
  const dst = new Uint8Array(RECORD_HEADER_SIZE + 100);
  await src.body(r2, dst, RECORD_HEADER_SIZE, 'd0', true);
  assert.equal(Buffer.from(dst.subarray(RECORD_HEADER_SIZE)), Buffer.from(small));
  src.fail(new Error('done') as never);
});

test('saving a received stream keeps each record\'s own bytes although the shared buffers are reused', async () => {
  const a = filled(128 << 10, 0xaa);
  const b = filled(128 << 10, 0xbb);
  const recs = await stream([a, b]);
  // A save sink that keeps the views it is given (as an asynchronous file write would read them later).
  const held: Uint8Array[] = [];
  const save = { write: async (x: Uint8Array) => { held.push(x); }, close: async () => undefined } as unknown as FileSink;
  const sock = new PassThrough();
  const src = new LiveSource({ onControl: () => undefined, waitDone: async () => undefined, onAbort: () => undefined, save });
  sock.write(Buffer.concat(recs.slice(0, 3))); // header, table, the first CHUNK only
  await src.openMain(new SocketReader(sock, 'channel 0'));
  src.start(1 << 21);
  const r1 = (await src.next())!;
  const s1 = src.takeSlot(r1)!;
  s1.release(); // the loader is done with it: the next record of that size class reuses the buffer
  sock.write(recs[3]);
  const r2 = (await src.next())!;
  const s2 = src.takeSlot(r2)!;
  assert.is(s2.sab, s1.sab, 'the buffer was reused');
  // held: file header, table (at openMain), then header + body of each record.
  const body1 = held[3];
  assert.is(body1.length, a.length);
  assert.ok(body1.every((x) => x === 0xaa), 'the first record saved as received, not overwritten by the second');
  assert.ok(held[5].every((x) => x === 0xbb));
  src.fail(new Error('done') as never);
});

test.run();
