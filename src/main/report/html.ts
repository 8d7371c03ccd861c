// `--report FILE.html`: one self-contained page (uPlot and its CSS inlined, the data as JSON in the page, no network
// access) with the charts an operator asks for first: pending bytes per round per device, throughput over time,
// source stop-and-copy time (and end-to-end downtime where this process saw both ends) per device, dirty-page query
// latency, and the same summary the terminal shows. Built from the recorder alone, so every command gets it.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import type { DeviceEvent, OperatorEvent, PassEvent, ProgressEvent, Recorder } from './recorder.js';
import { TOOL } from './json.js';

export interface Chart {
  id: string;
  title: string;
  kind: 'line' | 'bars' | 'points';
  xLabel: string;
  yLabel: string;
  /** 'bytes', 'bytesPerSecond' or 'ms': how the page formats the y axis. */
  yUnit: 'bytes' | 'bytesPerSecond' | 'ms';
  /** x values; for bar charts the index of `categories`. */
  x: number[];
  categories?: string[];
  series: { label: string; values: (number | null)[] }[];
  note?: string;
}

export interface ReportData {
  title: string;
  command: string;
  tool: { name: string; version: string };
  startedAt: string;
  endedAt: string;
  ok: boolean;
  error: string | null;
  params: Record<string, unknown>;
  summary: string;
  charts: Chart[];
  /** Charts that this command has no data for, and why. */
  absent: string[];
}

const MAX_SERIES = 24;
const MAX_BARS = 256;
const MAX_POINTS = 4000;

function label(e: { migration: number; device: string }, many: boolean): string {
  return many ? `m${e.migration} ${e.device}` : e.device;
}

function pendingChart(passes: PassEvent[]): Chart | null {
  if (!passes.length) return null;
  const many = new Set(passes.map((p) => p.migration)).size > 1;
  const maxPass = Math.max(...passes.map((p) => p.pass));
  const x = Array.from({ length: maxPass }, (_, i) => i + 1);
  const series = new Map<string, (number | null)[]>();
  for (const p of passes) {
    for (const d of p.devices) {
      const k = label({ migration: p.migration, device: d.device }, many);
      if (!series.has(k)) { if (series.size >= MAX_SERIES) continue; series.set(k, x.map(() => null)); }
      series.get(k)![p.pass - 1] = d.pendingBytes;
    }
  }
  const all = new Set(passes.flatMap((p) => p.devices.map((d) => `${p.migration}/${d.device}`))).size;
  return {
    id: 'pending', title: 'Pending bytes at the start of each pre-copy round, per device', kind: 'line', xLabel: 'round',
    yLabel: 'pending', yUnit: 'bytes', x, series: [...series].map(([l, values]) => ({ label: l, values })),
    note: all > series.size ? `first ${series.size} of ${all} devices shown` : undefined,
  };
}

function throughputChart(progress: ProgressEvent[], durationMs: number): Chart | null {
  if (!progress.length) return null;
  const bucket = Math.max(100, Math.ceil(durationMs / 300 / 50) * 50);
  const n = Math.max(1, Math.ceil(durationMs / bucket) + 1);
  const x = Array.from({ length: n }, (_, i) => ((i + 1) * bucket) / 1000);
  const sides = ['source', 'destination'] as const;
  const series: Chart['series'] = [];
  for (const side of sides) {
    const evs = progress.filter((p) => p.side === side);
    if (!evs.length) continue;
    const vals = x.map(() => 0);
    const last = new Map<string, number>();
    for (const e of evs) {
      const k = `${e.migration}/${e.device}`;
      const delta = e.bytes - (last.get(k) ?? 0);
      last.set(k, Math.max(e.bytes, last.get(k) ?? 0));
      if (delta > 0) vals[Math.min(n - 1, Math.floor(e.t / bucket))] += delta;
    }
    series.push({ label: side === 'source' ? 'save (source)' : 'load (destination)', values: vals.map((v) => (v * 1000) / bucket) });
  }
  return {
    id: 'throughput', title: `Throughput over time (device data, ${bucket} ms buckets)`, kind: 'line', xLabel: 'time (s)',
    yLabel: 'rate', yUnit: 'bytesPerSecond', x, series,
  };
}

