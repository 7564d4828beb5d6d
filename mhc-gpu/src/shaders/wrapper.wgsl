// The mHC wrapper x' = H_res·x + H_postᵀ·F(H_pre·x) (paper Eq. 3), its
// coefficients (HC Eq. 5, mHC Eqs. 7–9), Sinkhorn–Knopp and every backward.
// f32 throughout; n ≤ 8 (K = n² + 2n ≤ 80). Layouts as in mhc-core:
// x [T, n, C], coefficients [T, K] rows [H_pre | H_post | H_res (n×n)].
//
// Connection parameters live in one packed buffer `prm`, tensors back to
// back in mhc-core's order; the offsets come in the parameter block:
//   u6 alpha, u7 b_pre (b_post = u7 + n, b_res = u7 + 2n), u8 phi,
//   u9 gamma, u10 theta_pre, u11 theta_post, u12 theta_res.
// Common block fields: u0 tokens, u1 n, u2 C, u3 K, u4 scheme
// (0 residual, 1 HC static, 2 HC dynamic, 3 mHC static, 4 mHC dynamic),
// u5 Sinkhorn iterations, f0 rms eps, f1 Sinkhorn eps.

const MAX_DEN: u32 = 512u; // 2·iterations·n normalisation sums kept by the SK backward

// ---------------------------------------------------------------- Sinkhorn–Knopp

// m ← exp(m − colmax(m)) in place (the column shift cancels in the first
// column normalisation and only keeps exp finite).
fn sk_exp_shifted(m: ptr<function, array<f32, 64>>, n: u32) {
    for (var i = 0u; i < n; i++) {
        var mx = (*m)[i];
        for (var o = 1u; o < n; o++) {
            mx = max(mx, (*m)[o * n + i]);
        }
        for (var o = 0u; o < n; o++) {
            (*m)[o * n + i] = exp((*m)[o * n + i] - mx);
        }
    }
}

// m ← SK(m): exp-shift, then `iters` times columns then rows to sum 1,
// denominators clamped below by eps (as mhc-core's sinkhorn module).
fn sk_forward(m: ptr<function, array<f32, 64>>, n: u32, iters: u32, eps: f32) {
    sk_exp_shifted(m, n);
    for (var it = 0u; it < iters; it++) {
        for (var i = 0u; i < n; i++) {
            var s = 0.0;
            for (var o = 0u; o < n; o++) { s += (*m)[o * n + i]; }
            let d = max(s, eps);
            for (var o = 0u; o < n; o++) { (*m)[o * n + i] = (*m)[o * n + i] / d; }
        }
        for (var o = 0u; o < n; o++) {
            var s = 0.0;
            for (var i = 0u; i < n; i++) { s += (*m)[o * n + i]; }
            let d = max(s, eps);
            for (var i = 0u; i < n; i++) { (*m)[o * n + i] = (*m)[o * n + i] / d; }
        }
    }
}

// On entry g = ∂L/∂SK(l), on exit ∂L/∂l: exact reverse mode through the
// truncated iteration. The forward is recomputed keeping only each step's
// raw sums; going back, each step's input is its output times its
// denominator, so no iterate is stored.
fn sk_backward(l: ptr<function, array<f32, 64>>, g: ptr<function, array<f32, 64>>, n: u32, iters: u32, eps: f32) {
    var m = *l;
    sk_exp_shifted(&m, n);
    let m0 = m;
    var den: array<f32, MAX_DEN>;
    for (var it = 0u; it < iters; it++) {
        let kc = 2u * it;
        for (var i = 0u; i < n; i++) {
            var s = 0.0;
            for (var o = 0u; o < n; o++) { s += m[o * n + i]; }
            den[kc * n + i] = s;
            let d = max(s, eps);
            for (var o = 0u; o < n; o++) { m[o * n + i] = m[o * n + i] / d; }
        }
        for (var o = 0u; o < n; o++) {
            var s = 0.0;
            for (var i = 0u; i < n; i++) { s += m[o * n + i]; }
            den[(kc + 1u) * n + o] = s;
            let d = max(s, eps);
            for (var i = 0u; i < n; i++) { m[o * n + i] = m[o * n + i] / d; }
        }
    }
    // Reverse sweep: y = m/max(s, eps) ⇒ ∂m = (∂y − [s > eps]·Σ ∂y·y) / max(s, eps).
    for (var k = 2u * iters; k > 0u; k--) {
        let step = k - 1u;
        if (step % 2u == 1u) {
            for (var o = 0u; o < n; o++) {
                let s = den[step * n + o];
                let d = max(s, eps);
                var gy = 0.0;
                for (var i = 0u; i < n; i++) { gy += (*g)[o * n + i] * m[o * n + i]; }
                let on = select(0.0, 1.0, s > eps);
                for (var i = 0u; i < n; i++) {
                    (*g)[o * n + i] = ((*g)[o * n + i] - on * gy) / d;
                    m[o * n + i] = m[o * n + i] * d;
                }
            }
        } else {
            for (var i = 0u; i < n; i++) {
                let s = den[step * n + i];
                let d = max(s, eps);
                var gy = 0.0;
                for (var o = 0u; o < n; o++) { gy += (*g)[o * n + i] * m[o * n + i]; }
                let on = select(0.0, 1.0, s > eps);
                for (var o = 0u; o < n; o++) {
                    (*g)[o * n + i] = ((*g)[o * n + i] - on * gy) / d;
                    m[o * n + i] = m[o * n + i] * d;
                }
            }
        }
    }
    for (var j = 0u; j < n * n; j++) {
        (*g)[j] = (*g)[j] * m0[j];
    }
}

