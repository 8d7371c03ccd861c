// Vendor semantics of the emulated device (docs/EMULATED-DEVICE.md), driven through MigrationRegion and the addon:
// register rules, reserved bits, the state arcs, the save and resume sides, region info, ERROR, dirty pages,
// the workload and the checks MigrationRegion applies to vendor values.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { native, COPY_ALL, COPY_TRAPPED } from '../src/addon/native.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import type { EmulatedDeviceOptions } from '../src/main/emulated/device.js';
import type { MigrationRegion } from '../src/main/protocol/migration-region.js';
import { PROFILES, PROFILE_DEFS, type ProfileName } from '../src/main/protocol/profiles.js';
import { STATE_BITS, type V1State } from '../src/main/protocol/states.js';
import {
  parseRegionInfo, REGION_INFO_FLAG_CAPS, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
} from '../src/main/protocol/region-info.js';
import { ErrorCode, MigError } from '../src/main/errors.js';

const EINVAL = 22;
const EIO = 5;
const ENODEV = 19;
const PAGE = 4096;
const DATA_START = 4096;
const TAG_HEADER = 0x48444d56;
const TAG_PAGES = 0x53454750;
const TAG_END = 0x21444e45;
const MAGIC = 0x3156454455454d46n;
const HEADER_REC = 48;
const REC_HDR = 24;

/** Small, idle devices: no workload, no DMA, so every value below is deterministic. */
const SMALL = { stateSize: 64 << 10, maxChunk: 16 << 10, guestPages: 256, dirtyRate: 0, dmaRate: 0 } as const;

type Dev = { t: EmulatedTransport; r: MigrationRegion; id: number };
type Stateish = Exclude<V1State, 'ERROR'>;

function open(o: EmulatedDeviceOptions): Dev {
  const t = EmulatedTransport.create({ ...SMALL, ...o });
  try {
    return { t, r: t.openRegion(), id: t.device.id };
  } catch (e) {
    t.destroy();
    throw e;
  }
}

function withDev<T>(o: EmulatedDeviceOptions, fn: (d: Dev) => T): T {
  const d = open(o);
  try {
    return fn(d);
  } finally {
    d.t.destroy();
  }
}

async function withDevAsync<T>(o: EmulatedDeviceOptions, fn: (d: Dev) => Promise<T>): Promise<T> {
  const d = open(o);
  try {
    return await fn(d);
  } finally {
    d.t.destroy();
  }
}

const sleep = (ms: number) => new Promise((res) => setTimeout(res, ms));

/** fn must throw an error carrying `errno` (a raw addon error or a MigError wrapping one). */
function errnoOf(fn: () => unknown, errno: number, what: string): Error & { errno?: number; code?: string } {
  let thrown: unknown;
  try { fn(); } catch (e) { thrown = e; }
  if (thrown === undefined) assert.unreachable(`${what}: expected errno ${errno}, nothing was thrown`);
  const ne = thrown as Error & { errno?: number; code?: string };
  assert.is(ne.errno, errno, `${what}: ${ne.message}`);
  return ne;
}

function migErr(fn: () => unknown, code: string, what: string): MigError {
  let thrown: unknown;
  try { fn(); } catch (e) { thrown = e; }
  if (thrown === undefined) assert.unreachable(`${what}: expected ${code}, nothing was thrown`);
  assert.instance(thrown, MigError, `${what}: ${(thrown as Error).message}`);
  assert.is((thrown as MigError).code, code, `${what}: ${(thrown as Error).message}`);
  return thrown as MigError;
}

const lastError = (d: Dev) => native().emuInfo(d.id).lastError;
const raw = (d: Dev) => Number(native().regRead(d.r.handle, 0, 4));

interface Rec { tag: number; seq: number; a: bigint; b: bigint; at: number }
/** Parse one chunk into records; every record must lie wholly inside the chunk. */
function records(chunk: Uint8Array): Rec[] {
  const dv = new DataView(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  const out: Rec[] = [];
  for (let pos = 0; pos < chunk.length;) {
    assert.ok(chunk.length - pos >= REC_HDR, `record header at ${pos} cut off`);
    const r = { tag: dv.getUint32(pos, true), seq: dv.getUint32(pos + 4, true), a: dv.getBigUint64(pos + 8, true), b: dv.getBigUint64(pos + 16, true), at: pos };
    let len = REC_HDR;
    if (r.tag === TAG_HEADER) len += 24;
    else if (r.tag === TAG_PAGES) len += Number(r.b) * PAGE;
    else if (r.tag !== TAG_END) assert.unreachable(`unknown tag 0x${r.tag.toString(16)} at ${pos}`);
    assert.ok(pos + len <= chunk.length, `record at ${pos} runs past the chunk`);
    out.push(r);
    pos += len;
  }
  return out;
}

interface Saved { chunks: Uint8Array[]; offsets: number[] }
/** Save until pending_bytes reads 0, with MigrationRegion.saveChunk. */
function saveAll(r: MigrationRegion, maxChunk: number): Saved {
  const buf = new Uint8Array(maxChunk);
  const s: Saved = { chunks: [], offsets: [] };
  for (let i = 0; i < 10000; i++) {
    const c = r.saveChunk(buf, 0, maxChunk);
    if (c.pending === 0n) return s;
    s.chunks.push(buf.slice(0, c.size));
    s.offsets.push(c.dataOffset);
  }
  throw new Error('pending_bytes never reached 0');
}

function readState(id: number, size: number): Uint8Array {
  const b = new Uint8Array(size);
  native().emuReadState(id, 0, b);
  return b;
}

/** A complete stop-and-copy stream of a seeded source, and the source state it carries. */
function sourceStream(o: EmulatedDeviceOptions): Saved & { state: Uint8Array } {
  return withDev({ seed: 7, ...o }, (s) => {
    s.r.setState('STOP_COPY');
    const saved = saveAll(s.r, s.t.device.opts.maxChunk);
    return { ...saved, state: readState(s.id, s.t.device.opts.stateSize) };
  });
}

function loadAll(r: MigrationRegion, chunks: Uint8Array[]): number[] {
  return chunks.map((c) => r.loadChunk(c, 0, c.length));
}

function bit(b: Uint8Array, i: number): boolean { return (b[i >> 3] & (1 << (i & 7))) !== 0; }
function bitsSet(b: Uint8Array, n: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < n; i++) if (bit(b, i)) out.push(i);
  return out;
}

