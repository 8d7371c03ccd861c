// Admission control: before run / save / load / stress / a Migration allocate anything, add up what they will commit
// (device state, emulated guest RAM, dirty logs, staging, threads, destinations from a device table) and refuse
// above a memory budget. Estimates are upper bounds from the requested geometry; nothing here trusts a number it
// did not check (a missing, negative, NaN or huge size is an error, never a way around the limit).
import fs from 'node:fs';
import os from 'node:os';
import { ErrorCode, MigError } from '../errors.js';
import { EMU_DEFAULTS, type EmulatedDeviceOptions } from '../emulated/device.js';

/** Default budget: this fraction of the memory available when the operation starts. */
export const DEFAULT_BUDGET_FRACTION = 0.5;
const KiB = 1024;
const MiB = 1 << 20;
const PAGE = 4096;
/** A piscina worker thread: its own V8 isolate and heap (measured ~10 MiB RSS here; rounded up). */
export const WORKER_THREAD_BYTES = 16 * MiB;
/** Engine objects per device (JS objects, shared counters, region handle and its mappings; measured ~0.1 MiB). */
export const PER_DEVICE_BYTES = 256 * KiB;
/** The emulated devices' shared workload pool (addon/src/emu/workload.cc). */
export const WORKLOAD_THREADS = Math.min(4, Math.max(1, os.availableParallelism?.() ?? os.cpus().length));

/** MemAvailable from /proc/meminfo (what can be allocated without swapping), else free memory. */
export function availableMemory(): number {
  try {
    const m = /MemAvailable:\s+(\d+)\s+kB/.exec(fs.readFileSync('/proc/meminfo', 'utf8'));
    if (m) return Number(m[1]) * KiB;
  } catch { /* not Linux */ }
  return os.freemem();
}

export function defaultMemoryBudget(): number {
  return Math.floor(availableMemory() * DEFAULT_BUDGET_FRACTION);
}

/** A validated budget in bytes (a flag or API option), or the default. */
export function memoryBudget(v: number | undefined, what = 'memoryBudget'): number {
  if (v === undefined) return defaultMemoryBudget();
  if (!Number.isSafeInteger(v) || v < MiB) throw new MigError(ErrorCode.BAD_ARGUMENT, `${what} ${v} must be a whole number of bytes, at least 1 MiB`);
  return v;
}

/** One line of an estimate. */
export interface CostItem { what: string; bytes: number; threads?: number }

export class Estimate {
  readonly items: CostItem[] = [];
  add(what: string, bytes: number, threads = 0): this {
    if (!Number.isFinite(bytes) || bytes < 0) throw new MigError(ErrorCode.BAD_ARGUMENT, `${what}: cannot estimate ${bytes} bytes`);
    if (bytes > 0 || threads > 0) this.items.push({ what, bytes, threads: threads || undefined });
    return this;
  }
  get bytes(): number { return this.items.reduce((a, i) => a + i.bytes, 0); }
  get threads(): number { return this.items.reduce((a, i) => a + (i.threads ?? 0), 0); }
  text(): string {
    return this.items.map((i) => `${i.what} ${fmt(i.bytes)}${i.threads ? ` (${i.threads} threads)` : ''}`).join(', ');
  }
}

/** What one emulated device costs natively (docs/EMULATED-DEVICE.md). */
export interface EmulatedCost {
  stateSize: number; maxChunk: number; guestPages: number; dma: boolean; workload: boolean; source: boolean;
  /** data_offset moves over the whole data area (else chunks always land at its start). */
  moving?: boolean;
}

/** Checks a geometry number from an untrusted place (a device table) or an option: finite, whole, in range. */
export function checkSize(what: string, v: unknown, lo: number, hi: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < lo || v > hi) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `${what} ${String(v)} is not a whole number in ${lo}..${hi}`);
  }
  return v;
}

/** Adds emulated devices: state, data area, dirty bitmap, DMA log, the shared guest RAM and workload threads. */
export function addEmulated(e: Estimate, label: string, devs: EmulatedCost[]): void {
  if (devs.length === 0) return;
  let state = 0;
  let area = 0;
  let logs = 0;
  let guestPages = 0;
  let workload = false;
  for (const d of devs) {
    state += d.stateSize;
    // The data area (a memfd) is touched only where chunks go: at its start, one chunk of at most the state (plus
    // stream headers and a draft-2019 dirty bitmap) with a fixed data_offset; anywhere with a moving one.
    const whole = Math.ceil(Math.max(2 * d.maxChunk, Math.ceil(d.guestPages / 64) * 8) / PAGE) * PAGE;
    area += d.moving ? whole : Math.min(whole, Math.ceil((Math.min(d.maxChunk, d.stateSize) + Math.ceil(d.guestPages / 64) * 8) / PAGE) * PAGE + 2 * PAGE);
    logs += (d.source ? Math.ceil(d.stateSize / PAGE / 64) * 8 : 0) + (d.dma ? Math.ceil(d.guestPages / 64) * 8 : 0);
    if (d.dma) guestPages = Math.max(guestPages, d.guestPages);
    workload ||= d.workload;
  }
  e.add(`${label} state`, state).add(`${label} data areas`, area).add(`${label} dirty logs`, logs);
  e.add(`${label} objects`, devs.length * PER_DEVICE_BYTES);
  if (guestPages) e.add('emulated guest RAM', guestPages * PAGE);
  if (workload) e.add('workload pool', WORKLOAD_THREADS * MiB, WORKLOAD_THREADS);
}

