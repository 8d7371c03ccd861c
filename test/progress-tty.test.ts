// Live progress as a person sees it: the CLI runs in a real pseudo-terminal (a tmux pane) and the screen is read
// while it works. Pacing with --bandwidth makes the run last a few seconds whatever the machine.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin/vfio-mig.js');
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-tty-'));

/** tmux on its own server socket (one per pane: a server that is shutting down is never reused). */
function tmux(sock: string, ...args: string[]): string {
  return execFileSync('tmux', ['-L', sock, '-f', '/dev/null', ...args], { encoding: 'utf8' });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Run `args` in a 160x40 pane; return every distinct screen (with escape sequences) until the command ended. */
async function watch(args: string[], env: Record<string, string> = {}): Promise<{ screens: string[]; exit: string }> {
  const id = Math.random().toString(36).slice(2);
  const sock = `vfio-mig-test-${process.pid}-${id}`;
  const done = path.join(TMP, `done-${id}`);
  const envs = Object.entries({ NO_COLOR: '', ...env }).map(([k, v]) => (v === '' ? `-u ${k}` : `${k}=${v}`)).join(' ');
  const cmd = `env ${envs} ${process.execPath} ${BIN} ${args.join(' ')}; echo $? > ${done}; sleep 30`;
  tmux(sock, 'new-session', '-d', '-s', 'p', '-x', '160', '-y', '40', cmd);
  const screens: string[] = [];
  const t0 = Date.now();
  try {
    while (!fs.existsSync(done) && Date.now() - t0 < 60_000) {
      const s = tmux(sock, 'capture-pane', '-p', '-e', '-t', 'p');
      if (screens[screens.length - 1] !== s) screens.push(s);
      await sleep(50);
    }
    screens.push(tmux(sock, 'capture-pane', '-p', '-e', '-t', 'p'));
    return { screens, exit: fs.readFileSync(done, 'utf8').trim() };
  } finally {
    tmux(sock, 'kill-server');
  }
}

// eslint-disable-next-line no-control-regex
const plain = (s: string) => s.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '');
const RUN = ['run', '--devices', '2', '--size', '48MiB', '--chunk', '1MiB', '--bandwidth', '40MiB', '--max-rounds', '2', '--dirty-rate', '0'];

test('a terminal run shows live per-device progress and a total line, updated while a round runs, in colour', async () => {
  const { screens, exit } = await watch(RUN);
  assert.is(exit, '0', plain(screens[screens.length - 1]));
  const live = screens.filter((s) => /emu0 +pre-copy/.test(plain(s)) && !/verified:/.test(plain(s)));
  assert.ok(live.length >= 3, `${live.length} distinct screens during pre-copy:\n${plain(screens[Math.floor(screens.length / 2)])}`);
  const line = (s: string, name: string) => plain(s).split('\n').find((l) => l.startsWith(name)) ?? '';
  const mid = live[Math.floor(live.length / 2)];
  for (const name of ['emu0', 'emu1', 'total']) {
    const l = line(mid, name);
    // name, phase, bar, percentage, bytes sent / total, rate, remaining estimate
    assert.match(l, /^\S+ +[a-z -]+ [#.]{20} +\d+% +[\d.]+ (B|KiB|MiB|GiB) \/ [\d.]+ (KiB|MiB|GiB) +[\d.]+ (B|KiB|MiB|GiB)\/s/, `${name} line: ${l}`);
  }
  assert.match(line(mid, "emu0"), /ETA [\d.]+ s/, `emu0 line: ${line(mid, "emu0")}\n${plain(mid)}`);
  // The numbers move inside the round: the sent bytes of emu0 take several values before the round ends.
  const sent = new Set(live.map((s) => /%\s+([\d.]+ \w+) \//.exec(line(s, 'emu0'))?.[1]));
  assert.ok(sent.size >= 3, `emu0 bytes sent took only ${[...sent].join(', ')}`);
  assert.match(mid, /\x1b\[36m/, 'the phase is coloured on a terminal');
  const end = plain(screens[screens.length - 1]);
  assert.match(end, /^verified: true$/m);
  assert.match(end, /emu0 +running/, 'final lines stay: the destination device runs');
});

test('NO_COLOR: the same progress without any colour', async () => {
  const { screens, exit } = await watch([...RUN.slice(0, 4), '16MiB', ...RUN.slice(5)], { NO_COLOR: '1' });
  assert.is(exit, '0');
  assert.ok(screens.some((s) => /emu0 +pre-copy/.test(plain(s))), 'progress drawn');
  for (const s of screens) assert.not.match(s, /\x1b\[3\dm/, 'no colour escape');
});

test('--quiet on a terminal: no progress, just the verdict', async () => {
  const { screens, exit } = await watch([...RUN.slice(0, 4), '8MiB', ...RUN.slice(5), '--quiet']);
  assert.is(exit, '0');
  for (const s of screens) assert.not.match(plain(s), /pre-copy|total/);
  assert.match(plain(screens[screens.length - 1]), /^verified: true$/m);
});

test.after(() => { fs.rmSync(TMP, { recursive: true, force: true }); });

test.run();
