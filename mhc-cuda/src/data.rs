//! Training text for `mhc-train`: a UTF-8 file or folder of your own, or
//! the embedded synthetic corpus ([`mhc_core::model::data::synthetic_corpus`]),
//! split into training and validation bytes.
//!
//! Tokens are bytes, so any UTF-8 text works as is; `scripts/get-fortunes.sh`
//! fetches a real English corpus into `data/fortunes/`.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use mhc_core::model::data::{split_train_validation, synthetic_corpus};

/// Seed of the embedded default corpus; fixed so that every run, platform
/// and scheme trains on the same bytes.
pub const EMBEDDED_SEED: u64 = 1234;

/// Size of the embedded default corpus: 2 MiB, about 55 000 lines, enough
/// that a small model sees each window rarely within a few thousand steps,
/// and generated in milliseconds.
pub const EMBEDDED_BYTES: usize = 2 * 1024 * 1024;

/// The last tenth of every corpus is held out for validation.
pub const VALIDATION_FRACTION: f64 = 0.1;

/// Everything that can go wrong when loading training text.
///
/// The `Display` text names the path or number at fault and says what to do.
#[derive(Debug)]
pub enum DataError {
    /// The path does not exist.
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// The file or folder exists but could not be read.
    Unreadable {
        /// The file or folder that failed.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A file is not valid UTF-8.
    NotUtf8 {
        /// The offending file.
        path: PathBuf,
        /// Byte offset of the first invalid byte in that file.
        offset: usize,
    },
    /// The file or folder holds no text (nothing but whitespace).
    Empty {
        /// The path given.
        path: PathBuf,
    },
    /// The folder holds no regular, non-hidden files.
    NoTextFiles {
        /// The folder given.
        path: PathBuf,
    },
    /// The text is too short for one window of `context + 1` bytes in each
    /// of the training and validation parts.
    TooShort {
        /// Bytes of text available.
        bytes: usize,
        /// The model's context length.
        context: usize,
        /// The part held out for validation.
        validation_fraction: f64,
    },
    /// The validation fraction is not strictly between 0 and 1.
    InvalidValidationFraction {
        /// The value given.
        value: f64,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { path } => {
                write!(f, "data file or folder '{}' does not exist", path.display())
            }
            Self::Unreadable { path, source } => write!(
                f,
                "cannot read '{}': {source}; check its permissions",
                path.display()
            ),
            Self::NotUtf8 { path, offset } => write!(
                f,
                "'{}' is not UTF-8 text: the first invalid byte is at offset {offset}; convert it (e.g. with iconv) or remove it from the data",
                path.display()
            ),
            Self::Empty { path } => write!(
                f,
                "'{}' holds no text; give a file or folder with some text in it",
                path.display()
            ),
            Self::NoTextFiles { path } => write!(
                f,
                "folder '{}' holds no text files (files and folders whose names start with '.' are skipped)",
                path.display()
            ),
            Self::TooShort {
                bytes,
                context,
                validation_fraction,
            } => write!(
                f,
                "the data has {bytes} bytes but the context needs at least {} for each of train and validation ({}% of the data is held out for validation): lower --context or give more text",
                context.saturating_add(1),
                validation_fraction * 100.0
            ),
            Self::InvalidValidationFraction { value } => write!(
                f,
                "the validation fraction must be strictly between 0 and 1, got {value}"
            ),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreadable { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn unreadable(path: &Path) -> impl FnOnce(io::Error) -> DataError + '_ {
    move |source| DataError::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether a directory entry's name starts with '.'.
fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| name.as_encoded_bytes().starts_with(b"."))
}

/// Collects every regular, non-hidden file under `folder`, recursively.
///
/// Symbolic links to files are followed; links to folders are not (no cycles).
fn collect_files(folder: &Path, files: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for entry in fs::read_dir(folder).map_err(unreadable(folder))? {
        let entry = entry.map_err(unreadable(folder))?;
        let path = entry.path();
        if is_hidden(&path) {
            continue;
        }
        let kind = entry.file_type().map_err(unreadable(&path))?;
        if kind.is_dir() {
            collect_files(&path, files)?;
        } else if kind.is_file() || (kind.is_symlink() && path.is_file()) {
            files.push(path);
        }
    }
    Ok(())
}

/// Reads one file and checks it is UTF-8.
fn read_utf8(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = fs::read(path).map_err(unreadable(path))?;
    match std::str::from_utf8(&bytes) {
        Ok(_) => Ok(bytes),
        Err(error) => Err(DataError::NotUtf8 {
            path: path.to_path_buf(),
            offset: error.valid_up_to(),
        }),
    }
}

/// Loads the training text at `path`: a UTF-8 file, or a folder whose
/// regular files (recursively, in sorted path order, skipping every file
/// and folder whose name starts with '.') are each UTF-8 and are joined with
/// a single `\n` between files.
///
/// # Errors
/// [`DataError::Missing`], [`DataError::Unreadable`], [`DataError::NotUtf8`]
/// (naming the file and the offset), [`DataError::NoTextFiles`] for a
/// folder without files, [`DataError::Empty`] if the text is only whitespace.
pub fn load_text(path: &Path) -> Result<Vec<u8>, DataError> {
    let metadata = fs::metadata(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            DataError::Unreadable {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let text = if metadata.is_dir() {
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        if files.is_empty() {
            return Err(DataError::NoTextFiles {
                path: path.to_path_buf(),
            });
        }
        files.sort();
        let mut text = Vec::new();
        for (index, file) in files.iter().enumerate() {
            if index > 0 {
                text.push(b'\n');
            }
            text.extend(read_utf8(file)?);
        }
        text
    } else {
        read_utf8(path)?
    };
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// Training and validation bytes of one data set.
#[derive(Clone, Debug, PartialEq)]
pub struct Corpus {
    /// What the data is, for logs and reports (a path, or the embedded corpus and its seed).
    pub name: String,
    /// The first part, for training.
    pub train: Vec<u8>,
    /// The last part, for validation.
    pub validation: Vec<u8>,
}

impl Corpus {
    /// Splits `bytes` at `floor(len · (1 − validation_fraction))` (see
    /// [`split_train_validation`]): the last fraction is validation.
    ///
    /// # Errors
    /// [`DataError::InvalidValidationFraction`] unless `0 < validation_fraction < 1`;
    /// [`DataError::TooShort`] unless both parts hold at least `context + 1` bytes.
    pub fn from_bytes(
        name: impl Into<String>,
        bytes: Vec<u8>,
        validation_fraction: f64,
        context: usize,
    ) -> Result<Self, DataError> {
        if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
            return Err(DataError::InvalidValidationFraction {
                value: validation_fraction,
            });
        }
        let (train, validation) = split_train_validation(&bytes, validation_fraction);
        let window = context.saturating_add(1);
        if train.len() < window || validation.len() < window {
            return Err(DataError::TooShort {
                bytes: bytes.len(),
                context,
                validation_fraction,
            });
        }
        let split = train.len();
        let mut train = bytes;
        let validation = train.split_off(split);
        Ok(Self {
            name: name.into(),
            train,
            validation,
        })
    }

    /// [`load_text`] then [`Corpus::from_bytes`], named after the path.
    ///
    /// # Errors
    /// Those of [`load_text`] and [`Corpus::from_bytes`].
    pub fn from_path(
        path: &Path,
        validation_fraction: f64,
        context: usize,
    ) -> Result<Self, DataError> {
        let bytes = load_text(path)?;
        Self::from_bytes(
            path.display().to_string(),
            bytes,
            validation_fraction,
            context,
        )
    }

    /// The embedded default: [`EMBEDDED_BYTES`] of
    /// [`synthetic_corpus`]`(`[`EMBEDDED_SEED`]`)`, the last
    /// [`VALIDATION_FRACTION`] held out.
    ///
    /// # Errors
    /// [`DataError::TooShort`] if `context + 1` exceeds the validation part
    /// (about 210 000 bytes).
    pub fn embedded_default(context: usize) -> Result<Self, DataError> {
        Self::from_bytes(
            format!("synthetic (seed {EMBEDDED_SEED}, {EMBEDDED_BYTES} bytes)"),
            synthetic_corpus(EMBEDDED_SEED, EMBEDDED_BYTES),
            VALIDATION_FRACTION,
            context,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    fn write(path: &Path, bytes: &[u8]) {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn loads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("text.txt");
        write(&file, "héllo world\n".as_bytes());
        assert_eq!(load_text(&file).unwrap(), "héllo world\n".as_bytes());
    }

    #[test]
    fn loads_a_folder_nested_sorted_hidden_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join("b.txt"), b"second");
        write(&root.join("a/z.txt"), b"first");
        write(&root.join("c/d/e.md"), b"third\n");
        write(&root.join(".hidden.txt"), b"HIDDEN");
        write(&root.join(".git/config"), b"HIDDEN");
        write(&root.join("c/.secret"), b"HIDDEN");
        assert_eq!(load_text(root).unwrap(), b"first\nsecond\nthird\n");
    }

    #[test]
    fn a_missing_path_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let error = load_text(&missing).unwrap_err();
        assert!(matches!(error, DataError::Missing { .. }));
        let message = error.to_string();
        assert!(
            message.contains("nope") && message.contains("does not exist"),
            "{message}"
        );
    }

    #[test]
    fn a_file_that_is_not_utf8_is_named_with_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("good.txt"), b"fine");
        let bad = dir.path().join("sub/bad.txt");
        write(&bad, b"abc\xffdef");
        for path in [dir.path().to_path_buf(), bad.clone()] {
            let error = load_text(&path).unwrap_err();
            match &error {
                DataError::NotUtf8 { path, offset } => {
                    assert_eq!((path, *offset), (&bad, 3));
                }
                other => panic!("{other:?}"),
            }
            let message = error.to_string();
            assert!(
                message.contains("bad.txt") && message.contains("offset 3"),
                "{message}"
            );
        }
    }

    #[test]
    fn empty_inputs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.txt");
        write(&empty, b"");
        assert!(matches!(load_text(&empty), Err(DataError::Empty { .. })));
        let blank = dir.path().join("blank.txt");
        write(&blank, b" \n\t\n");
        assert!(matches!(load_text(&blank), Err(DataError::Empty { .. })));
        // A folder of empty files is empty; a folder of hidden files has no text files.
        assert!(matches!(
            load_text(dir.path()),
            Err(DataError::Empty { .. })
        ));
        let only_hidden = dir.path().join("only-hidden");
        write(&only_hidden.join(".a"), b"text");
        let error = load_text(&only_hidden).unwrap_err();
        assert!(matches!(error, DataError::NoTextFiles { .. }));
        assert!(error.to_string().contains("only-hidden"));
    }

