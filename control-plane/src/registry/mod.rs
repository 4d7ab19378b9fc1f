//! The model registry: ONNX validation, the content-addressed blob store,
//! signing with the fleet release key, `ModelService`, and blob downloads
//! for agents.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use edgefleet_pki::ReleaseKey;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub mod download;
pub mod onnx;
pub mod service;

/// Largest model accepted by default: 2 GiB (a protobuf `ModelProto` cannot
/// be larger without external data, which the registry does not take).
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Default multiplier of [`estimated_memory_bytes`]; see there.
pub const DEFAULT_MODEL_MEMORY_FACTOR: f64 = 3.0;
/// Fixed cost of serving any model: the runtime session, thread pools,
/// allocator arenas, the agent's buffers.
pub const MODEL_MEMORY_OVERHEAD_BYTES: u64 = 32 * 1024 * 1024;
/// Share of a device's RAM one model's estimate may take (see [`fits`]).
pub const MAX_DEVICE_MEMORY_SHARE: f64 = 0.5;

/// Device memory needed to serve a model of `size_bytes`:
/// `size × factor + 32 MiB`.
///
/// Why a factor of about 3 (the default): the weights are in memory once as
/// the runtime's initializers, often a second time while the file is read and
/// the session is built (prepacked or re-laid-out weights for the chosen
/// kernels), and the runtime's memory arenas for intermediate activations
/// grow with the model; the overhead covers the session, thread pools and the
/// agent's own buffers. It is an estimate for refusing obviously-too-big
/// rollouts, not an exact figure: a deployment that measures its models can
/// tune it with `--model-memory-factor`.
pub fn estimated_memory_bytes(size_bytes: u64, factor: f64) -> u64 {
    let scaled = (size_bytes as f64 * factor.max(0.0)).ceil();
    let scaled = if scaled >= u64::MAX as f64 {
        u64::MAX
    } else {
        scaled as u64
    };
    scaled.saturating_add(MODEL_MEMORY_OVERHEAD_BYTES)
}

/// Whether a model with this estimate may be sent to a device with
/// `device_memory_bytes` of RAM: the estimate must be at most half of it,
/// leaving the rest to the OS, the agent, other models and the
/// application the device runs. By this rule a device reporting 0 bytes
/// fits nothing; rollouts take 0 as unknown and do not refuse it
/// ([`crate::rollouts::fits_device`]).
pub fn fits(estimated_memory_bytes: u64, device_memory_bytes: u64) -> bool {
    (estimated_memory_bytes as f64) <= device_memory_bytes as f64 * MAX_DEVICE_MEMORY_SHARE
}

/// Whether `text` is a lowercase or uppercase hex SHA-256 (64 hex digits).
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{0:?} is not a hex SHA-256 (64 hex digits)")]
    InvalidDigest(String),
    #[error("no blob {0}")]
    NotFound(String),
    #[error("offset {offset} is past the end of the blob ({size} bytes)")]
    OutOfRange { offset: u64, size: u64 },
    #[error("the model is larger than the limit of {max} bytes")]
    TooLarge { max: u64 },
    #[error("the upload was abandoned")]
    Aborted,
    #[error("blob store I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// An upload [`BlobUpload::finish`] has hashed and synced, not yet at its
/// content address: [`BlobStore::place`] puts it there once its model
/// version is recorded (under the digest's lock, see
/// [`crate::store::RegistryStore::insert_model_with_blob`]). Until then a
/// delete of another model version with the same content may remove the
/// stored blob: this copy puts it back. Dropped unplaced, the copy goes.
#[derive(Debug)]
pub struct UploadedBlob {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    pub size: u64,
    /// The upload's temporary file (removed on drop); `None` once placed.
    file: Option<tempfile::TempPath>,
    /// Where the file is (it moves to the blob's path when placed).
    path: PathBuf,
}

impl UploadedBlob {
    /// The uploaded bytes: the temporary file, or the blob once placed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether [`BlobStore::place`] moved this copy to the blob's path
    /// (false if it found the blob there already, or was not called).
    pub fn placed(&self) -> bool {
        self.file.is_none()
    }
}

