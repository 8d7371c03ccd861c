// Guest tests of the CLI and the load path on kernel devices beyond save/load (engine.guest.ts): `run --device vfio:
// --dest vfio:` (save + load in one command), `stress --device vfio:` (repeated save -> load cycles through mtty's
// data fds, both directions, verified by the fixed point and here also by the BARs), the fixed point catching a
// changed device, and the kernel destination provider (loads with no makeDestination: named, and by entry name).
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';
import { spawnSync } from 'node:child_process';
import { EnginePool, loadStream, saveDevices } from '../../src/main/index.js';
import { kernelDevice } from '../../src/main/reach/kernel/device.js';
import { stressReached } from '../../src/main/stress/reached.js';
import { assert, eq, test } from './harness.js';
import { createMdev, distinctive, readPorts, removeMdev, writePorts, UART, type PortState } from './mtty.js';
import { opsOf } from './seam-io.js';

const tmp = (n: string) => path.join(os.tmpdir(), `vfm-kernel-cli-${n}-${process.pid}.vfmig`);
const bin = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../../bin/vfio-mig.js');
const cli = (args: string[]) => spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', timeout: 300_000 });
/** The CLI's documented JSON envelope (docs/JSON.md): { command, ok, result | error, ... }. */
function envelope(r: ReturnType<typeof cli>, what: string): Record<string, any> {
  let doc: Record<string, any>;
  try { doc = JSON.parse(r.stdout); } catch { throw new Error(`${what}: no JSON document (exit ${r.status}): ${r.stdout.slice(0, 400)} ${r.stderr.slice(0, 400)}`); }
  eq(r.status, 0, `${what} exit (${r.stderr.slice(0, 400)} ${JSON.stringify(doc.error ?? '')})`);
  return doc;
}

function setState(p: string, st: PortState[]): void {
  const d = kernelDevice(p);
  try { writePorts(opsOf(d), st); } finally { d.close(); }
}
function portsOf(p: string): PortState[] {
  const d = kernelDevice(p);
  try { return readPorts(opsOf(d), 2); } finally { d.close(); }
}

async function withMdevs(n: number, f: (paths: string[]) => Promise<void>): Promise<void> {
  const paths = Array.from({ length: n }, () => createMdev('mtty-2'));
  try { await f(paths); } finally { paths.forEach(removeMdev); }
}

test('CLI: run --device vfio:A --dest vfio:B (save + load in one command): JSON envelope verified, B\'s BARs read back', () =>
  withMdevs(2, async ([a, b]) => {
    const want = distinctive(21, 2);
    setState(a!, want);
    const doc = envelope(cli(['run', '--device', `vfio:${a}`, '--dest', `vfio:${b}`, '--max-rounds', '2', '--json']), 'run');
    eq([doc.command, doc.ok, doc.result.verified], ['run', true, true], 'envelope');
    eq(doc.result.load.devices.map((d: { state: string }) => d.state), ['RUNNING'], 'destination started');
    eq(doc.result.save.devices.map((d: { finalState: string }) => d.finalState), ['STOP'], 'source stopped after its save');
    eq(portsOf(b!), want, 'destination registers and FIFOs');
  }));

test('CLI: stress --device vfio:A --dest vfio:B --count 6: every cycle through the data fds verifies; both directions; A and B both hold the state (BARs)', () =>
  withMdevs(2, async ([a, b]) => {
    const want = distinctive(23, 2);
    setState(a!, want);
    const doc = envelope(cli(['stress', '--device', `vfio:${a}`, '--dest', `vfio:${b}`, '--count', '6', '--seed', '7', '--json']), 'stress');
    eq([doc.command, doc.ok], ['stress', true], 'envelope');
    eq([doc.result.iterations, doc.result.failures, doc.result.failed], [6, 0, []], 'iterations and failures');
    assert(doc.result.migrations >= 6 && doc.result.bytes >= 6 * 96, `moved ${doc.result.bytes} bytes in ${doc.result.migrations} migrations`);
    // Whichever way the last cycle went, both devices carry the state (one loaded, one saved and resumed).
    eq([portsOf(a!), portsOf(b!)], [want, want], 'A and B registers and FIFOs after the stress');
    // Self mode: one device saved and loaded back into itself.
    setState(a!, want);
    const self = envelope(cli(['stress', '--device', `vfio:${a}`, '--count', '3', '--seed', '8', '--json']), 'stress (self)');
    eq([self.result.iterations, self.result.failures], [3, 0], 'self iterations');
    eq(portsOf(a!), want, 'A after loading itself 3 times');
  }));

test('stress on mtty: a device whose state changed between cycles fails the fixed point, named', () =>
  withMdevs(2, async ([a, b]) => {
    setState(a!, distinctive(25, 2));
    const src = kernelDevice(a!), dst = kernelDevice(b!);
    try {
      const s = await stressReached({
        sources: [src], dests: [dst], seconds: 600, count: 3, seed: 3, threads: 2,
        // After the first cycle, a "guest" writes a new scratch register value into both devices.
        onIteration: (it) => { if (it.iteration === 0) for (const d of [src, dst]) opsOf(d).regionWrite(0, UART.SCR, Uint8Array.of(0x3c)); },
      });
      eq(s.iterations, 3, 'iterations');
      assert(s.failures === 2, `the two cycles after the change fail: ${JSON.stringify(s.failed)}`);
      assert(/its saved device state \(sha256 [0-9a-f]{16}\) differs from the first iteration's/.test(s.failed[0]!.error!), s.failed[0]!.error!);
      assert(s.failed[0]!.error!.includes(src.name) || s.failed[0]!.error!.includes(dst.name), 'names the device');
    } finally {
      src.close();
      dst.close();
    }
  }));

test('kernel destination provider: loads with no makeDestination, into a named vfio: destination and into the device of the entry\'s own name', () =>
  withMdevs(2, async ([a, b]) => {
    const want = distinctive(27, 2);
    setState(a!, want);
    const file = tmp('provider');
    const pool = new EnginePool({ threads: 2 });
    try {
      const src = kernelDevice(a!);
      try { await saveDevices([src], file, pool, { maxRounds: 1, force: true }); } finally { src.close(); }
      // Named: the loader opens B through the kernel reach's provider and closes it.
      const named = await loadStream(file, pool, { destinations: [`vfio:${b}`] });
      eq(named.report.devices.map((d) => [d.name, d.state]), [[path.basename(a!), 'RUNNING']], 'named destination loaded');
      await named.loader.close();
      eq(portsOf(b!), want, 'B registers and FIFOs');
      // Nothing named: the entry is the kernel device of A's UUID, which exists here: A itself is restored.
      const w2 = distinctive(28, 2);
      setState(a!, w2); // changed after the save: the load must bring back `want`
      eq(portsOf(a!).map((p) => p.scr), w2.map((p) => p.scr), 'A changed');
      const own = await loadStream(file, pool);
      eq(own.report.devices.map((d) => d.state), ['RUNNING'], 'own-name destination loaded');
      await own.loader.close();
      eq(portsOf(a!), want, 'A restored from its own stream');
    } finally {
      fs.rmSync(file, { force: true });
      await pool.close();
    }
  }));
