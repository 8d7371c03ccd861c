// The device seam's public surface (types and registries). See seam.ts and docs/ARCHITECTURE.md.
export type {
  MigState, TargetState, ProtocolName, ReachKind, DirtyTrackingKind, DeviceCaps, SizeEstimate, StateChange, DataPathDesc,
  ReadStatus, ReadResult, DataPath, AbortProbe, DataPathFactory, DirtyLog, ConfigTargetDesc, MigDevice, ReachProvider, Awaitable,
} from './seam.js';
export { PROTOCOLS } from './seam.js';
export { registerReach, reachProvider, reachForSpec, registeredReaches, openDataPath } from './registry.js';
