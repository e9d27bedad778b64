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

// Block j owns the hidden units [j * units, j * units + nu): nu = units, fewer in the last
// block, 0 in a block past H (the launcher rounds the grid up).
__device__ __forceinline__ long long block_first_unit(long long units) {
    return (long long)blockIdx.x * units;
}
__device__ __forceinline__ long long block_unit_count(long long u0, long long units,
                                                      long long H) {
    return u0 < H ? (H - u0 < units ? H - u0 : units) : 0;
}

#endif  // RNN_GPU_PERSISTENT_CUH
