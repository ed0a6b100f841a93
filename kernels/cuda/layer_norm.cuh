// Layer norm over the last dimension, forward and backward (PyTorch F.layer_norm): the kernel
// templates. layer_norm.cu instantiates them for float and double, layer_norm_lowp.cu for __half
// and __nv_bfloat16 (two modules, so a float32 user's first call compiles only the float32 ones).
//
// Per row x (D values), weight w and bias b (w = 1, b = 0 when absent):
//   mean = sum x / D,  var = sum (x - mean)^2 / D,  rstd = 1 / sqrt(var + eps),  xhat = (x - mean) rstd
//   y = xhat w + b                                   (forward; saves mean and rstd per row)
//   g = dy w,  dx = rstd (g - mean(g) - xhat mean(g xhat)),  dw = sum_rows dy xhat,  db = sum_rows dy
//
// Types: T is the storage type of x, y, dy and dx; W that of weight and bias (T, or float with a
// 16-bit T: PyTorch's mixed-dtype rule); A = Acc<T>::type (common.cuh) is what everything is
// computed and accumulated in: float for float, __half and __nv_bfloat16, double for double.
// mean, rstd and the backward's partial column sums are stored in A, so a 16-bit layer norm keeps
// float32 statistics, as PyTorch's CUDA kernel does; y and dx round once, where they are stored.
//
// Forward, one row per block (kernels/cuda/layer_norm.py picks by D):
//   ln_fwd_block_*  D <= threads K: K values per thread in registers, so the variance is two-pass
//                   from registers (the mean first, then the squared deviations: exact, and no
//                   E[x^2] - E[x]^2 cancellation) at the cost of one extra block reduction; x is
//                   read once and y written once (2 N D sizeof(T) bytes).
//   ln_fwd_stream_* any D: Welford's update per thread over a strided walk, merged across the block
//                   with Chan's formula, then a second walk writes y: the row is read twice (the
//                   second read mostly from L2), never three times as a two-pass would need.
//
// Backward, in ONE pass over dy and x, with the dw / db column sums as per-block partial rows:
//   ln_bwd_block_*  D <= threads K: a grid of P blocks (one resident wave, from the occupancy query),
//                   each walking rows blockIdx.x, + gridDim.x, ... A thread owns the same K columns
//                   in every row, so it accumulates dy xhat and dy for them in registers across its
//                   rows and writes them once, as row blockIdx.x of the partials (P, D); its K
//                   weights are loaded once, before the first row. The loads are software-pipelined:
//                   all of a row's chunks (x and dy, every 16-byte pack of the thread, plus mean and
//                   rstd) are issued back to back before any is used, and the NEXT row's are issued
//                   as soon as this row's values are unpacked, so they are in flight during this
//                   row's block reduction and dx stores. Each row then costs one DRAM latency,
//                   overlapped with the previous row's work, instead of a load-use round trip per
//                   chunk. The weight flag and the column sums are template parameters (_plain: no
//                   weight, _weight: weight without dw / db, _wgrad: both), so a variant carries
//                   neither the registers nor the branches of what it does not compute.
//   ln_bwd_rowsums_* + ln_bwd_tile_*  any D: the row sums per row first (one block per row), then
//                   a 2-D grid (column tiles x row groups) writes dx and accumulates its columns
//                   over its rows in registers, one partial row per row group.
//   ln_col_reduce_* sums the P partial rows into dw and db: P D values, P ~ a few per SM, against
//                   the N D of the pass. No atomics anywhere: every partial value has one writer.
//
// K is a template parameter (registers are indexed by unrolled loop counters only). Rows move as
// 16-byte packs (float4 / double2 / 8 halves) in the _v variants, which the host picks when D is a
// multiple of the pack and every row array is 16-byte aligned, otherwise as coalesced scalars
// (_s). No fast-math: sqrt and division are the IEEE ones, so results agree with the numpy
// reference to float32 rounding.
#pragma once

#include "common.cuh"

#define LN_WEIGHT 1  // forward: weight given
#define LN_BIAS 2    // forward: bias given

__device__ __forceinline__ float ln_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double ln_sqrt(double x) { return sqrt(x); }

