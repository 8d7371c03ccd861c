// A VFIO migration v1 device behind the seam: the migration region's device_state walked one read-modify-write per
// arc through its NEXT_STATE table (states.ts), pending_bytes as the estimate, dirty pages from the region's pfn
// registers (draft-2019) or the type1 container (linux-5.8), and a region data path for workers (region-path.ts).
// The reach supplies a DeviceTransport (region discovery, config, reset, container dirty log) and, where its
// registers answer over a socket, an asynchronous V1Registers; the emulated and kernel reaches read them in place.
import { ErrorCode, MigError } from '../../errors.js';
import { trace } from '../../trace.js';
import type { DeviceTransport, DigestTarget } from '../../transport/transport.js';
import type { DeviceGeometry } from '../../container/format.js';
import type {
  Awaitable, ConfigTargetDesc, DataPathDesc, DeviceCaps, DirtyLog, MigDevice, MigState, SizeEstimate, StateChange, TargetState,
} from '../../device/seam.js';
import type { MigrationRegion, TrappedAccess } from '../migration-region.js';
import { deviceKey } from '../../engine/claims.js';
import type { RegName } from '../profiles.js';
import { STATE_BITS, arcFailure, checkedState, fmtState, statePath, stateName, withStateBits, type V1State } from '../states.js';
import type { V1PathParams } from './region-path.js';

/** The migration region's registers, each at its exact offset and width (v1 uAPI); a reach may answer later. */
export interface V1Registers {
  read(name: RegName): Awaitable<bigint>;
  write(name: RegName, value: bigint): Awaitable<void>;
}

export interface V1DeviceOptions {
  /** Register access when it is not the region handle's own (a vfio-user reach's asynchronous REGION_READ/WRITE). */
  registers?: (region: MigrationRegion) => V1Registers;
}

/** The worker module that moves a v1 device's data (region-path.ts), by URL: the main thread never imports it. */
export const V1_REGION_PATH = new URL('./region-path.js', import.meta.url).href;

const SESSION: ReadonlySet<MigState> = new Set<MigState>(['PRE_COPY', 'STOP_COPY', 'RESUMING']);
const SAVING: ReadonlySet<MigState> = new Set<MigState>(['PRE_COPY', 'STOP_COPY']);
type V1Target = Exclude<V1State, 'ERROR'>;

export class V1Device implements MigDevice {
  readonly caps: DeviceCaps;
  readonly dirtyLog: DirtyLog | null;
  private regionObj?: MigrationRegion;
  private regs?: V1Registers;
  /** The state as last read or set (dataPath() answers from it without touching the device). */
  private cur: MigState = 'RUNNING';

  constructor(readonly transport: DeviceTransport, private readonly o: V1DeviceOptions = {}) {
    const p = transport.profile;
    const pages = transport.guestPages;
    const kind = !pages ? 'none' : p.dirtySource === 'region' ? 'region-pfns' : 'type1-container';
    this.caps = { protocol: p.name, reach: transport.kind, precopy: true, p2p: false, dirty: kind, migrationFlags: 0 };
    this.dirtyLog = kind === 'region-pfns' ? new RegionPfnLog(this, pages) : kind === 'type1-container' ? new ContainerLog(transport, pages) : null;
  }

  get name(): string { return this.transport.name; }

  /** The migration region, discovered and opened on first use (constructing the adapter touches nothing). */
  get region(): MigrationRegion {
    this.regionObj ??= this.transport.openRegion();
    return this.regionObj;
  }

  private get registers(): V1Registers {
    this.regs ??= this.o.registers?.(this.region) ?? this.transport.registers?.(this.region) ?? this.region;
    return this.regs;
  }

  private async raw(): Promise<number> { return Number(await this.registers.read('device_state')); }

  async state(): Promise<MigState> {
    const s = checkedState(await this.raw(), this.transport.profile.name, this.name);
    this.cur = s;
    return s;
  }

  /** Walk NEXT_STATE to `target`, one read-modify-write of device_state per arc (bits 3..31 kept as read). */
  async setState(target: TargetState): Promise<StateChange> {
    const from = await this.state();
    if (from === 'ERROR') {
      throw new MigError(ErrorCode.DEVICE_ERROR_STATE, 'device is in the ERROR state; a reset is required', { device: this.name, register: 'device_state' });
    }
    const path = target in STATE_BITS ? statePath(from as V1Target, target as V1Target) : null;
    if (!path) throw new MigError(ErrorCode.BAD_STATE, `no allowed transition ${from} -> ${target}`, { device: this.name });
    let newSession = false;
    for (const next of path) {
      const cur = await this.raw();
      const val = withStateBits(cur, STATE_BITS[next]);
      try {
        await this.registers.write('device_state', BigInt(val));
      } catch (e) {
        // The 5.8 uAPI: on failure re-read; the driver keeps the old state unless it went to ERROR. Not after an
        // interrupt (a cancel released a write the device has not answered): the re-read would wait for it.
        let after: number | undefined;
        if ((e as MigError).code !== ErrorCode.CANCELLED) {
          try { after = await this.raw(); } catch { /* reported below */ }
        }
        trace('vfio_migration_set_state_failed', { device: this.name, from: fmtState(cur), to: next, after });
        throw arcFailure(this.name, cur, next, after, e);
      }
      trace('vfio_migration_set_state', { device: this.name, from: stateName(cur), to: next, raw: val });
      const was = this.cur;
      this.cur = next;
      if (next === 'RESUMING' || (SAVING.has(next) && !SAVING.has(was))) newSession = true;
    }
    return { from, to: this.cur, path, newSession };
  }

