//! Bad input on the agent API, from a hand-driven gRPC client over real
//! (mutual) TLS against a real server process: every case gets a clear
//! status, and the server keeps serving.

mod support;

use std::time::{Duration, SystemTime};

use edgefleet_pki::{CertificateAuthority, JoinTokenSecret};
use edgefleet_proto::edgefleet::v1 as pb;
use edgefleet_test_support::padded_mlp;
use pb::agent_message::Kind as Upstream;
use pb::agent_service_client::AgentServiceClient;
use pb::control_message::Kind as Downstream;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

struct Enrolled {
    device_id: String,
    key_pem: String,
    certificate_pem: String,
    ca_pem: String,
}

fn inventory() -> pb::Inventory {
    pb::Inventory {
        cpu_model: "test cpu".into(),
        cpu_cores: 2,
        memory_bytes: 1 << 30,
        arch: "x86_64".into(),
        os: "test".into(),
        agent_version: "0".into(),
        runtimes: vec!["tract".into()],
        hostname: "test".into(),
        ..Default::default()
    }
}

async fn pinned(server: &Server, token: &str) -> AgentServiceClient<Channel> {
    let token = JoinTokenSecret::parse(token).unwrap();
    let tls = edgefleet_pki::pinned_client_tls_config(&token.ca_fingerprint).unwrap();
    let channel = edgefleet_pki::connect_tls(&server.agent_url, tls, Duration::from_secs(5))
        .await
        .unwrap();
    AgentServiceClient::new(channel)
}

async fn enroll_device(server: &Server) -> Enrolled {
    enroll_labelled(server, "").await
}

/// A device enrolled with a join token giving it `labels` (k=v,k2=v2).
async fn enroll_labelled(server: &Server, labels: &str) -> Enrolled {
    let token = server.join_token(&["--labels", labels]);
    let mut client = pinned(server, &token).await;
    let key_pem = edgefleet_pki::generate_device_key().unwrap();
    let csr_pem = edgefleet_pki::device_csr(&key_pem, "test").unwrap();
    let response = client
        .enroll(pb::EnrollRequest {
            join_token: token,
            csr_pem,
            inventory: Some(inventory()),
        })
        .await
        .unwrap()
        .into_inner();
    Enrolled {
        device_id: response.device_id,
        key_pem,
        certificate_pem: response.certificate_pem,
        ca_pem: response.ca_certificate_pem,
    }
}

async fn mtls(
    server: &Server,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<AgentServiceClient<Channel>, String> {
    let tls = edgefleet_pki::mtls_client_tls_config(ca_pem, cert_pem, key_pem)
        .map_err(|e| e.to_string())?;
    let channel = edgefleet_pki::connect_tls(&server.agent_url, tls, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    Ok(AgentServiceClient::new(channel.clone()))
}

fn hello(device_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(Upstream::Hello(pb::Hello {
            device_id: device_id.into(),
            inventory: Some(inventory()),
            ..Default::default()
        })),
    }
}

fn telemetry(device_id: &str, sequence: u64) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(Upstream::Telemetry(pb::TelemetryBatch {
            sequence,
            device_id: device_id.into(),
            start_unix_ms: 1,
            end_unix_ms: 2,
            ..Default::default()
        })),
    }
}

/// Opens a session with `first` as its first message; returns the sender
/// and the stream (or the status the server refused it with).
async fn open(
    client: &mut AgentServiceClient<Channel>,
    first: pb::AgentMessage,
) -> Result<
    (
        mpsc::Sender<pb::AgentMessage>,
        tonic::Streaming<pb::ControlMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first).await.unwrap();
    let response = client.session(ReceiverStream::new(rx)).await?;
    Ok((tx, response.into_inner()))
}

/// Reads until the stream ends; returns its final status (or OK).
async fn final_status(stream: &mut tonic::Streaming<pb::ControlMessage>) -> Code {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Err(_) => panic!("the server did not end the session"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Code::Ok,
            Ok(Err(status)) => return status.code(),
        }
    }
}

/// Every message until the stream ends, and its final status (or OK).
async fn rest_of(stream: &mut tonic::Streaming<pb::ControlMessage>) -> (Vec<Downstream>, Code) {
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Err(_) => panic!("the server did not end the session"),
            Ok(Ok(Some(message))) => messages.extend(message.kind),
            Ok(Ok(None)) => return (messages, Code::Ok),
            Ok(Err(status)) => return (messages, status.code()),
        }
    }
}

/// A session client holding `device`'s own certificate.
async fn device_client(server: &Server, device: &Enrolled) -> AgentServiceClient<Channel> {
    mtls(
        server,
        &device.ca_pem,
        &device.certificate_pem,
        &device.key_pem,
    )
    .await
    .unwrap()
}

