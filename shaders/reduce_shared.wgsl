// Workgroup reductions as trees in workgroup memory, one barrier a level (prepended by the host where
// the adapter has no subgroup operations; reduce_subgroup.wgsl defines the same names with them).

struct Lanes {
    @builtin(local_invocation_index) t: u32,
}

var<workgroup> wg_red_f: array<f32, WG>;
var<workgroup> wg_red_i: array<i32, WG>;

// The thread's place when the workgroup is cut into rows of `width` threads.
fn slot(l: Lanes) -> u32 {
    return l.t;
}

fn wg_sum_f(v: f32, l: Lanes) -> f32 {
    wg_red_f[l.t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if l.t < s {
            wg_red_f[l.t] += wg_red_f[l.t + s];
        }
        workgroupBarrier();
    }
    let r = wg_red_f[0];
    workgroupBarrier();
    return r;
}

fn wg_max_f(v: f32, l: Lanes) -> f32 {
    wg_red_f[l.t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if l.t < s {
            wg_red_f[l.t] = max(wg_red_f[l.t], wg_red_f[l.t + s]);
        }
        workgroupBarrier();
    }
    let r = wg_red_f[0];
    workgroupBarrier();
    return r;
}

// The sum of v over the `width` threads of this thread's row (see `slot`), in each of them.
fn row_sum_i(v: i32, width: u32, l: Lanes) -> i32 {
    wg_red_i[l.t] = v;
    workgroupBarrier();
    let lane = l.t % width;
    for (var s = width / 2u; s > 0u; s >>= 1u) {
        if lane < s {
            wg_red_i[l.t] += wg_red_i[l.t + s];
        }
        workgroupBarrier();
    }
    let r = wg_red_i[l.t - lane];
    workgroupBarrier();
    return r;
}
