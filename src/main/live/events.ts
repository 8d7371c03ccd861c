// Events and reports shared by both sides of a live migration. States follow QEMU's query-migrate names.
import { EventEmitter } from 'node:events';
import { trace } from '../trace.js';
import type { Cause, RefusedDevice } from './wire.js';

export type LiveState = 'setup' | 'active' | 'device' | 'completed' | 'failed' | 'cancelling' | 'cancelled';
export type Side = 'source' | 'destination';

export type LiveEvent =
  /** `cause` with failed, cancelling and cancelled: what both sides report. */
  | { type: 'state'; side: Side; state: LiveState; cause?: Cause }
  | { type: 'listening'; address: string }
  | { type: 'connected'; side: Side; channel: number; channels: number; peer: string; identity?: string; version: number }
  | { type: 'rejected'; address: string; code: string; message: string }
  | { type: 'accepted'; devices: { index: number; name: string }[] }
  | { type: 'refused'; devices: RefusedDevice[] }
  | { type: 'progress'; side: Side; devices: { index: number; name: string; bytes: number }[] }
  | { type: 'switchover-ack' }
  /** Destination: a PRE_COPY device's initial data, up to its DEV_INIT_DATA_SENT, is loaded. */
  | { type: 'init-data-loaded'; device: string; index: number }
  | { type: 'switchover'; side: Side }
  | { type: 'loaded'; destinationMs: number }
  | { type: 'device-error'; side: Side; cause: Cause }
  | { type: 'downtime'; side: Side; downtimeMs: number };

export type { Cause, RefusedDevice };

/** What both ends share: QEMU-style state with a trace point and an event at every change, and the event fan-out. */
export class LiveEndpoint extends EventEmitter<{ event: [LiveEvent] }> {
  state: LiveState = 'setup';
  constructor(protected readonly side: Side, private readonly onEvent?: (e: LiveEvent) => void) {
    super();
  }

  protected event(e: LiveEvent): void {
    this.onEvent?.(e);
    this.emit('event', e);
  }

  private announced = false;

  protected setState(s: LiveState, cause?: Cause): void {
    // The first call announces the initial state (setup) too.
    if (this.state === s && this.announced) return;
    this.announced = true;
    this.state = s;
    trace('live_state', { side: this.side, state: s });
    this.event(cause ? { type: 'state', side: this.side, state: s, cause } : { type: 'state', side: this.side, state: s });
  }
}
