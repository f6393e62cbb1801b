// The npm package under bundlers, as most web developers build: the example apps of web/examples/ (Vite and
// webpack) are copied out, given the packed tarball (`npm pack` of web/pkg, installed as from the registry),
// built, served with the isolation headers, and run in headless Chromium. Each generates text with the wasm
// thread pool (2 threads) and with the single-threaded build; the text must equal `bitnet run`'s.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { copyFileSync, cpSync, mkdirSync, rmSync } from 'node:fs';
import { OUT, ROOT, launch, nativeRun, newPage, serve } from './helpers.mjs';

const MODEL = `${ROOT}tests/fixtures/models/tiny-a-i2_s.gguf`;
const PROMPT = 'Hello world, the';
const dir = `${OUT}/bundlers`;
let tarball, browser;

before(async () => {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const name = execFileSync('npm', ['pack', `${ROOT}web/pkg`, '--pack-destination', dir], { encoding: 'utf8' }).trim().split('\n').pop();
  tarball = `${dir}/${name}`;
  browser = await launch();
});

after(async () => {
  await browser?.close();
});

/** Copies web/examples/<name>, installs the tarball and the bundler, builds; returns the built site's folder. */
function build(name) {
  const app = `${dir}/${name}`;
  cpSync(`${ROOT}web/examples/${name}`, app, { recursive: true, filter: (p) => !/node_modules|dist/.test(p.slice(ROOT.length)) });
  execFileSync('npm', ['install', '--no-audit', '--no-fund', tarball], { cwd: app, stdio: 'inherit' });
  execFileSync('npm', ['run', 'build'], { cwd: app, stdio: 'inherit' });
  copyFileSync(MODEL, `${app}/dist/tiny.gguf`);
  return `${app}/dist`;
}

/** Loads the example page at `url` with `threads`; checks its text and thread count; screenshots it as `name`. */
async function check(url, threads, want, name) {
  const log = [];
  const page = await newPage(browser, log);
  try {
    await page.goto(`${url}?model=tiny.gguf&threads=${threads}&n=12&prompt=${encodeURIComponent(PROMPT)}`);
    const got = await page.evaluate(() => window.example);
    assert.equal(got.error, null);
    assert.equal(got.text, want, `${name}: the text vs bitnet run`);
    assert.equal(got.info.threads, threads);
    assert.equal(got.info.build.threads, threads > 1);
    await page.screenshot({ path: `${OUT}/${name}.png` });
  } catch (err) {
    console.log(`--- ${name}: page console\n${log.join('\n')}`);
    throw err;
  } finally {
    await page.context().close();
  }
}

for (const bundler of ['vite', 'webpack']) {
  test(`${bundler}: the example app built from the packed package generates text, threaded and not`, async () => {
    const want = nativeRun('-m', MODEL, '-p', PROMPT, '-n', '12', '--temp', '0', '--seed', '1');
    const server = await serve(build(bundler));
    try {
      for (const threads of [2, 1]) await check(server.url, threads, want, `${bundler}-${threads}`);
    } finally {
      server.stop();
    }
  });
}

test('vite: the dev server (vite dev) runs the example too, threaded', { timeout: 180_000 }, async () => {
  const want = nativeRun('-m', MODEL, '-p', PROMPT, '-n', '12', '--temp', '0', '--seed', '1');
  const app = `${dir}/vite`; // installed by the vite test above
  mkdirSync(`${app}/public`, { recursive: true });
  copyFileSync(MODEL, `${app}/public/tiny.gguf`);
  // NO_COLOR: with CI set, vite colours its output even into a pipe, and the port of the URL it prints is bold.
  const env = { ...process.env, NO_COLOR: '1' };
  const dev = spawn(`${app}/node_modules/.bin/vite`, ['--host', '127.0.0.1', '--port', '0'], { cwd: app, env, stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const url = await new Promise((resolve, reject) => {
      let out = '';
      dev.on('exit', (code) => reject(new Error(`vite exited with ${code}: ${out}`)));
      setTimeout(() => reject(new Error(`vite printed no URL in 60 s: ${out}`)), 60_000).unref();
      dev.stdout.on('data', (d) => {
        out += d;
        const m = out.replace(/\x1b\[[0-9;]*m/g, '').match(/(http:\/\/127\.0\.0\.1:\d+\/)/);
        if (m) resolve(m[1]);
      });
    });
    await check(url, 2, want, 'vite-dev-2');
  } finally {
    dev.kill();
  }
});
