//! Arbitrary bytes as an ONNX model pushed to the control plane's registry:
//! `registry::onnx::parse`, the hand-written protobuf scan that validates a
//! model and reads its signature without loading it whole. It must answer
//! every input with the model's description or an error that says why,
//! never panic or hang; where the bytes also decode whole as an ONNX
//! `ModelProto` (prost, the generated types) and the scan accepts them, both
//! must read the same IR version, opset, inputs and outputs. A panic, a hang
//! (libFuzzer's `-timeout`), an empty error or a disagreement is a finding.
//!
//! Needs no agent and no server: the scan is a pure function, so this target
//! runs far faster than the others.
#![no_main]

use std::collections::HashSet;

use edgefleet_control_plane::registry::onnx::{OnnxError, parse};
use edgefleet_proto::onnx::ModelProto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let scanned = match parse(data) {
        Ok(info) => info,
        Err(OnnxError::Invalid(message)) => {
            assert!(!message.is_empty(), "an empty error");
            return;
        }
        Err(OnnxError::Io(err)) => panic!("reading bytes in memory failed: {err}"),
    };
    let Ok(model) = ModelProto::decode(data) else {
        // The scan skips what it does not need (nodes, initializer data),
        // so it accepts bytes a whole decode refuses there.
        return;
    };
    assert_eq!(scanned.ir_version, model.ir_version, "ir_version");
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .unwrap_or(0);
    assert_eq!(scanned.opset, opset, "opset");
    let graph = model.graph.expect("the scan found a graph");
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|name| !initializers.contains(name))
        .collect();
    let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let names = |infos: &[edgefleet_control_plane::store::registry::TensorInfo]| {
        infos.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&scanned.inputs), inputs, "inputs");
    assert_eq!(names(&scanned.outputs), outputs, "outputs");
});
