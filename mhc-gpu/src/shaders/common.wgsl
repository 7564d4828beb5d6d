// Shared by every shader file of mhc-gpu (prepended at pipeline creation).
//
// Every dispatch gets one parameter block: 16 integers and 8 floats whose
// meaning each entry point documents. Workgroup counts may be spread over
// two dimensions (device limit per dimension), so entry points linearise
// `workgroup_id.x + workgroup_id.y * num_workgroups.x`.
struct Params {
    u0: u32, u1: u32, u2: u32, u3: u32, u4: u32, u5: u32, u6: u32, u7: u32,
    u8: u32, u9: u32, u10: u32, u11: u32, u12: u32, u13: u32, u14: u32, u15: u32,
    f0: f32, f1: f32, f2: f32, f3: f32, f4: f32, f5: f32, f6: f32, f7: f32,
}

@group(1) @binding(0) var<uniform> P: Params;

fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// 64 lanes × 9 partial sums for workgroup reductions.
var<workgroup> red: array<f32, 576>;

// Tree-reduces red[q*64 + lane] over the 64 lanes for q < count (9 at most);
// the sums land in red[q*64]. Call from uniform control flow.
fn reduce64(lane: u32, count: u32) {
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            for (var q = 0u; q < count; q++) {
                red[q * 64u + lane] += red[q * 64u + lane + stride];
            }
        }
        workgroupBarrier();
    }
}

// tanh that stays finite for any input (some drivers compute tanh through
// exp, which overflows); tanh(±15) already rounds to ±1 in f32.
fn safe_tanh(x: f32) -> f32 {
    return tanh(clamp(x, -15.0, 15.0));
}
