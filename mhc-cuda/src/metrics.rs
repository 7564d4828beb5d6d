//! Training metrics: one [`MetricsRecord`] per logging step, written by
//! [`MetricsWriter`] as JSON Lines (`metrics.jsonl`, the complete record)
//! and CSV (`metrics.csv`, a flat view for spreadsheets), read back by
//! [`read_jsonl`].
//!
//! # Schema
//!
//! Each line of `metrics.jsonl` is one JSON object with these fields
//! (losses are in nats per token; a token is a byte for the byte-level
//! corpora the trainer reads, so nats/token = nats/byte):
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `scheme` | string | residual stream: `"residual"`, `"hc"`, `"mhc"`, … |
//! | `step` | integer | optimiser steps completed |
//! | `tokens_seen` | integer | training tokens consumed so far |
//! | `train_loss` | number | cross-entropy, nats/token, mean over the steps since the previous record |
//! | `val_loss` | number or `null` | validation cross-entropy, nats/token; `null` when not evaluated at this step |
//! | `grad_norm` | number | global L2 norm of all gradients, before clipping |
//! | `lr` | number | learning rate used at this step |
//! | `tokens_per_s` | number | training throughput over the logging interval |
//! | `elapsed_s` | number | wall-clock seconds since this process started training (a resumed run counts from 0 again) |
//! | `sk_residual` | number | max over all mHC maps and tokens of `\|column sum − 1\|` of `H_res` after Sinkhorn–Knopp (rows are exact); `0` for other schemes |
//! | `amax_fwd` | array, one per wrapped sublayer `l = 1..L` | forward Amax gain of `H_res⁽ˡ⁾` (largest absolute row sum), max over tokens |
//! | `amax_bwd` | array, per sublayer | backward Amax gain of `H_res⁽ˡ⁾` (largest absolute column sum), max over tokens |
//! | `composite_fwd_mean` | array, per depth `d = 1..L` | forward gain of the composite `H_res⁽ᵈ⁾ ··· H_res⁽¹⁾`, mean over tokens |
//! | `composite_fwd_max` | array, per depth | the same, max over tokens |
//! | `composite_bwd_mean` | array, per depth | backward gain of the composite, mean over tokens |
//! | `composite_bwd_max` | array, per depth | the same, max over tokens (the paper's Fig. 3 quantity) |
//!
//! Gains are dimensionless; for the residual scheme every `H_res` is `1`, so
//! every gain is `1` (the arrays may also be empty: a run with no `H_res`).
//! The gains are defined in paper §3 and `mhc_core::diagnostics`.
//!
//! Numbers that are not finite (a diverged run) are written as the strings
//! `"NaN"`, `"inf"` and `"-inf"`, since JSON has no literal for them;
//! [`read_jsonl`] reads those strings, and `null`, back as floats.
//!
//! # CSV
//!
//! `metrics.csv` has one header line and one row per record, with columns
//!
//! `scheme, step, tokens_seen, train_loss, val_loss, grad_norm, lr,
//! tokens_per_s, elapsed_s, sk_residual,`
//! `amax_fwd_max, amax_bwd_max` (max over sublayers),
//! `composite_fwd_mean_final, composite_fwd_max_final,
//! composite_bwd_mean_final, composite_bwd_max_final` (at the last depth `L`),
//! then `amax_fwd_1 … amax_fwd_L, amax_bwd_1 … amax_bwd_L,
//! composite_bwd_max_1 … composite_bwd_max_L` (1-based, as in the paper).
//!
//! Empty cells mean "no value": `val_loss` when not evaluated, and aggregate
//! or per-layer cells for a record with fewer layers than the header. The
//! number of per-layer columns is fixed by the first record written to a new
//! file (or by the existing header when appending); a later record with more
//! layers is an error. Non-finite numbers are written `NaN`, `inf`, `-inf`.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the JSON Lines log inside a run directory.
pub const JSONL_FILE: &str = "metrics.jsonl";
/// File name of the CSV log inside a run directory.
pub const CSV_FILE: &str = "metrics.csv";

