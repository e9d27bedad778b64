// Cooperative persistent forward of RNN, LSTM and GRU with the recurrent product on the tensor
// cores: persistent.cu's design (backends/cupy.py, path "persistent-mma"). Each step, block j
// computes its slice of h_{t-1} W_hh^T, rows x Np (its row group's rows, see BlockSlice; Np =
// its G*nu rows of W_hh padded to 16), as 16x16 tiles, one tile at a time per warp: A = those
// rows of h_{t-1} in the compute dtype, row-major (hmat, 2 x Bp x Hp, zero-padded; Bp = the
// groups x rows), copied into shared memory h_s at the start of each step with
// cp.async in MMA_K_CHUNKS column chunks, the products of chunk c running while the later ones
// are in flight (read from L2 fragment by fragment instead, each warp's 64 dependent loads of a
// K = 1024 product would wait on L2 latency); B = the block's weight rows, kept in shared memory
// across all steps as a column-major K x Np matrix (w_s[n * Hs + k], zero-padded). The fp32
// results go to shared memory (acc_s, rows x Np), then every thread finishes (row, unit) elements
// as the other kernels do and writes h_t to hbuf (fp32) and hmat (compute dtype) for the next
// step, then grid.sync(). The padding rows and columns of hmat are zero on entry and never
// written.
//
// Why: at (T, B, H) = (512, 64, 1024) fp16 persistent.cu's CUDA-core kernel took 100 ms against
// cuDNN's 4.4 ms (H100, run 4): 268 M multiply-adds a step, one warp per output element.
// Tensor cores do one 16x8x16 product per instruction (mma.sync) instead: 20.2 ms in run 5
// (39 us a step against cuDNN's 8.4), before the padding and the asynchronous copies below;
// 9.4 ms in run 7 (H200), whose phase clocks (.ci/phase_clocks.py) split its 12.9 us step into
// 5.6 of products (~160 cycles a k-step), 2.9 issuing the copies of h (every block reads all of
// h from L2: 16 MiB a step), 1.6 waiting for xw (since loaded without waiting), 1.5 finishing
// and 1.2 in grid.sync().

#include "persistent.cuh"

// One 16 x 16 tile: c (row-major, ldc) = a (16 x K row-major, lda) . b (K x 16 column-major, ldb),
// K a multiple of 16; with accumulate, c holds the product over the earlier K chunks and this
// chunk's is added to it. Every lane of the warp calls it. This generic version (float32, and
// the CPU emulation of the tests) lets each lane compute 8 of the 256 elements; the half and
// bfloat16 versions below are the tensor-core ones.
template <typename T>
__device__ void tile_product(float* c, long long ldc, const T* a, long long lda, const T* b,
                             long long ldb, long long K, int lane, bool accumulate) {
    for (int e = lane; e < 256; e += 32) {
        const int r = e >> 4, n = e & 15;
        float acc = accumulate ? c[r * ldc + n] : 0.0f;
        for (long long k = 0; k < K; ++k)
            acc += rg::to_f32(a[r * lda + k]) * rg::to_f32(b[n * ldb + k]);
        c[r * ldc + n] = acc;
    }
}

#ifndef RNN_GPU_HOST_EMULATION
// The tensor-core tile as PTX mma.sync m16n8k16 (sm_80+), two per 16 x 16 tile, rather than
// <mma.h>'s wmma: the card's NVRTC headers (pip's nvidia-cuda-nvrtc / cu13 include, H100 run 5)
// ship mma.h without the crt/mma.h it includes, so no kernel of this file compiled there.
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, q = 2 (lane % 4):
// A (16 x 16 row-major): a0 = (row g, k q..q+1), a1 = (g + 8, q..), a2 = (g, q + 8..),
// a3 = (g + 8, q + 8..); B (16 x 8, column n = g): b0 = k q..q+1, b1 = k q + 8..;
// D (16 x 8 fp32): d0, d1 = (row g, cols q, q + 1), d2, d3 = (row g + 8, same cols).
#define RG_MMA_M16N8K16(KIND)                                                                \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." KIND "." KIND ".f32 "                 \
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"            \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
// d += a . b for one 16 x 8 output; the first argument only picks the element type
__device__ __forceinline__ void mma_m16n8k16(__half, float (&d)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    RG_MMA_M16N8K16("f16");
}
__device__ __forceinline__ void mma_m16n8k16(__nv_bfloat16, float (&d)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    RG_MMA_M16N8K16("bf16");
}
#undef RG_MMA_M16N8K16
#endif

// pair_at and mma_tile are plain C++ too: the tests run them on the CPU with an emulated
// mma_m16n8k16 that follows the PTX ISA's fragment layouts (tests/test_cupy_emulated.py).
template <typename T>
__device__ __forceinline__ unsigned pair_at(const T* p) {     // two 16-bit elements, 4-aligned
    return *reinterpret_cast<const unsigned*>(p);
}

// Independent accumulator sets a warp's k loop alternates between (k-step j feeds set
// j % MMA_CHAINS, summed at the end): with one, each mma.sync waits for the previous one's
// result on the same output. A tuning constant (.ci/phase_clocks.py --variant=-DMMA_CHAINS=2).
#ifndef MMA_CHAINS
#define MMA_CHAINS 1
#endif

