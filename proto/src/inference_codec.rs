//! The codec of `inference.GRPCInferenceService`: prost's, plus a check of a
//! `ModelInferRequest`'s wire bytes before prost decodes it.
//!
//! prost makes a whole default struct for every entry of a repeated field,
//! however few bytes the entry takes on the wire: `0x2a 0x00` (an empty
//! `inputs` entry) is 2 bytes on the wire and a ~300-byte `InferInputTensor`
//! decoded, so a message within any size limit may decode to 150 times its
//! size, all before a handler could look at it. The check walks the message
//! without allocating, adds up what it decodes to ([`Estimate`]) and refuses
//! it with RESOURCE_EXHAUSTED when that is over the server's request limit
//! plus [`STRUCTURE_ALLOWANCE`].
//!
//! tonic makes a codec per call through `Default`, so it cannot be handed
//! the limit: the server sets it, for its thread, around each poll of a
//! call's future ([`with_request_limit`]), within which tonic decodes the
//! request. Outside such a scope nothing is checked (a client decodes only
//! responses).

// The crate allows clippy's lints for the generated code; not here.
#![warn(clippy::all)]

use std::any::TypeId;
use std::cell::Cell;
use std::mem::size_of;

use prost::bytes::{Buf, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::inference::{InferParameter, ModelInferRequest};

/// What a request may count beyond the limit for what is not tensor data:
/// its structs, names, shapes and parameters. As much as the server allows
/// a message beyond the limit on the wire, so a request that fits that
/// never counts over this.
pub const STRUCTURE_ALLOWANCE: usize = 64 * 1024;

/// How the refusal's message starts (the status is RESOURCE_EXHAUSTED).
pub const OVER_LIMIT: &str = "ModelInferRequest over the limit of ";

thread_local! {
    /// The request limit of the server polling a call on this thread.
    static REQUEST_LIMIT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` (a poll of a server's call) with `limit` as the request limit
/// that a `ModelInferRequest` decoded within it is checked against.
pub fn with_request_limit<R>(limit: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            REQUEST_LIMIT.set(self.0);
        }
    }
    let _restore = Restore(REQUEST_LIMIT.replace(Some(limit)));
    f()
}

/// [`ProstCodec`] whose decoder checks a `ModelInferRequest` first.
#[derive(Debug, Clone)]
pub struct InferenceCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for InferenceCodec<T, U> {
    fn default() -> Self {
        InferenceCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for InferenceCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InferenceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InferenceDecoder(self.0.decoder())
    }
}

/// See [`InferenceCodec`].
#[derive(Debug, Clone)]
pub struct InferenceDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default + 'static> Decoder for InferenceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if TypeId::of::<U>() == TypeId::of::<ModelInferRequest>()
            && let Some(limit) = REQUEST_LIMIT.get()
        {
            // tonic hands the whole message in one contiguous buffer.
            debug_assert_eq!(buf.chunk().len(), buf.remaining());
            check_infer_request(buf.chunk(), limit)?;
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Refuses a `ModelInferRequest` whose decoded form counts over `limit`
/// plus [`STRUCTURE_ALLOWANCE`]. Malformed bytes pass: prost says what is
/// wrong with them, having decoded no more than the walk counted.
pub fn check_infer_request(wire: &[u8], limit: usize) -> Result<(), Status> {
    let budget = limit.saturating_add(STRUCTURE_ALLOWANCE);
    match walk(wire, budget) {
        Err(Stop::Over) => Err(Status::resource_exhausted(format!(
            "{OVER_LIMIT}{limit} bytes once decoded: its tensor data (as the limit counts it) \
             and the memory its other fields take (inputs, outputs, names, shapes, parameters) \
             come to over {budget} bytes"
        ))),
        Ok(_) | Err(Stop::Malformed) => Ok(()),
    }
}

/// What a `ModelInferRequest` decodes to, from its wire bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The bytes its decoded form takes: the request, a struct per entry
    /// of a repeated field or map, and what they own (strings, numbers,
    /// byte strings; `raw_input_contents` stay in the message's buffer,
    /// and count here for their length). Spare capacity of growing
    /// vectors and hash tables is not counted.
    pub memory: usize,
    /// The same, but tensor data as the least the agent's request limit
    /// may count it: `int_contents` and `uint_contents` elements 1 byte
    /// (`INT8`, `UINT8`), a `bytes_contents` element 4 bytes plus its
    /// length, as in `raw_input_contents`; every other element its size.
    pub counted: usize,
}

/// The estimate of a whole message; `None` if it is not a well-formed one.
pub fn estimate_infer_request(wire: &[u8]) -> Option<Estimate> {
    walk(wire, usize::MAX).ok()
}

fn walk(wire: &[u8], budget: usize) -> Result<Estimate, Stop> {
    let mut walk = Walk {
        wire,
        pos: 0,
        budget,
        estimate: Estimate::default(),
    };
    let request = size_of::<ModelInferRequest>();
    walk.charge(request, request)?;
    walk.message(Kind::Request, wire.len())?;
    Ok(walk.estimate)
}

/// Why a walk ended early.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The bytes are not a message prost would decode (from where the walk
    /// stopped on, prost decodes nothing: it fails there at the latest).
    Malformed,
    /// What was counted so far is over the budget.
    Over,
}

/// The messages of a `ModelInferRequest`.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Request,
    Input,
    Output,
    Contents,
    /// An entry of a `map<string, InferParameter>`.
    ParameterEntry,
    Parameter,
}

/// A field as the walk counts it.
enum Field {
    /// A string or bytes: `memory` bytes, of which the limit counts
    /// `counted`, beside its contents.
    Bytes { memory: usize, counted: usize },
    /// A message: `memory` bytes (0 when it is held inline) beside its fields.
    Message { kind: Kind, memory: usize },
    /// Numbers (packed or not), each `memory` bytes decoded, of which the
    /// limit counts `counted`.
    Numbers {
        wire: WireType,
        memory: usize,
        counted: usize,
    },
    /// Unknown, or a scalar held inline: skipped.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WireType {
    Varint = 0,
    Fixed64 = 1,
    Len = 2,
    StartGroup = 3,
    EndGroup = 4,
    Fixed32 = 5,
}

impl WireType {
    fn of(key: u64) -> Option<WireType> {
        Some(match key & 7 {
            0 => WireType::Varint,
            1 => WireType::Fixed64,
            2 => WireType::Len,
            3 => WireType::StartGroup,
            4 => WireType::EndGroup,
            5 => WireType::Fixed32,
            _ => return None,
        })
    }
}

/// The fields of `grpc_service.proto`'s request messages, and what each
/// decodes to in the generated types.
fn field(kind: Kind, tag: u64) -> Field {
    use Kind::*;
    let string = Field::Bytes {
        memory: 0,
        counted: 0,
    };
    let numbers = |wire, memory, counted| Field::Numbers {
        wire,
        memory,
        counted,
    };
    let parameters = Field::Message {
        kind: ParameterEntry,
        // The key and value, and the hash table's control byte.
        memory: size_of::<(String, InferParameter)>() + 1,
    };
    match (kind, tag) {
        // model_name, model_version, id; name, datatype; name; key; string_param.
        (Request, 1..=3) | (Input, 1 | 2) | (Output, 1) | (ParameterEntry, 1) | (Parameter, 3) => {
            string
        }
        (Request, 4) | (Input, 4) | (Output, 2) => parameters,
        (Request, 5) => Field::Message {
            kind: Input,
            memory: size_of::<InferInputTensor>(),
        },
        (Request, 6) => Field::Message {
            kind: Output,
            memory: size_of::<InferRequestedOutputTensor>(),
        },
        // raw_input_contents: a handle on the message's buffer.
        (Request, 7) => Field::Bytes {
            memory: size_of::<Bytes>(),
            counted: size_of::<Bytes>(),
        },
        // shape
        (Input, 3) => numbers(WireType::Varint, 8, 8),
        // contents, and a parameter's value: inline.
        (Input, 5) => Field::Message {
            kind: Contents,
            memory: 0,
        },
        (ParameterEntry, 2) => Field::Message {
            kind: Parameter,
            memory: 0,
        },
        // bool, int (INT8..INT32), int64, uint (UINT8..UINT32), uint64, fp32, fp64.
        (Contents, 1) => numbers(WireType::Varint, 1, 1),
        (Contents, 2 | 4) => numbers(WireType::Varint, 4, 1),
        (Contents, 3 | 5) => numbers(WireType::Varint, 8, 8),
        (Contents, 6) => numbers(WireType::Fixed32, 4, 4),
        (Contents, 7) => numbers(WireType::Fixed64, 8, 8),
        // bytes_contents: a vector each.
        (Contents, 8) => Field::Bytes {
            memory: size_of::<Vec<u8>>(),
            counted: 4,
        },
        _ => Field::Other,
    }
}

/// A walk over a message's wire bytes, as prost decodes them: a field may
/// run past the end of the message it is in, within the buffer (prost
/// decodes it, then fails).
struct Walk<'a> {
    wire: &'a [u8],
    pos: usize,
    budget: usize,
    estimate: Estimate,
}

impl Walk<'_> {
    fn charge(&mut self, memory: usize, counted: usize) -> Result<(), Stop> {
        let estimate = &mut self.estimate;
        estimate.memory = estimate.memory.saturating_add(memory);
        estimate.counted = estimate.counted.saturating_add(counted);
        if estimate.counted > self.budget {
            return Err(Stop::Over);
        }
        Ok(())
    }

    /// The fields of a message of `kind` up to `end`.
    fn message(&mut self, kind: Kind, end: usize) -> Result<(), Stop> {
        while self.pos < end {
            let key = self.varint()?;
            let wire_type = WireType::of(key).ok_or(Stop::Malformed)?;
            if key > u64::from(u32::MAX) || key >> 3 == 0 {
                return Err(Stop::Malformed);
            }
            match (field(kind, key >> 3), wire_type) {
                (Field::Bytes { memory, counted }, WireType::Len) => {
                    let len = self.len()?;
                    self.pos += len;
                    self.charge(memory.saturating_add(len), counted.saturating_add(len))?;
                }
                (Field::Message { kind, memory }, WireType::Len) => {
                    let len = self.len()?;
                    self.charge(memory, memory)?;
                    self.message(kind, self.pos + len)?;
                }
                (
                    Field::Numbers {
                        wire,
                        memory,
                        counted,
                    },
                    WireType::Len,
                ) => {
                    let len = self.len()?;
                    let packed = &self.wire[self.pos..self.pos + len];
                    let items = match wire {
                        // Each ends with a byte under 0x80; one that does
                        // not end here is read past the end.
                        WireType::Varint => {
                            packed.iter().filter(|&&byte| byte < 0x80).count()
                                + usize::from(packed.last().is_some_and(|&byte| byte >= 0x80))
                        }
                        WireType::Fixed32 => len.div_ceil(4),
                        _ => len.div_ceil(8),
                    };
                    self.pos += len;
                    self.charge(items.saturating_mul(memory), items.saturating_mul(counted))?;
                }
                (
                    Field::Numbers {
                        wire,
                        memory,
                        counted,
                    },
                    wire_type,
                ) if wire == wire_type => {
                    self.skip(wire_type)?;
                    self.charge(memory, counted)?;
                }
                // Unknown fields, and known ones of the wrong wire type
                // (which prost refuses).
                (_, wire_type) => self.skip(wire_type)?,
            }
        }
        if self.pos == end {
            Ok(())
        } else {
            Err(Stop::Malformed)
        }
    }

    fn varint(&mut self) -> Result<u64, Stop> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = *self.wire.get(self.pos).ok_or(Stop::Malformed)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(Stop::Malformed)
    }

    /// A length prefix, checked against the rest of the buffer.
    fn len(&mut self) -> Result<usize, Stop> {
        let len = self.varint()?;
        usize::try_from(len)
            .ok()
            .filter(|&len| len <= self.wire.len() - self.pos)
            .ok_or(Stop::Malformed)
    }

    fn advance(&mut self, len: usize) -> Result<(), Stop> {
        if len > self.wire.len() - self.pos {
            return Err(Stop::Malformed);
        }
        self.pos += len;
        Ok(())
    }

    /// Skips a field's value (a group, nested groups included, up to its end).
    fn skip(&mut self, wire_type: WireType) -> Result<(), Stop> {
        let mut depth = 0usize;
        let mut wire_type = wire_type;
        loop {
            match wire_type {
                WireType::Varint => {
                    self.varint()?;
                }
                WireType::Fixed64 => self.advance(8)?,
                WireType::Fixed32 => self.advance(4)?,
                WireType::Len => {
                    let len = self.len()?;
                    self.pos += len;
                }
                WireType::StartGroup => depth += 1,
                WireType::EndGroup => depth = depth.checked_sub(1).ok_or(Stop::Malformed)?,
            }
            if depth == 0 {
                return Ok(());
            }
            let key = self.varint()?;
            wire_type = WireType::of(key).ok_or(Stop::Malformed)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::InferTensorContents;
    use crate::inference::infer_parameter::ParameterChoice;
    use prost::Message;
    use std::collections::HashMap;

    /// The bytes `request` takes decoded, counted from the decoded struct
    /// as [`Estimate::memory`] counts them.
    fn decoded_memory(request: &ModelInferRequest) -> usize {
        fn parameters(map: &HashMap<String, InferParameter>) -> usize {
            map.iter()
                .map(|(key, value)| {
                    size_of::<(String, InferParameter)>()
                        + 1
                        + key.len()
                        + match &value.parameter_choice {
                            Some(ParameterChoice::StringParam(text)) => text.len(),
                            _ => 0,
                        }
                })
                .sum()
        }
        let contents = |contents: &InferTensorContents| {
            contents.bool_contents.len()
                + 4 * contents.int_contents.len()
                + 8 * contents.int64_contents.len()
                + 4 * contents.uint_contents.len()
                + 8 * contents.uint64_contents.len()
                + 4 * contents.fp32_contents.len()
                + 8 * contents.fp64_contents.len()
                + contents
                    .bytes_contents
                    .iter()
                    .map(|item| 24 + item.len())
                    .sum::<usize>()
        };
        size_of::<ModelInferRequest>()
            + request.model_name.len()
            + request.model_version.len()
            + request.id.len()
            + parameters(&request.parameters)
            + request
                .inputs
                .iter()
                .map(|input| {
                    size_of::<InferInputTensor>()
                        + input.name.len()
                        + input.datatype.len()
                        + 8 * input.shape.len()
                        + parameters(&input.parameters)
                        + input.contents.as_ref().map_or(0, contents)
                })
                .sum::<usize>()
            + request
                .outputs
                .iter()
                .map(|output| {
                    size_of::<InferRequestedOutputTensor>()
                        + output.name.len()
                        + parameters(&output.parameters)
                })
                .sum::<usize>()
            + request
                .raw_input_contents
                .iter()
                .map(|raw| size_of::<Bytes>() + raw.len())
                .sum::<usize>()
    }

    fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        }
    }

    fn typed(mut tensor: InferInputTensor, contents: InferTensorContents) -> InferInputTensor {
        tensor.contents = Some(contents);
        tensor
    }

    fn legit_requests() -> Vec<(&'static str, ModelInferRequest)> {
        let parameter = |text: &str| InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(text.into())),
        };
        vec![
            (
                "raw FP32 image",
                ModelInferRequest {
                    model_name: "resnet".into(),
                    id: "request-1".into(),
                    inputs: vec![input("image", "FP32", vec![1, 3, 224, 224])],
                    outputs: vec![InferRequestedOutputTensor {
                        name: "logits".into(),
                        parameters: HashMap::from([(
                            "binary_data".to_string(),
                            InferParameter {
                                parameter_choice: Some(ParameterChoice::BoolParam(true)),
                            },
                        )]),
                    }],
                    raw_input_contents: vec![vec![7u8; 3 * 224 * 224 * 4].into()],
                    ..Default::default()
                },
            ),
            (
                "every typed field",
                ModelInferRequest {
                    model_name: "all_types".into(),
                    model_version: "3".into(),
                    parameters: HashMap::from([("priority".to_string(), parameter("high"))]),
                    inputs: vec![
                        typed(
                            input("b", "BOOL", vec![3]),
                            InferTensorContents {
                                bool_contents: vec![true, false, true],
                                ..Default::default()
                            },
                        ),
                        typed(
                            input("i", "INT32", vec![4]),
                            InferTensorContents {
                                int_contents: vec![-1, 0, 1 << 20, i32::MIN],
                                ..Default::default()
                            },
                        ),
                        typed(
                            input("l", "INT64", vec![2]),
                            InferTensorContents {
                                int64_contents: vec![i64::MAX, -5],
                                ..Default::default()
                            },
                        ),
                        typed(
                            input("u", "UINT32", vec![2]),
                            InferTensorContents {
                                uint_contents: vec![0, u32::MAX],
                                ..Default::default()
                            },
                        ),
                        typed(
                            input("ul", "UINT64", vec![1]),
                            InferTensorContents {
                                uint64_contents: vec![u64::MAX],
                                ..Default::default()
                            },
                        ),
                        typed(
                            input("f", "FP32", vec![1000]),
                            InferTensorContents {
                                fp32_contents: vec![0.5; 1000],
                                ..Default::default()
                            },
                        ),
                        typed(
                            input("d", "FP64", vec![2]),
                            InferTensorContents {
                                fp64_contents: vec![0.25, -1e300],
                                ..Default::default()
                            },
                        ),
                        typed(
                            input("s", "BYTES", vec![3]),
                            InferTensorContents {
                                bytes_contents: vec![
                                    b"hello".to_vec(),
                                    Vec::new(),
                                    vec![b'x'; 300],
                                ],
                                ..Default::default()
                            },
                        ),
                    ],
                    outputs: vec![
                        InferRequestedOutputTensor {
                            name: "y".into(),
                            ..Default::default()
                        },
                        InferRequestedOutputTensor {
                            name: "z".into(),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
            ),
        ]
    }

    #[test]
    fn legit_requests_are_estimated_as_they_decode() {
        for (what, request) in legit_requests() {
            let wire = request.encode_to_vec();
            let decoded = ModelInferRequest::decode(wire.as_slice()).unwrap();
            let estimate = estimate_infer_request(&wire).expect(what);
            assert_eq!(estimate.memory, decoded_memory(&decoded), "{what}");
            assert!(estimate.counted <= estimate.memory, "{what}");
            assert!(
                check_infer_request(&wire, estimate.counted.saturating_sub(STRUCTURE_ALLOWANCE))
                    .is_ok(),
                "{what}"
            );
        }
    }

    /// The data of a request the agent accepts never counts for more than
    /// the agent counts it after decoding, whatever its datatype: the check
    /// refuses nothing the service would accept, but for more than the
    /// allowance in structure.
    #[test]
    fn tensor_data_counts_at_most_as_the_service_counts_it() {
        let limit = 1 << 20;
        for (datatype, contents, size) in [
            (
                "INT8",
                InferTensorContents {
                    int_contents: vec![-1; limit],
                    ..Default::default()
                },
                1,
            ),
            (
                "UINT8",
                InferTensorContents {
                    uint_contents: vec![255; limit],
                    ..Default::default()
                },
                1,
            ),
            (
                "BOOL",
                InferTensorContents {
                    bool_contents: vec![true; limit],
                    ..Default::default()
                },
                1,
            ),
            (
                "INT64",
                InferTensorContents {
                    int64_contents: vec![0; limit / 8],
                    ..Default::default()
                },
                8,
            ),
            (
                "FP64",
                InferTensorContents {
                    fp64_contents: vec![0.0; limit / 8],
                    ..Default::default()
                },
                8,
            ),
            (
                "BYTES",
                InferTensorContents {
                    bytes_contents: vec![Vec::new(); limit / 4],
                    ..Default::default()
                },
                4,
            ),
        ] {
            let request = ModelInferRequest {
                inputs: vec![typed(
                    input("x", datatype, vec![(limit / size) as i64]),
                    contents,
                )],
                ..Default::default()
            };
            let wire = request.encode_to_vec();
            check_infer_request(&wire, limit).unwrap_or_else(|err| panic!("{datatype}: {err}"));
            let estimate = estimate_infer_request(&wire).unwrap();
            assert!(estimate.counted >= limit, "{datatype}: {estimate:?}");
            // Just over the limit, with the allowance taken by structure.
            assert!(check_infer_request(&wire, limit - STRUCTURE_ALLOWANCE).is_err());
        }
    }

    /// Entries that take a byte or two on the wire and a struct each decoded.
    #[test]
    fn hostile_requests_are_estimated_as_large_as_they_decode() {
        let entries = 100_000;
        // One input whose shape is a zero per byte.
        let mut shape = vec![0x1a];
        shape.extend(varint(entries as u64));
        shape.extend(vec![0u8; entries]);
        let mut dims = vec![0x2a];
        dims.extend(varint(shape.len() as u64));
        dims.extend(shape);
        for (what, wire, each) in [
            (
                "empty inputs",
                [0x2a, 0x00].repeat(entries),
                size_of::<InferInputTensor>(),
            ),
            (
                "empty outputs",
                [0x32, 0x00].repeat(entries),
                size_of::<InferRequestedOutputTensor>(),
            ),
            (
                "empty raw contents",
                [0x3a, 0x00].repeat(entries),
                size_of::<Bytes>(),
            ),
            (
                "empty parameters",
                [0x22, 0x00].repeat(entries),
                size_of::<(String, InferParameter)>(),
            ),
            ("shape dimensions", dims, 8),
        ] {
            let decoded = ModelInferRequest::decode(wire.as_slice()).unwrap();
            let estimate = estimate_infer_request(&wire).expect(what);
            assert!(estimate.memory >= entries * each, "{what}: {estimate:?}");
            assert_eq!(estimate.counted, estimate.memory, "{what}: all structure");
            // Parameters with one key replace each other: the estimate
            // counts each, so it may only be larger.
            assert!(estimate.memory >= decoded_memory(&decoded), "{what}");
            let limit = wire.len();
            let err = check_infer_request(&wire, limit).expect_err(what);
            assert_eq!(err.code(), tonic::Code::ResourceExhausted);
            assert!(
                err.message()
                    .starts_with(&format!("{OVER_LIMIT}{limit} bytes")),
                "{}",
                err.message()
            );
        }
    }

    /// Typed contents that expand beyond what the limit counts them as:
    /// packed zeros, unpacked ones, empty byte strings.
    #[test]
    fn typed_contents_count_what_they_decode_to() {
        let elements = 100_000;
        let packed = |field: u8, item: &[u8]| {
            let body = item.repeat(elements);
            let mut fields = vec![field << 3 | 2];
            fields.extend(varint(body.len() as u64));
            fields.extend(body);
            input_contents(&fields)
        };
        let unpacked = |key: u8, item: &[u8]| {
            let mut field = vec![key];
            field.extend_from_slice(item);
            input_contents(&field.repeat(elements))
        };
        for (what, wire, memory_each, counted_each) in [
            ("packed int64 zeros", packed(3, &[0]), 8, 8),
            ("packed int32 zeros", packed(2, &[0]), 4, 1),
            ("packed uint32 zeros", packed(4, &[0]), 4, 1),
            ("packed bools", packed(1, &[1]), 1, 1),
            ("packed floats", packed(6, &[0, 0, 0, 0]), 4, 4),
            ("packed doubles", packed(7, &[0; 8]), 8, 8),
            ("unpacked int64 zeros", unpacked(3 << 3, &[0]), 8, 8),
            ("unpacked floats", unpacked(6 << 3 | 5, &[0; 4]), 4, 4),
            ("empty byte strings", unpacked(8 << 3 | 2, &[0]), 24, 4),
        ] {
            let decoded = ModelInferRequest::decode(wire.as_slice()).expect(what);
            let estimate = estimate_infer_request(&wire).expect(what);
            assert_eq!(estimate.memory, decoded_memory(&decoded), "{what}");
            let structure = size_of::<ModelInferRequest>() + size_of::<InferInputTensor>();
            assert_eq!(
                estimate.memory,
                elements * memory_each + structure,
                "{what}"
            );
            assert_eq!(
                estimate.counted,
                elements * counted_each + structure,
                "{what}"
            );
        }
    }

    /// `inputs { contents { <fields> } }`.
    fn input_contents(fields: &[u8]) -> Vec<u8> {
        let mut contents = vec![0x2a];
        contents.extend(varint(fields.len() as u64));
        contents.extend_from_slice(fields);
        let mut wire = vec![0x2a];
        wire.extend(varint(contents.len() as u64));
        wire.extend(contents);
        wire
    }

    fn varint(mut value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    /// Bytes prost refuses pass the check, so prost reports them; but what
    /// comes before them is counted, as prost would decode it first.
    #[test]
    fn malformed_bytes_are_left_to_prost_unless_over_the_limit_first() {
        for (what, wire) in [
            ("truncated length", vec![0x0a, 0x05, b'a']),
            ("wire type 7", vec![0x0f]),
            ("tag 0", vec![0x02, 0x00]),
            ("unterminated varint", vec![0x80; 11]),
            ("stray end group", vec![0x0c]),
            (
                "nested field past its message",
                vec![0x2a, 0x02, 0x0a, 0x05, 1, 2, 3, 4, 5],
            ),
        ] {
            assert!(
                ModelInferRequest::decode(wire.as_slice()).is_err(),
                "{what}: prost refuses it"
            );
            assert_eq!(estimate_infer_request(&wire), None, "{what}");
            assert!(check_infer_request(&wire, 0).is_ok(), "{what}");
        }
        let mut hostile = [0x2a, 0x00].repeat(1000);
        hostile.push(0x0f);
        assert!(check_infer_request(&hostile, 0).is_err());
        // Unknown fields, groups included, are skipped as prost skips them.
        let mut unknown = vec![0x7b, 0x08, 0x01, 0x7c, 0x79, 0, 0, 0, 0, 0, 0, 0, 0];
        unknown.extend([0x2a, 0x00]);
        let decoded = ModelInferRequest::decode(unknown.as_slice()).unwrap();
        assert_eq!(decoded.inputs.len(), 1);
        assert_eq!(
            estimate_infer_request(&unknown).unwrap().memory,
            decoded_memory(&decoded)
        );
    }

    /// The limit holds within its scope, on its thread, and is restored
    /// after it (a panic included).
    #[test]
    fn the_limit_holds_within_its_scope() {
        assert_eq!(REQUEST_LIMIT.get(), None);
        with_request_limit(1000, || {
            assert_eq!(REQUEST_LIMIT.get(), Some(1000));
            with_request_limit(5, || assert_eq!(REQUEST_LIMIT.get(), Some(5)));
            assert_eq!(REQUEST_LIMIT.get(), Some(1000));
            std::thread::spawn(|| assert_eq!(REQUEST_LIMIT.get(), None))
                .join()
                .unwrap();
        });
        let panicked = std::panic::catch_unwind(|| with_request_limit(7, || panic!("in a poll")));
        assert!(panicked.is_err());
        assert_eq!(REQUEST_LIMIT.get(), None);
    }
}
