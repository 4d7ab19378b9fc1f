//! The file side of delivery, all blocking (run on `spawn_blocking`): the
//! blob cache, digests, atomic installs into the model repository and
//! pruning of old versions.
//!
//! Everything the registry's rescan can see appears by one `rename` of a
//! complete, synced file or directory: a new version's whole directory, or
//! a new `model.onnx` over the one of a version already there. So a scan
//! never sees a half-written `model.onnx`, and a version being replaced
//! never disappears, not even for a moment or after a crash. Work areas live
//! under `models/.staging`, `models/.trash` and `models/.held` (versions
//! above a rollback's target, until it serves), which the repository scan
//! skips (dot names).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context;

use crate::repository::{HELD_DIR, MODEL_FILE_NAME};

const STAGING_DIR: &str = ".staging";
const TRASH_DIR: &str = ".trash";

pub use crate::repository::sha256_file;

/// Digests of files, remembered by (size, modification time) so an unchanged
/// model is not hashed again at every desired state.
#[derive(Debug, Default)]
pub struct DigestCache {
    known: Mutex<HashMap<PathBuf, (Stamp, String)>>,
}

/// Size and modification time of a file.
type Stamp = (u64, Option<SystemTime>);

impl DigestCache {
    /// The file's digest, or `None` when it does not exist.
    pub fn digest(&self, path: &Path) -> std::io::Result<Option<String>> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => return Ok(None),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let key = (meta.len(), meta.modified().ok());
        {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((stamp, digest)) = known.get(path)
                && *stamp == key
            {
                return Ok(Some(digest.clone()));
            }
        }
        let digest = sha256_file(path)?;
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf(), (key, digest.clone()));
        Ok(Some(digest))
    }
}

/// fsync a directory, so a rename in it survives a power cut.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn nonce() -> String {
    format!("{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// Version directories of one model on disk (numeric names > 0), ascending.
pub fn versions_on_disk(models_dir: &Path, name: &str) -> std::io::Result<Vec<u64>> {
    let dir = models_dir.join(name);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut versions: Vec<u64> = entries
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u64>().ok())
        .filter(|&version| version > 0)
        .collect();
    versions.sort_unstable();
    Ok(versions)
}

