//! Bad input on the operator API from a hand-driven gRPC client (tonic's
//! generated clients, as a script would call them) against a real server
//! process on each store: the same clear status from both, and the server
//! keeps serving.

mod support;

use edgefleet_proto::edgefleet::v1 as pb;
use pb::model_service_client::ModelServiceClient;
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
            let channel = server.operator_channel().await;
            let mut devices = OperatorServiceClient::new(channel.clone());
            let mut rollouts = RolloutServiceClient::new(channel);
            let id = "dev-0\0".to_string();
            let device = || pb::GetDeviceRequest { id: id.clone() };
            let rollout = || pb::RolloutRef {
                id: "ro-0\0".to_string(),
                ..Default::default()
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
                                ..Default::default()
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

/// Devices, models and rollouts listed a page at a time (`page_size`,
/// `page_token`, `next_page_token`) on each store: every item once, in the
/// list's order, whatever the page size and with a filter; a token that is
/// not this list's, or is for another filter, or is garbage is
/// INVALID_ARGUMENT; the CLI reads every page (`--page-size`). And a
/// rollout in the basic view (`RolloutView`): its counts without its
/// devices and events, by GetRollout and WatchRollout; its devices a page
/// at a time (ListRolloutDevices, `edgefleet rollouts devices`).
#[test]
fn lists_come_in_pages_on_both_stores() {
    for db in [Db::Sqlite, Db::Postgres] {
        let dir = tempfile::tempdir().unwrap();
        let schema = (db == Db::Postgres).then(PgSchema::create);
        let server = Server::start(dir.path(), schema.as_ref().map(|s| s.url.as_str()), &[]);
        let token = server.admin_token();
        let eu = server.join_token(&["--labels", "region=eu", "--uses", "3"]);
        let us = server.join_token(&["--labels", "region=us", "--uses", "2"]);
        for (i, join) in [&eu, &eu, &us, &eu, &us].into_iter().enumerate() {
            enroll_ok(&server, join, &dir.path().join(format!("device-{i}")));
        }
        let mlp = edgefleet_test_support::testdata().join("models/mlp/1/model.onnx");
        for name in ["c", "a", "b"] {
            server.cli_json(&["models", "push", mlp.to_str().unwrap(), "--name", name]);
            server.cli_json(&[
                "rollouts",
                "create",
                "--model",
                &format!("{name}@1"),
                "--selector",
                "region=eu",
            ]);
        }
        runtime().block_on(async {
            let channel = server.operator_channel().await;
            let devices = OperatorServiceClient::new(channel.clone());
            let mut models = ModelServiceClient::new(channel.clone());
            let mut rollouts = RolloutServiceClient::new(channel);

            // Devices, all in one page and then two at a time.
            let list_devices = |selector: &str, page_size: u32, page_token: String| {
                let request = authorized(
                    pb::ListDevicesRequest {
                        selector: selector.into(),
                        page_size,
                        page_token,
                    },
                    &token,
                );
                let mut devices = devices.clone();
                async move { devices.list_devices(request).await }
            };
            let whole = list_devices("", 0, String::new()).await.unwrap().into_inner();
            assert_eq!(whole.devices.len(), 5, "{db:?}");
            assert_eq!(whole.next_page_token, "", "{db:?}: one page holds them all");
            let ids = |devices: &[pb::Device]| devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
            let mut sorted = ids(&whole.devices);
            sorted.sort();
            assert_eq!(ids(&whole.devices), sorted, "{db:?}: ordered by id");
            for (selector, expected) in [("", 5), ("region=eu", 3), ("region=us", 2)] {
                let (paged, calls) = every_page(2, |page_token| {
                    let page = list_devices(selector, 2, page_token);
                    async move {
                        let page = page.await.unwrap().into_inner();
                        (ids(&page.devices), page.next_page_token)
                    }
                })
                .await;
                let region = selector.strip_prefix("region=");
                let matching: Vec<String> = whole
                    .devices
                    .iter()
                    .filter(|d| region.is_none() || d.labels.get("region").map(String::as_str) == region)
                    .map(|d| d.id.clone())
                    .collect();
                assert_eq!(paged, matching, "{db:?} {selector:?}: each once, in order");
                assert_eq!(paged.len(), expected, "{db:?} {selector:?}");
                assert_eq!(calls, expected.div_ceil(2), "{db:?} {selector:?}: no empty last page");
            }

            // Tokens that are not this list's, for this filter.
            let eu_token = list_devices("region=eu", 1, String::new())
                .await
                .unwrap()
                .into_inner()
                .next_page_token;
            let forged = |after: &str| {
                hex::encode(
                    serde_json::json!({"list": "ListDevices", "filter": "", "after": after}).to_string(),
                )
            };
            for (what, selector, page_token, says) in [
                ("another selector's", "region=us", eu_token.clone(), "another filter"),
                ("garbage", "", "not a token".to_string(), "page_token"),
                ("a device id with a NUL", "", forged("dev-0\0"), "NUL"),
            ] {
                let status = list_devices(selector, 1, page_token).await.unwrap_err();
                assert_eq!(status.code(), Code::InvalidArgument, "{db:?} {what}: {status:?}");
                assert!(status.message().contains(says), "{db:?} {what}: {status:?}");
            }
            let status = models
                .list_models(authorized(
                    pb::ListModelsRequest {
                        page_token: eu_token.clone(),
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{db:?}: {status:?}");
            assert!(status.message().contains("ListModels"), "{db:?}: {status:?}");

            // Models by name, a page at a time.
            let (names, _) = every_page(2, |page_token| {
                let request = authorized(
                    pb::ListModelsRequest {
                        page_size: 2,
                        page_token,
                        ..Default::default()
                    },
                    &token,
                );
                let mut models = models.clone();
                async move {
                    let page = models.list_models(request).await.unwrap().into_inner();
                    let names = page.models.iter().map(|m| format!("{}@{}", m.name, m.version));
                    (names.collect(), page.next_page_token)
                }
            })
            .await;
            assert_eq!(names, ["a@1", "b@1", "c@1"], "{db:?}");

            // Rollouts newest first, one per page, each counted on its page.
            let (listed, _) = every_page(1, |page_token| {
                let request = authorized(
                    pb::ListRolloutsRequest {
                        page_size: 1,
                        page_token,
                        ..Default::default()
                    },
                    &token,
                );
                let mut rollouts = rollouts.clone();
                async move {
                    let page = rollouts.list_rollouts(request).await.unwrap().into_inner();
                    (page.rollouts, page.next_page_token)
                }
            })
            .await;
            let models_rolled: Vec<&str> = listed.iter().map(|r| r.model.as_str()).collect();
            assert_eq!(models_rolled, ["b", "a", "c"], "{db:?}");
            for rollout in &listed {
                assert_eq!(rollout.counts.unwrap_or_default().targeted, 3, "{db:?}");
            }

            // One rollout in full and in the basic view (its counts, no
            // devices or events), by GetRollout and WatchRollout.
            let rollout_ref = |view: pb::RolloutView| {
                authorized(
                    pb::RolloutRef {
                        id: listed[0].id.clone(),
                        view: view.into(),
                    },
                    &token,
                )
            };
            let full = rollouts
                .get_rollout(rollout_ref(pb::RolloutView::Full))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(full.devices.len(), 3, "{db:?}");
            assert!(!full.events.is_empty(), "{db:?}");
            let basic = rollouts
                .get_rollout(rollout_ref(pb::RolloutView::Basic))
                .await
                .unwrap()
                .into_inner();
            // (The engine moves the rollout on meanwhile: its state and
            // counts may differ from one answer to the next.)
            assert_eq!(basic.id, listed[0].id, "{db:?}");
            assert!(basic.devices.is_empty() && basic.events.is_empty(), "{db:?}");
            let targeted = |r: &pb::Rollout| r.counts.unwrap_or_default().targeted;
            assert_eq!(targeted(&basic), 3, "{db:?}");
            // The devices never connect: the rollout waits, and the watch
            // stays open after its first answer.
            let mut watch = rollouts
                .watch_rollout(rollout_ref(pb::RolloutView::Basic))
                .await
                .unwrap()
                .into_inner();
            let first = watch.message().await.unwrap().unwrap();
            assert_eq!(first.id, basic.id, "{db:?}");
            assert!(first.devices.is_empty() && first.events.is_empty(), "{db:?}");
            assert_eq!(targeted(&first), 3, "{db:?}");

            // A rollout's devices, a page at a time, all or in one state,
            // once the engine has started all three (they never connect, so
            // they stay updating).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let now = rollouts
                    .get_rollout(rollout_ref(pb::RolloutView::Basic))
                    .await
                    .unwrap()
                    .into_inner();
                if now.counts.unwrap_or_default().updating == 3 {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{db:?}: {now:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let list_rollout_devices = |state: &str, page_size: u32, page_token: String| {
                let request = authorized(
                    pb::ListRolloutDevicesRequest {
                        rollout_id: listed[0].id.clone(),
                        state: state.into(),
                        page_size,
                        page_token,
                    },
                    &token,
                );
                let mut rollouts = rollouts.clone();
                async move { rollouts.list_rollout_devices(request).await }
            };
            let full_ids: Vec<String> = full.devices.iter().map(|d| d.device_id.clone()).collect();
            for (state, expected) in [("", full_ids.clone()), ("updating", full_ids.clone()), ("waiting", vec![]), ("active", vec![])] {
                let (paged, calls) = every_page(2, |page_token| {
                    let page = list_rollout_devices(state, 2, page_token);
                    async move {
                        let page = page.await.unwrap().into_inner();
                        (page.devices, page.next_page_token)
                    }
                })
                .await;
                let ids: Vec<String> = paged.iter().map(|d| d.device_id.clone()).collect();
                assert_eq!(ids, expected, "{db:?} {state:?}: each once, by id");
                assert_eq!(calls, expected.len().div_ceil(2).max(1), "{db:?} {state:?}");
                assert!(paged.iter().all(|d| d.state == "updating" && d.wave == 1), "{db:?}: {paged:?}");
            }
            let updating_token = list_rollout_devices("updating", 1, String::new())
                .await
                .unwrap()
                .into_inner()
                .next_page_token;
            let forged = |after: &str| {
                let filter = format!("rollout={},state=", listed[0].id);
                hex::encode(
                    serde_json::json!({"list": "ListRolloutDevices", "filter": filter, "after": after})
                        .to_string(),
                )
            };
            for (what, state, page_token, says) in [
                ("a state that is none", "bogus", String::new(), "state \"bogus\""),
                ("another state's token", "", updating_token, "another filter"),
                ("another list's token", "", eu_token.clone(), "ListRolloutDevices"),
                ("a device id with a NUL", "", forged("dev-0\0"), "page_token"),
            ] {
                let status = list_rollout_devices(state, 1, page_token).await.unwrap_err();
                assert_eq!(status.code(), Code::InvalidArgument, "{db:?} {what}: {status:?}");
                assert!(status.message().contains(says), "{db:?} {what}: {status:?}");
            }
            // A forged token past the last device: an empty last page.
            let past = list_rollout_devices("", 1, forged("~")).await.unwrap().into_inner();
            assert!(past.devices.is_empty() && past.next_page_token.is_empty(), "{db:?}");
            let status = rollouts
                .list_rollout_devices(authorized(
                    pb::ListRolloutDevicesRequest {
                        rollout_id: "ro-000000000000".into(),
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::NotFound, "{db:?}: {status:?}");

            let unknown = hex::encode(
                serde_json::json!({"list": "ListRollouts", "filter": "", "after": "ro-000000000000"})
                    .to_string(),
            );
            let status = rollouts
                .list_rollouts(authorized(
                    pb::ListRolloutsRequest {
                        page_token: unknown,
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{db:?}: {status:?}");
        });

        // The CLI reads every page, whatever their size.
        for list in [
            &["devices", "list"][..],
            &["models", "list"],
            &["rollouts", "list"],
        ] {
            let whole = server.cli_json(list);
            let mut paged = list.to_vec();
            paged.extend(["--page-size", "1"]);
            assert_eq!(server.cli_json(&paged), whole, "{db:?} {list:?}");
            assert_eq!(
                whole.as_array().unwrap().len(),
                if list[0] == "devices" { 5 } else { 3 },
                "{db:?} {list:?}"
            );
        }
        let rollout = server.cli_json(&["rollouts", "list"])[0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let devices = server.cli_json(&["rollouts", "devices", &rollout]);
        assert_eq!(
            server.cli_json(&["rollouts", "devices", &rollout, "--page-size", "1"]),
            devices,
            "{db:?}"
        );
        assert_eq!(devices.as_array().unwrap().len(), 3, "{db:?}: {devices}");
        assert_eq!(
            server.cli_json(&["rollouts", "devices", &rollout, "--state", "updating"]),
            devices,
            "{db:?}"
        );
        let refused = server.cli(&["rollouts", "devices", &rollout, "--state", "bogus"]);
        assert!(!refused.status.success(), "{db:?}");
        assert!(
            stderr(&refused).contains("--state"),
            "{db:?}: {}",
            stderr(&refused)
        );
        let refused = server.cli(&["devices", "list", "--page-size", "0"]);
        assert!(!refused.status.success(), "{db:?}");
        assert!(
            stderr(&refused).contains("--page-size"),
            "{db:?}: {}",
            stderr(&refused)
        );
    }
}

/// Every item of a list, a page at a time: `page(token)` answers a page's
/// items and its next token. Also how many calls it took; no page holds
/// more than `size`.
async fn every_page<T, Fut>(size: usize, mut page: impl FnMut(String) -> Fut) -> (Vec<T>, usize)
where
    Fut: std::future::Future<Output = (Vec<T>, String)>,
{
    let (mut items, mut calls, mut token) = (Vec::new(), 0, String::new());
    loop {
        let (batch, next) = page(token).await;
        calls += 1;
        assert!(
            batch.len() <= size,
            "a page of {} items, asked for {size}",
            batch.len()
        );
        items.extend(batch);
        if next.is_empty() {
            return (items, calls);
        }
        token = next;
    }
}
