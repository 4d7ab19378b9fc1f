//! `edgefleet.v1.ModelService`: push, list, get and delete model versions.
//! Every call needs `authorization: Bearer <token>`.

use std::sync::Arc;

use edgefleet_proto::edgefleet::v1 as pb;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::onnx::{self, OnnxError, OnnxInfo};
use super::{BlobError, BlobStore, BlobUpload, UploadedBlob, estimated_memory_bytes};
use crate::convert;
use crate::errors::{storage_error, store_unavailable};
use crate::operator_service::authorize;
use crate::paging;
use crate::state::{ControlPlane, now_ms};
use crate::store::registry::{ModelConflict, ModelRecord};

/// Largest `PushModelRequest` message the server decodes: chunks are
/// typically 1 MiB; this leaves room for clients that send bigger ones.
pub const MAX_PUSH_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Automatic versions (version 0) retried this often when a concurrent push
/// took the same number.
const AUTO_VERSION_ATTEMPTS: usize = 5;

#[derive(Debug, Clone)]
pub struct ModelApi {
    cp: Arc<ControlPlane>,
}

impl ModelApi {
    pub fn new(cp: Arc<ControlPlane>) -> ModelApi {
        ModelApi { cp }
    }
}

/// `[A-Za-z0-9._-]{1,64}`.
pub fn validate_model_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "model name {name:?} must be 1–64 characters of letters, digits, '.', '_', '-'"
        ))
    }
}

/// Checks a header's name, labels, size and signature fields.
/// The largest model version: versions are stored as signed 64-bit
/// integers, and a larger one would sort below version 1.
pub const MAX_MODEL_VERSION: u64 = i64::MAX as u64;

pub fn validate_header(header: &pb::PushModelHeader, max_bytes: u64) -> Result<(), Status> {
    validate_model_name(&header.name).map_err(Status::invalid_argument)?;
    if header.version > MAX_MODEL_VERSION {
        return Err(Status::invalid_argument(format!(
            "version {} is over the largest, {MAX_MODEL_VERSION}",
            header.version
        )));
    }
    for (key, value) in &header.labels {
        convert::validate_label(key, value).map_err(Status::invalid_argument)?;
    }
    if header.size_bytes > max_bytes {
        return Err(too_large(max_bytes));
    }
    match (
        header.signature.is_empty(),
        header.signature_public_key.is_empty(),
    ) {
        (true, true) => {}
        (false, false) => {
            if header.signature_public_key.len() != 32 {
                return Err(Status::invalid_argument(format!(
                    "signature_public_key must be a raw 32-byte Ed25519 key, not {} bytes",
                    header.signature_public_key.len()
                )));
            }
        }
        _ => {
            return Err(Status::invalid_argument(
                "signature and signature_public_key go together: give both or neither",
            ));
        }
    }
    Ok(())
}

fn too_large(max_bytes: u64) -> Status {
    Status::resource_exhausted(format!(
        "the model is larger than the server's limit of {max_bytes} bytes (--max-model-bytes)"
    ))
}

fn blob_status(err: BlobError, max_bytes: u64) -> Status {
    match err {
        BlobError::TooLarge { .. } => too_large(max_bytes),
        BlobError::Aborted => Status::cancelled("the upload was abandoned"),
        other => storage_error(tonic::Code::Internal, "cannot store a model's blob", &other),
    }
}

