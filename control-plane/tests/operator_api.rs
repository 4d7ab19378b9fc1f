//! Bad input on the operator API from a hand-driven gRPC client (tonic's
//! generated clients, as a script would call them) against a real server
//! process on each store: the same clear status from both, and the server
//! keeps serving.

mod support;

use edgefleet_proto::edgefleet::v1 as pb;
use pb::operator_service_client::OperatorServiceClient;
use pb::rollout_service_client::RolloutServiceClient;
use support::*;
use tonic::{Code, Request, Status};

fn authorized<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// An id or model name holding a NUL (found by the `control_plane_api`
/// fuzz target): PostgreSQL's text cannot take one, so the lookup failed
/// as the storage error (UNAVAILABLE, "internal storage error") where
/// SQLite found nothing (NOT_FOUND). Now INVALID_ARGUMENT on both stores,
/// naming the field, for every RPC that looks a device, a rollout or a
/// model name up.
#[test]
fn ids_and_model_names_holding_a_nul_are_invalid_on_both_stores() {
    for db in [Db::Sqlite, Db::Postgres] {
        let dir = tempfile::tempdir().unwrap();
        let schema = (db == Db::Postgres).then(PgSchema::create);
        let server = Server::start(dir.path(), schema.as_ref().map(|s| s.url.as_str()), &[]);
        let token = server.admin_token();
        runtime().block_on(async {
            let channel = tonic::transport::Channel::from_shared(server.api_url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut devices = OperatorServiceClient::new(channel.clone());
            let mut rollouts = RolloutServiceClient::new(channel);
            let id = "dev-0\0".to_string();
            let device = || pb::GetDeviceRequest { id: id.clone() };
            let rollout = || pb::RolloutRef {
                id: "ro-0\0".to_string(),
            };
            let refusals: Vec<(&str, &str, Result<(), Status>)> = vec![
                (
                    "GetDevice",
                    "device id",
                    devices
                        .get_device(authorized(device(), &token))
                        .await
                        .map(drop),
                ),
                (
                    "RevokeDevice",
                    "device id",
                    devices
                        .revoke_device(authorized(
                            pb::RevokeDeviceRequest { id: id.clone() },
                            &token,
                        ))
                        .await
                        .map(drop),
                ),
                (
                    "SetDeviceLabels",
                    "device id",
                    devices
                        .set_device_labels(authorized(
                            pb::SetDeviceLabelsRequest {
                                id: id.clone(),
                                labels: Default::default(),
                            },
                            &token,
                        ))
                        .await
                        .map(drop),
                ),
                (
                    "GetRollout",
                    "rollout id",
                    rollouts
                        .get_rollout(authorized(rollout(), &token))
                        .await
                        .map(drop),
                ),
                (
                    "PauseRollout",
                    "rollout id",
                    rollouts
                        .pause_rollout(authorized(rollout(), &token))
                        .await
                        .map(drop),
                ),
                (
                    "ResumeRollout",
                    "rollout id",
                    rollouts
                        .resume_rollout(authorized(rollout(), &token))
                        .await
                        .map(drop),
                ),
                (
                    "AbortRollout",
                    "rollout id",
                    rollouts
                        .abort_rollout(authorized(rollout(), &token))
                        .await
                        .map(drop),
                ),
                (
                    "RollbackRollout",
                    "rollout id",
                    rollouts
                        .rollback_rollout(authorized(rollout(), &token))
                        .await
                        .map(drop),
                ),
                (
                    "WatchRollout",
                    "rollout id",
                    rollouts
                        .watch_rollout(authorized(rollout(), &token))
                        .await
                        .map(drop),
                ),
                (
                    "ListRollouts",
                    "model name",
                    rollouts
                        .list_rollouts(authorized(
                            pb::ListRolloutsRequest {
                                model: "iris\0".into(),
                            },
                            &token,
                        ))
                        .await
                        .map(drop),
                ),
                (
                    "CreateRollout",
                    "model name",
                    rollouts
                        .create_rollout(authorized(
                            pb::CreateRolloutRequest {
                                model: "iris\0".into(),
                                version: 1,
                                selector: "region=eu".into(),
                                waves: vec![pb::Wave {
                                    size: Some(pb::wave::Size::Percent(100.0)),
                                }],
                                ..Default::default()
                            },
                            &token,
                        ))
                        .await
                        .map(drop),
                ),
            ];
            for (rpc, field, result) in refusals {
                let status = result.expect_err(rpc);
                assert_eq!(
                    status.code(),
                    Code::InvalidArgument,
                    "{db:?} {rpc}: {status:?}"
                );
                assert!(
                    status.message().contains(field),
                    "{db:?} {rpc}: the message names the {field}: {status:?}"
                );
            }
            // The server keeps serving.
            let listed = devices
                .list_devices(authorized(pb::ListDevicesRequest::default(), &token))
                .await
                .unwrap();
            assert!(listed.into_inner().devices.is_empty(), "{db:?}");
        });
    }
}
