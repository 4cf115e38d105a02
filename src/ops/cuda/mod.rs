//! CUDA work that burn-cuda 0.21 does slowly, enqueued on cubecl's stream: the linear layers' GEMMs
//! through cuBLASLt (`linear`), the attention as flash kernels or cuBLASLt GEMMs around fused
//! softmax kernels (`attention`), and RMSNorm, SwiGLU, RoPE and the distillation KL as one kernel
//! each (`elementwise`).
//!
//! Why: burn-cuda (cubecl 0.10) emits tensor-core code only as `mma.sync`, never Hopper's `wgmma`
//! (its bf16 GEMM measured 0.24-0.31x cuBLAS on an H200), and without kernel fusion the chunked
//! attention's softmax is ~10 separate elementwise passes over every score (docs/performance.md).
//! cuBLASLt is loaded at run time (`libcublasLt.so`, through cudarc) and the kernel is compiled by
//! NVRTC on first use; where either is unavailable, or `DMS_RETROFIT_GEMM=burn` is set, the callers
//! fall back to burn's ops.
//!
//! Hand-off ([`on_cubecl_stream`]): our work is enqueued on cubecl's own CUDA stream, which the
//! vendored cubecl-cuda exposes (`vendor/cubecl-cuda/DMS-RETROFIT.md`), so it is ordered after the
//! producers of its inputs and before burn's next kernels and any reuse of the buffers, with no
//! host wait. It runs on cubecl's device thread, queued like burn's own launches, so the caller
//! does not wait for that thread either. (Before the patch each hand-off waited for cubecl's queue
//! and then for our own stream; before the device-thread queueing, for cubecl's queue once per
//! buffer: ~1,900 hand-offs per Qwen3-8B step, 0.37 s of host time, now 0.05 s.)

pub mod attention;
pub mod elementwise;
pub mod linear;
pub mod upload;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use burn::tensor::DType;
use burn_cubecl::cubecl::Runtime;
use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::cubecl::device::Device;
use burn_cubecl::cubecl::device_handle::DeviceHandle;
use burn_cubecl::cubecl::server::{ComputeServer, Handle};
use burn_cubecl::cubecl::stream_id::StreamId;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

type Cube = CubeTensor<CudaRuntime>;

/// Threads per block of every kernel (`BLOCK` in common.cu).
const BLOCK: u32 = 256;

/// The stream cubecl's looked-up buffers name (every buffer of one call names the caller's
/// current cubecl stream) and their device addresses. (A macro: the buffers' type is private to
/// cubecl-cuda.)
macro_rules! stream_and_pointers {
    ($resources:expr) => {
        match $resources.first() {
            Some(first) => Ok((
                first.resource().stream,
                $resources
                    .iter()
                    .map(|r| r.resource().ptr)
                    .collect::<Vec<u64>>(),
            )),
            None => Err("no tensors".to_string()),
        }
    };
}

/// Enqueues `work` on cubecl's stream with the device addresses of `tensors`: ordered after
/// the work that produced them and before burn's next kernels. `None` (after saying why once)
/// where our path is unavailable; the caller then computes the result with burn's ops.
///
/// The work runs later, on cubecl's device thread, in order with burn's launches: the caller
/// returns at once instead of waiting for that thread to drain its queue (~1,900 waits per
/// Qwen3-8B step otherwise), and every buffer is looked up there in one pass. The tensors'
/// handles travel with the work, so their memory stays allocated until it is enqueued. A
/// failure there cannot fall back to burn's ops any more: it is logged, later calls return
/// `None`, and [`enqueued_work_failure`] reports it to the training and benchmark loops, which
/// stop. `uses_kernels`: `work` launches our NVRTC kernels, whose compilation is checked here
/// first (so that a missing NVRTC still falls back). `DMS_RETROFIT_HANDOFF=blocking` runs `work`
/// on the caller's thread instead, after looking up each buffer through the device thread (the
/// previous scheme, for comparisons).
///
/// Assumes one host thread drives the GPU (one cubecl stream), as training and inference do: a
/// tensor owned by another thread's stream could be reused by that stream while our work still
/// reads it. `DMS_RETROFIT_CUDA_SYNC=1` waits for the stream after every call, so a fault in our
/// work is reported here rather than by some later cubecl call (for debugging; slow).
fn on_cubecl_stream(
    tensors: &[&Cube],
    uses_kernels: bool,
    work: impl FnOnce(&mut DeviceContext, &[u64]) -> Result<(), String> + Send + 'static,
) -> Option<()> {
    if blocking_handoff() {
        return with_cubecl_stream(tensors, work);
    }
    let started = Instant::now();
    let first = tensors.first()?;
    if enqueued_work_failure().is_some() {
        return None;
    }
    let gpu = match ready_gpu(first.device.index, uses_kernels) {
        Ok(gpu) => gpu,
        Err(why) => {
            fallback_once(&why);
            return None;
        }
    };
    let handles: Vec<Handle> = tensors.iter().map(|t| t.handle.clone()).collect();
    gpu.queue.submit(move |server| {
        let started = Instant::now();
        let stream = StreamId::current();
        // cubecl's queue would swallow a panic (it logs and goes on): record it as a failure.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handles
                .into_iter()
                .map(|h| {
                    server
                        .get_resource(h.binding(), stream)
                        .map_err(|e| format!("looking up a buffer: {e:?}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .and_then(|resources| {
                    let (stream, pointers) = stream_and_pointers!(resources)?;
                    run_on_stream(&gpu.context, stream, &pointers, work)
                })
        }))
        .unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("our CUDA work panicked: {why}"))
        });
        if let Err(why) = &result {
            record_enqueued_failure(why);
        }
        if let Ok(mut stats) = STATS.lock() {
            stats.failed += u64::from(result.is_err());
            stats.device_thread_s += started.elapsed().as_secs_f64();
        }
    });
    if let Ok(mut stats) = STATS.lock() {
        stats.calls += 1;
        stats.host_s += started.elapsed().as_secs_f64();
    }
    Some(())
}

