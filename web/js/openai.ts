// The OpenAI-shaped API: `model.chat.completions.create(...)`, `model.completions.create(...)` and
// `model.embeddings.create(...)` take OpenAI's request fields (snake_case) and return its objects and stream
// chunks, as `bitnet serve` does, so that code moves between the server and the browser unchanged. A field this
// API does not honour is an error naming it (as the server's 400), never silently dropped.

import type { ChatMessage, GenerateOptions, GenerationStats, ResponseFormat } from './types.js';
import type { Generation } from './index.js';

/** What the OpenAI layer needs of a loaded model (BitNet implements it). */
export interface TextModel {
  readonly modelId: string;
  generate(prompt: string, options?: GenerateOptions): Generation;
  chat(messages: ChatMessage[], options?: GenerateOptions): Generation;
  embedInputs(inputs: (string | number[])[]): Promise<{ embeddings: Float32Array[]; tokens: number }>;
}

/** The request fields both endpoints share (llama-server's top_k, min_p, repeat_penalty, repeat_last_n too). */
export interface SamplingParams {
  /** Any name (the model is the loaded one), reported back as given. */
  model?: string;
  max_tokens?: number | null;
  /** The newer name of `max_tokens`. */
  max_completion_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  top_k?: number | null;
  min_p?: number | null;
  repeat_penalty?: number | null;
  repeat_last_n?: number | null;
  /** A negative seed means a random one. */
  seed?: number | null;
  stop?: string | string[] | null;
  /** Only 1. */
  n?: number | null;
  stream?: boolean | null;
  /** `include_usage`: a last chunk with no choices and the usage. */
  stream_options?: { include_usage?: boolean } | null;
  /** Structured output, as `bitnet serve`: `json_object` (any JSON object) or `json_schema` (JSON valid against
   *  `json_schema.schema`); every token is constrained, so the output parses unless `max_tokens` cuts it. */
  response_format?: ResponseFormat | null;
  /** Structured output: a grammar in llguidance's Lark syntax (start rule `start`) that the output follows,
   *  as `bitnet serve`'s `grammar` field. */
  grammar?: string | null;
  /** Metadata only. */
  user?: string;
}

export interface ChatCompletionCreateParams extends SamplingParams {
  messages: ChatMessage[];
}
export type ChatCompletionCreateParamsStreaming = ChatCompletionCreateParams & { stream: true };
export type ChatCompletionCreateParamsNonStreaming = ChatCompletionCreateParams & { stream?: false | null };

export interface CompletionCreateParams extends SamplingParams {
  prompt: string;
}
export type CompletionCreateParamsStreaming = CompletionCreateParams & { stream: true };
export type CompletionCreateParamsNonStreaming = CompletionCreateParams & { stream?: false | null };

/** As the OpenAI client's second argument. */
export interface RequestOptions {
  signal?: AbortSignal;
}

export type FinishReason = 'stop' | 'length';

export interface CompletionUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** Prompt tokens whose keys and values were reused from the previous request's cache. */
  prompt_tokens_details: { cached_tokens: number };
}

export interface ChatCompletion {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: { index: 0; message: { role: 'assistant'; content: string }; finish_reason: FinishReason; logprobs: null }[];
  usage: CompletionUsage;
}

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  choices: { index: 0; delta: { role?: 'assistant'; content?: string }; finish_reason: FinishReason | null; logprobs: null }[];
  /** Only in the last chunk, when `stream_options.include_usage` (its `choices` is then empty). */
  usage?: CompletionUsage;
}

export interface Completion {
  id: string;
  object: 'text_completion';
  created: number;
  model: string;
  choices: { index: 0; text: string; finish_reason: FinishReason | null; logprobs: null }[];
  /** In the non-streamed answer, and in a stream's last chunk when `stream_options.include_usage`. */
  usage?: CompletionUsage;
}

export interface EmbeddingCreateParams {
  /** A text, texts, a text's token ids, or several texts' token ids. */
  input: string | string[] | number[] | number[][];
  /** Any name (the model is the loaded one), reported back as given. */
  model?: string;
  /** `float` (the default) or `base64` (the little-endian bytes of the float32 values). */
  encoding_format?: 'float' | 'base64' | null;
  /** Metadata only. */
  user?: string;
}

