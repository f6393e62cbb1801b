// The Web Worker that runs the model: loads a wasm build, streams the GGUF file into wasm memory (from the
// network, the Cache API, a File or bytes), and generates one token per engine call, returning to the event
// loop in between so that text is posted as it comes and an abort message is seen at the next token.

import type { BuildInfo, GenerationStats, ModelInfo, Progress, Reply, Request, WireSource } from './types.js';
import { CACHE_NAME } from './types.js';
// Both builds are imported statically, so that bundlers (Vite, webpack) see them and their wasm files; only
// the one that runs fetches and compiles its wasm. Both have the same API (the threaded one adds
// initThreadPool); the st build's types stand for both.
import * as st from './st/bitnet_web.js';
import * as mt from './mt/bitnet_web.js';

type Wasm = typeof st;
type Engine = st.Engine;
type LoadRequest = Extract<Request, { type: 'load' }>;
type GenerateRequest = Extract<Request, { type: 'generate' }>;

let wasm: Wasm | undefined;
let build: BuildInfo | undefined;
let engine: Engine | undefined;
let backendNote: string | undefined;
let threadsNote: string | undefined;
/** Requests run one at a time, in order; aborts act at once. */
let queue: Promise<void> = Promise.resolve();
const aborted = new Set<number>();

const post = (reply: Reply) => self.postMessage(reply);

self.onmessage = (e: MessageEvent<Request>) => {
  const req = e.data;
  if (req.type === 'abort') {
    aborted.add(req.id);
    return;
  }
  queue = queue.then(() => handle(req)).catch((err) => post({ type: 'error', id: req.id, message: describe(err) }));
};

function describe(err: unknown): string {
  if (err instanceof WebAssembly.RuntimeError) {
    // An allocation the browser refused inside the engine aborts the module (Rust cannot recover there).
    return `the WebAssembly engine stopped (${err.message}): most likely out of memory; reload the model`;
  }
  return err instanceof Error ? err.message : String(err);
}

async function handle(req: Request): Promise<void> {
  switch (req.type) {
    case 'load':
      return load(req);
    case 'generate':
      return generate(req);
    case 'reset':
      engine?.reset();
      return post({ type: 'done', id: req.id });
    case 'tokenize':
      return post({ type: 'tokens', id: req.id, tokens: [...loaded().tokenize(req.text, req.addBos)] });
    case 'detokenize':
      return post({ type: 'text', id: req.id, text: loaded().detokenize(Uint32Array.from(req.tokens)) });
    case 'logits': {
      const logits = await loaded().logits(Uint32Array.from(req.tokens));
      // Transferred, not copied (a vocabulary of 128k floats is half a megabyte).
      return self.postMessage({ type: 'logits', id: req.id, logits } satisfies Reply, [logits.buffer]);
    }
    case 'embed': {
      const engine = loaded();
      const embeddings: Float32Array[] = [];
      let tokens = 0;
      for (const input of req.inputs) {
        const ids = typeof input === 'string' ? engine.embeddingTokens(input) : Uint32Array.from(input);
        embeddings.push(engine.embed(ids));
        tokens += ids.length;
      }
      const reply: Reply = { type: 'embeddings', id: req.id, embeddings, tokens };
      return self.postMessage(reply, embeddings.map((e) => e.buffer as ArrayBuffer));
    }
  }
}

/** The threaded build when the page is cross-origin isolated (SharedArrayBuffer), else the single-threaded one. */
async function initWasm(threads: number): Promise<void> {
  // `bash web/build.sh st` makes mt/ a copy of st/, without a thread pool.
  const threaded = threads > 1 && self.crossOriginIsolated === true && 'initThreadPool' in mt;
  if (threads > 1 && !threaded) {
    threadsNote = self.crossOriginIsolated
      ? 'this package was built without its threaded build: running single-threaded'
      : 'threads need a cross-origin isolated page (COOP/COEP headers, or coi-serviceworker.js on a static host): running single-threaded';
    console.warn(`bitnet: ${threadsNote}`);
  }
  wasm = threaded ? (mt as unknown as Wasm) : st;
  await wasm.default();
  if (threaded) {
    await (wasm as unknown as { initThreadPool(n: number): Promise<void> }).initThreadPool(threads);
  }
  build = JSON.parse(wasm.buildInfo()) as BuildInfo;
}