  /** pending_bytes (a read the vendor may take as "the previous chunk was consumed", as QEMU's v1 does each round). */
  async estimate(): Promise<SizeEstimate> {
    return { pending: Number(await this.registers.read('pending_bytes')), initialBytes: 0, dirtyBytes: 0, stopCopyBytes: null };
  }

  dataPath(): DataPathDesc<V1PathParams> | null {
    if (!SESSION.has(this.cur)) return null;
    const r = this.region;
    return { module: V1_REGION_PATH, device: this.name, params: { region: r.desc }, lanes: true, maxChunk: r.size - r.profile.headerSize, fileLoad: true };
  }

  readConfig(): Awaitable<Uint8Array> { return this.transport.readConfig(); }
  writeConfig(space: Uint8Array): Awaitable<void> { return this.transport.writeConfig(space); }
  configTarget(): ConfigTargetDesc { return this.transport.configTarget(); }
  geometry(): DeviceGeometry { return this.transport.geometry(); }
  digestTarget(): DigestTarget | null { return this.transport.digestTarget(); }
  vendorError(): string { return this.transport.vendorError?.() ?? ''; }
  /** Two adapters of one transport are one device (engine/claims.ts). */
  claimKey(): string { return deviceKey(this.transport); }

  setTrappedAccess(mode: TrappedAccess): void { this.region.setTrappedAccess(mode); }

  reset(): Awaitable<void> {
    const done = () => {
      this.cur = 'RUNNING';
      trace('vfio_device_reset', { device: this.name });
    };
    const r = this.transport.reset();
    return r instanceof Promise ? r.then(done) : done();
  }

  interrupt(): void { this.transport.interrupt?.(); }

  close(): void { this.transport.close(); this.regionObj = undefined; this.regs = undefined; }
}

/** draft-2019: pfn registers in the region and the bitmap in its data area, so the query shares the data channel. */
class RegionPfnLog implements DirtyLog {
  readonly kind = 'region-pfns' as const;
  readonly pageSize = 4096;
  readonly sharesDataChannel = true;
  private readonly scratch: Uint8Array;
  constructor(private readonly dev: V1Device, readonly pages: number) {
    this.scratch = new Uint8Array(Math.ceil(pages / 64) * 8);
  }
  start(): void { /* the drafts track from the moment the device is SAVING */ }
  report(bitmap: Uint8Array): number { return this.dev.region.queryDirtyPfns(0, this.pages, 4096, bitmap, this.scratch); }
  stop(): void { /* nothing to stop */ }
}

/** linux-5.8: VFIO_IOMMU_DIRTY_PAGES on the type1 container (or the reach's equivalent: emulated, DIRTY_PAGES). */
class ContainerLog implements DirtyLog {
  readonly kind = 'type1-container' as const;
  readonly pageSize = 4096;
  readonly sharesDataChannel = false;
  constructor(private readonly t: DeviceTransport, readonly pages: number) {}
  // DIRTY_PAGES over vfio-user answers later (a Promise); the kernel's and the emulated container's at once.
  start(): Awaitable<void> { return this.t.containerDirty?.(true); }
  report(bitmap: Uint8Array): Awaitable<number> {
    const count = () => {
      let n = 0;
      for (let i = 0; i < Math.ceil(this.pages / 8); i++) for (let x = bitmap[i]; x; x &= x - 1) n++;
      return n;
    };
    const r = this.t.containerDirty?.('get', bitmap);
    return r instanceof Promise ? r.then(count) : count();
  }
  stop(): Awaitable<void> { return this.t.containerDirty?.(false); }
}

const adapters = new WeakMap<DeviceTransport, V1Device>();

/**
 * What the engine migrates, from what an embedder may pass: a MigDevice as is, a v1 DeviceTransport through its
 * (one, cached) V1Device adapter.
 */
export function asMigDevice(d: MigDevice | DeviceTransport): MigDevice {
  if ('caps' in d) return d;
  let a = adapters.get(d);
  if (!a) adapters.set(d, (a = new V1Device(d)));
  return a;
}
