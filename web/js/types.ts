// The package's public types, and the messages between the page (index.ts) and the worker (worker.ts).

/** Where the model runs. `auto`: WebGPU on a hardware adapter, else wasm (a software adapter such as
 *  SwiftShader is slower than the wasm build on the same CPU; ask for `webgpu` to use it anyway). */
export type Backend = 'auto' | 'wasm' | 'webgpu';

/** A GGUF file: a URL (fetched, and cached with the Cache API), a File or Blob, or the bytes. */
export type ModelSource = string | URL | Blob | ArrayBuffer | Uint8Array;

export interface Progress {
  /** `download`: from the network; `cache`: from the browser's cache; `read`: a File or bytes; `load`: building the model. */
  phase: 'download' | 'cache' | 'read' | 'load';
  /** Bytes (or, for `load`, tensor groups) done so far. */
  loaded: number;
  /** The total, or 0 when unknown (a download without Content-Length). */
  total: number;
}

export interface LoadOptions {
  backend?: Backend;
  onProgress?: (p: Progress) => void;
  /** Keep a downloaded model in the browser's Cache API storage and load it from there next time (default true). */
  cache?: boolean;
  /** CPU threads for the wasm backend (default: navigator.hardwareConcurrency). Threads need a cross-origin
   *  isolated page (COOP + COEP headers); elsewhere, and with `threads: 1`, the single-threaded build runs. */
  threads?: number;
  /** Context size in tokens (default: the model's, at most 4096). */
  ctx?: number;
  /** Override the feed-forward activation read from the file. */
  activation?: 'relu2' | 'silu';
  /** KV cache type: 'f32' (exact), 'f16' (the default, half the memory) or 'q8_0'; WebGPU has 'f32' and 'f16'. */
  kvType?: 'f32' | 'f16' | 'q8_0';
  /** Aborts loading (the worker is terminated). */
  signal?: AbortSignal;
  /** URL of `worker.js`, when the package's files are not served next to `index.js`. */
  workerUrl?: string | URL;
}

/** Sampling and stopping; the defaults are the `bitnet run` command's. */
export interface GenerateOptions {
  /** Tokens to generate (default 128). */
  maxTokens?: number;
  /** 0 = greedy (default 0.8). */
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repeatPenalty?: number;
  repeatLastN?: number;
  /** An integer below 2^53; a random one when absent (reported in the stats). */
  seed?: number;
  /** Generation stops before any of these strings. */
  stop?: string[];
  /** Structured output, OpenAI's `response_format` (read as `bitnet serve` reads it): `{ type: 'json_object' }` makes
   *  the text a JSON object, `{ type: 'json_schema', json_schema: { schema } }` JSON valid against the schema; every
   *  token is constrained (llguidance), so the text always parses unless `maxTokens` cuts it short. A schema that
   *  does not compile is an error. */
  responseFormat?: ResponseFormat;
  /** Structured output: the text follows this grammar, in llguidance's Lark syntax (start rule `start`), as
   *  `bitnet serve`'s `grammar` field and `bitnet run --grammar`. Not with `responseFormat` (other than `text`). */
  grammar?: string;
  signal?: AbortSignal;
}

export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | { type: 'json_schema'; json_schema: JsonSchemaFormat };

/** OpenAI's `json_schema` object; `name`, `description` and `strict` are accepted (the output always follows the
 *  schema, as `strict: true` asks). */
export interface JsonSchemaFormat {
  name?: string;
  description?: string;
  schema?: Record<string, unknown> | boolean;
  strict?: boolean | null;
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | string;
  content: string;
}

export interface GenerationStats {
  /** Prompt tokens evaluated (a prefix already in the cache is not evaluated again). */
  promptTokens: number;
  /** Prompt tokens reused from the cache (the prompt is `promptTokens + cachedTokens` long). */
  cachedTokens: number;
  generatedTokens: number;
  promptSeconds: number;
  /** Time spent generating (sampling and evaluating each new token). */
  decodeSeconds: number;
  promptTokensPerSecond: number;
  decodeTokensPerSecond: number;
  /** Why it stopped: EndToken, StopString, MaxTokens, ContextFull, or Aborted. */
  stop: string;
  seed: number;
  backend: string;
}

export interface ModelInfo {
  arch: string;
  nVocab: number;
  nCtxTrain: number;
  nEmbd: number;
  nLayer: number;
  nHead: number;
  nHeadKv: number;
  headDim: number;
  nFf: number;
  activation: string;
  /** The context size in use. */
  ctx: number;
  /** What runs the model, e.g. "cpu/simd128" or "wgpu/unnamed CPU adapter (webgpu)" (browsers may not name it). */
  backend: string;
  /** CPU threads (1 in the single-threaded build). */
  threads: number;
  bos: number | null;
  eos: number | null;
  addBos: boolean;
  chatTemplate: boolean;
  /** An embedding model: `embed()` works and generation does not. */
  embedding: boolean;
  /** WebAssembly memory in use after loading. */
  memoryBytes: number;
  /** Which wasm build runs: threads or not, SIMD128, the CPU kernels, WebGPU support. */
  build: BuildInfo;
  /** Why `auto` did not pick WebGPU, when it did not. */
  backendNote?: string;
  /** Why fewer threads run than were asked for (a page that is not cross-origin isolated), when so. */
  threadsNote?: string;
}

export interface BuildInfo {
  version: string;
  threads: boolean;
  simd128: boolean;
  kernels: string;
  webgpu: boolean;
}

export interface CachedModel {
  url: string;
  /** Bytes, or 0 when unknown. */
  size: number;
  /** When it was stored (ms since the epoch), or 0 when unknown. */
  cachedAt: number;
}

// ---- Worker protocol (internal) ----

export type WireSource = { kind: 'url'; url: string } | { kind: 'blob'; blob: Blob } | { kind: 'bytes'; bytes: ArrayBuffer };

export type Request =
  | {
      type: 'load';
      id: number;
      source: WireSource;
      backend: Backend;
      cache: boolean;
      threads: number;
      ctx?: number;
      activation?: string;
      kvType?: string;
    }
  | { type: 'generate'; id: number; prompt?: string; messages?: ChatMessage[]; options: Record<string, unknown> }
  | { type: 'abort'; id: number }
  | { type: 'reset'; id: number }
  | { type: 'tokenize'; id: number; text: string; addBos: boolean }
  | { type: 'detokenize'; id: number; tokens: number[] }
  | { type: 'logits'; id: number; tokens: number[] }
  | { type: 'embed'; id: number; inputs: (string | number[])[] };

export type Reply =
  | { type: 'progress'; id: number; progress: Progress }
  | { type: 'loaded'; id: number; info: ModelInfo }
  | { type: 'started'; id: number }
  | { type: 'text'; id: number; text: string; generated?: number; decodeMs?: number }
  | { type: 'tokens'; id: number; tokens: number[] }
  | { type: 'logits'; id: number; logits: Float32Array }
  | { type: 'embeddings'; id: number; embeddings: Float32Array[]; tokens: number }
  | { type: 'done'; id: number; stats?: GenerationStats }
  | { type: 'error'; id: number; message: string };

/** The Cache API storage the package uses. */
export const CACHE_NAME = 'bitnet-models';
