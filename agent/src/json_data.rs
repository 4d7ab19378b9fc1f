//! The `data` of a tensor in the Open Inference Protocol's JSON form,
//! decoded straight into the tensor's typed elements and encoded from them.
//!
//! A request's `data` is a flat list or row-major nested lists of numbers,
//! booleans or strings. Parsing it into a `serde_json::Value` tree first would
//! cost about 20 bytes of memory per byte of numbers (a 32-byte `Value` for
//! each element, and a vector for each nested list), 1.3 GB for a 64 MiB
//! body; here each element is parsed from the request's text into its place
//! in the tensor: 4 bytes for an `FP32` element, whatever it was written as.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{Serialize, Serializer};

use crate::tensor::{DataType, Tensor, TensorData};

/// The memory a request's elements decoded from JSON may take, shared by
/// its inputs, counted as each element is decoded: its size, for a `BYTES`
/// element its vector (24 bytes) and its length. A list of empty strings
/// takes 3 bytes of text and 24 of memory an element: it is refused once
/// over the limit, not after it has all been decoded.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    left: usize,
    exceeded: bool,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            left: limit,
            exceeded: false,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether an element was refused for want of room (the decoder's
    /// error then says no more than that).
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    fn take(&mut self, bytes: usize) -> bool {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                true
            }
            None => {
                self.exceeded = true;
                false
            }
        }
    }
}

/// Decodes `data` (any serde deserializer over JSON: a request's raw text,
/// or a parsed `Value`) as elements of `dtype`, written straight into the
/// tensor's buffer, each taken from `budget` (an error once it is spent).
/// The buffer is sized up front for `expected` elements (the count the
/// shape gives), but for no more than a list of `text_len` bytes can hold
/// (each element takes a character and a separator, a string two quotes
/// and a separator) nor the budget allows: a shape cannot make it reserve
/// more than the data could fill, and a true one spares the buffer from
/// growing while it fills.
pub fn decode<'de, D: Deserializer<'de>>(
    dtype: DataType,
    data: D,
    expected: usize,
    text_len: usize,
    budget: &mut Budget,
) -> Result<TensorData, D::Error> {
    let min_width = if dtype == DataType::Bytes { 3 } else { 2 };
    let element = dtype
        .element_size()
        .unwrap_or(std::mem::size_of::<Vec<u8>>());
    let capacity = expected
        .min(text_len / min_width + 1)
        .min((budget.left / element).saturating_add(1));
    fn raw<'de, T: Element + bytemuck::Pod, D: Deserializer<'de>>(
        dtype: DataType,
        data: D,
        capacity: usize,
        budget: &mut Budget,
    ) -> Result<TensorData, D::Error> {
        let size = std::mem::size_of::<T>();
        let mut out = Vec::<u8>::with_capacity(capacity.saturating_mul(size));
        let push: fn(&mut Vec<u8>, T) =
            |out, value| out.extend_from_slice(bytemuck::bytes_of(&value));
        Flat::new(dtype, &mut out, push, budget).deserialize(data)?;
        Ok(TensorData::Raw(out.into()))
    }
    match dtype {
        DataType::Bool => {
            let mut out = Vec::<u8>::with_capacity(capacity);
            let push: fn(&mut Vec<u8>, bool) = |out, value| out.push(u8::from(value));
            Flat::new(dtype, &mut out, push, budget).deserialize(data)?;
            Ok(TensorData::Raw(out.into()))
        }
        DataType::U8 => raw::<u8, D>(dtype, data, capacity, budget),
        DataType::U16 => raw::<u16, D>(dtype, data, capacity, budget),
        DataType::U32 => raw::<u32, D>(dtype, data, capacity, budget),
        DataType::U64 => raw::<u64, D>(dtype, data, capacity, budget),
        DataType::I8 => raw::<i8, D>(dtype, data, capacity, budget),
        DataType::I16 => raw::<i16, D>(dtype, data, capacity, budget),
        DataType::I32 => raw::<i32, D>(dtype, data, capacity, budget),
        DataType::I64 => raw::<i64, D>(dtype, data, capacity, budget),
        DataType::F16 => raw::<half::f16, D>(dtype, data, capacity, budget),
        DataType::F32 => raw::<f32, D>(dtype, data, capacity, budget),
        DataType::F64 => raw::<f64, D>(dtype, data, capacity, budget),
        DataType::Bytes => {
            let mut out = Vec::<Vec<u8>>::with_capacity(capacity);
            Flat::new(dtype, &mut out, Vec::push, budget).deserialize(data)?;
            Ok(TensorData::Bytes(out))
        }
    }
}

