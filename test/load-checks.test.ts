// Issue 7 §5: loader checks that a mutation of the compiled code showed nothing would notice. Each test here fails
// when its check is removed (docs/TESTING.md lists the mutations): the end-of-stream check of every device stream
// and of the container, DATA refused after CONFIG on both load paths, and the worker's non-zero-copy slot path
// (what a CPU without SSE4.2 runs), forced through the test entry point and verified by digest.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, type MigError } from '../src/main/errors.js';
import { FLAG_DEV_CONFIG_STATE, FLAG_DEV_DATA_STATE, FLAG_END_OF_STATE, getBe64 } from '../src/main/protocol/qemu-stream.js';
import { RECORD_HEADER_SIZE } from '../src/main/container/format.js';
import { nativeCrcAvailable } from '../src/main/container/checksum.js';
import { withTestHooks } from '../src/main/engine/test-hooks.js';
import type { Loader } from '../src/main/engine/load.js';
import type { SaveResult } from '../src/workers/tasks.js';
import { readRecords, renumber, writeRecords, type Rec } from './craft.js';
import { rejectsCode, rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
/** Workers and loads as on a CPU without SSE4.2: no zero-copy save or load, CRC32C from the library. */
const noSse = new EnginePool(withTestHooks({ threads: 2 }, { noSse42: true }));
const good = tmpFile('load-checks');
test.before(async () => {
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `lc${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, seed: 7 + i, dirtyRate: 5000, dmaRate: 0, guestPages: 64 }));
  try {
    assert.ok((await saveDevices(devs, good, pool, { maxRounds: 2, downtimeLimitMs: 1 })).ok);
  } finally {
    for (const d of devs) d.destroy();
  }
});
test.after(async () => { rm(good); await pool.close(); await noSse.close(); });

const CHUNK = 2;
const tag = (r: Rec) => (r.body.length >= 8 ? getBe64(r.body, 0) : -1n);
/** A device's last CHUNK record: its [CONFIG][len][blob][END] section. */
const configRec = (recs: Rec[], dev: number) => recs.filter((r) => r.type === CHUNK && r.device === dev).at(-1)!;

/** Write `recs` (renumbered) to a file; the file offsets of each record as written. */
function craft(tagName: string, header: Uint8Array, recs: Rec[]): { file: string; at: Map<Rec, number> } {
  renumber(recs);
  const file = tmpFile(tagName);
  writeRecords(file, header, recs);
  const at = new Map<Rec, number>();
  let p = header.length;
  for (const r of recs) { at.set(r, p); p += RECORD_HEADER_SIZE + r.body.length; }
  return { file, at };
}

/** Load `file` and expect `code`; no destination ever reached RUNNING (state events) or is RUNNING now. */
async function refused(file: string, code: string, p: EnginePool = pool): Promise<MigError> {
  let loader: Loader | undefined;
  const states: string[] = [];
  try {
    const e = await rejectsCode(loadStream(file, p, { verify: true }, (l) => { l.on('state', (s) => states.push(`${s.device}:${s.state}`)); })
      .then((r) => { loader = r.loader; }), code);
    loader = (e as unknown as { loader?: Loader }).loader;
    assert.ok(loader && loader.dests.length === 2, 'both destinations were set up');
    for (const d of loader!.dests) assert.is.not(await d.dev.state(), 'RUNNING', `${d.entry.name} must not run`);
    assert.not.ok(states.some((s) => s.endsWith(':RUNNING')), `no destination was started: ${states.join(' ')}`);
    return e;
  } finally {
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
    rm(file);
  }
}

test('a device stream whose config section has no END_OF_STATE: VFM_STREAM_TRUNCATED naming the device and where its stream ends', async () => {
  const { header, recs } = readRecords(good);
  const cfg = configRec(recs, 1);
  assert.is(tag(cfg), FLAG_DEV_CONFIG_STATE);
  assert.is(getBe64(cfg.body, cfg.body.length - 8), FLAG_END_OF_STATE);
  cfg.body = cfg.body.slice(0, -8); // [CONFIG][len][blob], its END gone
  const { file, at } = craft('cfg-no-end', header, recs);
  const e = await refused(file, ErrorCode.STREAM_TRUNCATED);
  assert.is(e.device, 'lc1');
  assert.match(e.message, /ends inside a section/);
  assert.is(e.offset, at.get(cfg)! + RECORD_HEADER_SIZE + cfg.body.length, 'offset: the end of lc1\'s last record');
});

test('a device stream without its config section: VFM_STREAM_TRUNCATED naming the device and offset, nothing started', async () => {
  const { header, recs } = readRecords(good);
  const cfg = configRec(recs, 0);
  const prev = recs.filter((r) => r.type === CHUNK && r.device === 0).at(-2)!;
  const { file, at } = craft('no-cfg', header, recs.filter((r) => r !== cfg));
  const e = await refused(file, ErrorCode.STREAM_TRUNCATED);
  assert.is(e.device, 'lc0');
  assert.match(e.message, /without DEV_CONFIG_STATE/);
  assert.is(e.offset, at.get(prev)! + RECORD_HEADER_SIZE + prev.body.length);
});

test('a container without its END record: VFM_STREAM_TRUNCATED at the end of the file, nothing started', async () => {
  const { header, recs } = readRecords(good);
  const { file } = craft('no-end', header, recs.filter((r) => r.type !== 3));
  const size = fs.statSync(file).size;
  const e = await refused(file, ErrorCode.STREAM_TRUNCATED);
  assert.match(e.message, /without an END record/);
  assert.is(e.offset, size);
});

/** The stream with a copy of lc1's first data packet appended after its config section, as its own record. */
function dataAfterConfig(): { file: string; rec: Rec; at: Map<Rec, number> } {
  const { header, recs } = readRecords(good);
  const data = recs.find((r) => r.type === CHUNK && r.device === 1 && tag(r) === FLAG_DEV_DATA_STATE && r.body.length > 64)!;
  const cfg = configRec(recs, 1);
  // [DATA][size][bytes]: exactly one data packet, the shape the zero-copy path takes.
  const size = Number(getBe64(data.body, 8));
  const rec: Rec = { ...data, body: data.body.slice(0, 16 + size) };
  recs.splice(recs.indexOf(cfg) + 1, 0, rec);
  return { ...craft('data-after-config', header, recs), rec };
}

for (const [name, p] of [['zero-copy load', () => pool], ['slot path (no SSE4.2)', () => noSse]] as const) {
  test(`DATA after CONFIG is refused (${name}): VFM_STREAM_BAD_RECORD naming the device and the packet's offset`, async () => {
    const { file, rec, at } = dataAfterConfig();
    const e = await refused(file, ErrorCode.STREAM_BAD_RECORD, p());
    assert.is(e.device, 'lc1');
    assert.match(e.message, /DEV_DATA_STATE after the config state/);
    assert.is(e.offset, at.get(rec)! + RECORD_HEADER_SIZE);
  });
}

