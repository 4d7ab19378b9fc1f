//! tract (`tract-onnx` 0.23), pure Rust: always compiled in, no native
//! dependency. Symbolic dimensions (a dynamic batch `N`) stay symbolic, so
//! one plan serves every batch size.

use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoTensor, Symbol, SymbolValues, TDim, TValue, TVec,
    Tensor as TractTensor, TypedModel, TypedRunnableModel, TypedSimpleState, tract_ndarray,
};

use super::{
    ModelSession, RunMemory, RunPhases, Runtime, RuntimeError, RuntimeKind, SessionOptions,
    Signature, TensorSpec,
};
use crate::tensor::{DataType, Tensor, TensorData};

/// tract, pure Rust.
#[derive(Debug, Clone, Default)]
pub struct TractRuntime;

impl TractRuntime {
    pub fn new() -> TractRuntime {
        TractRuntime
    }
}

fn load_error(message: String) -> RuntimeError {
    RuntimeError::Load {
        runtime: RuntimeKind::Tract,
        message,
    }
}

fn run_error(err: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Run {
        runtime: RuntimeKind::Tract,
        message: err.to_string(),
    }
}

fn data_type(name: &str, datum: DatumType) -> Result<DataType, RuntimeError> {
    Ok(match datum {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::I8 => DataType::I8,
        DatumType::I16 => DataType::I16,
        DatumType::I32 => DataType::I32,
        // tract computes some integer results (sizes, counts) as symbolic
        // dimensions; they leave the runtime as INT64.
        DatumType::I64 | DatumType::TDim => DataType::I64,
        DatumType::F16 => DataType::F16,
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        DatumType::String => DataType::Bytes,
        other => {
            return Err(RuntimeError::UnsupportedType {
                name: name.to_string(),
                detail: format!("tract datum type {other:?} is not in the Open Inference Protocol"),
            });
        }
    })
}

fn signature(model: &TypedModel, names: (&[String], &[String])) -> Result<Signature, RuntimeError> {
    let spec =
        |name: &str, fact: &tract_onnx::prelude::TypedFact| -> Result<TensorSpec, RuntimeError> {
            Ok(TensorSpec {
                name: name.to_string(),
                dtype: data_type(name, fact.datum_type)?,
                shape: fact
                    .shape
                    .iter()
                    .map(|dim| dim.as_i64().unwrap_or(-1))
                    .collect(),
                // tract types every input before serving, so it never has
                // one of unknown rank: it refuses to load such a model.
                unknown_rank: false,
                dim_names: fact
                    .shape
                    .iter()
                    .map(|dim| match dim.as_i64() {
                        Some(_) => String::new(),
                        None => dim.to_string(),
                    })
                    .collect(),
            })
        };
    let mut inputs = Vec::new();
    for (i, name) in names.0.iter().enumerate() {
        inputs.push(spec(
            name,
            model
                .input_fact(i)
                .map_err(|e| load_error(format!("{e:#}")))?,
        )?);
    }
    let mut outputs = Vec::new();
    for (i, name) in names.1.iter().enumerate() {
        outputs.push(spec(
            name,
            model
                .output_fact(i)
                .map_err(|e| load_error(format!("{e:#}")))?,
        )?);
    }
    Ok(Signature { inputs, outputs })
}

