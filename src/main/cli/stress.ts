// vfio-mig stress.
import { runIteration, stress, type RunHooks } from '../stress/stress.js';
import { EnginePool } from '../engine/pool.js';
import { fmtBytes } from '../report/units.js';
import type { VendorMode } from '../../workers/tasks.js';
import { CommandOutput, type OutputFlags } from './output.js';
import { printable } from '../text.js';
import { openDevices, type ReachFlags } from './devices.js';
import { reachedIteration, stressReached, type ReachedIteration } from '../stress/reached.js';
import type { EngineDevice } from '../engine/source-device.js';
import { releaseDestination } from '../engine/load.js';
import { ErrorCode, MigError } from '../errors.js';

type StressFlags = OutputFlags & ReachFlags & {
  device?: string[]; dest?: string[]; allowNoP2p?: boolean;
  seconds: number; seed?: number; count?: number; replay?: number; threads?: number; vendorMode?: VendorMode; signal?: AbortSignal; memoryBudget?: number;
};

/** The command's output, its total line counting iterations and failures in `n`. */
function stressOutput(o: StressFlags) {
  const t0 = performance.now();
  const n = { iterations: 0, failures: 0 };
  const total = o.replay !== undefined ? 1 : o.count;
  const out = new CommandOutput('stress', o, o, {
    transient: true,
    totalLabel: () => `iter ${n.iterations}${total ? `/${total}` : ''}, ${n.failures} failed, ${((performance.now() - t0) / 1000).toFixed(0)}/${o.replay !== undefined ? '-' : o.seconds} s`,
  });
  return { out, n };
}

/** Every migration of every iteration is observed (progress lines come and go with the migrations). */
function observer(out: CommandOutput): () => RunHooks {
  return () => {
    let src = -1;
    return { onMigration: (m) => { src = out.attachMigration(m); }, onLoader: (l) => { out.attachLoader(l, src); } };
  };
}

export async function cmdStress(o: StressFlags): Promise<void> {
  o.vendorMode ??= 'strict';
  if (o.device?.length) return stressDevices(o);
  if (o.dest?.length) throw new MigError(ErrorCode.BAD_ARGUMENT, '--dest needs --device devices');
  const { out, n } = stressOutput(o);
  if (o.replay !== undefined) {
    const pool = new EnginePool({ threads: o.threads });
    try {
      const it = await runIteration(pool, o.replay, 2, 0, o.vendorMode, o.signal, o.memoryBudget, observer(out));
      out.done({ replay: it }, `replay ${o.replay}: ${it.ok ? 'ok' : 'FAILED: ' + printable(it.error)}`, it.ok, `replay ${o.replay}: ${it.ok ? 'ok' : 'FAILED'}`);
    } finally {
      await pool.close();
    }
    return;
  }
  const seed = o.seed ?? (Date.now() >>> 0);
  out.line(`stress: seed ${seed}, ${o.seconds} s`);
  const s = await stress({
    seconds: o.seconds, seed, count: o.count, threads: o.threads, vendorMode: o.vendorMode, signal: o.signal, memoryBudget: o.memoryBudget, observe: observer(out),
    onIteration: (it) => {
      n.iterations++;
      if (!it.ok) {
        n.failures++;
        out.line(`FAILED iteration ${it.iteration}: reproduce with: vfio-mig stress --replay ${it.seed}  (${printable(it.error)})`);
      }
      out.tick();
    },
  });
  const { seconds, ...rest } = s;
  const text = `stress: ${s.iterations} iterations, ${s.migrations} migrations, ${s.devices} devices, ${fmtBytes(s.bytes)}, ${s.chunks} chunks, ${s.failures} failures in ${seconds.toFixed(1)} s`;
  out.done({ ...rest, durationMs: seconds * 1000 }, text, s.failures === 0, text);
}

const failedLine = (it: ReachedIteration) => `FAILED iteration ${it.iteration} (${it.direction}): reproduce with: vfio-mig stress --device ... --replay ${it.seed}  (${printable(it.error)})`;

/** stress --device [--dest]: the named devices saved and loaded again and again (src/main/stress/reached.ts). */
async function stressDevices(o: StressFlags): Promise<void> {
  if (o.dest?.length && o.dest.length !== o.device!.length) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `--dest: ${o.dest.length} destination(s) for ${o.device!.length} --device source(s)`);
  }
  const { out, n } = stressOutput(o);
  const all: EngineDevice[] = [];
  try {
    const sources = await openDevices(o.device!, o);
    all.push(...sources);
    const dests = o.dest?.length ? await openDevices(o.dest, o) : undefined;
    all.push(...(dests ?? []));
    const base = { sources, dests, threads: o.threads, vendorMode: o.vendorMode, signal: o.signal, allowWithoutP2P: o.allowNoP2p, observe: observer(out) };
    if (o.replay !== undefined) {
      const pool = new EnginePool({ threads: o.threads });
      try {
        const it = await reachedIteration(pool, o.replay, 0, { ...base, seconds: 0, seed: o.replay }, true);
        out.done({ replay: it }, `replay ${o.replay} (${it.direction}): ${it.ok ? 'ok' : 'FAILED: ' + printable(it.error)}`, it.ok, `replay ${o.replay}: ${it.ok ? 'ok' : 'FAILED'}`);
      } finally {
        await pool.close();
      }
      return;
    }
    const seed = o.seed ?? (Date.now() >>> 0);
    out.line(`stress: seed ${seed}, ${o.seconds} s, ${sources.length} device(s)${dests ? ` and their ${dests.length} partner(s)` : ' (each loaded back into itself)'}`);
    const s = await stressReached({
      ...base, seconds: o.seconds, seed, count: o.count,
      onIteration: (it) => {
        n.iterations++;
        if (!it.ok) { n.failures++; out.line(failedLine(it)); }
        out.tick();
      },
    });
    const { seconds, ...rest } = s;
    const text = `stress: ${s.iterations} iterations, ${s.migrations} migrations, ${s.devices} device saves, ${fmtBytes(s.bytes)}, ${s.chunks} chunks, ${s.failures} failures in ${seconds.toFixed(1)} s`;
    out.done({ ...rest, durationMs: seconds * 1000 }, text, s.failures === 0, text);
  } finally {
    for (const d of all) await releaseDestination(d);
  }
}
