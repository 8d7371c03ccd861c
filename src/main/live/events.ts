// Events and reports shared by both sides of a live migration. States follow QEMU's query-migrate names.
import { EventEmitter } from 'node:events';
import { ErrorCode, MigError } from '../errors.js';
import type { EnginePool } from '../engine/pool.js';
import { trace } from '../trace.js';
import { loadTlsDir, type TlsConfig } from './conn.js';
import { parseUri, type MigUri } from './uri.js';
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

/** The options both ends take the same way (send()'s SendOptions and receive()'s ReceiveOptions extend them). */
export interface EndpointOptions {
  /** Mutual TLS 1.3 over tcp: a folder with the fixed file names of conn.ts TLS_FILES (the role's files). */
  tlsDir?: string;
  /** An engine pool to use (send() and receive() in one process may share one); default: a new one of `threads`. */
  pool?: EnginePool;
  threads?: number;
  /** The peer is declared gone after this long without a byte from it (default 10 s); also TCP_USER_TIMEOUT. */
  timeoutMs?: number;
  /** The source's PING period, and the TCP keepalive idle time and interval on both ends (default 1 s). */
  keepaliveMs?: number;
  onEvent?: (e: LiveEvent) => void;
}

/**
 * What both ends share: the URI, the peer timeout and keepalive, TLS material for their role (checked at once), QEMU-
 * style state with a trace point and an event at every change, and the event fan-out.
 */
export class LiveEndpoint extends EventEmitter<{ event: [LiveEvent] }> {
  state: LiveState = 'setup';
  protected readonly uri: MigUri;
  /** The peer is declared gone after this long without a byte (default 10 s). */
  protected readonly timeoutMs: number;
  protected readonly keepaliveMs: number;
  protected readonly tlsc: TlsConfig | undefined;
  private readonly onEvent?: (e: LiveEvent) => void;

  constructor(protected readonly side: Side, uri: string, flag: '--to' | '--listen', o: EndpointOptions) {
    super();
    this.onEvent = o.onEvent;
    this.uri = parseUri(uri, flag);
    this.timeoutMs = o.timeoutMs ?? 10_000;
    this.keepaliveMs = o.keepaliveMs ?? 1000;
    if (!(this.timeoutMs > 0)) throw new MigError(ErrorCode.BAD_ARGUMENT, `timeout ${this.timeoutMs} ms is invalid`);
    if (o.tlsDir && this.uri.kind !== 'tcp') throw new MigError(ErrorCode.BAD_ARGUMENT, `--tls-dir is for tcp: URIs only (${this.uri.text})`);
    this.tlsc = o.tlsDir ? loadTlsDir(o.tlsDir, side === 'source' ? 'client' : 'server') : undefined;
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
