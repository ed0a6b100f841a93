// Softmax cross-entropy, loss and gradient in one launch (PyTorch F.cross_entropy, reduction='none').
//
// Per row z (C logits), m = max z, s = sum exp(z - m), L = log s, p = exp(z - m) / s, and the
// weighted target distribution u (w = 1 without class weights, eps = label smoothing):
//   hard t: u_c = (1 - eps) w_t [c == t] + (eps / C) w_c      soft q: u_c = w_c ((1 - eps) q_c + eps / C)
//   loss   = S L - sum_c u_c (z_c - m),  S = sum_c u_c
//   grad_c = grad_scale (S p_c - u_c)
// grad_scale is read from device memory (a one-element array), so an engine that computes it on
// the GPU (1 / the weight sum of the non-ignored rows, for 'mean') never reads it back.
// The hard (1 - eps) w_t part of the loss is taken from z_t directly, so -inf logits elsewhere in
// the row (masked classes) give a finite loss, as in PyTorch. A row whose hard target equals
// ignore_index gets loss 0 and a zero gradient row.
//
// Three row kernels, chosen on the host by C (kernels/cuda/softmax_cross_entropy.py):
//   sce_warp_*   C <= G K (512 floats / 256 doubles): a group of G lanes (8 or 32) per row,
//                256 / G rows per 256-thread block, K values per lane in registers, shuffle-only
//                reductions;
//   sce_block_*  C <= threads K (up to 32768 floats / 16384 doubles): one row per block of
//                ceil(C / K) threads (a multiple of 32), K values per thread in registers, warp
//                shuffles + shared memory for the two block reductions (max, then the sums). The
//                row is read from global memory once and the gradient written once: 2 N C
//                sizeof(T) bytes for hard targets. "lean" instances (hard targets, no weights, no
//                smoothing: the common case) compile those features out and fit 32 floats per
//                thread at 1024 threads; "full" instances have them all and run <= 512 threads;
//   sce_stream_* any C: one row per block of 512 threads, an online max / sum-exp pass over the
//                row, then the gradient pass (the row is read twice; the second read may hit L2).
// K is a template parameter (registers are indexed by unrolled loop counters only), and rows move
// as 16-byte packs (float4 / double2 / 8 halves) when the host set SCE_VEC (C a multiple of the pack
// width and every row array 16-byte aligned); otherwise as coalesced scalars.
//
// Storage types float, double, __half and __nv_bfloat16 (common.cuh): logits, soft targets, weights
// and the gradient are T; everything is computed in A = Acc<T>::type (float for the 16-bit types):
// the registers hold A, the loss is written as A (float32 per row for 16-bit logits: the caller
// reduces before rounding), 1 - eps, eps / C and grad_scale are A, and each gradient element is
// rounded once to T when stored. A 16-bit row moves half the bytes of a float one; the on-chip
// capacity in values is the same (the registers hold floats).
//
// NaN: each thread's own max is fmax (which drops NaN; max_nan there costs registers and made
// three instantiations spill), the group reductions use common.cuh's NaN-propagating MaxOp. A NaN
// logit reaches the row's sum through exp(NaN - m) either way, so the row's loss and every one of
// its gradient elements are NaN, as in PyTorch (tests/kernels/test_softmax_cross_entropy.py).
//
// Before the row kernel, for hard targets, the host runs sce_target_range_*: one pass over the N
// targets that reduces min and max of the non-ignored ones into two int64s (warp shuffles, shared
// memory, one atomicMin/atomicMax per block). The host does not wait for them: they are read at
// the next sync point (kernels/deferred.py), which raises for a class index outside [0, C). The
// row kernels never read out of bounds: such a row gets a NaN loss and a zero gradient, so a
// parameter update made before the error is raised stays finite.
//
// Entry points (argument lists spelled out below, mirrored by kernels/cuda/softmax_cross_entropy.py):
//   sce_warp_<dt>_g<G>_k<K>, sce_block_<lean|full>_<dt>_k<K>_<v|s>, sce_stream_<dt>_<v|s>
//   (dt: f32, f64, f16, bf16; v: 16-byte packs, s: scalars), sce_target_range_<i32|i64>_<f32|f64>
//   (the accumulation type of the 'mean' denominator it may count).
// No fast-math: expf/logf are the accurate library versions, so results agree with the numpy
// reference to float32 rounding.

