// `--device <spec>` for run / save / load: devices reached elsewhere than in this process. Specs: vfio-user:<socket>.
import { ErrorCode, MigError } from '../errors.js';
import { VfioUserTransport } from '../reach/vfio-user/transport.js';
import type { DeviceTransport } from '../transport/transport.js';

export interface ReachFlags { vfuTimeout?: number; vfuWriteBound?: number }

export function collectDevice(v: string, prev: string[] = []): string[] {
  if (!/^vfio-user:.+/.test(v)) throw new MigError(ErrorCode.BAD_ARGUMENT, `--device: '${v}' is not vfio-user:<socket path>`);
  return [...prev, v];
}

/** Connect every spec (in order); on any failure the ones already connected are closed. */
export async function openDevices(specs: string[], o: ReachFlags): Promise<DeviceTransport[]> {
  const out: DeviceTransport[] = [];
  try {
    for (const s of specs) {
      const path = s.slice('vfio-user:'.length);
      out.push(await VfioUserTransport.connect(path, { timeoutMs: o.vfuTimeout, writeBound: o.vfuWriteBound }));
    }
  } catch (e) {
    for (const t of out) t.close();
    throw e;
  }
  return out;
}
