// The emulated v2 vendor (addon/src/emu/v2.cc) through the seam's v2 protocol (protocol/v2/device.ts) and the fd data
// path: the mtty-shaped session (PRE_COPY fd continuing into STOP_COPY), refusals, estimates, DMA logging, and the
// vendor's copy of the kernel FSM table equal to ours.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { native } from '../src/addon/native.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { emulatedDigest } from '../src/main/emulated/device.js';
import { nextState } from '../src/main/protocol/v2/fsm.js';
import fdPath from '../src/main/protocol/v2/fd-path.js';
import { V2_STATE, V2_STATE_NAMES } from '../src/main/protocol/v2/uapi.js';
import { EmulatedV2Ops, emulatedV2 } from '../src/main/reach/emulated/v2.js';
import type { V2Device } from '../src/main/protocol/v2/device.js';

const made: V2Device[] = [];
function dev(o: Parameters<typeof emulatedV2>[0] = {}): V2Device {
  const d = emulatedV2({ stateSize: 256 << 10, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0, ...o });
  made.push(d);
  return d;
}
const emuOf = (d: V2Device) => (d.ops as EmulatedV2Ops).device;

/** Read the current session until `phase`'s end rule says stop; returns the bytes. */
function drain(d: V2Device, phase: 'precopy' | 'stopcopy'): Uint8Array {
  const p = fdPath(d.dataPath()!);
  const parts: Uint8Array[] = [];
  for (;;) {
    const buf = new Uint8Array(100_000);
    const r = p.read(buf, 0, buf.length, phase);
    if (r.status !== 'data') break;
    parts.push(buf.slice(0, r.n));
  }
  return Buffer.concat(parts);
}

function load(dst: V2Device, bytes: Uint8Array, chunk = 7777): void {
  dst.setState('RESUMING');
  const p = fdPath(dst.dataPath()!);
  for (let o = 0; o < bytes.length; o += chunk) p.write(bytes, o, Math.min(chunk, bytes.length - o), o);
}

test('v2 emulated: the vendor walks the same vfio_mig_get_next_state table as ours, for every feature set', () => {
  let n = 0;
  for (const flags of [1, 3, 5, 7]) for (const cur of V2_STATE_NAMES) for (const target of V2_STATE_NAMES) {
    const ours = nextState(flags, cur, target);
    const theirs = native().v2NextState(flags, V2_STATE[cur], V2_STATE[target]);
    assert.is(theirs, ours === null ? 0 : V2_STATE[ours], `flags ${flags}: ${cur} -> ${target}`);
    n++;
  }
  assert.is(n, 256);
});

test('v2 emulated: pre-copy sends the initial bytes (header + first pass), STOP_COPY continues the same fd to EOF, a destination loads it', () => {
  const src = dev({ seed: 7 });
  assert.equal(src.caps, { protocol: 'v2', reach: 'emulated', precopy: true, p2p: true, dirty: 'dma-logging', migrationFlags: 7 });
  const full = src.estimate().stopCopyBytes!;
  assert.ok(full > 256 << 10, `MIG_DATA_SIZE ${full}`);
  const ch = src.setState('PRE_COPY');
  assert.equal(ch.path, ['PRE_COPY']);
  assert.ok(ch.newSession);
  const e0 = src.estimate();
  assert.ok(e0.initialBytes >= 256 << 10, `initial ${e0.initialBytes}`);
  assert.is(e0.dirtyBytes, 0);
  const pre = drain(src, 'precopy');
  assert.ok(pre.length >= 256 << 10, `pre-copy read ${pre.length}`);
  assert.is(src.estimate().initialBytes, 0, 'initial bytes drained');
  emuOf(src).touch(5000, 0xab); // one page dirtied after it was sent
  const e1 = src.estimate();
  assert.is(e1.initialBytes, 0);
  assert.ok(e1.dirtyBytes >= 4096, `dirty ${e1.dirtyBytes}`);
  const ch2 = src.setState('STOP_COPY');
  assert.equal(ch2.path, ['PRE_COPY_P2P', 'STOP_COPY']);
  assert.not.ok(ch2.newSession, 'STOP_COPY returned data_fd -1: the PRE_COPY fd continues');
  const stop = drain(src, 'stopcopy');
  assert.ok(stop.length >= 4096 + 24 && stop.length < 3 * 4096, `stop-and-copy read ${stop.length}`);
  src.setState('STOP');
  assert.is(src.dataPath(), null);
  const dst = dev({ zeroFill: true });
  load(dst, Buffer.concat([pre, stop]));
  dst.setState('STOP');
  dst.writeConfig(src.readConfig()); // config travels in its own QEMU section
  dst.setState('RUNNING');
  assert.is(emulatedDigest(emuOf(dst).id, 256 << 10), emulatedDigest(emuOf(src).id, 256 << 10));
});