#define SCE_SOFT 1    // targets are (N, C) probabilities of type T
#define SCE_WEIGHT 2  // class weights given
#define SCE_SMOOTH 4  // label_smoothing > 0
#define SCE_GRAD 8    // write the gradient
#define SCE_I64 16    // hard targets are int64 (else int32)
#define SCE_VEC 32    // rows move as 16-byte packs

#include "common.cuh"

// Constants and functions of the accumulation type A (float or double).
template <typename A> struct Num;
template <> struct Num<float> {
    static __device__ __forceinline__ float lowest() { return -3.402823466e+38f; }
    static __device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
    static __device__ __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
    static __device__ __forceinline__ float exp(float x) { return expf(x); }
    static __device__ __forceinline__ float log(float x) { return logf(x); }
    static __device__ __forceinline__ float max(float a, float b) { return fmaxf(a, b); }
};
template <> struct Num<double> {
    static __device__ __forceinline__ double lowest() { return -1.7976931348623157e+308; }
    static __device__ __forceinline__ double neg_inf() { return __longlong_as_double(0xfff0000000000000ULL); }
    static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000ULL); }
    static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
    static __device__ __forceinline__ double log(double x) { return ::log(x); }
    static __device__ __forceinline__ double max(double a, double b) { return fmax(a, b); }
};

// VW consecutive values of T moved as one access (VW = Pack<T>::width, 16 bytes, for the packed
// path; 1 for the scalar path).
template <typename T, int VW>
struct alignas(VW * sizeof(T)) Chunk {
    T e[VW];
};

// ---------------------------------------------------------------------------------------------
// Arguments shared by every row kernel.
// ---------------------------------------------------------------------------------------------
// T: the storage type; A = Acc<T>::type: what everything is computed in.
template <typename T>
struct Args {
    using A = typename Acc<T>::type;
    const T* logits;       // (N, C)
    const void* targets;   // (N,) int32 / int64, or (N, C) T when SCE_SOFT
    const T* weight;       // (C,) when SCE_WEIGHT
    A* loss;               // (N,)
    T* grad;               // (N, C) when SCE_GRAD
    long long n_rows;
    int C;
    long long ignore_index;
    A one_minus_eps;       // 1 - label_smoothing
    A eps_over_c;          // label_smoothing / C
    const A* grad_scale;   // one value in device memory, read where the gradient needs it
    int flags;
};

// What a row needs besides its logits: the hard target (or -1 for soft rows) and the scalars.
template <typename A>
struct RowInfo {
    long long target;  // class index; -1 for soft targets
    bool ignored;      // hard target == ignore_index: loss 0, grad 0
    bool invalid;      // hard target outside [0, C) (reported by the deferred check): NaN loss, grad 0
    A w_t;             // weight of the target class (1 without weights)
    A z_t;             // logit of the target class
};

template <typename T, typename A = typename Acc<T>::type>
__device__ __forceinline__ RowInfo<A> row_info(const Args<T>& a, long long row) {
    RowInfo<A> info{-1, false, false, A(1), A(0)};
    if (a.flags & SCE_SOFT) return info;
    const long long t = (a.flags & SCE_I64) ? static_cast<const long long*>(a.targets)[row]
                                            : static_cast<long long>(static_cast<const int*>(a.targets)[row]);
    info.target = t;
    info.ignored = t == a.ignore_index;
    info.invalid = !info.ignored && (t < 0 || t >= a.C);
    if (!info.ignored && !info.invalid) {
        info.z_t = to_acc(a.logits[row * a.C + t]);
        if (a.flags & SCE_WEIGHT) info.w_t = to_acc(a.weight[t]);
    }
    return info;
}

