// `--device <spec>` for run / save / load: devices reached elsewhere than in this process. Specs: vfio-user:<socket>,
// vfio:<sysfs path> (a kernel VFIO device: v2 through the kernel reach, else a v1 migration region through its group).
import { ErrorCode, MigError } from '../errors.js';
import { connectVfioUser } from '../reach/vfio-user/index.js';
import type { EngineDevice } from '../engine/source-device.js';
import { kernelDevice } from '../reach/kernel/device.js';
import { resolveSysfs } from '../reach/kernel/sysfs.js';
import { VfioKernelTransport } from '../transport/vfio-kernel.js';

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
        out.push(openKernel(s.slice('vfio:'.length)));
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

/** A kernel device by sysfs path: migration v2 when the driver has it, else the v1 region (Linux 5.8-5.17). */
function openKernel(sysfs: string): EngineDevice {
  try {
    return kernelDevice(sysfs);
  } catch (e) {
    if ((e as MigError).code !== ErrorCode.NO_MIGRATION_REGION) throw e;
    const d = resolveSysfs(sysfs);
    if (!d.group) throw e;
    return new VfioKernelTransport(d.group, d.name);
  }
}
