// The destination side: read a container, demultiplex its devices, and load them in parallel (QEMU load_setup /
// load_state / load_cleanup per device). Each device's records are applied strictly in order by one chain of worker
// tasks; different devices proceed concurrently. Every size read from the file is bounded by the destination's
// own geometry before memory is touched, and a destination never runs unless every device loaded completely.
import { EventEmitter } from 'node:events';
import os from 'node:os';
import { ErrorCode, MigError, abortError, toMigError } from '../errors.js';
import { trace } from '../trace.js';
import { ContainerReader, type AdoptedDevice, type RecordRef, type RecordSource } from '../container/reader.js';
import { nativeCrcAvailable } from '../container/checksum.js';
import {
  FILE_HEADER_SIZE, checkChunkOrder, RECORD_HEADER_SIZE, REC_ABORT, REC_CHUNK, REC_DEVICE_TABLE, REC_END, type AbortRecord, type DeviceTable,
  type DeviceTableEntry, type EndRecord, validateAbort, validateEnd,
} from '../container/format.js';
import { MAX_CONFIG_BLOB } from '../protocol/config-blob.js';
import type { TrappedAccess } from '../protocol/migration-region.js';
import { restoreWithHook, type ConfigHooks } from './config-hook.js';
import { DATA_PREFIX, FLAG_DEV_DATA_STATE, checkStreamEnd, getBe64, newParseState, type QemuLimits, type QemuParseState } from '../protocol/qemu-stream.js';
import { EmulatedTransport } from '../transport/emulated.js';
import { digestTask, type DeviceTransport } from '../transport/transport.js';
import type { DataMode, OffsetPolicy } from '../emulated/device.js';
import type { ProfileName } from '../protocol/profiles.js';
import { DeviceShared } from './device-shared.js';
import { Estimate, addEmulated, admit, memoryBudget } from './budget.js';
import { withStallBound, type Awaitable, type MigDevice } from '../device/seam.js';
import { reachForSpec, reachProvider, registeredReaches } from '../device/registry.js';
import { destroyEmulated } from '../reach/emulated/v2.js'; // importing it registers the emulated reach's v2 destinations
import type { ConfigTarget } from '../transport/config.js';
import { DEFAULT_STAGING_CHUNK } from './source-device.js';
import { asMigDevice } from '../protocol/v1/device.js';
import { PROFILE_DEFS } from '../protocol/profiles.js';
import { keepAlive, type EnginePool } from './pool.js';
import type { DataItem } from '../../workers/tasks.js';
import { OWNER_MAIN } from './region-lock.js';
import { noSse42 } from './test-hooks.js';
import { DeviceClaims } from './claims.js';

export interface LoadOptions {
  /** Called once every destination is RESUMING, before the first CHUNK is read (a receiver accepts the source here). */
  onSetup?: (dests: readonly Dest[]) => Promise<void> | void;
  /** Called once per device when its whole QEMU stream (config included) has been applied, before END is read. */
  onDeviceLoaded?: (d: Dest) => void;
  /**
   * v2: called once per device when the record carrying its DEV_INIT_DATA_SENT has been applied, so every initial
   * byte before the marker is in the device (QEMU's qemu_loadvm_approve_switchover; a receiver's switchover-ack).
   */
  onInitDataLoaded?: (d: Dest) => void;
  /** Build the destination for a device-table entry; default: a fresh zero-filled emulated device of that geometry. */
  makeDestination?: (e: DeviceTableEntry) => Awaitable<DeviceTransport | MigDevice>;
  /**
   * The destinations by device spec, one per device-table entry in order (`vfio:<sysfs path>`, or any scheme a
   * reach registered): each is opened by its reach's provider, and the loader closes it. Without it (and without
   * makeDestination) a v2 entry's own reach provides the destination (emulated: a fresh device; kernel: the device
   * of the entry's name on this host).
   */
  destinations?: string[];
  /** Compare each destination's digest with the source digest in the END record. */
  verify?: boolean;
  /**
   * Each destination leaves RESUMING for STOP (the vendor validates the state it got), is verified there (its digest
   * against the END record, where it has one), and only then starts: true (default) STOP -> RUNNING; false: it stays
   * STOP, loaded, validated and verified but not running, for an embedder that starts devices itself when it resumes
   * the guest (`Loader.start()`).
   */
  start?: boolean;
  /** Refuse a device table whose devices' state adds up to more (default: this machine's memory). */
  maxStateBytes?: number;
  /**
   * Refuse (VFM_STREAM_TOO_LARGE at the device table) a table whose destinations and load staging would commit more
   * than this many bytes (default: half of the memory available now).
   */
  memoryBudget?: number;
  /** Cancel the load: it rejects with an AbortError (code VFM_CANCELLED) and no destination runs. */
  signal?: AbortSignal;
  /** Period of the sampled `progress` events (default 200 ms; 0: only at the end). */
  progressIntervalMs?: number;
  /**
   * Trapped data access of v1 destinations (docs/CONFIG.md): `bulk` (default) one pwrite per trapped piece; `aligned`
   * QEMU's naturally aligned 8/4/2/1-byte accesses, for drivers only ever driven by QEMU.
   */
  trappedAccess?: TrappedAccess;
  /** A data fd that takes no data for this long while RESUMING fails with VFM_VENDOR_STUCK (default 30000 ms). */
  vendorStallMs?: number;
  /**
   * Config space restore as an embedder hook (docs/CONFIG.md): `config.restore(device, bytes, restoreDefault)` gets
   * each device's CONFIG section bytes (the source's default config space, or a source save hook's own bytes) on the
   * main thread, before the device leaves RESUMING, instead of the reach's default restore; may be async.
   */
  config?: ConfigHooks;
}

