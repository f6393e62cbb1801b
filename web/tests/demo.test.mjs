// The demo page's features, driven as a person uses them: a chat with a system prompt (the same text as
// `bitnet chat`), regenerate and copy, conversations kept across reloads, streamed Markdown (sanitized) with the
// live speed, a clean error inside the chat, drag-and-drop of a GGUF file, cancelling a download, dark mode, a
// phone layout, and server mode against `bitnet serve`. Screenshots go to target/web-test/.
// The site is served by a small server here: the built demo with the isolation headers, the small fixture
// model, a download that never ends, and /v1/* passed on to `bitnet serve` (as the server will serve the page).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createReadStream, existsSync, statSync } from 'node:fs';
import { createServer, request } from 'node:http';
import { extname, join, normalize } from 'node:path';
import { BITNET, OUT, ROOT, SITE, bitnetWithInput, launch, newPage } from './helpers.mjs';

const MODEL = `${ROOT}tests/fixtures/models/tiny-a-i2_s.gguf`;
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css', '.wasm': 'application/wasm' };
let site, api, apiPort, browser;

/** `bitnet chat` on the fixture model: the reply to `input` (it prints each reply and a newline). */
const nativeChat = (input, ...args) => bitnetWithInput(`${input}\n`, 'chat', '-m', MODEL, '-n', '8', '--temp', '0', ...args).slice(0, -1);

function serveSite() {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    if (path.startsWith('/v1/')) {
      const up = request({ host: '127.0.0.1', port: apiPort, path: req.url, method: req.method, headers: req.headers }, (r) => {
        res.writeHead(r.statusCode, r.headers);
        r.pipe(res);
      });
      req.pipe(up);
      return;
    }
    const headers = { 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp', 'Cache-Control': 'no-store' };
    if (path === '/slow.gguf') {
      // A 100 MB "download" that never finishes: 64 KiB every 100 ms.
      res.writeHead(200, { ...headers, 'Content-Type': 'application/octet-stream', 'Content-Length': 100e6 });
      const timer = setInterval(() => res.write(Buffer.alloc(65536)), 100);
      res.on('close', () => clearInterval(timer));
      return;
    }
    const file = path === '/tiny.gguf' ? MODEL : join(SITE, normalize(path === '/' ? '/index.html' : path));
    if (!file.startsWith(SITE) && file !== MODEL) return res.writeHead(403).end();
    if (!existsSync(file) || !statSync(file).isFile()) return res.writeHead(404, headers).end();
    res.writeHead(200, { ...headers, 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream', 'Content-Length': statSync(file).size });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

before(async () => {
  api = spawn(BITNET, ['serve', '-m', MODEL, '--port', '0', '-t', '1'], { stdio: ['ignore', 'pipe', 'inherit'] });
  apiPort = await new Promise((resolve, reject) => {
    let out = '';
    api.on('exit', (code) => reject(new Error(`bitnet serve exited with ${code}: ${out}`)));
    api.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (m) resolve(Number(m[1]));
    });
  });
  site = await serveSite();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  site?.close();
  api?.kill();
});

const url = (query) => `http://127.0.0.1:${site.address().port}/?${new URLSearchParams(query)}`;

/** Runs `fn(page)` on a fresh page (own storage); prints the page's console when it throws. */
async function withPage(fn, contextOptions = {}) {
  const log = [];
  const context = await browser.newContext({ viewport: { width: 1000, height: 900 }, ...contextOptions });
  const page = await context.newPage();
  page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  try {
    return await fn(page);
  } catch (err) {
    console.log(`--- page console\n${log.join('\n')}`);
    throw err;
  } finally {
    await context.close();
  }
}

const demoState = (page) => page.evaluate(() => JSON.parse(JSON.stringify(window.bitnetDemo)));
const waitDone = (page) => page.waitForFunction(() => window.bitnetDemo.done, null, { timeout: 300_000, polling: 100 });

/** Records the stats line's texts seen while a reply streams (before it is done). */
const watchLiveSpeed = (page) =>
  page.evaluate(() => {
    window.liveStats = [];
    new MutationObserver(() => window.bitnetDemo.done || window.liveStats.push(document.getElementById('stats').textContent)).observe(
      document.getElementById('stats'),
      { childList: true, characterData: true, subtree: true },
    );
  });

test('chat with a system prompt as bitnet chat; regenerate, copy; the conversation is kept across reloads', async () => {
  const want = nativeChat('Hi', '--system', 'Be brief.');
  await withPage(
    async (page) => {
      await page.goto(url({ model: 'tiny.gguf', backend: 'wasm', threads: 2, n: 8, temp: 0, seed: 1, mode: 'chat', system: 'Be brief.', prompt: 'Hi', autorun: 1 }));
      await waitDone(page);
      let d = await demoState(page);
      assert.equal(d.error, null);
      assert.deepEqual(d.conversation, [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: want.trim() }]);

      await page.evaluate(() => (window.bitnetDemo.done = false)); // set again when the new answer is complete
      await page.click('.regenerate');
      await waitDone(page);
      d = await demoState(page);
      assert.deepEqual(d.conversation, [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: want.trim() }], 'greedy: the same answer again, one turn');
      assert.equal(await page.locator('.msg.user').count(), 1);

      await page.click('.copy');
      assert.equal(await page.evaluate(() => navigator.clipboard.readText()), want.trim());

      await page.goto(url({ model: 'tiny.gguf', backend: 'wasm' }));
      await page.waitForFunction(() => window.bitnetDemo.conversation?.length === 2);
      assert.equal(await page.locator('.msg.user .body').innerText(), 'Hi');
      assert.equal(await page.inputValue('#system'), 'Be brief.');
      await page.screenshot({ path: `${OUT}/demo-restored.png` });
    },
    { permissions: ['clipboard-read', 'clipboard-write'] },
  );
});

