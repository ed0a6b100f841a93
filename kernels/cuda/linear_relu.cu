// Linear + ReLU: the element-wise stages around the cuBLAS GEMMs (kernels/cuda/linear_relu.py).
//
// Forward:  y = x @ W.T goes to cuBLAS; then ONE pass over y, in place: y = relu(y + bias).
// Backward: ONE pass reads dy and y once and writes g = dy * (y > 0) together with per-block
//           column sums of g; a tiny second kernel adds those partial sums up in a fixed order
//           into db (deterministic: no atomics). dx = g @ W and dW = g.T @ x go to cuBLAS.
// Plain Linear's db (no ReLU): the same pass without the mask (MASK = false: reads dy only,
//           writes no g), then the same reduction; kernels/cuda/linear_relu.py ``bias_grad``.
//
// Every kernel is memory-bound: 16-byte vector accesses (float4 / double2 / 8 halves) where the
// layout allows, a scalar path otherwise, grid-stride loops, launch sizes from the array size.
// ReLU is written `v <= 0 ? 0 : v` so that NaN propagates, like np.maximum and PyTorch; the
// mask is applied as a product, dy * (y > 0 ? 1 : 0), exactly like the numpy reference.
//
// Storage types float, double, __half and __nv_bfloat16 (common.cuh): every value is computed in
// A = Acc<T>::type (float for the 16-bit types) and rounded once when stored. The 16-bit forward
// epilogue therefore reads a y that cuBLAS already rounded to T (cupy's GEMM writes T), adds the
// bias in float and rounds again: the one place with two roundings (docs/kernels/linear_relu.md).
// The backward's column sums and partials are A (float), and db is rounded once at the end.

#include "common.cuh"

// A V-element vector of T read or written with one access (16 bytes when V = Pack<T>::width).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
    T v[V];
};

template <typename A>
__device__ __forceinline__ A relu(A v) {
    return v <= A(0) ? A(0) : v;
}

// Elements per 16-byte access.
template <typename T>
__device__ constexpr int lanes() {
    return Pack<T>::width;
}

// ------------------------------------------------------------------------------------------
// Forward epilogue: y (n*m elements, row-major, 16-byte aligned: cupy allocates it) in place.
//
// BIAS: 0 = no bias; 1 = bias read element by element (any m, any bias alignment);
//       2 = bias read as vectors (needs m % V == 0 and a 16-byte-aligned bias).
// The array is walked as flat V-element vectors; a vector may straddle two rows when
// m % V != 0, so the bias column is tracked per element and wraps at m. Each thread divides
// once (its first column) and then only adds: no 64-bit division per element.
// ------------------------------------------------------------------------------------------
template <typename T, int BIAS>
__device__ __forceinline__ void bias_relu_inplace(T* __restrict__ y, const T* __restrict__ bias,
                                                  long long total, long long m) {
    constexpr int V = lanes<T>();
    using VecT = Vec<T, V>;
    const long long n_vec = total / V;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    VecT* yv = reinterpret_cast<VecT*>(y);

    // Column of this thread's first element, and how far the column moves per grid step.
    long long col = BIAS ? (tid * V) % m : 0;
    const long long col_step = BIAS ? (stride * V) % m : 0;

    for (long long i = tid; i < n_vec; i += stride) {
        VecT r = yv[i];
        if (BIAS == 2) {
            const VecT b = *reinterpret_cast<const VecT*>(bias + col);
#pragma unroll
            for (int k = 0; k < V; ++k) r.v[k] = from_acc<T>(relu(to_acc(r.v[k]) + to_acc(b.v[k])));
        } else if (BIAS == 1) {
            long long j = col;
#pragma unroll
            for (int k = 0; k < V; ++k) {
                r.v[k] = from_acc<T>(relu(to_acc(r.v[k]) + to_acc(__ldg(bias + j))));
                if (++j == m) j = 0;
            }
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) r.v[k] = from_acc<T>(relu(to_acc(r.v[k])));
        }
        yv[i] = r;
        if (BIAS) {
            col += col_step;
            if (col >= m) col -= m;
        }
    }

    // Scalar tail: the last total % V elements, one per thread of the first threads.
    const long long e = n_vec * V + tid;
    if (e < total) {
        using A = typename Acc<T>::type;
        const A b = BIAS ? to_acc(__ldg(bias + e % m)) : A(0);
        y[e] = from_acc<T>(relu(to_acc(y[e]) + b));
    }
}

// ------------------------------------------------------------------------------------------
// Backward prologue: g = dy * (y > 0), and partial[blockIdx.y, c] = sum of g[r, c] over the
// rows r this block row visits, in A (g itself is exact in T: a product with 0 or 1). Block (32, 8): threadIdx.x walks columns (V per thread, so a
// warp reads 32 * 16 contiguous bytes of one row), threadIdx.y walks rows with stride
// 8 * gridDim.y. V > 1 needs m % V == 0 and 16-byte-aligned dy, y and g (checked on the host).
// The 8 row-partials of a column are added in shared memory by a fixed tree: deterministic.
// ------------------------------------------------------------------------------------------
// An enum, not constexpr variables: NVRTC would emit those as (unused) global memory.
enum : int { kColThreads = 32, kRowThreads = 8 };

