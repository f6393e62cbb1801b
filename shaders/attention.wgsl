// Causal attention of the token at `step.pos` for one query head per workgroup, with the rotary
// embedding (NeoX pairs: i with i + rope_dim/2) and the KV-cache store fused in: each workgroup rotates
// its own q head and its kv head's k (cheap), uses the new k and v from registers for the current
// position, and the first query head of each kv group writes them to the cache for later tokens. Keys
// and values are rounded to f16 (`f16_round`) as the CPU and CUDA caches store them, so that all backends
// attend over the same values, unless the cache is exact (`p.exact`: `--kv-type f32`); they are kept in f32
// words either way (halving the f16 cache is left to do).
//
// A prompt tile runs one workgroup per (head, token) of the tile's step.n tokens, at positions step.pos
// onwards. A token attends to the tile's earlier tokens too, whose keys another workgroup computes: so
// `store_kv` first writes the whole tile's keys and values to the cache, and `main` reads them there. Tile
// rows start at step.row: a step of many sequences runs each one's row (one token) at its own step entry,
// over its own cache.
//
// A decode step in a long context splits the sequence (flash-decoding): one workgroup per head takes all
// positions only while they are few; with `chunk` set, workgroup (head, c) takes positions
// [c·chunk, (c+1)·chunk) and writes its partial result (the unnormalized Σ p·v, its max score and Σ p)
// to `part`, and `combine` merges a head's chunks. Otherwise one head's positions would keep one
// workgroup (one GPU core) busy while the rest of the GPU idles.
//
// Prepended by the host: WG, MAX_HD (>= head_dim), reduce.wgsl and f16.wgsl.

struct Step { token: u32, pos: u32, row: u32, n: u32 }

struct Params {
    head_dim: u32,
    group: u32,     // query heads per kv head
    q_dim: u32,     // n_head * head_dim: k starts there in `qkv`, v at q_dim + kv_dim
    kv_dim: u32,
    rope_half: u32, // rope_dim / 2
    ctx: u32,
    scale: f32,     // 1 / sqrt(head_dim)
    qkv_stride: u32, // a tile's rows: from one token's q, k, v to the next's
    out_stride: u32, // and from one token's output to the next's
    cached: u32,     // 1: the token's k and v are in the cache already (a tile, after store_kv)
    chunk: u32,      // > 0: a decode step split over the sequence in chunks of this many positions
    exact: u32,      // 1: keys and values cached as computed (f32), 0: rounded to f16
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> rope: array<vec2<f32>>; // [pos][rope_half] (cos, sin)
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>; // [pos][kv_dim]
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> att: array<f32>;     // [token][head][ctx] scratch
@group(0) @binding(7) var<storage, read_write> out: array<f32>;     // [token][n_head * head_dim]
@group(0) @binding(8) var<storage, read_write> part: array<f32>;    // [head][chunk][head_dim + 2]

var<workgroup> q: array<f32, MAX_HD>;
var<workgroup> kp: array<f32, MAX_HD>;
var<workgroup> vp: array<f32, MAX_HD>;
var<workgroup> red: array<f32, WG>; // the partial Σ p·v

// A key or value as the cache keeps it.
fn cached_value(x: f32) -> f32 {
    return select(f16_round(x), x, p.exact == 1u);
}

// Element i of the head starting at `base` in `qkv`, rotated for position `pos` (as model.rs's rope).
fn rotated(base: u32, i: u32, pos: u32) -> f32 {
    let h = p.rope_half;
    if i < h {
        let cs = rope[pos * h + i];
        return qkv[base + i] * cs.x - qkv[base + i + h] * cs.y;
    }
    if i < 2u * h {
        let cs = rope[pos * h + i - h];
        return qkv[base + i] * cs.x + qkv[base + i - h] * cs.y;
    }
    return qkv[base + i];
}

// A tile's keys (rotated) and values into the cache: one workgroup per (kv head, token).
@compute @workgroup_size(WG)
fn store_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let tok = wid.y;
    if tok >= step.n || t >= p.head_dim {
        return;
    }
    let pos = step.pos + tok;
    let kv_off = wid.x * p.head_dim;
    let kb = (step.row + tok) * p.qkv_stride + p.q_dim + kv_off;
    k_cache[pos * p.kv_dim + kv_off + t] = cached_value(rotated(kb, t, pos));
    v_cache[pos * p.kv_dim + kv_off + t] = cached_value(qkv[kb + p.kv_dim + t]);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    // wid.y is the token in a tile, the chunk in a split decode step.
    let tok = select(wid.y, 0u, p.chunk > 0u);
    let c = select(0u, wid.y, p.chunk > 0u);
    let pos = step.pos + tok;
    let start = c * p.chunk;
    if tok >= step.n || start > pos {
        return;
    }
    let end = select(pos + 1u, min(start + p.chunk, pos + 1u), p.chunk > 0u); // positions [start, end)
    let hd = p.head_dim;
    let head = wid.x;
    let kvh = head / p.group;
    let kv_off = kvh * hd;
    let row = step.row + tok;
    let qb = row * p.qkv_stride;
    for (var i = t; i < hd; i += WG) {
        q[i] = rotated(qb + head * hd, i, pos);
        if p.cached == 1u {
            kp[i] = k_cache[pos * p.kv_dim + kv_off + i];
            vp[i] = v_cache[pos * p.kv_dim + kv_off + i];
        } else {
            kp[i] = cached_value(rotated(qb + p.q_dim + kv_off, i, pos));
            vp[i] = cached_value(qkv[qb + p.q_dim + p.kv_dim + kv_off + i]);
            if head % p.group == 0u && c == 0u {
                k_cache[pos * p.kv_dim + kv_off + i] = kp[i];
                v_cache[pos * p.kv_dim + kv_off + i] = vp[i];
            }
        }
    }
    workgroupBarrier();

