// The receive worker of one live data channel (QEMU's multifd recv thread): a worker thread of its own that reads
// the channel's socket natively, straight into a reused SharedArrayBuffer slot (one copy, kernel -> slot), checks
// every record (type, device pinned to this channel, size bounded by the destination's own geometry, sequence,
// checksum), and applies each CHUNK to its device through the device's data path under the device's Atomics lock —
// the same loadPathWith() a load task runs. The destination's main thread never touches these bytes; it hears of
// progress, of each device's init-data marker and last section, and of the end or the first error, by message.
// Started by src/main/live/channel-rx.ts (main side), which owns the socket; this thread only reads its fd.
import { parentPort, workerData } from 'node:worker_threads';
import { native } from '../addon/native.js';
import { openDataPath } from '../main/device/registry.js';
import type { DataPath } from '../main/device/seam.js';
import { ErrorCode, MigError, toMigError } from '../main/errors.js';
import { MAX_CHUNK_BODY, RECORD_HEADER_SIZE, RECORD_NAMES, REC_CHUNK, checkChunkOrder, decodeRecordHeader } from '../main/container/format.js';
import { loadPathWith } from './path-tasks.js';
import { loadConfigModule } from '../main/transport/config.js';
import type { ChannelRxInit, ChannelRxMessage, ChannelRxWorkerData, RxDeviceDelta } from '../main/live/channel-rx.js';

// Bulk data threads run below the main thread (as the pool's workers do), which keeps the return path and the state
// machine responsive.
try { native().lowerThreadPriority(Number(process.env.VFIO_MIG_WORKER_NICE ?? 5)); } catch { /* best effort */ }

const wd = workerData as ChannelRxWorkerData;
const abort = new Int32Array(wd.abort);
const post = (m: ChannelRxMessage) => parentPort!.postMessage(m);
/** Poll period: a cancel (the abort word) is seen within it while the socket is quiet. */
const POLL_MS = 50;

class Stopped extends Error {}

interface Dev {
  index: number; name: string; path: DataPath; init: ChannelRxInit['devices'][number];
  nextSeq: bigint; nextOffset: bigint; parse: ChannelRxInit['devices'][number]['parse'];
  /** Not yet reported to the main thread. */
  packets: number; bytes: number; initSent: boolean; loaded: boolean; streamEnd: number;
}

let init: ChannelRxInit;
let prefix: Uint8Array;
let rx = 0; // bytes of frames read on this channel after its HELLO: the offsets errors name

/** Exactly n bytes into buf[off..]; false if `eofOk` and the peer closed cleanly before the first byte. */
function readExact(buf: Uint8Array, off: number, n: number, what: string, eofOk: boolean): boolean {
  let done = 0;
  while (done < n) {
    if (prefix.length) {
      const k = Math.min(prefix.length, n - done);
      buf.set(prefix.subarray(0, k), off + done);
      prefix = prefix.subarray(k);
      done += k;
      continue;
    }
    if (Atomics.load(abort, 0)) throw new Stopped();
    let r: number;
    try {
      r = native().dataFdRead(init.fd, buf, off + done, n - done, POLL_MS);
    } catch (e) {
      if (Atomics.load(abort, 0)) throw new Stopped();
      const m = e as MigError;
      if (m.errno === 110) throw new MigError(ErrorCode.PEER_TIMEOUT, `the peer stopped acknowledging (TCP): ${m.message}`, { errno: m.errno });
      throw new MigError(ErrorCode.PEER_GONE, `connection failed in ${what}: ${m.message}`, { errno: m.errno, cause: e });
    }
    if (r < 0) continue; // nothing within POLL_MS: look at the abort word, wait again
    if (r === 0) {
      if (eofOk && done === 0) return false;
      throw new MigError(ErrorCode.PEER_GONE, `the peer closed the connection in ${what} (${done} of ${n} bytes)`, { offset: rx });
    }
    done += r;
    Atomics.add(wd.bytes, 0, BigInt(r));
  }
  return true;
}

function delta(d: Dev): RxDeviceDelta {
  const x: RxDeviceDelta = { index: d.index, parse: d.parse, dataPackets: d.packets, dataBytes: d.bytes, streamEnd: d.streamEnd };
  d.packets = 0;
  d.bytes = 0;
  return x;
}

