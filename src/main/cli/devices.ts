// `--device <spec>` for run / save / load: devices reached elsewhere than in this process. Specs: vfio-user:<socket>,
// vfio:<sysfs path> (a kernel VFIO device: v2 through the kernel reach, else a v1 migration region through its group).
import { ErrorCode, MigError } from '../errors.js';
import { connectVfioUser } from '../reach/vfio-user/index.js';
import type { EngineDevice } from '../engine/source-device.js';
import { openKernelDevice } from '../reach/kernel/index.js';

export interface ReachFlags { vfuTimeout?: number; vfuWriteBound?: number }

export function collectDevice(v: string, prev: string[] = []): string[] {
  if (!/^(vfio-user|vfio):.+/.test(v)) throw new MigError(ErrorCode.BAD_ARGUMENT, `--device: '${v}' is not vfio-user:<socket path> or vfio:<sysfs path>`);
  return [...prev, v];
}

/** Connect every spec (in order); on any failure the ones already connected are closed. */
export async function openDevices(specs: string[], o: ReachFlags): Promise<EngineDevice[]> {
  const out: EngineDevice[] = [];
  try {
    for (const s of specs) {
      if (s.startsWith('vfio:')) {
        out.push(openKernelDevice(s.slice('vfio:'.length)));
        continue;
      }
      const path = s.slice('vfio-user:'.length);
      out.push(await connectVfioUser(path, { timeoutMs: o.vfuTimeout, writeBound: o.vfuWriteBound }));
    }
  } catch (e) {
    for (const t of out) await t.close();
    throw e;
  }
  return out;
}
