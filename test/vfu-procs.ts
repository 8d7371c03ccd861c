// Separate processes for the vfio-user tests: `vfio-mig device-server`, the hostile fake server and the stalling
// proxy (test/fixtures). Each resolves once its child prints "ready"; every child is killed by killAll().
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = path.join(ROOT, 'bin/vfio-mig.js');
const FIXTURES = path.join(ROOT, 'dist/test/fixtures');
// One directory for every suite that imports this module (uvu runs them in one process): removed at exit.
export const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'vfio-mig-vfu-'));
process.on('exit', () => fs.rmSync(TMP, { recursive: true, force: true }));
let seq = 0;
export const sockPath = (tag: string) => path.join(TMP, `${tag}-${seq++}.sock`);

const children = new Set<ChildProcess>();
export interface Child { child: ChildProcess; socket: string; out: () => string }

/** A `vfio-mig device-server` process; resolves once it is listening. */
export function serverProcess(args: string[], tag = 'srv'): Promise<Child> {
  const socket = sockPath(tag);
  return childReady(spawn(process.execPath, [BIN, 'device-server', '--socket', socket, '--json', ...args], { stdio: ['ignore', 'pipe', 'pipe'] }), socket);
}

/** test/fixtures/vfu-hostile-server: a v1 server that misbehaves as `mode` says. */
export function hostile(mode: string): Promise<Child> {
  const socket = sockPath(mode);
  return childReady(spawn(process.execPath, [path.join(FIXTURES, 'vfu-hostile-server.js'), socket, mode], { stdio: ['ignore', 'pipe', 'pipe'] }), socket);
}

/** test/fixtures/vfu-fd-server.py (Python: Node cannot send SCM_RIGHTS): a v1 server passing descriptors as `mode` says. */
export function fdServer(mode: string): Promise<Child> {
  const socket = sockPath(mode);
  return childReady(spawn('python3', [path.join(ROOT, 'test/fixtures/vfu-fd-server.py'), socket, mode], { stdio: ['ignore', 'pipe', 'pipe'] }), socket);
}

/** Descriptors of this process open on `target` (e.g. /dev/null). */
export function fdsOn(target: string): number {
  let n = 0;
  for (const f of fs.readdirSync('/proc/self/fd')) {
    try { if (fs.readlinkSync(`/proc/self/fd/${f}`) === target) n++; } catch { /* closed meanwhile */ }
  }
  return n;
}

/**
 * test/fixtures/vfu-stall-proxy: relays to `upstream`, holding the first `count` requests of `cmd` matching `arg`
 * (region offset, or DEVICE_FEATURE flags; -1 any) `delayMs` each.
 */
export function stallProxy(upstream: string, cmd: number, arg: number, delayMs: number, count = Infinity): Promise<Child> {
  const socket = sockPath('proxy');
  const args = [socket, upstream, String(cmd), String(arg), String(delayMs), ...(count === Infinity ? [] : [String(count)])];
  return childReady(spawn(process.execPath, [path.join(FIXTURES, 'vfu-stall-proxy.js'), ...args],
    { stdio: ['ignore', 'pipe', 'pipe'] }), socket);
}

export function childReady(child: ChildProcess, socket: string): Promise<Child> {
  children.add(child);
  child.on('exit', () => children.delete(child));
  let out = '';
  let err = '';
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`server did not start: ${out} ${err}`)), 20_000);
    child.stderr!.on('data', (d) => { err += d; });
    child.stdout!.on('data', (d) => {
      out += d;
      if (out.includes('ready')) { clearTimeout(t); resolve({ child, socket, out: () => out }); }
    });
    child.on('exit', (code) => { clearTimeout(t); reject(new Error(`server exited ${code}: ${err}`)); });
  });
}

export function kill(c: ChildProcess, sig: NodeJS.Signals = 'SIGKILL'): void { if (c.exitCode === null && c.signalCode === null) c.kill(sig); }

/** Kill every child still running (a suite's after hook). */
export function killAll(): void {
  for (const c of children) kill(c);
}

/** The largest gap between event-loop turns (a 5 ms interval) while `run` is in flight. */
export async function loopGap<T>(run: () => Promise<T>): Promise<{ value: T; gapMs: number }> {
  let last = performance.now();
  let gap = 0;
  const tick = setInterval(() => {
    const now = performance.now();
    gap = Math.max(gap, now - last);
    last = now;
  }, 5);
  try {
    const value = await run();
    gap = Math.max(gap, performance.now() - last);
    return { value, gapMs: gap };
  } finally {
    clearInterval(tick);
  }
}
