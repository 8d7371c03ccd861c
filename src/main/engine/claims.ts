// One owner per device: a migration or a load claims every device it will touch, all or nothing, before it touches
// any (issue 7 §4.1). A refused claim leaves the devices to their current owner: the refused operation never opens,
// changes or rolls back a device it did not take. Process-wide (two processes cannot share a VFIO group anyway).
import { ErrorCode, MigError } from '../errors.js';
/** Anything the engine claims: a device behind the seam or a transport, with its own identity key if it has one. */
export interface Claimable { readonly name: string; claimKey?(): string | undefined }

const owners = new Map<string, string>(); // device key -> what holds it
const objectKeys = new WeakMap<object, string>();
let nextObject = 0;

/** What identifies the device behind a transport: its own key (the same device through two transports), else the object. */
export function deviceKey(t: Claimable): string {
  const k = t.claimKey?.();
  if (k) return k;
  let o = objectKeys.get(t);
  if (!o) objectKeys.set(t, (o = `object:${nextObject++}`));
  return o;
}

export class DeviceClaims {
  private held: string[] = [];
  constructor(private readonly owner: string) {}

  /** Claim every transport or none: throws VFM_DEVICE_BUSY naming the first device another operation holds. */
  claim(ts: readonly Claimable[]): void {
    const keys = ts.map(deviceKey);
    keys.forEach((k, i) => {
      const by = owners.get(k) ?? (keys.indexOf(k) !== i ? this.owner : undefined);
      if (by !== undefined) {
        throw new MigError(ErrorCode.DEVICE_BUSY, `device already belongs to ${by === this.owner ? 'this operation (listed twice)' : `an active ${by}`}`,
          { device: ts[i].name });
      }
    });
    for (const k of keys) owners.set(k, this.owner);
    this.held.push(...keys);
  }

  /** Add one more device (a load creates destinations one by one). */
  claimOne(t: Claimable): void { this.claim([t]); }

  release(): void {
    for (const k of this.held) owners.delete(k);
    this.held = [];
  }
}
