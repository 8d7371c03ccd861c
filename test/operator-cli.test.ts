// The command line as an operator and a program see it: one JSON schema for every command (validated with ajv
// against docs/vfio-mig.schema.json), units in field names, --events NDJSON, --quiet, --report, --verbose, --version,
// help, and the README's command list against --help.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv } from 'ajv';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin/vfio-mig.js');
const SMALL = ['--size', '2MiB', '--chunk', '64KiB', '--devices', '2'];
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-operator-'));
const F = path.join(TMP, 's.vfmig');
const VERSION = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version;

interface Result { code: number | null; stdout: string; stderr: string }
function cli(args: string[], env: Record<string, string> = {}): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
    child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`vfio-mig ${args.join(' ')}: timed out`)); }, 60_000);
    child.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr }); });
  });
}

const ajv = new Ajv({ allErrors: true, strict: true });
ajv.addFormat('date-time', /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
const validate = ajv.compile(JSON.parse(fs.readFileSync(path.join(ROOT, 'docs/vfio-mig.schema.json'), 'utf8')));

/** Numbers whose name carries no unit must be counts (or identifiers); every quantity names its unit. */
const COUNTS = new Set(['schemaVersion', 'devices', 'round', 'rounds', 'precopyChunks', 'stopCopyChunks', 'queries', 'count', 'pagesDirtied',
  'dataPackets', 'emptyDataPackets', 'records', 'sections', 'index', 'device', 'iteration', 'iterations', 'migrations', 'chunks', 'failures',
  'seed', 'maxRounds', 'threads', 'version', 'DEVICE_TABLE', 'CHUNK', 'END', 'ABORT', 'dirtyPagesPerSecond', 'dmaPagesPerSecond', 'seconds',
  'guestPages', 'replay', 'pass', 'channels', 'offset', 'errno', 'interruptedAt']);
const UNIT = /(Bytes|bytes|Ms|ms|PerSecond|Seconds)$/;
function unitless(v: unknown, at: string, out: string[]): void {
  if (Array.isArray(v)) { v.forEach((x, i) => unitless(x, `${at}[${i}]`, out)); return; }
  if (v && typeof v === 'object') {
    for (const [k, x] of Object.entries(v)) {
      if (typeof x === 'number' && !UNIT.test(k) && !COUNTS.has(k)) out.push(`${at}.${k}`);
      // A device table's geometry is the stream format's own (docs/FORMAT.md), and params echo the flags given.
      if (k !== 'geometry' && k !== 'params') unitless(x, `${at}.${k}`, out);
    }
  }
}

function doc(r: Result, what: string): any {
  let d: any;
  try { d = JSON.parse(r.stdout); } catch { assert.unreachable(`${what}: stdout is not one JSON document: ${r.stdout.slice(0, 200)} ${r.stderr}`); }
  const ok = validate(d);
  assert.ok(ok, `${what}: ${ajv.errorsText(validate.errors)}`);
  assert.is(d.tool.version, VERSION, what);
  assert.ok(Date.parse(d.endedAt) >= Date.parse(d.startedAt), `${what}: timestamps`);
  const bad: string[] = [];
  unitless(d, '$', bad);
  assert.equal(bad, [], `${what}: numbers without a unit in their name`);
  return d;
}

test.after(() => { fs.rmSync(TMP, { recursive: true, force: true }); });

test('every command\'s --json validates against the one schema, success and failure alike', async () => {
  const run = doc(await cli(['run', ...SMALL, '--json']), 'run');
  assert.is(run.command, 'run');
  assert.is(run.ok, true);
  assert.is(run.params.sizeBytes, 2 << 20, 'parameters carry their unit');
  assert.is(run.result.verified, true);
  assert.ok(run.result.downtimeMs > 0 && run.result.downtimeMs >= run.result.save.stopCopyMs, 'end-to-end downtime covers the stop-and-copy');
  const save = doc(await cli(['save', ...SMALL, '--stream', F, '--json']), 'save');
  assert.is(save.result.stream, F);
  const load = doc(await cli(['load', F, '--json']), 'load');
  assert.is(load.result.load.verified, true);
  assert.equal(load.result.load.devices.map((d: any) => d.digest), save.result.save.devices.map((d: any) => d.digest));
  doc(await cli(['inspect', F, '--json']), 'inspect');
  const pk = doc(await cli(['inspect', F, '--packets', '--json']), 'inspect --packets');
  assert.ok(pk.result.devices[0].packets.length > 3);
  const ex = doc(await cli(['extract', F, '--device', '0', '-o', path.join(TMP, 'd0.qemu'), '--json']), 'extract');
  assert.is(ex.result.bytes, fs.statSync(path.join(TMP, 'd0.qemu')).size);
  const st = doc(await cli(['stress', '--count', '1', '--seconds', '30', '--seed', '7', '--json']), 'stress');
  assert.is(st.result.iterations, 1);
  const rp = doc(await cli(['stress', '--replay', '12345', '--json']), 'stress --replay');
  assert.is(rp.result.replay.seed, 12345);
  // Failures: the same envelope, ok false, error with a code; what was measured before failing in result.
  const missing = await cli(['load', path.join(TMP, 'missing.vfmig'), '--json']);
  assert.is(missing.code, 1);
  const m = doc(missing, 'load missing');
  assert.is(m.ok, false);
  assert.is(m.error.code, 'VFM_IO');
  const badFlag = await cli(['run', '--devices', '0', '--json']);
  assert.is(badFlag.code, 2);
  const b = doc(badFlag, 'run --devices 0');
  assert.is(b.command, 'run');
  assert.is(b.error.code, 'VFM_BAD_ARGUMENT');
  assert.is(b.result, null);
  const T = path.join(TMP, 'cut.vfmig');
  fs.writeFileSync(T, fs.readFileSync(F).subarray(0, Math.floor(fs.statSync(F).size * 0.7)));
  const cut = doc(await cli(['load', T, '--json']), 'load truncated');
  assert.is(cut.error.code, 'VFM_STREAM_TRUNCATED');
  assert.is(typeof cut.error.offset, 'number');
  assert.ok(cut.result.load.devices.every((d: any) => d.state !== 'RUNNING'), 'partial result: no destination runs');
  doc(await cli(['inspect', T, '--json']), 'inspect truncated');
  const exists = await cli(['save', ...SMALL, '--stream', F, '--json']);
  assert.is(exists.code, 2);
  assert.is(doc(exists, 'save over an existing file').error.code, 'VFM_OUTPUT_EXISTS');
});

/** NDJSON lines of an --events file. */
function events(text: string): { timestamp: { seconds: number; microseconds: number }; event: string; data: any }[] {
  const lines = text.split('\n').filter(Boolean);
  return lines.map((l, i) => { try { return JSON.parse(l); } catch { assert.unreachable(`line ${i + 1} is not JSON: ${l}`); } });
}

/** `vfio-mig receive` in one child, `vfio-mig send` in another, over a UNIX socket (receive announces its address first). */
async function livePair(sendArgs: string[], recvArgs: string[]): Promise<{ send: Result; receive: Result }> {
  const sock = path.join(TMP, `live-${process.hrtime.bigint()}.sock`);
  const child = spawn(process.execPath, [BIN, 'receive', '--listen', `unix:${sock}`, ...recvArgs], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
  const closed = new Promise<Result>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  await new Promise<void>((resolve, reject) => {
    child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; if (stderr.includes('listening on')) resolve(); });
    void closed.then((r) => reject(new Error(`receive ended before listening: ${r.stderr}`)));
  });
  const send = await cli(['send', '--to', `unix:${sock}`, ...sendArgs]);
  const receive = await closed;
  clearTimeout(timer);
  return { send, receive };
}

