//! Writes the fuzz targets' starting corpora from the test cases
//! (`testdata/cases/*.json`): for `http_infer` each case's request as JSON,
//! for `grpc_infer` the same request as a `ModelInferRequest` with raw
//! contents and, where the protocol has a typed field for every input, with
//! typed contents; for `http_routes` and `grpc_service` those requests as
//! whole calls (the gRPC ones framed, alone and as a stream of two), and a
//! call of every other route and RPC naming a fixture; for `onnx_scan` the
//! test fixtures' and the example's model files; for `control_plane_api` a
//! call of every RPC it picks from, and a session carrying each kind of
//! message an agent sends; for `agent_session` what a control plane sends
//! an agent: desired states (the `mlp` fixture, helped to its digest and
//! signature; a blob the server does not have; none), a Disconnect, an
//! acknowledgement, a certificate, another Welcome, alone and together.
//!
//! `cargo run --release --example seeds` (from `fuzz/`) writes
//! `corpus/<target>/` for each target.

use std::fs;
use std::path::{Path, PathBuf};

use axum::http::Method;
use edgefleet_fuzz::control_plane::{CONTROL_PLANE_METHODS, Help, frames, inventory};
use edgefleet_fuzz::{GRPC_METHODS, HTTP_METHODS, MODELS};
use edgefleet_proto::edgefleet::v1 as pb;
use edgefleet_proto::inference::model_infer_request::InferInputTensor;
use edgefleet_proto::inference::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, RepositoryModelLoadRequest,
};
use prost::Message;
use serde_json::Value;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let http_dir = root.join("corpus/http_infer");
    let grpc_dir = root.join("corpus/grpc_infer");
    let routes_dir = root.join("corpus/http_routes");
    let service_dir = root.join("corpus/grpc_service");
    for dir in [&http_dir, &grpc_dir, &routes_dir, &service_dir] {
        fs::create_dir_all(dir)?;
    }
    let mut written = 0;
    written += write_route_seeds(&routes_dir)?;
    written += write_rpc_seeds(&service_dir)?;
    written += write_model_seeds(&root.join("corpus/onnx_scan"))?;
    written += write_control_plane_seeds(&root.join("corpus/control_plane_api"))?;
    written += write_agent_session_seeds(&root.join("corpus/agent_session"))?;
    for entry in fs::read_dir(root.join("../testdata/cases"))? {
        let path = entry?.path();
        let file: Value = serde_json::from_slice(&fs::read(&path)?)?;
        let model = file["model"]
            .as_str()
            .ok_or("a case file without its model")?;
        let Some(index) = MODELS.iter().position(|m| *m == model) else {
            continue;
        };
        let selector = u8::try_from(index)?;
        for (n, case) in file["cases"]
            .as_array()
            .ok_or("no cases")?
            .iter()
            .enumerate()
        {
            let inputs = case["inputs"].as_array().ok_or("no inputs")?;
            let json = serde_json::to_vec(&serde_json::json!({ "inputs": inputs }))?;
            let mut http = vec![selector];
            http.extend(&json);
            write(&http_dir, model, n, "json", &http)?;
            let mut route = http_call(
                Method::POST,
                &format!("/v2/models/{model}/infer"),
                "content-type: application/json\n",
            );
            route.extend(&json);
            write(&routes_dir, model, n, "infer", &route)?;

            let request = |typed: bool| -> Option<ModelInferRequest> {
                let mut request = ModelInferRequest {
                    model_name: model.to_string(),
                    ..Default::default()
                };
                for input in inputs {
                    let datatype = input["datatype"].as_str()?.to_string();
                    let data = input["data"].as_array()?;
                    let mut tensor = InferInputTensor {
                        name: input["name"].as_str()?.to_string(),
                        datatype: datatype.clone(),
                        shape: input["shape"]
                            .as_array()?
                            .iter()
                            .map(|d| d.as_i64())
                            .collect::<Option<_>>()?,
                        ..Default::default()
                    };
                    if typed {
                        tensor.contents = Some(typed_contents(&datatype, data)?);
                    } else {
                        request
                            .raw_input_contents
                            .push(raw_contents(&datatype, data)?.into());
                    }
                    request.inputs.push(tensor);
                }
                Some(request)
            };
            for (typed, kind) in [(false, "raw"), (true, "typed")] {
                if let Some(request) = request(typed) {
                    let message = request.encode_to_vec();
                    let mut grpc = vec![selector];
                    grpc.extend(&message);
                    write(&grpc_dir, model, n, kind, &grpc)?;
                    let mut call = vec![rpc("ModelInfer")];
                    frame(&mut call, &message);
                    write(&service_dir, model, n, kind, &call)?;
                    let mut stream = vec![rpc("ModelStreamInfer")];
                    frame(&mut stream, &message);
                    frame(&mut stream, &message);
                    write(&service_dir, model, n, &format!("{kind}-stream"), &stream)?;
                    written += 3;
                }
            }
            written += 1;
        }
    }
    println!("{written} seeds in {}", root.join("corpus").display());
    Ok(())
}

