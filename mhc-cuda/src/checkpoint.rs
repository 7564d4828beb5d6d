//! Checkpoints in safetensors: weights under stable names, AdamW state, step,
//! RNG state and the run's configuration; written atomically.
//!
//! Tensor names (all f32, little-endian, row-major):
//! - `model.token_embedding [vocab, C]`, `model.position_embedding [context, C]`,
//!   `model.final_norm [C]`, `model.head [C, vocab]`;
//! - per block `l`: `model.blocks.{l}.attn.norm [C]`, `.attn.wqkv [C, 3C]`,
//!   `.attn.wo [C, C]`, `.mlp.norm [C]`, `.mlp.w1 [C, 4C]`, `.mlp.w2 [4C, C]`, and
//!   each connection's `.attn.conn.*` / `.mlp.conn.*`: `alpha [3]`, `b_pre [n]`,
//!   `b_post [n]`, `b_res [n, n]`, `phi [nC, n²+2n]`, `gamma [nC]` (mHC) or
//!   `theta_pre [C]`, `theta_post [C]`, `theta_res [n, C]` (HC);
//! - `optim.m.<name>` and `optim.v.<name>`: AdamW moments of every `model.<name>`.
//!
//! Metadata (`__metadata__`): `format = mhc-checkpoint-v1`, `step`, `rng`
//! (the batch sampler's four state words), `run` (the [`RunSpec`] as JSON).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use mhc_core::Rng;
use mhc_core::model::Trainer;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::spec::RunSpec;

/// The format tag written into every checkpoint.
pub const FORMAT: &str = "mhc-checkpoint-v1";

/// Why a checkpoint could not be written or read.
#[derive(Debug)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a valid mhc checkpoint (truncated, wrong format, missing or mis-shaped tensor).
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "checkpoint {}: {source}", path.display()),
            Self::Corrupt { path, detail } => write!(
                f,
                "checkpoint {} is not a usable mhc checkpoint: {detail} (start a new run, or point --out/--checkpoint at an intact one)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CheckpointError {}

fn corrupt(path: &Path, detail: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// The shape of a model tensor, from its name and the run's configuration.
pub fn tensor_shape(spec: &RunSpec, name: &str, len: usize) -> Vec<usize> {
    let (c, v, n, ctx) = (spec.width, spec.vocab, spec.streams, spec.context);
    let tensor = name
        .rsplit_once("attn.")
        .or_else(|| name.rsplit_once("mlp."))
        .map_or(name, |(_, t)| t);
    let shape = match tensor {
        "token_embedding" => vec![v, c],
        "position_embedding" => vec![ctx, c],
        "head" => vec![c, v],
        "wqkv" => vec![c, 3 * c],
        "wo" => vec![c, c],
        "w1" => vec![c, 4 * c],
        "w2" => vec![4 * c, c],
        "conn.b_res" => vec![n, n],
        "conn.phi" => vec![n * c, n * n + 2 * n],
        "conn.theta_res" => vec![n, c],
        _ => vec![len],
    };
    if shape.iter().product::<usize>() == len {
        shape
    } else {
        vec![len]
    }
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes `trainer`'s full state to `path` atomically: a temporary file in the
/// same folder, flushed to disk, then renamed over the old checkpoint.
pub fn save(
    path: &Path,
    trainer: &mut Trainer<f32>,
    spec: &RunSpec,
) -> Result<(), CheckpointError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut index = 0;
    let optimizer = &trainer.optimizer;
    trainer.model.for_each_param(|id, p, _| {
        let name = id.name();
        let shape = tensor_shape(spec, &name, p.len());
        tensors.push((format!("model.{name}"), shape.clone(), to_bytes(p)));
        tensors.push((
            format!("optim.m.{name}"),
            shape.clone(),
            to_bytes(&optimizer.m[index]),
        ));
        tensors.push((
            format!("optim.v.{name}"),
            shape,
            to_bytes(&optimizer.v[index]),
        ));
        index += 1;
    });
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| corrupt(path, e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rng = trainer.rng.state();
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("step".to_string(), trainer.optimizer.step.to_string()),
        (
            "rng".to_string(),
            rng.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
        ),
        (
            "run".to_string(),
            serde_json::to_string(spec).map_err(|e| corrupt(path, e.to_string()))?,
        ),
    ]);
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| corrupt(path, e.to_string()))?;
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("safetensors.tmp");
    {
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Make the rename itself durable; not all platforms can open a folder, which is harmless.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A checkpoint read back: the run it belongs to, and the state to restore.
pub struct Loaded {
    /// The run's configuration.
    pub spec: RunSpec,
    /// Steps taken.
    pub step: u64,
    bytes: Vec<u8>,
    rng: [u64; 4],
}

/// Reads a checkpoint's configuration and step (tensors are checked by [`Loaded::restore`]).
pub fn load(path: &Path) -> Result<Loaded, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| corrupt(path, format!("unreadable header ({e})")))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| corrupt(path, "no metadata"))?;
    let get = |key: &str| {
        meta.get(key)
            .ok_or_else(|| corrupt(path, format!("metadata lacks '{key}'")))
    };
    if get("format")? != FORMAT {
        return Err(corrupt(
            path,
            format!("format is '{}', expected '{FORMAT}'", get("format")?),
        ));
    }
    let step = get("step")?
        .parse()
        .map_err(|_| corrupt(path, "step is not a number"))?;
    let words: Vec<u64> = get("rng")?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| corrupt(path, "bad rng state"))?;
    let rng: [u64; 4] = words
        .try_into()
        .map_err(|_| corrupt(path, "rng state needs 4 words"))?;
    let spec: RunSpec = serde_json::from_str(get("run")?)
        .map_err(|e| corrupt(path, format!("bad run configuration ({e})")))?;
    SafeTensors::deserialize(&bytes)
        .map_err(|e| corrupt(path, format!("unreadable tensors ({e})")))?;
    Ok(Loaded {
        spec,
        step,
        bytes,
        rng,
    })
}