test('send and receive (two processes, UNIX socket): --json validates, --events and --report work on both ends', async () => {
  const E = path.join(TMP, 'live-events.ndjson');
  const R = path.join(TMP, 'live-send.html');
  const { send, receive } = await livePair([...SMALL, '--channels', '2', '--json', '--report', R], ['--json', '--events', E]);
  assert.is(send.code, 0, send.stderr);
  assert.is(receive.code, 0, receive.stderr);
  const s = doc(send, 'send');
  const r = doc(receive, 'receive');
  assert.is(s.command, 'send');
  assert.is(r.command, 'receive');
  assert.is(s.ok && r.ok, true);
  assert.is(s.result.channels, 2);
  assert.is(r.result.channels, 2);
  assert.is(s.result.tls, false);
  assert.is(s.result.session, r.result.session, 'one session seen from both ends');
  assert.ok(s.result.downtimeMs > 0 && s.result.downtimeMs >= s.result.destinationDowntimeMs, 'end-to-end downtime covers the destination part');
  assert.is(r.result.downtimeMs, s.result.downtimeMs, 'the destination reports the source\'s end-to-end figure');
  assert.ok(s.result.bytes > 2 * (2 << 20) && r.result.bytes >= s.result.bytes, 'bytes on the wire');
  assert.equal(s.result.devices.map((d: any) => [d.name, d.verified]), [['emu0', true], ['emu1', true]], 'per-device verified (source side)');
  assert.equal(r.result.devices.map((d: any) => [d.name, d.verified]), [['emu0', true], ['emu1', true]], 'per-device verified (destination)');
  assert.is(s.result.verified && r.result.verified, true);
  assert.equal(r.result.load.devices.map((d: any) => d.digest), s.result.save.devices.map((d: any) => d.digest), 'digests match end to end');
  const ev = events(fs.readFileSync(E, 'utf8'));
  assert.is(ev[0].event, 'VFIO_MIG_START');
  assert.is(ev[0].data.command, 'receive');
  assert.is(ev[ev.length - 1].event, 'VFIO_MIG_END');
  assert.is(ev[ev.length - 1].data.ok, true);
  assert.ok(ev.some((e) => e.event === 'VFIO_MIGRATION' && e.data['device-state'] === 'resuming'), 'the receiver\'s Loader drives the events');
  assert.ok(ev.some((e) => e.event === 'VFIO_MIG_PROGRESS' && e.data.side === 'destination'), 'destination progress events');
  const html = fs.readFileSync(R, 'utf8');
  assert.match(html, /<html/i);
  assert.match(html, /emu1/, 'the report draws the sender\'s devices');
  // --quiet: the human summary is gone, the verdict line stays (and receive still announces where it listens).
  const q = await livePair([...SMALL, '--quiet'], ['--quiet']);
  assert.is(q.send.code, 0, q.send.stderr);
  assert.is(q.send.stdout, 'verified: true\n');
  assert.is(q.receive.stdout, 'verified: true\n');
  // A failed send: the same envelope, the live report (state, cause) as its result.
  const gone = await cli(['send', '--to', `unix:${path.join(TMP, 'nobody.sock')}`, ...SMALL, '--json']);
  assert.is(gone.code, 1);
  const g = doc(gone, 'send to nobody');
  assert.is(g.error.code, 'VFM_PEER_GONE');
  assert.is(g.result.state, 'failed');
  assert.is(g.result.cause.side, 'source');
  // Without --json the human text is the one it always was.
  const h = await livePair(SMALL, []);
  assert.match(h.send.stdout, /^send: unix:.*, 1 channel\(s\), .* in \d+ ms$/m);
  assert.match(h.send.stdout, /^downtime: [\d.]+ ms end to end/m);
  assert.match(h.receive.stdout, /^emu1: RUNNING, verified: true$/m);
});

