// Config space save/restore as an embedder hook (issue 7 §1.6, docs/CONFIG.md). QEMU carries its VFIOPCIDevice
// vmstate (PCI config space with MSI/MSI-X state) in the device's CONFIG section, and the VMM owns that emulated
// config space: an embedder supplies the bytes itself on the source and takes them back on the destination. Hooks
// run on the main thread and may be async; without them each reach's default applies.
import { ErrorCode, MigError } from '../errors.js';
import { CONFIG_FLAG_EMBEDDER, MAX_CONFIG_BYTES, encodeConfigBlob } from '../protocol/config-blob.js';
import type { DeviceTableEntry } from '../container/format.js';

/** The device a hook is called for. */
export interface ConfigHookDevice {
  name: string;
  /** Its index in the migration (source) or in the stream's device table (destination). */
  index: number;
  /** The device object the embedder passed (source) or made (destination, `makeDestination`); for identity checks. */
  device: unknown;
  /** Destination: the stream's device-table entry. */
  entry?: DeviceTableEntry;
}

export interface ConfigHooks {
  /**
   * Source, when the device's CONFIG section is written (after stop-and-copy, the device stopped): the bytes to carry
   * (at most 64 KiB), or undefined for the reach's default (docs/CONFIG.md). The bytes are marked as the embedder's.
   */
  save?(device: ConfigHookDevice): Uint8Array | undefined | Promise<Uint8Array | undefined>;
  /**
   * Destination, when a device's CONFIG section has been loaded (before the device leaves RESUMING): its bytes.
   * Replaces the default restore for every device of the load; `restoreDefault()` applies the reach's default to these
   * bytes (only for bytes a default save wrote, else it rejects with VFM_LOAD_REJECTED).
   */
  restore?(device: ConfigHookDevice, bytes: Uint8Array, restoreDefault: () => Promise<void>): void | Promise<void>;
}

/** An embedder's hook failure: a MigError it threw keeps its code; anything else is VFM_CONFIG_HOOK. */
function hookError(e: unknown, device: string, which: 'save' | 'restore'): MigError {
  if (e instanceof MigError) return e;
  return new MigError(ErrorCode.CONFIG_HOOK, `config ${which} hook failed: ${(e as Error)?.message ?? String(e)}`, { device, cause: e });
}

/** The CONFIG blob a source writes: the hook's bytes (flagged as the embedder's) or the reach's default config space. */
export async function configBlob(hooks: ConfigHooks | undefined, dev: ConfigHookDevice,
  readDefault: () => Uint8Array | Promise<Uint8Array>): Promise<Uint8Array> {
  if (!hooks?.save) return encodeConfigBlob(await readDefault());
  let own: Uint8Array | undefined;
  try {
    own = await hooks.save(dev);
  } catch (e) {
    throw hookError(e, dev.name, 'save');
  }
  if (own === undefined) return encodeConfigBlob(await readDefault());
  if (!(own instanceof Uint8Array) || own.length > MAX_CONFIG_BYTES) {
    throw new MigError(ErrorCode.CONFIG_HOOK, `config save hook returned ${own instanceof Uint8Array ? `${own.length} bytes, more than the ${MAX_CONFIG_BYTES} a CONFIG section carries` : 'something that is not a Uint8Array'}`,
      { device: dev.name });
  }
  return encodeConfigBlob(own, CONFIG_FLAG_EMBEDDER);
}

/** Destination: give a loaded CONFIG section to the restore hook (`flags` from the blob; `offset` of the blob). */
export async function restoreWithHook(hooks: ConfigHooks, dev: ConfigHookDevice, bytes: Uint8Array, flags: number, offset: number,
  writeDefault: (b: Uint8Array) => void | Promise<void>): Promise<void> {
  const restoreDefault = async () => {
    if (flags & CONFIG_FLAG_EMBEDDER) {
      throw new MigError(ErrorCode.LOAD_REJECTED, 'restoreDefault(): the CONFIG section carries an embedder\'s bytes (a config save hook on the source), not the device\'s config space',
        { device: dev.name, offset });
    }
    await writeDefault(bytes);
  };
  try {
    await hooks.restore!(dev, bytes, restoreDefault);
  } catch (e) {
    throw hookError(e, dev.name, 'restore');
  }
}

/** API option check: `config` is an object whose save/restore are functions. */
export function checkConfigHooks(v: unknown): void {
  if (v === undefined) return;
  const bad = (m: string) => new MigError(ErrorCode.BAD_ARGUMENT, `config: ${m}`);
  if (v === null || typeof v !== 'object') throw bad('must be an object with save and/or restore functions');
  for (const k of ['save', 'restore'] as const) {
    const f = (v as Record<string, unknown>)[k];
    if (f !== undefined && typeof f !== 'function') throw bad(`${k} must be a function`);
  }
}
