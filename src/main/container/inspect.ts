// Walk a container like QEMU's analyze-migration: records, devices, and each device's QEMU packets. Also extracts
// one device's exact QEMU byte stream. Every CHUNK is checksum-verified and checked for sequence continuity.
import { OutputFile } from './output.js';
import { FileSink } from './sink.js';
import { checkPath } from '../options.js';
import { ErrorCode, MigError, normalised } from '../errors.js';
import { newParseState, parsePackets, tagName, getBe64, checkStreamEnd, type QemuParseState } from '../protocol/qemu-stream.js';
import { ContainerReader, type RecordRef } from './reader.js';
import {
  RECORD_HEADER_SIZE, RECORD_NAMES, REC_ABORT, REC_CHUNK, REC_END, REC_DEVICE_TABLE, validateAbort, validateEnd, type AbortRecord,
  type DeviceTable, type EndRecord,
} from './format.js';

export interface PacketInfo { offset: number; tag: string; size?: number }
export interface DeviceInspect {
  index: number;
  name: string;
  profile: string;
  records: number;
  streamBytes: number;
  sections: number;
  dataPackets: number;
  dataBytes: number;
  emptyDataPackets: number;
  config: boolean;
  packets?: PacketInfo[];
  complete: boolean;
}
/**
 * How the file ends. complete: an END record; aborted: an ABORT record (the source failed or was cancelled);
 * incomplete: the records stop cleanly with neither (the save never finished); interrupted: the last record is torn
 * (cut short, or a hole of zeros a writer reserved and never filled) at `interruptedAt`.
 */
export type StreamStatus = 'complete' | 'aborted' | 'incomplete' | 'interrupted';

export interface InspectResult {
  file: string;
  status: StreamStatus;
  /** interrupted: file offset of the torn record. */
  interruptedAt?: number;
  size: number;
  table: DeviceTable;
  devices: DeviceInspect[];
  records: Record<string, number>;
  end?: EndRecord;
  abort?: AbortRecord;
}

/** A save cut short (torn record or unwritten hole at the tail): walking stops there. */
class Torn extends Error {
  constructor(readonly at: number, readonly why: string) { super(why); }
}

export async function walk(path: string, onChunk: (r: RecordRef, body: Uint8Array) => void | Promise<void>) {
  const reader = ContainerReader.open(path);
  try {
    const table = await reader.readPreamble();
    const seq = table.devices.map(() => 0n);
    const off = table.devices.map(() => 0n);
    const counts: Record<string, number> = { DEVICE_TABLE: 1, CHUNK: 0, END: 0, ABORT: 0 };
    let end: EndRecord | undefined;
    let abort: AbortRecord | undefined;
    let torn: Torn | undefined;
    let buf = new Uint8Array(0);
    for (;;) {
      let r: RecordRef | null;
      try {
        r = await nextRecord(reader);
      } catch (e) {
        if (!(e instanceof Torn)) throw e;
        torn = e;
        break;
      }
      if (!r) break;
      if (end || abort) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'records after END/ABORT', { offset: r.at });
      // A body that runs past the end of the file: the save stopped while writing this record.
      if (r.h.length > reader.size - reader.offset) {
        torn = new Torn(r.at, `${RECORD_NAMES[r.h.type]} record of ${r.h.length} bytes, the file ends after ${reader.size - reader.offset}`);
        break;
      }
      if (r.h.type === REC_CHUNK) {
        counts.CHUNK++;
        const d = r.h.device;
        if (d >= table.devices.length) throw new MigError(ErrorCode.STREAM_BAD_RECORD, `CHUNK for unknown device ${d}`, { offset: r.at + 8 });
        if (r.h.seq !== seq[d] || r.h.streamOffset !== off[d]) {
          throw new MigError(ErrorCode.STREAM_BAD_RECORD, `CHUNK seq ${r.h.seq}/offset ${r.h.streamOffset}, expected ${seq[d]}/${off[d]}`,
            { offset: r.at, device: table.devices[d].name });
        }
        // Never allocate more than the file can still hold (checked above).
        if (buf.length < r.h.length) buf = new Uint8Array(r.h.length);
        const body = await reader.body(r, buf, 0, table.devices[d].name);
        seq[d]++;
        off[d] += BigInt(r.h.length);
        await onChunk(r, body);
      } else if (r.h.type === REC_END) {
        counts.END++;
        end = validateEnd(await reader.metaBody<EndRecord>(r), table, r.at + RECORD_HEADER_SIZE);
      } else if (r.h.type === REC_ABORT) {
        counts.ABORT++;
        abort = validateAbort(await reader.metaBody<AbortRecord>(r), r.at + RECORD_HEADER_SIZE);
      } else if (r.h.type === REC_DEVICE_TABLE) {
        throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'a second DEVICE_TABLE', { offset: r.at });
      }
    }
    const status: StreamStatus = torn ? 'interrupted' : end ? 'complete' : abort ? 'aborted' : 'incomplete';
    return { table, counts, end, abort, size: reader.size, status, torn };
  } finally {
    reader.close();
  }
}

/** The next record header; a header cut by the end of the file, or never written (all zeros), is a torn tail. */
async function nextRecord(reader: ContainerReader): Promise<RecordRef | null> {
  const at = reader.offset;
  const left = reader.size - at;
  if (left > 0 && left < RECORD_HEADER_SIZE) throw new Torn(at, `a record header cut after ${left} bytes`);
  try {
    return await reader.next();
  } catch (e) {
    if (e instanceof MigError && e.code === ErrorCode.STREAM_BAD_RECORD && reader.isZero(at, RECORD_HEADER_SIZE)) {
      throw new Torn(at, 'a record header that was reserved but never written (zeros)');
    }
    throw e;
  }
}