/// The Welcome a session starts with.
async fn welcome(stream: &mut tonic::Streaming<pb::ControlMessage>) -> pb::Welcome {
    match stream.message().await.unwrap().unwrap().kind {
        Some(Downstream::Welcome(welcome)) => welcome,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[test]
fn enroll_rejects_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &[]);
    runtime().block_on(async {
        let token = server.join_token(&["--uses", "5"]);
        let mut client = pinned(&server, &token).await;
        let key = edgefleet_pki::generate_device_key().unwrap();
        let csr = edgefleet_pki::device_csr(&key, "x").unwrap();
        let garbage_csr = client
            .enroll(pb::EnrollRequest {
                join_token: token.clone(),
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n".into(),
                inventory: Some(inventory()),
            })
            .await
            .unwrap_err();
        assert_eq!(garbage_csr.code(), Code::InvalidArgument, "{garbage_csr:?}");
        let no_inventory = client
            .enroll(pb::EnrollRequest {
                join_token: token.clone(),
                csr_pem: csr.clone(),
                inventory: None,
            })
            .await
            .unwrap_err();
        assert_eq!(no_inventory.code(), Code::InvalidArgument);
        let huge = client
            .enroll(pb::EnrollRequest {
                join_token: token.clone(),
                csr_pem: csr.clone(),
                inventory: Some(pb::Inventory {
                    cpu_model: "x".repeat(10_000),
                    ..inventory()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(huge.code(), Code::InvalidArgument);
        let malformed_token = client
            .enroll(pb::EnrollRequest {
                join_token: "a.b".into(),
                csr_pem: csr.clone(),
                inventory: Some(inventory()),
            })
            .await
            .unwrap_err();
        assert_eq!(malformed_token.code(), Code::InvalidArgument);
        // None of those used the token up.
        let devices = server.cli_json(&["devices", "list"]);
        assert!(devices.as_array().unwrap().is_empty());
        client
            .enroll(pb::EnrollRequest {
                join_token: token,
                csr_pem: csr,
                inventory: Some(inventory()),
            })
            .await
            .unwrap();
    });
}

#[test]
fn sessions_need_a_valid_client_certificate_of_this_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), None, &[]);
    runtime().block_on(async {
        let device = enroll_device(&server).await;

        // No client certificate: the TLS layer lets it through (enrollment
        // needs that), the session refuses it.
        let token = server.join_token(&[]);
        let mut anonymous = pinned(&server, &token).await;
        let status = open(&mut anonymous, hello(&device.device_id))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

        // A certificate from another CA, naming the same device.
        let (other_ca, _) = CertificateAuthority::generate().unwrap();
        let csr = edgefleet_pki::device_csr(&device.key_pem, "x").unwrap();
        let foreign = other_ca
            .sign_device_csr(&csr, &device.device_id, Duration::from_secs(3600))
            .unwrap();
        let refused = match mtls(
            &server,
            &device.ca_pem,
            &foreign.certificate_pem,
            &device.key_pem,
        )
        .await
        {
            Err(_) => true,
            Ok(mut client) => open(&mut client, hello(&device.device_id)).await.is_err(),
        };
        assert!(refused, "a certificate of another CA was accepted");

        // An expired certificate of this fleet's CA.
        let (fleet_ca, created) = CertificateAuthority::load_or_create(&server.data_dir).unwrap();
        assert!(!created);
        let now = SystemTime::now();
        let expired = fleet_ca
            .sign_device_csr_with_validity(
                &csr,
                &device.device_id,
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        let refused = match mtls(
            &server,
            &device.ca_pem,
            &expired.certificate_pem,
            &device.key_pem,
        )
        .await
        {
            Err(_) => true,
            Ok(mut client) => open(&mut client, hello(&device.device_id)).await.is_err(),
        };
        assert!(refused, "an expired certificate was accepted");

        // A valid certificate of this CA for a device the server never enrolled.
        let stranger = fleet_ca
            .sign_device_csr(&csr, "dev-stranger", Duration::from_secs(3600))
            .unwrap();
        let mut client = mtls(
            &server,
            &device.ca_pem,
            &stranger.certificate_pem,
            &device.key_pem,
        )
        .await
        .unwrap();
        let status = open(&mut client, hello("dev-stranger")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);

        // The real one works.
        let mut client = device_client(&server, &device).await;
        let (_tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        let first = stream.message().await.unwrap().unwrap();
        assert!(matches!(first.kind, Some(Downstream::Welcome(_))));
    });
}

#[test]
fn sessions_refuse_malformed_or_impersonating_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &[]);
    runtime().block_on(async {
        let device = enroll_device(&server).await;
        let other = enroll_device(&server).await;
        let mut client = device_client(&server, &device).await;

        // Hello naming another device.
        let status = open(&mut client, hello(&other.device_id))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);

        // First message not a Hello.
        let status = open(&mut client, telemetry(&device.device_id, 1))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);

        // Telemetry claiming the other device's identity.
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        tx.send(telemetry(&other.device_id, 1)).await.unwrap();
        assert_eq!(final_status(&mut stream).await, Code::PermissionDenied);

        // Sequence 0, and a histogram out of range.
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        tx.send(telemetry(&device.device_id, 0)).await.unwrap();
        assert_eq!(final_status(&mut stream).await, Code::InvalidArgument);
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        let mut bad = pb::TelemetryBatch {
            sequence: 1,
            ..Default::default()
        };
        bad.models.push(pb::ModelTelemetry {
            name: "m".into(),
            latency_us: Some(pb::LogHistogram {
                first_bucket: 10_000,
                counts: vec![1],
                sum: 1,
            }),
            ..Default::default()
        });
        tx.send(pb::AgentMessage {
            kind: Some(Upstream::Telemetry(bad)),
        })
        .await
        .unwrap();
        assert_eq!(final_status(&mut stream).await, Code::InvalidArgument);

        // An oversized batch (beyond the 4 MiB message limit).
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        let huge = pb::TelemetryBatch {
            sequence: 1,
            events: vec![
                pb::Event {
                    message: "x".repeat(4000),
                    ..Default::default()
                };
                2000
            ],
            ..Default::default()
        };
        tx.send(pb::AgentMessage {
            kind: Some(Upstream::Telemetry(huge)),
        })
        .await
        .unwrap();
        let code = final_status(&mut stream).await;
        assert!(
            matches!(
                code,
                Code::ResourceExhausted | Code::OutOfRange | Code::Internal
            ),
            "oversized batch ended with {code:?}"
        );

        // None of it was stored; a proper batch still is, exactly once.
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        let welcome = stream.message().await.unwrap().unwrap();
        match welcome.kind {
            Some(Downstream::Welcome(w)) => assert_eq!(w.acked_sequence, 0),
            other => panic!("expected Welcome, got {other:?}"),
        }
        for _ in 0..2 {
            tx.send(telemetry(&device.device_id, 1)).await.unwrap();
            // The desired state may come first; the ack must follow.
            loop {
                let message = stream.message().await.unwrap().unwrap();
                match message.kind {
                    Some(Downstream::TelemetryAck(ack)) => {
                        assert_eq!(ack.sequence, 1);
                        break;
                    }
                    Some(Downstream::DesiredState(_)) => continue,
                    other => panic!("expected an ack, got {other:?}"),
                }
            }
        }
        let shown = server.device(&device.device_id);
        assert_eq!(shown["telemetry_sequence"], 1);
        let other_shown = server.device(&other.device_id);
        assert_eq!(other_shown["telemetry_sequence"], 0);
        assert!(
            server
                .metrics()
                .contains("edgefleet_server_telemetry_duplicate_batches_total 1")
        );
    });
}

fn upload(device_id: &str, sequences: impl IntoIterator<Item = u64>) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(Upstream::TelemetryUpload(pb::TelemetryUpload {
            batches: sequences
                .into_iter()
                .map(|sequence| pb::TelemetryBatch {
                    sequence,
                    device_id: device_id.into(),
                    start_unix_ms: sequence * 10_000,
                    end_unix_ms: (sequence + 1) * 10_000,
                    ..Default::default()
                })
                .collect(),
            sent_at_ms: 0,
        })),
    }
}

/// Without an upload interval (`--telemetry-upload-interval 0s`) the Welcome
/// still says the server takes TelemetryUploads, which carry when the agent
/// sent them: a backlog made an hour ago, uploaded now, is reckoned as an
/// hour old and kept out of the rollout gates' window of the last minutes,
/// while a single unstamped batch (an older agent's) is taken as made when
/// it arrived.
#[test]
fn without_an_upload_interval_stamped_uploads_are_taken_and_an_old_backlog_is_reckoned_old() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &["--telemetry-upload-interval", "0s"]);
    let runtime = runtime();
    let started = now_unix_ms();
    let device_id = runtime.block_on(async {
        let device = enroll_device(&server).await;
        let mut client = device_client(&server, &device).await;
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        let w = welcome(&mut stream).await;
        assert_eq!(w.telemetry_upload_interval_seconds, 0);
        assert!(w.takes_telemetry_uploads, "{w:?}");
        let hour_ago = now_unix_ms() as u64 - 3_600_000;
        // Batches 1 and 2 (10 and 20 requests): a backlog made an hour ago.
        tx.send(pb::AgentMessage {
            kind: Some(Upstream::TelemetryUpload(pb::TelemetryUpload {
                batches: vec![model_batch(1, hour_ago), model_batch(2, hour_ago + 10_000)],
                sent_at_ms: now_unix_ms() as u64,
            })),
        })
        .await
        .unwrap();
        assert_eq!(next_ack(&mut stream).await, 2);
        // Batch 3 (30 requests), from an older agent: unstamped.
        tx.send(pb::AgentMessage {
            kind: Some(Upstream::Telemetry(pb::TelemetryBatch {
                device_id: device.device_id.clone(),
                ..model_batch(3, hour_ago)
            })),
        })
        .await
        .unwrap();
        assert_eq!(next_ack(&mut stream).await, 3);
        device.device_id
    });
    let store = open_store(&runtime, &server);
    let window_start = started - 5 * 60_000;
    let points = runtime
        .block_on(store.received_model_series(
            std::slice::from_ref(&device_id),
            window_start,
            window_start..now_unix_ms() + 60_000,
        ))
        .unwrap();
    let requests: Vec<u64> = points.iter().map(|(_, p)| p.requests).collect();
    assert_eq!(
        requests,
        [30],
        "only the unstamped batch counts as made in the last 5 minutes"
    );
}