/// Runs `work` on the caller's thread with the device addresses of `tensors`, each looked up
/// through cubecl's device thread (which first drains its queue), and returns its result: for
/// work that borrows host memory ([`upload`]) and for `DMS_RETROFIT_HANDOFF=blocking`.
fn with_cubecl_stream<R>(
    tensors: &[&Cube],
    work: impl FnOnce(&mut DeviceContext, &[u64]) -> Result<R, String>,
) -> Option<R> {
    let first = tensors.first()?;
    let gpu = match gpu(first.device.index) {
        Ok(gpu) => gpu,
        Err(why) => {
            fallback_once(&why);
            return None;
        }
    };
    let started = Instant::now();
    let mut resources = Vec::with_capacity(tensors.len());
    for t in tensors {
        resources.push(first.client.get_resource(t.handle.clone()).ok()?);
    }
    let result = stream_and_pointers!(resources)
        .and_then(|(stream, pointers)| run_on_stream(&gpu.context, stream, &pointers, work));
    // Releasing the buffers now is safe: cubecl reuses them only for work enqueued later on the
    // same stream, i.e. after ours.
    drop(resources);
    if let Ok(mut stats) = STATS.lock() {
        stats.calls += 1;
        stats.failed += u64::from(result.is_err());
        stats.host_s += started.elapsed().as_secs_f64();
    }
    result.map_err(|why| fallback_once(&why)).ok()
}

/// `work` with our context bound to this thread, enqueueing on `stream` (cubecl's) with the
/// device addresses `pointers`.
fn run_on_stream<R>(
    context: &Mutex<DeviceContext>,
    stream: cudarc::driver::sys::CUstream,
    pointers: &[u64],
    work: impl FnOnce(&mut DeviceContext, &[u64]) -> Result<R, String>,
) -> Result<R, String> {
    let mut context = lock_and_bind(context)?;
    context.use_stream(stream)?;
    let result = work(&mut context, pointers)?;
    if sync_after_each_call() {
        context
            .stream
            .synchronize()
            .map_err(|e| format!("our CUDA work failed: {e:?}"))?;
    }
    Ok(result)
}

/// Our context, locked, with its CUDA context current on this thread (cuBLASLt calls, memsets
/// and NVRTC module loads need it; it is cubecl's primary context).
fn lock_and_bind(
    context: &Mutex<DeviceContext>,
) -> Result<std::sync::MutexGuard<'_, DeviceContext>, String> {
    let context = context
        .lock()
        .map_err(|_| "CUDA state poisoned".to_string())?;
    context
        .context
        .bind_to_thread()
        .map_err(|e| format!("binding the CUDA context: {e:?}"))?;
    Ok(context)
}

/// Our state on GPU `ordinal`, with the kernels compiled when `uses_kernels` (checked once per
/// GPU on the caller's thread, so that a failure falls back instead of failing enqueued work).
fn ready_gpu(ordinal: usize, uses_kernels: bool) -> Result<&'static Gpu, String> {
    let gpu = gpu(ordinal)?;
    if uses_kernels {
        gpu.kernels_compiled
            .get_or_init(|| lock_and_bind(&gpu.context)?.kernels().map(|_| ()))
            .clone()?;
    }
    Ok(gpu)
}

type CudaServer = <CudaRuntime as Runtime>::Server;

/// `DMS_RETROFIT_HANDOFF=blocking`: the caller waits for each hand-off (the previous scheme).
fn blocking_handoff() -> bool {
    static BLOCKING: OnceLock<bool> = OnceLock::new();
    *BLOCKING.get_or_init(|| {
        std::env::var("DMS_RETROFIT_HANDOFF").is_ok_and(|v| v.eq_ignore_ascii_case("blocking"))
    })
}

static ENQUEUED_FAILURE: Mutex<Option<String>> = Mutex::new(None);

fn record_enqueued_failure(why: &str) {
    let mut first = ENQUEUED_FAILURE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if first.is_none() {
        tracing::error!("our CUDA work failed on cubecl's device thread: {why}");
        *first = Some(why.to_string());
    }
}

/// Why enqueued CUDA work of ours failed, if any did: the results computed since are wrong, so
/// the training and benchmark loops stop with this (after it, later hand-offs use burn's ops).
pub fn enqueued_work_failure() -> Option<String> {
    ENQUEUED_FAILURE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

/// `DMS_RETROFIT_CUDA_SYNC=1`: wait for the stream after every hand-off.
fn sync_after_each_call() -> bool {
    static SYNC: OnceLock<bool> = OnceLock::new();
    *SYNC.get_or_init(|| std::env::var("DMS_RETROFIT_CUDA_SYNC").is_ok_and(|v| v == "1"))
}

/// The hand-offs since the last [`take_handoff_stats`]: how many, and the host time they took
/// (looking up cubecl's buffers through its device thread, choosing GEMM algorithms, enqueueing,
/// and any time blocked because CUDA's launch queue was full); the GPU work itself runs
/// asynchronously, in stream order with burn's.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct HandoffStats {
    pub calls: u64,
    /// Hand-offs whose work failed.
    pub failed: u64,
    /// Time the calling thread spent in hand-offs.
    pub host_s: f64,
    /// Time our enqueued work took on cubecl's device thread (buffer look-ups, GEMM set-up,
    /// launches), in line with burn's launches there.
    pub device_thread_s: f64,
}

