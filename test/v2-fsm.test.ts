// The v2 FSM table (protocol/v2/fsm.ts) against the uAPI's own text: the next-step grid of vfio_mig_get_next_state,
// the arcs each feature set allows, the walks a real kernel takes (kernel-guest.md), and session boundaries.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { V2_NEXT, closesSession, nextState, opensSession, supports, v2Path } from '../src/main/protocol/v2/fsm.js';
import { MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, V2_STATE_NAMES, type V2StateName } from '../src/main/protocol/v2/uapi.js';

const SC = MIGRATION_STOP_COPY, P2P = MIGRATION_P2P, PRE = MIGRATION_PRE_COPY;
const FLAG_SETS = [SC, SC | P2P, SC | PRE, SC | P2P | PRE];

// vfio-facts.md §4.2, transcribed as written there (cur \ target, columns STOP RUNNING STOP_COPY RESUMING RUNNING_P2P
// PRE_COPY PRE_COPY_P2P; '-' = stay).
const GRID = `
STOP         | -           | RUNNING_P2P | STOP_COPY    | RESUMING    | RUNNING_P2P | RUNNING_P2P | RUNNING_P2P
RUNNING      | RUNNING_P2P | -           | RUNNING_P2P  | RUNNING_P2P | RUNNING_P2P | PRE_COPY    | RUNNING_P2P
STOP_COPY    | STOP        | STOP        | -            | STOP        | STOP        | ERROR       | ERROR
RESUMING     | STOP        | STOP        | STOP         | -           | STOP        | STOP        | STOP
RUNNING_P2P  | STOP        | RUNNING     | STOP         | STOP        | -           | RUNNING     | PRE_COPY_P2P
PRE_COPY     | RUNNING     | RUNNING     | PRE_COPY_P2P | RUNNING     | RUNNING     | -           | PRE_COPY_P2P
PRE_COPY_P2P | RUNNING_P2P | RUNNING_P2P | STOP_COPY    | RUNNING_P2P | RUNNING_P2P | PRE_COPY    | -`;
const COLS: V2StateName[] = ['STOP', 'RUNNING', 'STOP_COPY', 'RESUMING', 'RUNNING_P2P', 'PRE_COPY', 'PRE_COPY_P2P'];

test('v2 FSM: the [current][target] grid equals the uAPI table; ERROR absorbs and is never a target', () => {
  const rows = GRID.trim().split('\n').map((l) => l.split('|').map((c) => c.trim()));
  assert.is(rows.length, 7);
  for (const [cur, ...cells] of rows) {
    cells.forEach((c, i) => {
      const want = c === '-' ? cur : c;
      assert.is(V2_NEXT[cur as V2StateName][COLS[i]], want, `${cur} -> ${COLS[i]}`);
    });
    assert.is(V2_NEXT[cur as V2StateName].ERROR, 'ERROR');
  }
  for (const t of V2_STATE_NAMES) assert.is(V2_NEXT.ERROR[t], 'ERROR');
  for (const f of FLAG_SETS) for (const s of V2_STATE_NAMES) {
    assert.is(nextState(f, s, 'ERROR'), null, `ERROR requested from ${s}`);
    assert.is(nextState(f, 'ERROR', s), null, `out of ERROR to ${s}`);
  }
});

// The arcs a driver implements, per feature set (uAPI text, vfio-facts §4.2).
function allowedArcs(flags: number): Set<string> {
  const a = ['RESUMING>STOP', 'STOP>RESUMING', 'STOP>STOP_COPY', 'STOP_COPY>STOP'];
  const p2p = (flags & P2P) !== 0, pre = (flags & PRE) !== 0;
  if (p2p) a.push('RUNNING>RUNNING_P2P', 'RUNNING_P2P>RUNNING', 'RUNNING_P2P>STOP', 'STOP>RUNNING_P2P');
  else a.push('RUNNING>STOP', 'STOP>RUNNING');
  if (pre) a.push('RUNNING>PRE_COPY', 'PRE_COPY>RUNNING');
  if (pre && !p2p) a.push('PRE_COPY>STOP_COPY');
  if (pre && p2p) {
    a.push('PRE_COPY>PRE_COPY_P2P', 'PRE_COPY_P2P>PRE_COPY', 'PRE_COPY_P2P>RUNNING_P2P', 'PRE_COPY_P2P>STOP_COPY',
      'RUNNING_P2P>PRE_COPY_P2P');
  }
  return new Set(a);
}

