//! The linear layers' GEMMs on CUDA through cuBLASLt instead of burn-cuda's generated kernels.
//!
//! Why: burn-cuda 0.21 (cubecl 0.10) emits tensor-core code only as `mma.sync`, never Hopper's
//! `wgmma`, and its bf16 GEMM measured 0.24-0.31x cuBLAS on an H200; a DMS step is GEMM-bound
//! (docs/performance.md). cuBLASLt is loaded at run time (`libcublasLt.so`, through cudarc); where
//! it is missing, or `DMS_RETROFIT_GEMM=burn` is set, the layers fall back to burn's matmul.
//!
//! Hand-off: cubecl keeps its CUDA stream private, so each GEMM waits for cubecl's queued work
//! (`client.sync()`), runs on our own stream, and waits for it before the output tensor is
//! returned. Two host round-trips per GEMM (tens of µs) against GEMMs of 0.1-2 ms at the shapes we
//! train. Exposing cubecl's stream (a patched cubecl-cuda) would remove both waits.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::future::block_on;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaContext, CudaStream};

use crate::backend::Cuda;

type Cube = CubeTensor<CudaRuntime>;

/// A tensor seen as a row-major matrix: its leading dimensions stacked into rows.
struct Rows {
    tensor: Cube,
    rows: usize,
    cols: usize,
    /// Elements between the starts of consecutive rows (≥ `cols`; burn-cuda pitches rows).
    ld: usize,
}

impl Rows {
    fn new(tensor: Cube) -> Self {
        let shape = tensor.meta.shape().to_vec();
        let cols = shape.last().copied().unwrap_or(1);
        let rows = shape.iter().rev().skip(1).product::<usize>();
        if let Some(ld) = super::linear::row_stride(&shape, tensor.meta.strides()) {
            return Self {
                tensor,
                rows,
                cols,
                ld,
            };
        }
        // A contiguous tensor (size-1 axes may carry any stride) has rows `cols` apart.
        Self {
            tensor: into_contiguous(tensor),
            rows,
            cols,
            ld: cols.max(1),
        }
    }
}

/// Which GEMM of a linear layer.
#[derive(Debug, Clone, Copy)]
pub enum LinearGemm {
    /// `y[M,N] = x[M,K] · W[N,K]ᵀ`
    Forward,
    /// `dx[M,K] = dy[M,N] · W[N,K]`
    InputGrad,
    /// `dW[N,K] = dy[M,N]ᵀ · x[M,K]`
    WeightGrad,
}

/// Runs one of the linear layer's GEMMs through cuBLASLt: `a` and `b` are the operands in the
/// order of [`LinearGemm`]'s formulas. The result has `a`'s leading dimensions (forward, input
/// gradient) or is `[N, K]` (weight gradient). `None` (nothing run) where cuBLASLt is unavailable
/// or the dtypes are not f32/f16/bf16 pairs; the caller then uses burn's matmul.
pub fn linear_gemm(which: LinearGemm, a: Cube, b: Cube) -> Option<Cube> {
    if a.dtype != b.dtype || data_type(a.dtype).is_none() || a.device != b.device {
        return None;
    }
    let ordinal = a.device.index;
    let a_shape = a.meta.shape().to_vec();
    let (a, b) = (Rows::new(a), Rows::new(b));
    // Row-major C[M,N] = op(A)[M,K] · op(B)[K,N]; `a_t`/`b_t` say whether op transposes.
    let (a_t, b_t, m, n, k, out_shape) = match which {
        LinearGemm::Forward => {
            let mut shape = a_shape;
            *shape.last_mut()? = b.rows;
            (false, true, a.rows, b.rows, a.cols, shape)
        }
        LinearGemm::InputGrad => {
            let mut shape = a_shape;
            *shape.last_mut()? = b.cols;
            (false, false, a.rows, b.cols, a.cols, shape)
        }
        LinearGemm::WeightGrad => (true, false, a.cols, b.cols, a.rows, vec![a.cols, b.cols]),
    };
    let inner_b = if b_t { b.cols } else { b.rows };
    if k != inner_b || m == 0 || n == 0 {
        return None;
    }
    let context = match gemm_context(ordinal) {
        Ok(context) => context,
        Err(why) => {
            fallback_once(&why);
            return None;
        }
    };
    let mut context = context.lock().ok()?;
    let out = empty_device_contiguous_dtype(
        a.tensor.client.clone(),
        a.tensor.device.clone(),
        Shape::from(out_shape),
        a.tensor.dtype,
    );
    let client = a.tensor.client.clone();
    // cubecl's queued work (producers of a and b, and the output's allocation) must be done
    // before our stream reads them.
    if let Err(e) = block_on(client.sync()) {
        fallback_once(&format!("cubecl sync failed: {e:?}"));
        return None;
    }
    let res_a = client.get_resource(a.tensor.handle.clone()).ok()?;
    let res_b = client.get_resource(b.tensor.handle.clone()).ok()?;
    let res_c = client.get_resource(out.handle.clone()).ok()?;
    let problem = Problem {
        dtype: a.tensor.dtype,
        // Column-major cuBLAS sees each row-major matrix transposed, so it computes
        // Cᵀ[N,M] = op(B)ᵀ · op(A)ᵀ: B's storage is its first operand.
        trans_first: b_t,
        trans_second: a_t,
        m: n,
        n: m,
        k,
        first: Operand::of(&b, res_b.resource().ptr),
        second: Operand::of(&a, res_a.resource().ptr),
        out: res_c.resource().ptr,
        ldc: n,
    };
    if let Err(why) = context.run(&problem) {
        fallback_once(&why);
        return None;
    }
    // Keep the resources (and so the buffers) alive until the GEMM has finished.
    drop((res_a, res_b, res_c));
    Some(out)
}