static STATS: Mutex<HandoffStats> = Mutex::new(HandoffStats {
    calls: 0,
    failed: 0,
    host_s: 0.0,
    device_thread_s: 0.0,
});

/// Bytes cubecl's memory pools hold on `device` now: `(in use by live tensors, reserved in
/// pages)`. What `nvidia-smi` shows is the reserved figure plus the CUDA context.
pub fn pool_bytes(device: &burn_cubecl::cubecl::cuda::CudaDevice) -> Option<(u64, u64)> {
    use burn_cubecl::cubecl::Runtime;
    let usage = CudaRuntime::client(device).memory_usage().ok()?;
    Some((usage.bytes_in_use, usage.bytes_reserved))
}

/// The statistics gathered since the last call, which resets them.
pub fn take_handoff_stats() -> HandoffStats {
    STATS
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default()
}

/// Says once, at warn level, why burn's ops are used instead.
fn fallback_once(why: &str) {
    static SAID: OnceLock<()> = OnceLock::new();
    SAID.get_or_init(|| {
        if why.starts_with("DMS_RETROFIT_GEMM") {
            tracing::info!("CUDA GEMMs and attention use burn's kernels ({why})");
        } else {
            tracing::warn!("CUDA GEMMs and attention use burn's kernels: {why}");
        }
    });
}

/// A row-major matrix in device memory (one of `batch` when its batch stride is non-zero).
#[derive(Debug, Clone, Copy)]
pub struct Matrix {
    pub ptr: u64,
    pub rows: usize,
    pub cols: usize,
    /// Elements between the starts of consecutive rows.
    pub ld: usize,
    /// Elements between consecutive matrices of the batch; 0 repeats the same matrix.
    pub batch_stride: usize,
    pub dtype: DType,
}

impl Matrix {
    /// A matrix whose rows are stored back to back (`ld = cols`).
    pub fn packed(ptr: u64, rows: usize, cols: usize, batch_stride: usize, dtype: DType) -> Self {
        Self {
            ptr,
            rows,
            cols,
            ld: cols,
            batch_stride,
            dtype,
        }
    }
}

/// `C = alpha · op(A) · op(B) + beta · C` on row-major matrices, `batch` times.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub a: Matrix,
    pub a_transposed: bool,
    pub b: Matrix,
    pub b_transposed: bool,
    pub c: Matrix,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
}

fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
    match dtype {
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        _ => None,
    }
}

/// What the chosen algorithm depends on (pointers only through their alignment).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct AlgoKey {
    types: (sys::cudaDataType, sys::cudaDataType),
    trans: (bool, bool),
    mnk: (usize, usize, usize),
    lds: (usize, usize, usize),
    batch: (usize, usize, usize, usize),
    align: (u32, u32, u32),
}

/// The largest power of two (≤ 256) dividing a device address; cuBLASLt's heuristic otherwise
/// assumes 256-byte alignment.
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// Our state on one GPU: the stream we enqueue on (cubecl's, borrowed), a cuBLASLt handle and
/// workspace, the algorithms chosen so far, the compiled kernels, and scratch memory for
/// attention chunks.
pub struct DeviceContext {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    algos: HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>,
    kernels: Option<Result<Kernels, String>>,
    scratch: Vec<(u64, usize)>,
    /// Pinned host buffers for [`DeviceContext::upload_with`], allocated at its first call.
    staging: Vec<Staging>,
    /// The staging buffer the last chunk went through.
    next_staging: usize,
}

/// One pinned host buffer of [`STAGING_BYTES`] and the event recorded after the last copy that
/// reads it.
struct Staging {
    host: *mut u8,
    copied: cudarc::driver::sys::CUevent,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: both were created by `Staging::new`; waiting first keeps a queued copy from
        // reading freed memory.
        unsafe {
            let _ = cudarc::driver::result::event::synchronize(self.copied);
            let _ = cudarc::driver::result::event::destroy(self.copied);
            let _ = cudarc::driver::result::free_host(self.host.cast());
        }
    }
}

impl Staging {
    fn new() -> Result<Self, String> {
        use cudarc::driver::{result, sys::CUevent_flags};
        // SAFETY: a fresh allocation; only written by `upload` before being read by copies.
        let host = unsafe { result::malloc_host(STAGING_BYTES, 0) }
            .map_err(|e| format!("pinned staging of {STAGING_BYTES} bytes: {e:?}"))?;
        let copied = result::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| format!("CUDA event: {e:?}"));
        match copied {
            Ok(copied) => Ok(Self {
                host: host.cast(),
                copied,
            }),
            Err(e) => {
                let _ = unsafe { result::free_host(host) };
                Err(e)
            }
        }
    }
}

/// Bytes per staging buffer: large enough that each copy runs at full link speed, small enough
/// that the two buffers cost little pinned memory.
const STAGING_BYTES: usize = 64 << 20;

