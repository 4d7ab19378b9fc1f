//! ONNX Runtime through `ort` (2.0.0-rc.14, `load-dynamic`).
//!
//! The native library is loaded at run time, once per process, from the path
//! [`find_onnxruntime_library`] returns; `ort` allows one environment per
//! process, so every [`OnnxRuntime`] shares it.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, TensorRef, ValueType};

use super::{
    ModelSession, RunMemory, RunPhases, Runtime, RuntimeError, RuntimeKind, SessionOptions,
    Signature, TensorSpec,
};
use crate::tensor::{DataType, Tensor, TensorData};

/// File names tried beside the executable and in library directories.
const LIBRARY_NAMES: &[&str] = &[
    "libonnxruntime.so",
    "libonnxruntime.so.1",
    "libonnxruntime.so.1.31.1",
    "libonnxruntime.dylib",
];

/// System library directories searched after `LD_LIBRARY_PATH`.
const SYSTEM_LIBRARY_DIRS: &[&str] = &[
    "/usr/local/lib",
    "/usr/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib",
];

/// Where the ONNX Runtime library is: `ORT_DYLIB_PATH`, then beside the
/// executable, then the system library path. `None` if nowhere.
pub fn find_onnxruntime_library() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from) {
        if path.is_file() {
            return Some(path);
        }
        tracing::warn!(path = %path.display(), "ORT_DYLIB_PATH does not name a file; looking elsewhere");
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        dirs.push(dir);
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths));
    }
    dirs.extend(SYSTEM_LIBRARY_DIRS.iter().map(PathBuf::from));
    dirs.iter()
        .flat_map(|dir| LIBRARY_NAMES.iter().map(move |name| dir.join(name)))
        .find(|path| path.is_file())
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// ONNX Runtime, loaded from a shared library.
#[derive(Clone)]
pub struct OnnxRuntime {
    environment: Environment,
}

impl std::fmt::Debug for OnnxRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnnxRuntime")
    }
}

impl OnnxRuntime {
    /// Loads the library (first call in the process) and sets up the shared
    /// environment. Later calls reuse it, whatever `library` they name.
    pub fn new(library: &Path) -> Result<OnnxRuntime, RuntimeError> {
        let environment = ENVIRONMENT.get_or_init(|| {
            let builder = ort::init_from(library)
                .map_err(|err| format!("cannot load {}: {err}", library.display()))?;
            builder
                .with_name("edgefleet")
                .build()
                .map_err(|err| format!("cannot create the ONNX Runtime environment: {err}"))
        });
        match environment {
            Ok(environment) => Ok(OnnxRuntime {
                environment: environment.clone(),
            }),
            Err(message) => Err(RuntimeError::Library(message.clone())),
        }
    }

    /// A session builder configured as the agent configures its sessions
    /// (benchmarks build raw `ort` sessions with it to compare like for like).
    pub fn session_builder(
        &self,
        options: &SessionOptions,
    ) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
        let builder = Session::builder(&self.environment)
            .map_err(load_error)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(load_error)?;
        let threads = options
            .intra_op_threads
            .unwrap_or_else(default_intra_op_threads);
        builder
            .with_intra_threads(threads)
            .map_err(load_error)?
            .with_thread_manager(NamedThreads)
            .map_err(load_error)?
            .with_intra_op_spinning(options.spin_wait)
            .map_err(load_error)?
            .with_inter_op_spinning(options.spin_wait)
            .map_err(load_error)
    }
}

/// Threads one run may use when the model's config does not say: one per
/// physical core the agent may run on, as many as ONNX Runtime would pick.
///
/// Set explicitly because ONNX Runtime's own default does two things a
/// device does not want: it pins pool thread *k* of every session to core
/// *k*, so a woken pool thread waits while its core runs the caller, the
/// network stack or another model (a scheduler trace showed p90 wake-ups of
/// 126–220 µs, against 2 µs unpinned); and it counts the machine's cores, not
/// the CPU quota or affinity of the container the agent runs in.
pub fn default_intra_op_threads() -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    allowed.min(num_cpus::get_physical()).max(1)
}

