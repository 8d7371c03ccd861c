// The vfio-user client of one device (one socket): VERSION negotiation, then discovery — DEVICE_GET_INFO and
// DEVICE_GET_REGION_INFO with its capability chain and the descriptors it passes — all before the device is stopped
// (servers fence discovery while stopped). Connect, negotiation and discovery run on the libuv pool (vfuConnect,
// vfuRequestAsync), so the main thread never waits on the socket for them.
import { native } from '../../../addon/native.js';
import { ErrorCode, MigError } from '../../errors.js';
import { parseRegionInfo, REGION_INFO_FLAG_MMAP, REGION_INFO_SIZE, type RegionInfo } from '../../protocol/region-info.js';
import {
  CMD, DIGEST_REGION_SUBTYPE, DIGEST_REGION_TYPE, MAX_REGIONS, MAX_REGION_INFO, MAX_VERSION_REPLY, VFIO_PCI_CONFIG_REGION_INDEX,
  encodeVersion, parseVersionReply, peerError, type Negotiated,
} from './protocol.js';

export interface VfioUserOptions {
  /** Device name in errors and reports (default: the socket path). */
  name?: string;
  /** Per-request timeout (ms): a server that does not answer in time is an error (VFM_PEER_TIMEOUT). Default 5000. */
  timeoutMs?: number;
  /**
   * Data bytes per write-type request (REGION_WRITE). The common server library reads a message body with one recv()
   * (libvfio-user issue #306); 32 KiB stays within one socket buffer segment. Default 32 KiB.
   */
  writeBound?: number;
  /** max_data_xfer_size this client advertises and reads with at most. Default 1 MiB. */
  maxDataXfer?: number;
  /** Guest IOVA range the VMM mapped for this device, for DIRTY_PAGES (v1). None: no dirty-page tracking. */
  guest?: { iova: number; size: number };
}

export interface DiscoveredRegion extends RegionInfo {
  /** Descriptor passed with the region info (mappable regions), owned by the client until close. */
  fd: number;
}

export class VfioUserClient {
  readonly regions: DiscoveredRegion[] = [];
  deviceFlags = 0;
  numIrqs = 0;
  negotiated!: Negotiated;
  private closed = false;

  private constructor(readonly conn: number, readonly path: string, readonly name: string, readonly opts: Required<Omit<VfioUserOptions, 'guest' | 'name'>>) {}

  static async connect(path: string, o: VfioUserOptions = {}): Promise<VfioUserClient> {
    const name = o.name ?? path;
    const opts = { timeoutMs: o.timeoutMs ?? 5000, writeBound: o.writeBound ?? 32768, maxDataXfer: o.maxDataXfer ?? (1 << 20) };
    const bad = (m: string) => new MigError(ErrorCode.BAD_ARGUMENT, m, { device: name });
    if (!Number.isSafeInteger(opts.timeoutMs) || opts.timeoutMs < 1 || opts.timeoutMs > 3_600_000) throw bad(`timeoutMs ${opts.timeoutMs} (1..3600000)`);
    if (!Number.isSafeInteger(opts.writeBound) || opts.writeBound < 8 || opts.writeBound > (1 << 20)) throw bad(`writeBound ${opts.writeBound} (8..1 MiB)`);
    if (!Number.isSafeInteger(opts.maxDataXfer) || opts.maxDataXfer < 4096 || opts.maxDataXfer > (1 << 20)) throw bad(`maxDataXfer ${opts.maxDataXfer} (4 KiB..1 MiB)`);
    let conn: number;
    try {
      conn = await native().vfuConnect(path, opts.timeoutMs);
    } catch (e) {
      const ne = e as { errno?: number; message?: string };
      throw new MigError(ErrorCode.PEER_GONE, `cannot connect to vfio-user server: ${ne.message}`, { device: name, errno: ne.errno, cause: e });
    }
    const c = new VfioUserClient(conn, path, name, opts);
    try {
      await c.negotiate();
      await c.discover();
    } catch (e) {
      c.close();
      throw e;
    }
    return c;
  }

  /** One request off the main thread; descriptors beyond `maxFds` make it a protocol error (closed natively). */
  async ask(cmd: number, body: Uint8Array, minReply: number, maxReply: number, maxFds = 0) {
    try {
      return await native().vfuRequestAsync(this.conn, cmd, body, minReply, maxReply, maxFds);
    } catch (e) {
      throw peerError(e, this.name, cmd);
    }
  }

  private async negotiate(): Promise<void> {
    // VERSION carries no descriptors; a reply that carries one (twin socket) was not asked for: refused.
    const r = await this.ask(CMD.VERSION, encodeVersion({ maxMsgFds: 8, maxDataXfer: this.opts.maxDataXfer }), 4, MAX_VERSION_REPLY, 0);
    this.negotiated = parseVersionReply(r.reply, this.name);
    const maxXfer = Math.min(this.negotiated.maxDataXfer, this.opts.maxDataXfer);
    native().vfuSetLimits(this.conn, maxXfer, Math.min(this.opts.writeBound, maxXfer), this.opts.timeoutMs);
  }

