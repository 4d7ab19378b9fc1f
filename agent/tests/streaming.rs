//! `ModelStreamInfer` end to end: many inferences on one gRPC call, with the
//! real agent, real fixture models and real runtimes.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use edgefleet_agent::grpc_stream::STREAM_IN_FLIGHT;
use edgefleet_agent::runtime::RuntimeChoice;
use edgefleet_proto::inference as pb;
use edgefleet_test_support::assert_eventually;
use serde_json::Value;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

type Answers = tonic::Streaming<pb::ModelStreamInferResponse>;

/// Opens a `ModelStreamInfer` call; requests go through the sender, and
/// dropping it closes the client's side.
async fn open_stream(
    agent: &TestAgent,
    errors_end_stream: bool,
) -> (mpsc::UnboundedSender<pb::ModelInferRequest>, Answers) {
    let (requests, receiver) = mpsc::unbounded_channel();
    let mut call = tonic::Request::new(UnboundedReceiverStream::new(receiver));
    if errors_end_stream {
        call.metadata_mut()
            .insert("triton_grpc_error", "true".parse().unwrap());
    }
    let answers = agent
        .grpc()
        .await
        .model_stream_infer(call)
        .await
        .expect("the stream opens")
        .into_inner();
    (requests, answers)
}

/// The next answer, within a minute.
async fn next_answer(
    answers: &mut Answers,
) -> Option<Result<pb::ModelStreamInferResponse, tonic::Status>> {
    tokio::time::timeout(Duration::from_secs(60), answers.next())
        .await
        .expect("an answer or the end of the stream within a minute")
}

fn with_id(mut request: pb::ModelInferRequest, id: &str) -> pb::ModelInferRequest {
    request.id = id.into();
    request
}

/// Every case of every fixture, raw and typed, sent on one stream before
/// any answer is read: each answer is its own request's (matched by id),
/// and a model that did not load answers each request with its error.
async fn every_fixture_matches_onnxruntime_python_over_one_stream(runtime: RuntimeChoice) {
    let repo = all_fixtures_repo();
    let agent = agent(repo.path(), runtime).start().await;
    let (requests, mut answers) = open_stream(&agent, false).await;
    // The case, or the words of the model's load failure.
    let mut expected: HashMap<String, Result<Value, &str>> = HashMap::new();
    for model in fixture_names() {
        for (i, case) in cases(&model).iter().enumerate() {
            for raw in grpc_encodings(case) {
                let id = format!("{model} case {i} (raw: {raw})");
                requests
                    .send(with_id(grpc_request(&model, case, raw), &id))
                    .unwrap();
                let outcome = match expected_load_failure(&model, runtime) {
                    Some(words) => Err(words),
                    None => Ok(case.clone()),
                };
                expected.insert(id, outcome);
            }
        }
    }
    drop(requests);
    let mut answered = 0;
    while let Some(answer) = next_answer(&mut answers).await {
        let answer = answer.expect("the stream ends with OK");
        let response = answer
            .infer_response
            .expect("each answer names its request");
        let context = format!("{} on {runtime:?}", response.id);
        let case = expected
            .remove(&response.id)
            .unwrap_or_else(|| panic!("{context}: answered once, and only if asked"));
        match case {
            Ok(case) => {
                assert_eq!(answer.error_message, "", "{context}");
                assert_eq!(response.model_version, "1", "{context}");
                assert_grpc_outputs_match(&response, &case, &context);
            }
            Err(words) => assert!(
                answer.error_message.contains("not ready") && answer.error_message.contains(words),
                "{context}: {}",
                answer.error_message
            ),
        }
        answered += 1;
    }
    assert!(expected.is_empty(), "never answered: {:?}", expected.keys());
    assert!(answered > 30, "only {answered} requests");
    agent.stop().await;
}

