//! Launches of the fused kernels in `worker/kernels/bert.cu` (PTX built by `build.rs`)
//! on candle CUDA tensors: everything of the packed BERT encoder between two matrix
//! products is one kernel (see the .cu file for what each computes).
//!
//! Rows are packed tokens; one `u32` index tensor carries the word ids, the position
//! rows and the sequence offsets (`cu`, `sequences + 1` entries) of a call ([`PackedIndex`]).
//! Biases and layer-norm parameters are f32 whatever the activations' type ([`param`]).

use std::ops::Range;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Device, Layout, Result, Storage, Tensor, bail};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bert.ptx"));
const MODULE: &str = "kestrel_bert";
/// Rows (warps) per block of the one-warp-per-row kernels.
const ROWS_PER_BLOCK: u32 = 4;
/// Threads per (sequence, head) block of the attention kernel: one query row each.
const ATTENTION_THREADS: u32 = 64;
/// Threads per sequence of the pooling kernel (`POOL_THREADS` in `bert.cu`).
const POOL_THREADS: u32 = 128;
/// The layer-norm kernels keep a row in one warp's registers: 32 lanes × 32 values.
pub const MAX_HIDDEN: usize = 1024;
/// Head widths the attention kernel is instantiated for.
pub const HEAD_DIMS: [usize; 2] = [32, 64];

/// `KESTREL_GEMM_REDUCED_PRECISION=1` lets cuBLAS reduce split products in the output
/// type (f16, bf16), as its default and PyTorch's do; without it every reduction stays f32.
pub const GEMM_REDUCED_PRECISION_ENV: &str = "KESTREL_GEMM_REDUCED_PRECISION";

/// Keeps cuBLAS's reductions in f32 on a CUDA device, unless
/// [`GEMM_REDUCED_PRECISION_ENV`] is `1`. Returns whether reduced precision is allowed.
pub fn set_gemm_precision(device: &Device) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::cublas::sys;
    let Device::Cuda(d) = device else {
        return Ok(false);
    };
    if std::env::var(GEMM_REDUCED_PRECISION_ENV).as_deref() == Ok("1") {
        return Ok(true);
    }
    let blas = d.cublas_handle();
    let mode = sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    // SAFETY: the handle is candle's live cuBLAS handle; setting its math mode changes only
    // how later products on it reduce.
    unsafe { sys::cublasSetMathMode(*blas.handle(), mode) }
        .result()
        .map_err(|e| candle_core::Error::Msg(format!("cublasSetMathMode: {e:?}")))?;
    Ok(false)
}

/// Storage types with kernels: f32, f16, bf16.
trait Element: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}
impl Element for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Element for half::f16 {
    const SUFFIX: &'static str = "f16";
}
impl Element for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => bail!("kestrel CUDA kernels: no kernels for {other:?}"),
        }
    };
}

/// The `u32` index of one packed call, uploaded once: `[ids (n) | position rows (n) | cu]`.
pub struct PackedIndex {
    pub tensor: Tensor,
    pub tokens: usize,
    pub sequences: usize,
}

impl PackedIndex {
    /// Packs padded rows (`mask` 1 for a row's leading real tokens) without their padding.
    /// Position `p` becomes row `position_base + p` of the combined embedding table.
    pub fn new(
        ids: &[u32],
        mask: &[u32],
        rows: usize,
        seq_len: usize,
        position_base: u32,
        device: &Device,
    ) -> Result<Self> {
        let lens: Vec<usize> = mask
            .chunks_exact(seq_len.max(1))
            .take(rows)
            .map(|m| m.iter().take_while(|&&v| v != 0).count())
            .collect();
        let tokens: usize = lens.iter().sum();
        let mut index = Vec::with_capacity(2 * tokens + rows + 1);
        for (r, &len) in lens.iter().enumerate() {
            index.extend_from_slice(&ids[r * seq_len..r * seq_len + len]);
        }
        for &len in &lens {
            index.extend((0..len as u32).map(|p| position_base + p));
        }
        let mut offset = 0u32;
        index.push(0);
        for &len in &lens {
            offset += len as u32;
            index.push(offset);
        }
        let n = index.len();
        Ok(PackedIndex {
            tensor: Tensor::from_vec(index, n, device)?,
            tokens,
            sequences: rows,
        })
    }

    fn ids(&self) -> Range<usize> {
        0..self.tokens
    }
    fn positions(&self) -> Range<usize> {
        self.tokens..2 * self.tokens
    }
    fn cu(&self) -> Range<usize> {
        2 * self.tokens..2 * self.tokens + self.sequences + 1
    }
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("kestrel CUDA kernels: tensor on {other:?}, not a CUDA device"),
    }
}

