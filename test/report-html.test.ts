/// <reference lib="dom" />
// The HTML report in a real browser: Debian's Chromium, headless, driven by playwright-core (no browser download).
// The page must load with no network request and no console error, and every chart must have drawn its series.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium, type Browser } from 'playwright-core';
import { EnginePool } from '../src/main/engine/pool.js';
import { runEmulated } from '../src/main/api.js';
import { Recorder } from '../src/main/report/recorder.js';
import { renderHtml, reportData } from '../src/main/report/html.js';

const CHROMIUM = process.env.VFIO_MIG_CHROMIUM ?? '/usr/bin/chromium';
const OUT = process.env.VFIO_MIG_ARTIFACTS ?? path.join(os.tmpdir(), 'vfio-mig-artifacts');
const pool = new EnginePool({ threads: 2 });
let browser: Browser | undefined;

test.before(async () => {
  fs.mkdirSync(OUT, { recursive: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM, headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
});
test.after(async () => { await browser?.close(); await pool.close(); });

/** Per chart: how many canvas pixels have one of its series' colours (axes and grid are grey). */
async function openReport(file: string, shot: string) {
  const ctx = await browser!.newContext({ viewport: { width: 1200, height: 900 } });
  const page = await ctx.newPage();
  const problems: string[] = [];
  const requests: string[] = [];
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') problems.push(`console ${m.type()}: ${m.text()}`); });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('request', (r) => requests.push(r.url()));
  await page.goto('file://' + file);
  await page.waitForSelector('body[data-charts-drawn]', { timeout: 15_000 });
  const charts = await page.evaluate(() => {
    const hex = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#65a30d', '#475569', '#ea580c']
      .map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
    return Array.from(document.querySelectorAll('[data-chart]')).map((box) => {
      const c = box.querySelector('canvas') as HTMLCanvasElement | null;
      if (!c) return { id: box.getAttribute('data-chart'), coloured: 0, w: 0, h: 0 };
      const px = c.getContext('2d')!.getImageData(0, 0, c.width, c.height).data;
      let coloured = 0;
      for (let i = 0; i < px.length; i += 4) {
        if (px[i + 3] < 200) continue;
        if (hex.some(([r, g, b]) => Math.abs(px[i] - r) < 40 && Math.abs(px[i + 1] - g) < 40 && Math.abs(px[i + 2] - b) < 40)) coloured++;
      }
      return { id: box.getAttribute('data-chart'), coloured, w: c.width, h: c.height };
    });
  });
  await page.screenshot({ path: shot, fullPage: true });
  await ctx.close();
  return { charts, problems, requests };
}

test('run report: opens offline in Chromium, no console error, all four charts drew their series, screenshot saved', async () => {
  const rec = new Recorder();
  const r = await runEmulated({
    pool, devices: 3, seed: 5, maxRounds: 4, downtimeLimitMs: 0, dirtyQueryIntervalMs: 5, progressIntervalMs: 20,
    device: { stateSize: 8 << 20, maxChunk: 256 << 10, dirtyRate: 20000, dmaRate: 2000 },
    onMigration: (m) => { (globalThis as { src?: number }).src = rec.attachMigration(m); },
    onLoader: (l) => { rec.attachLoader(l, (globalThis as { src?: number }).src); },
  });
  assert.ok(r.ok);
  const data = reportData(rec, { command: 'run', params: { devices: 3 }, summary: 'summary <table> & text', ok: true, error: null });
  assert.equal(data.charts.map((c) => c.id), ['pending', 'throughput', 'stopcopy', 'dirty']);
  assert.equal(data.absent, []);
  const html = renderHtml(data);
  const file = path.join(OUT, 'report-run.html');
  fs.writeFileSync(file, html);
  const shot = path.join(OUT, 'report-run.png');
  const res = await openReport(file, shot);
  assert.equal(res.problems, [], res.problems.join('\n'));
  assert.ok(res.requests.every((u) => u.startsWith('file://')), `network requests: ${res.requests.filter((u) => !u.startsWith('file://')).join(' ')}`);
  assert.is(res.requests.length, 1, 'the page loads nothing but itself');
  assert.equal(res.charts.map((c) => c.id), ['pending', 'throughput', 'stopcopy', 'dirty']);
  for (const c of res.charts) assert.ok(c.coloured > 50, `chart ${c.id} drew ${c.coloured} series pixels (${c.w}x${c.h})`);
  assert.ok(fs.statSync(shot).size > 10_000, 'screenshot written');
  console.log(`report screenshot: ${shot}`);
});

test.run();