/** One destination's progress: device data bytes applied so far. */
export interface LoadProgress { device: string; index: number; bytes: number; packets: number; bytesPerSecond: number; sample: boolean }

export interface LoaderEvents {
  progress: [LoadProgress];
  /** A destination's device_state changed (RESUMING, then RUNNING or STOP). */
  state: [{ device: string; index: number; state: string }];
  /** The load ended (QEMU's final MIGRATION status on the destination). */
  end: [{ status: 'completed' | 'failed' | 'cancelled' }];
}

/** query-migrate on the destination side; times in ms, sizes in bytes. */
export interface LoadStatus {
  status: 'none' | 'setup' | 'active' | 'completed' | 'failed' | 'cancelled';
  totalTimeMs: number;
  /** Stream bytes read so far, of the file's size. */
  transferredBytes: number;
  totalBytes: number;
  remainingBytes: number;
  bytesPerSecond: number;
  devices: { name: string; state: string; transferredBytes: number; packets: number }[];
}

export interface LoadedDevice {
  name: string;
  dataPackets: number;
  dataBytes: number;
  state: string;
  digest?: string;
  expectedDigest?: string;
  verified: boolean | null;
  /** v2: DEV_INIT_DATA_SENT seen (the source's initial bytes all arrived: switchover-ack's trigger). */
  initDataSent?: boolean;
}

export interface LoadReport {
  ok: boolean;
  devices: LoadedDevice[];
  bytesRead: number;
  totalMs: number;
  /** From the first record to the last data applied (destination creation and final validation excluded). */
  dataMs: number;
  /** Device data bytes per second over dataMs. */
  throughputMBps: number;
  error?: Record<string, unknown>;
}

/** Release a destination the loader made: an emulated one is destroyed, any other closed (its reach's close). */
export async function releaseDestination(x: DeviceTransport | MigDevice): Promise<void> {
  if (!destroyEmulated(x)) await x.close();
}

export function emulatedDestination(e: DeviceTableEntry): EmulatedTransport {
  if (e.transport !== 'emulated') {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `no built-in destination for a ${e.transport} source: pass makeDestination`, { device: e.name });
  }
  return EmulatedTransport.create({
    name: e.name, profile: e.profile as ProfileName, stateSize: e.geometry.stateSize, maxChunk: e.geometry.maxChunk,
    dataMode: e.geometry.dataMode as DataMode, offsetPolicy: e.geometry.offsetPolicy as OffsetPolicy,
    guestPages: e.geometry.guestPages, zeroFill: true, dirtyRate: 0, dmaRate: 0,
  });
}

/**
 * Largest v1 data packet a load takes: one the source's own data area could stage (its region minus the header),
 * bounded as the admission estimate's read slots are (twice the chunk size, at least 1 MiB, plus a page). Not the
 * destination's area: a packet larger than that is written in pieces (MigrationRegion.loadChunk, as QEMU's
 * vfio_load_buffer), so a too-large packet is the stream's fault, never the destination vendor's.
 */
function v1PacketLimit(e: DeviceTableEntry, headerSize: number): number {
  return Math.max(0, Math.min(e.geometry.regionSize, 2 * Math.max(e.geometry.maxChunk || 0, 1 << 20) + 4096) - headerSize);
}

/** Largest data packet a seam destination takes (a v2 packet is one source read of its staging chunk). */
const MAX_SEAM_PACKET = 64 << 20;

/**
 * Largest data packet the stream of `e` may carry, from what its source declared: a v1 packet is one chunk of the
 * source's data area (v1PacketLimit); a v2 packet one source read (its staging chunk).
 */
function packetLimit(e: DeviceTableEntry): number {
  const v1 = (PROFILE_DEFS as Record<string, { headerSize: number } | undefined>)[e.profile];
  if (v1) return v1PacketLimit(e, v1.headerSize);
  return Math.min(Math.max(e.geometry.maxChunk || 0, DEFAULT_STAGING_CHUNK), MAX_SEAM_PACKET);
}

/** A seam destination's refusal with the vendor's own reason appended (the worker cannot ask the device). */
function withVendorText(e: unknown, d: Dest): unknown {
  const v = d.dev?.vendorError?.();
  if (v && e instanceof MigError && !e.message.includes(v)) e.message += ` (vendor: ${v})`;
  return e;
}