/// The next TelemetryAck's sequence (a desired state may come first).
async fn next_ack(stream: &mut tonic::Streaming<pb::ControlMessage>) -> u64 {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no ack within 10 s")
            .unwrap()
            .unwrap();
        match message.kind {
            Some(Downstream::TelemetryAck(ack)) => return ack.sequence,
            Some(Downstream::DesiredState(_)) => continue,
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}

#[test]
fn grouped_uploads_are_stored_once_acked_cumulatively_and_checked_batch_by_batch() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &["--telemetry-upload-interval", "2m"]);
    runtime().block_on(async {
        let device = enroll_device(&server).await;
        let other = enroll_device(&server).await;
        let client = device_client(&server, &device).await;
        // Compressed, as agents send it.
        let mut client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);

        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        match stream.message().await.unwrap().unwrap().kind {
            Some(Downstream::Welcome(w)) => {
                assert_eq!(w.telemetry_upload_interval_seconds, 120);
                assert_eq!(w.telemetry_interval_seconds, 10);
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
        // One group of five (device id left out, as agents do): one ack for all.
        tx.send(upload("", 1..=5)).await.unwrap();
        assert_eq!(next_ack(&mut stream).await, 5);
        // Resent with two new ones: stored once each, acked cumulatively.
        tx.send(upload(&device.device_id, 3..=7)).await.unwrap();
        assert_eq!(next_ack(&mut stream).await, 7);
        // An older agent's single batch is still accepted.
        tx.send(telemetry(&device.device_id, 8)).await.unwrap();
        assert_eq!(next_ack(&mut stream).await, 8);
        assert_eq!(server.device(&device.device_id)["telemetry_sequence"], 8);
        assert!(
            server
                .metrics()
                .contains("edgefleet_server_telemetry_duplicate_batches_total 3"),
            "{}",
            server.metrics()
        );

        // One batch of a group claiming another device: the whole group is
        // refused, none of it stored.
        let mut impostor = upload(&device.device_id, 9..=11);
        if let Some(Upstream::TelemetryUpload(u)) = &mut impostor.kind {
            u.batches[1].device_id = other.device_id.clone();
        }
        tx.send(impostor).await.unwrap();
        assert_eq!(final_status(&mut stream).await, Code::PermissionDenied);
        assert_eq!(server.device(&device.device_id)["telemetry_sequence"], 8);
        assert_eq!(server.device(&other.device_id)["telemetry_sequence"], 0);

        // More batches than one upload may carry.
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        tx.send(upload("", 100..=356)).await.unwrap();
        assert_eq!(final_status(&mut stream).await, Code::InvalidArgument);
        assert_eq!(server.device(&device.device_id)["telemetry_sequence"], 8);

        // The server still serves the device; the Welcome acks what is stored.
        let (_tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        match stream.message().await.unwrap().unwrap().kind {
            Some(Downstream::Welcome(w)) => assert_eq!(w.acked_sequence, 8),
            other => panic!("expected Welcome, got {other:?}"),
        }
    });
}

/// A device revoked by another replica (here: straight in the database,
/// before this replica's revocation poll) asks to renew its certificate
/// over the session it still has: no certificate, the session ends.
#[test]
fn a_revoked_device_gets_no_new_certificate_over_its_open_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &[]);
    runtime().block_on(async {
        let device = enroll_device(&server).await;
        let mut client = device_client(&server, &device).await;
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        welcome(&mut stream).await;
        {
            use sqlx::Connection;
            let url = format!("sqlite://{}", dir.path().join("edgefleet.db").display());
            let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query("UPDATE devices SET status = 'revoked', revoked_at = ? WHERE id = ?")
                .bind(now_unix_ms())
                .bind(&device.device_id)
                .execute(&mut db)
                .await
                .unwrap();
        }
        let csr_pem = edgefleet_pki::device_csr(&device.key_pem, "test").unwrap();
        tx.send(pb::AgentMessage {
            kind: Some(Upstream::RenewCertificate(pb::RenewCertificate { csr_pem })),
        })
        .await
        .unwrap();
        let (messages, end) = rest_of(&mut stream).await;
        assert!(
            !messages
                .iter()
                .any(|m| matches!(m, Downstream::Certificate(_))),
            "a revoked device was issued a certificate"
        );
        assert_eq!(end, Code::PermissionDenied);
    });
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A message the database cannot store stops the session's later ones, so
/// the device's stored sequence never passes a batch that is not stored:
/// the next Welcome acknowledges up to it, and the agent deletes what the
/// Welcome acknowledges.
#[test]
fn telemetry_after_a_message_that_could_not_be_stored_is_not_stored_either() {
    let dir = tempfile::tempdir().unwrap();
    let schema = PgSchema::create();
    let server = Server::start(
        dir.path(),
        Some(&schema.url),
        &["--telemetry-upload-interval", "2m"],
    );
    // The database refuses batch 5 of any device.
    schema.execute(
        "CREATE FUNCTION refuse_batch_5() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'batch 5 refused by the test'; END $$; \
         CREATE TRIGGER refuse_batch_5 BEFORE INSERT ON telemetry_batches \
         FOR EACH ROW WHEN (NEW.sequence = 5) EXECUTE FUNCTION refuse_batch_5();",
    );
    runtime().block_on(async {
        let device = enroll_device(&server).await;
        let mut client = device_client(&server, &device).await;
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        welcome(&mut stream).await;
        // Back to back, as an agent sending its backlog does.
        for sequences in [1..=4, 5..=5, 6..=8] {
            tx.send(upload("", sequences)).await.unwrap();
        }
        let (messages, end) = rest_of(&mut stream).await;
        let acks: Vec<u64> = messages
            .iter()
            .filter_map(|m| match m {
                Downstream::TelemetryAck(ack) => Some(ack.sequence),
                _ => None,
            })
            .collect();
        assert_eq!(end, Code::Unavailable);
        assert_eq!(acks, [4]);
        assert_eq!(server.device(&device.device_id)["telemetry_sequence"], 4);
        // The agent keeps 5 to 8 and sends them again.
        let (_tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        assert_eq!(welcome(&mut stream).await.acked_sequence, 4);
    });
}

/// Free text a device reports (why an activation failed, an event's
/// message) can be longer than the server keeps, or hold a NUL that
/// PostgreSQL's text cannot: it is stored cut and cleaned, never refused,
/// since an agent resends a refused report on every session and would be
/// disconnected over and over.
#[test]
fn long_or_nul_free_text_from_a_device_is_stored_cut_never_refused() {
    for db in ["sqlite", "postgres"] {
        let dir = tempfile::tempdir().unwrap();
        let schema = (db == "postgres").then(PgSchema::create);
        let server = Server::start(
            dir.path(),
            schema.as_ref().map(|s| s.url.as_str()),
            &["--telemetry-upload-interval", "0s"],
        );
        let runtime = runtime();
        let long_reason = format!("{}\0{}", "é".repeat(100), "é".repeat(3_000));
        let device_id = runtime.block_on(async {
            let device = enroll_device(&server).await;
            let mut client = device_client(&server, &device).await;
            let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
            welcome(&mut stream).await;
            tx.send(pb::AgentMessage {
                kind: Some(Upstream::Activation(pb::ActivationReport {
                    name: "m".into(),
                    version: 1,
                    stage: pb::activation_report::Stage::Failed as i32,
                    reason: long_reason.clone(),
                    unix_ms: 1,
                    generation: 1,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let batch = pb::TelemetryBatch {
                sequence: 1,
                device_id: device.device_id.clone(),
                start_unix_ms: 1,
                end_unix_ms: 2,
                events: vec![pb::Event {
                    unix_ms: 1,
                    model: "m".into(),
                    message: format!("bad\0byte{}", "x".repeat(5_000)),
                    ..Default::default()
                }],
                ..Default::default()
            };
            tx.send(pb::AgentMessage {
                kind: Some(Upstream::Telemetry(batch)),
            })
            .await
            .unwrap();
            assert_eq!(next_ack(&mut stream).await, 1, "{db}: the session went on");
            device.device_id
        });
        let store = open_store(&runtime, &server);
        let (activations, events) = runtime.block_on(async {
            (
                store.activations("m", 1).await.unwrap(),
                store.events(&device_id, 0, i64::MAX).await.unwrap(),
            )
        });
        assert_eq!(activations.len(), 1, "{db}: the activation was stored");
        let reason = &activations[0].reason;
        // 200 bytes of "é", U+FFFD (3 bytes) for the NUL, then "é" up to
        // the last character boundary within 4,096 bytes.
        assert_eq!(reason.len(), 4_095, "{db}: cut to at most 4096 bytes");
        assert_eq!(&reason[200..203], "\u{FFFD}", "{db}");
        assert!(reason[..200].chars().all(|c| c == 'é'), "{db}");
        assert!(reason[203..].chars().all(|c| c == 'é'), "{db}");
        assert_eq!(events.len(), 1, "{db}: the event was stored");
        assert!(events[0].message.starts_with("bad\u{FFFD}bytexxx"), "{db}");
        assert_eq!(events[0].message.len(), 4_096, "{db}");
    }
}

/// The runtime a Hello names is checked like the inventory's text: a NUL
/// (which PostgreSQL's text cannot store: every session would end
/// UNAVAILABLE and the agent would retry forever) or an overlong name is
/// INVALID_ARGUMENT on both stores, and a proper Hello still works.
#[test]
fn a_hello_naming_a_nul_or_overlong_runtime_is_invalid() {
    for db in [Db::Sqlite, Db::Postgres] {
        let dir = tempfile::tempdir().unwrap();
        let schema = (db == Db::Postgres).then(PgSchema::create);
        let server = Server::start(dir.path(), schema.as_ref().map(|s| s.url.as_str()), &[]);
        let device_id = runtime().block_on(async {
            let device = enroll_device(&server).await;
            let mut client = device_client(&server, &device).await;
            let with_runtime = |runtime: String| pb::AgentMessage {
                kind: Some(Upstream::Hello(pb::Hello {
                    device_id: device.device_id.clone(),
                    inventory: Some(inventory()),
                    runtime,
                    ..Default::default()
                })),
            };
            for bad in ["tract\0".to_string(), "x".repeat(33)] {
                let status = open(&mut client, with_runtime(bad.clone()))
                    .await
                    .map(|_| ())
                    .unwrap_err();
                assert_eq!(
                    status.code(),
                    Code::InvalidArgument,
                    "{db:?}: runtime {bad:?}: {status:?}"
                );
            }
            let (_tx, mut stream) = open(&mut client, with_runtime("tract".into()))
                .await
                .unwrap();
            welcome(&mut stream).await;
            device.device_id
        });
        assert_eq!(server.device(&device_id)["runtime"], "tract", "{db:?}");
    }
}

/// Servers starting together on a fresh data dir and database agree on one
/// CA, one release key and one admin token (each used to create its own:
/// the last file written won, a server could be left with a CA key and
/// another's certificate, and two admin tokens were stored, one in no
/// file); a later start loads them.
#[test]
fn servers_starting_together_on_a_fresh_fleet_agree_on_its_keys() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let schema = PgSchema::create();
        let start = || Server::start(dir.path(), Some(&schema.url), &[]);
        let servers: Vec<Server> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2).map(|_| scope.spawn(start)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let third = start();
        let (ca, created) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert!(!created);
        let (release_key, created) = edgefleet_pki::ReleaseKey::load_or_create(dir.path()).unwrap();
        assert!(!created);
        let runtime = runtime();
        let tokens = runtime
            .block_on(open_store(&runtime, &third).count_operator_tokens())
            .unwrap();
        assert_eq!(tokens, 1, "round {round}: one admin token");
        for server in servers.iter().chain([&third]) {
            // The admin token in the file works on each (the CLI uses it).
            let join_token = server.join_token(&[]);
            let fingerprint = JoinTokenSecret::parse(&join_token).unwrap().ca_fingerprint;
            assert_eq!(fingerprint, ca.fingerprint(), "round {round}: the CA");
            let release_public_key = runtime.block_on(async {
                let device = enroll_device(server).await;
                let mut client = device_client(server, &device).await;
                let (_tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
                welcome(&mut stream).await.release_public_key
            });
            assert_eq!(
                release_public_key,
                release_key.public_key(),
                "round {round}: the release key"
            );
        }
    }
}

/// A metric's value in the server's `/metrics` text (0 when absent).
fn metric(server: &Server, name_and_labels: &str) -> u64 {
    server
        .metrics()
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

fn refused_enrollments(server: &Server, reason: &str) -> u64 {
    metric(
        server,
        &format!("edgefleet_server_enrollments_refused_total{{reason=\"{reason}\"}}"),
    )
}

const GARBAGE_CSR: &str =
    "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n";

/// The join token is checked before the CSR is even parsed: a caller
/// without a valid token cannot make the CA sign anything. The refusals
/// say what they said before, and count under the same reasons.
#[test]
fn enrollment_checks_the_join_token_before_the_csr() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &[]);
    let once = server.join_token(&["--uses", "1"]);
    let short = server.join_token(&["--expires", "1s"]);
    runtime().block_on(async {
        let mut client = pinned(&server, &once).await;
        let key = edgefleet_pki::generate_device_key().unwrap();
        let csr = edgefleet_pki::device_csr(&key, "x").unwrap();
        let enroll = |join_token: &str, csr_pem: &str| pb::EnrollRequest {
            join_token: join_token.to_string(),
            csr_pem: csr_pem.to_string(),
            inventory: Some(inventory()),
        };
        client.enroll(enroll(&once, &csr)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let parts: Vec<&str> = once.split('.').collect();
        let unknown = format!("{}.{}.{}", "0".repeat(parts[0].len()), parts[1], parts[2]);
        let wrong_secret = format!("{}.{}.{}", parts[0], "0".repeat(parts[1].len()), parts[2]);
        for (token, says) in [
            (&unknown, "unknown join token"),
            (&wrong_secret, "unknown join token"),
            (&short, "the join token has expired"),
            (&once, "the join token has been used up"),
        ] {
            let status = client.enroll(enroll(token, GARBAGE_CSR)).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert_eq!(status.message(), says);
        }
        assert_eq!(refused_enrollments(&server, "unknown_token"), 2);
        assert_eq!(refused_enrollments(&server, "expired_token"), 1);
        assert_eq!(refused_enrollments(&server, "used_up_token"), 1);
        assert_eq!(refused_enrollments(&server, "bad_csr"), 0);

        // With a valid token, the CSR is what is refused, and the token
        // keeps its use.
        let fresh = server.join_token(&[]);
        let status = client
            .enroll(enroll(&fresh, GARBAGE_CSR))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(refused_enrollments(&server, "bad_csr"), 1);
        client.enroll(enroll(&fresh, &csr)).await.unwrap();
    });
}

fn renew(key_pem: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(Upstream::RenewCertificate(pb::RenewCertificate {
            csr_pem: edgefleet_pki::device_csr(key_pem, "test").unwrap(),
        })),
    }
}

/// Renews `device`'s certificate over a session opened with it; returns the
/// device as it is once it has installed the new certificate.
async fn renewed(server: &Server, device: &Enrolled) -> Enrolled {
    let mut client = device_client(server, device).await;
    let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
    welcome(&mut stream).await;
    let key_pem = edgefleet_pki::generate_device_key().unwrap();
    tx.send(renew(&key_pem)).await.unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no certificate within 10 s")
            .unwrap()
            .unwrap();
        match message.kind {
            Some(Downstream::Certificate(issued)) => {
                return Enrolled {
                    device_id: device.device_id.clone(),
                    key_pem,
                    certificate_pem: issued.certificate_pem,
                    ca_pem: device.ca_pem.clone(),
                };
            }
            Some(Downstream::DesiredState(_)) => continue,
            other => panic!("expected a certificate, got {other:?}"),
        }
    }
}

fn serial(device: &Enrolled) -> String {
    edgefleet_pki::certificate_info_pem(&device.certificate_pem)
        .unwrap()
        .serial_hex
}

/// After a renewal the old certificate keeps opening sessions (the agent
/// installs the new one only once it has it, and may have lost it), until
/// the device has used the new one: from then on only the new one is
/// accepted, for sessions and downloads alike.
#[test]
fn a_renewal_retires_the_old_certificate_once_the_new_one_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &[]);
    runtime().block_on(async {
        let old = enroll_device(&server).await;
        let new = renewed(&server, &old).await;
        assert_ne!(serial(&new), serial(&old));

        let mut old_client = device_client(&server, &old).await;
        for _ in 0..2 {
            let (_tx, mut stream) = open(&mut old_client, hello(&old.device_id))
                .await
                .expect("the old certificate, before the new one was used");
            welcome(&mut stream).await;
        }
        let mut new_client = device_client(&server, &new).await;
        let (tx, mut stream) = open(&mut new_client, hello(&new.device_id)).await.unwrap();
        welcome(&mut stream).await;
        drop((tx, stream));

        let status = open(&mut old_client, hello(&old.device_id))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("replaced by a renewal"),
            "{status:?}"
        );
        let status = old_client
            .download_blob(pb::DownloadBlobRequest {
                sha256: "ab".repeat(32),
                offset: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        // A fresh connection with it fares no better.
        let mut again = device_client(&server, &old).await;
        let status = open(&mut again, hello(&old.device_id)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(
            metric(
                &server,
                "edgefleet_server_sessions_refused_total{reason=\"retired_certificate\"}"
            ),
            2
        );

        // The new certificate keeps working, and renews in its turn.
        let (tx, mut stream) = open(&mut new_client, hello(&new.device_id)).await.unwrap();
        welcome(&mut stream).await;
        drop((tx, stream));
        let newer = renewed(&server, &new).await;
        let mut newer_client = device_client(&server, &newer).await;
        let (_tx, mut stream) = open(&mut newer_client, hello(&newer.device_id))
            .await
            .unwrap();
        welcome(&mut stream).await;
    });
}

/// Two renewals over one long session: the agent renews again only once it
/// has installed the first renewal's certificate, so that one (not the one
/// the session was opened with) is what stays accepted after the second.
#[test]
fn a_second_renewal_over_one_session_keeps_the_first_renewals_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &[]);
    runtime().block_on(async {
        let first = enroll_device(&server).await;
        let mut client = device_client(&server, &first).await;
        let (tx, mut stream) = open(&mut client, hello(&first.device_id)).await.unwrap();
        welcome(&mut stream).await;
        let mut keys = Vec::new();
        let mut certificates = Vec::new();
        for _ in 0..2 {
            let key_pem = edgefleet_pki::generate_device_key().unwrap();
            tx.send(renew(&key_pem)).await.unwrap();
            loop {
                match stream.message().await.unwrap().unwrap().kind {
                    Some(Downstream::Certificate(issued)) => {
                        certificates.push(issued.certificate_pem);
                        break;
                    }
                    Some(Downstream::DesiredState(_)) => continue,
                    other => panic!("expected a certificate, got {other:?}"),
                }
            }
            keys.push(key_pem);
        }
        drop((tx, stream));
        let second = Enrolled {
            device_id: first.device_id.clone(),
            key_pem: keys[0].clone(),
            certificate_pem: certificates[0].clone(),
            ca_pem: first.ca_pem.clone(),
        };
        // The agent crashed before installing the third: it comes back with
        // the second, which works; the first does not.
        let mut client = device_client(&server, &second).await;
        let (_tx, mut stream) = open(&mut client, hello(&second.device_id))
            .await
            .expect("the certificate the agent had installed");
        welcome(&mut stream).await;
        let mut client = device_client(&server, &first).await;
        let status = open(&mut client, hello(&first.device_id))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    });
}

/// A session opened with the old certificate during the grace window (a
/// thief's, say) gets no certificate once the device has used its new one
/// elsewhere (on another replica; here: straight in the database).
#[test]
fn a_renewal_over_a_retired_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &[]);
    runtime().block_on(async {
        let old = enroll_device(&server).await;
        let new = renewed(&server, &old).await;
        let mut client = device_client(&server, &old).await;
        let (tx, mut stream) = open(&mut client, hello(&old.device_id)).await.unwrap();
        welcome(&mut stream).await;
        let url = format!("sqlite://{}", dir.path().join("edgefleet.db").display());
        {
            use sqlx::Connection;
            let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query("UPDATE devices SET previous_certificate_serial = NULL WHERE id = ?")
                .bind(&old.device_id)
                .execute(&mut db)
                .await
                .unwrap();
        }
        let thief_key = edgefleet_pki::generate_device_key().unwrap();
        tx.send(renew(&thief_key)).await.unwrap();
        let (messages, end) = rest_of(&mut stream).await;
        assert!(
            !messages
                .iter()
                .any(|m| matches!(m, Downstream::Certificate(_))),
            "a retired certificate got a new one"
        );
        assert_eq!(end, Code::Unauthenticated);
        {
            use sqlx::Connection;
            let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
            let current: String =
                sqlx::query_scalar("SELECT certificate_serial FROM devices WHERE id = ?")
                    .bind(&old.device_id)
                    .fetch_one(&mut db)
                    .await
                    .unwrap();
            assert_eq!(current, serial(&new));
        }
    });
}

