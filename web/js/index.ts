// bitnet-web: BitNet b1.58 models in the browser. All inference runs in a Web Worker (worker.ts); this is the
// page-side API: BitNet.load(), model.generate() / model.chat() as async iterables of text, and the model cache.

import type {
  ChatMessage,
  CachedModel,
  GenerateOptions,
  GenerationStats,
  LoadOptions,
  ModelInfo,
  ModelSource,
  Reply,
  Request,
  WireSource,
} from './types.js';
import { CACHE_NAME } from './types.js';
import { ChatCompletions, Completions, Embeddings } from './openai.js';

export type {
  Backend,
  BuildInfo,
  CachedModel,
  ChatMessage,
  GenerateOptions,
  GenerationStats,
  LoadOptions,
  ModelInfo,
  ModelSource,
  JsonSchemaFormat,
  Progress,
  ResponseFormat,
} from './types.js';
export type * from './openai.js';
export { ChatCompletions, Completions, Embeddings, Stream } from './openai.js';

/** The largest GGUF file that can load: a wasm32 module has 4 GiB, and loading needs about twice the file. */
export const MAX_MODEL_BYTES = 2 * 1024 ** 3;

type Handler = (reply: Reply) => void;

/** A model loaded in its own Web Worker. */
export class BitNet {
  /** The model's shape and how it runs (backend, threads, wasm build). */
  readonly info: ModelInfo;
  /** `model.chat(messages, options)` answers the last message of a conversation, rendered with the model's
   *  chat template (the KV cache of the previous turn is reused when the conversation only grew).
   *  `model.chat.completions.create({ messages, stream: true })` is the same, shaped as OpenAI's API. */
  readonly chat: ((messages: ChatMessage[], options?: GenerateOptions) => Generation) & {
    readonly completions: ChatCompletions;
  };
  /** The OpenAI-shaped text completion API: `await model.completions.create({ prompt })`. */
  readonly completions: Completions;
  /** The OpenAI-shaped embeddings API (embedding models): `await model.embeddings.create({ input })`. */
  readonly embeddings: Embeddings;
  private nextId = 1;
  private handlers = new Map<number, Handler>();
  private failure: Error | undefined;

  private constructor(
    private worker: Worker,
    info: ModelInfo,
    /** The name the OpenAI-shaped API reports as `model` (the file's name). */
    readonly modelId: string,
  ) {
    this.info = info;
    const chat = (messages: ChatMessage[], options: GenerateOptions = {}) =>
      this.start({ messages: messages.map(({ role, content }) => ({ role, content })) }, options);
    this.chat = Object.assign(chat, { completions: new ChatCompletions(this) });
    this.completions = new Completions(this);
    this.embeddings = new Embeddings(this);
  }

  /** What runs the model, e.g. "cpu/simd128". */
  get backend(): string {
    return this.info.backend;
  }

  /** Loads a GGUF model into a new worker. Rejects with a clear message when it cannot (too big, not a
   *  BitNet GGUF, no WebGPU when `backend: 'webgpu'` was asked for, ...). */
  static async load(source: ModelSource, options: LoadOptions = {}): Promise<BitNet> {
    // The literal `new Worker(new URL('./worker.js', import.meta.url), ...)` is what Vite and webpack look for
    // to bundle the worker (and, through it, both wasm builds).
    const worker = options.workerUrl
      ? new Worker(options.workerUrl, { type: 'module', name: 'bitnet' })
      : new Worker(new URL('./worker.js', import.meta.url), { type: 'module', name: 'bitnet' });
    const threads = Math.max(1, Math.floor(options.threads ?? navigator.hardwareConcurrency ?? 1));
    const request: Request = {
      type: 'load',
      id: 0,
      source: await wireSource(source),
      backend: options.backend ?? 'auto',
      cache: options.cache ?? true,
      threads,
      ctx: options.ctx,
      activation: options.activation,
      kvType: options.kvType,
    };
    try {
      const info = await new Promise<ModelInfo>((resolve, reject) => {
        options.signal?.throwIfAborted();
        options.signal?.addEventListener('abort', () => reject(options.signal!.reason), { once: true });
        worker.onerror = (e) => reject(new Error(`the BitNet worker failed to start: ${e.message ?? 'see the console'}`));
        worker.onmessage = (e: MessageEvent<Reply>) => {
          const r = e.data;
          if (r.type === 'progress') options.onProgress?.(r.progress);
          else if (r.type === 'loaded') resolve(r.info);
          else if (r.type === 'error') reject(new Error(r.message));
        };
        worker.postMessage(request);
      });
      const model = new BitNet(worker, info, modelName(source));
      worker.onmessage = (e: MessageEvent<Reply>) => model.handlers.get(e.data.id)?.(e.data);
      worker.onerror = (e) => model.fail(new Error(`the BitNet worker crashed: ${e.message ?? 'see the console'}`));
      return model;
    } catch (err) {
      worker.terminate();
      throw err;
    }
  }