/// Reads a push stream: the header, then the chunks into the blob store.
/// On any error (the client going away included) the upload's temporary
/// file is removed before this returns.
pub async fn receive_upload<S>(
    blobs: &BlobStore,
    max_bytes: u64,
    mut stream: S,
) -> Result<(pb::PushModelHeader, UploadedBlob), Status>
where
    S: Stream<Item = Result<pb::PushModelRequest, Status>> + Unpin,
{
    use pb::push_model_request::Kind;
    let header = match stream.next().await {
        Some(Ok(pb::PushModelRequest {
            kind: Some(Kind::Header(header)),
        })) => header,
        Some(Ok(_)) => {
            return Err(Status::invalid_argument(
                "the first PushModelRequest must be the header",
            ));
        }
        Some(Err(status)) => return Err(status),
        None => return Err(Status::invalid_argument("no header: the stream was empty")),
    };
    validate_header(&header, max_bytes)?;
    let mut upload = blobs
        .upload(max_bytes)
        .await
        .map_err(|err| blob_status(err, max_bytes))?;
    if let Err(status) = receive_chunks(&header, &mut upload, max_bytes, stream).await {
        // Answer only once the temporary file is gone.
        upload.abandon().await;
        return Err(status);
    }
    let blob = upload
        .finish()
        .await
        .map_err(|err| blob_status(err, max_bytes))?;
    Ok((header, blob))
}

/// The chunks after the header, written to `upload`, and the checks on
/// what arrived (not empty, as long as the header announced).
async fn receive_chunks<S>(
    header: &pb::PushModelHeader,
    upload: &mut BlobUpload,
    max_bytes: u64,
    mut stream: S,
) -> Result<(), Status>
where
    S: Stream<Item = Result<pb::PushModelRequest, Status>> + Unpin,
{
    use pb::push_model_request::Kind;
    while let Some(message) = stream.next().await {
        match message?.kind {
            Some(Kind::Chunk(chunk)) => upload
                .write(bytes::Bytes::from(chunk))
                .await
                .map_err(|err| blob_status(err, max_bytes))?,
            Some(Kind::Header(_)) => {
                return Err(Status::invalid_argument(
                    "a second header: only the first message may be the header",
                ));
            }
            None => {}
        }
    }
    if upload.written() == 0 {
        return Err(Status::invalid_argument(
            "the model file is empty: not a valid ONNX model",
        ));
    }
    if header.size_bytes != 0 && header.size_bytes != upload.written() {
        return Err(Status::invalid_argument(format!(
            "the header announced {} bytes but {} arrived (upload cut short?)",
            header.size_bytes,
            upload.written()
        )));
    }
    Ok(())
}

/// Parses an uploaded blob as ONNX on a blocking thread.
pub async fn inspect_blob(blob: &UploadedBlob) -> Result<OnnxInfo, Status> {
    let path = blob.path().to_path_buf();
    let parsed = tokio::task::spawn_blocking(move || onnx::parse_file(&path))
        .await
        .map_err(|err| Status::internal(format!("the ONNX check failed: {err}")))?;
    parsed.map_err(|err| match err {
        OnnxError::Invalid(_) => Status::invalid_argument(err.to_string()),
        OnnxError::Io(_) => storage_error(tonic::Code::Internal, "cannot read a stored blob", &err),
    })
}

/// The signature fields of a model: the operator's own, verified and by a
/// key in `trusted_keys` (agents accept no other), or the fleet release
/// key's. Returns (signature, signed_by, public key).
pub fn sign(
    release_key: &edgefleet_pki::ReleaseKey,
    trusted_keys: &[Vec<u8>],
    header: &pb::PushModelHeader,
    sha256: &str,
) -> Result<(Vec<u8>, String, Vec<u8>), Status> {
    if header.signature.is_empty() {
        let signature = release_key
            .sign_model(sha256)
            .map_err(|err| Status::internal(format!("cannot sign the model: {err}")))?;
        return Ok((signature, "fleet".into(), release_key.public_key()));
    }
    edgefleet_pki::verify_model_signature(&header.signature_public_key, sha256, &header.signature)
        .map_err(|_| {
            Status::invalid_argument(format!(
                "the signature does not verify: it must be the Ed25519 signature, by the given public key, of the raw SHA-256 digest {sha256}"
            ))
        })?;
    if !trusted_keys.contains(&header.signature_public_key) {
        let key = hex::encode(&header.signature_public_key);
        return Err(Status::permission_denied(format!(
            "the model is signed by key {key}, which this fleet does not trust: start the servers with --trusted-signing-key {key}, or push it unsigned to have the fleet's release key sign it"
        )));
    }
    Ok((
        header.signature.clone(),
        "operator".into(),
        header.signature_public_key.clone(),
    ))
}

