//! Validates an ONNX model and reads what the registry records about it: its
//! inputs (graph inputs that are not initializers), outputs, datatypes (as
//! Open Inference Protocol names), shapes, opset and IR version.
//!
//! The file is scanned as a protobuf stream rather than decoded whole: the
//! top-level `ModelProto` and its `GraphProto` are walked field by field,
//! initializer data (nearly all of a model's bytes) and nodes are skipped
//! without being read into memory, and only the small messages (inputs,
//! outputs, opset imports) are decoded with the generated `onnx` types. So a
//! 2 GiB model is validated with a few hundred KiB of memory.

use std::collections::HashSet;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use edgefleet_proto::onnx;
use prost::Message;

use crate::store::registry::TensorInfo;

/// What the registry records about a valid ONNX model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnnxInfo {
    pub ir_version: i64,
    /// Version of the default (`""` / `ai.onnx`) operator set; 0 if not imported.
    pub opset: i64,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The bytes are not a usable ONNX model; the message says why.
    #[error("not a valid ONNX model: {0}")]
    Invalid(String),
    #[error("cannot read the model: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid(message: impl Into<String>) -> OnnxError {
    OnnxError::Invalid(message.into())
}

/// Largest single small message (an input, an output, an opset import, an
/// initializer's name) read into memory; real ones are a few hundred bytes.
const MAX_SMALL_MESSAGE: u64 = 1024 * 1024;
/// Most bytes of inputs, outputs and opset imports read in all. Decoded,
/// a message can take ~30 times its bytes (a shape of 2-byte dimensions),
/// so this bounds what a hostile file can make the server hold to ~100 MiB.
const MAX_DECODED_TOTAL: u64 = 4 * 1024 * 1024;
/// Most bytes of initializer names kept in all (a model with 100,000
/// initializers of 100-byte names holds 10 MB).
const MAX_NAMES_TOTAL: u64 = 64 * 1024 * 1024;
/// Most dimensions an input or output may have (ONNX Runtime refuses
/// tensors of rank above 64 too).
const MAX_RANK: usize = 64;
/// Skips up to this size are read through the buffer; longer ones seek.
const SEEK_THRESHOLD: u64 = 64 * 1024;

/// Parses a model held in memory.
pub fn parse(bytes: &[u8]) -> Result<OnnxInfo, OnnxError> {
    parse_reader(Cursor::new(bytes), bytes.len() as u64)
}

/// Parses a model file without loading it whole.
pub fn parse_file(path: &Path) -> Result<OnnxInfo, OnnxError> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    parse_reader(BufReader::with_capacity(256 * 1024, file), len)
}

/// Parses `len` bytes of a model from `reader`.
pub fn parse_reader<R: Read + Seek>(reader: R, len: u64) -> Result<OnnxInfo, OnnxError> {
    if len == 0 {
        return Err(invalid("the file is empty"));
    }
    let mut scanner = Scanner {
        reader,
        pos: 0,
        len,
        decoded: 0,
        names: 0,
    };
    let mut model = ModelScan::default();
    scanner
        .scan_model(&mut model, len)
        .map_err(|err| match err {
            OnnxError::Invalid(message) => invalid(format!(
                "the file does not decode as ONNX protobuf: {message}"
            )),
            other => other,
        })?;
    model.finish()
}

/// What the scan gathered, checked by [`ModelScan::finish`].
#[derive(Default)]
struct ModelScan {
    ir_version: i64,
    opsets: Vec<onnx::OperatorSetIdProto>,
    has_graph: bool,
    inputs: Vec<onnx::ValueInfoProto>,
    outputs: Vec<onnx::ValueInfoProto>,
    initializers: HashSet<String>,
}