// Load VW values of `src` starting at column c0 (in range as a whole, or wholly out when VW > 1
// since C is then a multiple of VW) into A; `fill` where out of range.
template <typename T, int VW, typename A>
__device__ __forceinline__ void load_chunk(const T* __restrict__ src, int c0, int C, A fill, A* out) {
    if (VW > 1) {
        if (c0 < C) {
            const Chunk<T, VW> v = *reinterpret_cast<const Chunk<T, VW>*>(src + c0);
#pragma unroll
            for (int i = 0; i < VW; ++i) out[i] = to_acc(v.e[i]);
        } else {
#pragma unroll
            for (int i = 0; i < VW; ++i) out[i] = fill;
        }
    } else {
        out[0] = c0 < C ? to_acc(src[c0]) : fill;
    }
}

// Store VW values of A rounded to T (once) at column c0, when in range.
template <typename T, int VW, typename A>
__device__ __forceinline__ void store_chunk(T* __restrict__ dst, int c0, int C, const A* in) {
    if (c0 < C) {
        Chunk<T, VW> v;
#pragma unroll
        for (int i = 0; i < VW; ++i) v.e[i] = from_acc<T>(in[i]);
        *reinterpret_cast<Chunk<T, VW>*>(dst + c0) = v;
    }
}

// u_c without the hard one-hot part: soft: w_c ((1 - eps) q_c + eps / C); hard: (eps / C) w_c (only
// needed when smoothing). eps / C goes in per term: sum_c w_c (z_c - m) alone can overflow where
// the loss does not. `q` and `w` are this column's values.
template <typename T, typename A>
__device__ __forceinline__ A smooth_part(const Args<T>& a, A q, A w) {
    return (a.flags & SCE_SOFT) ? w * (a.one_minus_eps * q + a.eps_over_c) : a.eps_over_c * w;
}

// Rows whose loss and gradient are fixed: a zero gradient, and the loss 0 (ignored) or NaN (invalid).
template <typename T, int VW, typename A>
__device__ __forceinline__ void fill_row(const Args<T>& a, long long row, int rank, int size, A loss) {
    if (a.flags & SCE_GRAD) {
        T* __restrict__ g = a.grad + row * a.C;
        A vals[VW];
#pragma unroll
        for (int i = 0; i < VW; ++i) vals[i] = A(0);
        for (int c0 = rank * VW; c0 < a.C; c0 += size * VW) store_chunk<T, VW>(g, c0, a.C, vals);
    }
    if (rank == 0) a.loss[row] = loss;
}

