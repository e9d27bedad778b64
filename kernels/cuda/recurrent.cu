// Per-step kernels of the cupy backend's CUDA-graph path (backends/cupy.py, path "graph").
//
// Each time step is one cuBLAS GEMM (h_{t-1} W_hh^T into an fp32 buffer, fp32 accumulation)
// followed by ONE of these kernels, which does everything else of the step: gate math, state
// update, the lengths mask, the y write and the tape write. One thread per (row, unit) element:
// simple and obviously right; the GEMM is where the flops are. The state lives in fp32 (h, c)
// and, for the next GEMM, in the compute dtype T (hc). Backward runs the reverse-time kernels
// below, each followed by the recurrent GEMM dgates_t W_hh accumulated into dh (beta = 1).
//
// Two kinds of memory, so that a time loop captured as a CUDA graph can be replayed for the
// next call instead of being recorded again (a capture froze every kernel argument and every
// GEMM pointer; on an H100 a call that recorded its 512-step LSTM loop, 1024 operations, took
// 36.5 ms, against 17.2 ms for the same operations launched plainly):
//   * the call's own arrays (xw, y, the tape, dy, dxw, the lengths, the bias) are read through
//     a CALL TABLE, a small struct of addresses in device memory that the backend rewrites
//     before each call (one copy of <= 64 bytes); the kernels take the table's address;
//   * everything the GEMMs touch (the state, its compute-dtype copy, the products, a copy of
//     the recurrent weights, the row of gradients the next GEMM reads) lives in a WORKSPACE
//     that the backend keeps per shape and stream; the kernels take those addresses directly.
// The field order of each table is the backend's (CALL_TABLES in backends/cupy.py; a test
// compares the two).
//
// Index arithmetic is int64 throughout (T*B*G*H exceeds 2^31 at realistic sizes). Every integer
// parameter is `long long` and every real parameter `float`: the launcher passes numpy.int64 /
// numpy.float32 scalars, and a size mismatch there would corrupt the arguments silently.
#include "common.cuh"

__device__ __forceinline__ long long thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// ---------------------------------------------------------------- call tables

template <typename T> struct GatedFwdCall {
    const T* xw;                 // (T, B, G*H)
    const T* bias;               // b_hh (G*H) or nullptr
    const long long* lengths;    // (B) or nullptr
    T* y;                        // (T, B, H)
    float* gates;                // (T, B, TG*H) or nullptr: no tape (inference)
    float* ctape;                // (T, B, H), LSTM
    T* hprev;                    // (T, B, H)
};

template <typename T> struct GatedBwdCall {
    const T* dy;                 // (T, B, H)
    const float* gates;
    const float* ctape;
    const float* c0;             // (B, H) fp32, LSTM
    const T* hprev;
    const long long* lengths;
    T* dxw;                      // (T, B, G*H)
    T* dhh;                      // (T, B, G*H), GRU only (the others' is dxw)
};

template <typename T> struct TwoStageFwdCall {
    const T* xw;                 // (T, B, H)
    const T* bias;               // b_h (H) or nullptr
    const long long* lengths;
    T* y;
    float* atape;                // (T, B, H) or nullptr: no tape
    float* htape;
    T* hprev;
};

template <typename T> struct TwoStageBwdCall {
    const T* dy;
    const float* atape;
    const float* htape;
    const long long* lengths;
    T* dph;                      // (T, B, H): the gradient of the second stage's pre-activation
    T* dxw;                      // (T, B, H)
};

// ---------------------------------------------------------------- RNN / LSTM / GRU, forward

// One step at time t. hh = h_{t-1} W_hh^T (B, G*H) fp32 without the bias; h, c are the fp32
// state (B, H), updated in place (each thread reads then writes its own element); hc receives
// h_t in T for the next step's GEMM.
template <typename T, int CELL, int ACT>
__global__ void gated_fwd_step(const GatedFwdCall<T>* __restrict__ call,
                               const float* __restrict__ hh, float* __restrict__ h,
                               float* __restrict__ c, T* __restrict__ hc, long long t,
                               long long B, long long H) {
    const long long idx = thread_index();
    if (idx >= B * H) return;
    const GatedFwdCall<T> p = *call;
    const long long b = idx / H, u = idx - b * H;
    constexpr int G = rg::CellShape<CELL>::G;
    const T* xrow = p.xw + rg::time_row(t, b, B) * (G * H);
    const float* hrow = hh + b * (G * H);
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float pre[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int g = 0; g < G; ++g) {
        x[g] = rg::to_f32(xrow[g * H + u]);
        pre[g] = hrow[g * H + u] + (p.bias != nullptr ? rg::to_f32(p.bias[g * H + u]) : 0.0f);
    }
    const bool valid = rg::is_valid(p.lengths, t, b);
    const float h_prev = h[idx];
    const float c_prev = CELL == rg::LSTM ? c[idx] : 0.0f;
    const rg::GatedStep r = rg::gated_math<CELL, ACT>(x, pre, h_prev, c_prev);
    const float h_keep = rg::gated_store<T, CELL>(r, valid, h_prev, c_prev, t, b, u, B, H,
                                                  CELL == rg::LSTM ? c + idx : nullptr, p.y,
                                                  p.gates, p.ctape, p.hprev);
    h[idx] = h_keep;
    hc[idx] = rg::from_f32<T>(h_keep);
}

