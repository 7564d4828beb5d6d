//! 01 — Wrap a toy sublayer with residual, HC and mHC, and train a deep stack.
//!
//! Runs on the CPU with the `mhc-core` reference (f64). A stack of `L`
//! blocks, each `F(h) = tanh(h·W)` wrapped by the chosen scheme, learns to
//! map random inputs to the outputs of a fixed random "teacher" stack. For
//! each scheme it prints the loss as training goes, and at the end the
//! composite Amax gain of `H_res⁽ᴸ⁾ ··· H_res⁽¹⁾` (paper Fig. 3) and the SK residual.
//!
//!     cargo run --release -p mhc-core --example 01_wrap_toy_sublayer

use mhc_core::diagnostics::composite_gains_scratch_len;
use mhc_core::{
    CompositeGain, ConnectionConfig, ConnectionParams, HyperConnection, InitConfig, Result, Rng,
    Scheme, Sublayer, Workspace, composite_gains,
};

const LAYERS: usize = 12;
const WIDTH: usize = 16;
const TOKENS: usize = 64;
const STEPS: usize = 300;
const LR: f64 = 0.05;

/// `F(h) = tanh(h·W)` per token, with `∂W` accumulated in `vjp`.
struct TanhLinear {
    w: Vec<f64>,
    grad_w: Vec<f64>,
}

impl TanhLinear {
    fn new(rng: &mut Rng, std: f64) -> Self {
        let w = (0..WIDTH * WIDTH).map(|_| rng.normal() * std).collect();
        Self {
            w,
            grad_w: vec![0.0; WIDTH * WIDTH],
        }
    }
    fn row(&self, h: &[f64], j: usize) -> f64 {
        (0..WIDTH)
            .map(|i| h[i] * self.w[i * WIDTH + j])
            .sum::<f64>()
            .tanh()
    }
}

impl Sublayer<f64> for TanhLinear {
    fn forward(&mut self, h: &[f64], y: &mut [f64]) -> Result<()> {
        for (ht, yt) in h.chunks_exact(WIDTH).zip(y.chunks_exact_mut(WIDTH)) {
            for (j, yv) in yt.iter_mut().enumerate() {
                *yv = self.row(ht, j);
            }
        }
        Ok(())
    }
    fn vjp(&mut self, h: &[f64], gy: &[f64], gh: &mut [f64]) -> Result<()> {
        for ((ht, gyt), ght) in h
            .chunks_exact(WIDTH)
            .zip(gy.chunks_exact(WIDTH))
            .zip(gh.chunks_exact_mut(WIDTH))
        {
            let du: Vec<f64> = (0..WIDTH)
                .map(|j| gyt[j] * (1.0 - self.row(ht, j).powi(2)))
                .collect();
            for i in 0..WIDTH {
                ght[i] = (0..WIDTH).map(|j| self.w[i * WIDTH + j] * du[j]).sum();
                for j in 0..WIDTH {
                    self.grad_w[i * WIDTH + j] += ht[i] * du[j];
                }
            }
        }
        Ok(())
    }
}

struct Block {
    conn: HyperConnection<f64>,
    grads: ConnectionParams<f64>,
    f: TanhLinear,
    ws: Workspace<f64>,
    input: Vec<f64>,
}