/** Data records read ahead of the devices at most (only their 48-byte heads are kept), and per task. */
const MAX_QUEUED = 512;
const MAX_BATCH = 32;

export interface Dest {
  openBatch: DataItem[] | null;
  entry: DeviceTableEntry;
  /** The destination, whatever its protocol and reach. */
  dev: MigDevice;
  /** What it was made from (makeDestination's own object, e.g. an embedder's v1 DeviceTransport; else `dev`). */
  transport: DeviceTransport | MigDevice;
  /** Its resuming session loads records that are one data packet straight from the stream file (DataPathDesc.fileLoad). */
  fileLoad: boolean;
  shared: DeviceShared;
  limits: QemuLimits;
  parse: QemuParseState;
  chain: Promise<void>;
  nextSeq: bigint;
  nextOffset: bigint;
  stats: LoadedDevice;
  /** Its whole stream has been applied (onDeviceLoaded was called). */
  loaded: boolean;
  /** File offset just past this device's last CHUNK record so far: where a stream that stops early ends. */
  streamEnd?: number;
  /** The failed load reset it (what it loaded is discarded): whoever releases it need not reset it again. */
  discarded?: boolean;
  /** The source applies this device's records itself (RecordSource.adopt: a live data channel's worker). */
  adopted?: boolean;
}

/**
 * At most `n` reusable staging slots for records being loaded (bounded memory whatever the file says). A slot is
 * allocated when first needed and sized by the record it carries (powers of two from 64 KiB, at most `limit`), so
 * staging follows the chunks the stream actually uses, never the destination's advertised region size.
 */
export class SlotPool {
  private free: SharedArrayBuffer[] = [];
  private waiters: { size: number; go: (b: SharedArrayBuffer) => void }[] = [];
  private made = 0;
  private bytes = 0;
  constructor(private readonly n: number, readonly limit: number) {}
  /** A slot of at least `size` (<= limit) bytes. */
  get(size: number): Promise<SharedArrayBuffer> {
    const b = this.free.pop();
    if (b) return Promise.resolve(this.fit(b, size));
    if (this.made < this.n) { this.made++; return Promise.resolve(this.alloc(size)); }
    return new Promise((go) => this.waiters.push({ size, go }));
  }
  put(b: SharedArrayBuffer): void {
    const w = this.waiters.shift();
    if (w) w.go(this.fit(b, w.size)); else this.free.push(b);
  }
  /** Count a record staged elsewhere (a source's own shared buffer) against the same bound, without memory. */
  async hold(): Promise<void> {
    if (this.made < this.n) { this.made++; return; }
    const b = await this.get(0);
    this.bytes -= b.byteLength; // its place is taken by the held record; the buffer itself is dropped
  }
  unhold(): void {
    if (this.waiters.length) this.put(this.alloc(this.waiters[0].size)); else this.made--;
  }
  /** Bytes of the slots held now (allocated and not replaced). */
  get allocatedBytes(): number { return this.bytes; }
  private fit(b: SharedArrayBuffer, size: number): SharedArrayBuffer {
    if (b.byteLength >= size) return b;
    this.bytes -= b.byteLength; // replaced by a bigger one (the small one is garbage)
    return this.alloc(size);
  }
  private alloc(size: number): SharedArrayBuffer {
    const n = Math.min(this.limit, Math.max(64 << 10, 2 ** Math.ceil(Math.log2(Math.max(1, size)))));
    this.bytes += n;
    return new SharedArrayBuffer(n);
  }
}

export class Loader extends EventEmitter<LoaderEvents> {
  dests: Dest[] = [];
  private slotPools: SlotPool[] = [];
  /** Staging the load allocated (read slots and batch scratch), sized by the records it met. */
  get stagingBytes(): number { return this.slotPools.reduce((a, p) => a + p.allocatedBytes, 0); }
  private phase: LoadStatus['status'] = 'none';
  private readonly claims = new DeviceClaims('load');
  private t0 = 0;
  private tEnd = 0;
  private reader?: RecordSource;
  private lastSample: { bytes: number; at: number }[] = [];
  private queued = 0;
  private aborted = false;
  private dequeued: (() => void)[] = [];
  table?: DeviceTable;
  /** `input`: a container file, or any source of container records (a network receiver). */
  constructor(readonly input: string | RecordSource, private readonly pool: EnginePool, private readonly o: LoadOptions = {}) {
    super();
  }

  /**
   * Release the destinations this loader created itself (the default emulated ones); destinations from a caller's
   * makeDestination stay the caller's. Safe to call twice.
   */
  async close(): Promise<void> {
    if (this.o.makeDestination) return;
    // Emulated destinations are destroyed; those a reach opened or connected to (kernel, vfio-user) are closed.
    for (const d of this.dests) await releaseDestination(d.dev);
    this.dests = [];
  }

  async [Symbol.asyncDispose](): Promise<void> { await this.close(); }

