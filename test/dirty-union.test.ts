// Issue 7 §5: the dirty-page union an embedder gets (Migration.dirty.bitmap, report.dirty.pages) must hold every
// guest page a device DMA-wrote while it was logged. The test writes known pages itself (no random DMA), batch after
// batch between queries, so that a union that drops a page, or keeps only the latest query, is caught: for each
// dirty-tracking flavour (the 2019 drafts' region query, the 5.8 type1 container, v2 DMA logging).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { native } from '../src/addon/native.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { destroyEmulated, emulatedDeviceOf, emulatedV2 } from '../src/main/reach/emulated/v2.js';
import type { EngineDevice } from '../src/main/engine/source-device.js';
import type { Migration } from '../src/main/engine/migration.js';
import { rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
test.after(async () => { await pool.close(); });

const PAGES = 512;
const BATCHES = 6;

/** Batch k of device i: pages spread over the whole range, different per device and per batch. */
const batch = (i: number, k: number) => Array.from({ length: 5 }, (_, j) => (i * 97 + k * 61 + j * 83 + 1) % PAGES);

function bits(b: Uint8Array | undefined): number[] {
  const out: number[] = [];
  for (let p = 0; b && p < b.length * 8; p++) if (b[p >> 3] & (1 << (p & 7))) out.push(p);
  return out;
}

for (const profile of ['draft-2019', 'linux-5.8', 'v2'] as const) {
  test(`dirty-page union (${profile}): exactly the pages DMA-written while logged, over several queries`, async () => {
    const f = tmpFile(`dirty-${profile}`);
    const o = { stateSize: 2 << 20, maxChunk: 16 << 10, dirtyRate: 0, dmaRate: 0, guestPages: PAGES, profile };
    const devs: EngineDevice[] = [0, 1].map((i) => (profile === 'v2' ? emulatedV2({ ...o, name: `du${i}` }) : EmulatedTransport.create({ ...o, name: `du${i}` })));
    const ids = devs.map((d) => emulatedDeviceOf(d)!.id);
    const written: Set<number>[] = devs.map(() => new Set());
    // Before logging starts: never reported.
    for (const id of ids) native().emuDmaTouch(id, PAGES - 1);
    let m!: Migration;
    let k = 0;
    let phase = '';
    const queriesAt: number[] = [];
    try {
      const rep = await saveDevices(devs, f, pool, { maxRounds: 100, downtimeLimitMs: 0, dirtyQueryIntervalMs: 2, allowWithoutP2P: true, bandwidthCap: 8 << 20 }, (mig) => {
        m = mig;
        m.on('phase', (_from, to) => { phase = to; });
        // After each query of device 1 (both were queried), the next batch goes to both devices while pre-copy runs:
        // the next query (or the final one, devices stopped) must report it, and the earlier ones must stay.
        m.on('dirty', (e) => {
          if (e.index !== 1 || phase !== 'precopy' || k >= BATCHES) return;
          queriesAt.push(m.dirty.queries);
          ids.forEach((id, i) => { for (const p of batch(i, k)) { native().emuDmaTouch(id, p); written[i].add(p); } });
          k++;
        });
      });
      assert.ok(rep.ok);
      assert.is(k, BATCHES, `all ${BATCHES} batches were written during pre-copy (queries at ${queriesAt.join(',')})`);
      for (let i = 0; i < devs.length; i++) {
        const want = [...written[i]].sort((a, b) => a - b);
        const got = bits(m.dirty.bitmap(i));
        // The 2019 drafts have no start of dirty logging (the vendor tracks all along, and the page written before the
        // migration may be reported); the type1 container and v2 DMA logging start with the migration.
        const before = got.includes(PAGES - 1);
        if (profile !== 'draft-2019') assert.not.ok(before, `${devs[i].name}: a page written before logging started is not reported`);
        assert.equal(got.filter((p) => p !== PAGES - 1), want, `${devs[i].name}: the union is every page written, and only those`);
        assert.is(rep.dirty.pages[i], want.length + (before ? 1 : 0));
      }
    } finally {
      for (const d of devs) destroyEmulated(d);
      rm(f);
    }
  });
}

test.run();
