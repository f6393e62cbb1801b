// Shared by the browser tests: the `bitnet` binary, its static server, and headless Chromium.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

export const ROOT = new URL('../../', import.meta.url).pathname;
/** Build outputs: CARGO_TARGET_DIR when set (as cargo and web/build.sh use it), else target/. */
export const TARGET = (process.env.CARGO_TARGET_DIR ?? `${ROOT}target`).replace(/\/$/, '');
/** The native binary; BITNET overrides it (a binary built elsewhere from the same sources). */
export const BITNET = process.env.BITNET ?? `${TARGET}/release/bitnet`;
/** The demo site web/build.sh makes. */
export const SITE = `${TARGET}/www`;
/** Screenshots and measurements. */
export const OUT = `${TARGET}/web-test`;
mkdirSync(OUT, { recursive: true });

/** stdout of `bitnet args...` */
export function bitnet(...args) {
  return bitnetWithInput('', ...args);
}

/** stdout of `bitnet args...` with `input` on stdin. */
export function bitnetWithInput(input, ...args) {
  return execFileSync(BITNET, args, { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'], maxBuffer: 1 << 26 });
}

/** The continuation `bitnet run` prints: stdout without the newline it adds at the end. */
export function nativeRun(...args) {
  const out = bitnet('run', ...args);
  if (!out.endsWith('\n')) throw new Error(`unexpected bitnet run output: ${JSON.stringify(out)}`);
  return out.slice(0, -1);
}

/** Starts `bitnet serve-www` on a free port; resolves to { url, stop }. */
export function serve(dir) {
  const server = spawn(BITNET, ['serve-www', '--port', '0', '--dir', dir], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let out = '';
    server.on('exit', (code) => reject(new Error(`bitnet serve-www exited with ${code}: ${out}`)));
    server.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/at (http:\/\/127\.0\.0\.1:\d+\/)/);
      if (m) resolve({ url: m[1], stop: () => server.kill() });
    });
  });
}

/** Headless Chromium with SwiftShader's WebGPU adapter (toolchain.md §4). */
export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--enable-unsafe-webgpu'],
  });
}

/** A new page whose console errors are collected (shown when a test fails). */
export async function newPage(browser, log) {
  const page = await (await browser.newContext({ viewport: { width: 1000, height: 900 } })).newPage();
  page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  return page;
}

/**
 * Serves `site` (an index.html that puts the package's `BitNet` on `window`) and opens it in Chromium. Returns the
 * server, the browser and the page, `inPage(fn, arg)`, which runs `fn(BitNet, arg)` in the page and prints the
 * page's console (collected into `log`) when it throws, and `close()`.
 */
export async function openBitNetPage(site, log) {
  const server = await serve(site);
  const browser = await launch();
  const page = await newPage(browser, log);
  await page.goto(server.url);
  await page.waitForFunction(() => window.BitNet);
  const inPage = async (fn, arg) => {
    try {
      return await page.evaluate(`(${fn})(window.BitNet, ${JSON.stringify(arg)})`);
    } catch (err) {
      console.log(`--- page console\n${log.join('\n')}`);
      throw err;
    }
  };
  const close = async () => {
    await browser.close();
    server.stop();
  };
  return { server, browser, page, inPage, close };
}
