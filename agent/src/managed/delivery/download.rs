//! `DownloadBlob` into `blobs/<sha256>.partial`, resuming from the size of
//! that file after a cut stream or an agent restart, and hashing the bytes
//! on their way to the disk (once; a resumed file is hashed when opened).
//! An attempt on which nothing arrives for the stall timeout is given up
//! (to be resumed later): inactivity is judged by the HTTP/2 frames that
//! arrive, not by whole messages, so a slow link that delivers a 1 MiB chunk
//! over minutes is not taken for a stalled one.

use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use edgefleet_proto::edgefleet::v1 as pb;
use pb::agent_service_client::AgentServiceClient;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::codegen::{Body, BoxFuture, Service, http};
use tonic::transport::Channel;

use super::super::state::StateDir;

/// Largest chunk message accepted from the server.
const MAX_CHUNK_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Read size when hashing what an earlier run left in a partial file.
const HASH_BUFFER_BYTES: usize = 1024 * 1024;

/// Why one attempt ended without the whole blob.
#[derive(Debug)]
pub enum AttemptError {
    /// Worth another try (a dropped connection, a bad chunk, ...).
    Transient(String),
    /// The server will not serve this blob; retrying will not help.
    Permanent(String),
    /// The partial file does not fit the blob: delete it and start over.
    Restart(String),
}

fn status_error(status: &tonic::Status) -> AttemptError {
    let text = format!("{} ({:?})", status.message(), status.code());
    match status.code() {
        Code::NotFound | Code::PermissionDenied | Code::InvalidArgument | Code::Unimplemented => {
            AttemptError::Permanent(format!("the control plane refused the download: {text}"))
        }
        _ => AttemptError::Transient(format!("the download failed: {text}")),
    }
}

/// Current size of the partial file (0 when there is none).
pub async fn partial_len(path: &Path) -> std::io::Result<u64> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(meta.len()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(err) => Err(err),
    }
}

/// Progress callback throttle: every 10% or every second.
pub struct Progress {
    last_bytes: u64,
    last_at: Instant,
    interval: Duration,
}

impl Progress {
    pub fn new(interval: Duration) -> Progress {
        Progress {
            last_bytes: 0,
            last_at: Instant::now(),
            interval,
        }
    }

    /// True when `done` out of `total` is worth a report.
    pub fn due(&mut self, done: u64, total: u64) -> bool {
        let step = (total / 10).max(1);
        if done >= self.last_bytes.saturating_add(step)
            || self.last_at.elapsed() >= self.interval
            || (done == total && done != self.last_bytes)
        {
            self.last_bytes = done;
            self.last_at = Instant::now();
            true
        } else {
            false
        }
    }
}

/// The partial download file and the SHA-256 of the bytes it holds, kept
/// across attempts: each byte is hashed once, as it is written, so the
/// digest is ready the moment the last chunk is on disk. Opening a partial
/// file left by an earlier run hashes what it holds (a resumed download).
/// Blocking: use it on a blocking thread.
pub struct PartialFile {
    path: PathBuf,
    file: std::fs::File,
    hasher: Sha256,
    len: u64,
    /// A background sync of this file is running (`start_writeback`).
    writeback_running: Arc<AtomicBool>,
}

