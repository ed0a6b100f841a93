// Attention forward and backward on tensor cores (mma.sync), FlashAttention-2 style, for head dims
// 64 and 128 (E = Ev = HD). Conventions, mask, causal, fully masked rows and NaN / inf rules are
// those of attention.cu (the SIMT kernels, which serve every other case); the design and
// its cost model are in docs/kernels/attention.md. kernels/cuda/attention_emulation.py replays
// these kernels' tile loops in NumPy (same tiles, same online-softmax order, same roundings).
// The backward is at the end of the file.
//
// Two variants of one loop:
//   16-bit (T = __nv_bfloat16 or __half): mma.sync m16n8k16 with fp32 accumulators. Q, K, V are
//     MMA operands as stored; P is rounded to T before the P V product (as FlashAttention-2).
//   3xTF32 (T = float): mma.sync m16n8k8 tf32, each operand x split into big = tf32(x) and
//     small = tf32(x - big), and a b ~ big_a big_b + big_a small_b + small_a big_b (the small
//     terms first), as CUTLASS's OpMultiplyAddFastF32: products carry ~21 bits of each operand,
//     errors of the order of float32's. A non-finite operand takes part only through big (its
//     small and its "cross" copy are 0): inf * 0 in a correction term would make NaN where the
//     exact product is inf.
//
// Work split (FlashAttention-2): a block of 4 warps owns TC_ROWS = 64 query rows of one batch row
// (blockIdx.x = batch row, blockIdx.y = query tile); each warp owns 16 rows, whose score tile
// (16 x BN), running max / sum and output accumulator (16 x HD) live in registers in the MMA
// accumulator layout: lane (g = lane / 4, q = lane % 4) holds rows g and g + 8, columns 2q, 2q + 1
// of every 8-wide n-tile. K and V tiles of BN keys go through shared memory with cp.async, double
// buffered: tile t + 1 is in flight while tile t is used. Causal: the key tiles past the block's
// last row are never loaded. Shared rows are padded (16-bit: +8 elements, float: +4) so that the
// 8 rows an ldmatrix phase or a fragment load touches fall in distinct banks.
//
// Scores: s = fmaf(q.k, scale, mask) where the row reads the key (as attention.cu's reads()), else
// -inf; online softmax per tile: m_new = fmaxf(m, tile max) (NaN skipped: a NaN score makes its p,
// and so the row, NaN), alpha = exp(m - m_new), p = exp(s - m_new) (m_new = -inf: shift 0), each
// lane summing its own columns (the 4 lanes of a row are added at the end). 16-bit: exp2f of
// (s - shift) * log2(e); float: expf.
#include "common.cuh"

#define NEG_INF __int_as_float(0xff800000)

constexpr int TC_THREADS = 128;  // 4 warps
constexpr int TC_ROWS = 64;      // query rows per block, 16 per warp
constexpr float LOG2E = 1.4426950408889634f;

// Keys per K / V tile. float at HD = 128 takes 32 keys: 2 blocks per SM fit in shared memory.
template <typename T, int HD> struct TcKeys { static constexpr int value = 64; };
template <> struct TcKeys<float, 128> { static constexpr int value = 32; };
// Shared row padding in elements: 16 bytes for 16-bit rows (ldmatrix phases conflict-free), 4 floats
// for float rows (fragment loads of 8 rows x 4 columns conflict-free).
template <typename T> struct TcPad { static constexpr int value = 8; };
template <> struct TcPad<float> { static constexpr int value = 4; };

template <typename T>
struct TcArgs {
    const T* q; const T* k; const T* v; const float* mask; T* o; float* lse;
    int L, S;
    long long mask_bs, mask_ls;  // element strides of the mask (0 along broadcast dims)
    int has_mask, causal;
    float scale;
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers: cp.async, ldmatrix, mma.sync, cvt to tf32.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; valid = false writes 16 zero bytes (src is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}

// c += a b for a 16 x 16 tile of a (row) and 16 x 8 of b (col), fp32 accumulators.
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1,
                                         __nv_bfloat16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, __half) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// c += a b for a 16 x 8 tile of a (row) and 8 x 8 of b (col), tf32 operands.
