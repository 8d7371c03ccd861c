// The command line and files, signals and hostile text: --force, the input never overwritten, streams to standard
// output with the report kept off it, inspect telling incomplete from torn, SIGINT/SIGTERM (real signals to a child)
// and stream text printed escaped.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { readRecords, writeRecords } from './craft.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin/vfio-mig.js');
const SMALL = ['--size', '2MiB', '--chunk', '64KiB', '--devices', '2'];
const DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-cli-files-'));
const f = (n: string) => path.join(DIR, n);
test.after(() => { fs.rmSync(DIR, { recursive: true, force: true }); });

interface Result { code: number | null; signal: NodeJS.Signals | null; stdout: Buffer; stderr: string }

function start(args: string[], env: Record<string, string> = {}): { child: ChildProcess; done: Promise<Result> } {
  const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  const out: Buffer[] = [];
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => out.push(d));
  child.stderr!.setEncoding('utf8').on('data', (d) => { stderr += d; });
  const done = new Promise<Result>((resolve, reject) => {
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`vfio-mig ${args.join(' ')}: timed out`)); }, 60_000);
    child.on('error', reject);
    child.on('close', (code, signal) => { clearTimeout(timer); resolve({ code, signal, stdout: Buffer.concat(out), stderr }); });
  });
  return { child, done };
}
const cli = (...args: string[]) => start(args).done;

function oneErrorLine(r: Result, code: string, what: string): string {
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  assert.is(lines.length, 1, `${what}: one stderr line, got ${JSON.stringify(r.stderr)}`);
  assert.ok(lines[0].startsWith(`vfio-mig: ${code}: `), `${what}: ${lines[0]}`);
  return lines[0];
}

const S = f('s.vfmig');
test.before(async () => {
  const r = await cli('save', ...SMALL, '--max-rounds', '1', '--stream', S);
  assert.is(r.code, 0, r.stderr);
});

test('save over an existing file: exit 2 VFM_OUTPUT_EXISTS, file untouched; --force replaces it', async () => {
  const T = f('t.vfmig');
  fs.writeFileSync(T, 'precious');
  const r = await cli('save', ...SMALL, '--stream', T);
  assert.is(r.code, 2);
  assert.match(oneErrorLine(r, 'VFM_OUTPUT_EXISTS', 'save exists'), /--force/);
  assert.is(fs.readFileSync(T, 'utf8'), 'precious');
  const g = await cli('save', ...SMALL, '--stream', T, '--force');
  assert.is(g.code, 0, g.stderr);
  assert.is((await cli('inspect', T)).code, 0);
  fs.rmSync(T);
});

test('extract s --device 0 -o s refuses (exit 2), even with --force, and s is unchanged', async () => {
  const before = fs.readFileSync(S);
  for (const extra of [[], ['--force']]) {
    const r = await cli('extract', S, '--device', '0', '-o', S, ...extra);
    assert.is(r.code, 2, r.stderr);
    assert.match(oneErrorLine(r, 'VFM_BAD_ARGUMENT', 'extract onto input'), /is the input/);
  }
  assert.ok(fs.readFileSync(S).equals(before));
});

test('extract -o - writes the device stream to stdout; the report goes to stderr', async () => {
  const file = f('dev1.qemu');
  assert.is((await cli('extract', S, '--device', '1', '-o', file)).code, 0);
  const r = await cli('extract', S, '--device', '1', '-o', '-');
  assert.is(r.code, 0, r.stderr);
  assert.ok(r.stdout.equals(fs.readFileSync(file)), 'stdout holds exactly the device stream');
  assert.match(r.stderr, /bytes of QEMU stream written to standard output/);
  const j = await cli('extract', S, '--device', '1', '-o', '-', '--json');
  assert.ok(j.stdout.equals(fs.readFileSync(file)), '--json: stdout still holds only stream data');
  assert.is(JSON.parse(j.stderr).result.bytes, r.stdout.length);
});

