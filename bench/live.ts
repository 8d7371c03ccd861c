// k. Live migration (issue 10 §6): 4 emulated devices x 256 MiB from this process to a destination process (forked:
// bench/live-peer.ts, its own engine pool, as on another host) over loopback TCP. End-to-end downtime (first source
// device stopped -> every destination device loaded, one clock, the return trip included) and total time, for
// N channels against the issue's baseline — 1 channel with the devices' stop-and-copy saved one after another
// (stopCopyOrder 'sequential', QEMU's legacy save order) — and against the stricter 1 channel with all devices in
// parallel, against the file path (send to file: + load in the destination process), and mutual TLS against plain TCP. Every configuration runs once per repeat, in turn, so the ratios pair runs made
// moments apart (this machine's speed drifts).
//
// Scenario: each device runs the emulated workload (dirtying state pages and DMA) until it stops, with pre-copy off
// (max rounds 0): the whole 256 MiB of every device is stop-and-copy data, so downtime is the time to move 1 GiB of
// device state with the devices stopped, which is what parallel channels are for (QEMU 10's multifd device state).
// The first run of each configuration is a warm-up that also verifies every destination's digest; timed runs skip
// the digests (their CPU would compete with the transfer being timed).
import { performance as perf } from 'node:perf_hooks';
import { fork, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { send } from '../src/main/live/sender.js';
import type { EnginePool } from '../src/main/engine/pool.js';
import type { StopCopyOrder } from '../src/main/engine/migration.js';
import { makePki, opensslAvailable } from '../test/tls-pki.js';
import type { PeerRequest } from './live-peer.js';

const MiB = 1 << 20;

export interface LiveRun { receiveWorkers?: number; srcCpuMs?: number; dstCpuMs?: number; srcElu?: number; dstElu?: number; downtimeMs: number; totalMs: number; verified: boolean; destinationDowntimeMs?: number; stopCopyMs?: number }
export interface LiveConfig { name: string; channels: number; tls?: boolean; file?: boolean; order?: StopCopyOrder }

/** The destination process: one request at a time. */
class Peer {
  private child: ChildProcess;
  private waiters: ((m: Record<string, unknown>) => void)[] = [];
  readonly ready: Promise<unknown>;
  constructor(threads: number) {
    this.child = fork(fileURLToPath(new URL('./live-peer.js', import.meta.url)), [], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'], execArgv: process.env.VFM_BENCH_PEER_ARGS?.split(' ') ?? [], env: { ...process.env, VFM_BENCH_PEER_THREADS: String(threads) },
    });
    this.child.on('message', (m: Record<string, unknown>) => this.waiters.shift()?.(m));
    this.child.on('exit', (code) => { for (const w of this.waiters.splice(0)) w({ error: `destination process exited (${code})` }); });
    this.ready = this.next();
  }
  next(): Promise<Record<string, unknown>> { return new Promise((r) => this.waiters.push(r)); }
  ask(m: PeerRequest): void { this.child.send(m); }
  async close(): Promise<void> {
    const gone = new Promise((r) => this.child.once('exit', r));
    this.ask({ op: 'exit' });
    await gone;
  }
}

export interface LiveBenchOptions {
  pool: EnginePool;
  dir: string;
  quick: boolean;
  /** Channels of the multi-channel rows (default 4). */
  channels?: number;
  perDevice?: number;
  /** Only these configurations (tcp-1-seq, tcp-1, tcp-N, file, tls-1, tls-N): for measuring one of them. */
  only?: string[];
  repeats?: number;
  row: (what: string, value: string, baseline: string, ratio: string, target: string) => void;
  log: (s: string) => void;
}