// N raw values of T from p: whole 16-byte packs when N values fill them (p then 16-byte aligned),
// else scalars.
template <typename T, int N>
__device__ __forceinline__ void load_raw(const T* __restrict__ p, T* out) {
    if constexpr (N * sizeof(T) >= 16) {
        constexpr int PW = Pack<T>::width;
        static_assert(N % PW == 0, "a chunk is whole packs");
#pragma unroll
        for (int k = 0; k < N / PW; ++k) {
            const Pack<T> v = reinterpret_cast<const Pack<T>*>(p)[k];
#pragma unroll
            for (int i = 0; i < PW; ++i) out[k * PW + i] = v.e[i];
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = p[i];
    }
}

template <typename T, int N>
__device__ __forceinline__ void store_raw(T* __restrict__ p, const T* v) {
    if constexpr (N * sizeof(T) >= 16) {
        constexpr int PW = Pack<T>::width;
        static_assert(N % PW == 0, "a chunk is whole packs");
#pragma unroll
        for (int k = 0; k < N / PW; ++k) {
            Pack<T> out;
#pragma unroll
            for (int i = 0; i < PW; ++i) out.e[i] = v[k * PW + i];
            reinterpret_cast<Pack<T>*>(p)[k] = out;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) p[i] = v[i];
    }
}

// N values of T from p, converted to the accumulation type A.
template <typename T, int N, typename A>
__device__ __forceinline__ void load_acc(const T* __restrict__ p, A* out) {
    T raw[N];
    load_raw<T, N>(p, raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_acc(raw[i]);
}

// N accumulation-type values rounded once to T and stored at p.
template <typename T, int N, typename A>
__device__ __forceinline__ void store_acc(T* __restrict__ p, const A* v) {
    T raw[N];
#pragma unroll
    for (int i = 0; i < N; ++i) raw[i] = from_acc<T>(v[i]);
    store_raw<T, N>(p, raw);
}

// The K values a thread owns in a row: U = K / VW chunks of VW values at columns (u nt + t) VW.
// In packed mode D is a multiple of VW, so a chunk is all in or all out; chunks past D read as
// `fill`. Every chunk's load is issued before any value is used.
template <typename T, int K, int VW, typename A>
__device__ __forceinline__ void load_row_acc(const T* __restrict__ row, int t, int nt, int D, A fill, A (&out)[K]) {
#pragma unroll
    for (int u = 0; u < K / VW; ++u) {
        const int c0 = (u * nt + t) * VW;
        if (c0 < D) {
            load_acc<T, VW>(row + c0, out + u * VW);
        } else {
#pragma unroll
            for (int i = 0; i < VW; ++i) out[u * VW + i] = fill;
        }
    }
}

template <typename T, int K, int VW>
__device__ __forceinline__ void load_row_raw(const T* __restrict__ row, int t, int nt, int D, T (&out)[K]) {
#pragma unroll
    for (int u = 0; u < K / VW; ++u) {
        const int c0 = (u * nt + t) * VW;
        if (c0 < D) {
            load_raw<T, VW>(row + c0, out + u * VW);
        } else {
#pragma unroll
            for (int i = 0; i < VW; ++i) out[u * VW + i] = from_acc<T>(0);
        }
    }
}

// Welford state of one thread (count, mean, sum of squared deviations) and Chan's merge.
template <typename A>
struct Welford {
    A n, mean, m2;
    __device__ __forceinline__ void add(A x) {
        n += A(1);
        const A delta = x - mean;
        mean += delta / n;
        m2 += delta * (x - mean);
    }
    __device__ __forceinline__ void merge(A nb, A mb, A m2b) {
        const A total = n + nb;
        if (nb == A(0)) return;
        const A delta = mb - mean;
        const A fb = nb / total;
        mean += delta * fb;
        m2 += m2b + delta * delta * n * fb;
        n = total;
    }
    __device__ __forceinline__ void warp_merge() {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            const A nb = __shfl_xor_sync(0xffffffffu, n, offset);
            const A mb = __shfl_xor_sync(0xffffffffu, mean, offset);
            const A m2b = __shfl_xor_sync(0xffffffffu, m2, offset);
            merge(nb, mb, m2b);
        }
    }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T, typename W>
struct FwdArgs {
    using A = typename Acc<T>::type;
    const T* __restrict__ x;
    const W* __restrict__ weight;
    const W* __restrict__ bias;
    T* __restrict__ y;
    A* __restrict__ mean;
    A* __restrict__ rstd;
    int D;
    A eps;
    int flags;
};

// y for one chunk of VW values at column c0, from the row's statistics.
template <typename T, typename W, int VW, typename A>
__device__ __forceinline__ void write_y(const FwdArgs<T, W>& a, T* yr, int c0, const A* v, A mu, A r) {
    A w[VW], b[VW], out[VW];
    if (a.flags & LN_WEIGHT) load_acc<W, VW>(a.weight + c0, w);
    if (a.flags & LN_BIAS) load_acc<W, VW>(a.bias + c0, b);
#pragma unroll
    for (int i = 0; i < VW; ++i) {
        A o = (v[i] - mu) * r;
        if (a.flags & LN_WEIGHT) o *= w[i];
        if (a.flags & LN_BIAS) o += b[i];
        out[i] = o;
    }
    store_acc<T, VW>(yr + c0, out);
}

template <typename T, typename W, int K, int VW>
__device__ __forceinline__ void fwd_block(const FwdArgs<T, W>& a, typename Acc<T>::type* scratch) {
    using A = typename Acc<T>::type;
    constexpr int U = K / VW;
    const long long row = blockIdx.x;
    const int t = threadIdx.x, nt = blockDim.x, D = a.D;
    const BlockGroup<A, 1> block{scratch};
    A v[K];
    load_row_acc<T, K, VW>(a.x + row * D, t, nt, D, A(0), v);
    A s[1] = {A(0)};
#pragma unroll
    for (int k = 0; k < K; ++k) s[0] += v[k];
    group_reduce(block, s, SumOp(), A(0));
    const A mu = s[0] / A(D);
    A q[1] = {A(0)};
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if ((u * nt + t) * VW < D) {  // padding would add mu^2
#pragma unroll
            for (int i = 0; i < VW; ++i) {
                const A c = v[u * VW + i] - mu;
                q[0] += c * c;
            }
        }
    }
    group_reduce(block, q, SumOp(), A(0));
    const A r = A(1) / ln_sqrt(q[0] / A(D) + a.eps);
    if (t == 0) {
        a.mean[row] = mu;
        a.rstd[row] = r;
    }
    T* __restrict__ yr = a.y + row * D;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c0 = (u * nt + t) * VW;
        if (c0 < D) write_y<T, W, VW>(a, yr, c0, v + u * VW, mu, r);
    }
}

