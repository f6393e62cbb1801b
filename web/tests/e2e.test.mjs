// The demo page end to end, as a person (or a script) uses it: `bitnet serve-www` serves the built site with the
// isolation headers, the page loads the default model and generates 20 tokens (seed 1, temperature 0) with wasm
// threads, with one thread, and with WebGPU (Chromium's SwiftShader adapter); each text must equal what `bitnet run`
// prints. Then 64 tokens of another prompt on the warm page measure decode speed, next to `bitnet bench`
// (target/web-test/results.json, screenshots).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { OUT, SITE, bitnet, launch, nativeRun, newPage, serve } from './helpers.mjs';

const PROMPT = 'The capital of France is';
/** Generates 64 tokens before any end token: a decode-speed measurement like `bitnet bench -n 64`. */
const BENCH_PROMPT = 'Once upon a time';
let server, browser, expected, expectedBench;
const results = { prompt: PROMPT, n: 20, seed: 1, temp: 0, native: {}, browser: {} };

before(async () => {
  expected = nativeRun('-p', PROMPT, '-n', '20', '--temp', '0', '--seed', '1');
  expectedBench = nativeRun('-p', BENCH_PROMPT, '-n', '64', '--temp', '0', '--seed', '1');
  server = await serve(SITE);
  browser = await launch();
});

after(async () => {
  await browser?.close();
  server?.stop();
  writeFileSync(`${OUT}/results.json`, JSON.stringify(results, null, 2));
  const rows = [
    ...Object.entries(results.native).map(([k, v]) => `| native ${k} | ${v.backend} | ${v.threads} | ${v.tps.toFixed(1)} |`),
    ...Object.entries(results.browser).map(([k, v]) => `| Chromium ${k} | ${v.backend} | ${v.threads ?? '-'} | ${v.tps64.toFixed(1)} |`),
  ];
  console.log(['| run | backend | threads | decode tokens/s (64 tokens) |', '| --- | --- | --- | --- |', ...rows].join('\n'));
});

test('native decode speed (bitnet bench, same machine, same run)', () => {
  for (const threads of [2, 1]) {
    const b = JSON.parse(bitnet('bench', '-p', '0', '-n', '64', '-r', '3', '-t', String(threads), '--json'));
    results.native[`${threads} thread${threads > 1 ? 's' : ''}`] = { backend: b.backend, threads: b.threads, tps: b.tg.tps };
  }
});

/** Runs the demo with `query`; checks the text against `bitnet run`; measures 64 tokens of BENCH_PROMPT. */
async function demo(name, query, check) {
  const log = [];
  const page = await newPage(browser, log);
  try {
    const q = `prompt=${encodeURIComponent(PROMPT)}&n=20&seed=1&temp=0&autorun=1&${query}`;
    await page.goto(`${server.url}?${q}`);
    await page.waitForFunction(() => window.bitnetDemo.done, null, { timeout: 600_000, polling: 200 });
    const d = await page.evaluate(() => ({ ...window.bitnetDemo }));
    assert.equal(d.error, null);
    assert.equal(d.text, expected, `${name}: the page's text vs bitnet run`);
    check(d);
    await page.screenshot({ path: `${OUT}/demo-${name}.png` });

    await page.fill('#n', '64');
    await page.fill('#prompt', BENCH_PROMPT);
    await page.click('#send');
    await page.waitForFunction(() => window.bitnetDemo.done, null, { timeout: 600_000, polling: 200 });
    const warm = await page.evaluate(() => ({ ...window.bitnetDemo }));
    assert.equal(warm.error, null);
    assert.equal(warm.tokens, 64);
    // Not asserted: over 64 tokens a near tie (this prompt has a top-2 gap of 0.07 at token 20) can go the
    // other way when float sums run in another order (SIMD128 lanes, GPU reductions) than native's.
    const sameAsNative = warm.text === expectedBench;
    results.browser[name] = { backend: d.backend, threads: d.threads, tps20: d.tokensPerSecond, tps64: warm.tokensPerSecond, sameAsNative };
  } catch (err) {
    console.log(`--- ${name}: page console\n${log.join('\n')}`);
    throw err;
  } finally {
    await page.context().close();
  }
}

test('demo: wasm, 2 threads', () =>
  demo('wasm-threads', 'backend=wasm&threads=2', (d) => {
    assert.match(d.backend, /^cpu\/simd128$/);
    assert.equal(d.threads, 2);
  }));

test('demo: wasm, single-threaded build', () =>
  demo('wasm-single', 'backend=wasm&threads=1', (d) => {
    assert.match(d.backend, /^cpu\/simd128$/);
    assert.equal(d.threads, 1);
  }));

test('demo: WebGPU (SwiftShader)', () =>
  demo('webgpu', 'backend=webgpu', (d) => {
    assert.equal(d.backend, 'wgpu/unnamed CPU adapter (webgpu)');
  }));
