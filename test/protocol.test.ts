// Protocol tables and codecs: device_state table, profiles, QEMU stream bytes, region-info parsing, config blob.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { STATE_TABLE, NEXT_STATE, statePath, isValidState, isErrorState, withStateBits, STATE_BITS } from '../src/main/protocol/states.js';
import { PROFILE_DEFS } from '../src/main/protocol/profiles.js';
import {
  FLAG_DEV_CONFIG_STATE, FLAG_DEV_DATA_STATE, FLAG_DEV_SETUP_STATE, FLAG_END_OF_STATE, configSection, emptyIterateSection,
  endTag, newParseState, parsePackets, putBe64, setupSection, checkStreamEnd,
} from '../src/main/protocol/qemu-stream.js';
import { parseRegionInfo, findRegionByType } from '../src/main/protocol/region-info.js';
import { decodeConfigBlob, encodeConfigBlob } from '../src/main/protocol/config-blob.js';
import { ErrorCode, MigError } from '../src/main/errors.js';

function hex(b: Uint8Array): string { return Buffer.from(b).toString('hex'); }
function throwsCode(fn: () => unknown, code: string, offset?: number): MigError {
  try { fn(); } catch (e) {
    assert.instance(e, MigError);
    assert.is((e as MigError).code, code, (e as Error).message);
    if (offset !== undefined) assert.is((e as MigError).offset, offset, (e as Error).message);
    return e as MigError;
  }
  throw new Error(`expected ${code}`);
}

test('state table: the 5.8 VALID() and IS_ERROR() rules for all 8 combinations', () => {
  // VALID(s): RESUMING set => (s & MASK) == RESUMING exactly.
  for (let s = 0; s < 8; s++) {
    const valid58 = (s & 4) ? (s & 7) === 4 : true;
    assert.is(isValidState(s, 'linux-5.8'), valid58, `state ${s}`);
    assert.is(isErrorState(s), (s & 7) === 6, `error ${s}`);
  }
  assert.is(STATE_TABLE[6].name, 'ERROR');
  assert.is(isValidState(6, 'draft-2019'), false);
  assert.is(isValidState(3, 'draft-2019'), true);
});

test('state table: read-modify-write keeps bits 3..31', () => {
  assert.is(withStateBits(0xdead_bee9 >>> 0, STATE_BITS.PRE_COPY), 0xdead_beeb >>> 0);
  assert.is(withStateBits(0x8000_0001, STATE_BITS.STOP), 0x8000_0000);
});

test('state table: documented paths and refused arcs', () => {
  assert.equal(statePath('RUNNING', 'PRE_COPY'), ['PRE_COPY']);
  assert.equal(statePath('PRE_COPY', 'STOP'), ['STOP_COPY', 'STOP']);
  assert.equal(statePath('STOP_COPY', 'RESUMING'), ['STOP', 'RESUMING']);
  assert.is(statePath('STOP_COPY', 'PRE_COPY'), null);
  // Every next step of the table is itself one the table lists.
  for (const [from, row] of Object.entries(NEXT_STATE)) {
    for (const [to, next] of Object.entries(row)) {
      if (next === null) continue;
      assert.ok(next in NEXT_STATE, `${from}->${to}`);
      if (from === to) assert.is(next, from);
    }
  }
});

test('profiles: header layouts of the 2019 draft (64 packed) and 5.8 (32)', () => {
  const d = PROFILE_DEFS['draft-2019'];
  const l = PROFILE_DEFS['linux-5.8'];
  assert.is(d.headerSize, 64);
  assert.is(l.headerSize, 32);
  assert.equal([d.regs.start_pfn!.off, d.regs.page_size!.off, d.regs.total_pfns!.off, d.regs.copied_pfns!.off], [32, 40, 48, 56]);
  assert.equal([l.regs.device_state!.off, l.regs.pending_bytes!.off, l.regs.data_offset!.off, l.regs.data_size!.off], [0, 8, 16, 24]);
  assert.is(l.regs.device_state!.width, 4);
  assert.is(l.regs.copied_pfns, undefined);
  assert.is(d.regionType, 2);
  assert.is(l.regionType, 3);
  assert.is(d.resumeOrder, 'size-then-data');
  assert.is(l.resumeOrder, 'data-then-size');
});

