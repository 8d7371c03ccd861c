// A device reached over vfio-user (v1 migration region, linux-5.8 layout): the region's registers and trapped data
// go through REGION_READ/REGION_WRITE, its sparse data areas are mapped from the descriptor the server passed, dirty
// pages come from DIRTY_PAGES, config space is region 7, and a server that reports its own state digest (vfio-mig's
// device server) makes migrations verifiable. All of it sits behind a native region handle, so the engine's worker
// data path and register code run unchanged.
//
// The engine sees it through its V1Device (protocol/v1/device.ts) like any v1 transport, with one difference: every
// request the main thread makes — register reads and writes (registers()), DIRTY_PAGES, DEVICE_RESET, config space —
// runs on the libuv pool and answers with a Promise, so the main thread never waits on the socket. Data, the bulk of
// the traffic, moves in the workers (under the device lock, synchronously there).
import { native } from '../../../addon/native.js';
import { ErrorCode, MigError } from '../../errors.js';
import { MigrationRegion } from '../../protocol/migration-region.js';
import { PROFILE_DEFS, type ProfileDef } from '../../protocol/profiles.js';
import type { DeviceTransport, DigestTarget } from '../../transport/transport.js';
import type { ConfigTarget } from '../../transport/config.js';
import type { V1Registers } from '../../protocol/v1/device.js';
import { VfioUserClient, type DiscoveredRegion, type VfioUserOptions } from './client.js';
import {
  CMD, DIRTY_GET_BITMAP, DIRTY_START, DIRTY_STOP,
} from './protocol.js';

export class VfioUserTransport implements DeviceTransport {
  readonly kind = 'vfio-user' as const;
  readonly profile: ProfileDef = PROFILE_DEFS['linux-5.8'];
  readonly guestPages: number;
  private regionHandle = -1;
  private configHandle = -1;
  private digestHandle = -1;

  private constructor(readonly client: VfioUserClient, private readonly mig: DiscoveredRegion, private readonly guest?: { iova: number; size: number }) {
    this.guestPages = guest ? guest.size / 4096 : 0;
  }

  /** Connect, negotiate and discover (before the device is stopped). */
  static async connect(socketPath: string, o: VfioUserOptions = {}): Promise<VfioUserTransport> {
    const name = o.name ?? socketPath;
    const g = o.guest;
    if (g && (!Number.isSafeInteger(g.iova) || !Number.isSafeInteger(g.size) || g.size <= 0 || g.iova % 4096 || g.size % 4096)) {
      throw new MigError(ErrorCode.BAD_ARGUMENT, 'guest range must be 4 KiB aligned and non-empty', { device: name });
    }
    return VfioUserTransport.fromClient(await VfioUserClient.connect(socketPath, o), g);
  }

  /** The v1 transport over a connected client (closes the client if it has no v1 migration region). */
  static fromClient(client: VfioUserClient, g?: { iova: number; size: number }): VfioUserTransport {
    const name = client.name;
    const p = PROFILE_DEFS['linux-5.8'];
    const mig = client.findByType(p.regionType, p.regionSubtype);
    if (!mig) {
      client.close();
      throw new MigError(ErrorCode.NO_MIGRATION_REGION, `vfio-user server offers no v1 migration region (type ${p.regionType}/${p.regionSubtype})`, { device: name });
    }
    if (mig.size < p.headerSize || !(mig.flags & 3)) {
      client.close();
      throw new MigError(ErrorCode.BAD_REGION_INFO, `migration region of ${mig.size} bytes, flags 0x${mig.flags.toString(16)}: not a readable/writable v1 region`, { device: name });
    }
    return new VfioUserTransport(client, mig, g);
  }

  get name(): string { return this.client.name; }

  /** Sparse areas actually mapped (empty: every data byte goes through REGION_READ/WRITE). */
  mappedAreas() { return this.regionHandle >= 0 ? native().regionAreas(this.regionHandle) : []; }

