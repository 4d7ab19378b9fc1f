//! Writes the fuzz targets' starting corpora from the test cases
//! (`testdata/cases/*.json`): for `http_infer` each case's request as JSON,
//! for `grpc_infer` the same request as a `ModelInferRequest` with raw
//! contents and, where the protocol has a typed field for every input, with
//! typed contents.
//!
//! `cargo run --release --example seeds` (from `fuzz/`) writes `corpus/http_infer/` and
//! `corpus/grpc_infer/`.

use std::fs;
use std::path::{Path, PathBuf};

use edgefleet_fuzz::MODELS;
use edgefleet_proto::inference::model_infer_request::InferInputTensor;
use edgefleet_proto::inference::{InferTensorContents, ModelInferRequest};
use prost::Message;
use serde_json::Value;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let http_dir = root.join("corpus/http_infer");
    let grpc_dir = root.join("corpus/grpc_infer");
    fs::create_dir_all(&http_dir)?;
    fs::create_dir_all(&grpc_dir)?;
    let mut written = 0;
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
            let mut http = vec![selector];
            http.extend(serde_json::to_vec(
                &serde_json::json!({ "inputs": inputs }),
            )?);
            write(&http_dir, model, n, "json", &http)?;

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
                    let mut grpc = vec![selector];
                    grpc.extend(request.encode_to_vec());
                    write(&grpc_dir, model, n, kind, &grpc)?;
                    written += 1;
                }
            }
            written += 1;
        }
    }
    println!(
        "{written} seeds in {} and {}",
        http_dir.display(),
        grpc_dir.display()
    );
    Ok(())
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