  private async discover(): Promise<void> {
    const q = new Uint8Array(16);
    new DataView(q.buffer).setUint32(0, 16, true);
    const r = await this.ask(CMD.DEVICE_GET_INFO, q, 16, 64);
    const dv = new DataView(r.reply.buffer, r.reply.byteOffset, r.reply.byteLength);
    if (dv.getUint32(0, true) < 16) throw new MigError(ErrorCode.PEER_PROTOCOL, `DEVICE_GET_INFO reply argsz ${dv.getUint32(0, true)} < 16`, { device: this.name });
    this.deviceFlags = dv.getUint32(4, true);
    const n = dv.getUint32(8, true);
    this.numIrqs = dv.getUint32(12, true);
    if (n > MAX_REGIONS) throw new MigError(ErrorCode.PEER_PROTOCOL, `DEVICE_GET_INFO reports ${n} regions (at most ${MAX_REGIONS})`, { device: this.name });
    for (let i = 0; i < n; i++) this.regions.push(await this.regionInfo(i));
  }

  /** DEVICE_GET_REGION_INFO, asking again with the argsz the server says it needs (bounded). */
  private async regionInfo(index: number): Promise<DiscoveredRegion> {
    let argsz = REGION_INFO_SIZE;
    for (let attempt = 0; ; attempt++) {
      const q = new Uint8Array(REGION_INFO_SIZE);
      const qv = new DataView(q.buffer);
      qv.setUint32(0, argsz, true);
      qv.setUint32(8, index, true);
      const r = await this.ask(CMD.DEVICE_GET_REGION_INFO, q, REGION_INFO_SIZE, Math.max(argsz, REGION_INFO_SIZE), 1);
      const dv = new DataView(r.reply.buffer, r.reply.byteOffset, r.reply.byteLength);
      const need = dv.getUint32(0, true);
      if (need > argsz && attempt === 0) {
        for (const fd of r.fds) native().closeFd(fd);
        if (need > MAX_REGION_INFO) throw new MigError(ErrorCode.PEER_PROTOCOL, `region ${index} info needs ${need} bytes (at most ${MAX_REGION_INFO})`, { device: this.name });
        argsz = need;
        continue;
      }
      let info: RegionInfo;
      try {
        info = parseRegionInfo(r.reply, this.name);
        if (info.index !== index) throw new MigError(ErrorCode.PEER_PROTOCOL, `asked region ${index}, reply describes region ${info.index}`, { device: this.name });
      } catch (e) {
        for (const fd of r.fds) native().closeFd(fd);
        throw e;
      }
      // Only a mappable region comes with a descriptor; any other is closed at once.
      let fd = -1;
      for (const f of r.fds) {
        if (fd < 0 && (info.flags & REGION_INFO_FLAG_MMAP) && info.sparse?.length) fd = f;
        else native().closeFd(f);
      }
      return { ...info, fd };
    }
  }

  findByType(type: number, subtype: number): DiscoveredRegion | undefined {
    return this.regions.find((r) => r.type?.type === type && r.type.subtype === subtype);
  }

  /** Open a region for access (trapped by REGION_READ/WRITE, sparse areas mapped from its descriptor). */
  openRegion(r: DiscoveredRegion): number {
    return native().regionOpenUser(this.conn, r.index, r.size, r.fd, r.offset, r.fd >= 0 ? r.sparse ?? [] : []);
  }

  /**
   * Read config space (`data` undefined) or write it whole, on the libuv pool (REGION_READ/WRITE split by the limits).
   * Errors name the device and the command.
   */
  async configAccess(handle: number, data?: Uint8Array): Promise<Uint8Array> {
    try {
      return await native().regionRwAsync(handle, 0, data?.length ?? 256, data);
    } catch (e) {
      throw peerError(e, this.name, data ? CMD.REGION_WRITE : CMD.REGION_READ);
    }
  }

  /** Region 7 (PCI config space, 256 bytes) opened for REGION_READ/WRITE. */
  openConfigRegion(): number {
    const r = this.regions[VFIO_PCI_CONFIG_REGION_INDEX];
    if (!r || r.size < 256) throw new MigError(ErrorCode.BAD_REGION_INFO, `config region of ${r?.size ?? 0} bytes (256 needed)`, { device: this.name });
    return this.openRegion({ ...r, fd: -1 });
  }

  /** The device server's digest region (sha256 of config space and state), or -1 if the server has none. */
  openDigestRegion(): number {
    const r = this.findByType(DIGEST_REGION_TYPE, DIGEST_REGION_SUBTYPE);
    return r && r.size === 32 ? this.openRegion({ ...r, fd: -1 }) : -1;
  }

  /**
   * Release the request in flight now (a cancel): it fails with VFM_CANCELLED naming the device and the command, and
   * its libuv pool thread is free at once instead of at the server's answer or the timeout. The connection stays
   * usable: the abandoned reply is read and dropped by the next request (which waits for it, bounded by its timeout).
   */
  interrupt(): void {
    if (!this.closed) native().vfuInterrupt(this.conn);
  }

  get requests(): number { return this.closed ? 0 : native().vfuRequests(this.conn); }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const r of this.regions) if (r.fd >= 0) native().closeFd(r.fd);
    native().vfuClose(this.conn);
  }
}
