// Fused kernels of the worker's CUDA BERT path (worker/src/engine/cuda_ops.rs).
//
// The encoder runs on packed tokens: the batch's sequences one after another, no padding,
// `cu[b]..cu[b+1]` the rows of sequence b. Everything between two matrix products is one
// kernel here, computing in f32 whatever the storage type:
//   embed_ln           word + position (+ token type, folded in) rows, then layer norm
//   attention          per (sequence, head): q·kᵀ·scale, softmax, ·v, reading q/k/v (and
//                      their bias) straight from the fused QKV product; no mask: no padding
//   bias_gelu          x + bias, erf-GELU
//   bias_residual_ln   y + bias + residual, then layer norm
//   mean_pool_norm     mean over each sequence's rows, L2-normalized, written as f32
// Biases and layer-norm parameters are f32 for every storage type: rounding them to bf16
// alone cost a third of bf16's distance to f32 (1 - min cosine 9.4e-5 -> 5.8e-5 on the
// quality sentences, worker/scripts/precision_emulation.py), and they are a few KB.
// Built to PTX by worker/build.rs (feature `cuda`) and loaded by candle's CUDA device.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Rows of at most 32 × 32 = 1024 columns: one warp per row, each lane holding its columns
// in registers between the mean, the variance and the write.
#define LN_MAX_PER_LANE 32

template <typename T>
__device__ __forceinline__ void layer_norm_row(float (&v)[LN_MAX_PER_LANE], int lane, int cols,
                                               const float* gamma, const float* beta, float eps,
                                               T* out) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < LN_MAX_PER_LANE; k++) {
        int c = lane + 32 * k;
        if (c < cols) s += v[k];
    }
    float mean = warp_sum(s) / cols;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < LN_MAX_PER_LANE; k++) {
        int c = lane + 32 * k;
        if (c < cols) { float d = v[k] - mean; q += d * d; }
    }
    float inv = rsqrtf(warp_sum(q) / cols + eps);
#pragma unroll
    for (int k = 0; k < LN_MAX_PER_LANE; k++) {
        int c = lane + 32 * k;
        if (c < cols) out[c] = from_f<T>((v[k] - mean) * inv * gamma[c] + beta[c]);
    }
}

// One warp per row; blockDim.x = 32 × rows per block.
template <typename T>
__device__ void embed_ln(const uint32_t* ids, const uint32_t* pos, const T* table,
                         const float* gamma, const float* beta, T* out, int rows, int cols,
                         float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* w = table + (size_t)ids[row] * cols;
    const T* p = table + (size_t)pos[row] * cols;
    float v[LN_MAX_PER_LANE];
#pragma unroll
    for (int k = 0; k < LN_MAX_PER_LANE; k++) {
        int c = lane + 32 * k;
        v[k] = c < cols ? to_f(w[c]) + to_f(p[c]) : 0.f;
    }
    layer_norm_row(v, lane, cols, gamma, beta, eps, out + (size_t)row * cols);
}

template <typename T>
__device__ void bias_residual_ln(const T* y, const float* bias, const T* res,
                                 const float* gamma, const float* beta, T* out, int rows,
                                 int cols, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* yr = y + (size_t)row * cols;
    const T* rr = res + (size_t)row * cols;
    float v[LN_MAX_PER_LANE];
#pragma unroll
    for (int k = 0; k < LN_MAX_PER_LANE; k++) {
        int c = lane + 32 * k;
        v[k] = c < cols ? to_f(yr[c]) + bias[c] + to_f(rr[c]) : 0.f;
    }
    layer_norm_row(v, lane, cols, gamma, beta, eps, out + (size_t)row * cols);
}

template <typename T>
__device__ void bias_gelu(const T* x, const float* bias, T* out, int rows, int cols) {
    // 32-bit indices (the caller checks rows·cols < 2³²): a 64-bit remainder per element
    // costs more than the element's arithmetic.
    const uint32_t n = (uint32_t)rows * (uint32_t)cols;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = to_f(x[i]) + bias[i % (uint32_t)cols];
        out[i] = from_f<T>(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
    }
}

// Grid (sequences, heads); each thread owns one query row at a time (q and the running
// output in registers, online softmax), keys and values staged through shared memory in
// tiles of ATT_TILE rows. qkv rows are [q | k | v], each `hidden` wide, heads of HD.
// (One warp per block with 32-row tiles was slower on an H100: 118 against 82 µs per
// layer at batch 256; the SM's block limit leaves fewer warps to hide latency.)
#define ATT_TILE 64

