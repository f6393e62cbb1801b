// The demo page: load a model (the default one served with the site, a URL, a local or dropped file) or connect
// to `bitnet serve` (server mode), chat or continue text with streamed tokens rendered as Markdown, with a live
// tokens/s. Conversations are kept in IndexedDB (store.js).
//
// For automation it reads ?prompt=...&n=20&seed=1&temp=0&backend=wasm|webgpu|server&autorun=1 (also
// threads=N, ctx=N, mode=chat|complete, model=URL, server=URL, system=TEXT) and keeps window.bitnetDemo =
// { done, text, tokensPerSecond, tokens, backend, threads, error, conversation } up to date.

import { render } from './markdown.js';
import { ServerModel } from './server.js';
import * as store from './store.js';

const DEFAULT_MODEL = 'models/smolbit-135m.gguf';
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const demo = (window.bitnetDemo = { done: false, text: '', tokensPerSecond: null, tokens: null, backend: null, threads: null, error: null, conversation: null });
// The theme first, before anything is awaited: no flash of the other one.
setTheme((localStorage.getItem('bitnet-theme') ?? (matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light')) === 'dark');
/** The npm package, or null where the site was served without it (by `bitnet serve`, for server mode only). */
const { BitNet } = (await import('./bitnet/index.js').catch(() => null)) ?? { BitNet: null };

let model = null;
let loading = null; // the AbortController of a load in progress
let running = null; // the Generation in progress
/** The conversation on screen: { id, title, system, messages }. */
let chat = newConversation();

function newConversation() {
  return { id: crypto.randomUUID(), title: 'New conversation', system: '', messages: [] };
}

function setStatus(text, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
}

function fail(err) {
  console.error(err);
  demo.error = err?.message ?? String(err);
  demo.done = true;
  setStatus(demo.error, true);
}

const megabytes = (n) => `${(n / 1e6).toFixed(n < 1e7 ? 1 : 0)} MB`;

// ---- loading ----

function chosenSource() {
  const kind = document.querySelector('input[name=source]:checked').value;
  if (kind === 'url') {
    const url = $('model-url').value.trim();
    if (!url) throw new Error('enter the URL of a GGUF file');
    return { source: url, name: url.split('/').pop() };
  }
  if (kind === 'file') {
    const file = $('model-file').files[0];
    if (!file) throw new Error('choose a GGUF file');
    return { source: file, name: file.name };
  }
  return { source: params.get('model') ?? DEFAULT_MODEL, name: (params.get('model') ?? DEFAULT_MODEL).split('/').pop() };
}

function showProgress(p) {
  const bar = $('progress');
  bar.hidden = false;
  bar.max = p.total || 1;
  if (p.total) bar.value = p.loaded;
  else bar.removeAttribute('value'); // indeterminate
  const what = { download: 'Downloading', cache: 'Reading from the browser cache', read: 'Reading the file', load: 'Building the model' }[p.phase];
  const amount = p.phase === 'load' ? `${p.loaded}/${p.total}` : `${megabytes(p.loaded)}${p.total ? ` of ${megabytes(p.total)}` : ''}`;
  setStatus(`${what}… ${amount}`);
}

async function loadModel(source, name) {
  running?.abort();
  model?.unload();
  model = null;
  setControls(false);
  demo.backend = null;
  const t0 = performance.now();
  loading = new AbortController();
  $('cancel-load').hidden = false;
  try {
    if ($('backend').value === 'server') {
      const server = new ServerModel($('server-url').value.trim() || params.get('server') || location.href);
      name = await server.connect();
      model = server;
    } else {
      if (!BitNet) throw new Error('this page was served without the wasm engine: only server mode works here');
      const threads = params.has('threads') ? Number(params.get('threads')) : undefined;
      const ctx = params.has('ctx') ? Number(params.get('ctx')) : undefined;
      model = await BitNet.load(source, { backend: $('backend').value, threads, ctx, onProgress: showProgress, signal: loading.signal });
    }
  } catch (err) {
    if (err?.name === 'AbortError') {
      setStatus('Loading cancelled.');
      return;
    }
    throw err;
  } finally {
    loading = null;
    $('cancel-load').hidden = true;
    $('progress').hidden = true;
  }
  const i = model.info;
  demo.backend = i.backend;
  demo.threads = i.threads;
  const cpu = i.backend.startsWith('cpu') ? `, ${i.threads} thread${i.threads > 1 ? 's' : ''}${i.build.simd128 ? ', SIMD128' : ''}` : '';
  const note = [i.backendNote, i.threadsNote].filter(Boolean).map((n) => ` (${n})`).join('');
  const shape = i.arch ? `: ${i.arch}, ${i.nLayer} layers, context ${i.ctx}` : '';
  setStatus(`${name}${shape} · backend ${i.backend}${cpu}${note} · ready in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  await model.reset();
  setControls(true);
  refreshCache();
}

function setControls(ready) {
  $('prompt').disabled = !ready;
  $('send').disabled = !ready;
  $('stop').disabled = true;
}

// ---- messages ----

function bubble(role, text = '', index = null) {
  const div = document.createElement('div');
  div.className = `msg ${role}`;
  const body = document.createElement('div');
  body.className = 'body';
  div.append(body);
  if (role === 'assistant') render(body, text);
  else body.textContent = text;
  if (role === 'assistant' && index !== null) div.append(actions(index));
  $('messages').append(div);
  return body;
}

/** Copy (every answer) and regenerate (the last one). */
function actions(index) {
  const bar = document.createElement('div');
  bar.className = 'actions';
  const copy = document.createElement('button');
  copy.textContent = 'Copy';
  copy.className = 'copy';
  copy.onclick = async () => {
    await navigator.clipboard.writeText(chat.messages[index].content);
    copy.textContent = 'Copied';
  };
  bar.append(copy);
  if (index === chat.messages.length - 1) {
    const again = document.createElement('button');
    again.textContent = 'Regenerate';
    again.className = 'regenerate';
    again.onclick = () => regenerate();
    bar.append(again);
  }
  return bar;
}

function errorBubble(message) {
  const div = document.createElement('div');
  div.className = 'msg error';
  div.textContent = `The reply failed: ${message}`;
  $('messages').append(div);
}

function showConversation() {
  $('messages').replaceChildren();
  chat.messages.forEach((m, i) => bubble(m.role, m.content, i));
  $('system').value = chat.system;
  demo.conversation = chat.messages;
}

// ---- generating ----

function options() {
  const o = { maxTokens: Number($('n').value) || 128, temperature: Number($('temp').value), topP: Number($('top-p').value), topK: Number($('top-k').value), minP: Number($('min-p').value) };
  if ($('seed').value !== '') o.seed = Number($('seed').value);
  return o;
}

async function send() {
  const text = $('prompt').value;
  if (!model || running || !text.trim()) return;
  $('prompt').value = '';
  if ($('mode').value === 'complete') return complete(text);
  chat.system = $('system').value.trim();
  chat.messages.push({ role: 'user', content: text });
  if (chat.title === 'New conversation') chat.title = text.slice(0, 40);
  bubble('user', text);
  await reply(text);
}

/** Streams the answer to the conversation's last user message. */
async function reply(userText) {
  const system = chat.system ? [{ role: 'system', content: chat.system }] : [];
  const out = bubble('assistant');
  const gen = model.chat([...system, ...chat.messages], options());
  const ok = await stream(gen, out);
  out.parentElement.remove();
  if (ok) {
    chat.messages.push({ role: 'assistant', content: demo.text.trim() });
  } else {
    // A failed reply takes its question back (into the prompt box): the next request must not send two user turns.
    chat.messages.pop();
    $('prompt').value = userText;
  }
  showConversation();
  if (!ok) errorBubble(demo.error);
  await saveConversation();
  demo.done = true;
}

async function regenerate() {
  if (running || chat.messages.at(-1)?.role !== 'assistant') return;
  chat.messages.pop();
  showConversation();
  await reply(chat.messages.at(-1).content);
}

/** Completion mode: the prompt and its continuation as one Markdown text (not kept as a conversation). */
async function complete(prompt) {
  const out = bubble('assistant');
  const ok = await stream(model.generate(prompt, options()), out, prompt);
  out.parentElement.classList.add('completion');
  if (!ok) errorBubble(demo.error);
  demo.done = true;
}

/** Shows `gen`'s text in `out` as it comes, with the live speed; resolves to whether it ended without error. */
async function stream(gen, out, before = '') {
  Object.assign(demo, { done: false, text: '', tokensPerSecond: null, tokens: null, error: null });
  running = gen;
  $('send').disabled = true;
  $('stop').disabled = false;
  out.classList.add('streaming');
  let ok = true;
  try {
    for await (const piece of gen) {
      demo.text += piece;
      render(out, before + demo.text);
      if (gen.tokensPerSecond) $('stats').textContent = `${gen.generatedTokens} tokens · ${gen.tokensPerSecond.toFixed(1)} tokens/s`;
      out.scrollIntoView({ block: 'end' });
    }
    const s = await gen.stats;
    demo.tokensPerSecond = s.decodeTokensPerSecond;
    demo.tokens = s.generatedTokens;
    $('stats').textContent =
      `${s.generatedTokens} tokens at ${s.decodeTokensPerSecond.toFixed(1)} tokens/s (prompt: ${s.promptTokens} tokens` +
      `${s.promptTokensPerSecond ? `, ${s.promptTokensPerSecond.toFixed(1)} tokens/s` : ''}) · backend ${s.backend} · stop: ${s.stop}` +
      `${s.seed != null ? ` · seed ${s.seed}` : ''}`;
  } catch (err) {
    if (err?.name !== 'AbortError') {
      ok = false;
      console.error(err);
      demo.error = err?.message ?? String(err);
    }
  }
  out.classList.remove('streaming');
  running = null;
  $('send').disabled = false;
  $('stop').disabled = true;
  return ok;
}

// ---- conversations (IndexedDB) ----

async function saveConversation() {
  if (!chat.messages.length) return;
  await store.save(chat).catch((e) => console.warn(`conversation not saved: ${e}`));
  await refreshConversations();
}

async function refreshConversations() {
  const all = await store.list().catch(() => []);
  const select = $('conversations');
  select.replaceChildren(...[chat, ...all.filter((c) => c.id !== chat.id)].map((c) => new Option(c.title, c.id, false, c.id === chat.id)));
  select.onchange = async () => {
    if (running) return;
    chat = (await store.list()).find((c) => c.id === select.value) ?? newConversation();
    showConversation();
    await model?.reset();
  };
}

async function startNewConversation() {
  running?.abort();
  chat = newConversation();
  showConversation();
  $('stats').textContent = '';
  await refreshConversations();
  await model?.reset();
}

// ---- cache, theme, drop ----

async function refreshCache() {
  const list = $('cache-list');
  if (!BitNet) return;
  if (!('caches' in window)) {
    list.innerHTML = '<li class="muted">The Cache API needs a secure context (https or localhost).</li>';
    return;
  }
  const models = await BitNet.cache.list();
  list.replaceChildren();
  if (!models.length) list.innerHTML = '<li class="muted">None yet: models loaded by URL are kept here.</li>';
  for (const m of models) {
    const li = document.createElement('li');
    const when = m.cachedAt ? new Date(m.cachedAt).toLocaleString() : '';
    li.textContent = `${m.url} · ${m.size ? megabytes(m.size) : 'size unknown'} · ${when} `;
    const load = document.createElement('button');
    load.textContent = 'Load';
    load.onclick = () => loadModel(m.url, m.url.split('/').pop()).catch(fail);
    const del = document.createElement('button');
    del.textContent = 'Delete';
    del.onclick = () => BitNet.cache.delete(m.url).then(refreshCache);
    li.append(load, del);
    list.append(li);
  }
}

function setTheme(dark) {
  document.documentElement.dataset.theme = dark ? 'dark' : 'light';
  $('theme').textContent = dark ? 'Light' : 'Dark';
  localStorage.setItem('bitnet-theme', dark ? 'dark' : 'light');
}

function acceptDrops() {
  let depth = 0;
  const hint = (show) => ($('drop-hint').hidden = !show);
  document.addEventListener('dragenter', (e) => e.dataTransfer?.types.includes('Files') && hint(++depth > 0));
  document.addEventListener('dragleave', () => hint(--depth > 0));
  document.addEventListener('dragover', (e) => e.preventDefault());
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    depth = 0;
    hint(false);
    const file = e.dataTransfer?.files[0];
    if (!file) return;
    if (!file.name.toLowerCase().endsWith('.gguf')) return fail(new Error(`${file.name} is not a .gguf file`));
    document.querySelector('input[name=source][value=file]').checked = true;
    if ($('backend').value === 'server') $('backend').value = 'auto';
    loadModel(file, file.name).catch(fail);
  });
}

// ---- wiring ----

$('load').onclick = () => {
  try {
    const { source, name } = chosenSource();
    loadModel(source, name).catch(fail);
  } catch (err) {
    fail(err);
  }
};
$('cancel-load').onclick = () => loading?.abort(new DOMException('loading cancelled', 'AbortError'));
$('prompt-form').onsubmit = (e) => {
  e.preventDefault();
  send();
};
$('prompt').onkeydown = (e) => {
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();
    send();
  }
};
$('stop').onclick = () => running?.abort();
$('clear').onclick = startNewConversation;
$('new-chat').onclick = startNewConversation;
$('delete-chat').onclick = async () => {
  await store.remove(chat.id);
  await startNewConversation();
};
$('system').onchange = () => (chat.system = $('system').value.trim());
$('backend').onchange = () => ($('server-url').hidden = $('backend').value !== 'server');
$('model-url').onfocus = () => (document.querySelector('input[name=source][value=url]').checked = true);
$('model-file').onchange = () => (document.querySelector('input[name=source][value=file]').checked = true);
$('theme').onclick = () => setTheme(document.documentElement.dataset.theme !== 'dark');
acceptDrops();

// Automation: fill the form from the query string, then load the model and run the prompt.
for (const [param, id] of [['n', 'n'], ['temp', 'temp'], ['seed', 'seed'], ['backend', 'backend'], ['mode', 'mode'], ['server', 'server-url']]) {
  if (params.has(param)) $(id).value = params.get(param);
}
if (!BitNet) {
  // Only the page was served: it can talk to the server it came from, and nothing else.
  $('backend').value = 'server';
  for (const el of document.querySelectorAll('input[name=source], #model-url, #model-file, #backend')) el.disabled = true;
  setStatus('This page was served without the wasm engine: it uses the server it came from.');
  document.querySelector('h1').textContent = 'BitNet chat';
  document.querySelector('header .sub').textContent = 'Served by bitnet serve: the model runs on the server this page came from.';
}
$('server-url').hidden = $('backend').value !== 'server';
if (params.has('prompt')) {
  $('prompt').value = params.get('prompt');
  if (!params.has('mode')) $('mode').value = 'complete';
}
const restored = (await store.list().catch(() => []))[0];
if (restored && !params.has('prompt')) chat = restored;
if (params.has('system')) chat.system = params.get('system');
showConversation();
refreshConversations();
refreshCache().catch(() => {});
if (params.get('autorun') === '1') {
  const { source, name } = chosenSource();
  const prompt = $('prompt').value;
  loadModel(source, name)
    .then(() => {
      $('prompt').value = prompt;
      return send();
    })
    .catch(fail);
}
