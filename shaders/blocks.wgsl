// Projections stored in ggml blocks with a scale each (Qwen3's Q1_0, Q2_0 and Q8_0; see
// engine/src/backend/cpu/kernels/blocks.rs), multiplied as llama.cpp's CPU multiplies them: the input
// quantized to Q8_0 blocks (per 32 values d = max|x| / 127, rounded to f16, and q = round(x / d), half
// away from zero), an exact integer dot product per 32 values, then the scales in the order of ggml's
// generic C. The same GEMV shape as ternary.wgsl (TPR threads per row, its epilogue modes: store, add
// to the residual, act(gate)·up of row pairs), with the ternary prologue replaced by the Q8_0 one.
//
// A step of many tokens (a prompt tile, a batch) runs in one dispatch: each workgroup takes its rows
// for every token in turn, so the weights come from memory once and from the cache after that.
//
// Weights (weights.rs, `upload_blocks`): per row, one vec4<u32> per Q1_0 block (128 sign bits, value j
// at bit j % 32 of word j / 32) or Q2_0 block (64 two-bit codes u, value j at bits 2(j % 16) of word
// j / 16; weight u - 1), two per Q8_0 block (32 int8); the blocks' scales as f32 from vec4 `p.d_off` on.
//
// Appended by the host to reduce.wgsl, f16.wgsl and ternary.wgsl (whose `p`, `w`, `x`, `norm`, `out`,
// `xq`, `input4`, `norm_inv`, `pack4` and `store` it uses).

var<workgroup> bd: array<f32, XQ_VEC4 / 2u>;   // per activation block: its scale d (f16-rounded)
var<workgroup> bsum: array<i32, XQ_VEC4 / 2u>; // and Σq
var<workgroup> parts: array<f32, WG>;          // each thread's part of its row's dot product

// v rounded half away from zero, as C's roundf (WGSL's round is half to even): exact, since v - trunc(v)
// is.
fn round_away(v: vec4<f32>) -> vec4<f32> {
    let a = abs(v);
    let r = trunc(a);
    return sign(v) * (r + select(vec4<f32>(0.0), vec4<f32>(1.0), a - r >= vec4<f32>(0.5)));
}

// The input row at vec4 `x0` (RMS-normalized with `norm` when p.prenorm is 1) quantized to Q8_0 blocks
// in workgroup memory: activation block b's 32 int8 in xq[2b], xq[2b + 1], its d and Σq in bd and bsum.
fn quantize_blocks(x0: u32, t: u32) {
    let inv = norm_inv(x0, t);
    for (var b = t; b < p.k / 32u; b += WG) {
        var v: array<vec4<f32>, 8>;
        var amax = 0.0;
        for (var i = 0u; i < 8u; i++) {
            v[i] = input4(x0, 8u * b + i, inv);
            amax = max(amax, max4(abs(v[i])));
        }
        let d = amax / 127.0;
        let id = select(0.0, 1.0 / d, d > 0.0);
        var s = 0;
        for (var i = 0u; i < 8u; i++) {
            let word = pack4(round_away(v[i] * id));
            xq[2u * b + i / 4u][i % 4u] = word;
            s += dot4(word, ONES);
        }
        bd[b] = f16_round(d);
        bsum[b] = s;
    }
    workgroupBarrier();
}

// Activation words 4g .. 4g + 3 of block a (g < 8).
fn act_word(a: u32, g: u32) -> u32 {
    return xq[2u * a + g / 4u][g % 4u];
}

// Four bits (low first) spread to the low bit of four bytes.
fn spread1(n: u32) -> u32 {
    return (n & 1u) | ((n & 2u) << 7u) | ((n & 4u) << 14u) | ((n & 8u) << 21u);
}

// Four two-bit codes of a byte (low first) spread to four bytes.
fn spread2(n: u32) -> u32 {
    return (n & 3u) | ((n & 0xcu) << 6u) | ((n & 0x30u) << 12u) | ((n & 0xc0u) << 18u);
}