test('QEMU stream: exact bytes of setup, empty iterate, end and config sections', () => {
  assert.is(hex(setupSection()), 'ffffffffef100003' + 'ffffffffef100001');
  assert.is(hex(emptyIterateSection()), 'ffffffffef100004' + '0000000000000000' + 'ffffffffef100001');
  assert.is(hex(endTag()), 'ffffffffef100001');
  assert.is(hex(configSection(new Uint8Array([1, 2, 3]))), 'ffffffffef100002' + '0000000000000003' + '010203' + 'ffffffffef100001');
});

function packets(...parts: (bigint | Uint8Array)[]): Uint8Array {
  const chunks = parts.map((p) => {
    if (p instanceof Uint8Array) return p;
    const b = new Uint8Array(8);
    putBe64(b, 0, p);
    return b;
  });
  return new Uint8Array(Buffer.concat(chunks));
}
const limits = { maxData: 1024, maxConfig: 1024 };

test('QEMU stream parser: a full stream parses into sections', () => {
  const st = newParseState();
  const s = packets(FLAG_DEV_SETUP_STATE, FLAG_END_OF_STATE, FLAG_DEV_DATA_STATE, 3n, new Uint8Array([9, 9, 9]), FLAG_END_OF_STATE,
    FLAG_DEV_DATA_STATE, 2n, new Uint8Array([7, 7]), FLAG_END_OF_STATE, FLAG_DEV_CONFIG_STATE, 1n, new Uint8Array([5]), FLAG_END_OF_STATE);
  const ev = parsePackets(st, s, 0, s.length, 1000, limits, 'd');
  assert.equal(ev.map((e) => e.kind), ['setup', 'end', 'data', 'end', 'data', 'end', 'config', 'end']);
  assert.is(st.dataBytes, 5);
  checkStreamEnd(st, 'd', 0);
});

test('QEMU stream parser: malformed input is rejected with the byte offset', () => {
  const base = 5000;
  // Unknown tag at offset 16.
  let s = packets(FLAG_DEV_SETUP_STATE, FLAG_END_OF_STATE, 0x1234n);
  throwsCode(() => parsePackets(newParseState(), s, 0, s.length, base, limits, 'd'), ErrorCode.STREAM_UNKNOWN_TAG, base + 16);
  // A v2 flag is not a v1 tag.
  s = packets(FLAG_DEV_SETUP_STATE, FLAG_END_OF_STATE, 0xffffffffef100005n);
  const e = throwsCode(() => parsePackets(newParseState(), s, 0, s.length, base, limits, 'd'), ErrorCode.STREAM_UNKNOWN_TAG, base + 16);
  assert.match(e.message, /DEV_INIT_DATA_SENT/);
  // Config not followed by END ("end flag incorrect").
  s = packets(FLAG_DEV_SETUP_STATE, FLAG_END_OF_STATE, FLAG_DEV_CONFIG_STATE, 1n, new Uint8Array([1]), FLAG_DEV_DATA_STATE);
  throwsCode(() => parsePackets(newParseState(), s, 0, s.length, base, limits, 'd'), ErrorCode.STREAM_BAD_END, base + 33);
  // Setup not followed by END.
  s = packets(FLAG_DEV_SETUP_STATE, FLAG_DEV_DATA_STATE);
  throwsCode(() => parsePackets(newParseState(), s, 0, s.length, base, limits, 'd'), ErrorCode.STREAM_BAD_END, base + 8);
  // Data before setup.
  s = packets(FLAG_DEV_DATA_STATE, 0n);
  throwsCode(() => parsePackets(newParseState(), s, 0, s.length, base, limits, 'd'), ErrorCode.STREAM_BAD_RECORD, base);
  // Data size larger than the destination can take: refused before anything is read or allocated.
  s = packets(FLAG_DEV_SETUP_STATE, FLAG_END_OF_STATE, FLAG_DEV_DATA_STATE, 0xffff_ffff_ffffn);
  throwsCode(() => parsePackets(newParseState(), s, 0, s.length, base, limits, 'd'), ErrorCode.STREAM_TOO_LARGE, base + 24);
  // Data size beyond the record: truncated.
  s = packets(FLAG_DEV_SETUP_STATE, FLAG_END_OF_STATE, FLAG_DEV_DATA_STATE, 100n, new Uint8Array(10));
  throwsCode(() => parsePackets(newParseState(), s, 0, s.length, base, limits, 'd'), ErrorCode.STREAM_TRUNCATED, base + 32);
  // Half a tag.
  s = packets(FLAG_DEV_SETUP_STATE).subarray(0, 5);
  throwsCode(() => parsePackets(newParseState(), s, 0, s.length, base, limits, 'd'), ErrorCode.STREAM_TRUNCATED, base);
  // Stream that ends inside a section, or without config.
  const st = newParseState();
  s = packets(FLAG_DEV_SETUP_STATE, FLAG_END_OF_STATE, FLAG_DEV_DATA_STATE, 0n);
  parsePackets(st, s, 0, s.length, 0, limits, 'd');
  throwsCode(() => checkStreamEnd(st, 'd', 77), ErrorCode.STREAM_TRUNCATED, 77);
});