__device__ __forceinline__ void mma1688(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed in one register (lo in the low half: the lower column).
__device__ __forceinline__ unsigned pack2(float lo, float hi, __nv_bfloat16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned pack2(float lo, float hi, __half) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// x = big + small with big, small tf32 (round to nearest, ties away: cvt.rna); cross = big for a
// finite x, else 0 (see the header: the correction terms must not turn inf into NaN).
struct Tf32 { unsigned big, small, cross; };
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ Tf32 split_tf32(float x) {
    const unsigned big = to_tf32(x);
    const bool finite = fabsf(x) <= 3.402823466e38f;
    return Tf32{big, finite ? to_tf32(x - __uint_as_float(big)) : 0u, finite ? big : 0u};
}
// c += a b in 3xTF32 for split fragments a[4], b0, b1.
__device__ __forceinline__ void mma3xtf32(float (&c)[4], const Tf32 (&a)[4], const Tf32& b0, const Tf32& b1) {
    const unsigned a_cross[4] = {a[0].cross, a[1].cross, a[2].cross, a[3].cross};
    const unsigned a_small[4] = {a[0].small, a[1].small, a[2].small, a[3].small};
    const unsigned a_big[4] = {a[0].big, a[1].big, a[2].big, a[3].big};
    mma1688(c, a_cross, b0.small, b1.small);
    mma1688(c, a_small, b0.cross, b1.cross);
    mma1688(c, a_big, b0.big, b1.big);
}

// ---------------------------------------------------------------------------------------------
// Tile loads and the shared softmax / epilogue code of both variants.
// ---------------------------------------------------------------------------------------------

// Rows [r0, r0 + ROWS) of a (rows, HD) matrix of T into shared memory (row stride LD), 16 bytes per
// cp.async; rows past the end are zero-filled (a V row past S meets p = 0, and 0 * garbage could be NaN).
template <typename T, int ROWS, int HD, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int r0, int rows) {
    constexpr int CHUNK = 16 / sizeof(T), PER_ROW = HD / CHUNK, TOTAL = ROWS * PER_ROW;
    static_assert(TOTAL % TC_THREADS == 0, "every thread issues the same number of copies");
#pragma unroll
    for (int it = 0; it < TOTAL / TC_THREADS; ++it) {
        const int idx = it * TC_THREADS + threadIdx.x;
        const int r = idx / PER_ROW, c = (idx % PER_ROW) * CHUNK;
        const bool valid = r0 + r < rows;
        cp_async16(dst + r * LD + c, src + (long long)(valid ? r0 + r : 0) * HD + c, valid);
    }
}

// Per thread: rows row0 and row0 + 8 of the block's batch row b; the (c, r) element of n-tile nt
// is row row0 + 8 (r >> 1), key j0 + 8 nt + 2 q + (r & 1).
struct RowState {
    float m[2], l[2];  // running max; this lane's share of the running sum
};

template <typename T, int NT, int BN, bool FAST_EXP>
__device__ __forceinline__ void softmax_tile(const TcArgs<T>& a, float (&s)[NT][4], RowState& st, float (&alpha)[2],
                                             int b, int row0, int warp_row0, int j0, int q4) {
    // A tile every row of the warp reads in full, unmasked: only the scale.
    const bool plain = !a.has_mask && j0 + BN <= a.S && !(a.causal && j0 + BN - 1 > warp_row0);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int i = row0 + 8 * (r >> 1), j = j0 + 8 * nt + 2 * q4 + (r & 1);
            if (plain) {
                s[nt][r] = fmaf(s[nt][r], a.scale, 0.f);
            } else {
                const bool reads = i < a.L && j < a.S && !(a.causal && j > i);
                const float bias = (reads && a.has_mask) ? a.mask[b * a.mask_bs + i * a.mask_ls + j] : 0.f;
                s[nt][r] = reads ? fmaf(s[nt][r], a.scale, bias) : NEG_INF;
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float mx = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(st.m[h], mx);
        const bool empty = m_new == NEG_INF;  // nothing visible to this row yet
        const float shift = empty ? 0.f : m_new;
        alpha[h] = empty ? 1.f : (FAST_EXP ? exp2f((st.m[h] - m_new) * LOG2E) : expf(st.m[h] - m_new));
        float part = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int r = 2 * h; r < 2 * h + 2; ++r) {
                const float p = FAST_EXP ? exp2f((s[nt][r] - shift) * LOG2E) : expf(s[nt][r] - shift);
                s[nt][r] = p;
                part += p;
            }
        }
        st.l[h] = st.l[h] * alpha[h] + part;
        st.m[h] = m_new;
    }
}

template <int DT>
__device__ __forceinline__ void rescale(float (&o)[DT][4], const float (&alpha)[2]) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
    }
}

__device__ __forceinline__ void store2(__nv_bfloat16* p, float x, float y) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
__device__ __forceinline__ void store2(__half* p, float x, float y) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}
__device__ __forceinline__ void store2(float* p, float x, float y) {
    *reinterpret_cast<float2*>(p) = make_float2(x, y);
}

// out = o / l (l = 0, a row that saw no key: o itself, 0 or NaN from 0 * a non-finite v), lse.
template <typename T, int HD>
__device__ __forceinline__ void write_out(const TcArgs<T>& a, const float (&o)[HD / 8][4], RowState& st, int b,
                                          int row0, int q4) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = st.l[h];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int i = row0 + 8 * h;
        if (i >= a.L) continue;
        const float inv = l == 0.f ? 1.f : 1.f / l;
        T* orow = a.o + ((long long)b * a.L + i) * HD + 2 * q4;