test('--events FILE: QMP-shaped MIGRATION / MIGRATION_PASS / VFIO_MIGRATION events in order, START first and END last', async () => {
  const E = path.join(TMP, 'ev.ndjson');
  const r = await cli(['run', ...SMALL, '--max-rounds', '3', '--downtime', '0', '--dirty-rate', '20000', '--events', E]);
  assert.is(r.code, 0, r.stderr);
  const ev = events(fs.readFileSync(E, 'utf8'));
  assert.is(ev[0].event, 'VFIO_MIG_START');
  assert.is(ev[0].data.schema, 'vfio-mig.events');
  assert.is(ev[0].data.tool.version, VERSION);
  assert.is(ev[ev.length - 1].event, 'VFIO_MIG_END');
  assert.is(ev[ev.length - 1].data.ok, true);
  for (let i = 1; i < ev.length; i++) {
    const t = (e: typeof ev[0]) => e.timestamp.seconds * 1e6 + e.timestamp.microseconds;
    assert.ok(t(ev[i]) >= t(ev[i - 1]), 'timestamps do not go back');
  }
  const status = (side: string) => ev.filter((e) => e.event === 'MIGRATION' && e.data.side === side).map((e) => e.data.status);
  assert.equal(status('source'), ['setup', 'active', 'device', 'completed']);
  assert.equal(status('destination'), ['active', 'completed'], 'the load ends with its own final status');
  const passes = ev.filter((e) => e.event === 'MIGRATION_PASS');
  assert.equal(passes.map((e) => e.data.pass), [1, 2, 3]);
  for (const p of passes) assert.is(p.data.devices.length, 2);
  for (const dev of ['emu0', 'emu1']) {
    const states = (side: string) => ev.filter((e) => e.event === 'VFIO_MIGRATION' && e.data.side === side && e.data['device-id'] === dev).map((e) => e.data['device-state']);
    assert.equal(states('source'), ['pre-copy', 'stop-copy', 'stop'], dev);
    // Every destination is loaded and verified (STOP) before any starts.
    assert.equal(states('destination'), ['resuming', 'stop', 'running'], dev);
    const prog = ev.filter((e) => e.event === 'VFIO_MIG_PROGRESS' && e.data['device-id'] === dev && e.data.side === 'source');
    assert.ok(prog.length >= 3, `${dev}: progress events`);
  }
  // The same file again without --force is refused before anything runs.
  const again = await cli(['run', ...SMALL, '--events', E]);
  assert.is(again.code, 2);
  assert.match(again.stderr, /VFM_OUTPUT_EXISTS/);
});

