// Guest tests of the kernel reach itself against mtty: the v2 ioctls, both open paths, the data fd rules,
// DMA logging, a refused stream, and embedder mode opening nothing.
import fs from 'node:fs';
import { KernelVfioDevice } from '../../src/main/reach/kernel/device.js';
import { Feature, V2State } from '../../src/main/reach/kernel/uapi.js';
import { assert, eq, rejects, test } from './harness.js';
import { createMdev, distinctive, readPorts, removeMdev, writePorts } from './mtty.js';

const GUEST = [{ iova: 0, length: 1 << 20 }];

/** Devices created for one test and removed after it. */
async function withMdevs(n: number, f: (paths: string[]) => void | Promise<void>, type: 'mtty-1' | 'mtty-2' = 'mtty-2'): Promise<void> {
  const paths = Array.from({ length: n }, () => createMdev(type));
  try { await f(paths); } finally { paths.forEach(removeMdev); }
}

function drain(dev: KernelVfioDevice, out: number[]): number {
  const buf = new Uint8Array(4096);
  let total = 0;
  for (;;) {
    const r = dev.read(buf);
    if (r.n === 0) return total;
    out.push(...buf.subarray(0, r.n));
    total += r.n;
  }
}

/** Source: PRE_COPY (initial bytes), then STOP_COPY through the same fd, then STOP. Returns the device stream. */
function saveDirect(src: KernelVfioDevice): { stream: Uint8Array; initial: number } {
  const bytes: number[] = [];
  assert(src.setState(V2State.PRE_COPY), 'RUNNING -> PRE_COPY opens a data fd');
  const info = src.precopyInfo();
  assert(info.initialBytes > 0, `PRE_COPY initial_bytes > 0 (got ${info.initialBytes})`);
  const initial = drain(src, bytes);
  eq(initial, info.initialBytes, 'bytes readable in PRE_COPY = initial_bytes');
  eq(src.precopyInfo(), { initialBytes: 0, dirtyBytes: 0 }, 'PRECOPY_INFO after draining');
  // mtty keeps the PRE_COPY file across STOP_COPY (data_fd -1): the session continues.
  src.setState(V2State.STOP_COPY);
  drain(src, bytes);
  src.setState(V2State.STOP);
  eq(src.data, -1, 'STOP_COPY -> STOP ends the session');
  return { stream: Uint8Array.from(bytes), initial };
}

function loadDirect(dst: KernelVfioDevice, stream: Uint8Array): void {
  dst.setState(V2State.STOP);
  assert(dst.setState(V2State.RESUMING), 'STOP -> RESUMING opens a data fd');
  dst.write(stream, 0, stream.length, 0);
  dst.setState(V2State.STOP);
  dst.setState(V2State.RUNNING);
}

for (const via of ['cdev', 'group'] as const) {
  test(`reach ${via}: flags, MIG_DATA_SIZE, pre-copy + stop-copy through the data fd, load, BARs read back`, () =>
    withMdevs(2, ([a, b]) => {
      const src = KernelVfioDevice.open(a!, { via });
      const dst = KernelVfioDevice.open(b!, { via });
      try {
        eq(src.mode, via, 'open path');
        eq(src.migrationFlags(), 7, 'STOP_COPY|P2P|PRE_COPY');
        assert(src.probe(Feature.MIG_DEVICE_STATE, 'set'), 'PROBE MIG_DEVICE_STATE');
        eq(src.state(), V2State.RUNNING, 'initial state');
        const size = src.stopCopySize();
        const want = distinctive(1, 2);
        writePorts(src, want);
        const { stream, initial } = saveDirect(src);
        eq(stream.length, size, 'stream length = MIG_DATA_SIZE');
        eq(initial, 24, 'mtty header sent in pre-copy');
        loadDirect(dst, stream);
        eq(dst.state(), V2State.RUNNING, 'destination running');
        eq(readPorts(dst, 2), want, 'destination registers and FIFO');
      } finally { src.close(); dst.close(); }
    }));
}

