// Writing a loaded config space back to a device, shared by the transports and the load worker (which gets only
// this plain descriptor across the thread boundary).
import { native, COPY_ALL } from '../../addon/native.js';
import { ErrorCode, MigError } from '../errors.js';
import { CONFIG_FLAG_EMBEDDER, type ConfigBlob } from '../protocol/config-blob.js';

/** Where a load worker restores config; `hook`: nowhere, the bytes go back to the main thread's restore hook. */
export type ConfigTarget = { kind: 'emulated'; id: number } | { kind: 'vfio-v1'; handle: number } | { kind: 'vfio-user'; handle: number } | { kind: 'hook' };

/**
 * A loaded CONFIG blob in a load worker: the reach's default restore, or (target `hook`) the blob handed back for the
 * main thread's restore hook. An embedder's bytes never reach a default restore.
 */
export function applyConfig(t: ConfigTarget, blob: ConfigBlob, device: string, offset: number): ConfigBlob | undefined {
  if (t.kind === 'hook') return blob;
  if (blob.flags & CONFIG_FLAG_EMBEDDER) {
    throw new MigError(ErrorCode.LOAD_REJECTED,
      'the CONFIG section carries an embedder\'s bytes (a config save hook on the source): this load needs a config restore hook (LoadOptions.config.restore)',
      { device, offset });
  }
  restoreConfig(t, blob.bytes);
  return undefined;
}

const PCI_COMMAND = 4;

export function restoreConfig(t: ConfigTarget, space: Uint8Array): void {
  if (t.kind === 'hook') throw new MigError(ErrorCode.INTERNAL, 'restoreConfig: a hook target has no default restore');
  if (t.kind === 'emulated') native().emuConfigWrite(t.id, space);
  // A vfio-user device's config space is the server's own emulation: it takes the whole of it back.
  else if (t.kind === 'vfio-user') native().regionCopyIn(t.handle, 0, space.length, space, 0, COPY_ALL);
  // A kernel device gets PCI_COMMAND only: BARs and MSI/MSI-X belong to the VMM's own vmstate, as in QEMU.
  else native().regionCopyIn(t.handle, PCI_COMMAND, 2, space, PCI_COMMAND, COPY_ALL);
}
