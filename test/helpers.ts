// Shared test helpers.
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import * as assert from 'uvu/assert';
import { MigError } from '../src/main/errors.js';
import { Migration, type MigrationOptions, type MigrationReport } from '../src/main/engine/migration.js';
import { ContainerWriter } from '../src/main/container/writer.js';
import { FileSink } from '../src/main/container/sink.js';
import type { EnginePool } from '../src/main/engine/pool.js';
import type { DeviceTransport } from '../src/main/transport/transport.js';

let n = 0;
export function tmpFile(tag: string): string {
  return path.join(os.tmpdir(), `vfio-mig-test-${process.pid}-${tag}-${n++}.vfmig`);
}

export function rm(...files: string[]): void {
  for (const f of files) fs.rmSync(f, { force: true });
}

export async function rejectsCode(p: Promise<unknown>, code: string | string[]): Promise<MigError> {
  try {
    await p;
  } catch (e) {
    assert.instance(e, MigError, String(e));
    const codes = Array.isArray(code) ? code : [code];
    assert.ok(codes.includes((e as MigError).code), `expected ${codes.join('|')}, got ${(e as MigError).code}: ${(e as Error).message}`);
    return e as MigError;
  }
  assert.unreachable(`expected rejection with ${String(code)}`);
  throw new Error('unreachable');
}

/** splitmix64 as the emulated device uses it (docs/EMULATED-DEVICE.md): mix(x + golden gamma). */
export function splitmix64(x: bigint): bigint {
  const M = (1n << 64n) - 1n;
  let z = (x + 0x9e3779b97f4a7c15n) & M;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & M;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & M;
  return z ^ (z >> 31n);
}

/** Expected initial state bytes of a seeded emulated device. */
export function expectedState(seed: number, size: number): Uint8Array {
  const b = new Uint8Array(size);
  const dv = new DataView(b.buffer);
  for (let i = 0; i < size / 8; i++) dv.setBigUint64(i * 8, splitmix64((BigInt(seed) << 32n) + BigInt(i)), true);
  return b;
}

export function expectedConfig(seed: number): Uint8Array {
  return new Uint8Array(256).map((_, i) => Number(splitmix64(BigInt(seed) ^ (0xc0f1n + BigInt(i))) & 0xffn));
}

/**
 * Save with the engine writing the file in place (a plain FileSink): a failed save's stream, ending in its ABORT
 * record, stays for the test to inspect (`saveDevices` removes it).
 */
export function saveInPlace(devs: DeviceTransport[], file: string, pool: EnginePool, opts: MigrationOptions = {},
  onMigration?: (m: Migration) => void): Promise<MigrationReport> {
  const m = new Migration(devs, pool, new ContainerWriter(FileSink.open(file, { force: true })), opts);
  onMigration?.(m);
  return m.run();
}

/** The repository root (tests run from dist/test). */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export interface CliResult { code: number | null; stdout: string; stderr: string }

/** Run bin/vfio-mig.js with `args`; killed (and rejected) after `limitMs`. */
export function runCli(args: string[], limitMs = 60_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(ROOT, 'bin/vfio-mig.js'), ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
    child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`vfio-mig ${args.join(' ')}: timed out`)); }, limitMs);
    child.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }); });
  });
}