/** The engine: worker threads, staging rings (threads x slots x chunk) and the load's read slots and scratch. */
export function addEngine(e: Estimate, threads: number, ringSlots: number, chunk: number, load: boolean): void {
  e.add('worker threads', threads * WORKER_THREAD_BYTES, threads);
  const slot = Math.ceil((128 + chunk) / PAGE) * PAGE;
  e.add('save staging', threads * ringSlots * slot);
  if (load) e.add('load staging', (threads * 2 + 2) * slot + threads * chunk);
}

/** Dirty-page unions the engine keeps per source device (two bitmaps of guestPages bits). */
export function addDirtyTracking(e: Estimate, guestPages: number[]): void {
  e.add('dirty-page bitmaps', guestPages.reduce((a, p) => a + 2 * Math.ceil(checkSize('guestPages', p, 0, 2 ** 40) / 64) * 8, 0));
}

/**
 * Refuse above `budget`. `origin` decides the error: 'options' (a flag or API option: VFM_OVER_BUDGET, exit 2) or
 * a stream offset (a device table: VFM_STREAM_TOO_LARGE naming the offset).
 */
export function admit(e: Estimate, budget: number, what: string, origin: 'options' | { offset: number }): void {
  if (e.bytes <= budget) return;
  const msg = `${what} would commit ${fmt(e.bytes)} (${e.text()}), more than the memory budget of ${fmt(budget)}` +
    ` (default ${DEFAULT_BUDGET_FRACTION * 100}% of available memory; --memory-budget / memoryBudget)`;
  if (origin === 'options') throw new MigError(ErrorCode.OVER_BUDGET, msg, { value: e.bytes });
  throw new MigError(ErrorCode.STREAM_TOO_LARGE, msg, { offset: origin.offset, value: e.bytes });
}

function fmt(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= MiB) return `${(n / MiB).toFixed(1)} MiB`;
  return `${(n / KiB).toFixed(1)} KiB`;
}

/** The cost of `n` emulated devices made from options (EMU_DEFAULTS filled in; every number checked first). */
export function emulatedCosts(n: number, o: EmulatedDeviceOptions, source: boolean): EmulatedCost[] {
  const stateSize = checkSize('state size', o.stateSize ?? EMU_DEFAULTS.stateSize, 8192, 2 ** 36);
  const maxChunk = checkSize('chunk size', o.maxChunk ?? EMU_DEFAULTS.maxChunk, 8192, 64 << 20);
  const guestPages = checkSize('guestPages', o.guestPages ?? EMU_DEFAULTS.guestPages, 1, 1 << 24);
  const dirty = o.dirtyRate ?? EMU_DEFAULTS.dirtyRate;
  const dma = o.dmaRate ?? EMU_DEFAULTS.dmaRate;
  const live = source && !o.zeroFill;
  const c: EmulatedCost = {
    stateSize, maxChunk, guestPages, dma: live && dma > 0, workload: live && (dirty > 0 || dma > 0), source,
    moving: (o.offsetPolicy ?? EMU_DEFAULTS.offsetPolicy) === 'moving',
  };
  return Array.from({ length: n }, () => c);
}

export interface EmulatedRunPlan {
  what: string;
  devices: number;
  device: EmulatedDeviceOptions;
  /** The destinations are created too (run: sources and destinations coexist while loading). */
  destinations: boolean;
  /** Worker threads of a pool this operation creates (0: it uses an existing pool). */
  newPoolThreads: number;
  memoryBudget?: number;
}

/**
 * Admission for emulated devices made from flags or options (run, save, stress): refuses with VFM_OVER_BUDGET
 * before anything is created. Returns the budget used, for the operation's later checks.
 */
export function admitEmulated(p: EmulatedRunPlan): number {
  const budget = memoryBudget(p.memoryBudget);
  checkSize('devices', p.devices, 1, 1 << 20);
  const e = new Estimate();
  addEmulated(e, 'sources', emulatedCosts(p.devices, p.device, true));
  if (p.destinations) addEmulated(e, 'destinations', emulatedCosts(p.devices, p.device, false));
  const chunk = Math.min(p.device.maxChunk ?? EMU_DEFAULTS.maxChunk, 64 << 20);
  if (p.newPoolThreads) addEngine(e, p.newPoolThreads, 3, chunk, p.destinations);
  addDirtyTracking(e, Array.from({ length: p.devices }, () => p.device.guestPages ?? EMU_DEFAULTS.guestPages));
  admit(e, budget, p.what, 'options');
  return budget;
}
