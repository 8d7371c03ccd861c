// A reach added from outside the engine (issue 8 §1): the "mem" reach below is written against the package's public
// entry point only — a MigDevice, worker-side modules in
// test/fixtures/mem-reach/ (data path, config restore, digest), and registerReach — and migrates beside the built-in
// reaches (emulated v2 and v1), then loads back through its own registered provider, verified by its own digest, with no
// edit to the engine, the worker or the container format.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import crypto from 'node:crypto';
import {
  ContainerWriter, EmulatedTransport, EnginePool, ErrorCode, FileSink, Loader, MigError, Migration, registerReach, registeredReaches,
  type DeviceCaps, type DeviceGeometry, type DataPathDesc, type ConfigTargetDesc, type MigDevice, type MigState, type SizeEstimate,
  type StateChange, type TargetState,
} from '../src/main/index.js';
import { emulatedV2, destroyEmulated } from '../src/main/reach/emulated/v2.js';
import { CURSOR, OPENED, READS, WRITES } from './fixtures/mem-reach/path.js';
import { rm, tmpFile } from './helpers.js';

const PATH_URL = new URL('./fixtures/mem-reach/path.js', import.meta.url).href;
const CONFIG_URL = new URL('./fixtures/mem-reach/config.js', import.meta.url).href;
const DIGEST_URL = new URL('./fixtures/mem-reach/digest.js', import.meta.url).href;
const SAVING = new Set<MigState>(['PRE_COPY', 'PRE_COPY_P2P', 'STOP_COPY']);

/** A device whose stream is a SharedArrayBuffer: RUNNING/P2P/pre-copy states, one data session per saving run or RESUMING. */
class MemDevice implements MigDevice {
  readonly caps: DeviceCaps = { protocol: 'v2', reach: 'mem', precopy: true, p2p: true, dirty: 'none', migrationFlags: 7 };
  readonly dirtyLog = null;
  readonly data: SharedArrayBuffer;
  readonly ctl = new SharedArrayBuffer(16);
  readonly cfg = new SharedArrayBuffer(256);
  private s: MigState = 'RUNNING';
  closed = false;
  constructor(readonly name: string, readonly size: number, fill: boolean) {
    this.data = new SharedArrayBuffer(size);
    if (fill) {
      crypto.randomFillSync(new Uint8Array(this.data));
      crypto.randomFillSync(new Uint8Array(this.cfg));
    }
  }
  private get c() { return new Int32Array(this.ctl); }
  state(): MigState { return this.s; }
  setState(t: TargetState): StateChange {
    const from = this.s;
    if (from === t) return { from, to: t, path: [], newSession: false };
    // Leaving RESUMING: the vendor checks it got its whole stream (as a driver validates on RESUMING -> STOP).
    if (from === 'RESUMING' && Atomics.load(this.c, CURSOR) !== this.size) {
      throw new MigError(ErrorCode.TRANSITION_FAILED, `incomplete stream: ${Atomics.load(this.c, CURSOR)} of ${this.size} bytes`, { device: this.name });
    }
    const newSession = t === 'RESUMING' || (SAVING.has(t) && !SAVING.has(from));
    if (newSession) Atomics.store(this.c, CURSOR, 0);
    this.s = t;
    return { from, to: t, path: [t], newSession };
  }
  estimate(): SizeEstimate {
    const cur = Atomics.load(this.c, CURSOR);
    if (this.s === 'PRE_COPY' || this.s === 'PRE_COPY_P2P') {
      const initialBytes = Math.max(0, this.size / 2 - cur);
      return { pending: initialBytes, initialBytes, dirtyBytes: 0, stopCopyBytes: this.size - cur };
    }
    return { pending: this.s === 'STOP_COPY' ? this.size - cur : 0, initialBytes: 0, dirtyBytes: 0, stopCopyBytes: this.size };
  }
  dataPath(): DataPathDesc | null {
    return SAVING.has(this.s) || this.s === 'RESUMING' ? { module: PATH_URL, device: this.name, params: { data: this.data, ctl: this.ctl } } : null;
  }
  readConfig(): Uint8Array { return new Uint8Array(this.cfg).slice(); }
  writeConfig(space: Uint8Array): void { new Uint8Array(this.cfg).set(space.subarray(0, 256)); }
  configTarget(): ConfigTargetDesc { return { kind: 'mem', module: CONFIG_URL, cfg: this.cfg }; }
  reset(): void { this.s = 'RUNNING'; }
  geometry(): DeviceGeometry {
    return { stateSize: this.size, maxChunk: 64 << 10, dataMode: 'mem', offsetPolicy: 'fixed', guestPages: 0, regionSize: 0, migFlags: 7 };
  }
  digestTarget() { return { kind: 'mem', module: DIGEST_URL, data: this.data }; }
  close(): void { this.closed = true; }
}

const pool = new EnginePool({ threads: 2 });
const made: MemDevice[] = [];
registerReach({ kind: 'mem', destination: (e) => { const d = new MemDevice(e.name, e.geometry.stateSize, false); made.push(d); return d; } });

test('a reach registered from outside migrates beside emulated v2 and v1 devices and loads back through its own provider', async () => {
  assert.ok(registeredReaches().includes('mem'));
  const file = tmpFile('memreach');
  const mem = new MemDevice('mem0', 1 << 20, true);
  const v2 = emulatedV2({ name: 'v2e', stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 300, dmaRate: 100, seed: 21 });
  const v1 = EmulatedTransport.create({ name: 'v1e', profile: 'linux-5.8', stateSize: 1 << 20, maxChunk: 64 << 10, dataMode: 'mixed', seed: 22 });
  let loader: Loader | undefined;
  try {
    const rep = await new Migration([mem, v2, v1], pool, new ContainerWriter(FileSink.open(file, { force: true })), { maxRounds: 3 }).run();
    assert.ok(rep.ok);
    assert.is(mem.state(), v2.state(), 'the engine left the new reach\'s device where it left the built-in one');
    const src = new Int32Array(mem.ctl);
    assert.ok(Atomics.load(src, OPENED) >= 1 && Atomics.load(src, READS) >= 2, 'the workers read through the reach\'s own module');
    loader = new Loader(file, pool);
    const lr = await loader.run();
    assert.equal(lr.devices.map((d) => [d.name, d.state]), [['mem0', 'RUNNING'], ['v2e', 'RUNNING'], ['v1e', 'RUNNING']]);
    // Verified by digest, the new reach's computed in the workers by its own module like the built-in ones.
    assert.equal(lr.devices.map((d) => d.verified), [true, true, true]);
    assert.match(lr.devices[0].digest!, /^sha256:[0-9a-f]{64}$/);
    // The destination came from the reach's provider (no makeDestination), got every byte and its config through
    // the reach's own modules in the workers.
    assert.is(made.length, 1);
    const dst = made[0];
    assert.is(dst.name, 'mem0');
    assert.ok(Atomics.load(new Int32Array(dst.ctl), WRITES) > 0);
    assert.ok(Buffer.from(dst.data).equals(Buffer.from(mem.data)), 'device stream loaded byte for byte');
    assert.ok(Buffer.from(dst.cfg).equals(Buffer.from(mem.cfg)), 'config restored by the reach\'s worker module');
    assert.is(dst.state(), 'RUNNING');
  } finally {
    destroyEmulated(v2);
    v1.destroy();
    await loader?.close();
    rm(file);
  }
  assert.ok(made[0].closed, 'the loader closed the destination it got from the reach');
});

test.after(async () => { await pool.close(); });
test.run();
