//! `edgefleet.v1.OperatorService`: what operators script (join tokens and
//! devices for now). Every call needs `authorization: Bearer <token>`.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_pki::{JoinTokenSecret, hash_secret};
use edgefleet_proto::edgefleet::v1 as pb;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::drift;
use crate::errors::store_unavailable;
use crate::paging;
use crate::state::{ControlPlane, now_ms};
use crate::store::{self, JoinToken, OperatorToken};

/// Join tokens live 24 h unless asked otherwise, and at most a year.
const DEFAULT_JOIN_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const MAX_JOIN_TOKEN_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
const MAX_JOIN_TOKEN_USES: u32 = 1_000_000;

#[derive(Debug, Clone)]
pub struct OperatorApi {
    cp: Arc<ControlPlane>,
}

impl OperatorApi {
    pub fn new(cp: Arc<ControlPlane>) -> OperatorApi {
        OperatorApi { cp }
    }

    async fn authorize<T>(&self, request: &Request<T>) -> Result<OperatorToken, Status> {
        authorize(&self.cp, request).await
    }

    /// Marks each model version of `devices` whose digest is not the
    /// registry's for it (`expected_sha256`).
    async fn mark_drift(&self, devices: &mut [pb::Device]) -> Result<(), Status> {
        drift::mark_mismatches(self.cp.store.as_ref(), devices)
            .await
            .map_err(store_unavailable("cannot read the model registry"))
    }

    async fn one_with_drift(&self, device: pb::Device) -> Result<Response<pb::Device>, Status> {
        let mut devices = [device];
        self.mark_drift(&mut devices).await?;
        let [device] = devices;
        Ok(Response::new(device))
    }
}

/// The operator behind a request's `authorization: Bearer <token>`
/// metadata: shared by every operator-facing service.
pub async fn authorize<T>(
    cp: &ControlPlane,
    request: &Request<T>,
) -> Result<OperatorToken, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
    let header = header
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization header"))?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be: Bearer <token>"))?
        .trim();
    let found = cp
        .store
        .operator_token_by_hash(&hash_secret(token))
        .await
        .map_err(store_unavailable("cannot check an operator token"))?;
    found.ok_or_else(|| Status::unauthenticated("unknown or revoked token"))
}