/** Indexes of the v2 devices (their QEMU stream has v2 tags); empty if the preamble is unreadable (walk says why). */
async function v2Devices(path: string): Promise<Set<number>> {
  const pre = ContainerReader.open(path);
  try {
    return new Set((await pre.readPreamble()).devices.filter((d) => d.profile === 'v2').map((d) => d.index));
  } catch {
    return new Set();
  } finally {
    pre.close();
  }
}

export async function inspectContainer(path: string, withPackets = false): Promise<InspectResult> {
  return normalised(async () => {
    const states = new Map<number, QemuParseState>();
    const devs = new Map<number, DeviceInspect>();
    let tableRef: DeviceTable | undefined;
    const v2 = await v2Devices(path);
    const res = await walk(path, (r, body) => {
      const d = r.h.device;
      let st = states.get(d);
      if (!st) { st = newParseState(v2.has(d)); states.set(d, st); }
      let di = devs.get(d);
      if (!di) {
        di = { index: d, name: String(d), profile: '', records: 0, streamBytes: 0, sections: 0, dataPackets: 0, dataBytes: 0, emptyDataPackets: 0, config: false, complete: false };
        if (withPackets) di.packets = [];
        devs.set(d, di);
      }
      di.records++;
      di.streamBytes += body.length;
      const evs = parsePackets(st, body, 0, body.length, r.at + RECORD_HEADER_SIZE, { maxData: body.length, maxConfig: body.length }, di.name);
      for (const e of evs) {
        if (e.kind === 'data') { if (e.size === 0) di.emptyDataPackets++; }
        di.packets?.push({ offset: e.at, tag: tagName(getBe64(body, e.at - r.at - RECORD_HEADER_SIZE)), size: e.kind === 'data' ? e.size : e.kind === 'config' ? e.len : undefined });
      }
      di.sections = st.sections; di.dataPackets = st.dataPackets; di.dataBytes = st.dataBytes; di.config = st.sawConfig;
    });
    tableRef = res.table;
    const devices = tableRef.devices.map((t) => {
      const di = devs.get(t.index) ?? { index: t.index, name: t.name, profile: t.profile, records: 0, streamBytes: 0, sections: 0, dataPackets: 0, dataBytes: 0, emptyDataPackets: 0, config: false, complete: false };
      di.name = t.name; di.profile = t.profile;
      const st = states.get(t.index);
      try { if (st) { checkStreamEnd(st, t.name, res.size); di.complete = true; } } catch { di.complete = false; }
      return di;
    });
    return {
      file: path, status: res.status, interruptedAt: res.torn?.at, size: res.size, table: tableRef, devices, records: res.counts, end: res.end,
      abort: res.abort,
    };
  });
}

/**
 * Write device `index`'s exact QEMU byte stream to `out` ('-': standard output). The stream must be whole: an
 * incomplete, interrupted or aborted container, or a device stream that does not end properly, is an error and
 * leaves nothing at `out`. Returns bytes written.
 */
export async function extractDevice(path: string, index: number, out: string, o: { force?: boolean; signal?: AbortSignal } = {}): Promise<number> {
  return normalised(async () => {
    checkPath(path, 'stream path');
    checkPath(out, 'output');
    if (!Number.isSafeInteger(index) || index < 0) throw new MigError(ErrorCode.BAD_ARGUMENT, `device index ${String(index)} is invalid`);
    // Check the index against the device table before the output is created.
    const pre = ContainerReader.open(path);
    let name: string;
    let v2 = false;
    try {
      const t = await pre.readPreamble();
      if (index >= t.devices.length) throw new MigError(ErrorCode.BAD_ARGUMENT, `--device ${index}: the stream has ${t.devices.length} device(s)`);
      name = t.devices[index].name;
      v2 = t.devices[index].profile === 'v2';
    } finally {
      pre.close();
    }
    const file = OutputFile.open(out, { force: o.force, inputs: [path] });
    try {
      const sink = FileSink.onOutput(file);
      const st = newParseState(v2);
      let n = 0;
      const res = await walk(path, async (r, body) => {
        if (o.signal?.aborted) throw new MigError(ErrorCode.CANCELLED, 'extract cancelled', { offset: r.at });
        if (r.h.device !== index) return;
        // Parse as it goes: a device stream that is not well-formed QEMU is refused, not copied.
        parsePackets(st, body, 0, body.length, r.at + RECORD_HEADER_SIZE, { maxData: body.length, maxConfig: body.length }, name);
        await sink.write(body);
        n += body.length;
      });
      await sink.close();
      if (res.status === 'interrupted') {
        throw new MigError(ErrorCode.STREAM_TRUNCATED, `save interrupted at offset ${res.torn!.at}: ${res.torn!.why}`, { offset: res.torn!.at });
      }
      if (res.status === 'aborted') {
        throw new MigError(ErrorCode.STREAM_ABORTED, `the source aborted this stream: ${res.abort!.code}: ${res.abort!.message}`, { device: res.abort!.device });
      }
      if (res.status === 'incomplete') throw new MigError(ErrorCode.STREAM_TRUNCATED, 'incomplete stream: no END record', { offset: res.size });
      checkStreamEnd(st, name, res.size);
      file.commit();
      return n;
    } finally {
      file.discard();
    }
  });
}
