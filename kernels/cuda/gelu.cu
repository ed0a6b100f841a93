// GELU, forward and backward (PyTorch F.gelu, approximate "none" and "tanh"); the math in
// kernels/cpu/gelu.py. Elementwise over the flat buffer:
//
//   exact:  y = x Phi(x),  Phi = normcdf (erfc(-x / sqrt 2) / 2, accurate in the left tail where
//           1 + erf cancels),  dx = dy (Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi))
//   tanh:   z = sqrt(2/pi) (x + 0.044715 x^3),  s = sigmoid(2z) = (1 + tanh z) / 2,
//           y = x s,  dx = dy (s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 0.044715 x^2))
//
// s and 1 - s come from e = exp(-2|z|) <= 1 (no overflow, no cancellation). No fast-math
// intrinsics (__expf): the results agree with the numpy reference to float32 rounding (cupy adds
// -ftz=true, so float32 subnormal results flush to zero).
//
// Storage types float, double, __half, __nv_bfloat16; the math runs in Acc<T>::type (common.cuh:
// float for the 16-bit types) and rounds once where it stores. Memory bound: forward reads x and
// writes y, backward reads dy and x and writes dx, so the kernels move 16-byte packs (float4 /
// double2 / 8 halves: one 128-bit load per array per iteration, as optim.cu does): a grid-stride
// loop over the packs of [head, head + n_vec W), with nothing between an iteration's loads but
// address arithmetic, then a grid-stride scalar loop over the few elements left ([0, head) and
// the tail: at most 2 (W - 1)). The host (kernels/cuda/gelu.py, with optim.py's vector_split)
// picks head so that every pointer + head is 16-byte aligned, or n_vec = 0 when the arrays are
// misaligned differently (then everything goes through the scalar loop, still correct).
#include "common.cuh"

template <typename A> struct Gelu;  // A: the accumulation type, float or double

template <> struct Gelu<float> {
    static __device__ __forceinline__ float exp(float a) { return expf(a); }
    static __device__ __forceinline__ float cdf(float x) { return normcdff(x); }
};
template <> struct Gelu<double> {
    static __device__ __forceinline__ double exp(double a) { return ::exp(a); }
    static __device__ __forceinline__ double cdf(double x) { return normcdf(x); }
};

// T(c) of a double literal folds at compile time: no double arithmetic in the float kernels.
#define GELU_K 0.7978845608028654    // sqrt(2 / pi)
#define GELU_C 0.044715
#define GELU_SQUARE_MAX 1e30
#define GELU_INV_SQRT_2PI 0.3989422804014327

template <typename A>
__device__ __forceinline__ void sigmoid_pair(A x, A& s, A& hi, A& lo) {
    const A z = A(GELU_K) * (x + A(GELU_C) * x * x * x);
    const A e = Gelu<A>::exp(A(-2) * fabs(z));
    hi = A(1) / (A(1) + e);  // sigmoid(2|z|)
    lo = e * hi;             // sigmoid(-2|z|)
    s = z >= A(0) ? hi : lo;
}

// The four element functions: forward (x) -> y, backward (dy, x) -> dx, in the accumulation type.
struct TanhForward {
    template <typename A> __device__ __forceinline__ A operator()(A x) const {
        A s, hi, lo;
        sigmoid_pair(x, s, hi, lo);
        return x * s;
    }
};
struct TanhBackward {
    template <typename A> __device__ __forceinline__ A operator()(A dy, A x) const {
        A s, hi, lo;
        sigmoid_pair(x, s, hi, lo);
        // x^2 capped (kernels/cpu/gelu.py SQUARE_MAX): hi * lo is 0 long before x^2 overflows, 0 * inf = NaN
        return dy * (s + x * hi * lo * A(2 * GELU_K) * (A(1) + A(3 * GELU_C) * fmin(x * x, A(GELU_SQUARE_MAX))));
    }
};
struct ErfForward {
    template <typename A> __device__ __forceinline__ A operator()(A x) const { return x * Gelu<A>::cdf(x); }
};
struct ErfBackward {
    template <typename A> __device__ __forceinline__ A operator()(A dy, A x) const {
        const A pdf = A(GELU_INV_SQRT_2PI) * Gelu<A>::exp(A(-0.5) * x * x);
        return dy * (Gelu<A>::cdf(x) + x * pdf);
    }
};