// ---------------------------------------------------------------- RNN / LSTM / GRU, backward

// Step at time t (t_prev: the time of the step before it, -1 for the first step, whose c_{t-1}
// is c0). dh, dc (B, H) fp32 hold dL/dh_t and dL/dc_t on entry; on exit dh holds the part of
// dL/dh_{t-1} that does not go through W_hh (the launcher's GEMM then adds drec W_hh) and dc
// holds dL/dc_{t-1}. dxw[t] receives the pre-activation gradients (the gradient of xw); drec
// (B, G*H, workspace) the gradient of h_{t-1} W_hh^T + b_hh at this step, which the GEMM reads
// (the same values as dxw[t] except for GRU, whose n gate differs by the reset factor r; GRU
// also keeps them in dhh[t] for dW_hh). Rows past their length pass dh, dc through and get
// zeros.
template <typename T, int CELL, int ACT>
__global__ void gated_bwd_step(const GatedBwdCall<T>* __restrict__ call, float* __restrict__ dh,
                               float* __restrict__ dc, T* __restrict__ drec, long long t,
                               long long t_prev, long long B, long long H) {
    const long long idx = thread_index();
    if (idx >= B * H) return;
    const GatedBwdCall<T> p = *call;
    const long long b = idx / H, u = idx - b * H;
    constexpr int G = rg::CellShape<CELL>::G;
    const rg::GatedGrad r = rg::gated_bwd_element<T, CELL, ACT>(
        dh[idx], CELL == rg::LSTM ? dc[idx] : 0.0f, p.dy, p.gates, p.ctape, p.c0, p.hprev,
        p.lengths, p.dxw, p.dhh, t, t_prev, b, u, B, H);
    T* dr = drec + b * (G * H) + u;
    for (int g = 0; g < G; ++g) dr[g * H] = rg::from_f32<T>(r.d_rec[g]);
    dh[idx] = r.carry;
    if (CELL == rg::LSTM) dc[idx] = r.dc;
}

// ---------------------------------------------------------------- TwoStageRNN

// First stage at time t: a_t = f(xw_t + W_aa h_{t-1}). pa (B, 2H) fp32 is h_{t-1} [W_aa; W_hh]^T
// (one GEMM for both products of h_{t-1}); a_c receives a_t in T for the W_ha GEMM.
template <typename T, int F>
__global__ void twostage_fwd_a(const TwoStageFwdCall<T>* __restrict__ call,
                               const float* __restrict__ pa, T* __restrict__ a_c, long long t,
                               long long B, long long H) {
    const long long idx = thread_index();
    if (idx >= B * H) return;
    const TwoStageFwdCall<T> p = *call;
    const long long b = idx / H, u = idx - b * H;
    const long long at = rg::time_row(t, b, B) * H + u;
    const float a = rg::activate<F>(rg::to_f32(p.xw[at]) + pa[b * (2 * H) + u]);
    a_c[idx] = rg::from_f32<T>(a);
    if (p.atape != nullptr) p.atape[at] = a;
}

// Second stage: h_t = g(W_ha a_t + W_hh h_{t-1} + b_h) with pb = a_t W_ha^T (B, H) fp32 and
// W_hh h_{t-1} the second half of pa.
template <typename T, int G>
__global__ void twostage_fwd_b(const TwoStageFwdCall<T>* __restrict__ call,
                               const float* __restrict__ pa, const float* __restrict__ pb,
                               float* __restrict__ h, T* __restrict__ hc, long long t,
                               long long B, long long H) {
    const long long idx = thread_index();
    if (idx >= B * H) return;
    const TwoStageFwdCall<T> p = *call;
    const long long b = idx / H, u = idx - b * H;
    const float pre = pb[idx] + pa[b * (2 * H) + H + u] +
                      (p.bias != nullptr ? rg::to_f32(p.bias[u]) : 0.0f);
    const float h_keep = rg::twostage_store<T, G>(pre, rg::is_valid(p.lengths, t, b), h[idx], t,
                                                  b, u, B, H, p.y, p.htape, p.hprev);
    h[idx] = h_keep;
    hc[idx] = rg::from_f32<T>(h_keep);
}

// Backward, second stage first: dph_t = (dh + dy_t) g'(h_t), the gradient of W_ha a + W_hh h + b,
// into dph[t] and into the workspace row drec that the next GEMMs read. On exit dh holds
// dL/dh_{t-1} not through the weights (zero for valid rows, whose gradient flows only through
// W_aa and W_hh; the launcher's GEMMs add those).
template <typename T, int G>
__global__ void twostage_bwd_a(const TwoStageBwdCall<T>* __restrict__ call,
                               float* __restrict__ dh, T* __restrict__ drec, long long t,
                               long long B, long long H) {
    const long long idx = thread_index();
    if (idx >= B * H) return;
    const TwoStageBwdCall<T> p = *call;
    const long long b = idx / H, u = idx - b * H;
    const long long at = rg::time_row(t, b, B) * H + u;
    const bool valid = rg::is_valid(p.lengths, t, b);
    const float dh_in = dh[idx];
    const float d = (dh_in + rg::to_f32(p.dy[at])) * rg::activation_grad<G>(p.htape[at]);
    const T v = rg::from_f32<T>(valid ? d : 0.0f);
    p.dph[at] = v;
    drec[idx] = v;
    dh[idx] = valid ? 0.0f : dh_in;
}