// The raw handle and pointers are used only under the mutex that owns them.
unsafe impl Send for DeviceContext {}

/// 32 MiB, NVIDIA's recommendation for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Algorithms asked of cuBLASLt's heuristic for each new GEMM shape.
const GEMM_CANDIDATES: usize = 8;

/// Whether each new GEMM shape times the heuristic's candidates and keeps the fastest
/// (`DMS_RETROFIT_GEMM_TUNE=1`; off by default until measured on a GPU: `bench linear` timed some
/// [4096 x 4096 x 4096] products at half the speed of others of the same size, and the LM head's
/// input gradient 13% below its forward, but with a wait after every call, which may account for
/// the short ones).
/// Anything but `0` / `1` (or unset) is warned about once and means off.
fn gemm_tuning() -> bool {
    static TUNE: OnceLock<bool> = OnceLock::new();
    *TUNE.get_or_init(|| match std::env::var("DMS_RETROFIT_GEMM_TUNE") {
        Ok(v) if v == "1" => true,
        Ok(v) if v.is_empty() || v == "0" => false,
        Ok(other) => {
            tracing::warn!("DMS_RETROFIT_GEMM_TUNE={other:?} is not 0 or 1; GEMM timing stays off");
            false
        }
        Err(_) => false,
    })
}

/// What we keep per GPU: our context (behind its lock), the queue of cubecl's device thread
/// for that GPU (the one its compute client submits to), and whether our kernels compiled
/// (known without taking the context's lock, which queued work holds).
struct Gpu {
    context: Mutex<DeviceContext>,
    queue: DeviceHandle<CudaServer>,
    kernels_compiled: OnceLock<Result<(), String>>,
}

/// Our state on GPU `ordinal`, made at its first use (or why our path is unavailable there).
fn gpu(ordinal: usize) -> Result<&'static Gpu, String> {
    type Gpus = Mutex<HashMap<usize, Result<&'static Gpu, String>>>;
    static GPUS: OnceLock<Gpus> = OnceLock::new();
    let mut gpus = GPUS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| "CUDA state poisoned".to_string())?;
    gpus.entry(ordinal)
        .or_insert_with(|| {
            if std::env::var("DMS_RETROFIT_GEMM").is_ok_and(|v| v.eq_ignore_ascii_case("burn")) {
                return Err("DMS_RETROFIT_GEMM=burn".into());
            }
            let context = DeviceContext::new(ordinal)?;
            tracing::info!(gpu = ordinal, "linear layers and attention use cuBLASLt");
            Ok(&*Box::leak(Box::new(Gpu {
                context: Mutex::new(context),
                queue: DeviceHandle::new(CudaDevice::new(ordinal).to_id()),
                kernels_compiled: OnceLock::new(),
            })))
        })
        .clone()
}

