// TypeScript face of the emulated vendor device (the device itself is native: addon/src/emu, spec in
// docs/EMULATED-DEVICE.md). Options are validated here with clear errors before anything is allocated natively.
import { createHash } from 'node:crypto';
import { native, NATIVE_DATA_MODE, NATIVE_OFFSET_POLICY, NATIVE_PROFILE, type EmuInfo } from '../../addon/native.js';
import { ErrorCode, MigError, toMigError } from '../errors.js';
import type { ProfileName } from '../protocol/profiles.js';

export type DataMode = keyof typeof NATIVE_DATA_MODE;
export type OffsetPolicy = keyof typeof NATIVE_OFFSET_POLICY;

export interface EmulatedDeviceOptions {
  name?: string;
  /** A v1 region layout, or 'v2' (feature ioctls + a data fd; docs/EMULATED-DEVICE.md "v2"). */
  profile?: ProfileName | 'v2';
  /** v2: VFIO_MIGRATION_* flags the device advertises (1 STOP_COPY required, 2 P2P, 4 PRE_COPY; default 7). */
  migFlags?: number;
  stateSize?: number;
  seed?: number;
  zeroFill?: boolean;
  maxChunk?: number;
  dataMode?: DataMode;
  offsetPolicy?: OffsetPolicy;
  dirtyRate?: number;
  guestPages?: number;
  dmaRate?: number;
  reservedBits?: number;
  /**
   * v1: size of the data area in bytes (a multiple of 4096, up to 1 GiB). Default: round_up(2 x maxChunk). A smaller
   * one stages chunks of at most its size (a device that can save needs 8 KiB) and, as a destination, takes a bigger
   * source's data packets in several writes.
   */
  dataArea?: number;
}

export const EMU_DEFAULTS = {
  profile: 'linux-5.8' as ProfileName | 'v2', migFlags: 7, stateSize: 64 << 20, seed: 1, maxChunk: 1 << 20, dataMode: 'mmap' as DataMode,
  offsetPolicy: 'fixed' as OffsetPolicy, dirtyRate: 2000, guestPages: 4096, dmaRate: 1000, reservedBits: 0, dataArea: 0,
};

let nameCounter = 0;

export class EmulatedDevice {
  readonly id: number;
  readonly name: string;
  readonly opts: Required<Omit<EmulatedDeviceOptions, 'name'>>;
  private destroyed = false;

  constructor(o: EmulatedDeviceOptions = {}) {
    const opts = { ...EMU_DEFAULTS, zeroFill: false, ...o };
    delete (opts as EmulatedDeviceOptions).name;
    this.name = o.name ?? `emu${nameCounter++}`;
    const bad = (m: string) => new MigError(ErrorCode.BAD_ARGUMENT, m, { device: this.name });
    if (!(opts.profile in NATIVE_PROFILE)) throw bad(`unknown profile '${opts.profile}'`);
    if (!(opts.dataMode in NATIVE_DATA_MODE)) throw bad(`unknown data mode '${opts.dataMode}' (mmap, trapped, mixed)`);
    if (!(opts.offsetPolicy in NATIVE_OFFSET_POLICY)) throw bad(`unknown data_offset policy '${opts.offsetPolicy}' (fixed, moving)`);
    if (!Number.isSafeInteger(opts.stateSize) || opts.stateSize < 8192 || opts.stateSize > 2 ** 36 || opts.stateSize % 4096) {
      throw bad(`state size ${opts.stateSize} must be a multiple of 4096 between 8 KiB and 64 GiB`);
    }
    if (!Number.isSafeInteger(opts.maxChunk) || opts.maxChunk < 8192 || opts.maxChunk > (64 << 20) || opts.maxChunk % 4096) {
      throw bad(`chunk size ${opts.maxChunk} must be a multiple of 4096 between 8 KiB and 64 MiB`);
    }
    for (const k of ['dirtyRate', 'dmaRate'] as const) {
      if (!Number.isFinite(opts[k]) || opts[k] < 0 || opts[k] > 1e7) throw bad(`${k} ${opts[k]} must be 0..1e7 pages/s`);
    }
    if (!Number.isInteger(opts.migFlags) || opts.migFlags < 1 || opts.migFlags > 7 || !(opts.migFlags & 1)) {
      throw bad(`migFlags ${opts.migFlags} must include STOP_COPY (1) and be at most 7`);
    }
    if (!Number.isSafeInteger(opts.dataArea) || opts.dataArea < 0 || opts.dataArea > 2 ** 30 || opts.dataArea % 4096 || (opts.dataArea && opts.profile === 'v2')) {
      throw bad(`data area ${opts.dataArea} must be a multiple of 4096 up to 1 GiB (v1 profiles only; 0 = 2 x chunk size)`);
    }
    if (!Number.isSafeInteger(opts.guestPages) || opts.guestPages < 1 || opts.guestPages > 1 << 24) throw bad(`guestPages ${opts.guestPages} out of range`);
    this.opts = opts as EmulatedDevice['opts'];
    this.id = native().emuCreate({
      profile: NATIVE_PROFILE[opts.profile], stateSize: opts.stateSize, seed: opts.seed >>> 0, zeroFill: opts.zeroFill,
      maxChunk: opts.maxChunk, dataMode: NATIVE_DATA_MODE[opts.dataMode], offsetPolicy: NATIVE_OFFSET_POLICY[opts.offsetPolicy],
      dirtyRate: opts.dirtyRate, guestPages: opts.guestPages, dmaRate: opts.dmaRate, reservedBits: opts.reservedBits >>> 0, migFlags: opts.migFlags,
      dataArea: opts.dataArea,
    });
  }

  info(): EmuInfo { return native().emuInfo(this.id); }
  /** Inject a vendor fault (docs/EMULATED-DEVICE.md); an unknown kind is VFM_BAD_ARGUMENT. */
  setFault(kind: string, arg = 0): void {
    try { native().emuSetFault(this.id, kind, arg); } catch (e) { throw toMigError(e, { device: this.name }); }
  }
  clearFault(): void { native().emuSetFault(this.id, '', 0); }
  reset(): void { native().emuReset(this.id); }
  touch(off: number, value: number): void { native().emuTouch(this.id, off, value); }

  /** The geometry a destination needs to be created identical (recorded in the container's device table). */
  geometry() {
    const i = this.info();
    return {
      stateSize: this.opts.stateSize, maxChunk: this.opts.maxChunk, dataMode: this.opts.dataMode,
      offsetPolicy: this.opts.offsetPolicy, guestPages: this.opts.guestPages, regionSize: i.regionSize,
    };
  }

  destroy(): void {
    if (!this.destroyed) native().emuDestroy(this.id);
    this.destroyed = true;
  }
}

/** sha256 over config space and state, read in 4 MiB pieces (runs on any thread; workers do it in parallel). */
export function emulatedDigest(id: number, stateSize: number, scratch?: Uint8Array): string {
  const h = createHash('sha256');
  const cfg = new Uint8Array(256);
  native().emuConfigRead(id, cfg);
  h.update(cfg);
  const buf = scratch ?? new Uint8Array(4 << 20);
  for (let off = 0; off < stateSize; off += buf.length) {
    const n = Math.min(buf.length, stateSize - off);
    const view = buf.subarray(0, n);
    native().emuReadState(id, off, view);
    h.update(view);
  }
  return 'sha256:' + h.digest('hex');
}
