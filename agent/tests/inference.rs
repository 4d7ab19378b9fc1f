//! End to end: the real agent on ephemeral ports, real fixture models, real
//! runtimes (each test runs on tract and on ONNX Runtime), real gRPC and HTTP
//! clients. Expected outputs come from onnxruntime in Python.

mod support;

use bytes::Bytes;
use std::collections::HashMap;
use std::time::Duration;

use edgefleet_agent::http::data_to_json;
use edgefleet_agent::runtime::RuntimeChoice;
use edgefleet_agent::tensor::{DataType, Tensor, TensorData};
use edgefleet_proto::inference as pb;
use edgefleet_test_support::raw_http2::{
    DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, RST_STREAM, SETTINGS, frame,
};
use edgefleet_test_support::{fixture_model, reflected_services, testdata};
use serde_json::{Value, json};
use support::*;

async fn every_fixture_matches_onnxruntime_python_over_http(runtime: RuntimeChoice) {
    let repo = all_fixtures_repo();
    let agent = agent(repo.path(), runtime).start().await;
    let http = reqwest::Client::new();
    for model in fixture_names() {
        if let Some(words) = expected_load_failure(&model, runtime) {
            let response = http
                .get(agent.url(&format!("/v2/models/{model}/ready")))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                400,
                "{model} should not be ready on {runtime:?}"
            );
            let response = http
                .post(agent.url(&format!("/v2/models/{model}/infer")))
                .json(&json!({"inputs": cases(&model)[0]["inputs"]}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 503);
            let body: Value = response.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap().contains(words),
                "{model}: {body}"
            );
            continue;
        }
        for (i, case) in cases(&model).iter().enumerate() {
            let context = format!("{model} case {i} over HTTP on {runtime:?}");
            let response = http
                .post(agent.url(&format!("/v2/models/{model}/infer")))
                .json(&json!({ "id": format!("case-{i}"), "inputs": case["inputs"] }))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                200,
                "{context}: {}",
                response.text().await.unwrap()
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["model_name"], model.as_str());
            assert_eq!(body["model_version"], "1");
            assert_eq!(
                body["id"],
                format!("case-{i}"),
                "{context}: request id echoed"
            );
            let got = sorted_by_name(body["outputs"].as_array().unwrap().clone());
            let want = sorted_by_name(case["outputs"].as_array().unwrap().clone());
            assert_eq!(got.len(), want.len(), "{context}");
            for (g, w) in got.iter().zip(&want) {
                assert_tensor_matches(g, w, &context);
            }
        }
    }
    agent.stop().await;
}

