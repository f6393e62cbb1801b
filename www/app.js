// The demo page: load a model (the default one served with the site, a URL, or a local file), chat or continue
// text with streamed tokens, and show tokens/s and the backend. For automation it reads
// ?prompt=...&n=20&seed=1&temp=0&backend=wasm|webgpu&autorun=1 (also threads=N, mode=chat|complete, model=URL)
// and keeps window.bitnetDemo = { done, text, tokensPerSecond, backend, error } up to date (also tokens: how many were
// generated, and threads).

import { BitNet } from './bitnet/index.js';

const DEFAULT_MODEL = 'models/smolbit-135m.gguf';
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const demo = (window.bitnetDemo = { done: false, text: '', tokensPerSecond: null, tokens: null, backend: null, threads: null, error: null });

let model = null;
let conversation = [];
let running = null; // the Generation in progress

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

function megabytes(n) {
  return `${(n / 1e6).toFixed(n < 1e7 ? 1 : 0)} MB`;
}

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
  return { source: params.get('model') ?? DEFAULT_MODEL, name: 'smolbit-135m' };
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
  const threads = params.has('threads') ? Number(params.get('threads')) : undefined;
  const t0 = performance.now();
  model = await BitNet.load(source, { backend: $('backend').value, threads, onProgress: showProgress });
  $('progress').hidden = true;
  const i = model.info;
  demo.backend = i.backend;
  demo.threads = i.threads;
  const cpu = i.backend.startsWith('cpu') ? `, ${i.threads} thread${i.threads > 1 ? 's' : ''}${i.build.simd128 ? ', SIMD128' : ''}` : '';
  const note = i.backendNote ? ` (${i.backendNote})` : '';
  setStatus(`${name}: ${i.arch}, ${i.nLayer} layers, context ${i.ctx} · backend ${i.backend}${cpu}${note} · loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  conversation = [];
  setControls(true);
  refreshCache();
}

function setControls(ready) {
  $('prompt').disabled = !ready;
  $('send').disabled = !ready;
  $('stop').disabled = true;
}

function bubble(role, text = '') {
  const div = document.createElement('div');
  div.className = `msg ${role}`;
  div.textContent = text;
  $('messages').append(div);
  return div;
}

async function send() {
  const text = $('prompt').value;
  if (!model || running || !text.trim()) return;
  const options = { maxTokens: Number($('n').value) || 128, temperature: Number($('temp').value) };
  if ($('seed').value !== '') options.seed = Number($('seed').value);
  const complete = $('mode').value === 'complete';
  Object.assign(demo, { done: false, text: '', tokensPerSecond: null, tokens: null, error: null });
  let out;
  if (complete) {
    const div = bubble('assistant');
    const prompt = document.createElement('b');
    prompt.textContent = text;
    out = document.createElement('span');
    div.append(prompt, out);
    running = model.generate(text, options);
  } else {
    conversation.push({ role: 'user', content: text });
    bubble('user', text);
    out = bubble('assistant');
    running = model.chat(conversation, options);
  }
  $('prompt').value = '';
  $('send').disabled = true;
  $('stop').disabled = false;
  out.classList.add('streaming');
  try {
    for await (const piece of running) {
      out.textContent += piece;
      demo.text += piece;
      out.scrollIntoView({ block: 'end' });
    }
  } catch (err) {
    if (err?.name !== 'AbortError') fail(err);
  }
  out.classList.remove('streaming');
  try {
    const s = await running.stats;
    if (!complete) conversation.push({ role: 'assistant', content: demo.text.trim() });
    demo.tokensPerSecond = s.decodeTokensPerSecond;
    demo.tokens = s.generatedTokens;
    $('stats').textContent =
      `${s.generatedTokens} tokens at ${s.decodeTokensPerSecond.toFixed(1)} tokens/s (prompt: ${s.promptTokens} tokens, ` +
      `${s.promptTokensPerSecond.toFixed(1)} tokens/s) · backend ${s.backend} · stop: ${s.stop} · seed ${s.seed}`;
  } catch (err) {
    fail(err);
  }
  running = null;
  demo.done = true;
  $('send').disabled = false;
  $('stop').disabled = true;
}

async function refreshCache() {
  const list = $('cache-list');
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

$('load').onclick = () => {
  try {
    const { source, name } = chosenSource();
    loadModel(source, name).catch(fail);
  } catch (err) {
    fail(err);
  }
};
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
$('clear').onclick = async () => {
  conversation = [];
  $('messages').replaceChildren();
  $('stats').textContent = '';
  await model?.reset();
};
$('model-url').onfocus = () => (document.querySelector('input[name=source][value=url]').checked = true);
$('model-file').onchange = () => (document.querySelector('input[name=source][value=file]').checked = true);

// Automation: fill the form from the query string, then load the model and run the prompt.
for (const [param, id] of [['n', 'n'], ['temp', 'temp'], ['seed', 'seed'], ['backend', 'backend'], ['mode', 'mode']]) {
  if (params.has(param)) $(id).value = params.get(param);
}
if (params.has('prompt')) {
  $('prompt').value = params.get('prompt');
  if (!params.has('mode')) $('mode').value = 'complete';
}
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
