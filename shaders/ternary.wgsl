// BitLinear (exact W1.58A8) as one GEMV: the prologue computes, in every workgroup, the RMS norm of the
// input and its per-token int8 quantization into workgroup memory (cheaper than a separate dispatch and
// its barrier); the body takes dot products of 2-bit weight rows with the int8 activations; the epilogue
// scales, and stores, accumulates into the residual, or applies the FFN activation to gate/up row pairs.
//
// Weights (engine layout, see ternary.rs): a row is padded_cols/128 blocks of 32 bytes; byte j of a block
// holds columns j, 32+j, 64+j, 96+j at bits 7:6, 5:4, 3:2, 1:0 as u = code + 1. So `(word >> (6 - 2g)) &
// 0x03030303` of the block's word i holds u for the four consecutive columns 32g + 4i .. 32g + 4i + 3:
// exactly one packed word of activations. Σ code·x = Σ u·x - Σ x.
//
// Prepended by the host: WG, TPR (threads per row), XQ_VEC4 (workgroup activation words / 4), dot4().

struct Step { token: u32, pos: u32 }

struct Params {
    rows: u32,    // weight rows
    k: u32,       // input length
    vpr: u32,     // vec4<u32> per weight row (padded_cols / 64)
    mode: u32,    // 0 store, 1 add to out, 2 act(gate)·up of row pairs, 3 raw accumulators (tests)
    seg1: u32,    // rows [0, seg1) use scale0, [seg1, seg2) scale1, the rest scale2 (mode 2: even/odd rows)
    seg2: u32,
    act: u32,     // mode 2: 0 relu², 1 SiLU
    prenorm: u32, // 1: RMS-normalize the input with `norm` before quantizing (0: tests quantize it as is)
    eps: f32,
    scale0: f32,
    scale1: f32,
    scale2: f32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> norm: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>; // f32 bits (mode 3: i32 bits)

const RPW: u32 = WG / TPR; // rows per workgroup

var<workgroup> xq: array<vec4<u32>, XQ_VEC4>;
var<workgroup> red_f: array<f32, WG>;
var<workgroup> red_i: array<i32, WG>;
var<workgroup> ys: array<f32, RPW>;

fn sum_f(v: f32, t: u32) -> f32 {
    red_f[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            red_f[t] += red_f[t + s];
        }
        workgroupBarrier();
    }
    let r = red_f[0];
    workgroupBarrier();
    return r;
}

fn max_f(v: f32, t: u32) -> f32 {
    red_f[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            red_f[t] = max(red_f[t], red_f[t + s]);
        }
        workgroupBarrier();
    }
    let r = red_f[0];
    workgroupBarrier();
    return r;
}

fn sum_i(v: i32, t: u32) -> i32 {
    red_i[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            red_i[t] += red_i[t + s];
        }
        workgroupBarrier();
    }
    let r = red_i[0];
    workgroupBarrier();
    return r;
}

// The normalized input element i (as the CPU computes it: w · (x · inv)).
fn input(i: u32, inv: f32) -> f32 {
    if p.prenorm == 1u {
        return norm[i] * (x[i] * inv);
    }
    return x[i];
}

fn activation(g: f32) -> f32 {
    if p.act == 0u {
        let r = max(g, 0.0);
        return r * r;
    }
    return g / (1.0 + exp(-g));
}

fn row_scale(row: u32) -> f32 {
    if p.mode == 2u {
        return select(p.scale0, p.scale1, (row & 1u) == 1u);
    }
    if row < p.seg1 {
        return p.scale0;
    }
    return select(p.scale2, p.scale1, row < p.seg2);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let k = p.k;

    // Prologue: RMS norm, absmax, int8 quantization (round half to even), Σq.
    var inv = 1.0;
    if p.prenorm == 1u {
        var ss = 0.0;
        for (var i = t; i < k; i += WG) {
            ss += x[i] * x[i];
        }
        ss = sum_f(ss, t);
        inv = 1.0 / sqrt(ss / f32(k) + p.eps);
    }
    var amax = 0.0;
    for (var i = t; i < k; i += WG) {
        amax = max(amax, abs(input(i, inv)));
    }
    amax = max_f(amax, t);
    let s = 127.0 / max(amax, 1e-5);
    var qsum = 0;
    for (var wi = t; wi < p.vpr * 16u; wi += WG) {
        var word = 0u;
        for (var b = 0u; b < 4u; b++) {
            let i = wi * 4u + b;
            var q = 0;
            if i < k {
                q = i32(clamp(round(input(i, inv) * s), -128.0, 127.0));
            }
            qsum += q;
            word |= (u32(q) & 0xffu) << (8u * b);
        }
        xq[wi / 4u][wi % 4u] = word;
    }
    qsum = sum_i(qsum, t); // also the barrier that publishes xq

    // Body: TPR threads per row, each over every TPR-th vec4 (64 columns) of the row.
    let first = (wid.x + wid.y * nwg.x) * RPW;
    let local = t / TPR;
    let lane = t % TPR;
    let row = first + local;
    var acc = 0;
    if row < p.rows {
        let base = row * p.vpr;
        for (var v = lane; v < p.vpr; v += TPR) {
            let wv = w[base + v];
            let xb = (v >> 1u) * 8u + (v & 1u);
            for (var g = 0u; g < 4u; g++) {
                let sh = 6u - 2u * g;
                let u = (wv >> vec4<u32>(sh)) & vec4<u32>(0x03030303u);
                let xv = xq[xb + 2u * g];
                acc += dot4(u.x, xv.x) + dot4(u.y, xv.y) + dot4(u.z, xv.z) + dot4(u.w, xv.w);
            }
        }
    }
    red_i[t] = acc;
    workgroupBarrier();
    for (var st = TPR / 2u; st > 0u; st >>= 1u) {
        if lane < st {
            red_i[t] += red_i[t + st];
        }
        workgroupBarrier();
    }

    // Epilogue.
    if lane == 0u && row < p.rows {
        let a = red_i[t] - qsum;
        let y = f32(a) / s * row_scale(row);
        switch p.mode {
            case 0u: { out[row] = bitcast<u32>(y); }
            case 1u: { out[row] = bitcast<u32>(bitcast<f32>(out[row]) + y); }
            case 2u: { ys[local] = y; }
            default: { out[row] = bitcast<u32>(a); }
        }
    }
    if p.mode == 3u && row == 0u && t == 0u {
        out[p.rows] = bitcast<u32>(s); // the activation scale, for the tests
    }
    workgroupBarrier();
    if p.mode == 2u && t < RPW / 2u && first + 2u * t + 1u < p.rows {
        out[first / 2u + t] = bitcast<u32>(activation(ys[2u * t]) * ys[2u * t + 1u]);
    }
}
