#!/usr/bin/env node
// `npm run test:kernel`: the kernel VFIO reach proven against Linux's own mtty v2 driver in a software-emulated
// (TCG) Linux 6.12 guest (shared/kernel-guest.md recipe B). Installs what it needs from Debian, builds or reuses
// the kernel (cached under .cache/kernel/<version>), boots it with the host root shared read-only, runs
// dist/test/kernel/guest-main.js inside and prints each guest test and `N passed, N failed`.
// A boot that times out or panics is retried once (a loaded host can stall a TCG boot); a test that fails is not.
// Env: VFM_KERNEL_FILTER=<substring> runs only matching guest tests; VFM_KERNEL_TIMEOUT=<s> per boot (default 600);
// VFM_KERNEL_VERBOSE=1 prints the whole guest console.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const cache = path.join(root, '.cache/kernel');
const TIMEOUT_S = Number(process.env.VFM_KERNEL_TIMEOUT ?? 600);
const filter = process.env.VFM_KERNEL_FILTER ?? '';
const t0 = Date.now();
const secs = (ms) => `${(ms / 1000).toFixed(1)} s`;

function die(msg) {
  console.log(`test:kernel: ${msg}`);
  console.log('0 passed, 1 failed');
  process.exit(1);
}

function step(name, cmd, args) {
  const t = Date.now();
  const r = spawnSync(cmd, args, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' });
  if (r.status !== 0) die(`${name} failed (exit ${r.status ?? r.signal})`);
  console.log(`test:kernel: ${name}: ${secs(Date.now() - t)}`);
  return r.stdout.trim().split('\n').pop();
}

// The initramfs: busybox-static and our /init, nothing else (the rest comes from the host over 9p).
function buildInitrd() {
  const busybox = '/bin/busybox';
  const init = fs.readFileSync(path.join(here, 'init'));
  const key = crypto.createHash('sha256').update(init).update(fs.readFileSync(busybox)).digest('hex').slice(0, 12);
  const out = path.join(cache, `initrd-${key}.gz`);
  if (fs.existsSync(out)) return out;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfm-initrd-'));
  fs.mkdirSync(path.join(dir, 'bin'));
  fs.copyFileSync(busybox, path.join(dir, 'bin/busybox'));
  fs.chmodSync(path.join(dir, 'bin/busybox'), 0o755);
  fs.writeFileSync(path.join(dir, 'init'), init, { mode: 0o755 });
  fs.mkdirSync(cache, { recursive: true });
  const r = spawnSync('sh', ['-c', `cd "${dir}" && find . | cpio -o -H newc --quiet | gzip -1 > "${out}.tmp"`], { stdio: 'inherit' });
  fs.rmSync(dir, { recursive: true, force: true });
  if (r.status !== 0) die('building the initramfs failed');
  fs.renameSync(`${out}.tmp`, out);
  return out;
}

function boot(kernel, initrd, attempt) {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'vfm-guest-out-'));
  fs.chmodSync(out, 0o777);
  const append = ['console=ttyS0', 'panic=-1', 'quiet', 'no_timer_check', `vfm_script=${path.join(here, 'guest.sh')}`,
    `vfm_repo=${root}`, `vfm_node=${process.execPath}`, `vfm_filter=${filter || '-'}`].join(' ');
  const args = [`${TIMEOUT_S}`, 'qemu-system-x86_64', '-accel', 'tcg', '-cpu', 'max', '-m', '2048', '-smp', '1',
    '-nographic', '-nic', 'none', '-no-reboot', '-kernel', kernel, '-initrd', initrd,
    '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
    '-virtfs', `local,path=${out},mount_tag=out,security_model=none`, '-append', append];
  const t = Date.now();
  return new Promise((resolve) => {
    const q = spawn('timeout', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let console_ = '';
    const keep = (d) => { console_ += d; if (console_.length > 1 << 20) console_ = console_.slice(-(1 << 19)); };
    q.stdout.on('data', keep);
    q.stderr.on('data', keep);
    q.on('close', (code) => {
      const ms = Date.now() - t;
      const resPath = path.join(out, 'results.jsonl');
      const lines = fs.existsSync(resPath) ? fs.readFileSync(resPath, 'utf8').split('\n').filter(Boolean) : [];
      const recs = [];
      for (const l of lines) { try { recs.push(JSON.parse(l)); } catch { /* a torn last line after a crash */ } }
      fs.rmSync(out, { recursive: true, force: true });
      const done = recs.find((r) => r.done);
      let why = '';
      if (code === 124) why = `timed out after ${TIMEOUT_S} s`;
      else if (/Kernel panic/.test(console_)) why = 'guest kernel panic';
      else if (!done) why = `guest ended without a result (qemu exit ${code})`;
      resolve({ attempt, ms, code, recs, done, why, console: console_ });
    });
  });
}

if (os.platform() !== 'linux') die('needs Linux');
step('packages', 'bash', [path.join(here, 'ensure-packages.sh')]);
const kernel = step('kernel', 'bash', [path.join(here, 'build-kernel.sh')]);
const initrd = buildInitrd();
if (!fs.existsSync(path.join(root, 'dist/test/kernel/guest-main.js'))) die('dist/test/kernel/guest-main.js missing: run `npx tsc -p .`');

let res;
for (let attempt = 1; attempt <= 2; attempt++) {
  res = await boot(kernel, initrd, attempt);
  if (!res.why) break;
  console.log(`test:kernel: attempt ${attempt}: ${res.why} (${secs(res.ms)}); last console lines:`);
  console.log(res.console.split('\n').slice(-25).map((l) => `  | ${l}`).join('\n'));
}
console.log(`test:kernel: guest boot + tests: ${secs(res.ms)} (attempt ${res.attempt})`);
let passed = 0, failed = 0;
for (const r of res.recs.filter((x) => x.name)) {
  if (r.ok) passed++; else failed++;
  console.log(`  ${r.ok ? 'ok  ' : 'FAIL'} ${r.name} (${r.ms} ms)${r.ok ? '' : `\n       ${String(r.error).split('\n').join('\n       ')}`}`);
}
if (res.why) {
  failed++;
  console.log(`test:kernel: FAILED: ${res.why} on both attempts`);
} else if (passed + failed === 0) {
  failed++;
  console.log('test:kernel: FAILED: the guest ran no test');
}
if (process.env.VFM_KERNEL_VERBOSE) console.log(res.console);
else if (failed) console.log(res.console.split('\n').filter((l) => /VFM|Oops|BUG|panic|node:|Error/.test(l)).slice(-40).map((l) => `  | ${l}`).join('\n'));
console.log(`test:kernel: total ${secs(Date.now() - t0)}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
