// `vfio-mig` command line. One clear error line with a stable code on failure (`vfio-mig: VFM_...: message`),
// non-zero exit (2: bad usage, 1: the operation failed), `--json` for machine-readable output.
import { Command, CommanderError, Option } from 'commander';
import { ErrorCode, MigError } from '../errors.js';
import { PROFILES } from '../protocol/profiles.js';
import { parseEnum, parseIntIn, parseNumberIn, parseSize } from './args.js';
import { cmdExtract, cmdInspect } from './inspect.js';
import { cmdLoad, cmdRun, cmdSave, type DeviceFlags, type LiveRunFlags } from './run.js';
import { cmdStress } from './stress.js';
import { printable } from '../text.js';
import { outJson } from './io.js';
import { drainBeforeExit, interruptedBy, pendingBeforeExit, withSignals } from './signals.js';
import { cmdDeviceServer, parseFault } from './device-server.js';
import { collectDevice } from './devices.js';
import { currentOutput, earlyFailureDocument } from './output.js';
import { partialReport } from './run.js';
import { humanSize } from '../report/units.js';
import { TOOL } from '../report/json.js';

/** A size option whose default shows in human units in --help. */
function sizeOption(flags: string, desc: string, dflt?: number): Option {
  const o = new Option(flags, desc).argParser((v) => parseSize(flags.split(' ')[0], v));
  return dflt === undefined ? o : o.default(dflt, humanSize(dflt));
}

/** What every command that migrates shows: progress on a terminal, NDJSON events, an HTML report, JSON. */
function outputOptions(c: Command): Command {
  return c.option('--json', 'print the result as one JSON document (docs/JSON.md); no progress')
    .option('-q, --quiet', 'no live progress and no summary: only the final verdict line (and errors)')
    .option('-v, --verbose', 'print trace points to stderr as they happen (like VFIO_MIG_TRACE=1) and add dirty-bitmap queries to --events')
    .option('--events <file|->', 'write NDJSON events as they happen (QEMU MIGRATION / MIGRATION_PASS / VFIO_MIGRATION style; send/receive add VFIO_MIG_LIVE_* live states; \'-\': stdout)')
    .option('--report <file.html>', 'write a self-contained HTML report with charts (opens offline)');
}
import { cmdReceive, cmdSend, type ReceiveFlags, type SendFlags } from './live.js';

const VENDOR_MODES = ['compatible', 'strict'] as const;
const VENDOR_MODE_HELP = 'compatible: QEMU behaviour, a chunk with data_size 0 while pending_bytes > 0 ends the round or the drain and is reported; '
  + 'strict: such chunks are retried and a vendor that never drains fails with VFM_VENDOR_STUCK';

const TRAPPED_ACCESS_HELP = 'how v1 trapped data (outside mmap\'d areas) is read and written: bulk, one pread/pwrite per piece; '
  + 'aligned, QEMU\'s naturally aligned 8/4/2/1-byte accesses, for drivers only ever driven by QEMU (docs/CONFIG.md)';
const trappedAccessOption = () => new Option('--trapped-access <mode>', TRAPPED_ACCESS_HELP)
  .argParser((v) => parseEnum('--trapped-access', v, ['bulk', 'aligned'] as const)).default('bulk', 'bulk');

const vendorStallOption = () => new Option('--vendor-stall <ms>', 'a v2 data fd that gives no data in STOP_COPY (or takes none while RESUMING) this long fails the device with VFM_VENDOR_STUCK')
  .argParser((v) => parseIntIn('--vendor-stall', v, 1, 86_400_000)).default(30_000);
const STOP_COPY_ORDER_HELP = 'parallel: every device\'s stop-and-copy data at once (QEMU 10 multifd device state); sequential: every device '
  + 'stops at once, then one device after another is drained whole (QEMU\'s legacy save order: one device\'s state in flight at a time)';

const MEMORY_BUDGET_HELP = 'refuse to start (exit 2) when what the command would commit (device state, guest RAM, dirty logs, '
  + 'staging, worker threads; for load: the destinations the stream\'s device table asks for) exceeds this (default: half of the available memory)';

