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
// reduce.wgsl. The host pads every buffer to whole vec4s: x and the norm weights are read 4 floats at a
// time (fewer, wider loads), and the word straddling k is masked.

struct Step { token: u32, pos: u32, row: u32, n: u32 } // n: tokens in a prompt tile (tile.wgsl)

struct Params {
    rows: u32,    // weight rows
    k: u32,       // input length
    vpr: u32,     // vec4<u32> per weight row (padded_cols / 64)
    mode: u32,    // 0 store, 1 add to out, 2 act(gate)·up of row pairs, 3 raw accumulators (tests),
                  // 4 out = act(out)·y (up after gate, each with its own input: BitNet embedding models)
    seg1: u32,    // rows [0, seg1) use scale0, [seg1, seg2) scale1, the rest scale2 (mode 2: even/odd rows)
    seg2: u32,
    act: u32,     // mode 2: 0 relu², 1 SiLU
    prenorm: u32, // 1: RMS-normalize the input with `norm` before quantizing (0: as it is; 2: twice, with
                  // the two halves of `norm`: a BitNet embedding model's block norm, then the projection's own)
    eps: f32,
    scale0: f32,
    scale1: f32,
    scale2: f32,
    x_stride: u32,   // a prompt tile's input rows: vec4 from one token's to the next (tile.wgsl)
    out_stride: u32, // and its output rows: elements from one token's to the next
    ty: u32,         // 0 ternary; blocks.wgsl: the ggml block type (1 Q1_0, 2 Q2_0, 3 Q8_0)
    d_off: u32,      // blocks.wgsl: the vec4 of `w` where the weight blocks' scales start
    out_off: u32,    // where the output rows start in `out` (one of q, k, v on its own)
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> norm: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>; // f32 bits (mode 3: i32 bits)

const RPW: u32 = WG / TPR; // rows per workgroup
const ONES: u32 = 0x01010101u; // dot4(word, ONES) = the sum of the word's four int8

var<workgroup> xq: array<vec4<u32>, XQ_VEC4>;
// Σq in two levels as in reduce.wgsl, its barriers shared with the body's: the first publishes xq too,
// the second is the row sums'.
var<workgroup> qred1: array<vec4<i32>, WG / 4u>;
var<workgroup> qred2: array<vec4<i32>, R2 / 4u>;
var<workgroup> row_part: array<i32, WG>; // the body's partial dot products, TPR per row

// `v`, word `wi` of the input (elements 4wi .. 4wi + 3), with the elements past k zeroed.
fn below_k(v: vec4<f32>, wi: u32) -> vec4<f32> {
    if 4u * wi + 4u <= p.k {
        return v;
    }
    return select(vec4<f32>(0.0), v, 4u * wi + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.k));
}

// Word `wi` of the input row starting at vec4 `x0`, normalized as the CPU does it: h = w · (x · inv.x), and
// with prenorm 2, w' · (h · inv.y) with the second half of `norm`.
fn input4(x0: u32, wi: u32, inv: vec2<f32>) -> vec4<f32> {
    if p.prenorm == 0u {
        return below_k(x[x0 + wi], wi);
    }
    let h = norm[wi] * (x[x0 + wi] * inv.x);
    if p.prenorm == 1u {
        return below_k(h, wi);
    }
    return below_k(norm[(p.k + 3u) / 4u + wi] * (h * inv.y), wi);
}

// The four int8 of `q` (integers in [-128, 127]) packed into a word, the first in the low byte.
fn pack4(q: vec4<f32>) -> u32 {
    let b = vec4<u32>(vec4<i32>(q)) & vec4<u32>(0xffu);
    return b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
}

// The RMS norms' 1 / rms of the input row at vec4 `x0` and (prenorm 2) of its first norm's output (1
// where there is no such norm), from the whole workgroup.
fn norm_inv(x0: u32, t: u32) -> vec2<f32> {
    var inv = vec2<f32>(1.0);
    if p.prenorm == 0u {
        return inv;
    }
    var ss = 0.0;
    for (var wi = t; wi < (p.k + 3u) / 4u; wi += WG) {
        let v = below_k(x[x0 + wi], wi);
        ss += dot(v, v);
    }
    inv.x = 1.0 / sqrt(sum_f(ss, t) / f32(p.k) + p.eps);
    if p.prenorm == 2u {
        ss = 0.0;
        for (var wi = t; wi < (p.k + 3u) / 4u; wi += WG) {
            let h = below_k(norm[wi] * (x[x0 + wi] * inv.x), wi);
            ss += dot(h, h);
        }
        inv.y = 1.0 / sqrt(sum_f(ss, t) / f32(p.k) + p.eps);
    }
    return inv;
}

// The RMS norms' factors (`norm_inv`) and the int8 scale s = 127 / absmax of the input row at vec4 `x0`,
// from the whole workgroup. x and the norm weights come from global memory again in each pass, but from
// L1 after the first.
fn row_scales(x0: u32, t: u32) -> vec3<f32> {
    let kw = (p.k + 3u) / 4u; // words holding input
    let inv = norm_inv(x0, t);
    var amax = 0.0;
    for (var wi = t; wi < kw; wi += WG) {
        amax = max(amax, max4(abs(input4(x0, wi, inv))));
    }
    return vec3<f32>(inv, 127.0 / max(max_f(amax, t), 1e-5));
}

