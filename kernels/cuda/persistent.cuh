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

#endif  // RNN_GPU_PERSISTENT_CUH