/** A kernel-format vfio_region_info with the given caps. */
function regionInfo(opts: { size: number; offset: number; caps: Uint8Array[]; index?: number }): Uint8Array {
  const total = 32 + opts.caps.reduce((a, c) => a + c.length, 0);
  const b = new Uint8Array(total);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, total, true);
  dv.setUint32(4, 0xf, true);
  dv.setUint32(8, opts.index ?? 9, true);
  dv.setUint32(12, opts.caps.length ? 32 : 0, true);
  dv.setBigUint64(16, BigInt(opts.size), true);
  dv.setBigUint64(24, BigInt(opts.offset), true);
  let off = 32;
  opts.caps.forEach((c, i) => {
    b.set(c, off);
    const next = i + 1 < opts.caps.length ? off + c.length : 0;
    dv.setUint32(off + 4, next, true);
    off += c.length;
  });
  return b;
}
function capType(type: number, subtype: number): Uint8Array {
  const b = new Uint8Array(16);
  const dv = new DataView(b.buffer);
  dv.setUint16(0, 2, true); dv.setUint16(2, 1, true); dv.setUint32(8, type, true); dv.setUint32(12, subtype, true);
  return b;
}
function capSparse(areas: [number, number][]): Uint8Array {
  const b = new Uint8Array(16 + areas.length * 16);
  const dv = new DataView(b.buffer);
  dv.setUint16(0, 1, true); dv.setUint16(2, 1, true); dv.setUint32(8, areas.length, true);
  areas.forEach(([o, s], i) => { dv.setBigUint64(16 + i * 16, BigInt(o), true); dv.setBigUint64(24 + i * 16, BigInt(s), true); });
  return b;
}

test('region info: capability chain with type and sparse mmap areas', () => {
  const info = parseRegionInfo(regionInfo({ size: 0x201000, offset: 9 * 2 ** 40, caps: [capType(3, 1), capSparse([[0x1000, 0x200000]])] }), 'd');
  assert.equal(info.type, { type: 3, subtype: 1 });
  assert.equal(info.sparse, [{ offset: 0x1000, size: 0x200000 }]);
  assert.is(info.offset, 9 * 2 ** 40);
  // findRegionByType walks only device-specific indexes (>= 9).
  const found = findRegionByType(10, (i) => (i === 9 ? regionInfo({ size: 8192, offset: 0, caps: [capType(2, 1)] }) : regionInfo({ size: 0, offset: 0, caps: [] })), 2, 1, 'd');
  assert.is(found?.size, 8192);
  assert.is(findRegionByType(10, () => regionInfo({ size: 0, offset: 0, caps: [] }), 3, 1, 'd'), undefined);
});