// ---------------------------------------------------------------------------------------------
// On-chip row: K values per thread in registers; column of value (j, i) is (j * size + rank) * VW + i.
// ---------------------------------------------------------------------------------------------
// FULL = false compiles out soft targets, class weights and smoothing (the common case, and the
// leanest code: it fits K = 32 floats per thread at 1024 threads without spilling).
template <typename T, int K, int VW, bool FULL, typename Group>
__device__ __forceinline__ void row_onchip(const Args<T>& a, long long row, const Group& group, int rank) {
    using A = typename Acc<T>::type;
    constexpr int J = K / VW;
    const int C = a.C, size = group.size();
    const T* __restrict__ zr = a.logits + row * C;

    // The row's loads go first and unconditionally, so they are not held up behind the load of
    // the target (the ignore test below depends on it); an ignored row wastes its read.
    A z[K];
#pragma unroll
    for (int j = 0; j < J; ++j) load_chunk<T, VW>(zr, (j * size + rank) * VW, C, Num<A>::neg_inf(), z + j * VW);
    const RowInfo<A> info = row_info(a, row);
    if (info.ignored || info.invalid) {  // uniform across the group
        fill_row<T, VW>(a, row, rank, size, info.ignored ? A(0) : Num<A>::nan());
        return;
    }
    const bool soft = FULL && (a.flags & SCE_SOFT), weighted = FULL && (a.flags & SCE_WEIGHT);
    const bool smooth = FULL && (a.flags & SCE_SMOOTH);
    const bool extra = soft || smooth;  // sums over u needed
    const T* __restrict__ qr = soft ? static_cast<const T*>(a.targets) + row * C : nullptr;

    A mx[1] = {Num<A>::lowest()};
#pragma unroll
    for (int k = 0; k < K; ++k) mx[0] = Num<A>::max(mx[0], z[k]);
    group_reduce(group, mx, MaxOp{}, Num<A>::lowest());
    const A m = mx[0];

    // sums[0] = s = sum exp(z - m); sums[1] = sum u; sums[2] = sum u (z - m)
    A sums[3] = {A(0), A(0), A(0)};
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int c0 = (j * size + rank) * VW;
        A q[VW], w[VW];
        if (extra) {
            if (soft) load_chunk<T, VW>(qr, c0, C, A(0), q);
            if (weighted) load_chunk<T, VW>(a.weight, c0, C, A(0), w);
        }
#pragma unroll
        for (int i = 0; i < VW; ++i) {
            const A d = z[j * VW + i] - m;
            const A e = Num<A>::exp(d);
            sums[0] += e;
            if (extra && c0 < C) {  // a chunk is wholly inside the row or wholly past its end
                const A u = smooth_part(a, soft ? q[i] : A(0), weighted ? w[i] : A(1));
                sums[1] += u;
                sums[2] += u * d;
            }
            z[j * VW + i] = e;
        }
    }
    if (extra) {
        group_reduce(group, sums, SumOp{}, A(0));
    } else {
        A only_s[1] = {sums[0]};
        group_reduce(group, only_s, SumOp{}, A(0));
        sums[0] = only_s[0];
    }

    const A s = sums[0], log_s = Num<A>::log(s);
    A S, loss;
    if (soft) {
        S = sums[1];
        loss = S * log_s - sums[2];
    } else {
        const A hard = a.one_minus_eps * info.w_t;
        S = hard;
        loss = hard * (log_s - (info.z_t - m));
        if (smooth) {
            S += sums[1];
            loss += sums[1] * log_s - sums[2];
        }
    }
    if (rank == 0) a.loss[row] = loss;
    if (!(a.flags & SCE_GRAD)) return;

    const A grad_scale = *a.grad_scale;
    const A coef = grad_scale * S / s;
    const A hard_sub = grad_scale * a.one_minus_eps * info.w_t;  // subtracted at c == t
    T* __restrict__ gr = a.grad + row * C;
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int c0 = (j * size + rank) * VW;
        A q[VW], w[VW], out[VW];
        if (extra) {
            if (soft) load_chunk<T, VW>(qr, c0, C, A(0), q);
            if (weighted) load_chunk<T, VW>(a.weight, c0, C, A(0), w);
        }
