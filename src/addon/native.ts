// The typed surface of the C++ addon (addon/src). This file is the contract between the TypeScript engine and the
// native side: few, coarse operations. Everything here is process-global on the native side (emulated devices and
// region handles are visible from every thread), but each thread loads its own addon instance.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import fs from 'node:fs';

/** Numeric profile ids shared with native code. */
export const NATIVE_PROFILE = { 'draft-2019': 0, 'linux-5.8': 1, v2: 2 } as const;
/** Data-area access modes of the emulated device. */
export const NATIVE_DATA_MODE = { mmap: 0, trapped: 1, mixed: 2 } as const;
/** data_offset policies of the emulated device. */
export const NATIVE_OFFSET_POLICY = { fixed: 0, moving: 1 } as const;
/** Which pieces of a chunk regionCopyIn writes (the 2019 draft resume order writes mmap pieces before data_size). */
export const COPY_MMAP = 1;
export const COPY_TRAPPED = 2;
export const COPY_ALL = 3;

export interface EmuConfig {
  profile: number;          // NATIVE_PROFILE
  stateSize: number;        // bytes, multiple of 4096, 8 KiB .. 64 GiB
  seed: number;             // u32; initial content is a pure function of (seed, offset). Ignored if zeroFill.
  zeroFill: boolean;        // destination devices start zeroed
  maxChunk: number;         // bytes per staged chunk, multiple of 4096, 8 KiB .. 64 MiB
  dataMode: number;         // NATIVE_DATA_MODE
  offsetPolicy: number;     // NATIVE_OFFSET_POLICY
  dirtyRate: number;        // state pages/s the workload dirties while RUNNING (0 = idle)
  guestPages: number;       // guest-memory pages (4 KiB) the device DMA-writes to, 1 .. 2^24
  dmaRate: number;          // guest pages/s written while RUNNING (0 = none)
  reservedBits: number;     // initial value of device_state bits 3..31 (a write that changes them fails)
  migFlags?: number;        // v2: VFIO_MIGRATION_* flags advertised (default 7 = STOP_COPY|P2P|PRE_COPY)
  dataArea?: number;        // v1: data area bytes, multiple of 4096 up to 1 GiB (0/absent: round_up(2 x maxChunk))
}

export interface EmuInfo {
  id: number;
  profile: number;
  stateSize: number;
  maxChunk: number;
  dataAreaOffset: number;
  dataAreaSize: number;
  regionSize: number;
  deviceState: number;      // raw u32 register value
  chunksStaged: number;
  chunksConsumed: number;   // save: chunks consumed by pending_bytes re-read; resume: chunks accepted
  pagesSent: number;
  pagesLoaded: number;
  workloadWrites: number;   // state pages the workload wrote so far
  dmaWrites: number;
  lastError: string;        // last vendor-side error text ('' if none)
}

export interface RegionAreaSpec { offset: number; size: number }

export interface VfioDeviceHandles { container: number; group: number; device: number }
export interface VfioCdevHandles { device: number; iommufd: number; devId: number; ioasId: number }
export interface VfioPrecopyInfo { initialBytes: number; dirtyBytes: number }
export interface VfioDeviceInfo { flags: number; numRegions: number; numIrqs: number }

export interface VfuReply { reply: Uint8Array; fds: number[] }
export interface VfuServerStats {
  clients: number; refused: number; requests: number; errorReplies: number; dropped: number; connected: boolean; lastError: string;
  /** Data bytes of the largest REGION_WRITE the server accepted. */
  largestWrite: number;
}

export interface TcpKeepalive { keepalive: boolean; idleS: number; intervalS: number; count: number; userTimeoutMs: number }