test('region info: hostile buffers are rejected, never read out of bounds', () => {
  throwsCode(() => parseRegionInfo(new Uint8Array(10), 'd'), ErrorCode.BAD_REGION_INFO);
  // cap_offset past the buffer
  const b1 = regionInfo({ size: 4096, offset: 0, caps: [capType(3, 1)] });
  new DataView(b1.buffer).setUint32(12, 4000, true);
  throwsCode(() => parseRegionInfo(b1, 'd'), ErrorCode.BAD_REGION_INFO);
  // a loop in the chain
  const b2 = regionInfo({ size: 4096, offset: 0, caps: [capType(3, 1), capType(3, 1)] });
  new DataView(b2.buffer).setUint32(48 + 4, 32, true);
  throwsCode(() => parseRegionInfo(b2, 'd'), ErrorCode.BAD_REGION_INFO);
  // sparse area count larger than the buffer
  const b3 = regionInfo({ size: 4096, offset: 0, caps: [capSparse([[0, 4096]])] });
  new DataView(b3.buffer).setUint32(32 + 8, 1_000_000, true);
  throwsCode(() => parseRegionInfo(b3, 'd'), ErrorCode.BAD_REGION_INFO);
  // sparse area beyond the region
  throwsCode(() => parseRegionInfo(regionInfo({ size: 4096, offset: 0, caps: [capSparse([[0, 8192]])] }), 'd'), ErrorCode.BAD_REGION_INFO);
  // overlapping areas
  throwsCode(() => parseRegionInfo(regionInfo({ size: 1 << 20, offset: 0, caps: [capSparse([[0, 8192], [4096, 4096]])] }), 'd'), ErrorCode.BAD_REGION_INFO);
});

test('config blob: round trip and every corruption detected', () => {
  const space = new Uint8Array(256).map((_, i) => i * 7);
  const blob = encodeConfigBlob(space);
  assert.equal(decodeConfigBlob(blob, 'd', 0), { bytes: space, flags: 0 });
  for (const at of [0, 4, 8, 100, blob.length - 1]) {
    const bad = blob.slice();
    bad[at] ^= 0x40;
    throwsCode(() => decodeConfigBlob(bad, 'd', 1000), ErrorCode.STREAM_BAD_RECORD);
  }
  throwsCode(() => decodeConfigBlob(blob.subarray(0, 10), 'd', 0), ErrorCode.STREAM_BAD_RECORD);
});

test('errors carry device and offset in the message', () => {
  const e = new MigError(ErrorCode.STREAM_TRUNCATED, 'x', { device: 'emu3', offset: 42 });
  assert.is(e.message, 'emu3: offset 42: x');
  assert.is(e.toJSON().code, 'VFM_STREAM_TRUNCATED');
  void FLAG_DEV_CONFIG_STATE;
  void FLAG_DEV_DATA_STATE;
});

test('kernel VFIO path: the type1 dirty-pages ioctl really runs (and fails) on a non-VFIO fd; bad arguments never reach it', async () => {
  const fs = await import('node:fs');
  const { native } = await import('../src/addon/native.js');
  const fd = fs.openSync('/dev/null', 'r');
  try {
    try { native().vfioDirtyPages(fd, 4, 0, 1 << 20, 4096, new Uint8Array(4)); assert.unreachable('bitmap too small'); } catch (e) {
      assert.is((e as { code?: string }).code, 'ERR_ARG');
    }
    try { native().vfioDirtyPages(fd, 3, 0, 0, 0); assert.unreachable('two flags'); } catch (e) { assert.is((e as { code?: string }).code, 'ERR_ARG'); }
    try { native().vfioDirtyPages(fd, 1, 0, 0, 0); assert.unreachable('ioctl on /dev/null'); } catch (e) {
      assert.ok([25, 22].includes((e as { errno?: number }).errno ?? 0), String(e)); // ENOTTY (or EINVAL)
    }
    try { native().vfioDirtyPages(fd, 4, 0, 1 << 20, 4096, new Uint8Array(32)); assert.unreachable('ioctl on /dev/null'); } catch (e) {
      assert.ok([25, 22].includes((e as { errno?: number }).errno ?? 0), String(e));
    }
  } finally {
    fs.closeSync(fd);
  }
});

test('the TypeScript protocol tables agree with <linux/vfio.h> as compiled into the addon', async () => {
  const { native } = await import('../src/addon/native.js');
  const L = native().uapiLayout();
  const l = PROFILE_DEFS['linux-5.8'];
  const d = PROFILE_DEFS['draft-2019'];
  assert.is(l.headerSize, L.migInfoSize);
  assert.equal([l.regs.device_state!.off, l.regs.reserved!.off, l.regs.pending_bytes!.off, l.regs.data_offset!.off, l.regs.data_size!.off],
    [L.migInfoDeviceState, L.migInfoReserved, L.migInfoPendingBytes, L.migInfoDataOffset, L.migInfoDataSize]);
  assert.is(d.headerSize, L.draftInfoSize);
  assert.equal([d.regs.start_pfn!.off, d.regs.page_size!.off, d.regs.total_pfns!.off, d.regs.copied_pfns!.off],
    [L.draftStartPfn, L.draftPageSize, L.draftTotalPfns, L.draftCopiedPfns]);
  assert.is(l.regionType, L.regionTypeMigration);
  assert.equal([STATE_BITS.RUNNING, STATE_BITS.STOP_COPY, STATE_BITS.RESUMING], [L.deviceStateRunning, L.deviceStateSaving, L.deviceStateResuming]);
  assert.is(L.ioctlGetRegionInfo, 0x3b6c);
  assert.is(L.ioctlIommuDirtyPages, 0x3b75);
});

