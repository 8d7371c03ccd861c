// Transport to a real kernel VFIO device with the v1 migration region (Linux 5.8-5.17) or a 2019-draft vendor
// driver (region type 2). Real ioctls through the addon (addon/src/vfio), region discovery through the capability
// chain, pread/pwrite on the device fd and mmap of the sparse areas. No hardware exists on the build machines; the
// parsing and access code it shares with the emulated transport is what the tests exercise.
import { native, type VfioDeviceHandles } from '../../addon/native.js';
import { ErrorCode, MigError, nativeError } from '../errors.js';
import { MigrationRegion } from '../protocol/migration-region.js';
import { PROFILE_DEFS, type ProfileDef } from '../protocol/profiles.js';
import { findRegionByType, parseRegionInfo, type RegionInfo } from '../protocol/region-info.js';
import type { DeviceTransport } from './transport.js';
import { restoreConfig } from './config.js';

const VFIO_PCI_CONFIG_REGION_INDEX = 7;

export interface VfioKernelOptions {
  /** The guest RAM range the VMM mapped for this device (IOVA), for type1 dirty-page tracking (linux-5.8 devices). */
  guest?: { iova: number; size: number };
}

export class VfioKernelTransport implements DeviceTransport {
  readonly kind = 'vfio-v1' as const;
  readonly profile: ProfileDef;
  readonly guestPages: number;
  private readonly fds: VfioDeviceHandles;
  /** Embedded: the fds were handed over by the VMM; close() leaves them open. */
  private readonly borrowed: boolean;
  private readonly mig: RegionInfo;
  private regionHandle = -1;
  private configHandle = -1;

  /**
   * Standalone: `groupPath` like /dev/vfio/42 (opened here, with a new container), `name` the PCI address like
   * 0000:65:00.1. Embedded: the VMM's `{ device, container }` fds; nothing is opened and close() leaves them open.
   */
  constructor(private readonly groupPath: string | { device: number; container?: number }, readonly name: string, private readonly opts: VfioKernelOptions = {}) {
    const n = native();
    const g = opts.guest;
    if (g && (!Number.isSafeInteger(g.iova) || !Number.isSafeInteger(g.size) || g.size <= 0 || g.iova % 4096 || g.size % 4096)) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, 'guest range must be 4 KiB aligned and non-empty', { device: name });
    }
    this.guestPages = g ? g.size / 4096 : 0;
    this.borrowed = typeof groupPath !== 'string';
    if (typeof groupPath !== 'string') {
      if (!Number.isInteger(groupPath.device) || groupPath.device < 0) throw new MigError(ErrorCode.BAD_ARGUMENT, 'the device fd must be a non-negative integer', { device: name });
      this.fds = { device: groupPath.device, container: groupPath.container ?? -1, group: -1 };
    } else {
      try {
        this.fds = n.vfioOpenDevice(groupPath, name);
      } catch (e) {
        throw new MigError(ErrorCode.NATIVE, `cannot open VFIO device via ${groupPath}: ${(e as Error).message}`, { device: name, cause: e });
      }
    }
    let info;
    try {
      info = n.vfioDeviceInfo(this.fds.device);
    } catch (e) {
      this.close();
      throw nativeError(name, 'VFIO_DEVICE_GET_INFO', e);
    }
    const get = (i: number) => n.vfioRegionInfo(this.fds.device, i);
    // Merged v1 uses type 3; the 2019 drafts used type 2.
    const merged = findRegionByType(info.numRegions, get, PROFILE_DEFS['linux-5.8'].regionType, 1, name);
    const draft = merged ? undefined : findRegionByType(info.numRegions, get, PROFILE_DEFS['draft-2019'].regionType, 1, name);
    const found = merged ?? draft;
    if (!found) {
      this.close();
      throw new MigError(ErrorCode.NO_MIGRATION_REGION, "VFIO device doesn't support migration (no v1 migration region)", { device: name });
    }
    this.mig = found;
    this.profile = merged ? PROFILE_DEFS['linux-5.8'] : PROFILE_DEFS['draft-2019'];
  }

  /** Standalone: the group and device name; embedded: the device fd the VMM handed over. */
  claimKey(): string {
    return typeof this.groupPath === 'string' ? `vfio:${this.groupPath}:${this.name}` : `vfio-fd:${this.groupPath.device}`;
  }

  openRegion(): MigrationRegion {
    if (this.regionHandle < 0) {
      this.regionHandle = native().regionOpenFd(this.fds.device, this.mig.offset, this.mig.size, this.mig.sparse ?? [],
        (this.mig.flags & 4) !== 0);
    }
    return new MigrationRegion({ device: this.name, handle: this.regionHandle, profile: this.profile, size: this.mig.size });
  }

  private config(): number {
    if (this.configHandle < 0) {
      const info = parseRegionInfo(native().vfioRegionInfo(this.fds.device, VFIO_PCI_CONFIG_REGION_INDEX), this.name);
      this.configHandle = native().regionOpenFd(this.fds.device, info.offset, info.size, [], false);
    }
    return this.configHandle;
  }

  readConfig(): Uint8Array {
    const b = new Uint8Array(256);
    native().regionCopyOut(this.config(), 0, 256, b, 0);
    return b;
  }

  writeConfig(b: Uint8Array): void {
    restoreConfig(this.configTarget(), b);
  }

  configTarget() { return { kind: 'vfio-v1' as const, handle: this.config() }; }

  /** Type1 container dirty tracking (VFIO_IOMMU_DIRTY_PAGES) over the guest range given at construction. */
  containerDirty(op: boolean | 'get', bitmap?: Uint8Array): void {
    const g = this.opts.guest;
    if (!g) return;
    if (this.fds.container < 0) throw new MigError(ErrorCode.BAD_ARGUMENT, 'type1 dirty tracking needs the container fd', { device: this.name });
    try {
      native().vfioDirtyPages(this.fds.container, op === 'get' ? 4 : op ? 1 : 2, g.iova, g.size, 4096, bitmap);
    } catch (e) {
      throw new MigError(ErrorCode.NATIVE, `VFIO_IOMMU_DIRTY_PAGES: ${(e as Error).message}`, { device: this.name, errno: (e as { errno?: number }).errno, cause: e });
    }
  }
  reset(): void { native().vfioReset(this.fds.device); }
  digestTarget() { return null; }

  /** What the device table can say of a kernel device: its migration region (the state size is the vendor's). */
  geometry() {
    return { stateSize: 0, maxChunk: 0, dataMode: this.mig.sparse?.length ? 'mmap' : 'trapped', offsetPolicy: 'fixed', guestPages: this.guestPages, regionSize: this.mig.size };
  }


  close(): void {
    const n = native();
    if (this.regionHandle >= 0) n.regionClose(this.regionHandle);
    if (this.configHandle >= 0) n.regionClose(this.configHandle);
    this.regionHandle = this.configHandle = -1;
    if (this.borrowed) return;
    for (const fd of [this.fds?.device, this.fds?.group, this.fds?.container]) if (fd !== undefined && fd >= 0) n.vfioClose(fd);
  }
}
