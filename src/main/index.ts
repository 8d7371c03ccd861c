// Public, typed API of vfio-mig (the CLI is built on exactly this).
export { MigError, ErrorCode, isMigError } from './errors.js';
export { onTrace } from './trace.js';
export { EnginePool, type EnginePoolOptions } from './engine/pool.js';
export type { LatencySummary } from './engine/histogram.js';
export {
  Migration, PHASE_ARCS, type MigrationOptions, type StopCopyOrder, type SwitchoverGate, type MigrationReport, type MigrationPhase, type MigrationEvents, type MigrationProgress,
  type MigrationStatus, type DeviceStateEvent, type DirtyQueryEvent, type RoundStats,
} from './engine/migration.js';
// What a report or an event hands back: per-device statistics, vendor anomalies, typed rollback outcomes.
export { RollbackOutcome, type RollbackResult, type DeviceStats, type VendorAnomaly, type EngineDevice } from './engine/source-device.js';
export type { VendorMode } from '../workers/tasks.js';
// The device seam: a reach added from outside implements MigDevice (and, if its bytes travel neither through a region
// nor an fd, a DataPath module; a ConfigRestorer module for its config) and calls registerReach: no engine edit.
export type {
  MigDevice, MigState, TargetState, ProtocolName, ReachKind, DirtyTrackingKind, DeviceCaps, SizeEstimate, StateChange, DataPathDesc,
  ReadStatus, ReadResult, DataPath, AbortProbe, DataPathFactory, DirtyLog, ConfigTargetDesc, ReachProvider, Awaitable,
} from './device/seam.js';
export { registerReach, registeredReaches } from './device/registry.js';
export type { ConfigRestorer, ModuleConfigTarget } from './transport/config.js';
export type { DigestTarget, ModuleDigestTarget } from './transport/transport.js';
export {
  Loader, emulatedDestination, type LoadOptions, type LoadReport, type LoadedDevice, type LoadProgress, type LoadStatus, type LoaderEvents,
} from './engine/load.js';
export { ContainerWriter } from './container/writer.js';
export { ContainerReader } from './container/reader.js';
export { FileSink, type Sink } from './container/sink.js';
export { EmulatedDevice, emulatedDigest, type EmulatedDeviceOptions, type DataMode, type OffsetPolicy } from './emulated/device.js';
export { EmulatedTransport } from './transport/emulated.js';
export { VfioKernelTransport } from './transport/vfio-kernel.js';
export { KernelVfioDevice, kernelDevice, type KernelHandles, type KernelDeviceOptions, type OpenOptions as KernelOpenOptions } from './reach/kernel/index.js';
export {
  connectVfioUser, VfioUserClient, VfioUserTransport, DeviceServer, type VfioUserOptions, type DeviceServerOptions,
} from './reach/vfio-user/index.js';
export type { DeviceTransport } from './transport/transport.js';
export { MigrationRegion, type TrappedAccess } from './protocol/migration-region.js';
export type { ConfigHooks, ConfigHookDevice } from './engine/config-hook.js';
export type { DeviceTableEntry, DeviceGeometry } from './container/format.js';
export { PROFILE_DEFS, profileDef, type ProfileName } from './protocol/profiles.js';
export { STATE_TABLE, NEXT_STATE, statePath } from './protocol/states.js';
export { saveDevices, loadStream, runEmulated, pendingRollback, type PendingRollback, type SaveOptions, type RunOptions, type RunReport } from './api.js';
export { send, Sender, type SendOptions, type SendReport } from './live/sender.js';
export { receive, Receiver, type ReceiveOptions, type ReceiveReport } from './live/receiver.js';
export type { LiveEvent, LiveState, Cause, RefusedDevice } from './live/events.js';
export { parseUri, type MigUri } from './live/uri.js';
// Stress-testing vendor drivers: emulated devices with random geometry and timing faults, or the devices named (any
// reach) saved and loaded again and again, checked by digest and by the fixed point.
export { stress, type StressOptions, type StressSummary, type IterationSummary, type RunHooks } from './stress/stress.js';
export { stressReached, type ReachedStressOptions, type ReachedIteration } from './stress/reached.js';
