// vfio-mig stress.
import { runIteration, stress } from '../stress/stress.js';
import { EnginePool } from '../engine/pool.js';
import { fmtBytes } from './args.js';
import type { VendorMode } from '../../workers/tasks.js';

export async function cmdStress(o: { seconds: number; seed?: number; count?: number; replay?: number; threads?: number; json?: boolean; vendorMode?: VendorMode }): Promise<void> {
  if (o.replay !== undefined) {
    const pool = new EnginePool({ threads: o.threads });
    try {
      const it = await runIteration(pool, o.replay, 2, 0, o.vendorMode);
      process.stdout.write(o.json ? JSON.stringify(it, null, 2) + '\n' : `replay ${o.replay}: ${it.ok ? 'ok' : 'FAILED: ' + it.error}\n`);
      if (!it.ok) process.exitCode = 1;
    } finally {
      await pool.close();
    }
    return;
  }
  const seed = o.seed ?? (Date.now() >>> 0);
  if (!o.json) process.stdout.write(`stress: seed ${seed}, ${o.seconds} s\n`);
  const s = await stress({
    seconds: o.seconds, seed, count: o.count, threads: o.threads, vendorMode: o.vendorMode,
    onIteration: (it) => {
      if (!it.ok && !o.json) process.stdout.write(`FAILED iteration ${it.iteration}: reproduce with: vfio-mig stress --replay ${it.seed}  (${it.error})\n`);
    },
  });
  if (o.json) process.stdout.write(JSON.stringify(s, null, 2) + '\n');
  else {
    process.stdout.write(`stress: ${s.iterations} iterations, ${s.migrations} migrations, ${s.devices} devices, ${fmtBytes(s.bytes)}, ${s.chunks} chunks, ${s.failures} failures in ${s.seconds.toFixed(1)} s\n`);
  }
  if (s.failures) process.exitCode = 1;
}
