// The npm package as a user gets it: `npm pack` of web/pkg, installed into a fresh folder, imported by a plain
// HTML page through an import map (no bundler), served by `bitnet serve-www`. Uses the small fixture model;
// texts are checked against `bitnet run` / `bitnet chat`.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { OUT, ROOT, bitnet, bitnetWithInput, nativeRun, openBitNetPage } from './helpers.mjs';

const MODEL = `${ROOT}tests/fixtures/models/tiny-a-i2_s.gguf`;
const PROMPT = 'Hello world, the';
const site = `${OUT}/esm-site`;
/** The open page (openBitNetPage). */
let opened;
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
  opened = await openBitNetPage(site, log);
});

after(async () => {
  await opened?.close();
});

/** Runs `fn(BitNet, arg)` in the page; prints the page's console on failure. */
const inPage = (fn, arg) => opened.inPage(fn, arg);

test('the package ships its types, and a user file type-checks against them', () => {
  for (const f of ['index.js', 'index.d.ts', 'types.d.ts', 'worker.js', 'st/bitnet_web_bg.wasm', 'mt/bitnet_web_bg.wasm', 'README.md']) {
    assert.ok(existsSync(`${site}/node_modules/bitnet-web/${f}`), f);
  }
  writeFileSync(
    `${site}/user.ts`,
    `import { BitNet, type ChatCompletion, type Completion, type CreateEmbeddingResponse, type GenerationStats, type Progress } from 'bitnet-web';
const model = await BitNet.load('x.gguf', { backend: 'auto', onProgress: (p: Progress) => console.log(p.loaded / p.total) });
for await (const text of model.generate('Hi', { maxTokens: 5, signal: new AbortController().signal })) console.log(text.toUpperCase());
const stats: GenerationStats = await model.chat([{ role: 'user', content: 'hi' }]).stats;
console.log(stats.decodeTokensPerSecond, model.info.nLayer, (await BitNet.cache.list()).map((m) => m.url));
const stream = await model.chat.completions.create({ messages: [{ role: 'user', content: 'hi' }], stream: true, max_tokens: 4 });
for await (const chunk of stream) console.log(chunk.choices[0]?.delta.content ?? '', chunk.usage?.total_tokens);
stream.controller.abort();
const whole: ChatCompletion = await model.chat.completions.create({ messages: [], temperature: 0 }, { signal: AbortSignal.timeout(1000) });
console.log(whole.choices[0].message.content.length, whole.usage.prompt_tokens_details.cached_tokens);
const done: Completion = await model.completions.create({ prompt: 'x', stop: ['\\n'], seed: 1 });
console.log(done.choices[0].text, done.usage?.completion_tokens);
const ids: number[] = await model.tokenize('x', { addBos: true });
const logits: Float32Array = await model.logits(ids);
console.log(await model.detokenize(ids), logits.length);
const schema = { type: 'object', properties: { n: { type: 'integer' } } };
const json: ChatCompletion = await model.chat.completions.create({ messages: [], response_format: { type: 'json_schema', json_schema: { name: 'n', schema, strict: true } } });
await model.completions.create({ prompt: 'x', grammar: 'start: "a"', stream: true });
console.log(json.choices[0].message.content, await model.generate('x', { grammar: 'start: "a"', responseFormat: { type: 'text' } }).text());
const one: Float32Array = await model.embed('a');
const many: Float32Array[] = await model.embed(['a', 'b']);
const either: Float32Array | Float32Array[] = await model.embed(Math.random() < 0.5 ? 'a' : ['a']);
const embeddings: CreateEmbeddingResponse = await model.embeddings.create({ input: [[1, 2]], encoding_format: 'base64' });
console.log(one.length, many.length, either.length, embeddings.usage.total_tokens, model.info.embedding);
// @ts-expect-error: a field the API does not know is a type error too
await model.completions.create({ prompt: 'x', frequency_penalty: 1 });
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
    assert.deepEqual(got.cached.map((m) => [m.url, m.size]), [[`${opened.server.url}tiny.gguf`, 215552]]);
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

test('tokenize, detokenize and logits, as bitnet logits', async () => {
  const want = JSON.parse(bitnet('logits', '-m', MODEL, '-p', PROMPT, '--top', '10'));
  const got = await inPage(
    async (BitNet, { prompt }) => {
      const model = await BitNet.load('tiny.gguf', { threads: 1, cache: false });
      const tokens = await model.tokenize(prompt, { addBos: true });
      const plain = await model.tokenize(prompt);
      const text = await model.detokenize(plain);
      const logits = await model.logits(tokens);
      model.unload();
      return { tokens, plain, text, logits: Array.from(logits), n: model.info.nVocab };
    },
    { prompt: PROMPT },
  );
  assert.deepEqual(got.tokens, want.tokens);
  assert.deepEqual(got.plain, want.tokens.slice(1));
  assert.equal(got.text, PROMPT);
  assert.equal(got.logits.length, got.n);
  const argmax = got.logits.indexOf(Math.max(...got.logits));
  assert.equal(argmax, want.top[0][0]);
  // SIMD128 sums floats in another order than native's kernels: equal to a few ulps of the activations' scale.
  for (const [id, value] of want.top) assert.ok(Math.abs(got.logits[id] - value) < 0.05, `logit ${id}: ${got.logits[id]} vs ${value}`);
});

test('OpenAI-shaped API: chat and completions, streamed and not, with usage; the same text as the current API', async () => {
  const wantChat = bitnetWithInput('Hi\n', 'chat', '-m', MODEL, '-n', '8', '--temp', '0').slice(0, -1);
  const wantRun = nativeRun('-m', MODEL, '-p', PROMPT, '-n', '12', '--temp', '0', '--seed', '1');
  const got = await inPage(
    async (BitNet, { prompt }) => {
      const model = await BitNet.load('tiny.gguf', { threads: 2, cache: false });
      const messages = [{ role: 'user', content: 'Hi' }];
      const current = await model.chat(messages, { maxTokens: 8, temperature: 0 }).stats;
      const chunks = [];
      const stream = await model.chat.completions.create({ messages, stream: true, max_tokens: 8, temperature: 0, stream_options: { include_usage: true } });
      for await (const c of stream) chunks.push(c);
      const whole = await model.chat.completions.create({ model: 'x', messages, max_tokens: 8, temperature: 0 });
      const completion = await model.completions.create({ prompt, max_tokens: 12, temperature: 0, seed: 1 });
      const pieces = [];
      for await (const c of await model.completions.create({ prompt, max_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true } })) pieces.push(c);
      const stopAt = completion.choices[0].text.slice(4, 7);
      const stopped = await model.completions.create({ prompt, max_tokens: 12, temperature: 0, stop: stopAt });
      model.unload();
      return { current, chunks, whole, completion, pieces, stopAt, stopped };
    },
    { prompt: PROMPT },
  );
  // Chat, streamed: a role chunk, content chunks, a finish chunk, then the usage chunk.
  const { chunks } = got;
  assert.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' });
  assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk' && c.id === chunks[0].id && c.model === 'tiny.gguf'));
  assert.equal(chunks.slice(1, -2).map((c) => c.choices[0].delta.content).join(''), wantChat);
  const finish = chunks.at(-2).choices[0].finish_reason;
  assert.equal(finish, got.current.generatedTokens === 8 ? 'length' : 'stop');
  const usage = chunks.at(-1).usage;
  assert.deepEqual(chunks.at(-1).choices, []);
  assert.equal(usage.completion_tokens, got.current.generatedTokens);
  // The same conversation again: all of its prompt but the last token was in the cache.
  assert.equal(usage.prompt_tokens, got.current.promptTokens + got.current.cachedTokens);
  assert.equal(usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens - 1);
  assert.equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
  // Chat, not streamed.
  assert.equal(got.whole.object, 'chat.completion');
  assert.equal(got.whole.model, 'x');
  assert.deepEqual(got.whole.choices[0].message, { role: 'assistant', content: wantChat });
  assert.equal(got.whole.choices[0].finish_reason, finish);
  assert.equal(got.whole.usage.completion_tokens, usage.completion_tokens);
  // Completions.
  assert.equal(got.completion.object, 'text_completion');
  assert.equal(got.completion.choices[0].text, wantRun);
  assert.equal(got.completion.choices[0].finish_reason, 'length');
  assert.equal(got.completion.usage.completion_tokens, 12);
  assert.equal(got.completion.usage.prompt_tokens, 9); // BOS and 8 tokens, as bitnet logits shows
  assert.equal(got.pieces.slice(0, -2).map((c) => c.choices[0].text).join(''), wantRun);
  assert.equal(got.pieces.at(-2).choices[0].finish_reason, 'length');
  assert.equal(got.pieces.at(-1).usage.completion_tokens, 12);
  assert.equal(got.stopped.choices[0].text, wantRun.slice(0, wantRun.indexOf(got.stopAt)));
  assert.equal(got.stopped.choices[0].finish_reason, 'stop');
});

test('OpenAI-shaped API: unknown and unsupported fields are errors naming them; abort stops the prompt pass too', async () => {
  const got = await inPage(
    async (BitNet, { prompt }) => {
      const model = await BitNet.load('tiny.gguf', { threads: 1, cache: false });
      const error = (p) => p.then(() => 'no error', (e) => `${e.name}: ${e.message}`);
      const errors = {
        unknown: await error(model.completions.create({ prompt, foo: 1, logit_bias: { 1: 2 } })),
        format: await error(model.chat.completions.create({ messages: [{ role: 'user', content: 'x' }], response_format: { type: 'yaml' } })),
        n: await error(model.completions.create({ prompt, n: 2 })),
        temperature: await error(model.completions.create({ prompt, temperature: -1 })),
        messages: await error(model.chat.completions.create({ messages: [{ role: 'user', content: 'x', tool_calls: [] }] })),
        text: await model.completions.create({ prompt, max_tokens: 1, response_format: { type: 'text' }, user: 'u' }).then((c) => c.choices[0].finish_reason),
      };

      // Abort while streaming (the stream's own controller, as the OpenAI client's).
      const stream = await model.completions.create({ prompt, max_tokens: 200, stream: true });
      let chunks = 0;
      let streamAbort = null;
      try {
        for await (const c of stream) if (++chunks === 3) stream.controller.abort();
      } catch (e) {
        streamAbort = e.name;
      }

      // Abort during a long prompt: the worker stops between prompt chunks, so only part of it is evaluated,
      // which the next request with that prompt finds in the cache.
      const long = Array.from({ length: 40 }, (_, i) => `word${i}`).join(' ');
      await model.tokenize('x'); // requests run in order: once this answers, the worker is idle and starts the next at once
      const controller = new AbortController();
      const gen = model.generate(long, { maxTokens: 5, signal: controller.signal });
      controller.abort();
      const partial = await gen.stats;
      const signalled = new AbortController();
      const pending = model.completions.create({ prompt: long, max_tokens: 5 }, { signal: signalled.signal });
      signalled.abort();
      const openaiAbort = await error(pending);
      const full = await model.completions.create({ prompt: long, max_tokens: 1, temperature: 0 });
      model.unload();
      return { errors, chunks, streamAbort, partial, openaiAbort, fullUsage: full.usage };
    },
    { prompt: PROMPT },
  );
  assert.match(got.errors.unknown, /^TypeError: unsupported fields: foo, logit_bias/);
  assert.match(got.errors.format, /response_format type 'yaml' is not supported/);
  assert.match(got.errors.n, /n: only n = 1/);
  assert.match(got.errors.temperature, /temperature = -1 is out of range/);
  assert.match(got.errors.messages, /messages\[0\]: unsupported field: tool_calls/);
  assert.equal(got.errors.text, 'length');
  assert.equal(got.chunks, 3);
  assert.equal(got.streamAbort, 'AbortError');
  assert.match(got.openaiAbort, /^AbortError/);
  const total = got.fullUsage.prompt_tokens;
  assert.ok(total > 64, `the long prompt has ${total} tokens (more than two chunks)`);
  assert.equal(got.partial.stop, 'Aborted');
  assert.equal(got.partial.generatedTokens, 0);
  assert.ok(got.partial.promptTokens > 0 && got.partial.promptTokens < total, `${got.partial.promptTokens} of ${total} prompt tokens evaluated before the abort`);
  // What the aborted prompt passes evaluated stayed in the cache; the last one stopped early too.
  assert.ok(got.fullUsage.prompt_tokens_details.cached_tokens < total - 1, `cached ${got.fullUsage.prompt_tokens_details.cached_tokens} of ${total}`);
});
