//! `DownloadBlob` into `blobs/<sha256>.partial`, resuming from the size of
//! that file after a cut stream or an agent restart.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgefleet_proto::edgefleet::v1 as pb;
use pb::agent_service_client::AgentServiceClient;
use tokio::io::AsyncWriteExt;
use tonic::Code;

use super::super::state::StateDir;

/// Largest chunk message accepted from the server.
const MAX_CHUNK_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

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

/// One connection and one `DownloadBlob` stream, appended to `partial`.
/// Returns the blob's total size once the file holds all of it.
pub async fn attempt(
    state: &StateDir,
    connect_timeout: Duration,
    sha256: &str,
    expected_size: u64,
    partial: &Path,
    on_progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<u64, AttemptError> {
    let io = |what: &str, err: std::io::Error| {
        AttemptError::Transient(format!("{what} {}: {err}", partial.display()))
    };
    let mut offset = partial_len(partial)
        .await
        .map_err(|e| io("cannot read", e))?;
    if expected_size > 0 && offset > expected_size {
        // Not this blob's bytes (or a corrupted file): start over.
        tokio::fs::remove_file(partial)
            .await
            .map_err(|e| io("cannot delete", e))?;
        offset = 0;
    }
    if expected_size > 0 && offset == expected_size {
        return Ok(offset);
    }
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
    let mut client =
        AgentServiceClient::new(channel).max_decoding_message_size(MAX_CHUNK_MESSAGE_BYTES);
    let mut stream = client
        .download_blob(pb::DownloadBlobRequest {
            sha256: sha256.to_string(),
            offset,
        })
        .await
        .map_err(|status| {
            if status.code() == Code::OutOfRange {
                AttemptError::Restart(format!(
                    "the control plane says offset {offset} is beyond the blob: {}",
                    status.message()
                ))
            } else {
                status_error(&status)
            }
        })?
        .into_inner();
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)
        .await
        .map_err(|e| io("cannot open", e))?;
    let mut total = (expected_size > 0).then_some(expected_size);
    let outcome = loop {
        let chunk = match stream.message().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status_error(&status)),
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
        if let Err(err) = file.write_all(&chunk.data).await {
            break Err(io("cannot write", err));
        }
        offset = end;
        on_progress(offset, size);
        if offset == size {
            break Ok(());
        }
    };
    // Whatever arrived stays: the next attempt resumes after it.
    let flushed = async {
        file.flush().await?;
        file.sync_all().await
    }
    .await;
    outcome?;
    flushed.map_err(|e| io("cannot sync", e))?;
    match total {
        Some(size) if offset == size => Ok(size),
        Some(size) => Err(AttemptError::Transient(format!(
            "the download stream ended at {offset} of {size} bytes"
        ))),
        None if offset > 0 => Ok(offset),
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
