// Trace points (QEMU style: one at every state change). Off unless VFIO_MIG_TRACE is set (to '1' for all, or a
// comma-separated list of event-name prefixes); embedders can also subscribe in-process.
import { printable } from './text.js';

export type TraceFn = (event: string, fields: Record<string, unknown>) => void;

const sinks = new Set<TraceFn>();
let env = '';
let prefixes: string[] = [];

/** Which trace points go to stderr: '' none, '1' all, or comma-separated event-name prefixes (`--verbose` sets '1'). */
export function setTraceFilter(spec: string): void {
  env = spec;
  prefixes = env && env !== '1' ? env.split(',').map((s) => s.trim()).filter(Boolean) : [];
}
setTraceFilter(process.env.VFIO_MIG_TRACE ?? '');

export function onTrace(fn: TraceFn): () => void {
  sinks.add(fn);
  return () => sinks.delete(fn);
}

export function trace(event: string, fields: Record<string, unknown> = {}): void {
  if (env && (prefixes.length === 0 || prefixes.some((p) => event.startsWith(p)))) {
    // Values may be a stream's device names or a vendor's messages: escaped (../text.ts).
    const kv = Object.entries(fields).map(([k, v]) => `${k}=${printable(typeof v === 'bigint' ? '0x' + v.toString(16) : String(v))}`);
    process.stderr.write(`vfio-mig: ${event} ${kv.join(' ')}\n`);
  }
  for (const s of sinks) s(event, fields);
}
