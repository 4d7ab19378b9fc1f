//! ONNX models built in code, for tests and benchmarks that need a model of
//! a given size (the committed fixtures are kept small).

use edgefleet_proto::onnx;
use prost::Message;

use crate::fixture_model;

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a length-delimited field (wire type 2).
fn len_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn float_info(name: &str, dims: &[i64]) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::{Dimension, dimension::Value};
    onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(
                onnx::type_proto::Tensor {
                    elem_type: 1,
                    shape: Some(onnx::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A valid ONNX model `y = x · W` with `x: float[1, k]` and a `float[k, n]`
/// initializer of small pseudo-random values (4·k·n bytes). The registry's
/// ONNX subset has no `raw_data`, so the initializer's field 9 (raw_data)
/// and the graph's field 5 are appended by hand: protobuf fields may come
/// in any order.
pub fn matmul_model(k: i64, n: i64) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut raw = Vec::with_capacity((k * n * 4) as usize);
    for _ in 0..k * n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let value = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.01;
        raw.extend_from_slice(&value.to_le_bytes());
    }
    let mut tensor = onnx::TensorProto {
        dims: vec![k, n],
        data_type: 1,
        name: "w".into(),
    }
    .encode_to_vec();
    len_field(9, &raw, &mut tensor);
    drop(raw);
    let mut graph = onnx::GraphProto {
        node: vec![onnx::NodeProto {
            input: vec!["x".into(), "w".into()],
            output: vec!["y".into()],
            name: "matmul".into(),
            op_type: "MatMul".into(),
            ..Default::default()
        }],
        name: "matmul".into(),
        input: vec![float_info("x", &[1, k])],
        output: vec![float_info("y", &[1, n])],
        ..Default::default()
    }
    .encode_to_vec();
    len_field(5, &tensor, &mut graph);
    drop(tensor);
    let mut model = onnx::ModelProto {
        ir_version: 8,
        producer_name: "edgefleet-test-support".into(),
        opset_import: vec![onnx::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        ..Default::default()
    }
    .encode_to_vec();
    len_field(7, &graph, &mut model);
    model
}

/// The `mlp` fixture with an unused `padding_bytes` initializer appended
/// (protobuf merges a repeated `graph` field), so it computes the same but
/// takes a while to download.
pub fn padded_mlp(padding_bytes: usize) -> Vec<u8> {
    let mut model = std::fs::read(fixture_model("mlp")).unwrap();
    let mut tensor = Vec::new();
    tensor.push(0x08); // dims
    varint((padding_bytes / 4) as u64, &mut tensor);
    tensor.extend_from_slice(&[0x10, 0x01]); // data_type FLOAT
    len_field(8, b"unused_padding", &mut tensor); // name
    let raw: Vec<u8> = (0..padding_bytes).map(|i| (i % 251) as u8).collect();
    len_field(9, &raw, &mut tensor); // raw_data
    let mut graph = Vec::new();
    len_field(5, &tensor, &mut graph); // GraphProto.initializer
    len_field(7, &graph, &mut model); // ModelProto.graph (merged)
    model
}
