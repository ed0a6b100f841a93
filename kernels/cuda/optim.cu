// Fused optimizer steps (Adam/AdamW, SGD, Adagrad, RMSprop), PyTorch semantics, in place.
//
// One launch updates a whole flat buffer: every element of param, grad and the state arrays is
// read once and written once (grad only read), so the step is pure memory traffic; Adam fp32
// moves 28 bytes per parameter. The per-step scalars (bias corrections, 1 - beta, decayed lr) are
// computed on the host once per step and passed in: no per-element pow.
//
// Layout of every kernel: a grid-stride loop over 16-byte packs (float4 / double2) covering
// [head, head + n_vec * width), then a grid-stride scalar loop over the rest ([0, head) and the
// tail). The host (kernels/cuda/optim.py) picks head so that every pointer + head is 16-byte
// aligned, or sets n_vec = 0 when the arrays are misaligned differently (everything then goes
// through the scalar loop, still correct). The grid is sized by the host to the blocks that fit
// on the device at once, so the grid-stride loop runs in a single wave.
//
// Entry points: <opt>_step_f32 and <opt>_step_f64 for opt in adam, sgd, adagrad, rmsprop; their
// argument lists are spelled out next to each and mirrored by kernels/cuda/optim.py.
// No fast-math: IEEE sqrt and division, so the results agree with the numpy reference to rounding
// (NVRTC contracts a * b + c into FMAs by default: the tests' tolerance allows for it).

// Flag bits, mirrored in kernels/cuda/optim.py.
#define OPT_MAXIMIZE 1
#define OPT_WEIGHT_DECAY 2   // weight_decay != 0
#define OPT_DECOUPLED 4      // Adam: AdamW-style decay (param *= 1 - lr * weight_decay)
#define OPT_AMSGRAD 8        // Adam
#define OPT_MOMENTUM 16      // SGD, RMSprop: momentum != 0
#define OPT_NESTEROV 32      // SGD
#define OPT_FIRST_STEP 64    // SGD: the momentum buffer is set to the gradient
#define OPT_CENTERED 128     // RMSprop

// 16 bytes of T: one vector load/store (ld.global.v4.f32 / v2.f64).
template <typename T>
struct alignas(16) Pack {
    enum { width = 16 / sizeof(T) };  // an enum, not a static member: no global symbol in the module
    T e[width];
};