/// One logging step of one training run (one scheme). The module
/// documentation gives each field's meaning and unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Residual-stream scheme: `"residual"`, `"hc"`, `"mhc"`, …
    pub scheme: String,
    /// Optimiser steps completed.
    pub step: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Training cross-entropy in nats/token, mean over the logging interval.
    #[serde(with = "float")]
    pub train_loss: f64,
    /// Validation cross-entropy in nats/token; `None` when not evaluated.
    #[serde(with = "optional_float")]
    pub val_loss: Option<f64>,
    /// Global L2 norm of the gradients, before clipping.
    #[serde(with = "float")]
    pub grad_norm: f64,
    /// Learning rate.
    #[serde(with = "float")]
    pub lr: f64,
    /// Training throughput over the logging interval, tokens per second.
    #[serde(with = "float")]
    pub tokens_per_s: f64,
    /// Wall-clock seconds since this process started training.
    #[serde(with = "float")]
    pub elapsed_s: f64,
    /// Max `|column sum − 1|` over all mHC maps and tokens (0 for other schemes).
    #[serde(with = "float")]
    pub sk_residual: f64,
    /// Per wrapped sublayer `l`: forward Amax gain of `H_res⁽ˡ⁾`, max over tokens.
    #[serde(with = "floats")]
    pub amax_fwd: Vec<f64>,
    /// Per wrapped sublayer `l`: backward Amax gain of `H_res⁽ˡ⁾`, max over tokens.
    #[serde(with = "floats")]
    pub amax_bwd: Vec<f64>,
    /// Per depth `d`: forward gain of `H_res⁽ᵈ⁾ ··· H_res⁽¹⁾`, mean over tokens.
    #[serde(with = "floats")]
    pub composite_fwd_mean: Vec<f64>,
    /// Per depth `d`: forward gain of the composite, max over tokens.
    #[serde(with = "floats")]
    pub composite_fwd_max: Vec<f64>,
    /// Per depth `d`: backward gain of the composite, mean over tokens.
    #[serde(with = "floats")]
    pub composite_bwd_mean: Vec<f64>,
    /// Per depth `d`: backward gain of the composite, max over tokens.
    #[serde(with = "floats")]
    pub composite_bwd_max: Vec<f64>,
}

/// Errors of writing and reading metrics files.
#[derive(Debug)]
pub enum MetricsError {
    /// A file could not be created, opened, read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A line of a JSON Lines file is not a [`MetricsRecord`].
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What serde_json found wrong.
        source: serde_json::Error,
    },
    /// An existing CSV file's header is not the one this version writes.
    CsvHeader {
        /// The file.
        path: PathBuf,
        /// The first column that differs, as found in the file.
        found: String,
        /// The column expected at that position.
        expected: String,
    },
    /// A record has more sublayers (or depths) than the CSV header has columns for.
    LayerCount {
        /// The CSV file.
        path: PathBuf,
        /// Which per-layer group: `"amax_fwd"`, `"amax_bwd"` or `"composite_bwd_max"`.
        column: &'static str,
        /// Entries in the record.
        record: usize,
        /// Columns in the header.
        header: usize,
    },
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Parse { path, line, source } => write!(
                f,
                "{}:{line}: not a metrics record: {source}",
                path.display()
            ),
            Self::CsvHeader {
                path,
                found,
                expected,
            } => write!(
                f,
                "{}: the existing CSV header has column `{found}` where this version writes \
                 `{expected}`; append to a fresh run directory, or start without resume",
                path.display()
            ),
            Self::LayerCount {
                path,
                column,
                record,
                header,
            } => write!(
                f,
                "{}: the record has {record} `{column}` values but the CSV header has \
                 {header} `{column}_<l>` columns (the first record written fixes them)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for MetricsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Parse { source, .. } => Some(source),
            Self::CsvHeader { .. } | Self::LayerCount { .. } => None,
        }
    }
}