/// The server's database, behind its back.
async fn execute_sql(server: &Server, sql: &str) {
    use sqlx::{AssertSqlSafe, Connection, Executor};
    match &server.database_url {
        Some(url) => {
            let mut db = sqlx::PgConnection::connect(url).await.unwrap();
            db.execute(AssertSqlSafe(sql.to_string())).await.unwrap();
        }
        None => {
            let url = format!(
                "sqlite://{}",
                server.data_dir.join("edgefleet.db").display()
            );
            let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
            db.execute(AssertSqlSafe(sql.to_string())).await.unwrap();
        }
    }
}

/// What the database says when the test's triggers refuse a write.
const DATABASE_DETAIL: &str = "refused-by-the-test-trigger";
const STORAGE_ERROR: &str = "internal storage error; see the server log";

/// Makes the database refuse `event` (e.g. "INSERT") on `table`, with
/// [`DATABASE_DETAIL`] as its error text.
async fn refuse(server: &Server, event: &str, table: &str) {
    let name = format!("refuse_{}_{table}", event.to_lowercase());
    let sql = if server.database_url.is_some() {
        format!(
            "CREATE OR REPLACE FUNCTION refuse_by_test() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION '{DATABASE_DETAIL}'; END $$; \
             CREATE TRIGGER {name} BEFORE {event} ON {table} \
             FOR EACH ROW EXECUTE FUNCTION refuse_by_test();"
        )
    } else {
        format!(
            "CREATE TRIGGER {name} BEFORE {event} ON {table} \
             BEGIN SELECT RAISE(ABORT, '{DATABASE_DETAIL}'); END;"
        )
    };
    execute_sql(server, &sql).await;
}