impl DeviceContext {
    fn new(ordinal: usize) -> Result<Self, String> {
        // cudarc panics when the library is missing; ask first.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcublasLt.so not found (add the CUDA toolkit's or torch's nvidia/cu*/lib folder to LD_LIBRARY_PATH)".into());
        }
        // The primary context, the one cubecl retains: same address space.
        let context = CudaContext::new(ordinal).map_err(|e| format!("CUDA context: {e:?}"))?;
        // Replaced by cubecl's stream at the first hand-off (`use_stream`).
        let stream = context.default_stream();
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        let workspace = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }
            .map_err(|e| format!("cuBLASLt workspace: {e:?}"))?;
        Ok(Self {
            context,
            stream,
            handle,
            workspace,
            algos: HashMap::new(),
            kernels: None,
            scratch: Vec::new(),
            staging: Vec::new(),
            next_staging: 0,
        })
    }

    /// Fills `len` bytes at device address `dst` on the current stream, chunk by chunk through the
    /// two pinned staging buffers: while the DMA engine reads one, the host fills the other, split
    /// over the CPU's threads in parts of whole `width`-byte values (`fill(part, offset of the
    /// part in the `len` bytes)`). Returns when the last chunk is queued, or at the first error of
    /// `fill` (the inner error; `dst` then holds part of the data); the copies are ordered before
    /// any later work on the stream.
    fn upload_with<E: Send>(
        &mut self,
        dst: u64,
        len: usize,
        width: usize,
        fill: impl Fn(&mut [u8], usize) -> Result<(), E> + Sync,
    ) -> Result<Result<(), E>, String> {
        use cudarc::driver::result;
        while self.staging.len() < 2 {
            self.staging.push(Staging::new()?);
        }
        let stream = self.stream.cu_stream();
        for start in (0..len).step_by(STAGING_BYTES) {
            let chunk = STAGING_BYTES.min(len - start);
            // Alternating across calls too: a small tensor after another need not wait for the
            // copy out of the buffer the previous one used.
            self.next_staging = (self.next_staging + 1) % 2;
            let staging = &self.staging[self.next_staging];
            // SAFETY: the event follows the previous copy out of this buffer (or was never
            // recorded, which returns at once); after it the buffer is ours to overwrite.
            unsafe { result::event::synchronize(staging.copied) }
                .map_err(|e| format!("waiting for a staging copy: {e:?}"))?;
            // SAFETY: `host` holds STAGING_BYTES >= chunk bytes that no copy reads now.
            let host = unsafe { std::slice::from_raw_parts_mut(staging.host, chunk) };
            // Split over the CPU's threads: one thread copies ~5-10 GB/s, below PCIe's speed.
            let filled = crate::parallel::fill_parts(host, width, 4 << 20, |part, at| {
                fill(part, start + at)
            });
            if let Err(e) = filled {
                return Ok(Err(e));
            }
            // SAFETY: `dst + start .. + chunk` lies in the caller's buffer of `len` bytes; `host`
            // stays allocated and untouched until the event below.
            unsafe {
                result::memcpy_htod_async(dst + start as u64, &*host, stream)
                    .map_err(|e| format!("host-to-device copy: {e:?}"))?;
                result::event::record(staging.copied, stream)
                    .map_err(|e| format!("CUDA event: {e:?}"))?;
            }
        }
        Ok(Ok(()))
    }

    /// Makes `stream` (cubecl's current stream, from the patched `GpuResource`) the one we
    /// enqueue on. One host thread drives a GPU, so it changes only at the first call; if it ever
    /// does again, the previous stream is drained first because the workspace and scratch
    /// buffers are shared.
    fn use_stream(&mut self, stream: cudarc::driver::sys::CUstream) -> Result<(), String> {
        if stream.is_null() {
            return Err("cubecl-cuda does not expose its stream (build with the vendored, patched copy: vendor/cubecl-cuda)".into());
        }
        if self.stream.cu_stream() != stream {
            self.stream
                .synchronize()
                .map_err(|e| format!("draining the previous stream: {e:?}"))?;
            // SAFETY: cubecl created this stream in our (primary) context and keeps it for the
            // device's lifetime; the wrapper does not destroy it.
            self.stream = unsafe { self.context.wrap_borrowed_stream(stream) };
        }
        Ok(())
    }

    /// Device memory of at least `bytes` for scratch slot `slot`, kept and grown across calls.
    /// Safe to reuse: all our work is ordered on one stream. Growing it waits for that stream
    /// before freeing the old buffer, which queued work may still use.
    fn scratch(&mut self, slot: usize, bytes: usize) -> Result<u64, String> {
        while self.scratch.len() <= slot {
            self.scratch.push((0, 0));
        }
        let (ptr, size) = self.scratch[slot];
        if size >= bytes {
            return Ok(ptr);
        }
        if ptr != 0 {
            self.stream
                .synchronize()
                .map_err(|e| format!("waiting before growing scratch: {e:?}"))?;
            // Forget the buffer first: if the new allocation fails, a later smaller request
            // must not get the freed address back.
            self.scratch[slot] = (0, 0);
            unsafe { cudarc::driver::result::free_sync(ptr) }
                .map_err(|e| format!("freeing scratch: {e:?}"))?;
        }
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes) }
            .map_err(|e| format!("scratch of {bytes} bytes: {e:?}"))?;
        self.scratch[slot] = (ptr, bytes);
        Ok(ptr)
    }

    /// Enqueues one (batched) GEMM on the current stream.
    fn gemm(&mut self, g: &Gemm) -> Result<(), String> {
        let ab_type = data_type(g.a.dtype).ok_or("unsupported dtype")?;
        let c_type = data_type(g.c.dtype).ok_or("unsupported dtype")?;
        if g.a.dtype != g.b.dtype {
            return Err(format!(
                "GEMM operands of different dtypes ({:?}, {:?})",
                g.a.dtype, g.b.dtype
            ));
        }
        let err = |what: &'static str| move |e: lt::CublasError| format!("{what}: {e:?}");
        // cuBLAS is column-major, where each row-major matrix reads as its transpose: it computes
        // Cᵀ = op(B)ᵀ · op(A)ᵀ, so B's storage is its first operand.
        let (m, n) = (g.c.cols, g.c.rows);
        let k = if g.a_transposed { g.a.rows } else { g.a.cols };
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(err("matmul descriptor"))?,
        );
        for (attr, trans) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                g.b_transposed,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                g.a_transposed,
            ),
        ] {
            let op: i32 = trans.into();
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc.0,
                    attr,
                    (&op as *const i32).cast(),
                    size_of::<i32>(),
                )
            }
            .map_err(err("transpose attribute"))?;
        }
        let layout = |mat: &Matrix, dtype| -> Result<Layout, String> {
            let layout = Layout(
                lt::create_matrix_layout(dtype, mat.cols as u64, mat.rows as u64, mat.ld as i64)
                    .map_err(err("matrix layout"))?,
            );
            if g.batch > 1 {
                use sys::cublasLtMatrixLayoutAttribute_t as A;
                let count = g.batch as i32;
                let stride = mat.batch_stride as i64;
                unsafe {
                    lt::set_matrix_layout_attribute(
                        layout.0,
                        A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count as *const i32).cast(),
                        size_of::<i32>(),
                    )
                    .map_err(err("batch count"))?;
                    lt::set_matrix_layout_attribute(
                        layout.0,
                        A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride as *const i64).cast(),
                        size_of::<i64>(),
                    )
                    .map_err(err("batch stride"))?;
                }
            }
            Ok(layout)
        };
        let first = layout(&g.b, ab_type)?;
        let second = layout(&g.a, ab_type)?;
        let out = layout(&g.c, c_type)?;
        let key = AlgoKey {
            types: (ab_type, c_type),
            trans: (g.b_transposed, g.a_transposed),
            mnk: (m, n, k),
            lds: (g.b.ld, g.a.ld, g.c.ld),
            batch: (
                g.batch,
                g.b.batch_stride,
                g.a.batch_stride,
                g.c.batch_stride,
            ),
            align: (alignment(g.b.ptr), alignment(g.a.ptr), alignment(g.c.ptr)),
        };
        let algo = match self.algos.get(&key) {
            Some(algo) => *algo,
            None => {
                let candidates = self.algo_candidates(&desc, &first, &second, &out, key.align)?;
                // Timing writes C, so only where the GEMM overwrites it anyway.
                let algo = if candidates.len() > 1 && g.beta == 0.0 && gemm_tuning() {
                    self.fastest_algo(&candidates, key.mnk, |algo| {
                        self.matmul(g, &desc, [&first, &second, &out], algo)
                    })?
                } else {
                    candidates[0]
                };
                self.algos.insert(key, algo);
                algo
            }
        };
        self.matmul(g, &desc, [&first, &second, &out], &algo)
    }

    /// Enqueues `g` with `algo` (layouts: B's storage, A's, C's; see [`Self::gemm`]).
    fn matmul(
        &self,
        g: &Gemm,
        desc: &Desc,
        [first, second, out]: [&Layout; 3],
        algo: &sys::cublasLtMatmulAlgo_t,
    ) -> Result<(), String> {
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&g.alpha as *const f32).cast(),
                (&g.beta as *const f32).cast(),
                g.b.ptr as *const c_void,
                first.0,
                g.a.ptr as *const c_void,
                second.0,
                g.c.ptr as *const c_void,
                out.0,
                g.c.ptr as *mut c_void,
                out.0,
                algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream().cast(),
            )
        }
        .map_err(|e| format!("cublasLtMatmul: {e:?}"))
    }

    /// cuBLASLt's heuristic's best algorithms for this GEMM (at most [`GEMM_CANDIDATES`], best
    /// first, at least one).
    fn algo_candidates(
        &self,
        desc: &Desc,
        first: &Layout,
        second: &Layout,
        out: &Layout,
        (align_first, align_second, align_out): (u32, u32, u32),
    ) -> Result<Vec<sys::cublasLtMatmulAlgo_t>, String> {
        use sys::cublasLtMatmulPreferenceAttributes_t as A;
        let pref = Pref(lt::create_matmul_pref().map_err(|e| format!("preference: {e:?}"))?);
        let set = |attr, value: *const c_void, size| unsafe {
            lt::set_matmul_pref_attribute(pref.0, attr, value, size)
                .map_err(|e| format!("preference attribute: {e:?}"))
        };
        let workspace = WORKSPACE_BYTES as u64;
        set(
            A::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&workspace as *const u64).cast(),
            size_of::<u64>(),
        )?;
        for (attr, align) in [
            (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_first),
            (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_second),
            (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_out),
            (A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_out),
        ] {
            set(attr, (&align as *const u32).cast(), size_of::<u32>())?;
        }
        // SAFETY: plain data the heuristic fills (up to `requested` entries).
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; GEMM_CANDIDATES];
        let mut found = 0i32;
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc.0,
                first.0,
                second.0,
                out.0,
                out.0,
                pref.0,
                GEMM_CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut found,
            )
            .result()
        }
        .map_err(|e| format!("no cuBLASLt algorithm for this shape: {e:?}"))?;
        let candidates: Vec<_> = results
            .iter()
            .take(found.max(0) as usize)
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if candidates.is_empty() {
            return Err("no cuBLASLt algorithm for this shape".into());
        }
        Ok(candidates)
    }

    /// The candidate whose `run` (one GEMM on the call's own operands) takes least GPU time:
    /// each is run once to warm up, then timed over three runs with events on our stream. Waits
    /// for the stream (once per new GEMM shape). A candidate that fails to launch is skipped;
    /// the heuristic's first is kept where none could be timed.
    fn fastest_algo(
        &self,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        (m, n, k): (usize, usize, usize),
        run: impl Fn(&sys::cublasLtMatmulAlgo_t) -> Result<(), String>,
    ) -> Result<sys::cublasLtMatmulAlgo_t, String> {
        use cudarc::driver::{result::event, sys::CUevent_flags};
        let stream = self.stream.cu_stream();
        let events = (
            event::create(CUevent_flags::CU_EVENT_DEFAULT),
            event::create(CUevent_flags::CU_EVENT_DEFAULT),
        );
        let (start, end) = match events {
            (Ok(start), Ok(end)) => (start, end),
            (start, end) => {
                for e in [start, end].into_iter().flatten() {
                    // SAFETY: created above, never recorded.
                    let _ = unsafe { event::destroy(e) };
                }
                return Ok(candidates[0]);
            }
        };
        let time = |algo| -> Result<f32, String> {
            run(algo)?;
            // SAFETY: events and stream are live; the elapsed time is read after `end` completes.
            unsafe {
                event::record(start, stream).map_err(|e| format!("{e:?}"))?;
                for _ in 0..3 {
                    run(algo)?;
                }
                event::record(end, stream).map_err(|e| format!("{e:?}"))?;
                event::synchronize(end).map_err(|e| format!("{e:?}"))?;
                event::elapsed(start, end).map_err(|e| format!("{e:?}"))
            }
        };
        let times: Vec<Option<f32>> = candidates.iter().map(|algo| time(algo).ok()).collect();
        let mut best = (f32::INFINITY, 0);
        for (i, ms) in times.iter().enumerate() {
            if let Some(ms) = *ms
                && ms < best.0
            {
                best = (ms, i);
            }
        }
        // Which algorithm runs can differ between runs (timing noise): say which and by how much.
        tracing::debug!(
            m,
            n,
            k,
            chosen = best.1,
            chosen_ms = best.0 / 3.0,
            heuristic_first_ms = times[0].map(|ms| ms / 3.0),
            candidates = candidates.len(),
            "GEMM algorithm timed"
        );
        // SAFETY: both completed (synchronized above) or were never recorded.
        unsafe {
            let _ = event::synchronize(end);
            let _ = event::destroy(start);
            let _ = event::destroy(end);
        }
        Ok(candidates[best.1])
    }

    /// The NVRTC-compiled kernels, compiled on first use.
    fn kernels(&mut self) -> Result<&Kernels, String> {
        if self.kernels.is_none() {
            self.kernels = Some(Kernels::compile(&self.context));
        }
        match self.kernels.as_ref() {
            Some(Ok(kernels)) => Ok(kernels),
            Some(Err(why)) => Err(why.clone()),
            None => unreachable!("compiled above"),
        }
    }

    /// Launches `function` on the current stream with `args` (device addresses and integers).
    fn launch(
        &self,
        function: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[KernelArg],
    ) -> Result<(), String> {
        self.launch_with_shared(function, grid, block, 0, args)
    }

    /// [`Self::launch`] with `shared_bytes` of dynamic shared memory.
    fn launch_with_shared(
        &self,
        function: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), String> {
        if grid.0 == 0 || grid.1 > 65_535 || grid.2 > 65_535 {
            return Err(format!("grid {grid:?} outside CUDA's limits"));
        }
        let mut launch = self.stream.launch_builder(function);
        for arg in args {
            match arg {
                KernelArg::Pointer(p) => launch.arg(p),
                KernelArg::Int(i) => launch.arg(i),
                KernelArg::Long(i) => launch.arg(i),
                KernelArg::Float(f) => launch.arg(f),
            };
        }
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: grid,
                block_dim: (block, 1, 1),
                shared_mem_bytes: shared_bytes,
            })
        }
        .map(|_| ())
        .map_err(|e| format!("kernel launch: {e:?}"))
    }

    /// Zeroes `bytes` at `ptr` on the current stream.
    fn zero(&self, ptr: u64, bytes: usize) -> Result<(), String> {
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| format!("memset: {e:?}"))
    }
}