// ---- registers ------------------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  test(`${profile}: registers accessed at the wrong width or offset fail EINVAL, the state is untouched`, () => {
    withDev({ profile }, (d) => {
      const n = native();
      const h = d.r.handle;
      const hdr = PROFILE_DEFS[profile].headerSize;
      // Controls: the right accesses work.
      assert.is(n.regRead(h, 0, 4), 1n, 'device_state reads RUNNING');
      assert.is(n.regRead(h, 8, 8), 0n, 'pending_bytes outside SAVING');
      assert.is(n.regRead(h, 24, 8), 0n, 'data_size outside SAVING');
      const wrong: [string, () => unknown][] = [
        ['device_state as 8 bytes', () => n.regRead(h, 0, 8)],
        ['device_state write as 8 bytes', () => n.regWrite(h, 0, 8, 1n)],
        ['pending_bytes as 4 bytes', () => n.regRead(h, 8, 4)],
        ['upper half of pending_bytes', () => n.regRead(h, 12, 4)],
        ['data_offset as 4 bytes', () => n.regRead(h, 16, 4)],
        ['upper half of data_offset', () => n.regRead(h, 20, 4)],
        ['data_size write as 4 bytes', () => n.regWrite(h, 24, 4, 0n)],
        ['pending_bytes is read-only', () => n.regWrite(h, 8, 8, 1n)],
        ['data_offset is read-only', () => n.regWrite(h, 16, 8, 4096n)],
        ['first bytes after the header', () => n.regRead(h, hdr, 8)],
        ['first bytes after the header (write)', () => n.regWrite(h, hdr, 4, 0n)],
        ['middle of the inaccessible page', () => n.regRead(h, 2048, 4)],
        ['last word before the data area', () => n.regRead(h, 4088, 8)],
      ];
      for (const [what, fn] of wrong) errnoOf(fn, EINVAL, what);
      assert.ok(lastError(d).length > 0, 'lastError explains the refusal');
      // The reserved word reads 0 and ignores writes.
      n.regWrite(h, 4, 4, 0xffn);
      assert.is(n.regRead(h, 4, 4), 0n);
      // Through MigrationRegion the failure names the register and carries errno (data_offset outside SAVING).
      const e = errnoOf(() => d.r.read('data_offset'), EINVAL, 'data_offset while RUNNING');
      assert.instance(e, MigError);
      assert.is((e as MigError).code, ErrorCode.NATIVE);
      assert.is((e as MigError).register, 'data_offset');
      assert.is(raw(d), 1, 'still RUNNING');
      assert.is(d.r.state(), 'RUNNING');
    });
  });
}

test('linux-5.8: the draft-only registers (32..63) do not exist', () => {
  withDev({ profile: 'linux-5.8' }, (d) => {
    const n = native();
    for (const off of [32, 40, 48, 56]) {
      errnoOf(() => n.regRead(d.r.handle, off, 8), EINVAL, `read ${off}`);
      errnoOf(() => n.regWrite(d.r.handle, off, 8, 4096n), EINVAL, `write ${off}`);
    }
    migErr(() => d.r.read('copied_pfns'), ErrorCode.BAD_ARGUMENT, 'profile has no copied_pfns');
    assert.is(raw(d), 1);
  });
});

test('draft-2019: pfn registers are write-only, copied_pfns read-only, page_size only 4096', () => {
  withDev({ profile: 'draft-2019' }, (d) => {
    const n = native();
    const h = d.r.handle;
    for (const off of [32, 40, 48]) errnoOf(() => n.regRead(h, off, 8), EINVAL, `read WO ${off}`);
    errnoOf(() => n.regWrite(h, 56, 8, 1n), EINVAL, 'write RO copied_pfns');
    n.regWrite(h, 32, 8, 0n);
    n.regWrite(h, 48, 8, 1n);
    n.regWrite(h, 40, 8, 4096n);
    const e = errnoOf(() => d.r.write('page_size', 8192n), EINVAL, 'page_size 8192');
    assert.instance(e, MigError);
    assert.is((e as MigError).register, 'page_size');
    errnoOf(() => n.regRead(h, 56, 4), EINVAL, 'copied_pfns as 4 bytes');
  });
});

test('accesses through a region opened before emuDestroy fail ENODEV', () => {
  const t = EmulatedTransport.create({ ...SMALL });
  const r = t.openRegion();
  try {
    assert.is(r.rawState(), 1);
    t.device.destroy();
    errnoOf(() => native().regRead(r.handle, 0, 4), ENODEV, 'read after destroy');
  } finally {
    t.destroy();
  }
});

// ---- reserved bits ------------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  test(`${profile}: reserved bits 3..31 survive setState, a raw write that changes them fails`, () => {
    // reservedBits is the raw value of bits 3..31 (not shifted); bits 0..2 of it are ignored.
    withDev({ profile, reservedBits: 0x80000007 }, (d) => {
      const n = native();
      assert.is(d.r.rawState(), 0x80000001, 'reserved bit 31 set, RUNNING');
      assert.is(d.r.state(), 'RUNNING');
      d.r.setState('PRE_COPY');
      assert.is(d.r.rawState(), 0x80000003);
      d.r.setState('STOP'); // PRE_COPY -> STOP_COPY -> STOP
      assert.is(d.r.rawState(), 0x80000000);
      d.r.setState('RUNNING');
      assert.is(d.r.rawState(), 0x80000001);
      // Changing the reserved bits fails and keeps the state, whatever the state bits say.
      errnoOf(() => n.regWrite(d.r.handle, 0, 4, 0n), EINVAL, 'STOP with bit 31 cleared');
      assert.is(d.r.rawState(), 0x80000001);
      errnoOf(() => n.regWrite(d.r.handle, 0, 4, 0x80000008n), EINVAL, 'STOP with bit 3 set');
      errnoOf(() => n.regWrite(d.r.handle, 0, 4, 0x1n), EINVAL, 'same state, bit 31 cleared');
      assert.is(d.r.rawState(), 0x80000001);
      assert.match(lastError(d), /reserved/);
      // The same value written raw with the bits kept works.
      n.regWrite(d.r.handle, 0, 4, 0x80000000n);
      assert.is(d.r.rawState(), 0x80000000);
    });
    withDev({ profile }, (d) => {
      errnoOf(() => native().regWrite(d.r.handle, 0, 4, 0x9n), EINVAL, 'RUNNING with bit 3 set on a device without reserved bits');
      assert.is(d.r.rawState(), 1);
    });
  });
}