/// Trains one scheme; returns the final loss and the composite gain at full depth.
fn train(
    scheme: Scheme,
    n: usize,
    x0: &[f64],
    target: &[f64],
) -> Result<(f64, CompositeGain<f64>, f64)> {
    let mut rng = Rng::new(42);
    let config = ConnectionConfig::new(scheme, n, WIDTH);
    let mut blocks = (0..LAYERS)
        .map(|_| {
            Ok(Block {
                conn: HyperConnection::init(config, &InitConfig::default(), &mut rng)?,
                grads: ConnectionParams::zeros(&config),
                f: TanhLinear::new(&mut rng, 0.3),
                ws: Workspace::new(&config, TOKENS),
                input: vec![0.0; TOKENS * n * WIDTH],
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Streams start as n copies of the input; the output is the mean over streams.
    let mut x = vec![0.0; TOKENS * n * WIDTH];
    let mut out = vec![0.0; TOKENS * n * WIDTH];
    let mut grad = vec![0.0; TOKENS * n * WIDTH];
    let mut grad_in = vec![0.0; TOKENS * n * WIDTH];
    let mut loss = 0.0;
    for step in 0..=STEPS {
        for t in 0..TOKENS {
            for i in 0..n {
                x[(t * n + i) * WIDTH..(t * n + i + 1) * WIDTH]
                    .copy_from_slice(&x0[t * WIDTH..(t + 1) * WIDTH]);
            }
        }
        for b in blocks.iter_mut() {
            b.input.copy_from_slice(&x);
            b.conn.forward(&mut b.f, &b.input, &mut out, &mut b.ws)?;
            std::mem::swap(&mut x, &mut out);
        }
        loss = 0.0;
        for t in 0..TOKENS {
            for c in 0..WIDTH {
                let y: f64 = (0..n).map(|i| x[(t * n + i) * WIDTH + c]).sum::<f64>() / n as f64;
                let d = y - target[t * WIDTH + c];
                loss += d * d / (TOKENS * WIDTH) as f64;
                for i in 0..n {
                    grad[(t * n + i) * WIDTH + c] = 2.0 * d / (TOKENS * WIDTH * n) as f64;
                }
            }
        }
        if step % 100 == 0 {
            println!("  {scheme:>9}  step {step:>4}  loss {loss:.5}");
        }
        if step == STEPS {
            break;
        }
        for b in blocks.iter_mut().rev() {
            b.grads.fill_zero();
            b.f.grad_w.iter_mut().for_each(|g| *g = 0.0);
            b.conn.backward(
                &mut b.f,
                &b.input,
                &grad,
                &mut grad_in,
                &mut b.grads,
                &mut b.ws,
            )?;
            std::mem::swap(&mut grad, &mut grad_in);
            for ((_, p), (_, g)) in b
                .conn
                .params
                .tensors_mut()
                .into_iter()
                .zip(b.grads.tensors())
            {
                p.iter_mut().zip(g).for_each(|(p, g)| *p -= LR * g);
            }
            b.f.w
                .iter_mut()
                .zip(&b.f.grad_w)
                .for_each(|(w, g)| *w -= LR * g);
        }
    }
    // Composite gain of H_res over the whole depth, over the tokens.
    let h_res: Vec<Vec<f64>> = blocks
        .iter()
        .map(|b| {
            (0..TOKENS)
                .flat_map(|t| b.ws.h_res(t).unwrap_or_default().to_vec())
                .collect()
        })
        .collect();
    let layers: Vec<&[f64]> = h_res.iter().map(|v| v.as_slice()).collect();
    let mut gains = vec![CompositeGain::default(); LAYERS];
    composite_gains(
        &layers,
        n,
        &mut gains,
        &mut vec![0.0; composite_gains_scratch_len(n)],
    )?;
    let sk_residual = layers
        .iter()
        .flat_map(|l| l.chunks_exact(n * n))
        .map(|m| mhc_core::diagnostics::sinkhorn_residual(m, n))
        .fold(0.0, f64::max);
    Ok((loss, gains[LAYERS - 1], sk_residual))
}

fn main() -> Result<()> {
    println!(
        "device: CPU (mhc-core reference, f64) — {LAYERS} wrapped blocks, C = {WIDTH}, {TOKENS} tokens, {STEPS} SGD steps"
    );
    let mut rng = Rng::new(7);
    let x0: Vec<f64> = (0..TOKENS * WIDTH).map(|_| rng.normal()).collect();
    // The target: a fixed random residual stack applied to the input.
    let mut target = x0.clone();
    for _ in 0..LAYERS {
        let mut teacher = TanhLinear::new(&mut rng, 0.4);
        let mut y = vec![0.0; target.len()];
        teacher.forward(&target, &mut y)?;
        target.iter_mut().zip(&y).for_each(|(t, y)| *t += y);
    }
    let mut rows = Vec::new();
    for (scheme, n) in [
        (Scheme::Residual, 1),
        (Scheme::HcDynamic, 4),
        (Scheme::MhcDynamic, 4),
    ] {
        rows.push((scheme, n, train(scheme, n, &x0, &target)?));
    }
    println!(
        "\n  scheme     n  final loss  composite Amax gain fwd/bwd (max over tokens)  SK residual"
    );
    for (scheme, n, (loss, gain, res)) in rows {
        let sk = if scheme.is_manifold_constrained() {
            format!("{res:.1e}")
        } else {
            "-".into()
        };
        println!(
            "  {scheme:<9} {n:>2}  {loss:>10.5}  {:>12.4} / {:<12.4}                      {sk}",
            gain.forward_max, gain.backward_max
        );
    }
    Ok(())
}
