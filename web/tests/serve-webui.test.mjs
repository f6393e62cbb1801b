// `bitnet serve`'s chat page (the demo page of www/, compiled into the binary): opened at the server's own /, it
// runs in server mode by itself (no wasm package there); a message typed and sent, as a person does it, comes
// back streamed over /v1/chat/completions (server-sent events) and equals `bitnet chat`'s reply, rendered through
// the vendored Markdown libraries. The page's files come with their content types; with `--api-key` the page asks
// for the key and chats; `--no-webui` leaves / out.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { BITNET, OUT, ROOT, bitnetWithInput, launch } from './helpers.mjs';

const MODEL = `${ROOT}tests/fixtures/models/tiny-a-i2_s.gguf`;
let browser;
const servers = [];

/** Starts `bitnet serve` on the fixture model and a free port; resolves to its base URL. */
function startServe(...args) {
  const server = spawn(BITNET, ['serve', '-m', MODEL, '--port', '0', '-t', '1', ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  servers.push(server);
  return new Promise((resolve, reject) => {
    let out = '';
    server.on('exit', (code) => reject(new Error(`bitnet serve exited with ${code}: ${out}`)));
    server.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/);
      if (m) resolve(m[1]);
    });
  });
}

before(async () => {
  browser = await launch();
});

after(async () => {
  await browser?.close();
  for (const s of servers) s.kill();
});

test('bitnet serve answers / with its chat page; a message sent there gets a streamed answer', async () => {
  const url = await startServe();
  // `bitnet chat`'s greedy reply on the same model: what the page must show.
  const want = bitnetWithInput('Hi\n', 'chat', '-m', MODEL, '-n', '8', '--temp', '0').slice(0, -1).trim();
  const context = await browser.newContext({ viewport: { width: 1000, height: 900 } });
  const page = await context.newPage();
  const log = [];
  page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  const responses = new Map();
  page.on('response', (r) => responses.set(new URL(r.url()).pathname, r));
  try {
    await page.goto(`${url}/`);
    // Without the wasm package the page picks server mode and offers only that.
    await page.waitForFunction(() => /served without the wasm engine/.test(document.getElementById('status').textContent));
    assert.equal(await page.inputValue('#backend'), 'server');
    assert.match(await page.locator('header .sub').innerText(), /runs on the server/);
    for (const [path, type] of [['/', 'text/html'], ['/app.js', 'text/javascript'], ['/style.css', 'text/css'], ['/vendor/marked.esm.js', 'text/javascript'], ['/vendor/purify.es.mjs', 'text/javascript']]) {
      const r = responses.get(path);
      assert.ok(r, `${path} was loaded`);
      assert.equal(r.status(), 200, path);
      assert.match(r.headers()['content-type'], new RegExp(`^${type}`), path);
    }
    await page.click('#load');
    await page.waitForFunction(() => !document.getElementById('prompt').disabled);
    assert.match(await page.locator('#status').innerText(), /^tiny-a-i2_s · backend server http:\/\/127\.0\.0\.1/);
    await page.fill('#n', '8');
    await page.fill('#temp', '0');
    await page.fill('#seed', '1');
    await page.selectOption('#mode', 'chat');
    await page.fill('#prompt', 'Hi');
    const chat = page.waitForResponse((r) => new URL(r.url()).pathname === '/v1/chat/completions');
    await page.click('#send');
    const r = await chat;
    assert.equal(r.status(), 200);
    assert.match(r.headers()['content-type'], /^text\/event-stream/, 'the answer is streamed');
    assert.equal(JSON.parse(r.request().postData()).stream, true);
    await page.waitForFunction(() => window.bitnetDemo.done, null, { timeout: 120_000, polling: 100 });
    const d = await page.evaluate(() => JSON.parse(JSON.stringify(window.bitnetDemo)));
    assert.equal(d.error, null);
    assert.deepEqual(d.conversation, [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: want }]);
    // The answer is in the chat, as Markdown rendered to HTML (marked and DOMPurify loaded).
    const html = await page.locator('#messages .msg.assistant .body').last().innerHTML();
    assert.match(html, /^<(p|h\d|ul|ol|pre|blockquote|table)[ >]/, `rendered by marked: ${html}`);
    await page.screenshot({ path: `${OUT}/serve-webui.png` });
  } catch (err) {
    console.log(`--- page console\n${log.join('\n')}`);
    throw err;
  } finally {
    await context.close();
  }
});

test('with --api-key the page asks for the key, then chats', async () => {
  const url = await startServe('--api-key', 'sekret');
  const want = bitnetWithInput('Hi\n', 'chat', '-m', MODEL, '-n', '8', '--temp', '0').slice(0, -1).trim();
  const context = await browser.newContext();
  const page = await context.newPage();
  const asked = [];
  page.on('dialog', (d) => {
    asked.push(d.message());
    d.accept('sekret');
  });
  try {
    await page.goto(`${url}/`);
    await page.click('#load');
    await page.waitForFunction(() => !document.getElementById('prompt').disabled);
    assert.equal(asked.length, 1, 'asked for the key once');
    assert.match(asked[0], /API key/);
    await page.fill('#n', '8');
    await page.fill('#temp', '0');
    await page.selectOption('#mode', 'chat');
    await page.fill('#prompt', 'Hi');
    await page.click('#send');
    await page.waitForFunction(() => window.bitnetDemo.done, null, { timeout: 120_000, polling: 100 });
    const d = await page.evaluate(() => JSON.parse(JSON.stringify(window.bitnetDemo)));
    assert.equal(d.error, null);
    assert.deepEqual(d.conversation, [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: want }]);
  } finally {
    await context.close();
  }
});

test('bitnet serve --no-webui serves no page', async () => {
  const url = await startServe('--no-webui');
  for (const path of ['/', '/app.js']) {
    const r = await fetch(`${url}${path}`);
    assert.equal(r.status, 404, path);
  }
  assert.equal((await fetch(`${url}/health`)).status, 200);
});
