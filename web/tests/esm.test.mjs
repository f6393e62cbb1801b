// The npm package as a user gets it: `npm pack` of web/pkg, installed into a fresh folder, imported by a plain
// HTML page through an import map (no bundler), served by `bitnet serve-www`. Uses the small fixture model;
// texts are checked against `bitnet run` / `bitnet chat`.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { OUT, ROOT, bitnetWithInput, launch, nativeRun, newPage, serve } from './helpers.mjs';

const MODEL = `${ROOT}tests/fixtures/models/tiny-a-i2_s.gguf`;
const PROMPT = 'Hello world, the';
const site = `${OUT}/esm-site`;
let server, browser, page;
const log = [];

before(async () => {
  rmSync(site, { recursive: true, force: true });
  mkdirSync(site, { recursive: true });
  const tarball = execFileSync('npm', ['pack', `${ROOT}web/pkg`, '--pack-destination', site], { encoding: 'utf8' }).trim().split('\n').pop();
  writeFileSync(`${site}/package.json`, JSON.stringify({ name: 'esm-test', private: true, type: 'module' }));
  execFileSync('npm', ['install', '--no-audit', '--no-fund', `./${tarball}`], { cwd: site, stdio: 'inherit' });
  copyFileSync(MODEL, `${site}/tiny.gguf`);
  writeFileSync(
    `${site}/index.html`,
    `<!doctype html><meta charset="utf-8"><title>bitnet-web ESM test</title>
<script type="importmap">{ "imports": { "bitnet-web": "./node_modules/bitnet-web/index.js" } }</script>
<script type="module">
  import { BitNet } from 'bitnet-web';
  window.BitNet = BitNet;
</script>`,
  );
  server = await serve(site);
  browser = await launch();
  page = await newPage(browser, log);
  await page.goto(server.url);
  await page.waitForFunction(() => window.BitNet);
});

after(async () => {
  await browser?.close();
  server?.stop();
});

/** Runs `fn(BitNet, arg)` in the page; prints the page's console on failure. */
async function inPage(fn, arg) {
  try {
    return await page.evaluate(`(${fn})(window.BitNet, ${JSON.stringify(arg)})`);
  } catch (err) {
    console.log(`--- page console\n${log.join('\n')}`);
    throw err;
  }
}

test('the package ships its types, and a user file type-checks against them', () => {
  for (const f of ['index.js', 'index.d.ts', 'types.d.ts', 'worker.js', 'st/bitnet_web_bg.wasm', 'mt/bitnet_web_bg.wasm', 'README.md']) {
    assert.ok(existsSync(`${site}/node_modules/bitnet-web/${f}`), f);
  }
  writeFileSync(
    `${site}/user.ts`,
    `import { BitNet, type GenerationStats, type Progress } from 'bitnet-web';
const model = await BitNet.load('x.gguf', { backend: 'auto', onProgress: (p: Progress) => console.log(p.loaded / p.total) });
for await (const text of model.generate('Hi', { maxTokens: 5, signal: new AbortController().signal })) console.log(text.toUpperCase());
const stats: GenerationStats = await model.chat([{ role: 'user', content: 'hi' }]).stats;
console.log(stats.decodeTokensPerSecond, model.info.nLayer, (await BitNet.cache.list()).map((m) => m.url));
`,
  );
  const tsc = `${ROOT}web/node_modules/.bin/tsc`;
  execFileSync(tsc, ['--noEmit', '--strict', '--target', 'es2022', '--module', 'es2022', '--moduleResolution', 'bundler',
    '--lib', 'es2022,dom,dom.iterable', 'user.ts'], { cwd: site, stdio: 'inherit' });
});

