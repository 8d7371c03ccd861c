// vfio-mig inspect / extract.
import { extractDevice, inspectContainer } from '../container/inspect.js';
import { ErrorCode, MigError } from '../errors.js';
import { printable as p } from '../text.js';
import { table } from './args.js';
import { fmtBytes } from '../report/units.js';
import { inspectJson } from '../report/json.js';
import { CommandOutput } from './output.js';
import { claimOutput, out } from './io.js';
import { noteCleanup } from './signals.js';

export async function cmdInspect(file: string, o: { packets?: boolean; json?: boolean }): Promise<void> {
  const cmd = new CommandOutput('inspect', { file, ...o }, o);
  const r = await inspectContainer(file, !!o.packets);
  if (o.json) { if (r.status === 'complete') cmd.done(inspectJson(r), ''); } // otherwise the error report below carries it
  else {
    out(`${p(file)}: ${fmtBytes(r.size)}, container version 1, ${r.table.devices.length} device(s)`);
    out(`records: ${Object.entries(r.records).map(([k, v]) => `${k} ${v}`).join(', ')}`);
    out(table(['#', 'device', 'profile', 'state size', 'chunk', 'data area', 'records', 'stream', 'sections', 'data pkts', 'empty', 'data', 'config', 'complete'],
      r.devices.map((d) => {
        const g = r.table.devices[d.index].geometry;
        return [d.index, d.name, d.profile, fmtBytes(g.stateSize), fmtBytes(g.maxChunk), `${g.dataMode}/${g.offsetPolicy}`, d.records,
          fmtBytes(d.streamBytes), d.sections, d.dataPackets, d.emptyDataPackets, fmtBytes(d.dataBytes), String(d.config), String(d.complete)];
      })));
    if (r.end) for (const e of r.end.devices) out(`end: ${p(e.name)} final state ${p(e.finalState)} ${p(e.digest)}`);
    if (o.packets) {
      for (const d of r.devices) {
        out(`-- ${p(d.name)} QEMU packets (file offset, tag, size)`);
        for (const k of d.packets ?? []) out(`  ${String(k.offset).padStart(12)}  ${k.tag}${k.size !== undefined ? `  ${k.size}` : ''}`);
      }
    }
    out(`status: ${statusText(r)}`);
  }
  // Only a complete stream can be loaded: anything else is reported and exits non-zero, with one error line.
  const fail = (code: MigError['code'], offset?: number) =>
    Object.assign(new MigError(code, `${file}: ${statusText(r)}`, { offset, device: r.abort?.device }), { report: r });
  if (r.status === 'aborted') throw fail(ErrorCode.STREAM_ABORTED);
  if (r.status === 'incomplete') throw fail(ErrorCode.STREAM_TRUNCATED, r.size);
  if (r.status === 'interrupted') throw fail(ErrorCode.STREAM_TRUNCATED, r.interruptedAt);
}

function statusText(r: Awaited<ReturnType<typeof inspectContainer>>): string {
  switch (r.status) {
    case 'complete': return 'complete (END record)';
    case 'aborted': return `aborted by the source: ${p(r.abort?.code)}: ${p(r.abort?.message)}`;
    case 'incomplete': return `incomplete: no END record (the records stop cleanly after ${r.size} bytes; the save did not finish)`;
    case 'interrupted': return `save interrupted at offset ${r.interruptedAt} (a torn record at the tail)`;
  }
}

export async function cmdExtract(file: string, o: { device: number; output: string; json?: boolean; force?: boolean; signal?: AbortSignal }): Promise<void> {
  const cmd = new CommandOutput('extract', { file, ...o }, o);
  const toStdout = claimOutput(o.output);
  if (o.output === '-' && process.stdout.isTTY) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, '-o -: standard output is a terminal; redirect it to a file or a pipe');
  }
  try {
    const n = await extractDevice(file, o.device, o.output, { force: o.force, signal: o.signal });
    const where = toStdout ? 'standard output' : o.output;
    cmd.done({ file, device: o.device, output: o.output, bytes: n }, `device ${o.device}: ${n} bytes of QEMU stream written to ${p(where)}`);
  } catch (e) {
    noteCleanup(o.output === '-' ? '; standard output may hold part of the stream' : `; nothing written to ${p(o.output)}`);
    throw e;
  }
}