#pragma unroll
        for (int dt = 0; dt < HD / 8; ++dt) store2(orow + 8 * dt, o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
        if (q4 == 0) a.lse[(long long)b * a.L + i] = l == 0.f ? NEG_INF : st.m[h] + logf(l);
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel: one loop, the two products by variant.
// ---------------------------------------------------------------------------------------------

// S (16 x BN, per warp) = Q K^T and O += P V for the 16-bit variant. Q's fragments are loaded
// once (qf) and kept in registers.
template <typename T, int HD, int BN, int LD>
struct Mma16 {
    static constexpr int KQ = HD / 16, NT = BN / 8, DT = HD / 8;
    unsigned qf[KQ][4];

    __device__ __forceinline__ void load_q(const T* qs, int warp, int lane) {
        // ldmatrix x4: lanes 0-15 address rows 0-15 at column 0, lanes 16-31 at column 8 -> a0..a3
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk)
            ldmatrix_x4(qf[kk], qs + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
    }

    __device__ __forceinline__ void scores(float (&s)[NT][4], const T* kt, int lane) const {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                // matrices: keys 0-7 / cols 0-7, keys 0-7 / cols 8-15, keys 8-15 / cols 0-7, keys 8-15 / cols 8-15
                unsigned bf[4];
                ldmatrix_x4(bf, kt + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                mma16816(s[2 * np], qf[kk], bf[0], bf[1], T());
                mma16816(s[2 * np + 1], qf[kk], bf[2], bf[3], T());
            }
        }
    }

    __device__ __forceinline__ void accumulate(float (&o)[DT][4], const float (&p)[NT][4], const T* vt,
                                               int lane) const {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            // P's accumulator layout is the A layout of m16n8k16: n-tiles 2kk and 2kk + 1 are its k halves
            const unsigned pa[4] = {pack2(p[2 * kk][0], p[2 * kk][1], T()), pack2(p[2 * kk][2], p[2 * kk][3], T()),
                                    pack2(p[2 * kk + 1][0], p[2 * kk + 1][1], T()),
                                    pack2(p[2 * kk + 1][2], p[2 * kk + 1][3], T())};
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                // transposed matrices: keys 0-7 / d 0-7, keys 8-15 / d 0-7, keys 0-7 / d 8-15, keys 8-15 / d 8-15
                unsigned bf[4];
                const T* row = vt + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD;
                ldmatrix_x4_trans(bf, row + dp * 16 + (lane >> 4) * 8);
                mma16816(o[2 * dp], pa, bf[0], bf[1], T());
                mma16816(o[2 * dp + 1], pa, bf[2], bf[3], T());
            }
        }
    }
};

// The 3xTF32 variant: fragments loaded from shared memory and split at each use (holding Q's
// split fragments for HD = 128 would take 192 registers).
template <int HD, int BN, int LD>
struct Mma3xTf32 {
    static constexpr int NT = BN / 8, DT = HD / 8;
    const float* qw;  // this warp's 16 query rows in shared memory

    __device__ __forceinline__ void load_q(const float* qs, int warp, int) { qw = qs + warp * 16 * LD; }

    __device__ __forceinline__ void scores(float (&s)[NT][4], const float* kt, int lane) const {
        const int g = lane >> 2, q4 = lane & 3;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll 1
        for (int kk = 0; kk < HD / 8; ++kk) {
            // A (16 x 8): a0 (g, q), a1 (g + 8, q), a2 (g, q + 4), a3 (g + 8, q + 4)
            const float* qp = qw + g * LD + kk * 8 + q4;
            const Tf32 af[4] = {split_tf32(qp[0]), split_tf32(qp[8 * LD]), split_tf32(qp[4]),
                                split_tf32(qp[8 * LD + 4])};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                // B (8 x 8, col) = K^T: b0 (k q, key g), b1 (k q + 4, key g)
                const float* kp = kt + (nt * 8 + g) * LD + kk * 8 + q4;
                mma3xtf32(s[nt], af, split_tf32(kp[0]), split_tf32(kp[4]));
            }
        }
    }

    __device__ __forceinline__ void accumulate(float (&o)[DT][4], const float (&p)[NT][4], const float* vt,
                                               int lane) const {
        const int g = lane >> 2, q4 = lane & 3;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            // The k index of this step is permuted: k = q stands for key 2q, k = q + 4 for key 2q + 1,
            // so P's accumulator layout is the A layout as it is: a0 = p (g, 2q), a1 = p (g + 8, 2q),
            // a2 = p (g, 2q + 1), a3 = p (g + 8, 2q + 1); B's rows follow: b0 = V[2q], b1 = V[2q + 1].
            const Tf32 pa[4] = {split_tf32(p[t][0]), split_tf32(p[t][2]), split_tf32(p[t][1]), split_tf32(p[t][3])};
            const float* vp = vt + (t * 8 + 2 * q4) * LD + g;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) mma3xtf32(o[dt], pa, split_tf32(vp[8 * dt]), split_tf32(vp[LD + 8 * dt]));
        }
    }
};

