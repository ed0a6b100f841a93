// Scaled-dot-product attention, flash style, on CUDA cores (the SIMT kernels: every dtype and
// head dim <= 128; attention_tc.cu has the tensor-core kernels for head dims 64 and 128): forward
// saves only out and lse; backward in flash-attention-2 form. Math and conventions (mask shapes,
// causal, fully masked rows) are those of kernels/cpu/attention.py.
//
// Storage type T: float, __half or __nv_bfloat16 (common.cuh's to_acc / from_acc): loads convert
// to float, every sum is float, and results round once to T. Shared tiles are float.
//
// Layout: q (B, L, E), k (B, S, E), v (B, S, Ev), out / dO (B, L, Ev) of T; lse / D (B, L) float.
// All contiguous. mask: a float additive bias read at mask[b * mask_bs + i * mask_ls + j]; the host
// passes zero strides for the size-1 dims of a (1, L, S) or (B, 1, S) mask (never expanded).
//
// The head dims are template parameters: HD >= max(E, Ev) is 32, 64 or 128, so each thread's
// accumulator slice (HD / 4 floats) is a register array indexed by unrolled loop counters only.
// Every block has 128 threads working in groups of 4 (the lanes of one row):
//
// (Kernel names carry the storage type: attn_fwd_<f32 | f16 | bf16>_hd<HD>, and so on.)
//
//   attn_fwd_hd<HD>   a block takes 32 query rows of one batch row (thread t: row t / 4, lane
//                     t % 4, output columns lane, lane + 4, ...). Per tile of BK keys (32, or 16
//                     at HD = 128 to stay under 48 KiB of static shared memory) staged with the
//                     query tile in shared memory (rows padded by one float: no bank conflicts),
//                     each lane scores BK / 4 keys, the group reduces max and sum with shuffles,
//                     rescales its accumulators (online softmax), parks p in shared memory (rows
//                     padded by one float too: a warp's 8 rows in 8 banks) and adds p v over
//                     the tile. out = acc / sum, lse = max + log(sum).
//   attn_bwd_rowdot   D_i = dO_i . out_i, one warp per row (the FA2 preprocessing step).
//   attn_bwd_hd<HD>   a block takes BKB keys of one batch row (thread t: key t / 4, lane t % 4,
//                     dk / dv columns lane, lane + 4, ...: kept in registers for the whole
//                     launch) and walks the query tiles that can see them: P = exp(s - lse) and
//                     dS = P (dO . v - D) scale in registers; dv += P^T dO and dk += dS^T q with
//                     q and dO from shared memory; dS parked in shared memory for dq += dS k by
//                     atomicAdd into a float array (zeroed by the host). Atomics only for dq:
//                     the alternative, a second kernel over query tiles, recomputes P and dP (two more of the five matrix products); float
//                     atomics make dq's last bits depend on the order the blocks finish in.
//   attn_bwd_finish   16-bit dq: the float atomics' buffer rounded once to T.
// A row that sees no key (lse = -inf) gets out 0 and no gradient; -inf scores give p = 0 (NaN in a
// NaN row: lse NaN, as PyTorch's softmax of a row holding NaN or +inf). NaN and
// inf propagate as in PyTorch (see docs/kernels/attention.md): a NaN or +inf score makes its row
// NaN, and P = 0 times a non-finite v (or dP - D) is NaN.
// No fast-math: expf / logf are the accurate library versions.

#include "common.cuh"

#define NEG_INF __int_as_float(0xff800000)

constexpr int THREADS = 128;
constexpr int FWD_ROWS = 32;  // query rows per forward block (4 lanes each)

template <int HD> struct Tiles;
template <> struct Tiles<32> { static constexpr int FWD_KEYS = 32, BWD_ROWS = 16; };
template <> struct Tiles<64> { static constexpr int FWD_KEYS = 32, BWD_ROWS = 16; };
template <> struct Tiles<128> { static constexpr int FWD_KEYS = 16, BWD_ROWS = 8; };

template <typename T>
struct Args {
    const T* q; const T* k; const T* v; const float* mask;
    const T* out; const T* grad_out; const float* lse; const float* rowdot;
    T* o; float* lse_out; float* dq; T* dk; T* dv;  // dq: float, summed by atomics
    int L, S, E, Ev;
    long long mask_bs, mask_ls;  // element strides of the mask (0 along broadcast dims)
    int has_mask, causal;
    float scale;
};

// Load rows [r0, r0 + n) of a (rows, width) matrix into shared `dst` (row stride HD + 1), zeros
// past the end and past `width` (so dot products may run over HD).
template <int HD, typename T>
__device__ __forceinline__ void stage(float* dst, const T* src, int r0, int n, int rows, int width) {
    for (int idx = threadIdx.x; idx < n * HD; idx += THREADS) {
        const int r = idx / HD, x = idx - r * HD;
        dst[r * (HD + 1) + x] = (r0 + r < rows && x < width) ? to_acc(src[(long long)(r0 + r) * width + x]) : 0.f;
    }
}