// With MMA_LDMATRIX, a k-step's fragments come from two ldmatrix.x4 (one for A, one for both
// halves of B) instead of eight 32-bit shared loads: a quarter of the load instructions, the
// same bytes. A tuning constant, off until a card times it (run 7: ~160 cycles a k-step in the
// products, before shared memory was addressed as such; --variant=-DMMA_LDMATRIX=1).
#ifndef MMA_LDMATRIX
#define MMA_LDMATRIX 0
#endif

#ifndef RNN_GPU_HOST_EMULATION
// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 matrices of 16-bit elements. Lane l
// gives the address of row l % 8 of matrix l / 8 (16-byte aligned); register i of lane l gets
// elements 2 (l % 4) and 2 (l % 4) + 1 of row l / 4 of matrix i (PTX ISA, "ldmatrix"): the
// layout of mma.m16n8k16's A and B fragments. (The tests emulate it from the same text.)
template <typename T>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const T* row) {
    unsigned long long addr;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(addr) : "l"(row));
    // "memory": it reads shared memory, so the compiler must not move it above the
    // cp.async wait or the barrier that made the data visible (volatile alone keeps the order
    // in practice, as CUTLASS relies on; the clobber says so)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(static_cast<unsigned>(addr))
                 : "memory");
}
#endif

template <typename T>
__device__ __forceinline__ void mma_tile(float* c, long long ldc, const T* a, long long lda,
                                         const T* b, long long ldb, long long K, int lane,
                                         bool accumulate) {
    const int g = lane >> 2, q = (lane & 3) * 2;
    float d[MMA_CHAINS][2][4];
    for (int j = 0; j < MMA_CHAINS; ++j)
        for (int half = 0; half < 2; ++half)
            for (int e = 0; e < 4; ++e) d[j][half][e] = 0.0f;
    for (int half = 0; accumulate && half < 2; ++half) {   // the D fragment, laid out as below
        const float* in = c + g * ldc + half * 8 + q;
        d[0][half][0] = in[0];
        d[0][half][1] = in[1];
        d[0][half][2] = in[8 * ldc];
        d[0][half][3] = in[8 * ldc + 1];
    }
    const T* a_lo = a + g * lda + q;                 // rows g and g + 8 of the A tile
    const T* a_hi = a_lo + 8 * lda;
    // ldmatrix rows: A's matrices (rows 0-7, k..k+7), (8-15, k..), (0-7, k+8..), (8-15, k+8..)
    // are a0..a3; B's (n 0-7, k..), (n 0-7, k+8..), (n 8-15, k..), (n 8-15, k+8..) are b0, b1
    // of the half 0-7, then of the half 8-15
    const T* a_row = a + (lane & 15) * lda + ((lane >> 4) << 3);
    const T* b_row = b + ((lane & 7) + ((lane >> 4) << 3)) * ldb + (((lane >> 3) & 1) << 3);
    for (long long k0 = 0; k0 < K; k0 += 16 * MMA_CHAINS) {
#pragma unroll
        for (int j = 0; j < MMA_CHAINS; ++j) {
            const long long k = k0 + 16 * j;
            if (MMA_CHAINS > 1 && k >= K) break;
            if (MMA_LDMATRIX) {
                unsigned fa[4], fb[4];
                ldmatrix_x4(fa, a_row + k);
                ldmatrix_x4(fb, b_row + k);
                mma_m16n8k16(T(), d[j][0], fa, fb[0], fb[1]);
                mma_m16n8k16(T(), d[j][1], fa, fb[2], fb[3]);
                continue;
            }
            const unsigned fa[4] = {pair_at(a_lo + k), pair_at(a_hi + k), pair_at(a_lo + k + 8),
                                    pair_at(a_hi + k + 8)};
            for (int half = 0; half < 2; ++half) {   // columns 0-7, then 8-15 of the tile
                const T* col = b + (half * 8 + g) * ldb + k + q;
                mma_m16n8k16(T(), d[j][half], fa, pair_at(col), pair_at(col + 8));
            }
        }
    }
    for (int half = 0; half < 2; ++half) {
        for (int j = 1; j < MMA_CHAINS; ++j)
            for (int e = 0; e < 4; ++e) d[0][half][e] += d[j][half][e];
        float* out = c + g * ldc + half * 8 + q;
        out[0] = d[0][half][0];
        out[1] = d[0][half][1];
        out[8 * ldc] = d[0][half][2];
        out[8 * ldc + 1] = d[0][half][3];
    }
}
#ifndef RNN_GPU_HOST_EMULATION
template <>
__device__ void tile_product<__half>(float* c, long long ldc, const __half* a, long long lda,
                                     const __half* b, long long ldb, long long K, int lane,
                                     bool accumulate) {
    mma_tile(c, ldc, a, lda, b, ldb, K, lane, accumulate);
}
template <>
__device__ void tile_product<__nv_bfloat16>(float* c, long long ldc, const __nv_bfloat16* a,
                                            long long lda, const __nv_bfloat16* b, long long ldb,
                                            long long K, int lane, bool accumulate) {
    mma_tile(c, ldc, a, lda, b, ldb, K, lane, accumulate);
}
#endif

