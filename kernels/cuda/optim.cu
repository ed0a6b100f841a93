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
// Entry points, for opt in adam, sgd, adagrad, rmsprop: <opt>_step_f32 and <opt>_step_f64 (every
// array in that type), and <opt>_step_f32_f16 / <opt>_step_f32_bf16 for float16 / bfloat16
// parameters: param and the states are the float32 master copy and its states, grad and param_out
// are 16-bit, and the new master is rounded to nearest-even into param_out in the same pass (where
// param_out no longer holds the old master rounded, the master first restarts from it). Their
// argument lists are spelled out next to each and mirrored by kernels/cuda/optim.py.
//
// Loss scaling (PyTorch's fused optimizers with a GradScaler), every entry point:
// - found_inf (OPT_FOUND_INF): a device flag; nonzero means the whole launch writes nothing.
// - inv_scale (OPT_UNSCALE): the gradient is multiplied by *inv_scale before use and the unscaled
//   gradient is stored back into grad (torch's fused Adam does the same).
// - device_scalars (OPT_DEVICE_SCALARS): the per-step scalars that depend on the step count or the
//   learning rate, read from device memory (computed there from a device step count or learning
//   rate) instead of the arguments, so that a CUDA graph replay sees their current values.
// Unused pointers may be any pointer (the host passes a placeholder): they are never dereferenced.
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
#define OPT_FOUND_INF 256    // skip the launch when *found_inf != 0
#define OPT_UNSCALE 512      // grad *= *inv_scale, written back
#define OPT_DEVICE_SCALARS 1024  // step-dependent scalars from device_scalars

// Every entry point: C linkage, and at most 64 registers per thread so that 4 blocks of 256 threads
// (kernels/cuda/optim.py's THREADS) stay resident per SM; ptxas reaches that with no spills (the
// float64 kernels, and the float32 ones since loss scaling, would otherwise take up to 72).
#define OPT_ENTRY extern "C" __global__ void __launch_bounds__(256, 4)

// common.cuh: to_acc (a gradient in the master type), from_acc (the master rounded to the parameter's
// type) and max_nan (NaN-propagating, as torch.maximum / np.maximum; fmax would drop the NaN).
#include "common.cuh"

// W elements of T in one vector load/store: 16 bytes of the master type (ld.global.v4.f32 /
// v2.f64), and the same count of a 16-bit gradient (8 bytes).
template <typename T, int W>
struct alignas(sizeof(T) * W) Vec {
    T e[W];
};

template <typename T>
struct Width {
    enum { value = 16 / sizeof(T) };  // an enum, not a static member: no global symbol in the module
};

