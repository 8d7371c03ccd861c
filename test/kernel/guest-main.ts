// Entry point inside the test guest (scripts/kernel/guest.sh): node dist/test/kernel/guest-main.js <outDir> [filter]
import { runAll } from './harness.js';
import './reach.guest.js';
import './engine.guest.js';
import './cli.guest.js';

const [outDir, filter = ''] = process.argv.slice(2);
if (!outDir) {
  console.error('usage: guest-main.js <results dir> [name filter]');
  process.exit(2);
}
await runAll(outDir, filter);
