// Cancel takes effect at once whatever the vendor does (issue 7 §2.4), through every entry point: saveDevices,
// runEmulated and the CLI reject (or print their line) without waiting for a stalled vendor call; that device's
// rollback finishes in the background (`settled`; the CLI waits for it before it exits and says how it ended).
// Times are compared with the stall itself (a ratio), not with a wall-clock limit.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { EnginePool } from '../src/main/engine/pool.js';
import { loadStream, pendingRollback, runEmulated, saveDevices } from '../src/main/api.js';
import type { Loader } from '../src/main/engine/load.js';
import { emulatedV2, destroyEmulated } from '../src/main/reach/emulated/v2.js';
import { EmulatedTransport } from '../src/main/transport/emulated.js';
import { ErrorCode } from '../src/main/errors.js';
import type { Migration, MigrationReport } from '../src/main/engine/migration.js';
import { OWNER_WORKER } from '../src/main/engine/region-lock.js';
import { rejectsCode, rm, tmpFile } from './helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const pool = new EnginePool({ threads: 2 });
test.after(async () => { await pool.close(); });

/** The stalled vendor sleeps this long inside every chunk it stages (the device lock held, as a slow driver would). */
const STALL_US = 3_000_000;
const STALL_MS = STALL_US / 1000;
const running = (t: EmulatedTransport) => (t.device.info().deviceState & 7) === 1;

/**
 * Abort once device `i`'s worker is inside its stalled vendor call (it holds the device's region lock for the whole
 * stall): not after a fixed delay, which a busy machine may not honour. Returns when the abort happened.
 */
function abortInsideStall(m: Migration, i: number, ac: AbortController): Promise<number> {
  return new Promise((resolve) => {
    m.on('phase', (_from, to) => {
      if (to !== 'precopy') return;
      const poll = setInterval(() => {
        if (m.devices[i].shared.lock.owner !== OWNER_WORKER) return;
        clearInterval(poll);
        const at = performance.now();
        ac.abort();
        resolve(at);
      }, 5);
    });
  });
}

test('saveDevices rejects at once while a vendor call stalls; `settled` gives the final rollback, every device RUNNING after it', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-cancel-'));
  const f = path.join(dir, 'out.vfmig');
  const ac = new AbortController();
  const devs = [0, 1].map((i) => EmulatedTransport.create({ name: `w${i}`, stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 }));
  devs[0].device.setFault('slow-chunk', STALL_US);
  let aborted: Promise<number> | undefined;
  try {
    const e = await rejectsCode(saveDevices(devs, f, pool, { signal: ac.signal, maxRounds: 5 }, (m) => { aborted = abortInsideStall(m, 0, ac); }),
      ErrorCode.CANCELLED);
    const took = performance.now() - await aborted!;
    assert.is(e.name, 'AbortError');
    assert.ok(took < STALL_MS / 3, `rejected ${took.toFixed(0)} ms after the abort; the vendor stalls ${STALL_MS} ms per chunk`);
    const rep = (e as unknown as { report: MigrationReport }).report;
    assert.equal(rep.rollbackPending, ['w0']);
    assert.is(rep.rollback![0].outcome, 'deferred');
    assert.not.ok(running(devs[0]), 'w0 is still inside its vendor call: not rolled back yet');
    assert.ok(running(devs[1]), 'w1 RUNNING at once');
    assert.equal(fs.readdirSync(dir), [], 'no output, no temporary name, no lock left');
    const settled = pendingRollback(e);
    assert.ok(settled, 'the rejection carries the pending rollback');
    assert.not.ok(Object.keys(e).includes('settled'), 'not enumerable: the error serialises as before');
    const finals = await settled!;
    assert.is(finals[0].outcome, 'resumed');
    assert.match(`${finals[0].device}: ${finals[0].detail}`, /^w0: PRE_COPY -> RUNNING \(after the vendor call returned\)$/);
    for (const d of devs) assert.ok(running(d), `${d.name} RUNNING after settled`);
    // The report the caller holds is final now.
    assert.is(rep.rollbackPending, undefined);
    assert.is(rep.rollback![0].outcome, 'resumed');
  } finally {
    for (const d of devs) d.destroy();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('runEmulated rejects at once while a vendor call stalls; its own devices and pool are released after `settled`', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-cancel-run-'));
  const stream = path.join(dir, 'run.vfmig');
  const ac = new AbortController();
  let aborted: Promise<number> | undefined;
  const e = await rejectsCode(runEmulated({
    devices: 2, device: { stateSize: 1 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 }, stream, threads: 2, signal: ac.signal, maxRounds: 5,
    faults: [{ device: 1, kind: 'slow-chunk', arg: STALL_US }],
    onMigration: (m) => { aborted = abortInsideStall(m, 1, ac); },
  }), ErrorCode.CANCELLED);
  const took = performance.now() - await aborted!;
  assert.ok(took < STALL_MS / 3, `rejected ${took.toFixed(0)} ms after the abort; the vendor stalls ${STALL_MS} ms per chunk`);
  const rep = (e as unknown as { report: MigrationReport }).report;
  assert.equal(rep.rollbackPending, ['emu1']);
  const t = performance.now();
  const finals = await pendingRollback(e)!;
  assert.ok(performance.now() - t > STALL_MS / 4, 'settled waited for the vendor call');
  assert.equal(finals.map((r) => `${r.device}:${r.outcome}`), ['emu0:resumed', 'emu1:resumed']);
  assert.equal(fs.readdirSync(dir), [], 'nothing left at the stream path');
  fs.rmSync(dir, { recursive: true, force: true });
});

/**
 * The CLI in a child process whose emulated device emu0 stalls `STALL_US` per chunk (set through the test's own
 * wrapper of EmulatedTransport.create: no test switch in the CLI).
 */
function stalledCli(args: string[]) {
  const code = `
    const { EmulatedTransport } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/main/transport/emulated.js'))});
    const create = EmulatedTransport.create;
    EmulatedTransport.create = (o) => { const t = create.call(EmulatedTransport, o); if (t.name === 'emu0') t.device.setFault('slow-chunk', ${STALL_US}); return t; };
    // A marker for the test 300 ms after emu0 entered PRE_COPY: its worker is then inside a stalled chunk.
    const { onTrace } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/main/trace.js'))});
    onTrace((ev, f) => { if (ev === 'vfio_migration_set_state' && f.device === 'emu0' && f.to === 'PRE_COPY') setTimeout(() => process.stderr.write('TEST: emu0 stalled\\n'), 300); });
    const { main } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/main/cli/main.js'))});
    await main([process.argv[0], 'vfio-mig', ...process.argv.slice(1)]);`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', code, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  const lines: { at: number; text: string }[] = [];
  child.stderr!.on('data', (d) => { stderr += d; for (const l of String(d).split('\n').filter(Boolean)) lines.push({ at: performance.now(), text: l }); });
  child.stdout!.on('data', (d) => { stdout += d; });
  const done = new Promise<{ code: number | null; signal: string | null }>((resolve, reject) => {
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`vfio-mig ${args.join(' ')}: timed out`)); }, 60_000);
    child.on('close', (c, s) => { clearTimeout(timer); resolve({ code: c, signal: s }); });
  });
  return { child, done, lines, out: () => ({ stdout, stderr }) };
}

