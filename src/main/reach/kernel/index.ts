// The kernel reach (docs/KERNEL.md): registers itself with the seam. A kernel destination is never made from a
// device table: the operator names it (`--device vfio:<sysfs path>`) or the embedder hands it over.
import { registerReach } from '../../device/registry.js';
import { ErrorCode, MigError } from '../../errors.js';

export { KernelVfioDevice, kernelDevice, type KernelHandles, type KernelDeviceOptions, type OpenOptions, type IovaRange } from './device.js';
export { resolveSysfs, type SysfsDevice } from './sysfs.js';

registerReach({
  kind: 'kernel',
  destination(entry) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, 'a kernel VFIO destination must be named (--device vfio:<sysfs path>, or handed over by the embedder)', { device: entry.name });
  },
});
