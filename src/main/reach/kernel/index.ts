// The kernel reach (docs/KERNEL.md): registers itself with the seam under the spec scheme `vfio`. A kernel
// destination is a device that exists on this host: named by the caller (`load --device vfio:<sysfs path>`, the
// loader's `destinations`), else the device of the stream entry's own name (a PCI address or an mdev UUID: what a
// management layer recreates on the destination, as libvirt does for mdevs), opened standalone.
import type { DeviceTableEntry } from '../../container/format.js';
import { registerReach } from '../../device/registry.js';
import type { MigDevice } from '../../device/seam.js';
import type { EngineDevice } from '../../engine/source-device.js';
import { ErrorCode, MigError } from '../../errors.js';
import { VfioKernelTransport } from '../../transport/vfio-kernel.js';
import { kernelDevice, type OpenOptions } from './device.js';
import { resolveSysfs } from './sysfs.js';

export { KernelVfioDevice, kernelDevice, type KernelHandles, type KernelDeviceOptions, type OpenOptions, type IovaRange } from './device.js';
export { resolveSysfs, type SysfsDevice } from './sysfs.js';

/** A kernel device by sysfs path: migration v2 when the driver has it, else the v1 region (Linux 5.8-5.17). */
export function openKernelDevice(sysfs: string, opts: OpenOptions = {}): EngineDevice {
  try {
    return kernelDevice(sysfs, opts);
  } catch (e) {
    if ((e as MigError).code !== ErrorCode.NO_MIGRATION_REGION) throw e;
    const d = resolveSysfs(sysfs);
    if (!d.group) throw e;
    return new VfioKernelTransport(d.group, d.name);
  }
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const PCI_RE = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/i;

/** Where a stream entry's kernel device is on this host when nobody says: the device of the same name. */
export function defaultSysfsPath(entry: DeviceTableEntry): string {
  if (UUID_RE.test(entry.name)) return `/sys/bus/mdev/devices/${entry.name}`;
  if (PCI_RE.test(entry.name)) return `/sys/bus/pci/devices/${entry.name}`;
  throw new MigError(ErrorCode.BAD_ARGUMENT,
    `'${entry.name}' is neither a PCI address nor an mdev UUID: name the kernel destination (--device vfio:<sysfs path>, or the loader's destinations)`,
    { device: entry.name });
}

/** The kernel reach's destination for a stream entry: v2 through the seam, a v1 stream into the v1 region. */
export function kernelDestination(entry: DeviceTableEntry, target?: string): MigDevice {
  const sysfs = target ?? defaultSysfsPath(entry);
  if (entry.profile === 'v2') return kernelDevice(sysfs);
  // A v1 stream (linux-5.8 / draft-2019) goes into the v1 region. The loader takes a v1 transport as well as a seam
  // device (it tells them apart by `caps`) until v1 devices are behind MigDevice.
  return openKernelDevice(sysfs) as unknown as MigDevice;
}

registerReach({ kind: 'kernel', scheme: 'vfio', destination: kernelDestination });