// Batched SK forward: u0 matrices, u1 n, u5 iterations, f1 eps. One thread a matrix.
@group(0) @binding(0) var<storage, read> skf_logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> skf_out: array<f32>;

@compute @workgroup_size(64)
fn sinkhorn_forward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let b = group_index(wid, nwg) * 64u + lid;
    if (b >= P.u0) { return; }
    let n = P.u1;
    let nn = n * n;
    var m: array<f32, 64>;
    for (var j = 0u; j < nn; j++) { m[j] = skf_logits[b * nn + j]; }
    sk_forward(&m, n, P.u5, P.f1);
    for (var j = 0u; j < nn; j++) { skf_out[b * nn + j] = m[j]; }
}

// Batched SK backward: logits, grad of the output → grad of the logits.
@group(0) @binding(0) var<storage, read> skb_logits: array<f32>;
@group(0) @binding(1) var<storage, read> skb_grad_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> skb_grad_logits: array<f32>;

@compute @workgroup_size(64)
fn sinkhorn_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let b = group_index(wid, nwg) * 64u + lid;
    if (b >= P.u0) { return; }
    let n = P.u1;
    let nn = n * n;
    var l: array<f32, 64>;
    var g: array<f32, 64>;
    for (var j = 0u; j < nn; j++) {
        l[j] = skb_logits[b * nn + j];
        g[j] = skb_grad_out[b * nn + j];
    }
    sk_backward(&l, &g, n, P.u5, P.f1);
    for (var j = 0u; j < nn; j++) { skb_grad_logits[b * nn + j] = g[j]; }
}

// ---------------------------------------------------------------- coefficients

// mHC projection, one workgroup a token: proj[t, j] = Σ_m x[t,m]·γ[m]·φ[m, j]
// (φ row-major [nC, K]) and norms[t·n] = r = √(‖x_t‖²/(nC) + eps).
@group(0) @binding(0) var<storage, read> mp_x: array<f32>;
@group(0) @binding(1) var<storage, read> mp_prm: array<f32>;
@group(0) @binding(2) var<storage, read_write> mp_proj: array<f32>;
@group(0) @binding(3) var<storage, read_write> mp_norms: array<f32>;

@compute @workgroup_size(64)
fn mhc_project(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg);
    if (t >= P.u0) { return; }
    let n = P.u1;
    let k = P.u3;
    let nc = n * P.u2;
    let base = t * nc;
    for (var j0 = 0u; j0 < k; j0 += 8u) {
        var acc: array<f32, 8>;
        var ss = 0.0;
        for (var m = lid; m < nc; m += 64u) {
            let xv = mp_x[base + m];
            let vg = xv * mp_prm[P.u9 + m];
            let row = P.u8 + m * k + j0;
            for (var q = 0u; q < 8u; q++) {
                if (j0 + q < k) { acc[q] += vg * mp_prm[row + q]; }
            }
            ss += xv * xv;
        }
        for (var q = 0u; q < 8u; q++) { red[q * 64u + lid] = acc[q]; }
        red[512u + lid] = ss;
        reduce64(lid, 9u);
        if (lid < 8u && j0 + lid < k) { mp_proj[t * k + j0 + lid] = red[lid * 64u]; }
        if (lid == 0u && j0 == 0u) { mp_norms[t * n] = sqrt(red[512u] / f32(nc) + P.f0); }
        workgroupBarrier();
    }
}