/// Where model blobs live: `DATA_DIR/blobs/sha256/<first 2 hex>/<hex>`;
/// uploads in progress are temporary files in `DATA_DIR/blobs/tmp`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    pub fn new(data_dir: &Path) -> BlobStore {
        let blobs = data_dir.join("blobs");
        BlobStore {
            root: blobs.join("sha256"),
            tmp: blobs.join("tmp"),
        }
    }

    /// The directory of the blobs' files (one subdirectory per first two
    /// hex digits of their SHA-256).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of a blob (whether or not it exists).
    pub fn path(&self, sha256: &str) -> PathBuf {
        let prefix = sha256.get(..2).unwrap_or("00");
        self.root.join(prefix).join(sha256)
    }

    /// Creates the directories and removes temporary files a crash left:
    /// those untouched for [`STALE_UPLOAD`]. Newer ones may be uploads in
    /// progress on another replica sharing the data dir.
    pub fn init(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        std::fs::create_dir_all(&self.tmp)?;
        let now = std::time::SystemTime::now();
        for entry in std::fs::read_dir(&self.tmp)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            let idle = meta
                .modified()
                .ok()
                .and_then(|at| now.duration_since(at).ok())
                .unwrap_or_default();
            if meta.is_file() && idle >= STALE_UPLOAD {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn checked(&self, sha256: &str) -> Result<PathBuf, BlobError> {
        if !is_sha256_hex(sha256) {
            return Err(BlobError::InvalidDigest(sha256.to_string()));
        }
        Ok(self.path(&sha256.to_ascii_lowercase()))
    }

    /// Starts a streaming upload of at most `max_bytes`. Chunks are hashed
    /// and written to a temporary file on a blocking thread; `finish` fsyncs
    /// it and names its digest (see [`UploadedBlob`]). Dropping the upload
    /// unfinished (a client gone mid-upload) removes the temporary file.
    pub async fn upload(&self, max_bytes: u64) -> Result<BlobUpload, BlobError> {
        let tmp = self.tmp.clone();
        // Removed on drop unless persisted: every early return cleans up.
        let temp = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&tmp)?;
            tempfile::Builder::new().prefix("upload-").tempfile_in(&tmp)
        })
        .await
        .map_err(|err| BlobError::Io(std::io::Error::other(err.to_string())))??;
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE_CHUNKS);
        let store = self.clone();
        let task = tokio::task::spawn_blocking(move || store.write_upload(temp, rx));
        Ok(BlobUpload {
            tx,
            task,
            written: 0,
            max_bytes,
        })
    }

    fn write_upload(
        &self,
        mut temp: tempfile::NamedTempFile,
        mut rx: mpsc::Receiver<UploadMessage>,
    ) -> Result<UploadedBlob, BlobError> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            match rx.blocking_recv() {
                Some(UploadMessage::Chunk(chunk)) => {
                    hasher.update(&chunk);
                    temp.as_file_mut().write_all(&chunk)?;
                    size += chunk.len() as u64;
                }
                Some(UploadMessage::Finish) => break,
                None => return Err(BlobError::Aborted),
            }
        }
        temp.as_file().sync_all()?;
        let file = temp.into_temp_path();
        Ok(UploadedBlob {
            sha256: hex::encode(hasher.finalize()),
            size,
            path: file.to_path_buf(),
            file: Some(file),
        })
    }

    /// Puts an uploaded blob at its content address, or drops the upload's
    /// copy if an identical blob is there (content is stored once). Call it
    /// only while holding the digest's lock, as
    /// [`crate::store::RegistryStore::insert_model_with_blob`] does: a
    /// replica deleting the blob at the same moment ([`BlobStore::delete`])
    /// holds that lock too. Placing again is a no-op while the blob is there.
    pub fn place(&self, blob: &mut UploadedBlob) -> Result<(), BlobError> {
        let path = self.checked(&blob.sha256)?;
        if path.exists() {
            // An identical blob; this copy (if still there) goes on drop.
            return Ok(());
        }
        let Some(file) = blob.file.take() else {
            return Err(BlobError::NotFound(blob.sha256.clone()));
        };
        let dir = path.parent().unwrap_or(&self.root);
        if let Err(err) = std::fs::create_dir_all(dir) {
            blob.file = Some(file);
            return Err(err.into());
        }
        match file.persist(&path) {
            Ok(()) => {
                sync_dir(dir);
                blob.path = path;
                Ok(())
            }
            Err(err) => {
                blob.file = Some(err.path);
                Err(err.error.into())
            }
        }
    }

    /// A blob's size; `None` if it is not stored.
    pub fn size(&self, sha256: &str) -> Result<Option<u64>, BlobError> {
        match std::fs::metadata(self.checked(sha256)?) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Opens a blob positioned at `offset`; returns the file and the blob's
    /// size. `offset == size` is allowed (nothing left to read).
    pub fn open(&self, sha256: &str, offset: u64) -> Result<(std::fs::File, u64), BlobError> {
        use std::io::{Seek, SeekFrom};
        let path = self.checked(sha256)?;
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(sha256.to_string()));
            }
            Err(err) => return Err(err.into()),
        };
        let size = file.metadata()?.len();
        if offset > size {
            return Err(BlobError::OutOfRange { offset, size });
        }
        file.seek(SeekFrom::Start(offset))?;
        Ok((file, size))
    }

    /// Removes a blob; false if it was not there. Call it only while
    /// holding the digest's lock, having found no model version that uses
    /// the blob, as [`crate::store::RegistryStore::drop_blob_if_unreferenced`]
    /// does: a push of the same content on any replica places its copy under
    /// that lock ([`BlobStore::place`]) after recording its version.
    pub fn delete(&self, sha256: &str) -> Result<bool, BlobError> {
        match std::fs::remove_file(self.checked(sha256)?) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err.into()),
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// Chunks in flight between the RPC and the writing thread.
const UPLOAD_QUEUE_CHUNKS: usize = 8;

