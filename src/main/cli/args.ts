// Flag value parsers: each failure is a BAD_ARGUMENT naming the flag and the value.
import { ErrorCode, MigError } from '../errors.js';
import { printable } from '../text.js';

const UNITS: Record<string, number> = {
  '': 1, b: 1, k: 1024, kb: 1024, kib: 1024, m: 1 << 20, mb: 1 << 20, mib: 1 << 20, g: 2 ** 30, gb: 2 ** 30, gib: 2 ** 30,
};

export function parseSize(flag: string, v: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(v);
  const unit = m ? UNITS[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `${flag}: '${v}' is not a size (examples: 4096, 512KiB, 64MiB, 1GiB)`);
  }
  const n = Math.round(parseFloat(m[1]) * unit);
  if (!Number.isSafeInteger(n)) throw new MigError(ErrorCode.BAD_ARGUMENT, `${flag}: '${v}' is too large`);
  return n;
}

export function parseIntIn(flag: string, v: string, lo: number, hi: number): number {
  if (!/^\s*-?\d+\s*$/.test(v)) throw new MigError(ErrorCode.BAD_ARGUMENT, `${flag}: '${v}' is not an integer`);
  const n = Number(v);
  if (n < lo || n > hi) throw new MigError(ErrorCode.BAD_ARGUMENT, `${flag}: ${n} is out of range ${lo}..${hi}`);
  return n;
}

export function parseNumberIn(flag: string, v: string, lo: number, hi: number): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n)) throw new MigError(ErrorCode.BAD_ARGUMENT, `${flag}: '${v}' is not a number`);
  if (n < lo || n > hi) throw new MigError(ErrorCode.BAD_ARGUMENT, `${flag}: ${n} is out of range ${lo}..${hi}`);
  return n;
}

export function parseEnum<T extends string>(flag: string, v: string, allowed: readonly T[]): T {
  if (!(allowed as readonly string[]).includes(v)) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `${flag}: '${v}' is not one of ${allowed.join(', ')}`);
  }
  return v as T;
}

export function fmtBytes(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} B`;
}

/** Fixed-width text table; every cell is escaped (names and states may come from a stream or a vendor). */
export function table(head: string[], rows: (string | number)[][]): string {
  const all = [head, ...rows.map((r) => r.map(printable))];
  const w = head.map((_, i) => Math.max(...all.map((r) => r[i].length)));
  return all.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]) : c.padStart(w[i]))).join('  ')).join('\n');
}