// `mhc_project` with one invocation a token (64 tokens a workgroup), no
// barriers; columns in blocks of 8 (two vec4 accumulators, φ indices past
// K clamped and their sums dropped), so x and γ are loaded once a block.
@compute @workgroup_size(64)
fn mhc_project_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg) * 64u + lid;
    if (t >= P.u0) { return; }
    let n = P.u1;
    let k = P.u3;
    let nc = n * P.u2;
    let base = t * nc;
    var ss = 0.0;
    for (var m = 0u; m < nc; m++) { let xv = mp_x[base + m]; ss += xv * xv; }
    mp_norms[t * n] = sqrt(ss / f32(nc) + P.f0);
    for (var j0 = 0u; j0 < k; j0 += 8u) {
        let lo = min(vec4<u32>(j0, j0 + 1u, j0 + 2u, j0 + 3u), vec4<u32>(k - 1u));
        let hi = min(vec4<u32>(j0 + 4u, j0 + 5u, j0 + 6u, j0 + 7u), vec4<u32>(k - 1u));
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        for (var m = 0u; m < nc; m++) {
            let vg = mp_x[base + m] * mp_prm[P.u9 + m];
            let row = P.u8 + m * k;
            a += vg * vec4<f32>(mp_prm[row + lo.x], mp_prm[row + lo.y], mp_prm[row + lo.z], mp_prm[row + lo.w]);
            b += vg * vec4<f32>(mp_prm[row + hi.x], mp_prm[row + hi.y], mp_prm[row + hi.z], mp_prm[row + hi.w]);
        }
        for (var q = 0u; q < 4u; q++) {
            if (j0 + q < k) { mp_proj[t * k + j0 + q] = a[q]; }
            if (j0 + 4u + q < k) { mp_proj[t * k + j0 + 4u + q] = b[q]; }
        }
    }
}

// Stream i and weight offset of HC projection column j.
fn hc_column(j: u32, n: u32, c: u32) -> vec2<u32> {
    if (j < n) { return vec2<u32>(j, P.u10); }
    if (j < 2u * n) { return vec2<u32>(j - n, P.u11); }
    let r = j - 2u * n;
    return vec2<u32>(r % n, P.u12 + (r / n) * c);
}

var<workgroup> hc_rms: array<f32, 8>;

// HC projection, one workgroup a token: norms[t, i] = √(mean_c x_i² + eps)
// and proj[t, j] = tanh(θ_j · x_i / rms_i) for column j's stream i and
// weight θ_j (θ_pre, θ_post or row o of θ_res).
@group(0) @binding(0) var<storage, read> hp_x: array<f32>;
@group(0) @binding(1) var<storage, read> hp_prm: array<f32>;
@group(0) @binding(2) var<storage, read_write> hp_proj: array<f32>;
@group(0) @binding(3) var<storage, read_write> hp_norms: array<f32>;

@compute @workgroup_size(64)
fn hc_project(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg);
    if (t >= P.u0) { return; }
    let n = P.u1;
    let c = P.u2;
    let k = P.u3;
    let base = t * n * c;
    {
        var acc: array<f32, 8>;
        for (var cc = lid; cc < c; cc += 64u) {
            for (var i = 0u; i < n; i++) {
                let xv = hp_x[base + i * c + cc];
                acc[i] += xv * xv;
            }
        }
        for (var q = 0u; q < 8u; q++) { red[q * 64u + lid] = acc[q]; }
        reduce64(lid, 8u);
        if (lid < n) {
            let rms = sqrt(red[lid * 64u] / f32(c) + P.f0);
            hc_rms[lid] = rms;
            hp_norms[t * n + lid] = rms;
        }
        workgroupBarrier();
    }
    for (var j0 = 0u; j0 < k; j0 += 8u) {
        var acc: array<f32, 8>;
        for (var cc = lid; cc < c; cc += 64u) {
            for (var q = 0u; q < 8u; q++) {
                if (j0 + q < k) {
                    let col = hc_column(j0 + q, n, c);
                    acc[q] += hp_prm[col.y + cc] * hp_x[base + col.x * c + cc];
                }
            }
        }
        for (var q = 0u; q < 8u; q++) { red[q * 64u + lid] = acc[q]; }
        reduce64(lid, 8u);
        if (lid < 8u && j0 + lid < k) {
            let col = hc_column(j0 + lid, n, c);
            hp_proj[t * k + j0 + lid] = safe_tanh(red[lid * 64u] * (1.0 / hc_rms[col.x]));
        }
        workgroupBarrier();
    }
}

// `hc_project` with one invocation a token (64 tokens a workgroup), no barriers.
@compute @workgroup_size(64)
fn hc_project_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg) * 64u + lid;
    if (t >= P.u0) { return; }
    let n = P.u1;
    let c = P.u2;
    let k = P.u3;
    let base = t * n * c;
    var rms: array<f32, 8>;
    for (var i = 0u; i < n; i++) {
        var ss = 0.0;
        for (var cc = 0u; cc < c; cc++) { let xv = hp_x[base + i * c + cc]; ss += xv * xv; }
        rms[i] = sqrt(ss / f32(c) + P.f0);
        hp_norms[t * n + i] = rms[i];
    }
    for (var j = 0u; j < k; j++) {
        let col = hc_column(j, n, c);
        var acc = 0.0;
        for (var cc = 0u; cc < c; cc++) { acc += hp_prm[col.y + cc] * hp_x[base + col.x * c + cc]; }
        hp_proj[t * k + j] = safe_tanh(acc * (1.0 / rms[col.x]));
    }
}