impl ModelScan {
    fn finish(self) -> Result<OnnxInfo, OnnxError> {
        if self.ir_version <= 0 {
            return Err(invalid(
                "no ir_version (is this an ONNX file? it does not decode as an ONNX ModelProto)",
            ));
        }
        if !self.has_graph {
            return Err(invalid("the model has no graph"));
        }
        if self.outputs.is_empty() {
            return Err(invalid("the graph has no outputs"));
        }
        let opset = self
            .opsets
            .iter()
            .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .max()
            .unwrap_or(0);
        let initializers = self.initializers;
        let inputs = self
            .inputs
            .iter()
            .filter(|i| !initializers.contains(&i.name))
            .map(|i| tensor_info(i, "input"))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = self
            .outputs
            .iter()
            .map(|o| tensor_info(o, "output"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OnnxInfo {
            ir_version: self.ir_version,
            opset,
            inputs,
            outputs,
        })
    }
}

/// The Open Inference Protocol name of an ONNX `TensorProto.DataType`.
pub fn oip_datatype(elem_type: i32) -> Option<&'static str> {
    Some(match elem_type {
        1 => "FP32",
        2 => "UINT8",
        3 => "INT8",
        4 => "UINT16",
        5 => "INT16",
        6 => "INT32",
        7 => "INT64",
        8 => "BYTES",
        9 => "BOOL",
        10 => "FP16",
        11 => "FP64",
        12 => "UINT32",
        13 => "UINT64",
        16 => "BF16",
        _ => return None,
    })
}

fn onnx_type_name(elem_type: i32) -> String {
    match elem_type {
        0 => "UNDEFINED".into(),
        14 => "COMPLEX64".into(),
        15 => "COMPLEX128".into(),
        17..=20 => "FLOAT8".into(),
        21 => "UINT4".into(),
        22 => "INT4".into(),
        23 => "FLOAT4E2M1".into(),
        other => format!("element type {other}"),
    }
}

fn tensor_info(value: &onnx::ValueInfoProto, what: &str) -> Result<TensorInfo, OnnxError> {
    use onnx::type_proto::Value;
    if value.name.is_empty() {
        return Err(invalid(format!("an {what} of the graph has no name")));
    }
    let name = &value.name;
    let tensor = match value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(Value::TensorType(tensor)) => tensor,
        Some(Value::SparseTensorType(_)) => {
            return Err(invalid(format!(
                "{what} {name:?} is a sparse tensor, which the Open Inference Protocol cannot carry"
            )));
        }
        Some(Value::SequenceType(_)) => {
            return Err(invalid(format!(
                "{what} {name:?} is a sequence, not a tensor"
            )));
        }
        Some(Value::MapType(_)) => {
            return Err(invalid(format!("{what} {name:?} is a map, not a tensor")));
        }
        Some(Value::OptionalType(_)) => {
            return Err(invalid(format!(
                "{what} {name:?} is optional, not a tensor"
            )));
        }
        None => return Err(invalid(format!("{what} {name:?} has no type"))),
    };
    let datatype = oip_datatype(tensor.elem_type).ok_or_else(|| {
        invalid(format!(
            "{what} {name:?} has {}, which the Open Inference Protocol cannot carry",
            onnx_type_name(tensor.elem_type)
        ))
    })?;
    let rank = tensor.shape.as_ref().map_or(0, |shape| shape.dim.len());
    if rank > MAX_RANK {
        return Err(invalid(format!(
            "{what} {name:?} has {rank} dimensions; at most {MAX_RANK} are supported"
        )));
    }
    let shape = tensor
        .shape
        .as_ref()
        .map(|shape| {
            shape
                .dim
                .iter()
                .map(|dim| match dim.value {
                    Some(onnx::tensor_shape_proto::dimension::Value::DimValue(v)) if v >= 0 => v,
                    _ => -1,
                })
                .collect()
        })
        // No shape at all: any rank. Reported as the agent's model
        // metadata does (the protocol cannot say "any rank"); a scalar
        // has a shape with no dimensions, `[]`.
        .unwrap_or_else(|| vec![-1]);
    Ok(TensorInfo {
        name: name.clone(),
        datatype: datatype.to_string(),
        shape,
    })
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// A protobuf wire-format walker over a byte stream.
struct Scanner<R> {
    reader: R,
    pos: u64,
    len: u64,
    /// Bytes of messages decoded so far (at most [`MAX_DECODED_TOTAL`]).
    decoded: u64,
    /// Bytes of initializer names kept so far (at most [`MAX_NAMES_TOTAL`]).
    names: u64,
}

