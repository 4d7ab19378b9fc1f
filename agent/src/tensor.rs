//! Tensors as the agent sees them, independent of any protocol or runtime.
//!
//! Fixed-size element types are kept as little-endian bytes (`TensorData::Raw`):
//! that is what `raw_input_contents` carries, what batching concatenates and
//! what both runtimes read, so most requests never convert element by
//! element, and a request's payload is read where the decoder left it.
//! Strings (`BYTES`) are kept as one byte vector per element.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;

/// Element type, named as in the Open Inference Protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    /// Variable-length byte strings (ONNX `string`).
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    /// The protocol's name for this type (`FP32`, `INT64`, `BYTES`, ...).
    pub fn protocol_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn from_protocol_name(name: &str) -> Option<DataType> {
        DataType::ALL
            .into_iter()
            .find(|dtype| dtype.protocol_name() == name)
    }

    /// Bytes per element in raw form; `None` for variable-length `BYTES`.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.protocol_name())
    }
}

/// A tensor's elements.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Fixed-size elements, little-endian, row-major. `BOOL` is one byte (0/1).
    /// `Bytes`, so a request's payload is read where the protocol decoder
    /// left it and a batch's outputs are split without copying.
    Raw(Bytes),
    /// One entry per element, for `BYTES`.
    Bytes(Vec<Vec<u8>>),
}

impl TensorData {
    /// Fixed-size elements copied from a typed slice.
    pub fn from_values<T: bytemuck::Pod>(values: &[T]) -> TensorData {
        TensorData::Raw(Bytes::copy_from_slice(bytemuck::cast_slice(values)))
    }
}

/// A named tensor with a concrete shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// What is wrong with a tensor's data given its declared type and shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("shape {shape:?} has a negative dimension")]
    NegativeDimension { shape: Vec<i64> },
    #[error("shape {shape:?} has too many elements")]
    TooLarge { shape: Vec<i64> },
    #[error("expected {expected} elements for shape {shape:?}, got {actual}")]
    ElementCount {
        shape: Vec<i64>,
        expected: usize,
        actual: usize,
    },
    #[error("{actual} bytes is not a whole number of {dtype} elements ({size} bytes each)")]
    RaggedBytes {
        dtype: DataType,
        size: usize,
        actual: usize,
    },
    #[error("datatype {dtype} does not match the data given")]
    DataKind { dtype: DataType },
    #[error("shape {shape:?} has a dimension over {MAX_DIMENSION}")]
    DimensionTooLarge { shape: Vec<i64> },
    #[error("element {index} is not valid UTF-8 (BYTES tensors hold strings)")]
    NotUtf8 { index: usize },
}

/// The largest size of one dimension. No tensor a device serves comes near
/// it; without a cap, a shape with a zero-sized dimension holds no data
/// whatever its other dimensions say, so a tiny request could name a batch
/// of 2^62 rows (and stacked requests add their rows up).
pub const MAX_DIMENSION: i64 = i32::MAX as i64;

/// Number of elements of a shape, checking for negative dims, dims over
/// [`MAX_DIMENSION`] and overflow.
pub fn element_count(shape: &[i64]) -> Result<usize, TensorError> {
    let mut count: usize = 1;
    for &dim in shape {
        if dim > MAX_DIMENSION {
            return Err(TensorError::DimensionTooLarge {
                shape: shape.to_vec(),
            });
        }
        let dim = usize::try_from(dim).map_err(|_| TensorError::NegativeDimension {
            shape: shape.to_vec(),
        })?;
        count = count
            .checked_mul(dim)
            .ok_or_else(|| TensorError::TooLarge {
                shape: shape.to_vec(),
            })?;
    }
    Ok(count)
}

impl Tensor {
    /// A tensor whose fixed-size elements are given as a typed slice.
    pub fn from_slice<T: bytemuck::Pod>(
        name: impl Into<String>,
        dtype: DataType,
        shape: Vec<i64>,
        values: &[T],
    ) -> Tensor {
        debug_assert_eq!(dtype.element_size(), Some(std::mem::size_of::<T>()));
        Tensor {
            name: name.into(),
            dtype,
            shape,
            data: TensorData::from_values(values),
        }
    }