// Whether row i reads key j: both in range and, when causal, j <= i. A key a row does not read
// never reaches it, whatever its value (NaN included), as in the CPU impls.
template <typename T>
__device__ __forceinline__ bool reads(const Args<T>& a, int i, int j) {
    return i < a.L && j < a.S && !(a.causal && j > i);
}

template <typename T>
__device__ __forceinline__ float mask_at(const Args<T>& a, int b, int i, int j) {
    return a.has_mask ? a.mask[b * a.mask_bs + i * a.mask_ls + j] : 0.f;
}

template <int HD, typename T>
__device__ __forceinline__ void attn_fwd(const Args<T>& a) {
    constexpr int BK = Tiles<HD>::FWD_KEYS, KPL = BK / 4, CPL = HD / 4;  // keys / columns per lane
    __shared__ float qs[FWD_ROWS * (HD + 1)];
    __shared__ float ks[BK * (HD + 1)];
    __shared__ float vs[BK * (HD + 1)];
    __shared__ float ps[FWD_ROWS * (BK + 1)];  // rows padded: a warp's 8 rows in 8 banks
    // Batch rows along x (up to 2^31 - 1 blocks), query tiles along y (65535 at most): B = batch *
    // heads overflows gridDim.y's 65535 long before L / 32 does.
    const int b = blockIdx.x, i0 = blockIdx.y * FWD_ROWS;
    const int row = threadIdx.x >> 2, lane = threadIdx.x & 3, i = i0 + row;
    const T* qb = a.q + (long long)b * a.L * a.E;
    const T* kb = a.k + (long long)b * a.S * a.E;
    const T* vb = a.v + (long long)b * a.S * a.Ev;
    stage<HD>(qs, qb, i0, FWD_ROWS, a.L, a.E);

    float acc[CPL];
#pragma unroll
    for (int c = 0; c < CPL; ++c) acc[c] = 0.f;
    float m = NEG_INF, l = 0.f;
    const int last_row = min(a.L, i0 + FWD_ROWS) - 1;
    const int kend = a.causal ? min(a.S, last_row + 1) : a.S;
    for (int j0 = 0; j0 < kend; j0 += BK) {
        __syncthreads();  // the previous tile is consumed (and, first time, qs is staged)
        stage<HD>(ks, kb, j0, BK, a.S, a.E);
        stage<HD>(vs, vb, j0, BK, a.S, a.Ev);
        __syncthreads();
        float s[KPL];
        float tile_max = NEG_INF;
#pragma unroll
        for (int t = 0; t < KPL; ++t) {
            const int jj = lane + 4 * t, j = j0 + jj;
            float d = 0.f;
#pragma unroll 8
            for (int x = 0; x < HD; ++x) d += qs[row * (HD + 1) + x] * ks[jj * (HD + 1) + x];
            s[t] = reads(a, i, j) ? fmaf(d, a.scale, mask_at(a, b, i, j)) : NEG_INF;
            tile_max = fmaxf(tile_max, s[t]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float m_new = fmaxf(m, tile_max);
        // fmaxf skips NaN: a NaN score makes its p, and so the row's sum and output, NaN below.
        const bool empty = m_new == NEG_INF;  // nothing visible to this row yet
        const float alpha = empty ? 1.f : expf(m - m_new);
        const float shift = empty ? 0.f : m_new;  // empty: p = exp(-inf) = 0, or NaN for a NaN score
        float part = 0.f;
#pragma unroll
        for (int t = 0; t < KPL; ++t) {
            const float p = expf(s[t] - shift);
            ps[row * (BK + 1) + lane + 4 * t] = p;
            part += p;
        }
        part += __shfl_xor_sync(0xffffffffu, part, 1);
        part += __shfl_xor_sync(0xffffffffu, part, 2);
        l = l * alpha + part;
        m = m_new;
        __syncwarp();  // the row's four lanes are in one warp: their p are visible to each other
#pragma unroll
        for (int c = 0; c < CPL; ++c) acc[c] *= alpha;
        for (int jj = 0; jj < BK; ++jj) {
            const float p = ps[row * (BK + 1) + jj];
#pragma unroll
            for (int c = 0; c < CPL; ++c) acc[c] += p * vs[jj * (HD + 1) + lane + 4 * c];
        }
    }
    if (i >= a.L) return;
    // l = 0: fully masked, out = sum 0 * v (0, or NaN where v is not finite); l NaN: out, lse NaN.
    const float inv = l == 0.f ? 1.f : 1.f / l;
    T* orow = a.o + ((long long)b * a.L + i) * a.Ev;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const int x = lane + 4 * c;
        if (x < a.Ev) orow[x] = from_acc<T>(acc[c] * inv);
    }
    if (lane == 0) a.lse_out[(long long)b * a.L + i] = l == 0.f ? NEG_INF : m + logf(l);
}

template <int HD, typename T>
__device__ __forceinline__ void attn_bwd(const Args<T>& a) {
    constexpr int BK = THREADS / 4, BQ = Tiles<HD>::BWD_ROWS, CPL = HD / 4;  // keys: one lane group each
    __shared__ float qs[BQ * (HD + 1)];
    __shared__ float dos[BQ * (HD + 1)];
    __shared__ float dss[BQ * (BK + 1)];  // dS of the tile, for dq; P needs no parking (dv uses it in registers)
    const int b = blockIdx.x, j0 = blockIdx.y * BK;  // as in attn_fwd: batch rows along x
    const int key = threadIdx.x >> 2, lane = threadIdx.x & 3, j = j0 + key;
    const T* qb = a.q + (long long)b * a.L * a.E;
    const T* dob = a.grad_out + (long long)b * a.L * a.Ev;
    const T* kb = a.k + (long long)b * a.S * a.E;
    const T* vb = a.v + (long long)b * a.S * a.Ev;

    // This lane's key row slice (columns lane, lane + 4, ...) in registers, with the dk / dv slices.
    float kr[CPL], vr[CPL], dk[CPL], dv[CPL];
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const int x = lane + 4 * c;
        kr[c] = (j < a.S && x < a.E) ? to_acc(kb[(long long)j * a.E + x]) : 0.f;
        vr[c] = (j < a.S && x < a.Ev) ? to_acc(vb[(long long)j * a.Ev + x]) : 0.f;
        dk[c] = 0.f;
        dv[c] = 0.f;
    }
    const int istart = a.causal ? (j0 / BQ) * BQ : 0;  // causal: rows before j0 see none of these keys
    for (int i0 = istart; i0 < a.L; i0 += BQ) {
        __syncthreads();
        stage<HD>(qs, qb, i0, BQ, a.L, a.E);
        stage<HD>(dos, dob, i0, BQ, a.L, a.Ev);
        __syncthreads();
        // Scores of this key against the tile's rows: the 4 lanes split the dot products by
        // column and combine them with shuffles; every lane ends with every row's value.
#pragma unroll
        for (int r = 0; r < BQ; ++r) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                s += qs[r * (HD + 1) + lane + 4 * c] * kr[c];
                dp += dos[r * (HD + 1) + lane + 4 * c] * vr[c];
            }
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            dp += __shfl_xor_sync(0xffffffffu, dp, 1);
            dp += __shfl_xor_sync(0xffffffffu, dp, 2);
            const int i = i0 + r;
            float p = 0.f, ds = 0.f;
            if (i < a.L && j < a.S) {
                const float li = a.lse[(long long)b * a.L + i];
                const float x = reads(a, i, j) ? fmaf(s, a.scale, mask_at(a, b, i, j)) : NEG_INF;  // as attn_fwd
                if (li != NEG_INF) {  // x = -inf: p = 0, except in a NaN row (li NaN): NaN, as PyTorch
                    p = expf(x - li);
                    ds = p * (dp - a.rowdot[(long long)b * a.L + i]) * a.scale;
                } else {
                    const float g = dp - a.rowdot[(long long)b * a.L + i];
                    if (!(fabsf(g) <= 3.4e38f)) ds = g - g;  // P = 0 times a non-finite dP - D: NaN, as PyTorch
                }
            }
            if (lane == (r & 3)) dss[r * (BK + 1) + key] = ds;
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                dv[c] += p * dos[r * (HD + 1) + lane + 4 * c];
                dk[c] += ds * qs[r * (HD + 1) + lane + 4 * c];
            }
        }
        __syncthreads();
        // dq[i, x] += sum over this block's keys of dS[i, key] k[key, x]: one atomic per element.
        for (int idx = threadIdx.x; idx < BQ * a.E; idx += THREADS) {
            const int r = idx / a.E, x = idx - r * a.E, i = i0 + r;
            if (i >= a.L) continue;
            float g = 0.f;
            for (int kk = 0; kk < BK && j0 + kk < a.S; ++kk)
                g += dss[r * (BK + 1) + kk] * to_acc(kb[(long long)(j0 + kk) * a.E + x]);
            if (g != 0.f) atomicAdd(a.dq + ((long long)b * a.L + i) * a.E + x, g);
        }
    }
    if (j >= a.S) return;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const int x = lane + 4 * c;
        if (x < a.E) a.dk[((long long)b * a.S + j) * a.E + x] = from_acc<T>(dk[c]);
        if (x < a.Ev) a.dv[((long long)b * a.S + j) * a.Ev + x] = from_acc<T>(dv[c]);
    }
}