pub fn tensor_to_pb(t: &crate::store::registry::TensorInfo) -> pb::TensorInfo {
    pb::TensorInfo {
        name: t.name.clone(),
        datatype: t.datatype.clone(),
        shape: t.shape.clone(),
    }
}

pub fn model_to_pb(m: &ModelRecord) -> pb::Model {
    pb::Model {
        name: m.name.clone(),
        version: m.version,
        sha256: m.sha256.clone(),
        size_bytes: m.size_bytes,
        opset: m.opset,
        inputs: m.inputs.iter().map(tensor_to_pb).collect(),
        outputs: m.outputs.iter().map(tensor_to_pb).collect(),
        labels: m
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        private: m.private,
        signature: m.signature.clone(),
        signed_by: m.signed_by.clone(),
        signature_public_key: m.signature_public_key.clone(),
        created_unix_ms: u64::try_from(m.created_at).unwrap_or_default(),
        created_by: m.created_by.clone(),
        estimated_memory_bytes: m.estimated_memory_bytes,
    }
}

impl ModelApi {
    /// Removes a blob no model version uses (any more). Keeps it when the
    /// store cannot say.
    async fn drop_blob_if_unused(&self, sha256: &str) {
        let blobs = &self.cp.registry.blobs;
        let mut remove = || {
            blobs
                .delete(sha256)
                .map(drop)
                .map_err(std::io::Error::other)
        };
        if let Err(err) = self
            .cp
            .store
            .drop_blob_if_unreferenced(sha256, &mut remove)
            .await
        {
            tracing::warn!(%sha256, error = %err, "cannot delete an unused blob; kept");
        }
    }

    async fn next_version(&self, name: &str) -> Result<u64, Status> {
        let latest = self
            .cp
            .store
            .model(name, None)
            .await
            .map_err(store_unavailable("cannot read a model"))?;
        match latest {
            None => Ok(1),
            Some(m) if m.version < MAX_MODEL_VERSION => Ok(m.version + 1),
            Some(m) => Err(Status::failed_precondition(format!(
                "{name}@{} is the largest version there can be: give the version to push",
                m.version
            ))),
        }
    }

    async fn push(
        &self,
        operator: String,
        stream: Streaming<pb::PushModelRequest>,
    ) -> Result<pb::Model, Status> {
        let cp = &self.cp;
        let max_bytes = cp.config.max_model_bytes;
        let (header, mut blob) = receive_upload(&cp.registry.blobs, max_bytes, stream).await?;
        // Refused, the upload's file goes with `blob`: it was never placed.
        let info = match inspect_blob(&blob).await {
            Ok(info) => info,
            Err(status) => {
                tracing::info!(name = %header.name, %operator, reason = status.message(), "model refused");
                return Err(status);
            }
        };
        let result = self.record(&operator, &header, &mut blob, info).await;
        if result.is_err() && blob.placed() {
            // Placed, then the commit failed: unless it committed after all
            // (or another version uses the content), nothing refers to it.
            self.drop_blob_if_unused(&blob.sha256).await;
        }
        result
    }

