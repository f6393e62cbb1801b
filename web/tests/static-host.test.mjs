// The demo on a static host that cannot send COOP/COEP (GitHub Pages, most CDNs): served here by Python's plain
// http.server, the page is not cross-origin isolated until coi-serviceworker.js (registered by the page) adds
// the headers and reloads it; then the package runs the threaded build with 2 threads.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { OUT, SITE, launch, newPage } from './helpers.mjs';

let server, url, browser;

before(async () => {
  server = spawn('python3', ['-m', 'http.server', '0', '--bind', '127.0.0.1', '--directory', SITE], { stdio: ['ignore', 'pipe', 'pipe'] });
  url = await new Promise((resolve, reject) => {
    let out = '';
    server.on('exit', (code) => reject(new Error(`http.server exited with ${code}: ${out}`)));
    server.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/port (\d+)/);
      if (m) resolve(`http://127.0.0.1:${m[1]}/`);
    });
  });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  server?.kill();
});

test('no COOP/COEP headers: the service worker makes the page cross-origin isolated, and threads run', async () => {
  const log = [];
  const page = await newPage(browser, log);
  try {
    const headers = (await (await fetch(url)).headers);
    assert.equal(headers.get('cross-origin-opener-policy'), null, 'the server sends no isolation headers');
    await page.goto(`${url}?prompt=The&n=4&seed=1&temp=0&autorun=1&backend=wasm&threads=2`);
    // The service worker reloads the page (once or twice) before it is isolated; the demo then runs.
    let state;
    for (let i = 0; i < 600; i++) {
      state = await page
        .evaluate(() => ({ isolated: self.crossOriginIsolated, controlled: !!navigator.serviceWorker.controller, demo: { ...window.bitnetDemo } }))
        .catch(() => null); // the page is reloading
      if (state?.isolated && state.demo.done) break;
      await sleep(200);
    }
    assert.ok(state, 'the page answered');
    assert.equal(state.controlled, true, 'the service worker controls the page');
    assert.equal(state.isolated, true, 'crossOriginIsolated');
    assert.equal(state.demo.error, null);
    assert.equal(state.demo.threads, 2);
    assert.equal(state.demo.tokens, 4);
    await page.screenshot({ path: `${OUT}/static-host.png` });
  } catch (err) {
    console.log(`--- page console\n${log.join('\n')}`);
    throw err;
  } finally {
    await page.context().close();
  }
});
