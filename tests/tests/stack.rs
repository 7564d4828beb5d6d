//! A stack of wrapped sublayers, end to end: the backward through several
//! mHC / HC blocks (what a model does) matches central finite differences in f64.

use mhc_core::{
    ConnectionConfig, ConnectionParams, HyperConnection, InitConfig, Rng, Scheme, Workspace,
};
use mhc_tests::{TanhLinear, normal_vec};

struct Block {
    conn: HyperConnection<f64>,
    f: TanhLinear<f64>,
}

fn forward(blocks: &mut [Block], x0: &[f64], tokens: usize) -> Vec<f64> {
    let mut x = x0.to_vec();
    for b in blocks.iter_mut() {
        let mut ws = Workspace::new(b.conn.config(), tokens);
        let mut out = vec![0.0; x.len()];
        b.conn.forward(&mut b.f, &x, &mut out, &mut ws).unwrap();
        x = out;
    }
    x
}

#[test]
fn stacked_blocks_backward_matches_finite_differences() {
    for scheme in [Scheme::MhcDynamic, Scheme::HcDynamic] {
        for n in [1usize, 2, 4] {
            let (c, tokens, depth) = (3, 2, 4);
            let mut rng = Rng::new(77 + n as u64);
            let config = ConnectionConfig::new(scheme, n, c);
            let init = InitConfig {
                alpha: 0.8,
                projection_std: 0.3,
                ..InitConfig::default()
            };
            let mut blocks: Vec<Block> = (0..depth)
                .map(|_| Block {
                    conn: HyperConnection::init(config, &init, &mut rng).unwrap(),
                    f: TanhLinear::new(c, normal_vec(&mut rng, c * c, 0.6)),
                })
                .collect();
            let x0 = normal_vec::<f64>(&mut rng, tokens * n * c, 1.0);
            let g = normal_vec::<f64>(&mut rng, tokens * n * c, 1.0);
            let loss = |blocks: &mut [Block], x0: &[f64]| -> f64 {
                forward(blocks, x0, tokens)
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a * b)
                    .sum()
            };

            // Forward keeping every block's input and workspace, then backward top-down.
            let mut inputs = Vec::new();
            let mut spaces = Vec::new();
            let mut x = x0.clone();
            for b in blocks.iter_mut() {
                let mut ws = Workspace::new(&config, tokens);
                let mut out = vec![0.0; x.len()];
                b.conn.forward(&mut b.f, &x, &mut out, &mut ws).unwrap();
                inputs.push(x);
                spaces.push(ws);
                x = out;
            }
            let mut grad = g.clone();
            let mut grads: Vec<ConnectionParams<f64>> = (0..depth)
                .map(|_| ConnectionParams::zeros(&config))
                .collect();
            for l in (0..depth).rev() {
                let mut gx = vec![0.0; grad.len()];
                let b = &mut blocks[l];
                b.conn
                    .backward(
                        &mut b.f,
                        &inputs[l],
                        &grad,
                        &mut gx,
                        &mut grads[l],
                        &mut spaces[l],
                    )
                    .unwrap();
                grad = gx;
            }

            let h = 1e-5;
            let tol = |fd: f64| 1e-6 * (1.0 + fd.abs());
            for k in 0..x0.len() {
                let (mut p, mut m) = (x0.clone(), x0.clone());
                p[k] += h;
                m[k] -= h;
                let fd = (loss(&mut blocks, &p) - loss(&mut blocks, &m)) / (2.0 * h);
                assert!(
                    (fd - grad[k]).abs() < tol(fd),
                    "{scheme} n={n} dx0[{k}]: {} vs {fd}",
                    grad[k]
                );
            }
            // Parameters of the first block (the gradient crossed every later block to get there).
            for ti in 0..9 {
                for k in 0..grads[0].tensors()[ti].1.len() {
                    let orig = blocks[0].conn.params.tensors()[ti].1[k];
                    blocks[0].conn.params.tensors_mut()[ti].1[k] = orig + h;
                    let lp = loss(&mut blocks, &x0);
                    blocks[0].conn.params.tensors_mut()[ti].1[k] = orig - h;
                    let lm = loss(&mut blocks, &x0);
                    blocks[0].conn.params.tensors_mut()[ti].1[k] = orig;
                    let fd = (lp - lm) / (2.0 * h);
                    let got = grads[0].tensors()[ti].1[k];
                    assert!(
                        (fd - got).abs() < tol(fd),
                        "{scheme} n={n} block 0 param {ti}[{k}]: {got} vs {fd}"
                    );
                }
            }
        }
    }
}