    async fn record(
        &self,
        operator: &str,
        header: &pb::PushModelHeader,
        blob: &mut UploadedBlob,
        info: OnnxInfo,
    ) -> Result<pb::Model, Status> {
        let cp = &self.cp;
        let (signature, signed_by, signature_public_key) = sign(
            &cp.registry.release_key,
            &cp.config.trusted_signing_keys,
            header,
            &blob.sha256,
        )?;
        let mut record = ModelRecord {
            name: header.name.clone(),
            version: header.version,
            sha256: blob.sha256.clone(),
            size_bytes: blob.size,
            opset: info.opset,
            inputs: info.inputs,
            outputs: info.outputs,
            labels: header
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            private: header.private,
            signature,
            signed_by,
            signature_public_key,
            created_at: now_ms(),
            created_by: operator.to_string(),
            estimated_memory_bytes: estimated_memory_bytes(
                blob.size,
                cp.config.model_memory_factor,
            ),
        };
        let auto = header.version == 0;
        let attempts = if auto { AUTO_VERSION_ATTEMPTS } else { 1 };
        let mut conflict = None;
        let blobs = &cp.registry.blobs;
        // Put in place with the version recorded, under the digest's lock:
        // a replica deleting the same content as unused either removed it
        // before (this copy is put back) or sees this version and keeps it.
        let mut place = || blobs.place(blob).map_err(std::io::Error::other);
        for _ in 0..attempts {
            if auto {
                record.version = self.next_version(&record.name).await?;
            }
            match cp
                .store
                .insert_model_with_blob(&record, &mut place)
                .await
                .map_err(store_unavailable("cannot record a model"))?
            {
                Ok(()) => {
                    conflict = None;
                    break;
                }
                Err(err) => conflict = Some(err),
            }
        }
        if let Some(conflict) = conflict {
            let ModelConflict::Exists { .. } = &conflict;
            return Err(Status::already_exists(conflict.to_string()));
        }
        // Read back: a re-push of the same name, version and digest is a
        // no-op and returns the stored version.
        let stored = cp
            .store
            .model(&record.name, Some(record.version))
            .await
            .map_err(store_unavailable("cannot read a model"))?
            .unwrap_or(record);
        tracing::info!(
            name = %stored.name,
            version = stored.version,
            sha256 = %stored.sha256,
            size = stored.size_bytes,
            signed_by = %stored.signed_by,
            %operator,
            "model pushed"
        );
        Ok(model_to_pb(&stored))
    }
}

