#!/usr/bin/env python3
"""Soak test of `bitnet serve` on loopback: hostile and valid clients mixed for a bounded time. Standard library only.

    python3 tests/scripts/soak_serve.py [--bin target/debug/bitnet] [-m MODEL.gguf] [--seconds 180] [--clients 12]
                                        [--slots 4] [--ctx 512] [--max-tokens 16] [--rss-growth-mb 64] [--seed 1]

It starts the server itself (127.0.0.1, --port 0) and stops it at the end; every client loop ends at the deadline
and every request has a timeout, so the whole run ends by itself. Each client picks, at random:
  valid      a greedy completion (streamed or not) of one of a few prompts: its text must equal `bitnet run --temp 0`'s
  sampled    a sampled chat completion: it must succeed
  cancel     a streamed completion closed after its first chunk (the server must free the slot)
  slow       a streamed completion read a line at a time with pauses, then abandoned or read to the end
  oversized  a body over --max-body: 413
  malformed  bad JSON, a wrong field type, a wrong content type, a foreign Host, GET on a POST endpoint: 4xx
  half-sent  headers or a body that never finish, then the connection is closed
At the end: no slot busy and nothing queued (/metrics), the server's RSS growth under --rss-growth-mb, every valid
answer correct. Prints the figures (requests by kind, outcomes, RSS at start and end, p50/p99 latency of the valid
requests) and exits 1 if any check failed.
"""
import argparse, http.client, json, os, random, re, socket, statistics, subprocess, sys, threading, time

PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):", "The weather today",
           "My favourite food is", "In 1492,"]
HOST = "127.0.0.1"


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M)[1])


def metrics(port):
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {m[1]: float(m[2]) for m in re.finditer(r"^bitnet_(\w+) (\S+)$", text, re.M)}


def post(port, path, body, timeout=120, headers=None):
    """(status, parsed JSON body or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    conn.request("POST", path, data, headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def stream(port, body, lines=None, pause=0.0, timeout=120):
    """Streams a completion; reads `lines` SSE lines (all when None) with `pause` seconds between them.
    Returns the text when read to [DONE], else None (abandoned)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    conn.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"stream: HTTP {resp.status}")
    text, n = [], 0
    try:
        while lines is None or n < lines:
            line = resp.fp.readline()
            if not line:
                raise RuntimeError("stream ended without [DONE]")
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            n += 1
            if line == "data: [DONE]":
                return "".join(text)
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event}")
            if event["choices"]:
                text.append(event["choices"][0]["text"])
            time.sleep(pause)
        return None
    finally:
        conn.close()


def raw_send(port, data, wait=0.5):
    """Sends raw bytes, waits a little, closes: a client that never finishes its request."""
    s = socket.create_connection((HOST, port), timeout=10)
    try:
        s.sendall(data)
        time.sleep(wait)
    finally:
        s.close()


