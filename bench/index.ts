// `npm run bench` (`-- --quick` for a one-minute smoke run, `-- --json` for JSON only, `-- --only k` or
// `--only a,g` for some sections: a copy limit, b sequential, d responsiveness, e memory, f scaling, g load,
// h many devices, i vfio-user, j v2, k live). Every figure is a ratio
// against a baseline measured in this same run on this machine: the native copy loop through the same region path,
// or the seed's sequential algorithm implemented natively. Each measurement: 1 warm-up, then N repeats, min / median
// / max reported; ratios use medians.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native } from '../src/addon/native.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { Migration } from '../src/main/engine/migration.js';
import { ContainerWriter } from '../src/main/container/writer.js';
import { FileSink } from '../src/main/container/sink.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import type { EmulatedDeviceOptions } from '../src/main/emulated/device.js';
import type { Loader } from '../src/main/engine/load.js';
import { benchVfioUser } from './vfio-user.js';
import { benchV2 } from './v2.js';
import { benchLive } from './live.js';

const quick = process.argv.includes('--quick');
const jsonOnly = process.argv.includes('--json');
const REPEATS = quick ? 2 : 3;
const onlyAt = process.argv.indexOf('--only');
const sections = onlyAt > 0 ? new Set((process.argv[onlyAt + 1] ?? '').split(',').map((x) => x.trim()).filter(Boolean)) : null;
if (sections && !sections.size) throw new Error('--only needs section letters, e.g. --only k');
/** Is section `s` selected (all are, without --only)? */
const want = (s: string) => !sections || sections.has(s);
const MiB = 1 << 20;
const CHUNK = MiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-bench-'));
const file = path.join(dir, 'stream.vfmig');

interface Stat { min: number; median: number; max: number; samples: number[] }
function stat(xs: number[]): Stat {
  const s = [...xs].sort((a, b) => a - b);
  return { min: s[0], median: s[Math.floor(s.length / 2)], max: s[s.length - 1], samples: xs };
}
async function measure(fn: () => Promise<number> | number, repeats = REPEATS): Promise<Stat> {
  await fn(); // warm-up
  const xs: number[] = [];
  for (let i = 0; i < repeats; i++) xs.push(await fn());
  return stat(xs);
}
/**
 * Baseline and engine alternate, one sample each per repeat, and the ratio is taken per pair: this machine is shared
 * and its speed drifts by tens of percent within a minute, which separate series would turn into fake ratios.
 */
async function measurePair(base: () => Promise<number> | number, eng: () => Promise<number> | number, repeats = REPEATS + 2) {
  await base(); await eng(); // warm-up
  const b: number[] = [];
  const e: number[] = [];
  for (let i = 0; i < repeats; i++) { b.push(await base()); e.push(await eng()); }
  return { base: stat(b), engine: stat(e), ratio: stat(e.map((x, i) => x / b[i])) };
}
const pr = (x: Stat) => `${x.median.toFixed(2)} (${x.min.toFixed(2)}-${x.max.toFixed(2)})`;
function log(s: string): void { if (!jsonOnly) process.stderr.write(s + '\n'); }

const base: EmulatedDeviceOptions = { profile: 'linux-5.8', maxChunk: CHUNK, dataMode: 'mmap', offsetPolicy: 'fixed', dirtyRate: 0, dmaRate: 0, guestPages: 1024 };
function devices(n: number, size: number, o: EmulatedDeviceOptions = {}): EmulatedTransport[] {
  return Array.from({ length: n }, (_, i) => EmulatedTransport.create({ ...base, ...o, name: `b${i}`, stateSize: size, seed: i + 1 }));
}
function destroy(ds: EmulatedTransport[]): void { for (const d of ds) d.destroy(); }
/** VFIO_DEVICE_RESET puts a saved device back to RUNNING with a fresh save session (all pages to send). */
function reset(ds: EmulatedTransport[]): void { for (const d of ds) d.device.reset(); }

