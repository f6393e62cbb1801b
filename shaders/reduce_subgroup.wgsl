// Workgroup reductions with subgroup operations (prepended by the host where the adapter has them; else
// reduce_shared.wgsl, which defines the same names): each subgroup reduces in registers, then every
// thread adds up the subgroups' partials in the same order, so that all get the same value. Native only:
// Naga (wgpu 30) takes subgroup operations without the standard `enable subgroups;` (and rejects it), and
// browsers may lack `subgroup_id`.

struct Lanes {
    @builtin(local_invocation_index) t: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) size: u32,
    @builtin(subgroup_id) id: u32,
    @builtin(num_subgroups) n: u32,
}

var<workgroup> wg_part_f: array<f32, WG / 4u>; // one per subgroup (a subgroup has at least 4 threads)

// The thread's place when the workgroup is cut into rows of `width` threads (a power of two no larger
// than a subgroup, which the host ensures): in subgroup order, so that a row lies in one subgroup.
fn slot(l: Lanes) -> u32 {
    return l.id * l.size + l.lane;
}

fn wg_sum_f(v: f32, l: Lanes) -> f32 {
    let s = subgroupAdd(v);
    if l.lane == 0u {
        wg_part_f[l.id] = s;
    }
    workgroupBarrier();
    var r = 0.0;
    for (var i = 0u; i < l.n; i++) {
        r += wg_part_f[i];
    }
    workgroupBarrier();
    return r;
}

fn wg_max_f(v: f32, l: Lanes) -> f32 {
    let s = subgroupMax(v);
    if l.lane == 0u {
        wg_part_f[l.id] = s;
    }
    workgroupBarrier();
    var r = wg_part_f[0];
    for (var i = 1u; i < l.n; i++) {
        r = max(r, wg_part_f[i]);
    }
    workgroupBarrier();
    return r;
}

// The sum of v over the `width` threads of this thread's row (see `slot`), in each of them.
fn row_sum_i(v: i32, width: u32, l: Lanes) -> i32 {
    var r = v;
    for (var m = width / 2u; m > 0u; m >>= 1u) {
        r += subgroupShuffleXor(r, m);
    }
    return r;
}
