// Device code the .cu files share: storage-type conversions (float, double, __half,
// __nv_bfloat16), 16-byte packs, and warp / block reductions.
//
// Low-precision storage, fp32 math: every kernel loads a __half or __nv_bfloat16 element with
// to_acc(), computes in Acc<T>::type (float for the 16-bit types, the type itself for float and
// double) and rounds once when it stores with from_acc<T>(), as PyTorch's kernels do.
//
// The CUDA headers come from the toolkit cupy compiles with: cupy passes -I<CUDA path>/include
// (the nvidia/cu13 wheel or /usr/local/cuda), and kernels/cuda/nvrtc.py does the same in CI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ---------------------------------------------------------------------------------------------
// Storage type -> accumulation type, and the conversions between them.
// ---------------------------------------------------------------------------------------------
template <typename T> struct Acc { using type = T; };  // float, double: compute in the type itself
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even from the accumulation type to the storage type.
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------
// 16 bytes of T: one vector load/store (ld.global.v4.f32 / v2.f64 / v4.b32 for 8 halves).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct alignas(16) Pack {
    enum { width = 16 / sizeof(T) };  // an enum, not a static member: no global symbol in the module
    T e[width];
};

// ---------------------------------------------------------------------------------------------
// Reductions of NV values at once, in the accumulation type. WarpGroup<G> = G consecutive lanes
// of a warp (shuffles only); BlockGroup = the whole block (shuffles within warps, then shared
// memory). The max propagates NaN as torch.max does (fmaxf would drop it).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ double max_nan(double a, double b) { return (a != a || a > b) ? a : b; }

struct MaxOp {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return max_nan(a, b); }
};
struct SumOp {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <int NV, typename T, typename Op>
__device__ __forceinline__ void warp_reduce(T (&v)[NV], Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
        for (int i = 0; i < NV; ++i) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], offset));
    }
}

template <int G>
struct WarpGroup {
    unsigned mask;  // the lanes of this group
    int rank;       // 0 .. G - 1
    __device__ __forceinline__ int size() const { return G; }

    template <int NV, typename T, typename Op>
    __device__ __forceinline__ void reduce(T (&v)[NV], Op op) const {
#pragma unroll
        for (int offset = G / 2; offset > 0; offset >>= 1) {
#pragma unroll
            for (int i = 0; i < NV; ++i) v[i] = op(v[i], __shfl_xor_sync(mask, v[i], offset));
        }
    }
};

// Block-wide reduction of NV <= NVMAX values; every thread gets the result. `scratch` holds
// 33 * NVMAX values: per-warp partials in [0, 32 NV) and the broadcast slot at 32 NVMAX, which
// no partial of any later reduction overlaps. So reductions can follow each other with no extra
// barrier: a warp's partial for the next one cannot clobber the broadcast a slower thread is
// still reading, and the next broadcast is written only after a barrier that every thread
// reaches after its read. blockDim.x must be a multiple of 32.
template <typename T, int NVMAX>
struct BlockGroup {
    T* scratch;
    __device__ __forceinline__ int size() const { return blockDim.x; }

    template <int NV, typename Op>
    __device__ __forceinline__ void reduce(T (&v)[NV], Op op, T identity) const {
        static_assert(NV <= NVMAX, "scratch too small");
        T* const broadcast = scratch + 32 * NVMAX;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
        warp_reduce<NV>(v, op);
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < NV; ++i) scratch[warp * NV + i] = v[i];
        }
        __syncthreads();
        if (warp == 0) {
#pragma unroll
            for (int i = 0; i < NV; ++i) v[i] = lane < warps ? scratch[lane * NV + i] : identity;
            warp_reduce<NV>(v, op);
            if (lane == 0) {
#pragma unroll
                for (int i = 0; i < NV; ++i) broadcast[i] = v[i];
            }
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < NV; ++i) v[i] = broadcast[i];
    }
};

// One call for both group kinds, so row code is written once.
template <int G, int NV, typename T, typename Op>
__device__ __forceinline__ void group_reduce(const WarpGroup<G>& g, T (&v)[NV], Op op, T) {
    g.template reduce<NV>(v, op);
}
template <int NV, int NVMAX, typename T, typename Op>
__device__ __forceinline__ void group_reduce(const BlockGroup<T, NVMAX>& g, T (&v)[NV], Op op, T identity) {
    g.template reduce<NV>(v, op, identity);
}
