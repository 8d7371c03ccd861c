// Never lose or clobber data (API): outputs are refused when they exist (unless force) or are an input (always),
// written under a temporary name and renamed on success, so a failed, cancelled or refused save leaves nothing at
// the final name and an older file there intact; options are checked before any file is touched; a second save to
// the same path is refused while the first runs.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, runEmulated, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { extractDevice, inspectContainer } from '../src/main/container/inspect.js';
import { OutputFile } from '../src/main/container/output.js';
import { ErrorCode } from '../src/main/errors.js';
import { rejectsCode } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
const DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-files-'));
test.after(async () => { fs.rmSync(DIR, { recursive: true, force: true }); await pool.close(); });

const f = (name: string) => path.join(DIR, name);
function devices(n = 2, o: Record<string, unknown> = {}) {
  return Array.from({ length: n }, (_, i) => EmulatedTransport.create({
    name: `d${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, seed: 7 + i, dirtyRate: 0, dmaRate: 0, guestPages: 64, ...o,
  }));
}
async function withDevices<T>(fn: (ds: EmulatedTransport[]) => Promise<T>, n = 2, o: Record<string, unknown> = {}): Promise<T> {
  const ds = devices(n, o);
  try { return await fn(ds); } finally { for (const d of ds) d.destroy(); }
}
const running = (ds: EmulatedTransport[]) => ds.every((d) => (d.device.info().deviceState & 7) === 1);
/** Nothing but `keep` in the folder: no temporary file, no lock left behind. */
function onlyFiles(...keep: string[]): void {
  assert.equal(fs.readdirSync(DIR).sort(), keep.map((k) => path.basename(k)).sort(), 'folder contents');
}
function clear(): void { for (const x of fs.readdirSync(DIR)) fs.rmSync(path.join(DIR, x), { force: true }); }
const openFds = () => fs.readdirSync('/proc/self/fd').length;

test('an existing file is refused without force and left byte for byte; with force it is replaced', async () => {
  clear();
  const out = f('exists.vfmig');
  fs.writeFileSync(out, 'precious');
  await withDevices(async (ds) => {
    const e = await rejectsCode(saveDevices(ds, out, pool, { maxRounds: 1 }), ErrorCode.OUTPUT_EXISTS);
    assert.match(e.message, /--force/);
    assert.is(fs.readFileSync(out, 'utf8'), 'precious');
    assert.ok(running(ds), 'a refused save never touched the devices');
    onlyFiles(out);
    const r = await saveDevices(ds, out, pool, { maxRounds: 1, force: true });
    assert.ok(r.ok);
    const ins = await inspectContainer(out);
    assert.is(ins.status, 'complete');
    assert.is(ins.size, r.streamBytes);
    onlyFiles(out);
  });
});

test('a file created at the name while the save runs is not replaced without force', async () => {
  clear();
  const out = f('appears.vfmig');
  await withDevices(async (ds) => {
    const e = await rejectsCode(saveDevices(ds, out, pool, { maxRounds: 1 }, (m) => {
      m.on('phase', (_f, to) => { if (to === 'precopy') fs.writeFileSync(out, 'someone else'); });
    }), ErrorCode.OUTPUT_EXISTS);
    assert.match(e.message, /appeared while writing/);
  });
  assert.is(fs.readFileSync(out, 'utf8'), 'someone else');
  onlyFiles(out);
});

test('a failed save leaves nothing at a new name, and the old file intact when replacing with force', async () => {
  clear();
  const fresh = f('fresh.vfmig');
  const old = f('old.vfmig');
  fs.writeFileSync(old, 'old contents');
  for (const [out, force] of [[fresh, false], [old, true]] as const) {
    await withDevices(async (ds) => {
      ds[1].device.setFault('eio-on-chunk', 3);
      await rejectsCode(saveDevices(ds, out, pool, { maxRounds: 2, force }), ErrorCode.NATIVE);
      assert.ok(running(ds));
    });
  }
  assert.is(fs.readFileSync(old, 'utf8'), 'old contents');
  onlyFiles(old);
});

test('a cancelled save leaves nothing at its name', async () => {
  clear();
  const out = f('cancelled.vfmig');
  const ac = new AbortController();
  await withDevices(async (ds) => {
    for (const d of ds) d.device.setFault('slow-chunk', 300);
    const p = saveDevices(ds, out, pool, { maxRounds: 100, downtimeLimitMs: 0, signal: ac.signal }, (m) => {
      m.on('phase', (_f, to) => {
        if (to !== 'precopy') return;
        // While the save runs, its data goes to a temporary name next to the output, under a lock.
        const names = fs.readdirSync(DIR);
        assert.ok(names.some((n) => n.startsWith('.cancelled.vfmig.') && n.endsWith('.partial')), names.join());
        assert.ok(names.includes('.#cancelled.vfmig'), names.join());
        setTimeout(() => ac.abort(), 20);
      });
    });
    await rejectsCode(p, ErrorCode.CANCELLED);
    assert.ok(running(ds));
  }, 2, { stateSize: 4 << 20 });
  onlyFiles();
});

test('invalid options are refused before the output is touched, and leak no descriptor', async () => {
  clear();
  const out = f('opts.vfmig');
  fs.writeFileSync(out, 'keep me');
  const bad: Record<string, unknown>[] = [
    { maxRounds: -1 }, { maxRounds: 1.5 }, { downtimeLimitMs: NaN }, { downtimeLimitMs: -3 }, { bandwidthCap: 'fast' },
    { dirtyQueryIntervalMs: Infinity }, { maxEmptyChunks: 0 }, { lanesPerDevice: 1000 }, { digests: 'yes' },
    { signal: {} }, { force: 'true' },
  ];
  await withDevices(async (ds) => {
    const before = openFds();
    for (let k = 0; k < 5; k++) {
      for (const o of bad) {
        const e = await rejectsCode(saveDevices(ds, out, pool, { ...o, force: o.force ?? true } as never), ErrorCode.BAD_ARGUMENT);
        assert.match(e.message, new RegExp(Object.keys(o)[0]));
      }
      await rejectsCode(saveDevices([], out, pool, { force: true }), ErrorCode.BAD_ARGUMENT);
      await rejectsCode(saveDevices(ds, '', pool), ErrorCode.BAD_ARGUMENT);
      await rejectsCode(saveDevices(ds, out, {} as never, { force: true }), ErrorCode.BAD_ARGUMENT);
      await rejectsCode(loadStream(out, pool, { verify: 'no' } as never), ErrorCode.BAD_ARGUMENT);
    }
    // runEmulated: its own options too, before a device or a file exists.
    for (const o of [{ devices: 0 }, { devices: 1.5 }, { devices: 1, device: null }, { devices: 1, stream: '-' }, { devices: 1, stream: out },
      { devices: 1, seed: -1 }, { devices: 1, keepStream: 1 }, { devices: 1, onMigration: 'x' }]) {
      await rejectsCode(runEmulated({ device: { stateSize: 1 << 20 }, pool, ...o } as never), o.stream === out ? ErrorCode.OUTPUT_EXISTS : ErrorCode.BAD_ARGUMENT);
    }
    assert.is(openFds(), before, 'no descriptor leaked');
    assert.ok(running(ds));
  });
  assert.is(fs.readFileSync(out, 'utf8'), 'keep me');
  onlyFiles(out);
});

test('two saves to one path at once: the second is refused, the first completes', async () => {
  clear();
  const out = f('twice.vfmig');
  for (const force of [false, true]) {
    fs.rmSync(out, { force: true });
    await withDevices(async (ds) => {
      await withDevices(async (ds2) => {
        for (const d of ds) d.device.setFault('slow-chunk', 200);
        let second: Promise<unknown> | undefined;
        const first = saveDevices(ds, out, pool, { maxRounds: 1, force }, (m) => {
          m.on('phase', (_f, to) => {
            if (to !== 'precopy') return;
            second = saveDevices(ds2, out, pool, { maxRounds: 1, force });
            second.catch(() => undefined); // examined below
          });
        });
        const r = await first;
        assert.ok(r.ok);
        const e = await rejectsCode(second!, ErrorCode.OUTPUT_BUSY);
        assert.match(e.message, new RegExp(`pid ${process.pid}`));
        assert.ok(running(ds2), 'the refused save never touched its devices');
      });
    }, 2, { stateSize: 2 << 20 });
    assert.is((await inspectContainer(out)).status, 'complete');
    onlyFiles(out);
  }
});

test('a lock left by a killed writer is taken over, and its partial file removed', async () => {
  clear();
  const out = f('stale.vfmig');
  const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  const pid = Number(dead.stdout);
  assert.ok(pid > 0);
  fs.symlinkSync(`vfio-mig.${pid}`, f('.#stale.vfmig'));
  fs.writeFileSync(f(`.stale.vfmig.${pid}.0badf00d.partial`), 'half a stream');
  await withDevices(async (ds) => { assert.ok((await saveDevices(ds, out, pool, { maxRounds: 0 })).ok); });
  onlyFiles(out);
  // A live owner is respected.
  fs.symlinkSync(`vfio-mig.${process.pid}`, f('.#busy.vfmig'));
  assert.throws(() => OutputFile.open(f('busy.vfmig')), (e: Error) => (e as { code?: string }).code === ErrorCode.OUTPUT_BUSY);
  fs.rmSync(f('.#busy.vfmig'));
});

test('extract never writes over its input, even with force (same file by name, hard link or symlink)', async () => {
  clear();
  const s = f('input.vfmig');
  await withDevices(async (ds) => { assert.ok((await saveDevices(ds, s, pool, { maxRounds: 0 })).ok); });
  const before = fs.readFileSync(s);
  fs.linkSync(s, f('hard.vfmig'));
  fs.symlinkSync(s, f('sym.vfmig'));
  for (const target of [s, f('hard.vfmig'), f('sym.vfmig'), path.relative(process.cwd(), s)]) {
    for (const force of [false, true]) {
      const e = await rejectsCode(extractDevice(s, 0, target, { force }), ErrorCode.BAD_ARGUMENT);
      assert.match(e.message, /is the input/);
    }
  }
  assert.ok(fs.readFileSync(s).equals(before), 'input unchanged');
  onlyFiles(s, f('hard.vfmig'), f('sym.vfmig'));
  // An existing other file needs force; a bad device index is refused before the output is created.
  const o = f('dev0.qemu');
  fs.writeFileSync(o, 'x');
  await rejectsCode(extractDevice(s, 0, o), ErrorCode.OUTPUT_EXISTS);
  await rejectsCode(extractDevice(s, 9, f('never.qemu'), { force: true }), ErrorCode.BAD_ARGUMENT);
  assert.ok((await extractDevice(s, 0, o, { force: true })) > 0);
  assert.not.ok(fs.existsSync(f('never.qemu')));
  // Replacing through a symlink replaces the file it points to and keeps the link.
  fs.symlinkSync(o, f('link.qemu'));
  fs.writeFileSync(o, 'y');
  await extractDevice(s, 1, f('link.qemu'), { force: true });
  assert.ok(fs.lstatSync(f('link.qemu')).isSymbolicLink());
  assert.ok(fs.statSync(o).size > 1);
});

test('extract of an incomplete or torn stream fails and leaves nothing', async () => {
  clear();
  const s = f('whole.vfmig');
  await withDevices(async (ds) => { assert.ok((await saveDevices(ds, s, pool, { maxRounds: 0 })).ok); });
  const b = fs.readFileSync(s);
  const cut = f('cut.vfmig');
  fs.writeFileSync(cut, b.subarray(0, b.length - 10));
  const e = await rejectsCode(extractDevice(cut, 0, f('x.qemu')), ErrorCode.STREAM_TRUNCATED);
  assert.match(e.message, /save interrupted at offset \d+/);
  onlyFiles(s, cut);
});

test.run();