// Warp tiles (the forward's warp_split > 0): a warp computes a 32 x 32 output, 2 x 2 of the
// 16 x 16 tiles, over a slice of each chunk of K, accumulating in registers across the chunks
// and storing once a step, where a warp of the per-tile loop above computes one tile over all
// of K through shared memory. Why: each k-step of a 16 x 16 tile reads 1 KiB of fragments
// from shared memory, so the per-tile forward at 512x64x1024 fp16 reads 512 KiB a block and
// step: 4096 cycles at the SM's 128 bytes a cycle, ~2.1 us of run 7's 12.9 us step even with
// no other stall. A 2 x 2 warp tile reuses each A and B fragment twice: half the bytes. Its
// k-split lets the warps share the few 32 x 32 tiles of a block (2 at that shape, 4 warps
// each), each into its own fp32 partial, summed in order in the finish.
// d[i][j][half][e] is tile (i, j)'s element (g + 8 (e / 2), 8 half + q + e % 2) of the
// mma.m16n8k16 D fragment (g = lane / 4, q = 2 (lane % 4)); tiles from m_valid and n_valid on
// are padding past the block's rows or units, skipped (warp-uniform). This generic version
// (float32, and the CPU emulation of the tests) computes those elements on the CUDA cores.
template <typename T>
__device__ void warp_tile_add(float (&d)[2][2][2][4], const T* a, long long lda, const T* b,
                              long long ldb, long long K, int lane, int m_valid, int n_valid) {
    const int g = lane >> 2, q = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int half = 0; half < 2; ++half)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (i >= m_valid || j >= n_valid) continue;
                    const long long r = i * 16 + g + 8 * (e >> 1);
                    const long long n = j * 16 + half * 8 + q + (e & 1);
                    float acc = 0.0f;
                    for (long long k = 0; k < K; ++k)
                        acc += rg::to_f32(a[r * lda + k]) * rg::to_f32(b[n * ldb + k]);
                    d[i][j][half][e] += acc;
                }
}

// The tensor-core warp tile: per k-step the A fragments of both row tiles and the B fragments
// of both column tiles (16 32-bit shared loads; MMA_LDMATRIX and MMA_CHAINS apply to the
// per-tile loop only), then 8 mma.sync, each fragment used twice.
template <typename T>
__device__ __forceinline__ void mma_warp_tile(float (&d)[2][2][2][4], const T* a, long long lda,
                                              const T* b, long long ldb, long long K, int lane,
                                              int m_valid, int n_valid) {
    const int g = lane >> 2, q = (lane & 3) * 2;
    for (long long k = 0; k < K; k += 16) {
        unsigned fa[2][4] = {};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const T* lo = a + (i * 16 + g) * lda + k + q;     // rows g and g + 8 of row tile i
            const T* hi = lo + 8 * lda;
            if (i < m_valid) {
                fa[i][0] = pair_at(lo);
                fa[i][1] = pair_at(hi);
                fa[i][2] = pair_at(lo + 8);
                fa[i][3] = pair_at(hi + 8);
            }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                if (j >= n_valid) continue;
                const T* col = b + (j * 16 + half * 8 + g) * ldb + k + q;
                const unsigned b0 = pair_at(col), b1 = pair_at(col + 8);
#pragma unroll
                for (int i = 0; i < 2; ++i)
                    if (i < m_valid) mma_m16n8k16(T(), d[i][j][half], fa[i], b0, b1);
            }
    }
}

// The warp tile's valid tiles into c (row-major, ldc), in the D-fragment layout above.
__device__ __forceinline__ void warp_tile_store(float* c, long long ldc,
                                                const float (&d)[2][2][2][4], int lane,
                                                int m_valid, int n_valid) {
    const int g = lane >> 2, q = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                if (i >= m_valid || j >= n_valid) continue;
                float* out = c + (i * 16 + g) * ldc + j * 16 + half * 8 + q;
                out[0] = d[i][j][half][0];
                out[1] = d[i][j][half][1];
                out[8 * ldc] = d[i][j][half][2];
                out[8 * ldc + 1] = d[i][j][half][3];
            }
}
#ifndef RNN_GPU_HOST_EMULATION
template <>
__device__ void warp_tile_add<__half>(float (&d)[2][2][2][4], const __half* a, long long lda,
                                      const __half* b, long long ldb, long long K, int lane,
                                      int m_valid, int n_valid) {
    mma_warp_tile(d, a, lda, b, ldb, K, lane, m_valid, n_valid);
}
template <>
__device__ void warp_tile_add<__nv_bfloat16>(float (&d)[2][2][2][4], const __nv_bfloat16* a,
                                             long long lda, const __nv_bfloat16* b,
                                             long long ldb, long long K, int lane, int m_valid,
                                             int n_valid) {
    mma_warp_tile(d, a, lda, b, ldb, K, lane, m_valid, n_valid);
}
#endif

// Shared-memory rows of h and W are MMA_SMEM_PAD elements longer than Hp (device.py's
// MMA_SMEM_PAD must match). Unpadded, the rows lie 2 KiB apart at H = 1024 fp16, so the 8 row
// groups of a warp's fragment loads hit the same 4 banks: an 8-way conflict on every A and B
// load. Padded, row g starts 4 g words further on, and the 32 lanes reach 32 banks.
constexpr long long MMA_SMEM_PAD = 8;