/** Save with `p` and load with `p`; how many chunks each path moved. */
async function roundTrip(p: EnginePool, tagName: string) {
  const f = tmpFile(tagName);
  const saved: SaveResult[] = [];
  let loadTasks = 0;
  let zeroCopyLoads = 0;
  const orig = { save: p.save, loadPath: p.loadPath, loadData: p.loadData };
  p.save = async (t) => { const r = await orig.save.call(p, t); saved.push(r); return r; };
  p.loadPath = async (t) => { loadTasks++; return orig.loadPath.call(p, t); };
  p.loadData = async (t) => { zeroCopyLoads++; return orig.loadData.call(p, t); };
  // Every data-area flavour: mmap'd, trapped (pread/pwrite) and both; a workload dirtying state during pre-copy.
  const devs = (['mmap', 'trapped', 'mixed'] as const).map((dataMode, i) => EmulatedTransport.create({
    name: `sp${i}`, dataMode, stateSize: 2 << 20, maxChunk: 64 << 10, seed: 40 + i, dirtyRate: 20000, dmaRate: 0, guestPages: 64,
    profile: i === 1 ? 'draft-2019' : 'linux-5.8',
  }));
  let loader: Loader | undefined;
  try {
    const rep = await saveDevices(devs, f, p, { maxRounds: 3, downtimeLimitMs: 1 });
    const res = await loadStream(f, p, { verify: true });
    loader = res.loader;
    return {
      verified: res.report.devices.map((d) => d.verified), digests: res.report.devices.map((d) => d.digest === d.expectedDigest),
      zeroCopySaved: saved.reduce((a, r) => a + (r.zeroCopyChunks ?? 0), 0), chunks: saved.reduce((a, r) => a + r.chunks, 0),
      loadTasks, zeroCopyLoads, packets: res.report.devices.reduce((a, d) => a + d.dataPackets, 0), ok: rep.ok,
    };
  } finally {
    Object.assign(p, orig);
    for (const d of [...devs, ...(loader?.dests.map((x) => x.transport as EmulatedTransport) ?? [])]) d.destroy();
    rm(f);
  }
}

test('the non-zero-copy slot path (a CPU without SSE4.2), forced: save and load move every chunk through slots, digests verify', async () => {
  const r = await roundTrip(noSse, 'slot-path');
  assert.ok(r.ok);
  assert.equal(r.verified, [true, true, true]);
  assert.ok(r.chunks > 3 * 32, `${r.chunks} chunks saved`);
  assert.is(r.zeroCopySaved, 0, 'no chunk went out through the zero-copy record write');
  assert.is(r.zeroCopyLoads, 0, 'no zero-copy load task ran');
  assert.ok(r.loadTasks >= r.packets && r.packets > 3 * 32, `${r.loadTasks} slot load tasks for ${r.packets} data packets`);
  // Control: the same round trip where SSE4.2 exists takes the zero-copy paths (so the hook is what changed the path).
  if (nativeCrcAvailable()) {
    const z = await roundTrip(pool, 'zero-copy-path');
    assert.equal(z.verified, [true, true, true]);
    assert.ok(z.zeroCopySaved > 0 && z.zeroCopyLoads > 0, `zero-copy control: ${z.zeroCopySaved} chunks saved, ${z.zeroCopyLoads} load tasks`);
  }
});

test.run();