async fn allow(server: &Server, event: &str, table: &str) {
    let name = format!("refuse_{}_{table}", event.to_lowercase());
    let on = if server.database_url.is_some() {
        format!(" ON {table}")
    } else {
        String::new()
    };
    execute_sql(server, &format!("DROP TRIGGER {name}{on}")).await;
}

fn assert_generic(status: &tonic::Status, code: Code) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(status.message(), STORAGE_ERROR, "{status:?}");
}

/// A database failure reaches agents and operators as its status code and
/// a generic message; the database's own text goes to the server log only.
fn storage_failures_reach_callers_without_the_databases_text(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let schema = (db == Db::Postgres).then(PgSchema::create);
    let server = Server::start(
        dir.path(),
        schema.as_ref().map(|s| s.url.as_str()),
        &["--telemetry-upload-interval", "2m"],
    );
    runtime().block_on(async {
        // Enroll: the device cannot be stored.
        refuse(&server, "INSERT", "devices").await;
        let token = server.join_token(&[]);
        let mut client = pinned(&server, &token).await;
        let key_pem = edgefleet_pki::generate_device_key().unwrap();
        let status = client
            .enroll(pb::EnrollRequest {
                join_token: token,
                csr_pem: edgefleet_pki::device_csr(&key_pem, "test").unwrap(),
                inventory: Some(inventory()),
            })
            .await
            .unwrap_err();
        assert_generic(&status, Code::Unavailable);
        allow(&server, "INSERT", "devices").await;

        // A session: its Hello cannot be recorded. An operator: the device
        // cannot be revoked.
        let device = enroll_device(&server).await;
        refuse(&server, "UPDATE", "devices").await;
        let mut client = device_client(&server, &device).await;
        let status = open(&mut client, hello(&device.device_id))
            .await
            .unwrap_err();
        assert_generic(&status, Code::Unavailable);
        let revoke = server.cli(&["devices", "revoke", &device.device_id]);
        assert!(!revoke.status.success());
        let said = String::from_utf8_lossy(&revoke.stderr);
        assert!(said.contains(STORAGE_ERROR), "{said}");
        assert!(!said.contains(DATABASE_DETAIL), "{said}");
        allow(&server, "UPDATE", "devices").await;

        // Telemetry that cannot be stored ends the session.
        refuse(&server, "INSERT", "telemetry_batches").await;
        let (tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        welcome(&mut stream).await;
        tx.send(upload("", 1..=3)).await.unwrap();
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the server did not end the session")
            {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the session ended without an error"),
                Err(status) => break status,
            }
        };
        assert_generic(&status, Code::Unavailable);
    });
    // The detail is in the server's log, once per failure. The log is read
    // by a thread, and the last failure may be logged after its status went
    // out: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = server.process.stderr.text();
        if log.matches(DATABASE_DETAIL).count() >= 4 || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        log.matches(DATABASE_DETAIL).count() >= 4,
        "the database's errors are not in the server log:\n{log}"
    );
}

