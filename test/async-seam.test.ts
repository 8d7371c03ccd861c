// The async seam (issue 9: the main thread never blocks on a device's socket): a MigDevice whose methods answer
// with Promises that settle later, as a vfio-user device's do, migrates and verifies like a synchronous one. The
// engine awaits every call (never two at once on one device), holds the device lock across each await, keeps its
// event loop running meanwhile, and rolls every device back to RUNNING on cancel or on an asynchronous refusal.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EnginePool, Migration, Loader, ContainerWriter, FileSink, ErrorCode, MigError } from '../src/main/index.js';
import { emulatedV2, emulatedV2Destination, destroyEmulated } from '../src/main/reach/emulated/v2.js';
import type { V2Device } from '../src/main/protocol/v2/device.js';
import type { DeviceTableEntry } from '../src/main/container/format.js';
import type { DirtyLog, MigDevice, MigState, SizeEstimate, StateChange, TargetState } from '../src/main/device/seam.js';
import { OWNER_MAIN, type RegionLock } from '../src/main/engine/region-lock.js';
import { rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
const V2 = { stateSize: 256 << 10, maxChunk: 32 << 10, dirtyRate: 300, dmaRate: 100 };

/** Event-loop turns so far: a 1 ms interval that only runs while the main thread is free. */
let ticks = 0;

interface Call { device: string; method: string; ticks: number; locked: boolean; concurrent: number }
const calls: Call[] = [];
let pendingAll = 0;
let maxPendingAll = 0;

/** Every method that touches the device answers after `ms` on a timer (a socket round trip's shape). */
class SlowDevice implements MigDevice {
  busy = false;
  overlaps: string[] = [];
  /** The engine's lock for this device (found when a call is made). */
  lockOf: () => RegionLock | undefined = () => undefined;
  /** Hook: called as a method starts (tests cancel or fail from here). */
  onCall?: (method: string, arg?: string) => void;
  failTarget?: TargetState;
  readonly dirtyLog: DirtyLog | null;
  /**
   * `shared`: the dirty log goes through the device's channel (as draft-2019's region pfns, or a log read over the
   * device's socket): the engine then reports it under the device lock, never beside another call. Otherwise it is
   * the device's own channel (v2 DMA logging ioctls) and may be asked while a state call is pending.
   */
  constructor(readonly inner: V2Device, shared = false, readonly ms = 4) {
    const log = inner.dirtyLog;
    this.dirtyLog = log && {
      kind: log.kind, pageSize: log.pageSize, pages: log.pages, sharesDataChannel: shared,
      start: () => this.slow('dirty.start', () => log.start(), false),
      report: (bm: Uint8Array) => this.slow('dirty.report', () => log.report(bm), shared),
      stop: () => this.slow('dirty.stop', () => log.stop(), false),
    };
  }
  get name() { return this.inner.name; }
  get caps() { return this.inner.caps; }

  /** `exclusive`: a call on the device's channel: the engine makes it under the lock, never beside another. */
  private slow<T>(method: string, f: () => T, exclusive = true, arg?: string): Promise<T> {
    if (exclusive && this.busy) this.overlaps.push(method);
    if (exclusive) this.busy = true;
    const t0 = ticks;
    pendingAll++;
    maxPendingAll = Math.max(maxPendingAll, pendingAll);
    this.onCall?.(method, arg);
    return new Promise<T>((resolve, reject) => setTimeout(() => {
      const lock = this.lockOf();
      const locked = !!lock && lock.held && lock.owner === OWNER_MAIN;
      calls.push({ device: this.name, method: arg ? `${method}(${arg})` : method, ticks: ticks - t0, locked: locked || !exclusive, concurrent: pendingAll });
      pendingAll--;
      if (exclusive) this.busy = false;
      try { resolve(f()); } catch (e) { reject(e); }
    }, this.ms));
  }

  state(): Promise<MigState> { return this.slow('state', () => this.inner.state()); }
  setState(t: TargetState): Promise<StateChange> {
    return this.slow('setState', () => {
      if (t === this.failTarget) {
        this.failTarget = undefined;
        throw new MigError(ErrorCode.TRANSITION_FAILED, `vendor refused -> ${t} (test)`, { device: this.name });
      }
      return this.inner.setState(t);
    }, true, t);
  }
  estimate(): Promise<SizeEstimate> { return this.slow('estimate', () => this.inner.estimate()); }
  readConfig(): Promise<Uint8Array> { return this.slow('readConfig', () => this.inner.readConfig()); }
  writeConfig(b: Uint8Array): Promise<void> { return this.slow('writeConfig', () => this.inner.writeConfig(b)); }
  reset(): Promise<void> { return this.slow('reset', () => this.inner.reset()); }
  close(): Promise<void> { return this.slow('close', () => this.inner.close(), false); }
  dataPath() { return this.inner.dataPath(); }
  configTarget() { return this.inner.configTarget(); }
  geometry() { return this.inner.geometry(); }
  digestTarget() { return this.inner.digestTarget(); }
  vendorError() { return this.inner.vendorError(); }
}

function sources(n: number, seed: number): SlowDevice[] {
  // slow0's dirty log shares its channel (reported under the lock), slow1's is its own.
  return Array.from({ length: n }, (_, i) => new SlowDevice(emulatedV2({ ...V2, name: `slow${i}`, seed: seed + i }), i === 0));
}

function sink(file: string) { return new ContainerWriter(FileSink.open(file, { force: true })); }

function migration(devs: SlowDevice[], file: string, o: ConstructorParameters<typeof Migration>[3] = {}): Migration {
  const m = new Migration(devs, pool, sink(file), { maxRounds: 3, dirtyQueryIntervalMs: 10, ...o });
  devs.forEach((d, i) => { d.lockOf = () => m.devices[i].shared.lock; });
  return m;
}

test.before(() => {
  const t = setInterval(() => { ticks++; }, 1);
  t.unref();
});

test('async seam: a device answering later (every call a Promise) migrates and verifies; calls awaited one at a time under the lock', async () => {
  calls.length = 0;
  maxPendingAll = 0;
  const file = tmpFile('async-seam');
  const devs = sources(2, 21);
  const dests: SlowDevice[] = [];
  try {
    const rep = await migration(devs, file).run();
    assert.ok(rep.ok);
    const loader: Loader = new Loader(file, pool, {
      makeDestination: async (e: DeviceTableEntry) => {
        await new Promise((r) => setTimeout(r, 2)); // a reach that connects first
        const d = new SlowDevice(emulatedV2Destination(e));
        d.lockOf = () => loader.dests.find((x) => x.dev === d)?.shared.lock;
        dests.push(d);
        return d;
      },
    });
    const lr = await loader.run();
    assert.equal(lr.devices.map((d) => [d.name, d.verified, d.state]), [['slow0', true, 'RUNNING'], ['slow1', true, 'RUNNING']]);
    for (const d of [...devs, ...dests]) assert.equal(d.overlaps, [], `${d.name}: no call while another was pending`);
    const seen = calls;
    for (const m of ['state', 'setState(PRE_COPY)', 'estimate', 'setState(PRE_COPY_P2P)', 'setState(STOP_COPY)', 'setState(STOP)', 'readConfig',
      'dirty.start', 'dirty.report', 'setState(RESUMING)', 'setState(RUNNING_P2P)', 'setState(RUNNING)']) {
      assert.ok(seen.some((c) => c.method === m), `${m} went through the slow device: ${[...new Set(seen.map((c) => c.method))].join(' ')}`);
    }
    const unlocked = calls.filter((c) => !c.locked);
    assert.equal(unlocked.map((c) => `${c.device}.${c.method}`), [], 'the device lock is held across every awaited device call');
    // The event loop turned while each call was pending (nothing blocked it), and the two devices' calls overlapped
    // (the engine waits for neither device on the main thread while the other's call is in flight).
    assert.ok(calls.every((c) => c.ticks >= 1), 'the event loop ran during every call');
    assert.ok(maxPendingAll >= 2, `calls of different devices in flight together (max ${maxPendingAll})`);
    for (const d of devs) assert.is(d.inner.state(), 'STOP', 'a saved source stays stopped');
  } finally {
    for (const d of [...devs, ...dests]) destroyEmulated(d.inner);
    rm(file);
  }
});

test('async seam: cancel while a state change is pending: the call settles, every device rolled back to RUNNING', async () => {
  calls.length = 0;
  const file = tmpFile('async-cancel');
  const devs = sources(2, 31);
  const ac = new AbortController();
  devs[1].onCall = (m, arg) => { if (m === 'setState' && arg === 'PRE_COPY') ac.abort(); };
  try {
    const m = migration(devs, file, { signal: ac.signal });
    const e = await m.run().then(() => null, (x: MigError) => x);
    assert.ok(e, 'cancelled');
    assert.is(e!.code, ErrorCode.CANCELLED);
    const rb = (e as unknown as { report: { rollback: { device: string; outcome: string }[] } }).report.rollback;
    assert.equal(rb.map((r) => r.device), ['slow0', 'slow1']);
    for (const r of rb) assert.ok(['resumed', 'was-running'].includes(r.outcome), `${r.device}: ${r.outcome}`);
    for (const d of devs) {
      assert.is(d.inner.state(), 'RUNNING', `${d.name} RUNNING after rollback`);
      assert.equal(d.overlaps, [], `${d.name}: rollback waited for the pending call`);
    }
    // Nothing but rollback after the cancel: no pre-copy round started.
    assert.not.ok(calls.some((c) => c.method === 'estimate'), calls.map((c) => c.method).join(' '));
  } finally {
    for (const d of devs) destroyEmulated(d.inner);
    rm(file);
  }
});

test('async seam: a state change refused asynchronously fails the migration with its code; every device back to RUNNING', async () => {
  const file = tmpFile('async-refuse');
  const devs = sources(2, 41);
  devs[1].failTarget = 'STOP_COPY';
  try {
    const e = await migration(devs, file).run().then(() => null, (x: MigError) => x);
    assert.ok(e);
    assert.is(e!.code, ErrorCode.TRANSITION_FAILED);
    assert.is(e!.device, 'slow1');
    const rb = (e as unknown as { report: { rollback: { device: string; outcome: string; from: string }[] } }).report.rollback;
    assert.equal(rb.map((r) => r.outcome), ['resumed', 'resumed'], JSON.stringify(rb));
    for (const d of devs) assert.is(d.inner.state(), 'RUNNING');
  } finally {
    for (const d of devs) destroyEmulated(d.inner);
    rm(file);
  }
});

test.after(async () => { await pool.close(); });
test.run();