#[tonic::async_trait]
impl pb::operator_service_server::OperatorService for OperatorApi {
    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let operator = self.authorize(&request).await?;
        let request = request.into_inner();
        for (key, value) in &request.labels {
            convert::validate_label(key, value).map_err(Status::invalid_argument)?;
        }
        let lifetime = match request.expires_in_seconds {
            0 => DEFAULT_JOIN_TOKEN_LIFETIME,
            seconds => Duration::from_secs(seconds),
        };
        if lifetime > MAX_JOIN_TOKEN_LIFETIME {
            return Err(Status::invalid_argument(
                "expires_in_seconds is longer than a year",
            ));
        }
        let uses = request.uses.max(1);
        if uses > MAX_JOIN_TOKEN_USES {
            return Err(Status::invalid_argument(format!(
                "uses must be at most {MAX_JOIN_TOKEN_USES}"
            )));
        }
        let secret = JoinTokenSecret::generate(&self.cp.ca.fingerprint());
        let now = now_ms();
        let expires_at = now + i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 2);
        let labels: crate::store::Labels = request.labels.into_iter().collect();
        self.cp
            .store
            .insert_join_token(&JoinToken {
                id: secret.id.clone(),
                secret_hash: hash_secret(&secret.secret),
                labels: labels.clone(),
                created_at: now,
                expires_at,
                uses_left: uses,
                created_by: operator.id.clone(),
                revoked_at: None,
            })
            .await
            .map_err(store_unavailable("cannot store a join token"))?;
        tracing::info!(token = %secret.id, operator = %operator.id, uses, "join token created");
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: secret.to_string(),
            id: secret.id.clone(),
            expires_unix_ms: u64::try_from(expires_at).unwrap_or_default(),
            uses,
            ca_fingerprint: secret.ca_fingerprint.clone(),
            labels: labels.into_iter().collect(),
        }))
    }

    async fn list_join_tokens(
        &self,
        request: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        self.authorize(&request).await?;
        let request = request.into_inner();
        let pages = paging::Pages::new("ListJoinTokens", "");
        let after: Option<(i64, String)> = pages.after(&request.page_token)?;
        if let Some((_, id)) = &after {
            convert::check_id("page_token's join token id", id)?;
        }
        let size = paging::page_size(request.page_size);
        let tokens = self
            .cp
            .store
            .join_tokens(after.as_ref().map(|(at, id)| (*at, id.as_str())), size + 1)
            .await
            .map_err(store_unavailable("cannot list join tokens"))?;
        let (tokens, more) = paging::split(tokens, size);
        let next_page_token = pages.next(more, tokens.last().map(|t| (t.created_at, &t.id)));
        let now = now_ms();
        Ok(Response::new(pb::ListJoinTokensResponse {
            join_tokens: tokens
                .iter()
                .map(|t| convert::join_token_to_pb(t, now))
                .collect(),
            next_page_token,
        }))
    }

    async fn revoke_join_token(
        &self,
        request: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let operator = self.authorize(&request).await?;
        let id = &request.get_ref().id;
        convert::check_id("join token id", id)?;
        let now = now_ms();
        let token = self
            .cp
            .store
            .revoke_join_token(id, now)
            .await
            .map_err(store_unavailable("cannot revoke a join token"))?
            .ok_or_else(|| Status::not_found(format!("no join token {id:?}")))?;
        tracing::info!(token = %token.id, operator = %operator.id, "join token revoked");
        Ok(Response::new(convert::join_token_to_pb(&token, now)))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        self.authorize(&request).await?;
        let request = request.into_inner();
        let selector =
            convert::parse_labels(&request.selector).map_err(Status::invalid_argument)?;
        let pages = paging::Pages::new("ListDevices", &request.selector);
        let after: Option<String> = pages.after(&request.page_token)?;
        if let Some(after) = &after {
            convert::check_id("page_token's device id", after)?;
        }
        let (devices, more) = store::devices_page(
            self.cp.store.as_ref(),
            &selector,
            after.as_deref(),
            paging::page_size(request.page_size),
        )
        .await
        .map_err(store_unavailable("cannot list devices"))?;
        let next_page_token = pages.next(more, devices.last().map(|d| &d.id));
        let mut devices: Vec<pb::Device> = devices
            .iter()
            .map(|d| convert::device_to_pb(d, self.cp.sessions.is_online(&d.id)))
            .collect();
        self.mark_drift(&mut devices).await?;
        Ok(Response::new(pb::ListDevicesResponse {
            devices,
            next_page_token,
        }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        self.authorize(&request).await?;
        let id = &request.get_ref().id;
        convert::check_id("device id", id)?;
        let device = self
            .cp
            .store
            .device(id)
            .await
            .map_err(store_unavailable("cannot read a device"))?;
        let device = device.ok_or_else(|| Status::not_found(format!("no device {id:?}")))?;
        let online = self.cp.sessions.is_online(&device.id);
        self.one_with_drift(convert::device_to_pb(&device, online))
            .await
    }

    async fn revoke_device(
        &self,
        request: Request<pb::RevokeDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let operator = self.authorize(&request).await?;
        let id = &request.get_ref().id;
        convert::check_id("device id", id)?;
        let device = self
            .cp
            .store
            .revoke_device(id, now_ms())
            .await
            .map_err(store_unavailable("cannot revoke a device"))?;
        let device = device.ok_or_else(|| Status::not_found(format!("no device {id:?}")))?;
        self.cp.sessions.revoke(id);
        tracing::info!(device = %id, operator = %operator.id, "device revoked");
        self.one_with_drift(convert::device_to_pb(&device, false))
            .await
    }

    async fn set_device_labels(
        &self,
        request: Request<pb::SetDeviceLabelsRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let operator = self.authorize(&request).await?;
        let request = request.into_inner();
        convert::check_id("device id", &request.id)?;
        for (key, value) in &request.labels {
            convert::validate_label(key, value).map_err(Status::invalid_argument)?;
        }
        let labels: crate::store::Labels = request.labels.into_iter().collect();
        let device = self
            .cp
            .store
            .set_device_labels(&request.id, &labels)
            .await
            .map_err(store_unavailable("cannot set a device's labels"))?
            .ok_or_else(|| Status::not_found(format!("no device {:?}", request.id)))?;
        tracing::info!(device = %device.id, operator = %operator.id, "device labels set");
        let online = self.cp.sessions.is_online(&device.id);
        self.one_with_drift(convert::device_to_pb(&device, online))
            .await
    }
}
