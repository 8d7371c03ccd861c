// The `vfio-mig` command line as a user runs it: a child process, exit codes, --json reports, and one stable
// error line on stderr. Small devices keep every run well under a second.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkStreamEnd, getBe64, newParseState, parsePackets } from '../src/main/protocol/qemu-stream.js';

// dist/test/cli.test.js -> repository root
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin/vfio-mig.js');
const SMALL = ['--size', '2MiB', '--chunk', '64KiB', '--devices', '2'];
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-cli-test-'));
const F = path.join(TMP, 'saved.vfmig');

interface Result { code: number | null; stdout: string; stderr: string }

function cli(...args: string[]): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
    child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`vfio-mig ${args.join(' ')}: timed out`)); }, 30_000);
    child.on('error', reject);
    child.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }); });
  });
}

function json(r: Result, what: string): any {
  try {
    return JSON.parse(r.stdout);
  } catch {
    assert.unreachable(`${what}: stdout is not JSON: ${r.stdout.slice(0, 300)} / stderr: ${r.stderr}`);
  }
}

function exits(r: Result, code: number, what: string): void {
  assert.is(r.code, code, `${what}: exit ${r.code}, stderr: ${r.stderr}`);
}

/** Exactly one stderr line, `vfio-mig: CODE: ...`. */
function errorLine(r: Result, code: string, what: string): string {
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  assert.is(lines.length, 1, `${what}: one stderr line, got ${JSON.stringify(r.stderr)}`);
  assert.ok(r.stderr.endsWith('\n'), `${what}: the line is terminated`);
  assert.ok(lines[0].startsWith(`vfio-mig: ${code}: `), `${what}: ${lines[0]}`);
  return lines[0];
}

test.after(() => {
  fs.rmSync(TMP, { recursive: true, force: true });
});

test('run --json: exits 0, ok, every device verified, temporary stream removed', async () => {
  const r = await cli('run', ...SMALL, '--json');
  exits(r, 0, 'run');
  assert.is(r.stderr, '');
  const doc = json(r, 'run');
  assert.is(doc.ok, true);
  assert.is(doc.error, null);
  const rep = doc.result;
  assert.is(rep.save.phase, 'done');
  assert.is(rep.load.verified, true);
  assert.is(rep.verified, true);
  assert.ok(rep.downtimeMs > 0, 'end-to-end downtime measured');
  assert.is(rep.load.devices.length, 2);
  assert.equal(rep.load.devices.map((d: any) => d.name), ['emu0', 'emu1']);
  for (const d of rep.load.devices) {
    assert.is(d.verified, true, `${d.name} verified`);
    assert.is(d.state, 'RUNNING', `${d.name} runs after the load`);
    assert.match(d.digest, /^sha256:[0-9a-f]{64}$/);
    assert.is(d.digest, d.expectedDigest);
  }
  // Distinct seeds: the two devices carried different state.
  assert.is.not(rep.load.devices[0].digest, rep.load.devices[1].digest);
  assert.equal(rep.save.devices.map((d: any) => d.digest), rep.load.devices.map((d: any) => d.digest));
  assert.is(typeof rep.stream, 'string');
  assert.not.ok(fs.existsSync(rep.stream), `temporary stream ${rep.stream} removed`);
});

let saved: any;
test('save --stream F --json, then load F --json verifies every device', async () => {
  const s = await cli('save', ...SMALL, '--stream', F, '--json');
  exits(s, 0, 'save');
  const sdoc = json(s, 'save');
  assert.is(sdoc.ok, true);
  saved = sdoc.result;
  assert.is(saved.stream, F);
  assert.is(saved.save.devices.length, 2);
  assert.ok(fs.statSync(F).size > 2 * (2 << 20), 'the stream holds both 2 MiB states');

  const l = await cli('load', F, '--json');
  exits(l, 0, 'load');
  assert.is(l.stderr, '');
  const ldoc = json(l, 'load');
  assert.is(ldoc.ok, true);
  const rep = ldoc.result;
  assert.is(rep.load.devices.length, 2);
  rep.load.devices.forEach((d: any, i: number) => {
    assert.is(d.verified, true, `${d.name} verified`);
    assert.is(d.digest, saved.save.devices[i].digest, `${d.name} digest matches the save`);
  });
  assert.is(rep.load.streamBytes, fs.statSync(F).size);
});