template <typename T, int HD>
__device__ void attention(const T* qkv, const float* bias, const uint32_t* cu, T* out,
                          int hidden, float scale) {
    __shared__ float ks[ATT_TILE][HD];
    __shared__ float vs[ATT_TILE][HD];
    const int seq = blockIdx.x, head = blockIdx.y;
    const int start = cu[seq], len = cu[seq + 1] - start;
    const int stride = 3 * hidden;
    const int qo = head * HD, ko = hidden + head * HD, vo = 2 * hidden + head * HD;
    for (int q0 = 0; q0 < len; q0 += blockDim.x) {
        const int qi = q0 + threadIdx.x;
        const bool active = qi < len;
        float q[HD], acc[HD];
        float m = -INFINITY, l = 0.f;
        if (active) {
            const T* row = qkv + (size_t)(start + qi) * stride;
#pragma unroll
            for (int d = 0; d < HD; d++) {
                q[d] = (to_f(row[qo + d]) + bias[qo + d]) * scale;
                acc[d] = 0.f;
            }
        }
        for (int k0 = 0; k0 < len; k0 += ATT_TILE) {
            const int n = min(ATT_TILE, len - k0);
            __syncthreads();
            for (int i = threadIdx.x; i < n * HD; i += blockDim.x) {
                const int r = i / HD, d = i % HD;
                const T* row = qkv + (size_t)(start + k0 + r) * stride;
                ks[r][d] = to_f(row[ko + d]) + bias[ko + d];
                vs[r][d] = to_f(row[vo + d]) + bias[vo + d];
            }
            __syncthreads();
            if (active) {
                for (int j = 0; j < n; j++) {
                    float s = 0.f;
#pragma unroll
                    for (int d = 0; d < HD; d++) s += q[d] * ks[j][d];
                    if (s > m) {
                        const float corr = __expf(m - s);
                        l *= corr;
#pragma unroll
                        for (int d = 0; d < HD; d++) acc[d] *= corr;
                        m = s;
                    }
                    const float p = __expf(s - m);
                    l += p;
#pragma unroll
                    for (int d = 0; d < HD; d++) acc[d] += p * vs[j][d];
                }
            }
        }
        if (active) {
            T* o = out + (size_t)(start + qi) * hidden + head * HD;
            const float inv = 1.f / l;
#pragma unroll
            for (int d = 0; d < HD; d++) o[d] = from_f<T>(acc[d] * inv);
        }
    }
}

// One block of POOL_THREADS per sequence: each thread sums its columns over the
// sequence's rows (neighbouring threads read neighbouring columns), then a block-wide
// sum of squares for the L2 norm.
#define POOL_THREADS 128
#define POOL_MAX_PER_THREAD (1024 / POOL_THREADS)

template <typename T>
__device__ void mean_pool_norm(const T* x, const uint32_t* cu, float* out, int cols) {
    __shared__ float partial[POOL_THREADS / 32];
    const int seq = blockIdx.x, tid = threadIdx.x;
    const int start = cu[seq], len = cu[seq + 1] - start;
    float v[POOL_MAX_PER_THREAD];
#pragma unroll
    for (int k = 0; k < POOL_MAX_PER_THREAD; k++) v[k] = 0.f;
    for (int r = 0; r < len; r++) {
        const T* row = x + (size_t)(start + r) * cols;
#pragma unroll
        for (int k = 0; k < POOL_MAX_PER_THREAD; k++) {
            int c = tid + POOL_THREADS * k;
            if (c < cols) v[k] += to_f(row[c]);
        }
    }
    const float inv_len = 1.f / fmaxf((float)len, 1.f);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < POOL_MAX_PER_THREAD; k++) {
        int c = tid + POOL_THREADS * k;
        if (c < cols) { v[k] *= inv_len; s += v[k] * v[k]; }
    }
    s = warp_sum(s);
    if (tid % 32 == 0) partial[tid / 32] = s;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < POOL_THREADS / 32; w++) total += partial[w];
    const float inv_norm = 1.f / fmaxf(sqrtf(total), 1e-12f);
#pragma unroll
    for (int k = 0; k < POOL_MAX_PER_THREAD; k++) {
        int c = tid + POOL_THREADS * k;
        if (c < cols) out[(size_t)seq * cols + c] = v[k] * inv_norm;
    }
}

#define KERNELS(T, S)                                                                          \
    extern "C" __global__ void embed_ln_##S(const uint32_t* ids, const uint32_t* pos,           \
                                            const T* table, const float* gamma,                 \
                                            const float* beta, T* out, int rows, int cols,      \
                                            float eps) {                                        \
        embed_ln<T>(ids, pos, table, gamma, beta, out, rows, cols, eps);                       \
    }                                                                                          \
    extern "C" __global__ void bias_residual_ln_##S(const T* y, const float* bias,              \
                                                    const T* res, const float* gamma,           \
                                                    const float* beta, T* out, int rows,        \
                                                    int cols, float eps) {                      \
        bias_residual_ln<T>(y, bias, res, gamma, beta, out, rows, cols, eps);                  \
    }                                                                                          \
    extern "C" __global__ void bias_gelu_##S(const T* x, const float* bias, T* out, int rows,   \
                                             int cols) {                                        \
        bias_gelu<T>(x, bias, out, rows, cols);                                                \
    }                                                                                          \
    extern "C" __global__ void attention32_##S(const T* qkv, const float* bias,                 \
                                               const uint32_t* cu, T* out, int hidden,          \
                                               float scale) {                                   \
        attention<T, 32>(qkv, bias, cu, out, hidden, scale);                                   \
    }                                                                                          \
    extern "C" __global__ void attention64_##S(const T* qkv, const float* bias,                 \
                                               const uint32_t* cu, T* out, int hidden,          \
                                               float scale) {                                   \
        attention<T, 64>(qkv, bias, cu, out, hidden, scale);                                   \
    }                                                                                          \
    extern "C" __global__ void mean_pool_norm_##S(const T* x, const uint32_t* cu, float* out,   \
                                                  int cols) {                                   \
        mean_pool_norm<T>(x, cu, out, cols);                                                   \
    }

KERNELS(float, f32)
KERNELS(__half, f16)
KERNELS(__nv_bfloat16, bf16)