test('--events -: NDJSON alone on stdout, the summary on stderr; with --json it is refused', async () => {
  const r = await cli(['load', F, '--events', '-']);
  assert.is(r.code, 0, r.stderr);
  const ev = events(r.stdout);
  assert.is(ev[0].event, 'VFIO_MIG_START');
  assert.is(ev[ev.length - 1].event, 'VFIO_MIG_END');
  assert.ok(ev.some((e) => e.event === 'VFIO_MIGRATION' && e.data['device-state'] === 'running'));
  assert.match(r.stderr, /^verified: true$/m);
  const both = await cli(['load', F, '--events', '-', '--json']);
  assert.is(both.code, 2);
  assert.match(both.stderr, /VFM_BAD_ARGUMENT: --events -/);
});

test('human output: wording and units; verified once per device and once overall; --quiet keeps only the verdict', async () => {
  const r = await cli(['run', ...SMALL]);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, /source stop-and-copy time \d+\.\d ms/);
  assert.match(r.stdout, /^downtime \(end to end: .*\): \d+\.\d ms$/m);
  assert.not.match(r.stdout, /device-state downtime|MB\/s/, 'no "downtime" for a source-only time, one rate unit');
  assert.match(r.stdout, /MiB\/s/);
  assert.is(r.stdout.match(/^verified: /gm)?.length, 1, 'verified once overall');
  assert.not.match(r.stdout, /^emu\d: verified/m, 'no second per-device verified line');
  const table = r.stdout.split('\n').filter((l) => /^emu\d\s+\d+\s+.*RUNNING\s+true$/.test(l));
  assert.is(table.length, 2, 'verified once per device, in the load table');
  assert.not.match(r.stderr, /\x1b\[/, 'no progress drawn when stdout is not a terminal');
  const q = await cli(['run', ...SMALL, '--quiet']);
  assert.is(q.code, 0);
  assert.is(q.stdout, 'verified: true\n');
  assert.is(q.stderr, '');
});

