// Standalone reach: from a sysfs path (/sys/bus/pci/devices/<bdf> or /sys/bus/mdev/devices/<uuid>) to the device
// nodes the kernel offers: the cdev (/dev/vfio/devices/vfioN, with /dev/iommu) and/or the group (/dev/vfio/<N>).
import fs from 'node:fs';
import path from 'node:path';
import { ErrorCode, MigError } from '../../errors.js';

export interface SysfsDevice {
  /** The sysfs path as given (resolved). */
  sysfs: string;
  /** The bus-level name: PCI address or mdev UUID (what VFIO_GROUP_GET_DEVICE_FD takes). */
  name: string;
  bus: 'pci' | 'mdev';
  /** /dev/vfio/devices/vfioN when the kernel has VFIO_DEVICE_CDEV and /dev/iommu exists. */
  cdev?: string;
  /** /dev/vfio/<group> when the kernel has VFIO_GROUP. */
  group?: string;
}

const PCI_RE = /^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/i;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Resolve what a sysfs device path offers. `root` prefixes /dev (tests). */
export function resolveSysfs(sysfsPath: string, devRoot = '/dev'): SysfsDevice {
  const bad = (why: string) => new MigError(ErrorCode.BAD_ARGUMENT, `${sysfsPath}: ${why}`, { device: sysfsPath });
  const abs = path.resolve(sysfsPath);
  const m = /^\/sys\/bus\/(pci|mdev)\/devices\/([^/]+)\/?$/.exec(abs);
  if (!m) throw bad('not a VFIO device path (expected /sys/bus/pci/devices/<bdf> or /sys/bus/mdev/devices/<uuid>)');
  const bus = m[1] as 'pci' | 'mdev';
  const name = m[2]!;
  if (bus === 'pci' ? !PCI_RE.test(name) : !UUID_RE.test(name)) throw bad(`'${name}' is not a ${bus === 'pci' ? 'PCI address' : 'UUID'}`);
  if (!fs.existsSync(abs)) throw bad('no such device');
  const dev: SysfsDevice = { sysfs: abs, name, bus };
  try {
    const vfioDev = fs.readdirSync(path.join(abs, 'vfio-dev')).find((n) => /^vfio\d+$/.test(n));
    const node = vfioDev && path.join(devRoot, 'vfio/devices', vfioDev);
    if (node && fs.existsSync(node) && fs.existsSync(path.join(devRoot, 'iommu'))) dev.cdev = node;
  } catch { /* no vfio-dev: the kernel has no VFIO_DEVICE_CDEV or the device is not bound to a vfio driver */ }
  try {
    const g = path.basename(fs.readlinkSync(path.join(abs, 'iommu_group')));
    const node = path.join(devRoot, 'vfio', g);
    if (fs.existsSync(node)) dev.group = node;
  } catch { /* no IOMMU group */ }
  if (!dev.cdev && !dev.group) throw bad('not bound to a VFIO driver (neither a vfio cdev nor a /dev/vfio group node exists)');
  return dev;
}