// ---- state arcs -------------------------------------------------------------------------------------------------

const NAMES: Record<number, Stateish> = { 0: 'STOP', 1: 'RUNNING', 2: 'STOP_COPY', 3: 'PRE_COPY', 4: 'RESUMING' };
const ACCEPT: Record<number, number[]> = { 1: [0, 3, 2, 4], 3: [2, 1], 2: [0, 1], 0: [1, 2, 4], 4: [] /* empty session: validation refuses */ };

for (const profile of PROFILES) {
  test(`${profile}: every raw device_state write outside the arc table fails EINVAL and keeps the state`, () => {
    withDev({ profile }, (d) => {
      const n = native();
      for (const from of [0, 1, 2, 3, 4]) {
        for (let to = 0; to < 8; to++) {
          d.t.reset();
          if (from !== 1) d.r.setState(NAMES[from]);
          assert.is(raw(d), from);
          const ok = to === from || ACCEPT[from].includes(to);
          if (ok) {
            n.regWrite(d.r.handle, 0, 4, BigInt(to));
            assert.is(raw(d), to, `${from} -> ${to} accepted`);
          } else {
            errnoOf(() => n.regWrite(d.r.handle, 0, 4, BigInt(to)), EINVAL, `${from} -> ${to}`);
            assert.is(raw(d), from, `${from} -> ${to} keeps the state`);
          }
        }
      }
      // STOP_COPY -> PRE_COPY: the engine's table refuses it before writing, the vendor refuses the raw write.
      d.t.reset();
      d.r.setState('STOP_COPY');
      migErr(() => d.r.setState('PRE_COPY'), ErrorCode.BAD_STATE, 'setState STOP_COPY -> PRE_COPY');
      errnoOf(() => n.regWrite(d.r.handle, 0, 4, 3n), EINVAL, 'raw STOP_COPY -> PRE_COPY');
      assert.match(lastError(d), /not allowed/);
      assert.is(d.r.state(), 'STOP_COPY');
    });
  });

  test(`${profile}: writing the current state is a no-op (the save session is not restarted)`, () => {
    withDev({ profile }, (d) => {
      d.r.setState('STOP_COPY');
      const full = d.r.read('pending_bytes');
      const buf = new Uint8Array(SMALL.maxChunk);
      d.r.saveChunk(buf, 0, SMALL.maxChunk);
      const after = d.r.read('pending_bytes');
      assert.ok(after < full);
      native().regWrite(d.r.handle, 0, 4, 2n);
      assert.is(d.r.read('pending_bytes'), after);
      assert.is(native().emuInfo(d.id).chunksStaged, 1);
    });
  });
}