let inspected: any;
test('inspect F --json: device table, sections, setup + config present, complete', async () => {
  const r = await cli('inspect', F, '--json');
  exits(r, 0, 'inspect');
  inspected = json(r, 'inspect').result;
  assert.is(inspected.fileBytes, fs.statSync(F).size);
  assert.is(inspected.table.devices.length, 2);
  assert.equal(inspected.devices.map((d: any) => d.name), ['emu0', 'emu1']);
  for (const t of inspected.table.devices) {
    assert.is(t.profile, 'linux-5.8');
    assert.is(t.geometry.stateSize, 2 << 20);
    assert.is(t.geometry.maxChunk, 64 << 10);
  }
  for (const d of inspected.devices) {
    assert.is(d.complete, true, `${d.name} complete`);
    assert.is(d.config, true, `${d.name} has its config section`);
    assert.ok(d.sections >= 3, `${d.name}: setup, iterate/complete and config sections (${d.sections})`);
    assert.ok(d.dataPackets > 0);
    assert.ok(d.dataBytes >= 2 << 20, `${d.name} carried at least its whole state (${d.dataBytes})`);
    assert.ok(d.streamBytes > d.dataBytes);
  }
  assert.is(inspected.records.DEVICE_TABLE, 1);
  assert.is(inspected.records.END, 1);
  assert.is(inspected.records.ABORT, 0);
  assert.is(inspected.records.CHUNK, inspected.devices[0].records + inspected.devices[1].records);
  assert.equal(inspected.end.devices.map((e: any) => e.digest), saved.save.devices.map((d: any) => d.digest));
  assert.equal(inspected.end.devices.map((e: any) => e.streamBytes), inspected.devices.map((d: any) => d.streamBytes));
});

test('inspect F --packets prints each device\'s QEMU packets, setup first and config last', async () => {
  const r = await cli('inspect', F, '--packets');
  exits(r, 0, 'inspect --packets');
  const lines = r.stdout.split('\n');
  for (const [i, name] of ['emu0', 'emu1'].entries()) {
    const start = lines.indexOf(`-- ${name} QEMU packets (file offset, tag, size)`);
    assert.ok(start >= 0, `${name} packet list header`);
    const pk: { off: number; tag: string; size?: number }[] = [];
    for (const l of lines.slice(start + 1)) {
      const m = /^\s+(\d+)\s+([A-Z_]+)(?:\s+(\d+))?$/.exec(l);
      if (!m) break;
      pk.push({ off: Number(m[1]), tag: m[2], size: m[3] === undefined ? undefined : Number(m[3]) });
    }
    const dev = inspected.devices[i];
    assert.equal(pk.slice(0, 2).map((p) => p.tag), ['DEV_SETUP_STATE', 'END_OF_STATE'], `${name} starts with setup`);
    assert.equal(pk.slice(-2).map((p) => p.tag), ['DEV_CONFIG_STATE', 'END_OF_STATE'], `${name} ends with config`);
    assert.is(pk.filter((p) => p.tag === 'DEV_DATA_STATE').length, dev.dataPackets);
    assert.is(pk.filter((p) => p.tag === 'END_OF_STATE').length, dev.sections);
    assert.is(pk.filter((p) => p.tag === 'DEV_DATA_STATE').reduce((a, p) => a + p.size!, 0), dev.dataBytes);
    for (let k = 1; k < pk.length; k++) assert.ok(pk[k].off > pk[k - 1].off, `${name}: packet offsets increase`);
    assert.ok(pk[pk.length - 1].off < inspected.fileBytes);
  }
});

test('extract F --device 1 -o OUT writes exactly that device\'s QEMU stream', async () => {
  const out = path.join(TMP, 'dev1.qemu');
  const r = await cli('extract', F, '--device', '1', '-o', out, '--json');
  exits(r, 0, 'extract');
  const rep = json(r, 'extract').result;
  const b = new Uint8Array(fs.readFileSync(out));
  assert.is(rep.bytes, b.length);
  assert.is(b.length, inspected.devices[1].streamBytes, 'length = streamBytes of device 1');
  assert.is(getBe64(b, 0), 0xffffffffef100003n, 'DEV_SETUP_STATE');
  assert.is(getBe64(b, 8), 0xffffffffef100001n, 'END_OF_STATE');
  assert.is(getBe64(b, b.length - 8), 0xffffffffef100001n, 'ends with END_OF_STATE');
  // The concatenation is one well-formed device stream with the packets inspect counted.
  const st = newParseState();
  parsePackets(st, b, 0, b.length, 0, { maxData: 1 << 20, maxConfig: 1 << 20 }, 'emu1');
  checkStreamEnd(st, 'emu1', b.length);
  assert.is(st.dataPackets, inspected.devices[1].dataPackets);
  assert.is(st.dataBytes, inspected.devices[1].dataBytes);
  // Device 0 is a different stream.
  const out0 = path.join(TMP, 'dev0.qemu');
  exits(await cli('extract', F, '--device', '0', '-o', out0), 0, 'extract 0');
  const b0 = fs.readFileSync(out0);
  assert.is(b0.length, inspected.devices[0].streamBytes);
  assert.not.ok(b0.equals(Buffer.from(b)));
});

