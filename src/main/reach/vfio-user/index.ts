// The vfio-user reach: a client for devices served by other processes, and vfio-mig's own device server.
export { VfioUserClient, type VfioUserOptions } from './client.js';
export { VfioUserTransport } from './transport.js';
export { DeviceServer, type DeviceServerOptions } from './server.js';