// Entry points take plain pointers and scalars (what cupy passes), gathered into Args. Forward:
// (q, k, v, mask, out, lse, L, S, E, Ev, mask_bs, mask_ls, has_mask, causal, scale); backward:
// (q, k, v, mask, grad_out, lse, rowdot, dq, dk, dv, L, S, E, Ev, mask_bs, mask_ls, has_mask,
// causal, scale). Grid: (B, ceil(L / 32)) forward, (B, ceil(S / 32)) backward; 128 threads.
// Names: attn_fwd_<dtype>_hd<HD>, attn_bwd_<dtype>_hd<HD>, dtype f32, f16 or bf16.
#define ATTN_FWD(T, NAME, HD)                                                                                  \
    __global__ void __launch_bounds__(THREADS) attn_fwd_##NAME##_hd##HD(                                      \
        const T* q, const T* k, const T* v, const float* mask, T* o, float* lse, int L, int S, int E, int Ev,  \
        long long mask_bs, long long mask_ls, int has_mask, int causal, float scale) {                        \
        const Args<T> a{q, k, v, mask, nullptr, nullptr, nullptr, nullptr, o, lse, nullptr, nullptr, nullptr, \
                        L, S, E, Ev, mask_bs, mask_ls, has_mask, causal, scale};                              \
        attn_fwd<HD>(a);                                                                                      \
    }
