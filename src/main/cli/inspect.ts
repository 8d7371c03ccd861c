// vfio-mig inspect / extract.
import { extractDevice, inspectContainer } from '../container/inspect.js';
import { fmtBytes, table } from './args.js';

function out(s: string): void { process.stdout.write(s + '\n'); }

export async function cmdInspect(file: string, o: { packets?: boolean; json?: boolean }): Promise<void> {
  const r = await inspectContainer(file, !!o.packets);
  if (o.json) { out(JSON.stringify(r, null, 2)); return; }
  out(`${file}: ${fmtBytes(r.size)}, container version 1, ${r.table.devices.length} device(s)`);
  out(`records: ${Object.entries(r.records).map(([k, v]) => `${k} ${v}`).join(', ')}`);
  out(table(['#', 'device', 'profile', 'state size', 'chunk', 'data area', 'records', 'stream', 'sections', 'data pkts', 'empty', 'data', 'config', 'complete'],
    r.devices.map((d) => {
      const g = r.table.devices[d.index].geometry;
      return [d.index, d.name, d.profile, fmtBytes(g.stateSize), fmtBytes(g.maxChunk), `${g.dataMode}/${g.offsetPolicy}`, d.records,
        fmtBytes(d.streamBytes), d.sections, d.dataPackets, d.emptyDataPackets, fmtBytes(d.dataBytes), String(d.config), String(d.complete)];
    })));
  if (r.end) for (const e of r.end.devices) out(`end: ${e.name} final state ${e.finalState} ${e.digest}`);
  if (r.abort) out(`ABORTED: ${r.abort.code}: ${r.abort.message}`);
  if (o.packets) {
    for (const d of r.devices) {
      out(`-- ${d.name} QEMU packets (file offset, tag, size)`);
      for (const p of d.packets ?? []) out(`  ${String(p.offset).padStart(12)}  ${p.tag}${p.size !== undefined ? `  ${p.size}` : ''}`);
    }
  }
}

export async function cmdExtract(file: string, o: { device: number; output: string; json?: boolean }): Promise<void> {
  const n = await extractDevice(file, o.device, o.output);
  if (o.json) out(JSON.stringify({ ok: true, device: o.device, output: o.output, bytes: n }));
  else out(`device ${o.device}: ${n} bytes of QEMU stream written to ${o.output}`);
}