test('a streamed answer rendered as sanitized Markdown, with the live speed (default model)', async () => {
  await withPage(async (page) => {
    const prompt = 'Print it with `print(x)`:\n\n```python\nprint("apples")\n```\n\n# Shopping list\n\n1. Apples\n2. Bread\n3.';
    await page.goto(url({ backend: 'wasm', threads: 2, n: 48, temp: 0, seed: 1 }));
    await page.click('#load');
    await page.waitForFunction(() => !document.getElementById('prompt').disabled, null, { timeout: 300_000 });
    await watchLiveSpeed(page);
    await page.selectOption('#mode', 'complete');
    await page.fill('#prompt', prompt);
    await page.click('#send');
    await page.waitForFunction(() => / tokens · [\d.]+ tokens\/s/.test(document.getElementById('stats').textContent) && !window.bitnetDemo.done, null, { timeout: 300_000, polling: 20 });
    await page.screenshot({ path: `${OUT}/demo-markdown-streaming.png`, fullPage: true });
    await waitDone(page);
    const live = await page.evaluate(() => window.liveStats);
    assert.ok(live.some((t) => / tokens · [\d.]+ tokens\/s/.test(t)), `live speed shown while streaming: ${live.slice(0, 3)}`);
    const answer = page.locator('.msg.assistant .body').last();
    assert.equal(await answer.locator('h1').innerText(), 'Shopping list');
    assert.ok((await answer.locator('ol li').count()) >= 2);
    assert.equal(await answer.locator('pre code').innerText(), 'print("apples")\n');
    assert.equal(await answer.locator('p code').first().innerText(), 'print(x)');
    assert.match(await page.locator('#stats').innerText(), /tokens at [\d.]+ tokens\/s/);
    await page.screenshot({ path: `${OUT}/demo-markdown.png` });

    // HTML in a message is sanitized: no script runs.
    await page.fill('#n', '1');
    await page.fill('#prompt', 'A picture: <img src=x onerror="window.pwned = 1"> <script>window.pwned = 2</script>');
    await page.evaluate(() => (window.bitnetDemo.done = false));
    await page.click('#send');
    await waitDone(page);
    assert.equal(await page.locator('.msg.assistant img').count(), 1, 'the image itself stays');
    assert.equal(await page.locator('[onerror]').count(), 0, 'DOMPurify removed the handler');
    assert.equal(await page.locator('#messages script').count(), 0);
    assert.equal(await page.evaluate(() => window.pwned), undefined);
  });
});