for (const threads of [2, 1]) {
  test(`load by URL (then from the cache), generate as bitnet run does: ${threads === 1 ? 'single-threaded' : 'threaded'} build`, async () => {
    const want = nativeRun('-m', MODEL, '-p', PROMPT, '-n', '12', '--temp', '0', '--seed', '1');
    const got = await inPage(
      async (BitNet, { prompt, threads }) => {
        await BitNet.cache.clear();
        const phases = [];
        const onProgress = (p) => phases.includes(p.phase) || phases.push(p.phase);
        let model = await BitNet.load('tiny.gguf', { backend: 'wasm', threads, onProgress });
        let text = '';
        const gen = model.generate(prompt, { maxTokens: 12, temperature: 0, seed: 1 });
        for await (const piece of gen) text += piece;
        const stats = await gen.stats;
        const cached = await BitNet.cache.list();
        model.unload();
        const phasesAgain = [];
        model = await BitNet.load('tiny.gguf', { threads, onProgress: (p) => phasesAgain.includes(p.phase) || phasesAgain.push(p.phase) });
        const again = await model.generate(prompt, { maxTokens: 12, temperature: 0 }).text();
        const info = model.info;
        model.unload();
        return { text, again, stats, phases, phasesAgain, cached, info };
      },
      { prompt: PROMPT, threads },
    );
    assert.equal(got.text, want);
    assert.equal(got.again, want);
    assert.deepEqual(got.phases, ['download', 'load']);
    assert.deepEqual(got.phasesAgain, ['cache', 'load']);
    assert.deepEqual(got.cached.map((m) => [m.url, m.size]), [[`${server.url}tiny.gguf`, 215552]]);
    assert.equal(got.stats.generatedTokens, 12);
    assert.equal(got.stats.stop, 'MaxTokens');
    assert.equal(got.stats.seed, 1);
    assert.ok(got.stats.decodeTokensPerSecond > 0);
    assert.equal(got.info.threads, threads);
    assert.equal(got.info.build.threads, threads > 1);
    // The second load asked for `auto`: the page's only WebGPU adapter is SwiftShader, which auto skips.
    assert.equal(got.info.backend, 'cpu/simd128');
    assert.equal(got.info.backendNote, 'the only WebGPU adapter is a software one');
  });
}

test('chat, abort, break, and errors', async () => {
  // `bitnet chat` prints each reply and a newline.
  const wantChat = bitnetWithInput('Hi\n', 'chat', '-m', MODEL, '-n', '8', '--temp', '0').slice(0, -1);
  const got = await inPage(
    async (BitNet, { prompt }) => {
      const bytes = new Uint8Array(await (await fetch('tiny.gguf')).arrayBuffer());
      const model = await BitNet.load(new Blob([bytes]), { threads: 1 });
      const chat = await model.chat([{ role: 'user', content: 'Hi' }], { maxTokens: 8, temperature: 0 }).text();

      const controller = new AbortController();
      const gen = model.generate(prompt, { maxTokens: 200, signal: controller.signal });
      let pieces = 0;
      let abortName = null;
      try {
        for await (const piece of gen) if (++pieces === 3) controller.abort();
      } catch (err) {
        abortName = err.name;
      }
      const aborted = await gen.stats;

      for await (const piece of model.generate(prompt, { maxTokens: 50 })) break; // stops it
      const afterBreak = await model.generate(prompt, { maxTokens: 4, temperature: 0 }).stats;
      model.unload();

      const error = async (source) => BitNet.load(source, { cache: false }).then(() => 'loaded', (e) => e.message);
      return {
        chat,
        abortName,
        aborted,
        afterBreak,
        notGguf: await error(new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8])),
        missing: await error('missing.gguf'),
        truncated: await error(bytes.slice(0, 100000)),
      };
    },
    { prompt: PROMPT },
  );
  assert.equal(got.chat, wantChat);
  assert.equal(got.abortName, 'AbortError');
  assert.equal(got.aborted.stop, 'Aborted');
  assert.ok(got.aborted.generatedTokens < 200, `aborted after ${got.aborted.generatedTokens} tokens`);
  assert.equal(got.afterBreak.generatedTokens, 4);
  assert.match(got.notGguf, /GGUF/);
  assert.match(got.missing, /HTTP 404/);
  assert.match(got.truncated, /run past the end of the 100000-byte file/);
});