fn sigmoid(z: f32) -> f32 {
    return 1.0 / (1.0 + exp(-z));
}

// Coefficients from the projection, one thread a token (scheme in u4):
// residual 1; HC static b; HC dynamic α·proj + b; mHC σ / 2σ / SK of
// α·p/r + b (α = 0 for static). mHC also keeps the SK logits [T, n²].
@group(0) @binding(0) var<storage, read> cf_proj: array<f32>;
@group(0) @binding(1) var<storage, read> cf_norms: array<f32>;
@group(0) @binding(2) var<storage, read> cf_prm: array<f32>;
@group(0) @binding(3) var<storage, read_write> cf_coef: array<f32>;
@group(0) @binding(4) var<storage, read_write> cf_logits: array<f32>;

@compute @workgroup_size(64)
fn coefficients(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg) * 64u + lid;
    if (t >= P.u0) { return; }
    let n = P.u1;
    let k = P.u3;
    let nn = n * n;
    let mode = P.u4;
    let b = P.u7;
    let row = t * k;
    if (mode == 0u) {
        for (var j = 0u; j < k; j++) { cf_coef[row + j] = 1.0; }
        return;
    }
    if (mode == 1u) {
        for (var j = 0u; j < k; j++) { cf_coef[row + j] = cf_prm[b + j]; }
        return;
    }
    if (mode == 2u) {
        for (var j = 0u; j < k; j++) {
            let blk = select(select(2u, 1u, j < 2u * n), 0u, j < n);
            cf_coef[row + j] = cf_prm[P.u6 + blk] * cf_proj[row + j] + cf_prm[b + j];
        }
        return;
    }
    var s = vec3<f32>(0.0);
    let dynamic = mode == 4u;
    if (dynamic) {
        let r = cf_norms[t * n];
        s = vec3<f32>(cf_prm[P.u6] / r, cf_prm[P.u6 + 1u] / r, cf_prm[P.u6 + 2u] / r);
    }
    for (var i = 0u; i < n; i++) {
        let p0 = select(0.0, cf_proj[row + i], dynamic);
        let p1 = select(0.0, cf_proj[row + n + i], dynamic);
        cf_coef[row + i] = sigmoid(s.x * p0 + cf_prm[b + i]);
        cf_coef[row + n + i] = 2.0 * sigmoid(s.y * p1 + cf_prm[b + n + i]);
    }
    var m: array<f32, 64>;
    for (var j = 0u; j < nn; j++) {
        let p = select(0.0, cf_proj[row + 2u * n + j], dynamic);
        m[j] = s.z * p + cf_prm[b + 2u * n + j];
        cf_logits[t * nn + j] = m[j];
    }
    sk_forward(&m, n, P.u5, P.f1);
    for (var j = 0u; j < nn; j++) { cf_coef[row + 2u * n + j] = m[j]; }
}

// ---------------------------------------------------------------- apply

// h[t, c] = Σ_i H_pre[t, i]·x[t, i, c], one thread an element (n = 1, H_pre = 1 gives x exactly).
@group(0) @binding(0) var<storage, read> pa_x: array<f32>;
@group(0) @binding(1) var<storage, read> pa_coef: array<f32>;
@group(0) @binding(2) var<storage, read_write> pa_h: array<f32>;

@compute @workgroup_size(256)
fn pre_aggregate(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    let n = P.u1;
    let c = P.u2;
    if (g >= P.u0 * c) { return; }
    let t = g / c;
    let cc = g % c;
    let base = t * n * c + cc;
    let row = t * P.u3;
    var h = pa_coef[row] * pa_x[base];
    for (var i = 1u; i < n; i++) { h += pa_coef[row + i] * pa_x[base + i * c]; }
    pa_h[g] = h;
}

// out[t, o, c] = Σ_i H_res[t, o, i]·x[t, i, c] + H_post[t, o]·y[t, c], one thread per (t, c).
@group(0) @binding(0) var<storage, read> pm_x: array<f32>;
@group(0) @binding(1) var<storage, read> pm_coef: array<f32>;
@group(0) @binding(2) var<storage, read> pm_y: array<f32>;
@group(0) @binding(3) var<storage, read_write> pm_out: array<f32>;