impl From<MetricsError> for io::Error {
    fn from(e: MetricsError) -> Self {
        let kind = match &e {
            MetricsError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> MetricsError + '_ {
    move |source| MetricsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Per-layer column counts of the CSV: `amax_fwd_<l>`, `amax_bwd_<l>`,
/// `composite_bwd_max_<d>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CsvLayout {
    amax_fwd: usize,
    amax_bwd: usize,
    composite_bwd_max: usize,
}

/// The columns every CSV row starts with, before the per-layer ones.
const CSV_FIXED_COLUMNS: [&str; 16] = [
    "scheme",
    "step",
    "tokens_seen",
    "train_loss",
    "val_loss",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "elapsed_s",
    "sk_residual",
    "amax_fwd_max",
    "amax_bwd_max",
    "composite_fwd_mean_final",
    "composite_fwd_max_final",
    "composite_bwd_mean_final",
    "composite_bwd_max_final",
];

impl CsvLayout {
    fn of(record: &MetricsRecord) -> Self {
        Self {
            amax_fwd: record.amax_fwd.len(),
            amax_bwd: record.amax_bwd.len(),
            composite_bwd_max: record.composite_bwd_max.len(),
        }
    }

    fn header(&self) -> String {
        let mut columns: Vec<String> = CSV_FIXED_COLUMNS.iter().map(|c| c.to_string()).collect();
        for (prefix, count) in self.groups() {
            columns.extend((1..=count).map(|l| format!("{prefix}_{l}")));
        }
        columns.join(",")
    }

    fn groups(&self) -> [(&'static str, usize); 3] {
        [
            ("amax_fwd", self.amax_fwd),
            ("amax_bwd", self.amax_bwd),
            ("composite_bwd_max", self.composite_bwd_max),
        ]
    }

    /// Reads the layout back from a header this module wrote.
    fn parse(header: &str, path: &Path) -> Result<Self, MetricsError> {
        let columns: Vec<&str> = header.trim_end_matches(['\r', '\n']).split(',').collect();
        let mismatch = |found: &str, expected: String| MetricsError::CsvHeader {
            path: path.to_path_buf(),
            found: found.to_string(),
            expected,
        };
        for (i, expected) in CSV_FIXED_COLUMNS.iter().enumerate() {
            let found = columns.get(i).copied().unwrap_or("<end of line>");
            if found != *expected {
                return Err(mismatch(found, expected.to_string()));
            }
        }
        let mut rest = &columns[CSV_FIXED_COLUMNS.len()..];
        let mut counts = [0usize; 3];
        for (g, prefix) in ["amax_fwd", "amax_bwd", "composite_bwd_max"]
            .iter()
            .enumerate()
        {
            while let Some(column) = rest.first() {
                if *column != format!("{prefix}_{}", counts[g] + 1) {
                    break;
                }
                counts[g] += 1;
                rest = &rest[1..];
            }
        }
        if let Some(found) = rest.first() {
            return Err(mismatch(found, "<end of line>".to_string()));
        }
        Ok(Self {
            amax_fwd: counts[0],
            amax_bwd: counts[1],
            composite_bwd_max: counts[2],
        })
    }

    fn row(&self, r: &MetricsRecord, path: &Path) -> Result<String, MetricsError> {
        let per_layer = [&r.amax_fwd, &r.amax_bwd, &r.composite_bwd_max];
        for ((column, header), values) in self.groups().into_iter().zip(per_layer) {
            if values.len() > header {
                return Err(MetricsError::LayerCount {
                    path: path.to_path_buf(),
                    column,
                    record: values.len(),
                    header,
                });
            }
        }
        let mut row = csv_field(&r.scheme);
        let mut push = |cell: Option<f64>| {
            row.push(',');
            if let Some(v) = cell {
                write_number(&mut row, v);
            }
        };
        // u64 → f64 is exact below 2^53, far beyond any step or token count.
        push(Some(r.step as f64));
        push(Some(r.tokens_seen as f64));
        push(Some(r.train_loss));
        push(r.val_loss);
        push(Some(r.grad_norm));
        push(Some(r.lr));
        push(Some(r.tokens_per_s));
        push(Some(r.elapsed_s));
        push(Some(r.sk_residual));
        push(max_with_nan(&r.amax_fwd));
        push(max_with_nan(&r.amax_bwd));
        push(r.composite_fwd_mean.last().copied());
        push(r.composite_fwd_max.last().copied());
        push(r.composite_bwd_mean.last().copied());
        push(r.composite_bwd_max.last().copied());
        for ((_, header), values) in self.groups().into_iter().zip(per_layer) {
            for l in 0..header {
                push(values.get(l).copied());
            }
        }
        row.push('\n');
        Ok(row)
    }
}

/// Largest entry, NaN if any entry is NaN (a diverged layer must show),
/// `None` if empty.
fn max_with_nan(values: &[f64]) -> Option<f64> {
    values.iter().copied().reduce(|a, b| {
        if a.is_nan() || b.is_nan() {
            f64::NAN
        } else {
            a.max(b)
        }
    })
}

/// Shortest text that reads back to the same `f64`; exponent form for very
/// large or small magnitudes (a diverging HC gain can reach 1e30).
fn write_number(out: &mut String, v: f64) {
    let a = v.abs();
    // Writing into a String cannot fail.
    let _ = if v.is_finite() && a != 0.0 && !(1e-5..1e15).contains(&a) {
        write!(out, "{v:e}")
    } else {
        write!(out, "{v}")
    };
}

/// Quotes a CSV cell when it holds a separator, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes [`MetricsRecord`]s to `<dir>/metrics.jsonl` and `<dir>/metrics.csv`,
/// flushing both after every record so that a crash loses nothing already
/// logged.
#[derive(Debug)]
pub struct MetricsWriter {
    jsonl: BufWriter<File>,
    csv: BufWriter<File>,
    jsonl_path: PathBuf,
    csv_path: PathBuf,
    /// `None` until the header is known: from the first record of a new file.
    csv_layout: Option<CsvLayout>,
}

impl MetricsWriter {
    /// Opens the two files in `dir` (which must exist). With `append = false`
    /// they are truncated; with `append = true` (used on `--resume`) records
    /// are added at the end, and the CSV header is written only if the CSV
    /// file is missing or empty — an existing header is read back and must be
    /// one this module wrote.
    pub fn create(dir: impl AsRef<Path>, append: bool) -> Result<Self, MetricsError> {
        let dir = dir.as_ref();
        let jsonl_path = dir.join(JSONL_FILE);
        let csv_path = dir.join(CSV_FILE);
        let open = |path: &Path| {
            let mut options = OpenOptions::new();
            options.create(true);
            if append {
                options.read(true).append(true);
            } else {
                options.write(true).truncate(true);
            }
            options.open(path).map_err(io_error(path))
        };
        let mut jsonl = open(&jsonl_path)?;
        let mut csv = open(&csv_path)?;
        let mut csv_layout = None;
        if append {
            // A process killed mid-line leaves a partial last line; start the
            // next record on a line of its own so only that line is damaged.
            if !ends_with_newline_or_empty(&mut jsonl).map_err(io_error(&jsonl_path))? {
                jsonl.write_all(b"\n").map_err(io_error(&jsonl_path))?;
            }
            if !ends_with_newline_or_empty(&mut csv).map_err(io_error(&csv_path))? {
                csv.write_all(b"\n").map_err(io_error(&csv_path))?;
            }
            csv.seek(SeekFrom::Start(0)).map_err(io_error(&csv_path))?;
            let mut header = String::new();
            BufReader::new(&mut csv)
                .read_line(&mut header)
                .map_err(io_error(&csv_path))?;
            if !header.trim().is_empty() {
                csv_layout = Some(CsvLayout::parse(&header, &csv_path)?);
            }
            // Files opened with `append` write at the end whatever the cursor.
        }
        Ok(Self {
            jsonl: BufWriter::new(jsonl),
            csv: BufWriter::new(csv),
            jsonl_path,
            csv_path,
            csv_layout,
        })
    }

    /// Appends one record to both files and flushes them.
    pub fn write(&mut self, record: &MetricsRecord) -> Result<(), MetricsError> {
        let mut line = serde_json::to_string(record).map_err(|e| MetricsError::Io {
            path: self.jsonl_path.clone(),
            source: e.into(),
        })?;
        line.push('\n');
        let layout = match self.csv_layout {
            Some(layout) => layout,
            None => {
                let layout = CsvLayout::of(record);
                let mut header = layout.header();
                header.push('\n');
                self.csv
                    .write_all(header.as_bytes())
                    .map_err(io_error(&self.csv_path))?;
                self.csv_layout = Some(layout);
                layout
            }
        };
        let row = layout.row(record, &self.csv_path)?;
        self.jsonl
            .write_all(line.as_bytes())
            .and_then(|()| self.jsonl.flush())
            .map_err(io_error(&self.jsonl_path))?;
        self.csv
            .write_all(row.as_bytes())
            .and_then(|()| self.csv.flush())
            .map_err(io_error(&self.csv_path))
    }

    /// Path of the JSON Lines file.
    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl_path
    }

    /// Path of the CSV file.
    pub fn csv_path(&self) -> &Path {
        &self.csv_path
    }
}

fn ends_with_newline_or_empty(file: &mut File) -> io::Result<bool> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Reads every record of a JSON Lines metrics file, in file order. Blank
/// lines are skipped; any other line that is not a [`MetricsRecord`] is an
/// error naming its line number.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<MetricsRecord>, MetricsError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(io_error(path))?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_error(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|source| MetricsError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?;
        records.push(record);
    }
    Ok(records)
}

