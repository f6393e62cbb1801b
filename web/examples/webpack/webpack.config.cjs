// webpack 5 needs nothing special for bitnet-web: it bundles `new Worker(new URL('./worker.js',
// import.meta.url))` as a worker and `new URL('x.wasm', import.meta.url)` as a file. The page needs the cross-origin
// isolation headers (or the package's service worker) for threads.
const path = require('node:path');

module.exports = {
  mode: 'production',
  entry: './src/main.js',
  output: { path: path.resolve(__dirname, 'dist'), clean: true },
  // The two wasm builds are 3 MB each: past webpack's default size hint, and fetched only when used.
  performance: { hints: false },
};
