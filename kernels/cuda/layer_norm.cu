// Layer norm over the last dimension, forward and backward (PyTorch F.layer_norm).
//
// Per row x (D values), weight w and bias b (w = 1, b = 0 when absent):
//   mean = sum x / D,  var = sum (x - mean)^2 / D,  rstd = 1 / sqrt(var + eps),  xhat = (x - mean) rstd
//   y = xhat w + b                                   (forward; saves mean and rstd per row)
//   g = dy w,  dx = rstd (g - mean(g) - xhat mean(g xhat)),  dw = sum_rows dy xhat,  db = sum_rows dy
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
//                   rows and writes them once, as row blockIdx.x of the partials (P, D). Per row:
//                   one block reduction of (sum g, sum g xhat), then dx.
//   ln_bwd_rowsums_* + ln_bwd_tile_*  any D: the row sums per row first (one block per row), then
//                   a 2-D grid (column tiles x row groups) writes dx and accumulates its columns
//                   over its rows in registers, one partial row per row group.
//   ln_col_reduce_* sums the P partial rows into dw and db: P D values, P ~ a few per SM, against
//                   the N D of the pass. No atomics anywhere: every partial value has one writer.
//
// K is a template parameter (registers are indexed by unrolled loop counters only). Rows move as
// 16-byte packs (float4 / double2) when the host sets LN_VEC (D a multiple of the pack and every
// row array 16-byte aligned), otherwise as coalesced scalars. No fast-math: sqrt and division are
// the IEEE ones, so results agree with the numpy reference to float32 rounding.

#define LN_WEIGHT 1  // weight given
#define LN_BIAS 2    // bias given (forward)
#define LN_VEC 4     // rows move as 16-byte packs
#define LN_WGRAD 8   // backward: write the dw / db partials

template <typename T> struct Num;
template <> struct Num<float> {
    static __device__ __forceinline__ float sqrt(float x) { return sqrtf(x); }
};
template <> struct Num<double> {
    static __device__ __forceinline__ double sqrt(double x) { return ::sqrt(x); }
};

template <typename T, int VW>
struct alignas(VW * sizeof(T)) Chunk {
    T e[VW];
};

// VW values from p[c0 ..] (fill when c0 >= D: in packed mode D is a multiple of VW, so a chunk is
// all in or all out).
template <typename T, int VW>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int c0, int D, T fill, T* out) {
    if (c0 < D) {
        const Chunk<T, VW> c = *reinterpret_cast<const Chunk<T, VW>*>(p + c0);
#pragma unroll
        for (int i = 0; i < VW; ++i) out[i] = c.e[i];
    } else {
#pragma unroll
        for (int i = 0; i < VW; ++i) out[i] = fill;
    }
}

template <typename T, int VW>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int c0, const T* v) {
    Chunk<T, VW> c;
#pragma unroll
    for (int i = 0; i < VW; ++i) c.e[i] = v[i];
    *reinterpret_cast<Chunk<T, VW>*>(p + c0) = c;
}

// ---------------------------------------------------------------------------------------------
// Block-wide sums of NV <= NVMAX values; every thread gets the result. scratch holds 33 NVMAX
// values: per-warp partials in [0, 32 NV), the broadcast at 32 NVMAX, which no partial overlaps, so
// reductions can follow each other with no extra barrier (a warp's next partial cannot clobber a
// broadcast a slower thread is still reading; the next broadcast is written only after a barrier
// every thread reaches after its read).
// ---------------------------------------------------------------------------------------------
template <int NV, typename T>
__device__ __forceinline__ void warp_sum(T (&v)[NV]) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
        for (int i = 0; i < NV; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
    }
}

template <int NV, int NVMAX, typename T>
__device__ __forceinline__ void block_sum(T (&v)[NV], T* scratch) {
    static_assert(NV <= NVMAX, "scratch too small");
    T* const broadcast = scratch + 32 * NVMAX;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    warp_sum<NV>(v);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < NV; ++i) scratch[warp * NV + i] = v[i];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int i = 0; i < NV; ++i) v[i] = lane < warps ? scratch[lane * NV + i] : T(0);
        warp_sum<NV>(v);
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < NV; ++i) broadcast[i] = v[i];
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = broadcast[i];
}

