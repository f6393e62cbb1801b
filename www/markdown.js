// Markdown to safe HTML: marked parses (GitHub-flavoured), DOMPurify removes anything that could run script.
// Both are vendored from npm in www/vendor/ (see its README).
import { marked } from './vendor/marked.esm.js';
import DOMPurify from './vendor/purify.es.mjs';

marked.setOptions({ gfm: true, breaks: true });

/** Renders `text` (possibly cut mid-stream: marked closes what is open) into `element`. */
export function render(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text));
}