// ---- save side ---------------------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  test(`${profile}: save sequence pending_bytes -> data_offset -> data_size, re-reads and consumption`, () => {
    withDev({ profile, seed: 3 }, (d) => {
      const n = native();
      const { stateSize, maxChunk } = d.t.device.opts;
      const pages = stateSize / PAGE;
      d.r.setState('STOP_COPY');
      let pending = d.r.read('pending_bytes');
      assert.is(pending, BigInt(HEADER_REC + pages * (PAGE + REC_HDR) + REC_HDR), 'header + all pages + END');
      assert.is(d.r.read('data_size'), 0n, 'nothing staged yet');
      const seen = new Uint8Array(pages);
      const state = readState(d.id, stateSize);
      let seq = 0;
      let pagesSent = 0;
      let sawEnd = false;
      for (let k = 0; k < 1000 && pending > 0n; k++) {
        const off = d.r.read('data_offset');
        assert.is(n.emuInfo(d.id).chunksStaged, k + 1, 'data_offset stages one chunk');
        const size = d.r.read('data_size');
        assert.is(off, 4096n, 'fixed policy');
        assert.ok(size > 0n && size <= BigInt(maxChunk), `chunk ${k} size ${size}`);
        // Re-reading data_offset/data_size has no side effect: the same chunk.
        assert.is(d.r.read('data_offset'), off);
        assert.is(d.r.read('data_size'), size);
        assert.is(n.emuInfo(d.id).chunksStaged, k + 1, 're-read did not stage');
        const chunk = new Uint8Array(Number(size));
        d.r.copyOut(Number(off), chunk.length, chunk, 0);
        const dv = new DataView(chunk.buffer);
        let sentHere = 0;
        for (const r of records(chunk)) {
          assert.is(r.seq, seq++, 'records numbered in stream order');
          assert.not.ok(sawEnd, 'nothing after END');
          if (r.tag === TAG_HEADER) {
            assert.is(r.seq, 0, 'HEADER first');
            assert.is(r.a, BigInt(stateSize));
            assert.is(r.b, 4096n | (1n << 32n));
            assert.is(dv.getBigUint64(r.at + 24, true), MAGIC);
            assert.is(dv.getUint32(r.at + 32, true), maxChunk);
          } else if (r.tag === TAG_PAGES) {
            for (let p = Number(r.a); p < Number(r.a + r.b); p++) {
              assert.is(seen[p], 0, `page ${p} sent once`);
              seen[p] = 1;
              const at = r.at + REC_HDR + (p - Number(r.a)) * PAGE;
              assert.ok(Buffer.from(chunk.subarray(at, at + PAGE)).equals(state.subarray(p * PAGE, (p + 1) * PAGE)), `page ${p} content`);
            }
            sentHere += Number(r.b);
          } else {
            assert.is(r.a, BigInt(r.seq), 'END a = records before END');
            assert.is(r.b, BigInt(pages), 'END b = pages sent');
            sawEnd = true;
          }
        }
        pagesSent += sentHere;
        // Re-reading pending_bytes consumes the staged chunk.
        const before = pending;
        pending = d.r.read('pending_bytes');
        assert.is(n.emuInfo(d.id).chunksConsumed, k + 1);
        assert.is(d.r.read('data_size'), 0n, 'consumed: data_size reads 0');
        assert.is(pending, BigInt((pages - pagesSent) * (PAGE + REC_HDR) + (sawEnd ? 0 : REC_HDR)), `estimate after chunk ${k}`);
        assert.ok(pending < before);
      }
      assert.is(pending, 0n, 'pending reaches 0');
      assert.ok(sawEnd, 'END sent in STOP_COPY');
      assert.is(seen.reduce((a, b) => a + b, 0), pages, 'every page sent');
      assert.is(n.emuInfo(d.id).pagesSent, pages);
      assert.is(d.r.read('pending_bytes'), 0n, 'still 0');
    });
  });

  test(`${profile}: PRE_COPY never counts or sends END; STOP_COPY then sends exactly the END record`, () => {
    withDev({ profile }, (d) => {
      const pages = SMALL.stateSize / PAGE;
      d.r.setState('PRE_COPY');
      assert.is(d.r.read('pending_bytes'), BigInt(HEADER_REC + pages * (PAGE + REC_HDR)), 'no END in the estimate');
      const pre = saveAll(d.r, SMALL.maxChunk);
      assert.ok(pre.chunks.length > 1);
      const tags = pre.chunks.flatMap((c) => records(c).map((r) => r.tag));
      assert.not.ok(tags.includes(TAG_END), 'no END in pre-copy');
      assert.is(tags.filter((t) => t === TAG_HEADER).length, 1);
      // A page written now is dirty again, and only it is sent.
      native().emuTouch(d.id, 5 * PAGE + 17, 0xab);
      assert.is(d.r.read('pending_bytes'), BigInt(PAGE + REC_HDR));
      const again = saveAll(d.r, SMALL.maxChunk);
      assert.is(again.chunks.length, 1);
      const rec = records(again.chunks[0]);
      assert.is(rec.length, 1);
      assert.equal([rec[0].tag, rec[0].a, rec[0].b], [TAG_PAGES, 5n, 1n]);
      assert.is(again.chunks[0][REC_HDR + 17], 0xab);
      // Stop-and-copy continues the same session: only END remains.
      d.r.setState('STOP_COPY');
      assert.is(d.r.read('pending_bytes'), BigInt(REC_HDR));
      const fin = saveAll(d.r, SMALL.maxChunk);
      assert.is(fin.chunks.length, 1);
      assert.is(fin.chunks[0].length, REC_HDR);
      const end = records(fin.chunks[0])[0];
      assert.is(end.tag, TAG_END);
      const total = pre.chunks.concat(again.chunks).reduce((a, c) => a + records(c).length, 0);
      assert.is(end.seq, total);
      assert.is(end.a, BigInt(total));
      assert.is(end.b, BigInt(pages + 1), 'pages sent in total, the resent page included');
    });
  });

  test(`${profile}: data_offset policies: fixed is always 4096, moving follows the slot formula`, () => {
    withDev({ profile, offsetPolicy: 'fixed' }, (d) => {
      d.r.setState('STOP_COPY');
      const s = saveAll(d.r, SMALL.maxChunk);
      assert.ok(s.offsets.length > 2);
      assert.ok(s.offsets.every((o) => o === 4096), String(s.offsets));
    });
    withDev({ profile, offsetPolicy: 'moving', seed: 11 }, (d) => {
      const { dataAreaSize, maxChunk } = native().emuInfo(d.id);
      const slots = (dataAreaSize - maxChunk) / PAGE + 1;
      d.r.setState('STOP_COPY');
      const s = saveAll(d.r, SMALL.maxChunk);
      assert.ok(s.offsets.length > 2);
      s.offsets.forEach((o, k) => assert.is(o, DATA_START + ((k * 37) % slots) * PAGE, `chunk ${k}`));
      for (let k = 1; k < s.offsets.length; k++) assert.is.not(s.offsets[k], s.offsets[k - 1], `chunk ${k} moved`);
      // The data really is where data_offset says: the records parse and keep their sequence.
      let seq = 0;
      for (const c of s.chunks) for (const r of records(c)) assert.is(r.seq, seq++);
      assert.is(records(s.chunks[s.chunks.length - 1]).pop()!.tag, TAG_END);
    });
  });
}

// ---- region info -----------------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  test(`${profile}: region info bytes: type, flags, offset and sparse areas per data mode`, () => {
    for (const dataMode of ['mmap', 'trapped', 'mixed'] as const) {
      withDev({ profile, dataMode, maxChunk: 192 << 10 }, (d) => {
        const n = native();
        const emu = n.emuInfo(d.id);
        assert.is(emu.dataAreaSize, 384 << 10, 'round_up(2 x maxChunk)');
        assert.is(emu.regionSize, 4096 + emu.dataAreaSize);
        const dinfo = n.emuDeviceInfo(d.id);
        assert.equal([dinfo.flags, dinfo.numRegions, dinfo.numIrqs], [3, 10, 5]);
        const info = parseRegionInfo(n.emuRegionInfo(d.id, 9), 'd');
        assert.equal(info.type, { type: profile === 'draft-2019' ? 2 : 3, subtype: 1 });
        assert.is(info.index, 9);
        assert.is(info.size, emu.regionSize);
        assert.is(info.offset, 9 * 2 ** 40);
        assert.is(d.r.size, emu.regionSize);
        const base = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_CAPS;
        let want: { offset: number; size: number }[] | undefined;
        if (dataMode === 'mmap') want = [{ offset: 4096, size: emu.dataAreaSize }];
        else if (dataMode === 'mixed') {
          want = [];
          for (let o = 4096; o < emu.regionSize; o += 128 << 10) want.push({ offset: o, size: Math.min(64 << 10, emu.regionSize - o) });
          assert.is(want.length, 3);
        }
        assert.is(info.flags, want ? base | REGION_INFO_FLAG_MMAP : base, `${dataMode} flags`);
        assert.equal(info.sparse, want, `${dataMode} areas`);
        assert.equal(n.regionAreas(d.r.handle), want ?? [], `${dataMode} mapped areas`);
        // Plain PCI regions 0..8 and the index limit.
        const bar0 = parseRegionInfo(n.emuRegionInfo(d.id, 0), 'd');
        assert.equal([bar0.flags, bar0.size, bar0.offset, bar0.type], [REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE, 16 << 20, 0, undefined]);
        const r8 = parseRegionInfo(n.emuRegionInfo(d.id, 8), 'd');
        assert.equal([r8.flags, r8.size, r8.offset], [0, 0, 8 * 2 ** 40]);
        errnoOf(() => n.emuRegionInfo(d.id, 10), EINVAL, 'index 10');
      });
    }
  });
}

// ---- resume side ----------------------------------------------------------------------------------------------

const RESUME = { stateSize: 256 << 10, maxChunk: 64 << 10 } as const;

