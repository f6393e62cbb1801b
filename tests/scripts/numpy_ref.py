"""Independent numpy reference for BitNet b1.58 GGUF files (float64 or float32).

Reads a GGUF with gguf.GGUFReader (type 36 = I2_S registered here, since gguf-py does not know it) and decodes
every ternary tensor itself, following /work/shared/notes/formats.md:
  I2_S  (36): x86 layout, blocks of 128 over the flattened tensor, f32 scale after the n/4 code bytes
  TQ2_0 (35), TQ1_0 (34): llama.cpp layouts, f16 block scale d
  F32 / F16 / BF16: ternary-valued floats (codes = sign(w), scale = the common |w|)
  optional `<name>.scale` F32 [1] tensors (arch `bitnet`) multiply the decoded scale.
It does not use gguf.quants (the writer's quantizers), so a bug on either side shows up as a mismatch.

The forward pass is the W1.58A8 BitNet block (RMSNorm, BitLinear with per-token int8 absmax activations,
NeoX RoPE, GQA, attn/ffn sub-norms, relu^2) exactly as in /work/shared/models/smolbit-135m/reference.py,
with the GGUF scale multiplying: y = acc / s_x * scale, and with keys (after RoPE) and values rounded to
f16 as the engine's default KV cache stores them (kv="f32": kept as computed; kv="q8_0": llama.cpp's Q8_0
blocks of 32, as `--kv-type` stores them).

Families (issue 17): arch `llama` files are Llama blocks with ternary projections: no sub-norms (the o and
down projections quantize their input as it is), SiLU, and llama.cpp's own RoPE for that arch, which rotates
ADJACENT pairs (2i, 2i+1) of each head on the file's q/k rows (its converter permuted them; this reference
rotates them as llama.cpp does rather than undoing the permutation as the engine does). The activation is
`<arch>.hidden_activation` if present, else SiLU for arch `llama` or a SentencePiece vocabulary
(`tokenizer.ggml.model = llama`, 1bitLLM bitnet_b1_58), else relu^2.
"""
from enum import IntEnum

import numpy as np
import gguf
import gguf.gguf_reader as _gr

I2_S = 36
TERNARY = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def register_i2_s():
    """Teach gguf.GGUFReader the I2_S type id (Microsoft's fork) so it can parse such files. Its byte size is
    n/4 + 32, which GGML_QUANT_SIZES cannot express: (4, 1) gives the n/4 code bytes (and accepts rows that are
    not multiples of 128); the 32 trailing bytes (f32 scale + padding) are read from the file directly below."""
    if "I2_S" in _gr.GGMLQuantizationType.__members__:
        return
    members = {m.name: m.value for m in gguf.GGMLQuantizationType}
    members["I2_S"] = I2_S
    _gr.GGMLQuantizationType = IntEnum("GGMLQuantizationType", members)
    gguf.GGML_QUANT_SIZES[I2_S] = (4, 1)        # the shared dict; IntEnum keys compare as ints


def read_gguf(path):
    register_i2_s()
    return gguf.GGUFReader(path)


