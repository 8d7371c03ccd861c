// The command line with emulated v2 devices (issue 8 §4): `run --profile v2`, and `save --profile v2` then `load`, as a
// user runs them (child processes, --json), each device verified; the stream's device table says v2, the destination
// saw DEV_INIT_DATA_SENT (pre-copy sent the initial bytes), and the extracted device stream is QEMU 8.1+'s.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import { runCli, rm, tmpFile, type CliResult } from './helpers.js';
import { FLAG_DEV_INIT_DATA_SENT, getBe64 } from '../src/main/protocol/qemu-stream.js';

const SMALL = ['--size', '2MiB', '--chunk', '64KiB', '--devices', '2'];

function ok(r: CliResult, what: string): any {
  assert.is(r.code, 0, `${what}: exit ${r.code}, stderr: ${r.stderr}`);
  const doc = JSON.parse(r.stdout);
  assert.is(doc.ok, true, what);
  return doc.result;
}

function checkLoaded(devices: any[], what: string): void {
  assert.equal(devices.map((d) => [d.name, d.verified, d.state]), [['emu0', true, 'RUNNING'], ['emu1', true, 'RUNNING']], what);
  assert.equal(devices.map((d) => d.initDataSent), [true, true], `${what}: DEV_INIT_DATA_SENT reached each destination`);
}

test('run --profile v2 --json: both v2 devices migrated through their data fds and verified', async () => {
  const rep = ok(await runCli(['run', ...SMALL, '--profile', 'v2', '--json']), 'run');
  assert.is(rep.verified, true);
  checkLoaded(rep.load.devices, 'run');
});

test('save --profile v2, then inspect, extract and load: a v2 device table, QEMU 8.1+ stream, verified', async () => {
  const f = tmpFile('cliv2');
  const x = tmpFile('cliv2x');
  try {
    const saved = ok(await runCli(['save', ...SMALL, '--profile', 'v2', '--stream', f, '--json']), 'save');
    assert.is(saved.save.devices.length, 2);
    const ins = ok(await runCli(['inspect', f, '--json']), 'inspect');
    assert.equal(ins.devices.map((d: any) => d.profile), ['v2', 'v2']);
    const e = await runCli(['extract', f, '--device', '1', '-o', x, '--force']);
    assert.is(e.code, 0, `extract: ${e.stderr}`);
    const s = new Uint8Array(fs.readFileSync(x));
    let inits = 0;
    for (let p = 0; p + 8 <= s.length; p += 8) if (getBe64(s, p) === FLAG_DEV_INIT_DATA_SENT) inits++;
    assert.ok(inits >= 1, 'the extracted stream carries DEV_INIT_DATA_SENT');
    const loaded = ok(await runCli(['load', f, '--json']), 'load');
    checkLoaded(loaded.load.devices, 'load');
    loaded.load.devices.forEach((d: any, i: number) => assert.is(d.digest, saved.save.devices[i].digest, `${d.name} digest matches the save`));
  } finally {
    rm(f, x);
  }
});

test.run();