fn cuda(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("kestrel CUDA kernels: tensor not in CUDA memory"),
    }
}

/// The elements `range` (relative to the tensor's start) of a contiguous tensor.
fn view<'a, T: CudaDType>(
    s: &'a Storage,
    l: &Layout,
    range: Option<Range<usize>>,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("kestrel CUDA kernels: input is not contiguous")
    };
    let slice = T::as_cuda_slice(cuda(s)?)?;
    Ok(match range {
        None => slice.slice(start..end),
        Some(r) if start + r.end <= end => slice.slice(start + r.start..start + r.end),
        Some(r) => bail!(
            "kestrel CUDA kernels: range {r:?} beyond {} elements",
            end - start
        ),
    })
}

/// A bias or layer-norm parameter: f32 for every storage type (`bert.cu` says why).
fn param<'a>(s: &'a Storage, l: &Layout, t: &Tensor, what: &str) -> Result<CudaView<'a, f32>> {
    if t.dtype() != DType::F32 {
        bail!(
            "kestrel CUDA kernels: {what} is {:?}; parameters are f32",
            t.dtype()
        )
    }
    view::<f32>(s, l, None)
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: (usize, usize)) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(ROWS_PER_BLOCK), 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_hidden(cols: usize) -> Result<()> {
    if cols > MAX_HIDDEN {
        bail!("kestrel CUDA kernels: hidden size {cols} above {MAX_HIDDEN}")
    }
    Ok(())
}

/// `layer_norm(table[id] + table[position row])` per packed token: `[tokens, hidden]`.
pub fn embed_ln(
    index: &PackedIndex,
    table: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    by_dtype!(table.dtype(), embed_ln_t(index, table, gamma, beta, eps))
}

fn embed_ln_t<T: Element>(
    index: &PackedIndex,
    table: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (_, cols) = table.dims2()?;
    check_hidden(cols)?;
    let dev = cuda_device(table)?;
    let rows = index.tokens;
    let (is, il) = index.tensor.storage_and_layout();
    let (ts, tl) = table.storage_and_layout();
    let (gs, gl) = gamma.storage_and_layout();
    let (bs, bl) = beta.storage_and_layout();
    let ids = view::<u32>(&is, il, Some(index.ids()))?;
    let pos = view::<u32>(&is, il, Some(index.positions()))?;
    let (t, g, b) = (
        view::<T>(&ts, tl, None)?,
        param(&gs, gl, gamma, "layer-norm weight")?,
        param(&bs, bl, beta, "layer-norm bias")?,
    );
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(rows * cols)? };
    let func = dev.get_or_load_custom_func(&format!("embed_ln_{}", T::SUFFIX), MODULE, PTX)?;
    let (r, c) = (rows as i32, cols as i32);
    let mut builder = func.builder();
    builder
        .arg(&ids)
        .arg(&pos)
        .arg(&t)
        .arg(&g)
        .arg(&b)
        .arg(&out);
    builder.arg(&r).arg(&c).arg(&eps);
    // SAFETY: the arguments match the kernel's signature; sizes checked above.
    unsafe { builder.launch(rows_config(rows)) }.w()?;
    Ok(wrap(out, &dev, (rows, cols)))
}

/// `layer_norm(y + bias + residual)`, all `[rows, hidden]` but `bias`, `gamma`, `beta`
/// (`[hidden]`, f32).
pub fn bias_residual_ln(
    y: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    by_dtype!(
        y.dtype(),
        bias_residual_ln_t(y, bias, residual, gamma, beta, eps)
    )
}

fn bias_residual_ln_t<T: Element>(
    y: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (rows, cols) = y.dims2()?;
    check_hidden(cols)?;
    if residual.dims2()? != (rows, cols) {
        bail!(
            "kestrel CUDA kernels: residual {:?} against {:?}",
            residual.shape(),
            y.shape()
        )
    }
    let dev = cuda_device(y)?;
    let (ys, yl) = y.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let (rs, rl) = residual.storage_and_layout();
    let (gs, gl) = gamma.storage_and_layout();
    let (es, el) = beta.storage_and_layout();
    let yv = view::<T>(&ys, yl, None)?;
    let bv = param(&bs, bl, bias, "bias")?;
    let rv = view::<T>(&rs, rl, None)?;
    let gv = param(&gs, gl, gamma, "layer-norm weight")?;
    let ev = param(&es, el, beta, "layer-norm bias")?;
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(rows * cols)? };
    let name = format!("bias_residual_ln_{}", T::SUFFIX);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (r, c) = (rows as i32, cols as i32);
    let mut builder = func.builder();
    builder
        .arg(&yv)
        .arg(&bv)
        .arg(&rv)
        .arg(&gv)
        .arg(&ev)
        .arg(&out);
    builder.arg(&r).arg(&c).arg(&eps);
    // SAFETY: the arguments match the kernel's signature; sizes checked above.
    unsafe { builder.launch(rows_config(rows)) }.w()?;
    Ok(wrap(out, &dev, (rows, cols)))
}