@compute @workgroup_size(256)
fn post_res_merge(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    let n = P.u1;
    let c = P.u2;
    if (g >= P.u0 * c) { return; }
    let t = g / c;
    let cc = g % c;
    let base = t * n * c + cc;
    let row = t * P.u3;
    var xs: array<f32, 8>;
    for (var i = 0u; i < n; i++) { xs[i] = pm_x[base + i * c]; }
    let y = pm_y[g];
    for (var o = 0u; o < n; o++) {
        let res = row + 2u * n + o * n;
        var acc = pm_coef[res] * xs[0];
        for (var i = 1u; i < n; i++) { acc += pm_coef[res + i] * xs[i]; }
        pm_out[base + o * c] = acc + pm_coef[row + n + o] * y;
    }
}

// Backward of the post/res merge, one workgroup a token: gx = H_resᵀ·g
// (overwritten), gy = Σ_o H_post[o]·g_o, and the H_post / H_res parts of
// gc: g_o·y and g_o·x_i.
@group(0) @binding(0) var<storage, read> pb_x: array<f32>;
@group(0) @binding(1) var<storage, read> pb_coef: array<f32>;
@group(0) @binding(2) var<storage, read> pb_y: array<f32>;
@group(0) @binding(3) var<storage, read> pb_gout: array<f32>;
@group(0) @binding(4) var<storage, read_write> pb_gx: array<f32>;
@group(0) @binding(5) var<storage, read_write> pb_gy: array<f32>;
@group(0) @binding(6) var<storage, read_write> pb_gc: array<f32>;

@compute @workgroup_size(64)
fn post_res_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg);
    if (t >= P.u0) { return; }
    let n = P.u1;
    let c = P.u2;
    let row = t * P.u3;
    let base = t * n * c;
    var acc: array<f32, 72>;
    for (var cc = lid; cc < c; cc += 64u) {
        let y = pb_y[t * c + cc];
        var xs: array<f32, 8>;
        var gs: array<f32, 8>;
        for (var i = 0u; i < n; i++) {
            xs[i] = pb_x[base + i * c + cc];
            gs[i] = pb_gout[base + i * c + cc];
        }
        var gy = 0.0;
        for (var o = 0u; o < n; o++) {
            gy += pb_coef[row + n + o] * gs[o];
            acc[o] += gs[o] * y;
            for (var i = 0u; i < n; i++) { acc[n + o * n + i] += gs[o] * xs[i]; }
        }
        pb_gy[t * c + cc] = gy;
        for (var i = 0u; i < n; i++) {
            var gx = 0.0;
            for (var o = 0u; o < n; o++) { gx += pb_coef[row + 2u * n + o * n + i] * gs[o]; }
            pb_gx[base + i * c + cc] = gx;
        }
    }
    let count = n + n * n;
    for (var j0 = 0u; j0 < count; j0 += 8u) {
        for (var q = 0u; q < 8u; q++) { red[q * 64u + lid] = select(0.0, acc[min(j0 + q, 71u)], j0 + q < count); }
        reduce64(lid, 8u);
        if (lid < 8u && j0 + lid < count) { pb_gc[row + n + j0 + lid] = red[lid * 64u]; }
        workgroupBarrier();
    }
}

// `post_res_backward` with one invocation a token (64 tokens a workgroup), no barriers.
@compute @workgroup_size(64)
fn post_res_backward_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg) * 64u + lid;
    if (t >= P.u0) { return; }
    let n = P.u1;
    let c = P.u2;
    let row = t * P.u3;
    let base = t * n * c;
    var acc: array<f32, 72>;
    for (var cc = 0u; cc < c; cc++) {
        let y = pb_y[t * c + cc];
        var xs: array<f32, 8>;
        var gs: array<f32, 8>;
        for (var i = 0u; i < n; i++) {
            xs[i] = pb_x[base + i * c + cc];
            gs[i] = pb_gout[base + i * c + cc];
        }
        var gy = 0.0;
        for (var o = 0u; o < n; o++) {
            gy += pb_coef[row + n + o] * gs[o];
            acc[o] += gs[o] * y;
            for (var i = 0u; i < n; i++) { acc[n + o * n + i] += gs[o] * xs[i]; }
        }
        pb_gy[t * c + cc] = gy;
        for (var i = 0u; i < n; i++) {
            var gx = 0.0;
            for (var o = 0u; o < n; o++) { gx += pb_coef[row + 2u * n + o * n + i] * gs[o]; }
            pb_gx[base + i * c + cc] = gx;
        }
    }
    for (var j = 0u; j < n + n * n; j++) { pb_gc[row + n + j] = acc[j]; }
}