// The step's copy of h_{t-1} into shared memory, the group's rows of Hp elements (128 KiB at
// B = 64, H = 1024 fp16, in one group), goes in MMA_K_CHUNKS column chunks, each its own cp.async group: the products
// over chunk c start once it has landed, while the later chunks are still in flight. cp.async
// (sm_80+) holds no register and does not stall the thread, so all of a thread's copies are
// issued back to back; run 5's loop of plain 16-byte loads waited on one L2 round trip per
// iteration (32 per thread a step at that shape, ~0.4 us each: ~13 of its 39 us by estimate).
constexpr int MMA_K_CHUNKS = 4;

#ifndef RNN_GPU_HOST_EMULATION
// 16 bytes global -> shared, through L2 only (.cg: other blocks wrote h_{t-1} this step)
__device__ __forceinline__ void copy16_async(void* shared_dst, const void* global_src) {
    unsigned long long dst;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(dst) : "l"(shared_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :: "r"(static_cast<unsigned>(dst)), "l"(global_src) : "memory");
}
__device__ __forceinline__ void copy_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int PENDING>      // wait until at most PENDING of this thread's groups are in flight
__device__ __forceinline__ void copy_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory");
}
#endif
// Chunk c of this step landed (for this thread's copies; __syncthreads for the others').
__device__ __forceinline__ void copy_wait_for_chunk(int c) {
    static_assert(MMA_K_CHUNKS == 4, "one case per chunk that may stay in flight");
    switch (MMA_K_CHUNKS - 1 - c) {
    case 0: copy_wait<0>(); break;
    case 1: copy_wait<1>(); break;
    case 2: copy_wait<2>(); break;
    default: copy_wait<3>(); break;
    }
}

// Row groups: the batch's padded rows are split into groups of `rows` (a whole number of
// 16-row tiles), and the grid into as many groups of blocks, each of which splits the hidden
// units as the one group did before: block j of group g owns the units [j * units, ...) of the
// rows [g * rows, g * rows + rows). Rows are independent in both passes, so a block needs only
// its group's rows of h (forward) or of d_rec (backward): with two groups of 64 blocks of 16
// units at 512x64x1024, each block copies 32 rows of h a step instead of 64, the card's reads
// of h from L2 halve (16 MiB a step to 8; 2.9 of run 7's 12.9 us step issued them) and so do
// the backward's reads of d_rec (64 MiB a step to 32; 28 of its 50 us waited for them), whose
// 8 units a block were also padded to 16-wide tiles (16 fill them). The weights a block keeps
// double (2x the units), so the shared memory stays the same (~202 KiB forward, fp16). The
// launcher's plan (device.py's row_split) chooses the groups; one group is the earlier kernel.
struct BlockSlice {
    long long u0, nu;       // the block's units: [u0, u0 + nu), nu = 0 past H
    long long b0, nb;       // the group's rows: [b0, b0 + nb), nb <= rows (0 past B)
};

__device__ __forceinline__ BlockSlice block_slice(long long units, long long H, long long B,
                                                  long long rows) {
    const long long per_group = (H + units - 1) / units;   // blocks a row group
    const long long group = blockIdx.x / per_group;
    BlockSlice sl;
    sl.u0 = (blockIdx.x - group * per_group) * units;
    sl.nu = block_unit_count(sl.u0, units, H);
    sl.b0 = group * rows;
    sl.nb = B - sl.b0 < rows ? (B > sl.b0 ? B - sl.b0 : 0) : rows;
    return sl;
}

// What one (row, unit) element of step t needs besides the products: xw, the G gates in fp32,
// and h_{t-1} and (LSTM) c_{t-1} in fp32 (zeros past the block's B*nu elements). A thread's
// first MMA_PREFETCH_ITEMS elements are loaded at the start of the step, before the copy of h:
// xw comes from HBM (the input GEMM wrote it before the launch; 512 KiB a step at 512x64x1024
// fp16), h_{t-1} and c_{t-1} from L2, and loaded only when the gate math needs them, each of
// a thread's elements waited on those round trips after the products (the state's loads also
// after the previous element's stores, which the compiler cannot prove apart). h_{t-1} and
// c_{t-1} of an element were written by this very thread in the previous step (an element's
// thread is the same every step), so reading them early needs no barrier. 2 covers
// rows * units <= 512 (B = 64 at 8 units a block, or 32 rows at 16 with two row groups);
// further elements load as they are finished.
// xw stays in its own dtype until the finish: converted here, every thread waited out the HBM
// round trip before issuing its copies of h (run 7, H200: 1.6 us of a 12.9 us step at LSTM fp16
// 512x64x1024, .ci/phase_clocks.py), where the conversion at the finish finds it long arrived.
constexpr int MMA_PREFETCH_ITEMS = 2;

template <typename T>
struct ElementInputs {
    T x[4];                // xw's gates, as stored
    T bias[4];             // b_hh's gates (zero without a bias)
    float h_prev;
    float c_prev;
};

