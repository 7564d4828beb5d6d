//! A small GPT-style reference model whose residual stream is plain, HC or
//! mHC, with exact manual backward, AdamW and the embedded synthetic data.
//! Needs only `alloc`, so the browser build uses it too.

pub mod data;
