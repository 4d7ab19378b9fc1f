//! Atomic file writes with explicit permissions.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{PkiError, Result};

/// Writes a file atomically (temporary file in the same directory, fsync,
/// rename, fsync of the directory) with mode 0600. The temporary file is
/// created with mode 0600, so the contents are never readable by others, not
/// even briefly.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomically(path, contents, 0o600)
}

/// Writes a public file (certificates) atomically with mode 0644.
pub fn write_public_file(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomically(path, contents, 0o644)
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| {
            PkiError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            )
        })?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{file_name}.tmp.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));

    let result = (|| {
        let mut file = create_new(&tmp, mode).map_err(|e| PkiError::io(&tmp, e))?;
        file.write_all(contents)
            .map_err(|e| PkiError::io(&tmp, e))?;
        file.sync_all().map_err(|e| PkiError::io(&tmp, e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| PkiError::io(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename durable. Some file systems refuse to fsync a directory:
    // that is not worth failing the write for.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(unix)]
fn create_new(path: &Path, mode: u32) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have removed bits (never added any): set the exact mode.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(file)
}

#[cfg(not(unix))]
fn create_new(path: &Path, _mode: u32) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_and_public_files_have_their_modes_and_replace_old_contents() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("a.key");
        write_private_file(&key, b"one").unwrap();
        write_private_file(&key, b"two").unwrap();
        assert_eq!(fs::read(&key).unwrap(), b"two");
        let crt = dir.path().join("a.crt");
        write_public_file(&crt, b"cert").unwrap();
        assert_eq!(fs::read(&crt).unwrap(), b"cert");
        #[cfg(unix)]
        {
            assert_eq!(mode(&key), 0o600);
            assert_eq!(mode(&crt), 0o644);
        }
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn missing_directory_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("x.key");
        let err = write_private_file(&path, b"x").unwrap_err();
        assert!(matches!(err, PkiError::Io { .. }), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