for (const profile of PROFILES) {
  test(`${profile}: resume with a wrong magic is refused, the device stays RESUMING and never runs`, async () => {
    const src = sourceStream({ profile, ...RESUME });
    const bad = src.chunks.map((c) => c.slice());
    bad[0][24] ^= 0x01; // first byte of the HEADER magic
    await withDevAsync({ profile, ...RESUME, zeroFill: true, dirtyRate: 4000 }, async (d) => {
      d.r.setState('RESUMING');
      const w0 = native().emuInfo(d.id).workloadWrites;
      errnoOf(() => d.r.loadChunk(bad[0], 0, bad[0].length), EINVAL, 'bad magic chunk');
      assert.match(lastError(d), /chunk 0 record 0: bad magic/);
      // Poisoned: even a correct chunk is refused now, and the device cannot run or stop.
      errnoOf(() => d.r.loadChunk(bad[1], 0, bad[1].length), EINVAL, 'after poison');
      const e = migErr(() => d.r.setState('RUNNING'), ErrorCode.TRANSITION_FAILED, 'RESUMING -> RUNNING');
      assert.is(e.errno, EINVAL);
      migErr(() => d.r.setState('STOP'), ErrorCode.TRANSITION_FAILED, 'RESUMING -> STOP');
      assert.is(d.r.state(), 'RESUMING');
      assert.match(lastError(d), /bad magic/);
      await sleep(80);
      assert.is(native().emuInfo(d.id).workloadWrites, w0, 'the workload never ran');
      assert.is(raw(d), 4);
    });
  });

  test(`${profile}: resume into a device of another state size is refused at the HEADER`, () => {
    const src = sourceStream({ profile, ...RESUME });
    withDev({ profile, ...RESUME, stateSize: RESUME.stateSize * 2, zeroFill: true }, (d) => {
      d.r.setState('RESUMING');
      errnoOf(() => d.r.loadChunk(src.chunks[0], 0, src.chunks[0].length), EINVAL, 'geometry');
      assert.match(lastError(d), /state size 262144, this device has 524288/);
      migErr(() => d.r.setState('RUNNING'), ErrorCode.TRANSITION_FAILED, 'RESUMING -> RUNNING');
      assert.is(d.r.state(), 'RESUMING');
      assert.match(lastError(d), /state size/);
    });
  });

  test(`${profile}: a truncated stream (no END) cannot run; the missing chunk completes it`, () => {
    const src = sourceStream({ profile, ...RESUME });
    assert.ok(src.chunks.length >= 3, `${src.chunks.length} chunks`);
    withDev({ profile, ...RESUME, zeroFill: true }, (d) => {
      d.r.setState('RESUMING');
      loadAll(d.r, src.chunks.slice(0, -1));
      const e = migErr(() => d.r.setState('RUNNING'), ErrorCode.TRANSITION_FAILED, 'RESUMING -> RUNNING');
      assert.is(e.errno, EINVAL);
      assert.is(d.r.state(), 'RESUMING');
      assert.match(lastError(d), /no END/);
      // A refused transition does not poison the session.
      const last = src.chunks[src.chunks.length - 1];
      d.r.loadChunk(last, 0, last.length);
      d.r.setState('RUNNING');
      assert.ok(Buffer.from(readState(d.id, RESUME.stateSize)).equals(src.state));
    });
  });

  test(`${profile}: a reordered chunk fails on its seq`, () => {
    const src = sourceStream({ profile, ...RESUME });
    withDev({ profile, ...RESUME, zeroFill: true }, (d) => {
      d.r.setState('RESUMING');
      d.r.loadChunk(src.chunks[0], 0, src.chunks[0].length);
      errnoOf(() => d.r.loadChunk(src.chunks[2], 0, src.chunks[2].length), EINVAL, 'chunk 2 before 1');
      assert.match(lastError(d), /chunk 1 record 0: seq \d+, expected \d+/);
      migErr(() => d.r.setState('RUNNING'), ErrorCode.TRANSITION_FAILED, 'RESUMING -> RUNNING');
    });
  });

  test(`${profile}: MigrationRegion.loadChunk round trips give identical state (all data modes, both policies)`, () => {
    const geos = [
      { dataMode: 'mmap', offsetPolicy: 'fixed' },
      { dataMode: 'trapped', offsetPolicy: 'moving' },
      // 96 KiB chunks at moving offsets straddle the 64 KiB mapped / trapped pieces.
      { dataMode: 'mixed', offsetPolicy: 'moving', maxChunk: 96 << 10 },
    ] as const;
    for (const g of geos) {
      const o = { profile, ...RESUME, ...g };
      const src = sourceStream(o);
      withDev({ ...o, zeroFill: true }, (d) => {
        assert.not.ok(Buffer.from(readState(d.id, o.stateSize)).equals(src.state), 'destination starts different');
        d.r.setState('RESUMING');
        const offs = loadAll(d.r, src.chunks);
        assert.equal(offs, src.offsets, `${g.dataMode}/${g.offsetPolicy}: resume offsets follow the save policy`);
        d.r.setState('RUNNING');
        const info = native().emuInfo(d.id);
        assert.is(info.chunksConsumed, src.chunks.length);
        assert.is(info.pagesLoaded, o.stateSize / PAGE);
        assert.ok(Buffer.from(readState(d.id, o.stateSize)).equals(src.state), `${g.dataMode}/${g.offsetPolicy}: identical state`);
      });
    }
  });
}