    /// Checks that the data holds exactly the elements the shape promises.
    /// Checks the data against the shape, and that `BYTES` elements are
    /// strings (both runtimes need UTF-8: caught here, a bad element fails
    /// its own request rather than the batch it would have joined).
    pub fn validate(&self) -> Result<(), TensorError> {
        let expected = element_count(&self.shape)?;
        let actual = self.len_elements()?;
        if actual != expected {
            return Err(TensorError::ElementCount {
                shape: self.shape.clone(),
                expected,
                actual,
            });
        }
        if let TensorData::Bytes(items) = &self.data
            && let Some(index) = items
                .iter()
                .position(|item| std::str::from_utf8(item).is_err())
        {
            return Err(TensorError::NotUtf8 { index });
        }
        Ok(())
    }

    /// Number of elements the data holds.
    pub fn len_elements(&self) -> Result<usize, TensorError> {
        match (&self.data, self.dtype.element_size()) {
            (TensorData::Raw(bytes), Some(size)) => {
                if bytes.len() % size != 0 {
                    return Err(TensorError::RaggedBytes {
                        dtype: self.dtype,
                        size,
                        actual: bytes.len(),
                    });
                }
                Ok(bytes.len() / size)
            }
            (TensorData::Bytes(items), None) => Ok(items.len()),
            _ => Err(TensorError::DataKind { dtype: self.dtype }),
        }
    }

    /// Bytes the tensor's elements occupy, as `raw_input_contents` carries
    /// them: `BYTES` elements with their 4-byte length prefix, so many empty
    /// strings still count against a request limit.
    pub fn byte_size(&self) -> usize {
        match &self.data {
            TensorData::Raw(bytes) => bytes.len(),
            TensorData::Bytes(items) => items.iter().map(|item| item.len() + 4).sum(),
        }
    }

    /// The bytes the tensor counts for against a request's size limit: its
    /// data's, or, when its shape has an empty dimension, what the shape
    /// would hold with that dimension at 1, if that is more. A shape such
    /// as `[2147483647, 0]` carries no data, but a model run on it may
    /// still make outputs of 2147483647 rows.
    /// (A shape with a negative dimension or one over [`MAX_DIMENSION`]
    /// counts its data alone: validation refuses it, saying why.)
    pub fn counted_size(&self) -> usize {
        let valid = |dim: &i64| (0..=MAX_DIMENSION).contains(dim);
        if !self.shape.contains(&0) || !self.shape.iter().all(valid) {
            return self.byte_size();
        }
        let unit = self.dtype.element_size().unwrap_or(4);
        let extent = self
            .shape
            .iter()
            .try_fold(unit, |size, &dim| {
                size.checked_mul(usize::try_from(dim.max(1)).ok()?)
            })
            .unwrap_or(usize::MAX);
        self.byte_size().max(extent)
    }

    /// `BOOL` elements as `bool`s (empty for other kinds of data).
    pub fn bools(&self) -> Vec<bool> {
        match &self.data {
            TensorData::Raw(bytes) => bytes.iter().map(|&b| b != 0).collect(),
            TensorData::Bytes(_) => Vec::new(),
        }
    }

    /// `BYTES` elements as strings, which both runtimes require to be UTF-8.
    pub fn utf8_strings(&self) -> Result<Vec<String>, String> {
        let TensorData::Bytes(items) = &self.data else {
            return Err(format!(
                "input '{}': BYTES tensor without byte strings",
                self.name
            ));
        };
        items
            .iter()
            .map(|item| {
                String::from_utf8(item.clone())
                    .map_err(|_| format!("input '{}': strings must be valid UTF-8", self.name))
            })
            .collect()
    }

    /// The fixed-size elements copied into a properly aligned vector (the
    /// same contract as [`Tensor::values`]).
    pub fn to_vec<T: bytemuck::Pod>(&self) -> Vec<T> {
        self.values().into_owned()
    }

