// A device is reached through a transport: the in-process emulated device now, a kernel VFIO v1 device fd, and
// later the v2 fd protocol and vfio-user sockets. The engine sees only this interface.
import type { MigrationRegion } from '../protocol/migration-region.js';
import type { ProfileDef } from '../protocol/profiles.js';
import type { DeviceGeometry } from '../container/format.js';
import type { ConfigTarget } from './config.js';
import type { DigestTask } from '../../workers/tasks.js';
import type { Awaitable } from '../device/seam.js';
import type { V1Registers } from '../protocol/v1/device.js';

/**
 * Where a device's state digest comes from: hashed from an in-process emulated device, read from a digest region, or
 * (any other reach) computed by the module a target names, imported by the worker as a DataPathDesc's module is.
 */
export type DigestTarget = { kind: 'emulated'; id: number; stateSize: number } | { kind: 'region'; handle: number } | ModuleDigestTarget;
/** A reach's own digest: the module's default export takes this (structured-cloned) target and returns `sha256:<hex>`. */
export interface ModuleDigestTarget { kind: string; module: string; [k: string]: unknown }

export function digestTask(t: DigestTarget): DigestTask {
  if (typeof (t as { module?: unknown }).module === 'string') return { op: 'digest', digestModule: t as ModuleDigestTarget };
  if (t.kind === 'region') return { op: 'digest', digestRegion: (t as { handle: number }).handle };
  const e = t as { id: number; stateSize: number };
  return { op: 'digest', id: e.id, stateSize: e.stateSize };
}

export interface DirtyQueryResult { pages: number; bitmap: Uint8Array }

export interface DeviceTransport {
  readonly kind: 'emulated' | 'vfio-v1' | 'vfio-user';
  readonly name: string;
  readonly profile: ProfileDef;
  /** Discover the migration region and open it (VFIO_DEVICE_GET_REGION_INFO walk + mmap of sparse areas). */
  openRegion(): MigrationRegion;
  /** A reach whose device answers over a socket (vfio-user) returns Promises here: the main thread never waits. */
  readConfig(): Awaitable<Uint8Array>;
  /** What a worker needs to write the config blob (workers cannot share this object). */
  configTarget(): ConfigTarget;
  writeConfig(b: Uint8Array): Awaitable<void>;
  /** VFIO_DEVICE_RESET: the only way out of the ERROR state. */
  reset(): Awaitable<void>;
  /** Guest pages this device can report dirty (0: none). */
  readonly guestPages: number;
  /** Dirty-page query through the container (linux-5.8); region-based queries go through MigrationRegion. */
  containerDirty?(start: boolean | 'get', bitmap?: Uint8Array): Awaitable<void>;
  /**
   * The migration region's registers when the region handle's own synchronous access would wait on a socket
   * (vfio-user: REGION_READ/WRITE on the libuv pool). Absent: the region is read in place (kernel, emulated).
   */
  registers?(region: MigrationRegion): V1Registers;
  /** Release a request to the device in flight now (a cancel), where the reach can (vfio-user). */
  interrupt?(): void;
  /** Digest of the device's state, if the transport can produce one (the emulated device and the device server can). */
  digestTarget(): DigestTarget | null;
  geometry(): DeviceGeometry;
  /** Identity of the device behind this transport (two transports of one device share it): one owner at a time. */
  claimKey?(): string;
  /** The vendor's own text for its last failure, where the reach can tell (the emulated vendor's lastError). */
  vendorError?(): string;
  close(): void;
}
