// "Server mode": the same chat against `bitnet serve`'s OpenAI API (POST /v1/chat/completions and
// /v1/completions with stream: true, read as server-sent events). Shaped like the package's Generation:
// an async iterable of text pieces with `stats`, `abort()`, and a live speed.

/** Where the API key of a server run with --api-key is kept: this tab only, gone when it closes. */
const KEY_ITEM = 'bitnet-server-api-key';

export class ServerModel {
  constructor(base) {
    this.base = new URL(base || location.href);
    this.key = sessionStorage.getItem(KEY_ITEM) ?? '';
  }

  /** The Authorization header, once a key is known. */
  auth() {
    return this.key ? { authorization: `Bearer ${this.key}` } : {};
  }

  /** Checks that the server answers (asking for its API key if it wants one); resolves to its model's name. */
  async connect() {
    const models = new URL('/v1/models', this.base);
    let resp = await fetch(models, { headers: this.auth() });
    if (resp.status === 401) {
      this.key = window.prompt('This server wants an API key (bitnet serve --api-key):') ?? '';
      resp = await fetch(models, { headers: this.auth() });
    }
    if (!resp.ok) throw new Error(`the server answered HTTP ${resp.status} to /v1/models`);
    if (this.key) sessionStorage.setItem(KEY_ITEM, this.key);
    const body = await resp.json();
    this.info = { backend: `server ${this.base.origin}`, threads: null, name: body.data?.[0]?.id ?? 'model' };
    return this.info.name;
  }

  chat(messages, options) {
    return new ServerGeneration(new URL('/v1/chat/completions', this.base), this.auth(), { messages, ...wire(options) }, (c) => c.choices[0]?.delta?.content);
  }

  generate(prompt, options) {
    return new ServerGeneration(new URL('/v1/completions', this.base), this.auth(), { prompt, ...wire(options) }, (c) => c.choices[0]?.text);
  }

  reset() {}
  unload() {}
}

/** The package's option names as the OpenAI API's. */
function wire(o) {
  const body = { stream: true, stream_options: { include_usage: true }, max_tokens: o.maxTokens, temperature: o.temperature, top_p: o.topP, top_k: o.topK, min_p: o.minP, seed: o.seed };
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined));
}

class ServerGeneration {
  constructor(url, auth, body, textOf) {
    this.controller = new AbortController();
    this.generatedTokens = 0;
    this.tokensPerSecond = 0;
    this.stats = new Promise((resolve, reject) => (this.settle = { resolve, reject }));
    this.stats.catch(() => {});
    this.events = this.run(url, auth, body, textOf);
  }

  abort() {
    this.controller.abort(new DOMException('generation aborted', 'AbortError'));
  }

  async text() {
    let all = '';
    for await (const piece of this) all += piece;
    return all;
  }

  [Symbol.asyncIterator]() {
    return this.events;
  }

  async *run(url, auth, body, textOf) {
    const t0 = performance.now();
    try {
      const resp = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...auth }, body: JSON.stringify(body), signal: this.controller.signal });
      if (!resp.ok) throw new Error(`the server answered HTTP ${resp.status}: ${(await resp.json().catch(() => ({}))).error?.message ?? resp.statusText}`);
      let usage = null;
      let finish = null;
      let buffered = '';
      const decoder = new TextDecoder();
      for await (const bytes of resp.body) {
        buffered += decoder.decode(bytes, { stream: true });
        const events = buffered.split('\n\n');
        buffered = events.pop();
        for (const event of events) {
          const data = event.replace(/^data: ?/, '');
          if (data === '[DONE]') continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          usage = chunk.usage ?? usage;
          finish = chunk.choices?.[0]?.finish_reason ?? finish;
          const text = chunk.choices?.length ? textOf(chunk) : '';
          if (text) {
            this.generatedTokens++;
            this.tokensPerSecond = (this.generatedTokens * 1000) / (performance.now() - t0);
            yield text;
          }
        }
      }
      const seconds = (performance.now() - t0) / 1000;
      const generated = usage?.completion_tokens ?? this.generatedTokens;
      this.settle.resolve({
        promptTokens: usage?.prompt_tokens ?? 0, cachedTokens: usage?.prompt_tokens_details?.cached_tokens ?? 0,
        generatedTokens: generated, promptSeconds: 0, decodeSeconds: seconds, promptTokensPerSecond: 0,
        decodeTokensPerSecond: generated / seconds, stop: finish === 'length' ? 'MaxTokens' : 'EndToken', seed: body.seed ?? null,
        backend: 'server',
      });
    } catch (err) {
      this.settle.reject(err);
      throw err;
    }
  }
}
