// The vfio-user reach: a client for devices served by other processes, and vfio-mig's own device server.
export { VfioUserClient, type VfioUserOptions } from './client.js';
export { VfioUserTransport } from './transport.js';
export { DeviceServer, type DeviceServerOptions } from './server.js';
export { VfioUserV2Ops, vfioUserV2 } from './v2.js';

import path from 'node:path';
import { registerReach } from '../../device/registry.js';
import { ErrorCode, MigError } from '../../errors.js';
import type { MigDevice } from '../../device/seam.js';
import type { DeviceTransport } from '../../transport/transport.js';
import { VfioUserClient as Client, type VfioUserOptions as Opts } from './client.js';
import { VfioUserTransport as V1 } from './transport.js';
import { vfioUserV2 as v2 } from './v2.js';

/** Connect and pick the protocol the server offers: the v1 migration region (type 3/1) if present, else v2. */
export async function connectVfioUser(socketPath: string, o: Opts = {}): Promise<DeviceTransport | MigDevice> {
  const c = await Client.connect(socketPath, o);
  if (c.findByType(3, 1)) return V1.fromClient(c, o.guest);
  try {
    return await v2(c, o.guest);
  } catch (e) {
    c.close();
    throw e;
  }
}

/**
 * Destinations from a device table: a vfio-user entry names its source's socket path, and the destination host
 * serves its device at the same path (as a VMM's configuration names it on both hosts), so a load connects there.
 * Another path is named explicitly (`load --device vfio-user:<socket>`, or `makeDestination` in the API).
 */
registerReach({
  kind: 'vfio-user',
  async destination(entry) {
    if (!path.isAbsolute(entry.name)) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, `the device table names '${entry.name}', not a socket path: name the destination (--device vfio-user:<socket>, or makeDestination)`,
        { device: entry.name });
    }
    const d = await connectVfioUser(entry.name);
    const proto = 'caps' in d ? d.caps.protocol : d.profile.name;
    if (proto !== entry.profile) {
      await d.close();
      throw new MigError(ErrorCode.LOAD_REJECTED, `the stream holds a ${entry.profile} device, the server at ${entry.name} speaks ${proto}`, { device: entry.name });
    }
    // A v1 transport is adapted by the engine like any DeviceTransport it is given.
    return d as MigDevice;
  },
});
