#!/usr/bin/env python3
"""Write tests/fixtures/quant/*.qfx: reference encodings from the `gguf` PyPI package (gguf-py's numpy
quantizers, which follow ggml's reference rounding) for engine/tests/quant.rs.

    pip install gguf numpy && python3 tests/scripts/make_quant_fixtures.py

Deterministic (numpy seeded). gguf-py quantizes F32, F16, BF16, Q8_0, Q5_0, Q4_0, TQ1_0 and TQ2_0; it only
dequantizes Q4_K and Q6_K, so those fixtures hold random blocks and gguf-py's decoding of them (no input).

File format, little-endian:
    b"QFX1", u32 ggml type id, u32 n elements, u32 has_input (0/1), u32 n bytes,
    f32[n] input (if has_input), u8[n bytes] encoded, f32[n] decoded
"""
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "quant"
rng = np.random.default_rng(20240531)


def write(name, qtype, encoded, decoded, inp=None):
    encoded = np.ascontiguousarray(encoded).view(np.uint8).ravel()
    decoded = np.asarray(decoded, dtype=np.float32).ravel()
    n = decoded.size
    with open(OUT / f"{name}.qfx", "wb") as f:
        f.write(b"QFX1" + struct.pack("<4I", int(qtype), n, inp is not None, encoded.size))
        if inp is not None:
            f.write(np.asarray(inp, dtype="<f4").tobytes())
        f.write(encoded.tobytes())
        f.write(decoded.astype("<f4").tobytes())


def roundtrip(name, qtype, x):
    x = np.asarray(x, dtype=np.float32).reshape(1, -1)
    q = quantize(x, qtype)
    write(name, qtype, q, dequantize(q, qtype), x)


def random_blocks(n_blocks, block):
    """Normal values, each block with its own magnitude from 1e-6 to 1e3."""
    mags = 10.0 ** rng.uniform(-6, 3, size=(n_blocks, 1))
    return (rng.standard_normal((n_blocks, block)) * mags).astype(np.float32)


def ties_between(values, dtype):
    """f32 midpoints between neighbouring values of a narrower float type: round-to-nearest-even ties."""
    lo = values.astype(dtype)
    hi = np.nextafter(lo, dtype(np.inf))
    return ((lo.astype(np.float64) + hi.astype(np.float64)) / 2).astype(np.float32)


def float_cases():
    specials = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 1e-45, 3.4e38, 65504.0, 65520.0, 7e4, 6e-8, 3e-8],
                        dtype=np.float32)
    roundtrip("f32", T.F32, np.concatenate([specials, rng.standard_normal(51).astype(np.float32)]))
    base = (rng.standard_normal(768) * 10.0 ** rng.uniform(-9, 5, 768)).astype(np.float32)
    f16_ties = ties_between(rng.standard_normal(128) * 10.0 ** rng.uniform(-6, 4, 128), np.float16)
    roundtrip("f16", T.F16, np.concatenate([specials, base, f16_ties, rng.standard_normal(115).astype(np.float32)]))
    nans = np.array([0x7F800001, 0xFFC00001, 0x7FC00000], dtype=np.uint32).view(np.float32)
    bf16_ties = ties_between(rng.standard_normal(128) * 10.0 ** rng.uniform(-30, 30, 128), np.float32)
    bf16_ties = (bf16_ties.view(np.uint32) & np.uint32(0xFFFF0000) | np.uint32(0x8000)).view(np.float32)
    rest = rng.standard_normal(112).astype(np.float32)
    roundtrip("bf16", T.BF16, np.concatenate([specials, nans, base, bf16_ties, rest]))


def block_cases():
    zero = np.zeros(32, np.float32)
    constant = np.full(32, -0.75, np.float32)
    sign_tie = np.concatenate([[3.0, -3.0], rng.uniform(-2, 2, 30)]).astype(np.float32)
    tiny = (rng.standard_normal(32) * 1e-9).astype(np.float32)
    # Scaled values landing exactly on .5 after x * (1/d) with d = 1: rounding ties.
    q8_ties = np.concatenate([[127.0], np.arange(-15.5, 15.5, 1.0)]).astype(np.float32)
    q4_ties = np.concatenate([[-8.0], np.linspace(-7.5, 7.5, 31)]).astype(np.float32)
    q5_ties = np.concatenate([[-16.0], np.arange(-15.5, 15.5, 1.0)]).astype(np.float32)
    special = [zero, constant, sign_tie, tiny]
    for name, qtype, ties in (("q8_0", T.Q8_0, q8_ties), ("q5_0", T.Q5_0, q5_ties), ("q4_0", T.Q4_0, q4_ties)):
        x = np.concatenate([random_blocks(40, 32).ravel(), *special, ties])
        roundtrip(name, qtype, x)


def ternary_cases():
    # Random floats: gguf-py picks a scale per block (for dequantization, and the mismatched-scales error).
    for name, qtype in (("tq1_0_float", T.TQ1_0), ("tq2_0_float", T.TQ2_0)):
        roundtrip(name, qtype, rng.standard_normal(8 * 256).astype(np.float32))
    # A 4 x 512 BitNet weight: codes times one scale that an f16 holds exactly.
    s = np.float32(np.float16(0.0123))
    codes = rng.choice(np.array([-1, 0, 1], np.int8), size=4 * 512, p=[0.3, 0.4, 0.3])
    for name, qtype in (("tq1_0_ternary", T.TQ1_0), ("tq2_0_ternary", T.TQ2_0)):
        roundtrip(name, qtype, codes.astype(np.float32) * s)


def random_f16(n):
    return rng.uniform(1e-4, 1e-1, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def k_quant_cases():
    n_blocks = 6
    q4k = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
    q4k[:, 0:2], q4k[:, 2:4] = random_f16(n_blocks), random_f16(n_blocks)
    write("q4_k_random", T.Q4_K, q4k, dequantize(q4k, T.Q4_K))
    q6k = rng.integers(0, 256, size=(n_blocks, 210), dtype=np.uint8)
    q6k[:, 208:210] = random_f16(n_blocks)
    write("q6_k_random", T.Q6_K, q6k, dequantize(q6k, T.Q6_K))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    with np.errstate(over="ignore"):  # f16 overflow to inf is one of the cases
        float_cases()
        block_cases()
        ternary_cases()
        k_quant_cases()
    total = sum(p.stat().st_size for p in OUT.glob("*.qfx"))
    print(f"wrote {len(list(OUT.glob('*.qfx')))} fixtures, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
