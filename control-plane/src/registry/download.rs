//! `AgentService.DownloadBlob`: a model blob, from an offset, to a device
//! whose desired state names it.

use std::pin::Pin;

use edgefleet_proto::edgefleet::v1 as pb;
use futures::Stream;
use tonic::Status;

use crate::state::ControlPlane;

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>;

/// Streams the blob from `request.offset` (placeholder until the registry lands).
pub async fn download_blob(
    _cp: &ControlPlane,
    _device_id: &str,
    _request: pb::DownloadBlobRequest,
) -> Result<BlobStream, Status> {
    Err(Status::unimplemented("blob downloads are not built yet"))
}
