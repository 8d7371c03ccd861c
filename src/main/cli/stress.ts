// vfio-mig stress.
import { runIteration, stress } from '../stress/stress.js';
import { EnginePool } from '../engine/pool.js';
import { fmtBytes } from './args.js';
import type { VendorMode } from '../../workers/tasks.js';
import { out, outJson } from './io.js';
import { printable } from '../text.js';

export async function cmdStress(o: { seconds: number; seed?: number; count?: number; replay?: number; threads?: number; json?: boolean; vendorMode?: VendorMode; signal?: AbortSignal; memoryBudget?: number }): Promise<void> {
  if (o.replay !== undefined) {
    const pool = new EnginePool({ threads: o.threads });
    try {
      const it = await runIteration(pool, o.replay, 2, 0, o.vendorMode, o.signal, o.memoryBudget);
      if (o.json) outJson(it); else out(`replay ${o.replay}: ${it.ok ? 'ok' : 'FAILED: ' + printable(it.error)}`);
      if (!it.ok) process.exitCode = 1;
    } finally {
      await pool.close();
    }
    return;
  }
  const seed = o.seed ?? (Date.now() >>> 0);
  if (!o.json) out(`stress: seed ${seed}, ${o.seconds} s`);
  const s = await stress({
    seconds: o.seconds, seed, count: o.count, threads: o.threads, vendorMode: o.vendorMode, signal: o.signal, memoryBudget: o.memoryBudget,
    onIteration: (it) => {
      if (!it.ok && !o.json) out(`FAILED iteration ${it.iteration}: reproduce with: vfio-mig stress --replay ${it.seed}  (${printable(it.error)})`);
    },
  });
  if (o.json) outJson(s);
  else {
    out(`stress: ${s.iterations} iterations, ${s.migrations} migrations, ${s.devices} devices, ${fmtBytes(s.bytes)}, ${s.chunks} chunks, ${s.failures} failures in ${s.seconds.toFixed(1)} s`);
  }
  if (s.failures) process.exitCode = 1;
}
