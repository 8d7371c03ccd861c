// The kernel reach on the host (no VFIO device here; the real kernel runs in `npm run test:kernel`): uAPI tables
// against the addon's static_asserted layout, sysfs path validation, embedder-mode argument checks and errors.
import fs from 'node:fs';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { native } from '../src/addon/native.js';
import { KernelVfioDevice, kernelDevice } from '../src/main/reach/kernel/device.js';
import { resolveSysfs } from '../src/main/reach/kernel/sysfs.js';
import { FEATURE, FEATURE_GET, FEATURE_PROBE, FEATURE_SET, MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, V2_STATE } from '../src/main/protocol/v2/uapi.js';
import { ErrorCode, MigError } from '../src/main/errors.js';
import { REC_DEVICE_TABLE } from '../src/main/container/format.js';
import { VfioKernelTransport } from '../src/main/transport/vfio-kernel.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, saveDevices } from '../src/main/api.js';
import { emulatedV2, destroyEmulated } from '../src/main/reach/emulated/v2.js';
import { reachForSpec, reachProvider } from '../src/main/device/registry.js';
import { defaultSysfsPath } from '../src/main/reach/kernel/index.js';
import { readRecords, writeRecords } from './craft.js';
import { rejectsCode, rm, tmpFile } from './helpers.js';

function code(fn: () => unknown): string {
  try { fn(); } catch (e) { assert.instance(e, MigError, String(e)); return (e as MigError).code; }
  throw new Error('expected a MigError');
}

test('v2 uAPI table equals the kernel reach\'s static_asserted values (addon/src/vfio/v2.cc)', () => {
  const L = native().uapiLayout();
  assert.equal([L.v2StateError, L.v2StateStop, L.v2StateRunning, L.v2StateStopCopy, L.v2StateResuming, L.v2StateRunningP2P,
    L.v2StatePreCopy, L.v2StatePreCopyP2P], [V2_STATE.ERROR, V2_STATE.STOP, V2_STATE.RUNNING, V2_STATE.STOP_COPY,
    V2_STATE.RESUMING, V2_STATE.RUNNING_P2P, V2_STATE.PRE_COPY, V2_STATE.PRE_COPY_P2P]);
  assert.equal([L.migrationStopCopy, L.migrationP2P, L.migrationPreCopy], [MIGRATION_STOP_COPY, MIGRATION_P2P, MIGRATION_PRE_COPY]);
  assert.equal([L.featureMigration, L.featureMigDeviceState, L.featureDmaLoggingStart, L.featureDmaLoggingStop,
    L.featureDmaLoggingReport, L.featureMigDataSize, L.featureGet, L.featureSet, L.featureProbe],
  [FEATURE.MIGRATION, FEATURE.MIG_DEVICE_STATE, FEATURE.DMA_LOGGING_START, FEATURE.DMA_LOGGING_STOP,
    FEATURE.DMA_LOGGING_REPORT, FEATURE.MIG_DATA_SIZE, FEATURE_GET, FEATURE_SET, FEATURE_PROBE]);
  // kernel-guest.md's ioctl numbers and sizes.
  assert.equal([L.ioctlDeviceFeature, L.ioctlMigGetPrecopyInfo, L.ioctlDeviceBindIommufd, L.ioctlDeviceAttachIommufdPt,
    L.ioctlIommuIoasAlloc], [0x3b75, 0x3b79, 0x3b76, 0x3b77, 0x3b81]);
  assert.equal([L.precopyInfoSize, L.migStateSize, L.dmaLoggingControlSize, L.dmaLoggingReportSize, L.bindIommufdSize,
    L.attachIommufdPtSize], [24, 8, 24, 32, 16, 12]);
});

