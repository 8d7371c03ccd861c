// Guest tests of the kernel reach against mtty, through the seam (V2Device over KernelVfioDevice, the fd data
// path): both open paths, the FSM walked arc by arc on a real kernel, the data fd rules, a refused stream,
// DMA logging, two sources quiesced together, and embedded mode opening nothing.
import fs from 'node:fs';
import fdPath from '../../src/main/protocol/v2/fd-path.js';
import { kernelDevice, KernelVfioDevice } from '../../src/main/reach/kernel/device.js';
import { V2_STATE } from '../../src/main/protocol/v2/uapi.js';
import { assert, eq, rejects, test } from './harness.js';
import { createMdev, distinctive, readPorts, removeMdev, writePorts } from './mtty.js';
import { load, opsOf, precopy, save, stopcopy } from './seam-io.js';

const GUEST = [{ iova: 0, length: 1 << 20 }];

/** Devices created for one test and removed after it. */
async function withMdevs(n: number, f: (paths: string[]) => void | Promise<void>, type: 'mtty-1' | 'mtty-2' = 'mtty-2'): Promise<void> {
  const paths = Array.from({ length: n }, () => createMdev(type));
  try { await f(paths); } finally { paths.forEach(removeMdev); }
}

for (const via of ['cdev', 'group'] as const) {
  test(`kernel ${via}: caps, MIG_DATA_SIZE, pre-copy + stop-copy through the data fd, load, BARs read back`, () =>
    withMdevs(2, ([a, b]) => {
      const src = kernelDevice(a!, { via });
      const dst = kernelDevice(b!, { via });
      try {
        eq(opsOf(src).mode, via, 'open path');
        eq(src.caps, { protocol: 'v2', reach: 'kernel', precopy: true, p2p: true, dirty: 'none', migrationFlags: 7 }, 'caps');
        eq(src.state(), 'RUNNING', 'initial state');
        const size = src.estimate().stopCopyBytes;
        const want = distinctive(1, 2);
        writePorts(opsOf(src), want);
        const { stream, initial } = save(src);
        eq(stream.length, size, 'stream length = MIG_DATA_SIZE');
        eq(initial, 24, 'mtty header sent in pre-copy');
        load(dst, stream);
        eq(dst.state(), 'RUNNING', 'destination running');
        eq(readPorts(opsOf(dst), 2), want, 'destination registers and FIFO');
      } finally { src.close(); dst.close(); }
    }));
}

test('kernel: a stream the kernel refuses (EFAULT at write) names the offset; reset leaves the device RUNNING and clean', () =>
  withMdevs(2, async ([a, b]) => {
    const src = kernelDevice(a!);
    const dst = kernelDevice(b!);
    try {
      writePorts(opsOf(src), distinctive(2, 2));
      const { stream } = save(src);
      stream[0]! ^= 0xff; // the magic
      dst.setState('RESUMING');
      const path = fdPath(dst.dataPath()!);
      const e = await rejects(() => path.write(stream, 0, stream.length, 4096), (x) => x.code === 'VFM_LOAD_REJECTED', 'damaged write');
      eq(e.errno, 14, 'EFAULT');
      eq(e.offset, 4096, 'stream offset named');
      eq(dst.state(), 'RESUMING', 'still RESUMING after the refused write');
      // Measured on 6.12: mtty keeps the refused bytes, and RESUMING -> STOP would then succeed and APPLY the damaged
      // ports. So a refused write must end in VFIO_DEVICE_RESET, never in the STOP arc.
      dst.reset();
      eq(dst.state(), 'RUNNING', 'reset returns to RUNNING');
      eq(dst.dataPath(), null, 'reset closed the session');
      eq(readPorts(opsOf(dst), 2).map((p) => p.fifo.length), [0, 0], 'no state loaded');
    } finally { src.close(); dst.close(); }
  }));

