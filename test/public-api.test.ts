// Test-only switches stay out of the public API: not exported, not in the published types, not honoured when an
// embedder passes them in a plain options object. (Fault injection of the emulated device is a product feature and
// stays: EmulatedDevice.setFault, docs/EMULATED-DEVICE.md.)
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as api from '../src/main/index.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { RegionLock } from '../src/main/engine/region-lock.js';
import { rm, tmpFile } from './helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TEST_ONLY = /testExitAfterChunks|setDisabled|disableRegionLock|withTestHooks|TEST_HOOKS/;

test('the package exposes one entry point, whose exports and types carry no test switch', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
  assert.equal(Object.keys(pkg.exports).sort(), ['.', './package.json']);
  for (const k of Object.keys(api)) assert.not.match(k, TEST_ONLY, `export ${k}`);
  // The published declarations of everything index.ts re-exports.
  const dts = (rel: string) => fs.readFileSync(path.join(ROOT, 'dist/src/main', rel), 'utf8');
  for (const f of ['index.d.ts', 'api.d.ts', 'engine/migration.d.ts', 'engine/region-lock.d.ts', 'engine/load.d.ts', 'engine/pool.d.ts']) {
    assert.not.match(dts(f), TEST_ONLY, f);
  }
  assert.not.ok('setDisabled' in RegionLock.prototype, 'RegionLock has no disable switch');
  assert.not.ok('disabled' in RegionLock.prototype);
});

test('a test switch passed as a plain option does nothing: the worker does not die', async () => {
  const pool = new EnginePool({ threads: 2 });
  const f = tmpFile('no-hook');
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `p${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 }));
  try {
    const r = await saveDevices(devs, f, pool, { maxRounds: 1, testExitAfterChunks: { device: 1, chunks: 0 } } as never);
    assert.ok(r.ok);
  } finally {
    for (const d of devs) d.destroy();
    rm(f);
    await pool.close();
  }
});

test.run();
