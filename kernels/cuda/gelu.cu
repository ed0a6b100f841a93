// GELU, forward and backward (PyTorch F.gelu, approximate "none" and "tanh"); the math in
// kernels/cpu/gelu.py. Elementwise over the flat buffer, one grid-stride loop per kernel:
//
//   exact:  y = x Phi(x),  Phi = normcdf (erfc(-x / sqrt 2) / 2, accurate in the left tail where
//           1 + erf cancels),  dx = dy (Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi))
//   tanh:   z = sqrt(2/pi) (x + 0.044715 x^3),  s = sigmoid(2z) = (1 + tanh z) / 2,
//           y = x s,  dx = dy (s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 0.044715 x^2))
//
// s and 1 - s come from e = exp(-2|z|) <= 1 (no overflow, no cancellation). Memory bound: forward
// reads x and writes y, backward reads dy and x and writes dx. No fast-math intrinsics (__expf):
// the results agree with the numpy reference to float32 rounding (cupy adds -ftz=true, so float32
// subnormal results flush to zero).

template <typename T> struct Gelu;

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

template <typename T>
__device__ __forceinline__ void sigmoid_pair(T x, T& s, T& hi, T& lo) {
    const T z = T(GELU_K) * (x + T(GELU_C) * x * x * x);
    const T e = Gelu<T>::exp(T(-2) * fabs(z));
    hi = T(1) / (T(1) + e);  // sigmoid(2|z|)
    lo = e * hi;             // sigmoid(-2|z|)
    s = z >= T(0) ? hi : lo;
}

template <typename T>
__device__ __forceinline__ void tanh_forward(const T* __restrict__ x, T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        T s, hi, lo;
        sigmoid_pair(x[i], s, hi, lo);
        y[i] = x[i] * s;
    }
}

template <typename T>
__device__ __forceinline__ void tanh_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                              long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const T v = x[i];
        T s, hi, lo;
        sigmoid_pair(v, s, hi, lo);
        // v^2 capped (kernels/cpu/gelu.py SQUARE_MAX): hi * lo is 0 long before v^2 overflows, 0 * inf = NaN
        dx[i] = dy[i] * (s + v * hi * lo * T(2 * GELU_K) * (T(1) + T(3 * GELU_C) * fmin(v * v, T(GELU_SQUARE_MAX))));
    }
}

template <typename T>
__device__ __forceinline__ void erf_forward(const T* __restrict__ x, T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const T v = x[i];
        y[i] = v * Gelu<T>::cdf(v);
    }
}

template <typename T>
__device__ __forceinline__ void erf_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                             long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const T v = x[i];
        const T pdf = T(GELU_INV_SQRT_2PI) * Gelu<T>::exp(T(-0.5) * v * v);
        dx[i] = dy[i] * (Gelu<T>::cdf(v) + v * pdf);
    }
}

// gelu_{tanh,erf}_{fwd,bwd}_{f32,f64}: what kernels/cuda/gelu.py looks up.
#define GELU_KERNELS(T, DT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) gelu_tanh_fwd_##DT(const T* x, T* y, long long n) {     \
        tanh_forward<T>(x, y, n);                                                                              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gelu_tanh_bwd_##DT(const T* dy, const T* x, T* dx,      \
                                                                         long long n) {                       \
        tanh_backward<T>(dy, x, dx, n);                                                                        \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gelu_erf_fwd_##DT(const T* x, T* y, long long n) {      \
        erf_forward<T>(x, y, n);                                                                               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gelu_erf_bwd_##DT(const T* dy, const T* x, T* dx,       \
                                                                        long long n) {                        \
        erf_backward<T>(dy, x, dx, n);                                                                         \
    }

GELU_KERNELS(float, f32)
GELU_KERNELS(double, f64)