#[test]
fn storage_failures_reach_callers_without_the_databases_text_sqlite() {
    storage_failures_reach_callers_without_the_databases_text(Db::Sqlite);
}

#[test]
fn storage_failures_reach_callers_without_the_databases_text_postgres() {
    storage_failures_reach_callers_without_the_databases_text(Db::Postgres);
}

/// A desired state changed by another replica (here: straight in the
/// database, which pokes no session of this one) reaches the device's
/// session on this replica: its replica compares the generations its
/// sessions sent with the database's, in one query, every few seconds.
#[test]
fn a_desired_state_changed_by_another_replica_reaches_the_session() {
    for db in [Db::Sqlite, Db::Postgres] {
        let dir = tempfile::tempdir().unwrap();
        let schema = (db == Db::Postgres).then(PgSchema::create);
        let server = Server::start(dir.path(), schema.as_ref().map(|s| s.url.as_str()), &[]);
        runtime().block_on(async {
            let device = enroll_device(&server).await;
            let mut client = device_client(&server, &device).await;
            let (_tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
            welcome(&mut stream).await;
            let first = loop {
                let message = stream.message().await.unwrap().unwrap();
                if let Some(Downstream::DesiredState(desired)) = message.kind {
                    break desired;
                }
            };
            assert_eq!((first.generation, first.models.len()), (0, 0), "{db:?}");
            let sha256 = "ab".repeat(32);
            let (signature, private) = match db {
                Db::Sqlite => ("x'0102'", "0"),
                Db::Postgres => ("'\\x0102'::bytea", "false"),
            };
            execute_sql(
                &server,
                &format!(
                    "INSERT INTO device_desired (device_id, name, version, sha256, size_bytes, \
                     signature, private) VALUES ('{}', 'elsewhere', 3, '{sha256}', 10, {signature}, \
                     {private})",
                    device.device_id
                ),
            )
            .await;
            execute_sql(
                &server,
                &format!(
                    "INSERT INTO device_generations (device_id, generation) VALUES ('{}', 1)",
                    device.device_id
                ),
            )
            .await;
            wait_for_desired(&mut stream, &sha256).await;
        });
    }
}

/// Reads a session until its desired state names `sha256`.
async fn wait_for_desired(stream: &mut tonic::Streaming<pb::ControlMessage>, sha256: &str) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("no desired state naming the blob within 30 s")
            .unwrap()
            .unwrap();
        if let Some(Downstream::DesiredState(desired)) = message.kind
            && desired.models.iter().any(|m| m.sha256 == sha256)
        {
            return;
        }
    }
}

