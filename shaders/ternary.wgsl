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
// Prepended by the host: WG, TPR (threads per row), XQ_VEC4 (workgroup activation words / 4), dot4(), and
// the reductions (reduce_subgroup.wgsl or reduce_shared.wgsl).

const ONES: u32 = 0x01010101u; // dot4(ONES, word) = the sum of its four int8

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
const XW: u32 = (XQ_VEC4 * 4u + WG - 1u) / WG; // activation words (4 inputs) per thread, at most

var<workgroup> xq: array<vec4<u32>, XQ_VEC4>;
var<workgroup> ys: array<f32, RPW>;

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

// Input word `wi` (elements 4wi .. 4wi + 3, zero past k) of x, and of the norm weights.
fn x4(wi: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var b = 0u; b < 4u; b++) {
        if wi * 4u + b < p.k {
            v[b] = x[wi * 4u + b];
        }
    }
    return v;
}

fn norm4(wi: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var b = 0u; b < 4u; b++) {
        if wi * 4u + b < p.k {
            v[b] = norm[wi * 4u + b];
        }
    }
    return v;
}

fn amax4(v: vec4<f32>) -> f32 {
    let a = abs(v);
    return max(max(a.x, a.y), max(a.z, a.w));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, l: Lanes) {
    let t = l.t;
    let words = p.vpr * 16u; // activation words of a padded row

    // Prologue: RMS norm, absmax, int8 quantization (round half to even). Each thread loads its words of
    // the input (and of the norm) once, all loads in flight together, and keeps them in registers.
    var xs: array<vec4<f32>, XW>;
    var ss = 0.0;
    for (var j = 0u; j < XW; j++) {
        xs[j] = x4(t + j * WG);
        ss += dot(xs[j], xs[j]);
    }
    var amax = 0.0;
    if p.prenorm == 1u {
        var ns: array<vec4<f32>, XW>;
        for (var j = 0u; j < XW; j++) {
            ns[j] = norm4(t + j * WG);
        }
        let inv = 1.0 / sqrt(wg_sum_f(ss, l) / f32(p.k) + p.eps);
        for (var j = 0u; j < XW; j++) {
            xs[j] = ns[j] * (xs[j] * inv); // as the CPU computes it: w · (x · inv)
        }
    }
    for (var j = 0u; j < XW; j++) {
        amax = max(amax, amax4(xs[j]));
    }
    amax = wg_max_f(amax, l);
    let s = 127.0 / max(amax, 1e-5);
    for (var j = 0u; j < XW; j++) {
        let wi = t + j * WG;
        if wi < words {
            let q = vec4<i32>(clamp(round(xs[j] * s), vec4<f32>(-128.0), vec4<f32>(127.0)));
            let b = vec4<u32>(q) & vec4<u32>(0xffu);
            xq[wi / 4u][wi % 4u] = b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
        }
    }
    workgroupBarrier();

    // Body: TPR threads per row, each over every TPR-th vec4 (64 columns) of the row. Σ u·x - Σ x: the
    // row's threads together cover every activation word once, so Σ x comes with the dot products.
    let first = (wid.x + wid.y * nwg.x) * RPW;
    let local = slot(l) / TPR;
    let lane = slot(l) % TPR;
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
                acc -= dot4(ONES, xv.x) + dot4(ONES, xv.y) + dot4(ONES, xv.z) + dot4(ONES, xv.w);
            }
        }
    }
    let a = row_sum_i(acc, TPR, l);

    // Epilogue.
    if lane == 0u && row < p.rows {
        let y = f32(a) / s * row_scale(row);
        switch p.mode {
            case 0u: { out[row] = bitcast<u32>(y); }
            case 1u: { out[row] = bitcast<u32>(bitcast<f32>(out[row]) + y); }
            case 2u: { ys[local] = y; }
            default: { out[row] = bitcast<u32>(a); }
        }
    }
    if p.mode == 3u && row == 0u && lane == 0u {
        out[p.rows] = bitcast<u32>(s); // the activation scale, for the tests
    }
    workgroupBarrier();
    if p.mode == 2u && t < RPW / 2u && first + 2u * t + 1u < p.rows {
        out[first / 2u + t] = bitcast<u32>(activation(ys[2u * t]) * ys[2u * t + 1u]);
    }
}
