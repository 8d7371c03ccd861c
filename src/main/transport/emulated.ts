// Transport to the in-process emulated vendor device. Region discovery goes through the same kernel-format
// VFIO_DEVICE_GET_REGION_INFO bytes and the same parser as a real device.
import { native } from '../../addon/native.js';
import { ErrorCode, MigError } from '../errors.js';
import { EmulatedDevice, type EmulatedDeviceOptions } from '../emulated/device.js';
import { MigrationRegion } from '../protocol/migration-region.js';
import { profileDef, type ProfileDef } from '../protocol/profiles.js';
import { findRegionByType } from '../protocol/region-info.js';
import type { DeviceTransport } from './transport.js';
import { restoreConfig } from './config.js';

export class EmulatedTransport implements DeviceTransport {
  readonly kind = 'emulated' as const;
  readonly profile: ProfileDef;
  private handle = -1;

  constructor(readonly device: EmulatedDevice) {
    this.profile = profileDef(device.opts.profile);
  }

  static create(o: EmulatedDeviceOptions): EmulatedTransport {
    return new EmulatedTransport(new EmulatedDevice(o));
  }

  get name(): string { return this.device.name; }
  get guestPages(): number { return this.device.opts.guestPages; }

  openRegion(): MigrationRegion {
    const n = native();
    const id = this.device.id;
    const info = findRegionByType(n.emuDeviceInfo(id).numRegions, (i) => n.emuRegionInfo(id, i),
      this.profile.regionType, this.profile.regionSubtype, this.name);
    if (!info) {
      throw new MigError(ErrorCode.NO_MIGRATION_REGION,
        `no migration region of type ${this.profile.regionType}/${this.profile.regionSubtype}: device doesn't support migration`,
        { device: this.name });
    }
    if (info.size < this.profile.headerSize) {
      throw new MigError(ErrorCode.BAD_REGION_INFO, `migration region of ${info.size} bytes is smaller than its header`, { device: this.name });
    }
    if (this.handle < 0) this.handle = n.regionOpenEmu(id);
    return new MigrationRegion({ device: this.name, handle: this.handle, profile: this.profile, size: info.size });
  }

  readConfig(): Uint8Array {
    const b = new Uint8Array(256);
    native().emuConfigRead(this.device.id, b);
    return b;
  }
  writeConfig(b: Uint8Array): void { restoreConfig(this.configTarget(), b); }
  configTarget() { return { kind: 'emulated' as const, id: this.device.id }; }
  reset(): void { this.device.reset(); }

  containerDirty(op: boolean | 'get', bitmap?: Uint8Array): void {
    const size = this.guestPages * 4096;
    native().emuDirtyPages(this.device.id, op === 'get' ? 4 : op ? 1 : 2, 0, size, 4096, bitmap);
  }

  digestTarget() { return { kind: 'emulated' as const, id: this.device.id, stateSize: this.device.opts.stateSize }; }
  geometry() { return this.device.geometry(); }
  claimKey(): string { return `emulated:${this.device.id}`; }
  vendorError(): string { return this.device.info().lastError; }

  close(): void {
    if (this.handle >= 0) native().regionClose(this.handle);
    this.handle = -1;
  }

  /** Close and destroy the emulated device itself. */
  destroy(): void {
    this.close();
    this.device.destroy();
  }

  /** `await using dev = EmulatedTransport.create(...)`: destroy() at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> { this.destroy(); }
}
