// The kernel reach: a real VFIO device fd speaking migration v2 (VFIO_DEVICE_FEATURE), reached two ways:
// - embedded: the VMM hands over the device fd it holds (and its iommufd or container fd) plus its guest IOVA
//   ranges; vfio-mig opens nothing and never closes what it was handed (only the data fds the kernel gives it);
// - standalone (tools, CLI): opened by sysfs path through cdev + iommufd when the kernel offers it, else
//   group + container.
// Every kernel call is one ioctl/read/write in the addon (addon/src/vfio/v2.cc); errors name the device.
import fs from 'node:fs';
import { native } from '../../../addon/native.js';
import { ErrorCode, MigError, nativeError } from '../../errors.js';
import { parseRegionInfo, type RegionInfo } from '../../protocol/region-info.js';
import { trace } from '../../trace.js';
import { resolveSysfs } from './sysfs.js';
import { Feature, MigFlag, V2State, v2StateName } from './uapi.js';

export interface IovaRange { iova: number; length: number }

/** What an embedding VMM hands over. vfio-mig uses these fds and never closes them. */
export interface KernelHandles {
  device: number;
  /** The VMM's iommufd (cdev path) — kept for the embedder's IOMMU, not used for device DMA logging. */
  iommufd?: number;
  /** The VMM's type1 container fd (group path), for v1 devices' VFIO_IOMMU_DIRTY_PAGES. */
  container?: number;
}

export interface KernelDeviceOptions {
  /** The guest IOVA ranges the device can DMA into: what DMA logging tracks (page aligned). */
  guestRanges?: IovaRange[];
}

export interface OpenOptions extends KernelDeviceOptions {
  /** cdev + iommufd, group + container, or whichever the kernel offers (cdev first). */
  via?: 'auto' | 'cdev' | 'group';
}

export type ReachMode = 'embedded' | 'cdev' | 'group';
const PAGE = 4096;

export class KernelVfioDevice {
  private dataFd = -1;
  private flagsCache?: number;
  private closed = false;
  private logging = false;
  private logPage = PAGE;