impl PartialFile {
    /// Opens `path` for appending, creating it, and hashes what it holds.
    /// A file longer than `expected_size` (when known) cannot be this blob's
    /// beginning: it is emptied.
    pub fn open(path: &Path, expected_size: u64) -> std::io::Result<PartialFile> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let mut on_disk = file.metadata()?.len();
        if expected_size > 0 && on_disk > expected_size {
            file.set_len(0)?;
            on_disk = 0;
        }
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
        let mut len = 0u64;
        // Reads start at 0 even in append mode; writes always go to the end.
        // Only the length the file had is read: what is not a regular file
        // (a device) may never end.
        while len < on_disk {
            let want = usize::try_from(on_disk - len).map_or(buffer.len(), |n| n.min(buffer.len()));
            let read = file.read(&mut buffer[..want])?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            len += read as u64;
        }
        Ok(PartialFile {
            path: path.to_path_buf(),
            file,
            hasher,
            len,
            writeback_running: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Bytes in the file.
    pub fn size(&self) -> u64 {
        self.len
    }

    /// Whether the file still is what this handle hashed (nobody truncated,
    /// replaced or appended to it behind our back).
    fn matches_disk(&self) -> bool {
        let by_path = std::fs::metadata(&self.path).ok();
        let by_handle = self.file.metadata().ok();
        match (by_path, by_handle) {
            (Some(path), Some(handle)) => {
                path.len() == self.len && handle.len() == self.len && same_file(&path, &handle)
            }
            _ => false,
        }
    }

    fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all(data)?;
        self.hasher.update(data);
        let start = self.len;
        self.len += data.len() as u64;
        if start / WRITEBACK_STEP_BYTES != self.len / WRITEBACK_STEP_BYTES {
            self.start_writeback();
        }
        Ok(())
    }

    /// Syncs what the file holds on a thread of its own (one at a time per
    /// file) while the download goes on. Durability still comes from the
    /// `sync_all` at the end of each attempt; this only gets the disk going.
    fn start_writeback(&self) {
        if self.writeback_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let running = Arc::clone(&self.writeback_running);
        let started = self.file.try_clone().and_then(|file| {
            std::thread::Builder::new()
                .name("blob-writeback".into())
                .spawn(move || {
                    let _ = file.sync_data();
                    running.store(false, Ordering::Release);
                })
        });
        if started.is_err() {
            self.writeback_running.store(false, Ordering::Release);
        }
    }

    /// Lower-case hex SHA-256 of the bytes in the file.
    pub fn digest(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

/// Every this many bytes, the disk starts writing what has arrived, so the
/// sync at the end of a download finds little left to write (the disk
/// works while the network delivers).
const WRITEBACK_STEP_BYTES: u64 = 8 * 1024 * 1024;

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    true
}

/// Opens (and hashes) the partial file unless `partial` already holds it.
async fn open_partial(
    partial: &mut Option<PartialFile>,
    path: &Path,
    expected_size: u64,
) -> std::io::Result<()> {
    if let Some(open) = partial.take() {
        let (open, same) = tokio::task::spawn_blocking(move || {
            let same = open.matches_disk();
            (open, same)
        })
        .await
        .map_err(std::io::Error::other)?;
        if same {
            *partial = Some(open);
            return Ok(());
        }
    }
    let path = path.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || PartialFile::open(&path, expected_size))
        .await
        .map_err(std::io::Error::other)??;
    *partial = Some(opened);
    Ok(())
}

/// Appends one chunk (write, then hash) on a blocking thread, so the disk
/// and the hash overlap with the network receiving the next chunk. One
/// chunk at a time: no thread is held for a whole download.
fn spawn_append(
    mut partial: PartialFile,
    data: Bytes,
) -> tokio::task::JoinHandle<std::io::Result<PartialFile>> {
    tokio::task::spawn_blocking(move || {
        partial.append(&data)?;
        Ok(partial)
    })
}

/// Waits for the chunk being written, if any; `Err` means the file must be
/// opened (and hashed) again: a failed write may have left a torn chunk.
async fn settle(
    in_flight: tokio::task::JoinHandle<std::io::Result<PartialFile>>,
) -> std::io::Result<PartialFile> {
    in_flight.await.map_err(std::io::Error::other)?
}

/// Syncs what arrived, so the next attempt resumes after it, and checks
/// that the file on disk is what was hashed.
async fn sync(partial: PartialFile) -> std::io::Result<PartialFile> {
    tokio::task::spawn_blocking(move || {
        partial.file.sync_all()?;
        if !partial.matches_disk() {
            // Another writer (an interrupted attempt's, finishing) touched
            // the file: what was hashed is not what is on disk.
            return Err(std::io::Error::other(
                "the partial file changed while it was written",
            ));
        }
        Ok(partial)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// When bytes last arrived from the control plane on a download.
#[derive(Debug)]
struct Activity(Mutex<Instant>);

impl Activity {
    fn new() -> Activity {
        Activity(Mutex::new(Instant::now()))
    }

    fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// A channel whose responses note in `activity` each frame that arrives.
#[derive(Clone)]
struct WatchedChannel {
    channel: Channel,
    activity: Arc<Activity>,
}

impl Service<http::Request<tonic::body::Body>> for WatchedChannel {
    type Response = http::Response<WatchedBody>;
    type Error = tonic::transport::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.channel.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let call = self.channel.call(request);
        let activity = Arc::clone(&self.activity);
        Box::pin(async move {
            let response = call.await?;
            activity.touch();
            Ok(response.map(|inner| WatchedBody { inner, activity }))
        })
    }
}

/// A response body that notes each frame (an HTTP/2 DATA frame is at most
/// 16 KiB by default) as activity.
struct WatchedBody {
    inner: tonic::body::Body,
    activity: Arc<Activity>,
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.activity.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Awaits `future` unless nothing arrives for `limit` first (`None`). The
/// future is polled before each verdict: frames that arrived while this
/// task was busy elsewhere (writing the previous chunk) count.
async fn unless_stalled<F: Future>(
    activity: &Activity,
    limit: Duration,
    future: F,
) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    loop {
        let wait = limit.saturating_sub(activity.idle());
        match tokio::time::timeout(wait, &mut future).await {
            Ok(output) => return Some(output),
            Err(_) if activity.idle() >= limit => return None,
            Err(_) => {}
        }
    }
}

/// How long an attempt waits to connect, and for anything to arrive.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub stall: Duration,
}

/// One connection and one `DownloadBlob` stream, appended to the partial
/// file at `path` (opened into `partial` if it is not yet). Returns once
/// the file holds the whole blob; `partial` then has its digest.
pub async fn attempt(
    state: &StateDir,
    timeouts: Timeouts,
    sha256: &str,
    expected_size: u64,
    path: &Path,
    partial: &mut Option<PartialFile>,
    on_progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<u64, AttemptError> {
    let io = |what: &str, err: std::io::Error| {
        let text = format!("{what} {}: {err}", path.display());
        match err.kind() {
            // Retrying cannot make room: the device reports the failure
            // (its rollout sees it) instead of retrying for ever.
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                AttemptError::Permanent(format!(
                    "the device's disk is full ({expected_size} bytes are needed): {text}"
                ))
            }
            _ => AttemptError::Transient(text),
        }
    };
    open_partial(partial, path, expected_size)
        .await
        .map_err(|e| io("cannot open", e))?;
    let Some(file) = partial.take() else {
        return Err(AttemptError::Transient(
            "the partial file is not open".to_string(),
        ));
    };
    let mut offset = file.size();
    if expected_size > 0 && offset == expected_size {
        *partial = Some(file);
        return Ok(offset);
    }
    let Timeouts {
        connect: connect_timeout,
        stall: stall_timeout,
    } = timeouts;
    let stalled = || {
        AttemptError::Transient(format!(
            "nothing arrived from the control plane for {stall_timeout:?}"
        ))
    };
    let activity = Arc::new(Activity::new());
    let connected = async {
        let state_for_load = state.clone();
        let (enrollment, identity) = tokio::task::spawn_blocking(move || state_for_load.load())
            .await
            .map_err(|e| AttemptError::Transient(e.to_string()))?
            .map_err(|e| AttemptError::Transient(format!("{e:#}")))?;
        let tls = edgefleet_pki::mtls_client_tls_config(
            &identity.ca_pem,
            &identity.certificate_pem,
            &identity.key_pem,
        )
        .map_err(|e| AttemptError::Transient(format!("{e:#}")))?;
        let channel = edgefleet_pki::connect_tls(&enrollment.server_url, tls, connect_timeout)
            .await
            .map_err(|e| AttemptError::Transient(format!("{e:#}")))?;
        let mut client = AgentServiceClient::new(WatchedChannel {
            channel,
            activity: Arc::clone(&activity),
        })
        .max_decoding_message_size(MAX_CHUNK_MESSAGE_BYTES);
        activity.touch();
        let request = client.download_blob(pb::DownloadBlobRequest {
            sha256: sha256.to_string(),
            offset,
        });
        unless_stalled(&activity, stall_timeout, request)
            .await
            .ok_or_else(stalled)?
            .map_err(|status| {
                if status.code() == Code::OutOfRange {
                    AttemptError::Restart(format!(
                        "the control plane says offset {offset} is beyond the blob: {}",
                        status.message()
                    ))
                } else {
                    status_error(&status)
                }
            })
            .map(tonic::Response::into_inner)
    }
    .await;
    let mut stream = match connected {
        Ok(stream) => stream,
        Err(err) => {
            *partial = Some(file);
            return Err(err);
        }
    };
    let mut idle = Some(file);
    let mut in_flight = None;
    let mut write_error = None;
    let mut total = (expected_size > 0).then_some(expected_size);
    let outcome = loop {
        let chunk = match unless_stalled(&activity, stall_timeout, stream.message()).await {
            Some(Ok(Some(chunk))) => chunk,
            Some(Ok(None)) => break Ok(()),
            Some(Err(status)) => break Err(status_error(&status)),
            None => break Err(stalled()),
        };
        if chunk.offset != offset {
            break Err(AttemptError::Transient(format!(
                "the control plane sent a chunk at offset {}, expected {offset}",
                chunk.offset
            )));
        }
        match total {
            Some(size) if chunk.total_size != size => {
                break Err(AttemptError::Permanent(format!(
                    "the control plane's blob is {} bytes, the desired state says {size}",
                    chunk.total_size
                )));
            }
            None => total = Some(chunk.total_size),
            _ => {}
        }
        let size = total.unwrap_or(chunk.total_size);
        let end = offset.saturating_add(chunk.data.len() as u64);
        if end > size {
            break Err(AttemptError::Transient(format!(
                "the control plane sent bytes up to {end} of a {size}-byte blob"
            )));
        }
        let file = match (idle.take(), in_flight.take()) {
            (Some(file), _) => file,
            (None, Some(previous)) => match settle(previous).await {
                Ok(file) => file,
                Err(err) => {
                    write_error = Some(err);
                    break Ok(());
                }
            },
            (None, None) => break Ok(()),
        };
        in_flight = Some(spawn_append(file, chunk.data));
        offset = end;
        on_progress(offset, size);
        if offset == size {
            break Ok(());
        }
    };
    drop(stream);
    let file = match (idle, in_flight) {
        (Some(file), _) => Ok(file),
        (None, Some(last)) => settle(last).await,
        (None, None) => Err(write_error
            .take()
            .unwrap_or_else(|| std::io::Error::other("the partial file was lost"))),
    };
    let synced = match file {
        Ok(file) => sync(file).await,
        Err(err) => Err(err),
    };
    let written_len = match synced {
        Ok(file) => {
            let len = file.size();
            *partial = Some(file);
            len
        }
        Err(err) => {
            // `partial` stays empty: the file may hold a torn write the
            // hash has not seen, so the next attempt hashes it again.
            outcome?;
            return Err(io("cannot write", err));
        }
    };
    outcome?;
    match total {
        Some(size) if written_len == size => Ok(size),
        Some(size) => Err(AttemptError::Transient(format!(
            "the download stream ended at {written_len} of {size} bytes"
        ))),
        None if written_len > 0 => Ok(written_len),
        None => Err(AttemptError::Transient(
            "the download stream ended without data".to_string(),
        )),
    }
}

/// Renames a verified partial file to its final name in the cache.
pub async fn finish(partial: &Path, blob: &Path) -> anyhow::Result<()> {
    let (partial, blob) = (partial.to_path_buf(), blob.to_path_buf());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        std::fs::rename(&partial, &blob)
            .with_context(|| format!("cannot rename {}", partial.display()))?;
        if let Some(dir) = blob.parent() {
            super::files::sync_dir(dir)?;
        }
        Ok(())
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn a_resumed_partial_file_is_hashed_when_opened_and_appends_extend_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.partial");
        let whole: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &whole[..1_234_567]).unwrap();
        let mut partial = PartialFile::open(&path, whole.len() as u64).unwrap();
        assert_eq!(partial.size(), 1_234_567);
        assert_eq!(partial.digest(), sha256_hex(&whole[..1_234_567]));
        partial.append(&whole[1_234_567..2_000_000]).unwrap();
        partial.append(&whole[2_000_000..]).unwrap();
        assert!(partial.matches_disk());
        assert_eq!(partial.digest(), sha256_hex(&whole));
        assert_eq!(std::fs::read(&path).unwrap(), whole);
    }

    /// The stall verdict is about inactivity: a future that takes three
    /// times the limit completes while activity goes on; without activity
    /// it is given up after the limit; one that is ready counts even after a
    /// long silence (its data arrived while the task was busy elsewhere).
    #[tokio::test]
    async fn only_inactivity_counts_as_a_stall() {
        let limit = Duration::from_millis(200);
        let activity = Arc::new(Activity::new());
        let toucher = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move {
                for _ in 0..12 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    activity.touch();
                }
            })
        };
        let slow = tokio::time::sleep(Duration::from_millis(600));
        assert_eq!(unless_stalled(&activity, limit, slow).await, Some(()));
        toucher.await.unwrap();

        let started = Instant::now();
        let never = std::future::pending::<()>();
        assert_eq!(unless_stalled(&activity, limit, never).await, None);
        assert!(started.elapsed() >= Duration::from_millis(150));

        std::thread::sleep(Duration::from_millis(300));
        let ready = std::future::ready(7);
        assert_eq!(unless_stalled(&activity, limit, ready).await, Some(7));
    }

    #[test]
    fn a_partial_file_longer_than_the_blob_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.partial");
        std::fs::write(&path, b"0123456789").unwrap();
        let partial = PartialFile::open(&path, 4).unwrap();
        assert_eq!(partial.size(), 0);
        assert_eq!(partial.digest(), sha256_hex(b""));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_file_changed_behind_the_handle_no_longer_matches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.partial");
        let mut partial = PartialFile::open(&path, 0).unwrap();
        partial.append(b"abc").unwrap();
        assert!(partial.matches_disk());
        let mut other = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        other.write_all(b"d").unwrap();
        assert!(!partial.matches_disk());
    }
}