export interface NativeAddon {
  // ---- emulated vendor device --------------------------------------------------------------------------------
  emuCreate(cfg: EmuConfig): number;
  emuDestroy(id: number): void;
  emuInfo(id: number): EmuInfo;
  /** Process-wide: threads of the shared workload pool, bytes of emulated guest RAM (0 until a DMA write). */
  emuStats(): { workloadThreads: number; guestRamBytes: number };
  /** Kernel-identical `struct vfio_device_info` fields for the emulated device. */
  emuDeviceInfo(id: number): VfioDeviceInfo;
  /** Kernel-identical bytes of VFIO_DEVICE_GET_REGION_INFO (struct vfio_region_info + capability chain). */
  emuRegionInfo(id: number, index: number): Uint8Array;
  /** VFIO_DEVICE_RESET: back to RUNNING, sessions dropped, ERROR cleared. */
  emuReset(id: number): void;
  /** Fault injection; see docs/EMULATED-DEVICE.md. kind '' clears. */
  emuSetFault(id: number, kind: string, arg: number): void;
  /** Test entry point only: refuse trapped data accesses other than naturally aligned 1/2/4/8-byte ones. */
  emuSetStrictTrapped(id: number, on: boolean): void;
  /** Copy device state bytes [off, off+dst.length) into dst (verification digests). */
  emuReadState(id: number, off: number, dst: Uint8Array): void;
  /** Write one byte of device state and mark its page dirty, as the workload would (deterministic tests). */
  emuTouch(id: number, off: number, value: number): void;
  /** Device config space (256 bytes): read into dst or write from src. */
  emuConfigRead(id: number, dst: Uint8Array): void;
  emuConfigWrite(id: number, src: Uint8Array): void;
  /** Guest-memory DMA write at page (logged as dirty), for deterministic bitmap tests. */
  emuDmaTouch(id: number, page: number): void;
  /** Emulated type1 container dirty tracking (linux-5.8): op 1 START, 2 STOP, 4 GET_BITMAP (ORs bits into bitmap). */
  emuDirtyPages(id: number, op: number, iova: number, size: number, pgsize: number, bitmap?: Uint8Array): void;

  // ---- emulated v2 vendor: VFIO_DEVICE_FEATURE semantics op by op (errors carry the kernel's errno) --------------
  /** GET MIGRATION flags; ENOTTY for a v1 device. */
  emuV2MigrationFlags(id: number): number;
  emuV2Probe(id: number, feature: number): boolean;
  emuV2GetState(id: number): number;
  /** SET MIG_DEVICE_STATE (walks the kernel's table): a new data fd (the caller owns it) or -1. */
  emuV2SetState(id: number, state: number): number;
  /** VFIO_MIG_GET_PRECOPY_INFO on the data fd (EINVAL outside PRE_COPY states). */
  emuV2PrecopyInfo(id: number, fd: number): { initialBytes: number; dirtyBytes: number };
  emuV2DataSize(id: number): number;
  /** DMA_LOGGING_START: returns the page size the device logs with. */
  emuV2DmaStart(id: number, pageSize: number, ranges: { iova: number; length: number }[]): number;
  emuV2DmaStop(id: number): void;
  /** DMA_LOGGING_REPORT: sets bits (never clears) for pages dirtied in [iova, iova+length), clears the device's log. */
  emuV2DmaReport(id: number, iova: number, length: number, pageSize: number, bitmap: Uint8Array): void;
  /** The emulated kernel's vfio_mig_get_next_state (0 = ERROR: refused), for cross-checks. */
  v2NextState(flags: number, cur: number, target: number): number;

  // ---- data fds (v2, kernel and emulated alike) ------------------------------------------------------------------
  /** One read into buf[off, off+len): > 0 bytes, 0 EOF, -1 nothing more for now (ENOMSG, or EAGAIN after timeoutMs). */
  dataFdRead(fd: number, buf: Uint8Array, off: number, len: number, timeoutMs: number): number;
  /** Write buf[off, off+len), waiting up to timeoutMs when full: bytes accepted. A refusal throws (errno). */
  dataFdWrite(fd: number, buf: Uint8Array, off: number, len: number, timeoutMs: number): number;
  fdClose(fd: number): void;
  /**
   * A TCP socket's SO_KEEPALIVE, TCP_KEEPIDLE / TCP_KEEPINTVL (s), TCP_KEEPCNT and TCP_USER_TIMEOUT (ms): set them
   * (bounds: 1..32767 s, 1..32767 s, 1..127, 0..2^31-1 ms) when `settings` is given, then read all back.
   * ERR_ARG for a bad value, EPROTONOSUPPORT for an fd that is not a TCP socket.
   */
  tcpKeepalive(fd: number, settings: TcpKeepalive | null): TcpKeepalive;