#[tonic::async_trait]
impl pb::model_service_server::ModelService for ModelApi {
    async fn push_model(
        &self,
        request: Request<Streaming<pb::PushModelRequest>>,
    ) -> Result<Response<pb::Model>, Status> {
        let operator = authorize(&self.cp, &request).await?;
        let model = self.push(operator.id, request.into_inner()).await?;
        Ok(Response::new(model))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        authorize(&self.cp, &request).await?;
        let request = request.into_inner();
        let name = (!request.name.is_empty()).then_some(request.name.as_str());
        if let Some(name) = name {
            validate_model_name(name).map_err(Status::invalid_argument)?;
        }
        let pages = paging::Pages::new("ListModels", &request.name);
        let after: Option<(String, u64)> = pages.after(&request.page_token)?;
        if let Some((name, _)) = &after {
            validate_model_name(name)
                .map_err(|e| Status::invalid_argument(format!("page_token: {e}")))?;
        }
        let size = paging::page_size(request.page_size);
        let models = self
            .cp
            .store
            .models(
                name,
                after
                    .as_ref()
                    .map(|(name, version)| (name.as_str(), *version)),
                size + 1,
            )
            .await
            .map_err(store_unavailable("cannot list models"))?;
        let (models, more) = paging::split(models, size);
        let next_page_token = pages.next(more, models.last().map(|m| (&m.name, m.version)));
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(model_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        authorize(&self.cp, &request).await?;
        let pb::GetModelRequest { name, version } = request.into_inner();
        validate_model_name(&name).map_err(Status::invalid_argument)?;
        let version = (version != 0).then_some(version);
        let model = self
            .cp
            .store
            .model(&name, version)
            .await
            .map_err(store_unavailable("cannot read a model"))?;
        let model = model.ok_or_else(|| match version {
            Some(v) => Status::not_found(format!("no model {name}@{v}")),
            None => Status::not_found(format!("no model named {name:?}")),
        })?;
        Ok(Response::new(model_to_pb(&model)))
    }

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        let operator = authorize(&self.cp, &request).await?;
        let pb::DeleteModelRequest { name, version } = request.into_inner();
        validate_model_name(&name).map_err(Status::invalid_argument)?;
        if version == 0 {
            return Err(Status::invalid_argument(
                "give the version to delete: NAME@VERSION",
            ));
        }
        let store = &self.cp.store;
        let Some(model) = store
            .model(&name, Some(version))
            .await
            .map_err(store_unavailable("cannot read a model"))?
        else {
            return Err(Status::not_found(format!("no model {name}@{version}")));
        };
        match store
            .delete_model(&name, version)
            .await
            .map_err(store_unavailable("cannot delete a model"))?
        {
            Ok(true) => {}
            Ok(false) => return Err(Status::not_found(format!("no model {name}@{version}"))),
            Err(reason) => {
                return Err(Status::failed_precondition(format!(
                    "cannot delete {name}@{version}: {reason}"
                )));
            }
        }
        self.drop_blob_if_unused(&model.sha256).await;
        tracing::info!(%name, version, operator = %operator.id, "model deleted");
        Ok(Response::new(pb::DeleteModelResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::push_model_request::Kind;

    fn header(name: &str) -> pb::PushModelRequest {
        pb::PushModelRequest {
            kind: Some(Kind::Header(pb::PushModelHeader {
                name: name.into(),
                ..Default::default()
            })),
        }
    }

    fn chunk(data: &[u8]) -> pb::PushModelRequest {
        pb::PushModelRequest {
            kind: Some(Kind::Chunk(data.to_vec())),
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../testdata/models")
                .join(name)
                .join("1/model.onnx"),
        )
        .unwrap()
    }

    fn blob_files(dir: &std::path::Path) -> usize {
        walk(&dir.join("blobs"))
    }

    fn walk(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        if e.path().is_dir() {
                            walk(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_model_name("resnet-50_v1.2").is_ok());
        assert!(validate_model_name(&"a".repeat(64)).is_ok());
        assert!(validate_model_name(&"a".repeat(65)).is_err());
        assert!(validate_model_name("").is_err());
        assert!(validate_model_name("a/b").is_err());
        assert!(validate_model_name("a b").is_err());
        assert!(validate_model_name("é").is_err());
    }

    #[test]
    fn headers_are_checked() {
        let ok = pb::PushModelHeader {
            name: "mlp".into(),
            ..Default::default()
        };
        assert!(validate_header(&ok, 100).is_ok());
        let big = pb::PushModelHeader {
            size_bytes: 101,
            ..ok.clone()
        };
        assert_eq!(
            validate_header(&big, 100).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        let half_signed = pb::PushModelHeader {
            signature: vec![1; 64],
            ..ok.clone()
        };
        assert_eq!(
            validate_header(&half_signed, 100).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let top = pb::PushModelHeader {
            version: MAX_MODEL_VERSION,
            ..ok.clone()
        };
        assert!(validate_header(&top, 100).is_ok());
        let over = pb::PushModelHeader {
            version: MAX_MODEL_VERSION + 1,
            ..ok.clone()
        };
        let status = validate_header(&over, 100).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("over the largest"), "{status}");
        let bad_label = pb::PushModelHeader {
            labels: [("bad key".to_string(), "v".to_string())].into(),
            ..ok
        };
        assert_eq!(
            validate_header(&bad_label, 100).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn uploads_store_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path());
        blobs.init().unwrap();
        let model = fixture("conv");
        let mut messages = vec![Ok(header("conv"))];
        messages.extend(model.chunks(1000).map(|c| Ok(chunk(c))));
        let (header, blob) = receive_upload(&blobs, 1 << 20, futures::stream::iter(messages))
            .await
            .unwrap();
        assert_eq!(header.name, "conv");
        assert_eq!(blob.size, model.len() as u64);
        let info = inspect_blob(&blob).await.unwrap();
        assert_eq!(info.inputs.len(), 1);
        assert_eq!(blob_files(dir.path()), 1);
        // Put in place once its version is recorded.
        let mut blob = blob;
        blobs.place(&mut blob).unwrap();
        assert_eq!(blobs.size(&blob.sha256).unwrap(), Some(model.len() as u64));
        assert_eq!(blob_files(dir.path()), 1);
    }

    #[tokio::test]
    async fn bad_uploads_are_refused_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path());
        blobs.init().unwrap();
        // Refused, and the temporary file already gone when the refusal is
        // answered (a client may look at once); several times, as the file
        // is written on another thread.
        let run = |messages: Vec<Result<pb::PushModelRequest, Status>>, max: u64| {
            let blobs = blobs.clone();
            let dir = dir.path().to_path_buf();
            async move {
                let mut last = None;
                for _ in 0..20 {
                    let err = receive_upload(&blobs, max, futures::stream::iter(messages.clone()))
                        .await
                        .unwrap_err();
                    assert_eq!(blob_files(&dir), 0, "{err:?}");
                    last = Some(err);
                }
                last.unwrap()
            }
        };
        let err = run(vec![Ok(chunk(b"x"))], 100).await;
        assert!(err.message().contains("header"), "{err:?}");
        let err = run(vec![Ok(header("m"))], 100).await;
        assert!(err.message().contains("empty"), "{err:?}");
        let err = run(vec![Ok(header("bad/name"))], 100).await;
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = run(
            vec![Ok(header("m")), Ok(chunk(&[0; 60])), Ok(chunk(&[0; 60]))],
            100,
        )
        .await;
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        // The client goes away mid-upload.
        let err = run(
            vec![
                Ok(header("m")),
                Ok(chunk(&[1; 50])),
                Err(Status::cancelled("client disconnected")),
            ],
            100,
        )
        .await;
        assert_eq!(err.code(), tonic::Code::Cancelled);
        let mut short = header("m");
        if let Some(Kind::Header(h)) = &mut short.kind {
            h.size_bytes = 80;
        }
        let err = run(vec![Ok(short), Ok(chunk(&[1; 50]))], 100).await;
        assert!(err.message().contains("announced"), "{err:?}");

        // Not ONNX: uploaded, then refused by the parser; never placed.
        let (_, blob) = receive_upload(
            &blobs,
            100,
            futures::stream::iter(vec![Ok(header("m")), Ok(chunk(b"not a model at all"))]),
        )
        .await
        .unwrap();
        let err = inspect_blob(&blob).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("not a valid ONNX model"), "{err:?}");
        drop(blob);
        assert_eq!(blob_files(dir.path()), 0);
    }

    #[test]
    fn fleet_and_operator_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let (fleet, _) = edgefleet_pki::ReleaseKey::load_or_create(dir.path()).unwrap();
        let (operator, _) =
            edgefleet_pki::ReleaseKey::load_or_create(&dir.path().join("operator")).unwrap();
        let digest = "0f".repeat(32);
        let plain = pb::PushModelHeader::default();
        let trusted = [operator.public_key()];
        let (signature, signed_by, key) = sign(&fleet, &trusted, &plain, &digest).unwrap();
        assert_eq!(signed_by, "fleet");
        assert_eq!(key, fleet.public_key());
        edgefleet_pki::verify_model_signature(&key, &digest, &signature).unwrap();

        let signed = pb::PushModelHeader {
            signature: operator.sign_model(&digest).unwrap(),
            signature_public_key: operator.public_key(),
            ..Default::default()
        };
        let (signature, signed_by, key) = sign(&fleet, &trusted, &signed, &digest).unwrap();
        assert_eq!(signed_by, "operator");
        assert_eq!(key, operator.public_key());
        assert_eq!(signature, signed.signature);
        // A good signature by a key the fleet does not trust.
        let err = sign(&fleet, &[], &signed, &digest).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("--trusted-signing-key"), "{err:?}");

        let forged = pb::PushModelHeader {
            signature_public_key: fleet.public_key(),
            ..signed
        };
        let err = sign(&fleet, &trusted, &forged, &digest).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
