// Workgroup-wide f32 sum and maximum, prepended to the kernels that reduce over the whole workgroup.
//
// Two levels instead of a tree: every thread writes its value, WG / 16 threads each fold 16 of them, and
// every thread folds those WG / 16 partial results itself (the same loads in the same order, so all get
// the same bits). Two barriers a reduction where a tree takes log2(WG) + 2; a barrier is what costs on a
// GPU (it also holds back the warps that have nothing to add).
//
// Reductions may follow each other with no barrier between them: `red1` is read only between a
// reduction's two barriers, and `red2` only after its second, before the thread reaches the next
// reduction's first.
//
// Prepended by the host after WG (a multiple of 64).

const R2: u32 = WG / 16u; // partial results at the second level

var<workgroup> red1: array<vec4<f32>, WG / 4u>;
var<workgroup> red2: array<vec4<f32>, R2 / 4u>;

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

fn max4(v: vec4<f32>) -> f32 {
    return max(max(v.x, v.y), max(v.z, v.w));
}

fn sum_f(v: f32, t: u32) -> f32 {
    red1[t / 4u][t % 4u] = v;
    workgroupBarrier();
    if t < R2 {
        let b = 4u * t;
        red2[t / 4u][t % 4u] = sum4((red1[b] + red1[b + 1u]) + (red1[b + 2u] + red1[b + 3u]));
    }
    workgroupBarrier();
    var r = red2[0];
    for (var i = 1u; i < R2 / 4u; i++) {
        r += red2[i];
    }
    return sum4(r);
}

fn max_f(v: f32, t: u32) -> f32 {
    red1[t / 4u][t % 4u] = v;
    workgroupBarrier();
    if t < R2 {
        let b = 4u * t;
        red2[t / 4u][t % 4u] = max4(max(max(red1[b], red1[b + 1u]), max(red1[b + 2u], red1[b + 3u])));
    }
    workgroupBarrier();
    var r = red2[0];
    for (var i = 1u; i < R2 / 4u; i++) {
        r = max(r, red2[i]);
    }
    return max4(r);
}
