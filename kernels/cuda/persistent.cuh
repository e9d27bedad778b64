// What the cooperative persistent kernels share (persistent.cu, persistent_mma.cu): the grid
// group, the block size and the block's dynamic shared memory.
#ifndef RNN_GPU_PERSISTENT_CUH
#define RNN_GPU_PERSISTENT_CUH

#ifndef RNN_GPU_HOST_EMULATION
#include <cooperative_groups.h>
#endif

#include "common.cuh"

namespace cg = cooperative_groups;

// The block's dynamic shared memory. The CPU emulation of the tests (one host thread per CUDA
// thread, barriers for the synchronisations) defines this macro to a per-block buffer.
#ifndef RNN_GPU_DYNAMIC_SHARED
#define RNN_GPU_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

constexpr int PERSISTENT_THREADS = 256;     // the launcher uses the same block size

// The block's dynamic shared memory from its first 128-byte boundary on (the launcher adds 128
// bytes for the round-up). Computed as an offset from the array, not by rounding the address
// as an integer: through an integer the compiler loses that the pointer is shared memory, and
// every access through it becomes a generic ld/st (the tensor-core kernels' PTX had no
// ld.shared at all until 2026-11-28; tests/test_cupy_compile.py checks it).
template <typename T>
__device__ __forceinline__ T* shared_from_128(unsigned char* smem) {
    const unsigned misalign =
        static_cast<unsigned>(reinterpret_cast<unsigned long long>(smem) & 127ull);
    return reinterpret_cast<T*>(smem + ((128u - misalign) & 127u));
}

// Block j owns the hidden units [j * units, j * units + nu): nu = units, fewer in the last
// block, 0 in a block past H (the launcher rounds the grid up).
__device__ __forceinline__ long long block_first_unit(long long units) {
    return (long long)blockIdx.x * units;
}
__device__ __forceinline__ long long block_unit_count(long long u0, long long units,
                                                      long long H) {
    return u0 < H ? (H - u0 < units ? H - u0 : units) : 0;
}

// Phase clocks: where a persistent kernel's step time goes, measured on the card without a
// profiler (run 6's H200 image had no Nsight Compute; by count the tensor-core forward's step
// at LSTM fp16 512x64x1024 should take ~5-7 us, and it took 18). Compiled in only with
// RNN_GPU_PHASE_CLOCKS defined (.ci/phase_clocks.py); otherwise every call is empty. Thread 0
// of each block reads the SM's cycle counter at the end of each phase of each step (after a
// block barrier where the phase ends in one, so the count is the block's) and adds the
// difference to its phase's total; at the end of the kernel every block adds its totals to
// rg_phase_sum and folds them into rg_phase_min / rg_phase_max (the host zeroes the sums and
// maxima and fills the minima with ones first), and block 0 writes its cycles and nanoseconds
// (%globaltimer) over the whole loop, which give the clock rate.
constexpr int RG_MAX_PHASES = 8;
#if defined(RNN_GPU_PHASE_CLOCKS) && !defined(RNN_GPU_HOST_EMULATION)
extern "C" {
__device__ unsigned long long rg_phase_sum[RG_MAX_PHASES];
__device__ unsigned long long rg_phase_min[RG_MAX_PHASES];
__device__ unsigned long long rg_phase_max[RG_MAX_PHASES];
__device__ unsigned long long rg_phase_loop[2];             // block 0: cycles, nanoseconds
}
__device__ __forceinline__ unsigned long long rg_globaltimer() {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    return ns;
}
__device__ __forceinline__ long long rg_clock64() {   // clock64, which nvcc's host pass lacks
    long long cycles;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(cycles));
    return cycles;
}
struct PhaseClocks {
    unsigned long long total[RG_MAX_PHASES];
    long long start, last;
    unsigned long long start_ns;
    __device__ PhaseClocks() : start(rg_clock64()), last(start), start_ns(rg_globaltimer()) {
        for (int p = 0; p < RG_MAX_PHASES; ++p) total[p] = 0;
    }
    __device__ __forceinline__ void mark(int phase) {
        if (threadIdx.x != 0) return;
        const long long now = rg_clock64();
        total[phase] += (unsigned long long)(now - last);
        last = now;
    }
    __device__ void flush() {
        if (threadIdx.x != 0) return;
        for (int p = 0; p < RG_MAX_PHASES; ++p) {
            atomicAdd(&rg_phase_sum[p], total[p]);
            atomicMin(&rg_phase_min[p], total[p]);
            atomicMax(&rg_phase_max[p], total[p]);
        }
        if (blockIdx.x == 0) {
            rg_phase_loop[0] = (unsigned long long)(rg_clock64() - start);
            rg_phase_loop[1] = rg_globaltimer() - start_ns;
        }
    }
};
#else
struct PhaseClocks {
    __device__ __forceinline__ void mark(int) {}
    __device__ __forceinline__ void flush() {}
};
#endif

#endif  // RNN_GPU_PERSISTENT_CUH