// Backward of the pre-aggregate, one workgroup a token: gx += H_pre[i]·gh
// and the H_pre part of gc: gh·x_i.
@group(0) @binding(0) var<storage, read> qb_x: array<f32>;
@group(0) @binding(1) var<storage, read> qb_coef: array<f32>;
@group(0) @binding(2) var<storage, read> qb_gh: array<f32>;
@group(0) @binding(3) var<storage, read_write> qb_gx: array<f32>;
@group(0) @binding(4) var<storage, read_write> qb_gc: array<f32>;

@compute @workgroup_size(64)
fn pre_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg);
    if (t >= P.u0) { return; }
    let n = P.u1;
    let c = P.u2;
    let row = t * P.u3;
    let base = t * n * c;
    var acc: array<f32, 8>;
    for (var cc = lid; cc < c; cc += 64u) {
        let gh = qb_gh[t * c + cc];
        for (var i = 0u; i < n; i++) {
            let at = base + i * c + cc;
            acc[i] += gh * qb_x[at];
            qb_gx[at] = qb_gx[at] + qb_coef[row + i] * gh;
        }
    }
    for (var q = 0u; q < 8u; q++) { red[q * 64u + lid] = acc[q]; }
    reduce64(lid, 8u);
    if (lid < n) { qb_gc[row + lid] = red[lid * 64u]; }
}

// `pre_backward` with one invocation a token (64 tokens a workgroup), no barriers.
@compute @workgroup_size(64)
fn pre_backward_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg) * 64u + lid;
    if (t >= P.u0) { return; }
    let n = P.u1;
    let c = P.u2;
    let row = t * P.u3;
    let base = t * n * c;
    var acc: array<f32, 8>;
    for (var cc = 0u; cc < c; cc++) {
        let gh = qb_gh[t * c + cc];
        for (var i = 0u; i < n; i++) {
            let at = base + i * c + cc;
            acc[i] += gh * qb_x[at];
            qb_gx[at] = qb_gx[at] + qb_coef[row + i] * gh;
        }
    }
    for (var i = 0u; i < n; i++) { qb_gc[row + i] = acc[i]; }
}

// Backward of the coefficients, one thread a token. Row t of `tok`
// ([T, 2K + 4]) receives: [0, K) ∂L/∂b (per token), [K, 2K) the gradient
// of the projection (mHC: α/r·∂H̃; HC: α·g·(1 − z²)), [2K, 2K + 3) the
// α gradients, 2K + 3 the factor of x in ∂r (mHC dynamic).
@group(0) @binding(0) var<storage, read> cb_gc: array<f32>;
@group(0) @binding(1) var<storage, read> cb_coef: array<f32>;
@group(0) @binding(2) var<storage, read> cb_logits: array<f32>;
@group(0) @binding(3) var<storage, read> cb_proj: array<f32>;
@group(0) @binding(4) var<storage, read> cb_norms: array<f32>;
@group(0) @binding(5) var<storage, read> cb_prm: array<f32>;
@group(0) @binding(6) var<storage, read_write> cb_tok: array<f32>;

@compute @workgroup_size(64)
fn coefficients_backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = group_index(wid, nwg) * 64u + lid;
    if (t >= P.u0) { return; }
    let n = P.u1;
    let k = P.u3;
    let nn = n * n;
    let mode = P.u4;
    let row = t * k;
    let out = t * (2u * k + 4u);
    for (var j = k; j < 2u * k + 4u; j++) { cb_tok[out + j] = 0.0; }
    if (mode == 1u || mode == 2u) {
        var ga = vec3<f32>(0.0);
        for (var j = 0u; j < k; j++) {
            let g = cb_gc[row + j];
            cb_tok[out + j] = g;
            if (mode == 2u) {
                let blk = select(select(2u, 1u, j < 2u * n), 0u, j < n);
                let z = cb_proj[row + j];
                ga[blk] += g * z;
                cb_tok[out + k + j] = cb_prm[P.u6 + blk] * g * (1.0 - z * z);
            }
        }
        cb_tok[out + 2u * k] = ga.x;
        cb_tok[out + 2u * k + 1u] = ga.y;
        cb_tok[out + 2u * k + 2u] = ga.z;
        return;
    }
    if (mode != 3u && mode != 4u) { return; }
    var dz: array<f32, 80>;
    for (var i = 0u; i < n; i++) {
        let sp = cb_coef[row + i];
        dz[i] = cb_gc[row + i] * sp * (1.0 - sp);
        let sq = cb_coef[row + n + i] / 2.0;
        dz[n + i] = cb_gc[row + n + i] * 2.0 * sq * (1.0 - sq);
    }
    var l: array<f32, 64>;
    var g: array<f32, 64>;
    for (var j = 0u; j < nn; j++) {
        l[j] = cb_logits[t * nn + j];
        g[j] = cb_gc[row + 2u * n + j];
    }
    sk_backward(&l, &g, n, P.u5, P.f1);
    for (var j = 0u; j < nn; j++) { dz[2u * n + j] = g[j]; }
    for (var j = 0u; j < k; j++) { cb_tok[out + j] = dz[j]; }
    if (mode == 4u) {
        let r = cb_norms[t * n];
        var gr = 0.0;
        for (var blk = 0u; blk < 3u; blk++) {
            let lo = select(select(2u * n, n, blk == 1u), 0u, blk == 0u);
            let hi = select(select(k, 2u * n, blk == 1u), n, blk == 0u);
            var ga = 0.0;
            for (var j = lo; j < hi; j++) { ga += dz[j] * cb_proj[row + j]; }
            let s = cb_prm[P.u6 + blk] / r;
            cb_tok[out + 2u * k + blk] = ga / r;
            gr = gr - s * ga / r;
            for (var j = lo; j < hi; j++) { cb_tok[out + k + j] = dz[j] * s; }
        }
        let nc = n * P.u2;
        cb_tok[out + 2u * k + 3u] = gr / (f32(nc) * r);
    }
}

