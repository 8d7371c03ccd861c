// Test-only switches stay out of the public API: not exported, not in the published types, not honoured when an
// embedder passes them in a plain options object. (Fault injection of the emulated device is a product feature and
// stays: EmulatedDevice.setFault, docs/EMULATED-DEVICE.md.)
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as api from '../src/main/index.js';
import { EnginePool } from '../src/main/engine/pool.js';
import { saveDevices } from '../src/main/api.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { RegionLock } from '../src/main/engine/region-lock.js';
import ts from 'typescript';
import { rm, tmpFile } from './helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TEST_ONLY = /testExitAfterChunks|setDisabled|disableRegionLock|withTestHooks|TEST_HOOKS|noSse42|simulateNoSse42/;

test('the package exposes one entry point, whose exports and types carry no test switch', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
  assert.equal(Object.keys(pkg.exports).sort(), ['.', './package.json']);
  for (const k of Object.keys(api)) assert.not.match(k, TEST_ONLY, `export ${k}`);
  // The published declarations of everything index.ts re-exports.
  const dts = (rel: string) => fs.readFileSync(path.join(ROOT, 'dist/src/main', rel), 'utf8');
  for (const f of ['index.d.ts', 'api.d.ts', 'engine/migration.d.ts', 'engine/region-lock.d.ts', 'engine/load.d.ts', 'engine/pool.d.ts']) {
    assert.not.match(dts(f), TEST_ONLY, f);
  }
  assert.not.ok('setDisabled' in RegionLock.prototype, 'RegionLock has no disable switch');
  assert.not.ok('disabled' in RegionLock.prototype);
});

// Every value the package exports, by name: adding or removing one is an API change, made here on purpose.
const VALUES = [
  'ContainerReader', 'ContainerWriter', 'EmulatedDevice', 'EmulatedTransport', 'EnginePool', 'ErrorCode', 'FileSink', 'KernelVfioDevice',
  'Loader', 'MigError', 'Migration', 'MigrationRegion', 'NEXT_STATE', 'PHASE_ARCS', 'PROFILE_DEFS', 'Receiver', 'RollbackOutcome',
  'STATE_TABLE', 'Sender', 'VfioKernelTransport', 'emulatedDestination', 'connectVfioUser', 'VfioUserClient', 'VfioUserTransport', 'DeviceServer', 'emulatedDigest', 'isMigError', 'kernelDevice', 'loadStream',
  'onTrace', 'parseUri', 'pendingRollback', 'profileDef', 'receive', 'registerReach', 'registeredReaches', 'runEmulated', 'saveDevices', 'send', 'statePath', 'stress', 'stressReached',
];

test('the export list: exactly these values; RollbackOutcome is the enum the reports carry', () => {
  assert.equal(Object.keys(api).sort(), [...VALUES].sort());
  // The enum an embedder compares report.rollback[i].outcome with is the one the engine uses.
  assert.equal(Object.values(api.RollbackOutcome).sort(), ['deferred', 'failed', 'not-opened', 'reset', 'resumed', 'was-running']);
});

/**
 * The types an embedder receives (reports, events, status, the options it writes) and every type they name, walked
 * through interfaces and aliases: each must be exported by name from the entry point, or an embedder cannot write
 * `const r: RollbackResult = ...` for a value the API hands it.
 */
const RECEIVED = [
  'MigrationReport', 'LoadReport', 'RunReport', 'MigrationEvents', 'LoaderEvents', 'MigrationStatus', 'LoadStatus', 'MigrationProgress',
  'LoadProgress', 'MigrationOptions', 'SaveOptions', 'EnginePoolOptions', 'EmulatedDeviceOptions',
];

const ENTRY = path.join(ROOT, 'src/main/index.ts');
let program: ts.Program | undefined;

function unexportedTypes(roots: string[], pretendUnexported?: string): string[] {
  program ??= ts.createProgram([ENTRY], { strict: true, target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext, noEmit: true });
  const entry = ENTRY;
  const checker = program.getTypeChecker();
  const resolve = (s: ts.Symbol) => (s.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(s) : s);
  const exported = new Set(checker.getExportsOfModule(checker.getSymbolAtLocation(program.getSourceFile(entry)!)!).map(resolve)
    .filter((s) => s.name !== pretendUnexported));
  const own = (d: ts.Node) => d.getSourceFile().fileName.startsWith(path.join(ROOT, 'src'));
  const missing = new Set<string>();
  const seen = new Set<ts.Symbol>();
  const visitNode = (n: ts.Node, from: string): void => {
    if (ts.isTypeReferenceNode(n) || ts.isExpressionWithTypeArguments(n)) {
      const id = ts.isTypeReferenceNode(n) ? n.typeName : n.expression;
      const at = ts.isQualifiedName(id) ? id.right : id;
      const sym = checker.getSymbolAtLocation(at);
      const s = sym && resolve(sym);
      const d = s?.declarations?.[0];
      if (s && d && own(d) && !(s.flags & ts.SymbolFlags.TypeParameter)) {
        if (!exported.has(s)) missing.add(`${s.name} (named by ${from})`);
        visitSymbol(s);
      }
    }
    ts.forEachChild(n, (c) => visitNode(c, from));
  };
  const hidden = (m: ts.Node) => (ts.canHaveModifiers(m) ? ts.getModifiers(m) ?? [] : [])
    .some((x) => x.kind === ts.SyntaxKind.PrivateKeyword || x.kind === ts.SyntaxKind.ProtectedKeyword);
  const visitSymbol = (s: ts.Symbol): void => {
    if (seen.has(s)) return;
    seen.add(s);
    for (const d of s.declarations ?? []) {
      // Interfaces and aliases only: a class is exported as a whole, its members are its own API.
      if (ts.isInterfaceDeclaration(d)) {
        for (const h of d.heritageClauses ?? []) visitNode(h, s.name);
        for (const m of d.members) if (!hidden(m)) visitNode(m, s.name);
      } else if (ts.isTypeAliasDeclaration(d)) visitNode(d.type, s.name);
    }
  };
  assert.equal(roots.filter((r) => ![...exported].some((s) => s.name === r)), [], 'every root is itself exported');
  for (const s of exported) if (roots.includes(s.name)) visitSymbol(s);
  return [...missing].sort();
}

test('every type named by a report, event, status or options type is exported (RollbackResult, VendorMode, ...)', () => {
  assert.equal(unexportedTypes(RECEIVED), []);
  // The walk is real: with one of them taken off the export list, it is found where the reports name it.
  assert.equal([...new Set(unexportedTypes(RECEIVED, 'RollbackResult').map((m) => m.split(' ')[0]))], ['RollbackResult']);
  assert.equal(unexportedTypes(RECEIVED, 'VendorMode'), ['VendorMode (named by MigrationOptions)']);
});

test('a test switch passed as a plain option does nothing: the worker does not die', async () => {
  const pool = new EnginePool({ threads: 2 });
  const f = tmpFile('no-hook');
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `p${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 }));
  try {
    const r = await saveDevices(devs, f, pool, { maxRounds: 1, testExitAfterChunks: { device: 1, chunks: 0 } } as never);
    assert.ok(r.ok);
  } finally {
    for (const d of devs) d.destroy();
    rm(f);
    await pool.close();
  }
});

test.run();