/// What one JSON scalar may become; `None` refuses it (out of range, or the
/// wrong kind for the datatype).
trait Element: Sized {
    /// The memory the element takes in the tensor.
    fn memory(&self) -> usize {
        std::mem::size_of::<Self>()
    }
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
    fn from_str(_: &str) -> Option<Self> {
        None
    }
}

impl Element for bool {
    fn from_bool(value: bool) -> Option<Self> {
        Some(value)
    }
}

macro_rules! integer_element {
    ($($ty:ty),*) => {$(
        impl Element for $ty {
            fn from_i64(value: i64) -> Option<Self> {
                <$ty>::try_from(value).ok()
            }
            fn from_u64(value: u64) -> Option<Self> {
                <$ty>::try_from(value).ok()
            }
        }
    )*};
}
integer_element!(u8, u16, u32, u64, i8, i16, i32, i64);

/// A number too large for the datatype is refused, not made infinite (1e39
/// for FP32, 70000 for FP16); one too small for it rounds to zero, as any
/// conversion rounds.
macro_rules! float_element {
    ($($ty:ty => $from_f64:expr),*) => {$(
        impl Element for $ty {
            fn from_i64(value: i64) -> Option<Self> {
                <Self as Element>::from_f64(value as f64)
            }
            fn from_u64(value: u64) -> Option<Self> {
                <Self as Element>::from_f64(value as f64)
            }
            fn from_f64(value: f64) -> Option<Self> {
                let converted: $ty = $from_f64(value);
                converted.is_finite().then_some(converted)
            }
            fn from_str(value: &str) -> Option<Self> {
                NON_FINITE
                    .iter()
                    .find(|&&(_, token, _)| token == value)
                    .map(|&(value, _, _)| $from_f64(value))
            }
        }
    )*};
}
float_element!(
    f32 => |value: f64| value as f32,
    f64 => |value: f64| value,
    half::f16 => half::f16::from_f64
);

impl Element for Vec<u8> {
    fn memory(&self) -> usize {
        std::mem::size_of::<Self>() + self.len()
    }

    fn from_str(value: &str) -> Option<Self> {
        Some(value.as_bytes().to_vec())
    }
}

/// Appends every scalar of a value, nested lists flattened in row-major
/// order, to `out` with `push`, each taken from `budget`.
struct Flat<'v, T, O> {
    dtype: DataType,
    out: &'v mut O,
    push: fn(&mut O, T),
    budget: &'v mut Budget,
}

impl<'v, T: Element, O> Flat<'v, T, O> {
    fn new(dtype: DataType, out: &'v mut O, push: fn(&mut O, T), budget: &'v mut Budget) -> Self {
        Flat {
            dtype,
            out,
            push,
            budget,
        }
    }

    fn push<E: de::Error>(self, value: Option<T>, shown: impl fmt::Display) -> Result<(), E> {
        match value {
            Some(value) => {
                if !self.budget.take(value.memory()) {
                    return Err(E::custom(format_args!(
                        "over the limit of {} bytes",
                        self.budget.limit
                    )));
                }
                (self.push)(self.out, value);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "{shown} is not a valid {} value",
                self.dtype
            ))),
        }
    }
}

impl<'de, T: Element, O> DeserializeSeed<'de> for Flat<'_, T, O> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, data: D) -> Result<(), D::Error> {
        data.deserialize_any(self)
    }
}

impl<'de, T: Element, O> Visitor<'de> for Flat<'_, T, O> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} values, in a list or nested lists", self.dtype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let (dtype, out, push, budget) = (self.dtype, self.out, self.push, self.budget);
        while items
            .next_element_seed(Flat::new(dtype, &mut *out, push, &mut *budget))?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        self.push(T::from_bool(value), value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.push(T::from_i64(value), value)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.push(T::from_u64(value), value)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        // Debug: `1e300`, not three hundred digits.
        self.push(T::from_f64(value), format_args!("{value:?}"))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        self.push(T::from_str(value), format_args!("{value:?}"))
    }
}

/// The values JSON has no number for, as Triton writes and reads them
/// (rapidjson's `kWriteNanAndInfFlag`, `kParseNanAndInfFlag`; Python's
/// `json` too), and the `i128` a [`JsonData`] serializes each as, which
/// [`to_json`] writes as the token (nothing else in a response is an `i128`).
const NON_FINITE: [(f64, &str, i128); 3] = [
    (f64::NAN, "NaN", i128::MIN),
    (f64::INFINITY, "Infinity", i128::MIN + 1),
    (f64::NEG_INFINITY, "-Infinity", i128::MIN + 2),
];