// Welford state of one thread (count, mean, sum of squared deviations) and Chan's merge.
template <typename T>
struct Welford {
    T n, mean, m2;
    __device__ __forceinline__ void add(T x) {
        n += T(1);
        const T delta = x - mean;
        mean += delta / n;
        m2 += delta * (x - mean);
    }
    __device__ __forceinline__ void merge(T nb, T mb, T m2b) {
        const T total = n + nb;
        if (nb == T(0)) return;
        const T delta = mb - mean;
        const T fb = nb / total;
        mean += delta * fb;
        m2 += m2b + delta * delta * n * fb;
        n = total;
    }
    __device__ __forceinline__ void warp_merge() {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            const T nb = __shfl_xor_sync(0xffffffffu, n, offset);
            const T mb = __shfl_xor_sync(0xffffffffu, mean, offset);
            const T m2b = __shfl_xor_sync(0xffffffffu, m2, offset);
            merge(nb, mb, m2b);
        }
    }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T>
struct FwdArgs {
    const T* __restrict__ x;
    const T* __restrict__ weight;
    const T* __restrict__ bias;
    T* __restrict__ y;
    T* __restrict__ mean;
    T* __restrict__ rstd;
    int D;
    T eps;
    int flags;
};

// y for one chunk of VW values at column c0, from the row's statistics.
template <typename T, int VW>
__device__ __forceinline__ void write_y(const FwdArgs<T>& a, T* yr, int c0, const T* v, T mu, T r) {
    T w[VW], b[VW], out[VW];
    if (a.flags & LN_WEIGHT) load_chunk<T, VW>(a.weight, c0, a.D, T(1), w);
    if (a.flags & LN_BIAS) load_chunk<T, VW>(a.bias, c0, a.D, T(0), b);
#pragma unroll
    for (int i = 0; i < VW; ++i) {
        T o = (v[i] - mu) * r;
        if (a.flags & LN_WEIGHT) o *= w[i];
        if (a.flags & LN_BIAS) o += b[i];
        out[i] = o;
    }
    store_chunk<T, VW>(yr, c0, out);
}

template <typename T, int K, int VW>
__device__ __forceinline__ void fwd_block(const FwdArgs<T>& a, T* scratch) {
    constexpr int U = K / VW;
    const long long row = blockIdx.x;
    const int t = threadIdx.x, nt = blockDim.x, D = a.D;
    const T* __restrict__ xr = a.x + row * D;
    T v[K];
    T s[1] = {T(0)};
#pragma unroll
    for (int u = 0; u < U; ++u) {
        load_chunk<T, VW>(xr, (u * nt + t) * VW, D, T(0), v + u * VW);
#pragma unroll
        for (int i = 0; i < VW; ++i) s[0] += v[u * VW + i];
    }
    block_sum<1, 1>(s, scratch);
    const T mu = s[0] / T(D);
    T q[1] = {T(0)};
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if ((u * nt + t) * VW < D) {  // padding would add mu^2
#pragma unroll
            for (int i = 0; i < VW; ++i) {
                const T c = v[u * VW + i] - mu;
                q[0] += c * c;
            }
        }
    }
    block_sum<1, 1>(q, scratch);
    const T r = T(1) / Num<T>::sqrt(q[0] / T(D) + a.eps);
    if (t == 0) {
        a.mean[row] = mu;
        a.rstd[row] = r;
    }
    T* __restrict__ yr = a.y + row * D;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c0 = (u * nt + t) * VW;
        if (c0 < D) write_y<T, VW>(a, yr, c0, v + u * VW, mu, r);
    }
}