export interface CreateEmbeddingResponse {
  object: 'list';
  data: { object: 'embedding'; index: number; embedding: number[] | string }[];
  model: string;
  usage: { prompt_tokens: number; total_tokens: number };
}

const SAMPLING_FIELDS = [
  'model', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'top_k', 'min_p', 'repeat_penalty',
  'repeat_last_n', 'seed', 'stop', 'n', 'stream', 'stream_options', 'response_format', 'grammar', 'user',
];
const EMBEDDING_FIELDS = ['input', 'model', 'encoding_format', 'user'];
/** Most inputs in one embedding request (OpenAI's limit, as `bitnet serve`'s). */
const MAX_EMBEDDING_INPUTS = 2048;

/** A streamed answer: `for await (const chunk of stream)`. `controller.abort()` stops it (as the OpenAI
 *  client's Stream), and so does the request's `signal`; the iterator then throws an AbortError. */
export class Stream<Chunk> implements AsyncIterable<Chunk> {
  constructor(
    private chunks: () => AsyncGenerator<Chunk>,
    readonly controller: AbortController,
  ) {}

  [Symbol.asyncIterator](): AsyncIterator<Chunk> {
    return this.chunks();
  }
}

/** `model.chat.completions` */
export class ChatCompletions {
  constructor(private model: TextModel) {}

  create(body: ChatCompletionCreateParamsStreaming, options?: RequestOptions): Promise<Stream<ChatCompletionChunk>>;
  create(body: ChatCompletionCreateParamsNonStreaming, options?: RequestOptions): Promise<ChatCompletion>;
  create(body: ChatCompletionCreateParams, options?: RequestOptions): Promise<Stream<ChatCompletionChunk> | ChatCompletion>;
  async create(body: ChatCompletionCreateParams, options: RequestOptions = {}): Promise<Stream<ChatCompletionChunk> | ChatCompletion> {
    const gen = checkFields(body, ['messages']);
    const messages = checkMessages(body.messages);
    const controller = linked(options.signal);
    const run = () => this.model.chat(messages, { ...gen, signal: controller.signal });
    const head = { id: `chatcmpl-${randomId()}`, created: unixTime(), model: body.model ?? this.model.modelId };
    if (!body.stream) {
      const g = run();
      const content = await g.text();
      const stats = await g.stats;
      const message = { role: 'assistant' as const, content };
      const choice = { index: 0 as const, message, finish_reason: finishReason(stats), logprobs: null };
      return { ...head, object: 'chat.completion', choices: [choice], usage: usage(stats) };
    }
    const includeUsage = body.stream_options?.include_usage === true;
    const chunk = (delta: ChatCompletionChunk['choices'][0]['delta'], finish: FinishReason | null): ChatCompletionChunk => ({
      ...head,
      object: 'chat.completion.chunk',
      choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }],
    });
    // Started now, so that a request the engine refuses (a schema that does not compile) rejects here, as the
    // server answers it with a 400 before any chunk.
    const g = run();
    await g.started;
    return new Stream(async function* () {
      yield chunk({ role: 'assistant', content: '' }, null);
      for await (const text of g) yield chunk({ content: text }, null);
      const stats = await g.stats;
      yield chunk({}, finishReason(stats));
      if (includeUsage) yield { ...head, object: 'chat.completion.chunk', choices: [], usage: usage(stats) };
    }, controller);
  }
}

/** `model.completions` */
export class Completions {
  constructor(private model: TextModel) {}