  openRegion(): MigrationRegion {
    if (this.regionHandle < 0) this.regionHandle = this.client.openRegion(this.mig);
    return new MigrationRegion({ device: this.name, handle: this.regionHandle, profile: this.profile, size: this.mig.size });
  }

  private config(): number {
    if (this.configHandle < 0) this.configHandle = this.client.openConfigRegion();
    return this.configHandle;
  }

  /** The migration region's registers by REGION_READ/WRITE on the libuv pool (V1Device's register access). */
  registers(region: MigrationRegion): V1Registers { return region.asyncRegisters(); }

  readConfig(): Promise<Uint8Array> { return this.client.configAccess(this.config()); }
  configTarget(): ConfigTarget { return { kind: 'vfio-user', handle: this.config() }; }
  async writeConfig(b: Uint8Array): Promise<void> { await this.client.configAccess(this.config(), b); }

  async reset(): Promise<void> { await this.client.ask(CMD.DEVICE_RESET, new Uint8Array(0), 0, 0); }

  /** A request waiting for the server now fails at once (VFM_CANCELLED); the connection stays usable. */
  interrupt(): void { this.client.interrupt(); }

  /** DIRTY_PAGES (cmd 14): START / STOP, or GET_BITMAP over the guest range, ORed into `bitmap`; on the libuv pool. */
  async containerDirty(op: boolean | 'get', bitmap?: Uint8Array): Promise<void> {
    const g = this.guest;
    if (!g) return;
    if (op !== 'get') {
      const q = new Uint8Array(8);
      const dv = new DataView(q.buffer);
      dv.setUint32(0, 8, true);
      dv.setUint32(4, op ? DIRTY_START : DIRTY_STOP, true);
      await this.client.ask(CMD.DIRTY_PAGES, q, 0, 8);
      return;
    }
    const bytes = Math.ceil(g.size / 4096 / 64) * 8;
    if (!bitmap || bitmap.length < bytes) throw new MigError(ErrorCode.BAD_ARGUMENT, `dirty bitmap needs ${bytes} bytes`, { device: this.name });
    const q = new Uint8Array(8 + 32);
    const dv = new DataView(q.buffer);
    dv.setUint32(0, 8 + 32 + bytes, true);
    dv.setUint32(4, DIRTY_GET_BITMAP, true);
    dv.setBigUint64(8, BigInt(g.iova), true);
    dv.setBigUint64(16, BigInt(g.size), true);
    dv.setBigUint64(24, 4096n, true);
    dv.setBigUint64(32, BigInt(bytes), true);
    const r = await this.client.ask(CMD.DIRTY_PAGES, q, 40 + bytes, 40 + bytes);
    // The reply echoes the range; a server that answers for another range is not believed.
    if (Buffer.compare(Buffer.from(r.reply.subarray(8, 40)), Buffer.from(q.subarray(8, 40))) !== 0) {
      throw new MigError(ErrorCode.PEER_PROTOCOL, 'DIRTY_PAGES reply describes another range', { device: this.name });
    }
    const bm = r.reply.subarray(40);
    for (let i = 0; i < bytes; i++) bitmap[i] |= bm[i];
  }

  digestTarget(): DigestTarget | null {
    if (this.digestHandle < 0) this.digestHandle = this.client.openDigestRegion();
    return this.digestHandle < 0 ? null : { kind: 'region', handle: this.digestHandle };
  }

  geometry() {
    return {
      stateSize: 0, maxChunk: 0, dataMode: this.mig.sparse?.length && this.mig.fd >= 0 ? 'mmap' : 'trapped', offsetPolicy: 'fixed',
      guestPages: this.guestPages, regionSize: this.mig.size,
    };
  }

  close(): void {
    const n = native();
    for (const h of [this.regionHandle, this.configHandle, this.digestHandle]) if (h >= 0) n.regionClose(h);
    this.regionHandle = this.configHandle = this.digestHandle = -1;
    this.client.close();
  }
}