test('CLI save, SIGINT while a vendor call stalls: the line at once, exit 130 only after that device is RUNNING again', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-cancel-cli-'));
  const F = path.join(dir, 'out.vfmig');
  const c = stalledCli(['save', '--devices', '2', '--size', '1MiB', '--chunk', '64KiB', '--dirty-rate', '0', '--dma-rate', '0', '--stream', F]);
  const t0 = performance.now();
  while (!c.lines.some((l) => l.text === 'TEST: emu0 stalled')) {
    if (performance.now() - t0 > 30_000) { c.child.kill('SIGKILL'); throw new Error(`emu0 never reached PRE_COPY: ${c.out().stderr}`); }
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.ok(fs.readdirSync(dir).some((n) => n.endsWith('.partial')), 'the save is writing its temporary output');
  const tSig = performance.now();
  c.child.kill('SIGINT');
  const r = await c.done;
  const tExit = performance.now();
  const { stderr } = c.out();
  assert.is(r.code, 130, stderr);
  const line = c.lines.find((l) => l.text.startsWith('vfio-mig: VFM_CANCELLED: interrupted by SIGINT'));
  assert.ok(line, stderr);
  assert.match(line!.text, /1 of 2 source device\(s\) RUNNING again, 1 waiting for its vendor call to return \(emu0\), nothing written to /);
  assert.ok(line!.at - tSig < STALL_MS / 3, `the line came ${(line!.at - tSig).toFixed(0)} ms after SIGINT; the vendor stalls ${STALL_MS} ms`);
  const last = c.lines.find((l) => /emu0: rollback after its vendor call returned: resumed: PRE_COPY -> RUNNING/.test(l.text));
  assert.ok(last && last.at > line!.at, `the final outcome is printed before exit:\n${stderr}`);
  assert.ok(tExit - tSig > STALL_MS / 4, 'the process waited for the stalled vendor call before it exited');
  assert.equal(fs.readdirSync(dir), [], 'no output, no temporary file, no lock');
  fs.rmSync(dir, { recursive: true, force: true });
});

// ---- load: cancel and interruption ----------------------------------------------------------------------------------

/** A stream of three devices (linux-5.8, draft-2019, v2), 16 MiB each in 64 KiB chunks. */
async function threeDeviceStream(): Promise<string> {
  const f = tmpFile('cancel-load');
  const o = { stateSize: 16 << 20, maxChunk: 64 << 10, dirtyRate: 0, dmaRate: 0 };
  const devs = [EmulatedTransport.create({ ...o, name: 'l58' }), EmulatedTransport.create({ ...o, name: 'ldraft', profile: 'draft-2019' }), emulatedV2({ ...o, name: 'lv2' })];
  try {
    assert.ok((await saveDevices(devs, f, pool, { maxRounds: 1, allowWithoutP2P: true })).ok);
  } finally {
    for (const d of devs) destroyEmulated(d);
  }
  return f;
}