/// Starts ONNX Runtime's pool threads under the name [`ONNXRUNTIME_THREAD_NAME`].
/// Without it they inherit the name of the thread that built the session (a
/// tokio worker), which hides them in `top -H`, `ps -T` and `perf`.
struct NamedThreads;

/// The name ONNX Runtime's intra-op pool threads carry.
pub const ONNXRUNTIME_THREAD_NAME: &str = "onnxruntime";

impl ort::environment::ThreadManager for NamedThreads {
    type Thread = std::thread::JoinHandle<()>;

    fn create(&self, work: impl FnOnce() + Send + 'static) -> ort::Result<Self::Thread> {
        std::thread::Builder::new()
            .name(ONNXRUNTIME_THREAD_NAME.to_string())
            // The platform default ONNX Runtime's own threads get; untouched pages cost no memory.
            .stack_size(8 << 20)
            .spawn(work)
            .map_err(|err| ort::Error::new(format!("cannot start a pool thread: {err}")))
    }

    fn join(thread: Self::Thread) -> ort::Result<()> {
        thread
            .join()
            .map_err(|_| ort::Error::new("a pool thread panicked"))
    }
}

fn load_error(err: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Load {
        runtime: RuntimeKind::OnnxRuntime,
        message: err.to_string(),
    }
}

fn run_error(err: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Run {
        runtime: RuntimeKind::OnnxRuntime,
        message: err.to_string(),
    }
}

fn data_type(name: &str, ty: TensorElementType) -> Result<DataType, RuntimeError> {
    Ok(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Uint16 => DataType::U16,
        TensorElementType::Uint32 => DataType::U32,
        TensorElementType::Uint64 => DataType::U64,
        TensorElementType::Int8 => DataType::I8,
        TensorElementType::Int16 => DataType::I16,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int64 => DataType::I64,
        TensorElementType::Float16 => DataType::F16,
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        TensorElementType::String => DataType::Bytes,
        other => {
            return Err(RuntimeError::UnsupportedType {
                name: name.to_string(),
                detail: format!("element type {other:?} is not in the Open Inference Protocol"),
            });
        }
    })
}

fn spec(
    name: &str,
    value_type: &ValueType,
    unknown_rank: bool,
) -> Result<TensorSpec, RuntimeError> {
    match value_type {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => Ok(TensorSpec {
            name: name.to_string(),
            dtype: data_type(name, *ty)?,
            shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
            unknown_rank,
            dim_names: shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match dimension_symbols.get(i) {
                    Some(symbol) if d < 0 => symbol.clone(),
                    _ => String::new(),
                })
                .collect(),
        }),
        other => Err(RuntimeError::UnsupportedType {
            name: name.to_string(),
            detail: format!("{other:?} is not a tensor"),
        }),
    }
}