impl<R: Read + Seek> Scanner<R> {
    fn byte(&mut self, end: u64) -> Result<u8, OnnxError> {
        if self.pos >= end {
            return Err(invalid(truncated(self.pos)));
        }
        let mut b = [0u8; 1];
        self.reader
            .read_exact(&mut b)
            .map_err(|err| eof(err, self.pos))?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self, end: u64) -> Result<u64, OnnxError> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte(end)?;
            if shift == 63 && b > 1 {
                break;
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(invalid(format!("malformed varint at byte {}", self.pos)))
    }

    /// The next field's (number, wire type).
    fn key(&mut self, end: u64) -> Result<(u64, u8), OnnxError> {
        let at = self.pos;
        let key = self.varint(end)?;
        let field = key >> 3;
        let wire = (key & 7) as u8;
        if field == 0 || !matches!(wire, VARINT | FIXED64 | LEN | FIXED32) {
            return Err(invalid(format!(
                "bad protobuf field key at byte {at} (field {field}, wire type {wire})"
            )));
        }
        Ok((field, wire))
    }

    /// A length prefix, checked against the enclosing message's end.
    fn length(&mut self, end: u64) -> Result<u64, OnnxError> {
        let at = self.pos;
        let len = self.varint(end)?;
        if len > end - self.pos {
            return Err(invalid(format!(
                "a field at byte {at} claims {len} bytes but only {} remain (truncated?)",
                end - self.pos
            )));
        }
        Ok(len)
    }

    fn skip_bytes(&mut self, n: u64) -> Result<(), OnnxError> {
        if n > SEEK_THRESHOLD {
            self.reader.seek(SeekFrom::Current(n as i64))?;
        } else {
            let copied = std::io::copy(&mut (&mut self.reader).take(n), &mut std::io::sink())?;
            if copied != n {
                return Err(invalid(truncated(self.pos + copied)));
            }
        }
        self.pos += n;
        Ok(())
    }

    fn skip(&mut self, wire: u8, end: u64) -> Result<(), OnnxError> {
        let n = match wire {
            VARINT => return self.varint(end).map(drop),
            FIXED64 => 8,
            FIXED32 => 4,
            _ => self.length(end)?,
        };
        if n > end - self.pos {
            return Err(invalid(truncated(end)));
        }
        self.skip_bytes(n)
    }

    fn bytes(&mut self, len: u64, what: &str) -> Result<Vec<u8>, OnnxError> {
        if len > MAX_SMALL_MESSAGE {
            return Err(invalid(format!("{what} is {len} bytes: too large")));
        }
        let mut buf = vec![0; len as usize];
        self.reader
            .read_exact(&mut buf)
            .map_err(|err| eof(err, self.pos))?;
        self.pos += len;
        Ok(buf)
    }

    fn message<M: Message + Default>(&mut self, end: u64, what: &str) -> Result<M, OnnxError> {
        let len = self.length(end)?;
        let at = self.pos;
        self.decoded = budget(
            self.decoded,
            len,
            MAX_DECODED_TOTAL,
            "inputs, outputs and opset imports",
        )?;
        let bytes = self.bytes(len, what)?;
        M::decode(bytes.as_slice())
            .map_err(|err| invalid(format!("{what} at byte {at} does not decode: {err}")))
    }

    fn expect(wire: u8, want: u8, what: &str) -> Result<(), OnnxError> {
        if wire == want {
            Ok(())
        } else {
            Err(invalid(format!(
                "{what} has wire type {wire}, not {want} (is this an ONNX file?)"
            )))
        }
    }

    fn scan_model(&mut self, model: &mut ModelScan, end: u64) -> Result<(), OnnxError> {
        debug_assert!(end <= self.len);
        while self.pos < end {
            let (field, wire) = self.key(end)?;
            match field {
                1 => {
                    Self::expect(wire, VARINT, "ir_version")?;
                    model.ir_version = self.varint(end)? as i64;
                }
                7 => {
                    Self::expect(wire, LEN, "graph")?;
                    let len = self.length(end)?;
                    model.has_graph = true;
                    let graph_end = self.pos + len;
                    self.scan_graph(model, graph_end)?;
                }
                8 => {
                    Self::expect(wire, LEN, "opset_import")?;
                    let opset = self.message(end, "an opset import")?;
                    model.opsets.push(opset);
                }
                _ => self.skip(wire, end)?,
            }
        }
        Ok(())
    }