test('sysfs paths: only /sys/bus/{pci,mdev}/devices/<name> with a well-formed name', () => {
  for (const p of ['/dev/vfio/3', '/sys/bus/pci/devices/../../../etc', '/sys/bus/pci/devices/0000:00:01', '/sys/bus/mdev/devices/not-a-uuid',
    '/sys/bus/usb/devices/1-1', 'relative/path']) {
    assert.is(code(() => resolveSysfs(p)), 'VFM_BAD_ARGUMENT', p);
  }
  // Well formed but absent.
  const e = (() => { try { resolveSysfs('/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001'); } catch (x) { return x as MigError; } })();
  assert.ok(e && /no such device/.test(e.message) && e.device, String(e));
});

test('a PCI device not bound to VFIO is refused with the reason', () => {
  const pci = fs.existsSync('/sys/bus/pci/devices') ? fs.readdirSync('/sys/bus/pci/devices') : [];
  const bdf = pci.find((d) => !fs.existsSync(`/sys/bus/pci/devices/${d}/vfio-dev`) && !fs.existsSync('/dev/vfio'));
  if (!bdf) return; // a machine with VFIO set up: nothing to refuse here
  let err: MigError | undefined;
  try { resolveSysfs(`/sys/bus/pci/devices/${bdf}`); } catch (x) { err = x as MigError; }
  assert.ok(err && err.code === 'VFM_BAD_ARGUMENT' && /not bound to a VFIO driver/.test(err.message), String(err));
});

test('embedded: bad fds and guest ranges are refused before any ioctl; a non-VFIO fd is "no v2 migration", named', () => {
  assert.is(code(() => KernelVfioDevice.fromHandles('d', { device: -1 })), 'VFM_BAD_ARGUMENT');
  for (const r of [[{ iova: 1, length: 4096 }], [{ iova: 0, length: 0 }], [{ iova: 0, length: 8192 }, { iova: 4096, length: 4096 }],
    Array.from({ length: 257 }, (_, i) => ({ iova: i * 4096, length: 4096 }))]) {
    assert.is(code(() => KernelVfioDevice.fromHandles('d', { device: 0 }, { guestRanges: r })), 'VFM_BAD_ARGUMENT', JSON.stringify(r).slice(0, 60));
  }
  const fd = fs.openSync('/dev/null', 'r+');
  try {
    let err: MigError | undefined;
    try { kernelDevice({ name: 'vmm-dev-7', handles: { device: fd } }); } catch (x) { err = x as MigError; }
    assert.is(err?.code, 'VFM_NO_MIGRATION_REGION');
    assert.match(err!.message, /^vmm-dev-7: .*ENOTTY/);
    fs.fstatSync(fd); // the handed-over fd is still open after the failed attach
    const ops = KernelVfioDevice.fromHandles('vmm-dev-7', { device: fd });
    ops.close();
    fs.fstatSync(fd); // and after close()
    assert.is(code(() => ops.getState()), 'VFM_BAD_STATE');
  } finally { fs.closeSync(fd); }
});

test('native v2 bindings check their arguments (never read or write outside the buffer)', () => {
  const n = native();
  const arg = (f: () => unknown) => { try { f(); } catch (e) { return (e as { code?: string }).code; } return 'none'; };
  assert.is(arg(() => n.vfioDmaLogStart(0, 4095, [{ iova: 0, length: 4096 }])), 'ERR_ARG');
  assert.is(arg(() => n.vfioDmaLogStart(0, 4096, [])), 'ERR_ARG');
  assert.is(arg(() => n.vfioDmaLogReport(0, 0, 1 << 20, 4096, new Uint8Array(31))), 'ERR_ARG');
  assert.is(arg(() => n.vfioSetMigState(0, 8)), 'EINVAL');
  assert.is(arg(() => n.vfioFeatureProbe(0, 1, 0)), 'EINVAL');
});