template <typename T, int HD, typename Mma, bool FAST_EXP>
__device__ __forceinline__ void attn_tc_fwd(const TcArgs<T>& a) {
    constexpr int BN = TcKeys<T, HD>::value, LD = HD + TcPad<T>::value, NT = BN / 8, DT = HD / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem);
    T* ks = qs + TC_ROWS * LD;  // two buffers of BN rows
    T* vs = ks + 2 * BN * LD;   // two buffers of BN rows

    const int b = blockIdx.x, i0 = blockIdx.y * TC_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q4 = lane & 3;
    const int warp_row0 = i0 + warp * 16, row0 = warp_row0 + (lane >> 2);
    const T* qb = a.q + (long long)b * a.L * HD;
    const T* kb = a.k + (long long)b * a.S * HD;
    const T* vb = a.v + (long long)b * a.S * HD;
    const int last_row = min(a.L, i0 + TC_ROWS) - 1;
    const int kend = a.causal ? min(a.S, last_row + 1) : a.S;  // causal: later key tiles are never loaded
    const int ntiles = (kend + BN - 1) / BN;

    load_tile<T, TC_ROWS, HD, LD>(qs, qb, i0, a.L);
    load_tile<T, BN, HD, LD>(ks, kb, 0, a.S);
    load_tile<T, BN, HD, LD>(vs, vb, 0, a.S);
    cp_async_commit();

    Mma mma;
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    RowState st{{NEG_INF, NEG_INF}, {0.f, 0.f}};

    for (int t = 0; t < ntiles; ++t) {
        const int buf = t & 1;
        if (t + 1 < ntiles) {  // the next tile into the other buffer, freed by the barrier ending tile t - 1
            load_tile<T, BN, HD, LD>(ks + (buf ^ 1) * BN * LD, kb, (t + 1) * BN, a.S);
            load_tile<T, BN, HD, LD>(vs + (buf ^ 1) * BN * LD, vb, (t + 1) * BN, a.S);
            cp_async_commit();
            cp_async_wait<1>();  // tile t (and Q) landed; t + 1 may still be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (t == 0) mma.load_q(qs, warp, lane);
        float s[NT][4];
        mma.scores(s, ks + buf * BN * LD, lane);
        float alpha[2];
        softmax_tile<T, NT, BN, FAST_EXP>(a, s, st, alpha, b, row0, warp_row0, t * BN, q4);
        rescale<DT>(o, alpha);
        mma.accumulate(o, s, vs + buf * BN * LD, lane);
        __syncthreads();  // every warp is done with buffer buf before tile t + 2 is loaded into it
    }
    write_out<T, HD>(a, o, st, b, row0, q4);
}

// Entry points: (q, k, v, mask, out, lse, L, S, mask_bs, mask_ls, has_mask, causal, scale);
// grid (B, ceil(L / 64)), 128 threads, dynamic shared memory (TC_ROWS + 4 BN) (HD + pad) elements
// (kernels/cuda/attention.py computes it and raises the kernel's limit above 48 KiB).
// Names: attn_tc_fwd_<bf16 | f16 | f32>_hd<64 | 128>; f32 is the 3xTF32 variant.
#define ATTN_TC_FWD(T, NAME, HD, MMA, FAST_EXP)                                                               \
    __global__ void __launch_bounds__(TC_THREADS) attn_tc_fwd_##NAME##_hd##HD(                               \
        const T* q, const T* k, const T* v, const float* mask, T* o, float* lse, int L, int S,                \
        long long mask_bs, long long mask_ls, int has_mask, int causal, float scale) {                       \
        const TcArgs<T> a{q, k, v, mask, o, lse, L, S, mask_bs, mask_ls, has_mask, causal, scale};           \
        attn_tc_fwd<T, HD, MMA, FAST_EXP>(a);                                                               \
    }
#define MMA16(T, HD) Mma16<T, HD, TcKeys<T, HD>::value, HD + TcPad<T>::value>
#define MMA3(HD) Mma3xTf32<HD, TcKeys<float, HD>::value, HD + TcPad<float>::value>

extern "C" {
ATTN_TC_FWD(__nv_bfloat16, bf16, 64, MMA16(__nv_bfloat16, 64), true)
ATTN_TC_FWD(__nv_bfloat16, bf16, 128, MMA16(__nv_bfloat16, 128), true)
ATTN_TC_FWD(__half, f16, 64, MMA16(__half, 64), true)
ATTN_TC_FWD(__half, f16, 128, MMA16(__half, 128), true)
ATTN_TC_FWD(float, f32, 64, MMA3(64), false)
ATTN_TC_FWD(float, f32, 128, MMA3(128), false)
}