template <typename T, int CELL>
__device__ __forceinline__ void element_inputs(ElementInputs<T>& in, const T* xw,
                                               const float* src, const float* c, long long t,
                                               long long item, long long B, long long H,
                                               const BlockSlice& sl, const T* bias) {
    constexpr int G = rg::CellShape<CELL>::G;
    for (int g = 0; g < 4; ++g) in.x[g] = in.bias[g] = rg::from_f32<T>(0.0f);
    in.h_prev = in.c_prev = 0.0f;
    if (item >= sl.nb * sl.nu) return;
    const long long row = item / sl.nu, b = sl.b0 + row, u = sl.u0 + (item - row * sl.nu);
    const T* xrow = xw + rg::time_row(t, b, B) * (G * H);
    for (int g = 0; g < G; ++g) in.x[g] = xrow[g * H + u];
    for (int g = 0; bias != nullptr && g < G; ++g) in.bias[g] = bias[g * H + u];
    in.h_prev = src[b * H + u];
    if (CELL == rg::LSTM) in.c_prev = c[b * H + u];
}

template <typename T, int CELL, int ACT>
__global__ void __launch_bounds__(PERSISTENT_THREADS)
gated_fwd_persistent_mma(const T* __restrict__ xw, const T* __restrict__ w_hh,
                         const T* __restrict__ bias, const long long* __restrict__ lengths,
                         float* __restrict__ hbuf, T* __restrict__ hmat, float* __restrict__ c,
                         T* __restrict__ y, float* __restrict__ gates, float* __restrict__ ctape,
                         T* __restrict__ hprev, long long n_steps, long long B, long long H,
                         long long units, long long reverse, long long Bp, long long Hp,
                         long long Np, long long rows, long long warp_split) {
    RNN_GPU_DYNAMIC_SHARED(smem_raw);
    // 128-byte aligned tiles (the fragments' 4-byte pair loads need 4)
    const long long Hs = Hp + MMA_SMEM_PAD;          // row stride of w_s and h_s
    T* w_s = shared_from_128<T>(smem_raw);
    T* h_s = w_s + Np * Hs;                          // the group's rows of h_{t-1}
    float* acc_s = reinterpret_cast<float*>(h_s + rows * Hs);   // parts x rows x Np
    constexpr int G = rg::CellShape<CELL>::G;
    cg::grid_group grid = cg::this_grid();
    const BlockSlice sl = block_slice(units, H, B, rows);
    const long long u0 = sl.u0, nu = sl.nu, b0 = sl.b0;
    for (long long i = threadIdx.x; i < Np * Hp; i += blockDim.x) {   // column n = g*nu + uu
        const long long n = i / Hp, k = i - n * Hp;
        const long long g = nu > 0 ? n / nu : G, uu = nu > 0 ? n - g * nu : 0;
        w_s[n * Hs + k] = g < G && k < H ? w_hh[(g * H + u0 + uu) * H + k]
                                          : rg::from_f32<T>(0.0f);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    const long long m_tiles = rows / 16, n_tiles = (G * nu + 15) / 16;
    // With warp_split > 0 (warp tiles, see warp_tile_add): warp w takes the 32 x 32 tile
    // w % w_tiles over slice w / w_tiles of each chunk; the launcher's plan keeps w_tiles x
    // warp_split within the warps. The finish sums the parts' products.
    const long long w_cols = (n_tiles + 1) / 2, w_tiles = (m_tiles + 1) / 2 * w_cols;
    const long long w_tile = w_tiles > 0 ? warp % w_tiles : 0;
    const long long w_part = w_tiles > 0 ? warp / w_tiles : warp_split;   // none: nu = 0
    const long long mt0 = w_tiles > 0 ? w_tile / w_cols * 2 : 0;
    const long long nt0 = w_tiles > 0 ? w_tile % w_cols * 2 : 0;
    const int m_valid = (int)(m_tiles - mt0 < 2 ? m_tiles - mt0 : 2);
    const int n_valid = (int)(n_tiles - nt0 < 2 ? n_tiles - nt0 : 2);
    const bool warp_tiled = w_part < warp_split;                 // false for every warp at 0
    const long long parts = warp_split > 0 ? warp_split : 1;
    // The copy of h: a row is row_words 16-byte words (Hp * sizeof(T) / 16), chunk ch its words
    // [ch * chunk_words, ...), chunk_words a whole number of 16-element k steps (sizeof(T)
    // words each). This thread copies the words (r0, w0), (r0, w0) + blockDim.x, ... of each
    // chunk, walked without a division per word.
    const int per_word = 16 / (int)sizeof(T);                  // elements per 16-byte word
    const int row_words = (int)(Hp / per_word);
    const int k_step_words = (int)sizeof(T);
    const int chunk_words = ((row_words + MMA_K_CHUNKS - 1) / MMA_K_CHUNKS + k_step_words - 1) /
                            k_step_words * k_step_words;
    const int r0 = threadIdx.x / chunk_words, w0 = threadIdx.x % chunk_words;
    const int dr = blockDim.x / chunk_words, dw = blockDim.x % chunk_words;
    PhaseClocks clocks;     // phases (.ci/phase_clocks.py): 0 element inputs prefetched,
                            // 1 copies issued, 2 waits for chunks (with the barrier),
                            // 3 products, 4 closing barrier, 5 finish, 6 grid.sync
    for (long long s = 0; s < n_steps; ++s) {
        const long long t = reverse ? n_steps - 1 - s : s;
        const float* src = hbuf + (s & 1) * B * H;
        float* dst = hbuf + ((s + 1) & 1) * B * H;
        const T* a_src = hmat + (s & 1) * Bp * Hp + b0 * Hp;   // the group's first row
        T* a_dst = hmat + ((s + 1) & 1) * Bp * Hp;
        ElementInputs<T> pre[MMA_PREFETCH_ITEMS];          // loads issued now, used after the
#pragma unroll                                            // copy and the products
        for (int j = 0; j < MMA_PREFETCH_ITEMS; ++j)
            element_inputs<T, CELL>(pre[j], xw, src, c, t,
                                    threadIdx.x + (long long)j * blockDim.x, B, H, sl, bias);
        clocks.mark(0);
        for (int ch = 0; ch < MMA_K_CHUNKS; ++ch) {     // issue every copy of the step
            const int first = ch * chunk_words;
            const int words = row_words - first < chunk_words ? row_words - first : chunk_words;
            for (int r = r0, w = w0; r < rows;) {
                if (w < words)
                    copy16_async(h_s + r * Hs + (long long)(first + w) * per_word,
                                 a_src + r * Hp + (long long)(first + w) * per_word);
                r += dr;
                w += dw;
                if (w >= chunk_words) {
                    w -= chunk_words;
                    ++r;
                }
            }
            copy_commit();                               // an empty group is allowed
        }
        clocks.mark(1);
        float d[2][2][2][4];                              // the warp tile's products
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 8; ++e) d[i][j][e >> 2][e & 3] = 0.0f;
#pragma unroll
        for (int ch = 0; ch < MMA_K_CHUNKS; ++ch) {
            copy_wait_for_chunk(ch);
            __syncthreads();
            clocks.mark(2);
            const long long k0 = (long long)ch * chunk_words * per_word;
            const long long chunk_k = (long long)chunk_words * per_word;
            const long long kn = Hp - k0 < chunk_k ? Hp - k0 : chunk_k;   // <= 0: empty chunk
            if (warp_split > 0) {
                // this warp's slice of the chunk: whole k-steps, the last slices maybe empty
                const long long span = (chunk_k / 16 + warp_split - 1) / warp_split * 16;
                const long long kb = w_part * span, ke = kb + span < kn ? kb + span : kn;
                if (warp_tiled && ke > kb)
                    warp_tile_add<T>(d, h_s + mt0 * 16 * Hs + k0 + kb, Hs,
                                     w_s + nt0 * 16 * Hs + k0 + kb, Hs, ke - kb, lane, m_valid,
                                     n_valid);
            }
            for (long long tile = warp; warp_split == 0 && kn > 0 && tile < m_tiles * n_tiles;
                 tile += n_warps) {
                const long long mt = tile / n_tiles, nt = tile - mt * n_tiles;  // warp-uniform
                tile_product<T>(acc_s + mt * 16 * Np + nt * 16, Np, h_s + mt * 16 * Hs + k0, Hs,
                                w_s + nt * 16 * Hs + k0, Hs, kn, lane, ch > 0);
            }
            clocks.mark(3);
        }
        if (warp_tiled)
            warp_tile_store(acc_s + w_part * rows * Np + mt0 * 16 * Np + nt0 * 16, Np, d, lane,
                            m_valid, n_valid);
        __syncthreads();
        clocks.mark(4);
        auto finish = [&](long long item, const ElementInputs<T>& in) {   // one (row, unit)
            const long long row = item / nu, uu = item - row * nu, b = b0 + row, u = u0 + uu;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int g = 0; g < G; ++g) {
                acc[g] = rg::to_f32(in.bias[g]);
                for (long long part = 0; part < parts; ++part)   // in order: deterministic
                    acc[g] += acc_s[(part * rows + row) * Np + g * nu + uu];
            }
            const long long at = b * H + u;
            float x[4];
            for (int g = 0; g < 4; ++g) x[g] = rg::to_f32(in.x[g]);
            const rg::GatedStep r = rg::gated_math<CELL, ACT>(x, acc, in.h_prev, in.c_prev);
            const float h = rg::gated_store<T, CELL>(r, rg::is_valid(lengths, t, b), in.h_prev,
                                                     in.c_prev, t, b, u, B, H,
                                                     CELL == rg::LSTM ? c + at : nullptr, y,
                                                     gates, ctape, hprev);
            dst[at] = h;
            a_dst[b * Hp + u] = rg::from_f32<T>(h);
        };
#pragma unroll
        for (int j = 0; j < MMA_PREFETCH_ITEMS; ++j) {
            const long long item = threadIdx.x + (long long)j * blockDim.x;
            if (item < sl.nb * nu) finish(item, pre[j]);
        }
        for (long long item = threadIdx.x + (long long)MMA_PREFETCH_ITEMS * blockDim.x;
             item < sl.nb * nu; item += blockDim.x) {
            ElementInputs<T> in;
            element_inputs<T, CELL>(in, xw, src, c, t, item, B, H, sl, bias);
            finish(item, in);
        }
        clocks.mark(5);
        grid.sync();          // also orders this step's reads of acc_s, h_s before the next
        clocks.mark(6);
    }
    clocks.flush();
}

