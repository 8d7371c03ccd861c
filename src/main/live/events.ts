// Events and reports shared by both sides of a live migration. States follow QEMU's query-migrate names.
import type { Cause, RefusedDevice } from './wire.js';

export type LiveState = 'setup' | 'active' | 'device' | 'completed' | 'failed' | 'cancelling' | 'cancelled';
export type Side = 'source' | 'destination';

export type LiveEvent =
  | { type: 'state'; side: Side; state: LiveState }
  | { type: 'listening'; address: string }
  | { type: 'connected'; side: Side; channel: number; channels: number; peer: string; identity?: string; version: number }
  | { type: 'rejected'; address: string; code: string; message: string }
  | { type: 'accepted'; devices: { index: number; name: string }[] }
  | { type: 'refused'; devices: RefusedDevice[] }
  | { type: 'progress'; side: Side; devices: { index: number; name: string; bytes: number }[] }
  | { type: 'switchover-ack' }
  | { type: 'switchover'; side: Side }
  | { type: 'loaded'; destinationMs: number }
  | { type: 'device-error'; side: Side; cause: Cause }
  | { type: 'downtime'; side: Side; downtimeMs: number };

export type { Cause, RefusedDevice };