template <typename T, typename W, int VW>
__device__ __forceinline__ void fwd_stream(const FwdArgs<T, W>& a, typename Acc<T>::type* scratch) {
    using A = typename Acc<T>::type;
    const long long row = blockIdx.x;
    const int t = threadIdx.x, nt = blockDim.x, D = a.D;
    const T* __restrict__ xr = a.x + row * D;
    Welford<A> st{A(0), A(0), A(0)};
#pragma unroll 4
    for (int c0 = t * VW; c0 < D; c0 += nt * VW) {
        A v[VW];
        load_acc<T, VW>(xr + c0, v);
#pragma unroll
        for (int i = 0; i < VW; ++i) st.add(v[i]);
    }
    st.warp_merge();
    const int lane = t & 31, warp = t >> 5, warps = nt >> 5;
    if (lane == 0) {
        scratch[3 * warp] = st.n;
        scratch[3 * warp + 1] = st.mean;
        scratch[3 * warp + 2] = st.m2;
    }
    __syncthreads();
    if (warp == 0) {
        if (lane < warps) st = Welford<A>{scratch[3 * lane], scratch[3 * lane + 1], scratch[3 * lane + 2]};
        else st = Welford<A>{A(0), A(0), A(0)};
        st.warp_merge();
        if (lane == 0) {
            scratch[96] = st.mean;
            scratch[97] = A(1) / ln_sqrt(st.m2 / A(D) + a.eps);
        }
    }
    __syncthreads();
    const A mu = scratch[96], r = scratch[97];
    if (t == 0) {
        a.mean[row] = mu;
        a.rstd[row] = r;
    }
    T* __restrict__ yr = a.y + row * D;
#pragma unroll 4
    for (int c0 = t * VW; c0 < D; c0 += nt * VW) {
        A v[VW];
        load_acc<T, VW>(xr + c0, v);
        write_y<T, W, VW>(a, yr, c0, v, mu, r);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T, typename W>
struct BwdArgs {
    using A = typename Acc<T>::type;
    const T* __restrict__ dy;
    const T* __restrict__ x;
    const W* __restrict__ weight;
    const A* __restrict__ mean;
    const A* __restrict__ rstd;
    T* __restrict__ dx;
    A* __restrict__ part_w;  // (P, D) partial column sums of dy xhat (WGRAD)
    A* __restrict__ part_b;  // (P, D) partial column sums of dy
    long long n_rows;
    int D;
};

// HAS_W: a weight is given; WGRAD: write the dw / db partials (only with a weight).
template <typename T, typename W, int K, int VW, bool HAS_W, bool WGRAD>
__device__ __forceinline__ void bwd_block(const BwdArgs<T, W>& a, typename Acc<T>::type* scratch) {
    using A = typename Acc<T>::type;
    static_assert(HAS_W || !WGRAD, "column sums only with a weight");
    constexpr int U = K / VW;
    const int t = threadIdx.x, nt = blockDim.x, D = a.D;
    const long long n = a.n_rows, stride = gridDim.x;
    const BlockGroup<A, 2> block{scratch};
    // Arrays a variant does not use are never read and take no registers.
    A w[K];  // this thread's weights, the same in every row
    if constexpr (HAS_W) load_row_acc<W, K, VW>(a.weight, t, nt, D, A(0), w);
    A acc_w[K], acc_b[K];
#pragma unroll
    for (int k = 0; k < K; ++k) acc_w[k] = acc_b[k] = A(0);

    // The row in flight: its raw chunks and statistics (prologue: the block's first row).
    long long row = blockIdx.x;
    T xr[K], dr[K];
    A mu = A(0), r = A(0);
    if (row < n) {
        load_row_raw<T, K, VW>(a.x + row * D, t, nt, D, xr);
        load_row_raw<T, K, VW>(a.dy + row * D, t, nt, D, dr);  // 0 beyond D: adds nothing below
        mu = a.mean[row];
        r = a.rstd[row];
    }
    for (; row < n; row += stride) {
        A xh[K], d[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            xh[k] = (to_acc(xr[k]) - mu) * r;
            d[k] = to_acc(dr[k]);
        }
        // Prefetch: the next row's loads go out now, and land while this row reduces and stores.
        const long long next = row + stride;
        A mu_next = mu, r_next = r;
        if (next < n) {
            load_row_raw<T, K, VW>(a.x + next * D, t, nt, D, xr);
            load_row_raw<T, K, VW>(a.dy + next * D, t, nt, D, dr);
            mu_next = a.mean[next];
            r_next = a.rstd[next];
        }
        A s[2] = {A(0), A(0)};  // sum g, sum g xhat
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const A g = HAS_W ? d[k] * w[k] : d[k];
            s[0] += g;
            s[1] += g * xh[k];
            if constexpr (WGRAD) {
                acc_w[k] += d[k] * xh[k];
                acc_b[k] += d[k];
            }
        }
        group_reduce(block, s, SumOp(), A(0));
        const A c_g = s[0] / A(D), c_gx = s[1] / A(D);
        T* __restrict__ dxr = a.dx + row * D;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c0 = (u * nt + t) * VW;
            if (c0 < D) {
                A out[VW];
#pragma unroll
                for (int i = 0; i < VW; ++i) {
                    const int k = u * VW + i;
                    const A g = HAS_W ? d[k] * w[k] : d[k];
                    out[i] = r * (g - c_g - xh[k] * c_gx);
                }
                store_acc<T, VW>(dxr + c0, out);
            }
        }
        mu = mu_next;
        r = r_next;
    }
    if constexpr (WGRAD) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c0 = (u * nt + t) * VW;
            if (c0 < D) {
                store_raw<A, VW>(a.part_w + (long long)blockIdx.x * D + c0, acc_w + u * VW);
                store_raw<A, VW>(a.part_b + (long long)blockIdx.x * D + c0, acc_b + u * VW);
            }
        }
    }
}