    fn scan_graph(&mut self, model: &mut ModelScan, end: u64) -> Result<(), OnnxError> {
        while self.pos < end {
            let (field, wire) = self.key(end)?;
            match field {
                5 => {
                    Self::expect(wire, LEN, "an initializer")?;
                    let len = self.length(end)?;
                    let tensor_end = self.pos + len;
                    if let Some(name) = self.scan_tensor_name(tensor_end)? {
                        model.initializers.insert(name);
                    }
                }
                15 => {
                    Self::expect(wire, LEN, "a sparse initializer")?;
                    let len = self.length(end)?;
                    let sparse_end = self.pos + len;
                    while self.pos < sparse_end {
                        let (field, wire) = self.key(sparse_end)?;
                        if field == 1 && wire == LEN {
                            let len = self.length(sparse_end)?;
                            let tensor_end = self.pos + len;
                            if let Some(name) = self.scan_tensor_name(tensor_end)? {
                                model.initializers.insert(name);
                            }
                        } else {
                            self.skip(wire, sparse_end)?;
                        }
                    }
                }
                11 => {
                    Self::expect(wire, LEN, "a graph input")?;
                    let input = self.message(end, "a graph input")?;
                    model.inputs.push(input);
                }
                12 => {
                    Self::expect(wire, LEN, "a graph output")?;
                    let output = self.message(end, "a graph output")?;
                    model.outputs.push(output);
                }
                _ => self.skip(wire, end)?,
            }
        }
        Ok(())
    }

    /// Walks a `TensorProto` to its end; returns its name (field 8).
    fn scan_tensor_name(&mut self, end: u64) -> Result<Option<String>, OnnxError> {
        let mut name = None;
        while self.pos < end {
            let (field, wire) = self.key(end)?;
            if field == 8 && wire == LEN {
                let len = self.length(end)?;
                self.names = budget(self.names, len, MAX_NAMES_TOTAL, "initializer names")?;
                let bytes = self.bytes(len, "an initializer name")?;
                name = Some(
                    String::from_utf8(bytes)
                        .map_err(|_| invalid("an initializer name is not UTF-8"))?,
                );
            } else {
                self.skip(wire, end)?;
            }
        }
        Ok(name)
    }
}

/// `used + len`, or an error when that passes `max`.
fn budget(used: u64, len: u64, max: u64, what: &str) -> Result<u64, OnnxError> {
    match used.checked_add(len) {
        Some(total) if total <= max => Ok(total),
        _ => Err(invalid(format!(
            "its {what} take more than {max} bytes in all: too large for a model's signature"
        ))),
    }
}

fn truncated(at: u64) -> String {
    format!("the file ends unexpectedly at byte {at} (truncated?)")
}