  create(body: CompletionCreateParamsStreaming, options?: RequestOptions): Promise<Stream<Completion>>;
  create(body: CompletionCreateParamsNonStreaming, options?: RequestOptions): Promise<Completion>;
  create(body: CompletionCreateParams, options?: RequestOptions): Promise<Stream<Completion> | Completion>;
  async create(body: CompletionCreateParams, options: RequestOptions = {}): Promise<Stream<Completion> | Completion> {
    const gen = checkFields(body, ['prompt']);
    if (typeof body.prompt !== 'string') throw new TypeError('prompt must be a string');
    const controller = linked(options.signal);
    const run = () => this.model.generate(body.prompt, { ...gen, signal: controller.signal });
    const head = { id: `cmpl-${randomId()}`, object: 'text_completion' as const, created: unixTime(), model: body.model ?? this.model.modelId };
    const choice = (text: string, finish: FinishReason | null) => ({ index: 0 as const, text, finish_reason: finish, logprobs: null });
    if (!body.stream) {
      const g = run();
      const text = await g.text();
      const stats = await g.stats;
      return { ...head, choices: [choice(text, finishReason(stats))], usage: usage(stats) };
    }
    const includeUsage = body.stream_options?.include_usage === true;
    const g = run();
    await g.started;
    return new Stream(async function* () {
      for await (const text of g) yield { ...head, choices: [choice(text, null)] };
      const stats = await g.stats;
      yield { ...head, choices: [choice('', finishReason(stats))] };
      if (includeUsage) yield { ...head, choices: [], usage: usage(stats) };
    }, controller);
  }
}

/** `model.embeddings` */
export class Embeddings {
  constructor(private model: TextModel) {}

  /** The unit-length embedding of each input (embedding models only), in OpenAI's shape. An abort rejects at once
   *  (the worker finishes the inputs it was given). */
  async create(body: EmbeddingCreateParams, options: RequestOptions = {}): Promise<CreateEmbeddingResponse> {
    checkKnown(body, EMBEDDING_FIELDS);
    const base64 = body.encoding_format === 'base64';
    if (body.encoding_format != null && !base64 && body.encoding_format !== 'float') {
      throw new TypeError(`encoding_format '${String(body.encoding_format)}' is not supported (float, base64)`);
    }
    const inputs = embeddingInputs(body.input);
    const { embeddings, tokens } = await abortable(this.model.embedInputs(inputs), options.signal);
    const data = embeddings.map((e, index) => ({ object: 'embedding' as const, index, embedding: base64 ? toBase64(e) : Array.from(e) }));
    return { object: 'list', data, model: body.model ?? this.model.modelId, usage: { prompt_tokens: tokens, total_tokens: tokens } };
  }
}

/** `promise`, rejected with the signal's reason once it aborts. */
function abortable<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return promise;
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    signal.addEventListener('abort', () => reject(signal.reason), { once: true });
    promise.then(resolve, reject);
  });
}

/** `input` as a list of texts or token id lists, checked as the server checks it. */
function embeddingInputs(input: unknown): (string | number[])[] {
  const ids = (v: unknown): v is number[] => Array.isArray(v) && v.every((t) => Number.isInteger(t) && t >= 0);
  let inputs: (string | number[])[];
  if (typeof input === 'string') inputs = [input];
  else if (ids(input) && input.length > 0) inputs = [input];
  else if (Array.isArray(input) && input.every((v) => typeof v === 'string' || ids(v))) inputs = input;
  else throw new TypeError('input must be a string, an array of strings, an array of token ids, or an array of those');
  if (inputs.length === 0) throw new TypeError('input is empty: nothing to embed');
  if (inputs.length > MAX_EMBEDDING_INPUTS) throw new RangeError(`${inputs.length} inputs: at most ${MAX_EMBEDDING_INPUTS} per request`);
  const empty = inputs.findIndex((v) => v.length === 0);
  if (empty >= 0) throw new TypeError(`input ${empty} is empty: nothing to embed`);
  return inputs;
}

function toBase64(v: Float32Array): string {
  // Float32Array is in the platform's byte order, little-endian in every browser.
  const bytes = new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  let binary = '';
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}

/** A request field this API does not know is an error naming it. */
function checkKnown(body: object, known: string[]): void {
  if (typeof body !== 'object' || body === null) throw new TypeError('the request must be an object');
  const unknown = Object.entries(body).filter(([k, v]) => v != null && !known.includes(k)).map(([k]) => k);
  if (unknown.length) {
    throw new TypeError(`unsupported field${unknown.length > 1 ? 's' : ''}: ${unknown.join(', ')} (supported: ${known.join(', ')})`);
  }
}