template <typename T, int VW>
__device__ __forceinline__ void fwd_stream(const FwdArgs<T>& a, T* scratch) {
    const long long row = blockIdx.x;
    const int t = threadIdx.x, nt = blockDim.x, D = a.D;
    const T* __restrict__ xr = a.x + row * D;
    Welford<T> st{T(0), T(0), T(0)};
    for (int c0 = t * VW; c0 < D; c0 += nt * VW) {
        T v[VW];
        load_chunk<T, VW>(xr, c0, D, T(0), v);
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
        if (lane < warps) st = Welford<T>{scratch[3 * lane], scratch[3 * lane + 1], scratch[3 * lane + 2]};
        else st = Welford<T>{T(0), T(0), T(0)};
        st.warp_merge();
        if (lane == 0) {
            scratch[96] = st.mean;
            scratch[97] = T(1) / Num<T>::sqrt(st.m2 / T(D) + a.eps);
        }
    }
    __syncthreads();
    const T mu = scratch[96], r = scratch[97];
    if (t == 0) {
        a.mean[row] = mu;
        a.rstd[row] = r;
    }
    T* __restrict__ yr = a.y + row * D;
    for (int c0 = t * VW; c0 < D; c0 += nt * VW) {
        T v[VW];
        load_chunk<T, VW>(xr, c0, D, T(0), v);
        write_y<T, VW>(a, yr, c0, v, mu, r);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
template <typename T>
struct BwdArgs {
    const T* __restrict__ dy;
    const T* __restrict__ x;
    const T* __restrict__ weight;
    const T* __restrict__ mean;
    const T* __restrict__ rstd;
    T* __restrict__ dx;
    T* __restrict__ part_w;  // (P, D) partial column sums of dy xhat (LN_WGRAD)
    T* __restrict__ part_b;  // (P, D) partial column sums of dy
    long long n_rows;
    int D;
    int flags;
};

template <typename T, int VW>
__device__ __forceinline__ void write_dx(const BwdArgs<T>& a, T* dxr, int c0, const T* xh, const T* g_dy, T r,
                                         T c_g, T c_gx) {
    T w[VW], out[VW];
    if (a.flags & LN_WEIGHT) load_chunk<T, VW>(a.weight, c0, a.D, T(1), w);
#pragma unroll
    for (int i = 0; i < VW; ++i) {
        const T g = (a.flags & LN_WEIGHT) ? g_dy[i] * w[i] : g_dy[i];
        out[i] = r * (g - c_g - xh[i] * c_gx);
    }
    store_chunk<T, VW>(dxr, c0, out);
}

template <typename T, int K, int VW>
__device__ __forceinline__ void bwd_block(const BwdArgs<T>& a, T* scratch) {
    constexpr int U = K / VW;
    const int t = threadIdx.x, nt = blockDim.x, D = a.D;
    const bool wgrad = a.flags & LN_WGRAD;
    T acc_w[K], acc_b[K];
#pragma unroll
    for (int k = 0; k < K; ++k) acc_w[k] = acc_b[k] = T(0);
    for (long long row = blockIdx.x; row < a.n_rows; row += gridDim.x) {
        const T mu = a.mean[row], r = a.rstd[row];
        T xh[K], d[K];
        T s[2] = {T(0), T(0)};  // sum g, sum g xhat
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c0 = (u * nt + t) * VW;
            T w[VW];
            load_chunk<T, VW>(a.x + row * D, c0, D, T(0), xh + u * VW);
            load_chunk<T, VW>(a.dy + row * D, c0, D, T(0), d + u * VW);  // 0 beyond D: adds nothing below
            if (a.flags & LN_WEIGHT) load_chunk<T, VW>(a.weight, c0, D, T(0), w);
#pragma unroll
            for (int i = 0; i < VW; ++i) {
                const int k = u * VW + i;
                xh[k] = (xh[k] - mu) * r;
                const T g = (a.flags & LN_WEIGHT) ? d[k] * w[i] : d[k];
                s[0] += g;
                s[1] += g * xh[k];
                if (wgrad) {
                    acc_w[k] += d[k] * xh[k];
                    acc_b[k] += d[k];
                }
            }
        }
        block_sum<2, 2>(s, scratch);
        const T c_g = s[0] / T(D), c_gx = s[1] / T(D);
        T* __restrict__ dxr = a.dx + row * D;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c0 = (u * nt + t) * VW;
            if (c0 < D) write_dx<T, VW>(a, dxr, c0, xh + u * VW, d + u * VW, r, c_g, c_gx);
        }
    }
    if (wgrad) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c0 = (u * nt + t) * VW;
            if (c0 < D) {
                store_chunk<T, VW>(a.part_w + (long long)blockIdx.x * D, c0, acc_w + u * VW);
                store_chunk<T, VW>(a.part_b + (long long)blockIdx.x * D, c0, acc_b + u * VW);
            }
        }
    }
}

// Per row: out[2 row] = mean(g), out[2 row + 1] = mean(g xhat). One row per block.
template <typename T, int VW>
__device__ __forceinline__ void bwd_rowsums(const BwdArgs<T>& a, T* row_sums, T* scratch) {
    const long long row = blockIdx.x;
    const int t = threadIdx.x, nt = blockDim.x, D = a.D;
    const T mu = a.mean[row], r = a.rstd[row];
    T s[2] = {T(0), T(0)};
    for (int c0 = t * VW; c0 < D; c0 += nt * VW) {
        T xv[VW], d[VW], w[VW];
        load_chunk<T, VW>(a.x + row * D, c0, D, T(0), xv);
        load_chunk<T, VW>(a.dy + row * D, c0, D, T(0), d);
        if (a.flags & LN_WEIGHT) load_chunk<T, VW>(a.weight, c0, D, T(0), w);
#pragma unroll
        for (int i = 0; i < VW; ++i) {
            const T g = (a.flags & LN_WEIGHT) ? d[i] * w[i] : d[i];
            s[0] += g;
            s[1] += g * ((xv[i] - mu) * r);
        }
    }
    block_sum<2, 2>(s, scratch);
    if (t == 0) {
        row_sums[2 * row] = s[0] / T(D);
        row_sums[2 * row + 1] = s[1] / T(D);
    }
}