// Per row: out[2 row] = mean(g), out[2 row + 1] = mean(g xhat). One row per block.
template <typename T, typename W, int VW, bool HAS_W>
__device__ __forceinline__ void bwd_rowsums(const BwdArgs<T, W>& a, typename Acc<T>::type* row_sums,
                                            typename Acc<T>::type* scratch) {
    using A = typename Acc<T>::type;
    const long long row = blockIdx.x;
    const int t = threadIdx.x, nt = blockDim.x, D = a.D;
    const A mu = a.mean[row], r = a.rstd[row];
    A s[2] = {A(0), A(0)};
#pragma unroll 4
    for (int c0 = t * VW; c0 < D; c0 += nt * VW) {
        A xv[VW], d[VW], w[VW];
        load_acc<T, VW>(a.x + row * D + c0, xv);
        load_acc<T, VW>(a.dy + row * D + c0, d);
        if constexpr (HAS_W) load_acc<W, VW>(a.weight + c0, w);
#pragma unroll
        for (int i = 0; i < VW; ++i) {
            const A g = HAS_W ? d[i] * w[i] : d[i];
            s[0] += g;
            s[1] += g * ((xv[i] - mu) * r);
        }
    }
    const BlockGroup<A, 2> block{scratch};
    group_reduce(block, s, SumOp(), A(0));
    if (t == 0) {
        row_sums[2 * row] = s[0] / A(D);
        row_sums[2 * row + 1] = s[1] / A(D);
    }
}

