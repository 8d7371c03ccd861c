// The destination process of the live bench rows (bench/live.ts forks it, as `vfio-mig receive` would run on
// another host): one engine pool of its own, and per request either a live receive on loopback TCP (optionally with
// mutual TLS) or a file load. Replies over the IPC channel: {address} once listening, then {report} or {error}.
import { performance as perf } from 'node:perf_hooks';
import { EnginePool } from '../src/main/engine/pool.js';
import { Receiver } from '../src/main/live/receiver.js';
import { loadStream } from '../src/main/api.js';
import type { MigError } from '../src/main/errors.js';

export type PeerRequest = { op: 'receive'; tlsDir?: string; verify: boolean } | { op: 'load'; file: string; verify: boolean } | { op: 'exit' };

const threads = Number(process.env.VFM_BENCH_PEER_THREADS ?? 2);
const pool = new EnginePool({ threads });
const reply = (m: unknown) => process.send!(m);

process.on('message', (m: PeerRequest) => {
  void (async () => {
    if (m.op === 'exit') { await pool.close(); process.exit(0); }
    try {
      if (m.op === 'load') {
        const t0 = performance.now();
        const r = await loadStream(m.file, pool, { verify: m.verify });
        const loadMs = performance.now() - t0;
        await r.loader.close();
        reply({ report: { ok: r.report.ok, loadMs, verified: r.report.devices.every((d) => d.verified) } });
        return;
      }
      const c0 = process.cpuUsage();
      const e0 = perf.eventLoopUtilization();
      const rx = new Receiver({ listen: 'tcp:127.0.0.1:0', pool, tlsDir: m.tlsDir, timeoutMs: 30_000, verify: m.verify });
      rx.on('event', (e) => { if (e.type === 'listening') reply({ address: e.address }); });
      const r = await rx.run();
      const cpu = process.cpuUsage(c0);
      const elu = perf.eventLoopUtilization(e0);
      reply({ report: { cpuMs: (cpu.user + cpu.system) / 1000, elu: elu.utilization, ok: r.ok, destinationDowntimeMs: r.destinationDowntimeMs, verified: r.devices.every((d) => d.verified), bytes: r.bytesReceived, channelBytes: r.channelBytes, receiveWorkers: r.receiveWorkers } });
    } catch (e) {
      reply({ error: `${(e as MigError).code ?? ''} ${(e as Error).message}` });
    }
  })();
});
reply({ ready: true });
