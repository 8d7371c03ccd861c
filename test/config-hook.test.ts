// Issue 7 §1.6: config space save/restore as an embedder hook. A save hook's bytes travel in the device's CONFIG
// section (flagged as the embedder's) and reach the destination's restore hook on the main thread; the default
// applies where no hook is given; embedder bytes never reach a default restore; a failing hook is VFM_CONFIG_HOOK.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import { isMainThread } from 'node:worker_threads';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { destroyEmulated, emulatedV2 } from '../src/main/reach/emulated/v2.js';
import type { ConfigHooks } from '../src/main/engine/config-hook.js';
import { CONFIG_FLAG_EMBEDDER, encodeConfigBlob } from '../src/main/protocol/config-blob.js';
import { configSection } from '../src/main/protocol/qemu-stream.js';
import { ErrorCode } from '../src/main/errors.js';
import type { EngineDevice } from '../src/main/engine/source-device.js';
import { expectedConfig, rejectsCode, rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
const GEO = { stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 } as const;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

type Dev = EngineDevice & { readConfig(): Uint8Array | Promise<Uint8Array>; writeConfig(b: Uint8Array): void | Promise<void> };
function make(profile: 'draft-2019' | 'linux-5.8' | 'v2', seed: number, zero = false): Dev {
  const o = { ...GEO, seed, zeroFill: zero, name: `${profile}-${seed}` };
  return (profile === 'v2' ? emulatedV2({ ...o, profile: 'v2' }) : EmulatedTransport.create({ ...o, profile })) as unknown as Dev;
}
const destroy = (d: Dev) => destroyEmulated(d);

/** A VMM's own state for device i: some bytes of its own, then the device's config space (it owns that too). */
const vmmBytes = (i: number, cfg: Uint8Array) => Uint8Array.from([...Buffer.from(`vmm-state-of-${i};`.repeat(20)), ...cfg]);

for (const profile of ['draft-2019', 'linux-5.8', 'v2'] as const) {
  test(`${profile}: a save hook's bytes travel in the CONFIG section and reach the restore hook (main thread, async); default where the hook declines`, async () => {
    const srcs = [make(profile, 3), make(profile, 4)];
    const file = tmpFile('cfg');
    const sent: (Uint8Array | undefined)[] = [];
    const saveHook: ConfigHooks = {
      async save(d) {
        assert.ok(isMainThread);
        await sleep(5);
        // Device 1: the reach's default.
        const b = d.index === 0 ? vmmBytes(d.index, await (d.device as Dev).readConfig()) : undefined;
        sent[d.index] = b;
        return b;
      },
    };
    const dsts: Dev[] = [];
    try {
      assert.ok((await saveDevices(srcs, file, pool, { maxRounds: 1, config: saveHook })).ok);
      // Device 0's section carries the hook's bytes, flagged as the embedder's; device 1's the default config space.
      const raw = fs.readFileSync(file);
      assert.ok(raw.includes(Buffer.from(configSection(encodeConfigBlob(sent[0]!, CONFIG_FLAG_EMBEDDER)))), 'hook bytes in a CONFIG section');
      assert.ok(raw.includes(Buffer.from(configSection(encodeConfigBlob(expectedConfig(4))))), 'default config space for device 1');
      const got: { index: number; bytes: Uint8Array; main: boolean }[] = [];
      const restoreHook: ConfigHooks = {
        async restore(d, bytes, restoreDefault) {
          got.push({ index: d.index, bytes: bytes.slice(), main: isMainThread });
          await sleep(5);
          if (d.index === 0) {
            // The embedder's bytes are not config space: the default restore refuses them.
            let refused = '';
            try { await restoreDefault(); } catch (e) { refused = (e as { code: string }).code; }
            assert.is(refused, ErrorCode.LOAD_REJECTED);
            await (d.device as Dev).writeConfig(bytes.subarray(bytes.length - 256)); // the VMM restores config space itself
          } else {
            await restoreDefault();
          }
        },
      };
      const { report } = await loadStream(file, pool, {
        verify: true, config: restoreHook,
        makeDestination: (e) => { const d = make(profile, 0, true); dsts[e.index] = d; return d as never; },
      });
      assert.equal(report.devices.map((d) => d.verified), [true, true], 'config space restored by the hook and by the default');
      got.sort((a, b) => a.index - b.index);
      assert.equal(got.map((g) => g.index), [0, 1], 'called once per device');
      assert.ok(got.every((g) => g.main), 'on the main thread');
      assert.equal(Array.from(got[0].bytes), Array.from(sent[0]!), 'device 0: the save hook\'s bytes');
      assert.equal(Array.from(got[1].bytes), Array.from(expectedConfig(4)), 'device 1: the default config space');
    } finally {
      for (const d of [...srcs, ...dsts]) if (d) destroy(d);
      rm(file);
    }
  });
}

test('embedder bytes without a restore hook: VFM_LOAD_REJECTED naming the device and the offset, nothing started', async () => {
  const src = make('linux-5.8', 5);
  const file = tmpFile('cfg-nohook');
  let dst: Dev | undefined;
  try {
    await saveDevices([src], file, pool, { maxRounds: 1, config: { save: () => new Uint8Array(100).fill(7) } });
    const e = await rejectsCode(loadStream(file, pool, { verify: true, makeDestination: () => (dst = make('linux-5.8', 0, true)) as never }), ErrorCode.LOAD_REJECTED);
    assert.is(e.device, 'linux-5.8-0', 'the destination');
    assert.ok(e.offset! > 0);
    assert.match(e.message, /config restore hook/);
    assert.is(((dst as unknown as EmulatedTransport).device.info().deviceState & 7), 0, 'reset and stopped (the failed-load rule), never started');
  } finally {
    destroy(src);
    if (dst) destroy(dst);
    rm(file);
  }
});

test('a failing or oversized hook is VFM_CONFIG_HOOK naming the device; the source runs again', async () => {
  const src = make('linux-5.8', 6);
  const file = tmpFile('cfg-bad');
  try {
    for (const save of [() => { throw new Error('vmm lost its state'); }, () => new Uint8Array(65537), () => 'nope' as never]) {
      const e = await rejectsCode(saveDevices([src], file, pool, { maxRounds: 1, config: { save } }), ErrorCode.CONFIG_HOOK);
      assert.is(e.device, 'linux-5.8-6');
      assert.is((src as unknown as EmulatedTransport).device.info().deviceState & 7, 1, 'RUNNING again');
    }
    await saveDevices([src], file, pool, { maxRounds: 1 });
    const dst = make('linux-5.8', 0, true);
    try {
      const e = await rejectsCode(loadStream(file, pool, { makeDestination: () => dst as never, config: { restore: async () => { throw new Error('no room'); } } }), ErrorCode.CONFIG_HOOK);
      assert.is(e.device, 'linux-5.8-6');
      assert.match(e.message, /config restore hook failed: no room/);
    } finally {
      destroy(dst);
    }
    await rejectsCode(saveDevices([src], file, pool, { config: { save: 1 } as never }), ErrorCode.BAD_ARGUMENT);
  } finally {
    destroy(src);
    rm(file);
  }
});

test.after(async () => { await pool.close(); });

test.run();
