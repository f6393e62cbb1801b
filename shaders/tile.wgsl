// BitLinear for a tile of up to TILE prompt tokens (step.n of them, rows of the tile's buffers): each
// weight row is read from memory once per tile instead of once per token.
//
// `quantize` (one workgroup per token) RMS-normalizes and quantizes each token's input row as
// ternary.wgsl's prologue does, with the same functions, so a token's int8 activations are bit for bit
// those of the decode path; `gemm` then dot-products every weight row with every token's activations and
// applies ternary.wgsl's epilogue. The integer accumulators are exact, as in the GEMV.
//
// Appended by the host to reduce.wgsl and ternary.wgsl (whose `p`, `x`, `norm`, `w` and `out` these
// kernels use; WGSL allows two variables at one binding when no entry point uses both), with TILE.

@group(0) @binding(2) var<storage, read_write> words: array<u32>;         // quantize: vec4 j of token t at j·TILE + t
@group(0) @binding(5) var<storage, read_write> scales: array<vec2<f32>>; // quantize: [token] (s, Σq)
@group(0) @binding(3) var<storage, read> tq: array<vec4<u32>>;          // gemm: `words` as vec4
@group(0) @binding(4) var<storage, read> ts: array<vec2<f32>>;          // gemm: `scales`

const PAIRS: u32 = WG / TILE; // row pairs per gemm workgroup

@compute @workgroup_size(WG)
fn quantize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let tok = wid.x;
    if tok >= step.n {
        return;
    }
    let x0 = tok * p.x_stride;
    let sc = row_scales(x0, t);
    let kw = (p.k + 3u) / 4u;
    let n = p.vpr * 16u;
    var qsum = 0;
    for (var wi = t; wi < n; wi += WG) {
        var word = 0u;
        if wi < kw {
            word = quantize4(x0, wi, sc.xy, sc.z);
            qsum += dot4(word, ONES);
        }
        // Token-interleaved vec4s: the GEMM's threads (consecutive tokens) then load consecutive vec4s.
        words[((wi / 4u) * TILE + tok) * 4u + wi % 4u] = word;
    }
    // Σq is an integer below 2^24 in magnitude (6912 columns × 128): the f32 sum is exact.
    let total = sum_f(f32(qsum), t);
    if t == 0u {
        scales[tok] = vec2<f32>(sc.z, total);
    }
}

// One thread per (row pair, token), the tile's tokens on consecutive threads: the threads of a row pair
// load the same weight words (one memory read, broadcast) and adjacent activation vec4s, and each keeps
// two accumulators in registers. Two rows a thread halve the activation loads per weight, and keep
// gate/up pairs together.
@compute @workgroup_size(WG)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let tok = t % TILE;
    let row = ((wid.x + wid.y * nwg.x) * PAIRS + t / TILE) * 2u;
    if tok >= step.n || row >= p.rows {
        return;
    }
    let b0 = row * p.vpr;
    let b1 = min(row + 1u, p.rows - 1u) * p.vpr; // a last odd row pairs with itself, stored once
    var a0 = 0;
    var a1 = 0;
    for (var v = 0u; v < p.vpr; v++) {
        let w0 = w[b0 + v];
        let w1 = w[b1 + v];
        // Activations of columns 32g + 4i .. of the weight vector's block half, as in ternary.wgsl.
        let xb = (v >> 1u) * 8u + (v & 1u);
        for (var g = 0u; g < 4u; g++) {
            let sh = vec4<u32>(6u - 2u * g);
            let xv = tq[(xb + 2u * g) * TILE + tok];
            let u0 = (w0 >> sh) & vec4<u32>(0x03030303u);
            let u1 = (w1 >> sh) & vec4<u32>(0x03030303u);
            a0 += dot4(u0.x, xv.x) + dot4(u0.y, xv.y) + dot4(u0.z, xv.z) + dot4(u0.w, xv.w);
            a1 += dot4(u1.x, xv.x) + dot4(u1.y, xv.y) + dot4(u1.z, xv.z) + dot4(u1.w, xv.w);
        }
    }
    let sq = ts[tok];
    let s = sq.x;
    let qsum = i32(sq.y);
    a0 -= qsum;
    a1 -= qsum;
    let y1 = f32(a1) / s * row_scale(row + 1u);
    let base = tok * p.out_stride;
    store(row, a0, f32(a0) / s * row_scale(row), y1, base);
    if p.mode != 2u && row + 1u < p.rows {
        store(row + 1u, a1, y1, 0.0, base);
    }
}