    // Scores, one position per thread.
    let a = (row * nwg.x + head) * p.ctx;
    // -f32::MAX written exactly: Chromium rejects a decimal literal that rounds to it from above.
    var mx = -0x1.fffffep+127f;
    for (var j = start + t; j < end; j += WG) {
        var sc = 0.0;
        if j == pos {
            for (var i = 0u; i < hd; i++) {
                sc += q[i] * kp[i];
            }
        } else {
            let kb = j * p.kv_dim + kv_off;
            for (var i = 0u; i < hd; i++) {
                sc += q[i] * k_cache[kb + i];
            }
        }
        sc *= p.scale;
        att[a + j] = sc;
        mx = max(mx, sc);
    }
    mx = max_f(mx, t);
    var sum = 0.0;
    for (var j = start + t; j < end; j += WG) {
        let e = exp(att[a + j] - mx);
        att[a + j] = e;
        sum += e;
    }
    sum = sum_f(sum, t);
    storageBarrier();

    // Σ_j p_j v_j: thread t takes dimension t % hd of positions j ≡ t / hd (mod WG / hd).
    let groups = WG / hd;
    let d = t % hd;
    let g = t / hd;
    var o = 0.0;
    if g < groups {
        for (var j = start + g; j < end; j += groups) {
            var v = vp[d];
            if j != pos {
                v = v_cache[j * p.kv_dim + kv_off + d];
            }
            o += att[a + j] * v;
        }
    }
    red[t] = o;
    workgroupBarrier();
    if t < hd {
        var s = 0.0;
        for (var gg = 0u; gg < groups; gg++) {
            s += red[gg * hd + t];
        }
        if p.chunk == 0u {
            out[row * p.out_stride + head * hd + t] = s / sum;
        } else {
            let b = (head * nwg.y + c) * (hd + 2u);
            part[b + t] = s;
            if t == 0u {
                part[b + hd] = mx;
                part[b + hd + 1u] = sum;
            }
        }
    }
}

// A split decode step's result, one workgroup per head: the chunks' partial sums rescaled to the largest
// of their max scores, Σ_c e^(m_c - m)·o_c / Σ_c e^(m_c - m)·l_c.
@compute @workgroup_size(WG)
fn combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let hd = p.head_dim;
    if t >= hd {
        return;
    }
    let chunks = (p.ctx + p.chunk - 1u) / p.chunk; // as many as the split dispatch has workgroups per head
    let n = step.pos / p.chunk + 1u;               // those that hold positions 0..=pos
    let b = wid.x * chunks * (hd + 2u);
    var m = -0x1.fffffep+127f;
    for (var c = 0u; c < n; c++) {
        m = max(m, part[b + c * (hd + 2u) + hd]);
    }
    var l = 0.0;
    var o = 0.0;
    for (var c = 0u; c < n; c++) {
        let pc = b + c * (hd + 2u);
        let e = exp(part[pc + hd] - m);
        l += part[pc + hd + 1u] * e;
        o += part[pc + t] * e;
    }
    out[wid.x * hd + t] = o / l;
}