enum UploadMessage {
    Chunk(Bytes),
    Finish,
}

/// An upload in progress (see [`BlobStore::upload`]).
#[derive(Debug)]
pub struct BlobUpload {
    tx: mpsc::Sender<UploadMessage>,
    task: JoinHandle<Result<UploadedBlob, BlobError>>,
    written: u64,
    max_bytes: u64,
}

impl std::fmt::Debug for UploadMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadMessage::Chunk(chunk) => write!(f, "Chunk({} bytes)", chunk.len()),
            UploadMessage::Finish => f.write_str("Finish"),
        }
    }
}

impl BlobUpload {
    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends a chunk; `TooLarge` (and the upload is abandoned) past the limit.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), BlobError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let written = self.written.saturating_add(chunk.len() as u64);
        if written > self.max_bytes {
            return Err(BlobError::TooLarge {
                max: self.max_bytes,
            });
        }
        self.written = written;
        if self.tx.send(UploadMessage::Chunk(chunk)).await.is_err() {
            // The writer stopped: report its error.
            return Err(self.fail().await);
        }
        Ok(())
    }

    /// Gives the upload up and waits until its temporary file is gone, so
    /// a refusal answered after this leaves nothing behind. (Dropping the
    /// upload instead removes the file soon after, on the writing thread.)
    pub async fn abandon(mut self) {
        let _ = self.fail().await;
    }

    async fn fail(&mut self) -> BlobError {
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        match (&mut self.task).await {
            Ok(Err(err)) => err,
            Ok(Ok(_)) => BlobError::Aborted,
            Err(err) => BlobError::Io(std::io::Error::other(err.to_string())),
        }
    }

    /// Ends the upload: the file is synced and its digest known.
    pub async fn finish(mut self) -> Result<UploadedBlob, BlobError> {
        if self.tx.send(UploadMessage::Finish).await.is_err() {
            return Err(self.fail().await);
        }
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        match (&mut self.task).await {
            Ok(result) => result,
            Err(err) => Err(BlobError::Io(std::io::Error::other(err.to_string()))),
        }
    }
}

/// The registry's parts every handler shares.
#[derive(Debug)]
pub struct Registry {
    pub blobs: BlobStore,
    pub release_key: ReleaseKey,
}

impl Registry {
    /// Opens the blob store and loads or creates the release key (0600).
    pub fn open(data_dir: &Path) -> anyhow::Result<Registry> {
        let (release_key, created) = ReleaseKey::load_or_create(data_dir)?;
        if created {
            tracing::info!("created the fleet release key");
        }
        let blobs = BlobStore::new(data_dir);
        blobs.init().map_err(|err| {
            anyhow::anyhow!(
                "cannot prepare the blob store in {}: {err}",
                data_dir.join("blobs").display()
            )
        })?;
        Ok(Registry { blobs, release_key })
    }
}