function stopCopyChart(devs: DeviceEvent[], pairs: Map<number, number>): Chart | null {
  const stop = new Map<string, number>();
  const rows: { key: string; name: string; stopCopy: number; downtime: number | null }[] = [];
  const many = new Set(devs.filter((d) => d.side === 'source').map((d) => d.migration)).size > 1;
  for (const e of devs) {
    if (e.side !== 'source') continue;
    const k = `${e.migration}/${e.device}`;
    if (e.state === 'STOP_COPY') stop.set(k, e.t);
    if (e.state === 'STOP' && stop.has(k)) rows.push({ key: k, name: label(e, many), stopCopy: e.t - stop.get(k)!, downtime: null });
  }
  if (!rows.length) return null;
  // End to end: the device stopped on the source until it ran on the destination (this process saw both ends).
  for (const e of devs) {
    if (e.side !== 'destination' || e.state !== 'RUNNING') continue;
    const src = pairs.get(e.migration);
    const r = rows.find((x) => x.key === `${src}/${e.device}`);
    const t0 = stop.get(`${src}/${e.device}`);
    if (r && t0 !== undefined) r.downtime = e.t - t0;
  }
  const shown = rows.slice(0, MAX_BARS);
  const series: Chart['series'] = [{ label: 'source stop-and-copy time', values: shown.map((r) => r.stopCopy) }];
  if (shown.some((r) => r.downtime !== null)) series.push({ label: 'downtime (end to end: source stop to destination running)', values: shown.map((r) => r.downtime) });
  return {
    id: 'stopcopy', title: series.length > 1 ? 'Source stop-and-copy time and end-to-end downtime per device' : 'Source stop-and-copy time per device',
    kind: 'bars', xLabel: 'device', yLabel: 'time', yUnit: 'ms', x: shown.map((_, i) => i), categories: shown.map((r) => r.name), series,
    note: rows.length > shown.length ? `first ${shown.length} of ${rows.length} devices shown` : undefined,
  };
}

function dirtyChart(evs: OperatorEvent[]): Chart | null {
  const q = evs.filter((e): e is Extract<OperatorEvent, { type: 'dirty' }> => e.type === 'dirty');
  if (!q.length) return null;
  // Thinned to the slowest query per time slot: the tail is what matters.
  const slot = q.length > MAX_POINTS ? (q[q.length - 1].t - q[0].t) / MAX_POINTS : 0;
  const pts: { t: number; ms: number }[] = [];
  for (const e of q) {
    const last = pts[pts.length - 1];
    if (slot && last && e.t - last.t < slot) { if (e.ms > last.ms) last.ms = e.ms; continue; }
    pts.push({ t: e.t, ms: e.ms });
  }
  return {
    id: 'dirty', title: `Dirty-page bitmap query latency (${q.length} queries${slot ? ', slowest per slot shown' : ''})`, kind: 'points',
    xLabel: 'time (s)', yLabel: 'latency', yUnit: 'ms', x: pts.map((p) => p.t / 1000), series: [{ label: 'query latency', values: pts.map((p) => p.ms) }],
  };
}

export function reportData(rec: Recorder, o: { command: string; params: Record<string, unknown>; summary: string; ok: boolean; error: string | null }): ReportData {
  const ev = rec.events;
  const charts: Chart[] = [];
  const absent: string[] = [];
  const add = (c: Chart | null, what: string) => { if (c) charts.push(c); else absent.push(what); };
  add(pendingChart(ev.filter((e): e is PassEvent => e.type === 'pass')), 'pending bytes per round: no pre-copy round ran');
  add(throughputChart(ev.filter((e): e is ProgressEvent => e.type === 'progress'), rec.elapsedMs), 'throughput: no device data moved');
  add(stopCopyChart(ev.filter((e): e is DeviceEvent => e.type === 'device'), rec.pairs), 'stop-and-copy time: no source device was stopped and copied');
  add(dirtyChart(ev), 'dirty-page query latency: no dirty-bitmap query ran');
  return {
    title: `vfio-mig ${o.command}`, command: o.command, tool: TOOL, startedAt: rec.startedAt.toISOString(), endedAt: new Date().toISOString(),
    ok: o.ok, error: o.error, params: o.params, summary: o.summary, charts, absent,
  };
}

const require = createRequire(import.meta.url);
function asset(p: string): string { return fs.readFileSync(require.resolve(p), 'utf8'); }

/** JSON inside <script>: nothing in it can close the element or open a comment. */
function scriptJson(v: unknown): string {
  return JSON.stringify(v).replace(/</g, '\\u003c').replace(/>/g, '\\u003e').replace(/&/g, '\\u0026').replace(/\u2028/g, '\\u2028').replace(/\u2029/g, '\\u2029');
}

function escHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

