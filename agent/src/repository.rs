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

/// Enough to notice that a file was replaced or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl Fingerprint {
    fn of(path: &Path) -> Option<Fingerprint> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Fingerprint {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
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

/// Lists every model and version directory. Entries that do not fit the
/// layout (files at the top level, non-numeric or zero version directories,
/// version directories without `model.onnx`) are skipped with a debug log.
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
        if name.starts_with('.') || !dir.is_dir() {
            continue;
        }
        let mut versions = BTreeMap::new();
        let Ok(children) = std::fs::read_dir(&dir) else {
            continue;
        };
        for child in children.flatten() {
            let version_dir = child.path();
            let Some(version) = child
                .file_name()
                .to_str()
                .and_then(|text| text.parse::<u64>().ok())
                .filter(|&version| version > 0)
            else {
                continue;
            };
            let model_path = version_dir.join(MODEL_FILE_NAME);
            if let Some(fingerprint) = Fingerprint::of(&model_path) {
                versions.insert(
                    version,
                    VersionFiles {
                        model_path,
                        fingerprint,
                    },
                );
            }
        }
        models.insert(
            name.clone(),
            ModelDir {
                name,
                config_fingerprint: Fingerprint::of(&dir.join(CONFIG_FILE_NAME)),
                dir,
                versions,
            },
        );
    }
    Ok(RepositoryScan { models })
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
        // Ignored: no model file, a non-numeric version, version 0, a top-level file.
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