test('reach: a stream the kernel refuses (EFAULT at write) names the offset; reset leaves the device RUNNING and clean', () =>
  withMdevs(2, async ([a, b]) => {
    const src = KernelVfioDevice.open(a!);
    const dst = KernelVfioDevice.open(b!);
    try {
      writePorts(src, distinctive(2, 2));
      const { stream } = saveDirect(src);
      stream[0]! ^= 0xff; // the magic
      dst.setState(V2State.STOP);
      dst.setState(V2State.RESUMING);
      const e = await rejects(() => dst.write(stream, 0, stream.length, 4096), (x) => x.code === 'VFM_LOAD_REJECTED', 'damaged write');
      eq(e.errno, 14, 'EFAULT');
      eq(e.offset, 4096, 'stream offset named');
      eq(dst.state(), V2State.RESUMING, 'still RESUMING after the refused write');
      // Measured on 6.12: mtty keeps the refused bytes, and RESUMING -> STOP would then succeed and APPLY the damaged
      // ports. So a refused write must end in VFIO_DEVICE_RESET, never in the STOP arc.
      dst.reset();
      eq(dst.state(), V2State.RUNNING, 'reset returns to RUNNING');
      eq(readPorts(dst, 2).map((p) => p.fifo.length), [0, 0], 'no state loaded');
    } finally { src.close(); dst.close(); }
  }));

test('reach: FSM facts (STOP_COPY -> PRE_COPY refused, PRECOPY_INFO outside PRE_COPY, P2P arcs)', () =>
  withMdevs(1, async ([a]) => {
    const d = KernelVfioDevice.open(a!);
    try {
      d.setState(V2State.RUNNING_P2P);
      assert(d.setState(V2State.PRE_COPY_P2P), 'RUNNING_P2P -> PRE_COPY_P2P opens a data fd');
      eq(d.precopyInfo().initialBytes, 24, 'PRECOPY_INFO in PRE_COPY_P2P');
      d.setState(V2State.STOP_COPY);
      await rejects(() => d.precopyInfo(), (x) => x.errno === 22, 'PRECOPY_INFO in STOP_COPY is EINVAL');
      await rejects(() => d.setState(V2State.PRE_COPY), (x) => x.code === 'VFM_TRANSITION_FAILED', 'STOP_COPY -> PRE_COPY');
      eq(d.state(), V2State.STOP_COPY, 'state kept after a blocked arc');
      d.setState(V2State.STOP);
      d.setState(V2State.RUNNING);
    } finally { d.close(); }
  }));

test('reach: DMA logging start / report / stop over the guest ranges (REPORT needs IOMMUFD_DRIVER in the kernel)', () =>
  withMdevs(1, ([a]) => {
    const d = KernelVfioDevice.open(a!, { guestRanges: GUEST });
    try {
      assert(d.probe(Feature.DMA_LOGGING_START, 'set'), 'PROBE DMA_LOGGING_START');
      eq(d.dmaLogStart(4096), 4096, 'page size');
      const bm = d.dmaLogReport();
      eq(bm.length, 32, '256 pages -> 32 bytes');
      eq([...bm].every((x) => x === 0), true, 'mtty does no DMA: nothing dirty');
      d.dmaLogStop();
    } finally { d.close(); }
  }));

const vfioFds = () => fs.readdirSync('/proc/self/fd').map((fd) => {
  try { return `${fd}->${fs.readlinkSync(`/proc/self/fd/${fd}`)}`; } catch { return ''; }
}).filter((l) => /\/dev\/(vfio|iommu)/.test(l)).sort();

test('reach embedded: handed-over fds are used, nothing is opened, nothing handed over is closed', () =>
  withMdevs(2, ([a, b]) => {
    // The "VMM" opens the devices; vfio-mig gets the fds.
    const vmmSrc = KernelVfioDevice.open(a!, { via: 'cdev' });
    const vmmDst = KernelVfioDevice.open(b!, { via: 'group' });
    try {
      const before = vfioFds();
      const src = KernelVfioDevice.fromHandles('src', vmmSrc.handles, { guestRanges: GUEST });
      const dst = KernelVfioDevice.fromHandles('dst', vmmDst.handles);
      const want = distinctive(3, 2);
      writePorts(src, want);
      src.dmaLogStart();
      src.dmaLogReport();
      src.dmaLogStop();
      loadDirect(dst, saveDirect(src).stream);
      eq(vfioFds(), before, 'no /dev/vfio or /dev/iommu fd opened during a migration');
      src.close();
      dst.close();
      eq(vfioFds(), before, 'close() leaves the handed-over fds open');
      eq(readPorts(vmmDst, 2), want, 'state arrived (read through the VMM\'s own fd)');
    } finally { vmmSrc.close(); vmmDst.close(); }
  }));