// ---------------------------------------------------------------------------------------------
// Backward, FlashAttention-2's work split: a block of 4 warps owns TC_BWD_KEYS = 64 keys of one
// batch row (blockIdx.x = batch row, blockIdx.y = key tile), each warp 16 of them, and walks the
// query tiles of BM rows that can see them (causal: from the tile holding row j0). Everything is
// computed transposed, keys as the MMA's M dimension, so that dK and dV (16 x HD per warp) stay in
// registers for the whole walk and P^T, dS^T feed dV += P^T dO and dK += dS^T Q straight from the
// accumulators (as P feeds P V in the forward):
//   S^T = K Q^T, dP^T = V dO^T                        (A: K / V rows of the warp, B: Q / dO tile)
//   P^T = exp(x - lse), x = fmaf(S^T, scale, mask) where the row reads the key, else -inf; 0 where
//     lse = -inf (a fully masked row); NaN on every key of a NaN row (lse NaN)
//   dS^T = P^T (dP^T - D)                             (D = rowsum(dO out), attn_bwd_rowdot)
//   dV += P^T dO, dK += dS^T Q
//   dQ += dS K (x scale): dS^T goes through shared memory (all 64 keys of the block), each warp
//     takes 16 query rows x HD / (4 / (BM / 16)) columns, and the fp32 partial is added to dq by
//     atomicAdd (a second pass over query tiles would recompute S and dP: 7 products instead of 5).
// dq is a zeroed float32 array (16-bit: rounded once to T afterwards by attention.cu's
// attn_bwd_finish_*); dK is scaled once at the end. Q / dO tiles are double buffered with cp.async
// like K / V in the forward; K and V stay in shared memory for the whole block (dQ reads K again).
// Pairs outside [0, L) x [0, S) give P = dS = 0; every other pair follows attention.cu's attn_bwd:
// P = 0 times a non-finite dP - D is NaN there too.
// The two variants, as the forward's: 16-bit (Bwd16: m16n8k16, P and dS rounded to T before their
// products, as FlashAttention-2; exp2f) and 3xTF32 for float (Bwd3xTf32: m16n8k8, every operand
// split at each use; the P^T / dS products use the forward's permuted k index; expf). Float at
// HD = 128 walks the query tiles twice (TcBwdPasses), 64 columns of dK and dV per pass: its 128
// dK / dV accumulators and the split fragments in one pass need more than 255 registers (ptxas
// spilled 56-64 bytes with BM = 16), two passes take 181 (sm_80) / 185 (sm_90) with no spill, for
// S^T and dP^T computed twice (7 products instead of 5; docs/kernels/attention.md says why this split).
// ---------------------------------------------------------------------------------------------
constexpr int TC_BWD_KEYS = 64;  // keys per block, 16 per warp
// Query rows per step: fewer at HD = 128 keeps S^T and dP^T beside dK and dV (HD floats per lane)
// in registers; float tiles are twice the bytes, so half the rows (shared memory).
template <typename T, int HD> struct TcBwdRows { static constexpr int value = HD == 128 ? 32 : 64; };
template <int HD> struct TcBwdRows<float, HD> { static constexpr int value = HD == 128 ? 16 : 32; };
// Column passes over dK / dV: float at HD 128 walks the query tiles twice, 64 columns of dK and dV
// per pass (all 128 with the split fragments need more than 255 registers; see the header).
template <typename T, int HD> struct TcBwdPasses { static constexpr int value = 1; };
template <> struct TcBwdPasses<float, 128> { static constexpr int value = 2; };

template <typename T>
struct TcBwdArgs {
    const T* q; const T* k; const T* v; const float* mask; const T* grad_out; const float* lse;
    const float* rowdot; float* dq; T* dk; T* dv;
    int L, S;
    long long mask_bs, mask_ls;
    int has_mask, causal;
    float scale;
};

// The 16-bit products. LD: row stride of the K, V, Q, dO tiles; LDS: of dS^T.
template <typename T, int HD, int BM, int LD, int LDS>
struct Bwd16 {
    static constexpr int NT = BM / 8;
    static constexpr bool FAST_EXP = true;