__device__ __forceinline__ float sqrt_rn(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_rn(double x) { return sqrt(x); }

// A master whose parameter no longer holds it rounded (the parameter was written since the last
// step: a checkpoint load, a change through .data) restarts from the parameter's value.
template <typename T, typename G>
__device__ __forceinline__ void resync(T& master, G param) {
    if (to_acc(from_acc<G>(master)) != to_acc(param)) master = to_acc(param);
}

// Which state arrays an optimizer reads and writes on this step (an unused one is never touched,
// so its pointer may be any placeholder).
struct StateUse {
    bool read0, write0, read1, write1, read2, write2;
};

template <typename V, typename T>
__device__ __forceinline__ V* vecs_from(T* base, long long head) {
    return base == nullptr ? nullptr : reinterpret_cast<V*>(base + head);
}

// Did the GradScaler find an inf or NaN in the gradients? Then the launch must write nothing.
__device__ __forceinline__ bool skipped(const float* found_inf, int flags) {
    return (flags & OPT_FOUND_INF) && *found_inf != 0.0f;
}

// The grid-stride driver shared by every optimizer. `op(p, g, s0, s1, s2)` updates one element;
// state k is loaded only when it is read and stored only when it is written, so an optimizer that
// uses fewer states (or a state that is write-only on this step) moves no bytes for it. The
// gradient is read as G and computed with in T; with OPT_UNSCALE it is multiplied by inv_scale and
// stored back; with a param_out (16-bit parameters) the master is first resynced with it (resync)
// and the new master value is rounded into it.
//
// Elements [head, head + n_vec * W) go through the vector loop (W = 16 / sizeof(T) per vector); the
// rest, [0, head) and [head + n_vec * W, n), at most 2 * (W - 1) elements when vectorized, go
// through the scalar loop.
template <typename T, typename G, typename Op>
__device__ __forceinline__ void run_elementwise(const Op& op, T* __restrict__ param, G* __restrict__ grad,
                                                G* __restrict__ param_out, T* __restrict__ s0, T* __restrict__ s1,
                                                T* __restrict__ s2, StateUse use, const float* inv_scale, int flags,
                                                long long n, long long head, long long n_vec) {
    constexpr int W = Width<T>::value;
    using PV = Vec<T, W>;
    using GV = Vec<G, W>;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool unscale = flags & OPT_UNSCALE;
    const T inv = unscale ? T(*inv_scale) : T(1);
    const bool has_out = param_out != nullptr;

    PV* __restrict__ pv = vecs_from<PV>(param, head);
    GV* __restrict__ gv = vecs_from<GV>(grad, head);
    GV* __restrict__ ov = vecs_from<GV>(param_out, head);
    PV* __restrict__ v0 = vecs_from<PV>(s0, head);
    PV* __restrict__ v1 = vecs_from<PV>(s1, head);
    PV* __restrict__ v2 = vecs_from<PV>(s2, head);
    for (long long i = first; i < n_vec; i += stride) {
        // Every load of the iteration is issued before the first use: up to five vector loads
        // in flight per thread.
        PV p = pv[i];
        GV g = gv[i];
        PV a = {}, b = {}, c = {};
        GV o;
        if (has_out) o = ov[i];
        if (use.read0) a = v0[i];
        if (use.read1) b = v1[i];
        if (use.read2) c = v2[i];
#pragma unroll
        for (int k = 0; k < W; ++k) {
            T gk = to_acc(g.e[k]);
            if (unscale) {
                gk = gk * inv;
                g.e[k] = from_acc<G>(gk);
            }
            if (has_out) resync(p.e[k], o.e[k]);
            op(p.e[k], gk, a.e[k], b.e[k], c.e[k]);
            if (has_out) o.e[k] = from_acc<G>(p.e[k]);
        }
        pv[i] = p;
        if (unscale) gv[i] = g;
        if (has_out) ov[i] = o;
        if (use.write0) v0[i] = a;
        if (use.write1) v1[i] = b;
        if (use.write2) v2[i] = c;
    }

    const long long vec_end = head + n_vec * W;
    const long long n_scalar = head + (n - vec_end);
    for (long long j = first; j < n_scalar; j += stride) {
        const long long i = j < head ? j : vec_end + (j - head);
        T p = param[i];
        T g = to_acc(grad[i]);
        T a = 0, b = 0, c = 0;
        if (use.read0) a = s0[i];
        if (use.read1) b = s1[i];
        if (use.read2) c = s2[i];
        if (unscale) {
            g = g * inv;
            grad[i] = from_acc<G>(g);
        }
        if (has_out) resync(p, param_out[i]);
        op(p, g, a, b, c);
        param[i] = p;
        if (has_out) param_out[i] = from_acc<G>(p);
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
// device_scalars: {step_size, bc2_sqrt, 1 - lr * weight_decay}.
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

// (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq [any pointer unless amsgrad], param_out [16-bit entry
//  points only], found_inf, inv_scale, device_scalars, n, head, n_vec, beta1, beta2, 1 - beta1, 1 - beta2,
//  step_size, bc2_sqrt, eps, weight_decay, 1 - lr * weight_decay, flags)
template <typename T, typename G>
__device__ __forceinline__ void adam_step(T* param, G* grad, T* exp_avg, T* exp_avg_sq, T* max_exp_avg_sq,
                                          G* param_out, const float* found_inf, const float* inv_scale,
                                          const T* device_scalars, long long n, long long head, long long n_vec,
                                          T beta1, T beta2, T one_minus_beta1, T one_minus_beta2, T step_size,
                                          T bc2_sqrt, T eps, T weight_decay, T decay_factor, int flags) {
    if (skipped(found_inf, flags)) return;
    if (flags & OPT_DEVICE_SCALARS) {
        step_size = device_scalars[0];
        bc2_sqrt = device_scalars[1];
        decay_factor = device_scalars[2];
    }
    const AdamOp<T> op{beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps, weight_decay,
                       decay_factor, flags};
    const bool ams = flags & OPT_AMSGRAD;
    run_elementwise<T, G>(op, param, grad, param_out, exp_avg, exp_avg_sq, max_exp_avg_sq,
                          StateUse{true, true, true, true, ams, ams}, inv_scale, flags, n, head, n_vec);
}

OPT_ENTRY adam_step_f32(float* param, float* grad, float* exp_avg, float* exp_avg_sq, float* max_exp_avg_sq,
                        const float* found_inf, const float* inv_scale, const float* device_scalars, long long n,
                        long long head, long long n_vec, float beta1, float beta2, float one_minus_beta1,
                        float one_minus_beta2, float step_size, float bc2_sqrt, float eps, float weight_decay,
                        float decay_factor, int flags) {
    adam_step<float, float>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, nullptr, found_inf, inv_scale,
                            device_scalars, n, head, n_vec, beta1, beta2, one_minus_beta1, one_minus_beta2,
                            step_size, bc2_sqrt, eps, weight_decay, decay_factor, flags);
}

OPT_ENTRY adam_step_f64(double* param, double* grad, double* exp_avg, double* exp_avg_sq, double* max_exp_avg_sq,
                        const float* found_inf, const float* inv_scale, const double* device_scalars, long long n,
                        long long head, long long n_vec, double beta1, double beta2, double one_minus_beta1,
                        double one_minus_beta2, double step_size, double bc2_sqrt, double eps, double weight_decay,
                        double decay_factor, int flags) {
    adam_step<double, double>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, nullptr, found_inf, inv_scale,
                              device_scalars, n, head, n_vec, beta1, beta2, one_minus_beta1, one_minus_beta2,
                              step_size, bc2_sqrt, eps, weight_decay, decay_factor, flags);
}

OPT_ENTRY adam_step_f32_f16(float* param, __half* grad, float* exp_avg, float* exp_avg_sq, float* max_exp_avg_sq,
                            __half* param_out, const float* found_inf, const float* inv_scale,
                            const float* device_scalars, long long n, long long head, long long n_vec, float beta1,
                            float beta2, float one_minus_beta1, float one_minus_beta2, float step_size, float bc2_sqrt,
                            float eps, float weight_decay, float decay_factor, int flags) {
    adam_step<float, __half>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_out, found_inf, inv_scale,
                             device_scalars, n, head, n_vec, beta1, beta2, one_minus_beta1, one_minus_beta2,
                             step_size, bc2_sqrt, eps, weight_decay, decay_factor, flags);
}

