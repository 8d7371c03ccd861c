// Issue 7 §1.6: trapped data access. Bulk pread/pwrite stays the default; `aligned` is QEMU v1's vfio_mig_rw pattern
// (naturally aligned accesses of 8, 4, 2 or 1 bytes). An emulated vendor made strict through the test entry point
// refuses anything else: a migration fails with bulk and verifies with aligned, on the source and the destination.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { strictTrappedAccess } from '../src/main/engine/test-hooks.js';
import { PROFILES } from '../src/main/protocol/profiles.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { checkLoadOptions, checkMigrationOptions } from '../src/main/options.js';
import { rejectsCode, rm, tmpFile } from './helpers.js';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../bin/vfio-mig.js');
const cli = (...a: string[]) => spawnSync(process.execPath, [BIN, ...a], { encoding: 'utf8', timeout: 60_000 });

const pool = new EnginePool({ threads: 2 });
const GEO = { stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 } as const;

test('region: aligned splits an odd range into naturally aligned 1/2/4/8-byte accesses a strict vendor takes; bulk is refused', () => {
  const t = EmulatedTransport.create({ ...GEO, dataMode: 'trapped' });
  try {
    const r = t.openRegion();
    const src = Uint8Array.from({ length: 40 }, (_, i) => i * 7 + 3);
    r.copyIn(4096, 40, src, 0, 3); // RUNNING: the data area is plain memory to the vendor
    const read = (off: number, len: number) => { const b = new Uint8Array(len); r.copyOut(off, len, b, 0); return Array.from(b); };
    const bulk = read(4097, 13);
    strictTrappedAccess(t.device.id, true);
    let e: unknown;
    try { read(4097, 13); } catch (x) { e = x; }
    assert.instance(e, MigError, 'bulk: one 13-byte access at an odd offset is refused');
    assert.is((e as MigError).device, t.name);
    assert.is((e as MigError).offset, 4097);
    assert.match((e as Error).message, /off=4097 len=13/);
    r.setTrappedAccess('aligned');
    // 4097: 1, 4098: 2, 4100: 4, 4104: 4, 4108: 2 — each naturally aligned.
    assert.equal(read(4097, 13), bulk, 'same bytes');
    assert.equal(read(4096, 40), Array.from(src));
    const w = Uint8Array.from({ length: 21 }, (_, i) => 200 - i);
    r.copyIn(4099, 21, w, 0, 3);
    assert.equal(read(4099, 21), Array.from(w), 'aligned writes');
    r.setTrappedAccess('bulk');
    try { r.copyIn(4099, 21, w, 0, 3); e = undefined; } catch (x) { e = x; }
    assert.instance(e, MigError, 'bulk write refused');
    assert.match((e as Error).message, /trapped write off=4099 len=21/);
  } finally {
    t.destroy();
  }
});

for (const profile of PROFILES) {
  for (const dataMode of ['trapped', 'mixed'] as const) {
    test(`${profile} ${dataMode}: a strict vendor fails a bulk save and a bulk load, and verifies with --trapped-access aligned`, async () => {
      const mk = (o: object) => {
        // mixed: 96 KiB chunks at moving offsets straddle the 64 KiB mapped / trapped stripes.
        const t = EmulatedTransport.create({ profile, dataMode, ...GEO, ...(dataMode === 'mixed' ? { maxChunk: 96 << 10, offsetPolicy: 'moving' as const } : {}), ...o });
        strictTrappedAccess(t.device.id, true);
        return t;
      };
      const src = mk({ seed: 3 });
      const file = tmpFile('aligned');
      try {
        // A vendor refusing a trapped read while saving: VFM_NATIVE with the vendor's reason, the device and the offset.
        const e = await rejectsCode(saveDevices([src], file, pool, {}), ErrorCode.NATIVE);
        assert.is(e.device, src.name, e.message);
        assert.ok(e.offset! >= 4096, 'names the data offset');
        assert.match(e.message, /naturally aligned/, 'the vendor said why');
        assert.is(src.device.info().deviceState & 7, 1, 'the source runs again');
        const save = await saveDevices([src], file, pool, { trappedAccess: 'aligned' });
        assert.ok(save.ok);
        for (const mode of ['bulk', 'aligned'] as const) {
          const dst = mk({ zeroFill: true });
          try {
            const p = loadStream(file, pool, { verify: true, makeDestination: () => dst, trappedAccess: mode });
            if (mode === 'bulk') {
              const le = await rejectsCode(p, ErrorCode.LOAD_REJECTED);
              assert.is(le.device, dst.name);
              assert.type(le.offset, 'number');
              assert.match(le.message, /naturally aligned/);
            } else {
              const { report } = await p;
              assert.is(report.devices[0].verified, true, 'digest');
            }
          } finally {
            dst.destroy();
          }
        }
      } finally {
        src.destroy();
        rm(file);
      }
    });
  }
}

test('trappedAccess is checked: anything but bulk or aligned is VFM_BAD_ARGUMENT', () => {
  for (const check of [checkMigrationOptions, checkLoadOptions]) {
    let e: unknown;
    try { check({ trappedAccess: 'qemu' }); } catch (x) { e = x; }
    assert.instance(e, MigError);
    assert.is((e as MigError).code, ErrorCode.BAD_ARGUMENT);
    check({ trappedAccess: 'aligned' });
  }
});

test('CLI: --trapped-access bulk|aligned on run/save/load (default bulk, said in --help) reaches the region; a bad mode exits 2', () => {
  const flat = (t: string) => t.replace(/\s+/g, ' ');
  for (const c of ['run', 'save', 'send', 'load']) assert.match(flat(cli(c, '--help').stdout), /--trapped-access <mode> .*aligned.*\(default: bulk\)/, c);
  const bad = cli('run', '--trapped-access', 'qemu');
  assert.is(bad.status, 2);
  assert.match(bad.stderr, /VFM_BAD_ARGUMENT: --trapped-access: 'qemu' is not one of bulk, aligned/);
  const ok = cli('run', '--size', '1MiB', '--chunk', '64KiB', '--devices', '1', '--data-mode', 'trapped', '--trapped-access', 'aligned', '--json', '--verbose');
  assert.is(ok.status, 0, ok.stderr);
  assert.is(JSON.parse(ok.stdout).result.load.devices[0].verified, true);
  // Both sides set the mode on their region.
  assert.is(ok.stderr.match(/vfio_region_trapped_access device=\S+ mode=aligned/g)?.length, 2, ok.stderr.slice(0, 2000));
});

test.after(async () => { await pool.close(); });

test.run();