// MASK = false: g = dy (y and g are not touched; they may be null), only the column sums are made.
template <typename T, int V, bool MASK>
__device__ __forceinline__ void mask_and_column_sums(const T* __restrict__ dy, const T* __restrict__ y,
                                                     T* __restrict__ g, typename Acc<T>::type* __restrict__ partial,
                                                     long long n, long long m) {
    using A = typename Acc<T>::type;
    using VecT = Vec<T, V>;
    using VecA = Vec<A, V>;
    __shared__ VecA sums[kRowThreads][kColThreads];

    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long c0 = ((long long)blockIdx.x * kColThreads + tx) * V;
    A acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = A(0);

    if (c0 < m) {
        const long long row_step = (long long)kRowThreads * gridDim.y;
#pragma unroll 2
        for (long long r = (long long)blockIdx.y * kRowThreads + ty; r < n; r += row_step) {
            const long long off = r * m + c0;
            const VecT d = *reinterpret_cast<const VecT*>(dy + off);
            if (MASK) {
                const VecT o = *reinterpret_cast<const VecT*>(y + off);
                VecT out;
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    const A v = to_acc(d.v[k]) * (to_acc(o.v[k]) > A(0) ? A(1) : A(0));
                    out.v[k] = from_acc<T>(v);
                    acc[k] += v;
                }
                *reinterpret_cast<VecT*>(g + off) = out;
            } else {
#pragma unroll
                for (int k = 0; k < V; ++k) acc[k] += to_acc(d.v[k]);
            }
        }
    }

    VecA mine;
#pragma unroll
    for (int k = 0; k < V; ++k) mine.v[k] = acc[k];
    sums[ty][tx] = mine;
    __syncthreads();
#pragma unroll
    for (int half = kRowThreads / 2; half > 0; half /= 2) {
        if (ty < half) {
            VecA a = sums[ty][tx];
            const VecA b = sums[ty + half][tx];
#pragma unroll
            for (int k = 0; k < V; ++k) a.v[k] += b.v[k];
            sums[ty][tx] = a;
        }
        __syncthreads();
    }
    if (ty == 0 && c0 < m) {
        const VecA total = sums[0][tx];
        A* dst = partial + (long long)blockIdx.y * m + c0;
#pragma unroll
        for (int k = 0; k < V; ++k) dst[k] = total.v[k];
    }
}

// db[c] = sum over r of partial[r, c] (A), r in increasing order, rounded once to T; one thread per column.
template <typename T>
__device__ __forceinline__ void sum_rows(const typename Acc<T>::type* __restrict__ partial, T* __restrict__ db,
                                         long long rows, long long m) {
    using A = typename Acc<T>::type;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < m; c += stride) {
        A s = A(0);
        for (long long r = 0; r < rows; ++r) s += partial[r * m + c];
        db[c] = from_acc<T>(s);
    }
}

// ------------------------------------------------------------------------------------------
// extern "C" entry points (names used by kernels/cuda/linear_relu.py), for float, double, __half
// and __nv_bfloat16. The backward's partial column sums are Acc<T>::type (float for the 16-bit types).
// ------------------------------------------------------------------------------------------
#define LINEAR_RELU_KERNELS(T, SUFFIX)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                                     \
        linear_relu_fwd_epilogue_##SUFFIX(T* __restrict__ y, long long total) {                          \
        bias_relu_inplace<T, 0>(y, nullptr, total, 1);                                                    \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) linear_relu_fwd_epilogue_bias_##SUFFIX(             \
        T* __restrict__ y, const T* __restrict__ bias, long long total, long long m) {                    \
        bias_relu_inplace<T, 1>(y, bias, total, m);                                                       \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) linear_relu_fwd_epilogue_biasvec_##SUFFIX(          \
        T* __restrict__ y, const T* __restrict__ bias, long long total, long long m) {                    \
        bias_relu_inplace<T, 2>(y, bias, total, m);                                                       \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(kColThreads * kRowThreads) linear_relu_bwd_mask_db_##SUFFIX( \
        const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ g,                             \
        Acc<T>::type* __restrict__ partial, long long n, long long m) {                                   \
        mask_and_column_sums<T, 1, true>(dy, y, g, partial, n, m);                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(kColThreads * kRowThreads)                               \
        linear_relu_bwd_mask_db_vec_##SUFFIX(const T* __restrict__ dy, const T* __restrict__ y,           \
                                             T* __restrict__ g, Acc<T>::type* __restrict__ partial,       \
                                             long long n, long long m) {                                  \
        mask_and_column_sums<T, lanes<T>(), true>(dy, y, g, partial, n, m);                               \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(kColThreads * kRowThreads) linear_relu_bwd_colsum_##SUFFIX(  \
        const T* __restrict__ dy, Acc<T>::type* __restrict__ partial, long long n, long long m) {          \
        mask_and_column_sums<T, 1, false>(dy, nullptr, nullptr, partial, n, m);                           \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(kColThreads * kRowThreads)                               \
        linear_relu_bwd_colsum_vec_##SUFFIX(const T* __restrict__ dy, Acc<T>::type* __restrict__ partial,  \
                                            long long n, long long m) {                                   \
        mask_and_column_sums<T, lanes<T>(), false>(dy, nullptr, nullptr, partial, n, m);                  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) linear_relu_bwd_db_reduce_##SUFFIX(                 \
        const Acc<T>::type* __restrict__ partial, T* __restrict__ db, long long rows, long long m) {       \
        sum_rows<T>(partial, db, rows, m);                                                                \
    }

LINEAR_RELU_KERNELS(float, f32)
LINEAR_RELU_KERNELS(double, f64)
LINEAR_RELU_KERNELS(__half, f16)
LINEAR_RELU_KERNELS(__nv_bfloat16, bf16)