#pragma unroll
        for (int i = 0; i < VW; ++i) {
            A g = coef * z[j * VW + i];
            if (extra) g -= grad_scale * smooth_part(a, soft ? q[i] : A(0), weighted ? w[i] : A(1));
            if (!soft && c0 + i == info.target) g -= hard_sub;
            out[i] = g;
        }
        store_chunk<T, VW>(gr, c0, C, out);
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming row (any C): pass 1 online (m, s) and sum u; pass 2 gradient and sum u (z - m).
// Each thread walks chunks rank, rank + size, ... ; U chunks per step keep U loads in flight.
// ---------------------------------------------------------------------------------------------
template <typename T, int VW, typename A = typename Acc<T>::type>
__device__ __forceinline__ void row_stream(const Args<T>& a, long long row, const BlockGroup<A, 2>& group) {
    constexpr int U = VW == 1 ? 8 : 4;  // chunks per step: 8 or 16 values in flight per thread
    const int C = a.C, size = blockDim.x, rank = threadIdx.x;
    const RowInfo<A> info = row_info(a, row);
    if (info.ignored || info.invalid) {
        fill_row<T, VW>(a, row, rank, size, info.ignored ? A(0) : Num<A>::nan());
        return;
    }
    const bool soft = a.flags & SCE_SOFT, weighted = a.flags & SCE_WEIGHT;
    const bool extra = soft || (a.flags & SCE_SMOOTH);
    const bool want_grad = a.flags & SCE_GRAD;
    const T* __restrict__ zr = a.logits + row * C;
    const T* __restrict__ qr = soft ? static_cast<const T*>(a.targets) + row * C : nullptr;
    const int step = size * VW * U;

    // Pass 1: per thread (m, s) online, one rescale per U chunks; sum u alongside.
    A m = Num<A>::lowest(), s = A(0), su = A(0);
    for (int base = rank * VW; base < C; base += step) {
        A z[U * VW];
#pragma unroll
        for (int u = 0; u < U; ++u) load_chunk<T, VW>(zr, base + u * size * VW, C, Num<A>::neg_inf(), z + u * VW);
        A cm = m;
#pragma unroll
        for (int k = 0; k < U * VW; ++k) cm = Num<A>::max(cm, z[k]);
        s *= Num<A>::exp(m - cm);  // m == cm: times 1; m == lowest: s is 0
        m = cm;
#pragma unroll
        for (int k = 0; k < U * VW; ++k) s += Num<A>::exp(z[k] - m);
        if (extra) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c0 = base + u * size * VW;
                A q[VW], w[VW];
                if (soft) load_chunk<T, VW>(qr, c0, C, A(0), q);
                if (weighted) load_chunk<T, VW>(a.weight, c0, C, A(0), w);
                if (c0 < C) {
#pragma unroll
                    for (int i = 0; i < VW; ++i) su += smooth_part(a, soft ? q[i] : A(0), weighted ? w[i] : A(1));
                }
            }
        }
    }
    A mx[1] = {m};
    group.template reduce<1>(mx, MaxOp{}, Num<A>::lowest());
    A sums[2] = {s * Num<A>::exp(m - mx[0]), su};
    group.template reduce<2>(sums, SumOp{}, A(0));
    m = mx[0];
    s = sums[0];
    su = sums[1];
    const A log_s = Num<A>::log(s);
    const A hard = a.one_minus_eps * info.w_t;
    const A S = soft ? su : hard + su;  // su = 0 for hard targets without smoothing

    // Pass 2: gradient, and sum u (z - m) for the loss.
    A acc = A(0);
    if (want_grad || extra) {
        const A grad_scale = *a.grad_scale;
        const A coef = grad_scale * S / s;
        const A hard_sub = grad_scale * hard;
        T* __restrict__ gr = want_grad ? a.grad + row * C : nullptr;
        for (int base = rank * VW; base < C; base += step) {
            A z[U * VW];
#pragma unroll
            for (int u = 0; u < U; ++u) load_chunk<T, VW>(zr, base + u * size * VW, C, Num<A>::neg_inf(), z + u * VW);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c0 = base + u * size * VW;
                if (c0 >= C) continue;
                A q[VW], w[VW], out[VW];
                if (soft) load_chunk<T, VW>(qr, c0, C, A(0), q);
                if (weighted && extra) load_chunk<T, VW>(a.weight, c0, C, A(0), w);
#pragma unroll
                for (int i = 0; i < VW; ++i) {
                    const A d = z[u * VW + i] - m;
                    A g = coef * Num<A>::exp(d);
                    if (extra) {
                        const A uu = smooth_part(a, soft ? q[i] : A(0), weighted ? w[i] : A(1));
                        acc += uu * d;
                        g -= grad_scale * uu;
                    }
                    if (!soft && c0 + i == info.target) g -= hard_sub;
                    out[i] = g;
                }
                if (want_grad) store_chunk<T, VW>(gr, c0, C, out);
            }
        }
    }
    if (extra) {
        A r[1] = {acc};
        group.template reduce<1>(r, SumOp{}, A(0));
        acc = r[0];
    }
    if (rank == 0) {
        A loss;
        if (soft) {
            loss = S * log_s - acc;
        } else {
            loss = hard * (log_s - (info.z_t - m));
            if (a.flags & SCE_SMOOTH) loss += su * log_s - acc;
        }
        a.loss[row] = loss;
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
template <typename T, typename A = typename Acc<T>::type>
__device__ __forceinline__ Args<T> make_args(const T* logits, const void* targets, const T* weight, A* loss, T* grad,
                                             long long n_rows, int C, long long ignore_index, A one_minus_eps,
                                             A eps_over_c, const A* grad_scale, int flags) {
    return Args<T>{logits, targets, weight, loss, grad, n_rows, C, ignore_index, one_minus_eps, eps_over_c,
                   grad_scale, flags};
}

// Warp kernel: 256 threads, 256 / G rows per block; features and packing chosen at run time
// (no register pressure at 256 threads).
template <typename T, int G, int K>
__device__ __forceinline__ void sce_warp(const Args<T>& a) {
    constexpr int VW = Pack<T>::width;
    const int rank = threadIdx.x % G;
    const long long row = (long long)blockIdx.x * (blockDim.x / G) + threadIdx.x / G;
    if (row >= a.n_rows) return;  // the whole group leaves together
    const unsigned lanes = G == 32 ? 0xffffffffu : ((1u << G) - 1u) << ((threadIdx.x & 31) & ~(G - 1));
    const WarpGroup<G> group{lanes, rank};
    if (a.flags & SCE_VEC) row_onchip<T, K, VW, true>(a, row, group, rank);
    else row_onchip<T, K, 1, true>(a, row, group, rank);
}

// Every row kernel takes (A = Acc<T>::type: T itself for float and double, float for the 16-bit types):
// (logits T, targets, weight T, loss A, grad T, n_rows, C, ignore_index, 1 - eps A, eps / C A, grad_scale A[1],
//  flags)
#define SCE_PARAMS(T)                                                                                          \
    const T *logits, const void *targets, const T *weight, Acc<T>::type *loss, T *grad, long long n_rows,      \
        int C, long long ignore_index, Acc<T>::type one_minus_eps, Acc<T>::type eps_over_c,                    \
        const Acc<T>::type *grad_scale, int flags
#define SCE_ARGS                                                                                   \
    make_args(logits, targets, weight, loss, grad, n_rows, C, ignore_index, one_minus_eps, eps_over_c, \
              grad_scale, flags)

// sce_warp_<dtype>_g<G>_k<K>: rows of C <= G K.
#define SCE_WARP(T, DT, G, K)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) sce_warp_##DT##_g##G##_k##K(SCE_PARAMS(T)) { \
        sce_warp<T, G, K>(SCE_ARGS);                                                                \
    }

