// Small latency recorder (percentiles over all samples; the sample counts here are thousands, not millions).

/** Latency percentiles in ms (reports: dirty-bitmap query latency and lock waits). */
export interface LatencySummary { count: number; p50: number; p99: number; max: number }

export class Histogram {
  private samples: number[] = [];
  record(v: number): void { this.samples.push(v); }
  get count(): number { return this.samples.length; }
  summary(): LatencySummary {
    const s = [...this.samples].sort((a, b) => a - b);
    const at = (p: number) => (s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : 0);
    return { count: s.length, p50: at(50), p99: at(99), max: at(100) };
  }
}