/// Convenience for callers holding `burn` tensors.
pub fn linear_gemm_tensors<const DA: usize, const DB: usize, const DO: usize>(
    which: LinearGemm,
    a: Tensor<Cuda, DA>,
    b: Tensor<Cuda, DB>,
) -> Option<Tensor<Cuda, DO>> {
    let cube = |t: TensorPrimitive<Cuda>| t.tensor();
    let out = linear_gemm(which, cube(a.into_primitive()), cube(b.into_primitive()))?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
    match dtype {
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        _ => None,
    }
}

/// One stored matrix as cuBLAS (column-major) sees it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct Operand {
    ptr: u64,
    /// Column-major rows = the row-major matrix's columns.
    rows: usize,
    cols: usize,
    ld: usize,
}

impl Operand {
    fn of(m: &Rows, ptr: u64) -> Self {
        Self {
            ptr,
            rows: m.cols,
            cols: m.rows,
            ld: m.ld,
        }
    }
}

struct Problem {
    dtype: DType,
    trans_first: bool,
    trans_second: bool,
    m: usize,
    n: usize,
    k: usize,
    first: Operand,
    second: Operand,
    out: u64,
    ldc: usize,
}

/// What the chosen algorithm depends on (pointers only through their alignment).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct AlgoKey {
    dtype: sys::cudaDataType,
    trans: (bool, bool),
    mnk: (usize, usize, usize),
    lds: (usize, usize, usize),
    align: (u32, u32, u32),
}

/// The largest power of two (≤ 256) dividing a device address; cuBLASLt's heuristic otherwise
/// assumes 256-byte alignment.
fn alignment(ptr: u64) -> u32 {
    1 << ptr.trailing_zeros().min(8)
}

/// cuBLASLt state for one GPU: a handle, our stream, a workspace and the algorithms chosen so far.
struct GemmContext {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    workspace_size: usize,
    algos: HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>,
}

// The raw handle and pointers are used only under the mutex that owns them.
unsafe impl Send for GemmContext {}

/// 32 MiB, NVIDIA's recommendation for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

fn gemm_context(ordinal: usize) -> Result<&'static Mutex<GemmContext>, String> {
    type Contexts = Mutex<HashMap<usize, Result<&'static Mutex<GemmContext>, String>>>;
    static CONTEXTS: OnceLock<Contexts> = OnceLock::new();
    let mut contexts = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| "cuBLASLt state poisoned".to_string())?;
    contexts
        .entry(ordinal)
        .or_insert_with(|| {
            if std::env::var("DMS_RETROFIT_GEMM").is_ok_and(|v| v.eq_ignore_ascii_case("burn")) {
                return Err("DMS_RETROFIT_GEMM=burn".into());
            }
            let context = GemmContext::new(ordinal)?;
            tracing::info!(gpu = ordinal, "linear layers use cuBLASLt");
            Ok(&*Box::leak(Box::new(Mutex::new(context))))
        })
        .clone()
}

/// Says once, at warn level, why burn's GEMM is used instead.
fn fallback_once(why: &str) {
    static SAID: OnceLock<()> = OnceLock::new();
    SAID.get_or_init(|| {
        if why.starts_with("DMS_RETROFIT_GEMM") {
            tracing::info!("linear layers use burn's GEMM ({why})");
        } else {
            tracing::warn!("linear layers use burn's GEMM: {why}");
        }
    });
}