// dx for columns [blockIdx.x blockDim.x VW, + blockDim.x VW) of rows blockIdx.y, + gridDim.y, ...,
// and those columns' partial sums over those rows (partial row blockIdx.y). No barriers.
template <typename T, typename W, int VW, bool HAS_W, bool WGRAD>
__device__ __forceinline__ void bwd_tile(const BwdArgs<T, W>& a, const typename Acc<T>::type* row_sums) {
    using A = typename Acc<T>::type;
    const int D = a.D;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VW;
    if (c0 >= D) return;
    A w[VW], acc_w[VW], acc_b[VW];
    if constexpr (HAS_W) load_acc<W, VW>(a.weight + c0, w);
#pragma unroll
    for (int i = 0; i < VW; ++i) acc_w[i] = acc_b[i] = A(0);
#pragma unroll 2
    for (long long row = blockIdx.y; row < a.n_rows; row += gridDim.y) {
        const A mu = a.mean[row], r = a.rstd[row], c_g = row_sums[2 * row], c_gx = row_sums[2 * row + 1];
        A xh[VW], d[VW], out[VW];
        load_acc<T, VW>(a.x + row * D + c0, xh);
        load_acc<T, VW>(a.dy + row * D + c0, d);
#pragma unroll
        for (int i = 0; i < VW; ++i) {
            xh[i] = (xh[i] - mu) * r;
            if constexpr (WGRAD) {
                acc_w[i] += d[i] * xh[i];
                acc_b[i] += d[i];
            }
            const A g = HAS_W ? d[i] * w[i] : d[i];
            out[i] = r * (g - c_g - xh[i] * c_gx);
        }
        store_acc<T, VW>(a.dx + row * D + c0, out);
    }
    if constexpr (WGRAD) {
        store_raw<A, VW>(a.part_w + (long long)blockIdx.y * D + c0, acc_w);
        store_raw<A, VW>(a.part_b + (long long)blockIdx.y * D + c0, acc_b);
    }
}

