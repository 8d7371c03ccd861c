// The kernel reach: a real VFIO device fd speaking migration v2, as the seam's V2Ops (one ioctl per call; the FSM
// walk, data-fd sessions and estimates are the v2 protocol's V2Device). Reached two ways:
// - embedded: the VMM hands over the device fd it holds (and its iommufd or container fd) plus its guest IOVA
//   ranges; vfio-mig opens nothing and never closes what it was handed (only the data fds the kernel gives it);
// - standalone (tools, CLI): opened by sysfs path through cdev + iommufd when the kernel offers it, else
//   group + container.
import fs from 'node:fs';
import { native } from '../../../addon/native.js';
import type { DeviceGeometry } from '../../container/format.js';
import type { ConfigTargetDesc, DataPathDesc } from '../../device/seam.js';
import { ErrorCode, MigError, nativeError } from '../../errors.js';
import { parseRegionInfo, type RegionInfo } from '../../protocol/region-info.js';
import { V2Device, type IovaRange, type V2Ops } from '../../protocol/v2/device.js';
import { fdPathDesc } from '../../protocol/v2/fd-path.js';
import { FEATURE, FEATURE_GET, FEATURE_SET } from '../../protocol/v2/uapi.js';
import { trace } from '../../trace.js';
import { restoreConfig, type ConfigTarget } from '../../transport/config.js';
import { resolveSysfs } from './sysfs.js';

export type { IovaRange };

/** What an embedding VMM hands over. vfio-mig uses these fds and never closes them. */
export interface KernelHandles {
  device: number;
  /** The VMM's iommufd (cdev path): kept with the device; v2 dirty tracking is the device's own DMA logging. */
  iommufd?: number;
  /** The VMM's type1 container fd (group path). */
  container?: number;
}

export interface KernelDeviceOptions {
  /** The guest IOVA ranges the device can DMA into: what DMA logging tracks (4 KiB aligned, at most 256). */
  guestRanges?: IovaRange[];
}

export interface OpenOptions extends KernelDeviceOptions {
  /** cdev + iommufd, group + container, or whichever the kernel offers (cdev first). */
  via?: 'auto' | 'cdev' | 'group';
}

export type ReachMode = 'embedded' | 'cdev' | 'group';
const PAGE = 4096;
const PCI_CONFIG_REGION_INDEX = 7;
// PROBE needs the op the feature takes: SET-only features are probed with SET, the others with GET.
const SET_FEATURES = new Set<number>([FEATURE.MIG_DEVICE_STATE, FEATURE.DMA_LOGGING_START, FEATURE.DMA_LOGGING_STOP]);

export class KernelVfioDevice implements V2Ops {
  readonly reach = 'kernel';
  private closed = false;
  private configHandle = -1;

  private constructor(
    readonly name: string,
    readonly mode: ReachMode,
    readonly handles: Readonly<KernelHandles>,
    /** fds this object opened itself (standalone): closed by close(). Empty in embedded mode. */
    private readonly owned: number[],
    private readonly ranges: readonly IovaRange[],
  ) {}

