// Structured output and embeddings in the npm package (web/pkg, served as built, imported by a plain page):
// JSON schemas, JSON objects and Lark grammars constrain the browser's tokens as `bitnet run --json-schema` /
// `--grammar` constrain the CLI's (same text at temperature 0, on wasm and WebGPU; sampled outputs validated
// with Ajv), bad schemas and grammars are clear errors; embed() and embeddings.create() equal `bitnet embed --json`.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import Ajv from 'ajv';
import { OUT, ROOT, bitnet, nativeRun, openBitNetPage } from './helpers.mjs';

const MODELS = `${ROOT}tests/fixtures/models`;
const site = `${OUT}/structured-site`;
const SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 10 },
    age: { type: 'integer', minimum: 0, maximum: 120 },
    color: { enum: ['red', 'green', 'blue'] },
    tags: { type: 'array', items: { type: 'boolean' }, maxItems: 3 },
  },
  required: ['name', 'age', 'color', 'tags'],
  additionalProperties: false,
};
// As tests/cli.rs's grammar test: "Answer: ", 1 to 3 digits not starting with 0, " ", a unit.
const GRAMMAR = 'start: "Answer: " NUM " " UNIT\nNUM: /[1-9][0-9]{0,2}/\nUNIT: "cm" | "kg"\n';
const SENTENCE = /^Answer: [1-9][0-9]{0,2} (cm|kg)$/;
/** The open page (openBitNetPage). */
let opened;
const log = [];

before(async () => {
  rmSync(site, { recursive: true, force: true });
  mkdirSync(site, { recursive: true });
  cpSync(`${ROOT}web/pkg`, `${site}/bitnet`, { recursive: true });
  for (const m of ['tiny-a-i2_s.gguf', 'qwen3-embed-i2_s.gguf']) cpSync(`${MODELS}/${m}`, `${site}/${m}`);
  writeFileSync(
    `${site}/index.html`,
    `<!doctype html><meta charset="utf-8"><title>bitnet-web structured output test</title>
<script type="module">
  import { BitNet } from './bitnet/index.js';
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

/** `bitnet run` on the tiny model with a schema or grammar file. */
function nativeConstrained(flag, contents, ...args) {
  const file = `${site}/constraint-${flag}`;
  writeFileSync(file, contents);
  return nativeRun('-m', `${MODELS}/tiny-a-i2_s.gguf`, ...args, `--${flag}`, file);
}

// SwiftShader takes about 30 ms a token: WebGPU only checks the greedy output.
const BUILDS = [
  { backend: 'wasm', threads: 2, name: 'threaded build', seeds: 4 },
  { backend: 'wasm', threads: 1, name: 'single-threaded build', seeds: 4 },
  { backend: 'webgpu', threads: 1, name: 'WebGPU (SwiftShader)', seeds: 0 },
];
for (const { backend, threads, name, seeds } of BUILDS) {
  test(`json_schema: the output validates, and at temperature 0 is bitnet run --json-schema's (${name})`, async () => {
    const want = nativeConstrained('json-schema', JSON.stringify(SCHEMA), '-p', 'Data:', '-n', '120', '--temp', '0');
    const got = await inPage(
      async (BitNet, { schema, backend, threads, seeds }) => {
        const model = await BitNet.load('tiny-a-i2_s.gguf', { backend, threads, cache: false });
        const response_format = { type: 'json_schema', json_schema: { name: 'person', schema, strict: true } };
        const greedy = await model.completions.create({ prompt: 'Data:', max_tokens: 120, temperature: 0, response_format });
        const sampled = [];
        for (let seed = 1; seed <= seeds; seed++) {
          const messages = [{ role: 'user', content: 'Describe a person.' }];
          const r = await model.chat.completions.create({ messages, max_tokens: 120, temperature: 1, seed, response_format });
          sampled.push({ text: r.choices[0].message.content, finish: r.choices[0].finish_reason });
        }
        // The package's own API, streamed piece by piece.
        let streamed = null;
        if (seeds) {
          streamed = '';
          const responseFormat = { type: 'json_schema', json_schema: { schema } };
          for await (const piece of model.generate('Data:', { maxTokens: 120, temperature: 0, responseFormat })) streamed += piece;
        }
        model.unload();
        return { greedy: greedy.choices[0], sampled, streamed, backend: model.backend };
      },
      { schema: SCHEMA, backend, threads, seeds },
    );
    const validate = new Ajv().compile(SCHEMA);
    assert.match(got.backend, backend === 'webgpu' ? /^wgpu/ : /^cpu/);
    assert.equal(got.greedy.text, want);
    assert.equal(got.greedy.finish_reason, 'stop');
    if (seeds) assert.equal(got.streamed, want);
    for (const { text, finish } of [{ text: want, finish: 'stop' }, ...got.sampled]) {
      assert.equal(finish, 'stop', text);
      const value = JSON.parse(text);
      assert.ok(validate(value), `${text}: ${JSON.stringify(validate.errors)}`);
    }
  });
}