// dx for columns [blockIdx.x blockDim.x VW, + blockDim.x VW) of rows blockIdx.y, + gridDim.y, ...,
// and those columns' partial sums over those rows (partial row blockIdx.y). No barriers.
template <typename T, int VW>
__device__ __forceinline__ void bwd_tile(const BwdArgs<T>& a, const T* row_sums) {
    const int D = a.D;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VW;
    if (c0 >= D) return;
    const bool wgrad = a.flags & LN_WGRAD;
    T acc_w[VW], acc_b[VW];
#pragma unroll
    for (int i = 0; i < VW; ++i) acc_w[i] = acc_b[i] = T(0);
    for (long long row = blockIdx.y; row < a.n_rows; row += gridDim.y) {
        const T mu = a.mean[row], r = a.rstd[row];
        T xh[VW], d[VW];
        load_chunk<T, VW>(a.x + row * D, c0, D, T(0), xh);
        load_chunk<T, VW>(a.dy + row * D, c0, D, T(0), d);
#pragma unroll
        for (int i = 0; i < VW; ++i) {
            xh[i] = (xh[i] - mu) * r;
            acc_w[i] += d[i] * xh[i];
            acc_b[i] += d[i];
        }
        write_dx<T, VW>(a, a.dx + row * D, c0, xh, d, r, row_sums[2 * row], row_sums[2 * row + 1]);
    }
    if (wgrad) {
        store_chunk<T, VW>(a.part_w + (long long)blockIdx.y * D, c0, acc_w);
        store_chunk<T, VW>(a.part_b + (long long)blockIdx.y * D, c0, acc_b);
    }
}

// dw[c] = sum_p part_w[p, c], db[c] likewise; grid-stride over the columns (coalesced per p).
template <typename T>
__device__ __forceinline__ void col_reduce(const T* __restrict__ part_w, const T* __restrict__ part_b, T* dw, T* db,
                                           int P, int D) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < D; c += gridDim.x * blockDim.x) {
        T sw = T(0), sb = T(0);
        for (int p = 0; p < P; ++p) {
            sw += part_w[(long long)p * D + c];
            sb += part_b[(long long)p * D + c];
        }
        dw[c] = sw;
        db[c] = sb;
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points (mirrored by kernels/cuda/layer_norm.py)
// ---------------------------------------------------------------------------------------------
// forward: (x, weight, bias, y, mean, rstd, D, eps, flags), one row per block
#define LN_FWD_PARAMS(T) \
    const T *x, const T *weight, const T *bias, T *y, T *mean, T *rstd, int D, T eps, int flags
#define LN_FWD_ARGS FwdArgs<T_>{x, weight, bias, y, mean, rstd, D, eps, flags}

// ln_fwd_block_<dt>_k<K>_<v|s>: D <= threads K, <= 1024 threads.
#define LN_FWD_BLOCK(T, DT, K)                                                                           \
    extern "C" __global__ void __launch_bounds__(1024, 1) ln_fwd_block_##DT##_k##K##_v(LN_FWD_PARAMS(T)) { \
        using T_ = T;                                                                                    \
        __shared__ T scratch[33];                                                                        \
        fwd_block<T, K, 16 / sizeof(T)>(LN_FWD_ARGS, scratch);                                           \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(1024, 1) ln_fwd_block_##DT##_k##K##_s(LN_FWD_PARAMS(T)) { \
        using T_ = T;                                                                                    \
        __shared__ T scratch[33];                                                                        \
        fwd_block<T, K, 1>(LN_FWD_ARGS, scratch);                                                        \
    }

// ln_fwd_stream_<dt>_<v|s>: any D, <= 512 threads.
#define LN_FWD_STREAM(T, DT)                                                                        \
    extern "C" __global__ void __launch_bounds__(512) ln_fwd_stream_##DT##_v(LN_FWD_PARAMS(T)) {    \
        using T_ = T;                                                                               \
        __shared__ T scratch[98];                                                                   \
        fwd_stream<T, 16 / sizeof(T)>(LN_FWD_ARGS, scratch);                                        \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(512) ln_fwd_stream_##DT##_s(LN_FWD_PARAMS(T)) {    \
        using T_ = T;                                                                               \
        __shared__ T scratch[98];                                                                   \
        fwd_stream<T, 1>(LN_FWD_ARGS, scratch);                                                     \
    }