// dst[u4 + j] += Σ_r src[r·u2 + u3 + j] for j < u1 columns over u0 rows; one workgroup a column.
@group(0) @binding(0) var<storage, read> cs_src: array<f32>;
@group(0) @binding(1) var<storage, read_write> cs_dst: array<f32>;

@compute @workgroup_size(64)
fn column_sum(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = group_index(wid, nwg);
    if (j >= P.u1) { return; }
    var s = 0.0;
    for (var r = lid; r < P.u0; r += 64u) { s += cs_src[r * P.u2 + P.u3 + j]; }
    red[lid] = s;
    reduce64(lid, 1u);
    if (lid == 0u) { cs_dst[P.u4 + j] = cs_dst[P.u4 + j] + red[0]; }
}

// `column_sum` with one invocation a column (64 columns a workgroup), no barriers.
@compute @workgroup_size(64)
fn column_sum_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = group_index(wid, nwg) * 64u + lid;
    if (j >= P.u1) { return; }
    var s = 0.0;
    for (var r = 0u; r < P.u0; r++) { s += cs_src[r * P.u2 + P.u3 + j]; }
    cs_dst[P.u4 + j] = cs_dst[P.u4 + j] + s;
}

// mHC dynamic, ∂x: gx[t, m] += γ[m]·(φ[m, :]·∂p_t) + ∂r-factor_t·x[t, m]; one thread an element.
@group(0) @binding(0) var<storage, read> md_x: array<f32>;
@group(0) @binding(1) var<storage, read> md_prm: array<f32>;
@group(0) @binding(2) var<storage, read> md_tok: array<f32>;
@group(0) @binding(3) var<storage, read_write> md_gx: array<f32>;

@compute @workgroup_size(256)
fn mhc_dx(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    let nc = P.u1 * P.u2;
    if (g >= P.u0 * nc) { return; }
    let k = P.u3;
    let t = g / nc;
    let m = g % nc;
    let tr = t * (2u * k + 4u);
    var fd = 0.0;
    for (var j = 0u; j < k; j++) { fd += md_prm[P.u8 + m * k + j] * md_tok[tr + k + j]; }
    md_gx[g] = md_gx[g] + md_prm[P.u9 + m] * fd + md_tok[tr + 2u * k + 3u] * md_x[g];
}

// mHC dynamic, ∂φ and ∂γ from G = Xᵀ·∂P ([nC, K]): ∂φ[m, j] += γ[m]·G[m, j],
// ∂γ[m] += Σ_j φ[m, j]·G[m, j]; one thread a row m. u0 = nC.
@group(0) @binding(0) var<storage, read> mg_g: array<f32>;
@group(0) @binding(1) var<storage, read> mg_prm: array<f32>;
@group(0) @binding(2) var<storage, read_write> mg_grads: array<f32>;

@compute @workgroup_size(64)
fn mhc_param_grads(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let m = group_index(wid, nwg) * 64u + lid;
    if (m >= P.u0) { return; }
    let k = P.u3;
    let gamma = mg_prm[P.u9 + m];
    var s = 0.0;
    for (var j = 0u; j < k; j++) {
        let gv = mg_g[m * k + j];
        let at = P.u8 + m * k + j;
        mg_grads[at] = mg_grads[at] + gamma * gv;
        s += mg_prm[at] * gv;
    }
    mg_grads[P.u9 + m] = mg_grads[P.u9 + m] + s;
}

fn hc_dxt(t: u32, i: u32, cc: u32, n: u32, c: u32, k: u32) -> f32 {
    let tr = t * (2u * k + 4u) + k;
    var d = hd_tok[tr + i] * hd_prm[P.u10 + cc] + hd_tok[tr + n + i] * hd_prm[P.u11 + cc];
    for (var o = 0u; o < n; o++) {
        d += hd_tok[tr + 2u * n + o * n + i] * hd_prm[P.u12 + o * c + cc];
    }
    return d;
}