test('json_object parses (streamed chat); a Lark grammar is followed, as bitnet run --grammar', async () => {
  const want = nativeConstrained('grammar', GRAMMAR, '-p', 'Size:', '-n', '20', '--temp', '0');
  const got = await inPage(
    async (BitNet, { grammar }) => {
      const model = await BitNet.load('tiny-a-i2_s.gguf', { threads: 1, cache: false });
      const objects = [];
      for (const seed of [1, 2, 3]) {
        const messages = [{ role: 'user', content: 'Some data please.' }];
        const stream = await model.chat.completions.create({ messages, max_tokens: 80, temperature: 0.8, seed, stream: true, response_format: { type: 'json_object' } });
        let text = '';
        let finish = null;
        for await (const c of stream) {
          text += c.choices[0]?.delta.content ?? '';
          finish = c.choices[0]?.finish_reason ?? finish;
        }
        objects.push({ text, finish });
      }
      const greedy = await model.completions.create({ prompt: 'Size:', max_tokens: 20, temperature: 0, grammar });
      const own = await model.generate('Size:', { maxTokens: 20, temperature: 0, grammar }).text();
      const sampled = [];
      for (const seed of [1, 2, 3, 4]) sampled.push(await model.generate('Size:', { maxTokens: 20, temperature: 1, seed, grammar }).text());
      const free = await model.completions.create({ prompt: 'Size:', max_tokens: 3, response_format: { type: 'text' } });
      model.unload();
      return { objects, greedy: greedy.choices[0], own, sampled, free: free.usage.completion_tokens };
    },
    { grammar: GRAMMAR },
  );
  for (const { text, finish } of got.objects) {
    assert.equal(finish, 'stop', text);
    const value = JSON.parse(text);
    assert.ok(typeof value === 'object' && value !== null && !Array.isArray(value), text);
  }
  assert.equal(got.greedy.text, want);
  assert.equal(got.greedy.finish_reason, 'stop');
  assert.equal(got.own, want);
  for (const text of [want, ...got.sampled]) assert.match(text, SENTENCE);
  assert.equal(got.free, 3);
});

test('bad schemas, grammars and formats are clear errors, and the model works after them', async () => {
  const got = await inPage(
    async (BitNet, { grammar }) => {
      const model = await BitNet.load('tiny-a-i2_s.gguf', { threads: 1, cache: false });
      const messages = [{ role: 'user', content: 'x' }];
      const error = (p) => Promise.resolve(p).then(() => 'no error', (e) => e.message);
      const schema = (s) => ({ type: 'json_schema', json_schema: { name: 'x', schema: s } });
      const errors = {
        schema: await error(model.chat.completions.create({ messages, response_format: schema({ type: 'nonsense' }) })),
        schemaStreamed: await error(model.completions.create({ prompt: 'a', stream: true, response_format: schema({ type: 5 }) })),
        grammar: await error(model.completions.create({ prompt: 'a', grammar: 'start: ) (' })),
        ownSchema: await error(model.generate('a', { responseFormat: schema({ type: 'nonsense' }) }).text()),
        ownGrammar: await error(model.generate('a', { grammar: 'start: ) (' }).text()),
        ownBoth: await error(model.generate('a', { grammar, responseFormat: { type: 'json_object' } }).text()),
        noSchema: await error(model.completions.create({ prompt: 'a', response_format: { type: 'json_schema' } })),
        notObject: await error(model.completions.create({ prompt: 'a', response_format: schema([1]) })),
        yaml: await error(model.completions.create({ prompt: 'a', response_format: { type: 'yaml' } })),
        extra: await error(model.completions.create({ prompt: 'a', response_format: { type: 'json_object', schema: {} } })),
        both: await error(model.completions.create({ prompt: 'a', grammar, response_format: { type: 'json_object' } })),
        embed: await error(model.embed('a')),
      };
      const after = await model.completions.create({ prompt: 'Size:', max_tokens: 20, temperature: 0, grammar });
      model.unload();
      return { errors, after: after.choices[0].text };
    },
    { grammar: GRAMMAR },
  );
  const e = got.errors;
  assert.match(e.schema, /the grammar does not compile: .*nonsense/);
  assert.match(e.schemaStreamed, /the grammar does not compile/);
  assert.match(e.grammar, /the grammar does not compile/);
  assert.match(e.ownSchema, /the grammar does not compile: .*nonsense/);
  assert.match(e.ownGrammar, /the grammar does not compile/);
  assert.match(e.ownBoth, /response_format and grammar cannot be combined/);
  assert.match(e.noSchema, /response_format of type json_schema needs json_schema/);
  assert.match(e.notObject, /response_format\.json_schema\.schema must be a JSON schema/);
  assert.match(e.yaml, /response_format type 'yaml' is not supported \(text, json_object, json_schema\)/);
  assert.match(e.extra, /bad response_format: unknown field `schema`/);
  assert.match(e.both, /response_format and grammar cannot be combined/);
  assert.match(e.embed, /not an embedding model/);
  assert.match(got.after, SENTENCE);
});