for (const profile of PROFILES) {
  test(`${profile}: records split anywhere across data_size writes (1 byte, inside a head, mid-payload) are reassembled`, () => {
    const o = { profile, ...RESUME, dataMode: 'mixed' as const, maxChunk: 96 << 10 };
    const src = sourceStream(o);
    const all = Buffer.concat(src.chunks);
    const cuts = [1, 5, 24, 47, 4099, 13, 48, 70001];
    const pieces = (stream: Uint8Array, fn: (at: number, n: number, i: number) => void) => {
      for (let at = 0, i = 0; at < stream.length; i++) {
        const n = Math.min(cuts[i % cuts.length], stream.length - at);
        fn(at, n, i);
        at += n;
      }
    };
    withDev({ ...o, zeroFill: true }, (d) => {
      d.r.setState('RESUMING');
      let writes = 0;
      pieces(all, (at, n) => { d.r.loadChunk(all, at, n); writes++; });
      assert.is(native().emuInfo(d.id).chunksConsumed, writes, 'one vendor write per piece');
      d.r.setState('RUNNING');
      assert.ok(Buffer.from(readState(d.id, o.stateSize)).equals(src.state), 'identical state');
    });
    // Damage inside the HEADER's payload is found by the write that completes the head (the 4th piece, at byte 77).
    const bad = Uint8Array.from(all);
    bad[24] ^= 1;
    withDev({ ...o, zeroFill: true }, (d) => {
      d.r.setState('RESUMING');
      let failedAt = -1;
      pieces(bad, (at, n, i) => {
        if (failedAt >= 0) return;
        try { d.r.loadChunk(bad, at, n); } catch { failedAt = i; }
      });
      assert.is(failedAt, 3);
      assert.match(lastError(d), /chunk 3 record 0: bad magic/);
    });
    // A stream cut inside a record never completes: the device cannot leave RESUMING.
    withDev({ ...o, zeroFill: true }, (d) => {
      d.r.setState('RESUMING');
      d.r.loadChunk(all, 0, all.length - 30);
      migErr(() => d.r.setState('STOP'), ErrorCode.TRANSITION_FAILED, 'cut short');
      assert.match(lastError(d), /no END record loaded \(record \d+ cut short\)/);
    });
  });
}

test('linux-5.8: data_size before the data (draft order) is rejected and poisons the session', () => {
  const profile: ProfileName = 'linux-5.8';
  const src = sourceStream({ profile, ...RESUME });
  const c0 = src.chunks[0];
  withDev({ profile, ...RESUME, zeroFill: true }, (d) => {
    d.r.setState('RESUMING');
    const off = Number(d.r.read('data_offset'));
    errnoOf(() => d.r.write('data_size', BigInt(c0.length)), EINVAL, 'data_size before data');
    assert.match(lastError(d), /chunk 0 record 0/);
    d.r.copyIn(off, c0.length, c0, 0, COPY_ALL);
    errnoOf(() => d.r.write('data_size', BigInt(c0.length)), EINVAL, 'poisoned');
    assert.match(lastError(d), /resume failed earlier/);
    migErr(() => d.r.setState('RUNNING'), ErrorCode.TRANSITION_FAILED, 'cannot run');
    assert.is(d.r.state(), 'RESUMING');
  });
  // The 5.8 order (data, then data_size) on a fresh device.
  withDev({ profile, ...RESUME, zeroFill: true }, (d) => {
    d.r.setState('RESUMING');
    for (const c of src.chunks) {
      const off = Number(d.r.read('data_offset'));
      d.r.copyIn(off, c.length, c, 0, COPY_ALL);
      d.r.write('data_size', BigInt(c.length));
    }
    d.r.setState('RUNNING');
    assert.ok(Buffer.from(readState(d.id, RESUME.stateSize)).equals(src.state), 'identical state');
  });
});

for (const dataMode of ['trapped', 'mixed'] as const) {
  test(`draft-2019 (${dataMode}): data before data_size (5.8 order) leaves the chunk waiting: EIO, not consumed`, () => {
    const profile: ProfileName = 'draft-2019';
    const o = { profile, ...RESUME, dataMode, offsetPolicy: 'moving' as const, maxChunk: 96 << 10 };
    const src = sourceStream(o);
    withDev({ ...o, zeroFill: true }, (d) => {
      d.r.setState('RESUMING');
      const c0 = src.chunks[0];
      const off = Number(d.r.read('data_offset'));
      assert.ok(d.r.copyIn(off, c0.length, c0, 0, COPY_ALL) > 0, 'the chunk has trapped bytes');
      d.r.write('data_size', BigInt(c0.length));
      assert.is(native().emuInfo(d.id).chunksConsumed, 0, 'waiting for the trapped data');
      assert.is(d.r.read('data_size'), BigInt(c0.length));
      errnoOf(() => d.r.read('data_offset'), EIO, 'data_offset while waiting');
      const e = migErr(() => d.r.setState('RUNNING'), ErrorCode.TRANSITION_FAILED, 'RESUMING -> RUNNING while waiting');
      assert.is(e.errno, EIO);
      assert.match(lastError(d), /data never followed/);
      assert.is(raw(d), 4, 'still RESUMING');
      // Not poisoned: once the trapped bytes arrive the chunk is consumed and the resume completes.
      d.r.copyIn(off, c0.length, c0, 0, COPY_TRAPPED);
      assert.is(native().emuInfo(d.id).chunksConsumed, 1);
      loadAll(d.r, src.chunks.slice(1));
      d.r.setState('RUNNING');
      assert.ok(Buffer.from(readState(d.id, o.stateSize)).equals(src.state), 'identical state');
    });
  });
}

// ---- ERROR ------------------------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  test(`${profile}: error-on-transition puts the device in ERROR until reset`, () => {
    withDev({ profile, reservedBits: 0x40000000 }, (d) => {
      d.t.device.setFault('error-on-transition', STATE_BITS.STOP_COPY);
      d.r.setState('PRE_COPY');
      assert.ok(d.r.read('pending_bytes') > 0n);
      const e = migErr(() => d.r.setState('STOP_COPY'), ErrorCode.DEVICE_ERROR_STATE, 'PRE_COPY -> STOP_COPY');
      assert.is(e.register, 'device_state');
      assert.is(d.r.rawState(), 0x40000006, 'ERROR (110), reserved bits kept');
      migErr(() => d.r.state(), ErrorCode.DEVICE_ERROR_STATE, 'state()');
      migErr(() => d.r.setState('RUNNING'), ErrorCode.DEVICE_ERROR_STATE, 'setState from ERROR');
      errnoOf(() => native().regWrite(d.r.handle, 0, 4, 0x40000001n), EINVAL, 'raw write leaving ERROR');
      assert.is(d.r.read('pending_bytes'), 0n, 'session dropped');
      d.t.reset();
      assert.is(d.r.state(), 'RUNNING');
      assert.is(d.r.rawState(), 0x40000001);
      assert.is(lastError(d), '', 'reset clears lastError');
      // Faults survive reset.
      d.r.setState('PRE_COPY');
      migErr(() => d.r.setState('STOP_COPY'), ErrorCode.DEVICE_ERROR_STATE, 'fault still set');
      d.t.reset();
      d.t.device.clearFault();
      d.r.setState('STOP_COPY');
      assert.is(d.r.state(), 'STOP_COPY');
    });
  });

  test(`${profile}: fail-transition refuses with EIO and keeps the state`, () => {
    withDev({ profile }, (d) => {
      d.t.device.setFault('fail-transition', STATE_BITS.STOP);
      const e = migErr(() => d.r.setState('STOP'), ErrorCode.TRANSITION_FAILED, 'RUNNING -> STOP');
      assert.is(e.errno, EIO);
      assert.is(d.r.state(), 'RUNNING');
      d.r.setState('STOP_COPY');
      migErr(() => d.r.setState('STOP'), ErrorCode.TRANSITION_FAILED, 'STOP_COPY -> STOP');
      assert.is(d.r.state(), 'STOP_COPY');
    });
  });
}