impl Runtime for TractRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Tract
    }

    fn load(
        &self,
        model_path: &Path,
        _options: &SessionOptions,
    ) -> Result<Box<dyn ModelSession>, RuntimeError> {
        if let Err(source) = std::fs::metadata(model_path) {
            return Err(RuntimeError::Io {
                path: model_path.to_path_buf(),
                source,
            });
        }
        let model = tract_onnx::onnx()
            .model_for_path(model_path)
            .map_err(|err| load_error(format!("{err:#}")))?;
        // ONNX names of the graph inputs and outputs, before optimisation renames nodes.
        let label = |outlet: tract_onnx::prelude::OutletId| {
            model
                .outlet_label(outlet)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(outlet.node).name.clone())
        };
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(|e| load_error(format!("{e:#}")))?
            .iter()
            .map(|&o| label(o))
            .collect();
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(|e| load_error(format!("{e:#}")))?
            .iter()
            .map(|&o| label(o))
            .collect();
        let optimized = model
            .into_optimized()
            .map_err(|err| load_error(format!("{err:#}")))?;
        let signature = signature(&optimized, (&input_names, &output_names))?;
        let dim_guard = DimGuard::of(&optimized).map_err(|err| load_error(format!("{err:#}")))?;
        let plan: Arc<TypedRunnableModel> =
            tract_onnx::prelude::IntoRunnable::into_runnable(optimized)
                .map_err(|err| load_error(format!("{err:#}")))?;
        let state = TypedSimpleState::new(&plan).map_err(|err| load_error(format!("{err:#}")))?;
        Ok(Box::new(TractSession {
            plan,
            state,
            signature,
            dim_guard,
        }))
    }
}

struct TractSession {
    plan: Arc<TypedRunnableModel>,
    state: TypedSimpleState,
    signature: Signature,
    dim_guard: DimGuard,
}

/// The dimensions of every value inside a model that depend on its inputs'
/// dynamic dimensions (`H - 2` after a 3x3 convolution without padding), to
/// refuse an input they would make negative before tract runs it: tract
/// does not check, and computes such a convolution out of bounds until the
/// process dies of SIGSEGV (tract-onnx 0.23, a 1x1 image into a 3x3
/// kernel). A request must not take the agent down.
struct DimGuard {
    /// Per input, per axis, the symbol the axis binds (`N`, `H`), if any.
    inputs: Vec<Vec<Option<Symbol>>>,
    /// The distinct symbolic dimensions, each with the first node it is a
    /// dimension of.
    dims: Vec<(TDim, String)>,
}

impl DimGuard {
    fn of(model: &TypedModel) -> tract_onnx::prelude::TractResult<DimGuard> {
        let inputs = model
            .input_outlets()?
            .iter()
            .map(|&outlet| {
                let fact = model.outlet_fact(outlet)?;
                Ok(fact
                    .shape
                    .iter()
                    .map(|dim| match dim {
                        TDim::Sym(symbol) => Some(symbol.clone()),
                        _ => None,
                    })
                    .collect())
            })
            .collect::<tract_onnx::prelude::TractResult<_>>()?;
        let mut seen = std::collections::HashSet::new();
        let mut dims = Vec::new();
        for node in model.nodes() {
            for output in &node.outputs {
                for dim in output.fact.shape.iter() {
                    if dim.as_i64().is_none() && seen.insert(dim.clone()) {
                        dims.push((dim.clone(), node.name.clone()));
                    }
                }
            }
        }
        Ok(DimGuard { inputs, dims })
    }

    /// An error if `inputs` would give a value inside the model a negative
    /// dimension.
    fn check(&self, inputs: &[Tensor]) -> Result<(), RuntimeError> {
        if self.dims.is_empty() {
            return Ok(());
        }
        let mut values = SymbolValues::default();
        for (axes, tensor) in self.inputs.iter().zip(inputs) {
            for (symbol, &size) in axes.iter().zip(&tensor.shape) {
                if let Some(symbol) = symbol {
                    values.set(symbol, size);
                }
            }
        }
        for (dim, node) in &self.dims {
            if let Some(size) = dim.eval(&values).as_i64()
                && size < 0
            {
                return Err(run_error(format!(
                    "the input is too small for the model: node '{node}' would have a dimension \
                     of {size} ({dim})"
                )));
            }
        }
        Ok(())
    }
}

