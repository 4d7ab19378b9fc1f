//! `AgentService.DownloadBlob`: a model blob, from an offset, to a device
//! whose desired state names it.

use std::pin::Pin;
use std::sync::Arc;

use edgefleet_proto::edgefleet::v1 as pb;
use futures::{Stream, StreamExt};
use tonic::Status;

use super::{BlobError, is_sha256_hex};
use crate::agent_service::Peer;
use crate::errors::{storage_error, store_unavailable};
use crate::sessions::DownloadGuard;
use crate::state::ControlPlane;
use crate::store::DeviceStatus;

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>;

/// Bytes per `BlobChunk`: big enough that per-message costs vanish, well
/// under the agent's 4 MiB default message limit.
pub const DOWNLOAD_CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks read ahead of the network, per download.
pub const READ_AHEAD_CHUNKS: usize = 2;

/// Streams the blob from `request.offset` to an enrolled, unrevoked device
/// whose desired state names it, over a certificate the device may still
/// use. The stream ends with PERMISSION_DENIED if the device is revoked
/// while it runs.
pub async fn download_blob(
    cp: &ControlPlane,
    peer: &Peer,
    request: pb::DownloadBlobRequest,
) -> Result<BlobStream, Status> {
    let device_id = peer.device_id.as_str();
    let sha256 = request.sha256.to_ascii_lowercase();
    if !is_sha256_hex(&sha256) {
        return Err(Status::invalid_argument(format!(
            "sha256 {:?} is not a hex SHA-256 (64 hex digits)",
            request.sha256
        )));
    }
    // Registered before the device is read: a revocation committed after
    // that read ends the download (the revocation watcher re-reads recent
    // revocations at every poll).
    let guard = cp.sessions.register_download(device_id);
    let (device, blob_desired) = cp
        .store
        .device_for_download(device_id, &sha256)
        .await
        .map_err(store_unavailable("cannot read a device"))?
        .ok_or_else(|| {
            Status::unauthenticated(format!("device {device_id} is not enrolled in this fleet"))
        })?;
    if device.status == DeviceStatus::Revoked {
        return Err(Status::permission_denied(format!(
            "device {device_id} has been revoked"
        )));
    }
    crate::agent_service::check_certificate(&device, &peer.serial)?;
    if !blob_desired {
        return Err(Status::permission_denied(format!(
            "blob {sha256} is not in the desired state of device {device_id}"
        )));
    }
    let offset = request.offset;
    let (file, size) = match cp.registry.blobs.open(&sha256, offset) {
        Ok(opened) => opened,
        Err(BlobError::OutOfRange { offset, size }) => {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end of blob {sha256} ({size} bytes)"
            )));
        }
        Err(BlobError::NotFound(_)) => {
            tracing::error!(%sha256, device = %device_id, "a desired blob is missing from the blob store");
            return Err(Status::not_found(format!(
                "blob {sha256} is missing from the server's blob store"
            )));
        }
        Err(err) => {
            return Err(storage_error(
                tonic::Code::Internal,
                "cannot open a blob",
                &err,
            ));
        }
    };
    tracing::info!(device = %device_id, %sha256, offset, size, "blob download");
    let served = cp.metrics.blob_bytes_served.clone();
    let stream = until_revoked(stream_file(file, offset, size), guard).inspect(move |item| {
        if let Ok(chunk) = item {
            served.inc_by(chunk.data.len() as u64);
        }
    });
    Ok(Box::pin(stream))
}

/// `chunks` until the download's device is revoked: then PERMISSION_DENIED,
/// and the end (chunks read ahead are dropped).
fn until_revoked<S>(
    chunks: S,
    guard: DownloadGuard,
) -> impl Stream<Item = Result<pb::BlobChunk, Status>> + Send + 'static
where
    S: Stream<Item = Result<pb::BlobChunk, Status>> + Send + 'static,
{
    futures::stream::unfold(Some((Box::pin(chunks), guard)), |state| async move {
        let (mut chunks, guard) = state?;
        tokio::select! {
            biased;
            () = guard.revoked.cancelled() => {
                let device_id = guard.device_id();
                tracing::info!(device = %device_id, "ended the blob download of a revoked device");
                Some((
                    Err(Status::permission_denied(format!(
                        "device {device_id} has been revoked"
                    ))),
                    None,
                ))
            }
            chunk = chunks.next() => chunk.map(|chunk| (chunk, Some((chunks, guard)))),
        }
    })
}