/// A failed request gets its error, with its id, and the stream serves on;
/// with Triton's `triton_grpc_error` header the first failure ends it.
async fn a_failed_request_gets_its_error_and_the_stream_goes_on(runtime: RuntimeChoice) {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    let agent = agent(repo.path(), runtime).start().await;
    let case = &cases("mlp")[0];
    let good = grpc_request("mlp", case, true);
    let mut wrong_shape = grpc_request("mlp", case, true);
    wrong_shape.inputs[0].shape.push(1);
    let mut unknown = grpc_request("mlp", case, true);
    unknown.model_name = "no_such_model".into();

    let (requests, mut answers) = open_stream(&agent, false).await;
    requests.send(with_id(unknown.clone(), "unknown")).unwrap();
    requests.send(with_id(wrong_shape, "wrong shape")).unwrap();
    requests.send(with_id(good.clone(), "good")).unwrap();
    drop(requests);
    let mut got = HashMap::new();
    while let Some(answer) = next_answer(&mut answers).await {
        let answer = answer.expect("failures do not end the stream");
        let response = answer.infer_response.unwrap();
        got.insert(response.id.clone(), (answer.error_message, response));
    }
    let (error, response) = &got["unknown"];
    assert!(error.contains("no_such_model"), "{error}");
    assert_eq!(response.model_name, "no_such_model");
    assert!(response.outputs.is_empty());
    let (error, _) = &got["wrong shape"];
    assert!(error.contains("shape"), "{error}");
    let (error, response) = &got["good"];
    assert_eq!(error, "");
    assert_grpc_outputs_match(response, case, "the good request");

    let (requests, mut answers) = open_stream(&agent, true).await;
    requests.send(with_id(good.clone(), "first")).unwrap();
    let first = next_answer(&mut answers).await.unwrap().unwrap();
    assert_eq!(first.error_message, "");
    requests.send(with_id(unknown, "second")).unwrap();
    let status = next_answer(&mut answers)
        .await
        .expect("the stream ends with the failure's status")
        .expect_err("a failure ends the stream");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("no_such_model"), "{status:?}");
    assert!(next_answer(&mut answers).await.is_none());

    // The agent serves on, on the same connection's client as on a new one.
    agent.grpc().await.model_infer(good).await.unwrap();
    agent.stop().await;
}

on_both_runtimes!(
    every_fixture_matches_onnxruntime_python_over_one_stream,
    a_failed_request_gets_its_error_and_the_stream_goes_on,
);

/// A client may send far more than the agent runs at once: the stream
/// reads on only as its requests finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_runs_at_most_its_limit_of_requests_at_once() {
    let repo = Repo::new();
    // Batches wait a second for rows that never come: the requests the
    // stream has started stay running that long.
    repo.add("mlp", 1, "mlp").config(
        "mlp",
        "max_batch_size = 1024\nmax_queue_delay_us = 1000000\nqueue_capacity = 1024\n",
    );
    let agent = agent(repo.path(), RuntimeChoice::Tract).start().await;
    let sent = STREAM_IN_FLIGHT + 36;
    let (requests, mut answers) = open_stream(&agent, false).await;
    let case = &cases("mlp")[0];
    for i in 0..sent {
        requests
            .send(with_id(grpc_request("mlp", case, true), &i.to_string()))
            .unwrap();
    }
    drop(requests);
    let started = || async {
        metric_value(
            &agent.metrics().await,
            "edgefleet_inference_requests_total",
            "model=\"mlp\"",
        ) as usize
    };
    assert_eventually(Duration::from_secs(30), || async {
        started().await >= STREAM_IN_FLIGHT
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        started().await,
        STREAM_IN_FLIGHT,
        "requests started while the first {STREAM_IN_FLIGHT} wait for their batch"
    );
    let mut answered = 0;
    while let Some(answer) = next_answer(&mut answers).await {
        assert_eq!(answer.unwrap().error_message, "");
        answered += 1;
    }
    assert_eq!(answered, sent);
    agent.stop().await;
}

