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

const imported = new Map<string, unknown>();

/**
 * Worker side: the default export (a function) of a reach's module (data path, config restore, digest), imported
 * once per thread; `what` names the module's role in errors, `missing` what it lacks.
 */
export async function importDefault<T>(url: string, what: string, missing: string, device?: string): Promise<T> {
  let f = imported.get(url);
  if (!f) {
    let m: { default?: unknown };
    try {
      m = await import(url) as { default?: unknown };
    } catch (e) {
      throw new MigError(ErrorCode.WORKER_FAILED, `cannot load ${what} ${url}: ${(e as Error).message}`, { device, cause: e });
    }
    if (typeof m.default !== 'function') throw new MigError(ErrorCode.WORKER_FAILED, `${what} ${url} has no ${missing}`, { device });
    f = m.default;
    imported.set(url, f);
  }
  return f as T;
}

/** Worker side: the DataPath for `desc`, importing its module once per thread. */
export async function openDataPath(desc: DataPathDesc): Promise<DataPath> {
  return (await importDefault<DataPathFactory>(desc.module, 'data path module', 'default factory', desc.device))(desc);
}