test('v2 FSM: every walk between supported states uses only the arcs the feature set allows, and ends at the target', () => {
  let walks = 0;
  for (const f of FLAG_SETS) {
    const arcs = allowedArcs(f);
    const used = new Set<string>();
    const states = V2_STATE_NAMES.filter((s) => s !== 'ERROR' && supports(f, s));
    for (const from of states) for (const to of states) {
      const path = v2Path(f, from, to);
      const blocked = from === 'STOP_COPY' && (to === 'PRE_COPY' || to === 'PRE_COPY_P2P');
      if (blocked) { assert.is(path, null, `flags ${f}: ${from} -> ${to} must be refused`); continue; }
      assert.ok(path, `flags ${f}: ${from} -> ${to} refused`);
      let cur = from;
      for (const s of path!) {
        assert.ok(arcs.has(`${cur}>${s}`), `flags ${f}: ${from} -> ${to} takes the arc ${cur} -> ${s}`);
        assert.ok(supports(f, s), `flags ${f}: enters unsupported ${s}`);
        used.add(`${cur}>${s}`);
        cur = s;
      }
      assert.is(cur, to);
      walks++;
    }
    // And every allowed arc is reachable as a one-step request (no dead arcs in the table).
    for (const a of arcs) {
      const [x, y] = a.split('>') as V2StateName[];
      assert.equal(v2Path(f, x, y), [y], `flags ${f}: arc ${a} as a direct request`);
    }
    assert.ok(used.size > 0);
  }
  assert.ok(walks > 100, `walked ${walks}`);
});

test('v2 FSM: the walks a real kernel takes (mtty, kernel-guest.md) and unsupported endpoints', () => {
  const all = SC | P2P | PRE;
  assert.equal(v2Path(all, 'RUNNING', 'STOP_COPY'), ['RUNNING_P2P', 'STOP', 'STOP_COPY']);
  assert.equal(v2Path(all, 'RUNNING', 'PRE_COPY'), ['PRE_COPY']);
  assert.equal(v2Path(all, 'PRE_COPY', 'STOP_COPY'), ['PRE_COPY_P2P', 'STOP_COPY']);
  assert.equal(v2Path(all, 'STOP', 'PRE_COPY_P2P'), ['RUNNING_P2P', 'PRE_COPY_P2P']);
  assert.equal(v2Path(all, 'RESUMING', 'RUNNING'), ['STOP', 'RUNNING_P2P', 'RUNNING']);
  assert.equal(v2Path(all, 'PRE_COPY_P2P', 'RUNNING'), ['RUNNING_P2P', 'RUNNING']);
  assert.is(v2Path(all, 'STOP_COPY', 'PRE_COPY'), null);
  // No P2P: the P2P states are skipped over.
  assert.equal(v2Path(SC | PRE, 'RUNNING', 'STOP_COPY'), ['STOP', 'STOP_COPY']);
  assert.equal(v2Path(SC | PRE, 'PRE_COPY', 'STOP_COPY'), ['STOP_COPY']);
  assert.equal(v2Path(SC, 'RESUMING', 'RUNNING'), ['STOP', 'RUNNING']);
  assert.is(v2Path(SC, 'RUNNING', 'RUNNING_P2P'), null);
  assert.is(v2Path(SC | P2P, 'RUNNING', 'PRE_COPY'), null);
  assert.is(v2Path(SC, 'RUNNING', 'PRE_COPY_P2P'), null);
  assert.equal(v2Path(all, 'STOP', 'STOP'), []);
  // Nothing at all without STOP_COPY (the mandatory flag).
  assert.is(v2Path(0, 'RUNNING', 'STOP'), null);
});

test('v2 FSM: data sessions open entering the saving group or RESUMING and close leaving them', () => {
  assert.ok(opensSession('RUNNING', 'PRE_COPY'));
  assert.ok(opensSession('RUNNING_P2P', 'PRE_COPY_P2P'));
  assert.ok(opensSession('STOP', 'STOP_COPY'));
  assert.ok(opensSession('STOP', 'RESUMING'));
  assert.not.ok(opensSession('PRE_COPY', 'PRE_COPY_P2P'));
  assert.not.ok(opensSession('PRE_COPY_P2P', 'STOP_COPY'), 'the PRE_COPY fd continues into STOP_COPY');
  assert.not.ok(opensSession('PRE_COPY', 'STOP_COPY'));
  assert.ok(closesSession('STOP_COPY', 'STOP'));
  assert.ok(closesSession('PRE_COPY', 'RUNNING'));
  assert.ok(closesSession('PRE_COPY_P2P', 'RUNNING_P2P'));
  assert.ok(closesSession('RESUMING', 'STOP'));
  assert.not.ok(closesSession('PRE_COPY_P2P', 'STOP_COPY'));
  assert.not.ok(closesSession('RUNNING', 'RUNNING_P2P'));
});

test.run();