// dw[c] = sum_p part_w[p, c], db[c] likewise, rounded once to W; grid-stride over the columns
// (coalesced per p).
template <typename W, typename A>
__device__ __forceinline__ void col_reduce(const A* __restrict__ part_w, const A* __restrict__ part_b, W* dw, W* db,
                                           int P, int D) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < D; c += gridDim.x * blockDim.x) {
        A sw = A(0), sb = A(0);
        for (int p = 0; p < P; ++p) {
            sw += part_w[(long long)p * D + c];
            sb += part_b[(long long)p * D + c];
        }
        dw[c] = from_acc<W>(sw);
        db[c] = from_acc<W>(sb);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points (mirrored by kernels/cuda/layer_norm.py). DT names the types: f32, f64, f16, bf16,
// and f16w32 / bf16w32 for a 16-bit x with float weight and bias.
// ---------------------------------------------------------------------------------------------
// forward: (x, weight, bias, y, mean, rstd, D, eps, flags), one row per block
#define LN_FWD_PARAMS(T, W, A) \
    const T *x, const W *weight, const W *bias, T *y, A *mean, A *rstd, int D, A eps, int flags
#define LN_FWD_ARGS(T, W) FwdArgs<T, W>{x, weight, bias, y, mean, rstd, D, eps, flags}

// ln_fwd_block_<DT>_k<K>_<v|s>: D <= threads K, <= 1024 threads.
#define LN_FWD_BLOCK(T, W, A, DT, K)                                                                         \
    extern "C" __global__ void __launch_bounds__(1024, 1) ln_fwd_block_##DT##_k##K##_v(LN_FWD_PARAMS(T, W, A)) { \
        __shared__ A scratch[33];                                                                            \
        fwd_block<T, W, K, Pack<T>::width>(LN_FWD_ARGS(T, W), scratch);                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(1024, 1) ln_fwd_block_##DT##_k##K##_s(LN_FWD_PARAMS(T, W, A)) { \
        __shared__ A scratch[33];                                                                            \
        fwd_block<T, W, K, 1>(LN_FWD_ARGS(T, W), scratch);                                                   \
    }

// ln_fwd_stream_<DT>_<v|s>: any D, <= 512 threads.
#define LN_FWD_STREAM(T, W, A, DT)                                                                     \
    extern "C" __global__ void __launch_bounds__(512) ln_fwd_stream_##DT##_v(LN_FWD_PARAMS(T, W, A)) { \
        __shared__ A scratch[98];                                                                      \
        fwd_stream<T, W, Pack<T>::width>(LN_FWD_ARGS(T, W), scratch);                                  \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(512) ln_fwd_stream_##DT##_s(LN_FWD_PARAMS(T, W, A)) { \
        __shared__ A scratch[98];                                                                      \
        fwd_stream<T, W, 1>(LN_FWD_ARGS(T, W), scratch);                                               \
    }

// backward: (dy, x, weight, mean, rstd, dx, part_w, part_b, n_rows, D)
#define LN_BWD_PARAMS(T, W, A)                                                                             \
    const T *dy, const T *x, const W *weight, const A *mean, const A *rstd, T *dx, A *part_w, A *part_b, \
        long long n_rows, int D
#define LN_BWD_ARGS(T, W) BwdArgs<T, W>{dy, x, weight, mean, rstd, dx, part_w, part_b, n_rows, D}

// The three weight variants: _plain (no weight), _weight (dx only), _wgrad (dx, dw and db). A 16-bit
// x with float weight (the w32 instances) has no _plain: without a weight W is x's type.
#define LN_ALL_VARIANTS(M, ...) \
    M(__VA_ARGS__, plain, false, false) M(__VA_ARGS__, weight, true, false) M(__VA_ARGS__, wgrad, true, true)
#define LN_AFFINE_VARIANTS(M, ...) M(__VA_ARGS__, weight, true, false) M(__VA_ARGS__, wgrad, true, true)

// ln_bwd_block_<DT>_k<K>_<v|s>_<variant>: D <= threads K, <= 512 threads, at least MINB blocks of
// 512 per SM; the host sizes its one-wave grid by the occupancy query.
#define LN_BWD_BLOCK_ONE(T, W, A, DT, K, MINB, PACKING, VW, VARIANT, HAS_W, WGRAD)                       \
    extern "C" __global__ void __launch_bounds__(512, MINB)                                            \
        ln_bwd_block_##DT##_k##K##_##PACKING##_##VARIANT(LN_BWD_PARAMS(T, W, A)) {                     \
        __shared__ A scratch[33 * 2];                                                                  \
        bwd_block<T, W, K, VW, HAS_W, WGRAD>(LN_BWD_ARGS(T, W), scratch);                              \
    }
