// The vfio-user reach: a client for devices served by other processes, and vfio-mig's own device server.
export { VfioUserClient, type VfioUserOptions } from './client.js';
export { VfioUserTransport } from './transport.js';
export { DeviceServer, type DeviceServerOptions } from './server.js';
export { VfioUserV2Ops, vfioUserV2 } from './v2.js';

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
    return await v2(c);
  } catch (e) {
    c.close();
    throw e;
  }
}