function deviceOptions(c: Command): Command {
  return c
    .option('--memory-budget <bytes>', MEMORY_BUDGET_HELP, (v) => parseSize('--memory-budget', v))
    .option('--devices <n>', 'emulated devices to migrate', (v) => parseIntIn('--devices', v, 1, 1024), 4)
    .addOption(sizeOption('--size <bytes>', 'device state size per device (B, KiB, MiB, GiB)', 64 << 20))
    .addOption(new Option('--profile <name>', 'protocol: a v1 region layout (draft-2019, linux-5.8) or v2 (feature ioctls + data fd)')
      .choices([...PROFILES, 'v2']).default('linux-5.8'))
    .option('--allow-no-p2p', 'migrate several v2 devices even if one cannot be quiesced to P2P first (QEMU refuses)')
    .addOption(sizeOption('--chunk <bytes>', 'vendor maximum chunk size', 1 << 20))
    .option('--data-mode <mode>', 'data area: mmap, trapped or mixed', (v) => parseEnum('--data-mode', v, ['mmap', 'trapped', 'mixed'] as const), 'mmap')
    .option('--offset-policy <p>', 'data_offset policy: fixed or moving', (v) => parseEnum('--offset-policy', v, ['fixed', 'moving'] as const), 'fixed')
    .option('--dirty-rate <pages/s>', 'state pages the workload dirties per second while running', (v) => parseNumberIn('--dirty-rate', v, 0, 1e7), 2000)
    .option('--dma-rate <pages/s>', 'guest pages DMA-written per second while running', (v) => parseNumberIn('--dma-rate', v, 0, 1e7), 1000)
    .option('--seed <n>', 'seed of the devices initial content', (v) => parseIntIn('--seed', v, 0, 2 ** 32 - 1), 1)
    .option('--threads <n>', 'worker threads (default: cores)', (v) => parseIntIn('--threads', v, 1, 256))
    .option('--downtime <ms>', 'stop pre-copy when pending fits this downtime', (v) => parseNumberIn('--downtime', v, 0, 1e7), 300)
    .option('--max-rounds <n>', 'pre-copy rounds at most', (v) => parseIntIn('--max-rounds', v, 0, 100000), 30)
    .addOption(sizeOption('--bandwidth <bytes/s>', 'cap stream bandwidth, bytes per second (e.g. 200MiB)'))
    .addOption(new Option('--vendor-mode <mode>', VENDOR_MODE_HELP).argParser((v) => parseEnum('--vendor-mode', v, VENDOR_MODES)).default('compatible', 'compatible'))
    .addOption(trappedAccessOption())
    .addOption(vendorStallOption())
    .addOption(new Option('--stop-copy-order <order>', STOP_COPY_ORDER_HELP).argParser((v) => parseEnum('--stop-copy-order', v, ['parallel', 'sequential'] as const)).default('parallel', 'parallel'))
    .option('--round-time <ms>', 'bound of one pre-copy round per device, whatever pending_bytes says', (v) => parseIntIn('--round-time', v, 1, 3_600_000), 2000)
    .addOption(sizeOption('--round-bytes <bytes>', 'data bound of one pre-copy round per device', 2 ** 31))
    .option('--device <spec>', 'a device reached elsewhere: vfio-user:<socket path> or vfio:<sysfs path> (repeatable; replaces the emulated devices)', (v, p: string[]) => collectDevice(v, p))
    .option('--vfu-timeout <ms>', 'vfio-user per-request timeout', (v) => parseIntIn('--vfu-timeout', v, 1, 3600000), 5000)
    .addOption(sizeOption('--vfu-write-bound <bytes>', 'vfio-user data bytes per write request', 32768));
}