OPT_ENTRY adam_step_f32_bf16(float* param, __nv_bfloat16* grad, float* exp_avg, float* exp_avg_sq,
                             float* max_exp_avg_sq, __nv_bfloat16* param_out, const float* found_inf,
                             const float* inv_scale, const float* device_scalars, long long n, long long head,
                             long long n_vec, float beta1, float beta2, float one_minus_beta1, float one_minus_beta2,
                             float step_size, float bc2_sqrt, float eps, float weight_decay, float decay_factor,
                             int flags) {
    adam_step<float, __nv_bfloat16>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_out, found_inf,
                                    inv_scale, device_scalars, n, head, n_vec, beta1, beta2, one_minus_beta1,
                                    one_minus_beta2, step_size, bc2_sqrt, eps, weight_decay, decay_factor, flags);
}

// ---------------------------------------------------------------------------------------------
// SGD (torch.optim.SGD): g = maximize ? -grad : grad; g += wd * p;
//   momentum: buf = first_step ? g : momentum buf + (1 - dampening) g;  g = nesterov ? g + momentum buf : buf
//   p -= lr * g
// device_scalars: {first_step ? 1 : 0, lr}.
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

// (param, grad, momentum_buf [any pointer unless momentum], param_out [16-bit entry points only], found_inf,
//  inv_scale, device_scalars, n, head, n_vec, lr, momentum, 1 - dampening, weight_decay, flags). On the first
//  step the buffer is written without being read.
template <typename T, typename G>
__device__ __forceinline__ void sgd_step(T* param, G* grad, T* momentum_buf, G* param_out, const float* found_inf,
                                         const float* inv_scale, const T* device_scalars, long long n,
                                         long long head, long long n_vec, T lr, T momentum,
                                         T one_minus_dampening, T weight_decay, int flags) {
    if (skipped(found_inf, flags)) return;
    if (flags & OPT_DEVICE_SCALARS) {
        flags = device_scalars[0] != T(0) ? (flags | OPT_FIRST_STEP) : (flags & ~OPT_FIRST_STEP);
        lr = device_scalars[1];
    }
    const SgdOp<T> op{lr, momentum, one_minus_dampening, weight_decay, flags};
    const bool mom = flags & OPT_MOMENTUM;
    const bool read_buf = mom && !(flags & OPT_FIRST_STEP);
    run_elementwise<T, G>(op, param, grad, param_out, momentum_buf, nullptr, nullptr,
                          StateUse{read_buf, mom, false, false, false, false}, inv_scale, flags, n, head, n_vec);
}