// The 2019 drafts' region type is not in any header this addon compiles against: its independent source is the
// drafts' own text (vfio-facts §1.1: "#define VFIO_REGION_TYPE_MIGRATION (2)" in the v4 and v5 patches of June/July
// 2019; the v8 draft of August 2019 moved it to 3, the value that was merged). Subtype 1 in both.
const DRAFT_V4_V5_REGION_TYPE = 2;
const DRAFT_REGION_SUBTYPE = 1;

/** type/subtype of the VFIO_REGION_INFO_CAP_TYPE capability in raw vfio_region_info bytes, walked by the uAPI layout. */
function readCapType(b: Uint8Array, L: Record<string, number>): { type: number; subtype: number } | undefined {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (!(dv.getUint32(L.regionInfoFlags, true) & L.regionFlagCaps)) return undefined;
  for (let at = dv.getUint32(L.regionInfoCapOffset, true), hops = 0; at && hops < 16; hops++) {
    if (dv.getUint16(at, true) === L.capIdType) return { type: dv.getUint32(at + L.capHeaderSize, true), subtype: dv.getUint32(at + L.capHeaderSize + 4, true) };
    at = dv.getUint32(at + 4, true);
  }
  return undefined;
}

test('region types: the draft-2019 profile uses the drafts\' type 2, linux-5.8 the uAPI\'s, and the emulated devices advertise them', async () => {
  const { native } = await import('../src/addon/native.js');
  const { EmulatedTransport } = await import('../src/main/transport/emulated.js');
  const L = native().uapiLayout();
  assert.is(PROFILE_DEFS['draft-2019'].regionType, DRAFT_V4_V5_REGION_TYPE);
  assert.is(PROFILE_DEFS['draft-2019'].regionSubtype, DRAFT_REGION_SUBTYPE);
  assert.is(PROFILE_DEFS['linux-5.8'].regionSubtype, L.regionSubtypeMigration);
  // The merged value is not the drafts' one: a draft device is never taken for a 5.8 one, or the other way round.
  assert.is.not(L.regionTypeMigration, DRAFT_V4_V5_REGION_TYPE);
  // What the emulated vendor devices put in their VFIO_DEVICE_GET_REGION_INFO capability chain, read back raw.
  for (const [profile, type, subtype] of [['draft-2019', DRAFT_V4_V5_REGION_TYPE, DRAFT_REGION_SUBTYPE], ['linux-5.8', L.regionTypeMigration, L.regionSubtypeMigration]] as const) {
    const t = EmulatedTransport.create({ name: `rt-${profile}`, profile, stateSize: 1 << 16, dirtyRate: 0, dmaRate: 0 });
    try {
      const n = native().emuDeviceInfo(t.device.id).numRegions;
      const found = Array.from({ length: n }, (_, i) => readCapType(native().emuRegionInfo(t.device.id, i), L)).filter((x) => x);
      assert.equal(found, [{ type, subtype }], profile);
      assert.is(t.openRegion().size > 0, true); // and the engine's discovery finds it by the profile's type
    } finally {
      t.destroy();
    }
  }
});

test('the package entry point resolves by name and exports the typed API', async () => {
  const pkg = 'vfio-mig'; // a variable, so tsc does not need dist/ while it compiles this file on a fresh clone
  const m = (await import(pkg)) as Record<string, unknown>;
  for (const name of ['runEmulated', 'saveDevices', 'loadStream', 'EnginePool', 'Migration', 'MigError', 'EmulatedTransport', 'VfioKernelTransport']) {
    assert.type(m[name], 'function', name);
  }
});

test.run();