async function load(req: LoadRequest): Promise<void> {
  if (engine) throw new Error('this worker already holds a model');
  await initWasm(req.threads);
  // At most every 50 ms (a download arrives in thousands of chunks), but always a phase's first and last step.
  let lastPost = 0;
  let lastPhase = '';
  const progress = (p: Progress) => {
    const now = performance.now();
    if (now - lastPost < 50 && p.loaded !== p.total && p.phase === lastPhase) return;
    lastPost = now;
    lastPhase = p.phase;
    post({ type: 'progress', id: req.id, progress: p });
  };
  const backend = await resolveBackend(req.backend);
  const { body, size, phase, stored, url } = await open(req.source, req.cache);
  // Throws before anything is read when the model cannot fit in wasm memory.
  const loader = new wasm!.Loader(size);
  let loaded = 0;
  progress({ phase, loaded, total: size });
  const reader = body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    loader.push(value);
    loaded += value.length;
    progress({ phase, loaded, total: size });
  }
  await stored;
  try {
    const options = JSON.stringify({ backend, ctx: req.ctx, activation: req.activation, kvType: req.kvType });
    engine = await loader.load(options, (done: number, total: number) => progress({ phase: 'load', loaded: done, total }));
  } catch (err) {
    // A file that does not load is not worth keeping.
    if (url) await caches.open(CACHE_NAME).then((c) => c.delete(url)).catch(() => {});
    throw err;
  }
  const info = { ...JSON.parse(engine.info()), build, backendNote, threadsNote } as ModelInfo;
  post({ type: 'loaded', id: req.id, info });
}

/** The part of WebGPU's GPUAdapter used here (TypeScript's libraries have no WebGPU types). */
interface GpuAdapter {
  info?: { isFallbackAdapter?: boolean };
}

/** `auto`: WebGPU on a hardware adapter. A software one (SwiftShader) is slower than SIMD128 on the same CPU
 *  and is used only when asked for by name, as `bitnet --backend auto` skips llvmpipe. */
async function resolveBackend(wanted: string): Promise<string> {
  if (wanted !== 'auto') return wanted;
  const gpu = (navigator as unknown as { gpu?: { requestAdapter(): Promise<GpuAdapter | null> } }).gpu;
  const adapter = gpu ? await gpu.requestAdapter().catch(() => null) : null;
  if (adapter && !adapter.info?.isFallbackAdapter) return 'webgpu';
  backendNote = !gpu
    ? 'this browser has no WebGPU'
    : adapter
      ? 'the only WebGPU adapter is a software one'
      : 'the browser found no WebGPU adapter';
  return 'wasm';
}

interface Opened {
  body: ReadableStream<Uint8Array>;
  size: number;
  phase: Progress['phase'];
  /** The cache write of a fresh download, which finishes with the download. */
  stored?: Promise<void>;
  /** The cache key, when the model came from or went to the cache. */
  url?: string;
}

