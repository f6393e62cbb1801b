// Cargo's runner for wasm32-wasip1 test binaries: runs `node wasi_run.mjs <file.wasm> [args...]`
// under Node's built-in WASI, with the repository readable (tests open their fixtures by path).
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';
import { WASI } from 'node:wasi';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const wasi = new WASI({
  version: 'preview1',
  args: process.argv.slice(2),
  env: process.env,
  preopens: { [repo]: repo },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(process.argv[2]));
const instance = await WebAssembly.instantiate(module, { wasi_snapshot_preview1: wasi.wasiImport });
process.exitCode = wasi.start(instance);
