// The host survives many devices: emulated devices share a small workload pool and one guest RAM allocated on
// demand (issue 7 §2.2).
import fs from 'node:fs';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { native } from '../src/addon/native.js';
import { EmulatedDevice } from '../src/main/emulated/device.js';

const status = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('128 devices with a workload share at most 4 pool threads, and every device runs its workload', async () => {
  const before = status('Threads');
  const devs = Array.from({ length: 128 }, (_, i) => new EmulatedDevice({ stateSize: 8192, dirtyRate: 2000, dmaRate: 0, seed: i }));
  try {
    await sleep(150);
    const grew = status('Threads') - before;
    assert.ok(grew <= 4, `threads grew by ${grew} for 128 devices`);
    assert.ok(native().emuStats().workloadThreads <= 4);
    for (const d of devs) assert.ok(d.info().workloadWrites > 0, `${d.name} made no workload writes`);
  } finally {
    for (const d of devs) d.destroy();
  }
});

test('a destroyed device leaves the pool: its workload stops', async () => {
  const d = new EmulatedDevice({ stateSize: 8192, dirtyRate: 100000, dmaRate: 0 });
  const other = new EmulatedDevice({ stateSize: 8192, dirtyRate: 100000, dmaRate: 0 });
  try {
    await sleep(30);
    d.destroy();
    const n = other.info().workloadWrites;
    await sleep(30);
    assert.ok(other.info().workloadWrites > n, 'the pool still serves the other device');
  } finally {
    d.destroy();
    other.destroy();
  }
});

test('guest RAM is one per process and allocated by DMA: 32 devices writing 1024 guest pages cost ~4 MiB, not 32x', async () => {
  const shmem0 = status('RssShmem');
  // Devices without DMA never create guest RAM pages.
  const quiet = Array.from({ length: 32 }, () => new EmulatedDevice({ stateSize: 8192, dirtyRate: 0, dmaRate: 0, guestPages: 1024 }));
  for (const d of quiet) d.destroy();
  const devs = Array.from({ length: 32 }, (_, i) => new EmulatedDevice({ stateSize: 8192, dirtyRate: 0, dmaRate: 200000, guestPages: 1024, seed: i }));
  try {
    await sleep(250); // 200k DMA writes/s over 1024 pages: each device has written (nearly) every page by now
    for (const d of devs) assert.ok(d.info().dmaWrites > 2048, `${d.name}: ${d.info().dmaWrites} DMA writes`);
    const grewKiB = status('RssShmem') - shmem0;
    assert.ok(grewKiB < 16 * 1024, `shared memory grew by ${grewKiB} KiB (32 private guest memories would be 128 MiB)`);
    assert.ok(native().emuStats().guestRamBytes >= 1024 * 4096);
  } finally {
    for (const d of devs) d.destroy();
  }
});

test.run();