/// Yields the blob from `offset` in 1 MiB chunks, each read by its own
/// short blocking task at its position (up to [`READ_AHEAD_CHUNKS`] ahead
/// of the network): no thread is held while a slow device drains its
/// stream, so a thousand concurrent downloads do not exhaust the blocking
/// pool. Ends after the first error, or when the receiver goes away.
pub fn stream_file(
    file: std::fs::File,
    offset: u64,
    size: u64,
) -> impl Stream<Item = Result<pb::BlobChunk, Status>> + Send + 'static {
    let file = Arc::new(file);
    futures::stream::iter((offset..size).step_by(DOWNLOAD_CHUNK_BYTES))
        .map(move |position| {
            let file = Arc::clone(&file);
            let want = (size - position).min(DOWNLOAD_CHUNK_BYTES as u64) as usize;
            async move {
                let read = tokio::task::spawn_blocking(move || read_at(&file, position, want))
                    .await
                    .unwrap_or_else(|err| Err(std::io::Error::other(err)));
                match read {
                    Ok(data) => Ok(pb::BlobChunk {
                        offset: position,
                        data: data.into(),
                        total_size: size,
                    }),
                    Err(err) => Err(storage_error(
                        tonic::Code::Internal,
                        "cannot read a blob",
                        &format!("at offset {position}: {err}"),
                    )),
                }
            }
        })
        .buffered(READ_AHEAD_CHUNKS)
        .scan(false, |failed, item| {
            let next = (!*failed).then(|| {
                *failed = item.is_err();
                item
            });
            std::future::ready(next)
        })
}

/// Reads exactly `len` bytes at `position`.
fn read_at(file: &std::fs::File, position: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut data = vec![0u8; len];
    #[cfg(unix)]
    std::os::unix::fs::FileExt::read_exact_at(file, &mut data, position)?;
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < len {
            let read = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut data[done..],
                position + done as u64,
            )?;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += read;
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn streams_from_an_offset_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..(2 * DOWNLOAD_CHUNK_BYTES + 12345))
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        for offset in [0u64, 1, DOWNLOAD_CHUNK_BYTES as u64, data.len() as u64] {
            let mut file = std::fs::File::open(&path).unwrap();
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).unwrap();
            let chunks: Vec<_> = stream_file(file, offset, data.len() as u64)
                .map(Result::unwrap)
                .collect()
                .await;
            let mut got = Vec::new();
            let mut expected_offset = offset;
            for chunk in &chunks {
                assert_eq!(chunk.offset, expected_offset);
                assert_eq!(chunk.total_size, data.len() as u64);
                assert!(chunk.data.len() <= DOWNLOAD_CHUNK_BYTES);
                expected_offset += chunk.data.len() as u64;
                got.extend_from_slice(&chunk.data);
            }
            assert_eq!(got, data[offset as usize..], "offset {offset}");
        }
    }

    #[tokio::test]
    async fn reads_fast() {
        // Release builds reach GB/s; this only guards against a pathological
        // slowdown in debug builds.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let size = 64 * 1024 * 1024;
        std::fs::write(&path, vec![7u8; size]).unwrap();
        let start = std::time::Instant::now();
        let file = std::fs::File::open(&path).unwrap();
        let total: usize = stream_file(file, 0, size as u64)
            .map(|c| c.unwrap().data.len())
            .fold(0, |a, b| async move { a + b })
            .await;
        assert_eq!(total, size);
        let rate = size as f64 / start.elapsed().as_secs_f64() / 1e6;
        assert!(rate > 100.0, "{rate:.0} MB/s");
    }
}