__device__ __forceinline__ float sqrt_rn(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_rn(double x) { return sqrt(x); }

// max that propagates a NaN in either argument, as torch.maximum / np.maximum do (fmax would drop it).
template <typename T>
__device__ __forceinline__ T max_nan(T old, T x) { return (old >= x || old != old) ? old : x; }

// Which state arrays an optimizer reads and writes on this step (an unused one is never touched,
// so its pointer may be any placeholder).
struct StateUse {
    bool read0, write0, read1, write1, read2, write2;
};

template <typename T>
__device__ __forceinline__ Pack<T>* packs_from(T* base, long long head) {
    return base == nullptr ? nullptr : reinterpret_cast<Pack<T>*>(base + head);
}

// The grid-stride driver shared by every optimizer. `op(p, g, s0, s1, s2)` updates one element;
// state k is loaded only when it is read and stored only when it is written, so an optimizer that
// uses fewer states (or a state that is write-only on this step) moves no bytes for it.
//
// Elements [head, head + n_vec * W) go through the vector loop (W = 16 / sizeof(T) per pack); the
// rest, [0, head) and [head + n_vec * W, n), at most 2 * (W - 1) elements when vectorized, go
// through the scalar loop.
template <typename T, typename Op>
__device__ __forceinline__ void run_elementwise(const Op& op, T* __restrict__ param, const T* __restrict__ grad,
                                                T* __restrict__ s0, T* __restrict__ s1, T* __restrict__ s2,
                                                StateUse use, long long n, long long head, long long n_vec) {
    constexpr int W = Pack<T>::width;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;

    Pack<T>* __restrict__ pv = packs_from(param, head);
    const Pack<T>* __restrict__ gv = reinterpret_cast<const Pack<T>*>(grad + head);
    Pack<T>* __restrict__ v0 = packs_from(s0, head);
    Pack<T>* __restrict__ v1 = packs_from(s1, head);
    Pack<T>* __restrict__ v2 = packs_from(s2, head);
    for (long long i = first; i < n_vec; i += stride) {
        // Every load of the iteration is issued before the first use: up to five 16-byte loads
        // in flight per thread.
        Pack<T> p = pv[i];
        const Pack<T> g = gv[i];
        Pack<T> a = {}, b = {}, c = {};
        if (use.read0) a = v0[i];
        if (use.read1) b = v1[i];
        if (use.read2) c = v2[i];
#pragma unroll
        for (int k = 0; k < W; ++k) op(p.e[k], g.e[k], a.e[k], b.e[k], c.e[k]);
        pv[i] = p;
        if (use.write0) v0[i] = a;
        if (use.write1) v1[i] = b;
        if (use.write2) v2[i] = c;
    }

    const long long vec_end = head + n_vec * W;
    const long long n_scalar = head + (n - vec_end);
    for (long long j = first; j < n_scalar; j += stride) {
        const long long i = j < head ? j : vec_end + (j - head);
        T p = param[i];
        const T g = grad[i];
        T a = 0, b = 0, c = 0;
        if (use.read0) a = s0[i];
        if (use.read1) b = s1[i];
        if (use.read2) c = s2[i];
        op(p, g, a, b, c);
        param[i] = p;
        if (use.write0) s0[i] = a;
        if (use.write1) s1[i] = b;
        if (use.write2) s2[i] = c;
    }
}

// ---------------------------------------------------------------------------------------------
// Adam / AdamW (torch.optim.Adam with amsgrad, maximize, decoupled_weight_decay):
//   g = maximize ? -grad : grad
//   AdamW: p *= 1 - lr * wd        Adam: g += wd * p
//   m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2;   amsgrad: vmax = max(vmax, v)
//   p -= step_size * m / (sqrt(v or vmax) / bc2_sqrt + eps), step_size = lr / (1 - beta1^step)
// ---------------------------------------------------------------------------------------------
template <typename T>
struct AdamOp {
    T beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps, weight_decay, decay_factor;
    int flags;

    __device__ __forceinline__ void operator()(T& p, T g, T& m, T& v, T& vmax) const {
        if (flags & OPT_MAXIMIZE) g = -g;
        if (flags & OPT_WEIGHT_DECAY) {
            if (flags & OPT_DECOUPLED) p = p * decay_factor;
            else g = g + weight_decay * p;
        }
        m = beta1 * m + one_minus_beta1 * g;
        v = beta2 * v + one_minus_beta2 * (g * g);
        T second = v;
        if (flags & OPT_AMSGRAD) {
            vmax = max_nan(vmax, v);
            second = vmax;
        }
        const T denom = sqrt_rn(second) / bc2_sqrt + eps;
        p = p - step_size * (m / denom);
    }
};

// (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq [any pointer unless amsgrad], n, head, n_vec,
//  beta1, beta2, 1 - beta1, 1 - beta2, step_size, bc2_sqrt, eps, weight_decay, 1 - lr * weight_decay, flags)
template <typename T>
__device__ __forceinline__ void adam_step(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, T* max_exp_avg_sq,
                                          long long n, long long head, long long n_vec, T beta1, T beta2,
                                          T one_minus_beta1, T one_minus_beta2, T step_size, T bc2_sqrt, T eps,
                                          T weight_decay, T decay_factor, int flags) {
    const AdamOp<T> op{beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps, weight_decay,
                       decay_factor, flags};
    const bool ams = flags & OPT_AMSGRAD;
    run_elementwise<T>(op, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, StateUse{true, true, true, true, ams, ams},
                       n, head, n_vec);
}

extern "C" __global__ void adam_step_f32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq,
                                         float* max_exp_avg_sq, long long n, long long head, long long n_vec,
                                         float beta1, float beta2, float one_minus_beta1, float one_minus_beta2,
                                         float step_size, float bc2_sqrt, float eps, float weight_decay,
                                         float decay_factor, int flags) {
    adam_step<float>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, head, n_vec, beta1, beta2, one_minus_beta1,
                     one_minus_beta2, step_size, bc2_sqrt, eps, weight_decay, decay_factor, flags);
}