    /// The fixed-size elements as a slice of `T`: the data in place when it
    /// is aligned for `T`, else an aligned copy.
    ///
    /// `T` must match the element size: callers dispatch on `dtype` first,
    /// on a tensor that passed [`Tensor::validate`] (a whole number of
    /// elements).
    pub fn values<T: bytemuck::Pod>(&self) -> Cow<'_, [T]> {
        match &self.data {
            TensorData::Raw(bytes) => match bytemuck::try_cast_slice(bytes) {
                Ok(values) => Cow::Borrowed(values),
                // Element by element into uninitialised capacity: no zero
                // fill first (`pod_collect_to_vec` writes every byte twice).
                Err(_) => Cow::Owned(
                    bytes
                        .chunks_exact(std::mem::size_of::<T>())
                        .map(bytemuck::pod_read_unaligned)
                        .collect(),
                ),
            },
            TensorData::Bytes(_) => Cow::Owned(Vec::new()),
        }
    }
}

/// Concatenates tensors of the same type along dimension 0.
///
/// The caller has checked that every tensor has the same dtype and the same
/// dimensions after the first.
pub fn concat_batch(name: &str, parts: &[&Tensor]) -> Tensor {
    let first = parts[0];
    let batch: i64 = parts.iter().map(|part| part.shape[0]).sum();
    let mut shape = first.shape.clone();
    shape[0] = batch;
    let data = match &first.data {
        TensorData::Raw(_) => {
            let total = parts.iter().map(|part| part.byte_size()).sum();
            let mut out = Vec::with_capacity(total);
            for part in parts {
                if let TensorData::Raw(bytes) = &part.data {
                    out.extend_from_slice(bytes);
                }
            }
            TensorData::Raw(out.into())
        }
        TensorData::Bytes(_) => {
            let mut out = Vec::new();
            for part in parts {
                if let TensorData::Bytes(items) = &part.data {
                    out.extend(items.iter().cloned());
                }
            }
            TensorData::Bytes(out)
        }
    };
    Tensor {
        name: name.to_string(),
        dtype: first.dtype,
        shape,
        data,
    }
}