// Then the first stage: dpa_t = (dph_t W_ha) f'(a_t) with da = dph_t W_ha (B, H) fp32; dpa_t is
// the gradient of xw_t, into dxw[t] and into the workspace row drec (the W_aa GEMM reads it).
template <typename T, int F>
__global__ void twostage_bwd_b(const TwoStageBwdCall<T>* __restrict__ call,
                               const float* __restrict__ da, T* __restrict__ drec, long long t,
                               long long B, long long H) {
    const long long idx = thread_index();
    if (idx >= B * H) return;
    const TwoStageBwdCall<T> p = *call;
    const long long b = idx / H, u = idx - b * H;
    const long long at = rg::time_row(t, b, B) * H + u;
    const float d = da[idx] * rg::activation_grad<F>(p.atape[at]);
    const T v = rg::from_f32<T>(rg::is_valid(p.lengths, t, b) ? d : 0.0f);
    p.dxw[at] = v;
    drec[idx] = v;
}

// ---------------------------------------------------------------- conversions

// The backend never asks CuPy to compute on bfloat16 arrays (CuPy handles that type only through
// ml_dtypes); every conversion it needs is one of these.
template <typename T>
__global__ void cast_to_f32(const T* __restrict__ src, float* __restrict__ dst, long long n) {
    const long long i = thread_index();
    if (i < n) dst[i] = rg::to_f32(src[i]);
}

template <typename T>
__global__ void cast_from_f32(const float* __restrict__ src, T* __restrict__ dst, long long n) {
    const long long i = thread_index();
    if (i < n) dst[i] = rg::from_f32<T>(src[i]);
}

template <typename T>
__global__ void fill_value(T* __restrict__ dst, float value, long long n) {
    const long long i = thread_index();
    if (i < n) dst[i] = rg::from_f32<T>(value);
}

// ---------------------------------------------------------------- LSTM projection (proj_size)

// The cupy backend runs an LSTM with a projection as a plain LSTM over m_t = o * tanh(c_t),
// with W_hh W_hr folded into one recurrent weight (kernels/cuda/projected.py); these kernels
// move the rows that do not fold: W_hh h_0 enters each row at its first step, and a row of
// length 0 keeps h_0 as its final state.

// The step a row starts from: 0, or with reverse its length - 1 (0 for a row that never steps,
// harmless: every step of such a row is masked).
__device__ __forceinline__ long long first_step(const long long* lengths, long long b,
                                                long long n_steps, long long reverse) {
    if (!reverse) return 0;
    const long long len = lengths != nullptr ? lengths[b] : n_steps;
    return len > 0 ? len - 1 : 0;
}

// xw[t0_b, b, :] += add[b, :], xw (n_steps, B, n), add (B, n) fp32: h_0 W_hh^T into each
// row's first step.
template <typename T>
__global__ void add_at_first_step(T* __restrict__ xw, const float* __restrict__ add,
                                  const long long* __restrict__ lengths, long long n_steps,
                                  long long B, long long n, long long reverse) {
    const long long i = thread_index();
    if (i >= B * n) return;
    const long long b = i / n;
    T* at = xw + rg::time_row(first_step(lengths, b, n_steps, reverse), b, B) * n + (i - b * n);
    *at = rg::from_f32<T>(rg::to_f32(*at) + add[i]);
}

// out[b, :] = src[t0_b, b, :], src (n_steps, B, n), out (B, n): the gradient of h_0 W_hh^T.
template <typename T>
__global__ void gather_first_step(const T* __restrict__ src, T* __restrict__ out,
                                  const long long* __restrict__ lengths, long long n_steps,
                                  long long B, long long n, long long reverse) {
    const long long i = thread_index();
    if (i >= B * n) return;
    const long long b = i / n;
    out[i] = src[rg::time_row(first_step(lengths, b, n_steps, reverse), b, B) * n + (i - b * n)];
}

// out[b, :] = stepped[b, :] for a row with at least one step, otherwise[b, :] for a row of
// length 0; all (B, n). The final h of an empty row is h_0 (and the gradient of h_0 is dh_T).
template <typename T>
__global__ void rows_that_stepped(const T* __restrict__ stepped, const T* __restrict__ otherwise,
                                  T* __restrict__ out, const long long* __restrict__ lengths,
                                  long long B, long long n) {
    const long long i = thread_index();
    if (i >= B * n) return;
    const long long b = i / n;
    out[i] = lengths == nullptr || lengths[b] > 0 ? stepped[i] : otherwise[i];
}
