#!/usr/bin/env node
// Entry point: the compiled CLI (npm ci runs `tsc` in its prepare step).
import('../dist/src/main/cli/main.js').then((m) => m.main(process.argv)).catch((e) => {
  process.stderr.write(`vfio-mig: VFM_INTERNAL: ${e?.stack ?? e}\n`);
  process.exit(1);
});