impl TractSession {
    /// Runs the plan; after a run that failed or panicked (the panic goes
    /// on to the caller, which reports it), starts from a fresh state: a
    /// run cut short leaves what it resolved for the model's symbolic
    /// dimensions in the state, and every later run with other dimensions
    /// would fail on the clash.
    fn run_plan(&mut self, values: TVec<TValue>) -> Result<TVec<TValue>, RuntimeError> {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.state.run(values)));
        if !matches!(ran, Ok(Ok(_))) {
            match TypedSimpleState::new(&self.plan) {
                Ok(state) => self.state = state,
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "cannot reset the tract state")
                }
            }
        }
        match ran {
            Ok(outputs) => outputs.map_err(|err| run_error(format!("{err:#}"))),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn dims(tensor: &Tensor) -> Result<Vec<usize>, RuntimeError> {
    tensor
        .shape
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| run_error(format!("negative dimension in {:?}", tensor.shape)))
        })
        .collect()
}

fn typed<T: bytemuck::Pod + tract_onnx::prelude::Datum>(
    tensor: &Tensor,
) -> Result<TractTensor, RuntimeError> {
    TractTensor::from_shape::<T>(&dims(tensor)?, &tensor.values::<T>()).map_err(run_error)
}

fn to_tract(tensor: &Tensor) -> Result<TractTensor, RuntimeError> {
    match tensor.dtype {
        DataType::Bool => {
            TractTensor::from_shape::<bool>(&dims(tensor)?, &tensor.bools()).map_err(run_error)
        }
        DataType::U8 => typed::<u8>(tensor),
        DataType::U16 => typed::<u16>(tensor),
        DataType::U32 => typed::<u32>(tensor),
        DataType::U64 => typed::<u64>(tensor),
        DataType::I8 => typed::<i8>(tensor),
        DataType::I16 => typed::<i16>(tensor),
        DataType::I32 => typed::<i32>(tensor),
        DataType::I64 => typed::<i64>(tensor),
        DataType::F16 => typed::<half::f16>(tensor),
        DataType::F32 => typed::<f32>(tensor),
        DataType::F64 => typed::<f64>(tensor),
        DataType::Bytes => {
            let strings = tensor.utf8_strings().map_err(run_error)?;
            let array =
                tract_ndarray::ArrayD::from_shape_vec(dims(tensor)?, strings).map_err(run_error)?;
            Ok(array.into_tensor())
        }
    }
}

fn from_tract(name: &str, value: &TractTensor) -> Result<Tensor, RuntimeError> {
    let dtype = data_type(name, value.datum_type()).map_err(|err| run_error(err.to_string()))?;
    let shape: Vec<i64> = value.shape().iter().map(|&d| d as i64).collect();
    let data = match dtype {
        DataType::Bytes => {
            let view = value.to_plain_array_view::<String>().map_err(run_error)?;
            TensorData::Bytes(view.iter().map(|s| s.as_bytes().to_vec()).collect())
        }
        DataType::Bool => {
            let view = value.to_plain_array_view::<bool>().map_err(run_error)?;
            TensorData::Raw(view.iter().map(|&b| u8::from(b)).collect())
        }
        _ if value.datum_type() == DatumType::TDim => {
            let cast = value.cast_to::<i64>().map_err(run_error)?;
            TensorData::Raw(Bytes::copy_from_slice(cast.as_bytes()))
        }
        _ => TensorData::Raw(Bytes::copy_from_slice(value.as_bytes())),
    };
    Ok(Tensor {
        name: name.to_string(),
        dtype,
        shape,
        data,
    })
}

impl ModelSession for TractSession {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn run_phased(
        &mut self,
        inputs: Vec<Tensor>,
        phases: &mut RunPhases,
        _memory: RunMemory,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let values: TVec<TValue> = RunPhases::timed(&mut phases.input, || {
            self.dim_guard.check(&inputs)?;
            inputs
                .iter()
                .map(|tensor| to_tract(tensor).map(TValue::from))
                .collect::<Result<_, _>>()
        })?;
        let outputs = self.run_plan(values)?;
        if outputs.len() != self.signature.outputs.len() {
            return Err(run_error(format!(
                "the model produced {} outputs, its signature has {}",
                outputs.len(),
                self.signature.outputs.len()
            )));
        }
        RunPhases::timed(&mut phases.output, || {
            outputs
                .iter()
                .zip(&self.signature.outputs)
                .map(|(value, spec)| from_tract(&spec.name, value))
                .collect()
        })
    }
}