impl GemmContext {
    fn new(ordinal: usize) -> Result<Self, String> {
        // cudarc panics when the library is missing; ask first.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcublasLt.so not found (add the CUDA toolkit's or torch's nvidia/cu*/lib folder to LD_LIBRARY_PATH)".into());
        }
        // The primary context, the one cubecl retains: same address space.
        let context = CudaContext::new(ordinal).map_err(|e| format!("CUDA context: {e:?}"))?;
        let stream = context
            .new_stream()
            .map_err(|e| format!("CUDA stream: {e:?}"))?;
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        let workspace = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }
            .map_err(|e| format!("cuBLASLt workspace: {e:?}"))?;
        Ok(Self {
            context,
            stream,
            handle,
            workspace,
            workspace_size: WORKSPACE_BYTES,
            algos: HashMap::new(),
        })
    }

    fn run(&mut self, p: &Problem) -> Result<(), String> {
        self.context
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e:?}"))?;
        let dtype = data_type(p.dtype).ok_or("unsupported dtype")?;
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let err = |what: &'static str| move |e: lt::CublasError| format!("{what}: {e:?}");
        let desc = Desc(
            lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)
                .map_err(err("matmul descriptor"))?,
        );
        let set_trans = |attr, trans: bool| {
            let op: i32 = trans.into();
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc.0,
                    attr,
                    (&op as *const i32).cast(),
                    size_of::<i32>(),
                )
            }
            .map_err(err("transpose attribute"))
        };
        set_trans(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            p.trans_first,
        )?;
        set_trans(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            p.trans_second,
        )?;
        let layout = |rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64)
                .map(Layout)
                .map_err(err("matrix layout"))
        };
        let first = layout(p.first.rows, p.first.cols, p.first.ld)?;
        let second = layout(p.second.rows, p.second.cols, p.second.ld)?;
        let out = layout(p.m, p.n, p.ldc)?;
        let key = AlgoKey {
            dtype,
            trans: (p.trans_first, p.trans_second),
            mnk: (p.m, p.n, p.k),
            lds: (p.first.ld, p.second.ld, p.ldc),
            align: (
                alignment(p.first.ptr),
                alignment(p.second.ptr),
                alignment(p.out),
            ),
        };
        let algo = match self.algos.get(&key) {
            Some(algo) => *algo,
            None => {
                let algo = self.choose_algo(&desc, &first, &second, &out, key.align)?;
                self.algos.insert(key, algo);
                algo
            }
        };
        let (alpha, beta) = (1f32, 0f32);
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                p.first.ptr as *const c_void,
                first.0,
                p.second.ptr as *const c_void,
                second.0,
                p.out as *const c_void,
                out.0,
                p.out as *mut c_void,
                out.0,
                &algo,
                self.workspace as *mut c_void,
                self.workspace_size,
                self.stream.cu_stream().cast(),
            )
        }
        .map_err(err("cublasLtMatmul"))?;
        self.stream
            .synchronize()
            .map_err(|e| format!("waiting for cuBLASLt: {e:?}"))
    }

    fn choose_algo(
        &self,
        desc: &Desc,
        first: &Layout,
        second: &Layout,
        out: &Layout,
        (align_first, align_second, align_out): (u32, u32, u32),
    ) -> Result<sys::cublasLtMatmulAlgo_t, String> {
        let pref = Pref(lt::create_matmul_pref().map_err(|e| format!("preference: {e:?}"))?);
        let set = |attr, value: u64| unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                attr,
                (&value as *const u64).cast(),
                size_of::<u64>(),
            )
            .map_err(|e| format!("preference attribute: {e:?}"))
        };
        use sys::cublasLtMatmulPreferenceAttributes_t as A;
        set(
            A::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            self.workspace_size as u64,
        )?;
        // The alignment attributes are 32-bit.
        let set32 = |attr, value: u32| unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                attr,
                (&value as *const u32).cast(),
                size_of::<u32>(),
            )
            .map_err(|e| format!("preference attribute: {e:?}"))
        };
        set32(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_first)?;
        set32(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_second)?;
        set32(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_out)?;
        set32(A::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_out)?;
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(
                self.handle,
                desc.0,
                first.0,
                second.0,
                out.0,
                out.0,
                pref.0,
            )
        }
        .map_err(|e| format!("no cuBLASLt algorithm for this shape: {e:?}"))?;
        Ok(heuristic.algo)
    }
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
