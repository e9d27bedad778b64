// Cooperative persistent kernels of the cupy backend's small-batch path (backends/cupy.py, path
// "persistent"): ONE launch runs the whole sequence, forward only (backward always takes the
// graph path; the tape these kernels write has the same layout).
//
// Block j owns the hidden units [j*units, (j+1)*units) of every gate, for every row of the batch;
// its slice of the recurrent weights (G*units rows of H) stays in shared memory across all steps
// when it fits (use_smem), else it is read from global memory (L2) each step. Each step one warp
// computes one (row, unit) element: its lanes stride over k for the G dot products
// h_{t-1} . W[g*H + u, :] (fp32 accumulation, h in fp32), a shuffle reduction sums them, and lane 0
// applies the same pointwise math as the graph path (common.cuh). Then every block meets at
// grid.sync(), once per step (twice for TwoStageRNN, whose second stage needs all of a_t).
//
// The state is double-buffered in hbuf (2, B, H) fp32: step s reads slot s%2 and writes slot
// (s+1)%2, so one barrier per step suffices; slot 0 holds h0 on entry and the final state is in
// slot T%2. The launcher guarantees gridDim.x * units >= H and that the grid is co-resident
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor * SMs), which grid.sync() requires.
// No tensor cores here: this path is for the small per-step products where a GEMM launch costs
// more than the arithmetic (see the heuristic in backends/cupy.py); persistent_mma.cu is the
// tensor-core version of the gated kernel.

#include "persistent.cuh"

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Row pointer of gate g, local unit uu: shared memory [g][uu][H] or global W[g*H + u0 + uu].
template <typename T>
__device__ __forceinline__ const T* weight_row(const T* w_s, const T* w, bool use_smem, int g,
                                               long long uu, long long nu, long long u0,
                                               long long H) {
    return use_smem ? w_s + ((long long)g * nu + uu) * H : w + ((long long)g * H + u0 + uu) * H;
}

// Loads this block's rows of `mats` stacked (G*H, H) matrices: shared [g][uu][k].
template <typename T>
__device__ void load_slice(T* w_s, const T* w, int mats, long long nu, long long u0, long long H) {
    const long long n = (long long)mats * nu * H;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const long long g = i / (nu * H), rem = i - g * nu * H;
        const long long uu = rem / H, k = rem - uu * H;
        w_s[i] = w[(g * H + u0 + uu) * H + k];
    }
}

// ---------------------------------------------------------------- RNN / LSTM / GRU

template <typename T, int CELL, int ACT>
__global__ void __launch_bounds__(PERSISTENT_THREADS)
gated_fwd_persistent(const T* __restrict__ xw, const T* __restrict__ w_hh,
                     const T* __restrict__ bias, const long long* __restrict__ lengths,
                     float* __restrict__ hbuf, float* __restrict__ c, T* __restrict__ y,
                     float* __restrict__ gates, float* __restrict__ ctape, T* __restrict__ hprev,
                     long long n_steps, long long B, long long H, long long units,
                     long long reverse, long long use_smem) {
    RNN_GPU_DYNAMIC_SHARED(smem_raw);
    T* w_s = reinterpret_cast<T*>(smem_raw);
    constexpr int G = rg::CellShape<CELL>::G;
    cg::grid_group grid = cg::this_grid();
    const long long u0 = block_first_unit(units), nu = block_unit_count(u0, units, H);
    if (use_smem) load_slice(w_s, w_hh, G, nu, u0, H);
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    for (long long s = 0; s < n_steps; ++s) {
        const long long t = reverse ? n_steps - 1 - s : s;
        const float* src = hbuf + (s & 1) * B * H;
        float* dst = hbuf + ((s + 1) & 1) * B * H;
        for (long long item = warp; item < B * nu; item += n_warps) {   // warp-uniform loop
            const long long b = item / nu, uu = item - b * nu, u = u0 + uu;
            const float* hrow = src + b * H;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (long long k = lane; k < H; k += 32) {
                const float hk = hrow[k];
                for (int g = 0; g < G; ++g)
                    acc[g] += hk * rg::to_f32(weight_row(w_s, w_hh, use_smem, g, uu, nu, u0, H)[k]);
            }
            for (int g = 0; g < G; ++g) acc[g] = warp_sum(acc[g]);
            if (lane == 0) {
                const T* xrow = xw + rg::time_row(t, b, B) * (G * H);
                float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int g = 0; g < G; ++g) {
                    x[g] = rg::to_f32(xrow[g * H + u]);
                    if (bias != nullptr) acc[g] += rg::to_f32(bias[g * H + u]);
                }
                const long long at = b * H + u;
                const float h_prev = hrow[u];
                const float c_prev = CELL == rg::LSTM ? c[at] : 0.0f;
                const rg::GatedStep r = rg::gated_math<CELL, ACT>(x, acc, h_prev, c_prev);
                dst[at] = rg::gated_store<T, CELL>(r, rg::is_valid(lengths, t, b), h_prev, c_prev,
                                                   t, b, u, B, H,
                                                   CELL == rg::LSTM ? c + at : nullptr, y, gates,
                                                   ctape, hprev);
            }
        }
        grid.sync();
    }
}