// ---- dirty pages ------------------------------------------------------------------------------------------------

test('draft-2019: dirty bitmap through the region reports exactly the DMA-written pages', () => {
  withDev({ profile: 'draft-2019', guestPages: 300 }, (d) => {
    const n = native();
    const scratch = new Uint8Array(64);
    const query = (start: number, total: number) => {
      const out = new Uint8Array(Math.ceil(total / 8));
      const found = d.r.queryDirtyPfns(start, total, 4096, out, scratch);
      return { found, bits: bitsSet(out, total) };
    };
    assert.equal(query(0, 300), { found: 0, bits: [] }, 'clean: NONE');
    const touched = [0, 5, 63, 64, 130, 299];
    for (const p of touched) n.emuDmaTouch(d.id, p);
    assert.equal(query(0, 300), { found: touched.length, bits: touched });
    assert.equal(query(0, 300), { found: 0, bits: [] }, 'the query cleared the log');
    // A sub-range: bit i is pfn start+i; pages outside the range stay logged.
    for (const p of [100, 101, 150, 200]) n.emuDmaTouch(d.id, p);
    assert.equal(query(100, 64), { found: 3, bits: [0, 1, 50] });
    assert.equal(query(0, 300), { found: 1, bits: [200] });
    // Every page of the range dirty: copied_pfns reads ALL.
    for (let p = 10; p < 20; p++) n.emuDmaTouch(d.id, p);
    n.emuDmaTouch(d.id, 25);
    d.r.write('start_pfn', 10n);
    d.r.write('page_size', 4096n);
    d.r.write('total_pfns', 10n);
    assert.is(d.r.read('copied_pfns'), 0xffff_ffff_ffff_ffffn, 'ALL');
    for (let p = 10; p < 20; p++) n.emuDmaTouch(d.id, p);
    const all = query(10, 10);
    assert.equal(all, { found: 10, bits: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] });
    assert.equal(query(0, 300), { found: 1, bits: [25] }, 'ALL cleared only its range');
    // A range beyond guest memory is refused.
    errnoOf(() => query(290, 20), EINVAL, 'range beyond guest memory');
    // Refused while RESUMING.
    n.emuDmaTouch(d.id, 7);
    d.r.setState('RESUMING');
    errnoOf(() => query(0, 300), EINVAL, 'query while RESUMING');
  });
});

test('draft-2019: the bitmap query during a save shares the staged chunk offset', () => {
  withDev({ profile: 'draft-2019', guestPages: 300, offsetPolicy: 'moving' }, (d) => {
    const buf = new Uint8Array(SMALL.maxChunk);
    d.r.setState('PRE_COPY');
    d.r.saveChunk(buf, 0, SMALL.maxChunk);
    const c1 = d.r.saveChunk(buf, 0, SMALL.maxChunk);
    assert.is.not(c1.dataOffset, 4096, 'second chunk moved');
    native().emuDmaTouch(d.id, 42);
    const out = new Uint8Array(38);
    assert.is(d.r.queryDirtyPfns(0, 300, 4096, out, new Uint8Array(64)), 1);
    assert.equal(bitsSet(out, 300), [42]);
    // The bitmap was written over the staged chunk, at its data_offset.
    const w = new Uint8Array(8);
    d.r.copyOut(c1.dataOffset, 8, w, 0);
    assert.is(new DataView(w.buffer).getBigUint64(0, true), 1n << 42n);
  });
});

test('draft-2019: bad-copied-pfns surfaces as VENDOR_BAD_VALUE on copied_pfns', () => {
  withDev({ profile: 'draft-2019', guestPages: 300 }, (d) => {
    native().emuDmaTouch(d.id, 3);
    d.t.device.setFault('bad-copied-pfns');
    const e = migErr(() => d.r.queryDirtyPfns(0, 300, 4096, new Uint8Array(38), new Uint8Array(64)), ErrorCode.VENDOR_BAD_VALUE, 'copied_pfns');
    assert.is(e.register, 'copied_pfns');
    assert.is(e.value, 301n);
  });
});

test('linux-5.8: container dirty pages: GET needs START, then reports the DMA-written pages', () => {
  withDev({ profile: 'linux-5.8', guestPages: 300 }, (d) => {
    const n = native();
    const bm = new Uint8Array(38);
    errnoOf(() => d.t.containerDirty('get', bm), EINVAL, 'GET before START');
    n.emuDmaTouch(d.id, 7); // before START: not logged
    d.t.containerDirty(true);
    const touched = [1, 9, 64, 299];
    for (const p of touched) n.emuDmaTouch(d.id, p);
    d.t.containerDirty('get', bm);
    assert.equal(bitsSet(bm, 300), touched);
    const again = new Uint8Array(38);
    d.t.containerDirty('get', again);
    assert.equal(bitsSet(again, 300), [], 'GET cleared the log');
    // GET ORs into the caller's bitmap.
    const or = new Uint8Array(38);
    or[0] = 0x01;
    n.emuDmaTouch(d.id, 2);
    d.t.containerDirty('get', or);
    assert.equal(bitsSet(or, 300), [0, 2]);
    // Geometry of GET_BITMAP.
    errnoOf(() => n.emuDirtyPages(d.id, 4, 0, 300 * 4096, 8192, bm), EINVAL, 'pgsize 8192');
    errnoOf(() => n.emuDirtyPages(d.id, 4, 100, 4096, 4096, bm), EINVAL, 'unaligned iova');
    errnoOf(() => n.emuDirtyPages(d.id, 4, 0, 300 * 4096, 4096, new Uint8Array(37)), EINVAL, 'bitmap too small');
    errnoOf(() => n.emuDirtyPages(d.id, 4, 0, 301 * 4096, 4096, new Uint8Array(64)), EINVAL, 'beyond guest memory');
    d.t.containerDirty(false);
    errnoOf(() => d.t.containerDirty('get', bm), EINVAL, 'GET after STOP');
  });
  withDev({ profile: 'draft-2019', guestPages: 300 }, (d) => {
    errnoOf(() => d.t.containerDirty(true), EINVAL, 'draft-2019 has no container tracking');
  });
});

