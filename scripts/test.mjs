#!/usr/bin/env node
// Runs the uvu suites (compiled to dist/test) and ends with the plain line CI reads: "N passed, N failed".
// uvu prints Total/Passed/Skipped only and exits 0 when nothing ran; both are handled here.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

// uvu's package exports hide bin.js from require.resolve; it sits at a fixed place in node_modules.
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const uvu = path.join(root, 'node_modules/uvu/bin.js');
const pattern = process.argv[2] ?? '\\.test\\.js$';
const child = spawn(process.execPath, [uvu, 'dist/test', pattern, '--no-color'], { stdio: ['ignore', 'pipe', 'inherit'] });
let out = '';
// uvu has no timeouts: a hung test (say, a deadlock) must fail the run rather than stall CI.
const LIMIT_MIN = Number(process.env.VFIO_MIG_TEST_TIMEOUT_MIN ?? 20);
const watchdog = setTimeout(() => {
  console.log(`\ntest runner: no result after ${LIMIT_MIN} minutes, killing uvu`);
  child.kill('SIGKILL');
}, LIMIT_MIN * 60_000);
child.stdout.on('data', (d) => { out += d; process.stdout.write(d); });
child.on('close', (code) => {
  clearTimeout(watchdog);
  const num = (re) => Number((re.exec(out) ?? [])[1] ?? NaN);
  const total = num(/Total:\s+(\d+)/);
  const passed = num(/Passed:\s+(\d+)/);
  const skipped = num(/Skipped:\s+(\d+)/) || 0;
  if (!Number.isFinite(total) || !Number.isFinite(passed)) {
    console.log(`0 passed, 1 failed`);
    console.error('test runner: uvu printed no summary (crashed?)');
    process.exit(1);
  }
  const failed = total - passed - skipped + (code !== 0 && total === passed ? 1 : 0);
  console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
  process.exit(failed > 0 || passed === 0 || code !== 0 ? 1 : 0);
});
