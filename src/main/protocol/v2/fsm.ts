// The VFIO migration v2 FSM as data: the kernel's `vfio_mig_get_next_state` (drivers/vfio/vfio_main.c) table
// `[current][target] -> next`, the flags each state needs, and the walk that skips states a device does not
// support. vfio-mig requests one arc at a time (each is a SET of MIG_DEVICE_STATE), so every state change is traced
// and a failure names the exact arc. Facts: ../shared/vfio-facts.md §4.2; the same table is in the emulated
// device (addon/src/emu/v2.cc, which plays the kernel's role) and the two are compared by test/v2-fsm.test.ts.
import { MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, type V2StateName } from './uapi.js';

type Row = Record<V2StateName, V2StateName>;

const S = 'STOP', R = 'RUNNING', SC = 'STOP_COPY', RS = 'RESUMING', RP = 'RUNNING_P2P', PC = 'PRE_COPY', PP = 'PRE_COPY_P2P', E = 'ERROR';

/** [current][target] -> next state, for a device with every feature (STOP_COPY | P2P | PRE_COPY). */
export const V2_NEXT: Readonly<Record<V2StateName, Readonly<Row>>> = {
  //              target: STOP  RUNNING  STOP_COPY  RESUMING  RUNNING_P2P  PRE_COPY  PRE_COPY_P2P  ERROR
  STOP:         { STOP: S,  RUNNING: RP, STOP_COPY: SC, RESUMING: RS, RUNNING_P2P: RP, PRE_COPY: RP, PRE_COPY_P2P: RP, ERROR: E },
  RUNNING:      { STOP: RP, RUNNING: R,  STOP_COPY: RP, RESUMING: RP, RUNNING_P2P: RP, PRE_COPY: PC, PRE_COPY_P2P: RP, ERROR: E },
  STOP_COPY:    { STOP: S,  RUNNING: S,  STOP_COPY: SC, RESUMING: S,  RUNNING_P2P: S,  PRE_COPY: E,  PRE_COPY_P2P: E,  ERROR: E },
  RESUMING:     { STOP: S,  RUNNING: S,  STOP_COPY: S,  RESUMING: RS, RUNNING_P2P: S,  PRE_COPY: S,  PRE_COPY_P2P: S,  ERROR: E },
  RUNNING_P2P:  { STOP: S,  RUNNING: R,  STOP_COPY: S,  RESUMING: S,  RUNNING_P2P: RP, PRE_COPY: R,  PRE_COPY_P2P: PP, ERROR: E },
  PRE_COPY:     { STOP: R,  RUNNING: R,  STOP_COPY: PP, RESUMING: R,  RUNNING_P2P: R,  PRE_COPY: PC, PRE_COPY_P2P: PP, ERROR: E },
  PRE_COPY_P2P: { STOP: RP, RUNNING: RP, STOP_COPY: SC, RESUMING: RP, RUNNING_P2P: RP, PRE_COPY: PC, PRE_COPY_P2P: PP, ERROR: E },
  ERROR:        { STOP: E,  RUNNING: E,  STOP_COPY: E,  RESUMING: E,  RUNNING_P2P: E,  PRE_COPY: E,  PRE_COPY_P2P: E,  ERROR: E },
};

/** VFIO_MIGRATION_* flags a device must advertise for each state to exist (ERROR: never requestable). */
export const V2_STATE_FLAGS: Readonly<Record<V2StateName, number>> = {
  STOP: MIGRATION_STOP_COPY, RUNNING: MIGRATION_STOP_COPY, STOP_COPY: MIGRATION_STOP_COPY, RESUMING: MIGRATION_STOP_COPY,
  RUNNING_P2P: MIGRATION_STOP_COPY | MIGRATION_P2P, PRE_COPY: MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
  PRE_COPY_P2P: MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY, ERROR: 0xffffffff,
};

/** The saving group shares one data fd: moving inside it keeps the session (uAPI text). */
export const SAVING_GROUP: ReadonlySet<V2StateName> = new Set(['PRE_COPY', 'PRE_COPY_P2P', 'STOP_COPY']);

export function supports(flags: number, s: V2StateName): boolean {
  const need = V2_STATE_FLAGS[s];
  return ((need & flags) >>> 0) === (need >>> 0);
}

/**
 * vfio_mig_get_next_state: the next state on the way from `cur` to `target` for a device advertising `flags`, or
 * null where the kernel returns -EINVAL (an unsupported endpoint, or an arc the table blocks with ERROR).
 */
export function nextState(flags: number, cur: V2StateName, target: V2StateName): V2StateName | null {
  if (!supports(flags, cur) || !supports(flags, target)) return null;
  let next = V2_NEXT[cur][target];
  // Arcs touching optional states the device lacks are skipped: the driver sees the arc to the next logical state.
  // ERROR (needs every flag) ends the skip: without that check a blocked arc spins, as the upstream fix notes.
  while (next !== 'ERROR' && !supports(flags, next)) next = V2_NEXT[next][target];
  return next === 'ERROR' ? null : next;
}

/** Every arc from `cur` to `target` (empty when already there), or null if the FSM refuses the request. */
export function v2Path(flags: number, cur: V2StateName, target: V2StateName): V2StateName[] | null {
  const path: V2StateName[] = [];
  let s = cur;
  while (s !== target) {
    const n = nextState(flags, s, target);
    if (n === null || path.length >= 8) return null;
    path.push(n);
    s = n;
  }
  return path;
}

/** Does the arc cur -> next start a new data session (a data fd comes back from SET)? */
export function opensSession(cur: V2StateName, next: V2StateName): boolean {
  if (next === 'RESUMING') return true;
  return SAVING_GROUP.has(next) && !SAVING_GROUP.has(cur);
}

/** Does the arc cur -> next end the current data session (its fd becomes useless: reads give ENODEV)? */
export function closesSession(cur: V2StateName, next: V2StateName): boolean {
  if (cur === 'RESUMING') return next !== 'RESUMING';
  return SAVING_GROUP.has(cur) && !SAVING_GROUP.has(next);
}