    // c (16 x BM) += A B^T, A = the warp's 16 rows at `am` (K or V), B = the BM rows at `bm` (Q or dO).
    static __device__ __forceinline__ void abt(float (&c)[NT][4], const T* am, const T* bm, int lane) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            unsigned af[4];
            ldmatrix_x4(af, am + (lane & 15) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned bf[4];
                ldmatrix_x4(bf, bm + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                mma16816(c[2 * np], af, bf[0], bf[1], T());
                mma16816(c[2 * np + 1], af, bf[2], bf[3], T());
            }
        }
    }

    // c (16 x 8 CT) += A B, A = an accumulator tile (16 x BM: P^T or dS^T) rounded to T (n-tiles 2kk,
    // 2kk + 1 are k-step kk of the A layout), B = the BM rows at `bm` (dO or Q, from the first of
    // the 8 CT columns) by ldmatrix.trans.
    template <int CT>
    static __device__ __forceinline__ void acc_b(float (&c)[CT][4], const float (&p)[NT][4], const T* bm, int lane) {
#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk) {
            const unsigned pa[4] = {pack2(p[2 * kk][0], p[2 * kk][1], T()), pack2(p[2 * kk][2], p[2 * kk][3], T()),
                                    pack2(p[2 * kk + 1][0], p[2 * kk + 1][1], T()),
                                    pack2(p[2 * kk + 1][2], p[2 * kk + 1][3], T())};
            const T* row = bm + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD;
#pragma unroll
            for (int dp = 0; dp < CT / 2; ++dp) {
                unsigned bf[4];
                ldmatrix_x4_trans(bf, row + dp * 16 + (lane >> 4) * 8);
                mma16816(c[2 * dp], pa, bf[0], bf[1], T());
                mma16816(c[2 * dp + 1], pa, bf[2], bf[3], T());
            }
        }
    }

    // c (16 x 8 CT) += dS K for query rows r0.. r0 + 15 and columns c0.. of K: dS^T (keys x queries)
    // at `dst`, read transposed: matrices keys 0-7 / queries 0-7, keys 0-7 / queries 8-15, keys 8-15 /
    // queries 0-7, keys 8-15 / queries 8-15 are a0..a3.
    template <int CT>
    static __device__ __forceinline__ void ds_k(float (&c)[CT][4], const T* dst, const T* ks, int r0, int c0,
                                                int lane) {
#pragma unroll
        for (int kk = 0; kk < TC_BWD_KEYS / 16; ++kk) {
            unsigned af[4];
            ldmatrix_x4_trans(af, dst + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + r0 + ((lane >> 3) & 1) * 8);
            const T* row = ks + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + c0;
#pragma unroll
            for (int dp = 0; dp < CT / 2; ++dp) {
                unsigned bf[4];
                ldmatrix_x4_trans(bf, row + dp * 16 + (lane >> 4) * 8);
                mma16816(c[2 * dp], af, bf[0], bf[1], T());
                mma16816(c[2 * dp + 1], af, bf[2], bf[3], T());
            }
        }
    }
};

// The 3xTF32 products: fragments loaded from shared memory (or the accumulators) and split at each use.
template <int HD, int BM, int LD, int LDS>
struct Bwd3xTf32 {
    static constexpr int NT = BM / 8;
    static constexpr bool FAST_EXP = false;

    static __device__ __forceinline__ void abt(float (&c)[NT][4], const float* am, const float* bm, int lane) {
        const int g = lane >> 2, q4 = lane & 3;
#pragma unroll 1
        for (int kk = 0; kk < HD / 8; ++kk) {
            // A (16 x 8): a0 (g, q), a1 (g + 8, q), a2 (g, q + 4), a3 (g + 8, q + 4)
            const float* ap = am + g * LD + kk * 8 + q4;
            const Tf32 af[4] = {split_tf32(ap[0]), split_tf32(ap[8 * LD]), split_tf32(ap[4]), split_tf32(ap[8 * LD + 4])};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float* bp = bm + (nt * 8 + g) * LD + kk * 8 + q4;  // B = rows^T: b0 (k q, n g), b1 (k q + 4, n g)
                mma3xtf32(c[nt], af, split_tf32(bp[0]), split_tf32(bp[4]));
            }
        }
    }

    // As the forward's accumulate: k = q stands for column 2q of the accumulator tile, k = q + 4 for
    // 2q + 1, so the accumulator layout is the A layout as it is and B reads rows 2q, 2q + 1 (8 CT
    // columns from `bm`).
    template <int CT>
    static __device__ __forceinline__ void acc_b(float (&c)[CT][4], const float (&p)[NT][4], const float* bm,
                                                 int lane) {
        const int g = lane >> 2, q4 = lane & 3;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const Tf32 pa[4] = {split_tf32(p[t][0]), split_tf32(p[t][2]), split_tf32(p[t][1]), split_tf32(p[t][3])};
            const float* bp = bm + (t * 8 + 2 * q4) * LD + g;
#pragma unroll
            for (int dt = 0; dt < CT; ++dt) mma3xtf32(c[dt], pa, split_tf32(bp[8 * dt]), split_tf32(bp[LD + 8 * dt]));
        }
    }

    // dS K with the same permuted k: a0 = dS (g, key 2q) = dS^T[2q][g], a2 = dS^T[2q + 1][g], a1, a3
    // the rows g + 8; b0 = K[2q][g], b1 = K[2q + 1][g].
    template <int CT>
    static __device__ __forceinline__ void ds_k(float (&c)[CT][4], const float* dst, const float* ks, int r0, int c0,
                                                int lane) {
        const int g = lane >> 2, q4 = lane & 3;
#pragma unroll 2
        for (int kk = 0; kk < TC_BWD_KEYS / 8; ++kk) {
            const float* ap = dst + (kk * 8 + 2 * q4) * LDS + r0 + g;
            const Tf32 af[4] = {split_tf32(ap[0]), split_tf32(ap[8]), split_tf32(ap[LDS]), split_tf32(ap[LDS + 8])};
            const float* kp = ks + (kk * 8 + 2 * q4) * LD + c0 + g;
#pragma unroll
            for (int ct = 0; ct < CT; ++ct) mma3xtf32(c[ct], af, split_tf32(kp[8 * ct]), split_tf32(kp[LD + 8 * ct]));
        }
    }
};