extern "C" __global__ void adam_step_f64(double* param, const double* grad, double* exp_avg, double* exp_avg_sq,
                                         double* max_exp_avg_sq, long long n, long long head, long long n_vec,
                                         double beta1, double beta2, double one_minus_beta1, double one_minus_beta2,
                                         double step_size, double bc2_sqrt, double eps, double weight_decay,
                                         double decay_factor, int flags) {
    adam_step<double>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, head, n_vec, beta1, beta2,
                      one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps, weight_decay, decay_factor, flags);
}

// ---------------------------------------------------------------------------------------------
// SGD (torch.optim.SGD): g = maximize ? -grad : grad; g += wd * p;
//   momentum: buf = first_step ? g : momentum buf + (1 - dampening) g;  g = nesterov ? g + momentum buf : buf
//   p -= lr * g
// ---------------------------------------------------------------------------------------------
template <typename T>
struct SgdOp {
    T lr, momentum, one_minus_dampening, weight_decay;
    int flags;

    __device__ __forceinline__ void operator()(T& p, T g, T& buf, T&, T&) const {
        if (flags & OPT_MAXIMIZE) g = -g;
        if (flags & OPT_WEIGHT_DECAY) g = g + weight_decay * p;
        if (flags & OPT_MOMENTUM) {
            buf = (flags & OPT_FIRST_STEP) ? g : momentum * buf + one_minus_dampening * g;
            g = (flags & OPT_NESTEROV) ? g + momentum * buf : buf;
        }
        p = p - lr * g;
    }
};

// (param, grad, momentum_buf [any pointer unless momentum], n, head, n_vec, lr, momentum, 1 - dampening,
//  weight_decay, flags). On the first step the buffer is written without being read.
template <typename T>
__device__ __forceinline__ void sgd_step(T* param, const T* grad, T* momentum_buf, long long n, long long head,
                                         long long n_vec, T lr, T momentum, T one_minus_dampening, T weight_decay,
                                         int flags) {
    const SgdOp<T> op{lr, momentum, one_minus_dampening, weight_decay, flags};
    const bool mom = flags & OPT_MOMENTUM;
    const bool read_buf = mom && !(flags & OPT_FIRST_STEP);
    run_elementwise<T>(op, param, grad, momentum_buf, nullptr, nullptr,
                       StateUse{read_buf, mom, false, false, false, false}, n, head, n_vec);
}

extern "C" __global__ void sgd_step_f32(float* param, const float* grad, float* momentum_buf, long long n,
                                        long long head, long long n_vec, float lr, float momentum,
                                        float one_minus_dampening, float weight_decay, int flags) {
    sgd_step<float>(param, grad, momentum_buf, n, head, n_vec, lr, momentum, one_minus_dampening, weight_decay,
                    flags);
}

extern "C" __global__ void sgd_step_f64(double* param, const double* grad, double* momentum_buf, long long n,
                                        long long head, long long n_vec, double lr, double momentum,
                                        double one_minus_dampening, double weight_decay, int flags) {
    sgd_step<double>(param, grad, momentum_buf, n, head, n_vec, lr, momentum, one_minus_dampening, weight_decay,
                     flags);
}

// ---------------------------------------------------------------------------------------------
// Adagrad (torch.optim.Adagrad): g = maximize ? -grad : grad; g += wd * p;
//   sum += g^2;  p -= clr * g / (sqrt(sum) + eps), clr = lr / (1 + (step - 1) lr_decay)
// ---------------------------------------------------------------------------------------------
template <typename T>
struct AdagradOp {
    T clr, weight_decay, eps;
    int flags;

    __device__ __forceinline__ void operator()(T& p, T g, T& sum, T&, T&) const {
        if (flags & OPT_MAXIMIZE) g = -g;
        if (flags & OPT_WEIGHT_DECAY) g = g + weight_decay * p;
        sum = sum + g * g;
        p = p - clr * (g / (sqrt_rn(sum) + eps));
    }
};

