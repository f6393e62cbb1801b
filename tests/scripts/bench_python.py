"""Per-token cost of the Python module against `bitnet run`: same build profile, same model, same machine.

    python3 tests/scripts/bench_python.py BITNET_BIN THREADS REPS [MODEL.gguf]

Greedy generation of up to 128 tokens, alternating the binary (its own tokens/s from stderr) and the module
(generate(stream=True) iterated: the same work, timed from after the prompt; and generate() as a whole against
the binary's prompt + generation time). The texts must be equal. Medians and best of REPS are printed."""
import re, statistics, subprocess, sys, time
import bitnet

BIN, N, REPS = sys.argv[1], 128, int(sys.argv[3])
THREADS = sys.argv[2]
PATH = sys.argv[4] if len(sys.argv) > 4 else None
MODEL_ARGS = ["-m", PATH] if PATH else []
PROMPT = "Once upon a time"
m = bitnet.Model(PATH, backend="cpu", threads=int(THREADS))
N = min(N, m.ctx - 8)
print(m, "threads", THREADS)

def cli():
    out = subprocess.run([BIN, "run", "--backend", "cpu", "--threads", THREADS, *MODEL_ARGS, "-p", PROMPT, "-n", str(N), "--temp", "0"], capture_output=True, text=True)
    s = re.search(r"prompt: (\d+) tokens, ([\d.]+) tokens/s \| generated: (\d+) tokens, ([\d.]+) tokens/s", out.stderr)
    n_p, pp, n_g, tg = int(s[1]), float(s[2]), int(s[3]), float(s[4])
    return tg, n_p / pp + n_g / tg, n_g, out.stdout[:-1]

def py_stream():
    t0 = time.perf_counter()
    s = m.generate(PROMPT, max_tokens=N, temperature=0.0, stream=True)  # evaluates the prompt
    t1 = time.perf_counter()
    text = "".join(s)
    t2 = time.perf_counter()
    return s.n_generated / (t2 - t1), t2 - t0, s.n_generated, text

def py_whole():
    t0 = time.perf_counter()
    text = m.generate(PROMPT, max_tokens=N, temperature=0.0)
    return time.perf_counter() - t0, text

rows = {"cli_tg": [], "cli_total": [], "py_tg": [], "py_stream_total": [], "py_total": []}
py_whole(); cli()  # warm-up
for _ in range(REPS):
    tg, total, n, ctext = cli(); rows["cli_tg"].append(tg); rows["cli_total"].append(total)
    tg, total, n2, stext = py_stream(); rows["py_tg"].append(tg); rows["py_stream_total"].append(total)
    total, wtext = py_whole(); rows["py_total"].append(total)
    assert n == n2 and ctext == stext == wtext, (n, n2)
med = {k: statistics.median(v) for k, v in rows.items()}
for k, v in rows.items():
    print(f"{k:16} median {med[k]:8.3f}  all {[round(x, 3) for x in v]}")
print(f"generation tokens/s: bitnet run {med['cli_tg']:.1f}, Python stream {med['py_tg']:.1f}")
print(f"per-token overhead (stream, from tokens/s): {(1/med['py_tg'] - 1/med['cli_tg'])*1e6:.0f} us")
print(f"per-token overhead (generate() wall vs run's prompt+generation time): {(med['py_total'] - med['cli_total'])/n*1e6:.0f} us")
best = {k: (max(v) if k.endswith("_tg") else min(v)) for k, v in rows.items()}
print("tokens generated", n)
print(f"best of {REPS}: bitnet run {best['cli_tg']:.1f} tok/s, Python stream {best['py_tg']:.1f} tok/s; "
      f"total run {best['cli_total']:.3f} s vs generate() {best['py_total']:.3f} s")
print(f"per-token overhead, best: stream {(1/best['py_tg'] - 1/best['cli_tg'])*1e6:.0f} us, generate() {(best['py_total'] - best['cli_total'])/n*1e6:.0f} us")