/// Splits a batched tensor along dimension 0 into pieces of the given sizes.
///
/// Returns `None` if the tensor's first dimension is not the sum of `sizes`.
pub fn split_batch(tensor: Tensor, sizes: &[i64]) -> Option<Vec<Tensor>> {
    let total: i64 = sizes.iter().sum();
    if tensor.shape.first() != Some(&total) {
        return None;
    }
    let row_elements = element_count(&tensor.shape[1..]).ok()?;
    let mut pieces = Vec::with_capacity(sizes.len());
    let mut offset = 0usize;
    for &size in sizes {
        let rows = usize::try_from(size).ok()?;
        let mut shape = tensor.shape.clone();
        shape[0] = size;
        let data = match &tensor.data {
            TensorData::Raw(bytes) => {
                let width = row_elements * tensor.dtype.element_size()?;
                let range = offset * width..(offset + rows) * width;
                if range.end > bytes.len() {
                    return None;
                }
                TensorData::Raw(bytes.slice(range))
            }
            TensorData::Bytes(items) => {
                let piece = items.get(offset * row_elements..(offset + rows) * row_elements)?;
                TensorData::Bytes(piece.to_vec())
            }
        };
        pieces.push(Tensor {
            name: tensor.name.clone(),
            dtype: tensor.dtype,
            shape,
            data,
        });
        offset += rows;
    }
    Some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_round_trip() {
        for dtype in DataType::ALL {
            assert_eq!(
                DataType::from_protocol_name(dtype.protocol_name()),
                Some(dtype)
            );
        }
        assert_eq!(DataType::from_protocol_name("FLOAT"), None);
    }

    #[test]
    fn validate_rejects_wrong_element_count_and_ragged_bytes() {
        let ok = Tensor::from_slice("x", DataType::F32, vec![2, 2], &[1f32, 2., 3., 4.]);
        assert_eq!(ok.validate(), Ok(()));
        let short = Tensor::from_slice("x", DataType::F32, vec![2, 3], &[1f32, 2., 3., 4.]);
        assert!(matches!(
            short.validate(),
            Err(TensorError::ElementCount {
                expected: 6,
                actual: 4,
                ..
            })
        ));
        let ragged = Tensor {
            name: "x".into(),
            dtype: DataType::F32,
            shape: vec![1],
            data: TensorData::Raw(vec![0; 5].into()),
        };
        assert!(matches!(
            ragged.validate(),
            Err(TensorError::RaggedBytes { .. })
        ));
        let negative = Tensor::from_slice("x", DataType::F32, vec![-1], &[1f32]);
        assert!(matches!(
            negative.validate(),
            Err(TensorError::NegativeDimension { .. })
        ));
    }

    #[test]
    fn validate_caps_each_dimension_even_without_data() {
        let empty = |shape: Vec<i64>| Tensor::from_slice::<f32>("x", DataType::F32, shape, &[]);
        assert_eq!(empty(vec![MAX_DIMENSION, 0]).validate(), Ok(()));
        assert!(matches!(
            empty(vec![1 << 40, 0]).validate(),
            Err(TensorError::DimensionTooLarge { .. })
        ));
        assert!(matches!(
            empty(vec![0, i64::MAX]).validate(),
            Err(TensorError::DimensionTooLarge { .. })
        ));
    }

    #[test]
    fn validate_rejects_bytes_elements_that_are_not_utf8() {
        let strings = |items: Vec<Vec<u8>>| Tensor {
            name: "text".into(),
            dtype: DataType::Bytes,
            shape: vec![items.len() as i64],
            data: TensorData::Bytes(items),
        };
        assert_eq!(
            strings(vec![
                b"ok".to_vec(),
                "gr\u{fc}n".as_bytes().to_vec(),
                vec![]
            ])
            .validate(),
            Ok(())
        );
        assert_eq!(
            strings(vec![b"ok".to_vec(), vec![b'a', 0xff]]).validate(),
            Err(TensorError::NotUtf8 { index: 1 })
        );
    }

    /// `values` as F32 bytes `offset` bytes past a 4-byte aligned start.
    fn f32_tensor_at(values: &[f32], offset: usize) -> Tensor {
        struct Words(Vec<u32>);
        impl AsRef<[u8]> for Words {
            fn as_ref(&self) -> &[u8] {
                bytemuck::cast_slice(&self.0)
            }
        }
        let mut words = vec![0u32; values.len() + 1];
        let len = values.len() * 4;
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[offset..offset + len]
            .copy_from_slice(bytemuck::cast_slice(values));
        Tensor {
            name: "x".into(),
            dtype: DataType::F32,
            shape: vec![values.len() as i64],
            data: TensorData::Raw(Bytes::from_owner(Words(words)).slice(offset..offset + len)),
        }
    }

    #[test]
    fn values_are_borrowed_when_aligned_and_copied_when_not() {
        let values = [1.5f32, -2.0, 3.25];
        let aligned = f32_tensor_at(&values, 4);
        assert!(matches!(aligned.values::<f32>(), Cow::Borrowed(_)));
        assert_eq!(&*aligned.values::<f32>(), &values);
        for offset in 1..4 {
            let misaligned = f32_tensor_at(&values, offset);
            assert!(matches!(misaligned.values::<f32>(), Cow::Owned(_)));
            assert_eq!(&*misaligned.values::<f32>(), &values);
        }
    }

    #[test]
    fn concat_then_split_restores_each_part() {
        let a = Tensor::from_slice("x", DataType::I64, vec![1, 2], &[1i64, 2]);
        let b = Tensor::from_slice("x", DataType::I64, vec![2, 2], &[3i64, 4, 5, 6]);
        let batched = concat_batch("x", &[&a, &b]);
        assert_eq!(batched.shape, vec![3, 2]);
        assert_eq!(batched.to_vec::<i64>(), vec![1, 2, 3, 4, 5, 6]);
        let parts = split_batch(batched, &[1, 2]).unwrap();
        assert_eq!(parts, vec![a, b]);
    }

    #[test]
    fn split_refuses_a_batch_of_the_wrong_size() {
        let t = Tensor::from_slice("x", DataType::F32, vec![3], &[1f32, 2., 3.]);
        assert!(split_batch(t, &[1, 1]).is_none());
    }

    #[test]
    fn strings_concat_and_split() {
        let a = Tensor {
            name: "s".into(),
            dtype: DataType::Bytes,
            shape: vec![1],
            data: TensorData::Bytes(vec![b"a".to_vec()]),
        };
        let b = Tensor {
            name: "s".into(),
            dtype: DataType::Bytes,
            shape: vec![2],
            data: TensorData::Bytes(vec![b"b".to_vec(), b"c".to_vec()]),
        };
        let batched = concat_batch("s", &[&a, &b]);
        assert_eq!(split_batch(batched, &[1, 2]).unwrap(), vec![a, b]);
    }
}