test('load cancelled by its AbortSignal mid-stream: every destination reset and stopped (none RESUMING or RUNNING)', async () => {
  const f = await threeDeviceStream();
  const ac = new AbortController();
  const reason = new Error('operator stop');
  const states: string[] = [];
  let loader: Loader | undefined;
  let appliedAtAbort = 0;
  try {
    const e = await rejectsCode(loadStream(f, pool, { verify: true, signal: ac.signal, progressIntervalMs: 2 }, (l) => {
      loader = l;
      l.on('state', (s) => states.push(`${s.device}:${s.state}`));
      l.on('progress', (p) => {
        if (ac.signal.aborted || p.bytes === 0) return;
        appliedAtAbort = l.status().devices.reduce((a, d) => a + d.transferredBytes, 0);
        ac.abort(reason);
      });
    }), ErrorCode.CANCELLED);
    assert.is(e.name, 'AbortError');
    assert.is(e.cause, reason);
    assert.ok(appliedAtAbort > 0 && appliedAtAbort < 3 * (16 << 20), `cancelled mid-stream (${appliedAtAbort} bytes applied)`);
    assert.is(loader!.status().status, 'cancelled');
    assert.is(loader!.dests.length, 3);
    for (const d of loader!.dests) {
      const now = await d.dev.state();
      assert.is(now, 'STOP', `${d.entry.name}: neither RESUMING nor RUNNING`);
      assert.is(d.stats.state, 'reset (state discarded), STOP', d.entry.name);
      assert.ok(states.includes(`${d.entry.name}:RESUMING`), `${d.entry.name} had started resuming`);
    }
    assert.not.ok(states.some((s) => s.endsWith(':RUNNING')), `no destination ran: ${states.join(' ')}`);
  } finally {
    await loader?.close();
    rm(f);
  }
});

test('CLI load interrupted by SIGINT / SIGTERM: exit 130 / 143, one line, destinations reset and stopped, never running', async () => {
  const f = await threeDeviceStream();
  try {
    for (const [sig, exit] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
      // The child reads its stream slowly (each record 5 ms late, a slow disk) so the signal lands mid-load.
      const code = `
        const { ContainerReader } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/main/container/reader.js'))});
        const next = ContainerReader.prototype.next;
        ContainerReader.prototype.next = async function () { await new Promise((r) => setTimeout(r, 5)); return next.call(this); };
        const { main } = await import(${JSON.stringify(path.join(ROOT, 'dist/src/main/cli/main.js'))});
        await main([process.argv[0], 'vfio-mig', ...process.argv.slice(1)]);`;
      const child = spawn(process.execPath, ['--input-type=module', '-e', code, 'load', f, '--events', '-', '--threads', '2'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      let sent = false;
      const events: { event: string; data: Record<string, unknown> }[] = [];
      child.stdout!.on('data', (d) => {
        out += d;
        const lines = out.split('\n');
        out = lines.pop()!;
        for (const l of lines) events.push(JSON.parse(l));
        const applied = events.filter((e) => e.event === 'VFIO_MIG_PROGRESS' && (e.data.bytes as number) > 0);
        if (!sent && applied.length) { sent = true; child.kill(sig); }
      });
      child.stderr!.on('data', (d) => { err += d; });
      const r = await new Promise<number | null>((resolve, reject) => {
        const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error('load did not end')); }, 60_000);
        child.on('close', (c) => { clearTimeout(timer); resolve(c); });
      });
      assert.ok(sent, `the signal was sent mid-load: ${err}`);
      assert.is(r, exit, err);
      // The partial report goes to stderr (stdout carries the events); one error line ends it.
      const lines = err.split('\n').filter((l) => l.startsWith('vfio-mig: '));
      assert.equal(lines.length, 1, err);
      assert.ok(err.trimEnd().endsWith(lines[0]), err);
      assert.match(lines[0], new RegExp(`^vfio-mig: VFM_CANCELLED: interrupted by ${sig}; no destination started \\(3 reset and stopped\\)$`));
      const states = new Map<string, string[]>();
      for (const e of events) if (e.event === 'VFIO_MIGRATION') states.set(String(e.data['device-id']), [...(states.get(String(e.data['device-id'])) ?? []), String(e.data['device-state'])]);
      assert.equal([...states.keys()].sort(), ['l58', 'ldraft', 'lv2']);
      for (const [dev, seq] of states) {
        assert.is(seq[0], 'resuming', dev);
        assert.is(seq.at(-1), 'reset (state discarded), stop', `${dev}: ${seq.join(' -> ')}`);
        assert.not.ok(seq.includes('running'), `${dev} never ran: ${seq.join(' -> ')}`);
      }
      const end = events.at(-1)!;
      assert.is(end.event, 'VFIO_MIG_END');
      assert.match(err, /load: .* \(data phase \d+ ms, /, 'the partial report measures the data phase it ran');
      assert.not.match(err, /data phase 0 ms/);
    }
  } finally {
    rm(f);
  }
});

test.run();
