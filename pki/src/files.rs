//! Atomic file writes with explicit permissions.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{PkiError, Result};

/// Warns (as ssh does) when the private key file at `path`, `what` in the
/// message ("the CA private key"), can be read or written by others than
/// its owner: a key others can read is no longer private.
pub fn warn_if_key_readable_by_others(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:04o}"),
                    "{what} is readable by other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
}

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

/// Creates a private file (0600) with `contents`, unless `path` already
/// exists: returns whether this call created it. Never replaces a file, and
/// the file appears whole (written to a temporary file, then hard-linked to
/// `path`), so processes racing to create the same file, even on a shared
/// file system, end with exactly one winner whose contents all of them can
/// read.
pub fn create_private_file(path: &Path, contents: &[u8]) -> Result<bool> {
    create_once(path, contents, 0o600)
}

/// [`create_private_file`] for a public file (0644).
pub fn create_public_file(path: &Path, contents: &[u8]) -> Result<bool> {
    create_once(path, contents, 0o644)
}

fn create_once(path: &Path, contents: &[u8], mode: u32) -> Result<bool> {
    let (dir, tmp) = temporary_path(path)?;
    let result = (|| {
        write_new(&tmp, contents, mode)?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(link_error) => {
                // A file system without hard links: exclusive creation still
                // picks one winner (a racing reader may see it partly written).
                let mut file = match create_new(path, mode) {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
                    Err(_) => return Err(PkiError::io(path, link_error)),
                };
                file.write_all(contents)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| PkiError::io(path, e))?;
                Ok(true)
            }
        }
    })();
    let _ = fs::remove_file(&tmp);
    if let Ok(true) = result
        && let Ok(d) = File::open(&dir)
    {
        let _ = d.sync_all();
    }
    result
}

/// Creates `path` (never an existing file) with `contents` and `mode`, and
/// syncs it to disk.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut file = create_new(path, mode).map_err(|e| PkiError::io(path, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| PkiError::io(path, e))
}

/// The directory of `path` and a fresh temporary path next to it.
fn temporary_path(path: &Path) -> Result<(PathBuf, PathBuf)> {
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
    Ok((dir, tmp))
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let (dir, tmp) = temporary_path(path)?;

    let result = (|| {
        write_new(&tmp, contents, mode)?;
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
    fn created_files_are_never_replaced_and_racers_agree_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("a.key");
        assert!(create_private_file(&key, b"one").unwrap());
        assert!(!create_private_file(&key, b"two").unwrap());
        assert_eq!(fs::read(&key).unwrap(), b"one");
        let crt = dir.path().join("a.crt");
        assert!(create_public_file(&crt, b"cert").unwrap());
        #[cfg(unix)]
        {
            assert_eq!(mode(&key), 0o600);
            assert_eq!(mode(&crt), 0o644);
        }
        // Racing creators: exactly one wins, and the file holds its contents.
        let raced = dir.path().join("raced.key");
        let winners: Vec<(usize, bool)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let raced = &raced;
                    scope.spawn(move || {
                        (
                            i,
                            create_private_file(raced, format!("{i}").as_bytes()).unwrap(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<usize> = winners
            .iter()
            .filter(|(_, w)| *w)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(won.len(), 1, "{winners:?}");
        assert_eq!(fs::read_to_string(&raced).unwrap(), won[0].to_string());
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
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