def field_value(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    return v


def _raw(reader, t, nbytes):
    off = int(t.data_offset)
    return np.asarray(reader.data[off:off + nbytes], dtype=np.uint8)


def decode_i2_s(raw, n):
    """codes (n,) int8 and the f32 scale of an I2_S tensor of n elements (raw = n/4 + 32 bytes)."""
    assert n % 128 == 0 and raw.size == n // 4 + 32
    blocks = raw[: n // 4].reshape(-1, 32)                               # (nb, 32 bytes)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)    # element 32*g + j at bits 6-2g of byte j
    u = (blocks[:, None, :] >> shifts) & 3                               # (nb, g, j)
    assert u.max() <= 2, "I2_S code 3 is invalid"
    scale = float(raw[n // 4: n // 4 + 4].view("<f4")[0])
    return u.reshape(-1).astype(np.int8) - 1, scale


def decode_tq2_0(raw, n):
    """per-element trits (n,) int8 and per-element block scale d (n,) float64."""
    b = raw.reshape(-1, 66)
    qs = b[:, :64].reshape(-1, 2, 1, 32)                                 # (nb, h, 1, m)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    t = (qs >> shifts) & 3                                               # element 128h + 32l + m
    d = b[:, 64:66].copy().view("<f2").astype(np.float64)[:, 0]
    return t.reshape(-1).astype(np.int8) - 1, np.repeat(d, 256)


def _tq1_digits(b, ndig):
    """digit n (most significant first) of bytes b: ((uint8)(b * 3^n) * 3) >> 8."""
    p = np.array([1, 3, 9, 27, 81][:ndig], dtype=np.uint16).reshape(1, ndig, 1)
    v = (b[:, None, :].astype(np.uint16) * p) & 0xFF
    return ((v * 3) >> 8).astype(np.int8)


def decode_tq1_0(raw, n):
    b = raw.reshape(-1, 54)
    nb = b.shape[0]
    e0 = _tq1_digits(b[:, 0:32], 5).reshape(nb, 160)     # element 32n + m
    e1 = _tq1_digits(b[:, 32:48], 5).reshape(nb, 80)     # element 160 + 16n + m
    e2 = _tq1_digits(b[:, 48:52], 4).reshape(nb, 16)     # element 240 + 4n + j
    t = np.concatenate([e0, e1, e2], 1)
    d = b[:, 52:54].copy().view("<f2").astype(np.float64)[:, 0]
    return t.reshape(-1) - 1, np.repeat(d, 256)


def _float_values(reader, t):
    n = int(t.n_elements)
    ty = int(t.tensor_type)
    if ty == 0:
        return _raw(reader, t, 4 * n).view("<f4").astype(np.float64)
    if ty == 1:
        return _raw(reader, t, 2 * n).view("<f2").astype(np.float64)
    if ty == 30:
        return (_raw(reader, t, 2 * n).view("<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64)
    raise ValueError(f"{t.name}: type {ty} is not a float type")


def _common_scale(vals, what):
    """Ternary-valued data: all non-zero |values| must be one number (the tensor scale)."""
    nz = np.abs(vals[vals != 0])
    if nz.size == 0:
        return 0.0
    assert nz.min() == nz.max(), f"{what}: not ternary-valued ({nz.min()} .. {nz.max()})"
    return float(nz[0])


def decode_ternary(reader, t):
    """-> codes (rows, cols) int8, scale (float). The tensor's `.scale` companion is NOT applied here."""
    cols, rows = int(t.shape[0]), int(t.shape[1])
    n = rows * cols
    ty = int(t.tensor_type)
    if ty == I2_S:
        codes, scale = decode_i2_s(_raw(reader, t, n // 4 + 32), n)
    elif ty in (34, 35):
        assert cols % 256 == 0
        nbytes = n // 256 * (54 if ty == 34 else 66)
        codes, d = (decode_tq1_0 if ty == 34 else decode_tq2_0)(_raw(reader, t, nbytes), n)
        assert codes.min() >= -1 and codes.max() <= 1
        scale = _common_scale(d[codes != 0], t.name)
    else:
        vals = _float_values(reader, t)
        scale = _common_scale(vals, t.name)
        codes = np.sign(vals).astype(np.int8)
    return codes.reshape(rows, cols), scale


class GgufModel:
    """Hyper-parameters and decoded weights of a BitNet GGUF, in float64 (cast per forward dtype)."""

    def __init__(self, path):
        r = read_gguf(path)
        self.path = path
        arch = field_value(r, "general.architecture")
        self.arch = arch
        g = lambda k: field_value(r, f"{arch}.{k}")
        self.n_embd = int(g("embedding_length"))
        self.n_layer = int(g("block_count"))
        self.n_head = int(g("attention.head_count"))
        self.n_kv = int(g("attention.head_count_kv"))
        self.n_ff = int(g("feed_forward_length"))
        self.eps = float(np.float32(g("attention.layer_norm_rms_epsilon")))
        self.theta = float(g("rope.freq_base"))
        self.head_dim = self.n_embd // self.n_head
        rd = g("rope.dimension_count")
        assert rd is None or int(rd) == self.head_dim
        act = g("hidden_activation")
        # relu^2 unless a key says otherwise (formats.md: 2B4T-style byte-level BPE vocabularies are relu^2);
        # SiLU for the llama arch and for SentencePiece (1bitLLM) vocabularies
        spm = field_value(r, "tokenizer.ggml.model") == "llama"
        self.act = act or ("silu" if arch == "llama" or spm else "relu2")
        assert self.act in ("relu2", "silu"), self.act
        self.llama = arch == "llama"
        tensors = {t.name: t for t in r.tensors}
        self.tensor_types = {t.name: int(t.tensor_type) for t in r.tensors}

        def flt(name):
            t = tensors[name]
            return _float_values(r, t).reshape([int(x) for x in reversed(t.shape)])

        self.emb = flt("token_embd.weight")                          # (V, E)
        self.out = flt("output.weight") if "output.weight" in tensors else self.emb
        self.out_norm = flt("output_norm.weight")
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            norms = ("attn_norm", "ffn_norm") if self.llama else ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")
            ly = {k: flt(p + k + ".weight") for k in norms}
            for k in TERNARY:
                codes, scale = decode_ternary(r, tensors[p + k + ".weight"])
                if p + k + ".scale" in tensors:
                    st = flt(p + k + ".scale").reshape(-1)
                    assert st.size == 1
                    scale *= float(st[0])
                ly[k] = (codes, scale)
            self.layers.append(ly)


class Forward:
    """One forward pass in a given dtype. Records, for every int8 activation quantisation, the distance of
    x * s_x to the nearest rounding boundary (k + 0.5): a small margin means float noise can flip it."""

    def __init__(self, m: GgufModel, dtype=np.float64, noise=None, kv="f16"):
        """noise = (seed, rel): multiply every BitLinear input by (1 + rel * U(-1, 1)) before quantising, to
        mimic another implementation's float rounding (a different summation order) in a stability probe."""
        self.m, self.dt = m, dtype
        self.noise = noise
        self.kv = kv
        dt = dtype
        self.emb = m.emb.astype(dt)
        self.out = m.out.astype(dt)
        self.out_norm = m.out_norm.astype(dt)
        self.layers = []
        for ly in m.layers:
            d = {k: v.astype(dt) for k, v in ly.items() if k not in TERNARY}
            for k in TERNARY:
                d[k] = (ly[k][0].astype(dt), dt(ly[k][1]))
            self.layers.append(d)
        hd = m.head_dim
        self.inv_freq = 1.0 / (m.theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        self.eps = dt(m.eps)

    def rmsnorm(self, x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps))

    def sub_norm(self, x, ly, name):
        """The BitNet block's sub-norm; the llama family has none."""
        return x if name not in ly else self.rmsnorm(x, ly[name])

    def act(self, g):
        if self.m.act == "silu":
            return g / (1 + np.exp(-g))
        return np.maximum(g, 0) ** 2

    def bitlinear(self, x, cs, tag):
        codes, scale = cs
        dt = self.dt
        if self.rng is not None:
            x = x * (dt(1) + dt(self.noise[1]) * self.rng.uniform(-1, 1, x.shape).astype(dt))
        mx = np.maximum(np.abs(x).max(-1, keepdims=True), dt(1e-5))
        sx = dt(127.0) / mx
        xs = x * sx
        self.margins.append((tag, np.abs(np.abs(xs - np.floor(xs)) - 0.5).min(-1)))
        q = np.clip(np.rint(xs), -128, 127)                        # round half to even
        acc = q @ codes.T                                          # exact integers
        return acc / sx * scale

    def rope(self, x, pos):
        if self.m.llama:
            return self.rope_adjacent(x, pos)
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]
        ang = np.concatenate([ang, ang], -1)
        cos, sin = np.cos(ang).astype(self.dt), np.sin(ang).astype(self.dt)
        h = x.shape[-1] // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    def rope_adjacent(self, x, pos):
        """llama.cpp's RoPE for arch llama (LLAMA_ROPE_TYPE_NORM): element 2i pairs with 2i + 1."""
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]            # (T, D/2)
        cos, sin = np.cos(ang).astype(self.dt), np.sin(ang).astype(self.dt)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = b * cos + a * sin
        return out

    def __call__(self, ids):
        """logits (T, V) for token ids; self.margins: list of ((layer, point), per-position margin)."""
        m, dt = self.m, self.dt
        T = len(ids)
        self.margins = []
        self.rng = None if self.noise is None else np.random.default_rng(self.noise[0])
        pos = np.arange(T)
        x = self.emb[np.asarray(ids)]
        H, KV, D = m.n_head, m.n_kv, m.head_dim
        mask = np.tril(np.ones((T, T), dtype=bool))
        for i, ly in enumerate(self.layers):
            h = self.rmsnorm(x, ly["attn_norm"])
            q = self.bitlinear(h, ly["attn_q"], (i, "qkv")).reshape(T, H, D).transpose(1, 0, 2)
            self.margins.pop()          # q, k, v quantise the same input: record it once
            k = self.bitlinear(h, ly["attn_k"], (i, "qkv")).reshape(T, KV, D).transpose(1, 0, 2)
            self.margins.pop()
            v = self.bitlinear(h, ly["attn_v"], (i, "qkv")).reshape(T, KV, D).transpose(1, 0, 2)
            q, k = self.rope(q, pos), self.rope(k, pos)
            k, v = cache_round(k, self.kv).astype(dt), cache_round(v, self.kv).astype(dt)
            rep = H // KV
            k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)      # head h uses kv head h // rep
            sc = (q @ k.transpose(0, 2, 1)) / dt(np.sqrt(D))
            sc = np.where(mask, sc, -np.inf)
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            att = (sc / sc.sum(-1, keepdims=True)) @ v             # (H, T, D)
            att = att.transpose(1, 0, 2).reshape(T, H * D)
            x = x + self.bitlinear(self.sub_norm(att, ly, "attn_sub_norm"), ly["attn_output"], (i, "o"))
            h = self.rmsnorm(x, ly["ffn_norm"])
            g = self.act(self.bitlinear(h, ly["ffn_gate"], (i, "gate_up")))
            self.margins.pop()
            u = self.bitlinear(h, ly["ffn_up"], (i, "gate_up"))
            x = x + self.bitlinear(self.sub_norm(g * u, ly, "ffn_sub_norm"), ly["ffn_down"], (i, "down"))
        x = self.rmsnorm(x, self.out_norm)
        return x @ self.out.T

    def last_margin(self):
        """Smallest rounding margin among the quantisations that influence the LAST position's logits:
        every point of the layers below the last, and of the last layer the q/k/v input at all positions
        (keys/values) but the later points only at the last position."""
        L = self.m.n_layer
        best = np.inf
        for (layer, point), mg in self.margins:
            sel = mg if (layer < L - 1 or point == "qkv") else mg[-1:]
            best = min(best, float(sel.min()))
        return best


def cache_round(x, kv):
    """Keys or values (heads, T, D) as the KV cache type `kv` stores them."""
    if kv == "f32":
        return x
    if kv == "f16":
        return x.astype(np.float16)
    # q8_0: blocks of 32 along each head's D values; d = max|x| / 127 in f32, stored as f16;
    # q = round(x / d) half away from zero (ggml's roundf), in f32 as the engine computes it.
    b = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    xs = b * inv
    q = np.sign(xs) * np.floor(np.abs(xs) + np.float32(0.5))
    return (d.astype(np.float16).astype(np.float64) * q).reshape(x.shape)


def greedy(fwd, ids, n):
    """n greedy tokens (full recompute each step, no EOS stop) and the top-1/top-2 gap at each step."""
    ids = list(ids)
    out, gaps = [], []
    for _ in range(n):
        lg = fwd(ids)[-1]
        top = np.argsort(-lg, kind="stable")[:2]
        out.append(int(top[0]))
        gaps.append(float(lg[top[0]] - lg[top[1]]))
        ids.append(int(top[0]))
    return out, gaps
