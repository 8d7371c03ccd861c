// `vfio-mig run --live tcp|unix`: the main job as a live migration between two processes on this machine (a
// `vfio-mig receive` child and this CLI process sending to it), end to end through the CLI: the JSON document is
// validated against docs/vfio-mig.schema.json (as test/operator-cli.test.ts does), both sides' downtime and
// verification are reported and agree, and the destination really was another process.
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Ajv } from 'ajv';
import { ROOT, runCli, type CliResult } from './helpers.js';

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

test('run --live: a bad transport and a stream file are refused before anything starts', async () => {
  const a = await cli(['run', '--live', 'udp', '--json', ...SMALL]);
  assert.is(a.code, 2, a.stderr);
  const b = await cli(['run', '--live', 'tcp', '--stream', '/tmp/x.vfmig', '--json', ...SMALL]);
  assert.is(b.code, 2, b.stderr);
  assert.is(doc(b, 'run --live --stream').error.code, 'VFM_BAD_ARGUMENT');
});

test.run();