/// A download in progress ends with PERMISSION_DENIED when its device is
/// revoked: by an operator on this replica, or on another replica (here:
/// straight in the database), noticed by the revocation watcher.
#[test]
fn a_download_in_progress_ends_when_its_device_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), None, &[]);
    let (by_operator, elsewhere) =
        runtime().block_on(async { (enroll_device(&server).await, enroll_device(&server).await) });
    let file = dir.path().join("padded.onnx");
    std::fs::write(&file, padded_mlp(64 << 20)).unwrap();
    let pushed = server.cli_json(&[
        "models",
        "push",
        file.to_str().unwrap(),
        "--name",
        "mlp",
        "--version",
        "1",
    ]);
    let sha256 = pushed["sha256"].as_str().unwrap().to_string();
    server.cli_json(&["rollouts", "create", "--model", "mlp@1"]);
    runtime().block_on(async {
        for (device, by_the_operator) in [(&by_operator, true), (&elsewhere, false)] {
            let mut session_client = device_client(&server, device).await;
            let (_tx, mut session) = open(&mut session_client, hello(&device.device_id))
                .await
                .unwrap();
            welcome(&mut session).await;
            wait_for_desired(&mut session, &sha256).await;
            // Its own connection, so that the unread download holds up
            // nothing else.
            let mut download_client = device_client(&server, device).await;
            let mut download = download_client
                .download_blob(pb::DownloadBlobRequest {
                    sha256: sha256.clone(),
                    offset: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let first = download.message().await.unwrap().unwrap();
            let total = first.total_size;
            let mut received = first.data.len() as u64;
            if by_the_operator {
                let revoked = server.cli(&["devices", "revoke", &device.device_id]);
                assert!(revoked.status.success());
            } else {
                execute_sql(
                    &server,
                    &format!(
                        "UPDATE devices SET status = 'revoked', revoked_at = {} WHERE id = '{}'",
                        now_unix_ms(),
                        device.device_id
                    ),
                )
                .await;
            }
            // The server has acted on the revocation once the session ends.
            assert_eq!(final_status(&mut session).await, Code::PermissionDenied);
            let end = loop {
                match tokio::time::timeout(Duration::from_secs(10), download.message())
                    .await
                    .expect("the download stalled")
                {
                    Ok(Some(chunk)) => received += chunk.data.len() as u64,
                    Ok(None) => break Code::Ok,
                    Err(status) => break status.code(),
                }
            };
            assert_eq!(
                end,
                Code::PermissionDenied,
                "{received} of {total} bytes downloaded"
            );
            assert!(received < total, "the whole blob was downloaded");
        }
    });
}

/// `DownloadBlob` streams a blob only to an enrolled, unrevoked device whose
/// own desired state names it (its digest in any case), on both stores:
/// another model's blob, a blob another device is to have, a digest that
/// is not one, an offset past the end and a revoked device are refused
/// with their own codes.
#[test]
fn a_download_is_refused_what_the_device_may_not_have() {
    for db in ["sqlite", "postgres"] {
        let dir = tempfile::tempdir().unwrap();
        let schema = (db == "postgres").then(PgSchema::create);
        let server = Server::start(
            &dir.path().join("server"),
            schema.as_ref().map(|s| s.url.as_str()),
            &[],
        );
        let (device, bystander) = runtime().block_on(async {
            (
                enroll_labelled(&server, "role=target").await,
                enroll_device(&server).await,
            )
        });
        let mut pushed = Vec::new();
        for (name, padding) in [("wanted", 1 << 10), ("other", 2 << 10)] {
            let file = dir.path().join(format!("{name}.onnx"));
            std::fs::write(&file, padded_mlp(padding)).unwrap();
            let model = server.cli_json(&[
                "models",
                "push",
                file.to_str().unwrap(),
                "--name",
                name,
                "--version",
                "1",
            ]);
            pushed.push(model["sha256"].as_str().unwrap().to_string());
        }
        let [wanted, other] = [pushed[0].clone(), pushed[1].clone()];
        server.cli_json(&[
            "rollouts",
            "create",
            "--model",
            "wanted@1",
            "--selector",
            "role=target",
        ]);
        runtime().block_on(async {
            let mut session_client = device_client(&server, &device).await;
            let (_tx, mut session) = open(&mut session_client, hello(&device.device_id))
                .await
                .unwrap();
            welcome(&mut session).await;
            wait_for_desired(&mut session, &wanted).await;

            let client = device_client(&server, &device).await;
            let download = |client: &AgentServiceClient<Channel>, sha256: &str, offset: u64| {
                let request = pb::DownloadBlobRequest {
                    sha256: sha256.to_string(),
                    offset,
                };
                let mut client = client.clone();
                async move {
                    let mut stream = client.download_blob(request).await?.into_inner();
                    let mut bytes = 0;
                    while let Some(chunk) = stream.message().await? {
                        bytes += chunk.data.len() as u64;
                    }
                    Ok::<u64, tonic::Status>(bytes)
                }
            };
            let size = download(&client, &wanted, 0).await.unwrap();
            assert!(size > 1 << 10, "{db}: {size} bytes");
            assert_eq!(
                download(&client, &wanted.to_ascii_uppercase(), size - 5)
                    .await
                    .unwrap(),
                5,
                "{db}"
            );
            let refused = |result: Result<u64, tonic::Status>, code: Code, text: &str| {
                let status = result.expect_err("refused");
                assert_eq!(status.code(), code, "{db}: {status:?}");
                assert!(status.message().contains(text), "{db}: {status:?}");
            };
            refused(
                download(&client, &other, 0).await,
                Code::PermissionDenied,
                "is not in the desired state",
            );
            refused(
                download(&client, "not-a-digest", 0).await,
                Code::InvalidArgument,
                "not a hex SHA-256",
            );
            refused(
                download(&client, &wanted, size + 1).await,
                Code::OutOfRange,
                "past the end",
            );
            let bystander_client = device_client(&server, &bystander).await;
            refused(
                download(&bystander_client, &wanted, 0).await,
                Code::PermissionDenied,
                "is not in the desired state",
            );
            let revoked = server.cli(&["devices", "revoke", &device.device_id]);
            assert!(revoked.status.success(), "{db}");
            let fresh = device_client(&server, &device).await;
            refused(
                download(&fresh, &wanted, 0).await,
                Code::PermissionDenied,
                "has been revoked",
            );
        });
    }
}

/// A session whose agent says nothing after its Hello is ended by the
/// server once it has been silent for the idle timeout, although the
/// server's own work on the session (the desired-state poll, every 5 s)
/// wakes it more often than that.
#[test]
fn a_silent_session_is_ended_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &["--session-idle-timeout", "7s"]);
    runtime().block_on(async {
        // A session whose agent speaks (heartbeats) more often stays open.
        let talker = enroll_device(&server).await;
        let mut client = device_client(&server, &talker).await;
        let (tx, mut stream) = open(&mut client, hello(&talker.device_id)).await.unwrap();
        welcome(&mut stream).await;
        for _ in 0..6 {
            let heartbeat = pb::AgentMessage {
                kind: Some(Upstream::Heartbeat(pb::Heartbeat { unix_millis: 1 })),
            };
            tx.send(heartbeat).await.unwrap();
            // Whatever the server sends meanwhile (its desired state), but
            // not the end of the session.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while let Ok(message) = tokio::time::timeout_at(deadline, stream.message()).await {
                assert!(
                    matches!(message, Ok(Some(_))),
                    "a session that keeps talking was ended: {message:?}"
                );
            }
        }
        drop(tx);

        let device = enroll_device(&server).await;
        let mut client = device_client(&server, &device).await;
        let started = std::time::Instant::now();
        // `_tx` stays open: the agent is connected, only silent.
        let (_tx, mut stream) = open(&mut client, hello(&device.device_id)).await.unwrap();
        welcome(&mut stream).await;
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Code::Ok,
                    Err(status) => return status.code(),
                }
            }
        })
        .await
        .expect("the server did not end a session silent for longer than its idle timeout");
        let after = started.elapsed();
        assert_eq!(ended, Code::DeadlineExceeded);
        assert!(
            after >= Duration::from_secs(6) && after < Duration::from_secs(20),
            "ended after {after:?}"
        );
    });
    assert_eq!(
        metric(
            &server,
            "edgefleet_server_sessions_refused_total{reason=\"idle\"}"
        ),
        1
    );
}