// sce_block_<lean|full>_<dtype>_k<K>_<v|s>: one row per block, C <= threads * K. lean: hard targets
// without weights or smoothing, <= 1024 threads; full: every feature, <= 512 threads. v: 16-byte
// packs; s: scalars.
#define SCE_BLOCK(KIND, IS_FULL, THREADS, T, DT, K, PACK, VW)                                          \
    extern "C" __global__ void __launch_bounds__(THREADS) sce_block_##KIND##_##DT##_k##K##_##PACK(     \
        SCE_PARAMS(T)) {                                                                               \
        __shared__ Acc<T>::type scratch[33 * 3];                                                       \
        row_onchip<T, K, VW, IS_FULL>(SCE_ARGS, blockIdx.x, BlockGroup<Acc<T>::type, 3>{scratch},      \
                                      threadIdx.x);                                                    \
    }
#define SCE_BLOCK_LEAN(T, DT, K)                              \
    SCE_BLOCK(lean, false, 1024, T, DT, K, v, Pack<T>::width) \
    SCE_BLOCK(lean, false, 1024, T, DT, K, s, 1)
#define SCE_BLOCK_FULL_V(T, DT, K) SCE_BLOCK(full, true, 512, T, DT, K, v, Pack<T>::width)
#define SCE_BLOCK_FULL_S(T, DT, K) SCE_BLOCK(full, true, 512, T, DT, K, s, 1)