test('v2 emulated: RUNNING -> STOP_COPY without pre-copy sends everything; nothing without P2P/PRE_COPY uses them', () => {
  const src = dev({ seed: 3, migFlags: 1 });
  assert.equal([src.caps.precopy, src.caps.p2p], [false, false]);
  assert.equal(src.setState('STOP_COPY').path, ['STOP', 'STOP_COPY']);
  const all = drain(src, 'stopcopy');
  src.setState('STOP');
  const dst = dev({ zeroFill: true, migFlags: 1 });
  load(dst, all, 65536);
  dst.writeConfig(src.readConfig());
  assert.equal(dst.setState('RUNNING').path, ['STOP', 'RUNNING']);
  assert.is(emulatedDigest(emuOf(dst).id, 256 << 10), emulatedDigest(emuOf(src).id, 256 << 10));
  assert.throws(() => dev({ migFlags: 1 }).setState('PRE_COPY'), (e: MigError) => e.code === ErrorCode.BAD_STATE);
});

test('v2 emulated: STOP_COPY -> PRE_COPY and PRECOPY_INFO outside pre-copy are EINVAL, the state is kept', () => {
  const d = dev();
  d.setState('STOP_COPY');
  assert.throws(() => native().emuV2SetState(emuOf(d).id, V2_STATE.PRE_COPY), (e: { errno?: number }) => e.errno === 22);
  assert.is(d.state(), 'STOP_COPY');
  assert.throws(() => native().emuV2PrecopyInfo(emuOf(d).id, 0), (e: { errno?: number }) => e.errno === 22);
  d.setState('STOP');
});

test('v2 emulated: a damaged stream is refused (early, at the header) and RESUMING -> STOP fails, the device stays RESUMING until reset', () => {
  const src = dev({ seed: 9 });
  src.setState('STOP_COPY');
  const all = drain(src, 'stopcopy');
  const bad = Uint8Array.from(all);
  bad[24] ^= 0xff; // the header's magic
  const dst = dev({ zeroFill: true });
  let err: MigError | undefined;
  try {
    load(dst, bad, 4096);
    dst.setState('STOP');
  } catch (e) { err = e as MigError; }
  assert.ok(err, 'refused');
  assert.ok(err!.code === ErrorCode.LOAD_REJECTED || err!.code === ErrorCode.TRANSITION_FAILED, err!.message);
  console.log(`refused: ${err!.message}`);
  assert.match(dst.vendorError(), /stream offset 0: .*bad magic/);
  assert.is(dst.state(), 'RESUMING');
  dst.reset();
  assert.is(dst.state(), 'RUNNING');
  // Truncated: everything but END is written; leaving RESUMING says why.
  const dst2 = dev({ zeroFill: true });
  load(dst2, all.subarray(0, all.length - 24));
  assert.throws(() => dst2.setState('STOP'), (e: MigError) => e.code === ErrorCode.TRANSITION_FAILED && /no END/.test(e.message));
});

test('v2 emulated: DMA logging START / REPORT / STOP over guest memory', () => {
  const d = dev({ guestPages: 256 });
  const log = d.dirtyLog!;
  assert.is(log.pages, 256);
  log.start();
  assert.throws(() => log.start(), (e: MigError) => e.errno === 16, 'one START until STOP (EBUSY)');
  native().emuDmaTouch(emuOf(d).id, 3);
  native().emuDmaTouch(emuOf(d).id, 200);
  const bm = new Uint8Array(32);
  assert.is(log.report(bm), 2);
  assert.ok(bm[0] & 8 && bm[25] & 1);
  assert.is(log.report(new Uint8Array(32)), 0, 'the device clears its log on report');
  assert.throws(() => native().emuV2DmaReport(emuOf(d).id, 4096, 4096 * 600, 4096, new Uint8Array(128)), /not inside a started range/);
  log.stop();
  native().emuDmaTouch(emuOf(d).id, 4);
  assert.throws(() => log.report(bm), /not started/);
});

test.after(() => { for (const d of made) emuOf(d).destroy(); });
test.run();