/// An `http_routes` input: the method, the target, the header lines and
/// the empty line; the body goes after it.
fn http_call(method: Method, target: &str, headers: &str) -> Vec<u8> {
    let index = HTTP_METHODS
        .iter()
        .position(|m| *m == method)
        .expect("a method");
    let mut call = vec![u8::try_from(index).expect("few methods")];
    call.extend(format!("{target}\n{headers}\n").as_bytes());
    call
}

/// A call of every HTTP route but infer (written from the cases), naming
/// the `mlp` fixture where the route names a model.
fn write_route_seeds(dir: &Path) -> std::io::Result<usize> {
    let routes = [
        (Method::GET, "/v2"),
        (Method::GET, "/v2/health/live"),
        (Method::GET, "/v2/health/ready"),
        (Method::GET, "/ready"),
        (Method::GET, "/v2/models/mlp"),
        (Method::GET, "/v2/models/mlp/versions/1"),
        (Method::GET, "/v2/models/mlp/ready"),
        (Method::GET, "/v2/models/mlp/versions/1/ready"),
        (Method::GET, "/v2/models/mlp/config"),
        (Method::GET, "/v2/models/mlp/versions/1/config"),
        (Method::GET, "/v2/models/stats"),
        (Method::GET, "/v2/models/mlp/stats"),
        (Method::GET, "/v2/models/mlp/versions/1/stats"),
        (Method::POST, "/v2/repository/index"),
        (Method::POST, "/v2/repository/models/mlp/load"),
        (Method::POST, "/v2/repository/models/mlp/unload"),
        (Method::GET, "/metrics"),
    ];
    for (n, (method, target)) in routes.iter().enumerate() {
        fs::write(
            dir.join(format!("route-{n}")),
            http_call(method.clone(), target, ""),
        )?;
    }
    Ok(routes.len())
}

/// `grpc_service`'s byte for an RPC.
fn rpc(name: &str) -> u8 {
    let index = GRPC_METHODS
        .iter()
        .position(|m| *m == name)
        .expect("an RPC");
    u8::try_from(index).expect("few RPCs")
}

/// Appends `message` as one gRPC message: not compressed, its length.
fn frame(out: &mut Vec<u8>, message: &[u8]) {
    out.push(0);
    out.extend(
        u32::try_from(message.len())
            .expect("a small message")
            .to_be_bytes(),
    );
    out.extend(message);
}

/// A call of every RPC but the infer ones (written from the cases), naming
/// the `mlp` fixture where the RPC names a model.
fn write_rpc_seeds(dir: &Path) -> std::io::Result<usize> {
    // ModelReady, ModelMetadata, ModelStatistics and ModelConfig requests
    // share their fields: name = 1, version = 2.
    let model = ModelMetadataRequest {
        name: "mlp".to_string(),
        version: "1".to_string(),
    }
    .encode_to_vec();
    let load = RepositoryModelLoadRequest {
        model_name: "mlp".to_string(),
        ..Default::default()
    }
    .encode_to_vec();
    let calls: [(&str, &[u8]); 10] = [
        ("ServerLive", &[]),
        ("ServerReady", &[]),
        ("ServerMetadata", &[]),
        ("RepositoryIndex", &[]),
        ("ModelReady", &model),
        ("ModelMetadata", &model),
        ("ModelStatistics", &model),
        ("ModelConfig", &model),
        ("RepositoryModelLoad", &load),
        ("RepositoryModelUnload", &load),
    ];
    for (name, message) in calls {
        let mut call = vec![rpc(name)];
        frame(&mut call, message);
        fs::write(dir.join(name), call)?;
    }
    Ok(calls.len())
}

