//! Steps per second of the web demo's default model, natively, per scheme —
//! the yardstick for the browser's figures (README, "In the browser").
//!
//! `cargo run --release -p mhc-wasm --example 01_native_speed`

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use mhc_wasm::mhc_core::Scheme;
use mhc_wasm::mhc_core::model::data::synthetic_corpus;
use mhc_wasm::{BackendChoice, Session, TrainerSettings};

/// The CPU backend finishes every call in its first poll.
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the CPU backend never waits"),
    }
}

fn main() -> Result<(), mhc_wasm::WebError> {
    let text = synthetic_corpus(0, 256 * 1024);
    let steps = 100;
    for (scheme, n) in [
        (Scheme::Residual, 1),
        (Scheme::HcDynamic, 4),
        (Scheme::MhcDynamic, 4),
    ] {
        let settings = TrainerSettings {
            scheme,
            n,
            backend: BackendChoice::Cpu,
            ..TrainerSettings::default()
        };
        let mut session = ready(Session::new(settings, &text, &None))?;
        let started = Instant::now();
        let report = ready(session.step(steps))?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{scheme:>8}: {:.1} steps/s, loss {:.3} -> {:.3}",
            f64::from(steps) / seconds,
            report.losses[0],
            report.losses[report.losses.len() - 1]
        );
    }
    Ok(())
}