// ---------------------------------------------------------------- backward

// Cooperative persistent backward of RNN, LSTM and GRU (backends/cupy.py, backward path
// "persistent-mma"): the graph path's reverse-time loop in one launch. Block j owns the hidden
// units [u0, u0 + nu) of its row group's rows (BlockSlice). Each step s, from the last to the
// first, it
//   1. back-propagates the step's gate math for its (row, unit) elements (gated_bwd_element, as
//      recurrent.cu's gated_bwd_step does): dxw[t] (GRU also dhh[t]), dh and dc of its units
//      (fp32, in global memory, each element read and written by one thread only), and its
//      columns of d_rec, the gradient of W_hh h_{t-1} + b_hh, into drec (compute dtype,
//      Bp x GHp, zero-padded, double-buffered by step parity);
//   2. grid.sync(): every block's columns of d_rec are written;
//   3. adds d_rec W_hh to its units of dh: the product of its group's rows of d_rec (rows x
//      GHp) and its columns of
//      W_hh (GHp x Np, Np = nu padded to 16; column-major in shared memory for all steps), as
//      16 x 16 tiles on the tensor cores. d_rec comes through shared memory in chunks of
//      `chunk` elements a row (cp.async, two buffers: chunk c + 1 lands while c is
//      multiplied); when the tiles are fewer than the warps, k_split warps share a tile, each
//      over a slice of the chunk into its own fp32 partial (acc_s), summed in the finish.
// One barrier a step: the product of step s reads slot s & 1 of drec, and step s - 1 writes
// the other slot only after every block has passed the barrier of step s, that is, after their
// products of step s + 1 had read it. At the end dh holds dL/dh_0 and dc dL/dc_0.
//
// Why: the graph path's backward is a cuBLAS GEMM and a pointwise kernel per step: ~24 of the
// 36.2 ms of a training step at LSTM fp16 512x64x1024 (H100, run 5), where cuDNN's whole
// training step takes 11.7 ms. By count this kernel's step is ~12-17 us there: every block
// reads all of d_rec (512 KiB) from L2 each step (64 MiB in all, ~9 us at ~7 TB/s), and its
// copies and tiles move ~1.5 MiB through shared memory (~6 us). Run 7 (H200) timed 50.5 us a
// step (.ci/phase_clocks.py): 27.8 waiting for the chunks of d_rec (64 MiB a step from L2 across
// the card, ~2.4 TB/s), 17.4 in the products (242 cycles a k-step, before shared memory was
// addressed as such), 2.5 in the gate backward, 1.8 in grid.sync(). A ring of up to 16
// narrower buffers, more of them in flight, was slower (77 us; docs/performance.md).
// The chunk width `chunk` (elements a row) is the launcher's: 512 bytes a row (256 fp16/bf16
// elements, 128 fp32) as run 7 timed it, or wider where the plan is asked to (MMA_BWD_CHUNK_BYTES
// in backends/cupy.py: at 1 KiB, 8 round trips a step at H = 1024 instead of 16, and half the
// barriers).

