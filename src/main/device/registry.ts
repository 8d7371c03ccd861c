// Registries that keep the engine and the worker free of per-reach switches:
//  - reaches register a ReachProvider under their kind (load makes destinations from a device table through it);
//  - workers open a DataPath by importing the module a DataPathDesc names (cached per module URL).
import { ErrorCode, MigError } from '../errors.js';
import type { DataPath, DataPathDesc, DataPathFactory, ReachProvider } from './seam.js';

const reaches = new Map<string, ReachProvider>();

/** Called by each reach folder's index when imported. A second registration of a kind replaces the first. */
export function registerReach(p: ReachProvider): void {
  reaches.set(p.kind, p);
}

export function reachProvider(kind: string, device?: string): ReachProvider {
  const p = reaches.get(kind);
  if (!p) {
    throw new MigError(ErrorCode.BAD_ARGUMENT, `no reach '${kind}' is registered (known: ${[...reaches.keys()].join(', ') || 'none'})`,
      { device });
  }
  return p;
}

export function registeredReaches(): string[] { return [...reaches.keys()]; }

/**
 * The reach a device spec names (`<scheme>:<target>`, e.g. `vfio:/sys/bus/mdev/devices/<uuid>`), and its target;
 * null when no registered reach has that scheme.
 */
export function reachForSpec(spec: string): { provider: ReachProvider; target: string } | null {
  const i = spec.indexOf(':');
  if (i <= 0) return null;
  const scheme = spec.slice(0, i);
  const provider = [...reaches.values()].find((p) => p.scheme === scheme);
  return provider ? { provider, target: spec.slice(i + 1) } : null;
}

const factories = new Map<string, DataPathFactory>();

/** Worker side: the DataPath for `desc`, importing its module once per thread. */
export async function openDataPath(desc: DataPathDesc): Promise<DataPath> {
  let f = factories.get(desc.module);
  if (!f) {
    let m: { default?: unknown };
    try {
      m = await import(desc.module) as { default?: unknown };
    } catch (e) {
      throw new MigError(ErrorCode.WORKER_FAILED, `cannot load data path module ${desc.module}: ${(e as Error).message}`, { device: desc.device, cause: e });
    }
    if (typeof m.default !== 'function') {
      throw new MigError(ErrorCode.WORKER_FAILED, `data path module ${desc.module} has no default factory`, { device: desc.device });
    }
    f = m.default as DataPathFactory;
    factories.set(desc.module, f);
  }
  return f(desc);
}
