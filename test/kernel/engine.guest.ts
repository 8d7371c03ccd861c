// Guest tests of the ENGINE on the kernel reach: Migration (pre-copy, P2P quiescing, stop-and-copy, QEMU 8.1+ v2
// stream) and Loader (every destination STOP before any starts; a refused stream resets) on mtty devices, the
// bytes moved by worker threads through the kernel's data fds.
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';
import { ContainerWriter, EnginePool, FileSink, Loader, Migration, onTrace } from '../../src/main/index.js';
import { kernelDevice } from '../../src/main/reach/kernel/device.js';
import { FLAG_DEV_DATA_STATE, getBe64 } from '../../src/main/protocol/qemu-stream.js';
import type { V2Device } from '../../src/main/protocol/v2/device.js';
import { readRecords, writeRecords } from '../craft.js';
import { assert, eq, rejects, test } from './harness.js';
import { createMdev, distinctive, readPorts, removeMdev, writePorts } from './mtty.js';
import { opsOf } from './seam-io.js';

const tmp = (n: string) => path.join(os.tmpdir(), `vfm-kernel-${n}-${process.pid}.vfmig`);

async function withEngine(nSrc: number, f: (pool: EnginePool, src: V2Device[], dst: V2Device[]) => Promise<void>): Promise<void> {
  const paths = Array.from({ length: 2 * nSrc }, () => createMdev('mtty-2'));
  const pool = new EnginePool({ threads: 2 });
  // Sources by cdev + iommufd, destinations by group + container: both open paths in one migration.
  const src = paths.slice(0, nSrc).map((p) => kernelDevice(p, { via: 'cdev' }));
  const dst = paths.slice(nSrc).map((p) => kernelDevice(p, { via: 'group' }));
  try {
    await f(pool, src, dst);
  } finally {
    [...src, ...dst].forEach((d) => d.close());
    await pool.close();
    paths.forEach(removeMdev);
  }
}

test('engine: two mtty sources at once (P2P before any STOP_COPY), pre-copy + stop-copy through the data fds, loaded into two destinations, BARs read back', () =>
  withEngine(2, async (pool, src, dst) => {
    const file = tmp('two');
    const want = src.map((s, i) => { const w = distinctive(7 + i, 2); writePorts(opsOf(s), w); return w; });
    const arcs: string[] = [];
    const off = onTrace((ev, f) => { if (ev === 'vfio_migration_set_state') arcs.push(`${f.device}:${f.to}`); });
    let loader: Loader | undefined;
    try {
      const rep = await new Migration(src, pool, new ContainerWriter(FileSink.open(file, { force: true })), { maxRounds: 3 }).run();
      assert(rep.ok, 'migration ok');
      const firstStopCopy = arcs.findIndex((a) => a.endsWith(':STOP_COPY'));
      for (const s of src) {
        const p2p = arcs.indexOf(`${s.name}:PRE_COPY_P2P`);
        assert(p2p >= 0 && p2p < firstStopCopy, `${s.name} quiesced (PRE_COPY_P2P) before any STOP_COPY: ${arcs.join(' ')}`);
      }
      loader = new Loader(file, pool, { makeDestination: (e) => dst[e.index]! });
      const lr = await loader.run();
      eq(lr.devices.map((d) => [d.state, d.initDataSent]), [['RUNNING', true], ['RUNNING', true]], 'destinations started, initial bytes counted');
      eq(dst.map((d) => readPorts(opsOf(d), 2)), want, 'destination registers and FIFOs');
    } finally {
      off();
      await loader?.close();
      fs.rmSync(file, { force: true });
    }
  }));

test('engine: a damaged stream refused by the kernel (EFAULT) names the device and offset; the destination is reset and stopped, not running', () =>
  withEngine(1, async (pool, src, dst) => {
    const file = tmp('bad');
    writePorts(opsOf(src[0]!), distinctive(9, 2));
    let loader: Loader | undefined;
    try {
      await new Migration(src, pool, new ContainerWriter(FileSink.open(file, { force: true })), { maxRounds: 2 }).run();
      const { header, recs } = readRecords(file);
      // The first DATA packet carries mtty's header: damage its magic (the record is re-checksummed).
      const first = recs.find((r) => r.type === 2 && r.body.length >= 24 && getBe64(r.body, 0) === FLAG_DEV_DATA_STATE)!;
      first.body[16]! ^= 0xff;
      writeRecords(file, header, recs);
      loader = new Loader(file, pool, { makeDestination: (e) => dst[e.index]! });
      const e = await rejects(() => loader!.run(), (x) => x.code === 'VFM_LOAD_REJECTED', 'load of a damaged stream');
      eq(e.device, dst[0]!.name, 'names the device');
      assert(typeof e.offset === 'number', 'names an offset');
      eq(dst[0]!.state(), 'STOP', 'reset (state discarded), then stopped: neither RESUMING nor RUNNING');
      eq(readPorts(opsOf(dst[0]!), 2).map((p) => p.fifo.length), [0, 0], 'nothing of the damaged stream applied');
    } finally {
      await loader?.close();
      fs.rmSync(file, { force: true });
    }
  }));

test('CLI: vfio-mig save --device vfio:<sysfs> x2, then load --device vfio:<sysfs> x2 (exit 0, BARs read back)', async () => {
  const { spawnSync } = await import('node:child_process');
  const paths = Array.from({ length: 4 }, () => createMdev('mtty-2'));
  const file = tmp('cli');
  const bin = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../../bin/vfio-mig.js');
  try {
    const want = paths.slice(0, 2).map((p, i) => {
      const d = kernelDevice(p);
      try { const w = distinctive(11 + i, 2); writePorts(opsOf(d), w); return w; } finally { d.close(); }
    });
    const cli = (args: string[]) => spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
    const save = cli(['save', '--device', `vfio:${paths[0]}`, '--device', `vfio:${paths[1]}`, '--stream', file, '--json']);
    eq(save.status, 0, `save exit (${save.stderr})`);
    const load = cli(['load', file, '--device', `vfio:${paths[2]}`, '--device', `vfio:${paths[3]}`, '--json']);
    eq(load.status, 0, `load exit (${load.stderr}${load.stdout.slice(0, 400)})`);
    eq(JSON.parse(load.stdout).result.load.devices.map((d: { state: string }) => d.state), ['RUNNING', 'RUNNING'], 'loaded and started');
    const got = paths.slice(2).map((p) => { const d = kernelDevice(p); try { return readPorts(opsOf(d), 2); } finally { d.close(); } });
    eq(got, want, 'destination registers and FIFOs');
    const bad = cli(['save', '--device', 'vfio:/sys/bus/mdev/devices/00000000-0000-0000-0000-000000000000', '--stream', tmp('none')]);
    eq(bad.status, 2, `a missing device is a usage error (${bad.stderr})`);
    assert(/VFM_BAD_ARGUMENT.*no such device/.test(bad.stderr), bad.stderr);
  } finally {
    fs.rmSync(file, { force: true });
    paths.forEach(removeMdev);
  }
});