export async function benchLive(o: LiveBenchOptions) {
  const N = o.channels ?? 4;
  const per = o.perDevice ?? (o.quick ? 64 : 256) * MiB;
  const repeats = o.repeats ?? (o.quick ? 2 : 3);
  o.log(`k. live: 4 devices x ${per / MiB} MiB over loopback TCP, ${N} channels vs 1 (sequential and parallel stop-and-copy), file path, mutual TLS`);
  const ds = Array.from({ length: 4 }, (_, i) => EmulatedTransport.create({
    name: `live${i}`, profile: 'linux-5.8', stateSize: per, maxChunk: MiB, seed: 100 + i, dataMode: 'mmap', offsetPolicy: 'fixed',
    dirtyRate: 2000, dmaRate: 1000, guestPages: 4096,
  }));
  const peer = new Peer(o.pool.threads);
  await peer.ready;
  const tls = opensslAvailable() ? makePki() : undefined;
  const file = path.join(o.dir, 'live-file.vfmig');
  let configs: LiveConfig[] = [
    { name: 'tcp-1-seq', channels: 1, order: 'sequential' }, { name: 'tcp-1', channels: 1 }, { name: `tcp-${N}`, channels: N }, { name: 'file', channels: 1, file: true },
    ...(tls ? [{ name: 'tls-1', channels: 1, tls: true }, { name: `tls-${N}`, channels: N, tls: true }] : []),
  ];
  if (o.only) configs = configs.filter((c) => o.only!.includes(c.name));
  const once = async (c: LiveConfig, verify: boolean): Promise<LiveRun> => {
    for (const d of ds) d.device.reset(); // RUNNING again, a fresh save session: the whole state to send
    const common = { pool: o.pool, maxRounds: 0, digests: verify, dirtyQueryIntervalMs: 0, timeoutMs: 30_000, stopCopyOrder: c.order };
    if (c.file) {
      fs.rmSync(file, { force: true });
      let tStop = 0;
      const tx = await send(ds, { ...common, to: `file:${file}`, onEvent: (e) => { if (e.type === 'switchover') tStop = performance.now(); } });
      const t0 = performance.now() - tx.totalMs;
      peer.ask({ op: 'load', file, verify });
      const m = await peer.next();
      if (m.error) throw new Error(`file load: ${m.error}`);
      const end = performance.now();
      const rep = m.report as { ok: boolean; verified: boolean };
      fs.rmSync(file, { force: true });
      return { downtimeMs: end - tStop, totalMs: end - t0, verified: rep.verified, stopCopyMs: tx.save?.stopCopyMs };
    }
    peer.ask({ op: 'receive', tlsDir: c.tls ? tls!.server : undefined, verify });
    const a = await peer.next();
    if (a.error) throw new Error(`receive: ${a.error}`);
    const c0 = process.cpuUsage();
    const e0 = perf.eventLoopUtilization();
    const txP = send(ds, { ...common, to: String(a.address), channels: c.channels, tlsDir: c.tls ? tls!.client : undefined }).catch((e: Error) => e);
    const m = await peer.next();
    const tx = await txP;
    const cpu = process.cpuUsage(c0);
    const elu = perf.eventLoopUtilization(e0);
    if (tx instanceof Error) throw tx;
    if (m.error) throw new Error(`receive: ${m.error}`);
    const rep = m.report as { verified: boolean; destinationDowntimeMs?: number; cpuMs: number; elu: number; receiveWorkers?: number };
    return { receiveWorkers: rep.receiveWorkers, srcCpuMs: (cpu.user + cpu.system) / 1000, srcElu: elu.utilization, dstCpuMs: rep.cpuMs, dstElu: rep.elu, downtimeMs: tx.downtimeMs!, totalMs: tx.totalMs, verified: rep.verified, destinationDowntimeMs: rep.destinationDowntimeMs, stopCopyMs: tx.save?.stopCopyMs };
  };
  const runs: Record<string, LiveRun[]> = {};
  const warm: Record<string, boolean> = {};
  try {
    for (const c of configs) {
      const w = await once(c, true); // warm-up, verified
      warm[c.name] = w.verified;
      if (!w.verified) throw new Error(`live bench ${c.name}: a destination did not verify`);
      runs[c.name] = [];
    }
    for (let i = 0; i < repeats; i++) {
      for (const c of configs) {
        const r = await once(c, false);
        runs[c.name].push(r);
        o.log(`  ${c.name}: downtime ${r.downtimeMs.toFixed(0)} ms, total ${r.totalMs.toFixed(0)} ms, source stop-and-copy ${r.stopCopyMs?.toFixed(0)} ms`
          + (r.destinationDowntimeMs !== undefined ? `, destination part ${r.destinationDowntimeMs.toFixed(0)} ms` : '')
          + (r.srcCpuMs !== undefined ? `; cpu src ${r.srcCpuMs.toFixed(0)} ms (main ${(r.srcElu! * 100).toFixed(0)}%), dst ${r.dstCpuMs!.toFixed(0)} ms (main ${(r.dstElu! * 100).toFixed(0)}%)` : ''));
      }
    }
  } finally {
    await peer.close();
    for (const d of ds) d.destroy();
    if (tls) fs.rmSync(tls.root, { recursive: true, force: true });
  }
  const med = (xs: number[]) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
  const ratio = (a: string, b: string, k: 'downtimeMs' | 'totalMs') => {
    const rs = runs[a].map((r, i) => r[k] / runs[b][i][k]);
    return { median: med(rs), min: Math.min(...rs), max: Math.max(...rs) };
  };
  const fmt = (r: { median: number; min: number; max: number }) => `${r.median.toFixed(2)} (${r.min.toFixed(2)}-${r.max.toFixed(2)})`;
  const ms = (name: string, k: 'downtimeMs' | 'totalMs') => `${med(runs[name].map((r) => r[k])).toFixed(0)} ms`;
  const gib = (4 * per) / 2 ** 30;
  const pairs: [string, string, string, string][] = [
    [`tcp-${N}`, 'tcp-1-seq', `live TCP, ${N} channels vs 1 channel sequential (QEMU's legacy save order, the issue's baseline)`, '<= 0.55'],
    [`tcp-${N}`, 'tcp-1', `live TCP, ${N} channels vs 1 channel parallel (stricter baseline)`, ''],
    ['tcp-1', 'tcp-1-seq', 'live TCP 1 channel: parallel vs sequential stop-and-copy', ''],
    ['file', 'tcp-1', 'file path (save to file + load) vs live TCP 1 channel', ''],
    ...(tls ? [['tls-1', 'tcp-1', 'mutual TLS vs plain TCP, 1 channel', ''], [`tls-${N}`, `tcp-${N}`, `mutual TLS vs plain TCP, ${N} channels`, '']] as [string, string, string, string][] : []),
  ];
  const out: Record<string, unknown> = { scenario: { devices: 4, perDeviceBytes: per, maxRounds: 0, channels: N }, warmupVerified: warm, runs, ratios: {} };
  for (const [a, b, what, target] of pairs.filter(([x, y]) => runs[x] && runs[y])) {
    const dt = ratio(a, b, 'downtimeMs');
    const tt = ratio(a, b, 'totalMs');
    (out.ratios as Record<string, unknown>)[`${a}/${b}`] = { downtime: dt, total: tt };
    o.row(`${what}: downtime (4 x ${per / MiB} MiB, ${gib} GiB stop-and-copy)`, ms(a, 'downtimeMs'), `${ms(b, 'downtimeMs')} (${b})`, fmt(dt), target);
    o.row(`${what}: total time`, ms(a, 'totalMs'), `${ms(b, 'totalMs')} (${b})`, fmt(tt), '');
  }
  // Where the time goes: CPU of each process over the run (both sides share this machine's cores) and how busy each
  // main thread was (event-loop utilisation: the socket reads and writes, TLS, framing and hand-off run there).
  for (const c of configs.filter((x) => !x.file)) {
    const rs = runs[c.name];
    const m = (f: (r: LiveRun) => number) => med(rs.map(f));
    o.row(`${c.name}: CPU source / destination, main threads busy`, `${m((r) => r.srcCpuMs!).toFixed(0)} / ${m((r) => r.dstCpuMs!).toFixed(0)} ms CPU`,
      `${m((r) => r.downtimeMs).toFixed(0)} ms downtime`, `main ${(m((r) => r.srcElu!) * 100).toFixed(0)}% / ${(m((r) => r.dstElu!) * 100).toFixed(0)}%`
        + `, ${rs[0]?.receiveWorkers ?? 0} receive workers`, 'diagnostic');
  }
  if (!tls) o.row('mutual TLS rows', 'skipped: no openssl CLI to make certificates', '', '', '');
  return out;
}