  private constructor(
    readonly name: string,
    readonly mode: ReachMode,
    readonly handles: Readonly<KernelHandles>,
    /** fds this object opened itself (standalone): closed by close(). Empty in embedded mode. */
    private readonly owned: number[],
    readonly guestRanges: readonly IovaRange[],
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

  private call<T>(what: string, f: () => T): T {
    if (this.closed) throw new MigError(ErrorCode.BAD_STATE, `${what} after close`, { device: this.name });
    try {
      return f();
    } catch (e) {
      throw nativeError(this.name, what, e);
    }
  }

  /** VFIO_MIGRATION_* flags; a device without v2 migration is refused with a clear error. */
  migrationFlags(): number {
    if (this.flagsCache === undefined) {
      try {
        this.flagsCache = this.call('VFIO_DEVICE_FEATURE GET MIGRATION', () => native().vfioMigrationFlags(this.handles.device));
      } catch (e) {
        if ((e as MigError).errno === 25 /* ENOTTY */) {
          throw new MigError(ErrorCode.NO_MIGRATION_REGION, 'VFIO migration v2 is not supported by this device or kernel (ENOTTY)', { device: this.name, cause: e });
        }
        throw e;
      }
      if (!(this.flagsCache & MigFlag.STOP_COPY)) {
        throw new MigError(ErrorCode.VENDOR_BAD_VALUE, 'migration flags lack the mandatory STOP_COPY', { device: this.name, value: this.flagsCache });
      }
    }
    return this.flagsCache;
  }

  get hasPreCopy(): boolean { return (this.migrationFlags() & MigFlag.PRE_COPY) !== 0; }
  get hasP2P(): boolean { return (this.migrationFlags() & MigFlag.P2P) !== 0; }

  /** PROBE a feature with GET and/or SET (e.g. DMA logging support). */
  probe(feature: number, op: 'get' | 'set'): boolean {
    return this.call(`PROBE feature ${feature}`, () => native().vfioFeatureProbe(this.handles.device, feature, op === 'get' ? Feature.GET : Feature.SET));
  }

  state(): V2State {
    return this.call('GET MIG_DEVICE_STATE', () => native().vfioMigState(this.handles.device)) as V2State;
  }

  /**
   * One SET MIG_DEVICE_STATE. A returned data fd starts a new session (the old one is closed); arcs that leave the
   * saving/resuming group end the session. Returns whether a new data fd came back.
   */
  setState(target: V2State): boolean {
    const from = this.state();
    let fd: number;
    try {
      fd = this.call(`SET MIG_DEVICE_STATE ${v2StateName(target)}`, () => native().vfioSetMigState(this.handles.device, target));
    } catch (e) {
      const after = this.safeState();
      trace('vfio_migration_set_state_failed', { device: this.name, from: v2StateName(from), to: v2StateName(target), after: v2StateName(after) });
      throw new MigError(after === V2State.ERROR ? ErrorCode.DEVICE_ERROR_STATE : ErrorCode.TRANSITION_FAILED,
        `${v2StateName(from)} -> ${v2StateName(target)} refused (now ${v2StateName(after)}): ${(e as Error).message}`,
        { device: this.name, errno: (e as MigError).errno, cause: e });
    }
    trace('vfio_migration_set_state', { device: this.name, from: v2StateName(from), to: v2StateName(target), dataFd: fd >= 0 });
    if (fd >= 0) {
      this.closeData();
      this.dataFd = fd;
    } else if (target === V2State.STOP || target === V2State.RUNNING || target === V2State.RUNNING_P2P) {
      this.closeData();
    }
    return fd >= 0;
  }

  private safeState(): number {
    try { return native().vfioMigState(this.handles.device); } catch { return -1; }
  }

  /** The current session's data fd (-1: none). */
  get data(): number { return this.dataFd; }

  private needData(what: string): number {
    if (this.dataFd < 0) throw new MigError(ErrorCode.BAD_STATE, `${what}: no migration data session is open`, { device: this.name });
    return this.dataFd;
  }

  /** VFIO_MIG_GET_PRECOPY_INFO (PRE_COPY / PRE_COPY_P2P only). */
  precopyInfo(): { initialBytes: number; dirtyBytes: number } {
    const fd = this.needData('PRECOPY_INFO');
    return this.call('VFIO_MIG_GET_PRECOPY_INFO', () => native().vfioPrecopyInfo(fd));
  }

  /** MIG_DATA_SIZE: the driver's estimate of the STOP_COPY size. */
  stopCopySize(): number {
    return this.call('GET MIG_DATA_SIZE', () => native().vfioMigDataSize(this.handles.device));
  }

  /** One read() of the data fd: bytes, 0 at the end, or 0 with `again` when PRE_COPY has nothing more for now. */
  read(buf: Uint8Array, off = 0, len = buf.length - off): { n: number; again: boolean } {
    const fd = this.needData('read');
    const n = this.call('read(data fd)', () => native().vfioDataRead(fd, buf, off, len));
    return n < 0 ? { n: 0, again: true } : { n, again: false };
  }

  /** write() all bytes to the resuming data fd; `streamOffset` names where the bytes came from in errors. */
  write(buf: Uint8Array, off = 0, len = buf.length - off, streamOffset?: number): void {
    const fd = this.needData('write');
    try {
      native().vfioDataWrite(fd, buf, off, len);
    } catch (e) {
      const ne = e as { errno?: number; message?: string };
      throw new MigError(ErrorCode.LOAD_REJECTED, `the driver refused the device data (${ne.message ?? e})`,
        { device: this.name, offset: streamOffset, errno: ne.errno, cause: e });
    }
  }

  /** DMA_LOGGING_START over the guest ranges given at construction. Returns the page size the driver chose. */
  dmaLogStart(pageSize = PAGE): number {
    if (!this.guestRanges.length) throw new MigError(ErrorCode.BAD_ARGUMENT, 'DMA logging needs the guest IOVA ranges', { device: this.name });
    this.logPage = this.call('DMA_LOGGING_START', () => native().vfioDmaLogStart(this.handles.device, pageSize, [...this.guestRanges]));
    this.logging = true;
    return this.logPage;
  }

  /** DMA_LOGGING_REPORT of one guest range: a bitmap with one bit per page (the kernel clears its log). */
  dmaLogReport(range: IovaRange = this.guestRanges[0]!, pageSize = this.logPage): Uint8Array {
    const bitmap = new Uint8Array(Math.ceil(range.length / pageSize / 64) * 8);
    this.call('DMA_LOGGING_REPORT', () => native().vfioDmaLogReport(this.handles.device, range.iova, range.length, pageSize, bitmap));
    return bitmap;
  }

  dmaLogStop(): void {
    this.call('DMA_LOGGING_STOP', () => native().vfioDmaLogStop(this.handles.device));
    this.logging = false;
  }

  /** VFIO_DEVICE_RESET: the way out of ERROR and of a refused RESUMING session; the device returns to RUNNING. */
  reset(): void {
    this.closeData();
    this.call('VFIO_DEVICE_RESET', () => native().vfioReset(this.handles.device));
    trace('vfio_device_reset', { device: this.name });
  }

  regionInfo(index: number): RegionInfo {
    return parseRegionInfo(this.call(`GET_REGION_INFO ${index}`, () => native().vfioRegionInfo(this.handles.device, index)), this.name);
  }

  /** pread of a region (config space, BARs) at `off`. */
  regionRead(index: number, off: number, len: number): Uint8Array {
    const r = this.regionInfo(index);
    if (off < 0 || len < 0 || off + len > r.size) throw new MigError(ErrorCode.BAD_ARGUMENT, `region ${index} [${off}, +${len}) is outside its ${r.size} bytes`, { device: this.name });
    const b = new Uint8Array(len);
    const got = this.call(`pread region ${index}`, () => fs.readSync(this.handles.device, b, 0, len, r.offset + off));
    if (got !== len) throw new MigError(ErrorCode.NATIVE, `short read of region ${index}: ${got} of ${len}`, { device: this.name, offset: off });
    return b;
  }

  regionWrite(index: number, off: number, bytes: Uint8Array): void {
    const r = this.regionInfo(index);
    if (off < 0 || off + bytes.length > r.size) throw new MigError(ErrorCode.BAD_ARGUMENT, `region ${index} [${off}, +${bytes.length}) is outside its ${r.size} bytes`, { device: this.name });
    const put = this.call(`pwrite region ${index}`, () => fs.writeSync(this.handles.device, bytes, 0, bytes.length, r.offset + off));
    if (put !== bytes.length) throw new MigError(ErrorCode.NATIVE, `short write of region ${index}: ${put} of ${bytes.length}`, { device: this.name, offset: off });
  }

  private closeData(): void {
    if (this.dataFd >= 0) {
      try { native().vfioClose(this.dataFd); } catch { /* already gone with the session */ }
      this.dataFd = -1;
    }
  }

  /** Close the data session and, in standalone mode only, the fds opened here. Handed-over fds stay open. */
  close(): void {
    if (this.closed) return;
    if (this.logging) { try { this.dmaLogStop(); } catch { /* best effort */ } }
    this.closeData();
    this.closed = true;
    for (const fd of this.owned) { try { native().vfioClose(fd); } catch { /* best effort */ } }
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