// ---------------------------------------------------------------- TwoStageRNN

// Shared memory holds [W_aa | W_ha | W_hh] rows of this block's units ("gates" 0, 1, 2 of
// weight_row), the three matrices passed stacked as w (3H, H). abuf (B, H) fp32 carries a_t from
// the first stage to the second.
template <typename T, int F, int G>
__global__ void __launch_bounds__(PERSISTENT_THREADS)
twostage_fwd_persistent(const T* __restrict__ xw, const T* __restrict__ w,
                        const T* __restrict__ bias, const long long* __restrict__ lengths,
                        float* __restrict__ hbuf, float* __restrict__ abuf, T* __restrict__ y,
                        float* __restrict__ atape, float* __restrict__ htape,
                        T* __restrict__ hprev, long long n_steps, long long B, long long H,
                        long long units, long long reverse, long long use_smem) {
    RNN_GPU_DYNAMIC_SHARED(smem_raw);
    T* w_s = reinterpret_cast<T*>(smem_raw);
    cg::grid_group grid = cg::this_grid();
    const long long u0 = block_first_unit(units), nu = block_unit_count(u0, units, H);
    if (use_smem) load_slice(w_s, w, 3, nu, u0, H);
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    for (long long s = 0; s < n_steps; ++s) {
        const long long t = reverse ? n_steps - 1 - s : s;
        const float* src = hbuf + (s & 1) * B * H;
        float* dst = hbuf + ((s + 1) & 1) * B * H;
        for (long long item = warp; item < B * nu; item += n_warps) {   // a_t = f(xw + W_aa h)
            const long long b = item / nu, uu = item - b * nu, u = u0 + uu;
            const float* hrow = src + b * H;
            const T* w_aa = weight_row(w_s, w, use_smem, 0, uu, nu, u0, H);
            float acc = 0.0f;
            for (long long k = lane; k < H; k += 32) acc += hrow[k] * rg::to_f32(w_aa[k]);
            acc = warp_sum(acc);
            if (lane == 0) {
                const long long at = rg::time_row(t, b, B) * H + u;
                const float a = rg::activate<F>(rg::to_f32(xw[at]) + acc);
                abuf[b * H + u] = a;
                if (atape != nullptr) atape[at] = a;
            }
        }
        grid.sync();
        for (long long item = warp; item < B * nu; item += n_warps) {   // h_t = g(...)
            const long long b = item / nu, uu = item - b * nu, u = u0 + uu;
            const float* hrow = src + b * H;
            const float* arow = abuf + b * H;
            const T* w_ha = weight_row(w_s, w, use_smem, 1, uu, nu, u0, H);
            const T* w_hh = weight_row(w_s, w, use_smem, 2, uu, nu, u0, H);
            float acc = 0.0f;
            for (long long k = lane; k < H; k += 32)
                acc += arow[k] * rg::to_f32(w_ha[k]) + hrow[k] * rg::to_f32(w_hh[k]);
            acc = warp_sum(acc);
            if (lane == 0) {
                const float pre = acc + (bias != nullptr ? rg::to_f32(bias[u]) : 0.0f);
                dst[b * H + u] = rg::twostage_store<T, G>(pre, rg::is_valid(lengths, t, b),
                                                          hrow[u], t, b, u, B, H, y, htape,
                                                          hprev);
            }
        }
        grid.sync();
    }
}
