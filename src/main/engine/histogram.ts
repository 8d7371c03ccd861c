// Small latency recorder (percentiles over all samples; the sample counts here are thousands, not millions).
export class Histogram {
  private samples: number[] = [];
  record(v: number): void { this.samples.push(v); }
  get count(): number { return this.samples.length; }
  percentile(p: number): number {
    if (!this.samples.length) return 0;
    const s = [...this.samples].sort((a, b) => a - b);
    return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
  }
  summary() {
    return { count: this.count, p50: this.percentile(50), p99: this.percentile(99), max: this.percentile(100) };
  }
}