/// Requests a client sends on one stream without waiting are stacked into
/// batches as separate calls' are, and each answer is its own request's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_together_on_a_stream_are_batched() {
    let repo = Repo::new();
    // The first request waits 50 ms for company; all 32 arrive sooner.
    repo.add("mlp", 1, "mlp")
        .config("mlp", "max_batch_size = 16\nmax_queue_delay_us = 50000\n");
    let agent = agent(repo.path(), RuntimeChoice::Tract).start().await;
    let cases = cases("mlp");
    let (requests, mut answers) = open_stream(&agent, false).await;
    let mut rows = 0;
    for i in 0..32 {
        let case = &cases[i % cases.len()];
        rows += case["inputs"][0]["shape"][0].as_u64().unwrap();
        requests
            .send(with_id(grpc_request("mlp", case, true), &i.to_string()))
            .unwrap();
    }
    drop(requests);
    let mut answered = 0;
    while let Some(answer) = next_answer(&mut answers).await {
        let answer = answer.unwrap();
        assert_eq!(answer.error_message, "");
        let response = answer.infer_response.unwrap();
        let i: usize = response.id.parse().unwrap();
        assert_grpc_outputs_match(&response, &cases[i % cases.len()], &format!("request {i}"));
        answered += 1;
    }
    assert_eq!(answered, 32);
    let runs = metric_value(
        &agent.metrics().await,
        "edgefleet_inference_batch_size_count",
        "model=\"mlp\"",
    );
    // Packed, the rows take rows / 16 runs (rounded up); unbatched, 32.
    let packed = rows.div_ceil(16) as f64;
    assert!(
        runs <= packed + 2.0,
        "32 requests of {rows} rows took {runs} runs"
    );
    agent.stop().await;
}

/// A message the agent cannot take (over the request limit on the wire, or
/// once decoded) ends the stream with RESOURCE_EXHAUSTED, after the answers
/// of the requests before it; it is counted, and the agent serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_ends_the_stream_after_the_answers_before_it() {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    let limit = 4096;
    let agent = agent(repo.path(), RuntimeChoice::Tract)
        .max_request_bytes(limit)
        .start()
        .await;
    let good = grpc_request("mlp", &cases("mlp")[0], true);
    let mut too_large = good.clone();
    too_large.raw_input_contents = vec![vec![0u8; 1 << 20].into()];
    // 60 KB on the wire, within the limit and its allowance; each empty
    // entry decodes to a whole input struct.
    let hostile = pb::ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![Default::default(); 30_000],
        ..Default::default()
    };
    for (what, request, says) in [
        (
            "over the limit on the wire",
            too_large,
            "message length too large",
        ),
        (
            "over the limit once decoded",
            hostile,
            "over the limit of 4096 bytes once decoded",
        ),
    ] {
        let (requests, mut answers) = open_stream(&agent, false).await;
        requests.send(with_id(good.clone(), "before")).unwrap();
        requests.send(request).unwrap();
        let before = next_answer(&mut answers)
            .await
            .unwrap()
            .unwrap_or_else(|status| panic!("{what}: the request before is answered: {status:?}"));
        assert_eq!(before.error_message, "", "{what}");
        assert_eq!(before.infer_response.unwrap().id, "before", "{what}");
        let status = next_answer(&mut answers)
            .await
            .unwrap_or_else(|| panic!("{what}: the stream ends with a status"))
            .expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::ResourceExhausted,
            "{what}: {status:?}"
        );
        assert!(status.message().contains(says), "{what}: {status:?}");
        assert!(next_answer(&mut answers).await.is_none(), "{what}");
    }
    let refused = metric_value(
        &agent.metrics().await,
        "edgefleet_inference_errors_total",
        "model=\"\",version=\"\",reason=\"too_large\"",
    );
    assert_eq!(refused, 2.0);
    agent.grpc().await.model_infer(good).await.unwrap();
    agent.stop().await;
}

/// Shutting down does not wait on a client that keeps its stream open: the
/// stream ends with UNAVAILABLE once what it runs is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_ends_open_streams_with_unavailable() {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    let agent = agent(repo.path(), RuntimeChoice::Tract).start().await;
    let (requests, mut answers) = open_stream(&agent, false).await;
    requests
        .send(grpc_request("mlp", &cases("mlp")[0], true))
        .unwrap();
    let answer = next_answer(&mut answers).await.unwrap().unwrap();
    assert_eq!(answer.error_message, "");
    tokio::time::timeout(Duration::from_secs(30), agent.stop())
        .await
        .expect("the agent stops with a stream open");
    let status = next_answer(&mut answers)
        .await
        .expect("the stream ends with a status")
        .expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    drop(requests);
}
