// `stress --device vfio-user:<socket>` (src/main/stress/reached.ts) against `vfio-mig device-server` processes, both
// protocols: the CLI saves and loads the served devices again and again, every iteration verified by the servers'
// digests and by the fixed point; a served device whose state changes between iterations is caught and named.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runCli } from './helpers.js';
import { kill, killAll, serverProcess, type Child } from './vfu-procs.js';

const IDLE = ['--size', '1MiB', '--chunk', '64KiB', '--dirty-rate', '0', '--dma-rate', '0'];

/** SIGTERM a device-server process and return the statistics it prints as it stops. */
async function stop(s: Child): Promise<{ clients: number; requests: number }> {
  await new Promise<void>((resolve) => {
    const t = setTimeout(() => { kill(s.child); resolve(); }, 10_000);
    s.child.once('exit', () => { clearTimeout(t); resolve(); });
    kill(s.child, 'SIGTERM');
  });
  const line = s.out().split('\n').find((l) => l.includes('"stopped"'));
  assert.ok(line, `the server printed its statistics: ${s.out()}`);
  return JSON.parse(line!);
}

async function stress(args: string[]) {
  const r = await runCli(['stress', ...args, '--json'], 120_000);
  const doc = JSON.parse(r.stdout);
  return { code: r.code, stderr: r.stderr, res: doc.result, doc };
}

for (const profile of ['v2', 'linux-5.8'] as const) {
  test(`stress --device vfio-user: ${profile} devices served by separate processes, ping-pong with --dest, every iteration verified`, async () => {
    const modes = profile === 'v2' ? [[], []] : [['--data-mode', 'mmap'], ['--data-mode', 'trapped']];
    const a = await Promise.all([0, 1].map((i) => serverProcess(['--profile', profile, ...IDLE, ...modes[i]!, '--seed', String(31 + i)])));
    const b = await Promise.all([0, 1].map((i) => serverProcess(['--profile', profile, ...IDLE, ...modes[i]!, '--zero'])));
    try {
      const r = await stress(['--device', `vfio-user:${a[0]!.socket}`, '--device', `vfio-user:${a[1]!.socket}`,
        '--dest', `vfio-user:${b[0]!.socket}`, '--dest', `vfio-user:${b[1]!.socket}`, '--count', '6', '--seed', '7', '--allow-no-p2p']);
      assert.is(r.code, 0, r.stderr + JSON.stringify(r.res?.failed));
      assert.is(r.doc.ok, true);
      assert.is(r.res.iterations, 6);
      assert.is(r.res.failures, 0, JSON.stringify(r.res.failed));
      assert.ok(r.res.bytes >= 6 * 2 * (1 << 20), `${r.res.bytes} bytes moved`);
    } finally {
      // Every server was reached (one client: the CLI) and answered requests.
      for (const s of [...a, ...b]) {
        const st = await stop(s);
        assert.is(st.clients, 1, `${s.socket}: one client`);
        assert.ok(st.requests > 20, `${s.socket}: ${st.requests} requests`);
      }
    }
  });

  test(`stress --device vfio-user: a ${profile} device loaded back into itself (no --dest), verified each time`, async () => {
    const s = await serverProcess(['--profile', profile, ...IDLE, '--seed', '33']);
    try {
      const r = await stress(['--device', `vfio-user:${s.socket}`, '--count', '3', '--seed', '8']);
      assert.is(r.code, 0, r.stderr + JSON.stringify(r.res?.failed));
      assert.is(r.res.iterations, 3);
      assert.is(r.res.failures, 0, JSON.stringify(r.res.failed));
    } finally {
      kill(s.child, 'SIGTERM');
    }
  });

  test(`stress --device vfio-user: the fixed point catches a ${profile} served device whose state changes between iterations, named`, async () => {
    // A running workload in the server changes the device's state between iterations: each load verifies by digest,
    // but the saved device data differs from the first iteration's.
    const busy = await serverProcess(['--profile', profile, '--size', '1MiB', '--chunk', '64KiB', '--dirty-rate', '20000', '--dma-rate', '0', '--seed', '34']);
    const partner = await serverProcess(['--profile', profile, ...IDLE, '--zero']);
    try {
      const r = await stress(['--device', `vfio-user:${busy.socket}`, '--dest', `vfio-user:${partner.socket}`, '--count', '3', '--seed', '2']);
      assert.is(r.code, 1, r.stderr);
      assert.is(r.doc.ok, false);
      assert.ok(r.res.failures >= 1);
      const names = [busy.socket, partner.socket].map((p) => p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('|');
      assert.match(r.res.failed[0].error, new RegExp(`(${names}): its saved device state \\(sha256 [0-9a-f]{16}\\) differs from the first iteration's`));
      assert.type(r.res.failed[0].seed, 'number');
    } finally {
      kill(busy.child, 'SIGTERM'); kill(partner.child, 'SIGTERM');
    }
  });
}

test.after(() => killAll());
test.run();