  // ---- region access (emulated device or a real VFIO device fd) ----------------------------------------------
  regionOpenEmu(id: number): number;
  regionOpenFd(fd: number, regionOffset: number, regionSize: number, areas: RegionAreaSpec[], mmap: boolean): number;
  regionClose(h: number): void;
  /** Trapped data access mode of a region: 0 bulk (one pread/pwrite per piece), 1 aligned (QEMU's <= 8-byte accesses). */
  regionSetAccess(h: number, mode: number): void;
  /** Mapped sparse areas of the open region (areas whose mmap failed are absent: slow path). */
  regionAreas(h: number): RegionAreaSpec[];
  /** One access of exactly `width` bytes at `off` (naturally aligned, inside the region). */
  regRead(h: number, off: number, width: 4 | 8): bigint;
  regWrite(h: number, off: number, width: 4 | 8, value: bigint): void;
  /**
   * One trapped access of exactly `len` bytes (1 B .. 1 MiB) at `off` on the libuv pool, so the main thread never
   * waits on a socket (vfio-user): a read (data undefined) resolves to the bytes, a write of `data` to an empty
   * array. Rejects with {code, errno, message} like the synchronous calls. The caller holds the device lock across it.
   */
  regionRwAsync(h: number, off: number, len: number, data?: Uint8Array): Promise<Uint8Array>;
  /** Copy region [off, off+len) into dst[dstOff..]: mmap pieces by memcpy, trapped pieces by read. Returns trapped bytes. */
  regionCopyOut(h: number, off: number, len: number, dst: Uint8Array, dstOff: number): number;
  /**
   * Zero-copy save of one container record: buf[0..56) holds the record header (checksum filled in here), the
   * [DATA][size] prefix and the [END] trailer (if `trailer`); the data goes from the mapped areas straight into
   * pwritev(fd, pos), trapped pieces through buf[64..]. Returns bytes written, -1 without SSE4.2.
   */
  regionSendRecord(h: number, off: number, len: number, buf: Uint8Array, fd: number, pos: number, trailer: boolean): number;
  /**
   * Zero-copy load of one data packet: preadv(fd, pos) `len` bytes into region [off, off+len) (mapped pieces
   * directly, trapped pieces into scratch[0..len) for a later regionCopyIn). Returns CRC32C continued from `crc`
   * over the bytes, -1 without SSE4.2 (nothing read).
   */
  regionRecvData(h: number, off: number, len: number, fd: number, pos: number, scratch: Uint8Array, crc: number): number;
  /** nice += delta for the calling thread (workers yield the CPU to the main thread). Returns the new nice value. */
  lowerThreadPriority(delta: number): number;
  /** CRC32C of buf continued from `crc`, for cross-checks against the library; -1 without SSE4.2. */
  crc32cNative(buf: Uint8Array, crc: number): number;
  /** Copy src[srcOff..srcOff+len) into region [off, off+len); `which` selects mmap and/or trapped pieces. */
  regionCopyIn(h: number, off: number, len: number, src: Uint8Array, srcOff: number, which: number): number;

  // ---- real kernel VFIO ----------------------------------------------------------------------------------------
  vfioOpenDevice(groupPath: string, deviceName: string): VfioDeviceHandles;
  vfioDeviceInfo(deviceFd: number): VfioDeviceInfo;
  vfioRegionInfo(deviceFd: number, index: number): Uint8Array;
  vfioReset(deviceFd: number): void;
  /** VFIO_IOMMU_DIRTY_PAGES on a type1 container fd: op 1 START, 2 STOP, 4 GET_BITMAP (kernel sets bits in bitmap). */
  vfioDirtyPages(containerFd: number, op: number, iova: number, size: number, pgsize: number, bitmap?: Uint8Array): void;
  vfioClose(fd: number): void;
  // ---- real kernel VFIO: migration v2 (device fd) and the cdev + iommufd path ---------------------------------
  /** Open /dev/vfio/devices/vfioN, VFIO_DEVICE_BIND_IOMMUFD to a new /dev/iommu fd, IOMMU_IOAS_ALLOC, ATTACH_IOMMUFD_PT. */
  vfioOpenCdev(cdevPath: string): VfioCdevHandles;
  /** VFIO_DEVICE_FEATURE GET MIGRATION: VFIO_MIGRATION_* flags (ENOTTY: no migration support). */
  vfioMigrationFlags(deviceFd: number): number;
  /** PROBE of a feature id with GET (1<<16) and/or SET (1<<17): false when unsupported. */
  vfioFeatureProbe(deviceFd: number, feature: number, getSet: number): boolean;
  vfioMigState(deviceFd: number): number;
  /** SET MIG_DEVICE_STATE: the new data fd, or -1 when the arc opens none. */
  vfioSetMigState(deviceFd: number, state: number): number;
  /** VFIO_MIG_GET_PRECOPY_INFO on a PRE_COPY data fd (EINVAL outside PRE_COPY/PRE_COPY_P2P). */
  vfioPrecopyInfo(dataFd: number): VfioPrecopyInfo;
  vfioMigDataSize(deviceFd: number): number;
  /** DMA_LOGGING_START over page-aligned ranges; returns the page size the driver chose. */
  vfioDmaLogStart(deviceFd: number, pageSize: number, ranges: { iova: number; length: number }[]): number;
  vfioDmaLogStop(deviceFd: number): void;
  /** DMA_LOGGING_REPORT: the kernel sets bits (one per page) in bitmap and clears its log for the range. */
  vfioDmaLogReport(deviceFd: number, iova: number, length: number, pageSize: number, bitmap: Uint8Array): void;
  /** Layout facts checked by static_assert against <linux/vfio.h>, exported so tests can compare with TS tables. */
  uapiLayout(): Record<string, number>;