/// `json` with each `NaN`, `Infinity` and `-Infinity` token (not JSON,
/// but what Triton's clients send for those values) outside a string made a
/// string, which float data takes as that value; `None` if it has none.
/// For a request serde_json refused: no other request pays for the scan.
pub fn quote_non_finite(json: &[u8]) -> Option<Vec<u8>> {
    let (mut out, mut copied, mut i) = (Vec::new(), 0, 0);
    let (mut in_string, mut escaped) = (false, false);
    while let Some(&byte) = json.get(i) {
        i += 1;
        if in_string {
            (in_string, escaped) = (escaped || byte != b'"', !escaped && byte == b'\\');
        } else if byte == b'"' {
            in_string = true;
        } else if let Some((_, token, _)) = NON_FINITE
            .iter()
            .find(|(_, token, _)| json[i - 1..].starts_with(token.as_bytes()))
        {
            out.extend_from_slice(&json[copied..i - 1]);
            out.extend_from_slice(format!("\"{token}\"").as_bytes());
            i += token.len() - 1;
            copied = i;
        }
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&json[copied..]);
    Some(out)
}

/// serde_json's compact JSON, but with the `i128`s a [`JsonData`] writes for
/// NaN and the infinities written as Triton writes those (serde_json writes
/// `null`, which clients read as NaN, losing the infinities).
struct NonFiniteTokens;

impl serde_json::ser::Formatter for NonFiniteTokens {
    fn write_i128<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: i128,
    ) -> std::io::Result<()> {
        match NON_FINITE.iter().find(|&&(_, _, marker)| marker == value) {
            Some((_, token, _)) => writer.write_all(token.as_bytes()),
            None => serde_json::ser::CompactFormatter.write_i128(writer, value),
        }
    }
}

/// `value` as JSON, the [`JsonData`] in it with `NaN`, `Infinity` and
/// `-Infinity` for those values.
pub fn to_json<T: Serialize>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    value.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out,
        NonFiniteTokens,
    ))?;
    Ok(out)
}

/// A float element: a finite one as serde writes it, NaN or an infinity as
/// its `i128` in [`NON_FINITE`].
struct Float<T>(T);

impl<T: Serialize + Copy + Into<f64>> Serialize for Float<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let value: f64 = self.0.into();
        if value.is_finite() {
            return self.0.serialize(serializer);
        }
        let which = if value.is_nan() {
            0
        } else {
            1 + usize::from(value < 0.0)
        };
        serializer.serialize_i128(NON_FINITE[which].2)
    }
}

/// A tensor's elements as one flat JSON list, serialized from the typed
/// elements as they are written (no `Value` per element). Serialized by
/// [`to_json`], a float element that is NaN or infinite is `NaN`,
/// `Infinity` or `-Infinity`; other serializers get an `i128` for it.
pub struct JsonData<'t>(pub &'t Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn numbers<T, S>(tensor: &Tensor, serializer: S) -> Result<S::Ok, S::Error>
        where
            T: bytemuck::Pod + Serialize,
            S: Serializer,
        {
            serializer.collect_seq(tensor.values::<T>().iter())
        }
        let tensor = self.0;
        match (tensor.dtype, &tensor.data) {
            (DataType::Bool, TensorData::Raw(bytes)) => {
                serializer.collect_seq(bytes.iter().map(|&byte| byte != 0))
            }
            (DataType::Bytes, TensorData::Bytes(items)) => {
                serializer.collect_seq(items.iter().map(|item| String::from_utf8_lossy(item)))
            }
            (DataType::Bool | DataType::Bytes, _) => {
                serializer.collect_seq(std::iter::empty::<u8>())
            }
            (DataType::U8, _) => numbers::<u8, S>(tensor, serializer),
            (DataType::U16, _) => numbers::<u16, S>(tensor, serializer),
            (DataType::U32, _) => numbers::<u32, S>(tensor, serializer),
            (DataType::U64, _) => numbers::<u64, S>(tensor, serializer),
            (DataType::I8, _) => numbers::<i8, S>(tensor, serializer),
            (DataType::I16, _) => numbers::<i16, S>(tensor, serializer),
            (DataType::I32, _) => numbers::<i32, S>(tensor, serializer),
            (DataType::I64, _) => numbers::<i64, S>(tensor, serializer),
            (DataType::F16, _) => serializer.collect_seq(
                tensor
                    .values::<half::f16>()
                    .iter()
                    .map(|value| Float(value.to_f32())),
            ),
            (DataType::F32, _) => {
                serializer.collect_seq(tensor.values::<f32>().iter().map(|&v| Float(v)))
            }
            (DataType::F64, _) => {
                serializer.collect_seq(tensor.values::<f64>().iter().map(|&v| Float(v)))
            }
        }
    }
}
