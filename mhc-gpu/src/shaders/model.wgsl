// The reference model's kernels (mhc-core's model::ops and blocks), f32,
// row-major. Each entry point documents its parameter block.

// out[o + i·ldo + j] (+)= Σ_r A(i, r)·B(r, j) with A(i, r) = a[a0 + i·sai + r·sar]
// and B(r, j) = b[b0 + r·sbr + j·sbj], so transposes are strides.
// u0 M, u1 N, u2 K, u3 sai, u4 sar, u5 sbr, u6 sbj, u7 ldo, u8 a0, u9 b0,
// u10 accumulate (0/1), u11 o. 16×16 tiles in workgroup memory; grid (⌈N/16⌉, ⌈M/16⌉).
@group(0) @binding(0) var<storage, read> mm_a: array<f32>;
@group(0) @binding(1) var<storage, read> mm_b: array<f32>;
@group(0) @binding(2) var<storage, read_write> mm_out: array<f32>;

var<workgroup> tile_a: array<f32, 256>;
var<workgroup> tile_b: array<f32, 256>;

@compute @workgroup_size(16, 16)
fn matmul(@builtin(local_invocation_id) li: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let m = P.u0;
    let n = P.u1;
    let k = P.u2;
    let row = wid.y * 16u + li.y;
    let col = wid.x * 16u + li.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < k; k0 += 16u) {
        let ka = k0 + li.x;
        var av = 0.0;
        if (row < m && ka < k) { av = mm_a[P.u8 + row * P.u3 + ka * P.u4]; }
        tile_a[li.y * 16u + li.x] = av;
        let kb = k0 + li.y;
        var bv = 0.0;
        if (kb < k && col < n) { bv = mm_b[P.u9 + kb * P.u5 + col * P.u6]; }
        tile_b[li.y * 16u + li.x] = bv;
        workgroupBarrier();
        let kmax = min(16u, k - k0);
        for (var q = 0u; q < kmax; q++) {
            acc += tile_a[li.y * 16u + q] * tile_b[q * 16u + li.x];
        }
        workgroupBarrier();
    }
    if (row < m && col < n) {
        let at = P.u11 + row * P.u7 + col;
        if (P.u10 != 0u) {
            mm_out[at] = mm_out[at] + acc;
        } else {
            mm_out[at] = acc;
        }
    }
}

// The same product without workgroup memory or barriers: one invocation a
// 4×4 block of the output (64 a workgroup, ⌈⌈M/4⌉·⌈N/4⌉/64⌉ workgroups),
// each output summed over r in the same order as `matmul`. For software
// adapters (SwiftShader), where a workgroup barrier costs far more than the
// loads it saves. Rows and columns past the edge read the last one and are
// not written.
fn mm_store(row: u32, col: u32, v: f32) {
    if (row < P.u0 && col < P.u1) {
        let at = P.u11 + row * P.u7 + col;
        if (P.u10 != 0u) {
            mm_out[at] = mm_out[at] + v;
        } else {
            mm_out[at] = v;
        }
    }
}

fn mm_store4(row: u32, j0: u32, v: vec4<f32>) {
    mm_store(row, j0, v.x);
    mm_store(row, j0 + 1u, v.y);
    mm_store(row, j0 + 2u, v.z);
    mm_store(row, j0 + 3u, v.w);
}