test('kernel: FSM walked arc by arc (RUNNING -> PRE_COPY_P2P via RUNNING_P2P; blocked STOP_COPY -> PRE_COPY)', () =>
  withMdevs(1, async ([a]) => {
    const d = kernelDevice(a!);
    try {
      eq(d.setState('PRE_COPY_P2P').path, ['RUNNING_P2P', 'PRE_COPY_P2P'], 'arcs to PRE_COPY_P2P');
      eq(d.estimate().initialBytes, 24, 'PRECOPY_INFO in PRE_COPY_P2P');
      const ch = d.setState('STOP_COPY');
      eq([ch.path, ch.newSession], [['STOP_COPY'], false], 'PRE_COPY_P2P -> STOP_COPY keeps the session (data_fd -1)');
      const fd = d.dataPath()!.params as { fd: number };
      await rejects(() => opsOf(d).precopyInfo(fd.fd), (x) => x.errno === 22, 'PRECOPY_INFO in STOP_COPY is EINVAL');
      await rejects(() => d.setState('PRE_COPY'), (x) => x.code === 'VFM_BAD_STATE', 'the table refuses STOP_COPY -> PRE_COPY');
      await rejects(() => opsOf(d).setState(V2_STATE.PRE_COPY), (x) => x.errno === 22, 'and so does the kernel');
      eq(d.state(), 'STOP_COPY', 'state kept after a blocked arc');
      eq(d.setState('RUNNING').path, ['STOP', 'RUNNING_P2P', 'RUNNING'], 'arcs back to RUNNING');
    } finally { d.close(); }
  }));

test('kernel: DMA logging start / report / stop over the guest ranges (REPORT needs IOMMUFD_DRIVER in the kernel)', () =>
  withMdevs(1, ([a]) => {
    const d = kernelDevice(a!, { guestRanges: [...GUEST, { iova: 1 << 30, length: 64 << 10 }] });
    try {
      eq(d.caps.dirty, 'dma-logging', 'PROBE DMA_LOGGING_START -> dma-logging');
      const log = d.dirtyLog!;
      eq(log.pages, 256 + 16, 'pages of both ranges');
      log.start();
      const bm = new Uint8Array(34);
      eq(log.report(bm), 0, 'mtty does no DMA: nothing dirty');
      log.stop();
    } finally { d.close(); }
  }));

test('kernel: two sources quiesced together (both PRE_COPY_P2P before either STOP_COPY), two destinations', () =>
  withMdevs(4, ([a, b, c, d]) => {
    const srcs = [kernelDevice(a!), kernelDevice(b!)];
    const dsts = [kernelDevice(c!, { via: 'group' }), kernelDevice(d!, { via: 'group' })];
    try {
      const want = srcs.map((s, i) => { const w = distinctive(4 + i, 2); writePorts(opsOf(s), w); return w; });
      const bytes: number[][] = [[], []];
      srcs.forEach((s, i) => precopy(s, bytes[i]!));
      for (const s of srcs) eq(s.setState('PRE_COPY_P2P').path, ['PRE_COPY_P2P'], `${s.name}: quiesced`);
      eq(srcs.map((s) => s.state()), ['PRE_COPY_P2P', 'PRE_COPY_P2P'], 'every source P2P before any STOP_COPY');
      srcs.forEach((s, i) => stopcopy(s, bytes[i]!));
      dsts.forEach((t, i) => load(t, Uint8Array.from(bytes[i]!)));
      eq(dsts.map((t) => readPorts(opsOf(t), 2)), want, 'both destinations');
    } finally { [...srcs, ...dsts].forEach((x) => x.close()); }
  }));

const vfioFds = () => fs.readdirSync('/proc/self/fd').map((fd) => {
  try { return `${fd}->${fs.readlinkSync(`/proc/self/fd/${fd}`)}`; } catch { return ''; }
}).filter((l) => /\/dev\/(vfio|iommu)/.test(l)).sort();

test('kernel embedded: handed-over fds are used, nothing is opened, nothing handed over is closed', () =>
  withMdevs(2, ([a, b]) => {
    // The "VMM" opens the devices; vfio-mig gets the fds.
    const vmmSrc = KernelVfioDevice.open(a!, { via: 'cdev' });
    const vmmDst = KernelVfioDevice.open(b!, { via: 'group' });
    try {
      const before = vfioFds();
      const src = kernelDevice({ name: 'src', handles: vmmSrc.handles }, { guestRanges: GUEST });
      const dst = kernelDevice({ name: 'dst', handles: vmmDst.handles });
      const want = distinctive(3, 2);
      writePorts(vmmSrc, want);
      src.dirtyLog!.start();
      src.dirtyLog!.report(new Uint8Array(32));
      src.dirtyLog!.stop();
      load(dst, save(src).stream);
      eq(vfioFds(), before, 'no /dev/vfio or /dev/iommu fd opened during a migration');
      src.close();
      dst.close();
      eq(vfioFds(), before, 'close() leaves the handed-over fds open');
      eq(readPorts(vmmDst, 2), want, 'state arrived (read through the VMM\'s own fd)');
      assert(vmmSrc.getState() === V2_STATE.STOP, 'the source stays stopped for the VMM to decide');
    } finally { vmmSrc.close(); vmmDst.close(); }
  }));
