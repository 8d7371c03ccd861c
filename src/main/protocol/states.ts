// VFIO migration v1 device_state: bits, valid combinations and the allowed arcs, as data in one place (the style of
// the kernel's vfio_mig_get_next_state table). Sources: ../shared/vfio-facts.md §1.4 (2019 drafts) and §2.2 (5.8 uAPI).
import { ErrorCode, MigError, accessErrorCode } from '../errors.js';
import type { ProfileName } from './profiles.js';

export const BIT_RUNNING = 1 << 0;
export const BIT_SAVING = 1 << 1;
export const BIT_RESUMING = 1 << 2;
export const STATE_MASK = BIT_RUNNING | BIT_SAVING | BIT_RESUMING;

/** Named states the engine asks for. ERROR is never requested: only VFIO_DEVICE_RESET leaves it. */
export type V1State = 'STOP' | 'RUNNING' | 'PRE_COPY' | 'STOP_COPY' | 'RESUMING' | 'ERROR';

interface StateRow {
  bits: number;
  name: V1State | 'INVALID';
  meaning: string;
  /** Valid in each profile (draft-2019 v5 text: SAVING|RESUMING invalid; 5.8 VALID(): RESUMING must stand alone). */
  valid: Record<ProfileName, boolean>;
}

/** Every 3-bit combination (index = bits). */
export const STATE_TABLE: readonly StateRow[] = [
  { bits: 0b000, name: 'STOP', meaning: 'stopped', valid: { 'draft-2019': true, 'linux-5.8': true } },
  { bits: 0b001, name: 'RUNNING', meaning: 'running (default)', valid: { 'draft-2019': true, 'linux-5.8': true } },
  { bits: 0b010, name: 'STOP_COPY', meaning: 'stop-and-copy (SAVING)', valid: { 'draft-2019': true, 'linux-5.8': true } },
  { bits: 0b011, name: 'PRE_COPY', meaning: 'pre-copy (SAVING|RUNNING)', valid: { 'draft-2019': true, 'linux-5.8': true } },
  { bits: 0b100, name: 'RESUMING', meaning: 'resuming', valid: { 'draft-2019': true, 'linux-5.8': true } },
  { bits: 0b101, name: 'INVALID', meaning: 'RUNNING|RESUMING: invalid', valid: { 'draft-2019': false, 'linux-5.8': false } },
  // 5.8: VFIO_DEVICE_STATE_IS_ERROR; the drafts call it invalid. Either way a device reporting it needs a reset.
  { bits: 0b110, name: 'ERROR', meaning: 'SAVING|RESUMING: error (needs reset)', valid: { 'draft-2019': false, 'linux-5.8': false } },
  { bits: 0b111, name: 'INVALID', meaning: 'all bits: invalid', valid: { 'draft-2019': false, 'linux-5.8': false } },
];

export const STATE_BITS: Record<Exclude<V1State, 'ERROR'>, number> = {
  STOP: 0b000, RUNNING: 0b001, STOP_COPY: 0b010, PRE_COPY: 0b011, RESUMING: 0b100,
};

type Requestable = Exclude<V1State, 'ERROR'>;
/**
 * [current][target] -> next state to write. A multi-step request walks the table one write at a time; `null` means
 * the arc is refused. Arcs follow the 5.8 uAPI's documented transitions (0-5) plus QEMU's recovery writes
 * (cancel: SAVING cleared, RUNNING set; VM start after resume).
 */
export const NEXT_STATE: Record<Requestable, Record<Requestable, Requestable | null>> = {
  //            target:  STOP          RUNNING     PRE_COPY     STOP_COPY    RESUMING
  STOP:      { STOP: 'STOP', RUNNING: 'RUNNING', PRE_COPY: 'RUNNING', STOP_COPY: 'STOP_COPY', RESUMING: 'RESUMING' },
  RUNNING:   { STOP: 'STOP', RUNNING: 'RUNNING', PRE_COPY: 'PRE_COPY', STOP_COPY: 'STOP_COPY', RESUMING: 'RESUMING' },
  PRE_COPY:  { STOP: 'STOP_COPY', RUNNING: 'RUNNING', PRE_COPY: 'PRE_COPY', STOP_COPY: 'STOP_COPY', RESUMING: 'RUNNING' },
  // Going back from stop-and-copy to pre-copy would resend state the destination already has: refused (as v2 does).
  STOP_COPY: { STOP: 'STOP', RUNNING: 'RUNNING', PRE_COPY: null, STOP_COPY: 'STOP_COPY', RESUMING: 'STOP' },
  RESUMING:  { STOP: 'STOP', RUNNING: 'RUNNING', PRE_COPY: 'RUNNING', STOP_COPY: 'STOP', RESUMING: 'RESUMING' },
};

export function stateName(raw: number): V1State | 'INVALID' {
  return STATE_TABLE[raw & STATE_MASK].name;
}

export function isValidState(raw: number, profile: ProfileName): boolean {
  return STATE_TABLE[raw & STATE_MASK].valid[profile];
}

export function isErrorState(raw: number): boolean {
  return (raw & STATE_MASK) === (BIT_SAVING | BIT_RESUMING);
}

/** Read-modify-write: keep bits 3..31 as the device reported them. */
export function withStateBits(current: number, bits: number): number {
  return ((current & ~STATE_MASK) | (bits & STATE_MASK)) >>> 0;
}

/** The writes needed to get from `from` to `to`, or null if the table refuses some arc on the way. */
export function statePath(from: Requestable, to: Requestable): Requestable[] | null {
  const path: Requestable[] = [];
  let cur = from;
  while (cur !== to) {
    const next = NEXT_STATE[cur][to];
    if (next === null || path.length > 4) return null;
    path.push(next);
    cur = next;
  }
  return path;
}

export function fmtState(raw: number): string {
  return `0x${(raw >>> 0).toString(16)} (${stateName(raw)})`;
}

/** device_state as read, checked: ERROR (SAVING|RESUMING, needs a reset) is reported as such, an invalid value refused. */
export function checkedState(raw: number, profile: ProfileName, device: string): V1State {
  if (isErrorState(raw)) return 'ERROR';
  if (!isValidState(raw, profile)) {
    throw new MigError(ErrorCode.VENDOR_BAD_VALUE, `device_state reads ${fmtState(raw)}, not a valid state`,
      { device, register: 'device_state', value: raw });
  }
  return stateName(raw) as V1State;
}

/** A refused device_state write, given the state re-read after it (the 5.8 uAPI: unchanged unless it went to ERROR). */
export function arcFailure(device: string, cur: number, next: string, after: number | undefined, e: unknown): MigError {
  if (after !== undefined && isErrorState(after)) {
    return new MigError(ErrorCode.DEVICE_ERROR_STATE, `transition ${stateName(cur)} -> ${next} put the device in the error state ${fmtState(after)}`,
      { device, register: 'device_state', value: after, cause: e });
  }
  const ne = e as MigError;
  // A peer that died, stalled or broke the protocol (vfio-user) did not refuse anything: say which it was.
  const code = accessErrorCode(ne.errno, ErrorCode.TRANSITION_FAILED);
  return new MigError(code,
    `${code === ErrorCode.TRANSITION_FAILED ? 'vendor refused' : 'connection to the device failed during'} ${stateName(cur)} -> ${next}${after !== undefined ? ` (state now ${fmtState(after)})` : ''}: ${ne.message}`,
    { device, register: 'device_state', errno: ne.errno, cause: e });
}