/// Drops records superseded after a resume. A run resumed from a checkpoint
/// at step `s` logs steps after `s` again, so the file holds them twice; for
/// each scheme, a record whose step is not after the previous one replaces
/// every earlier record of that scheme with a step at or after its own.
/// The result lists each scheme's records in step order, schemes in order of
/// first appearance.
pub fn drop_superseded(records: &[MetricsRecord]) -> Vec<MetricsRecord> {
    let mut by_scheme: Vec<(&str, Vec<&MetricsRecord>)> = Vec::new();
    for r in records {
        let kept = match by_scheme.iter().position(|(s, _)| *s == r.scheme) {
            Some(i) => &mut by_scheme[i].1,
            None => {
                by_scheme.push((&r.scheme, Vec::new()));
                &mut by_scheme.last_mut().expect("just pushed").1
            }
        };
        while kept.last().is_some_and(|k| k.step >= r.step) {
            kept.pop();
        }
        kept.push(r);
    }
    by_scheme
        .into_iter()
        .flat_map(|(_, kept)| kept.into_iter().cloned())
        .collect()
}

/// Serde for `f64` that keeps non-finite values: JSON has no NaN or
/// infinity, and serde_json would write them as `null` and then refuse to
/// read `null` back as a float.
mod float {
    use serde::{Deserialize, Deserializer, Serializer};

