//! Reads a model repository laid out as Triton's:
//! `DIR/<model-name>/<version>/model.onnx`, optional `DIR/<model-name>/config.toml`.
//!
//! A scan only looks at the file system; deciding what to load is the
//! registry's job. Each file gets a fingerprint (size and modification time)
//! so a later scan can tell that a model's files changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The file the runtime loads inside a version directory.
pub const MODEL_FILE_NAME: &str = "model.onnx";
pub const CONFIG_FILE_NAME: &str = "config.toml";

/// SHA-256 of a whole file, lower-case hex: the form the control plane's
/// registry names pushed models by. Read in chunks, never whole in memory.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Enough to notice that a file was replaced or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl Fingerprint {
    /// The file's fingerprint; `None` if there is no such file. Any other
    /// failure to stat it (permissions, I/O, too many open files) is an
    /// error: the file may well be there.
    fn of(path: &Path) -> std::io::Result<Option<Fingerprint>> {
        match std::fs::metadata(path) {
            Ok(meta) => Ok(Some(Fingerprint {
                len: meta.len(),
                modified: meta.modified().ok(),
            })),
            Err(err) if is_absent(&err) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// Whether an error means the path is not there (as opposed to not readable
/// now).
fn is_absent(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionFiles {
    pub model_path: PathBuf,
    pub fingerprint: Fingerprint,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDir {
    pub name: String,
    pub dir: PathBuf,
    pub config_fingerprint: Option<Fingerprint>,
    pub versions: BTreeMap<u64, VersionFiles>,
    /// Why the model's directory could not be read in full, if it could
    /// not (permissions, I/O errors, too many open files): `versions` and
    /// `config_fingerprint` then say nothing about what is on disk, and the
    /// registry keeps the model as it is.
    pub unreadable: Option<String>,
    /// Version directories whose model file could not be looked at, with
    /// why: not in `versions`, and the registry keeps each as it is (serving
    /// if it served, not loaded if it was not).
    pub unreadable_versions: BTreeMap<u64, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepositoryScan {
    pub models: BTreeMap<String, ModelDir>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("model repository {path} does not exist")]
    Missing { path: PathBuf },
    #[error("model repository {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot read model repository {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks that `path` is a readable directory (called once at start, so a
/// wrong path fails before any port is bound).
pub fn check_repository(path: &Path) -> Result<(), RepositoryError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(RepositoryError::NotADirectory {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(RepositoryError::Missing {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(RepositoryError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Where managed mode holds a rollback's higher versions
/// (`<repository>/.held/<name>/<version>/`) until the lower one serves. The
/// scan does not see it (a dot name), but a version held there that was
/// serving serves on while the version it makes way for fails to load.
pub const HELD_DIR: &str = ".held";

/// Lists every model and version directory. Entries that do not fit the
/// layout (files at the top level, version directories that are not a
/// positive number written plainly — `0`, `01`, `+1`, `latest` —
/// version directories without `model.onnx`) are skipped with a debug log.
/// A model directory that cannot be read in full is listed with the reason
/// ([`ModelDir::unreadable`]), not skipped: it may hold a serving model.
pub fn scan(root: &Path) -> Result<RepositoryScan, RepositoryError> {
    check_repository(root)?;
    let io_err = |source| RepositoryError::Io {
        path: root.to_path_buf(),
        source,
    };
    let mut models = BTreeMap::new();
    for entry in std::fs::read_dir(root).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let dir = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            tracing::debug!(path = %dir.display(), "skipping a non-UTF-8 name in the model repository");
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let mut model = ModelDir {
            name: name.clone(),
            dir: dir.clone(),
            config_fingerprint: None,
            versions: BTreeMap::new(),
            unreadable: None,
            unreadable_versions: BTreeMap::new(),
        };
        let read = is_directory(&dir)
            .and_then(|is_directory| is_directory.then(|| read_model_dir(&mut model)).transpose());
        match read {
            Ok(Some(())) => {}
            // A file, or removed since the repository was listed.
            Ok(None) => continue,
            Err(_) if matches!(is_directory(&dir), Ok(false)) => continue,
            Err(err) => model.unreadable = Some(format!("cannot read {err}")),
        }
        models.insert(name, model);
    }
    Ok(RepositoryScan { models })
}

/// Whether `path` is a directory (through symlinks); false if there is
/// nothing there, an error if it cannot be told.
fn is_directory(path: &Path) -> std::io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.is_dir()),
        Err(err) if is_absent(&err) => Ok(false),
        Err(err) => Err(err),
    }
}

/// An I/O error that names the path it happened on (its kind kept).
fn at(path: &Path) -> impl Fn(std::io::Error) -> std::io::Error + '_ {
    move |err| std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// Fills in a model's config fingerprint and versions from its directory.
fn read_model_dir(model: &mut ModelDir) -> std::io::Result<()> {
    let config = model.dir.join(CONFIG_FILE_NAME);
    model.config_fingerprint = Fingerprint::of(&config).map_err(at(&config))?;
    if model.config_fingerprint.is_some() {
        // Its own permissions can stop a read where the stat succeeds: such
        // a config is unreadable for now, not invalid.
        std::fs::File::open(&config).map_err(at(&config))?;
    }
    for child in std::fs::read_dir(&model.dir).map_err(at(&model.dir))? {
        let child = child.map_err(at(&model.dir))?;
        let Some(version) = child.file_name().to_str().and_then(version_number) else {
            continue;
        };
        let model_path = child.path().join(MODEL_FILE_NAME);
        match Fingerprint::of(&model_path) {
            Ok(Some(fingerprint)) => {
                model.versions.insert(
                    version,
                    VersionFiles {
                        model_path,
                        fingerprint,
                    },
                );
            }
            Ok(None) => {}
            Err(err) => {
                model.unreadable_versions.insert(
                    version,
                    format!("cannot read {}: {err}", model_path.display()),
                );
            }
        }
    }
    Ok(())
}

/// The version a directory name stands for: a positive decimal number
/// written as `u64` prints it, so no two directories (`1`, `01`, `+1`) claim
/// one version and which of them serves never depends on the order the
/// directory lists them in.
fn version_number(name: &str) -> Option<u64> {
    let canonical = !name.starts_with('0') && name.bytes().all(|b| b.is_ascii_digit());
    name.parse().ok().filter(|_| canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_follows_the_triton_layout() {
        let root = tempfile::tempdir().unwrap();
        for (model, version) in [("a", "1"), ("a", "3"), ("b", "2")] {
            let dir = root.path().join(model).join(version);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(MODEL_FILE_NAME), b"x").unwrap();
        }
        // Ignored: no model file, a non-numeric version, version 0, a
        // top-level file, versions not written as a plain number.
        for other in ["a/01", "a/05", "a/+6", "a/ 7", "b/007"] {
            std::fs::create_dir_all(root.path().join(other)).unwrap();
            std::fs::write(root.path().join(other).join(MODEL_FILE_NAME), b"x").unwrap();
        }
        std::fs::create_dir_all(root.path().join("a/4")).unwrap();
        std::fs::create_dir_all(root.path().join("a/latest")).unwrap();
        std::fs::create_dir_all(root.path().join("b/0")).unwrap();
        std::fs::write(root.path().join("b/0/model.onnx"), b"x").unwrap();
        std::fs::write(root.path().join("README"), b"x").unwrap();
        std::fs::write(root.path().join("a/config.toml"), b"").unwrap();

        let scan = scan(root.path()).unwrap();
        assert_eq!(scan.models.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(
            scan.models["a"]
                .versions
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [1, 3]
        );
        assert_eq!(
            scan.models["a"].versions[&1].model_path,
            root.path().join("a/1").join(MODEL_FILE_NAME)
        );
        assert_eq!(
            scan.models["b"]
                .versions
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            [2]
        );
        assert!(scan.models["a"].config_fingerprint.is_some());
        assert!(scan.models["b"].config_fingerprint.is_none());
    }

    #[test]
    fn missing_repository_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let err = scan(&root.path().join("nope")).unwrap_err();
        assert!(matches!(err, RepositoryError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn a_file_is_not_a_repository() {
        let file = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            scan(file.path()).unwrap_err(),
            RepositoryError::NotADirectory { .. }
        ));
    }
}