// Word `wi` of the input row at `x0` quantized to int8 (round half to even) and packed.
fn quantize4(x0: u32, wi: u32, inv: vec2<f32>, s: f32) -> u32 {
    return pack4(clamp(round(input4(x0, wi, inv) * s), vec4<f32>(-128.0), vec4<f32>(127.0)));
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

// Writes output row `row` (accumulator `a`, BitLinear output `y`; `up`: the up row's output in mode 2)
// at `base` + `p.out_off` + the row's index.
fn store(row: u32, a: i32, y: f32, up: f32, base: u32) {
    let o = base + p.out_off;
    switch p.mode {
        case 0u: { out[o + row] = bitcast<u32>(y); }
        case 1u: { out[o + row] = bitcast<u32>(bitcast<f32>(out[o + row]) + y); }
        case 2u: {
            if (row & 1u) == 0u && row + 1u < p.rows {
                out[o + row / 2u] = bitcast<u32>(activation(y) * up);
            }
        }
        case 4u: { out[o + row] = bitcast<u32>(activation(bitcast<f32>(out[o + row])) * y); }
        default: { out[o + row] = bitcast<u32>(a); }
    }
}

// A row's accumulator Σ u·q - Σ q: the partial sums of its TPR threads, less Σq.
fn row_acc(local: u32, qsum: i32) -> i32 {
    var a = -qsum;
    for (var j = 0u; j < TPR; j++) {
        a += row_part[local * TPR + j];
    }
    return a;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let first = (wid.x + wid.y * nwg.x) * RPW;
    let local = t / TPR;
    let lane = t % TPR;
    let row = first + local;
    // The thread's first weight vector, loaded now (from DRAM) so that its latency hides behind the
    // prologue. Rows past the end load their matrix's last row and use nothing.
    let base = min(row, p.rows - 1u) * p.vpr;
    let last = base + p.vpr - 1u;
    var wv = w[min(base + lane, last)];

    // Prologue: RMS norm, absmax, int8 quantization, Σq.
    let sc = row_scales(0u, t);
    let s = sc.z;
    let kw = (p.k + 3u) / 4u;
    var qsum = 0;
    for (var wi = t; wi < p.vpr * 16u; wi += WG) {
        var word = 0u;
        if wi < kw {
            word = quantize4(0u, wi, sc.xy, s);
            qsum += dot4(word, ONES);
        }
        xq[wi / 4u][wi % 4u] = word;
    }
    qred1[t / 4u][t % 4u] = qsum;
    workgroupBarrier(); // publishes xq and the Σq partials
    if t < R2 {
        let b = 4u * t;
        let q4 = (qred1[b] + qred1[b + 1u]) + (qred1[b + 2u] + qred1[b + 3u]);
        qred2[t / 4u][t % 4u] = (q4.x + q4.y) + (q4.z + q4.w);
    }

    // Body: TPR threads per row, each over every TPR-th vec4 (64 columns) of the row, loading the next
    // vector of weights before using the one it has.
    var acc = 0;
    if row < p.rows {
        for (var v = lane; v < p.vpr; v += TPR) {
            let next = w[min(base + v + TPR, last)];
            let xb = (v >> 1u) * 8u + (v & 1u);
            for (var i = 0u; i < 4u; i++) {
                // Lanes on different 128-column blocks start at different groups: taking the same g, their
                // vec4s of xq would lie 128 bytes apart, in the same banks (a 4-way conflict per quarter warp).
                let g = (i + (v >> 1u)) & 3u;
                let sh = 6u - 2u * g;
                let u = (wv >> vec4<u32>(sh)) & vec4<u32>(0x03030303u);
                let xv = xq[xb + 2u * g];
                acc += dot4(u.x, xv.x) + dot4(u.y, xv.y) + dot4(u.z, xv.z) + dot4(u.w, xv.w);
            }
            wv = next;
        }
    }
    row_part[t] = acc;
    workgroupBarrier(); // publishes the row sums' parts and Σq's second level

    // Epilogue, by each row's first thread (in mode 2, each row pair's: gate at the even row, up next).
    if lane == 0u && row < p.rows {
        var q4 = qred2[0];
        for (var i = 1u; i < R2 / 4u; i++) {
            q4 += qred2[i];
        }
        let qsum = (q4.x + q4.y) + (q4.z + q4.w);
        let a = row_acc(local, qsum);
        var up = 0.0;
        if p.mode == 2u && (row & 1u) == 0u && row + 1u < p.rows {
            up = f32(row_acc(local + 1u, qsum)) / s * row_scale(row + 1u);
        }
        store(row, a, f32(a) / s * row_scale(row), up, 0u);
        if p.mode == 3u && row == 0u {
            out[p.rows] = bitcast<u32>(s); // the activation scale, for the tests
        }
    }
}
