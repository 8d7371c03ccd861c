// One unit convention for everything a person reads: sizes in binary units (B, KiB, MiB, GiB), rates in the same
// units per second (MiB/s), times in ms (s above 10 s). Machine-readable output carries plain numbers whose field
// names say the unit (`bytes`, `ms`, `bytesPerSecond`).

export function fmtBytes(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${Math.round(n)} B`;
}

export function fmtRate(bytesPerSecond: number): string {
  return `${fmtBytes(bytesPerSecond)}/s`;
}

export function fmtMs(ms: number): string {
  if (!Number.isFinite(ms)) return '-';
  if (ms >= 10_000) return `${(ms / 1000).toFixed(1)} s`;
  return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`;
}

/** A size for help text and defaults: the largest binary unit that divides it (67108864 -> 64MiB). */
export function humanSize(n: number): string {
  for (const [u, m] of [['GiB', 2 ** 30], ['MiB', 2 ** 20], ['KiB', 1024]] as const) if (n >= m && n % m === 0) return `${n / m}${u}`;
  return String(n);
}
