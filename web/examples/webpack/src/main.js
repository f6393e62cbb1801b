// A minimal app: loads a GGUF model and streams a reply with the OpenAI-shaped API.
// ?model=URL&threads=N&prompt=TEXT&n=TOKENS (the test drives it; window.example holds the result).
import { BitNet } from 'bitnet-web';

const params = new URLSearchParams(location.search);
const out = document.getElementById('out');

async function main() {
  const model = await BitNet.load(params.get('model') ?? 'model.gguf', {
    backend: 'wasm',
    threads: Number(params.get('threads') ?? navigator.hardwareConcurrency),
    cache: false,
  });
  const stream = await model.completions.create({
    prompt: params.get('prompt') ?? 'Once upon a time',
    max_tokens: Number(params.get('n') ?? 32),
    temperature: 0,
    stream: true,
  });
  let text = '';
  for await (const chunk of stream) {
    text += chunk.choices[0]?.text ?? '';
    out.textContent = text;
  }
  return { text, info: model.info };
}

window.example = main().then(
  (r) => ({ ...r, error: null }),
  (e) => ({ error: String(e?.stack ?? e) }),
);