test('a failed reply shows an error in the chat and takes its user turn back', async () => {
  await withPage(async (page) => {
    // A context of 64 tokens: the long message cannot fit.
    await page.goto(url({ model: 'tiny.gguf', backend: 'wasm', threads: 1, ctx: 64, n: 8, temp: 0, mode: 'chat' }));
    await page.click('#load');
    await page.waitForFunction(() => !document.getElementById('prompt').disabled);
    const long = Array.from({ length: 80 }, (_, i) => `word${i}`).join(' ');
    await page.fill('#prompt', long);
    await page.click('#send');
    await waitDone(page);
    const d = await demoState(page);
    assert.match(d.error, /context/i);
    assert.deepEqual(d.conversation, [], 'no dangling user turn');
    assert.match(await page.locator('.msg.error').innerText(), /The reply failed: .*context/i);
    assert.equal(await page.inputValue('#prompt'), long, 'the message is back in the prompt box');
    await page.screenshot({ path: `${OUT}/demo-error.png` });
    await page.fill('#prompt', 'Hi');
    await page.click('#send');
    await page.waitForFunction(() => window.bitnetDemo.conversation?.length === 2);
    assert.deepEqual((await demoState(page)).conversation.map((m) => m.role), ['user', 'assistant']);
  });
});

test('drop a GGUF file on the page to load it; cancel a download', async () => {
  await withPage(async (page) => {
    await page.goto(url({ model: 'slow.gguf', backend: 'wasm', threads: 1 }));
    await page.click('#load');
    await page.waitForFunction(() => /Downloading/.test(document.getElementById('status').textContent));
    assert.equal(await page.isVisible('#cancel-load'), true);
    await page.click('#cancel-load');
    await page.waitForFunction(() => document.getElementById('status').textContent === 'Loading cancelled.');
    assert.equal(await page.isVisible('#progress'), false);

    await page.evaluate(async () => {
      const blob = await (await fetch('tiny.gguf')).blob();
      const data = new DataTransfer();
      data.items.add(new File([blob], 'dropped.gguf'));
      document.body.dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
    });
    await page.waitForFunction(() => !document.getElementById('prompt').disabled);
    assert.match(await page.locator('#status').innerText(), /^dropped\.gguf: bitnet-b1\.58, 2 layers/);
    await page.screenshot({ path: `${OUT}/demo-dropped.png` });
  });
});

test('dark mode (the system setting, and the toggle) and a phone layout', async () => {
  await withPage(
    async (page) => {
      await page.goto(url({}));
      const background = async () => {
        await page.waitForFunction(() => document.documentElement.dataset.theme); // set by the page's script
        return page.evaluate(() => getComputedStyle(document.body).backgroundColor);
      };
      assert.equal(await background(), 'rgb(16, 20, 24)');
      const scroll = await page.evaluate(() => document.documentElement.scrollWidth);
      assert.ok(scroll <= 390, `no horizontal scrolling on a phone (${scroll} px wide)`);
      await page.screenshot({ path: `${OUT}/demo-phone-dark.png`, fullPage: true });
      await page.click('#theme');
      assert.equal(await background(), 'rgb(246, 247, 249)');
      await page.reload();
      assert.equal(await background(), 'rgb(246, 247, 249)', 'the choice is kept');
    },
    { colorScheme: 'dark', viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true },
  );
});

test('server mode: the same chat against bitnet serve (/v1/chat/completions, streamed)', async () => {
  const want = nativeChat('Hi');
  await withPage(async (page) => {
    await page.goto(url({ backend: 'server', n: 8, temp: 0, seed: 1, mode: 'chat', prompt: 'Hi', autorun: 1 }));
    await waitDone(page);
    const d = await demoState(page);
    assert.equal(d.error, null);
    assert.deepEqual(d.conversation, [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: want.trim() }]);
    assert.match(await page.locator('#status').innerText(), /^tiny-a-i2_s · backend server http:\/\/127\.0\.0\.1/);
    await page.screenshot({ path: `${OUT}/demo-server.png` });
  });
  // Served as `bitnet serve` would serve it, without the package (bitnet/): server mode on its own.
  await withPage(async (page) => {
    await page.route('**/bitnet/**', (route) => route.fulfill({ status: 404 }));
    await page.goto(url({ n: 8, temp: 0, seed: 1, mode: 'chat', prompt: 'Hi', autorun: 1 }));
    await waitDone(page);
    const d = await demoState(page);
    assert.equal(d.error, null);
    assert.equal(await page.inputValue('#backend'), 'server');
    assert.deepEqual(d.conversation, [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: want.trim() }]);
  });
});
