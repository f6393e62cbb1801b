#!/usr/bin/env python3
"""Load benchmark of `bitnet serve` on loopback: aggregate generated tokens/s and request latency (p50/p99)
and per-stream tokens/s (each request's tokens over its latency, averaged) at several numbers of concurrent
clients, on any --backend. Standard library only.

    python3 tests/scripts/bench_serve.py [--bin target/release/bitnet] [-m MODEL.gguf] [--clients 1,4,16]
                                         [--requests 32] [--max-tokens 64] [--max-seconds 300] [--slots 16]
                                         [--backend cpu|wgpu|cuda] [--kv-type f32|f16|q8_0]

It starts the server itself (--port 0, --slots SLOTS, --ctx CTX), sends a fixed number of requests per level
(each client sends its next request as soon as the previous one is answered; a level stops early, with what it
has, after --max-seconds), then stops the server. Requests are /v1/completions with distinct prompts, sampled
at temperature 0.8 with a fixed seed each, so every level generates the same tokens; the generated-token count
comes from each response's `usage`. Prints one Markdown table row per level; from the server's /metrics, the mean
number of sequences per decode step, the mean step time, and the share of the wall time spent in steps (the rest
is sampling, admission and HTTP).
"""
import argparse, http.client, json, re, statistics, subprocess, sys, threading, time, urllib.parse

PROMPTS = [
    "The history of the city begins", "Here is a recipe for bread:", "The best way to learn a language is",
    "Once upon a time, in a small village,", "The main causes of the war were", "In mathematics, a prime number",
    "My favourite season is autumn because", "The report concludes that", "Dear friend, I am writing to",
    "The experiment showed that", "A good night's sleep helps", "The river flows through",
]


def request(host, port, body):
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data}")
    return data["usage"]["completion_tokens"]


def metrics(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {m[1]: float(m[2]) for m in re.finditer(r"^bitnet_(\w+) (\S+)$", text, re.M)}


def level(host, port, clients, n_requests, max_tokens, max_seconds):
    before = metrics(host, port)
    next_i, lock = [0], threading.Lock()
    latencies, stream_tps, tokens = [], [], [0]
    deadline = time.monotonic() + max_seconds

    def client():
        while time.monotonic() < deadline:
            with lock:
                i = next_i[0]
                if i >= n_requests:
                    return
                next_i[0] += 1
            body = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})", "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": i}
            t0 = time.monotonic()
            n = request(host, port, body)
            with lock:
                latencies.append(time.monotonic() - t0)
                stream_tps.append(n / (time.monotonic() - t0))
                tokens[0] += n

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    after = metrics(host, port)
    steps = after["steps_total"] - before["steps_total"]
    step_secs = after["step_seconds_total"] - before["step_seconds_total"]
    rows = after["decode_rows_total"] - before["decode_rows_total"]
    lat = sorted(latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
    return {"clients": clients, "requests": len(lat), "tokens": tokens[0], "wall": wall, "tps": tokens[0] / wall,
            "stream_tps": statistics.mean(stream_tps), "p50": statistics.median(lat) * 1000, "p99": p(0.99), "batch": rows / max(steps, 1),
            "step_ms": step_secs / max(steps, 1) * 1000, "busy": step_secs / wall * 100}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/bitnet")
    ap.add_argument("-m", "--model")
    ap.add_argument("-t", "--threads", type=int)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=300)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--backend", help="bitnet serve --backend (cpu, wgpu, cuda, auto)")
    ap.add_argument("--kv-type", help="bitnet serve --kv-type (f32, f16, q8_0)")
    a = ap.parse_args()
    cmd = [a.bin, "serve", "--port", "0", "--slots", str(a.slots), "--ctx", str(a.ctx)]
    cmd += ["-m", a.model] if a.model else []
    cmd += ["-t", str(a.threads)] if a.threads else []
    cmd += ["--backend", a.backend] if a.backend else []
    cmd += ["--kv-type", a.kv_type] if a.kv_type else []
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        url = urllib.parse.urlparse(server.stdout.readline().split()[-1])
        host, port = url.hostname, url.port
        request(host, port, {"prompt": "warm up", "max_tokens": 4})
        print(f"model {a.model or 'default'}, {a.requests} requests x {a.max_tokens} tokens per level, {a.slots} slots",
              file=sys.stderr)
        print("| clients | requests | tokens | wall s | tokens/s | per stream | p50 ms | p99 ms | mean batch | step ms | in steps |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c in [int(x) for x in a.clients.split(",")]:
            r = level(host, port, c, a.requests, a.max_tokens, a.max_seconds)
            print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['tps']:.1f} | {r['stream_tps']:.1f} | "
                  f"{r['p50']:.0f} | {r['p99']:.0f} | {r['batch']:.1f} | {r['step_ms']:.0f} | {r['busy']:.0f}% |", flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
