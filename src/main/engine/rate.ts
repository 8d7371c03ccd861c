// Optional bandwidth cap (bytes/s) applied where staged bytes go to the sink: a token bucket with ~50 ms of burst.
export class RateLimiter {
  private tokens: number;
  private last = performance.now();
  constructor(private readonly bytesPerSec: number) {
    this.tokens = bytesPerSec * 0.05;
  }
  async take(n: number): Promise<void> {
    for (;;) {
      const now = performance.now();
      this.tokens = Math.min(this.bytesPerSec * 0.05 + n, this.tokens + ((now - this.last) / 1000) * this.bytesPerSec);
      this.last = now;
      if (this.tokens >= n) { this.tokens -= n; return; }
      await new Promise((r) => setTimeout(r, Math.max(1, ((n - this.tokens) / this.bytesPerSec) * 1000)));
    }
  }
}
