// vfio-mig's vfio-user device server, in-process API: one emulated device (docs/EMULATED-DEVICE.md) served on a UNIX
// socket by a native thread (addon/src/vfio-user/server.cc), one client at a time. `vfio-mig device-server` runs one
// in its own process; tests and embedders can start them here.
import fs from 'node:fs';
import { native, type VfuServerStats } from '../../../addon/native.js';
import { ErrorCode, MigError } from '../../errors.js';
import { EmulatedDevice, type EmulatedDeviceOptions } from '../../emulated/device.js';

export interface DeviceServerOptions extends EmulatedDeviceOptions {
  /** UNIX socket path to listen on; it must not exist (nothing is replaced). */
  socket: string;
  /** max_data_xfer_size offered in VERSION (4 KiB .. 1 MiB, default 1 MiB). */
  maxDataXfer?: number;
  /** A message the client started must be complete within this (ms, default 5000); otherwise the client is dropped. */
  msgTimeoutMs?: number;
  /** Vendor faults injected into the emulated device (docs/EMULATED-DEVICE.md). */
  faults?: { kind: string; arg?: number }[];
}

export class DeviceServer {
  private stopped = false;
  private constructor(readonly device: EmulatedDevice, readonly socket: string, private readonly id: number) {}

  static start(o: DeviceServerOptions): DeviceServer {
    const profile = o.profile ?? 'linux-5.8';
    if (profile !== 'linux-5.8' && profile !== 'v2') {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `the device server serves linux-5.8 (v1 region) or v2 devices over vfio-user, not '${profile}'`);
    }
    if (fs.existsSync(o.socket)) throw new MigError(ErrorCode.BAD_ARGUMENT, `${o.socket} exists: the device server does not replace files`);
    const maxXfer = o.maxDataXfer ?? (1 << 20);
    const msgTimeout = o.msgTimeoutMs ?? 5000;
    if (!Number.isSafeInteger(maxXfer) || maxXfer < 4096 || maxXfer > (1 << 20)) throw new MigError(ErrorCode.BAD_ARGUMENT, `maxDataXfer ${maxXfer} (4 KiB .. 1 MiB)`);
    if (!Number.isSafeInteger(msgTimeout) || msgTimeout < 1) throw new MigError(ErrorCode.BAD_ARGUMENT, `msgTimeoutMs ${msgTimeout}`);
    const dev = new EmulatedDevice({ ...o, profile, name: o.name ?? o.socket });
    try {
      for (const f of o.faults ?? []) dev.setFault(f.kind, f.arg ?? 0);
      const id = native().vfuServerStart(dev.id, o.socket, maxXfer, msgTimeout);
      return new DeviceServer(dev, o.socket, id);
    } catch (e) {
      dev.destroy();
      const ne = e as { errno?: number; message?: string };
      throw new MigError(ErrorCode.IO, `cannot serve on ${o.socket}: ${ne.message}`, { errno: ne.errno, cause: e });
    }
  }

  stats(): VfuServerStats { return native().vfuServerStats(this.id); }

  /** Stop serving (the socket file is removed) and destroy the device. */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    native().vfuServerStop(this.id);
    this.device.destroy();
  }
}