test('stream data is never written to a terminal: -o - and --stream - on a tty exit 2 (util-linux script gives the pty)', async () => {
  for (const cmd of [`extract ${S} --device 0 -o -`, `save ${SMALL.join(' ')} --stream -`]) {
    const out = await new Promise<{ code: number | null; text: string }>((resolve) => {
      const c = spawn('script', ['-qec', `${process.execPath} ${BIN} ${cmd}`, '/dev/null'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
      let text = '';
      c.stdout.on('data', (d) => { text += d; });
      c.on('close', (code) => resolve({ code, text }));
    });
    assert.is(out.code, 2, `${cmd}: ${out.text}`);
    assert.match(out.text, /VFM_BAD_ARGUMENT: .*standard output is a terminal/);
    assert.not.match(out.text, /VFMIGSTR|\uFFFD/, 'no stream bytes reached the terminal');
  }
});

test('save --stream - writes a loadable container to a pipe, the report to stderr', async () => {
  const r = await cli('save', ...SMALL, '--max-rounds', '1', '--stream', '-', '--json');
  assert.is(r.code, 0, r.stderr);
  assert.is(JSON.parse(r.stderr).ok, true);
  assert.is(r.stdout.subarray(0, 8).toString('latin1'), 'VFMIGSTR');
  const P = f('piped.vfmig');
  fs.writeFileSync(P, r.stdout);
  const l = await cli('load', P, '--json');
  assert.is(l.code, 0, l.stderr);
  assert.ok(JSON.parse(l.stdout.toString()).result.load.devices.every((d: { verified: boolean }) => d.verified));
  fs.rmSync(P);
});

/** Record offsets of a container: 32-byte file header, records of a 32-byte header plus body. */
function records(b: Buffer): { at: number; type: number; len: number }[] {
  const out = [];
  for (let at = 32; at < b.length; at += 32 + b.readUInt32LE(at + 4)) out.push({ at, type: b.readUInt32LE(at), len: b.readUInt32LE(at + 4) });
  return out;
}

test('inspect: no END record is "incomplete"; a torn tail is "save interrupted at offset N"; both exit 1', async () => {
  const b = fs.readFileSync(S);
  const recs = records(b);
  const end = recs[recs.length - 1];
  const last = recs[recs.length - 2];
  const cases: [string, Buffer, RegExp, number | undefined][] = [
    ['no END', b.subarray(0, end.at), /status: incomplete: no END record/, undefined],
    ['END cut', b.subarray(0, end.at + 40), new RegExp(`status: save interrupted at offset ${end.at}\\b`), end.at],
    ['header cut', b.subarray(0, end.at + 7), new RegExp(`status: save interrupted at offset ${end.at}\\b`), end.at],
    ['chunk cut', b.subarray(0, last.at + 32 + Math.floor(last.len / 2)), new RegExp(`save interrupted at offset ${last.at}\\b`), last.at],
    // A positioned writer killed after reserving space leaves zeros where a record should be.
    ['hole', Buffer.concat([b.subarray(0, last.at), Buffer.alloc(b.length - last.at)]), new RegExp(`save interrupted at offset ${last.at}\\b`), last.at],
  ];
  for (const [what, bytes, re, at] of cases) {
    const T = f(`inspect-${what.replace(' ', '-')}.vfmig`);
    fs.writeFileSync(T, bytes);
    const r = await cli('inspect', T);
    assert.is(r.code, 1, `${what}: exit 1`);
    assert.match(r.stdout.toString(), re, what);
    oneErrorLine(r, 'VFM_STREAM_TRUNCATED', what);
    const j = await cli('inspect', T, '--json');
    assert.is(j.code, 1);
    const rep = JSON.parse(j.stdout.toString()).result;
    assert.is(rep.status, at === undefined ? 'incomplete' : 'interrupted', what);
    assert.is(rep.interruptedAt, at, what);
    fs.rmSync(T);
  }
  // Damage in the middle is corruption, not an interrupted save.
  const C = f('corrupt.vfmig');
  const c = Buffer.from(b);
  c[recs[3].at + 40] ^= 1;
  fs.writeFileSync(C, c);
  const r = await cli('inspect', C);
  assert.is(r.code, 1);
  assert.match(oneErrorLine(r, 'VFM_STREAM_CHECKSUM', 'corrupt'), new RegExp(`offset ${recs[3].at}`));
  const ok = await cli('inspect', S);
  assert.is(ok.code, 0);
  assert.match(ok.stdout.toString(), /status: complete/);
});

test('device names and ABORT messages from a stream are printed escaped: no control character reaches the terminal', async () => {
  const EVIL = 'x\x1b[2K\r\x1b[32mverified: true\x1b[0m\n\x9b31m\u202e';
  const { header, recs } = readRecords(S);
  const t = JSON.parse(Buffer.from(recs[0].body).toString());
  t.devices[1].name = EVIL;
  recs[0].body = new Uint8Array(Buffer.from(JSON.stringify(t)));
  const e = recs[recs.length - 1];
  const end = JSON.parse(Buffer.from(e.body).toString());
  end.devices[1].name = EVIL;
  end.devices[1].finalState = EVIL;
  e.body = new Uint8Array(Buffer.from(JSON.stringify(end)));
  const N = f('evil-name.vfmig');
  writeRecords(N, header, recs);
  const A = f('evil-abort.vfmig');
  writeRecords(A, header, [...recs.slice(0, -1), { ...e, type: 4, body: new Uint8Array(Buffer.from(JSON.stringify({ code: `VFM_X${EVIL}`, message: EVIL, device: EVIL }))) }]);
  const clean = (s: string, what: string) => {
    // eslint-disable-next-line no-control-regex
    assert.not.match(s, /[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]/, `${what}: a raw control character was printed: ${JSON.stringify(s)}`);
    // The one genuine line is load's final `verified: true`; any other line with it is the name, escaped.
    const lines = s.split('\n');
    assert.ok(lines.filter((l) => l === 'verified: true').length <= 1, `${what}: a forged line`);
    const forged = lines.filter((l) => l.includes('verified: true') && l !== 'verified: true' && !/\\(x1b|u001b)\[32mverified: true/.test(l));
    assert.equal(forged, [], `${what}: a forged line`);
  };
  for (const args of [['inspect', N], ['inspect', N, '--packets'], ['inspect', A], ['load', N], ['load', A], ['inspect', N, '--json'], ['load', A, '--json']]) {
    const r = await cli(...args);
    clean(r.stdout.toString(), args.join(' '));
    clean(r.stderr, args.join(' '));
  }
  const r = await cli('inspect', A);
  assert.match(r.stdout.toString(), /status: aborted by the source: VFM_Xx\\x1b\[2K\\x0d\\x1b\[32mverified: true/);
  const tr = await start(['load', N], { VFIO_MIG_TRACE: '1' }).done;
  clean(tr.stderr, 'load with VFIO_MIG_TRACE=1');
  assert.match(tr.stderr, /vfio_load_setup device=x\\x1b/);
  const l = await cli('load', N);
  assert.match(l.stdout.toString(), /x\\x1b\[2K\\x0d\\x1b\[32mverified: true\\x1b\[0m\\x0a\\x9b31m\\u\{202e\}/);
});

/**
 * Start `args`, run `meanwhile` once a temporary output appears in `dir` (the command is then writing), send `sig`,
 * and wait for the exit.
 */
async function interrupt(args: string[], sig: NodeJS.Signals, dir: string, env: Record<string, string> = {},
  meanwhile?: () => Promise<void>): Promise<Result> {
  const { child, done } = start(args, env);
  const t0 = Date.now();
  while (!fs.readdirSync(dir).some((n) => n.endsWith('.partial'))) {
    if (Date.now() - t0 > 30_000) { child.kill('SIGKILL'); throw new Error('no temporary output appeared'); }
    await new Promise((r) => setTimeout(r, 10));
  }
  try { await meanwhile?.(); } finally { child.kill(sig); }
  return done;
}

test('SIGINT during save: exit 130, one line, sources RUNNING again, nothing left in the folder', async () => {
  const D = fs.mkdtempSync(path.join(DIR, 'sigint-'));
  const F = path.join(D, 'out.vfmig');
  const r = await interrupt(['save', '--devices', '2', '--size', '32MiB', '--bandwidth', '8MiB', '--stream', F], 'SIGINT', D, {}, async () => {
    // Meanwhile a second save to the same path, from another process, is refused (even with --force).
    const second = await cli('save', ...SMALL, '--stream', F, '--force');
    assert.is(second.code, 1, second.stderr);
    assert.match(oneErrorLine(second, 'VFM_OUTPUT_BUSY', 'second save'), /being written by another vfio-mig \(pid \d+/);
  });
  assert.is(r.signal, null, 'handled, not killed by the signal');
  assert.is(r.code, 130, r.stderr);
  assert.match(oneErrorLine(r, 'VFM_CANCELLED', 'SIGINT'), /interrupted by SIGINT; 2 of 2 source device\(s\) RUNNING again, nothing written to /);
  assert.equal(fs.readdirSync(D), [], 'no output, no temporary file, no lock');
});

test('SIGTERM during run: exit 143, the temporary stream removed; --json reports the rollback', async () => {
  const D = fs.mkdtempSync(path.join(DIR, 'sigterm-'));
  const r = await interrupt(['run', '--devices', '2', '--size', '32MiB', '--bandwidth', '8MiB', '--json'], 'SIGTERM', D, { TMPDIR: D });
  assert.is(r.code, 143, r.stderr);
  assert.match(oneErrorLine(r, 'VFM_CANCELLED', 'SIGTERM'), /interrupted by SIGTERM; 2 of 2 source device\(s\) RUNNING again, temporary stream removed/);
  const rep = JSON.parse(r.stdout.toString());
  assert.is(rep.ok, false);
  assert.is(rep.error.code, 'VFM_CANCELLED');
  assert.is(rep.result.save.rollback.length, 2);
  assert.equal(fs.readdirSync(D), [], 'temporary stream removed');
});

test('when the process exits early (a second signal, a crash), temporary outputs, locks and run\'s scratch stream go', async () => {
  const D = fs.mkdtempSync(path.join(DIR, 'exit-'));
  const scratch = path.join(D, 'scratch.vfmig');
  fs.writeFileSync(scratch, 'x');
  const mod = path.join(ROOT, 'dist/src/main/container/output.js');
  // An output being written (temporary file + lock present), and a scratch file, then an abrupt process.exit.
  const code = `const m = await import(${JSON.stringify(mod)});
    const o = m.OutputFile.open(${JSON.stringify(path.join(D, 'out.vfmig'))});
    if (require('node:fs').readdirSync(${JSON.stringify(D)}).length !== 3) process.exit(9);
    m.removeOnExit(${JSON.stringify(scratch)});
    process.exit(3);`.replace("require('node:fs')", '(await import("node:fs")).default');
  const e = await new Promise<number | null>((resolve) => {
    spawn(process.execPath, ['--input-type=module', '-e', code]).on('close', resolve);
  });
  assert.is(e, 3, 'the output and its lock existed while writing');
  assert.equal(fs.readdirSync(D), []);
});

test.run();
