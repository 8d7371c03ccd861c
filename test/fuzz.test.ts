// Randomised bad input: mutated and truncated copies of a valid stream. Every one must be refused with a MigError
// code (no crash, no hang, no other exception), and no destination may be left running.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { mulberry32 } from '../src/main/stress/stress.js';
import type { Loader } from '../src/main/engine/load.js';
import { readRecords, writeRecords } from './craft.js';
import { parseRegionInfo } from '../src/main/protocol/region-info.js';
import { newParseState, parsePackets } from '../src/main/protocol/qemu-stream.js';
import { rm, tmpFile } from './helpers.js';

const pool = new EnginePool({ threads: 2 });
const good = tmpFile('fuzz-good');
const CODES = new Set<string>(Object.values(ErrorCode));

test.before(async () => {
  const devs = [0, 1].map((i) => EmulatedTransport.create({
    name: `z${i}`, profile: i ? 'draft-2019' : 'linux-5.8', dataMode: i ? 'mixed' : 'mmap', stateSize: 256 << 10, maxChunk: 64 << 10,
    // No workload: every page is sent once, so damage to any page must show (a resent page would supersede it).
    seed: 20 + i, dirtyRate: 0, dmaRate: 0, guestPages: 64,
  }));
  try {
    assert.ok((await saveDevices(devs, good, pool, { maxRounds: 2 })).ok);
  } finally {
    for (const d of devs) d.destroy();
  }
});
test.after(async () => { rm(good); await pool.close(); });

async function mustRefuse(file: string, what: string): Promise<string> {
  let loader: Loader | undefined;
  try {
    const r = await loadStream(file, pool, { verify: true });
    loader = r.loader;
    assert.unreachable(`${what}: a damaged stream loaded and verified`);
    return '';
  } catch (e) {
    if ((e as Error).name === 'Assertion') throw e;
    assert.instance(e, MigError, `${what}: ${String(e)}`);
    assert.ok(CODES.has((e as MigError).code), `${what}: code ${(e as MigError).code}`);
    loader = (e as { loader?: Loader }).loader;
    for (const d of loader?.dests ?? []) assert.is.not(await d.dev.state(), 'RUNNING', `${what}: ${d.entry.name} runs`);
    return (e as MigError).code;
  } finally {
    for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy();
  }
}

test('random byte flips and truncations anywhere in the file', async () => {
  const bytes = new Uint8Array(fs.readFileSync(good));
  const rnd = mulberry32(1234);
  const seen = new Map<string, number>();
  const f = tmpFile('fuzz');
  try {
    for (let i = 0; i < 250; i++) {
      const b = bytes.slice();
      let what: string;
      if (i % 3 === 0) {
        const cut = Math.floor(rnd() * bytes.length);
        fs.writeFileSync(f, b.subarray(0, cut));
        what = `truncated at ${cut}`;
      } else {
        const n = 1 + Math.floor(rnd() * 4);
        const at: number[] = [];
        for (let k = 0; k < n; k++) { const p = Math.floor(rnd() * b.length); b[p] ^= 1 + Math.floor(rnd() * 255); at.push(p); }
        fs.writeFileSync(f, b);
        what = `bytes flipped at ${at.join(',')}`;
      }
      const code = await mustRefuse(f, what);
      seen.set(code, (seen.get(code) ?? 0) + 1);
    }
  } finally { rm(f); }
  assert.ok(seen.size >= 2, `codes seen: ${[...seen.keys()].join(', ')}`);
});

test('checksum-valid damage inside device streams (framing, vendor records, page data, config)', async () => {
  const { header, recs } = readRecords(good);
  const rnd = mulberry32(99);
  const chunks = recs.map((r, i) => [r, i] as const).filter(([r]) => r.type === 2);
  const seen = new Map<string, number>();
  const f = tmpFile('fuzz-crc');
  try {
    for (let i = 0; i < 250; i++) {
      const copy = recs.map((r) => ({ ...r, body: r.body.slice() }));
      const [, idx] = chunks[Math.floor(rnd() * chunks.length)];
      const body = copy[idx].body;
      // Bias towards the first 64 bytes (QEMU framing and vendor record headers), sometimes anywhere (page data).
      const p = rnd() < 0.6 ? Math.floor(rnd() * Math.min(64, body.length)) : Math.floor(rnd() * body.length);
      body[p] ^= 1 + Math.floor(rnd() * 255);
      writeRecords(f, header, copy);
      const code = await mustRefuse(f, `record ${idx} body byte ${p}`);
      seen.set(code, (seen.get(code) ?? 0) + 1);
    }
  } finally { rm(f); }
  assert.ok(seen.size >= 2, `codes seen: ${[...seen.keys()].join(', ')}`);
});

test('random region-info buffers and random QEMU packet bytes: parsed or refused with a MigError, nothing else', () => {
  const rnd = mulberry32(5);
  let refused = 0;
  for (let i = 0; i < 3000; i++) {
    const len = Math.floor(rnd() * 200);
    const b = new Uint8Array(len).map(() => Math.floor(rnd() * 256));
    if (len >= 16 && rnd() < 0.7) {
      // Make the caps flag and cap_offset plausible so the chain walker is exercised, not just the length check.
      const dv = new DataView(b.buffer);
      dv.setUint32(0, len, true);
      dv.setUint32(4, 8 | (rnd() < 0.5 ? 4 : 0), true);
      dv.setUint32(12, 32 + 4 * Math.floor(rnd() * 8), true);
    }
    try { parseRegionInfo(b, 'fz'); } catch (e) { assert.instance(e, MigError); refused++; }
    const st = newParseState();
    try { parsePackets(st, b, 0, b.length, 0, { maxData: 64, maxConfig: 64 }, 'fz'); } catch (e) { assert.instance(e, MigError); }
  }
  assert.ok(refused > 100);
});

test.run();