/// `gelu_erf(x + bias)` for `x` of `[rows, cols]` (`bias` f32).
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    by_dtype!(x.dtype(), bias_gelu_t(x, bias))
}

fn bias_gelu_t<T: Element>(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (rows, cols) = x.dims2()?;
    if u32::try_from(rows * cols).is_err() {
        bail!("kestrel CUDA kernels: bias_gelu over {rows}×{cols} elements (32-bit indices)")
    }
    let dev = cuda_device(x)?;
    let (xs, xl) = x.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let (xv, bv) = (view::<T>(&xs, xl, None)?, param(&bs, bl, bias, "bias")?);
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(rows * cols)? };
    let func = dev.get_or_load_custom_func(&format!("bias_gelu_{}", T::SUFFIX), MODULE, PTX)?;
    let (r, c) = (rows as i32, cols as i32);
    let mut builder = func.builder();
    builder.arg(&xv).arg(&bv).arg(&out).arg(&r).arg(&c);
    let blocks = (rows * cols).div_ceil(256).clamp(1, 8192) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature (a grid-stride loop over rows·cols).
    unsafe { builder.launch(cfg) }.w()?;
    Ok(wrap(out, &dev, (rows, cols)))
}

/// Self-attention of every packed sequence: `qkv` is `[tokens, 3·hidden]` (the fused
/// product without its bias), `bias` the f32 QKV bias the kernel adds, the result
/// `[tokens, hidden]`.
pub fn attention(qkv: &Tensor, bias: &Tensor, index: &PackedIndex, heads: usize) -> Result<Tensor> {
    by_dtype!(qkv.dtype(), attention_t(qkv, bias, index, heads))
}

fn attention_t<T: Element>(
    qkv: &Tensor,
    bias: &Tensor,
    index: &PackedIndex,
    heads: usize,
) -> Result<Tensor> {
    let (rows, three_hidden) = qkv.dims2()?;
    let hidden = three_hidden / 3;
    let head_dim = hidden / heads;
    if !HEAD_DIMS.contains(&head_dim) || head_dim * heads != hidden {
        bail!("kestrel CUDA kernels: no attention kernel for {heads} heads of {hidden}")
    }
    if rows != index.tokens {
        bail!(
            "kestrel CUDA kernels: {rows} rows for {} packed tokens",
            index.tokens
        )
    }
    let dev = cuda_device(qkv)?;
    let (qs, ql) = qkv.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let (is, il) = index.tensor.storage_and_layout();
    let qv = view::<T>(&qs, ql, None)?;
    let bv = param(&bs, bl, bias, "QKV bias")?;
    let cu = view::<u32>(&is, il, Some(index.cu()))?;
    // SAFETY: every row of every head is written by the kernel below.
    let out = unsafe { dev.alloc::<T>(rows * hidden)? };
    let name = format!("attention{head_dim}_{}", T::SUFFIX);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let h = hidden as i32;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut builder = func.builder();
    builder
        .arg(&qv)
        .arg(&bv)
        .arg(&cu)
        .arg(&out)
        .arg(&h)
        .arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (index.sequences as u32, heads as u32, 1),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; the head width is instantiated.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(wrap(out, &dev, (rows, hidden)))
}

/// Mean over each sequence's rows, L2-normalized: `[sequences, hidden]` f32.
pub fn mean_pool_norm(x: &Tensor, index: &PackedIndex) -> Result<Tensor> {
    by_dtype!(x.dtype(), mean_pool_norm_t(x, index))
}

fn mean_pool_norm_t<T: Element>(x: &Tensor, index: &PackedIndex) -> Result<Tensor> {
    let (_, cols) = x.dims2()?;
    check_hidden(cols)?;
    let dev = cuda_device(x)?;
    let (xs, xl) = x.storage_and_layout();
    let (is, il) = index.tensor.storage_and_layout();
    let xv = view::<T>(&xs, xl, None)?;
    let cu = view::<u32>(&is, il, Some(index.cu()))?;
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<f32>(index.sequences * cols)? };
    let name = format!("mean_pool_norm_{}", T::SUFFIX);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let c = cols as i32;
    let mut builder = func.builder();
    builder.arg(&xv).arg(&cu).arg(&out).arg(&c);
    let cfg = LaunchConfig {
        grid_dim: (index.sequences as u32, 1, 1),
        block_dim: (POOL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature; one block per sequence.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(wrap(out, &dev, (index.sequences, cols)))
}
