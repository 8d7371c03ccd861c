// A worker thread terminated while it is inside a native call that then fails (process exit or a pool closing while a
// vendor call runs, as `vfio-mig run` interrupted by SIGTERM does): the error can no longer reach JavaScript. The
// addon must not take the process down with it (node-addon-api's default with C++ exceptions is to throw again from
// its own catch: std::terminate, "terminate called after throwing an instance of 'Napi::Error'", exit by SIGABRT).
// Made deterministic with a data-fd write blocked on a full socket: the worker is terminated during the wait, then the
// peer goes away so the write fails (EPIPE) into the terminating environment. Run in a child process, bounded.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ROOT } from './helpers.js';

const SCRIPT = `
import { Worker } from 'node:worker_threads';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
const sock = path.join(os.tmpdir(), 'vfm-native-terminate-' + process.pid + '.sock');
const server = net.createServer();
await new Promise((r) => server.listen(sock, r));
const accepted = new Promise((r) => server.once('connection', r));
const client = net.connect(sock);
client.on('error', () => undefined);
await new Promise((r) => client.once('connect', r));
const peer = await accepted;
peer.on('error', () => undefined);
peer.pause(); // never reads: the client's send buffer fills and the native write waits
const w = new Worker(\`
  const { workerData, parentPort } = require('node:worker_threads');
  const m = require(workerData.addon);
  const buf = new Uint8Array(8 << 20);
  parentPort.postMessage('writing');
  try { m.dataFdWrite(workerData.fd, buf, 0, buf.length, 5000); } catch { /* not reachable once terminated */ }
\`, { eval: true, execArgv: [], workerData: { addon: process.argv[1], fd: client._handle.fd } });
await new Promise((r) => w.once('message', r));
await new Promise((r) => setTimeout(r, 300)); // inside the native poll by now
const ended = w.terminate();
setTimeout(() => peer.destroy(), 100); // the write then fails, into a terminating environment
await ended;
await new Promise((r) => setTimeout(r, 300));
client.destroy();
server.close();
console.log('survived');
`;

test('a worker terminated inside a native call that then throws: the process survives (no std::terminate)', async () => {
  const addon = path.join(ROOT, 'build/Release/vfio_mig.node');
  const r = await new Promise<{ code: number | null; signal: string | null; out: string; err: string }>((resolve) => {
    const c = spawn(process.execPath, ['--input-type=module', '-e', SCRIPT, addon], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (d) => { out += d; });
    c.stderr.on('data', (d) => { err += d; });
    const limit = setTimeout(() => c.kill('SIGKILL'), 30_000);
    c.on('close', (code, signal) => { clearTimeout(limit); resolve({ code, signal, out, err }); });
  });
  assert.not.match(r.err, /terminate called/, r.err);
  assert.equal([r.code, r.signal, r.out.trim()], [0, null, 'survived'], r.err);
});

test.run();
