// The emulated reach for a v2 device: the seam's V2Ops as calls into the in-process vendor (addon/src/emu/v2.cc),
// which answers exactly as a kernel v2 driver would (same errnos, a real data fd).
import { native } from '../../../addon/native.js';
import type { DeviceGeometry, DeviceTableEntry } from '../../container/format.js';
import { registerReach } from '../../device/registry.js';
import type { ConfigTargetDesc, DataPathDesc } from '../../device/seam.js';
import { EmulatedDevice, type EmulatedDeviceOptions } from '../../emulated/device.js';
import { V2Device, type IovaRange, type V2Ops } from '../../protocol/v2/device.js';
import { fdPathDesc } from '../../protocol/v2/fd-path.js';
import { restoreConfig } from '../../transport/config.js';
import { EmulatedTransport } from '../../transport/emulated.js';

export class EmulatedV2Ops implements V2Ops {
  readonly reach = 'emulated';
  stallMs?: number;
  constructor(readonly device: EmulatedDevice) {}
  get name(): string { return this.device.name; }
  private get id(): number { return this.device.id; }
  migrationFlags(): number { return native().emuV2MigrationFlags(this.id); }
  probe(feature: number): boolean { return native().emuV2Probe(this.id, feature); }
  getState(): number { return native().emuV2GetState(this.id); }
  setState(state: number): number { return native().emuV2SetState(this.id, state); }
  precopyInfo(fd: number) { return native().emuV2PrecopyInfo(this.id, fd); }
  dataSize(): number { return native().emuV2DataSize(this.id); }
  dmaStart(pageSize: number, ranges: IovaRange[]): number { return native().emuV2DmaStart(this.id, pageSize, ranges); }
  dmaStop(): void { native().emuV2DmaStop(this.id); }
  dmaReport(iova: number, length: number, pageSize: number, bitmap: Uint8Array): void {
    native().emuV2DmaReport(this.id, iova, length, pageSize, bitmap);
  }
  reset(): void { this.device.reset(); }
  closeFd(fd: number): void { native().fdClose(fd); }
  dataPath(fd: number): DataPathDesc { return fdPathDesc(this.name, fd, this.stallMs); }
  guestRanges(): IovaRange[] { return [{ iova: 0, length: this.device.opts.guestPages * 4096 }]; }
  readConfig(): Uint8Array {
    const b = new Uint8Array(256);
    native().emuConfigRead(this.id, b);
    return b;
  }
  writeConfig(space: Uint8Array): void { restoreConfig(this.configTarget() as { kind: 'emulated'; id: number }, space); }
  configTarget(): ConfigTargetDesc { return { kind: 'emulated', id: this.id }; }
  geometry(): DeviceGeometry { return { ...this.device.geometry(), migFlags: this.device.opts.migFlags }; }
  digestTarget() { return { kind: 'emulated' as const, id: this.id, stateSize: this.device.opts.stateSize }; }
  vendorError(): string { return this.device.info().lastError; }
  close(): void { /* the device object itself is destroyed by its owner */ }
}

/** A v2 emulated device behind the seam (profile forced to 'v2'). */
export function emulatedV2(o: EmulatedDeviceOptions = {}): V2Device {
  return new V2Device(new EmulatedV2Ops(new EmulatedDevice({ ...o, profile: 'v2' })));
}

/** A fresh zero-filled v2 destination for a device-table entry (its geometry is validated by EmulatedDevice). */
export function emulatedV2Destination(e: DeviceTableEntry): V2Device {
  return emulatedV2({
    name: e.name, stateSize: e.geometry.stateSize, maxChunk: e.geometry.maxChunk, guestPages: e.geometry.guestPages,
    migFlags: e.geometry.migFlags ?? 7, zeroFill: true, dirtyRate: 0, dmaRate: 0,
  });
}

registerReach({ kind: 'emulated', destination: emulatedV2Destination });

/** The emulated device inside a v1 emulated transport or a v2 emulated seam device (null for other reaches). */
export function emulatedDeviceOf(x: object): EmulatedDevice | null {
  const ops = (x as { ops?: unknown }).ops;
  if (ops instanceof EmulatedV2Ops) return ops.device;
  const dev = (x as { device?: unknown }).device;
  if (dev instanceof EmulatedDevice) return dev;
  // A v1 device behind the seam (protocol/v1/device.ts) wraps its transport.
  const t = (x as { transport?: unknown }).transport;
  return t instanceof EmulatedTransport ? t.device : null;
}

/** Destroy an emulated device (either protocol, a v1 one behind its V1Device too); false when `x` is not one. */
export function destroyEmulated(x: object): boolean {
  const t = (x as { transport?: unknown }).transport;
  if (x instanceof EmulatedTransport) x.destroy();
  else if (t instanceof EmulatedTransport) t.destroy();
  else {
    const d = emulatedDeviceOf(x);
    if (!d) return false;
    d.destroy();
  }
  return true;
}