// HC dynamic, ∂x through the per-stream RMSNorm: one workgroup per (t, i):
// ∂x̃ = Σ (∂u)·θ, then ∂x += (∂x̃ − x̃·mean(∂x̃ ⊙ x̃))/rms.
@group(0) @binding(0) var<storage, read> hd_x: array<f32>;
@group(0) @binding(1) var<storage, read> hd_prm: array<f32>;
@group(0) @binding(2) var<storage, read> hd_tok: array<f32>;
@group(0) @binding(3) var<storage, read> hd_norms: array<f32>;
@group(0) @binding(4) var<storage, read_write> hd_gx: array<f32>;

@compute @workgroup_size(64)
fn hc_dx(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = group_index(wid, nwg);
    let n = P.u1;
    if (w >= P.u0 * n) { return; }
    let c = P.u2;
    let k = P.u3;
    let t = w / n;
    let i = w % n;
    let base = (t * n + i) * c;
    let inv = 1.0 / hd_norms[t * n + i];
    var acc = 0.0;
    for (var cc = lid; cc < c; cc += 64u) { acc += hc_dxt(t, i, cc, n, c, k) * hd_x[base + cc]; }
    red[lid] = acc;
    reduce64(lid, 1u);
    let m = red[0] * inv / f32(c);
    for (var cc = lid; cc < c; cc += 64u) {
        let d = hc_dxt(t, i, cc, n, c, k);
        hd_gx[base + cc] = hd_gx[base + cc] + (d - hd_x[base + cc] * inv * m) * inv;
    }
}

// `hc_dx` with one invocation per (t, i) (64 a workgroup), no barriers.
@compute @workgroup_size(64)
fn hc_dx_serial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = group_index(wid, nwg) * 64u + lid;
    let n = P.u1;
    if (w >= P.u0 * n) { return; }
    let c = P.u2;
    let k = P.u3;
    let t = w / n;
    let i = w % n;
    let base = (t * n + i) * c;
    let inv = 1.0 / hd_norms[t * n + i];
    var acc = 0.0;
    for (var cc = 0u; cc < c; cc++) { acc += hc_dxt(t, i, cc, n, c, k) * hd_x[base + cc]; }
    let m = acc * inv / f32(c);
    for (var cc = 0u; cc < c; cc++) {
        let d = hc_dxt(t, i, cc, n, c, k);
        hd_gx[base + cc] = hd_gx[base + cc] + (d - hd_x[base + cc] * inv * m) * inv;
    }
}

// HC dynamic, ∂θ: thread per (row, c), rows θ_pre, θ_post, θ_res[0..n):
// ∂θ[c] += Σ_t Σ_i ∂u[t, col(row, i)]·x̃[t, i, c].
@group(0) @binding(0) var<storage, read> ht_x: array<f32>;
@group(0) @binding(1) var<storage, read> ht_tok: array<f32>;
@group(0) @binding(2) var<storage, read> ht_norms: array<f32>;
@group(0) @binding(3) var<storage, read_write> ht_grads: array<f32>;

@compute @workgroup_size(64)
fn hc_theta_grads(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 64u + lid;
    let n = P.u1;
    let c = P.u2;
    let k = P.u3;
    if (g >= (n + 2u) * c) { return; }
    let r = g / c;
    let cc = g % c;
    var col0 = 0u;
    var dst = P.u10 + cc;
    if (r == 1u) { col0 = n; dst = P.u11 + cc; }
    if (r >= 2u) { col0 = 2u * n + (r - 2u) * n; dst = P.u12 + (r - 2u) * c + cc; }
    var s = 0.0;
    for (var t = 0u; t < P.u0; t++) {
        let tr = t * (2u * k + 4u) + k;
        for (var i = 0u; i < n; i++) {
            let xt = ht_x[(t * n + i) * c + cc] * (1.0 / ht_norms[t * n + i]);
            s += ht_tok[tr + col0 + i] * xt;
        }
    }
    ht_grads[dst] = ht_grads[dst] + s;
}

// out = f0 · in (the benchmark's stand-in sublayer F(h) = 1.5h and its vjp); u0 elements.
@group(0) @binding(0) var<storage, read> sc_in: array<f32>;
@group(0) @binding(1) var<storage, read_write> sc_out: array<f32>;

@compute @workgroup_size(256)
fn scale(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = group_index(wid, nwg) * 256u + lid;
    if (g >= P.u0) { return; }
    sc_out[g] = P.f0 * sc_in[g];
}
