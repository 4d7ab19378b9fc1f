//! `edgefleet-server backup`: a copy of what a control plane keeps, taken
//! while it runs, that `serve --data-dir` starts from as it is.
//!
//! The SQLite database is copied by SQLite itself (`VACUUM INTO`: one
//! consistent snapshot, whatever the server writes meanwhile); the fleet CA,
//! the release key and the admin token are copied with their modes; the
//! model files the snapshot's models name are copied and checked against
//! their SHA-256 on the way. On PostgreSQL the database is left to
//! `pg_dump` (it is not in the data dir) and every model file is copied.
//! A backup that fails part way is removed: a directory left behind is a
//! whole backup.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use edgefleet_daemon::ProgressBar;
use sha2::{Digest, Sha256};
use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use crate::registry::{BlobStore, is_sha256_hex};
use crate::server::ADMIN_TOKEN_FILE;
use crate::store::SQLITE_FILE;

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// Size of the database snapshot; None when the database is PostgreSQL.
    pub database_bytes: Option<u64>,
    /// The data dir's own files copied (CA, keys, admin token).
    pub files: Vec<String>,
    pub blobs: usize,
    pub blob_bytes: u64,
}

/// Backs up the control plane whose files are in `data_dir` and whose
/// database is `database_url` (None: SQLite in the data dir) into `dest`,
/// a directory that must not exist yet. `progress` counts the model files'
/// bytes as they are copied (its length set to their total).
pub async fn backup(
    data_dir: &Path,
    database_url: Option<&str>,
    dest: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<BackupReport> {
    let ca_cert = data_dir.join(edgefleet_pki::CA_CERT_FILE);
    if !ca_cert.is_file() {
        bail!(
            "{} is not a control plane's data dir: it has no {}",
            data_dir.display(),
            edgefleet_pki::CA_CERT_FILE
        );
    }
    let database = sqlite_file(data_dir, database_url)?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dest)
        .with_context(|| format!("cannot create the backup directory {}", dest.display()))?;
    let result = copy_all(data_dir, database.as_deref(), dest, progress).await;
    progress.finish_and_clear();
    if result.is_err() {
        // Only the directory this call made, so that what is left is whole.
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

/// The SQLite file of `database_url`, or None for PostgreSQL.
fn sqlite_file(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<Option<PathBuf>> {
    match database_url {
        None => Ok(Some(data_dir.join(SQLITE_FILE))),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(None),
        Some(url) if url.starts_with("sqlite:") => {
            let options = SqliteConnectOptions::from_str(url)
                .with_context(|| "the database URL is not a SQLite URL")?;
            Ok(Some(options.get_filename().to_path_buf()))
        }
        Some(url) => bail!(
            "unsupported database URL scheme in {:?}: use postgres://… or sqlite://PATH",
            url.split(':').next().unwrap_or_default()
        ),
    }
}

async fn copy_all(
    data_dir: &Path,
    database: Option<&Path>,
    dest: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<BackupReport> {
    // The snapshot first: a push places its model file before its row is
    // committed, so each file the snapshot names is there to copy.
    let (database_bytes, digests) = match database {
        Some(file) => {
            let snapshot = dest.join(SQLITE_FILE);
            snapshot_sqlite(file, &snapshot).await?;
            tracing::info!(database = %file.display(), "database snapshot taken");
            let digests = model_digests(&snapshot).await?;
            (Some(std::fs::metadata(&snapshot)?.len()), digests)
        }
        None => (None, blobs_on_disk(&BlobStore::new(data_dir))?),
    };
    let mut files = Vec::new();
    for (name, mode, required) in [
        (edgefleet_pki::CA_CERT_FILE, 0o644, true),
        (edgefleet_pki::CA_KEY_FILE, 0o600, true),
        (edgefleet_pki::RELEASE_KEY_FILE, 0o600, false),
        (ADMIN_TOKEN_FILE, 0o600, false),
    ] {
        let from = data_dir.join(name);
        if !required && !from.exists() {
            continue;
        }
        copy_file(&from, &dest.join(name), mode, None, None)?;
        files.push(name.to_string());
    }
    let source = BlobStore::new(data_dir);
    let target = BlobStore::new(dest);
    // A fleet's model files may be gigabytes: a byte count to show.
    let total: u64 = digests
        .iter()
        .filter_map(|digest| std::fs::metadata(source.path(digest)).ok())
        .map(|meta| meta.len())
        .sum();
    progress.set_length(total);
    let mut blob_bytes = 0;
    for (done, digest) in digests.iter().enumerate() {
        let from = source.path(digest);
        if !from.exists() {
            bail!(
                "the model file {} that the database names is missing from {} (a model deleted during the backup? run it again)",
                digest,
                from.display()
            );
        }
        let to = target.path(digest);
        let parent = to.parent().context("a blob path has a parent")?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        blob_bytes += copy_file(&from, &to, 0o600, Some(digest), Some(progress))?;
        progress.suspend(|| {
            tracing::info!(
                sha256 = %digest,
                done = done + 1,
                of = digests.len(),
                bytes_so_far = blob_bytes,
                "model file copied"
            )
        });
    }
    sync_tree(dest)?;
    Ok(BackupReport {
        database_bytes,
        files,
        blobs: digests.len(),
        blob_bytes,
    })
}

/// One consistent copy of the SQLite database at `file`, made by SQLite
/// while the server may be writing it.
async fn snapshot_sqlite(file: &Path, snapshot: &Path) -> anyhow::Result<()> {
    if !file.is_file() {
        bail!("no SQLite database at {}", file.display());
    }
    let mut db = SqliteConnectOptions::new()
        .filename(file)
        .create_if_missing(false)
        .busy_timeout(std::time::Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot open the database {}", file.display()))?;
    let into = snapshot
        .to_str()
        .context("the backup directory's path is not UTF-8")?;
    sqlx::query("VACUUM INTO ?")
        .bind(into)
        .execute(&mut db)
        .await
        .with_context(|| format!("cannot copy the database {}", file.display()))?;
    std::fs::set_permissions(snapshot, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The digests of the model files the database snapshot names.
async fn model_digests(snapshot: &Path) -> anyhow::Result<Vec<String>> {
    let mut db = SqliteConnectOptions::new()
        .filename(snapshot)
        .read_only(true)
        .connect()
        .await?;
    let digests: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT lower(sha256) FROM models ORDER BY 1")
            .fetch_all(&mut db)
            .await
            .context("cannot read the models of the database snapshot")?;
    if let Some(bad) = digests.iter().find(|d| !is_sha256_hex(d)) {
        bail!("the database names a model file {bad:?} that is not a SHA-256");
    }
    Ok(digests)
}

/// Every model file in the blob store (for a database not in the data dir).
fn blobs_on_disk(blobs: &BlobStore) -> anyhow::Result<Vec<String>> {
    let mut digests = Vec::new();
    if !blobs.root().exists() {
        return Ok(digests);
    }
    for prefix in std::fs::read_dir(blobs.root())? {
        let prefix = prefix?;
        if !prefix.file_type()?.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(prefix.path())? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if is_sha256_hex(&name) {
                digests.push(name);
            }
        }
    }
    digests.sort();
    Ok(digests)
}

/// Copies `from` to a new file `to` created with `mode`, synced; checks the
/// copy's SHA-256 against `digest` when given; counts the bytes on
/// `progress` when given. Returns the bytes copied.
fn copy_file(
    from: &Path,
    to: &Path,
    mode: u32,
    digest: Option<&str>,
    progress: Option<&ProgressBar>,
) -> anyhow::Result<u64> {
    let mut source =
        std::fs::File::open(from).with_context(|| format!("cannot read {}", from.display()))?;
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .with_context(|| format!("cannot create {}", to.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = source.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        target.write_all(&buffer[..n])?;
        copied += n as u64;
        if let Some(progress) = progress {
            progress.inc(n as u64);
        }
    }
    target.sync_all()?;
    if let Some(expected) = digest {
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            bail!(
                "the model file {} is corrupt: its SHA-256 is {actual}, not {expected}",
                from.display()
            );
        }
    }
    Ok(copied)
}

/// Syncs every directory under `dir`, so that the files' names are on disk.
fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        }
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `bytes` into the blob store under their SHA-256; the digest.
    fn put_blob(blobs: &BlobStore, bytes: &[u8]) -> String {
        let digest = hex::encode(Sha256::digest(bytes));
        let path = blobs.path(&digest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
        digest
    }

    /// A backup's progress is the model files' bytes: its length their
    /// total, each copy adding what it copied as it goes (1 MiB chunks).
    #[tokio::test]
    async fn a_backup_counts_its_progress_in_model_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        for name in [edgefleet_pki::CA_CERT_FILE, edgefleet_pki::CA_KEY_FILE] {
            std::fs::write(data.join(name), name).unwrap();
        }
        let blobs = BlobStore::new(&data);
        let big = vec![7u8; 3 * (1 << 20) / 2];
        put_blob(&blobs, &big);
        put_blob(&blobs, b"a small model");
        let total = (big.len() + b"a small model".len()) as u64;

        // Part of the way: one file's copy counts its bytes.
        let progress = ProgressBar::hidden();
        let digest = hex::encode(Sha256::digest(&big));
        let copied = copy_file(
            &blobs.path(&digest),
            &dir.path().join("copy"),
            0o600,
            Some(&digest),
            Some(&progress),
        )
        .unwrap();
        assert_eq!(
            (copied, progress.position()),
            (big.len() as u64, big.len() as u64)
        );

        // A whole backup (on PostgreSQL: every model file on disk).
        let progress = ProgressBar::hidden();
        let report = backup(
            &data,
            Some("postgres://db.example/fleet"),
            &dir.path().join("backup"),
            &progress,
        )
        .await
        .unwrap();
        assert_eq!((report.blobs, report.blob_bytes), (2, total));
        assert_eq!(progress.length(), Some(total));
    }
}