impl Runtime for OnnxRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::OnnxRuntime
    }

    fn load(
        &self,
        model_path: &Path,
        options: &SessionOptions,
    ) -> Result<Box<dyn ModelSession>, RuntimeError> {
        let bytes = std::fs::read(model_path).map_err(|source| RuntimeError::Io {
            path: model_path.to_path_buf(),
            source,
        })?;
        let mut builder = self.session_builder(options)?;
        let session = builder.commit_from_memory(&bytes).map_err(load_error)?;
        let specs = |outlets: &[ort::value::Outlet], side: Side| {
            outlets
                .iter()
                .enumerate()
                .map(|(index, outlet)| {
                    let unknown_rank = !has_shape(&session, side, index)?;
                    spec(outlet.name(), outlet.dtype(), unknown_rank)
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let signature = Signature {
            inputs: specs(session.inputs(), Side::Input)?,
            outputs: specs(session.outputs(), Side::Output)?,
        };
        let mut releasing = RunOptions::new().map_err(load_error)?;
        releasing
            .set(ARENA_SHRINKAGE.0, ARENA_SHRINKAGE.1)
            .map_err(load_error)?;
        Ok(Box::new(OnnxSession {
            session,
            signature,
            releasing,
        }))
    }
}

/// The run option that makes ONNX Runtime free, as a run ends, the regions
/// of its CPU arena (`cpu:0`) that nothing holds any more, all but the first.
const ARENA_SHRINKAGE: (&str, &str) = ("memory.enable_memory_arena_shrinkage", "cpu:0");

struct OnnxSession {
    session: Session,
    signature: Signature,
    /// Options for the runs that give their memory back
    /// ([`RunMemory::Release`]).
    releasing: RunOptions,
}

/// An input for `Session::run`: ONNX Runtime reads the request's bytes in
/// place when they are aligned for `T` (no copy), else an aligned copy.
fn typed<
    'a,
    T: bytemuck::Pod + ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
>(
    tensor: &'a Tensor,
) -> Result<SessionInputValue<'a>, RuntimeError> {
    match tensor.values::<T>() {
        Cow::Borrowed(values) => input(TensorRef::<T>::from_array_view((
            tensor.shape.clone(),
            values,
        ))),
        Cow::Owned(values) => input(OrtTensor::<T>::from_array((tensor.shape.clone(), values))),
    }
}

/// A tensor `ort` made (a view or an owned copy), as a `Session::run` input.
fn input<'a>(
    value: ort::Result<impl Into<SessionInputValue<'a>>>,
) -> Result<SessionInputValue<'a>, RuntimeError> {
    value.map(Into::into).map_err(run_error)
}

fn to_ort(tensor: &Tensor) -> Result<SessionInputValue<'_>, RuntimeError> {
    match tensor.dtype {
        DataType::Bool => input(OrtTensor::<bool>::from_array((
            tensor.shape.clone(),
            tensor.bools(),
        ))),
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
            string_tensor(&tensor.shape, &strings).map(Into::into)
        }
    }
}

#[derive(Clone, Copy)]
enum Side {
    Input,
    Output,
}

/// Whether ONNX Runtime knows the shape (so the rank) of a session's input
/// or output `index`; false for one declared with no shape at all, which
/// takes any shape. `ort`'s `ValueType` reports such a tensor with no
/// dimensions, as it does a scalar; only `TensorTypeAndShape_HasShape`
/// (C API 24, ONNX Runtime 1.24) tells the two apart. Not a tensor: true
/// (`spec` refuses it).
#[allow(unsafe_code)]
fn has_shape(session: &Session, side: Side, index: usize) -> Result<bool, RuntimeError> {
    use ort::AsPointer;
    let api = ort::api();
    let get = match side {
        Side::Input => api.SessionGetInputTypeInfo,
        Side::Output => api.SessionGetOutputTypeInfo,
    };
    let mut type_info: *mut ort::sys::OrtTypeInfo = std::ptr::null_mut();
    // SAFETY: `session` is alive and has more than `index` inputs (or
    // outputs): its outlets were listed from it. ONNX Runtime sets
    // `type_info` (null only with an error status), which is released here;
    // `info` points into it and is not used after.
    unsafe {
        ort::Error::result_from_status(get(session.ptr(), index, &mut type_info))
            .map_err(load_error)?;
        let mut info: *const ort::sys::OrtTensorTypeAndShapeInfo = std::ptr::null();
        let cast =
            ort::Error::result_from_status((api.CastTypeInfoToTensorInfo)(type_info, &mut info));
        let known = cast.map(|()| info.is_null() || (api.TensorTypeAndShape_HasShape)(info));
        (api.ReleaseTypeInfo)(type_info);
        known.map_err(load_error)
    }
}