@compute @workgroup_size(64)
fn matmul_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let m = P.u0;
    let n = P.u1;
    let bn = (n + 3u) / 4u;
    let idx = group_index(wid, nwg) * 64u + lid;
    if (idx >= ((m + 3u) / 4u) * bn) { return; }
    let i0 = (idx / bn) * 4u;
    let j0 = (idx % bn) * 4u;
    let ia = P.u8 + vec4<u32>(min(i0, m - 1u), min(i0 + 1u, m - 1u), min(i0 + 2u, m - 1u), min(i0 + 3u, m - 1u)) * P.u3;
    let ib = P.u9 + vec4<u32>(min(j0, n - 1u), min(j0 + 1u, n - 1u), min(j0 + 2u, n - 1u), min(j0 + 3u, n - 1u)) * P.u6;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var ra = 0u;
    var rb = 0u;
    for (var r = 0u; r < P.u2; r++) {
        let av = vec4<f32>(mm_a[ia.x + ra], mm_a[ia.y + ra], mm_a[ia.z + ra], mm_a[ia.w + ra]);
        let bv = vec4<f32>(mm_b[ib.x + rb], mm_b[ib.y + rb], mm_b[ib.z + rb], mm_b[ib.w + rb]);
        c0 += av.x * bv;
        c1 += av.y * bv;
        c2 += av.z * bv;
        c3 += av.w * bv;
        ra += P.u4;
        rb += P.u5;
    }
    mm_store4(i0, j0, c0);
    mm_store4(i0 + 1u, j0, c1);
    mm_store4(i0 + 2u, j0, c2);
    mm_store4(i0 + 3u, j0, c3);
}

// RMSNorm per row: y = x / √(mean(x²) + eps) ⊙ w, inv[r] = 1/rms. u0 rows, u1 C, f0 eps; one workgroup a row.
@group(0) @binding(0) var<storage, read> rn_x: array<f32>;
@group(0) @binding(1) var<storage, read> rn_w: array<f32>;
@group(0) @binding(2) var<storage, read_write> rn_y: array<f32>;
@group(0) @binding(3) var<storage, read_write> rn_inv: array<f32>;

@compute @workgroup_size(64)
fn rmsnorm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = group_index(wid, nwg);
    if (r >= P.u0) { return; }
    let c = P.u1;
    var ss = 0.0;
    for (var j = lid; j < c; j += 64u) { let v = rn_x[r * c + j]; ss += v * v; }
    red[lid] = ss;
    reduce64(lid, 1u);
    let inv = 1.0 / sqrt(red[0] / f32(c) + P.f0);
    for (var j = lid; j < c; j += 64u) { rn_y[r * c + j] = rn_x[r * c + j] * inv * rn_w[j]; }
    if (lid == 0u) { rn_inv[r] = inv; }
}

// `rmsnorm` with one invocation a row (64 rows a workgroup), no barriers.
@compute @workgroup_size(64)
fn rmsnorm_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = group_index(wid, nwg) * 64u + lid;
    if (r >= P.u0) { return; }
    let c = P.u1;
    var ss = 0.0;
    for (var j = 0u; j < c; j++) { let v = rn_x[r * c + j]; ss += v * v; }
    let inv = 1.0 / sqrt(ss / f32(c) + P.f0);
    for (var j = 0u; j < c; j++) { rn_y[r * c + j] = rn_x[r * c + j] * inv * rn_w[j]; }
    rn_inv[r] = inv;
}

// RMSNorm backward, ∂x per row: ∂x = (∂y⊙w − x̂·mean(∂y⊙w⊙x̂))·inv. u0 rows, u1 C.
@group(0) @binding(0) var<storage, read> rb_x: array<f32>;
@group(0) @binding(1) var<storage, read> rb_w: array<f32>;
@group(0) @binding(2) var<storage, read> rb_inv: array<f32>;
@group(0) @binding(3) var<storage, read> rb_gy: array<f32>;
@group(0) @binding(4) var<storage, read_write> rb_gx: array<f32>;

@compute @workgroup_size(64)
fn rmsnorm_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = group_index(wid, nwg);
    if (r >= P.u0) { return; }
    let c = P.u1;
    let inv = rb_inv[r];
    var s = 0.0;
    for (var j = lid; j < c; j += 64u) { s += rb_gy[r * c + j] * rb_w[j] * (rb_x[r * c + j] * inv); }
    red[lid] = s;
    reduce64(lid, 1u);
    let m = red[0] / f32(c);
    for (var j = lid; j < c; j += 64u) {
        rb_gx[r * c + j] = (rb_gy[r * c + j] * rb_w[j] - rb_x[r * c + j] * inv * m) * inv;
    }
}