fn write(dir: &Path, model: &str, n: usize, kind: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::write(dir.join(format!("{model}-{n}-{kind}")), bytes)
}

fn typed_contents(datatype: &str, data: &[Value]) -> Option<InferTensorContents> {
    let mut contents = InferTensorContents::default();
    let ints = || {
        data.iter()
            .map(|v| v.as_i64())
            .collect::<Option<Vec<i64>>>()
    };
    let uints = || {
        data.iter()
            .map(|v| v.as_u64())
            .collect::<Option<Vec<u64>>>()
    };
    let floats = || {
        data.iter()
            .map(|v| v.as_f64())
            .collect::<Option<Vec<f64>>>()
    };
    match datatype {
        "BOOL" => {
            contents.bool_contents = data.iter().map(|v| v.as_bool()).collect::<Option<_>>()?
        }
        "INT8" | "INT16" | "INT32" => {
            contents.int_contents = ints()?.into_iter().map(|v| v as i32).collect()
        }
        "INT64" => contents.int64_contents = ints()?,
        "UINT8" | "UINT16" | "UINT32" => {
            contents.uint_contents = uints()?.into_iter().map(|v| v as u32).collect()
        }
        "UINT64" => contents.uint64_contents = uints()?,
        "FP32" => contents.fp32_contents = floats()?.into_iter().map(|v| v as f32).collect(),
        "FP64" => contents.fp64_contents = floats()?,
        "BYTES" => {
            contents.bytes_contents = data
                .iter()
                .map(|v| v.as_str().map(|s| s.as_bytes().to_vec()))
                .collect::<Option<_>>()?
        }
        _ => return None, // FP16 has no typed field.
    }
    Some(contents)
}

