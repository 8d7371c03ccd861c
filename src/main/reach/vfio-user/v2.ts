// A v2 device over vfio-user behind the device seam: the seam's V2Ops as messages (DEVICE_FEATURE for MIGRATION and
// MIG_DEVICE_STATE, GET after every SET since a server may only echo the request), MIG_DATA_READ/WRITE in workers
// (v2-path.ts). There is no data fd, no PRECOPY_INFO and no MIG_DATA_SIZE over vfio-user: a session is a token, the
// pre-copy estimate is "unknown" until a read comes back short, and the stop-copy size is unknown (null).
import { native } from '../../../addon/native.js';
import type { DeviceGeometry } from '../../container/format.js';
import type { ConfigTargetDesc, DataPathDesc } from '../../device/seam.js';
import { opensSession } from '../../protocol/v2/fsm.js';
import { V2Device, type IovaRange, type V2Ops } from '../../protocol/v2/device.js';
import { V2_STATE_NAMES } from '../../protocol/v2/uapi.js';
import type { DigestTarget } from '../../transport/transport.js';
import type { VfioUserClient } from './client.js';
import { CMD } from './protocol.js';

const GET = 1 << 16;
const SET = 1 << 17;
const PROBE = 1 << 18;
/** The estimate while nothing says otherwise: pre-copy reads until the device answers short. */
const UNKNOWN_PENDING = 2 ** 31;

function feat(flags: number, words: number[] = []): Uint8Array {
  const b = new Uint8Array(8 + words.length * 4);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, Math.max(16, b.length), true);
  dv.setUint32(4, flags >>> 0, true);
  words.forEach((w, i) => dv.setUint32(8 + i * 4, w >>> 0, true));
  return b;
}

export class VfioUserV2Ops implements V2Ops {
  readonly reach = 'vfio-user';
  private token = 0;
  private readonly short = new SharedArrayBuffer(4);
  private configHandle = -1;
  private digestHandle = -1;
  constructor(readonly client: VfioUserClient) {}
  get name(): string { return this.client.name; }

  // Every request that touches the device goes through the libuv pool (client.ask): the main thread never waits.
  private async u32(flags: number, words?: number[], at = 8): Promise<number> {
    const r = await this.client.ask(CMD.DEVICE_FEATURE, feat(flags, words), 16, 64);
    return new DataView(r.reply.buffer, r.reply.byteOffset, r.reply.byteLength).getUint32(at, true);
  }
  migrationFlags(): Promise<number> { return this.u32(GET | 1); }
  async probe(feature: number): Promise<boolean> {
    try { await this.client.ask(CMD.DEVICE_FEATURE, feat(PROBE | GET | feature), 8, 64); return true; } catch { return false; }
  }
  getState(): Promise<number> { return this.u32(GET | 2); }
  async setState(state: number): Promise<number> {
    const before = await this.getState();
    await this.client.ask(CMD.DEVICE_FEATURE, feat(SET | 2, [state, 0xffffffff]), 8, 64);
    const after = await this.getState();
    if (after !== state) {
      throw Object.assign(new Error(`SET MIG_DEVICE_STATE ${V2_STATE_NAMES[state]} answered, but GET reads ${V2_STATE_NAMES[after] ?? after}`), { errno: 5 });
    }
    const from = V2_STATE_NAMES[before];
    const to = V2_STATE_NAMES[after];
    if (from && to && opensSession(from, to)) {
      Atomics.store(new Int32Array(this.short), 0, 0);
      return ++this.token;
    }
    return -1;
  }
  precopyInfo(): { initialBytes: number; dirtyBytes: number } {
    return { initialBytes: Atomics.load(new Int32Array(this.short), 0) ? 0 : UNKNOWN_PENDING, dirtyBytes: 0 };
  }
  dataSize(): number { throw Object.assign(new Error('no MIG_DATA_SIZE over vfio-user'), { errno: 25 }); }
  dmaStart(): number { throw Object.assign(new Error('DMA logging is not used over vfio-user'), { errno: 25 }); }
  dmaStop(): void { /* never started */ }
  dmaReport(): void { throw Object.assign(new Error('DMA logging is not used over vfio-user'), { errno: 25 }); }
  async reset(): Promise<void> { await this.client.ask(CMD.DEVICE_RESET, new Uint8Array(0), 0, 0); }
  closeFd(): void { /* a session token, not a descriptor */ }
  dataPath(): DataPathDesc {
    const l = this.client.negotiated.maxDataXfer;
    return {
      module: new URL('./v2-path.js', import.meta.url).href, device: this.name,
      params: { conn: this.client.conn, maxRead: Math.min(l, this.client.opts.maxDataXfer), writeBound: Math.min(this.client.opts.writeBound, l), short: this.short },
    };
  }
  guestRanges(): IovaRange[] { return []; }
  private config(): number {
    if (this.configHandle < 0) this.configHandle = this.client.openConfigRegion();
    return this.configHandle;
  }
  readConfig(): Promise<Uint8Array> { return this.client.configAccess(this.config()); }
  async writeConfig(space: Uint8Array): Promise<void> { await this.client.configAccess(this.config(), space); }
  configTarget(): ConfigTargetDesc { return { kind: 'vfio-user', handle: this.config() }; }
  geometry(): DeviceGeometry {
    return { stateSize: 0, maxChunk: 0, dataMode: 'trapped', offsetPolicy: 'fixed', guestPages: 0, regionSize: 4096 };
  }
  digestTarget(): DigestTarget | null {
    if (this.digestHandle < 0) this.digestHandle = this.client.openDigestRegion();
    return this.digestHandle < 0 ? null : { kind: 'region', handle: this.digestHandle };
  }
  close(): void {
    for (const h of [this.configHandle, this.digestHandle]) if (h >= 0) native().regionClose(h);
    this.configHandle = this.digestHandle = -1;
    this.client.close();
  }
}

/** A v2 device served over vfio-user, behind the seam: every call that touches it answers with a Promise. */
export function vfioUserV2(client: VfioUserClient): Promise<V2Device<true>> {
  return V2Device.open(new VfioUserV2Ops(client));
}