    #[cfg(unix)]
    #[test]
    fn an_unreadable_file_reports_the_os_reason() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("locked.txt");
        write(&file, b"text");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).unwrap();
        // root reads anything; only check the error where the OS refuses.
        if fs::read(&file).is_err() {
            let error = load_text(&file).unwrap_err();
            assert!(matches!(error, DataError::Unreadable { .. }));
            assert!(error.source().is_some());
        }
    }

    #[test]
    fn too_short_for_the_context() {
        let bytes = b"0123456789".repeat(10); // 100 bytes: 90 train, 10 validation.
        let corpus = Corpus::from_bytes("digits", bytes.clone(), 0.1, 9).unwrap();
        assert_eq!((corpus.train.len(), corpus.validation.len()), (90, 10));
        assert_eq!([corpus.train, corpus.validation].concat(), bytes);
        let error = Corpus::from_bytes("digits", bytes.clone(), 0.1, 10).unwrap_err();
        assert!(matches!(
            error,
            DataError::TooShort {
                bytes: 100,
                context: 10,
                ..
            }
        ));
        let message = error.to_string();
        assert!(
            message.contains("100 bytes")
                && message.contains("at least 11")
                && message.contains("--context"),
            "{message}"
        );
        for fraction in [0.0, 1.0, -0.5, f64::NAN] {
            assert!(matches!(
                Corpus::from_bytes("digits", bytes.clone(), fraction, 4),
                Err(DataError::InvalidValidationFraction { .. })
            ));
        }
    }

    #[test]
    fn from_path_and_the_embedded_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.txt");
        write(&file, &b"abcdefghij".repeat(20));
        let corpus = Corpus::from_path(&file, 0.25, 8).unwrap();
        assert_eq!((corpus.train.len(), corpus.validation.len()), (150, 50));
        assert!(corpus.name.ends_with("t.txt"));

        let embedded = Corpus::embedded_default(256).unwrap();
        assert_eq!(
            embedded.train.len() + embedded.validation.len(),
            EMBEDDED_BYTES
        );
        assert_eq!(
            embedded.validation.len(),
            EMBEDDED_BYTES - EMBEDDED_BYTES * 9 / 10
        );
        assert!(embedded.name.contains("1234"));
        assert!(matches!(
            Corpus::embedded_default(EMBEDDED_BYTES),
            Err(DataError::TooShort { .. })
        ));
    }
}