fn raw_contents(datatype: &str, data: &[Value]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for value in data {
        match datatype {
            "BOOL" => out.push(u8::from(value.as_bool()?)),
            "INT8" => out.extend((value.as_i64()? as i8).to_le_bytes()),
            "INT16" => out.extend((value.as_i64()? as i16).to_le_bytes()),
            "INT32" => out.extend((value.as_i64()? as i32).to_le_bytes()),
            "INT64" => out.extend(value.as_i64()?.to_le_bytes()),
            "UINT8" => out.extend((value.as_u64()? as u8).to_le_bytes()),
            "UINT16" => out.extend((value.as_u64()? as u16).to_le_bytes()),
            "UINT32" => out.extend((value.as_u64()? as u32).to_le_bytes()),
            "UINT64" => out.extend(value.as_u64()?.to_le_bytes()),
            "FP16" => out.extend(half::f16::from_f64(value.as_f64()?).to_le_bytes()),
            "FP32" => out.extend((value.as_f64()? as f32).to_le_bytes()),
            "FP64" => out.extend(value.as_f64()?.to_le_bytes()),
            "BYTES" => {
                let text = value.as_str()?.as_bytes();
                out.extend(u32::try_from(text.len()).ok()?.to_le_bytes());
                out.extend(text);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The ONNX files of the test fixtures and of the example repository.
fn write_model_seeds(dir: &Path) -> std::io::Result<usize> {
    fs::create_dir_all(dir)?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut written = 0;
    for repository in ["testdata/models", "examples/model-repository"] {
        for model in fs::read_dir(root.join(repository))? {
            let model = model?.path();
            for version in fs::read_dir(&model)? {
                let file = version?.path().join("model.onnx");
                if let (Ok(bytes), Some(name)) = (fs::read(&file), model.file_name()) {
                    fs::write(dir.join(name), bytes)?;
                    written += 1;
                }
            }
        }
    }
    Ok(written)
}

/// `control_plane_api`'s calls: for each RPC, a request an operator or
/// agent would send (the fixture's own token, device or digest where the
/// call is helped to them); for the helped session, one of each message an
/// agent sends after its Hello, and all of them in one session.
fn write_control_plane_seeds(dir: &Path) -> Result<usize, Box<dyn std::error::Error>> {
    use pb::agent_message::Kind;
    fs::create_dir_all(dir)?;
    let key = edgefleet_pki::generate_device_key()?;
    let csr_pem = edgefleet_pki::device_csr(&key, "seed")?;
    let labels = || [("fleet".to_string(), "fuzz".to_string())].into();
    let model = |name: &str, version| pb::GetModelRequest {
        name: name.to_string(),
        version,
    };
    let rollout = pb::RolloutRef {
        id: "ro-000000000000".to_string(),
        view: pb::RolloutView::Basic.into(),
    };
    let iris = fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/model-repository/iris/1/model.onnx"),
    )?;
    let batch = pb::TelemetryBatch {
        sequence: 1,
        start_unix_ms: 1_800_000_000_000,
        end_unix_ms: 1_800_000_010_000,
        models: vec![pb::ModelTelemetry {
            name: "mlp".into(),
            version: 1,
            requests: 10,
            errors: 1,
            local: 10,
            ..Default::default()
        }],
        device: Some(pb::DeviceTelemetry {
            cpu_permille: 500,
            memory_used_bytes: 1 << 20,
            memory_total_bytes: 1 << 30,
            temperature_millicelsius: Some(45_000),
            runtime: "tract".into(),
            ..Default::default()
        }),
        events: vec![pb::Event {
            unix_ms: 1_800_000_005_000,
            kind: pb::event::Kind::ModelLoaded.into(),
            model: "mlp".into(),
            version: 1,
            message: "loaded".into(),
        }],
        ..Default::default()
    };
    let agent_messages = [
        Kind::Heartbeat(pb::Heartbeat {
            unix_millis: 1_800_000_000_000,
        }),
        Kind::CommandAck(pb::CommandAck {
            command_id: 1,
            ok: true,
            message: String::new(),
        }),
        Kind::Telemetry(batch.clone()),
        Kind::RenewCertificate(pb::RenewCertificate {
            csr_pem: csr_pem.clone(),
        }),
        Kind::ModelsChanged(pb::ModelsChanged {
            models: vec![pb::ModelVersionRef {
                name: "mlp".into(),
                version: 1,
                state: "ready".into(),
                ..Default::default()
            }],
        }),
        Kind::Activation(pb::ActivationReport {
            name: "mlp".into(),
            version: 1,
            stage: pb::activation_report::Stage::Active.into(),
            ..Default::default()
        }),
        Kind::TelemetryUpload(pb::TelemetryUpload {
            batches: vec![batch],
            sent_at_ms: 1_800_000_010_000,
        }),
    ]
    .map(|kind| pb::AgentMessage { kind: Some(kind) }.encode_to_vec());

    let enroll = pb::EnrollRequest {
        join_token: String::new(),
        csr_pem,
        inventory: Some(inventory()),
    };
    let one = |message: Vec<u8>| vec![message];
    let mut calls: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("Enroll", one(enroll.encode_to_vec())),
        ("Session", agent_messages.to_vec()),
        (
            "DownloadBlob",
            one(pb::DownloadBlobRequest {
                sha256: String::new(),
                offset: 1000,
            }
            .encode_to_vec()),
        ),
        (
            "CreateJoinToken",
            one(pb::CreateJoinTokenRequest {
                labels: labels(),
                expires_in_seconds: 3600,
                uses: 2,
            }
            .encode_to_vec()),
        ),
        (
            "ListDevices",
            one(pb::ListDevicesRequest {
                selector: "fleet=fuzz".into(),
                page_size: 2,
                page_token: page_token("ListDevices", "fleet=fuzz", "\"dev-0\""),
            }
            .encode_to_vec()),
        ),
        ("GetDevice", one(Vec::new())),
        (
            "RevokeDevice",
            one(pb::RevokeDeviceRequest {
                id: "dev-000000000000".into(),
            }
            .encode_to_vec()),
        ),
        (
            "SetDeviceLabels",
            one(pb::SetDeviceLabelsRequest {
                id: String::new(),
                labels: labels(),
            }
            .encode_to_vec()),
        ),
        (
            "PushModel",
            vec![
                pb::PushModelRequest {
                    kind: Some(pb::push_model_request::Kind::Header(pb::PushModelHeader {
                        name: "iris".into(),
                        size_bytes: iris.len() as u64,
                        labels: labels(),
                        ..Default::default()
                    })),
                }
                .encode_to_vec(),
                pb::PushModelRequest {
                    kind: Some(pb::push_model_request::Kind::Chunk(iris)),
                }
                .encode_to_vec(),
            ],
        ),
        (
            "ListModels",
            one(pb::ListModelsRequest {
                name: "mlp".into(),
                page_size: 1,
                page_token: page_token("ListModels", "mlp", "[\"mlp\",1]"),
            }
            .encode_to_vec()),
        ),
        ("GetModel", one(model("mlp", 1).encode_to_vec())),
        ("DeleteModel", one(model("iris", 1).encode_to_vec())),
        (
            "CreateRollout",
            one(pb::CreateRolloutRequest {
                model: "mlp".into(),
                version: 1,
                selector: "fleet=fuzz".into(),
                waves: vec![
                    pb::Wave {
                        size: Some(pb::wave::Size::Percent(50.0)),
                    },
                    pb::Wave {
                        size: Some(pb::wave::Size::Percent(100.0)),
                    },
                ],
                ..Default::default()
            }
            .encode_to_vec()),
        ),
        (
            "ListRollouts",
            one(pb::ListRolloutsRequest {
                model: "mlp".into(),
                page_size: 1,
                page_token: String::new(),
            }
            .encode_to_vec()),
        ),
        (
            "ListRolloutDevices",
            // No token: the helped call (the newest rollout's id) reads
            // a page from the store.
            one(pb::ListRolloutDevicesRequest {
                rollout_id: "ro-000000000000".into(),
                state: "updating".into(),
                page_size: 1,
                page_token: String::new(),
            }
            .encode_to_vec()),
        ),
        (
            "ListJoinTokens",
            one(pb::ListJoinTokensRequest {
                page_size: 1,
                page_token: page_token("ListJoinTokens", "", "[1796490017736,\"jt-0\"]"),
            }
            .encode_to_vec()),
        ),
        (
            "RevokeJoinToken",
            one(pb::RevokeJoinTokenRequest { id: "jt-0".into() }.encode_to_vec()),
        ),
    ];
    for name in [
        "GetRollout",
        "PauseRollout",
        "ResumeRollout",
        "AbortRollout",
        "RollbackRollout",
    ] {
        calls.push((name, one(rollout.encode_to_vec())));
    }
    // The unhelped session says Hello as another device.
    let other_hello = pb::AgentMessage {
        kind: Some(Kind::Hello(pb::Hello {
            device_id: "dev-000000000000".into(),
            inventory: Some(inventory()),
            runtime: "tract".into(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    let mut written = 0;
    for (index, (_, path, help)) in CONTROL_PLANE_METHODS.iter().enumerate() {
        let method = path.rsplit('/').next().unwrap_or(path);
        let (_, messages) = calls
            .iter()
            .find(|(name, _)| *name == method)
            .expect("a seed for every RPC");
        // A helped call's seed leaves out what the target gives it.
        let body = match help {
            Help::FirstField(_) => without_field_1(&messages[0]),
            Help::Hello => frames(messages.iter().cloned()).to_vec(),
            Help::None if method == "Session" => {
                frames(std::iter::once(other_hello.clone()).chain(messages.iter().cloned()))
                    .to_vec()
            }
            Help::None => frames(messages.iter().cloned()).to_vec(),
        };
        let selector = u8::try_from(index).expect("few RPCs");
        fs::write(
            dir.join(format!("{index:02}-{method}")),
            [&[selector][..], &body].concat(),
        )?;
        written += 1;
        if *help == Help::Hello {
            // Each of the session's messages alone, too.
            for (n, message) in messages.iter().enumerate() {
                let body = frames([message.clone()]);
                fs::write(
                    dir.join(format!("{index:02}-{method}-{n}")),
                    [&[selector][..], &body].concat(),
                )?;
                written += 1;
            }
        }
    }
    Ok(written)
}

/// A message without its field 1 (a string: the target writes it), which
/// prost encodes first when it is set.
fn without_field_1(message: &[u8]) -> Vec<u8> {
    if message.first() != Some(&0x0a) {
        return message.to_vec();
    }
    let (mut length, mut shift, mut at) = (0usize, 0, 1);
    while let Some(&byte) = message.get(at) {
        length |= usize::from(byte & 0x7f) << shift;
        shift += 7;
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    message.get(at + length..).unwrap_or_default().to_vec()
}

/// A page token as the control plane makes them (hex of its JSON), after
/// `after` (JSON) in `list` with `filter`: the fuzzer starts from the
/// shape, and mutates it into the tokens no list gave.
fn page_token(list: &str, filter: &str, after: &str) -> String {
    let json = format!(r#"{{"list":"{list}","filter":"{filter}","after":{after}}}"#);
    json.bytes().map(|b| format!("{b:02x}")).collect()
}

/// What a control plane sends an agent after the Welcome, each message
/// length-delimited (see `edgefleet_fuzz::agent_session`).
fn write_agent_session_seeds(dir: &Path) -> std::io::Result<usize> {
    use pb::control_message::Kind;
    fs::create_dir_all(dir)?;
    let message = |kind: Kind| pb::ControlMessage { kind: Some(kind) };
    let model = |name: &str, version, sha256: &str| pb::ModelVersionRef {
        name: name.into(),
        version,
        // Empty: the target gives it the fixture's digest, size and signature.
        sha256: sha256.into(),
        ..Default::default()
    };
    let desired = |generation, models: Vec<pb::ModelVersionRef>| {
        message(Kind::DesiredState(pb::DesiredState {
            generation,
            models,
            ..Default::default()
        }))
    };
    let seeds: Vec<(&str, Vec<pb::ControlMessage>)> = vec![
        ("desired-mlp", vec![desired(1, vec![model("mlp", 1, "")])]),
        (
            "desired-mlp-then-v2",
            vec![
                desired(2, vec![model("mlp", 1, "")]),
                desired(3, vec![model("mlp", 2, "")]),
            ],
        ),
        (
            "desired-missing-blob",
            vec![desired(4, vec![model("other", 1, &"ab".repeat(32))])],
        ),
        ("desired-none", vec![desired(5, Vec::new())]),
        (
            "desired-another-device",
            vec![message(Kind::DesiredState(pb::DesiredState {
                generation: 6,
                models: vec![model("mlp", 1, "")],
                device_id: "dev-other".into(),
                ..Default::default()
            }))],
        ),
        (
            "disconnect",
            vec![message(Kind::Command(pb::Command {
                command_id: 1,
                kind: Some(pb::command::Kind::Disconnect(pb::Disconnect {
                    reason: "fuzz".into(),
                })),
            }))],
        ),
        (
            "telemetry-ack",
            vec![message(Kind::TelemetryAck(pb::TelemetryAck {
                sequence: 7,
            }))],
        ),
        (
            "certificate",
            vec![message(Kind::Certificate(pb::CertificateIssued {
                certificate_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                    .into(),
                ca_certificate_pem: String::new(),
            }))],
        ),
        (
            "welcome-again",
            vec![message(Kind::Welcome(pb::Welcome {
                device_id: "dev-fuzz".into(),
                telemetry_interval_seconds: 1,
                ..Default::default()
            }))],
        ),
    ];
    let mut all = Vec::new();
    for (name, messages) in &seeds {
        let mut bytes = Vec::new();
        for message in messages {
            message
                .encode_length_delimited(&mut bytes)
                .expect("a Vec grows");
        }
        fs::write(dir.join(name), &bytes)?;
        all.extend(bytes);
    }
    fs::write(dir.join("all"), all)?;
    Ok(seeds.len() + 1)
}