/// A temporary upload file nobody wrote to for this long is a crash's
/// leftover (an upload in progress writes every chunk as it arrives, and a
/// finished one is checked and placed, or dropped, right after).
pub const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(3600);

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica starting on a shared data dir removes what crashed uploads
    /// left, but not another replica's upload in progress.
    #[test]
    fn init_removes_stale_upload_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        store.init().unwrap();
        let stale = store.tmp.join("crashed");
        let live = store.tmp.join("in-progress");
        std::fs::write(&stale, b"left by a crash").unwrap();
        std::fs::write(&live, b"being written").unwrap();
        let long_ago = std::time::SystemTime::now() - STALE_UPLOAD * 2;
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        store.init().unwrap();
        assert!(!stale.exists(), "a crash's leftover is removed");
        assert!(live.exists(), "an upload in progress is kept");
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    out.extend(files_in(&path));
                } else {
                    out.push(path);
                }
            }
        }
        out
    }

    async fn put(store: &BlobStore, data: &[u8], chunk: usize) -> UploadedBlob {
        let mut upload = store.upload(u64::MAX).await.unwrap();
        for part in data.chunks(chunk) {
            upload.write(Bytes::copy_from_slice(part)).await.unwrap();
        }
        upload.finish().await.unwrap()
    }

    #[tokio::test]
    async fn identical_uploads_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        store.init().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut first = put(&store, &data, 65536).await;
        assert_eq!(first.size, data.len() as u64);
        assert_eq!(first.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(std::fs::read(first.path()).unwrap(), data);
        assert_eq!(store.size(&first.sha256).unwrap(), None, "not placed yet");
        let mut second = put(&store, &data, 1000).await;
        assert_eq!(second.sha256, first.sha256);
        store.place(&mut first).unwrap();
        assert!(first.placed());
        assert_eq!(first.path(), store.path(&first.sha256));
        store.place(&mut second).unwrap();
        assert!(!second.placed(), "an identical blob was there");
        store.place(&mut first).unwrap();
        drop(second);
        let files = files_in(&dir.path().join("blobs"));
        assert_eq!(files, vec![store.path(&first.sha256)]);
        assert_eq!(std::fs::read(store.path(&first.sha256)).unwrap(), data);
        assert_eq!(store.size(&first.sha256).unwrap(), Some(data.len() as u64));

        let (mut file, size) = store.open(&first.sha256, 1000).unwrap();
        assert_eq!(size, data.len() as u64);
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut rest).unwrap();
        assert_eq!(rest, data[1000..]);
        assert!(store.open(&first.sha256, size).is_ok());
        assert!(matches!(
            store.open(&first.sha256, size + 1),
            Err(BlobError::OutOfRange { .. })
        ));
        assert!(matches!(
            store.open(&"0".repeat(64), 0),
            Err(BlobError::NotFound(_))
        ));
        assert!(matches!(
            store.open("../../etc/passwd", 0),
            Err(BlobError::InvalidDigest(_))
        ));

        // A blob deleted while another upload of the same content waited to
        // be placed: that upload's copy puts it back.
        let mut third = put(&store, &data, 4096).await;
        assert!(store.delete(&first.sha256).unwrap());
        assert!(!store.delete(&first.sha256).unwrap());
        assert_eq!(store.size(&first.sha256).unwrap(), None);
        store.place(&mut third).unwrap();
        assert!(third.placed());
        assert_eq!(std::fs::read(store.path(&first.sha256)).unwrap(), data);
        // An upload dropped unplaced leaves nothing.
        let fourth = put(&store, &data, 4096).await;
        drop(fourth);
        let files = files_in(&dir.path().join("blobs"));
        assert_eq!(files, vec![store.path(&first.sha256)]);
    }

    #[tokio::test]
    async fn abandoned_and_oversized_uploads_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        store.init().unwrap();
        let mut upload = store.upload(u64::MAX).await.unwrap();
        upload.write(Bytes::from_static(b"partial")).await.unwrap();
        drop(upload);
        let mut upload = store.upload(10).await.unwrap();
        upload.write(Bytes::from_static(b"123456")).await.unwrap();
        let err = upload
            .write(Bytes::from_static(b"7890AB"))
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { max: 10 }), "{err}");
        drop(upload);
        // The writer threads notice the closed channel and remove their files.
        for _ in 0..100 {
            if files_in(&dir.path().join("blobs")).is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let left = files_in(&dir.path().join("blobs"));
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn memory_estimate_and_fit() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(
            estimated_memory_bytes(100 * MIB, DEFAULT_MODEL_MEMORY_FACTOR),
            332 * MIB
        );
        assert_eq!(estimated_memory_bytes(0, 3.0), 32 * MIB);
        assert_eq!(estimated_memory_bytes(10 * MIB, 1.5), 47 * MIB);
        assert_eq!(estimated_memory_bytes(u64::MAX, 3.0), u64::MAX);
        // Half of the device's RAM, inclusive.
        assert!(fits(512 * MIB, 1024 * MIB));
        assert!(!fits(512 * MIB + 1, 1024 * MIB));
        assert!(!fits(32 * MIB, 0));
    }

    #[test]
    fn digests_are_checked() {
        assert!(is_sha256_hex(&"ab".repeat(32)));
        assert!(is_sha256_hex(&"AB".repeat(32)));
        assert!(!is_sha256_hex(&"ab".repeat(31)));
        assert!(!is_sha256_hex(&"zz".repeat(32)));
    }
}