/** The seed's algorithm, natively, one thread: GB/s through the region path (pending -> data_offset -> data_size -> copy -> write). */
function baselineOnce(ds: EmulatedTransport[], out: string): { bytes: number; ms: number } {
  reset(ds);
  const hs = ds.map((d) => native().regionOpenEmu(d.device.id));
  const fd = fs.openSync(out, 'w');
  const buf = new Uint8Array(4 * CHUNK);
  try {
    const t0 = performance.now();
    const bytes = native().baselineSequentialSave(hs, 1, buf, fd);
    return { bytes, ms: performance.now() - t0 };
  } finally {
    fs.closeSync(fd);
    for (const h of hs) native().regionClose(h);
  }
}

/** Engine save, stop-and-copy only (maxRounds 0): the whole state moves with devices stopped. */
async function engineSave(pool: EnginePool, ds: EmulatedTransport[], out: string, extra: Record<string, unknown> = {}) {
  reset(ds);
  const r = await saveDevices(ds, out, pool, { maxRounds: 0, digests: false, dirtyQueryIntervalMs: 0, force: true, ...extra });
  return r;
}

const gbps = (bytes: number, ms: number) => bytes / 1e9 / (ms / 1000);

/** CPU time stolen by the hypervisor (/proc/stat): the noise indicator printed with every run. */
function cpuTicks(): { steal: number; total: number } {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  return { steal: f[7] ?? 0, total: f.reduce((a, b) => a + b, 0) };
}