// S^T (in s) and dP^T (in dp) of this warp's keys against query rows [i0, i0 + BM) turned into P^T
// and dS^T in place. Element (nt, r): key key0 + 8 (r >> 1), query i0 + 8 nt + 2 q + (r & 1).
template <typename T, int NT, bool FAST_EXP>
__device__ __forceinline__ void probabilities(const TcBwdArgs<T>& a, float (&s)[NT][4], float (&dp)[NT][4], int b,
                                              int key0, int i0, int q4) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int j = key0 + 8 * (r >> 1), i = i0 + 8 * nt + 2 * q4 + (r & 1);
            float p = 0.f, ds = 0.f;
            if (i < a.L && j < a.S) {
                const long long row = (long long)b * a.L + i;
                const float li = a.lse[row];
                const bool reads = !(a.causal && j > i);
                const float bias = (a.has_mask && reads) ? a.mask[b * a.mask_bs + i * a.mask_ls + j] : 0.f;
                const float x = reads ? fmaf(s[nt][r], a.scale, bias) : NEG_INF;
                // lse NaN (a NaN row): p NaN on every key, -inf scores included, as PyTorch's softmax
                if (li != NEG_INF) p = FAST_EXP ? exp2f((x - li) * LOG2E) : expf(x - li);
                ds = p * (dp[nt][r] - a.rowdot[row]);  // P = 0 times a non-finite dP - D: NaN, as PyTorch
            }
            s[nt][r] = p;
            dp[nt][r] = ds;
        }
    }
}

// dq[i0 + rows, cols] += scale dS K for this warp's 16 query rows x HD / CS columns; fp32 atomics.
template <typename T, int HD, int BM, typename Mma>
__device__ __forceinline__ void dq_tile(const TcBwdArgs<T>& a, const T* dst, const T* ks, int b, int i0, int warp,
                                        int lane) {
    constexpr int RG = BM / 16, CS = (TC_THREADS / 32) / RG, CW = HD / CS, CT = CW / 8;
    const int rg = warp % RG, cs = warp / RG, q4 = lane & 3;
    float acc[CT][4];
#pragma unroll
    for (int ct = 0; ct < CT; ++ct) acc[ct][0] = acc[ct][1] = acc[ct][2] = acc[ct][3] = 0.f;
    Mma::template ds_k<CT>(acc, dst, ks, rg * 16, cs * CW, lane);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = i0 + rg * 16 + (lane >> 2) + 8 * h;
        if (i >= a.L) continue;
        float* dqrow = a.dq + ((long long)b * a.L + i) * HD + cs * CW + 2 * q4;
#pragma unroll
        for (int ct = 0; ct < CT; ++ct) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const float g = acc[ct][2 * h + c];
                if (g != 0.f) atomicAdd(dqrow + 8 * ct + c, g * a.scale);  // NaN != 0: NaN is added
            }
        }
    }
}