    /// What a float field may hold in the JSON.
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum Float {
        Number(f64),
        Text(String),
        Null(()),
    }

    impl Float {
        pub(super) fn value<E: serde::de::Error>(self) -> Result<f64, E> {
            match self {
                Self::Number(v) => Ok(v),
                Self::Null(()) => Ok(f64::NAN),
                Self::Text(s) => match s.as_str() {
                    "NaN" | "nan" => Ok(f64::NAN),
                    "inf" | "Infinity" => Ok(f64::INFINITY),
                    "-inf" | "-Infinity" => Ok(f64::NEG_INFINITY),
                    _ => Err(E::custom(format!(
                        "expected a number, \"NaN\", \"inf\" or \"-inf\", found \"{s}\""
                    ))),
                },
            }
        }
    }

    pub(super) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *v {
            v if v.is_finite() => s.serialize_f64(v),
            v if v.is_nan() => s.serialize_str("NaN"),
            v if v > 0.0 => s.serialize_str("inf"),
            _ => s.serialize_str("-inf"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Float::deserialize(d)?.value()
    }
}

/// [`float`] for `Option<f64>`: `null` is `None`.
mod optional_float {
    use super::float::Float;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::float::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Option::<Float>::deserialize(d)? {
            None | Some(Float::Null(())) => Ok(None),
            Some(f) => f.value().map(Some),
        }
    }
}

/// [`float`] for `Vec<f64>`.
mod floats {
    use super::float::Float;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes one element through [`super::float::serialize`].
    struct Element(f64);

