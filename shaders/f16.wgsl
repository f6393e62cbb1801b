// x rounded to the nearest f16 (ties to even), as the CPU's `half::f16::from_f32`: integer operations on its
// bits, because `quantizeToF16` rounds as the implementation likes (SwiftShader's results differed from the
// CPU's). Exact over f16's normal range, where keys, values and activation scales are; a subnormal keeps 10
// bits (f16 has fewer). Prepended to the kernels that round to f16.
fn f16_round(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    return bitcast<f32>((b + 0x0fffu + ((b >> 13u) & 1u)) & 0xffffe000u);
}