fn eof(err: std::io::Error, at: u64) -> OnnxError {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        invalid(truncated(at))
    } else {
        OnnxError::Io(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/models")
            .join(name)
            .join("1/model.onnx");
        std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    }

    fn info(name: &str, datatype: &str, shape: &[i64]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn every_fixture_parses() {
        for name in [
            "all_types",
            "conv",
            "dynamic",
            "int_bool",
            "mlp",
            "multi_io",
            "no_batch",
            "spectrum",
            "strings",
            "unsupported_op",
        ] {
            let parsed = parse(&fixture(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert!(parsed.ir_version > 0, "{name}");
            assert!(parsed.opset > 0, "{name}");
            assert!(!parsed.outputs.is_empty(), "{name}");
            // The streaming path over a file agrees.
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../testdata/models")
                .join(name)
                .join("1/model.onnx");
            assert_eq!(parse_file(&path).unwrap(), parsed, "{name}");
        }
    }

    #[test]
    fn mlp_inputs_exclude_initializers() {
        let parsed = parse(&fixture("mlp")).unwrap();
        assert_eq!(parsed.inputs.len(), 1, "{parsed:?}");
        assert_eq!(parsed.inputs[0].name, "input");
        assert_eq!(parsed.inputs[0].datatype, "FP32");
        assert_eq!(parsed.inputs[0].shape.last(), Some(&16));
        assert_eq!(parsed.outputs.len(), 1);
        assert_eq!(parsed.outputs[0].datatype, "FP32");
    }

    #[test]
    fn conv_and_multi_io_shapes() {
        let conv = parse(&fixture("conv")).unwrap();
        assert_eq!(conv.inputs.len(), 1, "{conv:?}");
        assert_eq!(conv.inputs[0].shape.len(), 4, "{conv:?}");
        let multi = parse(&fixture("multi_io")).unwrap();
        assert!(multi.inputs.len() >= 2, "{multi:?}");
        assert!(multi.outputs.len() >= 2, "{multi:?}");
    }

    #[test]
    fn datatypes_map_to_open_inference_protocol_names() {
        let int_bool = parse(&fixture("int_bool")).unwrap();
        let types: Vec<&str> = int_bool
            .inputs
            .iter()
            .chain(&int_bool.outputs)
            .map(|t| t.datatype.as_str())
            .collect();
        assert!(types.contains(&"BOOL"), "{int_bool:?}");
        assert!(types.iter().any(|t| t.starts_with("INT")), "{int_bool:?}");
        let strings = parse(&fixture("strings")).unwrap();
        assert!(
            strings.inputs.iter().any(|t| t.datatype == "BYTES"),
            "{strings:?}"
        );
        let all = parse(&fixture("all_types")).unwrap();
        let all_types: HashSet<&str> = all
            .inputs
            .iter()
            .chain(&all.outputs)
            .map(|t| t.datatype.as_str())
            .collect();
        for datatype in ["FP32", "FP64", "INT32", "INT64", "UINT8", "BOOL"] {
            assert!(all_types.contains(datatype), "{datatype} not in {all:?}");
        }
        assert_eq!(oip_datatype(10), Some("FP16"));
        assert_eq!(oip_datatype(16), Some("BF16"));
        assert_eq!(oip_datatype(14), None);
    }

    #[test]
    fn a_tensor_of_unknown_rank_is_minus_one_and_a_scalar_has_no_dimensions() {
        let model = |name: &str| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../testdata/unknown-rank")
                .join(name)
                .join("1/model.onnx");
            parse(&std::fs::read(path).unwrap()).unwrap()
        };
        let relu = model("relu");
        assert_eq!(relu.inputs, [info("x", "FP32", &[-1])]);
        assert_eq!(relu.outputs, [info("y", "FP32", &[-1])]);
        let scalar = model("scalar");
        assert_eq!(scalar.inputs, [info("x", "FP32", &[])]);
    }

    #[test]
    fn dynamic_dims_are_minus_one() {
        let parsed = parse(&fixture("dynamic")).unwrap();
        assert!(
            parsed.inputs.iter().any(|t| t.shape.contains(&-1)),
            "{parsed:?}"
        );
    }

    #[test]
    fn built_model_reports_everything() {
        use onnx::tensor_shape_proto::{Dimension, dimension::Value as Dim};
        let tensor = |name: &str, elem_type: i32, dims: Vec<Option<Dim>>| onnx::ValueInfoProto {
            name: name.into(),
            r#type: Some(onnx::TypeProto {
                value: Some(onnx::type_proto::Value::TensorType(
                    onnx::type_proto::Tensor {
                        elem_type,
                        shape: Some(onnx::TensorShapeProto {
                            dim: dims
                                .into_iter()
                                .map(|value| Dimension {
                                    value,
                                    denotation: String::new(),
                                })
                                .collect(),
                        }),
                    },
                )),
                denotation: String::new(),
            }),
            doc_string: String::new(),
        };
        let model = onnx::ModelProto {
            ir_version: 8,
            opset_import: vec![
                onnx::OperatorSetIdProto {
                    domain: "com.microsoft".into(),
                    version: 1,
                },
                onnx::OperatorSetIdProto {
                    domain: String::new(),
                    version: 17,
                },
            ],
            graph: Some(onnx::GraphProto {
                initializer: vec![onnx::TensorProto {
                    name: "weight".into(),
                    dims: vec![4],
                    data_type: 1,
                }],
                input: vec![
                    tensor(
                        "x",
                        10,
                        vec![
                            Some(Dim::DimParam("batch".into())),
                            None,
                            Some(Dim::DimValue(3)),
                        ],
                    ),
                    tensor("weight", 1, vec![Some(Dim::DimValue(4))]),
                ],
                output: vec![tensor("y", 7, vec![Some(Dim::DimValue(0))])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let parsed = parse(&model.encode_to_vec()).unwrap();
        assert_eq!(
            parsed,
            OnnxInfo {
                ir_version: 8,
                opset: 17,
                inputs: vec![info("x", "FP16", &[-1, -1, 3])],
                outputs: vec![info("y", "INT64", &[0])],
            }
        );

        let mut no_outputs = model.clone();
        no_outputs.graph.as_mut().unwrap().output.clear();
        let err = parse(&no_outputs.encode_to_vec()).unwrap_err().to_string();
        assert!(err.contains("no outputs"), "{err}");

        let mut no_graph = model.clone();
        no_graph.graph = None;
        let err = parse(&no_graph.encode_to_vec()).unwrap_err().to_string();
        assert!(err.contains("no graph"), "{err}");

        let mut complex = model.clone();
        complex.graph.as_mut().unwrap().output = vec![tensor("z", 14, vec![])];
        let err = parse(&complex.encode_to_vec()).unwrap_err().to_string();
        assert!(err.contains("\"z\"") && err.contains("COMPLEX64"), "{err}");
    }

    /// A file may be built to make the parser hold far more than its
    /// signature needs (many inputs, shapes of millions of dimensions):
    /// each is refused with a message, not decoded.
    #[test]
    fn hostile_signatures_are_refused_not_held_in_memory() {
        use onnx::tensor_shape_proto::{Dimension, dimension::Value as Dim};
        let tensor = |name: String, rank: usize| onnx::ValueInfoProto {
            name,
            r#type: Some(onnx::TypeProto {
                value: Some(onnx::type_proto::Value::TensorType(
                    onnx::type_proto::Tensor {
                        elem_type: 1,
                        shape: Some(onnx::TensorShapeProto {
                            dim: vec![
                                Dimension {
                                    value: Some(Dim::DimValue(1)),
                                    denotation: String::new(),
                                };
                                rank
                            ],
                        }),
                    },
                )),
                denotation: String::new(),
            }),
            doc_string: String::new(),
        };
        let model = |inputs: Vec<onnx::ValueInfoProto>| {
            onnx::ModelProto {
                ir_version: 8,
                graph: Some(onnx::GraphProto {
                    input: inputs,
                    output: vec![tensor("y".into(), 1)],
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        // Within the limits: 64 dimensions.
        assert!(parse(&model(vec![tensor("x".into(), 64)])).is_ok());
        let err = parse(&model(vec![tensor("x".into(), 65)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("65 dimensions"), "{err}");
        // One input of 500,000 dimensions (a few MB decoded per MB of file).
        let err = parse(&model(vec![tensor("x".into(), 500_000)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("too large"), "{err}");
        // 40,000 inputs of 50 dimensions each: each small, too many in all.
        let many = (0..40_000).map(|i| tensor(format!("x{i}"), 50)).collect();
        let err = parse(&model(many)).unwrap_err().to_string();
        assert!(err.contains("in all"), "{err}");
    }

    #[test]
    fn garbage_truncated_and_empty_files_are_rejected() {
        let err = parse(b"").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        for garbage in [
            b"hello, this is not a model\n".as_slice(),
            b"\x00\x00\x00\x00".as_slice(),
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".as_slice(),
            b"{\"json\": true}".as_slice(),
        ] {
            let err = parse(garbage).unwrap_err();
            assert!(matches!(err, OnnxError::Invalid(_)), "{garbage:?}: {err}");
            assert!(
                err.to_string().starts_with("not a valid ONNX model"),
                "{err}"
            );
        }
        // Pseudo-random bytes never pass.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        assert!(parse(&random).is_err());
        let model = fixture("conv");
        for cut in [1, 10, model.len() / 2, model.len() - 1] {
            let err = parse(&model[..cut]).unwrap_err().to_string();
            assert!(
                err.contains("not a valid ONNX model"),
                "cut at {cut}: {err}"
            );
        }
    }
}
