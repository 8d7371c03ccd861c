// vfio-mig device-server: serve one emulated device over vfio-user until SIGINT/SIGTERM (then the socket is removed).
import { DeviceServer } from '../reach/vfio-user/server.js';
import type { DataMode, OffsetPolicy } from '../emulated/device.js';
import { ErrorCode, MigError } from '../errors.js';
import { fmtBytes } from './args.js';

export interface DeviceServerFlags {
  socket: string; profile: string; size: number; chunk: number; dataMode: DataMode; offsetPolicy: OffsetPolicy;
  dirtyRate: number; dmaRate: number; seed: number; guestPages: number; zero?: boolean; fault: string[]; maxXfer: number; json?: boolean;
}

export function parseFault(v: string, prev: string[] = []): string[] {
  if (!/^[a-z-]+(:\d+)?$/.test(v)) throw new MigError(ErrorCode.BAD_ARGUMENT, `--fault: '${v}' is not kind[:arg] (docs/EMULATED-DEVICE.md)`);
  return [...prev, v];
}

export async function cmdDeviceServer(o: DeviceServerFlags): Promise<void> {
  const server = DeviceServer.start({
    socket: o.socket, profile: o.profile as 'linux-5.8' | 'v2', stateSize: o.size, maxChunk: o.chunk, dataMode: o.dataMode,
    offsetPolicy: o.offsetPolicy, dirtyRate: o.zero ? 0 : o.dirtyRate, dmaRate: o.zero ? 0 : o.dmaRate, seed: o.seed, guestPages: o.guestPages,
    zeroFill: o.zero === true, maxDataXfer: o.maxXfer,
    faults: o.fault.map((f) => ({ kind: f.split(':')[0], arg: Number(f.split(':')[1] ?? 0) })),
  });
  const ready = { ready: true, socket: o.socket, pid: process.pid, profile: o.profile, stateSize: o.size, dataMode: o.dataMode, guestPages: o.guestPages };
  process.stdout.write(o.json ? JSON.stringify(ready) + '\n'
    : `vfio-mig device-server: ${o.profile} device of ${fmtBytes(o.size)} (data area ${o.dataMode}, ${o.guestPages} guest pages) on ${o.socket}, pid ${process.pid}\n`);
  await new Promise<void>((resolve) => {
    const keep = setInterval(() => undefined, 1 << 30); // the native thread does not hold the event loop open
    const done = () => { clearInterval(keep); resolve(); };
    process.once('SIGINT', done);
    process.once('SIGTERM', done);
  });
  const st = server.stats();
  server.stop();
  process.stdout.write(o.json ? JSON.stringify({ stopped: true, ...st }) + '\n'
    : `vfio-mig device-server: stopped after ${st.clients} client(s), ${st.requests} request(s), ${st.errorReplies} error replies, ${st.dropped} dropped\n`);
}
