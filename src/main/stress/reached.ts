// Stress of devices reached elsewhere (`stress --device vfio:<sysfs> | vfio-user:<socket>`): the same devices saved
// and loaded again and again through their real data channel (a kernel data fd, a vfio-user socket), each iteration
// drawn from its seed (direction, pre-copy rounds, downtime limit, staging chunk, bitmap query rate, one migration
// for every pair or one per pair at once), and verified by whatever the reach can check:
//  - a device that digests its state (emulated, vfio-mig's device server) by digest, as for emulated stress;
//  - every device by a fixed point: the device's data bytes (its DEV_DATA_STATE payloads, i.e. the vendor's own
//    stream) saved in each iteration equal those of the first one. A device loaded with state S and saved again must
//    give S back, so a destination that applied the stream wrongly, or a source that saved something else, fails
//    it. It assumes idle devices (no guest changing their state) whose stream is a function of their state (mtty's).
// Every source is RUNNING again after each iteration, so the next one saves a running device (pre-copy included).
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadStream, saveDevices } from '../api.js';
import { walk } from '../container/inspect.js';
import { EnginePool } from '../engine/pool.js';
import type { EngineDevice } from '../engine/source-device.js';
import { asMigDevice } from '../protocol/v1/device.js';
import { ErrorCode, MigError } from '../errors.js';
import { checkStressOptions } from '../options.js';
import { newParseState, parsePackets } from '../protocol/qemu-stream.js';
import type { VendorMode } from '../../workers/tasks.js';
import { mulberry32, stressLoop, type IterationSummary, type RunHooks, type StressSummary } from './stress.js';

export interface ReachedStressOptions {
  /** The devices under test. */
  sources: EngineDevice[];
  /** A partner for each source (same count): each iteration migrates one way or the other. Absent: each device is
   *  saved and loaded back into itself. */
  dests?: EngineDevice[];
  seconds: number; seed: number; count?: number; threads?: number;
  vendorMode?: VendorMode;
  signal?: AbortSignal;
  allowWithoutP2P?: boolean;
  /** Where the iterations' stream files go (default: the OS temporary folder); each is removed after its iteration. */
  dir?: string;
  observe?: () => RunHooks;
  onIteration?: (s: ReachedIteration) => void;
}

export interface ReachedIteration extends IterationSummary {
  /** 'a-to-b': sources saved into dests; 'b-to-a': the reverse; 'self': each device loaded back into itself. */
  direction: 'a-to-b' | 'b-to-a' | 'self';
  /** How each device was verified: by digest (true), by the fixed point only (null). */
  verifiedBy: ('digest' | 'fixed-point')[];
}

const isV2 = (d: EngineDevice) => asMigDevice(d).caps.protocol === 'v2';

function pick<T>(r: () => number, xs: readonly T[]): T { return xs[Math.floor(r() * xs.length)]!; }

export function reachedPlan(seed: number, pairs: number, grouped: boolean) {
  const r = mulberry32(seed);
  return {
    direction: pick(r, ['a-to-b', 'b-to-a'] as const),
    maxRounds: pick(r, [0, 1, 3]),
    downtimeLimitMs: pick(r, [0, 5, 300]),
    stagingChunk: pick(r, [4096, 65536, 1 << 20]),
    dirtyQueryIntervalMs: pick(r, [0, 1, 20]),
    // Every pair in one migration (P2P quiescing across devices) or one migration per pair, all at once.
    together: grouped && pairs > 1 && r() < 0.5,
  };
}

/** SHA-256 of each device's DEV_DATA_STATE payloads in a container (the vendor's stream, however it was cut). */
export async function deviceDataDigests(file: string): Promise<string[]> {
  const hashes: crypto.Hash[] = [];
  const states: ReturnType<typeof newParseState>[] = [];
  const res = await walk(file, (r, body) => {
    const d = r.h.device;
    hashes[d] ??= crypto.createHash('sha256');
    states[d] ??= newParseState(true);
    for (const ev of parsePackets(states[d]!, body, 0, body.length, 0, { maxData: body.length, maxConfig: body.length }, `device ${d}`)) {
      if (ev.kind === 'data') hashes[d]!.update(body.subarray(ev.dataAt, ev.dataAt + ev.size));
    }
  });
  if (res.status !== 'complete') throw new MigError(ErrorCode.STREAM_TRUNCATED, `stream ${res.status}`, { offset: res.size });
  return Array.from({ length: res.table.devices.length }, (_, i) => hashes[i]?.digest('hex') ?? crypto.createHash('sha256').digest('hex'));
}

/** RUNNING again after it was saved. */
async function resume(d: EngineDevice): Promise<void> {
  const dev = asMigDevice(d);
  if ((await dev.state()) !== 'RUNNING') await dev.setState('RUNNING');
}