// Q1_0: Σ ±q over activation block a, the signs the 32 bits of `bits` (set: +): 2·Σ_set q - Σ q.
fn signs_dot(bits: u32, a: u32) -> i32 {
    var s = 0;
    for (var g = 0u; g < 8u; g++) {
        s += dot4(spread1((bits >> (4u * g)) & 15u), act_word(a, g));
    }
    return 2 * s - bsum[a];
}

// Q2_0: Σ (u - 1)·q over activation block a, the codes u those of `lo` (values 0..15) and `hi` (16..31).
fn codes_dot(lo: u32, hi: u32, a: u32) -> i32 {
    var s = 0;
    for (var g = 0u; g < 8u; g++) {
        let word = select(lo, hi, g >= 4u);
        s += dot4(spread2((word >> (8u * (g % 4u))) & 0xffu), act_word(a, g));
    }
    return s - bsum[a];
}

// Weight block `blk` of row `row` times its activation blocks, in the float order of ggml's
// `ggml_vec_dot_q1_0_q8_0_generic` and its siblings (and of blocks.rs's `reference_rows`).
fn block_dot(row: u32, blk: u32) -> f32 {
    let nb = select(p.vpr, p.vpr / 2u, p.ty == 3u); // blocks per row
    let di = 4u * p.d_off + row * nb + blk;
    let dw = bitcast<f32>(w[di / 4u][di % 4u]);
    switch p.ty {
        case 1u: {
            let bits = w[row * p.vpr + blk];
            var sumi = 0.0;
            for (var k = 0u; k < 4u; k++) {
                sumi += bd[4u * blk + k] * f32(signs_dot(bits[k], 4u * blk + k));
            }
            return dw * sumi;
        }
        case 2u: {
            let c = w[row * p.vpr + blk];
            let a = 2u * blk;
            var sumi = bd[a] * f32(codes_dot(c.x, c.y, a));
            sumi += bd[a + 1u] * f32(codes_dot(c.z, c.w, a + 1u));
            return dw * sumi;
        }
        default: {
            let lo = w[row * p.vpr + 2u * blk];
            let hi = w[row * p.vpr + 2u * blk + 1u];
            let x0 = xq[2u * blk];
            let x1 = xq[2u * blk + 1u];
            let s = dot4(lo.x, x0.x) + dot4(lo.y, x0.y) + dot4(lo.z, x0.z) + dot4(lo.w, x0.w)
                + dot4(hi.x, x1.x) + dot4(hi.y, x1.y) + dot4(hi.z, x1.z) + dot4(hi.w, x1.w);
            return f32(s) * (dw * bd[blk]);
        }
    }
}

// A row's dot product: its TPR threads' parts, in order.
fn row_sum(local: u32) -> f32 {
    var y = 0.0;
    for (var j = 0u; j < TPR; j++) {
        y += parts[local * TPR + j];
    }
    return y;
}

@compute @workgroup_size(WG)
fn blocks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) t: u32) {
    let local = t / TPR;
    let lane = t % TPR;
    let row = (wid.x + wid.y * nwg.x) * RPW + local;
    let nb = select(p.vpr, p.vpr / 2u, p.ty == 3u);
    // A decode-shaped dispatch (no strides: a decode step, an LM head) runs one token whatever the step.
    let tokens = select(1u, step.n, p.x_stride > 0u);
    for (var tok = 0u; tok < tokens; tok++) {
        quantize_blocks(tok * p.x_stride, t);
        var acc = 0.0;
        if row < p.rows {
            for (var b = lane; b < nb; b += TPR) {
                acc += block_dot(row, b);
            }
        }
        parts[t] = acc;
        workgroupBarrier(); // publishes the parts; xq is next written after the next token's barriers
        if lane == 0u && row < p.rows {
            var up = 0.0;
            if p.mode == 2u && (row & 1u) == 0u && row + 1u < p.rows {
                up = row_sum(local + 1u);
            }
            store(row, 0, row_sum(local), up, tok * p.out_stride);
        }
    }
}
