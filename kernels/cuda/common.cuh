// Device code shared by recurrent.cu (the per-step kernels of the CUDA-graph path) and
// persistent.cu (the cooperative persistent kernels): element conversions, activations and
// the pointwise math of one (row, unit) element of one time step. The equations are DESIGN §2's
// (see rnn_gpu/backend_api.py); the tape layout is the Triton backend's.
//
// The backend loads the .cu files with importlib.resources and pastes this file in place of
// their `#include "common.cuh"` line before handing the source to NVRTC, so no include path is
// needed at run time. nvcc (tests/test_cupy_compile.py) resolves the include normally.
//
// With RNN_GPU_HOST_EMULATION defined (tests only) the float32 step kernels compile as plain
// C++ for the CPU: the test defines __global__/__device__ away and emulates blockIdx/threadIdx.
#ifndef RNN_GPU_COMMON_CUH
#define RNN_GPU_COMMON_CUH

#ifndef RNN_GPU_HOST_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

namespace rg {

// Cell ids and activation ids: the template arguments of the kernels (backends/cupy.py uses the
// same numbers in its name expressions).
constexpr int RNN = 0, LSTM = 1, GRU = 2;
constexpr int TANH = 0, SIGMOID = 1, RELU = 2;

// Gates per cell in xw / W_hh, and fp32 values per element in the gates tape (GRU keeps
// W_hn h + b_hn beside r, z, n because backward needs it).
template <int CELL> struct CellShape {
    static constexpr int G = CELL == LSTM ? 4 : (CELL == GRU ? 3 : 1);
    static constexpr int TG = CELL == RNN ? 1 : 4;
};

__device__ __forceinline__ float to_f32(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

#ifndef RNN_GPU_HOST_EMULATION
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
#endif

// expf (not __expf): float32 results are compared with a float64 oracle at ~1e-5.
// For x -> -inf, expf(-x) -> inf and the quotient -> 0, the intended limit.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <int ACT> __device__ __forceinline__ float activate(float x) {
    if (ACT == TANH) return tanhf(x);
    if (ACT == SIGMOID) return sigmoid(x);
    return x > 0.0f ? x : 0.0f;
}

// The derivative, written in terms of the activation's output y (what the tape keeps).
template <int ACT> __device__ __forceinline__ float activation_grad(float y) {
    if (ACT == TANH) return 1.0f - y * y;
    if (ACT == SIGMOID) return y * (1.0f - y);
    return y > 0.0f ? 1.0f : 0.0f;
}

// Row b of a (T, B, ·) array at time t: int64 so that T*B*G*H beyond 2^31 stays right.
__device__ __forceinline__ long long time_row(long long t, long long b, long long B) {
    return t * B + b;
}

__device__ __forceinline__ bool is_valid(const long long* lengths, long long t, long long b) {
    return lengths == nullptr || t < lengths[b];
}

// One (row, unit) element of one step of a one-product cell. x[g] is xw's gate g (W_ih x + b_ih)
// and hh[g] is (W_hh h_{t-1} + b_hh)'s gate g, both in fp32.
struct GatedStep {
    float h_new;
    float c_new;
    float g[4];     // what the tape keeps: RNN h_new; LSTM i, f, g, o; GRU r, z, n, W_hn h + b_hn
};

template <int CELL, int ACT>
__device__ __forceinline__ GatedStep gated_math(const float* x, const float* hh, float h_prev,
                                                float c_prev) {
    GatedStep r;
    r.c_new = 0.0f;
    r.g[0] = r.g[1] = r.g[2] = r.g[3] = 0.0f;
    if (CELL == RNN) {
        r.h_new = activate<ACT>(x[0] + hh[0]);
        r.g[0] = r.h_new;
    } else if (CELL == LSTM) {
        const float i = sigmoid(x[0] + hh[0]);
        const float f = sigmoid(x[1] + hh[1]);
        const float g = tanhf(x[2] + hh[2]);
        const float o = sigmoid(x[3] + hh[3]);
        r.c_new = f * c_prev + i * g;
        r.h_new = o * tanhf(r.c_new);
        r.g[0] = i;
        r.g[1] = f;
        r.g[2] = g;
        r.g[3] = o;
    } else {                                    // GRU: reset applied after the product
        const float rr = sigmoid(x[0] + hh[0]);
        const float z = sigmoid(x[1] + hh[1]);
        const float n = tanhf(x[2] + rr * hh[2]);
        r.h_new = (1.0f - z) * n + z * h_prev;
        r.g[0] = rr;
        r.g[1] = z;
        r.g[2] = n;
        r.g[3] = hh[2];
    }
    return r;
}

// Writes one element's outputs of step time t (y, LSTM cell state, tape) and returns the state
// kept for the next step. A row past its length (valid false) keeps h and c and outputs zero.
// The tape holds the gates and h_{t-1} of every row, valid or not: backward masks them.
template <typename T, int CELL>
__device__ __forceinline__ float gated_store(const GatedStep& r, bool valid, float h_prev,
                                             float c_prev, long long t, long long b, long long u,
                                             long long B, long long H, float* c_state, T* y,
                                             float* gates, float* ctape, T* hprev) {
    const long long row = time_row(t, b, B);
    y[row * H + u] = from_f32<T>(valid ? r.h_new : 0.0f);
    const float c_keep = valid ? r.c_new : c_prev;
    if (CELL == LSTM) *c_state = c_keep;
    if (gates != nullptr) {
        constexpr int TG = CellShape<CELL>::TG;
        float* gt = gates + row * (TG * H) + u;
        for (int k = 0; k < TG; ++k) gt[k * H] = r.g[k];
        if (CELL == LSTM) ctape[row * H + u] = c_keep;
        hprev[row * H + u] = from_f32<T>(h_prev);
    }
    return valid ? r.h_new : h_prev;
}

// The backward of one element (row b, unit u) of the step at time t (t_prev: the time of the
// step before it, -1 for the first step, whose c_{t-1} is c0), shared by recurrent.cu's step
// kernel and persistent_mma.cu's persistent backward. dh_in, dc_in are dL/dh_t (without y_t's
// own gradient, added here from dy) and dL/dc_t. Writes the pre-activation gradients to dxw[t]
// (and, GRU, the gradients of W_hh h + b_hh to dhh[t]). Returns those of W_hh h + b_hh (what
// the recurrent product dh_{t-1} += d_rec W_hh reads: the same as dxw's but for GRU's n gate,
// which the reset factor r scales), the part of dL/dh_{t-1} that does not go through W_hh, and
// dL/dc_{t-1}. A row past its length passes dh, dc through and gets zeros.
struct GatedGrad {
    float d_rec[4];
    float carry;
    float dc;
};

template <typename T, int CELL, int ACT>
__device__ __forceinline__ GatedGrad gated_bwd_element(
        float dh_in, float dc_in, const T* dy, const float* gates, const float* ctape,
        const float* c0, const T* hprev, const long long* lengths, T* dxw, T* dhh, long long t,
        long long t_prev, long long b, long long u, long long B, long long H) {
    constexpr int G = CellShape<CELL>::G;
    constexpr int TG = CellShape<CELL>::TG;
    const long long row = time_row(t, b, B);
    const bool valid = is_valid(lengths, t, b);
    const float dh_new = dh_in + to_f32(dy[row * H + u]);
    const float* gt = gates + row * (TG * H) + u;
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};   // gradients of the pre-activations (xw's gates)
    float d_rec_n = 0.0f;                     // GRU: gradient of W_hn h + b_hn
    GatedGrad r;
    r.carry = 0.0f;                           // dL/dh_{t-1} not through W_hh
    r.dc = dc_in;
    if (CELL == RNN) {
        d[0] = dh_new * activation_grad<ACT>(gt[0]);
    } else if (CELL == LSTM) {
        const float i = gt[0], f = gt[H], g = gt[2 * H], o = gt[3 * H];
        const float c_t = ctape[row * H + u];
        const float c_prev = t_prev < 0 ? c0[b * H + u] : ctape[time_row(t_prev, b, B) * H + u];
        const float tc = tanhf(c_t);
        const float dct = dc_in + dh_new * o * (1.0f - tc * tc);
        d[0] = dct * g * i * (1.0f - i);
        d[1] = dct * c_prev * f * (1.0f - f);
        d[2] = dct * i * (1.0f - g * g);
        d[3] = dh_new * tc * o * (1.0f - o);
        if (valid) r.dc = dct * f;
    } else {                                  // GRU
        const float rr = gt[0], z = gt[H], n = gt[2 * H], hn = gt[3 * H];
        const float hp = to_f32(hprev[row * H + u]);
        const float dn = dh_new * (1.0f - z) * (1.0f - n * n);
        d[0] = dn * hn * rr * (1.0f - rr);
        d[1] = dh_new * (hp - n) * z * (1.0f - z);
        d[2] = dn;
        d_rec_n = dn * rr;
        r.carry = dh_new * z;
    }
    if (!valid) {
        d[0] = d[1] = d[2] = d[3] = 0.0f;
        d_rec_n = 0.0f;
        r.carry = dh_in;
    }
    T* dx = dxw + row * (G * H) + u;
    for (int k = 0; k < 4; ++k) r.d_rec[k] = CELL == GRU && k == 2 ? d_rec_n : d[k];
    for (int k = 0; k < G; ++k) dx[k * H] = from_f32<T>(d[k]);
    if (CELL == GRU) {
        T* dr = dhh + row * (G * H) + u;
        for (int k = 0; k < G; ++k) dr[k * H] = from_f32<T>(r.d_rec[k]);
    }
    return r;
}

// TwoStageRNN, second stage of one element: h_t = g(pre) with pre = W_ha a_t + W_hh h_{t-1} + b_h.
// Writes y and the tape (h_t before the mask, h_{t-1}); returns the state kept.
template <typename T, int G>
__device__ __forceinline__ float twostage_store(float pre, bool valid, float h_prev, long long t,
                                                long long b, long long u, long long B,
                                                long long H, T* y, float* htape, T* hprev) {
    const float h_new = activate<G>(pre);
    const long long at = time_row(t, b, B) * H + u;
    y[at] = from_f32<T>(valid ? h_new : 0.0f);
    if (htape != nullptr) {
        htape[at] = h_new;
        hprev[at] = from_f32<T>(h_prev);
    }
    return valid ? h_new : h_prev;
}

}  // namespace rg

#endif  // RNN_GPU_COMMON_CUH