#[derive(Clone)]
enum KernelArg {
    Pointer(u64),
    Int(i32),
    /// 64-bit integers (`long long` or `index_t` parameters).
    Long(i64),
    Float(f32),
}

/// One kernel compiled for each activation type.
struct Typed {
    bf16: CudaFunction,
    f32: CudaFunction,
}

impl Typed {
    /// The variant for `dtype` (bf16 or f32; callers check).
    fn of(&self, dtype: DType) -> CudaFunction {
        match dtype {
            DType::BF16 => self.bf16.clone(),
            _ => self.f32.clone(),
        }
    }
}

/// The activation dtypes the kernels are compiled for.
fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F32)
}

/// The NVRTC kernels: `common.cu` helpers, `softmax.cu` and `flash.cu` (attention) and
/// `elementwise.cu`.
struct Kernels {
    softmax_rows: Typed,
    attention_grad_rows: Typed,
    bias_grad_columns: CudaFunction,
    rms_norm_rows: Typed,
    rms_norm_grad_rows: Typed,
    swiglu: Typed,
    swiglu_grads: Typed,
    rope: Typed,
    attention_delta_rows: Typed,
    kl_rows: Typed,
    kl_student_grad_rows: Typed,
    /// bf16 only, head_dim 64 and 128.
    flash_forward_d64: CudaFunction,
    flash_forward_d128: CudaFunction,
    /// 128 query rows per block (`flash_forward<D, 2>`), Q in shared memory; head_dim 128 only
    /// for now (the 64 variant is unchecked on a GPU).
    flash_forward_wide_d128: CudaFunction,
    flash_backward_kv_d64: CudaFunction,
    flash_backward_kv_d128: CudaFunction,
    flash_backward_q_d64: CudaFunction,
    flash_backward_q_d128: CudaFunction,
    /// The wgmma kernels of `flash_hopper.cu` (head_dim 128), on compute capability 9.0 only.
    hopper: Option<HopperKernels>,
}