test('v1 transport embedded: handed-over fds are not closed, errors name the device', () => {
  const fd = fs.openSync('/dev/null', 'r+');
  try {
    let err: MigError | undefined;
    try { new VfioKernelTransport({ device: fd, container: fd }, 'vmm-v1'); } catch (x) { err = x as MigError; }
    assert.is(err?.code, 'VFM_NATIVE');
    assert.match(err!.message, /^vmm-v1: VFIO_DEVICE_GET_INFO/);
    fs.fstatSync(fd); // still open: vfio-mig closed nothing it was handed
  } finally { fs.closeSync(fd); }
});


// ---- the kernel reach's destination provider (no makeDestination): the loader asks it by scheme or by entry ----

test('kernel destination provider: registered under scheme vfio; named destinations and the entry\'s own name reach it, errors named', async () => {
  assert.is(reachForSpec('vfio:/sys/bus/mdev/devices/x')!.provider, reachProvider('kernel'));
  assert.is(reachForSpec('vfio:/sys/bus/mdev/devices/x')!.target, '/sys/bus/mdev/devices/x');
  assert.is(reachForSpec('nope:x'), null);
  const uuid = '0badc0de-0000-4000-8000-000000000001';
  assert.is(defaultSysfsPath({ index: 0, name: uuid, profile: 'v2', transport: 'kernel', geometry: {} as never }), `/sys/bus/mdev/devices/${uuid}`);
  assert.is(defaultSysfsPath({ index: 0, name: '0000:00:1f.0', profile: 'v2', transport: 'kernel', geometry: {} as never }), '/sys/bus/pci/devices/0000:00:1f.0');
  const pool = new EnginePool({ threads: 1 });
  const d = emulatedV2({ name: 'k0', stateSize: 64 << 10, maxChunk: 16 << 10, dirtyRate: 0, dmaRate: 0, guestPages: 16 });
  const file = tmpFile('kdest');
  try {
    await saveDevices([d], file, pool, { maxRounds: 0 });
    // Named: the provider opens the sysfs path given (none exists here: its error names it).
    let e = await rejectsCode(loadStream(file, pool, { destinations: [`vfio:/sys/bus/mdev/devices/${uuid}`] }), ErrorCode.BAD_ARGUMENT);
    assert.match(e.message, new RegExp(`/sys/bus/mdev/devices/${uuid}: no such device`));
    e = await rejectsCode(loadStream(file, pool, { destinations: ['nope:x'] }), ErrorCode.BAD_ARGUMENT);
    assert.match(e.message, /no registered reach opens destinations of that kind/);
    assert.is(e.device, 'k0');
    e = await rejectsCode(loadStream(file, pool, { destinations: ['vfio:/a', 'vfio:/b'] }), ErrorCode.BAD_ARGUMENT);
    assert.match(e.message, /2 destination\(s\) named for the stream's 1 device/);
    await rejectsCode(loadStream(file, pool, { destinations: ['vfio:/a'], makeDestination: () => d }), ErrorCode.BAD_ARGUMENT);
    await rejectsCode(loadStream(file, pool, { destinations: ['no-scheme'] }), ErrorCode.BAD_ARGUMENT);
    // A kernel source's stream (its table says reach 'kernel', named by its mdev UUID) with no destination given:
    // the kernel provider opens the device of that name on this host, not an emulated one.
    const { header, recs } = readRecords(file);
    const t = recs.find((r) => r.type === REC_DEVICE_TABLE)!;
    const table = JSON.parse(Buffer.from(t.body).toString('utf8'));
    Object.assign(table.devices[0], { name: uuid, transport: 'kernel' });
    t.body = new Uint8Array(Buffer.from(JSON.stringify(table)));
    writeRecords(file, header, recs);
    e = await rejectsCode(loadStream(file, pool), ErrorCode.BAD_ARGUMENT);
    assert.match(e.message, new RegExp(`/sys/bus/mdev/devices/${uuid}: no such device`));
  } finally {
    destroyEmulated(d);
    rm(file);
    await pool.close();
  }
});

test.run();