async function open(source: WireSource, useCache: boolean): Promise<Opened> {
  if (source.kind === 'blob') return { body: source.blob.stream(), size: source.blob.size, phase: 'read' };
  if (source.kind === 'bytes') return { body: new Blob([source.bytes]).stream(), size: source.bytes.byteLength, phase: 'read' };
  const url = source.url;
  const cache = useCache && self.caches ? await caches.open(CACHE_NAME).catch(() => undefined) : undefined;
  const hit = await cache?.match(url);
  if (hit?.body) return { body: hit.body, size: Number(hit.headers.get('content-length')) || 0, phase: 'cache', url };
  const resp = await fetch(url);
  if (!resp.ok || !resp.body) throw new Error(`could not download ${url}: HTTP ${resp.status} ${resp.statusText}`);
  // With Content-Encoding, Content-Length counts compressed bytes: the size is then unknown.
  const size = resp.headers.get('content-encoding') ? 0 : Number(resp.headers.get('content-length')) || 0;
  if (!cache) return { body: resp.body, size, phase: 'download' };
  const [toCache, toWasm] = resp.body.tee();
  const headers: Record<string, string> = { 'content-type': 'application/octet-stream', 'x-cached-at': String(Date.now()) };
  if (size) headers['content-length'] = String(size);
  // A failed cache write (quota) costs only the caching, not the load.
  const stored = cache.put(url, new Response(toCache, { headers })).catch((e) => console.warn(`bitnet: not cached: ${e}`));
  return { body: toWasm, size, phase: 'download', stored, url };
}

/** Resolves after the event loop has run once (a MessageChannel round trip: no 4 ms timer clamp). */
const channel = new MessageChannel();
function nextTask(): Promise<void> {
  return new Promise((resolve) => {
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

function loaded(): Engine {
  if (!engine) throw new Error('no model loaded');
  return engine;
}

/** Prompt tokens evaluated per engine call: an abort is seen between chunks, so a long prompt stops too. */
const PROMPT_CHUNK = 32;

async function generate(req: GenerateRequest): Promise<void> {
  const engine = loaded();
  const options = JSON.stringify(req.options);
  if (aborted.delete(req.id)) return post({ type: 'done', id: req.id, stats: notStarted() });
  const t0 = performance.now();
  const toEval = req.messages ? engine.prepareChat(JSON.stringify(req.messages), options) : engine.prepare(req.prompt ?? '', options);
  post({ type: 'started', id: req.id });
  for (let evaluated = PROMPT_CHUNK; !(await engine.prefillChunk(PROMPT_CHUNK)); evaluated += PROMPT_CHUNK) {
    await nextTask();
    if (aborted.delete(req.id)) {
      // Stopped inside the prompt: what was evaluated stays in the cache (a retry reuses it).
      const promptTokens = Math.min(evaluated, toEval);
      return post({ type: 'done', id: req.id, stats: { ...stats(performance.now() - t0, 0, true), promptTokens, generatedTokens: 0 } });
    }
  }
  const promptMs = performance.now() - t0;
  let decodeMs = 0;
  let generated = 0;
  let stopped = false;
  for (;;) {
    await nextTask();
    if (aborted.delete(req.id)) {
      stopped = true;
      break;
    }
    const t = performance.now();
    const text = await engine.step();
    decodeMs += performance.now() - t;
    if (text === undefined) break;
    generated++;
    if (text) post({ type: 'text', id: req.id, text, generated, decodeMs });
  }
  post({ type: 'done', id: req.id, stats: stats(promptMs, decodeMs, stopped) });
}

function notStarted(): GenerationStats {
  const zero = { promptTokens: 0, cachedTokens: 0, generatedTokens: 0, promptSeconds: 0, decodeSeconds: 0 };
  return { ...zero, promptTokensPerSecond: 0, decodeTokensPerSecond: 0, stop: 'Aborted', seed: 0, backend: engine!.backend };
}

function stats(promptMs: number, decodeMs: number, abortedRun: boolean): GenerationStats {
  const s = JSON.parse(engine!.stats());
  const perSecond = (n: number, ms: number) => (ms > 0 ? (n * 1000) / ms : 0);
  return {
    promptTokens: s.promptTokens ?? 0,
    cachedTokens: s.cachedTokens ?? 0,
    generatedTokens: s.generatedTokens ?? 0,
    promptSeconds: promptMs / 1000,
    decodeSeconds: decodeMs / 1000,
    promptTokensPerSecond: perSecond(s.promptTokens ?? 0, promptMs),
    decodeTokensPerSecond: perSecond(s.generatedTokens ?? 0, decodeMs),
    stop: abortedRun ? 'Aborted' : s.stop ?? 'Aborted',
    seed: s.seed,
    backend: engine!.backend,
  };
}