  /** query-migrate for this load, at any time. */
  status(): LoadStatus {
    const end = this.tEnd || performance.now();
    const read = this.reader?.offset ?? 0;
    const size = this.reader?.size ?? read; // a live source's total is unknown until END
    const ms = this.t0 ? end - this.t0 : 0;
    return {
      status: this.phase, totalTimeMs: ms, transferredBytes: read, totalBytes: size, remainingBytes: Math.max(0, size - read),
      bytesPerSecond: ms > 0 ? (read * 1000) / ms : 0,
      devices: this.dests.map((d) => ({ name: d.entry.name, state: d.stats.state, transferredBytes: d.stats.dataBytes, packets: d.stats.dataPackets })),
    };
  }

  private progress(d: Dest, sample: boolean): void {
    const i = this.dests.indexOf(d);
    const last = (this.lastSample[i] ??= { bytes: 0, at: this.t0 });
    const at = performance.now();
    if (sample && d.stats.dataBytes === last.bytes) return;
    const bytesPerSecond = ((d.stats.dataBytes - last.bytes) * 1000) / Math.max(at - last.at, 0.001);
    this.lastSample[i] = { bytes: d.stats.dataBytes, at };
    this.emit('progress', { device: d.entry.name, index: d.entry.index, bytes: d.stats.dataBytes, packets: d.stats.dataPackets, bytesPerSecond, sample });
  }

  private setDestState(d: Dest, state: string): void {
    d.stats.state = state;
    this.emit('state', { device: d.entry.name, index: d.entry.index, state });
  }

  async run(): Promise<LoadReport> {
    const t0 = performance.now();
    this.t0 = t0;
    this.phase = 'setup';
    const reader: RecordSource = typeof this.input === 'string' ? ContainerReader.open(this.input) : this.input;
    this.reader = reader;
    const release = keepAlive();
    let failure: MigError | undefined;
    let dataMs = 0;
    let d0 = 0;
    const every = this.o.progressIntervalMs ?? 200;
    const sampler = every > 0 ? setInterval(() => { for (const d of this.dests) this.progress(d, true); }, every) : undefined;
    sampler?.unref();
    const signal = this.o.signal;
    const onAbort = () => {
      this.aborted = true;
      for (const d of this.dests) d.dev.interrupt?.(); // a request waiting for a stalled destination ends now
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      if (signal?.aborted) throw abortError(signal, 'load cancelled');
      this.table = await reader.readPreamble();
      await this.setup(this.table);
      await this.adopt(reader);
      await this.o.onSetup?.(this.dests);
      this.phase = 'active';
      d0 = performance.now();
      const end = await this.readRecords(reader);
      await Promise.all(this.dests.map((d) => d.chain));
      dataMs = performance.now() - d0;
      for (const d of this.dests) {
        checkStreamEnd(d.parse, d.entry.name, d.streamEnd ?? reader.offset);
        if (d.parse.v2) d.stats.initDataSent = (d.parse.initDataSent ?? 0) > 0;
      }
      await this.finish(end);
      for (const d of this.dests) this.progress(d, false);
    } catch (e) {
      failure = toMigError(e);
      if (signal?.aborted && failure.name !== 'AbortError') failure = abortError(signal, 'load cancelled');
      // Let in-flight chunks settle before touching device state (a source applying records itself stops first).
      reader.fail?.(failure);
      await Promise.allSettled(this.dests.map((d) => d.chain));
      if (d0) dataMs = performance.now() - d0; // what ran of the data phase: the partial report's rate is real
      await this.leaveNotRunning();
    } finally {
      clearInterval(sampler);
      signal?.removeEventListener('abort', onAbort);
      reader.close();
      release();
      this.claims.release();
    }
    this.tEnd = performance.now();
    const status = !failure ? 'completed' : failure.name === 'AbortError' ? 'cancelled' : 'failed';
    this.phase = status;
    this.emit('end', { status });
    const totalMs = performance.now() - t0;
    const rep: LoadReport = {
      ok: !failure, devices: this.dests.map((d) => d.stats), bytesRead: reader.offset, totalMs, dataMs,
      throughputMBps: this.dests.reduce((a, d) => a + d.stats.dataBytes, 0) / 1e6 / (Math.max(dataMs, 0.001) / 1000),
    };
    if (failure) {
      rep.error = failure.toJSON();
      Object.assign(failure, { report: rep });
      throw failure;
    }
    return rep;
  }