    impl serde::Serialize for Element {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::float::serialize(&self.0, s)
        }
    }

    pub(super) fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for &x in v {
            seq.serialize_element(&Element(x))?;
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<Float>::deserialize(d)?
            .into_iter()
            .map(Float::value)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(scheme: &str, step: u64, layers: usize) -> MetricsRecord {
        let s = step as f64;
        let per_layer = |base: f64| (1..=layers).map(|l| base + 0.1 * l as f64).collect();
        MetricsRecord {
            scheme: scheme.to_string(),
            step,
            tokens_seen: step * 4096,
            train_loss: 5.0 / (1.0 + s),
            val_loss: step.is_multiple_of(2).then_some(5.5 / (1.0 + s)),
            grad_norm: 0.75 + s,
            lr: 3e-4,
            tokens_per_s: 12345.5,
            elapsed_s: 0.5 * s,
            sk_residual: 1.25e-7,
            amax_fwd: per_layer(1.0),
            amax_bwd: per_layer(1.5),
            composite_fwd_mean: per_layer(2.0),
            composite_fwd_max: per_layer(2.5),
            composite_bwd_mean: per_layer(3.0),
            composite_bwd_max: per_layer(3.5),
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn round_trip_write_read() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<_> = (0..5).map(|s| record("mhc", s, 4)).collect();
        let mut w = MetricsWriter::create(dir.path(), false).unwrap();
        for r in &records {
            w.write(r).unwrap();
        }
        assert_eq!(w.jsonl_path(), dir.path().join(JSONL_FILE));
        drop(w);
        let back = read_jsonl(dir.path().join(JSONL_FILE)).unwrap();
        assert_eq!(back, records);
    }

    #[test]
    fn non_finite_values_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = record("hc", 3, 2);
        r.train_loss = f64::NAN;
        r.val_loss = Some(f64::INFINITY);
        r.grad_norm = f64::INFINITY;
        r.composite_bwd_max = vec![1e300, f64::NEG_INFINITY];
        let mut w = MetricsWriter::create(dir.path(), false).unwrap();
        w.write(&r).unwrap();
        drop(w);
        let jsonl = read(&dir.path().join(JSONL_FILE));
        assert!(jsonl.contains(r#""train_loss":"NaN""#), "{jsonl}");
        let back = read_jsonl(dir.path().join(JSONL_FILE)).unwrap();
        assert!(back[0].train_loss.is_nan());
        assert_eq!(back[0].val_loss, Some(f64::INFINITY));
        assert_eq!(back[0].grad_norm, f64::INFINITY);
        assert_eq!(back[0].composite_bwd_max, vec![1e300, f64::NEG_INFINITY]);
        let csv = read(&dir.path().join(CSV_FILE));
        let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
        assert_eq!(row[3], "NaN");
        assert_eq!(row[4], "inf");
        assert_eq!(row[15], "-inf");
        assert_eq!(row.last(), Some(&"-inf"));
        assert_eq!(row[row.len() - 2], "1e300");
        // null, as other writers put it, reads as NaN.
        let null = jsonl.replace(r#""train_loss":"NaN""#, r#""train_loss":null"#);
        assert!(
            serde_json::from_str::<MetricsRecord>(null.trim())
                .unwrap()
                .train_loss
                .is_nan()
        );
    }

    #[test]
    fn csv_header_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(dir.path(), false).unwrap();
        for s in 0..3 {
            w.write(&record("mhc", s, 2)).unwrap();
        }
        let csv = read(w.csv_path());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "scheme,step,tokens_seen,train_loss,val_loss,grad_norm,lr,tokens_per_s,elapsed_s,\
             sk_residual,amax_fwd_max,amax_bwd_max,composite_fwd_mean_final,\
             composite_fwd_max_final,composite_bwd_mean_final,composite_bwd_max_final,\
             amax_fwd_1,amax_fwd_2,amax_bwd_1,amax_bwd_2,composite_bwd_max_1,composite_bwd_max_2"
        );
        let columns = lines[0].split(',').count();
        for line in &lines[1..] {
            assert_eq!(line.split(',').count(), columns, "{line}");
        }
        let row1: Vec<&str> = lines[2].split(',').collect();
        assert_eq!(&row1[..3], ["mhc", "1", "4096"]);
        assert_eq!(row1[4], "", "val_loss is empty when not evaluated");
        assert_eq!(row1[6], "0.0003");
        assert_eq!(row1[9], "1.25e-7");
        assert_eq!(row1[10], "1.2", "amax_fwd_max");
        assert_eq!(row1[15], "3.7", "composite_bwd_max_final");
        assert_eq!(row1[20], "3.6", "composite_bwd_max_1");
    }

    #[test]
    fn append_keeps_one_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(dir.path(), false).unwrap();
        w.write(&record("hc", 0, 3)).unwrap();
        w.write(&record("hc", 1, 3)).unwrap();
        drop(w);
        let mut w = MetricsWriter::create(dir.path(), true).unwrap();
        w.write(&record("hc", 2, 3)).unwrap();
        // Fewer layers than the header (the residual scheme): empty cells.
        w.write(&record("residual", 2, 0)).unwrap();
        drop(w);
        let csv = read(&dir.path().join(CSV_FILE));
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines.iter().filter(|l| l.starts_with("scheme,")).count(), 1);
        assert_eq!(lines[4].split(',').count(), lines[0].split(',').count());
        let empty = lines[4]
            .split(',')
            .rev()
            .take_while(|c| c.is_empty())
            .count();
        assert_eq!(
            empty,
            6 + 3 * 3,
            "aggregates and per-layer cells: {}",
            lines[4]
        );
        assert_eq!(read_jsonl(dir.path().join(JSONL_FILE)).unwrap().len(), 4);

        // More layers than the header is an error, and writes nothing.
        let mut w = MetricsWriter::create(dir.path(), true).unwrap();
        let err = w.write(&record("hc", 3, 4)).unwrap_err();
        assert!(matches!(
            err,
            MetricsError::LayerCount {
                record: 4,
                header: 3,
                ..
            }
        ));
        assert!(err.to_string().contains("metrics.csv"), "{err}");
        drop(w);
        assert_eq!(read_jsonl(dir.path().join(JSONL_FILE)).unwrap().len(), 4);

        // A fresh (non-append) writer truncates.
        let mut w = MetricsWriter::create(dir.path(), false).unwrap();
        w.write(&record("hc", 0, 1)).unwrap();
        assert_eq!(read(w.csv_path()).lines().count(), 2);
    }

    #[test]
    fn append_to_new_directory_writes_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(dir.path(), true).unwrap();
        w.write(&record("mhc", 0, 1)).unwrap();
        let csv = read(w.csv_path());
        assert!(csv.starts_with("scheme,step,"));
        assert_eq!(csv.lines().count(), 2);
    }

    #[test]
    fn append_after_torn_line_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(dir.path(), false).unwrap();
        w.write(&record("mhc", 0, 1)).unwrap();
        drop(w);
        let jsonl = dir.path().join(JSONL_FILE);
        let mut f = OpenOptions::new().append(true).open(&jsonl).unwrap();
        f.write_all(br#"{"scheme":"mhc","st"#).unwrap();
        drop(f);
        let mut w = MetricsWriter::create(dir.path(), true).unwrap();
        w.write(&record("mhc", 1, 1)).unwrap();
        drop(w);
        let err = read_jsonl(&jsonl).unwrap_err();
        assert!(matches!(err, MetricsError::Parse { line: 2, .. }), "{err}");
        assert_eq!(read(&jsonl).lines().count(), 3);
    }

    #[test]
    fn append_rejects_foreign_csv_header() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CSV_FILE), "step,loss\n1,2\n").unwrap();
        let err = MetricsWriter::create(dir.path(), true).unwrap_err();
        assert!(matches!(err, MetricsError::CsvHeader { .. }), "{err}");
        let io: io::Error = err.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn malformed_line_names_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JSONL_FILE);
        let good = serde_json::to_string(&record("mhc", 0, 1)).unwrap();
        std::fs::write(&path, format!("{good}\n\n{{\"scheme\": 3}}\n")).unwrap();
        let err = read_jsonl(&path).unwrap_err();
        assert!(matches!(err, MetricsError::Parse { line: 3, .. }));
        let message = err.to_string();
        assert!(message.contains("metrics.jsonl:3:"), "{message}");
        let missing = read_jsonl(dir.path().join("nope.jsonl")).unwrap_err();
        assert!(missing.to_string().contains("nope.jsonl"), "{missing}");
    }

    /// The JSON field names are the schema the README, the plots and any
    /// analysis scripts rely on: renaming one must be deliberate.
    #[test]
    fn schema_field_names() {
        let value = serde_json::to_value(record("mhc", 0, 1)).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut expected = vec![
            "scheme",
            "step",
            "tokens_seen",
            "train_loss",
            "val_loss",
            "grad_norm",
            "lr",
            "tokens_per_s",
            "elapsed_s",
            "sk_residual",
            "amax_fwd",
            "amax_bwd",
            "composite_fwd_mean",
            "composite_fwd_max",
            "composite_bwd_mean",
            "composite_bwd_max",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert!(value["val_loss"].is_number());
        assert!(value["amax_fwd"].is_array());
        let odd = serde_json::to_value(record("mhc", 1, 1)).unwrap();
        assert!(odd["val_loss"].is_null());
    }

    #[test]
    fn superseded_records_are_dropped() {
        let steps = [0, 10, 20, 30, 20, 30, 40];
        let mut records: Vec<_> = steps.iter().map(|&s| record("mhc", s, 1)).collect();
        records[4].train_loss = -1.0; // the re-logged step 20
        records.insert(2, record("hc", 0, 1));
        let kept = drop_superseded(&records);
        let got: Vec<(&str, u64)> = kept.iter().map(|r| (r.scheme.as_str(), r.step)).collect();
        assert_eq!(
            got,
            [
                ("mhc", 0),
                ("mhc", 10),
                ("mhc", 20),
                ("mhc", 30),
                ("mhc", 40),
                ("hc", 0)
            ]
        );
        assert_eq!(kept[2].train_loss, -1.0);
    }
}
