// Two settings a bitnet-web app needs under Vite:
// - workers as ES modules (the thread pool's workers import the wasm build's JavaScript);
// - the package left out of dependency pre-bundling in `vite dev`, so that its `new URL(..., import.meta.url)`
//   files (the worker, the wasm) stay next to the code that names them.
// The dev server also needs the cross-origin isolation headers for threads.
const isolation = { 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp' };

export default {
  worker: { format: 'es' },
  optimizeDeps: { exclude: ['bitnet-web'] },
  build: { target: 'es2022' },
  server: { headers: isolation },
  preview: { headers: isolation },
};
