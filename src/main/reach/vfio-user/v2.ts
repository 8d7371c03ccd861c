// A v2 device over vfio-user behind the device seam: the seam's V2Ops as messages (DEVICE_FEATURE for MIGRATION and
// MIG_DEVICE_STATE, GET after every SET since a server may only echo the request), MIG_DATA_READ/WRITE in workers
// (v2-path.ts). There is no data fd, no PRECOPY_INFO and no MIG_DATA_SIZE over vfio-user: a session is a token, the
// pre-copy estimate is "unknown" until a read comes back short, and the stop-copy size is unknown (null).
import { native } from '../../../addon/native.js';
import type { DeviceGeometry } from '../../container/format.js';
import type { ConfigTargetDesc, DataPathDesc } from '../../device/seam.js';
import { opensSession } from '../../protocol/v2/fsm.js';
import { V2Device, type IovaRange, type V2Ops } from '../../protocol/v2/device.js';
import { FEATURE, V2_STATE_NAMES } from '../../protocol/v2/uapi.js';
import { ErrorCode, MigError } from '../../errors.js';
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
  /** `guest`: the IOVA range the VMM mapped for the device, logged with DMA_LOGGING_* when the server offers it. */
  constructor(readonly client: VfioUserClient, private readonly guest?: { iova: number; size: number }) {}
  get name(): string { return this.client.name; }

  // Every request that touches the device goes through the libuv pool (client.ask): the main thread never waits.
  private async u32(flags: number, words?: number[], at = 8): Promise<number> {
    const r = await this.client.ask(CMD.DEVICE_FEATURE, feat(flags, words), 16, 64);
    return new DataView(r.reply.buffer, r.reply.byteOffset, r.reply.byteLength).getUint32(at, true);
  }
  migrationFlags(): Promise<number> { return this.u32(GET | 1); }
  async probe(feature: number): Promise<boolean> {
    // DMA_LOGGING_START / STOP are SET-only features: probed with SET, the others with GET (as the kernel checks).
    const dir = feature === FEATURE.DMA_LOGGING_START || feature === FEATURE.DMA_LOGGING_STOP ? SET : GET;
    try { await this.client.ask(CMD.DEVICE_FEATURE, feat(PROBE | dir | feature), 8, 64); return true; } catch { return false; }
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
  /** DMA_LOGGING_START (SET) with the ranges inline (vfio-user layout); the reply echoes them with the chosen page size. */
  async dmaStart(pageSize: number, ranges: IovaRange[]): Promise<number> {
    const q = new Uint8Array(8 + 16 + ranges.length * 16);
    const dv = new DataView(q.buffer);
    dv.setUint32(0, q.length, true);
    dv.setUint32(4, SET | FEATURE.DMA_LOGGING_START, true);
    dv.setBigUint64(8, BigInt(pageSize), true);
    dv.setUint32(16, ranges.length, true);
    ranges.forEach((r, i) => { dv.setBigUint64(24 + i * 16, BigInt(r.iova), true); dv.setBigUint64(32 + i * 16, BigInt(r.length), true); });
    const r = await this.client.ask(CMD.DEVICE_FEATURE, q, q.length, q.length);
    const rv = new DataView(r.reply.buffer, r.reply.byteOffset, r.reply.byteLength);
    if (Buffer.compare(Buffer.from(r.reply.subarray(16)), Buffer.from(q.subarray(16))) !== 0) {
      throw new MigError(ErrorCode.PEER_PROTOCOL, 'DMA_LOGGING_START reply describes other ranges', { device: this.name });
    }
    return Number(rv.getBigUint64(8, true));
  }
  async dmaStop(): Promise<void> {
    const q = new Uint8Array(8);
    new DataView(q.buffer).setUint32(0, 8, true);
    new DataView(q.buffer).setUint32(4, SET | FEATURE.DMA_LOGGING_STOP, true);
    await this.client.ask(CMD.DEVICE_FEATURE, q, 8, 8);
  }
  /** DMA_LOGGING_REPORT (GET): the reply is the request's 24 bytes and the bitmap, of exactly the size asked. */
  async dmaReport(iova: number, length: number, pageSize: number, bitmap: Uint8Array): Promise<void> {
    const bytes = Math.ceil(length / pageSize / 64) * 8;
    const q = new Uint8Array(32);
    const dv = new DataView(q.buffer);
    dv.setUint32(0, 32 + bytes, true);
    dv.setUint32(4, GET | FEATURE.DMA_LOGGING_REPORT, true);
    dv.setBigUint64(8, BigInt(iova), true);
    dv.setBigUint64(16, BigInt(length), true);
    dv.setBigUint64(24, BigInt(pageSize), true);
    const r = await this.client.ask(CMD.DEVICE_FEATURE, q, 32 + bytes, 32 + bytes);
    if (Buffer.compare(Buffer.from(r.reply.subarray(8, 32)), Buffer.from(q.subarray(8, 32))) !== 0) {
      throw new MigError(ErrorCode.PEER_PROTOCOL, 'DMA_LOGGING_REPORT reply describes another range', { device: this.name });
    }
    const bm = r.reply.subarray(32);
    for (let i = 0; i < bytes && i < bitmap.length; i++) bitmap[i] |= bm[i];
  }
  async reset(): Promise<void> { await this.client.ask(CMD.DEVICE_RESET, new Uint8Array(0), 0, 0); }
  interrupt(): void { this.client.interrupt(); }
  closeFd(): void { /* a session token, not a descriptor */ }
  dataPath(): DataPathDesc {
    const l = this.client.negotiated.maxDataXfer;
    return {
      module: new URL('./v2-path.js', import.meta.url).href, device: this.name,
      params: { conn: this.client.conn, maxRead: Math.min(l, this.client.opts.maxDataXfer), writeBound: Math.min(this.client.opts.writeBound, l), short: this.short },
    };
  }
  guestRanges(): IovaRange[] { return this.guest ? [{ iova: this.guest.iova, length: this.guest.size }] : []; }
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
export function vfioUserV2(client: VfioUserClient, guest?: { iova: number; size: number }): Promise<V2Device<true>> {
  return V2Device.open(new VfioUserV2Ops(client, guest));
}