/// A string tensor holding `strings`, each copied in with its length: an
/// ONNX Runtime string is bytes and a length, so one holding a NUL byte
/// arrives whole (`ort`'s `from_string_array` copies each into a C string,
/// which refuses one).
#[allow(unsafe_code)]
fn string_tensor(shape: &[i64], strings: &[String]) -> Result<OrtTensor<String>, RuntimeError> {
    use ort::AsPointer;
    let empty = vec![""; strings.len()];
    let mut value = OrtTensor::<String>::from_string_array((shape.to_vec(), empty.as_slice()))
        .map_err(run_error)?;
    for (index, string) in strings.iter().enumerate() {
        let mut buffer: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: `value` is a string tensor of `strings.len()` elements;
        // ONNX Runtime resizes element `index` to `string.len()` bytes and
        // points `buffer` at them (null only with an error status).
        unsafe {
            let status = (ort::api().GetResizedStringTensorElementBuffer)(
                value.ptr_mut(),
                index,
                string.len(),
                &mut buffer,
            );
            ort::Error::result_from_status(status).map_err(run_error)?;
            if !string.is_empty() {
                std::ptr::copy_nonoverlapping(string.as_ptr(), buffer.cast(), string.len());
            }
        }
    }
    Ok(value)
}

fn extract<T: bytemuck::Pod + ort::value::PrimitiveTensorElementType>(
    value: &DynValue,
) -> Result<(Vec<i64>, Vec<u8>), RuntimeError> {
    let (shape, data) = value.try_extract_tensor::<T>().map_err(run_error)?;
    Ok((shape.to_vec(), bytemuck::cast_slice(data).to_vec()))
}

fn from_ort(name: &str, dtype: DataType, value: &DynValue) -> Result<Tensor, RuntimeError> {
    let (shape, data) = match dtype {
        DataType::Bool => {
            let (shape, data) = value.try_extract_tensor::<bool>().map_err(run_error)?;
            (
                shape.to_vec(),
                TensorData::Raw(data.iter().map(|&b| u8::from(b)).collect()),
            )
        }
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings().map_err(run_error)?;
            (
                shape.to_vec(),
                TensorData::Bytes(strings.into_iter().map(String::into_bytes).collect()),
            )
        }
        _ => {
            let (shape, bytes) = match dtype {
                DataType::U8 => extract::<u8>(value),
                DataType::U16 => extract::<u16>(value),
                DataType::U32 => extract::<u32>(value),
                DataType::U64 => extract::<u64>(value),
                DataType::I8 => extract::<i8>(value),
                DataType::I16 => extract::<i16>(value),
                DataType::I32 => extract::<i32>(value),
                DataType::I64 => extract::<i64>(value),
                DataType::F16 => extract::<half::f16>(value),
                DataType::F32 => extract::<f32>(value),
                _ => extract::<f64>(value),
            }?;
            (shape, TensorData::Raw(bytes.into()))
        }
    };
    Ok(Tensor {
        name: name.to_string(),
        dtype,
        shape,
        data,
    })
}

impl ModelSession for OnnxSession {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn run_phased(
        &mut self,
        inputs: Vec<Tensor>,
        phases: &mut RunPhases,
        memory: RunMemory,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let values = RunPhases::timed(&mut phases.input, || {
            inputs
                .iter()
                .map(|tensor| Ok((Cow::Borrowed(tensor.name.as_str()), to_ort(tensor)?)))
                .collect::<Result<Vec<(Cow<'_, str>, SessionInputValue<'_>)>, RuntimeError>>()
        })?;
        let outputs = match memory {
            RunMemory::Keep => self.session.run(values),
            RunMemory::Release => self.session.run_with_options(values, &self.releasing),
        }
        .map_err(run_error)?;
        RunPhases::timed(&mut phases.output, || {
            self.signature
                .outputs
                .iter()
                .map(|spec| {
                    let value = outputs.get(&spec.name).ok_or_else(|| {
                        run_error(format!("output '{}' missing from the run", spec.name))
                    })?;
                    from_ort(&spec.name, spec.dtype, value)
                })
                .collect()
        })
    }
}