/// `flash_hopper.cu`'s forward and backward kernels.
struct HopperKernels {
    forward: CudaFunction,
    backward_kv: CudaFunction,
    backward_q: CudaFunction,
}

impl Kernels {
    fn compile(context: &Arc<CudaContext>) -> Result<Self, String> {
        use cudarc::driver::sys::CUdevice_attribute as Attr;
        let capability = |attr| context.attribute(attr).unwrap_or(0);
        let arch = match (
            capability(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            capability(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        ) {
            (8, 0) => "compute_80",
            (8, 6) => "compute_86",
            (8, 9) => "compute_89",
            // The arch-specific target: the wgmma kernels of flash_hopper.cu (H100 / H200).
            (9, 0) => "compute_90a",
            (9, _) => "compute_90",
            (10, _) => "compute_100",
            (12, _) => "compute_120",
            // PTX for the oldest architecture CUDA 13 supports; the driver compiles it forward.
            _ => "compute_75",
        };
        let options = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            ..Default::default()
        };
        let source = [
            include_str!("common.cu"),
            include_str!("softmax.cu"),
            include_str!("elementwise.cu"),
            include_str!("flash.cu"),
            include_str!("flash_hopper.cu"),
        ]
        .join("\n");
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options)
            .map_err(|e| format!("NVRTC compiling the kernels (src/model/cuda/*.cu): {e:?}"))?;
        let module = context
            .load_module(ptx)
            .map_err(|e| format!("loading the kernels: {e:?}"))?;
        let function = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| format!("kernel {name}: {e:?}"))
        };
        let typed = |name: &str| -> Result<Typed, String> {
            Ok(Typed {
                bf16: function(&format!("{name}_bf16"))?,
                f32: function(&format!("{name}_f32"))?,
            })
        };
        Ok(Self {
            softmax_rows: typed("softmax_rows")?,
            attention_grad_rows: typed("attention_grad_rows")?,
            bias_grad_columns: function("bias_grad_columns")?,
            rms_norm_rows: typed("rms_norm_rows")?,
            rms_norm_grad_rows: typed("rms_norm_grad_rows")?,
            swiglu: typed("swiglu")?,
            swiglu_grads: typed("swiglu_grads")?,
            rope: typed("rope")?,
            attention_delta_rows: typed("attention_delta_rows")?,
            kl_rows: typed("kl_rows")?,
            kl_student_grad_rows: typed("kl_student_grad_rows")?,
            flash_forward_d64: with_shared(
                function("flash_forward_d64")?,
                flash_tile_shared_bytes(64),
            )?,
            flash_forward_d128: with_shared(
                function("flash_forward_d128")?,
                flash_tile_shared_bytes(128),
            )?,
            flash_forward_wide_d128: with_shared(
                function("flash_forward_wide_d128")?,
                flash_wide_shared_bytes(128),
            )?,
            flash_backward_kv_d64: function("flash_backward_kv_d64")?,
            flash_backward_kv_d128: function("flash_backward_kv_d128")?,
            flash_backward_q_d64: with_shared(
                function("flash_backward_q_d64")?,
                flash_tile_shared_bytes(64),
            )?,
            flash_backward_q_d128: with_shared(
                function("flash_backward_q_d128")?,
                flash_tile_shared_bytes(128),
            )?,
            hopper: match arch {
                "compute_90a" => Some(HopperKernels {
                    forward: with_shared(
                        function("flash_forward_hopper_d128")?,
                        HOPPER_FORWARD_SHARED,
                    )?,
                    backward_kv: with_shared(
                        function("flash_backward_kv_hopper_d128")?,
                        HOPPER_BACKWARD_KV_SHARED,
                    )?,
                    backward_q: with_shared(
                        function("flash_backward_q_hopper_d128")?,
                        HOPPER_BACKWARD_Q_SHARED,
                    )?,
                }),
                _ => None,
            },
        })
    }
}

