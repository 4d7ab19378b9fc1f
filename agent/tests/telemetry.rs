//! Telemetry end to end: the real agent serving real fixtures records every
//! request into its telemetry recorder; a collector turns that into batches
//! in a real on-disk outbox that survives a reopen.

mod support;

use std::time::{Duration, SystemTime};

use edgefleet_agent::runtime::RuntimeChoice;
use edgefleet_agent::telemetry::{
    DeviceProbe, Outbox, TelemetryCollector, TelemetryConfig, collect_inventory,
};
use edgefleet_proto::edgefleet::v1::{ModelTelemetry, event};
use edgefleet_test_support::assert_eventually;
use serde_json::{Value, json};
use support::*;

fn http_infer_body() -> Value {
    json!({ "inputs": cases("mlp")[0]["inputs"] })
}

async fn post(agent: &TestAgent, path: &str, body: &Value) -> u16 {
    reqwest::Client::new()
        .post(agent.url(path))
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn find<'a>(models: &'a [ModelTelemetry], name: &str, version: u64) -> &'a ModelTelemetry {
    models
        .iter()
        .find(|m| m.name == name && m.version == version)
        .unwrap_or_else(|| panic!("no telemetry for {name} v{version} in {models:?}"))
}

async fn requests_are_recorded_per_model_version(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp").add("mlp", 2, "mlp");
    repo.config("mlp", "version_policy = { latest = 2 }\n");
    repo.add("conv", 1, "conv");
    let agent = agent(repo.path(), runtime).start().await;

    // Loading was recorded as events.
    let (_, events) = agent.telemetry.take_interval(SystemTime::now());
    let loaded: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e.kind == event::Kind::ModelLoaded as i32)
        .map(|e| (e.model.clone(), e.version))
        .collect();
    for expected in [("mlp", 1), ("mlp", 2), ("conv", 1)] {
        assert!(
            loaded.contains(&(expected.0.to_string(), expected.1)),
            "{expected:?} not in {loaded:?}"
        );
    }

    const N: u64 = 25;
    for _ in 0..N {
        assert_eq!(
            post(
                &agent,
                "/v2/models/mlp/versions/1/infer",
                &http_infer_body()
            )
            .await,
            200
        );
    }
    let mut grpc = agent.grpc().await;
    let mut request = edgefleet_proto::inference::ModelInferRequest {
        model_name: "mlp".into(),
        model_version: "2".into(),
        ..Default::default()
    };
    let input = &cases("mlp")[0]["inputs"][0];
    request.inputs.push(
        edgefleet_proto::inference::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: serde_json::from_value(input["shape"].clone()).unwrap(),
            contents: Some(edgefleet_proto::inference::InferTensorContents {
                fp32_contents: input["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    for _ in 0..3 {
        grpc.model_infer(request.clone()).await.unwrap();
    }
    // A bad input on a known version: a request and an error there.
    let bad = json!({ "inputs": [{ "name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3] }] });
    assert_eq!(
        post(&agent, "/v2/models/mlp/versions/2/infer", &bad).await,
        400
    );
    // Unknown models belong to no version.
    assert_eq!(
        post(&agent, "/v2/models/nope/infer", &http_infer_body()).await,
        404
    );

    let (models, _) = agent.telemetry.take_interval(SystemTime::now());
    // conv served nothing: omitted.
    assert_eq!(models.len(), 2, "{models:?}");
    let v1 = find(&models, "mlp", 1);
    assert_eq!(
        (v1.requests, v1.errors, v1.local, v1.offloaded),
        (N, 0, N, 0)
    );
    let latency = v1.latency_us.as_ref().unwrap();
    assert_eq!(latency.count(), N);
    assert!(latency.sum > 0);
    let p50 = latency.quantile(0.5).unwrap();
    assert!(p50 < 10_000_000, "a tiny MLP's median latency is {p50} µs");
    let batches = v1.batch_size.as_ref().unwrap();
    assert!(batches.count() >= 1 && batches.sum == N, "{batches:?}");
    assert!(v1.max_queue_depth >= 1);

    let v2 = find(&models, "mlp", 2);
    assert_eq!((v2.requests, v2.errors, v2.local), (4, 1, 4));
    assert_eq!(v2.latency_us.as_ref().unwrap().count(), 4);
    // The bad request never reached the worker.
    assert_eq!(v2.batch_size.as_ref().unwrap().sum, 3);

    // The next interval starts empty.
    let (models, events) = agent.telemetry.take_interval(SystemTime::now());
    assert!(models.is_empty(), "{models:?}");
    assert!(events.is_empty(), "{events:?}");
    agent.stop().await;
}

async fn unloading_is_an_event(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp").add("conv", 1, "conv");
    let agent = agent(repo.path(), runtime)
        .poll(Duration::from_millis(100))
        .start()
        .await;
    std::fs::remove_dir_all(repo.path().join("conv")).unwrap();
    let telemetry = agent.telemetry.clone();
    let mut seen = Vec::new();
    assert_eventually(Duration::from_secs(20), || {
        let (_, events) = telemetry.take_interval(SystemTime::now());
        seen.extend(events);
        let found = seen.iter().any(|e| {
            e.kind == event::Kind::ModelUnloaded as i32 && e.model == "conv" && e.version == 1
        });
        async move { found }
    })
    .await;
    agent.stop().await;
}

async fn load_failures_are_events_once_each(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp")
        .write("garbage", 1, b"not an onnx model")
        .config("bad_config", "max_batch_size = \"lots\"")
        .add("bad_config", 1, "mlp");
    let agent = agent(repo.path(), runtime)
        .poll(Duration::from_millis(50))
        .start()
        .await;
    // Several rescans of the same broken files.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, events) = agent.telemetry.take_interval(SystemTime::now());
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.kind == event::Kind::ModelFailed as i32)
        .collect();
    let of = |model: &str| failed.iter().filter(|e| e.model == model).count();
    assert_eq!(of("garbage"), 1, "{failed:?}");
    assert_eq!(of("bad_config"), 1, "{failed:?}");
    assert!(
        failed
            .iter()
            .find(|e| e.model == "bad_config")
            .is_some_and(|e| e.message.contains("config.toml")),
        "{failed:?}"
    );
    agent.stop().await;
}

on_both_runtimes!(
    requests_are_recorded_per_model_version,
    unloading_is_an_event,
    load_failures_are_events_once_each
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_turns_served_requests_into_durable_batches() {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    let agent = agent(repo.path(), RuntimeChoice::Tract).start().await;
    let state = tempfile::tempdir().unwrap();
    let outbox_dir = state.path().join("telemetry");
    let start = SystemTime::now();
    let mut collector = TelemetryCollector::new(
        agent.telemetry.clone(),
        DeviceProbe::new(),
        Outbox::open(&outbox_dir, 1 << 20).unwrap(),
        TelemetryConfig::default(),
        "tract",
        start,
    );
    collector.set_device_id("device-under-test");
    for _ in 0..5 {
        assert_eq!(
            post(&agent, "/v2/models/mlp/infer", &http_infer_body()).await,
            200
        );
    }
    let first = collector.tick(SystemTime::now()).unwrap();
    let second = collector.tick(SystemTime::now()).unwrap();
    assert_eq!((first, second), (1, 2));
    agent.stop().await;
    drop(collector);

    // After a restart the backlog is still there, in order.
    let mut outbox = Outbox::open(&outbox_dir, 1 << 20).unwrap();
    assert_eq!(outbox.last_sequence(), 2);
    let batches = outbox.pending_after(0, 10).unwrap();
    assert_eq!(batches.len(), 2);
    let batch = &batches[0];
    assert_eq!(batch.sequence, 1);
    assert_eq!(batch.device_id, "device-under-test");
    assert!(batch.end_unix_ms >= batch.start_unix_ms);
    let mlp = find(&batch.models, "mlp", 1);
    assert_eq!(mlp.requests, 5);
    assert_eq!(mlp.latency_us.as_ref().unwrap().count(), 5);
    assert!(
        batch
            .events
            .iter()
            .any(|e| e.kind == event::Kind::ModelLoaded as i32 && e.model == "mlp")
    );
    let device = batch.device.as_ref().unwrap();
    assert_eq!(device.runtime, "tract");
    assert!(device.agent_rss_bytes > 0);
    assert!(batches[1].models.is_empty());
    assert_eq!(batches[1].start_unix_ms, batch.end_unix_ms);

    // The first Welcome of a new device (nothing stored), then an ack.
    outbox.ack(0).unwrap();
    outbox.ack(1).unwrap();
    assert_eq!(outbox.pending_sequences(), vec![2]);
}

#[test]
fn inventory_of_this_machine() {
    let inventory = collect_inventory(vec!["tract".into()]);
    assert!(inventory.cpu_cores >= 1);
    assert_eq!(inventory.arch, std::env::consts::ARCH);
    assert_eq!(inventory.runtimes, vec!["tract"]);
    assert!(!inventory.agent_version.is_empty());
}