#define ATTN_BWD(T, NAME, HD)                                                                                  \
    __global__ void __launch_bounds__(THREADS) attn_bwd_##NAME##_hd##HD(                                      \
        const T* q, const T* k, const T* v, const float* mask, const T* grad_out, const float* lse,           \
        const float* rowdot, float* dq, T* dk, T* dv, int L, int S, int E, int Ev, long long mask_bs,         \
        long long mask_ls, int has_mask, int causal, float scale) {                                           \
        const Args<T> a{q, k, v, mask, nullptr, grad_out, lse, rowdot, nullptr, nullptr, dq, dk, dv,         \
                        L, S, E, Ev, mask_bs, mask_ls, has_mask, causal, scale};                              \
        attn_bwd<HD>(a);                                                                                      \
    }
#define ATTN_ALL_HD(T, NAME) \
    ATTN_FWD(T, NAME, 32) ATTN_FWD(T, NAME, 64) ATTN_FWD(T, NAME, 128) \
    ATTN_BWD(T, NAME, 32) ATTN_BWD(T, NAME, 64) ATTN_BWD(T, NAME, 128)

// D_i = dO_i . out_i for n_rows rows of width Ev: one warp per row.
template <typename T>
__device__ __forceinline__ void rowdot_rows(const T* grad_out, const T* out, float* rowdot, long long n_rows, int Ev) {
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    float d = 0.f;
    for (int x = lane; x < Ev; x += 32) d += to_acc(grad_out[row * Ev + x]) * to_acc(out[row * Ev + x]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) d += __shfl_xor_sync(0xffffffffu, d, offset);
    if (lane == 0) rowdot[row] = d;
}

extern "C" {
ATTN_ALL_HD(float, f32)
ATTN_ALL_HD(__half, f16)
ATTN_ALL_HD(__nv_bfloat16, bf16)

__global__ void __launch_bounds__(256) attn_bwd_rowdot_f32(const float* grad_out, const float* out, float* rowdot,
                                                           long long n_rows, int Ev) {
    rowdot_rows(grad_out, out, rowdot, n_rows, Ev);
}
__global__ void __launch_bounds__(256) attn_bwd_rowdot_f16(const __half* grad_out, const __half* out, float* rowdot,
                                                           long long n_rows, int Ev) {
    rowdot_rows(grad_out, out, rowdot, n_rows, Ev);
}
__global__ void __launch_bounds__(256) attn_bwd_rowdot_bf16(const __nv_bfloat16* grad_out, const __nv_bfloat16* out,
                                                            float* rowdot, long long n_rows, int Ev) {
    rowdot_rows(grad_out, out, rowdot, n_rows, Ev);
}

// 16-bit dq: the float buffer the backward's atomics summed into, rounded once to T.
__global__ void __launch_bounds__(256) attn_bwd_finish_f16(const float* dq, __half* out, long long n) {
    for (long long i = (long long)blockIdx.x * 256 + threadIdx.x; i < n; i += (long long)gridDim.x * 256)
        out[i] = from_acc<__half>(dq[i]);
}
__global__ void __launch_bounds__(256) attn_bwd_finish_bf16(const float* dq, __nv_bfloat16* out, long long n) {
    for (long long i = (long long)blockIdx.x * 256 + threadIdx.x; i < n; i += (long long)gridDim.x * 256)
        out[i] = from_acc<__nv_bfloat16>(dq[i]);
}
}