// `rmsnorm_backward` with one invocation a row (64 rows a workgroup), no barriers.
@compute @workgroup_size(64)
fn rmsnorm_backward_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = group_index(wid, nwg) * 64u + lid;
    if (r >= P.u0) { return; }
    let c = P.u1;
    let inv = rb_inv[r];
    var s = 0.0;
    for (var j = 0u; j < c; j++) { s += rb_gy[r * c + j] * rb_w[j] * (rb_x[r * c + j] * inv); }
    let m = s / f32(c);
    for (var j = 0u; j < c; j++) {
        rb_gx[r * c + j] = (rb_gy[r * c + j] * rb_w[j] - rb_x[r * c + j] * inv * m) * inv;
    }
}

// RMSNorm backward, ∂w[j] += Σ_r ∂y[r, j]·x[r, j]·inv[r]; one thread a column. u0 rows, u1 C.
@group(0) @binding(0) var<storage, read> rw_x: array<f32>;
@group(0) @binding(1) var<storage, read> rw_inv: array<f32>;
@group(0) @binding(2) var<storage, read> rw_gy: array<f32>;
@group(0) @binding(3) var<storage, read_write> rw_gw: array<f32>;

@compute @workgroup_size(64)
fn rmsnorm_grad_weight(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = group_index(wid, nwg) * 64u + lid;
    let c = P.u1;
    if (j >= c) { return; }
    var g = rw_gw[j];
    for (var r = 0u; r < P.u0; r++) { g += rw_gy[r * c + j] * (rw_x[r * c + j] * rw_inv[r]); }
    rw_gw[j] = g;
}

const GELU_K: f32 = 0.7978845608028654;
const GELU_A: f32 = 0.044715;

// GELU (tanh form) element-wise. u0 elements.
@group(0) @binding(0) var<storage, read> ge_in: array<f32>;
@group(0) @binding(1) var<storage, read_write> ge_out: array<f32>;

@compute @workgroup_size(256)
fn gelu(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    if (g >= P.u0) { return; }
    let u = ge_in[g];
    ge_out[g] = 0.5 * u * (1.0 + safe_tanh(GELU_K * (u + GELU_A * u * u * u)));
}

// ∂pre = ∂act · GELU'(pre). u0 elements.
@group(0) @binding(0) var<storage, read> gb_pre: array<f32>;
@group(0) @binding(1) var<storage, read> gb_gact: array<f32>;
@group(0) @binding(2) var<storage, read_write> gb_gpre: array<f32>;

@compute @workgroup_size(256)
fn gelu_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    if (g >= P.u0) { return; }
    let u = gb_pre[g];
    let t = safe_tanh(GELU_K * (u + GELU_A * u * u * u));
    let d = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_A * u * u);
    gb_gpre[g] = gb_gact[g] * d;
}

// Causal attention forward, one thread per (batch, head, query t): scores,
// softmax into probs [B, H, S, S] (zeros above the diagonal), and o [B·S, C].
// qkv [B·S, 3C] (q | k | v, head h at columns h·d). u0 B, u1 S, u2 H, u3 d, f0 1/√d.
@group(0) @binding(0) var<storage, read> af_qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> af_probs: array<f32>;
@group(0) @binding(2) var<storage, read_write> af_o: array<f32>;

@compute @workgroup_size(64)
fn attention_forward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 64u + lid;
    let s = P.u1;
    let h = P.u2;
    let d = P.u3;
    if (g >= P.u0 * h * s) { return; }
    let t = g % s;
    let hh = (g / s) % h;
    let b = g / (s * h);
    let c = h * d;
    let q = (b * s + t) * 3u * c + hh * d;
    let pb = g * s;
    var mx = -3.0e38;
    for (var u = 0u; u <= t; u++) {
        let kr = (b * s + u) * 3u * c + c + hh * d;
        var qk = 0.0;
        for (var j = 0u; j < d; j++) { qk += af_qkv[q + j] * af_qkv[kr + j]; }
        let sc = qk * P.f0;
        af_probs[pb + u] = sc;
        mx = max(mx, sc);
    }
    var sum = 0.0;
    for (var u = 0u; u <= t; u++) {
        let e = exp(af_probs[pb + u] - mx);
        af_probs[pb + u] = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for (var u = 0u; u <= t; u++) { af_probs[pb + u] = af_probs[pb + u] * inv; }
    for (var u = t + 1u; u < s; u++) { af_probs[pb + u] = 0.0; }
    let o = (b * s + t) * c + hh * d;
    for (var j = 0u; j < d; j++) {
        var acc = 0.0;
        for (var u = 0u; u <= t; u++) {
            acc += af_probs[pb + u] * af_qkv[(b * s + u) * 3u * c + 2u * c + hh * d + j];
        }
        af_o[o + j] = acc;
    }
}