// out[i] = op(in[i]): packs over [head, head + n_vec W), then scalars over the rest.
template <typename T, typename Op>
__device__ __forceinline__ void map_unary(const T* __restrict__ in, T* __restrict__ out, long long n, long long head,
                                          long long n_vec, Op op) {
    constexpr int W = Pack<T>::width;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const Pack<T>* __restrict__ iv = reinterpret_cast<const Pack<T>*>(in + head);
    Pack<T>* __restrict__ ov = reinterpret_cast<Pack<T>*>(out + head);
    for (long long i = first; i < n_vec; i += stride) {
        const Pack<T> a = iv[i];
        Pack<T> r;
#pragma unroll
        for (int k = 0; k < W; ++k) r.e[k] = from_acc<T>(op(to_acc(a.e[k])));
        ov[i] = r;
    }
    const long long vec_end = head + n_vec * W;
    const long long n_scalar = head + (n - vec_end);
    for (long long j = first; j < n_scalar; j += stride) {
        const long long i = j < head ? j : vec_end + (j - head);
        out[i] = from_acc<T>(op(to_acc(in[i])));
    }
}

// out[i] = op(a[i], b[i]), laid out as map_unary.
template <typename T, typename Op>
__device__ __forceinline__ void map_binary(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                                           long long n, long long head, long long n_vec, Op op) {
    constexpr int W = Pack<T>::width;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const Pack<T>* __restrict__ av = reinterpret_cast<const Pack<T>*>(a + head);
    const Pack<T>* __restrict__ bv = reinterpret_cast<const Pack<T>*>(b + head);
    Pack<T>* __restrict__ ov = reinterpret_cast<Pack<T>*>(out + head);
    for (long long i = first; i < n_vec; i += stride) {
        const Pack<T> pa = av[i];  // both loads issued before either is used
        const Pack<T> pb = bv[i];
        Pack<T> r;
#pragma unroll
        for (int k = 0; k < W; ++k) r.e[k] = from_acc<T>(op(to_acc(pa.e[k]), to_acc(pb.e[k])));
        ov[i] = r;
    }
    const long long vec_end = head + n_vec * W;
    const long long n_scalar = head + (n - vec_end);
    for (long long j = first; j < n_scalar; j += stride) {
        const long long i = j < head ? j : vec_end + (j - head);
        out[i] = from_acc<T>(op(to_acc(a[i]), to_acc(b[i])));
    }
}

// gelu_{tanh,erf}_fwd_<dt>(x, y, n, head, n_vec) and gelu_{tanh,erf}_bwd_<dt>(dy, x, dx, n, head,
// n_vec) for dt in f32, f64, f16, bf16: what kernels/cuda/gelu.py looks up. 256 threads; the exact
// backward takes its bounds as an argument: for double, "at least 1 block per SM" lifts the
// 64-register cap ptxas otherwise chose, under which two doubles' normcdf and exp per pack spilled
// 16 bytes (the other types keep ptxas's choice: 34-48 registers, more blocks resident).
#define GELU_UNARY(BOUNDS, NAME, T, OP)                                                                 \
    extern "C" __global__ void BOUNDS NAME(const T* __restrict__ x, T* __restrict__ y, long long n,    \
                                           long long head, long long n_vec) {                         \
        map_unary<T>(x, y, n, head, n_vec, OP());                                                      \
    }
#define GELU_BINARY(BOUNDS, NAME, T, OP)                                                               \
    extern "C" __global__ void BOUNDS NAME(const T* __restrict__ dy, const T* __restrict__ x,         \
                                           T* __restrict__ dx, long long n, long long head,           \
                                           long long n_vec) {                                         \
        map_binary<T>(dy, x, dx, n, head, n_vec, OP());                                                \
    }
#define GELU_KERNELS(T, DT, ERF_BWD_BOUNDS)                                      \
    GELU_UNARY(__launch_bounds__(256), gelu_tanh_fwd_##DT, T, TanhForward)       \
    GELU_BINARY(__launch_bounds__(256), gelu_tanh_bwd_##DT, T, TanhBackward)     \
    GELU_UNARY(__launch_bounds__(256), gelu_erf_fwd_##DT, T, ErfForward)         \
    GELU_BINARY(ERF_BWD_BOUNDS, gelu_erf_bwd_##DT, T, ErfBackward)

GELU_KERNELS(float, f32, __launch_bounds__(256))
GELU_KERNELS(double, f64, __launch_bounds__(256, 1))
GELU_KERNELS(__half, f16, __launch_bounds__(256))
GELU_KERNELS(__nv_bfloat16, bf16, __launch_bounds__(256))
