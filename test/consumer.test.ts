// The package as an embedder gets it: a consumer compiled with `tsc --strict` against the published .d.ts (through
// the package's exports, as `import ... from 'vfio-mig'`), and the README's embedding example run as written.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-consumer-'));
fs.mkdirSync(path.join(TMP, 'node_modules/@types'), { recursive: true });
fs.symlinkSync(ROOT, path.join(TMP, 'node_modules/vfio-mig'));
fs.symlinkSync(path.join(ROOT, 'node_modules/@types/node'), path.join(TMP, 'node_modules/@types/node'));
fs.writeFileSync(path.join(TMP, 'package.json'), JSON.stringify({ type: 'module' }));
test.after(() => { fs.rmSync(TMP, { recursive: true, force: true }); });

const README = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
const EXAMPLE = /```js\n(import[\s\S]*?from 'vfio-mig';[\s\S]*?)```/.exec(README)?.[1] ?? '';

/** Types an embedder names: every one must come from the package entry point. */
const TYPED = `
import {
  EnginePool, EmulatedTransport, saveDevices, loadStream, MigError, ErrorCode, isMigError,
  type MigrationOptions, type MigrationReport, type MigrationProgress, type MigrationStatus, type DeviceStateEvent,
  type DirtyQueryEvent, type RoundStats, type LoadOptions, type LoadReport, type LoadedDevice, type LoadProgress,
  type LoadStatus, type Migration, type Loader, type DeviceTransport, type EnginePoolOptions, type EmulatedDeviceOptions,
  RollbackOutcome, type RollbackResult, type VendorMode, type VendorAnomaly, type DeviceStats, type SaveOptions,
} from 'vfio-mig';

export async function embed(signal: AbortSignal): Promise<boolean> {
  const po: EnginePoolOptions = { threads: 1 };
  await using pool = new EnginePool(po);
  const dopts: EmulatedDeviceOptions = { name: 'd0', stateSize: 1 << 20 };
  await using dev = EmulatedTransport.create(dopts);
  const t: DeviceTransport = dev;
  const statuses: MigrationStatus[] = [];
  const seen: (MigrationProgress | DeviceStateEvent | DirtyQueryEvent | RoundStats)[] = [];
  const mode: VendorMode = 'compatible';
  const mo: SaveOptions & MigrationOptions = { maxRounds: 2, signal, vendorMode: mode };
  try {
    const rep: MigrationReport = await saveDevices([t], process.argv[2], pool, mo, (m: Migration) => {
      m.on('progress', (p) => { seen.push(p); statuses.push(m.status()); });
      m.on('state', (e) => seen.push(e));
      m.on('dirty', (e) => seen.push(e));
      m.on('round', (r) => seen.push(r));
    });
    const lo: LoadOptions = { verify: true, signal };
    const progress: LoadProgress[] = [];
    const res = await loadStream(process.argv[2], pool, lo, (l: Loader) => l.on('progress', (p) => progress.push(p)));
    await using loader = res.loader;
    const lr: LoadReport = res.report;
    const one: LoadedDevice = lr.devices[0];
    const ls: LoadStatus = loader.status();
    return rep.ok && one.verified === true && ls.status === 'completed' && statuses.length > 0 && progress.length > 0;
  } catch (e) {
    const rep = (e as { report?: MigrationReport }).report;
    const rolled: RollbackResult[] = rep?.rollback ?? [];
    const odd: VendorAnomaly[] = rep?.anomalies ?? [];
    const stats: DeviceStats[] = rep?.devices ?? [];
    if (rolled.some((r) => r.outcome === RollbackOutcome.FAILED) || odd.length > stats.length * 8) return false;
    if (isMigError(e) && e.name === 'AbortError') return e.code === ErrorCode.CANCELLED;
    throw e instanceof MigError ? e : new Error(String(e));
  }
}
console.log('embedded ok:', await embed(new AbortController().signal));
`;

function tsc(file: string): string {
  const bin = path.join(ROOT, 'node_modules/typescript/bin/tsc');
  try {
    return execFileSync(process.execPath, [bin, '--strict', '--noEmit', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022',
      '--lib', 'es2024,esnext.disposable', '--types', 'node', '--skipLibCheck', 'false', file], { cwd: TMP, encoding: 'utf8' });
  } catch (e) {
    const x = e as { stdout?: string; stderr?: string };
    assert.unreachable(`tsc --strict ${path.basename(file)} failed:\n${x.stdout}${x.stderr}`);
    return '';
  }
}

test('a consumer naming every public type compiles with tsc --strict against the published .d.ts', () => {
  const f = path.join(TMP, 'typed.mts');
  fs.writeFileSync(f, TYPED);
  tsc(f);
  // The check is real: a wrong use of the same API fails to compile.
  const bad = path.join(TMP, 'bad.mts');
  fs.writeFileSync(bad, `import { EnginePool } from 'vfio-mig';\nconst p: EnginePool = new EnginePool({ threads: 'two' });\nvoid p;\n`);
  assert.throws(() => execFileSync(process.execPath, [path.join(ROOT, 'node_modules/typescript/bin/tsc'), '--strict', '--noEmit', '--module', 'nodenext',
    '--moduleResolution', 'nodenext', '--target', 'es2022', '--types', 'node', bad], { cwd: TMP, stdio: 'pipe' }));
});

test('internal classes are not exported from the package entry point', async () => {
  const api = await import(path.join(ROOT, 'dist/src/main/index.js'));
  for (const name of ['RegionLock', 'StagingRing', 'RingPool', 'DeviceShared', 'SourceDevice', 'DirtyTracker', 'Recorder', 'CommandOutput']) {
    assert.not.ok(name in api, `${name} is internal`);
  }
});

test('the README embedding example compiles with tsc --strict and runs as written', () => {
  assert.ok(EXAMPLE.includes('saveDevices'), 'README has the example');
  const f = path.join(TMP, 'readme.mts');
  fs.writeFileSync(f, EXAMPLE);
  tsc(f);
  const js = path.join(TMP, 'readme.mjs');
  fs.writeFileSync(js, EXAMPLE);
  const out = execFileSync(process.execPath, [js], { cwd: TMP, encoding: 'utf8', timeout: 60_000 });
  assert.match(out, /^gpu0 PRE_COPY$/m);
  assert.match(out, /^gpu1 STOP$/m);
  assert.match(out, /completed \[ true, true \]/);
  const typed = path.join(TMP, 'typed.mjs');
  execFileSync(path.join(ROOT, 'node_modules/.bin/tsc'), ['--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022',
    '--lib', 'es2024,esnext.disposable', '--types', 'node', '--outDir', path.join(TMP, 'out'), path.join(TMP, 'typed.mts')], { cwd: TMP });
  fs.renameSync(path.join(TMP, 'out/typed.mjs'), typed);
  const o2 = execFileSync(process.execPath, [typed, path.join(TMP, 'typed.vfmig')], { cwd: TMP, encoding: 'utf8', timeout: 60_000 });
  assert.match(o2, /embedded ok: true/);
});

test.run();
