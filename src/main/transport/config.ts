// Writing a loaded config space back to a device, shared by the transports and the load worker (which gets only
// this plain descriptor across the thread boundary).
import { native, COPY_ALL } from '../../addon/native.js';

export type ConfigTarget = { kind: 'emulated'; id: number } | { kind: 'vfio-v1'; handle: number } | { kind: 'vfio-user'; handle: number };

const PCI_COMMAND = 4;

export function restoreConfig(t: ConfigTarget, space: Uint8Array): void {
  if (t.kind === 'emulated') native().emuConfigWrite(t.id, space);
  // A vfio-user device's config space is the server's own emulation: it takes the whole of it back.
  else if (t.kind === 'vfio-user') native().regionCopyIn(t.handle, 0, space.length, space, 0, COPY_ALL);
  // A kernel device gets PCI_COMMAND only: BARs and MSI/MSI-X belong to the VMM's own vmstate, as in QEMU.
  else native().regionCopyIn(t.handle, PCI_COMMAND, 2, space, PCI_COMMAND, COPY_ALL);
}
