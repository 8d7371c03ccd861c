// One error class with stable codes (better-sqlite3 style). Every error that reaches a user names the device and,
// where there is one, the byte offset (stream) or register offset (region) that was wrong.

export const ErrorCode = {
  BAD_ARGUMENT: 'VFM_BAD_ARGUMENT',            // a CLI flag or API option is invalid
  NATIVE: 'VFM_NATIVE',                        // a region access failed (errno in .errno)
  BAD_STATE: 'VFM_BAD_STATE',                  // a device_state value or transition is not allowed
  DEVICE_ERROR_STATE: 'VFM_DEVICE_ERROR_STATE',// the device entered the ERROR state (110); it was reset
  TRANSITION_FAILED: 'VFM_TRANSITION_FAILED',  // the vendor refused a state write
  VENDOR_BAD_VALUE: 'VFM_VENDOR_BAD_VALUE',    // a vendor register holds an impossible value
  VENDOR_STUCK: 'VFM_VENDOR_STUCK',            // pending_bytes never drains
  NO_MIGRATION_REGION: 'VFM_NO_MIGRATION_REGION',
  BAD_REGION_INFO: 'VFM_BAD_REGION_INFO',
  STREAM_TRUNCATED: 'VFM_STREAM_TRUNCATED',
  STREAM_BAD_MAGIC: 'VFM_STREAM_BAD_MAGIC',
  STREAM_BAD_VERSION: 'VFM_STREAM_BAD_VERSION',
  STREAM_BAD_RECORD: 'VFM_STREAM_BAD_RECORD',
  STREAM_CHECKSUM: 'VFM_STREAM_CHECKSUM',
  STREAM_TOO_LARGE: 'VFM_STREAM_TOO_LARGE',
  STREAM_UNKNOWN_TAG: 'VFM_STREAM_UNKNOWN_TAG',
  STREAM_BAD_END: 'VFM_STREAM_BAD_END',
  STREAM_ABORTED: 'VFM_STREAM_ABORTED',
  LOAD_REJECTED: 'VFM_LOAD_REJECTED',          // the destination vendor rejected the data
  VERIFY_FAILED: 'VFM_VERIFY_FAILED',          // digests differ
  CANCELLED: 'VFM_CANCELLED',
  WORKER_FAILED: 'VFM_WORKER_FAILED',
  IO: 'VFM_IO',
  OVER_BUDGET: 'VFM_OVER_BUDGET',              // what the options ask for would commit more memory than the budget allows
  OUTPUT_EXISTS: 'VFM_OUTPUT_EXISTS',          // the output file exists and --force (API: force) was not given
  OUTPUT_BUSY: 'VFM_OUTPUT_BUSY',              // another save is writing the same output path
  INTERNAL: 'VFM_INTERNAL',                    // a bug: an exception that is not a MigError reached the boundary
  PEER_GONE: 'VFM_PEER_GONE',                  // a peer (vfio-user server, live-migration peer) closed the connection or died
  PEER_TIMEOUT: 'VFM_PEER_TIMEOUT',            // a peer did not answer within its timeout (vfio-user request, live migration)
  PEER_PROTOCOL: 'VFM_PEER_PROTOCOL',          // a peer broke the protocol (vfio-user: wrong msg_id/cmd, bad sizes, stray fds; live: bad HELLO/frame, no common version)
  PEER_ERROR: 'VFM_PEER_ERROR',                // a vfio-user server answered a request with an error reply
  PEER_NO_MIGRATION: 'VFM_PEER_NO_MIGRATION',  // a vfio-user server offers no migration
  DEVICE_BUSY: 'VFM_DEVICE_BUSY',              // the device belongs to another active migration or load
  ROLLBACK_FAILED: 'VFM_ROLLBACK_FAILED',      // a source device is not RUNNING after rollback (reset and retry failed): report.rollback[i].error
  PEER_REFUSED: 'VFM_PEER_REFUSED',            // the live destination refused the migration (reasons per device)
  PEER_NOT_ALLOWED: 'VFM_PEER_NOT_ALLOWED',    // the peer's TLS identity is not on the allow list
  TLS: 'VFM_TLS',                              // TLS setup or handshake failed (bad files, wrong CA, ...)
  CONFIG_HOOK: 'VFM_CONFIG_HOOK',              // an embedder's config save/restore hook threw or returned bytes a CONFIG section cannot carry
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

export interface MigErrorDetails {
  device?: string;          // device name
  offset?: number;          // byte offset in the stream file, or register offset in the region
  register?: string;        // register name when a vendor value is wrong
  value?: bigint | number;  // the offending value
  errno?: number;
  cause?: unknown;
}

export class MigError extends Error {
  readonly code: ErrorCode;
  readonly device?: string;
  readonly offset?: number;
  readonly register?: string;
  readonly value?: bigint | number;
  readonly errno?: number;

  constructor(code: ErrorCode, message: string, details: MigErrorDetails = {}) {
    super(formatMessage(message, details), details.cause !== undefined ? { cause: details.cause } : undefined);
    this.name = 'MigError';
    this.code = code;
    this.device = details.device;
    this.offset = details.offset;
    this.register = details.register;
    this.value = details.value;
    this.errno = details.errno;
  }

  /** Plain object for --json output and for crossing a worker boundary. */
  toJSON(): Record<string, unknown> {
    return {
      code: this.code, message: this.message, device: this.device, offset: this.offset, register: this.register,
      value: typeof this.value === 'bigint' ? '0x' + this.value.toString(16) : this.value, errno: this.errno,
    };
  }

  /** Rebuild an error serialised by a worker (structured clone drops the class). */
  static fromJSON(o: Record<string, unknown>): MigError {
    const e = new MigError((o.code as ErrorCode) ?? ErrorCode.WORKER_FAILED, String(o.rawMessage ?? o.message ?? ''), {});
    Object.assign(e, { message: String(o.message ?? ''), device: o.device, offset: o.offset, register: o.register, errno: o.errno });
    return e;
  }
}

function formatMessage(message: string, d: MigErrorDetails): string {
  const where: string[] = [];
  if (d.device !== undefined) where.push(d.device);
  if (d.register !== undefined) where.push(d.register);
  if (d.offset !== undefined) where.push(`offset ${d.offset}`);
  return where.length ? `${where.join(': ')}: ${message}` : message;
}

/** Wrap a native (addon) exception as a MigError that names the device. */
export function nativeError(device: string, what: string, e: unknown): MigError {
  if (e instanceof MigError) return e;
  const ne = e as { code?: string; errno?: number; message?: string };
  return new MigError(ErrorCode.NATIVE, `${what}: ${ne?.message ?? String(e)}`, { device, errno: ne?.errno, cause: e });
}

/**
 * Cancellation by an AbortSignal, the Node way: `name === 'AbortError'` and `cause` = the signal's reason, while it
 * stays a MigError with code VFM_CANCELLED (and the device, when one device's step was what got cancelled).
 */
export function abortError(signal: AbortSignal | undefined, message: string, details: Omit<MigErrorDetails, 'cause'> = {}): MigError {
  const e = new MigError(ErrorCode.CANCELLED, message, { ...details, cause: signal?.reason });
  e.name = 'AbortError';
  return e;
}

/**
 * The code for a failed device access by its errno: the errnos the vfio-user client uses for a dead, stalled or
 * misbehaving server get their own codes; everything else stays `fallback`.
 */
export function accessErrorCode(errno: number | undefined, fallback: ErrorCode = ErrorCode.NATIVE): ErrorCode {
  switch (errno) {
    case 32: return ErrorCode.PEER_GONE;      // EPIPE
    case 110: return ErrorCode.PEER_TIMEOUT;  // ETIMEDOUT
    case 71: return ErrorCode.PEER_PROTOCOL;  // EPROTO
    case 125: return ErrorCode.CANCELLED;     // ECANCELED (a request interrupted by a cancel or a close)
    default: return fallback;
  }
}

export function isMigError(e: unknown): e is MigError {
  return e instanceof MigError;
}

const CODES = new Set<string>(Object.values(ErrorCode));

/** Is `c` one of the stable VFM_ codes? */
export function isErrorCode(c: unknown): c is ErrorCode {
  return typeof c === 'string' && CODES.has(c);
}

/**
 * Normalise anything thrown to a MigError with a VFM_ code, at each boundary an error crosses (worker -> pool,
 * engine -> API, API -> CLI), so no raw Node or addon error leaves the library:
 * - a MigError, or a plain object carrying a known VFM_ code (a worker's serialised error), keeps its code;
 * - an AbortError is VFM_CANCELLED;
 * - an addon argument error (ERR_ARG) or a Node argument error (ERR_INVALID_ARG_*, ERR_OUT_OF_RANGE) is
 *   VFM_BAD_ARGUMENT;
 * - a system error (ENOENT, EIO, ... with an errno) is VFM_IO, errno kept;
 * - anything else (a TypeError from a bug) is VFM_INTERNAL: a defect, still with a code.
 */
export function toMigError(e: unknown, details: Omit<MigErrorDetails, 'cause'> = {}): MigError {
  if (e instanceof MigError) return e;
  const o = (e !== null && typeof e === 'object' ? e : {}) as { code?: unknown; errno?: unknown; message?: unknown; name?: unknown; syscall?: unknown };
  const message = typeof o.message === 'string' ? o.message : String(e);
  const errno = typeof o.errno === 'number' ? Math.abs(o.errno) : undefined;
  const d = { ...details, errno: details.errno ?? errno, cause: e };
  if (isErrorCode(o.code)) {
    const m = new MigError(o.code, message, {});
    // A serialised MigError's message is already formatted with its device and offset.
    Object.assign(m, { device: (o as MigErrorDetails).device ?? details.device, offset: (o as MigErrorDetails).offset ?? details.offset,
      register: (o as MigErrorDetails).register, errno: d.errno });
    return m;
  }
  if (o.name === 'AbortError') return new MigError(ErrorCode.CANCELLED, message, d);
  const code = typeof o.code === 'string' ? o.code : '';
  if (code === 'ERR_ARG' || code.startsWith('ERR_INVALID_ARG') || code === 'ERR_OUT_OF_RANGE') {
    return new MigError(ErrorCode.BAD_ARGUMENT, message, d);
  }
  if (/^E[A-Z0-9]+$/.test(code) || typeof o.syscall === 'string') {
    return new MigError(ErrorCode.IO, message.startsWith(code) ? message : `${code}: ${message}`, d);
  }
  return new MigError(ErrorCode.INTERNAL, `internal error (please report): ${o.name ? `${String(o.name)}: ` : ''}${message}`, d);
}

/** Run `fn`, turning whatever it throws into a MigError (the API boundary). */
export async function normalised<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    const m = toMigError(e);
    // Reports and loaders the engine attached to the error travel with it.
    if (m !== e && e !== null && typeof e === 'object') {
      for (const k of ['report', 'loader'] as const) if (k in e) Object.assign(m, { [k]: (e as Record<string, unknown>)[k] });
    }
    throw m;
  }
}