// sce_stream_<dtype>_<v|s>: any C, one row per block of <= 512 threads.
#define SCE_STREAM(T, DT)                                                                              \
    extern "C" __global__ void __launch_bounds__(512, 1) sce_stream_##DT##_v(SCE_PARAMS(T)) {            \
        __shared__ Acc<T>::type scratch[33 * 2];                                                       \
        row_stream<T, Pack<T>::width>(SCE_ARGS, blockIdx.x, BlockGroup<Acc<T>::type, 2>{scratch});     \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(512, 1) sce_stream_##DT##_s(SCE_PARAMS(T)) {            \
        __shared__ Acc<T>::type scratch[33 * 2];                                                       \
        row_stream<T, 1>(SCE_ARGS, blockIdx.x, BlockGroup<Acc<T>::type, 2>{scratch});                  \
    }

// The configurations, mirrored by CONFIGS in kernels/cuda/softmax_cross_entropy.py.
// float32: warp up to C = 512; lean block up to 32768 (32 floats per thread); full block up to
// 16384 (packed) or 8192 (scalars: the per-value addresses cost registers); stream beyond.
SCE_WARP(float, f32, 8, 4)
SCE_WARP(float, f32, 32, 8)
SCE_WARP(float, f32, 32, 16)
SCE_BLOCK_LEAN(float, f32, 8)
SCE_BLOCK_LEAN(float, f32, 16)
SCE_BLOCK_LEAN(float, f32, 32)
SCE_BLOCK_FULL_V(float, f32, 8)
SCE_BLOCK_FULL_V(float, f32, 32)
SCE_BLOCK_FULL_S(float, f32, 8)
SCE_BLOCK_FULL_S(float, f32, 16)
SCE_STREAM(float, f32)
// float64: warp up to C = 256; lean block up to 16384; full block up to 8192 (packed) or 4096
// (scalars); stream beyond.
SCE_WARP(double, f64, 8, 4)
SCE_WARP(double, f64, 32, 8)
SCE_BLOCK_LEAN(double, f64, 4)
SCE_BLOCK_LEAN(double, f64, 8)
SCE_BLOCK_LEAN(double, f64, 16)
SCE_BLOCK_FULL_V(double, f64, 4)
SCE_BLOCK_FULL_V(double, f64, 16)
SCE_BLOCK_FULL_S(double, f64, 4)
SCE_BLOCK_FULL_S(double, f64, 8)
SCE_STREAM(double, f64)
// float16 and bfloat16: the registers hold floats, so the row capacities in values are float32's,
// with K a multiple of the 8-value pack: warp up to C = 512 (g8_k8 from 33 to 64, below that too:
// K = 4 would not fill one pack); lean block up to 32768; full block up to 16384 (packed) or 8192
// (scalars); stream beyond.
SCE_WARP(__half, f16, 8, 8)
SCE_WARP(__half, f16, 32, 8)
SCE_WARP(__half, f16, 32, 16)
SCE_BLOCK_LEAN(__half, f16, 8)
SCE_BLOCK_LEAN(__half, f16, 16)
SCE_BLOCK_LEAN(__half, f16, 32)
SCE_BLOCK_FULL_V(__half, f16, 8)
SCE_BLOCK_FULL_V(__half, f16, 32)
SCE_BLOCK_FULL_S(__half, f16, 8)
SCE_BLOCK_FULL_S(__half, f16, 16)
SCE_STREAM(__half, f16)
SCE_WARP(__nv_bfloat16, bf16, 8, 8)
SCE_WARP(__nv_bfloat16, bf16, 32, 8)
SCE_WARP(__nv_bfloat16, bf16, 32, 16)
SCE_BLOCK_LEAN(__nv_bfloat16, bf16, 8)
SCE_BLOCK_LEAN(__nv_bfloat16, bf16, 16)
SCE_BLOCK_LEAN(__nv_bfloat16, bf16, 32)
SCE_BLOCK_FULL_V(__nv_bfloat16, bf16, 8)
SCE_BLOCK_FULL_V(__nv_bfloat16, bf16, 32)
SCE_BLOCK_FULL_S(__nv_bfloat16, bf16, 8)
SCE_BLOCK_FULL_S(__nv_bfloat16, bf16, 16)
SCE_STREAM(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Target check: out[0] = min, out[1] = max over targets != ignore_index (out preset to
// LLONG_MAX, LLONG_MIN, 0 by the host). With count != 0 the same pass also counts those targets into
// *denominator (preset to 0 by the host): the 'mean' denominator of unweighted hard targets; and the
// last block to finish (out[2], preset to 0, counts the blocks done) writes its reciprocal, or 0
// when every row is ignored, to *scale, where the row kernel reads its grad_scale. Each block adds
// its count as one float: the partial sums are whole numbers, exact (below 2^24 in float) in any
// order, so the result is deterministic. Grid-stride; a few atomics per block.
// ---------------------------------------------------------------------------------------------
template <typename I, typename A>
__device__ __forceinline__ void target_range(const I* __restrict__ targets, long long n, long long ignore_index,
                                             long long* out, A* denominator, A* scale, int count) {
    __shared__ long long lo_s[32], hi_s[32], n_s[32];
    long long lo = 0x7fffffffffffffffLL, hi = -0x7fffffffffffffffLL - 1, valid = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long t = targets[i];
        if (t != ignore_index) {
            lo = t < lo ? t : lo;
            hi = t > hi ? t : hi;
            ++valid;
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const long long a = __shfl_xor_sync(0xffffffffu, lo, offset), b = __shfl_xor_sync(0xffffffffu, hi, offset);
        lo = a < lo ? a : lo;
        hi = b > hi ? b : hi;
        valid += __shfl_xor_sync(0xffffffffu, valid, offset);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        lo_s[warp] = lo;
        hi_s[warp] = hi;
        n_s[warp] = valid;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
            lo = lo_s[w] < lo ? lo_s[w] : lo;
            hi = hi_s[w] > hi ? hi_s[w] : hi;
            valid += n_s[w];
        }
        atomicMin(out, lo);
        atomicMax(out + 1, hi);
        if (count) {
            if (valid) atomicAdd(denominator, static_cast<A>(valid));
            __threadfence();  // this block's count is visible before its ticket is
            const unsigned long long done = atomicAdd(reinterpret_cast<unsigned long long*>(out + 2), 1ULL);
            if (done == gridDim.x - 1) {  // the last block: every count is in
                const A total = atomicAdd(denominator, A(0));  // read through L2, as the atomics wrote
                *scale = total > A(0) ? A(1) / total : A(0);
            }
        }
    }
}

// (targets, n, ignore_index, out[3], denominator, scale [any pointers unless count], count)
#define SCE_TARGET_RANGE(I, IT, A, AT)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) sce_target_range_##IT##_##AT(                             \
        const I* targets, long long n, long long ignore_index, long long* out, A* denominator, A* scale,         \
        int count) {                                                                                              \
        target_range<I, A>(targets, n, ignore_index, out, denominator, scale, count);                            \
    }
SCE_TARGET_RANGE(int, i32, float, f32)
SCE_TARGET_RANGE(int, i32, double, f64)
SCE_TARGET_RANGE(long long, i64, float, f32)
SCE_TARGET_RANGE(long long, i64, double, f64)