  /** Continues `prompt` (BOS added as the model asks): `for await (const text of model.generate(p)) ...`. */
  generate(prompt: string, options: GenerateOptions = {}): Generation {
    return this.start({ prompt }, options);
  }

  /** Forgets the conversation kept in the KV cache. */
  async reset(): Promise<void> {
    await this.call({ type: 'reset', id: this.nextId++ });
  }

  /** The token ids of `text`, with the model's BOS first when `addBos` (default false) and the model uses one. */
  async tokenize(text: string, { addBos = false }: { addBos?: boolean } = {}): Promise<number[]> {
    const r = await this.call({ type: 'tokenize', id: this.nextId++, text: String(text), addBos });
    return r.type === 'tokens' ? r.tokens : [];
  }

  /** The text of token ids. */
  async detokenize(tokens: ArrayLike<number>): Promise<string> {
    const r = await this.call({ type: 'detokenize', id: this.nextId++, tokens: Array.from(tokens) });
    return r.type === 'text' ? r.text : '';
  }

  /** The next-token logits (one per vocabulary entry) after `tokens`, evaluated in the model's KV cache
   *  (reusing the prefix it holds, as a chat turn does). */
  async logits(tokens: ArrayLike<number>): Promise<Float32Array> {
    const r = await this.call({ type: 'logits', id: this.nextId++, tokens: Array.from(tokens) });
    return r.type === 'logits' ? r.logits : new Float32Array();
  }

  /** The unit-length sentence embedding of a text, or of each text (embedding models such as BitNet's, on the wasm
   *  backend: last-token pooling, as `bitnet embed`; BOS and EOS are added as the vocabulary says). A model that
   *  is not an embedding model rejects, as `bitnet serve`'s /v1/embeddings answers it with a 400. */
  embed(input: string): Promise<Float32Array>;
  embed(input: string[]): Promise<Float32Array[]>;
  embed(input: string | string[]): Promise<Float32Array | Float32Array[]>;
  async embed(input: string | string[]): Promise<Float32Array | Float32Array[]> {
    const texts = typeof input === 'string' ? [input] : input;
    if (!Array.isArray(texts) || !texts.every((t) => typeof t === 'string')) throw new TypeError('embed() takes a string or an array of strings');
    const { embeddings } = await this.embedInputs(texts);
    return typeof input === 'string' ? embeddings[0] : embeddings;
  }

  /** @internal Embeddings of texts or token ids, and how many tokens they read. */
  async embedInputs(inputs: (string | number[])[]): Promise<{ embeddings: Float32Array[]; tokens: number }> {
    const r = await this.call({ type: 'embed', id: this.nextId++, inputs });
    return r.type === 'embeddings' ? r : { embeddings: [], tokens: 0 };
  }

  /** Terminates the worker, which frees all of the model's memory. */
  unload(): void {
    this.worker.terminate();
    this.fail(new Error('the model was unloaded'));
  }

  /** Models kept by the browser (Cache API), by URL. */
  static cache = {
    async list(): Promise<CachedModel[]> {
      const cache = await caches.open(CACHE_NAME);
      const out: CachedModel[] = [];
      for (const req of await cache.keys()) {
        const resp = await cache.match(req);
        out.push({
          url: req.url,
          size: Number(resp?.headers.get('content-length')) || 0,
          cachedAt: Number(resp?.headers.get('x-cached-at')) || 0,
        });
      }
      return out;
    },
    /** Removes one model; resolves to whether it was there. */
    async delete(url: string | URL): Promise<boolean> {
      return (await caches.open(CACHE_NAME)).delete(String(url));
    },
    /** Removes every cached model. */
    async clear(): Promise<boolean> {
      return caches.delete(CACHE_NAME);
    },
  };

  /** Sends a request that has one reply (or an error). */
  private call(req: Request): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      this.handlers.set(req.id, (r) => {
        this.handlers.delete(req.id);
        if (r.type === 'error') reject(new Error(r.message));
        else resolve(r);
      });
      try {
        this.send(req);
      } catch (err) {
        this.handlers.delete(req.id);
        reject(err);
      }
    });
  }

  private send(req: Request): void {
    if (this.failure) throw this.failure;
    this.worker.postMessage(req);
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const handler of [...this.handlers.values()]) handler({ type: 'error', id: 0, message: err.message });
    this.handlers.clear();
  }

  private start(input: { prompt?: string; messages?: ChatMessage[] }, options: GenerateOptions): Generation {
    const id = this.nextId++;
    const { signal, ...rest } = options;
    const wire: Record<string, unknown> = { ...rest, seed: rest.seed ?? Math.floor(Math.random() * 2 ** 32) };
    const gen = new Generation(() => this.worker.postMessage({ type: 'abort', id } satisfies Request), signal);
    this.handlers.set(id, (r) => {
      if (r.type === 'done' || r.type === 'error') this.handlers.delete(id);
      gen.receive(r);
    });
    try {
      this.send({ type: 'generate', id, ...input, options: wire });
    } catch (err) {
      this.handlers.delete(id);
      gen.receive({ type: 'error', id, message: (err as Error).message });
    }
    return gen;
  }
}