async function main(): Promise<void> {
  const devs = new Map<number, Dev>();
  prefix = init.prefix;
  for (const x of init.devices) {
    // A reach's own config restore module, imported once here as a load task would (transport/config.ts).
    await loadConfigModule(x.config, x.name);
    devs.set(x.index, {
      index: x.index, name: x.name, path: await openDataPath(x.path), init: x, nextSeq: 0n, nextOffset: 0n, parse: x.parse,
      packets: 0, bytes: 0, initSent: false, loaded: false, streamEnd: 0,
    });
  }
  // One slot, grown to the records actually seen (powers of two), never above what the destinations can take.
  let slot = new Uint8Array(new SharedArrayBuffer(64 << 10));
  post({ t: 'ready' });
  let last = performance.now();
  const what = `channel ${init.channel}`;
  for (;;) {
    const at = rx;
    if (!readExact(slot, 0, RECORD_HEADER_SIZE, 'a frame header', true)) break;
    const type = new DataView(slot.buffer, 0, 4).getUint32(0, true);
    if (type !== REC_CHUNK) {
      throw new MigError(ErrorCode.PEER_PROTOCOL, `${RECORD_NAMES[type] ?? `frame type ${type}`} outside channel 0 (channels 1..N-1 carry CHUNKs only)`, { offset: at });
    }
    const h = decodeRecordHeader(slot, at);
    const d = devs.get(h.device);
    if (!d) {
      if (h.device >= init.tableDevices) {
        throw new MigError(ErrorCode.STREAM_BAD_RECORD, `CHUNK for device ${h.device}, table has ${init.tableDevices}`, { offset: at + 8 });
      }
      throw new MigError(ErrorCode.PEER_PROTOCOL,
        `CHUNK of device ${h.device} on ${what}: a device's records travel on channel device mod ${init.channels} (${h.device % init.channels})`, { offset: at + 8 });
    }
    if (h.length > Math.min(init.maxBody, MAX_CHUNK_BODY)) {
      throw new MigError(ErrorCode.STREAM_TOO_LARGE, `CHUNK of ${h.length} bytes exceeds what the destination can take (${init.maxBody})`,
        { offset: at + 4, value: h.length, device: d.name });
    }
    checkChunkOrder(h, d.nextSeq, d.nextOffset, at, d.name);
    if (slot.length < RECORD_HEADER_SIZE + h.length) {
      const grown = new Uint8Array(new SharedArrayBuffer(2 ** Math.ceil(Math.log2(RECORD_HEADER_SIZE + h.length))));
      grown.set(slot.subarray(0, RECORD_HEADER_SIZE));
      slot = grown;
    }
    readExact(slot, RECORD_HEADER_SIZE, h.length, `a CHUNK body of ${d.name}`, false);
    rx += RECORD_HEADER_SIZE + h.length;
    d.nextSeq++;
    d.nextOffset += BigInt(h.length);
    d.streamEnd = rx;
    const res = loadPathWith(d.path, {
      op: 'load-path', path: d.init.path, device: d.name, deviceIndex: d.index, shared: d.init.shared, slot: slot.buffer as SharedArrayBuffer,
      bodyLen: h.length, fileOffset: at, streamOffset: Number(h.streamOffset), parse: d.parse, limits: d.init.limits, config: d.init.config,
    });
    if (res.config) throw new MigError(ErrorCode.BAD_STATE, 'a config restore hook needs the main thread: not on a receive worker', { device: d.name });
    d.parse = res.parse;
    d.packets += res.dataPackets;
    d.bytes += res.dataBytes;
    // The events the destination's main thread waits for go out at once; progress at most every 100 ms.
    const initNow = !!d.parse.initDataSent && !d.initSent;
    const loadedNow = d.parse.sawConfig && !d.parse.inSection && !d.loaded;
    if (initNow) d.initSent = true;
    if (loadedNow) d.loaded = true;
    const now = performance.now();
    if (initNow || loadedNow || now - last >= 100) {
      last = now;
      post({ t: 'progress', devices: [...devs.values()].filter((x) => x === d || x.packets).map(delta) });
    }
  }
  post({ t: 'end', devices: [...devs.values()].map(delta) });
}

// The devices come once the destinations are RESUMING (ChannelRx.begin); the modules above loaded meanwhile.
parentPort!.once('message', (m: ChannelRxInit) => {
  init = m;
  main().catch((e) => {
    if (e instanceof Stopped) { post({ t: 'stopped' }); return; }
    const x = toMigError(e);
    // Offsets here are bytes of this channel's stream (after its HELLO), not of the merged stream a file would hold.
    const text = x.device && x.message.startsWith(`${x.device}: `) ? x.message.slice(x.device.length + 2) : x.message;
    post({ t: 'error', error: { ...x.toJSON(), message: `${x.device ? `${x.device}: ` : ''}channel ${init.channel} (offsets count bytes of this channel's stream): ${text}` } });
  });
});