/** `vfio-mig run --devices n --size 8KiB` in a child process; peak VmRSS and thread count sampled every 20 ms. */
async function runProcess(n: number): Promise<{ peakRss: number; threads: number; ms: number; ok: boolean }> {
  const { spawn } = await import('node:child_process');
  const bin = path.join(path.dirname(new URL(import.meta.url).pathname), '../../bin/vfio-mig.js');
  const t0 = performance.now();
  const child = spawn(process.execPath, [bin, 'run', '--devices', String(n), '--size', '8KiB', '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  let peakRss = 0;
  let threads = 0;
  const sample = () => {
    try {
      const st = fs.readFileSync(`/proc/${child.pid}/status`, 'utf8');
      peakRss = Math.max(peakRss, Number(/VmRSS:\s+(\d+)/.exec(st)?.[1] ?? 0) * 1024);
      threads = Math.max(threads, Number(/Threads:\s+(\d+)/.exec(st)?.[1] ?? 0));
    } catch { /* exited */ }
  };
  const t = setInterval(sample, 20);
  const code = await new Promise<number>((r) => child.on('close', (c) => r(c ?? 1)));
  clearInterval(t);
  let ok = false;
  try { ok = code === 0 && JSON.parse(out).ok === true; } catch { /* reported as not ok */ }
  return { peakRss, threads, ms: performance.now() - t0, ok };
}

async function main() {
  const t0 = cpuTicks();
  const results: Record<string, unknown> = { machine: { cpus: os.cpus().length, model: os.cpus()[0]?.model, node: process.version }, quick };
  const rows: string[][] = [];
  const row = (what: string, value: string, baseline: string, ratio: string, target: string) => rows.push([what, value, baseline, ratio, target]);
  const pool = new EnginePool({ threads: 2 });
  try {
    const SZ = (quick ? 128 : 256) * MiB;
    const per = (quick ? 32 : 64) * MiB;
    // ---- a. copy limit ------------------------------------------------------------------------------------
    if (want('a')) {
    log('a. copy limit');
    const one = devices(1, SZ);
    const two = devices(2, SZ);
    const limit = () => { const r = baselineOnce(one, '/dev/null'); return gbps(r.bytes, r.ms); };
    const lim1 = await measure(limit);
    const lim2 = await measure(async () => {
      reset(two);
      const hs = two.map((d) => native().regionOpenEmu(d.device.id));
      try {
        const t0 = performance.now();
        const rs = await Promise.all(hs.map((h) => pool.baseline({ op: 'baseline', handles: [h], profile: 1, bufSize: 4 * CHUNK, outPath: '/dev/null' })));
        return gbps(rs.reduce((a, r) => a + r.bytes, 0), performance.now() - t0);
      } finally { for (const h of hs) native().regionClose(h); }
    });
    const h = native().regionOpenEmu(one[0].device.id);
    const dst = new Uint8Array(64 * MiB);
    const memcpy1 = await measure(() => 1 / native().benchCopyLimit(h, 4096, CHUNK, CHUNK, 2 ** 30, 1, dst) * 2 ** 30);
    const memcpy2 = await measure(() => 1 / native().benchCopyLimit(h, 4096, CHUNK, CHUNK, 2 ** 30, 2, dst) * 2 ** 30);
    native().regionClose(h);
    const eng1null = await measurePair(limit, async () => { const r = await engineSave(pool, one, '/dev/null'); return gbps(r.stopCopyBytes, r.stopCopyMs); });
    const eng1file = await measurePair(limit, async () => { const r = await engineSave(pool, one, file); return gbps(r.stopCopyBytes, r.stopCopyMs); });
    destroy(two);
    // The trapped data area (pread/pwrite only): the same pair through the slow path.
    const trapped = devices(1, SZ, { dataMode: 'trapped' });
    const limT = () => { const r = baselineOnce(trapped, '/dev/null'); return gbps(r.bytes, r.ms); };
    const engT = await measurePair(limT, async () => { const r = await engineSave(pool, trapped, '/dev/null'); return gbps(r.stopCopyBytes, r.stopCopyMs); });
    destroy(trapped);
    destroy(one);
    results.copyLimit = { trapped: engT, native1: lim1, native2: lim2, memcpy1, memcpy2, engine1DevNull: eng1null, engine1File: eng1file };
    row('copy limit, native protocol loop, 1 thread', `${lim1.median.toFixed(2)} GB/s`, '', '', '');
    row('copy limit, native protocol loop, 2 threads (2 devices)', `${lim2.median.toFixed(2)} GB/s`, '', '', '');
    row('data-area memcpy only, 1 / 2 threads', `${memcpy1.median.toFixed(2)} / ${memcpy2.median.toFixed(2)} GB/s`, '', '', '');
    row('engine save, 1 device -> /dev/null', `${eng1null.engine.median.toFixed(2)} GB/s`, `${eng1null.base.median.toFixed(2)} GB/s native loop`, pr(eng1null.ratio), '>= 0.85');
    row('engine save, 1 device -> file', `${eng1file.engine.median.toFixed(2)} GB/s`, `${eng1file.base.median.toFixed(2)} GB/s native loop`, pr(eng1file.ratio), '>= 0.85');
    row('engine save, 1 trapped device (pread) -> /dev/null', `${engT.engine.median.toFixed(2)} GB/s`, `${engT.base.median.toFixed(2)} GB/s native loop (trapped)`, pr(engT.ratio), '>= 0.85');
    }

    // ---- b/c. sequential baseline and downtime ---------------------------------------------------------------
    if (want('b')) {
    log('b/c. engine vs the sequential baseline');
    const seq: Record<string, unknown> = {};
    for (const out of [file, '/dev/null']) {
      for (const n of [1, 2, 4, 8]) {
        const ds = devices(n, per);
        const p = await measurePair(() => baselineOnce(ds, out).ms, async () => (await engineSave(pool, ds, out)).stopCopyMs);
        destroy(ds);
        const sp = stat(p.ratio.samples.map((x) => 1 / x));
        seq[`${out === file ? 'file' : 'devnull'}-${n}`] = { baselineMs: p.base, engineMs: p.engine, downtimeRatio: p.ratio, speedup: sp };
        row(`N=${n} x ${per / MiB} MiB to ${out === file ? 'a file' : '/dev/null'}: stop-and-copy time`, `${p.engine.median.toFixed(0)} ms`, `${p.base.median.toFixed(0)} ms sequential`,
          `${sp.median.toFixed(2)}x faster (${sp.min.toFixed(2)}-${sp.max.toFixed(2)}), downtime ${p.ratio.median.toFixed(2)}x`, n === 4 ? '>= 1.8x, <= 0.55x' : '');
      }
    }
    results.sequential = seq;
    }

    // ---- d. main-thread responsiveness -------------------------------------------------------------------------
    if (want('d')) {
    log('d. bitmap query latency while 4 devices save');
    {
      const ds = devices(4, (quick ? 64 : 128) * MiB, { profile: 'draft-2019', guestPages: 4096, dmaRate: 20000 });
      const m = new Migration(ds, pool, new ContainerWriter(FileSink.open('/dev/null')), { maxRounds: 0, digests: false, dirtyQueryIntervalMs: 0 });
      let done = false;
      const run = m.run().finally(() => { done = true; });
      const q = (async () => {
        while (!done) {
          for (const d of m.devices) if (!done && d.phase === 'stopcopy') await m.dirty.query(d);
          await new Promise((r) => setImmediate(r));
        }
      })();
      const rep = await run;
      await q;
      destroy(ds);
      const lat = rep.dirty.latencyMs;
      results.responsiveness = { bitmapLatencyMs: lat, lockWaitMs: rep.dirty.lockWaitMs, eventLoopDelayMs: rep.eventLoopDelayMs, throughputGBps: gbps(rep.stopCopyBytes, rep.stopCopyMs) };
      row(`bitmap query latency, 4 devices saving (${lat.count} queries)`, `p50 ${lat.p50.toFixed(3)} / p99 ${lat.p99.toFixed(3)} / max ${lat.max.toFixed(2)} ms`, '', '', 'p99 < 1 ms');
      row('event-loop delay during that run', `p50 ${rep.eventLoopDelayMs.p50.toFixed(2)} / p99 ${rep.eventLoopDelayMs.p99.toFixed(2)} / max ${rep.eventLoopDelayMs.max.toFixed(2)} ms`, '', '', '');
    }
    }

    // ---- e. memory -------------------------------------------------------------------------------------------
    if (want('e')) {
    log('e. memory');
    const mem: Record<string, unknown> = {};
    for (const total of quick ? [256 * MiB, 1024 * MiB] : [1024 * MiB, 4096 * MiB]) {
      const n = 4;
      const ds = devices(n, total / n);
      // Device state lives in memfd mappings (RssShmem): the engine's own memory is the anonymous RSS. A fresh pool,
      // its threads started, so staging allocated during the migration counts.
      const own = new EnginePool({ threads: 2 });
      await own.digest({ op: 'digest', id: ds[0].device.id, stateSize: 8192 }).catch(() => undefined);
      const anon = () => Number(/RssAnon:\s+(\d+)/.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;
      const before = anon();
      let peak = before;
      const t = setInterval(() => { peak = Math.max(peak, anon()); }, 5);
      const r = await engineSave(own, ds, file, { maxRounds: 2 });
      clearInterval(t);
      peak = Math.max(peak, anon());
      const staging = own.stats.stagingBytes;
      await own.close();
      destroy(ds);
      mem[total] = { baselineAnon: before, peakAnon: peak, aboveMiB: (peak - before) / MiB, stagingBytes: staging, streamBytes: r.streamBytes };
      row(`memory: ${total / MiB} MiB of state to a file`, `+${((peak - before) / MiB).toFixed(0)} MiB peak anon RSS (staging ${(staging / MiB).toFixed(0)} MiB)`, `${(before / MiB).toFixed(0)} MiB before`, '', '< 200 MiB, flat');
    }
    results.memory = mem;
    }

    // ---- f. scaling --------------------------------------------------------------------------------------------
    if (want('f')) {
    log('f. scaling');
    const scale: Record<string, unknown> = {};
    const each = (quick ? 16 : 64) * MiB;
    let one1 = 0;
    for (const n of quick ? [1, 4, 16] : [1, 4, 16, 64]) {
      const ds = devices(n, each);
      const s = await measure(async () => { const r = await engineSave(pool, ds, '/dev/null'); return r.stopCopyMs / (r.stopCopyBytes / 2 ** 30); }, quick ? 1 : 2);
      destroy(ds);
      if (n === 1) one1 = s.median;
      scale[n] = { msPerGiB: s, ratio: s.median / one1 };
      row(`scaling: ${n} device(s) x ${each / MiB} MiB`, `${s.median.toFixed(0)} ms/GiB`, `${one1.toFixed(0)} ms/GiB (1 device)`, (s.median / one1).toFixed(2), '<= 1.2');
    }
    results.scaling = scale;
    }

    // ---- g. load path ------------------------------------------------------------------------------------------
    if (want('g')) {
    log('g. load');
    {
      const ds = devices(4, per);
      reset(ds);
      await saveDevices(ds, file, pool, { maxRounds: 0, digests: false, force: true });
      destroy(ds);
      const loadOnce = async (p: EnginePool) => {
        let loader: Loader | undefined;
        try {
          const r = await loadStream(file, p, { verify: false });
          loader = r.loader;
          return r.report.devices.reduce((a, d) => a + d.dataBytes, 0) / 1e9 / (r.report.dataMs / 1000);
        } finally { for (const d of loader?.dests ?? []) (d.transport as EmulatedTransport).destroy(); }
      };
      const lim = devices(1, SZ);
      const limit2 = () => { const r = baselineOnce(lim, '/dev/null'); return gbps(r.bytes, r.ms); };
      const lp = await measurePair(limit2, () => loadOnce(pool));
      destroy(lim);
      const l2 = lp.engine;
      const p1 = new EnginePool({ threads: 1 });
      const l1 = await measure(() => loadOnce(p1));
      await p1.close();
      results.load = { threads2: l2, threads1: l1, speedup: l2.median / l1.median, vsCopyLimit: lp.ratio, copyLimit: lp.base };
      row('load, 4 devices, 2 threads (data phase)', `${l2.median.toFixed(2)} GB/s`, `${lp.base.median.toFixed(2)} GB/s copy limit`,
        `${lp.ratio.median.toFixed(2)} (${lp.ratio.min.toFixed(2)}-${lp.ratio.max.toFixed(2)})`, '>= 0.8');
      row('load parallel speedup (2 threads vs 1)', `${l2.median.toFixed(2)} vs ${l1.median.toFixed(2)} GB/s`, '', `${(l2.median / l1.median).toFixed(2)}x`, '');
    }
    }

    // ---- h. many small devices ---------------------------------------------------------------------------------
    if (want('h')) {
    // `vfio-mig run --devices N --size 8KiB` (default workload: dirty 2000, DMA 1000 pages/s) in a fresh process, its
    // peak RSS (anonymous + device memory) and thread count sampled from /proc; the cost per device is the growth
    // over the same run with one device.
    log('h. many small devices');
    {
      const one = await runProcess(1);
      const many = await runProcess(1024);
      const perDevice = (many.peakRss - one.peakRss) / 1023;
      results.manyDevices = { one, many, perDeviceMiB: perDevice / MiB };
      row('1024 devices x 8 KiB, `vfio-mig run` (peak RSS, threads)', `${(many.peakRss / MiB).toFixed(0)} MiB, ${many.threads} threads, ${(many.ms / 1000).toFixed(1)} s, ok ${many.ok}`,
        `1 device: ${(one.peakRss / MiB).toFixed(0)} MiB, ${one.threads} threads`, `${(perDevice / MiB).toFixed(3)} MiB per device`, '< 0.5 MiB per device, < 64 threads');
    }
    }

    // ---- i. vfio-user: the cost of the socket (bench/vfio-user.ts) ------------------------------------------------
    if (want('i')) results.vfioUser = await benchVfioUser({ pool, dir, quick, row, measure, measurePair, log });

    // ---- j. VFIO migration v2: data fd beside the region, and pre-copy's effect on downtime (bench/v2.ts) ---------
    if (want('j')) results.v2 = await benchV2({ pool, dir, quick, row, measure, measurePair, log });

    // ---- k. live migration between two processes: channels, file path, mutual TLS (bench/live.ts) ---------------
    if (want('k')) results.live = await benchLive({ pool, dir, quick, row, log });
  } finally {
    await pool.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const t1 = cpuTicks();
  const steal = (t1.steal - t0.steal) / Math.max(1, t1.total - t0.total);
  results.stealPercent = steal * 100;
  row('CPU stolen by the hypervisor during this run', `${(steal * 100).toFixed(1)}%`, '', '', 'noise indicator');
  const md = ['| measurement | value | baseline (same run) | ratio | target |', '|---|---|---|---|---|', ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
  results.markdown = md;
  if (jsonOnly) process.stdout.write(JSON.stringify(results, null, 2) + '\n');
  else {
    process.stdout.write(md + '\n');
    fs.writeFileSync('bench-results.json', JSON.stringify(results, null, 2));
    log('(JSON written to bench-results.json)');
  }
}

main().catch((e) => { process.stderr.write(`bench failed: ${e?.stack ?? e}\n`); process.exit(1); });