// Run 7 (H200, .ci/phase_clocks.py): at LSTM fp16 512x64x1024 the chunks' copies waited 28 of a
// 50 us step, ~2.4 TB/s of L2 reads across the card, while all 128 blocks asked for the same
// chunk at the same moment. With BWD_STAGGER, block j starts at chunk j (mod the count), so
// that the blocks read different lines at any moment; a tuning constant, off until a card
// times it (.ci/phase_clocks.py --variant=-DBWD_STAGGER=1).
#ifndef BWD_STAGGER
#define BWD_STAGGER 0
#endif

template <typename T, int CELL, int ACT>
__global__ void __launch_bounds__(PERSISTENT_THREADS)
gated_bwd_persistent_mma(const T* __restrict__ dy, const T* __restrict__ w_hh,
                         const long long* __restrict__ lengths, const float* __restrict__ gates,
                         const float* __restrict__ ctape, const float* __restrict__ c0,
                         const T* __restrict__ hprev, float* __restrict__ dh,
                         float* __restrict__ dc, T* __restrict__ drec, T* __restrict__ dxw,
                         T* __restrict__ dhh, long long n_steps, long long B, long long H,
                         long long units, long long reverse, long long Bp, long long GHp,
                         long long Np, long long k_split, long long rows, long long chunk) {
    RNN_GPU_DYNAMIC_SHARED(smem_raw);
    constexpr int G = rg::CellShape<CELL>::G;
    const long long GH = G * H;
    const long long CK = chunk;                   // chunk width (elements, a multiple of 128)
    const long long Ks = GHp + MMA_SMEM_PAD, As = CK + MMA_SMEM_PAD;  // padded row strides
    T* w_s = shared_from_128<T>(smem_raw);        // 128-byte aligned
    T* a_s = w_s + Np * Ks;                       // two chunk buffers of rows x As
    float* acc_s = reinterpret_cast<float*>(a_s + 2 * rows * As);
    cg::grid_group grid = cg::this_grid();
    const BlockSlice sl = block_slice(units, H, B, rows);   // the row group's rows only
    const long long u0 = sl.u0, nu = sl.nu, b0 = sl.b0, items = sl.nb * nu;
    for (long long i = threadIdx.x; i < Np * Ks; i += blockDim.x) {   // column n: unit u0 + n
        const long long n = i / Ks, k = i - n * Ks;
        w_s[i] = n < nu && k < GH ? w_hh[k * H + u0 + n] : rg::from_f32<T>(0.0f);
    }
    for (long long i = threadIdx.x; i < k_split * rows * Np; i += blockDim.x) acc_s[i] = 0.0f;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const long long n_tiles = Np / 16, tiles = (rows / 16) * n_tiles;
    const long long span = CK / k_split;         // a multiple of 16 (the launcher's choice)
    const long long n_chunks = (GHp + CK - 1) / CK;
    const long long per_word = 16 / (long long)sizeof(T);            // elements per 16 bytes
    PhaseClocks clocks;     // phases (.ci/phase_clocks.py): 0 gate backward, 1 grid.sync,
                            // 2 chunk copies issued and waited for (with the barrier),
                            // 3 products, 4 barrier after them, 5 finish
    for (long long s = n_steps - 1; s >= 0; --s) {
        const long long t = reverse ? n_steps - 1 - s : s;
        const long long t_prev = s == 0 ? -1 : (reverse ? n_steps - s : s - 1);
        T* slot = drec + (s & 1) * Bp * GHp;
        for (long long item = threadIdx.x; item < items; item += blockDim.x) {
            const long long row = item / nu, b = b0 + row, u = u0 + (item - row * nu);
            const long long at = b * H + u;
            const rg::GatedGrad r = rg::gated_bwd_element<T, CELL, ACT>(
                dh[at], CELL == rg::LSTM ? dc[at] : 0.0f, dy, gates, ctape, c0, hprev, lengths,
                dxw, dhh, t, t_prev, b, u, B, H);
            for (int g = 0; g < G; ++g) slot[b * GHp + g * H + u] = rg::from_f32<T>(r.d_rec[g]);
            dh[at] = r.carry;
            if (CELL == rg::LSTM) dc[at] = r.dc;
        }
        clocks.mark(0);
        grid.sync();
        clocks.mark(1);
        // chunk ch of d_rec into buffer ch & 1, as one cp.async group of this thread's copies
        // (block j takes the chunks from chunk j on, wrapping, with BWD_STAGGER)
        auto chunk_start = [&](long long ch) {
            return (BWD_STAGGER ? (ch + blockIdx.x) % n_chunks : ch) * CK;
        };
        auto issue = [&](long long ch) {
            T* dst = a_s + (ch & 1) * rows * As;
            const long long k0 = chunk_start(ch);
            const T* src = slot + b0 * GHp + k0;          // the group's first row
            const long long words = (GHp - k0 < CK ? GHp - k0 : CK) / per_word;
            for (long long i = threadIdx.x; i < rows * words; i += blockDim.x) {
                const long long r = i / words, w = i - r * words;
                copy16_async(dst + r * As + w * per_word, src + r * GHp + w * per_word);
            }
            copy_commit();
        };
        issue(0);
        for (long long ch = 0; ch < n_chunks; ++ch) {
            if (ch + 1 < n_chunks) {
                issue(ch + 1);
                copy_wait<1>();
            } else {
                copy_wait<0>();
            }
            __syncthreads();
            clocks.mark(2);
            const T* a = a_s + (ch & 1) * rows * As;
            const long long k0 = chunk_start(ch), kn = GHp - k0 < CK ? GHp - k0 : CK;
            for (long long job = warp; job < tiles * k_split; job += n_warps) {   // warp-uniform
                const long long tile = job % tiles, part = job / tiles;
                const long long kb = part * span, ke = kb + span < kn ? kb + span : kn;
                if (ke <= kb) continue;
                const long long mt = tile / n_tiles, nt = tile - mt * n_tiles;
                tile_product<T>(acc_s + part * rows * Np + mt * 16 * Np + nt * 16, Np,
                                a + mt * 16 * As + kb, As, w_s + nt * 16 * Ks + k0 + kb, Ks,
                                ke - kb, lane, true);
            }
            clocks.mark(3);
            __syncthreads();                      // before chunk ch + 2 refills the buffer
            clocks.mark(4);
        }
        // Only the valid (row, unit) entries are read and zeroed: the padded ones accumulate
        // products of the zero padding of drec's rows and w_s's columns, so they stay 0 as
        // long as the backend fills both (cupy.py allocates them zeroed, never empty).
        for (long long item = threadIdx.x; item < items; item += blockDim.x) {
            const long long row = item / nu, uu = item - row * nu;
            float sum = 0.0f;
            for (long long part = 0; part < k_split; ++part) {   // read, and zero for step s-1
                float* p = acc_s + part * rows * Np + row * Np + uu;
                sum += *p;
                *p = 0.0f;
            }
            dh[(b0 + row) * H + u0 + uu] += sum;
        }
        clocks.mark(5);
    }
    clocks.flush();
}