// backward: (dy, x, weight, mean, rstd, dx, part_w, part_b, n_rows, D, flags)
#define LN_BWD_PARAMS(T)                                                                                     \
    const T *dy, const T *x, const T *weight, const T *mean, const T *rstd, T *dx, T *part_w, T *part_b, \
        long long n_rows, int D, int flags
#define LN_BWD_ARGS BwdArgs<T_>{dy, x, weight, mean, rstd, dx, part_w, part_b, n_rows, D, flags}

// ln_bwd_block_<dt>_k<K>_<v|s>: D <= threads K, <= 512 threads, at least MINB blocks of 512 per SM
// (float32: 2, i.e. <= 64 registers; float64 needs more); the host sizes its one-wave grid by the
// occupancy query.
#define LN_BWD_BLOCK(T, DT, K, MINB)                                                                           \
    extern "C" __global__ void __launch_bounds__(512, MINB) ln_bwd_block_##DT##_k##K##_v(LN_BWD_PARAMS(T)) { \
        using T_ = T;                                                                                       \
        __shared__ T scratch[33 * 2];                                                                       \
        bwd_block<T, K, 16 / sizeof(T)>(LN_BWD_ARGS, scratch);                                              \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(512, MINB) ln_bwd_block_##DT##_k##K##_s(LN_BWD_PARAMS(T)) { \
        using T_ = T;                                                                                       \
        __shared__ T scratch[33 * 2];                                                                       \
        bwd_block<T, K, 1>(LN_BWD_ARGS, scratch);                                                           \
    }

// ln_bwd_rowsums_<dt>_<v|s> (one row per block, <= 512 threads; + row_sums (2 N)) and
// ln_bwd_tile_<dt>_<v|s> (grid (column tiles, row groups), 256 threads; + row_sums): any D.
#define LN_BWD_STREAM(T, DT)                                                                                \
    extern "C" __global__ void __launch_bounds__(512) ln_bwd_rowsums_##DT##_v(LN_BWD_PARAMS(T), T *row_sums) { \
        using T_ = T;                                                                                       \
        __shared__ T scratch[33 * 2];                                                                       \
        bwd_rowsums<T, 16 / sizeof(T)>(LN_BWD_ARGS, row_sums, scratch);                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(512) ln_bwd_rowsums_##DT##_s(LN_BWD_PARAMS(T), T *row_sums) { \
        using T_ = T;                                                                                       \
        __shared__ T scratch[33 * 2];                                                                       \
        bwd_rowsums<T, 1>(LN_BWD_ARGS, row_sums, scratch);                                                  \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) ln_bwd_tile_##DT##_v(LN_BWD_PARAMS(T), const T *row_sums) { \
        using T_ = T;                                                                                       \
        bwd_tile<T, 16 / sizeof(T)>(LN_BWD_ARGS, row_sums);                                                 \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) ln_bwd_tile_##DT##_s(LN_BWD_PARAMS(T), const T *row_sums) { \
        using T_ = T;                                                                                       \
        bwd_tile<T, 1>(LN_BWD_ARGS, row_sums);                                                              \
    }

// ln_col_reduce_<dt>: (part_w, part_b, dw, db, P, D), 256 threads.
#define LN_COL_REDUCE(T, DT)                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                                   \
        ln_col_reduce_##DT(const T *part_w, const T *part_b, T *dw, T *db, int P, int D) {              \
        col_reduce<T>(part_w, part_b, dw, db, P, D);                                                    \
    }

// The configurations, mirrored by CONFIGS in kernels/cuda/layer_norm.py.
// float32: forward on chip up to D = 16384 (16 per thread x 1024), backward up to 4096 (8 x 512).
LN_FWD_BLOCK(float, f32, 4)
LN_FWD_BLOCK(float, f32, 8)
LN_FWD_BLOCK(float, f32, 16)
LN_FWD_STREAM(float, f32)
LN_BWD_BLOCK(float, f32, 4, 2)
LN_BWD_BLOCK(float, f32, 8, 2)
LN_BWD_STREAM(float, f32)
LN_COL_REDUCE(float, f32)
// float64: forward on chip up to D = 8192, backward up to 2048.
LN_FWD_BLOCK(double, f64, 2)
LN_FWD_BLOCK(double, f64, 4)
LN_FWD_BLOCK(double, f64, 8)
LN_FWD_STREAM(double, f64)
LN_BWD_BLOCK(double, f64, 2, 1)
LN_BWD_BLOCK(double, f64, 4, 1)
LN_BWD_STREAM(double, f64)
LN_COL_REDUCE(double, f64)