/** Checks the request's fields and turns the sampling ones into the package's options. */
function checkFields(body: SamplingParams, own: string[]): GenerateOptions {
  checkKnown(body, [...SAMPLING_FIELDS, ...own]);
  if (body.n != null && body.n !== 1) throw new RangeError('n: only n = 1 is supported');
  const number = (name: keyof SamplingParams, ok: (v: number) => boolean, range: string): number | undefined => {
    const v = body[name];
    if (v == null) return undefined;
    if (typeof v !== 'number' || !Number.isFinite(v) || !ok(v)) throw new RangeError(`${name} = ${String(v)} is out of range (${range})`);
    return v;
  };
  const count = (v: number) => Number.isInteger(v) && v >= 0;
  const stop = body.stop == null ? undefined : typeof body.stop === 'string' ? [body.stop] : body.stop;
  if (stop && !(Array.isArray(stop) && stop.every((s) => typeof s === 'string'))) throw new TypeError('stop must be a string or an array of strings');
  const seed = number('seed', Number.isSafeInteger, 'an integer');
  const out: GenerateOptions = {
    maxTokens: number('max_completion_tokens', count, 'an integer, 0 or more') ?? number('max_tokens', count, 'an integer, 0 or more'),
    temperature: number('temperature', (v) => v >= 0, '0 or more'),
    topP: number('top_p', (v) => v >= 0 && v <= 1, '0 to 1'),
    topK: number('top_k', count, 'an integer, 0 or more'),
    minP: number('min_p', (v) => v >= 0 && v <= 1, '0 to 1'),
    repeatPenalty: number('repeat_penalty', (v) => v > 0, 'more than 0'),
    repeatLastN: number('repeat_last_n', count, 'an integer, 0 or more'),
    seed: seed !== undefined && seed >= 0 ? seed : undefined,
    stop,
    // Read by the engine as the server reads them (a bad one is an error when the generation starts).
    responseFormat: body.response_format ?? undefined,
    grammar: body.grammar ?? undefined,
  };
  // Absent fields keep the package's defaults.
  return Object.fromEntries(Object.entries(out).filter(([, v]) => v !== undefined)) as GenerateOptions;
}

function checkMessages(messages: unknown): ChatMessage[] {
  if (!Array.isArray(messages) || messages.length === 0) throw new TypeError('messages must be a non-empty array');
  return messages.map((m, i) => {
    if (typeof m !== 'object' || m === null) throw new TypeError(`messages[${i}] must be an object`);
    const { role, content, ...rest } = m as Record<string, unknown>;
    const extra = Object.keys(rest).filter((k) => k !== 'name' && rest[k] != null);
    if (extra.length) throw new TypeError(`messages[${i}]: unsupported field${extra.length > 1 ? 's' : ''}: ${extra.join(', ')}`);
    if (typeof role !== 'string' || typeof content !== 'string') throw new TypeError(`messages[${i}] needs a string role and a string content`);
    return { role, content };
  });
}

/** A controller that the caller's signal (if any) aborts too. */
function linked(signal: AbortSignal | undefined): AbortController {
  const controller = new AbortController();
  if (signal?.aborted) controller.abort(signal.reason);
  signal?.addEventListener('abort', () => controller.abort(signal.reason), { once: true });
  return controller;
}

function finishReason(stats: GenerationStats): FinishReason {
  return stats.stop === 'MaxTokens' || stats.stop === 'ContextFull' ? 'length' : 'stop';
}

function usage(s: GenerationStats): CompletionUsage {
  const prompt = s.promptTokens + s.cachedTokens;
  return {
    prompt_tokens: prompt,
    completion_tokens: s.generatedTokens,
    total_tokens: prompt + s.generatedTokens,
    prompt_tokens_details: { cached_tokens: s.cachedTokens },
  };
}

function randomId(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, '0')).join('');
}

function unixTime(): number {
  return Math.floor(Date.now() / 1000);
}