/// Looks for a file with this digest among the installed models (any name,
/// any version) and copies it into the blob cache. Returns whether it did.
pub fn copy_installed_blob(
    digests: &DigestCache,
    models_dir: &Path,
    blobs_dir: &Path,
    sha256: &str,
    size: u64,
) -> anyhow::Result<bool> {
    let Ok(models) = std::fs::read_dir(models_dir) else {
        return Ok(false);
    };
    for model in models.flatten() {
        let name = model.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        for version in versions_on_disk(models_dir, name)? {
            let path = model.path().join(version.to_string()).join(MODEL_FILE_NAME);
            if size > 0 && std::fs::metadata(&path).map(|m| m.len()).ok() != Some(size) {
                continue;
            }
            if digests.digest(&path)?.as_deref() == Some(sha256) {
                let tmp = blobs_dir.join(format!("{sha256}.copy-{}", nonce()));
                let result = (|| -> anyhow::Result<()> {
                    std::fs::copy(&path, &tmp)
                        .with_context(|| format!("cannot copy {}", path.display()))?;
                    std::fs::File::open(&tmp)?.sync_all()?;
                    if sha256_file(&tmp)? != sha256 {
                        anyhow::bail!("{} changed while it was copied", path.display());
                    }
                    std::fs::rename(&tmp, blobs_dir.join(sha256))?;
                    sync_dir(blobs_dir)?;
                    Ok(())
                })();
                if result.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                result?;
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Moves a checked blob into `models/<name>/<version>/model.onnx`
/// atomically: the file goes into a staging directory and is synced; then
/// one `rename` makes it visible. A new version's whole directory is
/// renamed into place. A version directory already there (a different
/// file) keeps its place and gets the new file renamed over its
/// `model.onnx`: at every moment, and after a crash at any point, the
/// repository holds that version complete, the old file or the new, never
/// no version or half a file (moving the old directory out first, as
/// `rename` cannot replace a directory that is not empty, would leave a
/// moment, and after a crash a restart, without it).
pub fn install(models_dir: &Path, blob: &Path, name: &str, version: u64) -> anyhow::Result<()> {
    install_with(models_dir, blob, name, version, &mut |_| {})
}

/// [`install`], calling `step` after each change on disk with what it did
/// (tests look at the repository there, as a rescan or a crash would).
fn install_with(
    models_dir: &Path,
    blob: &Path,
    name: &str,
    version: u64,
    step: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let staging = models_dir.join(STAGING_DIR);
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let tmp_dir = staging.join(format!("{name}-{version}-{}", nonce()));
    std::fs::create_dir(&tmp_dir)
        .with_context(|| format!("cannot create {}", tmp_dir.display()))?;
    step("staging directory created");
    let result = (|| -> anyhow::Result<()> {
        let tmp_model = tmp_dir.join(MODEL_FILE_NAME);
        if std::fs::rename(blob, &tmp_model).is_err() {
            // Another file system: copy instead.
            std::fs::copy(blob, &tmp_model)
                .with_context(|| format!("cannot copy {}", blob.display()))?;
        }
        std::fs::File::open(&tmp_model)?.sync_all()?;
        sync_dir(&tmp_dir)?;
        step("model staged");
        let model_dir = models_dir.join(name);
        std::fs::create_dir_all(&model_dir)
            .with_context(|| format!("cannot create {}", model_dir.display()))?;
        let target = model_dir.join(version.to_string());
        let existing = std::fs::symlink_metadata(&target).ok();
        if existing.as_ref().is_some_and(|meta| meta.is_dir()) {
            let model = target.join(MODEL_FILE_NAME);
            std::fs::rename(&tmp_model, &model).with_context(|| {
                format!(
                    "cannot move {} into place at {}",
                    tmp_model.display(),
                    model.display()
                )
            })?;
            sync_dir(&target)?;
            step("model file replaced");
            return Ok(());
        }
        if existing.is_some() {
            // Not a directory: a file (no version to the scan), or a
            // symlink, replaced by the directory rather than written
            // through (`rename` cannot put a directory over either).
            move_to_trash(models_dir, &target)?;
            step("non-directory moved out");
        }
        std::fs::rename(&tmp_dir, &target).with_context(|| {
            format!(
                "cannot move {} into place at {}",
                tmp_dir.display(),
                target.display()
            )
        })?;
        sync_dir(&model_dir)?;
        step("version directory renamed into place");
        Ok(())
    })();
    // Gone already if its directory became the version's.
    let _ = std::fs::remove_dir_all(&tmp_dir);
    empty_trash(models_dir);
    result
}

/// Takes a version directory out of the repository with one rename, then
/// deletes it.
fn move_to_trash(models_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let trash = models_dir.join(TRASH_DIR);
    std::fs::create_dir_all(&trash)
        .with_context(|| format!("cannot create {}", trash.display()))?;
    let label = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("version");
    let parent = dir
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("model");
    let target = trash.join(format!("{parent}-{label}-{}", nonce()));
    std::fs::rename(dir, &target)
        .with_context(|| format!("cannot move {} out of the repository", dir.display()))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn empty_trash(models_dir: &Path) {
    let trash = models_dir.join(TRASH_DIR);
    if let Ok(entries) = std::fs::read_dir(&trash) {
        for entry in entries.flatten() {
            if let Err(err) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %err, "cannot delete an old model version");
            }
        }
    }
}

/// Cleans up after an interrupted run (a crash, SIGKILL): held versions go
/// back into the repository ([`restore_held`]); staged installs, trashed
/// versions and half-made blob copies are deleted. `.partial` downloads
/// stay: they are resumed.
pub fn clean_work_areas(models_dir: &Path, blobs_dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(models_dir.join(HELD_DIR)) {
        for name in entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
        {
            match restore_held(models_dir, &name) {
                Ok(restored) => {
                    tracing::info!(model = %name, ?restored, "held model versions restored")
                }
                Err(err) => {
                    tracing::warn!(model = %name, error = %format!("{err:#}"), "cannot restore held model versions")
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(models_dir.join(STAGING_DIR)) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    empty_trash(models_dir);
    if let Ok(entries) = std::fs::read_dir(blobs_dir) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.contains(".copy-"))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Deletes cached blobs and partial downloads no desired model refers to.
pub fn collect_garbage(blobs_dir: &Path, wanted: &[&str]) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(blobs_dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let digest = name.strip_suffix(".partial").unwrap_or(&name);
        if !wanted.contains(&digest) && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    removed.sort();
    removed
}

/// What [`prune`] did with the versions it took out of the repository.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Deleted.
    pub removed: Vec<u64>,
    /// Moved to `models/.held/<name>/`, out of the scan's sight, until
    /// `keep` serves ([`drop_held`]) or fails ([`restore_held`]).
    pub held: Vec<u64>,
}

/// Takes out of the repository every version of `name` but `keep` and one
/// below it, kept for rollback: the highest of those `serving` (the
/// versions the agent serves now, known to load), else the highest on
/// disk. A version that failed to load after the serving one was installed
/// is not kept in its stead. Versions above `keep` (a rollback) are held,
/// not deleted, unless `broken` (failed to load for good, not serving). If taking
/// one out fails, the held ones are put back before the error returns.
pub fn prune(
    models_dir: &Path,
    name: &str,
    keep: u64,
    serving: &[u64],
    broken: &[u64],
) -> anyhow::Result<Pruned> {
    let versions = versions_on_disk(models_dir, name)?;
    let below = |versions: &mut dyn Iterator<Item = u64>| versions.filter(|&v| v < keep).max();
    let previous = below(&mut serving.iter().copied())
        .filter(|version| versions.contains(version))
        .or_else(|| below(&mut versions.iter().copied()));
    let held_dir = models_dir.join(HELD_DIR).join(name);
    let mut pruned = Pruned::default();
    let result = versions
        .into_iter()
        .filter(|&version| version != keep && Some(version) != previous)
        .try_for_each(|version| {
            let dir = models_dir.join(name).join(version.to_string());
            if version < keep || broken.contains(&version) {
                move_to_trash(models_dir, &dir)?;
                pruned.removed.push(version);
                return Ok(());
            }
            std::fs::create_dir_all(&held_dir)?;
            std::fs::rename(&dir, held_dir.join(version.to_string()))
                .with_context(|| format!("cannot move {} out of the repository", dir.display()))?;
            sync_dir(&held_dir)?;
            sync_dir(&models_dir.join(name))?;
            pruned.held.push(version);
            anyhow::Ok(())
        });
    empty_trash(models_dir);
    if let Err(err) = result {
        if let Err(undo) = restore_held(models_dir, name) {
            return Err(err.context(format!("and the held versions stay held: {undo:#}")));
        }
        return Err(err);
    }
    Ok(pruned)
}

/// Deletes the versions of `name` that [`prune`] held.
pub fn drop_held(models_dir: &Path, name: &str) -> anyhow::Result<()> {
    let held_dir = models_dir.join(HELD_DIR).join(name);
    if std::fs::symlink_metadata(&held_dir).is_ok() {
        move_to_trash(models_dir, &held_dir)?;
        empty_trash(models_dir);
    }
    Ok(())
}

/// Moves the versions of `name` that [`prune`] held back into the
/// repository (one rename each); returns them. A held version whose number
/// is in the repository again is an older copy, and is deleted.
pub fn restore_held(models_dir: &Path, name: &str) -> anyhow::Result<Vec<u64>> {
    let held_dir = models_dir.join(HELD_DIR).join(name);
    let model_dir = models_dir.join(name);
    let mut restored = Vec::new();
    for version in versions_on_disk(&models_dir.join(HELD_DIR), name)? {
        let (from, to) = (
            held_dir.join(version.to_string()),
            model_dir.join(version.to_string()),
        );
        if std::fs::symlink_metadata(&to).is_ok() {
            move_to_trash(models_dir, &from)?;
            continue;
        }
        std::fs::create_dir_all(&model_dir)?;
        std::fs::rename(&from, &to)
            .with_context(|| format!("cannot move {} back into the repository", from.display()))?;
        sync_dir(&model_dir)?;
        restored.push(version);
    }
    // Only if empty: anything else in it is left alone.
    let _ = std::fs::remove_dir(&held_dir);
    empty_trash(models_dir);
    Ok(restored)
}

/// Writes a file atomically: temp file, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        nonce()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(models: &Path, name: &str, version: u64, bytes: &[u8]) {
        let dir = models.join(name).join(version.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MODEL_FILE_NAME), bytes).unwrap();
    }

    #[test]
    fn install_replaces_a_version_directory_and_leaves_no_work_files() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        std::fs::create_dir_all(&models).unwrap();
        put(&models, "m", 3, b"old");
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"new").unwrap();
        install(&models, &blob, "m", 3).unwrap();
        assert_eq!(
            std::fs::read(models.join("m/3/model.onnx")).unwrap(),
            b"new"
        );
        assert!(!blob.exists());
        assert_eq!(
            std::fs::read_dir(models.join(STAGING_DIR)).unwrap().count(),
            0
        );
        // Nothing went through the trash (it may not even exist).
        assert_eq!(
            std::fs::read_dir(models.join(TRASH_DIR)).map_or(0, |d| d.count()),
            0
        );
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    /// A version replaced by one of the same number: after every step of
    /// the install, a rescan finds the version whole, with its old file or
    /// its new one, and so does the restart after a crash at that point
    /// (which cleans the work areas first).
    #[test]
    fn a_replaced_version_is_never_missing_or_partial_not_even_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        put(&models, "m", 3, b"old");
        let blob = blobs.join("digest");
        std::fs::write(&blob, b"new").unwrap();
        let check = |models: &Path, when: &str| {
            let scan = crate::repository::scan(models).unwrap();
            let files = scan
                .models
                .get("m")
                .and_then(|model| model.versions.get(&3))
                .unwrap_or_else(|| panic!("{when}: version 3 is missing"));
            let bytes = std::fs::read(&files.model_path).unwrap();
            assert!(bytes == b"old" || bytes == b"new", "{when}: {bytes:?}");
        };
        let mut steps = Vec::new();
        install_with(&models, &blob, "m", 3, &mut |step| {
            check(&models, &format!("a rescan after '{step}'"));
            let crashed = tempfile::tempdir().unwrap();
            copy_tree(dir.path(), crashed.path());
            let models = crashed.path().join("models");
            clean_work_areas(&models, &crashed.path().join("blobs"));
            check(&models, &format!("a restart after a crash after '{step}'"));
            steps.push(step.to_string());
        })
        .unwrap();
        assert!(steps.len() >= 3, "{steps:?}");
        assert_eq!(
            std::fs::read(models.join("m/3/model.onnx")).unwrap(),
            b"new"
        );
        assert_eq!(
            std::fs::read_dir(models.join(STAGING_DIR)).unwrap().count(),
            0
        );
    }

    #[test]
    fn prune_keeps_the_desired_version_and_one_below() {
        let dir = tempfile::tempdir().unwrap();
        for v in [1, 2, 4, 5, 7] {
            put(dir.path(), "m", v, b"x");
        }
        let removed = prune(dir.path(), "m", 5, &[], &[]).unwrap();
        assert_eq!(removed.removed, [1, 2]);
        assert_eq!(removed.held, [7]);
        assert_eq!(versions_on_disk(dir.path(), "m").unwrap(), [4, 5]);
    }

    /// v5 serves, v6 was installed but failed to load (v5 served on), v7
    /// arrives: v5, which is known to load, is the one kept for rollback.
    #[test]
    fn prune_keeps_the_serving_version_over_a_higher_one_that_failed() {
        let dir = tempfile::tempdir().unwrap();
        for v in [4, 5, 6, 7] {
            put(dir.path(), "m", v, b"x");
        }
        let removed = prune(dir.path(), "m", 7, &[5], &[]).unwrap();
        assert_eq!(removed.removed, [4, 6]);
        assert_eq!(versions_on_disk(dir.path(), "m").unwrap(), [5, 7]);
        // A serving version no longer on disk keeps nothing of its own.
        put(dir.path(), "m", 6, b"x");
        let removed = prune(dir.path(), "m", 7, &[3], &[]).unwrap();
        assert_eq!(removed.removed, [5]);
    }

    /// Versions seen by a rescan of the repository.
    fn scanned(models: &Path, name: &str) -> Vec<u64> {
        let scan = crate::repository::scan(models).unwrap();
        assert_eq!(scan.models.keys().collect::<Vec<_>>(), [name]);
        scan.models[name].versions.keys().copied().collect()
    }

    /// v3 serves, v4 failed to load, the rollback is to v2: v4 is deleted,
    /// v3 moved out of the scan's sight until v2 serves (then deleted) or
    /// fails (then moved back), v1 kept for a later rollback.
    #[test]
    fn a_rollback_holds_the_higher_versions_until_the_lower_serves() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path();
        for v in [1, 2, 3, 4] {
            put(models, "m", v, format!("v{v}").as_bytes());
        }
        let pruned = prune(models, "m", 2, &[3], &[4]).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                removed: vec![4],
                held: vec![3]
            }
        );
        assert_eq!(scanned(models, "m"), [1, 2]);
        // v2 failed: v3 is back, whole.
        assert_eq!(restore_held(models, "m").unwrap(), [3]);
        assert_eq!(scanned(models, "m"), [1, 2, 3]);
        assert_eq!(std::fs::read(models.join("m/3/model.onnx")).unwrap(), b"v3");
        assert!(!models.join(HELD_DIR).join("m").exists());
        // Tried again, v2 serves: v3 goes for good.
        let pruned = prune(models, "m", 2, &[3], &[]).unwrap();
        assert_eq!(pruned.held, [3]);
        drop_held(models, "m").unwrap();
        assert_eq!(restore_held(models, "m").unwrap(), Vec::<u64>::new());
        assert_eq!(scanned(models, "m"), [1, 2]);
        assert!(!models.join(HELD_DIR).join("m").exists());
        assert_eq!(
            std::fs::read_dir(models.join(TRASH_DIR)).unwrap().count(),
            0
        );
    }

    /// A crash (or SIGKILL) while a rollback's target loads: the restart's
    /// clean-up moves the held versions back before anything is scanned.
    #[test]
    fn held_versions_are_moved_back_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        for v in [1, 2, 3] {
            put(&models, "m", v, format!("v{v}").as_bytes());
        }
        put(&models, "other", 1, b"o");
        assert_eq!(prune(&models, "m", 1, &[3], &[]).unwrap().held, [2, 3]);
        // A held copy of a version that is in the repository again is stale.
        put(&models.join(HELD_DIR), "other", 1, b"stale");
        clean_work_areas(&models, &blobs);
        assert_eq!(versions_on_disk(&models, "m").unwrap(), [1, 2, 3]);
        assert_eq!(std::fs::read(models.join("m/3/model.onnx")).unwrap(), b"v3");
        assert_eq!(
            std::fs::read(models.join("other/1/model.onnx")).unwrap(),
            b"o"
        );
        assert_eq!(std::fs::read_dir(models.join(HELD_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn garbage_collection_keeps_wanted_blobs_and_their_partials() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["aa", "bb.partial", "cc", "cc.partial"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let removed = collect_garbage(dir.path(), &["bb", "cc"]);
        assert_eq!(removed, ["aa"]);
        assert!(dir.path().join("bb.partial").exists());
        assert!(dir.path().join("cc").exists());
    }

    #[test]
    fn digests_are_cached_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let cache = DigestCache::default();
        let first = cache.digest(&path).unwrap().unwrap();
        assert_eq!(
            first,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::write(&path, b"abcd").unwrap();
        assert_ne!(cache.digest(&path).unwrap().unwrap(), first);
        assert_eq!(cache.digest(&dir.path().join("none")).unwrap(), None);
    }
}