test('--report FILE.html from the CLI: written once, never over an existing file without --force', async () => {
  const R = path.join(TMP, 'r.html');
  const r = await cli(['run', ...SMALL, '--report', R]);
  assert.is(r.code, 0, r.stderr);
  const html = fs.readFileSync(R, 'utf8');
  assert.match(html, /uPlot/);
  assert.match(html, /source stop-and-copy time/);
  assert.not.match(html, /<script[^>]+src=|<link[^>]+href=/, 'nothing loaded from elsewhere');
  assert.match(r.stdout, new RegExp(`report: ${R}`));
  const again = await cli(['run', ...SMALL, '--report', R]);
  assert.is(again.code, 2);
  assert.match(again.stderr, /VFM_OUTPUT_EXISTS/);
  assert.is(fs.readFileSync(R, 'utf8'), html, 'untouched');
  assert.is((await cli(['run', ...SMALL, '--report', R, '--force'])).code, 0);
  assert.is.not(fs.readFileSync(R, 'utf8'), html, 'replaced with --force');
  const bad = await cli(['run', ...SMALL, '--report', path.join(TMP, 'r.txt')]);
  assert.is(bad.code, 2);
});

test('--version, help [command] exit 0; sizes in help in human units; --verbose prints trace points', async () => {
  const v = await cli(['--version']);
  assert.is(v.code, 0);
  assert.is(v.stdout.trim(), VERSION);
  const h = await cli(['help']);
  assert.is(h.code, 0);
  assert.match(h.stdout, /Commands:/);
  assert.match(h.stdout, /VFIO_MIG_TRACE/);
  const hr = await cli(['help', 'run']);
  assert.is(hr.code, 0);
  assert.match(hr.stdout, /default: 64MiB/);
  assert.match(hr.stdout, /default: 1MiB/);
  assert.not.match(hr.stdout, /67108864|1048576|2147483648/, 'no raw byte counts');
  const none = await cli([]);
  assert.is(none.code, 2, 'no command at all is still a usage error');
  const vb = await cli(['run', ...SMALL, '--verbose', '--quiet']);
  assert.is(vb.code, 0);
  assert.match(vb.stderr, /^vfio-mig: migration_phase from=idle to=setup$/m);
  assert.match(vb.stderr, /^vfio-mig: vfio_load_setup device=emu0$/m);
});

/** `vfio-mig help <cmd>`'s long flags. */
function helpFlags(text: string): Set<string> {
  return new Set([...text.matchAll(/^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)/gm)].map((m) => m[1]).filter((f) => f !== '--help'));
}

test('the README\'s command list names exactly the commands and flags of --help', async () => {
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const block = /## Commands\n\n```\n([\s\S]*?)```/.exec(readme)?.[1];
  assert.ok(block, 'README has a Commands block');
  const groups = new Map<string, string[]>();
  const cmds = new Map<string, string[]>();
  let cur: string[] | undefined;
  for (const line of block!.split('\n')) {
    const c = /^vfio-mig ([\w-]+)/.exec(line);
    const g = /^(\w+) options:/.exec(line);
    if (c) { cur = []; cmds.set(c[1], cur); } else if (g) { cur = []; groups.set(g[1], cur); } else if (!/^\s/.test(line)) cur = undefined;
    const text = line.replace(/#.*/, '');
    for (const m of text.matchAll(/--[a-z][a-z0-9-]*/g)) cur?.push(m[0]);
    for (const m of text.matchAll(/\[(\w+) options\]/g)) cur?.push(`@${m[1]}`);
  }
  const top = await cli(['--help']);
  const listed = [...top.stdout.matchAll(/^ {2}([\w-]+) (?:\[options\]|\[command\]|<file>)/gm)].map((m) => m[1]);
  assert.equal([...cmds.keys()].filter((c) => c !== 'help' && c !== '--version').sort(), listed.filter((c) => c !== 'help').sort(), 'the same commands');
  assert.ok(cmds.has('help') && listed.includes('help'));
  for (const [cmd, flags] of cmds) {
    if (cmd === 'help' || cmd === '--version') continue;
    const readmeFlags = new Set(flags.flatMap((f) => (f.startsWith('@') ? groups.get(f.slice(1)) ?? [`unknown group ${f}`] : [f])));
    const help = helpFlags((await cli(['help', cmd])).stdout);
    assert.equal([...readmeFlags].sort(), [...help].sort(), `vfio-mig ${cmd}: README flags vs help`);
  }
});

test.run();