#define LN_BWD_BLOCK_WITH(VARIANTS, T, W, A, DT, K, MINB)                          \
    VARIANTS(LN_BWD_BLOCK_ONE, T, W, A, DT, K, MINB, v, Pack<T>::width)            \
    VARIANTS(LN_BWD_BLOCK_ONE, T, W, A, DT, K, MINB, s, 1)
#define LN_BWD_BLOCK(T, W, A, DT, K, MINB) LN_BWD_BLOCK_WITH(LN_ALL_VARIANTS, T, W, A, DT, K, MINB)
#define LN_BWD_BLOCK_W32(T, A, DT, K, MINB) LN_BWD_BLOCK_WITH(LN_AFFINE_VARIANTS, T, float, A, DT, K, MINB)

// ln_bwd_rowsums_<DT>_<v|s>_<plain|weight> (one row per block, <= 512 threads; + row_sums (2 N)) and
// ln_bwd_tile_<DT>_<v|s>_<variant> (grid (column tiles, row groups), 256 threads; + row_sums): any D.
#define LN_BWD_ROWSUMS_ONE(T, W, A, DT, PACKING, VW, VARIANT, HAS_W, WGRAD)                                   \
    extern "C" __global__ void __launch_bounds__(512)                                                       \
        ln_bwd_rowsums_##DT##_##PACKING##_##VARIANT(LN_BWD_PARAMS(T, W, A), A *row_sums) {                  \
        __shared__ A scratch[33 * 2];                                                                       \
        bwd_rowsums<T, W, VW, HAS_W>(LN_BWD_ARGS(T, W), row_sums, scratch);                                 \
    }
#define LN_BWD_TILE_ONE(T, W, A, DT, PACKING, VW, VARIANT, HAS_W, WGRAD)                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                       \
        ln_bwd_tile_##DT##_##PACKING##_##VARIANT(LN_BWD_PARAMS(T, W, A), const A *row_sums) {               \
        bwd_tile<T, W, VW, HAS_W, WGRAD>(LN_BWD_ARGS(T, W), row_sums);                                      \
    }
// The row sums never compute dw / db: their variants are plain and weight only.
#define LN_ROWSUMS_VARIANTS_OF_LN_ALL_VARIANTS(M, ...) \
    M(__VA_ARGS__, plain, false, false) M(__VA_ARGS__, weight, true, false)
#define LN_ROWSUMS_VARIANTS_OF_LN_AFFINE_VARIANTS(M, ...) M(__VA_ARGS__, weight, true, false)
#define LN_BWD_STREAM_PACKING(VARIANTS, T, W, A, DT, PACKING, VW)                           \
    LN_ROWSUMS_VARIANTS_OF_##VARIANTS(LN_BWD_ROWSUMS_ONE, T, W, A, DT, PACKING, VW)        \
    VARIANTS(LN_BWD_TILE_ONE, T, W, A, DT, PACKING, VW)
#define LN_BWD_STREAM_WITH(VARIANTS, T, W, A, DT)                       \
    LN_BWD_STREAM_PACKING(VARIANTS, T, W, A, DT, v, Pack<T>::width)     \
    LN_BWD_STREAM_PACKING(VARIANTS, T, W, A, DT, s, 1)
#define LN_BWD_STREAM(T, W, A, DT) LN_BWD_STREAM_WITH(LN_ALL_VARIANTS, T, W, A, DT)
#define LN_BWD_STREAM_W32(T, A, DT) LN_BWD_STREAM_WITH(LN_AFFINE_VARIANTS, T, float, A, DT)

// ln_col_reduce_<dw>: (part_w, part_b, dw, db, P, D), 256 threads; named by the type of dw / db.
#define LN_COL_REDUCE(W, A, DW)                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                   \
        ln_col_reduce_##DW(const A *part_w, const A *part_b, W *dw, W *db, int P, int D) {              \
        col_reduce<W, A>(part_w, part_b, dw, db, P, D);                                                 \
    }