export async function main(argv: string[]): Promise<void> {
  // `vfio-mig inspect F --packets | head`: a closed pipe ends the output quietly.
  process.stdout.on('error', (e: NodeJS.ErrnoException) => { if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0); else throw e; });
  const program = new Command('vfio-mig')
    .description('Migrate VFIO device state (VFIO migration v1, QEMU stream format) for many devices at once')
    .version(TOOL.version, '-V, --version', 'print the version')
    .helpCommand('help [command]', 'show help for a command')
    .exitOverride()
    // Commander's own error lines are replaced by ours (one line with a code); its help text still goes out.
    .configureOutput({ writeErr: (str) => { if (!str.startsWith('error:')) process.stderr.write(str); } });
  program.showHelpAfterError(false);

  outputOptions(deviceOptions(program.command('run').description('migrate emulated devices live through a stream file into fresh destinations and verify')))
    .option('--stream <file>', 'keep the stream in this file (default: a temporary file, removed)')
    .option('--force', 'replace an existing --stream, --report or --events file')
    .option('--dest <spec>', 'destination for each --device, vfio-user:<socket path> or vfio:<sysfs path> (repeatable, same count)', (v, p: string[]) => collectDevice(v, p))
    .option('--live [tcp|unix]', 'a live migration between two processes instead: a `vfio-mig receive` child on loopback TCP (default) or a UNIX socket, sent to from this one', (v) => parseEnum('--live', v, ['tcp', 'unix'] as const))
    .option('--channels <n>', 'with --live: parallel connections (each device uses one)', (v) => parseIntIn('--channels', v, 1, 64))
    .option('--tls', 'with --live tcp: mutual TLS 1.3 with a throw-away PKI made with openssl in a temporary folder (removed after)')
    .option('--tls-dir <dir>', 'with --live tcp: mutual TLS 1.3 with this folder for both ends (ca-cert.pem, server-cert.pem, server-key.pem, allow, client-cert.pem, client-key.pem)')
    .action((o: DeviceFlags & { stream?: string; force?: boolean; live?: 'tcp' | 'unix' | true } & LiveRunFlags) => withSignals((signal) => cmdRun({ ...o, signal })));
  outputOptions(deviceOptions(program.command('save').description('save emulated source devices into a stream file')))
    .requiredOption('--stream <file>', 'stream file to write (\'-\': standard output, then the report goes to stderr)')
    .option('--force', 'replace an existing stream, --report or --events file (never an input)')
    .action((o: DeviceFlags & { stream: string; force?: boolean }) => withSignals((signal) => cmdSave({ ...o, signal })));
  outputOptions(deviceOptions(program.command('send').description('migrate emulated source devices live to a `vfio-mig receive` destination'))
    .requiredOption('--to <uri>', 'destination: tcp:HOST:PORT, unix:PATH, fd:N (a connected socket) or file:PATH')
    .option('--channels <n>', 'parallel connections (each device uses one)', (v) => parseIntIn('--channels', v, 1, 64), 1)
    .option('--tls-dir <dir>', 'mutual TLS 1.3 over tcp: ca-cert.pem, client-cert.pem, client-key.pem')
    .option('--timeout <ms>', 'the destination is declared gone after this long without a frame from it', (v) => parseIntIn('--timeout', v, 100, 3_600_000), 10_000)
    .option('--keepalive <ms>', 'PING period and TCP keepalive idle/interval (whole seconds); TCP_USER_TIMEOUT is --timeout', (v) => parseIntIn('--keepalive', v, 100, 3_600_000), 1000)
    .option('--switchover-ack-timeout <ms>', 'give up (and resume every source device) when the destination has not acknowledged the switchover this long after pre-copy converged with every v2 device\'s initial data sent (default: --timeout)', (v) => parseIntIn('--switchover-ack-timeout', v, 100, 3_600_000))
    .option('--avail-switchover-bandwidth <bytes/s>', 'bandwidth for the downtime estimate only', (v) => parseSize('--avail-switchover-bandwidth', v)))
    .option('--force', 'replace an existing --report or --events file')
    .action((o: SendFlags) => withSignals((signal) => cmdSend({ ...o, signal })));
  outputOptions(program.command('receive').description('receive one live migration: create destinations from the source\'s device table (or --device), load while it runs, verify')
    .requiredOption('--listen <uri>', 'tcp:HOST:PORT (port 0: any; the address is printed), unix:PATH, fd:N (a connected socket) or file:PATH')
    .option('--device <spec>', 'a destination device name=N,profile=P,size=S,chunk=C (repeat; matched by name, else order)', (v: string, acc: string[] = []) => [...acc, v])
    .option('--tls-dir <dir>', 'mutual TLS 1.3 over tcp: ca-cert.pem, server-cert.pem, server-key.pem and the client allow list `allow`')
    .option('--save <file>', 'also write the received stream as a container file (inspect, extract, load)')
    .option('--timeout <ms>', 'the source is declared gone after this long without a byte from it', (v) => parseIntIn('--timeout', v, 100, 3_600_000), 10_000)
    .option('--keepalive <ms>', 'TCP keepalive idle/interval (whole seconds); TCP_USER_TIMEOUT is --timeout', (v) => parseIntIn('--keepalive', v, 100, 3_600_000), 1000)
    .option('--threads <n>', 'worker threads', (v) => parseIntIn('--threads', v, 1, 256))
    .option('--no-verify', 'do not compare digests'))
    .option('--force', 'replace an existing --report or --events file')
    .action((o: ReceiveFlags) => withSignals((signal) => cmdReceive({ ...o, signal })));
  outputOptions(program.command('load').description('create destinations from a stream\'s device table, load them and verify digests')
    .argument('<file>', 'stream file')
    .option('--threads <n>', 'worker threads', (v) => parseIntIn('--threads', v, 1, 256))
    .option('--memory-budget <bytes>', MEMORY_BUDGET_HELP, (v) => parseSize('--memory-budget', v))
    .addOption(trappedAccessOption())
    .addOption(vendorStallOption())
    .option('--force', 'replace an existing --report or --events file (never the input)'))
    .option('--device <spec>', 'destination for each device of the stream, in table order: vfio-user:<socket path> or vfio:<sysfs path> (repeatable)', (v, p: string[]) => collectDevice(v, p))
    .option('--vfu-timeout <ms>', 'vfio-user per-request timeout', (v) => parseIntIn('--vfu-timeout', v, 1, 3600000), 5000)
    .addOption(sizeOption('--vfu-write-bound <bytes>', 'vfio-user data bytes per write request', 32768))
    .action((file: string, o: { threads?: number; json?: boolean; device?: string[]; memoryBudget?: number; trappedAccess?: 'bulk' | 'aligned'; vendorStall?: number }) => withSignals((signal) => cmdLoad(file, { ...o, signal })));
  program.command('inspect').description('show the container and each device\'s QEMU packets')
    .argument('<file>', 'stream file')
    .option('--packets', 'list every QEMU packet')
    .option('--json', 'print the result as one JSON document (docs/JSON.md)')
    .action((file: string, o: { packets?: boolean; json?: boolean }) => cmdInspect(file, o));
  program.command('extract').description('write one device\'s raw QEMU byte stream')
    .argument('<file>', 'stream file')
    .requiredOption('--device <n>', 'device index', (v) => parseIntIn('--device', v, 0, 4095))
    .requiredOption('-o, --output <file>', 'output file (\'-\': standard output, then the report goes to stderr)')
    .option('--force', 'replace an existing output file (never the input)')
    .option('--json', 'print the result as one JSON document (docs/JSON.md)')
    .action((file: string, o: { device: number; output: string; json?: boolean; force?: boolean }) => withSignals((signal) => cmdExtract(file, { ...o, signal })));
  outputOptions(program.command('stress').description('many concurrent migrations with random geometry, slow-vendor timing faults and concurrent bitmap queries; verify all')
    .option('--seconds <s>', 'how long to run', (v) => parseNumberIn('--seconds', v, 1, 86400), 30)
    .option('--seed <n>', 'master seed (a failure prints the seed that reproduces it)', (v) => parseIntIn('--seed', v, 0, 2 ** 32 - 1))
    .option('--count <n>', 'stop after this many iterations', (v) => parseIntIn('--count', v, 1, 1e9))
    .option('--replay <seed>', 'run exactly the one iteration a failure reported', (v) => parseIntIn('--replay', v, 0, 2 ** 32 - 1))
    .option('--threads <n>', 'worker threads', (v) => parseIntIn('--threads', v, 1, 256))
    // Its default is the API's (stress: strict), said once in the help.
    .option('--vendor-mode <mode>', VENDOR_MODE_HELP + ' (default for stress: strict)', (v) => parseEnum('--vendor-mode', v, VENDOR_MODES))
    .option('--memory-budget <bytes>', MEMORY_BUDGET_HELP, (v) => parseSize('--memory-budget', v))
    .option('--device <spec>', 'stress these devices instead of emulated ones: vfio:<sysfs path> or vfio-user:<socket path> (repeatable); '
      + 'each iteration saves and loads them through their real data channel, verified by digest where the device has one '
      + 'and always by a fixed point (a device\'s saved data bytes equal the first iteration\'s; the devices must be idle)',
    (v, p: string[]) => collectDevice(v, p))
    .option('--dest <spec>', 'a partner for each --device (same count): each iteration migrates one way or the other (default: each device is loaded back into itself)', (v, p: string[]) => collectDevice(v, p))
    .option('--allow-no-p2p', 'with --device: also migrate several v2 devices in one migration when one lacks P2P')
    .option('--vfu-timeout <ms>', 'vfio-user per-request timeout', (v) => parseIntIn('--vfu-timeout', v, 1, 3600000), 5000)
    .addOption(sizeOption('--vfu-write-bound <bytes>', 'vfio-user data bytes per write request', 32768))
    .option('--force', 'replace an existing --report or --events file'))
    .action((o) => withSignals((signal) => cmdStress({ ...o, signal })));
  program.addHelpText('after', `
Files: an output (save --stream, run --stream, extract -o) is written under a temporary name in its folder and
renamed when complete: a failed or interrupted command leaves nothing at that name. An existing file is replaced
only with --force, an input never; a second command writing the same path while the first runs is refused.
Signals: SIGINT (Ctrl-C) and SIGTERM cancel the operation: every source device goes back to RUNNING, the partial
output is removed, one line is printed at once (a device inside a stalled vendor call is rolled back when the call
returns; the command exits after that and says how it ended); an interrupted load resets and stops every destination.
A second signal exits at once.
Budgets: run, save, load and stress first add up what they would commit (device state, emulated guest RAM, dirty
logs, staging, worker threads; load: the destinations its stream's device table asks for) and refuse above
--memory-budget (default: half of the available memory): VFM_OVER_BUDGET, exit 2 (load: VFM_STREAM_TOO_LARGE).
Exit codes: 0 ok; 1 the operation failed (or inspect found an incomplete, interrupted or aborted stream); 2 bad
usage (a flag, an output that exists without --force, or a request over the memory budget); 130 SIGINT; 143 SIGTERM.
Units: sizes take B, KiB, MiB, GiB (also K, M, G); times are in ms unless the flag says seconds.
Tracing: VFIO_MIG_TRACE=1 (or a comma-separated list of trace-point prefixes such as migration_,vfio_) prints
trace points to stderr; --verbose does the same for one command. Output: docs/JSON.md (--json, --events).`);

  program.command('device-server').description('serve one emulated device over vfio-user on a UNIX socket until SIGINT/SIGTERM')
    .requiredOption('--socket <path>', 'UNIX socket to listen on (must not exist)')
    .addOption(new Option('--profile <name>', 'migration protocol served: v1 region (linux-5.8) or v2 (DEVICE_FEATURE, MIG_DATA_READ/WRITE)').choices(['linux-5.8', 'v2']).default('linux-5.8'))
    .addOption(sizeOption('--size <bytes>', 'device state size', 64 << 20))
    .addOption(sizeOption('--chunk <bytes>', 'vendor maximum chunk size', 1 << 20))
    .option('--data-mode <mode>', 'data area: mmap (sparse area passed by SCM_RIGHTS), trapped or mixed', (v) => parseEnum('--data-mode', v, ['mmap', 'trapped', 'mixed'] as const), 'mmap')
    .option('--offset-policy <p>', 'data_offset policy: fixed or moving', (v) => parseEnum('--offset-policy', v, ['fixed', 'moving'] as const), 'fixed')
    .option('--dirty-rate <pages/s>', 'state pages the workload dirties per second while running', (v) => parseNumberIn('--dirty-rate', v, 0, 1e7), 2000)
    .option('--dma-rate <pages/s>', 'guest pages DMA-written per second while running', (v) => parseNumberIn('--dma-rate', v, 0, 1e7), 1000)
    .option('--guest-pages <n>', 'guest memory pages the device DMA-writes (DIRTY_PAGES range: IOVA 0 up)', (v) => parseIntIn('--guest-pages', v, 1, 1 << 24), 4096)
    .option('--seed <n>', 'seed of the initial content', (v) => parseIntIn('--seed', v, 0, 2 ** 32 - 1), 1)
    .option('--zero', 'start zero-filled and idle (a destination)')
    .option('--fault <kind[:arg]>', 'inject a vendor fault (repeatable; docs/EMULATED-DEVICE.md)', (v, p: string[]) => parseFault(v, p), [])
    .addOption(sizeOption('--max-xfer <bytes>', 'max_data_xfer_size offered in VERSION', 1 << 20))
    .option('--json', 'JSON lines (ready, stopped)')
    .action((o) => cmdDeviceServer(o));

  const json = argv.includes('--json');
  const command = argv.slice(2).find((a) => !a.startsWith('-')) ?? 'unknown';
  try {
    await runCommand(program, argv, json, command);
  } finally {
    // A rollback that waited for a stalled vendor call: the command's line is out already (text), the process exits
    // once every device is back, saying how each such rollback ended.
    for (const line of await drainBeforeExit()) process.stderr.write(`vfio-mig: ${printable(line)}\n`);
  }
}