  /** load_setup: create/open each destination and put it in RESUMING. */
  private async setup(table: DeviceTable): Promise<void> {
    const make = this.o.makeDestination ?? emulatedDestination;
    // The table is untrusted: bound what it may make this process create before creating anything. Every size used
    // is checked first (a missing, negative, NaN or huge one is an error, never a way around the limit).
    const size = (d: DeviceTableEntry, k: 'stateSize' | 'maxChunk' | 'guestPages' | 'regionSize'): number => {
      const v = (d.geometry as unknown as Record<string, unknown> | undefined)?.[k];
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v > 2 ** 40) {
        throw new MigError(ErrorCode.STREAM_BAD_RECORD, `device table: ${d.name}: ${k} ${String(v)} is not a size`, { offset: FILE_HEADER_SIZE, device: d.name });
      }
      return v;
    };
    const total = table.devices.reduce((a, d) => a + size(d, 'stateSize'), 0);
    const named = this.o.destinations;
    if (named && named.length !== table.devices.length) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `${named.length} destination(s) named for the stream's ${table.devices.length} device(s)`,
        { offset: FILE_HEADER_SIZE, device: table.devices[Math.min(named.length, table.devices.length - 1)]?.name });
    }
    const cost = new Estimate();
    if (!this.o.makeDestination && !named) {
      addEmulated(cost, 'destinations', table.devices.map((d) => ({
        stateSize: size(d, 'stateSize'), maxChunk: size(d, 'maxChunk'), guestPages: size(d, 'guestPages'), dma: false, workload: false, source: false,
        moving: d.geometry.offsetPolicy !== 'fixed',
      })));
    }
    // Read slots and batch scratch grow up to one destination data area each (SlotPool).
    const area = Math.max(...table.devices.map((d) => Math.min(size(d, 'regionSize'), 2 * Math.max(size(d, 'maxChunk'), 1 << 20) + 4096)));
    cost.add('load staging', (this.pool.threads * 3 + 2) * area);
    admit(cost, memoryBudget(this.o.memoryBudget), `loading ${table.devices.length} device(s)`, { offset: FILE_HEADER_SIZE });
    const max = this.o.maxStateBytes ?? os.totalmem();
    if (total > max) {
      throw new MigError(ErrorCode.STREAM_TOO_LARGE, `device table asks for ${total} bytes of device state, more than the ${max} allowed`,
        { offset: FILE_HEADER_SIZE, value: total });
    }
    for (const entry of table.devices) {
      // The edge: a v1 transport from makeDestination becomes its V1Device; from here on, one path.
      const made = await this.destinationFor(entry, make);
      const dev = asMigDevice(made);
      // Refused before it is touched; leaveNotRunning then only sees the destinations this load took.
      this.claims.claimOne(dev);
      await this.setupDest(entry, dev, made);
    }
  }

  /** The destination for one entry: a named one (destinations), the caller's (makeDestination), or its reach's. */
  private async destinationFor(entry: DeviceTableEntry, make: (e: DeviceTableEntry) => Awaitable<DeviceTransport | MigDevice>): Promise<DeviceTransport | MigDevice> {
    const spec = this.o.destinations?.[entry.index];
    if (spec !== undefined) {
      const r = reachForSpec(spec);
      if (!r?.provider.destination) {
        throw new MigError(ErrorCode.BAD_ARGUMENT, `destination '${spec}': no registered reach opens destinations of that kind (known: ${registeredReaches().join(', ')})`, { device: entry.name });
      }
      return r.provider.destination(entry, r.target);
    }
    if (!this.o.makeDestination && (entry.profile === 'v2' || (entry.transport !== 'emulated' && registeredReaches().includes(entry.transport)))) {
      const p = reachProvider(entry.transport, entry.name);
      if (!p.destination) throw new MigError(ErrorCode.BAD_ARGUMENT, `the ${entry.transport} reach cannot make destinations: pass makeDestination`, { device: entry.name });
      return p.destination(entry);
    }
    return make(entry);
  }

  /** load_setup for one destination: its protocol must be the stream's, then RESUMING (a data session). */
  private async setupDest(entry: DeviceTableEntry, dev: MigDevice, made: DeviceTransport | MigDevice): Promise<void> {
    const shared = DeviceShared.create();
    const d: Dest = {
      entry, dev, transport: made, shared, limits: { maxData: packetLimit(entry), maxConfig: MAX_CONFIG_BLOB }, fileLoad: false,
      parse: newParseState(entry.profile === 'v2'), chain: Promise.resolve(), nextSeq: 0n, nextOffset: 0n, openBatch: null, loaded: false,
      stats: { name: entry.name, dataPackets: 0, dataBytes: 0, state: '', verified: null },
    };
    this.dests.push(d);
    if (dev.caps.protocol !== entry.profile) {
      throw new MigError(ErrorCode.LOAD_REJECTED, `stream profile ${entry.profile} but destination speaks ${dev.caps.protocol}`, { device: entry.name });
    }
    dev.setTrappedAccess?.(this.o.trappedAccess ?? 'bulk');
    await shared.lock.lockAsync(OWNER_MAIN);
    try { await dev.setState('RESUMING'); } finally { shared.lock.unlock(); }
    // A session whose data path takes records straight from the stream file (the v1 region's zero-copy load).
    d.fileLoad = dev.dataPath()?.fileLoad === true;
    this.setDestState(d, 'RESUMING');
    trace('vfio_load_setup', { device: entry.name });
  }

  /** Demultiplex records into per-device chains. Returns the END record. */
  private async readRecords(reader: RecordSource): Promise<EndRecord> {
    const slotSize = Math.ceil((RECORD_HEADER_SIZE + Math.max(
      ...this.dests.map((d) => DATA_PREFIX + d.limits.maxData + 8), 24 + MAX_CONFIG_BLOB + 8)) / 4096) * 4096;
    const slots = new SlotPool(this.pool.threads * 2 + 2, slotSize);
    this.slotPools = [slots];
    // Scratch for running batches comes from its own pool: a batch holds it only while its task runs, so it never
    // waits behind records that hold read slots while they queue behind that very batch (a deadlock otherwise).
    const scratch = new SlotPool(this.pool.threads, Math.max(...this.dests.map((d) => d.limits.maxData)));
    this.slotPools.push(scratch);
    let failed: unknown;
    for (;;) {
      if (failed) throw failed;
      if (this.aborted) throw abortError(this.o.signal, 'load cancelled');
      const r = await reader.next();
      if (!r) throw new MigError(ErrorCode.STREAM_TRUNCATED, 'stream ends without an END record', { offset: reader.offset });
      if (r.h.type === REC_END) {
        const end = validateEnd(await reader.metaBody<EndRecord>(r), this.table!, r.at + RECORD_HEADER_SIZE);
        await reader.checkEnd();
        return end;
      }
      if (r.h.type === REC_ABORT) {
        const a = validateAbort(await reader.metaBody<AbortRecord>(r), r.at + RECORD_HEADER_SIZE);
        throw new MigError(ErrorCode.STREAM_ABORTED, `the source aborted the migration: ${a.code}: ${a.message}`, { offset: r.at, device: a.device });
      }
      if (r.h.type === REC_DEVICE_TABLE) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'a second DEVICE_TABLE', { offset: r.at });
      if (r.h.type !== REC_CHUNK) throw new MigError(ErrorCode.STREAM_BAD_RECORD, `unexpected record type ${r.h.type}`, { offset: r.at });
      const d = this.dests[r.h.device];
      if (!d) throw new MigError(ErrorCode.STREAM_BAD_RECORD, `CHUNK for device ${r.h.device}, table has ${this.dests.length}`, { offset: r.at + 8 });
      if (d.adopted) throw new MigError(ErrorCode.STREAM_BAD_RECORD, 'CHUNK of a device the source applies itself', { offset: r.at, device: d.entry.name });
      checkChunkOrder(r.h, d.nextSeq, d.nextOffset, r.at, d.entry.name);
      if (r.h.length > slotSize - RECORD_HEADER_SIZE) {
        throw new MigError(ErrorCode.STREAM_TOO_LARGE, `CHUNK of ${r.h.length} bytes exceeds what the destination can take (${slotSize - RECORD_HEADER_SIZE})`,
          { offset: r.at + 4, device: d.entry.name, value: r.h.length });
      }
      d.nextSeq++;
      d.nextOffset += BigInt(r.h.length);
      d.streamEnd = r.at + RECORD_HEADER_SIZE + r.h.length;
      // A record that is exactly one data packet ([DATA][size][data], optionally [END]) is loaded zero-copy: the
      // worker reads the data from the file straight into the device's data area. Consecutive ones of a device go
      // in one task (a batch stays open until its task starts), which hides the per-task round trip.
      const fd = reader.descriptor;
      const head = fd === undefined || !d.fileLoad ? null : this.dataPacketHead(r, d);
      if (head && fd !== undefined) {
        reader.skip(r);
        while (this.queued >= MAX_QUEUED) await new Promise<void>((res) => this.dequeued.push(res));
        this.queued++;
        const item = { recordAt: r.at, head: head.bytes, size: head.size, trailer: head.trailer };
        if (!d.openBatch || d.openBatch.length >= MAX_BATCH) {
          const batch: DataItem[] = [];
          d.openBatch = batch;
          d.chain = d.chain.then(async () => {
            if (d.openBatch === batch) d.openBatch = null;
            const sab = await scratch.get(Math.max(...batch.map((i) => i.size)));
            try {
              const path = this.dataPath(d);
              if (!path) throw new MigError(ErrorCode.BAD_STATE, 'no resuming data session is open', { device: d.entry.name });
              const res = await this.pool.loadData({
                op: 'load-data-path', path, shared: d.shared.sab, fd, items: batch, parse: d.parse, limits: d.limits, scratch: sab,
              });
              if (!res) throw new MigError(ErrorCode.NATIVE, 'zero-copy load unavailable on this CPU', { device: d.entry.name });
              d.parse = res.parse;
              d.stats.dataPackets += res.dataPackets;
              d.stats.dataBytes += res.dataBytes;
            } finally {
              scratch.put(sab);
              this.queued -= batch.length;
              for (const w of this.dequeued.splice(0)) w();
            }
          }).catch((e) => { failed ??= e; reader.fail?.(toMigError(e)); throw e; });
          d.chain.catch(() => undefined);
        }
        d.openBatch.push(item);
        continue;
      }
      d.openBatch = null; // a record that is not a lone data packet closes the batch: order is kept
      // A network source may hold the record in shared memory already: no copy, but the same bound on records held.
      const handed = reader.takeSlot?.(r);
      const sab = handed ? handed.sab : await slots.get(RECORD_HEADER_SIZE + r.h.length);
      const done = handed ? (await slots.hold(), () => { handed.release(); slots.unhold(); }) : () => slots.put(sab);
      if (!handed) {
        const slot = new Uint8Array(sab);
        slot.set(r.header, 0);
        try {
          await reader.body(r, slot, RECORD_HEADER_SIZE, d.entry.name, false);
        } catch (e) {
          slots.put(sab);
          throw e;
        }
      }
      const at = r.at;
      const len = r.h.length;
      const streamOffset = r.h.streamOffset;
      d.chain = d.chain.then(async () => {
        const path = this.dataPath(d);
        if (!path) throw new MigError(ErrorCode.BAD_STATE, 'no resuming data session is open', { device: d.entry.name });
        const res = await this.pool.loadPath({
          op: 'load-path', path, device: d.entry.name, deviceIndex: d.entry.index, shared: d.shared.sab, slot: sab, bodyLen: len,
          fileOffset: at, streamOffset: Number(streamOffset), parse: d.parse, limits: d.limits, config: this.configTarget(d),
        }).catch((e) => { throw withVendorText(e, d); });
        if (res.config) {
          const target = d.dev;
          await restoreWithHook(this.o.config!, { name: d.entry.name, index: d.entry.index, device: target, entry: d.entry },
            res.config.bytes, res.config.flags, res.config.offset, (b) => target.writeConfig(b));
        }
        this.applied(d, res.parse, res.dataPackets, res.dataBytes);
      }).catch((e) => { failed ??= e; reader.fail?.(toMigError(e)); throw e; }).finally(done);
      d.chain.catch(() => undefined);
    }
  }

  /** The destination's resuming data path, with the load's stall bound. */
  private dataPath(d: Dest) {
    const path = d.dev.dataPath();
    return path && withStallBound(path, this.o.vendorStallMs);
  }

  /** Records of `d` applied (by a load task, or by the source itself): its parse state, stats and events. */
  private applied(d: Dest, parse: QemuParseState, dataPackets: number, dataBytes: number): void {
    d.parse = parse;
    d.stats.dataPackets += dataPackets;
    d.stats.dataBytes += dataBytes;
    if (d.parse.initDataSent && !d.stats.initDataSent) {
      d.stats.initDataSent = true;
      this.o.onInitDataLoaded?.(d);
    }
    // The config section is always last: once it is closed the device has everything but END's digest.
    if (d.parse.sawConfig && !d.parse.inSection && !d.loaded) {
      d.loaded = true;
      this.o.onDeviceLoaded?.(d);
    }
  }

  /**
   * A source that applies some devices' records itself (a live receiver's data channels, each read and applied by a
   * worker thread of its own): those devices' chains are its promises, and what it applied comes back through
   * applied(). Not with a config restore hook, which runs on the main thread.
   */
  private async adopt(reader: RecordSource): Promise<void> {
    if (!reader.adopt || this.o.config?.restore) return;
    const devs: AdoptedDevice[] = [];
    for (const d of this.dests) {
      const path = this.dataPath(d);
      if (path) devs.push({ index: d.entry.index, name: d.entry.name, path, shared: d.shared.sab, limits: d.limits, parse: d.parse, config: this.configTarget(d) });
    }
    const taken = await reader.adopt(devs, (i, r) => {
      const d = this.dests[i];
      if (r.streamEnd) d.streamEnd = r.streamEnd;
      this.applied(d, r.parse, r.dataPackets, r.dataBytes);
    });
    for (const [i, p] of taken) {
      const d = this.dests[i];
      d.adopted = true;
      d.chain = p;
      p.catch(() => undefined);
    }
  }

  /** Where a worker puts a loaded CONFIG section: the device (default restore), or back to the main thread's hook. */
  private configTarget(d: Dest): ConfigTarget {
    if (this.o.config?.restore) return { kind: 'hook' };
    return d.dev.configTarget() as ConfigTarget;
  }

  /** The record's header + [DATA][size] if it is exactly one data packet the zero-copy path can take. */
  private dataPacketHead(r: RecordRef, d: Dest) {
    if (!nativeCrcAvailable() || noSse42(this.pool) || r.h.length < DATA_PREFIX + 1) return null;
    if (r.peek.length < DATA_PREFIX) return null;
    const bytes = new Uint8Array(RECORD_HEADER_SIZE + DATA_PREFIX);
    bytes.set(r.header, 0);
    bytes.set(r.peek.subarray(0, DATA_PREFIX), RECORD_HEADER_SIZE);
    if (getBe64(bytes, RECORD_HEADER_SIZE) !== FLAG_DEV_DATA_STATE) return null;
    const size = getBe64(bytes, RECORD_HEADER_SIZE + 8);
    if (size === 0n || size > BigInt(d.limits.maxData)) return null; // the parser path reports oversize packets
    const rest = r.h.length - DATA_PREFIX - Number(size);
    if (rest !== 0 && rest !== 8) return null;
    return { bytes, size: Number(size), trailer: rest === 8 };
  }

  /**
   * Every stream complete: leave RESUMING for STOP (the vendor validates what it was given), verify each destination
   * while it is stopped, and only then start it (unless the embedder starts devices itself). No destination runs
   * unverified. Without verification, RESUMING -> RUNNING directly, as QEMU does.
   */
  private async finish(end: EndRecord): Promise<void> {
    if (this.o.signal?.aborted) throw abortError(this.o.signal, 'load cancelled before the destinations were started');
    if (this.o.verify !== false) {
      // A stream that cannot be verified is not started: every digest-capable destination needs its source digest.
      for (const d of this.dests) {
        const exp = end.devices?.find((x) => x.index === d.entry.index)?.digest;
        if (d.dev.digestTarget() && !(typeof exp === 'string' && exp.startsWith('sha256:'))) {
          throw new MigError(ErrorCode.VERIFY_FAILED, 'the END record carries no source digest for this device', { device: d.entry.name });
        }
      }
    }
    // Every device leaves RESUMING (its vendor validates what it loaded) and reaches STOP before any is started;
    // digests are checked while nothing runs; P2P-capable ones then pass RUNNING_P2P together before any runs (QEMU's
    // prepare step on the destination).
    for (const d of this.dests) {
      await this.destSet(d, 'STOP', (m) => `destination refused to leave RESUMING: ${m}`);
    }
    if (this.o.verify !== false) {
      await Promise.all(this.dests.map(async (d) => {
        const exp = end.devices?.find((x) => x.index === d.entry.index)?.digest;
        const t = d.dev.digestTarget();
        if (!exp || !t) return;
        d.stats.expectedDigest = exp;
        d.stats.digest = await this.pool.digest(digestTask(t));
        d.stats.verified = d.stats.digest === exp;
      }));
      const bad = this.dests.filter((d) => d.stats.verified === false);
      if (bad.length) {
        throw new MigError(ErrorCode.VERIFY_FAILED, `digest mismatch: destination ${bad[0].stats.digest} != source ${bad[0].stats.expectedDigest}`,
          { device: bad[0].entry.name });
      }
    }
    if (this.o.start === false) return;
    for (const d of this.dests) if (d.dev.caps.p2p) await this.destSet(d, 'RUNNING_P2P');
    for (const d of this.dests) await this.destSet(d, 'RUNNING');
  }

  private async destSet(d: Dest, target: 'STOP' | 'RUNNING' | 'RUNNING_P2P', why = (m: string) => m): Promise<void> {
    await d.shared.lock.lockAsync(OWNER_MAIN);
    let now: string;
    try {
      try {
        await d.dev.setState(target);
      } catch (e) {
        throw new MigError(ErrorCode.LOAD_REJECTED, why(`${(e as Error).message}${lastError(d)}`), { device: d.entry.name, cause: e });
      }
      now = await d.dev.state();
    } finally {
      d.shared.lock.unlock();
    }
    this.setDestState(d, now);
  }

  /**
   * Start destinations loaded with `start: false` (they wait in STOP, validated and verified), as a VMM does when it
   * resumes the guest: P2P-capable ones pass RUNNING_P2P first, then each goes RUNNING. Only after a successful load;
   * every device is attempted, the first failure is thrown.
   */
  async start(): Promise<void> {
    if (this.phase !== 'completed') {
      throw new MigError(ErrorCode.BAD_STATE, `cannot start destinations of a load that is ${this.phase}: only a completed, verified load starts`);
    }
    let first: MigError | undefined;
    const attempt = async (d: Dest, to: 'RUNNING' | 'RUNNING_P2P') => {
      try { await this.destSet(d, to, (m) => `destination refused to start: ${m}`); } catch (e) { first ??= e as MigError; }
    };
    for (const d of this.dests) if (d.dev.caps.p2p) await attempt(d, 'RUNNING_P2P');
    for (const d of this.dests) await attempt(d, 'RUNNING');
    if (first) throw first;
  }

  /**
   * On failure or cancel no destination is left RESUMING (a partial resume) or running what it loaded: one that is
   * not STOP — still RESUMING, started before another device failed, or in ERROR — is reset (VFIO_DEVICE_RESET: what
   * it loaded is discarded; RESUMING has no other way out) and then stopped (a vendor refusing that STOP is reset
   * again and left in the reset state). One already STOP (complete and validated) stays so.
   */
  private async leaveNotRunning(): Promise<void> {
    for (const d of this.dests) {
      const dev = d.dev;
      try {
        if (await dev.state() === 'STOP') continue;
        await dev.reset();
        let note = '';
        try {
          await dev.setState('STOP');
        } catch (e) {
          // A vendor that refuses STOP even fresh from a reset (or falls into ERROR): reset once more, so it is left
          // in the uAPI's reset state (RUNNING with nothing loaded), never in ERROR.
          note = ` (STOP refused: ${(e as Error).message})`;
          await dev.reset();
        }
        d.discarded = true;
        this.setDestState(d, `reset (state discarded), ${await dev.state()}${note}`);
      } catch (e) {
        d.stats.state = `unknown (${(e as Error).message})`;
      }
    }
  }
}

function lastError(d: Dest): string {
  const v = d.dev.vendorError?.();
  return v ? ` (vendor: ${v})` : '';
}
