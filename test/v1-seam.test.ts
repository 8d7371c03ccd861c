// v1 behind the device seam (issue 8 §1): the engine sees every v1 device — whatever the embedder passed — as a
// MigDevice (protocol draft-2019 / linux-5.8, the v1 NEXT_STATE table, pending_bytes as estimate, the region's dirty
// log), and its workers move v1 data only through the v1 region data-path module, which keeps the zero-copy save
// and load. Register access may answer later (a vfio-user device's registers): the migration still verifies.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool, Migration, Loader, ContainerWriter, FileSink, ErrorCode, MigError } from '../src/main/index.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { V1Device, V1_REGION_PATH, asMigDevice, type V1Registers } from '../src/main/protocol/v1/device.js';
import * as sourceDevice from '../src/main/engine/source-device.js';
import type { RegName } from '../src/main/protocol/profiles.js';
import type { MigrationRegion } from '../src/main/protocol/migration-region.js';
import type { DeviceShared } from '../src/main/engine/device-shared.js';
import { OWNER_MAIN } from '../src/main/engine/region-lock.js';
import { rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
const DEV = { stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 2000, dmaRate: 200, guestPages: 256 };

function sink(file: string) { return new ContainerWriter(FileSink.open(file, { force: true })); }

/** Every worker task the engine sends: op and data-path module. */
function spy(p: EnginePool) {
  const seen: { op: string; module?: string; zeroCopy?: number }[] = [];
  const orig = { save: p.save, loadPath: p.loadPath, loadData: p.loadData };
  p.save = async (t) => { const r = await orig.save.call(p, t); seen.push({ op: t.op, module: t.path.module, zeroCopy: r.zeroCopyChunks }); return r; };
  p.loadPath = async (t) => { seen.push({ op: t.op, module: t.path.module }); return orig.loadPath.call(p, t); };
  p.loadData = async (t) => { seen.push({ op: t.op, module: t.path.module }); return orig.loadData.call(p, t); };
  return { seen, restore: () => Object.assign(p, orig) };
}

test('v1 devices reach the engine as MigDevices: caps per layout, one worker path (the v1 region module), zero-copy kept', async () => {
  const file = tmpFile('v1seam');
  const devs = [
    EmulatedTransport.create({ ...DEV, name: 'draft', profile: 'draft-2019', dataMode: 'mmap', seed: 3 }),
    EmulatedTransport.create({ ...DEV, name: 'l58', profile: 'linux-5.8', dataMode: 'mixed', seed: 4 }),
  ];
  const s = spy(pool);
  let loader: Loader | undefined;
  try {
    const m = new Migration(devs, pool, sink(file), { maxRounds: 3, dirtyQueryIntervalMs: 5 });
    // What the embedder passed became the engine's one kind of device.
    assert.ok(m.devices.every((d) => d.dev instanceof V1Device));
    assert.equal(m.devices.map((d) => [d.dev.caps.protocol, d.dev.caps.dirty, d.dev.caps.precopy, d.dev.caps.p2p]),
      [['draft-2019', 'region-pfns', true, false], ['linux-5.8', 'type1-container', true, false]]);
    assert.is(m.devices[0].dev.dirtyLog!.sharesDataChannel, true, 'draft-2019 pfn queries share the data channel');
    assert.is(m.devices[1].dev.dirtyLog!.sharesDataChannel, false);
    assert.is(asMigDevice(devs[0]), m.devices[0].dev, 'one adapter per transport (claims see one device)');
    const rep = await m.run();
    assert.ok(rep.ok);
    assert.ok(m.dirty.queries > 0 && m.dirty.count(0) > 0 && m.dirty.count(1) > 0, 'dirty pages found through both v1 logs');
    loader = new Loader(file, pool);
    const lr = await loader.run();
    assert.equal(lr.devices.map((d) => [d.name, d.verified, d.state]), [['draft', true, 'RUNNING'], ['l58', true, 'RUNNING']]);
    assert.ok(loader.dests.every((d) => d.dev instanceof V1Device && d.dev.caps.protocol === d.entry.profile));
    // Every task went through the seam's task kinds and the v1 region module; none through a v1-only branch.
    const ops = [...new Set(s.seen.map((x) => x.op))].sort();
    assert.equal(ops, ['load-data-path', 'save-path'].concat(ops.includes('load-path') ? ['load-path'] : []).sort());
    assert.ok(s.seen.every((x) => x.module === V1_REGION_PATH), JSON.stringify([...new Set(s.seen.map((x) => x.module))]));
    // The hot paths stayed: records written straight from the mmap'd data area, data loaded straight from the file.
    assert.ok(s.seen.some((x) => x.op === 'save-path' && (x.zeroCopy ?? 0) > 0), 'zero-copy save');
    assert.ok(s.seen.some((x) => x.op === 'load-data-path'), 'zero-copy load');
    // The old two-kind engine is gone: no union branch to tell a transport from a seam device.
    assert.is((sourceDevice as Record<string, unknown>).seamDevice, undefined);
    assert.is((pool as unknown as Record<string, unknown>).load, undefined, 'no v1-only load task left in the pool');
  } finally {
    s.restore();
    for (const d of devs) d.destroy();
    await loader?.close();
    rm(file);
  }
});

/** Registers that answer after a timer (as over a socket), recording whether the engine held the device lock. */
class SlowRegisters implements V1Registers {
  unlocked: string[] = [];
  calls = 0;
  shared?: () => DeviceShared | undefined;
  constructor(private readonly region: MigrationRegion, private readonly name: string) {}
  private later<T>(what: string, f: () => T): Promise<T> {
    this.calls++;
    return new Promise((resolve, reject) => setTimeout(() => {
      const lock = this.shared?.()?.lock;
      if (lock && !(lock.held && lock.owner === OWNER_MAIN)) this.unlocked.push(`${this.name}.${what}`);
      try { resolve(f()); } catch (e) { reject(e); }
    }, 1));
  }
  read(n: RegName) { return this.later(`read ${n}`, () => this.region.read(n)); }
  write(n: RegName, v: bigint) { return this.later(`write ${n}`, () => this.region.write(n, v)); }
}

test('v1 with asynchronous register access (a socket-reached region): migrates, verifies, every access under the lock', async () => {
  const file = tmpFile('v1async');
  const ts = ['draft-2019', 'linux-5.8'].map((profile, i) => EmulatedTransport.create({ ...DEV, name: `a${i}`, profile: profile as 'draft-2019', seed: 7 + i }));
  const regs: SlowRegisters[] = [];
  // The engine's lock for a device, found when its registers are first used (the migration or load exists by then).
  let sharedOf: (d: V1Device) => DeviceShared | undefined = () => undefined;
  const dev = (t: EmulatedTransport) => {
    const d: V1Device = new V1Device(t, {
      registers: (r) => { const x = new SlowRegisters(r, t.name); x.shared = () => sharedOf(d); regs.push(x); return x; },
    });
    return d;
  };
  const srcs = ts.map(dev);
  const dts: EmulatedTransport[] = [];
  let loader: Loader | undefined;
  try {
    const m = new Migration(srcs, pool, sink(file), { maxRounds: 3 });
    sharedOf = (d) => m.devices.find((x) => x.dev === d)?.shared;
    const rep = await m.run();
    assert.ok(rep.ok);
    loader = new Loader(file, pool, {
      makeDestination: (e) => {
        const t = EmulatedTransport.create({ ...DEV, name: e.name, profile: e.profile as 'draft-2019', zeroFill: true, dirtyRate: 0, dmaRate: 0 });
        dts.push(t);
        return dev(t);
      },
    });
    sharedOf = (d) => loader!.dests.find((x) => x.dev === d)?.shared;
    const lr = await loader.run();
    assert.equal(lr.devices.map((d) => d.verified), [true, true]);
    assert.is(regs.length, 4, 'sources and destinations');
    assert.ok(regs.every((r) => r.calls > 0), 'the engine went through the asynchronous registers');
    assert.equal(regs.flatMap((r) => r.unlocked), [], 'the device lock is held across every awaited register access');
  } finally {
    for (const t of [...ts, ...dts]) t.destroy();
    rm(file);
  }
});

test('v1 FSM over the seam: arcs one write each, ERROR reported and left only by reset, P2P targets refused', async () => {
  const t = EmulatedTransport.create({ ...DEV, name: 'fsm', profile: 'linux-5.8', dirtyRate: 0, dmaRate: 0, seed: 1 });
  try {
    const d = new V1Device(t);
    assert.is(d.dataPath(), null, 'no data session while RUNNING');
    const ch = await d.setState('STOP_COPY');
    assert.equal([ch.from, ch.to, ch.path, ch.newSession], ['RUNNING', 'STOP_COPY', ['STOP_COPY'], true]);
    assert.is(d.dataPath()!.module, V1_REGION_PATH);
    assert.ok((await d.estimate()).pending > 0, 'pending_bytes in STOP_COPY');
    assert.equal((await d.setState('RUNNING')).path, ['RUNNING']);
    const p2p = await d.setState('RUNNING_P2P').then(() => null, (e: MigError) => e);
    assert.is(p2p?.code, ErrorCode.BAD_STATE, 'v1 has no P2P states');
    t.device.setFault('error-on-transition', 4); // a write of RESUMING puts the device in ERROR
    const e = await d.setState('RESUMING').then(() => null, (x: MigError) => x);
    assert.is(e?.code, ErrorCode.DEVICE_ERROR_STATE);
    assert.is(await d.state(), 'ERROR');
    const again = await d.setState('STOP').then(() => null, (x: MigError) => x);
    assert.is(again?.code, ErrorCode.DEVICE_ERROR_STATE, 'nothing but reset leaves ERROR');
    t.device.setFault('', 0);
    await d.reset();
    assert.is(await d.state(), 'RUNNING');
  } finally {
    t.destroy();
  }
});

test.after(async () => { await pool.close(); });
test.run();
