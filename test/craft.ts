// Read a container into records and write it back (re-checksummed), so tests can craft malformed streams that
// pass the checksum and reach the deeper checks.
import fs from 'node:fs';
import { FILE_HEADER_SIZE, RECORD_HEADER_SIZE, writeRecordHeader } from '../src/main/container/format.js';

export interface Rec { type: number; device: number; seq: bigint; offset: bigint; body: Uint8Array; at: number }

export function readRecords(file: string): { header: Uint8Array; recs: Rec[] } {
  const b = new Uint8Array(fs.readFileSync(file));
  const dv = new DataView(b.buffer, b.byteOffset);
  const recs: Rec[] = [];
  let p = FILE_HEADER_SIZE;
  while (p < b.length) {
    const len = dv.getUint32(p + 4, true);
    recs.push({
      type: dv.getUint32(p, true), device: dv.getUint32(p + 8, true), seq: dv.getBigUint64(p + 16, true),
      offset: dv.getBigUint64(p + 24, true), body: b.slice(p + RECORD_HEADER_SIZE, p + RECORD_HEADER_SIZE + len), at: p,
    });
    p += RECORD_HEADER_SIZE + len;
  }
  return { header: b.slice(0, FILE_HEADER_SIZE), recs };
}

export function writeRecords(file: string, header: Uint8Array, recs: Rec[]): void {
  const parts: Uint8Array[] = [header];
  for (const r of recs) {
    const h = new Uint8Array(RECORD_HEADER_SIZE);
    writeRecordHeader(h, r.type, r.device, r.seq, r.offset, r.body);
    parts.push(h, r.body);
  }
  fs.writeFileSync(file, Buffer.concat(parts));
}

/** Recompute seq/offset per device so a crafted list stays continuous. */
export function renumber(recs: Rec[]): void {
  const seq = new Map<number, bigint>();
  const off = new Map<number, bigint>();
  for (const r of recs) {
    if (r.type !== 2) continue;
    r.seq = seq.get(r.device) ?? 0n;
    r.offset = off.get(r.device) ?? 0n;
    seq.set(r.device, r.seq + 1n);
    off.set(r.device, r.offset + BigInt(r.body.length));
  }
}