// ---- workload ---------------------------------------------------------------------------------------------------

for (const profile of PROFILES) {
  test(`${profile}: the workload dirties state while RUNNING and not while stopped`, async () => {
    await withDevAsync({ profile, stateSize: 256 << 10, maxChunk: 64 << 10, dirtyRate: 3000, dmaRate: 2000, guestPages: 64 }, async (d) => {
      const n = native();
      const size = 256 << 10;
      const s0 = readState(d.id, size);
      const i0 = n.emuInfo(d.id);
      await sleep(120);
      const i1 = n.emuInfo(d.id);
      assert.ok(i1.workloadWrites > i0.workloadWrites, `workload writes ${i0.workloadWrites} -> ${i1.workloadWrites}`);
      assert.ok(i1.dmaWrites > i0.dmaWrites, `dma writes ${i0.dmaWrites} -> ${i1.dmaWrites}`);
      assert.not.ok(Buffer.from(readState(d.id, size)).equals(s0), 'state changed');
      // PRE_COPY: drained pending grows again while the device runs.
      d.r.setState('PRE_COPY');
      saveAll(d.r, 64 << 10);
      const p1 = d.r.read('pending_bytes');
      await sleep(150);
      const p2 = d.r.read('pending_bytes');
      assert.ok(p2 >= p1 + 8n * 4120n, `pending ${p1} -> ${p2}`);
      // STOP_COPY: the workload stops, pending drains to 0 and stays there.
      d.r.setState('STOP_COPY');
      const w = n.emuInfo(d.id);
      saveAll(d.r, 64 << 10);
      const s1 = readState(d.id, size);
      await sleep(150);
      assert.is(d.r.read('pending_bytes'), 0n);
      const w2 = n.emuInfo(d.id);
      assert.is(w2.workloadWrites, w.workloadWrites, 'no workload writes while stopped');
      assert.is(w2.dmaWrites, w.dmaWrites, 'no DMA while stopped');
      assert.ok(Buffer.from(readState(d.id, size)).equals(s1), 'state frozen');
      d.r.setState('STOP');
      await sleep(60);
      assert.is(n.emuInfo(d.id).workloadWrites, w.workloadWrites);
      d.r.setState('RUNNING');
      await sleep(100);
      assert.ok(n.emuInfo(d.id).workloadWrites > w.workloadWrites, 'resumes when RUNNING again');
    });
  });
}

// ---- vendor values MigrationRegion refuses ---------------------------------------------------------------------

for (const profile of PROFILES) {
  test(`${profile}: checkData rejects offsets in the header or past the region and sizes past the region`, () => {
    withDev({ profile }, (d) => {
      const hdr = PROFILE_DEFS[profile].headerSize;
      const size = d.r.size;
      const cap = 1 << 20;
      const check = (o: number | bigint, s: number | bigint, c = cap) => d.r.checkData(BigInt(o), BigInt(s), c);
      let e = migErr(() => check(hdr - 1, 0), ErrorCode.VENDOR_BAD_VALUE, 'inside header');
      assert.is(e.register, 'data_offset');
      e = migErr(() => check(16, 8), ErrorCode.VENDOR_BAD_VALUE, 'at data_offset register');
      assert.is(e.register, 'data_offset');
      assert.equal(check(hdr, 0), { off: hdr, size: 0 }, 'first byte after the header');
      if (profile === 'draft-2019') migErr(() => check(32, 0), ErrorCode.VENDOR_BAD_VALUE, '32 is inside the draft header');
      e = migErr(() => check(size, 0), ErrorCode.VENDOR_BAD_VALUE, 'past the region');
      assert.is(e.register, 'data_offset');
      e = migErr(() => check(2n ** 64n - 4096n, 0), ErrorCode.VENDOR_BAD_VALUE, 'huge offset');
      assert.is(e.register, 'data_offset');
      e = migErr(() => check(4096, size - 4096 + 1), ErrorCode.VENDOR_BAD_VALUE, 'size past the region end');
      assert.is(e.register, 'data_size');
      e = migErr(() => check(4096, 2n ** 64n - 1n), ErrorCode.VENDOR_BAD_VALUE, 'huge size');
      assert.is(e.register, 'data_size');
      e = migErr(() => check(4096, 8192, 4096), ErrorCode.VENDOR_BAD_VALUE, 'size over capacity');
      assert.is(e.register, 'data_size');
      assert.equal(check(4096, size - 4096), { off: 4096, size: size - 4096 }, 'the whole data area');
    });
  });

  test(`${profile}: data_offset/data_size faults surface through saveChunk as VENDOR_BAD_VALUE naming the register`, () => {
    const cases = [
      { kind: 'bad-data-offset', arg: 1, register: 'data_offset', value: (_: number) => 16n },
      { kind: 'huge-data-offset', arg: 0, register: 'data_offset', value: (_: number) => 2n ** 64n - 4096n },
      { kind: 'bad-data-size', arg: 2, register: 'data_size', value: (area: number) => BigInt(area + 4096) },
    ];
    for (const c of cases) {
      withDev({ profile }, (d) => {
        const buf = new Uint8Array(SMALL.maxChunk);
        d.t.device.setFault(c.kind, c.arg);
        d.r.setState('STOP_COPY');
        for (let k = 0; k < c.arg; k++) {
          const ok = d.r.saveChunk(buf, 0, SMALL.maxChunk);
          assert.is(ok.dataOffset, 4096, `${c.kind}: chunk ${k} before the fault`);
          assert.ok(ok.size > 0);
        }
        const e = migErr(() => d.r.saveChunk(buf, 0, SMALL.maxChunk), ErrorCode.VENDOR_BAD_VALUE, c.kind);
        assert.is(e.register, c.register, c.kind);
        assert.ok(e.message.includes(c.register), `${c.kind}: message names the register: ${e.message}`);
        assert.is(e.value, c.value(native().emuInfo(d.id).dataAreaSize), c.kind);
        assert.is(e.device, d.t.name);
      });
    }
  });
}

test.run();