async fn every_fixture_matches_onnxruntime_python_over_grpc(runtime: RuntimeChoice) {
    let repo = all_fixtures_repo();
    let agent = agent(repo.path(), runtime).start().await;
    let mut client = agent.grpc().await;
    for model in fixture_names() {
        if expected_load_failure(&model, runtime).is_some() {
            let ready = client
                .model_ready(pb::ModelReadyRequest {
                    name: model.clone(),
                    version: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!ready.ready, "{model} should not be ready on {runtime:?}");
            continue;
        }
        for (i, case) in cases(&model).iter().enumerate() {
            for raw in grpc_encodings(case) {
                let context = format!("{model} case {i} over gRPC (raw: {raw}) on {runtime:?}");
                let response = client
                    .model_infer(grpc_request(&model, case, raw))
                    .await
                    .unwrap_or_else(|status| panic!("{context}: {status}"))
                    .into_inner();
                assert_eq!(
                    response.id,
                    format!("req-{model}"),
                    "{context}: request id echoed"
                );
                assert_eq!(response.model_version, "1");
                assert_grpc_outputs_match(&response, case, &context);
            }
        }
    }
    agent.stop().await;
}

async fn output_selection_returns_only_the_outputs_asked_for(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("multi_io", 1, "multi_io");
    let agent = agent(repo.path(), runtime).start().await;
    let case = &cases("multi_io")[0];
    let mut request = grpc_request("multi_io", case, true);
    request.outputs = vec![pb::model_infer_request::InferRequestedOutputTensor {
        name: "product".into(),
        parameters: Default::default(),
    }];
    let response = agent
        .grpc()
        .await
        .model_infer(request)
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = response.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["product"]);
    let expected = case["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "product")
        .unwrap();
    assert_tensor_matches(
        &grpc_outputs_as_json(&response)[0],
        expected,
        "selected output",
    );

    let body: Value = reqwest::Client::new()
        .post(agent.url("/v2/models/multi_io/infer"))
        .json(&json!({ "inputs": case["inputs"], "outputs": [{"name": "a_max"}, {"name": "sum"}] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a_max", "sum"]);
    agent.stop().await;
}

async fn metadata_and_health_on_both_protocols(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("dynamic", 1, "dynamic")
        .add("no_batch", 1, "no_batch")
        .add("int_bool", 3, "int_bool");
    let agent = agent(repo.path(), runtime).start().await;
    let http = reqwest::Client::new();
    let runtime_name = match runtime {
        RuntimeChoice::Tract => "tract",
        _ => "onnxruntime",
    };

    let server: Value = http
        .get(agent.url("/v2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(server["name"], "edgefleet-agent");
    assert_eq!(server["runtime"], runtime_name);
    assert_eq!(
        server["extensions"],
        json!(["binary_tensor_data", "model_configuration", "statistics"])
    );
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/ready",
        "/v2/models/dynamic/ready",
        "/v2/models/int_bool/versions/3/ready",
    ] {
        assert_eq!(
            http.get(agent.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }

    let meta: Value = http
        .get(agent.url("/v2/models/dynamic"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(
        meta["inputs"],
        json!([{"name": "x", "datatype": "FP32", "shape": [-1, -1]}])
    );
    let outputs = sorted_by_name(meta["outputs"].as_array().unwrap().clone());
    assert_eq!(
        outputs,
        vec![
            json!({"name": "row_sum", "datatype": "FP32", "shape": [-1]}),
            json!({"name": "y", "datatype": "FP32", "shape": [-1, -1]}),
        ]
    );
    let meta: Value = http
        .get(agent.url("/v2/models/int_bool/versions/3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["versions"], json!(["3"]));
    let inputs = sorted_by_name(meta["inputs"].as_array().unwrap().clone());
    assert_eq!(
        inputs,
        vec![
            json!({"name": "mask", "datatype": "BOOL", "shape": [-1, 3]}),
            json!({"name": "x", "datatype": "INT64", "shape": [-1, 3]}),
        ]
    );

    let mut grpc = agent.grpc().await;
    assert!(
        grpc.server_live(pb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        grpc.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let server = grpc
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(server.name, "edgefleet-agent");
    assert!(
        server
            .extensions
            .contains(&format!("runtime:{runtime_name}")),
        "{:?}",
        server.extensions
    );
    let meta = grpc
        .model_metadata(pb::ModelMetadataRequest {
            name: "no_batch".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.inputs[0].shape, vec![2, 3]);
    assert_eq!(meta.outputs[0].shape, vec![2, 2]);
    assert_eq!(meta.platform, format!("{runtime_name}_onnx"));
    let ready = grpc
        .model_ready(pb::ModelReadyRequest {
            name: "int_bool".into(),
            version: "3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);

    // Standard gRPC health and reflection.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", agent.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "inference.GRPCInferenceService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Reflection lists exactly the services served, each resolvable.
    let services = reflected_services(channel).await;
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "inference.GRPCInferenceService",
        ]
    );
    agent.stop().await;
}

/// Many clients at once: every answer belongs to its own request.
async fn concurrent_requests_are_batched_and_each_gets_its_own_answer(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp")
        .config("mlp", "max_batch_size = 16\nmax_queue_delay_us = 20000\n");
    repo.add("no_batch", 1, "no_batch")
        .config("no_batch", "max_queue_delay_us = 20000\n");
    // Dynamic first dimensions, but not one batch: [N, 2] flattened to [K]
    // or to an unnamed dimension, and [N] sorted (an unnamed dimension too;
    // tract cannot run its TopK of a k computed from the input).
    let unbatched: &[&str] = match runtime {
        RuntimeChoice::Onnxruntime => &["flatten", "flatten_unnamed", "sorted"],
        _ => &["flatten", "flatten_unnamed"],
    };
    for &model in unbatched {
        let path = format!("batch-dims/{model}/1/model.onnx");
        repo.write(model, 1, &std::fs::read(testdata().join(path)).unwrap())
            .config(model, "max_queue_delay_us = 20000\n");
    }
    let agent = agent(repo.path(), runtime).start().await;
    let mut tasks = Vec::new();
    for i in 0..12 * unbatched.len() {
        let model = unbatched[i % unbatched.len()];
        let v = (i / unbatched.len()) as f32;
        let case = if model == "sorted" {
            json!({
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [v, v + 0.5, v + 0.25]}],
                "outputs": [
                    {"name": "y", "datatype": "FP32", "shape": [3], "data": [v + 0.5, v + 0.25, v]},
                    {"name": "indices", "datatype": "INT64", "shape": [3], "data": [1, 2, 0]},
                ],
            })
        } else {
            json!({
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [v, v + 0.5]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [v, v + 0.5]}],
            })
        };
        let mut client = agent.grpc().await;
        tasks.push(tokio::spawn(async move {
            let response = client
                .model_infer(grpc_request(model, &case, i % 2 == 0))
                .await
                .unwrap_or_else(|status| panic!("{model} request {i}: {status}"))
                .into_inner();
            let got = grpc_outputs_as_json(&response);
            let want = case["outputs"].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{model} request {i}");
            for (got, want) in got.iter().zip(want) {
                assert_tensor_matches(got, want, &format!("{model} request {i}"));
            }
        }));
    }
    for i in 0..48 {
        let (model, cases) = if i % 4 == 3 {
            ("no_batch", cases("no_batch"))
        } else {
            ("mlp", cases("mlp"))
        };
        let case = cases[i % cases.len()].clone();
        let mut client = agent.grpc().await;
        tasks.push(tokio::spawn(async move {
            let response = client
                .model_infer(grpc_request(model, &case, i % 2 == 0))
                .await
                .unwrap()
                .into_inner();
            assert_grpc_outputs_match(
                &response,
                &case,
                &format!("concurrent request {i} to {model}"),
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let metrics = agent.metrics().await;
    let batches = metric_value(
        &metrics,
        "edgefleet_inference_batch_size_count",
        "model=\"mlp\"",
    );
    let requests = metric_value(
        &metrics,
        "edgefleet_inference_requests_total",
        "model=\"mlp\"",
    );
    assert_eq!(requests, 36.0);
    // Batches are timed once per run; each request's own time in the agent once per request.
    let timed = metric_value(
        &metrics,
        "edgefleet_inference_request_seconds_count",
        "model=\"mlp\"",
    );
    assert_eq!(timed, requests, "one request duration per mlp request");
    let waited = metric_value(
        &metrics,
        "edgefleet_inference_request_seconds_sum",
        "model=\"mlp\"",
    );
    let queued = metric_value(
        &metrics,
        "edgefleet_inference_queue_seconds_sum",
        "model=\"mlp\"",
    );
    assert!(
        waited >= queued,
        "requests spent {waited} s in the agent but {queued} s in the queue alone"
    );
    assert!(
        batches < requests,
        "mlp requests were never batched: {batches} runs for {requests} requests"
    );
    let no_batch_runs = metric_value(
        &metrics,
        "edgefleet_inference_batch_size_count",
        "model=\"no_batch\"",
    );
    let no_batch_sum = metric_value(
        &metrics,
        "edgefleet_inference_batch_size_sum",
        "model=\"no_batch\"",
    );
    assert_eq!(
        no_batch_runs, 12.0,
        "a model without a batch dimension runs each request alone"
    );
    assert_eq!(no_batch_sum, 12.0);
    for (model, what) in unbatched.iter().flat_map(|model| {
        [
            "edgefleet_inference_batch_size_count",
            "edgefleet_inference_batch_size_sum",
        ]
        .map(|what| (model, what))
    }) {
        assert_eq!(
            metric_value(&metrics, what, &format!("model=\"{model}\"")),
            12.0,
            "{what}: {model}, whose output is not batched along its input, runs each request alone"
        );
    }
    agent.stop().await;
}

/// Validation cannot see that a request's values make the model fail: one
/// asking for row 10 of a table of 10 rows, stacked with seven good
/// requests, fails their run. Only it may fail, with its own error; the
/// others get their own rows.
async fn a_request_the_model_fails_on_fails_alone_in_its_batch(runtime: RuntimeChoice) {
    let repo = Repo::new();
    let gather = std::fs::read(testdata().join("batch-isolation/gather/1/model.onnx")).unwrap();
    // Eight requests fill a batch at once; the delay gives them a second to arrive.
    repo.write("gather", 1, &gather).config(
        "gather",
        "max_batch_size = 8\nmax_queue_delay_us = 1000000\n",
    );
    let agent = agent(repo.path(), runtime).start().await;
    let bad = 3;
    let tasks: Vec<_> = agent
        .grpc_clients(8)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            // Row i, and a negative index (from the end): row i + 1.
            let indices = if i == bad {
                vec![1, 10]
            } else {
                vec![i as i64, i as i64 - 9]
            };
            let case = json!({"inputs": [
                {"name": "indices", "datatype": "INT64", "shape": [1, 2], "data": indices}
            ]});
            tokio::spawn(async move {
                let result = client
                    .model_infer(grpc_request("gather", &case, i % 2 == 0))
                    .await;
                (indices, result)
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (indices, result) = task.await.unwrap();
        if i == bad {
            let status = result.expect_err("row 10 of a table of 10 rows");
            assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
            assert!(status.message().contains("gather:1"), "{status:?}");
            continue;
        }
        let response = result
            .unwrap_or_else(|status| panic!("good request {i} failed: {status:?}"))
            .into_inner();
        // The table's row k is [10k, 10k + 1, 10k + 2].
        let rows: Vec<f64> = indices
            .iter()
            .map(|&k| k.rem_euclid(10))
            .flat_map(|k| (0..3).map(move |j| (10 * k + j) as f64))
            .collect();
        let want = json!({"name": "rows", "datatype": "FP32", "shape": [1, 2, 3], "data": rows});
        assert_tensor_matches(
            &grpc_outputs_as_json(&response)[0],
            &want,
            &format!("request {i}"),
        );
    }
    let metrics = agent.metrics().await;
    let gather = "model=\"gather\",version=\"1\"";
    let runs = metric_value(&metrics, "edgefleet_inference_batch_size_count", gather);
    let requests_run = metric_value(&metrics, "edgefleet_inference_batch_size_sum", gather);
    assert_eq!(
        (runs, requests_run),
        (9.0, 16.0),
        "the eight ran stacked, then each alone"
    );
    let errors = metric_value(
        &metrics,
        "edgefleet_inference_errors_total",
        &format!("{gather},reason=\"internal\""),
    );
    assert_eq!(errors, 1.0, "only the bad request failed");
    agent.stop().await;
}

async fn a_full_queue_answers_resource_exhausted_and_503(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("conv", 1, "conv")
        .config("conv", "max_batch_size = 0\nqueue_capacity = 1\n");
    let agent = agent(repo.path(), runtime).start().await;
    // Big requests keep the single worker busy while more arrive.
    let rows = 64;
    let image: Vec<f32> = (0..rows * 3 * 16 * 16)
        .map(|i| (i % 7) as f32 * 0.1)
        .collect();
    let tensor = Tensor::from_slice("image", DataType::F32, vec![rows as i64, 3, 16, 16], &image);
    let request = pb::ModelInferRequest {
        model_name: "conv".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "FP32".into(),
            shape: tensor.shape.clone(),
            ..Default::default()
        }],
        raw_input_contents: vec![raw_bytes(&tensor)],
        ..Default::default()
    };
    // 40 clients, connected first, send at once: one request runs, one waits,
    // the rest find the queue full. A burst is repeated (up to 5 times) only
    // if a fast host answered them all; an unbounded queue never refuses.
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(agent.grpc().await);
    }
    let (mut ok, mut exhausted, mut sent) = (0, 0, 0);
    for _ in 0..5 {
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
        let mut tasks = Vec::new();
        for client in &clients {
            let (mut client, request, start) = (client.clone(), request.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                client.model_infer(request).await.map(|_| ())
            }));
        }
        sent += tasks.len() as u64;
        for task in tasks {
            match task.await.unwrap() {
                Ok(()) => ok += 1,
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
                    assert!(status.message().contains("queue"), "{}", status.message());
                    exhausted += 1;
                }
            }
        }
        if exhausted >= 1 {
            break;
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, refused {exhausted}");
    // Telemetry saw the same: every request, the refusals as errors, and overload.
    let (models, events) = agent.telemetry.take_interval(std::time::SystemTime::now());
    let conv = models.iter().find(|m| m.name == "conv").unwrap();
    assert_eq!((conv.requests, conv.errors), (sent, exhausted), "{conv:?}");
    assert_eq!(conv.max_queue_depth, 1);
    assert!(
        events.iter().any(|e| e.kind
            == edgefleet_proto::edgefleet::v1::event::Kind::OverloadEntered as i32
            && e.model == "conv"),
        "{events:?}"
    );
    // The same over HTTP: 503 with a JSON error, while the gRPC clients keep
    // the queue full.
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut flood = Vec::new();
    for client in &clients {
        let (mut client, request, flooding) = (client.clone(), request.clone(), flooding.clone());
        flood.push(tokio::spawn(async move {
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.model_infer(request.clone()).await;
            }
        }));
    }
    // One image: parsing a big JSON body holds one of the (debug-built)
    // agent's two async threads long enough for the queue to drain.
    let one_image = &image[..3 * 16 * 16];
    let body = serde_json::to_vec(
        &json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": one_image}]}),
    )
    .unwrap();
    let http = reqwest::Client::new();
    let mut statuses = HashMap::new();
    for _ in 0..200 {
        let response = http
            .post(agent.url("/v2/models/conv/infer"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if status == 503 {
            assert!(body["error"].as_str().unwrap().contains("queue"), "{body}");
        }
        *statuses.entry(status).or_insert(0) += 1;
        if statuses.contains_key(&503) {
            break;
        }
    }
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    for task in flood {
        task.await.unwrap();
    }
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(
        statuses.contains_key(&503),
        "HTTP never saw the full queue: {statuses:?}"
    );
    // And it recovers: a lone request succeeds.
    agent.grpc().await.model_infer(request).await.unwrap();
    agent.stop().await;
}

/// A tensor's raw bytes as a slice at `offset` bytes past an 8-byte aligned
/// start, as a protocol decoder may leave a payload.
fn at_byte_offset(bytes: &[u8], offset: usize) -> Bytes {
    struct Words(Vec<u64>);
    impl AsRef<[u8]> for Words {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }
    let mut words = vec![0u64; (offset + bytes.len()).div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[offset..offset + bytes.len()]
        .copy_from_slice(bytes);
    Bytes::from_owner(Words(words)).slice(offset..offset + bytes.len())
}

/// The runtimes read a raw payload in place when it is aligned for its
/// element type and from an aligned copy when it is not: every fixture with
/// fixed-size inputs gives the expected outputs from payloads at byte offsets
/// 0 to 7, so both ways are taken for every element size.
async fn raw_inputs_at_every_byte_offset_give_the_expected_outputs(runtime: RuntimeChoice) {
    let (loaded_runtime, _) = edgefleet_agent::runtime::select_runtime(runtime).unwrap();
    for model in fixture_names() {
        if expected_load_failure(&model, runtime).is_some() {
            continue;
        }
        let mut session = loaded_runtime
            .load(&fixture_model(&model), &Default::default())
            .unwrap();
        for (i, case) in cases(&model).iter().enumerate() {
            let inputs = input_tensors(case);
            if inputs
                .iter()
                .any(|input| matches!(input.data, TensorData::Bytes(_)))
            {
                continue;
            }
            for offset in 0..8 {
                let context =
                    format!("{model} case {i}, payload at byte offset {offset}, on {runtime:?}");
                let shifted = inputs
                    .iter()
                    .map(|input| match &input.data {
                        TensorData::Raw(bytes) => Tensor {
                            data: TensorData::Raw(at_byte_offset(bytes, offset)),
                            ..input.clone()
                        },
                        TensorData::Bytes(_) => unreachable!("skipped above"),
                    })
                    .collect();
                let outputs = session
                    .run(shifted)
                    .unwrap_or_else(|err| panic!("{context}: {err}"));
                let got = sorted_by_name(
                    outputs
                        .iter()
                        .map(|tensor| json!({ "name": tensor.name, "datatype": tensor.dtype.protocol_name(), "shape": tensor.shape, "data": data_to_json(tensor) }))
                        .collect(),
                );
                let want = sorted_by_name(case["outputs"].as_array().unwrap().clone());
                assert_eq!(got.len(), want.len(), "{context}");
                for (g, w) in got.iter().zip(&want) {
                    assert_tensor_matches(g, w, &context);
                }
            }
        }
    }
}

/// A binary tensor data request (Triton's extension, as `tritonclient.http`
/// sends one): the JSON, then the bytes of each input the JSON gives no
/// `data`, in order, the JSON's length in a header.
fn binary_request(
    http: &reqwest::Client,
    url: String,
    mut json: Value,
    tensors: &[Tensor],
) -> reqwest::RequestBuilder {
    let mut binary = Vec::new();
    for (input, tensor) in json["inputs"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .zip(tensors)
    {
        if input.get("data").is_none() {
            let bytes = raw_bytes(tensor);
            input["parameters"] = json!({ "binary_data_size": bytes.len() });
            binary.extend_from_slice(&bytes);
        }
    }
    let mut body = serde_json::to_vec(&json).unwrap();
    let header_length = body.len();
    body.extend_from_slice(&binary);
    http.post(url)
        .header("Inference-Header-Content-Length", header_length)
        .body(body)
}

/// A response's outputs in JSON form, whichever of them came as binary
/// tensor data after the JSON decoded back into `data`; also how many did.
async fn outputs_of_binary_response(response: reqwest::Response) -> (Value, Vec<Value>, usize) {
    let header_length: Option<usize> = response
        .headers()
        .get("inference-header-content-length")
        .map(|value| value.to_str().unwrap().parse().unwrap());
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].clone();
    let body = response.bytes().await.unwrap();
    let Some(header_length) = header_length else {
        assert_eq!(content_type, "application/json");
        let json: Value = serde_json::from_slice(&body).unwrap();
        let outputs = json["outputs"].as_array().unwrap().clone();
        return (json, outputs, 0);
    };
    assert_eq!(content_type, "application/octet-stream");
    let json: Value = serde_json::from_slice(&body[..header_length]).unwrap();
    let mut rest = body.slice(header_length..);
    let mut binary = 0;
    let mut outputs = Vec::new();
    for output in json["outputs"].as_array().unwrap() {
        let mut output = output.clone();
        if let Some(size) = output["parameters"]["binary_data_size"].as_u64() {
            assert!(output.get("data").is_none(), "{output}");
            let bytes = rest.split_to(size as usize);
            let dtype = DataType::from_protocol_name(output["datatype"].as_str().unwrap()).unwrap();
            let data = match dtype {
                DataType::Bytes => TensorData::Bytes(
                    edgefleet_agent::grpc::decode_raw_strings("out", &bytes).unwrap(),
                ),
                _ => TensorData::Raw(bytes),
            };
            let tensor = Tensor {
                name: output["name"].as_str().unwrap().to_string(),
                dtype,
                shape: serde_json::from_value(output["shape"].clone()).unwrap(),
                data,
            };
            output["data"] = data_to_json(&tensor);
            binary += 1;
        }
        outputs.push(output);
    }
    assert!(
        rest.is_empty(),
        "{} bytes after the last binary output",
        rest.len()
    );
    (json, outputs, binary)
}

/// Every case of every fixture through the binary tensor data extension:
/// all inputs as bytes and all outputs asked for as bytes; then the first
/// input as JSON and the rest as bytes, the outputs named, every other one
/// asked for as bytes and the others left to come back as JSON; then every
/// output binary by default but the first, whose own parameter says no.
async fn every_fixture_matches_onnxruntime_python_over_http_binary_data(runtime: RuntimeChoice) {
    let repo = all_fixtures_repo();
    let agent = agent(repo.path(), runtime).start().await;
    let http = reqwest::Client::new();
    for model in fixture_names() {
        if expected_load_failure(&model, runtime).is_some() {
            continue;
        }
        let url = agent.url(&format!("/v2/models/{model}/infer"));
        for (i, case) in cases(&model).iter().enumerate() {
            let tensors = input_tensors(case);
            let described: Vec<Value> = tensors
                .iter()
                .map(|t| json!({ "name": t.name, "datatype": t.dtype.protocol_name(), "shape": t.shape }))
                .collect();
            let want = sorted_by_name(case["outputs"].as_array().unwrap().clone());

            // Sorted, as `want` is and the response need not be.
            let names = |outputs: &mut dyn Iterator<Item = &Value>| -> Vec<String> {
                let mut names: Vec<String> = outputs
                    .map(|output| output["name"].as_str().unwrap().to_string())
                    .collect();
                names.sort();
                names
            };
            // Posts `request`; checks the outputs against the case, and that
            // those named in `binary` came as binary data and the others as
            // JSON. Returns the response's JSON.
            let check = |request: Value, binary: Vec<String>, context: String| {
                let sent = binary_request(&http, url.clone(), request, &tensors).send();
                let want = &want;
                async move {
                    let response = sent.await.unwrap();
                    let status = response.status();
                    assert_eq!(status, 200, "{context}: {}", response.text().await.unwrap());
                    let (json, got, count) = outputs_of_binary_response(response).await;
                    let came_binary = names(
                        &mut got
                            .iter()
                            .filter(|output| output.get("parameters").is_some()),
                    );
                    assert_eq!(
                        came_binary, binary,
                        "{context}: the outputs that came binary"
                    );
                    assert_eq!(count, binary.len(), "{context}");
                    let got = sorted_by_name(got);
                    assert_eq!(got.len(), want.len(), "{context}");
                    for (g, w) in got.iter().zip(want) {
                        assert_tensor_matches(g, w, &context);
                    }
                    json
                }
            };

            let request = json!({
                "id": format!("case-{i}"),
                "parameters": { "binary_data_output": true },
                "inputs": described,
            });
            let context = format!("{model} case {i}, all binary, on {runtime:?}");
            let json = check(request, names(&mut want.iter()), context).await;
            assert_eq!(json["id"], format!("case-{i}"));

            let mut inputs = described.clone();
            inputs[0]["data"] = case["inputs"][0]["data"].clone();
            let outputs: Vec<Value> = want
                .iter()
                .enumerate()
                .map(|(j, output)| {
                    if j % 2 == 0 {
                        json!({ "name": output["name"], "parameters": { "binary_data": true } })
                    } else {
                        json!({ "name": output["name"] })
                    }
                })
                .collect();
            let request = json!({ "inputs": inputs, "outputs": outputs, "parameters": null });
            let context = format!("{model} case {i}, mixed, on {runtime:?}");
            check(request, names(&mut want.iter().step_by(2)), context).await;

            // `binary_data_output` for every output that does not say
            // otherwise: the first says false, the rest say nothing.
            let outputs: Vec<Value> = want
                .iter()
                .enumerate()
                .map(|(j, output)| {
                    let parameters = if j == 0 {
                        json!({ "binary_data": false })
                    } else {
                        Value::Null
                    };
                    json!({ "name": output["name"], "parameters": parameters })
                })
                .collect();
            let request = json!({
                "inputs": described,
                "outputs": outputs,
                "parameters": { "binary_data_output": true },
            });
            let context = format!("{model} case {i}, binary by default, on {runtime:?}");
            check(request, names(&mut want.iter().skip(1)), context).await;
        }
    }
    agent.stop().await;
}

/// A BYTES element holding NUL bytes comes back whole (ONNX Runtime's
/// strings have lengths; a C string would stop at, or refuse, the NUL).
async fn strings_with_nul_bytes_come_back_whole(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("strings", 1, "strings");
    let agent = agent(repo.path(), runtime).start().await;
    let items = vec![
        b"a\0b".to_vec(),
        Vec::new(),
        b"\0".to_vec(),
        b"edge".to_vec(),
    ];
    let request = pb::ModelInferRequest {
        model_name: "strings".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![items.len() as i64],
            contents: Some(pb::InferTensorContents {
                bytes_contents: items.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let response = agent
        .grpc()
        .await
        .model_infer(request)
        .await
        .unwrap_or_else(|status| panic!("on {runtime:?}: {status}"))
        .into_inner();
    let raw = &response.raw_output_contents[0];
    let got = edgefleet_agent::grpc::decode_raw_strings("text_out", raw).unwrap();
    assert_eq!(got, items, "on {runtime:?}");
    agent.stop().await;
}

/// A tensor with a zero-length dimension (no rows, or rows of no values) is
/// valid ONNX, and `dynamic` (y = 2x + 1, row_sum = the sum of each row)
/// declares both dimensions free. ONNX Runtime runs all three shapes here
/// ([2, 0]: an empty y and row sums of 0). tract 0.23 runs [0, 4] but
/// panics summing rows of no values, [2, 0] and [0, 0] (a division by zero
/// inside tract-core), which the agent contains to that request: INTERNAL,
/// saying the runtime panicked. Either way the model serves the next
/// request. (Found by `scripts/fuzz.sh grpc_infer`.)
async fn empty_dimensions_are_run_or_fail_alone(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("dynamic", 1, "dynamic");
    let agent = agent(repo.path(), runtime).start().await;
    let mut grpc = agent.grpc().await;
    let request = |shape: Vec<i64>, values: &[f32]| pb::ModelInferRequest {
        model_name: "dynamic".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::copy_from_slice(bytemuck::cast_slice(values))],
        ..Default::default()
    };
    let row_sums = |response: &pb::ModelInferResponse| {
        let index = response
            .outputs
            .iter()
            .position(|o| o.name == "row_sum")
            .expect("a row_sum output");
        f32s(&response.raw_output_contents[index])
    };
    for shape in [vec![2, 0], vec![0, 4], vec![0, 0]] {
        match grpc.model_infer(request(shape.clone(), &[])).await {
            Ok(response) => {
                let response = response.into_inner();
                let outputs: HashMap<&str, &pb::model_infer_response::InferOutputTensor> = response
                    .outputs
                    .iter()
                    .map(|o| (o.name.as_str(), o))
                    .collect();
                assert_eq!(outputs["y"].shape, shape, "{shape:?} on {runtime:?}");
                assert_eq!(
                    outputs["row_sum"].shape,
                    [shape[0]],
                    "{shape:?} on {runtime:?}"
                );
                assert_eq!(
                    row_sums(&response),
                    vec![0.0; shape[0] as usize],
                    "{shape:?} on {runtime:?}"
                );
            }
            Err(status) => {
                assert_eq!(
                    runtime,
                    RuntimeChoice::Tract,
                    "{shape:?} on {runtime:?}: {status:?}"
                );
                assert_eq!(
                    status.code(),
                    tonic::Code::Internal,
                    "{shape:?}: {status:?}"
                );
                assert!(
                    status.message().contains("the runtime panicked"),
                    "{shape:?}: {status:?}"
                );
            }
        }
        let response = grpc
            .model_infer(request(vec![1, 2], &[1.0, 2.0]))
            .await
            .unwrap_or_else(|status| panic!("after {shape:?} on {runtime:?}: {status}"))
            .into_inner();
        assert_eq!(row_sums(&response), [3.0], "after {shape:?} on {runtime:?}");
    }
    agent.stop().await;
}

/// Serving a model on ONNX Runtime for a long time does not grow the
/// agent's memory: 30,000 runs of `dynamic` (two outputs) after a warm-up
/// leave VmRSS within 4 MB of where it was. `ort` 2.0.0-rc.14 as published
/// leaked each output tensor's `OrtTypeInfo` on every run, ~15 MB over as
/// many runs (vendor/ort/PATCHED.md).
#[test]
fn many_onnxruntime_runs_do_not_grow_memory() {
    use edgefleet_agent::runtime::{SessionOptions, select_runtime};
    let (runtime, _) = select_runtime(RuntimeChoice::Onnxruntime).expect("ONNX Runtime's library");
    let options = SessionOptions {
        intra_op_threads: Some(1),
        spin_wait: false,
    };
    let mut session = runtime.load(&fixture_model("dynamic"), &options).unwrap();
    let values = [0.5f32; 64];
    let mut run = || {
        let input = Tensor {
            name: "x".into(),
            dtype: DataType::F32,
            shape: vec![1, 64],
            data: TensorData::from_values(&values),
        };
        let outputs = session.run(vec![input]).unwrap();
        assert_eq!(outputs.len(), 2);
    };
    let rss_kb = || -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    for _ in 0..1_000 {
        run();
    }
    let before = rss_kb();
    for _ in 0..30_000 {
        run();
    }
    let grown = rss_kb().saturating_sub(before);
    assert!(grown < 4 * 1024, "VmRSS grew {grown} KB over 30,000 runs");
}

/// Little-endian FP32 values from raw output bytes (which need not be
/// aligned for a cast).
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

async fn post_json(http: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let response = http.post(url).json(body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// An input declared with no shape at all (unknown rank; `relu`) takes any
/// shape on ONNX Runtime, and metadata reports it as `[-1]` on both
/// protocols. One declared rank 0 (`scalar`) stays a scalar: ONNX Runtime's
/// metadata API reports both with no dimensions, the agent tells them apart.
/// tract refuses to load `relu`, with a clear error; it serves `scalar`.
async fn an_input_of_unknown_rank_takes_any_shape(runtime: RuntimeChoice) {
    let repo = Repo::new();
    for model in ["relu", "scalar"] {
        let path = testdata().join(format!("unknown-rank/{model}/1/model.onnx"));
        repo.write(model, 1, &std::fs::read(path).unwrap());
    }
    let agent = agent(repo.path(), runtime).start().await;
    let http = reqwest::Client::new();
    let x = |shape: Value, data: Value| json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]});
    let infer = |model: &str| agent.url(&format!("/v2/models/{model}/infer"));

    let scalar: Value = http
        .get(agent.url("/v2/models/scalar"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(scalar["inputs"][0]["shape"], json!([]), "{scalar}");
    let (status, body) = post_json(&http, infer("scalar"), &x(json!([2]), json!([1, 2]))).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expects []"),
        "{body}"
    );

    if runtime == RuntimeChoice::Tract {
        let (status, body) = post_json(&http, infer("relu"), &x(json!([]), json!([1]))).await;
        assert_eq!(status, 503, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("tract cannot load the model"), "{error}");
        agent.stop().await;
        return;
    }
    let metadata: Value = http
        .get(agent.url("/v2/models/relu"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["inputs"][0]["shape"], json!([-1]), "{metadata}");
    assert_eq!(metadata["outputs"][0]["shape"], json!([-1]), "{metadata}");
    let grpc = agent
        .grpc()
        .await
        .model_metadata(pb::ModelMetadataRequest {
            name: "relu".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.inputs[0].shape, [-1]);
    for (shape, data, relu) in [
        (
            json!([2, 2]),
            json!([-1, 2, 3, -4]),
            json!([0.0, 2.0, 3.0, 0.0]),
        ),
        (json!([]), json!([-3]), json!([0.0])),
        (json!([1, 1, 3]), json!([5, -5, 1]), json!([5.0, 0.0, 1.0])),
    ] {
        let (status, body) = post_json(&http, infer("relu"), &x(shape.clone(), data)).await;
        assert_eq!(status, 200, "shape {shape}: {body}");
        assert_eq!(body["outputs"][0]["shape"], shape, "{body}");
        assert_eq!(body["outputs"][0]["data"], relu, "{body}");
    }
    agent.stop().await;
}

/// Triton's model configuration extension (`GET .../config` and gRPC
/// `ModelConfig`, what tritonclient's `get_model_config` and perf_analyzer
/// read): the batch
/// size, queue delay and instances the agent serves the version with, and
/// each tensor's dims without the batch dimension when it batches.
async fn model_configuration_is_served_as_tritons(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp").add("no_batch", 1, "no_batch");
    repo.add("mlp8", 1, "mlp").config(
        "mlp8",
        "max_batch_size = 8\nmax_queue_delay_us = 500\ninstances = 2\n",
    );
    let agent = agent(repo.path(), runtime).start().await;
    let get = |path: String| {
        let url = agent.url(&path);
        async move {
            let response = reqwest::get(url).await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let backend = match runtime {
        RuntimeChoice::Tract => "tract",
        _ => "onnxruntime",
    };
    let (status, mlp) = get("/v2/models/mlp/config".into()).await;
    assert_eq!(status, 200, "{mlp}");
    assert_eq!(mlp["name"], "mlp");
    assert_eq!(mlp["backend"], backend);
    assert_eq!(mlp["max_batch_size"], 32, "{mlp}");
    assert_eq!(
        mlp["input"],
        json!([{ "name": "input", "data_type": "TYPE_FP32", "dims": [16] }])
    );
    assert_eq!(
        mlp["output"],
        json!([{ "name": "logits", "data_type": "TYPE_FP32", "dims": [4] }])
    );
    assert_eq!(mlp["dynamic_batching"], json!({}), "{mlp}");
    assert_eq!(
        mlp["instance_group"],
        json!([{ "count": 1, "kind": "KIND_CPU" }])
    );

    let (status, mlp8) = get("/v2/models/mlp8/versions/1/config".into()).await;
    assert_eq!(status, 200, "{mlp8}");
    assert_eq!(mlp8["max_batch_size"], 8);
    assert_eq!(
        mlp8["dynamic_batching"],
        json!({ "max_queue_delay_microseconds": 500 })
    );
    assert_eq!(mlp8["instance_group"][0]["count"], 2);

    let (status, fixed) = get("/v2/models/no_batch/config".into()).await;
    assert_eq!(status, 200, "{fixed}");
    assert_eq!(fixed["max_batch_size"], 0);
    assert_eq!(fixed["input"][0]["dims"], json!([2, 3]), "{fixed}");
    assert!(fixed.get("dynamic_batching").is_none(), "{fixed}");

    for path in ["/v2/models/nope/config", "/v2/models/mlp/versions/2/config"] {
        let (status, body) = get(path.into()).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }

    // gRPC says the same, in Triton's model_config.proto.
    let grpc = agent.grpc().await;
    let config = |name: &str, version: &str| {
        let request = pb::ModelConfigRequest {
            name: name.into(),
            version: version.into(),
        };
        let mut grpc = grpc.clone();
        async move {
            let response = grpc.model_config(request).await?;
            Ok::<_, tonic::Status>(response.into_inner().config.unwrap())
        }
    };
    let tensors = |specs: Vec<(String, i32, Vec<i64>)>| -> Value {
        specs
            .into_iter()
            .map(|(name, data_type, dims)| {
                let data_type = pb::DataType::try_from(data_type).unwrap().as_str_name();
                json!({ "name": name, "data_type": data_type, "dims": dims })
            })
            .collect()
    };
    for (name, version, over_http) in [
        ("mlp", "", &mlp),
        ("mlp8", "1", &mlp8),
        ("no_batch", "", &fixed),
    ] {
        let got = config(name, version).await.unwrap();
        let inputs = got
            .input
            .into_iter()
            .map(|t| (t.name, t.data_type, t.dims))
            .collect();
        let outputs = got
            .output
            .into_iter()
            .map(|t| (t.name, t.data_type, t.dims))
            .collect();
        assert_eq!(
            (
                got.name.as_str(),
                got.platform.as_str(),
                got.backend.as_str()
            ),
            (name, over_http["platform"].as_str().unwrap(), backend)
        );
        assert_eq!(
            i64::from(got.max_batch_size),
            over_http["max_batch_size"].as_i64().unwrap()
        );
        assert_eq!(tensors(inputs), over_http["input"], "{name}");
        assert_eq!(tensors(outputs), over_http["output"], "{name}");
        let group = &got.instance_group[0];
        assert_eq!(
            (group.count, group.kind()),
            (
                over_http["instance_group"][0]["count"].as_i64().unwrap() as i32,
                pb::model_instance_group::Kind::Cpu
            )
        );
        let delay = got.dynamic_batching.map(|b| b.max_queue_delay_microseconds);
        let http_delay = over_http.get("dynamic_batching").map(|b| {
            b.get("max_queue_delay_microseconds")
                .and_then(Value::as_u64)
                .unwrap_or(0)
        });
        assert_eq!(delay, http_delay, "{name}");
    }
    for (name, version) in [("nope", ""), ("mlp", "2")] {
        let status = config(name, version).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::NotFound,
            "{name} {version}: {status:?}"
        );
    }
    agent.stop().await;
}

/// Triton's statistics extension (`GET /v2/models[/{m}[/versions/{v}]]/stats`,
/// gRPC `ModelStatistics`, tritonclient's `get_inference_statistics`): per
/// served version, requests answered and failed, rows and runs, and where
/// their time went, alike on both protocols.
async fn statistics_are_served_as_tritons(runtime: RuntimeChoice) {
    let repo = Repo::new();
    // The batch never fills (12 rows of 16), so the worker waits out the delay.
    repo.add("mlp", 1, "mlp")
        .config("mlp", "max_batch_size = 16\nmax_queue_delay_us = 200000\n");
    repo.add("no_batch", 1, "no_batch");
    let agent = agent(repo.path(), runtime).start().await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before_ms = now_ms();
    let rows_request = |rows: usize, width: usize| {
        let case = json!({"inputs": [{
            "name": "input", "datatype": "FP32", "shape": [rows, width],
            "data": vec![0.5f32; rows * width],
        }]});
        grpc_request("mlp", &case, true)
    };
    // 8 concurrent requests of 1 and 2 rows: 12 rows, batched.
    let tasks: Vec<_> = agent
        .grpc_clients(8)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let request = rows_request(1 + i % 2, 16);
            tokio::spawn(async move { client.model_infer(request).await.map(|_| ()) })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let mut grpc = agent.grpc().await;
    // Reaches the version and fails there (wrong shape): counted as failed.
    let status = grpc.model_infer(rows_request(1, 15)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // Never reaches a version: counted nowhere.
    let mut unknown = rows_request(1, 16);
    unknown.model_name = "nope".into();
    grpc.model_infer(unknown).await.unwrap_err();
    let no_batch = cases("no_batch")[0].clone();
    grpc.model_infer(grpc_request("no_batch", &no_batch, true))
        .await
        .unwrap();
    let after_ms = now_ms();

    let get = |path: &str| {
        let url = agent.url(path);
        async move {
            let response = reqwest::get(url).await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = get("/v2/models/mlp/stats").await;
    assert_eq!(status, 200, "{body}");
    let stats = &body["model_stats"];
    assert_eq!(stats.as_array().unwrap().len(), 1, "{body}");
    let mlp = &stats[0];
    assert_eq!(
        (&mlp["name"], &mlp["version"]),
        (&json!("mlp"), &json!("1"))
    );
    let count = |path: &str| mlp.pointer(path).and_then(Value::as_u64).unwrap();
    assert_eq!(count("/inference_count"), 12, "{mlp}");
    assert_eq!(count("/inference_stats/success/count"), 8, "{mlp}");
    assert_eq!(count("/inference_stats/fail/count"), 1, "{mlp}");
    assert_eq!(count("/inference_stats/queue/count"), 8, "{mlp}");
    // Each answered request's run, in Triton's three parts: making the
    // inputs (stacking, the runtime's values), the model's run, and the
    // outputs (our tensors, split per request). Each takes some time.
    let parts = ["compute_input", "compute_infer", "compute_output"];
    for part in parts {
        assert_eq!(count(&format!("/inference_stats/{part}/count")), 8, "{mlp}");
        assert!(
            count(&format!("/inference_stats/{part}/ns")) > 0,
            "{part}: {mlp}"
        );
    }
    // A request's time covers its wait and its run; the first to arrive
    // waited out the 200 ms delay.
    let success_ns = count("/inference_stats/success/ns");
    let queue_ns = count("/inference_stats/queue/ns");
    assert!(queue_ns >= 150_000_000, "{mlp}");
    let compute_ns: u64 = parts
        .iter()
        .map(|part| count(&format!("/inference_stats/{part}/ns")))
        .sum();
    assert!(success_ns >= queue_ns + compute_ns, "{mlp}");
    let last = count("/last_inference");
    assert!(
        (before_ms..=after_ms).contains(&last),
        "{before_ms}..{after_ms}: {mlp}"
    );
    // Runs by their rows: every row in one run, fewer runs than requests.
    let batches = mlp["batch_stats"].as_array().unwrap();
    let runs: u64 = batches
        .iter()
        .map(|b| b["compute_infer"]["count"].as_u64().unwrap())
        .sum();
    let rows: u64 = batches
        .iter()
        .map(|b| b["batch_size"].as_u64().unwrap() * b["compute_infer"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(count("/execution_count"), runs, "{mlp}");
    assert_eq!(rows, 12, "{mlp}");
    for batch in batches {
        for part in parts {
            assert_eq!(
                batch[part]["count"], batch["compute_infer"]["count"],
                "{mlp}"
            );
            assert!(batch[part]["ns"].as_u64().unwrap() > 0, "{part}: {mlp}");
        }
    }
    assert!(runs < 8, "batched: {mlp}");

    // Every served version; a model that is not batched counts a row per request.
    let (status, all) = get("/v2/models/stats").await;
    assert_eq!(status, 200, "{all}");
    let mut names: Vec<&str> = all["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["mlp", "no_batch"], "{all}");
    let (_, fixed) = get("/v2/models/no_batch/versions/1/stats").await;
    let fixed = &fixed["model_stats"][0];
    assert_eq!(fixed["inference_count"], 1, "{fixed}");
    assert_eq!(fixed["execution_count"], 1, "{fixed}");
    assert_eq!(fixed["batch_stats"][0]["batch_size"], 1, "{fixed}");

    // gRPC says the same.
    let response = grpc
        .model_statistics(pb::ModelStatisticsRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let over_grpc = &response.model_stats[0];
    let inference = over_grpc.inference_stats.as_ref().unwrap();
    assert_eq!(
        (
            over_grpc.inference_count,
            over_grpc.execution_count,
            over_grpc.last_inference,
            inference.success.unwrap().ns,
            inference.queue.unwrap().ns,
            inference.fail.unwrap().count,
            over_grpc.batch_stats.len(),
            inference.compute_input.unwrap().ns
                + inference.compute_infer.unwrap().ns
                + inference.compute_output.unwrap().ns,
        ),
        (
            12,
            runs,
            last,
            success_ns,
            queue_ns,
            1,
            batches.len(),
            compute_ns
        )
    );

    for path in ["/v2/models/nope/stats", "/v2/models/mlp/versions/2/stats"] {
        let (status, body) = get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let status = grpc
        .model_statistics(pb::ModelStatisticsRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    agent.stop().await;
}

on_both_runtimes!(
    empty_dimensions_are_run_or_fail_alone,
    an_input_of_unknown_rank_takes_any_shape,
    strings_with_nul_bytes_come_back_whole,
    raw_inputs_at_every_byte_offset_give_the_expected_outputs,
    every_fixture_matches_onnxruntime_python_over_http_binary_data,
    every_fixture_matches_onnxruntime_python_over_http,
    every_fixture_matches_onnxruntime_python_over_grpc,
    output_selection_returns_only_the_outputs_asked_for,
    metadata_and_health_on_both_protocols,
    concurrent_requests_are_batched_and_each_gets_its_own_answer,
    a_request_the_model_fails_on_fails_alone_in_its_batch,
    a_full_queue_answers_resource_exhausted_and_503,
    model_configuration_is_served_as_tritons,
    statistics_are_served_as_tritons,
);

/// With no `intra_op_threads` in its config, a model's ONNX Runtime session
/// gets one thread per physical core the agent may use (the caller's plus
/// pool threads), each pool thread named for `top -H` and `perf`, and none
/// pinned to a core: every one may run wherever the agent may.
#[tokio::test(flavor = "multi_thread")]
async fn onnxruntime_pool_threads_are_named_sized_and_unpinned_by_default() {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    let agent = agent(repo.path(), RuntimeChoice::Onnxruntime).start().await;
    let status_of = |task: &std::path::Path| std::fs::read_to_string(task.join("status")).unwrap();
    let allowed_cpus = |status: &str| {
        status
            .lines()
            .find(|line| line.starts_with("Cpus_allowed_list:"))
            .map(str::to_string)
            .unwrap()
    };
    let process_cpus = allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap());
    let pool: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|task| task.unwrap().path())
        .filter(|task| {
            std::fs::read_to_string(task.join("comm")).unwrap().trim()
                == edgefleet_agent::runtime::ONNXRUNTIME_THREAD_NAME
        })
        .map(|task| allowed_cpus(&status_of(&task)))
        .collect();
    assert_eq!(
        pool.len(),
        edgefleet_agent::runtime::default_intra_op_threads() - 1,
        "pool threads: {pool:?}"
    );
    for cpus in &pool {
        assert_eq!(cpus, &process_cpus, "a pool thread is pinned");
    }
    agent.stop().await;
}

/// One HTTP/2 frame as read off the wire: type, flags, stream, payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

async fn read_frame(stream: &mut tokio::net::TcpStream) -> Frame {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.expect("a frame header");
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream
        .read_exact(&mut payload)
        .await
        .expect("a frame payload");
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// HPACK "literal header field without indexing, new name", no Huffman
/// coding: every name and value here is shorter than 127 bytes.
fn literal_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// The MLP fixture's first case, its one row repeated `rows` times.
fn mlp_rows_request(rows: usize) -> pb::ModelInferRequest {
    let input = tensor_of(&cases("mlp")[0]["inputs"][0]);
    let TensorData::Raw(row) = &input.data else {
        unreachable!("FP32 input")
    };
    pb::ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: input.name.clone(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, input.shape[1]],
            ..Default::default()
        }],
        raw_input_contents: vec![row.repeat(rows).into()],
        ..Default::default()
    }
}

/// `request` as a gRPC message: uncompressed, its length, its bytes.
fn grpc_message(request: &pb::ModelInferRequest) -> Vec<u8> {
    use prost::Message;
    let mut message = vec![0u8];
    message.extend_from_slice(&u32::try_from(request.encoded_len()).unwrap().to_be_bytes());
    request.encode(&mut message).unwrap();
    message
}

/// The header block of a `ModelInfer` call.
fn model_infer_headers() -> Vec<u8> {
    literal_headers(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/inference.GRPCInferenceService/ModelInfer"),
        (":authority", "agent"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

/// The agent's gRPC server advertises 1 MiB HTTP/2 frames and takes a
/// request whose whole message comes in one DATA frame nearly four times the
/// protocol's default limit of 16 KiB (which a server keeping the default
/// refuses with FRAME_SIZE_ERROR): 1,000 rows of the MLP fixture's first case,
/// each answered as that case expects. Raw frames on a TCP socket, because a
/// real client splits its messages to whatever size the server advertises.
#[tokio::test]
async fn a_grpc_message_may_come_in_one_frame_far_over_http2s_default_size() {
    use prost::Message;
    use tokio::io::AsyncWriteExt;

    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    let agent = agent(repo.path(), RuntimeChoice::Tract).start().await;
    let mut socket = tokio::net::TcpStream::connect(agent.grpc_addr)
        .await
        .unwrap();
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(frame(SETTINGS, 0, 0, &[]));
    socket.write_all(&opening).await.unwrap();

    let settings = read_frame(&mut socket).await;
    assert_eq!(
        settings.kind, SETTINGS,
        "the server speaks first with its settings"
    );
    let max_frame_size = settings.payload.chunks_exact(6).find_map(|entry| {
        (u16::from_be_bytes([entry[0], entry[1]]) == SETTINGS_MAX_FRAME_SIZE)
            .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
    });
    assert_eq!(
        max_frame_size,
        Some(edgefleet_agent::server::GRPC_MAX_FRAME_SIZE)
    );
    assert_eq!(max_frame_size, Some(1 << 20));

    const ROWS: usize = 1000;
    let case = &cases("mlp")[0];
    let request = pb::ModelInferRequest {
        id: "one-large-frame".into(),
        ..mlp_rows_request(ROWS)
    };
    let message = grpc_message(&request);
    // Over 16 KiB, and within the 65,535 bytes every HTTP/2 connection may
    // send before the server's first WINDOW_UPDATE.
    assert!(
        (3 * 16_384..65_535).contains(&message.len()),
        "{}",
        message.len()
    );

    let headers = model_infer_headers();
    let mut call = frame(SETTINGS, 0x1, 0, &[]); // ACK of the server's settings
    call.extend(frame(HEADERS, END_HEADERS, 1, &headers));
    call.extend(frame(DATA, END_STREAM, 1, &message));
    socket.write_all(&call).await.unwrap();

    let mut answer = Vec::new();
    loop {
        let frame =
            tokio::time::timeout(std::time::Duration::from_secs(30), read_frame(&mut socket))
                .await
                .expect("the agent answers");
        assert!(
            frame.kind != GOAWAY && frame.kind != RST_STREAM,
            "the agent refused the frame: type {} payload {:?}",
            frame.kind,
            frame.payload
        );
        if frame.stream != 1 {
            continue;
        }
        match frame.kind {
            DATA => answer.extend_from_slice(&frame.payload),
            HEADERS if frame.flags & END_STREAM != 0 => break,
            _ => {}
        }
    }
    assert!(answer.len() > 5, "a response message came back");
    let response = pb::ModelInferResponse::decode(&answer[5..]).unwrap();
    assert_eq!(response.id, "one-large-frame");
    let expected = &case["outputs"][0];
    let got = &grpc_outputs_as_json(&response)[0];
    let expected_data = [expected["data"].as_array().unwrap().as_slice(); ROWS].concat();
    let expected_rows = json!({
        "name": expected["name"],
        "datatype": expected["datatype"],
        "shape": [ROWS, expected["shape"][1]],
        "data": expected_data,
    });
    assert_tensor_matches(got, &expected_rows, "1,000 rows in one frame");
    // The agent's graceful shutdown waits for its connections to close.
    drop(socket);
    agent.stop().await;
}

/// A gRPC client that vanished (here: a raw connection that stopped
/// answering, halfway through sending a `ModelInfer` message) is pinged
/// after `--grpc-keepalive` (here 300 ms) and dropped when the ping goes
/// unanswered, so what it sent is not held forever; a live client whose
/// stream stays quiet meanwhile answers the pings and keeps its stream.
#[tokio::test]
async fn a_grpc_client_that_stops_answering_pings_is_dropped() {
    use edgefleet_test_support::raw_http2;

    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    let agent = agent(repo.path(), RuntimeChoice::Tract)
        .grpc_keepalive(Duration::from_millis(300))
        .start()
        .await;
    let request = mlp_rows_request(1);

    // A live client: one answer on an open stream, which then stays quiet.
    let (requests, receiver) = tokio::sync::mpsc::unbounded_channel();
    let mut answers = agent
        .grpc()
        .await
        .model_stream_infer(tokio_stream::wrappers::UnboundedReceiverStream::new(
            receiver,
        ))
        .await
        .unwrap()
        .into_inner();
    requests.send(request.clone()).unwrap();
    let answer = answers.message().await.unwrap().unwrap();
    assert_eq!(answer.error_message, "");

    // The vanished one: settings acknowledged, a call's headers and half
    // its message, then nothing, not even an answer to a ping.
    let mut socket = tokio::net::TcpStream::connect(agent.grpc_addr)
        .await
        .unwrap();
    let message = grpc_message(&request);
    let headers = model_infer_headers();
    let mut opening = raw_http2::opening();
    opening.extend(frame(HEADERS, END_HEADERS, 1, &headers));
    opening.extend(frame(DATA, 0, 1, &message[..message.len() / 2]));
    let closed =
        raw_http2::silent_until_closed(&mut socket, &opening, Duration::from_secs(10)).await;
    assert_ne!(
        closed, None,
        "the agent keeps a client that does not answer its pings"
    );
    assert_eq!(
        closed,
        Some(true),
        "the agent closed the connection without pinging it first"
    );

    // The quiet stream answered its pings meanwhile and still serves.
    requests.send(request).unwrap();
    let answer = answers.message().await.unwrap().unwrap();
    assert_eq!(answer.error_message, "");
    drop(requests);
    agent.stop().await;
}

/// `/metrics` says what its text is: OpenMetrics, ended by `# EOF`, which
/// Prometheus parses by that type (under the older text format's
/// `text/plain; version=0.0.4` it would read it as that format).
#[tokio::test]
async fn metrics_are_served_as_openmetrics() {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    let agent = agent(repo.path(), RuntimeChoice::Tract).start().await;
    let response = reqwest::get(agent.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("# TYPE edgefleet_inference_requests counter"),
        "{text}"
    );
    agent.stop().await;
}
