// Conversations kept across reloads, in IndexedDB: one record per conversation,
// { id, title, system, messages: [{role, content}], updated }.

const DB = 'bitnet-demo';
const STORE = 'conversations';

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: 'id' });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** Runs `fn(store)` in a transaction; resolves to the result of the request it returns, if any. */
async function run(mode, fn) {
  const db = await open();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const req = fn(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req?.result);
    tx.onerror = () => reject(tx.error);
  });
}

/** All conversations, the most recent first. */
export async function list() {
  const all = await run('readonly', (s) => s.getAll());
  return all.sort((a, b) => b.updated - a.updated);
}

export function save(conversation) {
  return run('readwrite', (s) => s.put({ ...conversation, updated: Date.now() }));
}

export function remove(id) {
  return run('readwrite', (s) => s.delete(id));
}