template <typename T, int HD, typename Mma>
__device__ __forceinline__ void attn_tc_bwd(const TcBwdArgs<T>& a) {
    constexpr int BN = TC_BWD_KEYS, BM = TcBwdRows<T, HD>::value, LD = HD + TcPad<T>::value;
    constexpr int LDS = BM + TcPad<T>::value, NT = BM / 8;
    constexpr int PASSES = TcBwdPasses<T, HD>::value, CW = HD / PASSES, DT = CW / 8;  // dK / dV columns per pass
    extern __shared__ __align__(16) unsigned char smem[];
    T* ks = reinterpret_cast<T*>(smem);
    T* vs = ks + BN * LD;
    T* qs = vs + BN * LD;       // two buffers of BM rows
    T* dos = qs + 2 * BM * LD;  // two buffers of BM rows
    T* dst = dos + 2 * BM * LD; // dS^T of the block's keys: BN rows of BM queries

    const int b = blockIdx.x, j0 = blockIdx.y * BN;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q4 = lane & 3;
    const int key0 = j0 + warp * 16 + (lane >> 2);
    const T* qb = a.q + (long long)b * a.L * HD;
    const T* dob = a.grad_out + (long long)b * a.L * HD;
    const T* kb = a.k + (long long)b * a.S * HD;
    const T* vb = a.v + (long long)b * a.S * HD;
    const int istart = a.causal ? (j0 / BM) * BM : 0;  // causal: rows before j0 see none of these keys
    const int ntiles = a.L > istart ? (a.L - istart + BM - 1) / BM : 0;

    if (ntiles > 0) {  // else (causal, j0 >= L) no row sees these keys: nothing to load, dK = dV = 0
        load_tile<T, BN, HD, LD>(ks, kb, j0, a.S);  // committed with pass 0's first Q / dO tile
        load_tile<T, BN, HD, LD>(vs, vb, j0, a.S);
    }
    // PASSES > 1 (float, HD 128): the walk over the query tiles is repeated per column slice of dK / dV,
    // S^T and dP^T recomputed each time (bit for bit the same), dQ added on pass 0 only; only CW / 4
    // dK / dV accumulators per lane are live at a time. Unrolled: as a loop (`unroll 1`) ptxas kept
    // 16 bytes on a stack frame and spilled them, at 168 registers.
#pragma unroll
    for (int pass = 0; pass < PASSES; ++pass) {
        const int c0 = pass * CW;
        if (ntiles > 0) {  // the first Q / dO tile into buffer 0, free since the last barrier
            load_tile<T, BM, HD, LD>(qs, qb, istart, a.L);
            load_tile<T, BM, HD, LD>(dos, dob, istart, a.L);
            cp_async_commit();
        }
        float dk[DT][4], dv[DT][4];
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.f;
            dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.f;
        }
        for (int t = 0; t < ntiles; ++t) {
            const int buf = t & 1, i0 = istart + t * BM;
            if (t + 1 < ntiles) {  // the next Q / dO tile into the buffer the barrier ending tile t - 1 freed
                load_tile<T, BM, HD, LD>(qs + (buf ^ 1) * BM * LD, qb, i0 + BM, a.L);
                load_tile<T, BM, HD, LD>(dos + (buf ^ 1) * BM * LD, dob, i0 + BM, a.L);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const T* qt = qs + buf * BM * LD;
            const T* dot = dos + buf * BM * LD;
            float s[NT][4], dp[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
                dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
            }
            Mma::abt(s, ks + warp * 16 * LD, qt, lane);
            Mma::abt(dp, vs + warp * 16 * LD, dot, lane);
            probabilities<T, NT, Mma::FAST_EXP>(a, s, dp, b, key0, i0, q4);
            Mma::template acc_b<DT>(dv, s, dot + c0, lane);
            Mma::template acc_b<DT>(dk, dp, qt + c0, lane);
            if (pass == 0) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        store2(dst + (warp * 16 + (lane >> 2) + 8 * h) * LDS + 8 * nt + 2 * q4, dp[nt][2 * h],
                               dp[nt][2 * h + 1]);
                }
                __syncthreads();  // dS^T of every warp's keys is in place
                dq_tile<T, HD, BM, Mma>(a, dst, ks, b, i0, warp, lane);
            }
            __syncthreads();  // dS^T and this Q / dO buffer are free for the next tiles
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int j = key0 + 8 * h;
            if (j >= a.S) continue;
            T* dkrow = a.dk + ((long long)b * a.S + j) * HD + c0 + 2 * q4;
            T* dvrow = a.dv + ((long long)b * a.S + j) * HD + c0 + 2 * q4;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                store2(dkrow + 8 * dt, dk[dt][2 * h] * a.scale, dk[dt][2 * h + 1] * a.scale);
                store2(dvrow + 8 * dt, dv[dt][2 * h], dv[dt][2 * h + 1]);
            }
        }
    }
}

// Entry points: (q, k, v, mask, grad_out, lse, rowdot, dq, dk, dv, L, S, mask_bs, mask_ls, has_mask,
// causal, scale), as attention.cu's attn_bwd without E / Ev; grid (B, ceil(S / 64)), 128 threads,
// dynamic shared memory (2 TC_BWD_KEYS + 4 BM) (HD + pad) + TC_BWD_KEYS (BM + pad) elements
// (kernels/cuda/attention.py's tc_bwd_shared_bytes); dq float32, zeroed.
// Names: attn_tc_bwd_<bf16 | f16 | f32>_hd<64 | 128>; f32 is the 3xTF32 variant.
#define ATTN_TC_BWD(T, NAME, HD, MMA)                                                                         \
    __global__ void __launch_bounds__(TC_THREADS) attn_tc_bwd_##NAME##_hd##HD(                               \
        const T* q, const T* k, const T* v, const float* mask, const T* grad_out, const float* lse,          \
        const float* rowdot, float* dq, T* dk, T* dv, int L, int S, long long mask_bs, long long mask_ls,    \
        int has_mask, int causal, float scale) {                                                             \
        const TcBwdArgs<T> a{q, k, v, mask, grad_out, lse, rowdot, dq, dk, dv, L, S, mask_bs, mask_ls,       \
                             has_mask, causal, scale};                                                       \
        attn_tc_bwd<T, HD, MMA>(a);                                                                          \
    }
#define BWD16(T, HD) \
    Bwd16<T, HD, TcBwdRows<T, HD>::value, HD + TcPad<T>::value, TcBwdRows<T, HD>::value + TcPad<T>::value>
#define BWD3(HD) \
    Bwd3xTf32<HD, TcBwdRows<float, HD>::value, HD + TcPad<float>::value, TcBwdRows<float, HD>::value + TcPad<float>::value>

extern "C" {
ATTN_TC_BWD(__nv_bfloat16, bf16, 64, BWD16(__nv_bfloat16, 64))
ATTN_TC_BWD(__nv_bfloat16, bf16, 128, BWD16(__nv_bfloat16, 128))
ATTN_TC_BWD(__half, f16, 64, BWD16(__half, 64))
ATTN_TC_BWD(__half, f16, 128, BWD16(__half, 128))
ATTN_TC_BWD(float, f32, 64, BWD3(64))
ATTN_TC_BWD(float, f32, 128, BWD3(128))
}