test('bad flags exit 2 with one VFM_BAD_ARGUMENT line naming the problem', async () => {
  const cases: [string[], RegExp][] = [
    [['run', ...SMALL, '--size', '12XB'], /--size.*12XB/],
    [['run', '--devices', '0', '--size', '2MiB'], /--devices.*0/],
    [['run', ...SMALL, '--profile', 'v9'], /--profile.*v9/],
    [['run', ...SMALL, '--no-such-option'], /--no-such-option/],
    [['save', ...SMALL, '--chunk', '5000', '--stream', path.join(TMP, 'never.vfmig')], /--chunk/],
    [['extract', F, '-o', path.join(TMP, 'never.qemu')], /--device/],
    [['load'], /file/],
  ];
  for (const [args, re] of cases) {
    const what = args.join(' ');
    const r = await cli(...args);
    exits(r, 2, what);
    assert.match(errorLine(r, 'VFM_BAD_ARGUMENT', what), re, what);
    assert.is(r.stdout, '', `${what}: nothing on stdout`);
  }
  assert.not.ok(fs.existsSync(path.join(TMP, 'never.vfmig')), 'a refused save writes no stream');
  // --json adds a machine-readable report; the stderr line stays.
  const r = await cli('run', '--devices', '0', '--json');
  exits(r, 2, 'run --devices 0 --json');
  errorLine(r, 'VFM_BAD_ARGUMENT', 'run --devices 0 --json');
  const rep = json(r, 'run --devices 0 --json');
  assert.is(rep.ok, false);
  assert.is(rep.error.code, 'VFM_BAD_ARGUMENT');
});

test('load of a missing file exits 1 with VFM_IO', async () => {
  const missing = path.join(TMP, 'missing.vfmig');
  const r = await cli('load', missing);
  exits(r, 1, 'load missing');
  const line = errorLine(r, 'VFM_IO', 'load missing');
  assert.ok(line.includes(missing), line);
  const j = await cli('load', missing, '--json');
  exits(j, 1, 'load missing --json');
  const rep = json(j, 'load missing --json');
  assert.is(rep.ok, false);
  assert.is(rep.error.code, 'VFM_IO');
});

/** File offsets of the container records (docs/FORMAT.md: 32-byte file header, records of a 32-byte header + body). */
function recordOffsets(b: Buffer): { at: number; type: number }[] {
  const out: { at: number; type: number }[] = [];
  for (let at = 32; at < b.length; at += 32 + b.readUInt32LE(at + 4)) out.push({ at, type: b.readUInt32LE(at) });
  return out;
}

test('load of a truncated copy exits 1 with VFM_STREAM_TRUNCATED at an offset; nothing runs', async () => {
  const full = fs.readFileSync(F);
  const recs = recordOffsets(full);
  const end = recs[recs.length - 1];
  assert.is(end.type, 3, 'the last record is END');
  // Cut inside a CHUNK body, near the end, and exactly at a record boundary (only the END record missing).
  for (const cut of [Math.floor(full.length * 0.6), full.length - 100, end.at]) {
    const T = path.join(TMP, `truncated-${cut}.vfmig`);
    fs.writeFileSync(T, full.subarray(0, cut));
    const r = await cli('load', T, '--json');
    exits(r, 1, `load truncated at ${cut}`);
    const line = errorLine(r, 'VFM_STREAM_TRUNCATED', `load truncated at ${cut}`);
    const rep = json(r, `load truncated at ${cut}`);
    assert.is(rep.ok, false);
    assert.is(rep.error.code, 'VFM_STREAM_TRUNCATED');
    assert.is(typeof rep.error.offset, 'number', 'the error names an offset');
    assert.ok(rep.error.offset >= 0 && rep.error.offset <= cut, `offset ${rep.error.offset} within the ${cut}-byte file`);
    assert.ok(line.includes(`offset ${rep.error.offset}`), line);
    // The destinations never run with a partial stream.
    assert.is(rep.result.load.devices.length, 2, 'both devices were being loaded');
    for (const d of rep.result.load.devices) {
      assert.is.not(d.state, 'RUNNING', `${d.name} must not run`);
      assert.is.not(d.verified, true);
    }
  }
});

test.run();