// Attention backward, per query: ∂s = p ⊙ (∂p − Σ p∂p)/√d into ds [B, H, S, S]
// and ∂q = Σ_u ∂s_u k_u into the q part of dqkv. Same block as the forward.
@group(0) @binding(0) var<storage, read> aq_qkv: array<f32>;
@group(0) @binding(1) var<storage, read> aq_probs: array<f32>;
@group(0) @binding(2) var<storage, read> aq_go: array<f32>;
@group(0) @binding(3) var<storage, read_write> aq_ds: array<f32>;
@group(0) @binding(4) var<storage, read_write> aq_dqkv: array<f32>;

@compute @workgroup_size(64)
fn attention_backward_q(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 64u + lid;
    let s = P.u1;
    let h = P.u2;
    let d = P.u3;
    if (g >= P.u0 * h * s) { return; }
    let t = g % s;
    let hh = (g / s) % h;
    let b = g / (s * h);
    let c = h * d;
    let pb = g * s;
    let go = (b * s + t) * c + hh * d;
    var pdp = 0.0;
    for (var u = 0u; u <= t; u++) {
        let vr = (b * s + u) * 3u * c + 2u * c + hh * d;
        var gp = 0.0;
        for (var j = 0u; j < d; j++) { gp += aq_go[go + j] * aq_qkv[vr + j]; }
        aq_ds[pb + u] = gp;
        pdp += aq_probs[pb + u] * gp;
    }
    for (var u = 0u; u <= t; u++) {
        aq_ds[pb + u] = aq_probs[pb + u] * (aq_ds[pb + u] - pdp) * P.f0;
    }
    for (var u = t + 1u; u < s; u++) { aq_ds[pb + u] = 0.0; }
    let qr = (b * s + t) * 3u * c + hh * d;
    for (var j = 0u; j < d; j++) {
        var acc = 0.0;
        for (var u = 0u; u <= t; u++) {
            acc += aq_ds[pb + u] * aq_qkv[(b * s + u) * 3u * c + c + hh * d + j];
        }
        aq_dqkv[qr + j] = acc;
    }
}

// Attention backward, per key u and column j: ∂k = Σ_{t≥u} ∂s[t, u]·q_t and
// ∂v = Σ_{t≥u} p[t, u]·∂o_t into the k and v parts of dqkv.
@group(0) @binding(0) var<storage, read> ak_qkv: array<f32>;
@group(0) @binding(1) var<storage, read> ak_probs: array<f32>;
@group(0) @binding(2) var<storage, read> ak_go: array<f32>;
@group(0) @binding(3) var<storage, read> ak_ds: array<f32>;
@group(0) @binding(4) var<storage, read_write> ak_dqkv: array<f32>;

@compute @workgroup_size(64)
fn attention_backward_kv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 64u + lid;
    let s = P.u1;
    let h = P.u2;
    let d = P.u3;
    if (g >= P.u0 * h * s * d) { return; }
    let j = g % d;
    let u = (g / d) % s;
    let hh = (g / (d * s)) % h;
    let b = g / (d * s * h);
    let c = h * d;
    let bh = (b * h + hh) * s;
    var dk = 0.0;
    var dv = 0.0;
    for (var t = u; t < s; t++) {
        let at = (bh + t) * s + u;
        dk += ak_ds[at] * ak_qkv[(b * s + t) * 3u * c + hh * d + j];
        dv += ak_probs[at] * ak_go[(b * s + t) * c + hh * d + j];
    }
    let kr = (b * s + u) * 3u * c + c + hh * d + j;
    ak_dqkv[kr] = dk;
    ak_dqkv[kr + c] = dv;
}