export function renderHtml(d: ReportData): string {
  const paramRows = Object.entries(d.params).map(([k, v]) => `<tr><th>${escHtml(k)}</th><td>${escHtml(JSON.stringify(v))}</td></tr>`).join('');
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>${escHtml(d.title)}</title>
<style>${asset('uplot/dist/uPlot.min.css')}
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:15px;margin:24px 0 6px}
.meta{color:#555}.ok{color:#17803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:12px}
table.p{border-collapse:collapse;font-size:12px} table.p th{text-align:left;padding:1px 10px 1px 0;color:#555;font-weight:normal}
.chart{margin-bottom:8px}.note{color:#666;font-size:12px}
</style></head><body>
<h1>${escHtml(d.title)}</h1>
<div class="meta">${escHtml(d.tool.name)} ${escHtml(d.tool.version)} · ${escHtml(d.startedAt)} → ${escHtml(d.endedAt)} ·
<span class="${d.ok ? 'ok' : 'bad'}">${d.ok ? 'ok' : 'FAILED'}</span>${d.error ? ` · ${escHtml(d.error)}` : ''}</div>
<div id="charts"></div>
${d.absent.length ? `<p class="note">Not drawn: ${d.absent.map(escHtml).join('; ')}.</p>` : ''}
<h2>Summary</h2>
<pre>${escHtml(d.summary)}</pre>
<h2>Parameters</h2>
<table class="p">${paramRows}</table>
<script>${asset('uplot/dist/uPlot.iife.min.js')}</script>
<script id="data" type="application/json">${scriptJson(d)}</script>
<script>
(function () {
  var d = JSON.parse(document.getElementById('data').textContent);
  var B = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  function bytes(v) { var i = 0; v = Math.abs(v); while (v >= 1024 && i < B.length - 1) { v /= 1024; i++; } return (i ? v.toFixed(1) : v.toFixed(0)) + ' ' + B[i]; }
  function fmt(unit, v) {
    if (v == null) return '-';
    if (unit === 'bytes') return bytes(v);
    if (unit === 'bytesPerSecond') return bytes(v) + '/s';
    return (v < 10 ? v.toFixed(2) : v.toFixed(1)) + ' ms';
  }
  var palette = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#65a30d', '#475569', '#ea580c'];
  var root = document.getElementById('charts');
  d.charts.forEach(function (c) {
    var box = document.createElement('div');
    box.className = 'chart';
    box.setAttribute('data-chart', c.id);
    var h = document.createElement('h2');
    h.textContent = c.title;
    box.appendChild(h);
    if (c.note) { var n = document.createElement('div'); n.className = 'note'; n.textContent = c.note; box.appendChild(n); }
    root.appendChild(box);
    // Grouped bars: with two series, one on each side of its category.
    function bars(i) {
      var two = c.series.length > 1;
      return uPlot.paths.bars({ size: [two ? 0.4 : 0.6, 48], align: two ? (i === 0 ? -1 : 1) : 0 });
    }
    var integerX = c.kind === 'bars' || c.xLabel === 'round';
    var series = [{ label: c.xLabel, value: c.categories ? function (u, v) { return v == null ? '-' : c.categories[v]; } : undefined }];
    c.series.forEach(function (s, i) {
      var col = palette[i % palette.length];
      series.push({
        label: s.label, stroke: col, width: c.kind === 'points' ? 0 : 2, fill: c.kind === 'bars' ? col + '99' : undefined,
        paths: c.kind === 'bars' ? bars(i) : undefined, spanGaps: false,
        points: { show: c.kind !== 'bars', size: c.kind === 'points' ? 4 : 6, fill: col },
        value: function (u, v) { return fmt(c.yUnit, v); },
      });
    });
    var opts = {
      width: Math.min(1100, window.innerWidth - 60), height: 260, series: series,
      scales: { x: c.kind === 'bars' ? { time: false, range: function (u, lo, hi) { return [lo - 0.6, hi + 0.6]; } } : { time: false } },
      axes: [
        { label: c.xLabel, incrs: integerX ? [1, 2, 5, 10, 20, 50, 100, 200, 500] : undefined, values: c.categories ? function (u, vals) { return vals.map(function (v) { return Number.isInteger(v) && c.categories[v] != null ? c.categories[v] : ''; }); } : undefined },
        { label: c.yLabel, size: 80, values: function (u, vals) { return vals.map(function (v) { return fmt(c.yUnit, v); }); } },
      ],
    };
    new uPlot(opts, [c.x].concat(c.series.map(function (s) { return s.values; })), box);
  });
  document.body.setAttribute('data-charts-drawn', String(d.charts.length));
})();
</script>
</body></html>
`;
}

/** Write the page into `out` and give it its final name (OutputFile: a temporary name until complete). */
export function writeReport(out: { fd: number; commit(): void }, d: ReportData): void {
  fs.writeFileSync(out.fd, renderHtml(d));
  out.commit();
}