  /** Embedded in a VMM: use the fds it holds. Opens nothing. */
  static fromHandles(name: string, handles: KernelHandles, opts: KernelDeviceOptions = {}): KernelVfioDevice {
    if (!Number.isInteger(handles.device) || handles.device < 0) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, 'the device fd must be a non-negative integer', { device: name });
    }
    return new KernelVfioDevice(name, 'embedded', { ...handles }, [], checkRanges(name, opts.guestRanges));
  }

  /** Standalone: open by sysfs path (/sys/bus/pci/devices/<bdf> or /sys/bus/mdev/devices/<uuid>). */
  static open(sysfsPath: string, opts: OpenOptions = {}): KernelVfioDevice {
    const dev = resolveSysfs(sysfsPath);
    const via = opts.via ?? 'auto';
    const ranges = checkRanges(dev.name, opts.guestRanges);
    const n = native();
    if (via !== 'group' && dev.cdev) {
      try {
        const h = n.vfioOpenCdev(dev.cdev);
        trace('vfio_kernel_open', { device: dev.name, via: 'cdev', node: dev.cdev, ioas: h.ioasId });
        return new KernelVfioDevice(dev.name, 'cdev', { device: h.device, iommufd: h.iommufd }, [h.device, h.iommufd], ranges);
      } catch (e) {
        if (via === 'cdev' || !dev.group) throw nativeError(dev.name, `open ${dev.cdev} (cdev + iommufd)`, e);
        // auto: fall through to the group path
      }
    } else if (via === 'cdev') {
      throw new MigError(ErrorCode.BAD_ARGUMENT, 'the kernel offers no vfio cdev for this device', { device: dev.name });
    }
    if (!dev.group) throw new MigError(ErrorCode.BAD_ARGUMENT, 'the kernel offers no VFIO group for this device', { device: dev.name });
    try {
      const h = n.vfioOpenDevice(dev.group, dev.name);
      trace('vfio_kernel_open', { device: dev.name, via: 'group', node: dev.group });
      return new KernelVfioDevice(dev.name, 'group', { device: h.device, container: h.container }, [h.device, h.group, h.container], ranges);
    } catch (e) {
      throw nativeError(dev.name, `open ${dev.group} (group + container)`, e);
    }
  }

  private get fd(): number {
    if (this.closed) throw new MigError(ErrorCode.BAD_STATE, 'the kernel device is closed', { device: this.name });
    return this.handles.device;
  }

  // ---- V2Ops: one kernel call each; native errors carry the errno (V2Device names the arc / feature) ----------
  migrationFlags(): number { return native().vfioMigrationFlags(this.fd); }
  probe(feature: number): boolean { return native().vfioFeatureProbe(this.fd, feature, SET_FEATURES.has(feature) ? FEATURE_SET : FEATURE_GET); }
  getState(): number { return native().vfioMigState(this.fd); }
  setState(state: number): number { return native().vfioSetMigState(this.fd, state); }
  precopyInfo(dataFd: number) { return native().vfioPrecopyInfo(dataFd); }
  dataSize(): number { return native().vfioMigDataSize(this.fd); }
  dmaStart(pageSize: number, ranges: IovaRange[]): number { return native().vfioDmaLogStart(this.fd, pageSize, ranges); }
  dmaStop(): void { native().vfioDmaLogStop(this.fd); }
  dmaReport(iova: number, length: number, pageSize: number, bitmap: Uint8Array): void {
    native().vfioDmaLogReport(this.fd, iova, length, pageSize, bitmap);
  }
  reset(): void { native().vfioReset(this.fd); }
  closeFd(fd: number): void { native().fdClose(fd); }
  dataPath(fd: number): DataPathDesc { return fdPathDesc(this.name, fd); }
  guestRanges(): IovaRange[] { return [...this.ranges]; }

  /** PCI config space (up to 256 bytes; mtty's region is 255). */
  readConfig(): Uint8Array {
    const r = this.regionInfo(PCI_CONFIG_REGION_INDEX);
    return this.regionRead(PCI_CONFIG_REGION_INDEX, 0, Math.min(256, r.size));
  }
  writeConfig(space: Uint8Array): void { restoreConfig(this.configTarget() as ConfigTarget, space); }
  /** A region handle on the config space: restoreConfig writes PCI_COMMAND (BARs and MSI belong to the VMM). */
  configTarget(): ConfigTargetDesc {
    if (this.configHandle < 0) {
      const r = this.regionInfo(PCI_CONFIG_REGION_INDEX);
      this.configHandle = native().regionOpenFd(this.fd, r.offset, r.size, [], false);
    }
    return { kind: 'vfio-v1', handle: this.configHandle };
  }
  /** A kernel device's state size is the vendor's (MIG_DATA_SIZE estimates it); destinations are given, not made. */
  geometry(): DeviceGeometry {
    return { stateSize: 0, maxChunk: 0, dataMode: 'fd', offsetPolicy: 'fixed', guestPages: this.ranges.reduce((a, r) => a + r.length / PAGE, 0), regionSize: 0, migFlags: this.migrationFlags() };
  }
  digestTarget() { return null; }

  /** Close what this object opened (standalone). Handed-over fds stay open; data fds are V2Device's. */
  close(): void {
    if (this.closed) return;
    if (this.configHandle >= 0) { try { native().regionClose(this.configHandle); } catch { /* best effort */ } }
    this.configHandle = -1;
    this.closed = true;
    for (const fd of this.owned) { try { native().vfioClose(fd); } catch { /* best effort */ } }
  }

  // ---- device regions (BARs, config) through the device fd ----------------------------------------------------
  regionInfo(index: number): RegionInfo {
    try {
      return parseRegionInfo(native().vfioRegionInfo(this.fd, index), this.name);
    } catch (e) {
      throw nativeError(this.name, `VFIO_DEVICE_GET_REGION_INFO ${index}`, e);
    }
  }

  regionRead(index: number, off: number, len: number): Uint8Array {
    const r = this.regionInfo(index);
    if (off < 0 || len < 0 || off + len > r.size) throw new MigError(ErrorCode.BAD_ARGUMENT, `region ${index} [${off}, +${len}) is outside its ${r.size} bytes`, { device: this.name });
    const b = new Uint8Array(len);
    let got: number;
    try { got = fs.readSync(this.fd, b, 0, len, r.offset + off); } catch (e) { throw nativeError(this.name, `pread region ${index}`, e); }
    if (got !== len) throw new MigError(ErrorCode.NATIVE, `short read of region ${index}: ${got} of ${len}`, { device: this.name, offset: off });
    return b;
  }

  regionWrite(index: number, off: number, bytes: Uint8Array): void {
    const r = this.regionInfo(index);
    if (off < 0 || off + bytes.length > r.size) throw new MigError(ErrorCode.BAD_ARGUMENT, `region ${index} [${off}, +${bytes.length}) is outside its ${r.size} bytes`, { device: this.name });
    let put: number;
    try { put = fs.writeSync(this.fd, bytes, 0, bytes.length, r.offset + off); } catch (e) { throw nativeError(this.name, `pwrite region ${index}`, e); }
    if (put !== bytes.length) throw new MigError(ErrorCode.NATIVE, `short write of region ${index}: ${put} of ${bytes.length}`, { device: this.name, offset: off });
  }
}

/** A kernel VFIO v2 device behind the seam, standalone by sysfs path or embedded with the VMM's fds. */
export function kernelDevice(target: string | { name: string; handles: KernelHandles }, opts: OpenOptions = {}): V2Device {
  const ops = typeof target === 'string' ? KernelVfioDevice.open(target, opts) : KernelVfioDevice.fromHandles(target.name, target.handles, opts);
  try {
    return new V2Device(ops);
  } catch (e) {
    ops.close();
    throw e;
  }
}

function checkRanges(device: string, r: IovaRange[] | undefined): IovaRange[] {
  const out = [...(r ?? [])].sort((a, b) => a.iova - b.iova);
  if (out.length > 256) throw new MigError(ErrorCode.BAD_ARGUMENT, `${out.length} guest ranges (the kernel takes at most 256)`, { device });
  let end = 0;
  for (const x of out) {
    if (!Number.isSafeInteger(x.iova) || !Number.isSafeInteger(x.length) || x.length <= 0 || x.iova % PAGE || x.length % PAGE || x.iova < end) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `guest range {iova ${x.iova}, length ${x.length}} must be 4 KiB aligned, non-empty and not overlap`, { device });
    }
    end = x.iova + x.length;
  }
  return out;
}