// Softmax cross-entropy per row: loss[r] = log Σ exp(l − max) − (l_t − max);
// logits are overwritten with ∂(mean loss)/∂logits = (softmax − onehot)·f0.
// u0 rows, u1 vocab, f0 1/rows; one workgroup a row.
@group(0) @binding(0) var<storage, read_write> ce_logits: array<f32>;
@group(0) @binding(1) var<storage, read> ce_targets: array<u32>;
@group(0) @binding(2) var<storage, read_write> ce_loss: array<f32>;

@compute @workgroup_size(64)
fn cross_entropy(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = group_index(wid, nwg);
    if (r >= P.u0) { return; }
    let v = P.u1;
    let base = r * v;
    var mx = -3.0e38;
    for (var j = lid; j < v; j += 64u) { mx = max(mx, ce_logits[base + j]); }
    red[lid] = mx;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) { red[lid] = max(red[lid], red[lid + stride]); }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var j = lid; j < v; j += 64u) { s += exp(ce_logits[base + j] - m); }
    red[lid] = s;
    reduce64(lid, 1u);
    let sum = red[0];
    let tgt = ce_targets[r];
    if (lid == 0u) { ce_loss[r] = log(sum) - (ce_logits[base + tgt] - m); }
    workgroupBarrier();
    let inv = 1.0 / sum;
    for (var j = lid; j < v; j += 64u) {
        var gv = exp(ce_logits[base + j] - m) * inv * P.f0;
        if (j == tgt) { gv = gv - P.f0; }
        ce_logits[base + j] = gv;
    }
}

// `cross_entropy` with one invocation a row (64 rows a workgroup), no barriers.
@compute @workgroup_size(64)
fn cross_entropy_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = group_index(wid, nwg) * 64u + lid;
    if (r >= P.u0) { return; }
    let v = P.u1;
    let base = r * v;
    var m = -3.0e38;
    for (var j = 0u; j < v; j++) { m = max(m, ce_logits[base + j]); }
    var sum = 0.0;
    for (var j = 0u; j < v; j++) { sum += exp(ce_logits[base + j] - m); }
    let tgt = ce_targets[r];
    ce_loss[r] = log(sum) - (ce_logits[base + tgt] - m);
    let inv = 1.0 / sum;
    for (var j = 0u; j < v; j++) {
        var gv = exp(ce_logits[base + j] - m) * inv * P.f0;
        if (j == tgt) { gv = gv - P.f0; }
        ce_logits[base + j] = gv;
    }
}

// x0[t, s, c] = E[tok_t, c] + P[t mod S, c] for every stream s. u0 rows, u1 S, u2 n, u3 C.
@group(0) @binding(0) var<storage, read> em_tokens: array<u32>;
@group(0) @binding(1) var<storage, read> em_tok: array<f32>;
@group(0) @binding(2) var<storage, read> em_pos: array<f32>;
@group(0) @binding(3) var<storage, read_write> em_x: array<f32>;

@compute @workgroup_size(256)
fn embed(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    let c = P.u3;
    let n = P.u2;
    if (g >= P.u0 * c) { return; }
    let t = g / c;
    let cc = g % c;
    let v = em_tok[em_tokens[t] * c + cc] + em_pos[(t % P.u1) * c + cc];
    for (var s = 0u; s < n; s++) { em_x[(t * n + s) * c + cc] = v; }
}

// ∂E[v, c] += Σ over the rows t holding token v (a CSR list made on the host,
// rows ascending) and streams s of grad[t, s, c]. u0 vocab, u2 n, u3 C.
@group(0) @binding(0) var<storage, read> et_offsets: array<u32>;
@group(0) @binding(1) var<storage, read> et_rows: array<u32>;
@group(0) @binding(2) var<storage, read> et_grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> et_ge: array<f32>;