OPT_ENTRY sgd_step_f32(float* param, float* grad, float* momentum_buf, const float* found_inf, const float* inv_scale,
                       const float* device_scalars, long long n, long long head, long long n_vec, float lr,
                       float momentum, float one_minus_dampening, float weight_decay, int flags) {
    sgd_step<float, float>(param, grad, momentum_buf, nullptr, found_inf, inv_scale, device_scalars, n, head, n_vec,
                           lr, momentum, one_minus_dampening, weight_decay, flags);
}

OPT_ENTRY sgd_step_f64(double* param, double* grad, double* momentum_buf, const float* found_inf,
                       const float* inv_scale, const double* device_scalars, long long n, long long head,
                       long long n_vec, double lr, double momentum, double one_minus_dampening, double weight_decay,
                       int flags) {
    sgd_step<double, double>(param, grad, momentum_buf, nullptr, found_inf, inv_scale, device_scalars, n, head,
                             n_vec, lr, momentum, one_minus_dampening, weight_decay, flags);
}

OPT_ENTRY sgd_step_f32_f16(float* param, __half* grad, float* momentum_buf, __half* param_out, const float* found_inf,
                           const float* inv_scale, const float* device_scalars, long long n, long long head,
                           long long n_vec, float lr, float momentum, float one_minus_dampening, float weight_decay,
                           int flags) {
    sgd_step<float, __half>(param, grad, momentum_buf, param_out, found_inf, inv_scale, device_scalars, n, head,
                            n_vec, lr, momentum, one_minus_dampening, weight_decay, flags);
}

OPT_ENTRY sgd_step_f32_bf16(float* param, __nv_bfloat16* grad, float* momentum_buf, __nv_bfloat16* param_out,
                            const float* found_inf, const float* inv_scale, const float* device_scalars, long long n,
                            long long head, long long n_vec, float lr, float momentum, float one_minus_dampening,
                            float weight_decay, int flags) {
    sgd_step<float, __nv_bfloat16>(param, grad, momentum_buf, param_out, found_inf, inv_scale, device_scalars, n,
                                   head, n_vec, lr, momentum, one_minus_dampening, weight_decay, flags);
}

// ---------------------------------------------------------------------------------------------
// Adagrad (torch.optim.Adagrad): g = maximize ? -grad : grad; g += wd * p;
//   sum += g^2;  p -= clr * g / (sqrt(sum) + eps), clr = lr / (1 + (step - 1) lr_decay)
// device_scalars: {clr}.
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

// (param, grad, state_sum, param_out [16-bit entry points only], found_inf, inv_scale, device_scalars, n, head,
//  n_vec, clr, weight_decay, eps, flags)
template <typename T, typename G>
__device__ __forceinline__ void adagrad_step(T* param, G* grad, T* state_sum, G* param_out, const float* found_inf,
                                             const float* inv_scale, const T* device_scalars, long long n,
                                             long long head, long long n_vec, T clr, T weight_decay, T eps,
                                             int flags) {
    if (skipped(found_inf, flags)) return;
    if (flags & OPT_DEVICE_SCALARS) clr = device_scalars[0];
    run_elementwise<T, G>(AdagradOp<T>{clr, weight_decay, eps, flags}, param, grad, param_out, state_sum, nullptr,
                          nullptr, StateUse{true, true, false, false, false, false}, inv_scale, flags, n, head,
                          n_vec);
}

OPT_ENTRY adagrad_step_f32(float* param, float* grad, float* state_sum, const float* found_inf, const float* inv_scale,
                           const float* device_scalars, long long n, long long head, long long n_vec, float clr,
                           float weight_decay, float eps, int flags) {
    adagrad_step<float, float>(param, grad, state_sum, nullptr, found_inf, inv_scale, device_scalars, n, head,
                               n_vec, clr, weight_decay, eps, flags);
}

OPT_ENTRY adagrad_step_f64(double* param, double* grad, double* state_sum, const float* found_inf,
                           const float* inv_scale, const double* device_scalars, long long n, long long head,
                           long long n_vec, double clr, double weight_decay, double eps, int flags) {
    adagrad_step<double, double>(param, grad, state_sum, nullptr, found_inf, inv_scale, device_scalars, n, head,
                                 n_vec, clr, weight_decay, eps, flags);
}

OPT_ENTRY adagrad_step_f32_f16(float* param, __half* grad, float* state_sum, __half* param_out, const float* found_inf,
                               const float* inv_scale, const float* device_scalars, long long n, long long head,
                               long long n_vec, float clr, float weight_decay, float eps, int flags) {
    adagrad_step<float, __half>(param, grad, state_sum, param_out, found_inf, inv_scale, device_scalars, n, head,
                                n_vec, clr, weight_decay, eps, flags);
}