test('embed() and embeddings.create() equal bitnet embed --json (cosine >= 0.9999)', async () => {
  const model = `${MODELS}/qwen3-embed-i2_s.gguf`;
  const texts = ['Hello world', 'naïve café 中文'];
  const want = texts.map((t) => JSON.parse(bitnet('embed', '-m', model, '-p', t, '--json')));
  const got = await inPage(
    async (BitNet, { texts, ids }) => {
      const model = await BitNet.load('qwen3-embed-i2_s.gguf', { backend: 'wasm', threads: 1, cache: false });
      const one = Array.from(await model.embed(texts[0]));
      const many = (await model.embed(texts)).map((e) => Array.from(e));
      const openai = await model.embeddings.create({ input: texts, model: 'e' });
      const fromIds = await model.embeddings.create({ input: ids });
      const base64 = await model.embeddings.create({ input: texts[0], encoding_format: 'base64' });
      const decoded = Array.from(new Float32Array(Uint8Array.from(atob(base64.data[0].embedding), (c) => c.charCodeAt(0)).buffer));
      const error = (p) => p.then(() => 'no error', (e) => e.message);
      const errors = {
        generate: await error(model.generate('a').text()),
        empty: await error(model.embeddings.create({ input: [] })),
        emptyText: await error(model.embeddings.create({ input: ['a', ''] })),
        dimensions: await error(model.embeddings.create({ input: 'a', dimensions: 8 })),
        vocab: await error(model.embeddings.create({ input: [1, 1e6] })),
        aborted: await model.embeddings.create({ input: 'a' }, { signal: AbortSignal.abort() }).then(() => 'no error', (e) => e.name),
      };
      model.unload();
      return { one, many, openai, fromIds, decoded, errors, embedding: model.info.embedding };
    },
    { texts, ids: want[0].tokens },
  );
  const cosine = (a, b) => {
    let dot = 0, na = 0, nb = 0;
    for (let i = 0; i < a.length; i++) [dot, na, nb] = [dot + a[i] * b[i], na + a[i] * a[i], nb + b[i] * b[i]];
    return dot / Math.sqrt(na * nb);
  };
  const close = (got, wanted, what) => {
    assert.equal(got.length, wanted.length, `${what}: length`);
    const c = cosine(got, wanted);
    assert.ok(c >= 0.9999, `${what}: cosine ${c}`);
  };
  assert.equal(got.embedding, true);
  close(got.one, want[0].embedding, 'embed(text)');
  texts.forEach((t, i) => close(got.many[i], want[i].embedding, `embed([...])[${i}]`));
  assert.equal(got.openai.object, 'list');
  assert.equal(got.openai.model, 'e');
  assert.deepEqual(got.openai.data.map((d) => [d.object, d.index]), [['embedding', 0], ['embedding', 1]]);
  texts.forEach((t, i) => assert.deepEqual(got.openai.data[i].embedding, got.many[i]));
  const tokens = want[0].tokens.length + want[1].tokens.length;
  assert.deepEqual(got.openai.usage, { prompt_tokens: tokens, total_tokens: tokens });
  assert.deepEqual(got.fromIds.data[0].embedding, got.one);
  assert.deepEqual(got.decoded, got.one);
  assert.match(got.errors.generate, /embedding model: it cannot generate text/);
  assert.match(got.errors.empty, /input is empty/);
  assert.match(got.errors.emptyText, /input 1 is empty/);
  assert.match(got.errors.dimensions, /unsupported field: dimensions/);
  assert.match(got.errors.vocab, /outside the vocabulary/);
  assert.equal(got.errors.aborted, 'AbortError');
});