  // ---- vfio-user (addon/src/vfio-user) -------------------------------------------------------------------------
  /** Connect to a vfio-user server's UNIX socket on the libuv pool (bounded by timeoutMs). Resolves to a connection id. */
  vfuConnect(path: string, timeoutMs: number): Promise<number>;
  /** Negotiated limits: REGION_READ/WRITE bytes per request, data bytes per write-type request, per-request timeout. */
  vfuSetLimits(conn: number, maxXfer: number, writeBound: number, timeoutMs: number): void;
  /**
   * One request and its validated reply payload (between minReply and maxReply bytes; up to maxFds descriptors,
   * which the caller then owns). A server error reply throws with the server's errno.
   */
  vfuRequest(conn: number, cmd: number, body: Uint8Array, minReply: number, maxReply: number, maxFds: number): VfuReply;
  /** vfuRequest on the libuv pool (the main thread does not wait on the socket). */
  vfuRequestAsync(conn: number, cmd: number, body: Uint8Array, minReply: number, maxReply: number, maxFds: number): Promise<VfuReply>;
  /** Shut the connection down (a request in flight fails at once with ECANCELED); the last owner closes the socket. */
  vfuClose(conn: number): void;
  /**
   * Release the request in flight (and ones already asked for) at once with ECANCELED, without waiting for the server
   * or the timeout. The connection stays usable when the request was sent and its reply had not begun (the reply is
   * dropped by the next request); otherwise it is broken.
   */
  vfuInterrupt(conn: number): void;
  /** Requests sent on this connection so far. */
  vfuRequests(conn: number): number;
  /** A region of a vfio-user device: trapped access by REGION_READ/WRITE, `areas` mapped from `fd` (-1: none) at fdOffset + area.offset. */
  regionOpenUser(conn: number, index: number, size: number, fd: number, fdOffset: number, areas: RegionAreaSpec[]): number;
  /** Serve emulated device `id` on a UNIX socket (the path must not exist). Returns a server id. */
  vfuServerStart(id: number, path: string, maxXfer: number, msgTimeoutMs: number): number;
  vfuServerStop(server: number): void;
  vfuServerStats(server: number): VfuServerStats;
  closeFd(fd: number): void;

  // ---- native loops used only by `npm run bench` -------------------------------------------------------------
  /** Copy `total` bytes of the region data area [off, off+len) in `chunk`-byte pieces into dst, with `threads` threads. Returns ns. */
  benchCopyLimit(h: number, off: number, len: number, chunk: number, total: number, threads: number, dst: Uint8Array): number;
  /** The seed's sequential algorithm: for each region handle, save with the v1 protocol into `buf`, write() to outFd. Returns bytes. */
  baselineSequentialSave(handles: number[], profile: number, buf: Uint8Array, outFd: number): number;
}

function findAddon(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  // dist/src/addon -> repo root is three levels up; src/addon (tsx) is two.
  for (const up of ['../../..', '../..']) {
    const p = path.resolve(here, up, 'build/Release/vfio_mig.node');
    if (fs.existsSync(p)) return p;
  }
  throw new Error('vfio-mig native addon not built: run `npm ci` (or `npx cmake-js compile --out build`)');
}

let cached: NativeAddon | undefined;
/** The addon for this thread (each worker thread gets its own instance; native globals are shared). */
export function native(): NativeAddon {
  if (!cached) cached = createRequire(import.meta.url)(findAddon()) as NativeAddon;
  return cached;
}
