//! ONNX Runtime as a backend, on the CPU or, through its CUDA execution provider, a GPU.
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`), once per process, from the
//! first of: `ORT_DYLIB_PATH`; `[models] onnxruntime_library` in `modelyard.toml`;
//! `libonnxruntime.so` beside the binary or in `../onnxruntime/` from it (where the set-up
//! puts the library of the `onnxruntime` wheel); the system's library path. A library that
//! cannot be loaded, or is older than the API level `ort` was built for, refuses the models
//! that asked for ONNX Runtime with that reason; `backend = "auto"` models go to tract. A
//! static binary (the musl build) has no dynamic loader, and tries none of them.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::memory::Allocator;
use ort::session::Session;
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType, ValueType};
use tract_onnx::prelude::Framework;

use super::cpu::{self, Workers};
use super::graph::{
    Device, Engine, LoadOptions, LoadedGraph, RunError, Runnable, TensorOverride, UnknownOverride,
    bytes_data, strings,
};
use super::limits;
use crate::tensor::{DataType, Tensor, TensorSpec};

const LIBRARY: &str = "libonnxruntime.so";

#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    #[error(
        "the ONNX Runtime library is not available: {0} (run the set-up, or point ORT_DYLIB_PATH \
         or [models] onnxruntime_library at libonnxruntime.so)"
    )]
    Unavailable(String),
    #[error("{0}")]
    KnownWrong(String),
    #[error("not an ONNX model ONNX Runtime can read: {0}")]
    NotOnnx(String),
    #[error("cannot load the model: {0}")]
    Load(String),
    #[error("{kind} '{name}' is {what}, which the Open Inference Protocol cannot carry")]
    Unsupported {
        kind: &'static str,
        name: String,
        what: String,
    },
    #[error(transparent)]
    UnknownOverride(#[from] UnknownOverride),
    #[error(
        "model.toml declares {kind} '{name}' as {declared}, but the model file says {actual} \
         (ONNX Runtime takes types from the file)"
    )]
    OverrideType {
        kind: &'static str,
        name: String,
        declared: DataType,
        actual: DataType,
    },
    #[error("device = \"cuda\" is required by model.toml, but {0}")]
    Device(String),
}

/// The library named in `modelyard.toml`, set once at start-up before any model loads.
static CONFIGURED: OnceLock<PathBuf> = OnceLock::new();

/// The loaded library and its one environment, or why there is none: tried once.
static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

struct Runtime {
    environment: Environment,
    version: String,
}

/// Names the library `modelyard.toml` asks for; `ORT_DYLIB_PATH` still wins.
pub fn configure(library: PathBuf) {
    // Set once per process: a second server in the same process (tests) names the same.
    let _ = CONFIGURED.set(library);
}

/// Whether the library is loaded (loading it on first call).
pub fn available() -> bool {
    runtime().is_ok()
}

/// Why the library is not available, if it is not.
pub fn unavailable_reason() -> Option<String> {
    runtime().err().map(|e| e.to_string())
}

fn runtime() -> Result<&'static Runtime, OrtError> {
    RUNTIME
        .get_or_init(start)
        .as_ref()
        .map_err(|reason| OrtError::Unavailable(reason.clone()))
}

fn candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        paths.push(PathBuf::from(path));
        // Named explicitly: nothing else is tried, so a wrong path is not papered over.
        return paths;
    }
    if let Some(path) = CONFIGURED.get() {
        paths.push(path.clone());
        return paths;
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        paths.push(dir.join(LIBRARY));
        paths.push(dir.join("../onnxruntime").join(LIBRARY));
    }
    paths.retain(|p| p.exists());
    // Last, the system's library path (LD_LIBRARY_PATH, ld.so.conf).
    paths.push(PathBuf::from(LIBRARY));
    paths
}

/// Why a static executable (the musl build) does not even try: it has no dynamic loader, so
/// every `dlopen` fails with no useful reason, and `ort` panics on its way to one where
/// `/proc` is not mounted (it resolves a relative name against `current_exe`).
const STATIC_BINARY: Option<&str> = if cfg!(target_feature = "crt-static") {
    Some(
        "this is a static binary, which cannot load shared libraries such as libonnxruntime.so; \
         the glibc build runs ONNX Runtime",
    )
} else {
    None
};

fn start() -> Result<Runtime, String> {
    let mut tried = Vec::new();
    let candidates = match STATIC_BINARY {
        Some(reason) => {
            tried.push(reason.to_string());
            Vec::new()
        }
        None => candidates(),
    };
    for path in candidates {
        match ort::init_from(&path) {
            Ok(builder) => {
                let environment = builder
                    .with_name("modelyard")
                    .build()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let version = library_version(&path).unwrap_or_else(|| "unknown".into());
                tracing::info!(library = %path.display(), %version, "ONNX Runtime loaded");
                return Ok(Runtime {
                    environment,
                    version,
                });
            }
            Err(error) => tried.push(error.to_string()),
        }
    }
    let reason = tried.join("; ");
    tracing::warn!(%reason, "ONNX Runtime is not available; models that need it are refused, backend = \"auto\" models run on tract");
    Err(reason)
}

/// The library's own version string (`ort` checks it but does not hand it out).
fn library_version(path: &Path) -> Option<String> {
    type ApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: the library `ort` has just loaded from this path (so this only takes another
    // reference to it); `OrtGetApiBase` and its `GetVersionString` are ONNX Runtime's stable
    // C entry points, the latter returning a static NUL-terminated string.
    unsafe {
        let library = libloading::Library::new(path).ok()?;
        let api_base = library.get::<ApiBase>(b"OrtGetApiBase").ok()?();
        let version = api_base.as_ref()?.GetVersionString;
        let version = std::ffi::CStr::from_ptr(version());
        version.to_str().ok().map(str::to_string)
    }
}

/// Loads a model into an ONNX Runtime session, on the device `options` ask for.
pub(super) fn load(bytes: &[u8], options: &LoadOptions) -> Result<LoadedGraph, OrtError> {
    let runtime = runtime()?;
    let instances = options.instances.get();
    // A file tract cannot even parse is left for ONNX Runtime to refuse in its own words.
    if let Ok(proto) = tract_onnx::onnx().proto_model_for_read(&mut &bytes[..])
        && let Some(reason) = proto
            .graph
            .as_ref()
            .and_then(|g| limits::known_wrong(g, limits::Backend::OnnxRuntime))
    {
        return Err(OrtError::KnownWrong(reason));
    }
    let (first, device, fallback) = match options.device {
        Device::Cpu => (
            session(runtime, bytes, options.threads, true, false)?,
            Device::Cpu,
            None,
        ),
        Device::Cuda => match cuda_session(runtime, bytes, options.threads) {
            Ok(session) => (session, Device::Cuda, None),
            Err(reason) if options.require_device => return Err(OrtError::Device(reason)),
            Err(reason) => {
                let session = session(runtime, bytes, options.threads, true, false)?;
                (
                    session,
                    Device::Cpu,
                    Some(format!("{reason}; running on the CPU")),
                )
            }
        },
    };
    let mut sessions = vec![];
    // Idle intra-op threads spin, waiting for the next parallel step: right while a run has
    // the cores to itself, wasteful when several runs share them. The first session spins
    // and is lent first (the pool is last in, first out), so a lone request gets it; the
    // others, lent only while it runs, do not.
    for _ in 1..instances {
        sessions.push(session(
            runtime,
            bytes,
            options.threads,
            false,
            device == Device::Cuda,
        )?);
    }
    let outlets = |kind, outlets: &[ort::value::Outlet]| {
        outlets
            .iter()
            .map(|o| tensor_spec(kind, o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()
    };
    let mut inputs = outlets("input", first.session.inputs())?;
    let mut outputs = outlets("output", first.session.outputs())?;
    sessions.push(first);
    apply_overrides("input", &mut inputs, &options.inputs)?;
    apply_overrides("output", &mut outputs, &options.outputs)?;
    let threads = options.threads.map(NonZeroUsize::get);
    Ok(LoadedGraph {
        model: Arc::new(OrtGraph {
            free: Mutex::new(sessions),
            returned: Condvar::new(),
        }),
        inputs,
        outputs,
        engine: Engine {
            backend: "onnxruntime",
            version: Some(runtime.version.clone()),
            device,
            threads,
            instances: Some(instances),
            fallback,
        },
    })
}

fn session(
    runtime: &Runtime,
    bytes: &[u8],
    threads: Option<NonZeroUsize>,
    spin: bool,
    cuda: bool,
) -> Result<Pooled, OrtError> {
    let failed = |e: ort::Error<_>| OrtError::Load(e.to_string());
    let workers = Workers::default();
    let mut builder = Session::builder(&runtime.environment)
        .map_err(|e| OrtError::Load(e.to_string()))?
        // The intra-op threads are ours, so a run can read their CPU clocks.
        .with_thread_manager(Spawner(workers.clone()))
        .map_err(failed)?
        // One run at a time per session; a request's parallelism is intra-op.
        .with_inter_threads(1)
        .map_err(failed)?
        // A failed run is the request's to report (with its model, version and status), not
        // ONNX Runtime's to log as an error: a client's bad index is no server error.
        .with_log_level(ort::logging::LogLevel::Fatal)
        .map_err(failed)?;
    if let Some(threads) = threads {
        builder = builder.with_intra_threads(threads.get()).map_err(failed)?;
    }
    if !spin {
        builder = builder.with_intra_op_spinning(false).map_err(failed)?;
    }
    if cuda {
        builder = builder
            .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
            .map_err(failed)?;
    }
    let session = builder
        .commit_from_memory(bytes)
        .map_err(|e| match e.code() {
            ort::ErrorCode::InvalidProtobuf => OrtError::NotOnnx(e.message().to_string()),
            _ => OrtError::Load(e.message().to_string()),
        })?;
    Ok(Pooled {
        session,
        spins: spin,
        workers,
    })
}

/// Starts ONNX Runtime's intra-op threads for one session, among its [`Workers`].
struct Spawner(Workers);

impl ort::environment::ThreadManager for Spawner {
    type Thread = std::thread::JoinHandle<()>;

    fn create(&self, work: impl FnOnce() + Send + 'static) -> ort::Result<Self::Thread> {
        self.0
            .spawn(work)
            .map_err(|e| ort::Error::new(format!("cannot start an intra-op thread: {e}")))
    }

    fn join(thread: Self::Thread) -> ort::Result<()> {
        thread
            .join()
            .map_err(|_| ort::Error::new("an intra-op thread panicked"))
    }
}

/// A session on the GPU, or why there can be none here.
fn cuda_session(
    runtime: &Runtime,
    bytes: &[u8],
    threads: Option<NonZeroUsize>,
) -> Result<Pooled, String> {
    if !ep::CUDA::is_available().unwrap_or(false) {
        return Err(format!(
            "ONNX Runtime {} was built without CUDA (the onnxruntime-gpu wheel has it)",
            runtime.version
        ));
    }
    session(runtime, bytes, threads, true, true)
        .map_err(|e| format!("the CUDA execution provider cannot start: {e}"))
}

/// The protocol datatype of an ONNX element type, where there is one (float8, int4 and the
/// like have none).
fn datatype(ty: TensorElementType) -> Option<DataType> {
    DataType::ALL.into_iter().find(|&d| element_type(d) == ty)
}

fn element_type(datatype: DataType) -> TensorElementType {
    match datatype {
        DataType::Bool => TensorElementType::Bool,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Bf16 => TensorElementType::Bfloat16,
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Bytes => TensorElementType::String,
    }
}

fn tensor_spec(kind: &'static str, name: &str, ty: &ValueType) -> Result<TensorSpec, OrtError> {
    let unsupported = |what: String| OrtError::Unsupported {
        kind,
        name: name.to_string(),
        what,
    };
    let ValueType::Tensor { ty, shape, .. } = ty else {
        return Err(unsupported(format!("a {ty}")));
    };
    let datatype = datatype(*ty).ok_or_else(|| unsupported(format!("a tensor of {ty:?}")))?;
    Ok(TensorSpec {
        name: name.to_string(),
        datatype,
        shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
    })
}

/// `model.toml` may narrow a shape the file leaves open; the types are the file's.
fn apply_overrides(
    kind: &'static str,
    specs: &mut [TensorSpec],
    overrides: &[TensorOverride],
) -> Result<(), OrtError> {
    for o in overrides {
        let available = specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let Some(spec) = specs.iter_mut().find(|s| s.name == o.name) else {
            return Err(OrtError::UnknownOverride(UnknownOverride {
                kind,
                name: o.name.clone(),
                available,
            }));
        };
        if let Some(declared) = o.datatype.filter(|&d| d != spec.datatype) {
            return Err(OrtError::OverrideType {
                kind,
                name: o.name.clone(),
                declared,
                actual: spec.datatype,
            });
        }
        if let Some(shape) = &o.shape {
            spec.shape = shape.clone();
        }
    }
    Ok(())
}

struct OrtGraph {
    /// `ort` runs a session through `&mut`, one run at a time: `instances` sessions of the
    /// model (Triton's instance count) let that many requests run at once, each with the
    /// session's intra-op threads. The idle ones wait here, the spinning one last (lent
    /// first).
    free: Mutex<Vec<Pooled>>,
    returned: Condvar,
}

struct Pooled {
    session: Session,
    spins: bool,
    workers: Workers,
}

impl OrtGraph {
    fn take(&self) -> Pooled {
        // A run that panicked inside `ort` returned its session on unwinding; ONNX
        // Runtime's own state is per run, so the lock's poison says nothing.
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(pooled) = free.pop() {
                return pooled;
            }
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A session out of the pool for one run, back in it when dropped.
struct Lent<'a> {
    graph: &'a OrtGraph,
    pooled: Option<Pooled>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            let mut free = self.graph.free.lock().unwrap_or_else(|p| p.into_inner());
            if pooled.spins {
                free.push(pooled);
            } else {
                free.insert(0, pooled);
            }
            self.graph.returned.notify_one();
        }
    }
}

impl Runnable for OrtGraph {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let values = inputs
            .into_iter()
            .map(|t| Ok((t.name.clone(), to_ort(t)?)))
            .collect::<Result<Vec<(String, DynValue)>, RunError>>()?;
        let mut lent = Lent {
            graph: self,
            pooled: Some(self.take()),
        };
        let Some(pooled) = lent.pooled.as_mut() else {
            return Err(RunError::Failed("no session to run on".into()));
        };
        let before = pooled.workers.now();
        let outputs = pooled.session.run(values);
        cpu::report_workers(pooled.workers.now().saturating_sub(before));
        let outputs = outputs.map_err(|e| match e.code() {
            ort::ErrorCode::InvalidArgument => RunError::Rejected(e.message().to_string()),
            _ => RunError::Failed(e.message().to_string()),
        })?;
        outputs
            .into_iter()
            .map(|(name, value)| from_ort(name.to_string(), value))
            .collect()
    }
}

fn to_ort(tensor: Tensor) -> Result<DynValue, RunError> {
    let shape: Vec<i64> = tensor.shape.iter().map(|&d| d as i64).collect();
    if tensor.datatype == DataType::Bytes {
        let strings = strings(&tensor)?;
        return ort::value::Tensor::from_string_array((shape, strings.as_slice()))
            .map(|t| t.into_dyn())
            .map_err(|e| RunError::Failed(format!("input '{}': {e}", tensor.name)));
    }
    let failed = |e: ort::Error| RunError::Failed(format!("input '{}': {e}", tensor.name));
    // The copy below writes exactly this many bytes into a buffer of the shape's size.
    let wanted = Tensor::element_count(&tensor.shape)
        .zip(tensor.datatype.element_size())
        .and_then(|(n, size)| n.checked_mul(size));
    if wanted != Some(tensor.data.len()) {
        return Err(RunError::Rejected(format!(
            "input '{}' holds {} bytes, which its shape {:?} of {} does not",
            tensor.name,
            tensor.data.len(),
            tensor.shape,
            tensor.datatype
        )));
    }
    let mut value = DynTensor::new(
        &Allocator::default(),
        element_type(tensor.datatype),
        shape.clone(),
    )
    .map_err(failed)?;
    if !tensor.data.is_empty() {
        let target = value.data_ptr_mut().cast::<u8>();
        // SAFETY: the tensor was just allocated on the CPU for this shape and element type,
        // which is `data.len()` bytes (checked above).
        unsafe { std::ptr::copy_nonoverlapping(tensor.data.as_ptr(), target, tensor.data.len()) };
    }
    Ok(value.into_dyn())
}

fn from_ort(name: String, value: DynValue) -> Result<Tensor, RunError> {
    let failed = |what: String| RunError::Failed(format!("output '{name}': {what}"));
    let ValueType::Tensor { ty, shape, .. } = value.dtype().clone() else {
        return Err(failed(format!("a {} is not a tensor", value.dtype())));
    };
    let datatype =
        datatype(ty).ok_or_else(|| failed(format!("{ty:?} has no protocol datatype")))?;
    let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    let data = if datatype == DataType::Bytes {
        let (_, strings) = value
            .try_extract_strings()
            .map_err(|e| failed(e.to_string()))?;
        bytes_data(&name, &strings)?
    } else {
        let tensor = value
            .downcast::<DynTensorValueType>()
            .map_err(|e| failed(e.to_string()))?;
        let len = Tensor::element_count(&shape)
            .zip(datatype.element_size())
            .map(|(n, size)| n * size)
            .ok_or_else(|| failed("too large".into()))?;
        if len == 0 {
            Vec::new()
        } else {
            if !tensor.memory_info().is_cpu_accessible() {
                return Err(failed("left on the device".into()));
            }
            // SAFETY: a CPU tensor of this shape and element type holds `len` bytes.
            unsafe { std::slice::from_raw_parts(tensor.data_ptr().cast::<u8>(), len) }.to_vec()
        }
    };
    Ok(Tensor {
        name,
        datatype,
        shape,
        data,
    })
}