class Soak:
    def __init__(self, a, port, expected):
        self.a, self.port, self.expected = a, port, expected
        self.lock = threading.Lock()
        self.counts = {}  # (kind, outcome) -> n
        self.failures = []
        self.latencies = []

    def note(self, kind, outcome, failure=None, latency=None):
        with self.lock:
            self.counts[(kind, outcome)] = self.counts.get((kind, outcome), 0) + 1
            if failure:
                self.failures.append(f"{kind}: {failure}")
            if latency is not None:
                self.latencies.append(latency)

    def expect(self, kind, status, want):
        if status == want:
            self.note(kind, str(status))
        elif status == 429:
            self.note(kind, "429 busy")
        else:
            self.note(kind, str(status), f"HTTP {status}, expected {want}")

    def valid(self, rng):
        prompt = rng.choice(PROMPTS)
        body = {"prompt": prompt, "max_tokens": self.a.max_tokens, "temperature": 0}
        t0 = time.monotonic()
        if rng.random() < 0.5:
            status, out = post(self.port, "/v1/completions", body)
            if status == 429:
                return self.note("valid", "429 busy")
            text = out["choices"][0]["text"] if status == 200 else None
        else:
            status, text = 200, stream(self.port, body)
        latency = time.monotonic() - t0
        if status != 200 or text != self.expected[prompt]:
            return self.note("valid", "wrong", f"{prompt!r}: HTTP {status}, {text!r} != {self.expected[prompt]!r}")
        self.note("valid", "ok", latency=latency)

    def sampled(self, rng):
        body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": self.a.max_tokens,
                "temperature": 0.9, "seed": rng.randrange(1 << 30)}
        status, _ = post(self.port, "/v1/chat/completions", body)
        self.expect("sampled", status, 200)

    def cancel(self, rng):
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": self.a.ctx // 2, "temperature": 0.8, "seed": rng.randrange(99)}
        stream(self.port, body, lines=1)
        self.note("cancel", "closed")

    def slow(self, rng):
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": self.a.max_tokens, "temperature": 0}
        read_all = rng.random() < 0.5
        text = stream(self.port, body, lines=None if read_all else 4, pause=0.2)
        if read_all and text != self.expected[body["prompt"]]:
            return self.note("slow", "wrong", f"{body['prompt']!r}: {text!r}")
        self.note("slow", "read all" if read_all else "abandoned")

    def oversized(self, rng):
        body = {"prompt": "x" * (self.a.max_body + rng.randrange(1, 1000))}
        try:
            status, _ = post(self.port, "/v1/completions", body)
        except (ConnectionError, socket.timeout):
            return self.note("oversized", "connection closed")  # the server may close before reading it all
        self.expect("oversized", status, 413)

    def malformed(self, rng):
        case = rng.randrange(5)
        if case == 0:
            status, _ = post(self.port, "/v1/completions", '{"prompt": "a", ')
            self.expect("malformed", status, 400)
        elif case == 1:
            status, _ = post(self.port, "/v1/chat/completions", {"messages": "hi", "temperature": "hot"})
            self.expect("malformed", status, 400)
        elif case == 2:
            status, _ = post(self.port, "/v1/completions", '{"prompt": "a"}', headers={"Content-Type": "text/plain"})
            self.expect("malformed", status, 415)
        elif case == 3:
            status, _ = post(self.port, "/v1/completions", {"prompt": "a"},
                             headers={"Content-Type": "application/json", "Host": "evil.example"})
            self.expect("malformed", status, 403)
        else:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
            conn.request("GET", "/v1/completions")
            status = conn.getresponse().status
            conn.close()
            self.expect("malformed", status, 405)

    def half_sent(self, rng):
        if rng.random() < 0.5:
            raw_send(self.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        else:
            raw_send(self.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"prompt\": \"a")
        self.note("half-sent", "closed")

    def client(self, i, deadline):
        rng = random.Random(self.a.seed * 1000 + i)
        kinds = [(self.valid, 30), (self.sampled, 15), (self.cancel, 10), (self.slow, 8), (self.oversized, 5),
                 (self.malformed, 20), (self.half_sent, 5)]
        funcs, weights = zip(*kinds)
        while time.monotonic() < deadline:
            f = rng.choices(funcs, weights)[0]
            try:
                f(rng)
            except Exception as e:  # a request that failed in a way no kind expects
                self.note(f.__name__, "exception", f"{type(e).__name__}: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/debug/bitnet")
    ap.add_argument("-m", "--model")
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-body", type=int, default=65536)
    ap.add_argument("--rss-growth-mb", type=float, default=64)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    model = ["-m", a.model] if a.model else []

    # What each valid request must answer: `bitnet run --temp 0` (its stdout ends with one newline).
    expected = {}
    for p in PROMPTS:
        out = subprocess.run([a.bin, "run", *model, "--ctx", str(a.ctx), "-p", p, "-n", str(a.max_tokens),
                              "--temp", "0"], capture_output=True, text=True, timeout=300, check=True)
        expected[p] = out.stdout[:-1]

    cmd = [a.bin, "serve", *model, "--port", "0", "--slots", str(a.slots), "--ctx", str(a.ctx), "--queue", "256",
           "--max-body", str(a.max_body), "--timeout", "5"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(server.stdout.readline().strip().rsplit(":", 1)[1])
        soak = Soak(a, port, expected)
        for p in PROMPTS:  # warm up (first allocations), then the baseline RSS
            post(port, "/v1/completions", {"prompt": p, "max_tokens": 2, "temperature": 0})
        rss_start = rss_kb(server.pid)
        t0 = time.monotonic()
        deadline = t0 + a.seconds
        threads = [threading.Thread(target=soak.client, args=(i, deadline), daemon=True) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()) + 300)
        duration = time.monotonic() - t0

        # Every slot free and nothing queued, once the last cancellations are seen by the engine.
        m = metrics(port)
        settle = time.monotonic() + 30
        while (m["slots_busy"] or m["queue_depth"]) and time.monotonic() < settle:
            time.sleep(0.2)
            m = metrics(port)
        rss_end = rss_kb(server.pid)
        alive = server.poll() is None
    finally:
        server.kill()
        server.wait()

    total = sum(soak.counts.values())
    print(f"duration {duration:.0f} s, {a.clients} clients, {total} requests, server {' '.join(cmd[1:])}")
    for (kind, outcome), n in sorted(soak.counts.items()):
        print(f"  {kind:<10} {outcome:<18} {n}")
    lat = sorted(soak.latencies)
    if lat:
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        print(f"valid requests: {len(lat)}, latency p50 {statistics.median(lat) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    print(f"server metrics: requests {m['requests_total']:.0f}, cancelled {m['requests_cancelled_total']:.0f}, "
          f"rejected {m['requests_rejected_total']:.0f}, slots busy {m['slots_busy']:.0f}, queued {m['queue_depth']:.0f}")
    growth = (rss_end - rss_start) / 1024
    print(f"RSS: {rss_start / 1024:.1f} MB at start, {rss_end / 1024:.1f} MB at the end ({growth:+.1f} MB)")

    problems = list(soak.failures)
    if not alive:
        problems.append("the server died")
    if m["slots_busy"] or m["queue_depth"]:
        problems.append(f"leaked: {m['slots_busy']:.0f} slots busy, {m['queue_depth']:.0f} queued after the run")
    if growth > a.rss_growth_mb:
        problems.append(f"RSS grew by {growth:.1f} MB (bound {a.rss_growth_mb} MB)")
    if not lat:
        problems.append("no valid request was answered")
    for p in problems[:20]:
        print("FAIL:", p)
    if problems:
        print(f"{len(problems)} problem(s)")
        sys.exit(1)
    print("soak OK")


if __name__ == "__main__":
    main()
