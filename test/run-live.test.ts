// `vfio-mig run --live tcp|unix`: the main job as a live migration between two processes on this machine (a
// `vfio-mig receive` child and this CLI process sending to it), end to end through the CLI: the JSON document is
// validated against docs/vfio-mig.schema.json (as test/operator-cli.test.ts does), both sides' downtime and
// verification are reported and agree, and the destination really was another process; --tls (a throw-away PKI),
// --tls-dir (the operator's folder; a client not on the allow list refused) and --channels.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Ajv } from 'ajv';
import { ROOT, runCli, type CliResult } from './helpers.js';
import { makePki, opensslAvailable } from './tls-pki.js';

const SMALL = ['--size', '4MiB', '--chunk', '256KiB', '--devices', '2'];
type Result = CliResult;
const cli = (args: string[]) => runCli(args, 90_000);

const ajv = new Ajv({ allErrors: true, strict: true });
ajv.addFormat('date-time', /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
const validate = ajv.compile(JSON.parse(fs.readFileSync(path.join(ROOT, 'docs/vfio-mig.schema.json'), 'utf8')));

// eslint-disable-next-line @typescript-eslint/no-explicit-any
function doc(r: Result, what: string): any {
  let d: any; // eslint-disable-line @typescript-eslint/no-explicit-any
  try { d = JSON.parse(r.stdout); } catch { assert.unreachable(`${what}: stdout is not one JSON document: ${r.stdout.slice(0, 200)} ${r.stderr}`); }
  assert.ok(validate(d), `${what}: ${ajv.errorsText(validate.errors)}`);
  return d;
}

for (const transport of ['tcp', 'unix'] as const) {
  test(`run --live ${transport}: two processes, both sides verified, the same end-to-end downtime on both`, async () => {
    const r = await cli(['run', '--live', transport, '--json', ...SMALL, '--profile', transport === 'tcp' ? 'v2' : 'linux-5.8']);
    assert.is(r.code, 0, r.stderr);
    const d = doc(r, `run --live ${transport}`);
    assert.is(d.command, 'run');
    assert.ok(d.ok);
    const res = d.result;
    assert.is(res.stream, null);
    assert.ok(res.verified);
    const { send, receive, uri } = res.live;
    assert.match(uri, transport === 'tcp' ? /^tcp:127\.0\.0\.1:\d+$/ : /^unix:\//);
    assert.is(send.to, uri);
    // The destination's own document, from the other process: it listened where this one sent, and verified.
    assert.is(receive.address, uri);
    assert.is(receive.state, 'completed');
    assert.ok(receive.verified);
    assert.equal(receive.devices.map((x: { verified: boolean }) => x.verified), [true, true]);
    assert.equal(send.devices.map((x: { verified: boolean }) => x.verified), [true, true]);
    assert.equal(res.load, receive.load, 'run.load is the destination process\'s load');
    // End to end, reported by both sides, the same number.
    assert.type(res.downtimeMs, 'number');
    assert.is(send.downtimeMs, res.downtimeMs);
    assert.is(receive.downtimeMs, res.downtimeMs, 'the destination process reports the same end-to-end downtime');
    assert.ok(receive.destinationDowntimeMs <= res.downtimeMs + 1, 'the destination part is inside the end-to-end figure');
    // Another process: its peer is this CLI process (tcp: a loopback port; unix: 'local').
    assert.ok(receive.peer, 'the destination saw a peer');
    assert.ok(receive.bytes > 2 * (4 << 20), `bytes over the connection: ${receive.bytes}`);
  });
}

const pkiDirs = () => fs.readdirSync(os.tmpdir()).filter((f) => f.startsWith('vfio-mig-pki-'));

test('run --live tcp --tls --channels 4: 4 devices between two processes, mutual TLS with a throw-away PKI, all verified; the PKI is removed', async () => {
  if (!opensslAvailable()) throw new Error('run --live --tls needs the openssl CLI (Debian package openssl; .ci/run installs it)');
  const before = pkiDirs();
  const r = await cli(['run', '--live', 'tcp', '--tls', '--channels', '4', '--json', '--size', '4MiB', '--chunk', '256KiB', '--devices', '4']);
  assert.is(r.code, 0, r.stderr);
  const { send, receive } = doc(r, 'run --live tcp --tls').result.live;
  assert.equal([send.tls, receive.tls], [true, true], 'both processes ran TLS');
  assert.equal([send.channels, receive.channels], [4, 4]);
  assert.is(receive.channelBytes.filter((b: number) => b > 4 << 20).length, 4, 'every channel carried a device');
  assert.is(receive.peerIdentity, 'vfio-mig-run-live', 'the destination admitted the client by its certificate');
  assert.equal(receive.devices.map((x: { verified: boolean }) => x.verified), [true, true, true, true]);
  assert.equal(pkiDirs(), before, 'the throw-away PKI folder is gone');
});

test('run --live tcp --tls-dir: the operator\'s folder for both ends; a client the allow list does not name is refused', async () => {
  if (!opensslAvailable()) throw new Error('run --live --tls-dir needs the openssl CLI (Debian package openssl; .ci/run installs it)');
  const pki = makePki();
  try {
    const both = (client: string) => {
      const dir = path.join(pki.root, `both-${path.basename(client)}`);
      fs.mkdirSync(dir);
      for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem', 'allow']) fs.copyFileSync(path.join(pki.server, f), path.join(dir, f));
      for (const f of ['client-cert.pem', 'client-key.pem']) fs.copyFileSync(path.join(client, f), path.join(dir, f));
      return dir;
    };
    const r = await cli(['run', '--live', 'tcp', '--tls-dir', both(pki.client), '--json', ...SMALL]);
    assert.is(r.code, 0, r.stderr);
    const { receive } = doc(r, 'run --live tcp --tls-dir').result.live;
    assert.is(receive.peerIdentity, pki.allowedCn);
    assert.ok(receive.verified);
    const no = await cli(['run', '--live', 'tcp', '--tls-dir', both(pki.intruder), '--json', ...SMALL]);
    assert.is(no.code, 1, no.stderr);
    assert.is(doc(no, 'run --live --tls-dir (intruder)').error.code, 'VFM_PEER_NOT_ALLOWED');
  } finally {
    fs.rmSync(pki.root, { recursive: true, force: true });
  }
});

test('run: --tls over a UNIX socket, --tls with --tls-dir, and --channels / --tls without --live are refused', async () => {
  for (const args of [['--live', 'unix', '--tls'], ['--live', 'tcp', '--tls', '--tls-dir', '/nonexistent'], ['--tls'], ['--channels', '2']]) {
    const r = await cli(['run', ...args, '--json', ...SMALL]);
    assert.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    assert.is(doc(r, `run ${args.join(' ')}`).error.code, 'VFM_BAD_ARGUMENT');
  }
});

test('run --live: a bad transport and a stream file are refused before anything starts', async () => {
  const a = await cli(['run', '--live', 'udp', '--json', ...SMALL]);
  assert.is(a.code, 2, a.stderr);
  const b = await cli(['run', '--live', 'tcp', '--stream', '/tmp/x.vfmig', '--json', ...SMALL]);
  assert.is(b.code, 2, b.stderr);
  assert.is(doc(b, 'run --live --stream').error.code, 'VFM_BAD_ARGUMENT');
});

test.run();