impl Loaded {
    /// Overwrites `trainer`'s weights, optimiser state, step and RNG with the
    /// checkpoint's. `trainer` must have been built from the same [`RunSpec`].
    pub fn restore(&self, path: &Path, trainer: &mut Trainer<f32>) -> Result<(), CheckpointError> {
        let st = SafeTensors::deserialize(&self.bytes).map_err(|e| corrupt(path, e.to_string()))?;
        let read = |name: &str, dst: &mut [f32]| -> Result<(), CheckpointError> {
            let view = st
                .tensor(name)
                .map_err(|_| corrupt(path, format!("tensor '{name}' is missing")))?;
            if view.dtype() != Dtype::F32 || view.data().len() != dst.len() * 4 {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor '{name}' has {} bytes of {:?}, expected {} f32 values",
                        view.data().len(),
                        view.dtype(),
                        dst.len()
                    ),
                ));
            }
            for (d, chunk) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            Ok(())
        };
        let mut result = Ok(());
        let mut index = 0;
        let optimizer = &mut trainer.optimizer;
        trainer.model.for_each_param(|id, p, _| {
            if result.is_ok() {
                let name = id.name();
                result = read(&format!("model.{name}"), p)
                    .and_then(|()| read(&format!("optim.m.{name}"), &mut optimizer.m[index]))
                    .and_then(|()| read(&format!("optim.v.{name}"), &mut optimizer.v[index]));
            }
            index += 1;
        });
        result?;
        let mut bad = None;
        trainer.model.for_each_param(|id, p, _| {
            if bad.is_none() && p.iter().any(|v| !v.is_finite()) {
                bad = Some(id.name());
            }
        });
        if let Some(name) = bad {
            return Err(corrupt(
                path,
                format!("tensor 'model.{name}' holds NaN or Inf"),
            ));
        }
        trainer.optimizer.step = self.step;
        trainer.rng = Rng::from_state(self.rng);
        Ok(())
    }
}