/// Dynamic shared memory of the flash kernels that stream K/V tiles (`for_each_kv_tile` in
/// `flash.cu`: the forward and the dQ backward) at `head_dim`: two buffers of a K and a V tile
/// (64 keys, rows padded by 8 halves) and two bias tiles.
pub(crate) fn flash_tile_shared_bytes(head_dim: usize) -> u32 {
    (4 * 64 * (head_dim + 8) * 2 + 2 * 64 * 4) as u32
}

/// Dynamic shared memory of the wide forward (`flash_forward<D, 2>`): the K/V tile buffers of
/// [`flash_tile_shared_bytes`], then the block's 128 query rows (padded like the tiles).
pub(crate) fn flash_wide_shared_bytes(head_dim: usize) -> u32 {
    flash_tile_shared_bytes(head_dim) + (128 * (head_dim + 8) * 2) as u32
}

/// Dynamic shared memory of `flash_hopper.cu`'s kernels (3 stages, bf16, head_dim 128), each
/// with 1 KB of slack for aligning the swizzled tiles to 1024 bytes. Forward: two warpgroups' Q
/// tiles (64 x 128), per stage a K and a V tile (128 x 128) and 128 bias values.
pub(crate) const HOPPER_FORWARD_SHARED: u32 =
    1024 + 2 * 64 * 128 * 2 + 3 * (2 * 128 * 128 * 2 + 128 * 4);
/// dK/dV: K and V tiles (128 x 128), per stage Q and dO tiles (64 x 128), 64 lse and delta values.
pub(crate) const HOPPER_BACKWARD_KV_SHARED: u32 =
    1024 + 2 * 128 * 128 * 2 + 3 * (2 * 64 * 128 * 2 + 2 * 64 * 4);
/// dQ: two warpgroups' Q and dO tiles (64 x 128), per stage K and V tiles (64 x 128), 64 biases.
pub(crate) const HOPPER_BACKWARD_Q_SHARED: u32 =
    1024 + 4 * 64 * 128 * 2 + 3 * (2 * 64 * 128 * 2 + 64 * 4);

/// Lets `function` use `bytes` of dynamic shared memory (above 48 KB needs the opt-in).
fn with_shared(function: CudaFunction, bytes: u32) -> Result<CudaFunction, String> {
    use cudarc::driver::sys::CUfunction_attribute_enum as A;
    function
        .set_attribute(
            A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| format!("shared memory of {bytes} bytes: {e:?}"))?;
    Ok(function)
}

/// Owners that free cuBLASLt descriptors.
struct Desc(sys::cublasLtMatmulDesc_t);
struct Layout(sys::cublasLtMatrixLayout_t);
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Desc {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}