OPT_ENTRY adagrad_step_f32_bf16(float* param, __nv_bfloat16* grad, float* state_sum, __nv_bfloat16* param_out,
                                const float* found_inf, const float* inv_scale, const float* device_scalars,
                                long long n, long long head, long long n_vec, float clr, float weight_decay, float eps,
                                int flags) {
    adagrad_step<float, __nv_bfloat16>(param, grad, state_sum, param_out, found_inf, inv_scale, device_scalars, n,
                                       head, n_vec, clr, weight_decay, eps, flags);
}

// ---------------------------------------------------------------------------------------------
// RMSprop (torch.optim.RMSprop): g = maximize ? -grad : grad; g += wd * p;
//   sq = alpha sq + (1 - alpha) g^2
//   centered: ga = alpha ga + (1 - alpha) g; avg = sqrt(sq - ga^2) + eps   else avg = sqrt(sq) + eps
//   momentum: buf = momentum buf + g / avg; p -= lr buf     else p -= lr g / avg
// No step-dependent scalar: device_scalars is never read.
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

// (param, grad, square_avg, momentum_buf, grad_avg [each any pointer unless used], param_out [16-bit entry
//  points only], found_inf, inv_scale, n, head, n_vec, lr, alpha, 1 - alpha, eps, weight_decay, momentum, flags)
template <typename T, typename G>
__device__ __forceinline__ void rmsprop_step(T* param, G* grad, T* square_avg, T* momentum_buf, T* grad_avg,
                                             G* param_out, const float* found_inf, const float* inv_scale,
                                             long long n, long long head, long long n_vec, T lr, T alpha,
                                             T one_minus_alpha, T eps, T weight_decay, T momentum, int flags) {
    if (skipped(found_inf, flags)) return;
    const RmspropOp<T> op{lr, alpha, one_minus_alpha, eps, weight_decay, momentum, flags};
    const bool mom = flags & OPT_MOMENTUM;
    const bool centered = flags & OPT_CENTERED;
    run_elementwise<T, G>(op, param, grad, param_out, square_avg, momentum_buf, grad_avg,
                          StateUse{true, true, mom, mom, centered, centered}, inv_scale, flags, n, head, n_vec);
}

OPT_ENTRY rmsprop_step_f32(float* param, float* grad, float* square_avg, float* momentum_buf, float* grad_avg,
                           const float* found_inf, const float* inv_scale, long long n, long long head, long long n_vec,
                           float lr, float alpha, float one_minus_alpha, float eps, float weight_decay, float momentum,
                           int flags) {
    rmsprop_step<float, float>(param, grad, square_avg, momentum_buf, grad_avg, nullptr, found_inf, inv_scale, n,
                               head, n_vec, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, flags);
}

OPT_ENTRY rmsprop_step_f64(double* param, double* grad, double* square_avg, double* momentum_buf, double* grad_avg,
                           const float* found_inf, const float* inv_scale, long long n, long long head, long long n_vec,
                           double lr, double alpha, double one_minus_alpha, double eps, double weight_decay,
                           double momentum, int flags) {
    rmsprop_step<double, double>(param, grad, square_avg, momentum_buf, grad_avg, nullptr, found_inf, inv_scale, n,
                                 head, n_vec, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, flags);
}

OPT_ENTRY rmsprop_step_f32_f16(float* param, __half* grad, float* square_avg, float* momentum_buf, float* grad_avg,
                               __half* param_out, const float* found_inf, const float* inv_scale, long long n,
                               long long head, long long n_vec, float lr, float alpha, float one_minus_alpha, float eps,
                               float weight_decay, float momentum, int flags) {
    rmsprop_step<float, __half>(param, grad, square_avg, momentum_buf, grad_avg, param_out, found_inf, inv_scale,
                                n, head, n_vec, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, flags);
}

OPT_ENTRY rmsprop_step_f32_bf16(float* param, __nv_bfloat16* grad, float* square_avg, float* momentum_buf,
                                float* grad_avg, __nv_bfloat16* param_out, const float* found_inf,
                                const float* inv_scale, long long n, long long head, long long n_vec, float lr,
                                float alpha, float one_minus_alpha, float eps, float weight_decay, float momentum,
                                int flags) {
    rmsprop_step<float, __nv_bfloat16>(param, grad, square_avg, momentum_buf, grad_avg, param_out, found_inf,
                                       inv_scale, n, head, n_vec, lr, alpha, one_minus_alpha, eps, weight_decay,
                                       momentum, flags);
}
