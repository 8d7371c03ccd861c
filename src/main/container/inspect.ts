// Walk a container like QEMU's analyze-migration: records, devices, and each device's QEMU packets. Also extracts
// one device's exact QEMU byte stream. Every CHUNK is checksum-verified and checked for sequence continuity.
import fs from 'node:fs';
import { ErrorCode, MigError } from '../errors.js';
import { newParseState, parsePackets, tagName, getBe64, checkStreamEnd, type QemuParseState } from '../protocol/qemu-stream.js';
import { ContainerReader, type RecordRef } from './reader.js';
import { RECORD_HEADER_SIZE, REC_ABORT, REC_CHUNK, REC_END, REC_DEVICE_TABLE, type AbortRecord, type DeviceTable, type EndRecord } from './format.js';

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
export interface InspectResult {
  file: string;
  size: number;
  table: DeviceTable;
  devices: DeviceInspect[];
  records: Record<string, number>;
  end?: EndRecord;
  abort?: AbortRecord;
}

async function walk(path: string, onChunk: (r: RecordRef, body: Uint8Array) => void | Promise<void>) {
  const reader = ContainerReader.open(path);
  try {
    const table = await reader.readPreamble();
    const seq = table.devices.map(() => 0n);
    const off = table.devices.map(() => 0n);
    const counts: Record<string, number> = { DEVICE_TABLE: 1, CHUNK: 0, END: 0, ABORT: 0 };
    let end: EndRecord | undefined;
    let abort: AbortRecord | undefined;
    let buf = new Uint8Array(0);
    for (;;) {
      const r = await reader.next();
      if (!r) break;
      if (end || abort) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'records after END/ABORT', { offset: r.at });
      if (r.h.type === REC_CHUNK) {
        counts.CHUNK++;
        const d = r.h.device;
        if (d >= table.devices.length) throw new MigError(ErrorCode.STREAM_BAD_RECORD, `CHUNK for unknown device ${d}`, { offset: r.at + 8 });
        if (r.h.seq !== seq[d] || r.h.streamOffset !== off[d]) {
          throw new MigError(ErrorCode.STREAM_BAD_RECORD, `CHUNK seq ${r.h.seq}/offset ${r.h.streamOffset}, expected ${seq[d]}/${off[d]}`,
            { offset: r.at, device: table.devices[d].name });
        }
        // Never allocate more than the file can still hold.
        if (r.h.length > reader.size - reader.offset) {
          throw new MigError(ErrorCode.STREAM_TRUNCATED, `CHUNK claims ${r.h.length} bytes, the file has ${reader.size - reader.offset} left`,
            { offset: reader.size });
        }
        if (buf.length < r.h.length) buf = new Uint8Array(r.h.length);
        const body = await reader.body(r, buf, 0, table.devices[d].name);
        seq[d]++;
        off[d] += BigInt(r.h.length);
        await onChunk(r, body);
      } else if (r.h.type === REC_END) {
        counts.END++;
        end = await reader.metaBody<EndRecord>(r);
      } else if (r.h.type === REC_ABORT) {
        counts.ABORT++;
        abort = await reader.metaBody<AbortRecord>(r);
      } else if (r.h.type === REC_DEVICE_TABLE) {
        throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'a second DEVICE_TABLE', { offset: r.at });
      }
    }
    return { table, counts, end, abort, size: reader.size };
  } finally {
    reader.close();
  }
}

export async function inspectContainer(path: string, withPackets = false): Promise<InspectResult> {
  const states = new Map<number, QemuParseState>();
  const devs = new Map<number, DeviceInspect>();
  let tableRef: DeviceTable | undefined;
  const res = await walk(path, (r, body) => {
    const d = r.h.device;
    let st = states.get(d);
    if (!st) { st = newParseState(); states.set(d, st); }
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
  return { file: path, size: res.size, table: tableRef, devices, records: res.counts, end: res.end, abort: res.abort };
}

/** Write device `index`'s exact QEMU byte stream to `out`. Returns bytes written. */
export async function extractDevice(path: string, index: number, out: string): Promise<number> {
  // Check the index against the device table before creating (or truncating) the output.
  const pre = ContainerReader.open(path);
  try {
    const t = await pre.readPreamble();
    if (index >= t.devices.length) throw new MigError(ErrorCode.BAD_ARGUMENT, `--device ${index}: the stream has ${t.devices.length} device(s)`);
  } finally {
    pre.close();
  }
  const fd = fs.openSync(out, 'w');
  let n = 0;
  try {
    const res = await walk(path, (r, body) => {
      if (r.h.device !== index) return;
      fs.writeSync(fd, body);
      n += body.length;
    });
    if (index >= res.table.devices.length) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `--device ${index}: the stream has ${res.table.devices.length} device(s)`);
    }
  } finally {
    fs.closeSync(fd);
  }
  return n;
}