export async function stressReached(o: ReachedStressOptions): Promise<StressSummary> {
  checkStressOptions(o);
  const { sources } = o;
  const dests = o.dests ?? [];
  if (!Array.isArray(sources) || !Array.isArray(dests)) throw new MigError(ErrorCode.BAD_ARGUMENT, 'stress: sources and dests are arrays of devices');
  if (!sources.length) throw new MigError(ErrorCode.BAD_ARGUMENT, 'stress needs at least one device');
  if (dests.length && dests.length !== sources.length) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `--dest: ${dests.length} destination(s) for ${sources.length} --device source(s)`);
  }
  // Several v2 devices in one migration need P2P on each (QEMU's rule): else one migration per pair.
  const grouped = !!o.allowWithoutP2P || [...sources, ...dests].every((d) => { const m = asMigDevice(d); return m.caps.protocol !== 'v2' || m.caps.p2p; });
  // The fixed point: each pair's device stream digest, from the first iteration that saved it.
  const reference: (string | undefined)[] = [];
  return stressLoop(o, (pool, seed, iteration) => reachedIteration(pool, seed, iteration, o, grouped, reference));
}

/** One iteration: save the (drawn) sources, load them into their partners, verify, resume the sources. */
export async function reachedIteration(pool: EnginePool, seed: number, iteration: number, o: ReachedStressOptions,
  grouped: boolean, reference: (string | undefined)[] = []): Promise<ReachedIteration> {
  const pairs = o.sources.length;
  const plan = reachedPlan(seed, pairs, grouped);
  const self = !o.dests?.length;
  const direction = self ? 'self' : plan.direction;
  const from = direction === 'b-to-a' ? o.dests! : o.sources;
  const into = direction === 'a-to-b' ? o.dests! : o.sources;
  const groups = plan.together ? [[...Array(pairs).keys()]] : [...Array(pairs).keys()].map((i) => [i]);
  const s: ReachedIteration = { iteration, seed, migrations: groups.length, devices: 0, bytes: 0, chunks: 0, ok: true, direction, verifiedBy: [] };
  const fail = (why: string) => { s.ok = false; s.error ??= why; };
  const dir = o.dir ?? os.tmpdir();
  await Promise.all(groups.map(async (g, gi) => {
    const file = path.join(dir, `vfio-mig-stress-${process.pid}-${seed}-${gi}.vfmig`);
    const hooks = o.observe?.() ?? {};
    const srcs = g.map((i) => from[i]!);
    try {
      const save = await saveDevices(srcs, file, pool, {
        // A v1 vendor sizes its own chunks (staging must take them); a v2 data fd is read in whatever pieces we like.
        maxRounds: plan.maxRounds, downtimeLimitMs: plan.downtimeLimitMs, stagingChunk: srcs.every(isV2) ? plan.stagingChunk : undefined,
        dirtyQueryIntervalMs: plan.dirtyQueryIntervalMs, vendorMode: o.vendorMode ?? 'strict', signal: o.signal,
        allowWithoutP2P: o.allowWithoutP2P, force: true,
      }, hooks.onMigration);
      s.devices += save.devices.length;
      s.bytes += save.precopyBytes + save.stopCopyBytes;
      s.chunks += save.devices.reduce((a, d) => a + d.precopyChunks + d.stopCopyChunks, 0);
      const digests = await deviceDataDigests(file);
      const { report } = await loadStream(file, pool, { verify: true, signal: o.signal, makeDestination: (e) => into[g[e.index]!]! }, hooks.onLoader);
      report.devices.forEach((d, k) => {
        const pair = g[k]!;
        if (d.verified === false) fail(`${d.name}: digest differs after load`);
        else if (d.state !== 'RUNNING') fail(`${d.name}: not running after load (${d.state})`);
        s.verifiedBy[pair] = d.verified === true ? 'digest' : 'fixed-point';
        reference[pair] ??= digests[k];
        if (digests[k] !== reference[pair]) {
          fail(`${srcs[k]!.name}: its saved device state (sha256 ${digests[k]!.slice(0, 16)}) differs from the first iteration's (${reference[pair]!.slice(0, 16)}): a load or save changed it`);
        }
      });
    } catch (e) {
      fail(`${(e as MigError).code ?? 'error'}: ${(e as Error).message}`);
    } finally {
      fs.rmSync(file, { force: true });
    }
  }));
  // The saved sources are stopped, and a destination whose load failed early may be too: run every device again, so
  // the next iteration starts from running devices (a failed save already rolled its sources back).
  for (const d of new Set([...from, ...into])) {
    try { await resume(d); } catch (e) { fail(`${d.name}: cannot resume after the iteration: ${(e as Error).message}`); }
  }
  return s;
}