async function runCommand(program: Command, argv: string[], json: boolean, command: string): Promise<void> {
  // --json: one document, written when the outcome is final (after a deferred rollback); text: the line at once.
  // The report the engine attached is updated in place when the rollback is done.
  const settle = async () => {
    if (!json || !pendingBeforeExit()) return;
    for (const line of await drainBeforeExit()) process.stderr.write(`vfio-mig: ${printable(line)}\n`);
  };
  try {
    await program.parseAsync(argv);
    const sig = interruptedBy();
    if (sig) fail(new MigError(ErrorCode.CANCELLED, `interrupted by ${sig.name}`), json, sig.exitCode, command);
  } catch (e) {
    const sig = interruptedBy();
    if (sig) {
      const err = toCliError(e, ErrorCode.CANCELLED);
      // One line: what stopped it, and what was left behind.
      const msg = err.code === ErrorCode.CANCELLED ? `interrupted by ${sig.name}${sig.cleanup}` : `interrupted by ${sig.name}: ${err.message}`;
      await settle();
      fail(Object.assign(new MigError(ErrorCode.CANCELLED, msg), { report: (err as { report?: unknown }).report }), json, sig.exitCode, command);
      return;
    }
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return;
      // `vfio-mig help`: help on stdout, exit 0; no command at all: help on stderr, exit 2.
      if (e.code === 'commander.help') { process.exitCode = e.exitCode === 0 ? 0 : 2; return; }
      const cause = (e as { cause?: unknown }).cause;
      const err = cause instanceof MigError ? cause : new MigError(ErrorCode.BAD_ARGUMENT, e.message.replace(/^error: /, ''));
      fail(err, json, 2, command);
      return;
    }
    const err = toCliError(e, ErrorCode.INTERNAL);
    await settle();
    fail(err, json, err.code === ErrorCode.BAD_ARGUMENT || err.code === ErrorCode.OUTPUT_EXISTS || err.code === ErrorCode.OVER_BUDGET ? 2 : 1, command);
  }
}

function toCliError(e: unknown, fallback: MigError['code']): MigError {
  return e instanceof MigError ? e : new MigError(fallback, (e as Error)?.message ?? String(e), { cause: e });
}

const KNOWN = ['run', 'save', 'load', 'inspect', 'extract', 'stress', 'send', 'receive'];

function fail(err: MigError, json: boolean, code: number, command: string): void {
  // The running command's output ends it (JSON document, events, report); a bad flag fails before any command ran.
  const cur = currentOutput();
  if (cur) {
    const part = partialReport(cur.command, cur.params, (err as { report?: unknown }).report);
    cur.failed(err, part.result, part.text);
  } else if (json) outJson(earlyFailureDocument(KNOWN.includes(command) ? command : 'unknown', err));
  process.stderr.write(`vfio-mig: ${printable(err.code)}: ${printable(err.message)}\n`);
  process.exitCode = code;
}
