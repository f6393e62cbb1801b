// Float matrices (the LM head and the embedding), stored as the model stores them where the GPU can
// read that directly: rows of vec4<u32> holding 4 f32 (F32), 8 halves (F16) or 8 bfloat16 (BF16), or
// int8 blocks of 32 with one f32 scale each (Q8_0, Q5_0 and Q4_0 repacked losslessly; Q8 below).
// A large matrix is split into shards of rows that each fit one storage binding.
//
// Prepended by the host: WG, TPR, and `const FORMAT: u32` (0 F32, 1 F16, 2 BF16, 3 Q8).

struct Step { token: u32, pos: u32, row: u32 }

struct Params {
    rows: u32,       // rows in this shard
    row_offset: u32, // index of the shard's first row in the whole matrix
    vpr: u32,        // vec4<u32> per row
    k: u32,          // columns
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> m: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> d: array<f32>;        // Q8 block scales (unused otherwise)
@group(0) @binding(4) var<storage, read> x: array<vec4<f32>>;  // matvec input, zero-padded to the row
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const RPW: u32 = WG / TPR;
const EPV: u32 = select(8u, select(4u, 16u, FORMAT == 3u), FORMAT == 0u || FORMAT == 3u); // elements per vec4

var<workgroup> red: array<f32, WG>;

fn bf16(bits: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(bits << 16u), bitcast<f32>(bits & 0xffff0000u));
}

fn i8x4(word: u32) -> vec4<f32> {
    let s = bitcast<i32>(word);
    return vec4<f32>(f32(extractBits(s, 0u, 8u)), f32(extractBits(s, 8u, 8u)), f32(extractBits(s, 16u, 8u)),
                     f32(extractBits(s, 24u, 8u)));
}

// Elements 4j .. 4j+3 of the vec4 at `i` (j < EPV / 4), decoded to f32 exactly as the CPU decodes them.
fn quad(i: u32, j: u32) -> vec4<f32> {
    let v = m[i];
    switch FORMAT {
        case 0u: { return bitcast<vec4<f32>>(v); }
        case 1u: {
            if j == 0u { return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)); }
            return vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w));
        }
        case 2u: {
            if j == 0u { return vec4<f32>(bf16(v.x), bf16(v.y)); }
            return vec4<f32>(bf16(v.z), bf16(v.w));
        }
        default: { return i8x4(v[j]) * d[i / 2u]; }
    }
}

// out[row_offset + r] = Σ_c M[r][c]·x[c] for the shard's rows: TPR threads per row.
@compute @workgroup_size(WG)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) t: u32) {
    let lane = t % TPR;
    let row = (wid.x + wid.y * nwg.x) * RPW + t / TPR;
    var acc = 0.0;
    if row < p.rows {
        let base = row * p.vpr;
        for (var v = lane; v < p.vpr; v += TPR) {
            let xi = v * (EPV / 4u);
            if FORMAT == 3u {
                // One block scale per 32 elements: factor it out of the 16 products.
                let w = m[base + v];
                let dot16 = dot(i8x4(w.x), x[xi]) + dot(i8x4(w.y), x[xi + 1u]) + dot(i8x4(w.z), x[xi + 2u])
                    + dot(i8x4(w.w), x[xi + 3u]);
                acc += dot16 * d[(base + v) / 2u];
            } else {
                for (var j = 0u; j < EPV / 4u; j++) {
                    acc += dot(quad(base + v, j), x[xi + j]);
                }
            }
        }
    }
    // The row's first thread adds up its TPR partial sums: one barrier, where a tree takes log2(TPR).
    red[t] = acc;
    workgroupBarrier();
    if lane == 0u && row < p.rows {
        var sum = 0.0;
        for (var j = 0u; j < TPR; j++) {
            sum += red[t + j];
        }
        out[p.row_offset + row] = sum;
    }
}

// Row `step.row` of `out` (rows of k rounded up to vec4s) = row `step.token` of the matrix, if it lies in
// this shard: the embedding lookup. Every shard has a dispatch and only the token's does work, so that a
// token's dispatches do not depend on its id.
@compute @workgroup_size(WG)
fn lookup(@builtin(local_invocation_index) t: u32) {
    if step.token < p.row_offset || step.token - p.row_offset >= p.rows {
        return;
    }
    let base = (step.token - p.row_offset) * p.vpr;
    let out0 = step.row * ((p.k + 3u) / 4u * 4u);
    for (var v = t; v < p.vpr; v += WG) {
        for (var j = 0u; j < EPV / 4u; j++) {
            let q = quad(base + v, j);
            for (var e = 0u; e < 4u; e++) {
                let c = v * EPV + j * 4u + e;
                if c < p.k {
                    out[out0 + c] = q[e];
                }
            }
        }
    }
}