/// The control plane's `/metrics` says what its text is: OpenMetrics,
/// ended by `# EOF`, which Prometheus parses by that type; a path or method
/// the listener does not serve gets a JSON error.
#[test]
fn metrics_are_served_as_openmetrics_and_other_paths_get_json_errors() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None, &[]);
    let tcp = std::net::TcpStream::connect(server.http_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut stream = support::tls_client(tcp, &server.ca_cert());
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        server.http_addr
    )
    .unwrap();
    let (response, _) = until_closed(&mut stream);
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    // What the listener does not serve is answered in JSON.
    let (status, body) = server.request("GET", "/nothing", None).unwrap();
    assert_eq!(status, 404);
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"], "no such endpoint: /nothing");
    let (status, body) = server.request("POST", "/metrics", None).unwrap();
    assert_eq!(status, 405);
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        error["error"],
        "POST is not allowed on /metrics (see the Allow header)"
    );
}

/// Everything a connection yields until the server closes it, and how long
/// that took; panics if it stays open for 10 s (the socket's read timeout).
fn until_closed(connection: &mut impl std::io::Read) -> (String, Duration) {
    let started = std::time::Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match connection.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            // A TLS connection closed without close_notify.
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(err) => panic!(
                "the server did not close the connection within 10 s ({err}); received {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
    (
        String::from_utf8_lossy(&received).into_owned(),
        started.elapsed(),
    )
}

/// A client that stops halfway through its request's headers, or leaves a
/// kept-alive connection idle, is disconnected after the HTTP read timeout,
/// on the plaintext listener (loopback, when asked for) and the TLS one,
/// and the listener serves on. Before, both kept such connections open for
/// as long as the client liked.
#[test]
fn stalled_http_clients_are_disconnected_on_the_plaintext_and_tls_listeners() {
    use std::io::Write;
    const TIMEOUT: Duration = Duration::from_millis(500);
    let timeout = format!("{}ms", TIMEOUT.as_millis());
    for (http, plaintext, tls) in [
        ("127.0.0.1:0", true, false),
        ("127.0.0.1:0", false, true),
        ("0.0.0.0:0", true, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["--http-read-timeout", &timeout];
        if plaintext {
            args.push("--plaintext-on-loopback");
        }
        let server = Server::start_on(
            dir.path(),
            None,
            &args,
            Listen {
                http: http.parse().unwrap(),
                ..Listen::ephemeral()
            },
        );
        assert_eq!(
            server.http_url.starts_with("https://"),
            tls,
            "{}",
            server.http_url
        );
        let port = server.http_addr.port();
        let connect = || -> Box<dyn ReadWrite> {
            let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            if !tls {
                return Box::new(tcp);
            }
            Box::new(support::tls_client(tcp, &server.ca_cert()))
        };
        let what = if tls { "TLS" } else { "plaintext" };

        // Sends `request`, then reads until the server closes the connection.
        let exchange = |request: &[u8]| {
            let mut stream = connect();
            stream.write_all(request).unwrap();
            stream.flush().unwrap();
            until_closed(&mut stream)
        };

        // Headers that stop halfway: closed after the timeout, nothing answered.
        let (answer, after) = exchange(b"GET /healthz HTTP/1.1\r\nHost: cp");
        assert_eq!(answer, "", "{what}");
        // (The server counts from before the request was written.)
        assert!(after >= TIMEOUT * 4 / 5, "{what}: closed after {after:?}");

        // A request answered; the connection, kept alive and then idle, is
        // closed after the timeout.
        let (answer, after) = exchange(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{what}: {answer}");
        assert!(after >= TIMEOUT * 4 / 5, "{what}: closed after {after:?}");

        // And the listener serves on.
        let (answer, _) =
            exchange(b"GET /healthz HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
    }
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// An operator API client that vanished (its HTTP/2 stack no longer
/// answering) is pinged after the keepalive and dropped when the ping goes
/// unanswered, so what it had sent is not held; a live client's quiet
/// stream (a health `Watch`, as quiet as a `rollouts watch` between
/// changes) answers the pings and keeps going.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_api_client_that_stops_answering_pings_is_dropped() {
    use edgefleet_test_support::raw_http2;

    let dir = tempfile::tempdir().unwrap();
    let server = tokio::task::spawn_blocking({
        let path = dir.path().to_path_buf();
        // Plaintext: the raw HTTP/2 client below speaks no TLS.
        move || {
            Server::start(
                &path,
                None,
                &["--api-keepalive", "300ms", "--plaintext-on-loopback"],
            )
        }
    })
    .await
    .unwrap();

    // A live client with a quiet stream.
    let channel = server.operator_channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());

    // The vanished one: settings acknowledged, then nothing.
    let mut socket = tokio::net::TcpStream::connect(server.api_addr)
        .await
        .unwrap();
    let closed =
        raw_http2::silent_until_closed(&mut socket, &raw_http2::opening(), Duration::from_secs(10))
            .await;
    assert_ne!(
        closed, None,
        "the operator API keeps a client that does not answer its pings"
    );
    assert_eq!(
        closed,
        Some(true),
        "the connection was closed without a ping first"
    );

    // The quiet stream, pinged as long, is still open, and its channel serves.
    let still_open = tokio::time::timeout(Duration::from_millis(200), watch.message()).await;
    assert!(
        still_open.is_err(),
        "the quiet stream ended: {still_open:?}"
    );
    let check = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(check.is_ok(), "{check:?}");
    drop(server);
}
