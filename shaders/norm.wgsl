// The final RMS norm before the LM head (one workgroup; the other norms are fused into ternary.wgsl),
// Qwen3's RMS norm of each q and k head, and the greedy argmax over the logits, so that generation can read
// back one id instead of the vocabulary.
//
// Prepended by the host: WG and reduce.wgsl.

struct Step { token: u32, pos: u32, row: u32, n: u32 }

struct Params {
    n: u32,       // elements (head_norm: the head dim)
    eps: f32,
    q_heads: u32, // head_norm: the query heads, whose weights come first in `w` (the key heads' follow)
    stride: u32,  // head_norm: floats from one token's q, k, v to the next's
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> best: array<u32>;

var<workgroup> red: array<f32, WG>;
var<workgroup> red_i: array<u32, WG>;

@compute @workgroup_size(WG)
fn rmsnorm(@builtin(local_invocation_index) t: u32) {
    var ss = 0.0;
    for (var i = t; i < p.n; i += WG) {
        ss += x[i] * x[i];
    }
    let inv = 1.0 / sqrt(sum_f(ss, t) / f32(p.n) + p.eps);
    for (var i = t; i < p.n; i += WG) {
        out[i] = w[i] * (x[i] * inv);
    }
}

// Qwen3's q and k norms, in place in `out` (the q, k, v rows of step.n tokens from step.row on): one
// workgroup per (head, token), of the query heads then the key heads, each head normalized on its own with
// the weights of its kind, as the CPU's `rmsnorm_in_place` (head dim at most WG).
@compute @workgroup_size(WG)
fn head_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let tok = wid.y;
    if tok >= step.n {
        return;
    }
    let base = (step.row + tok) * p.stride + wid.x * p.n; // k's heads follow q's
    let wb = select(p.n, 0u, wid.x < p.q_heads);
    var v = 0.0;
    if t < p.n {
        v = out[base + t];
    }
    let inv = 1.0 / sqrt(sum_f(v * v, t) / f32(p.n) + p.eps);
    if t < p.n {
        out[base + t] = w[wb + t] * (v * inv);
    }
}

// Entry `dst` of the argmax's reduction becomes entry `src` if that is larger, or as large at a lower
// index (the sentinel index 0xffffffff is the highest).
fn better(dst: u32, src: u32) {
    let v = red[src];
    let i = red_i[src];
    if v > red[dst] || (v == red[dst] && i < red_i[dst]) {
        red[dst] = v;
        red_i[dst] = i;
    }
}

// best[0] = the index of the largest of x[0..n] (the lowest such index on ties, NaN never wins), as the
// CPU sampler's greedy choice.
@compute @workgroup_size(WG)
fn argmax(@builtin(local_invocation_index) t: u32) {
    var bv = -0x1.fffffep+127f; // -f32::MAX, exactly (Chromium rejects a decimal literal above it)
    var bi = 0xffffffffu;
    for (var i = t; i < p.n; i += WG) {
        let v = x[i];
        if v > bv || (bi == 0xffffffffu && v == bv) {
            bv = v;
            bi = i;
        }
    }
    // Two levels as in reduce.wgsl: R2 threads each take the best of 16 into the first of them, then
    // thread 0 the best of those.
    red[t] = bv;
    red_i[t] = bi;
    workgroupBarrier();
    if t < R2 {
        for (var j = 16u * t + 1u; j < 16u * t + 16u; j++) {
            better(16u * t, j);
        }
    }
    workgroupBarrier();
    if t == 0u {
        for (var j = 1u; j < R2; j++) {
            better(0u, 16u * j);
        }
        best[0] = select(red_i[0], 0u, red_i[0] == 0xffffffffu);
    }
}