/** A running generation: an async iterable of text pieces, with its statistics once it ends. */
export class Generation implements AsyncIterable<string> {
  /** Resolves when generation ends (also after an abort); rejects on an error. */
  readonly stats: Promise<GenerationStats>;
  /** Resolves once the worker has accepted the request (its options checked, a schema or grammar compiled) and
   *  evaluates the prompt; rejects when it refused it. */
  readonly started: Promise<void>;
  /** Tokens generated so far (as of the last text piece), for a live speed. */
  generatedTokens = 0;
  /** Decode speed so far (tokens/s), as of the last text piece. */
  tokensPerSecond = 0;
  private pieces: string[] = [];
  private finished = false;
  private error: unknown;
  private wake: (() => void) | undefined;
  private settle!: { resolve(s: GenerationStats): void; reject(e: unknown): void };
  private settleStart!: { resolve(): void; reject(e: unknown): void };
  private abortReason: unknown;

  constructor(
    private sendAbort: () => void,
    signal?: AbortSignal,
  ) {
    this.stats = new Promise((resolve, reject) => (this.settle = { resolve, reject }));
    this.stats.catch(() => {}); // the iterator reports errors too; no unhandled rejection when stats is unused
    this.started = new Promise((resolve, reject) => (this.settleStart = { resolve, reject }));
    this.started.catch(() => {});
    if (signal?.aborted) this.abort(signal.reason);
    signal?.addEventListener('abort', () => this.abort(signal.reason), { once: true });
  }

  /** Stops at the next token. The iterator then throws `reason` (an AbortError by default). */
  abort(reason?: unknown): void {
    if (this.finished || this.abortReason !== undefined) return;
    this.abortReason = reason ?? new DOMException('generation aborted', 'AbortError');
    this.sendAbort();
    this.wake?.();
  }

  /** The whole text, once generation ends. */
  async text(): Promise<string> {
    let all = '';
    for await (const piece of this) all += piece;
    return all;
  }

  /** @internal */
  receive(r: Reply): void {
    if (r.type === 'started') this.settleStart.resolve();
    else if (r.type === 'text') {
      this.pieces.push(r.text);
      if (r.generated !== undefined && r.decodeMs) {
        this.generatedTokens = r.generated;
        this.tokensPerSecond = (r.generated * 1000) / r.decodeMs;
      }
    }
    else if (r.type === 'done') {
      this.finished = true;
      this.settleStart.resolve(); // aborted before it started
      this.settle.resolve(r.stats!);
    } else if (r.type === 'error') {
      this.finished = true;
      this.error = new Error(r.message);
      this.settleStart.reject(this.error);
      this.settle.reject(this.error);
    }
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<string> {
    try {
      for (;;) {
        if (this.pieces.length) {
          yield this.pieces.shift()!;
          continue;
        }
        if (this.abortReason !== undefined) throw this.abortReason;
        if (this.error !== undefined) throw this.error;
        if (this.finished) return;
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
      }
    } finally {
      // `break` out of a for-await loop stops the generation too.
      if (!this.finished && this.abortReason === undefined) this.abort();
    }
  }
}

/** The model's name for the OpenAI-shaped API: the file name of a URL or File, else "bitnet". */
function modelName(source: ModelSource): string {
  if (typeof source === 'string' || source instanceof URL) return String(source).split(/[?#]/)[0].split('/').pop() || 'bitnet';
  if (typeof File !== 'undefined' && source instanceof File) return source.name;
  return 'bitnet';
}

async function wireSource(source: ModelSource): Promise<WireSource> {
  if (typeof source === 'string' || source instanceof URL) {
    // Resolved against the page, not the worker's module URL.
    return { kind: 'url', url: new URL(String(source), location.href).href };
  }
  if (source instanceof Blob) return { kind: 'blob', blob: source };
  if (source instanceof ArrayBuffer) return { kind: 'bytes', bytes: source };
  if (source instanceof Uint8Array) return { kind: 'bytes', bytes: source.slice().buffer };
  throw new TypeError('a model source is a URL, a File or Blob, an ArrayBuffer or a Uint8Array');
}
