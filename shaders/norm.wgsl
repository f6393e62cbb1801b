// The final RMS norm before the LM head (one workgroup; the other norms are fused into ternary.wgsl),
// and the greedy argmax over the logits, so that generation can read back one id instead of the vocabulary.
//
// Prepended by the host: WG.

struct Step { token: u32, pos: u32 }

struct Params {
    n: u32,
    eps: f32,
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
    red[t] = ss;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(red[0] / f32(p.n) + p.eps);
    for (var i = t; i < p.n; i += WG) {
        out[i] = w[i] * (x[i] * inv);
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
    red[t] = bv;
    red_i[t] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            let ov = red[t + s];
            let oi = red_i[t + s];
            if ov > red[t] || (ov == red[t] && oi < red_i[t]) {
                red[t] = ov;
                red_i[t] = oi;
            }
        }
        workgroupBarrier();
    }
    if t == 0u {
        best[0] = select(red_i[0], 0u, red_i[0] == 0xffffffffu);
    }
}