@compute @workgroup_size(256)
fn embed_backward_tokens(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    let c = P.u3;
    let n = P.u2;
    if (g >= P.u0 * c) { return; }
    let v = g / c;
    let cc = g % c;
    var e = et_ge[g];
    for (var i = et_offsets[v]; i < et_offsets[v + 1u]; i++) {
        let t = et_rows[i];
        for (var s = 0u; s < n; s++) { e += et_grad[(t * n + s) * c + cc]; }
    }
    et_ge[g] = e;
}

// ∂P[p, c] += Σ_b Σ_s grad[(b·S + p), s, c]. u0 batch, u1 S, u2 n, u3 C.
@group(0) @binding(0) var<storage, read> ep_grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> ep_gp: array<f32>;

@compute @workgroup_size(256)
fn embed_backward_positions(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    let c = P.u3;
    let n = P.u2;
    let s = P.u1;
    if (g >= s * c) { return; }
    let p = g / c;
    let cc = g % c;
    var e = ep_gp[g];
    for (var b = 0u; b < P.u0; b++) {
        for (var k = 0u; k < n; k++) { e += ep_grad[((b * s + p) * n + k) * c + cc]; }
    }
    ep_gp[g] = e;
}

// out[t, c] = (Σ_s x[t, s, c])·f0 with f0 = 1/n. u0 rows, u2 n, u3 C.
@group(0) @binding(0) var<storage, read> sm_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> sm_out: array<f32>;

@compute @workgroup_size(256)
fn streams_mean(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    let c = P.u3;
    let n = P.u2;
    if (g >= P.u0 * c) { return; }
    let t = g / c;
    let cc = g % c;
    var r = sm_x[t * n * c + cc];
    for (var s = 1u; s < n; s++) { r += sm_x[(t * n + s) * c + cc]; }
    sm_out[g] = r * P.f0;
}

// Backward of the mean: g[t, s, c] = d[t, c]·f0. u0 rows, u2 n, u3 C.
@group(0) @binding(0) var<storage, read> sb_d: array<f32>;
@group(0) @binding(1) var<storage, read_write> sb_g: array<f32>;

@compute @workgroup_size(256)
fn streams_mean_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    let c = P.u3;
    let n = P.u2;
    if (g >= P.u0 * n * c) { return; }
    let t = g / (n * c);
    let cc = g % c;
    sb_g[g] = sb_d[t * c + cc] * P.f0;
}

// AdamW (mhc-core's optim::AdamW::update) on u0 elements, gradient scaled by
// bitcast<f32>(u1) (clipping): f0 β1, f1 β2, f2 1−β1, f3 1−β2, f4 lr/bc1,
// f5 1/bc2, f6 ε, f7 decay shrink.
@group(0) @binding(0) var<storage, read_write> ad_w: array<f32>;
@group(0) @binding(1) var<storage, read> ad_g: array<f32>;
@group(0) @binding(2) var<storage, read_write> ad_m: array<f32>;
@group(0) @binding(3) var<storage, read_write> ad_v: array<f32>;

@compute @workgroup_size(256)
fn adamw(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= P.u0) { return; }
    let g = ad_g[i] * bitcast<f32>(P.u1);
    let m = P.f0 * ad_m[i] + P.f2 * g;
    let v = P.f1 * ad_v[i] + P.f3 * g * g;
    ad_m[i] = m;
    ad_v[i] = v;
    ad_w[i] = ad_w[i] * P.f7 - P.f4 * m / (sqrt(v * P.f5) + P.f6);
}

// Partial sums of squares: partials[u1 + w] = Σ x² over elements [1024w, 1024(w+1)) of u0.
@group(0) @binding(0) var<storage, read> sq_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> sq_partials: array<f32>;

@compute @workgroup_size(64)
fn sum_squares(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = group_index(wid, nwg);
    if (w * 1024u >= P.u0) { return; }
    var s = 0.0;
    for (var q = 0u; q < 16u; q++) {
        let i = w * 1024u + q * 64u + lid;
        if (i < P.u0) { let v = sq_x[i]; s += v * v; }
    }
    red[lid] = s;
    reduce64(lid, 1u);
    if (lid == 0u) { sq_partials[P.u1 + w] = red[0]; }
}