// (param, grad, state_sum, n, head, n_vec, clr, weight_decay, eps, flags)
extern "C" __global__ void adagrad_step_f32(float* param, const float* grad, float* state_sum, long long n,
                                            long long head, long long n_vec, float clr, float weight_decay,
                                            float eps, int flags) {
    run_elementwise<float>(AdagradOp<float>{clr, weight_decay, eps, flags}, param, grad, state_sum, nullptr,
                           nullptr, StateUse{true, true, false, false, false, false}, n, head, n_vec);
}

extern "C" __global__ void adagrad_step_f64(double* param, const double* grad, double* state_sum, long long n,
                                            long long head, long long n_vec, double clr, double weight_decay,
                                            double eps, int flags) {
    run_elementwise<double>(AdagradOp<double>{clr, weight_decay, eps, flags}, param, grad, state_sum, nullptr,
                            nullptr, StateUse{true, true, false, false, false, false}, n, head, n_vec);
}

// ---------------------------------------------------------------------------------------------
// RMSprop (torch.optim.RMSprop): g = maximize ? -grad : grad; g += wd * p;
//   sq = alpha sq + (1 - alpha) g^2
//   centered: ga = alpha ga + (1 - alpha) g; avg = sqrt(sq - ga^2) + eps   else avg = sqrt(sq) + eps
//   momentum: buf = momentum buf + g / avg; p -= lr buf     else p -= lr g / avg
// ---------------------------------------------------------------------------------------------
template <typename T>
struct RmspropOp {
    T lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
    int flags;

    __device__ __forceinline__ void operator()(T& p, T g, T& sq, T& buf, T& grad_avg) const {
        if (flags & OPT_MAXIMIZE) g = -g;
        if (flags & OPT_WEIGHT_DECAY) g = g + weight_decay * p;
        sq = alpha * sq + one_minus_alpha * (g * g);
        T avg;
        if (flags & OPT_CENTERED) {
            grad_avg = alpha * grad_avg + one_minus_alpha * g;
            avg = sqrt_rn(sq - grad_avg * grad_avg) + eps;
        } else {
            avg = sqrt_rn(sq) + eps;
        }
        if (flags & OPT_MOMENTUM) {
            buf = momentum * buf + g / avg;
            p = p - lr * buf;
        } else {
            p = p - lr * (g / avg);
        }
    }
};

// (param, grad, square_avg, momentum_buf, grad_avg [each any pointer unless used], n, head, n_vec, lr, alpha,
//  1 - alpha, eps, weight_decay, momentum, flags)
template <typename T>
__device__ __forceinline__ void rmsprop_step(T* param, const T* grad, T* square_avg, T* momentum_buf, T* grad_avg,
                                             long long n, long long head, long long n_vec, T lr, T alpha,
                                             T one_minus_alpha, T eps, T weight_decay, T momentum, int flags) {
    const RmspropOp<T> op{lr, alpha, one_minus_alpha, eps, weight_decay, momentum, flags};
    const bool mom = flags & OPT_MOMENTUM;
    const bool centered = flags & OPT_CENTERED;
    run_elementwise<T>(op, param, grad, square_avg, momentum_buf, grad_avg,
                       StateUse{true, true, mom, mom, centered, centered}, n, head, n_vec);
}

extern "C" __global__ void rmsprop_step_f32(float* param, const float* grad, float* square_avg,
                                            float* momentum_buf, float* grad_avg, long long n, long long head,
                                            long long n_vec, float lr, float alpha, float one_minus_alpha,
                                            float eps, float weight_decay, float momentum, int flags) {
    rmsprop_step<float>(param, grad, square_avg, momentum_buf, grad_avg, n, head, n_vec, lr, alpha, one_minus_alpha,
                        eps, weight_decay, momentum, flags);
}

extern "C" __global__ void rmsprop_step_f64(double* param, const double* grad, double* square_avg,
                                            double* momentum_buf, double* grad_avg, long long n, long long head,
                                            long long n_vec, double lr, double alpha, double one_minus_alpha,
                                            double eps, double weight_decay, double momentum, int flags) {
    rmsprop_step<double>(param, grad, square_avg, momentum_buf, grad_avg, n, head, n_vec, lr, alpha,
                         one_minus_alpha, eps, weight_decay, momentum, flags);
}
