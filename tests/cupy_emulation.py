"""What the cupy backend's tests (tests/test_cupy_*.py) share; no tests here.

* the CPU emulation of the CUDA kernels: the float32 instantiations of ``kernels/cuda/*.cu``
  compiled as C++ by the host compiler (:func:`build_emulation`): for the step kernels of
  recurrent.cu, blockIdx/threadIdx emulated; for the persistent kernels, one host thread per
  CUDA thread (barriers for ``__syncthreads``, ``grid.sync()`` and the warp shuffles, each
  cp.async copy deferred to the wait that covers it);
* the cuBLAS ``gemmEx`` calls interpreted column-major by NumPy (:func:`emulated_gemm_ex`);
* :class:`EmulatedDevice`, ``CupyDevice``'s interface over the two, buffers poisoned with NaN
  (:class:`ReplayingDevice`: capture on, with a CUDA graph replay's semantics);
* :func:`check_against_numpy`: one layer and direction through the backend's algorithms on
  such a device against the numpy backend in float64;
* the GPU oracle tests' harness, :func:`run_against_oracle` (forward and backward through the
  layer code against the float64 oracle of tests/oracles.py), run on a GPU by
  test_cupy_gpu.py and on the emulation, through :class:`EmulatedCupyBackend`, by
  test_cupy_emulated.py;
* small pieces: the kernels' folder and sources, :func:`problem`, :func:`gemm_case`,
  ``CELL_CASES``.

The fixtures several of those modules use (``registered``, ``force_path``,
``fresh_workspaces``) are in conftest.py.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

import rnn_gpu as rg
import rnn_gpu.backends.cupy as cb
from rnn_gpu.backend_api import Backend, Problem, Tape
from rnn_gpu.backends.numpy import NumpyBackend
from rnn_gpu.kernels.cuda import cublas as ccublas
from rnn_gpu.kernels.cuda import device as cdev
from rnn_gpu.kernels.cuda import ops as cops
from rnn_gpu.kernels.cuda import sources as csources

KERNELS = Path(cb.__file__).resolve().parent.parent / "kernels" / "cuda"
SOURCES = ("recurrent", "persistent", "persistent_mma")


def problem(cell="lstm", acts=(), dtype="float32", device="cuda:0", T=5, B=3, H=4, **kw):
    return Problem(cell=cell, activations=acts, dtype=dtype, device=device, input_kind="cupy",
                   seq_len=T, batch=B, input_size=3, hidden_size=H, **kw)


# ---------------------------------------------------------------------- cuBLAS mapping

def colmajor(ptr: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """A column-major float32 matrix at a raw address, as cuBLAS sees it."""
    n = ld * (cols - 1) + rows
    buf = np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr))
    return np.lib.stride_tricks.as_strided(buf, (rows, cols), (4, 4 * ld))


def emulated_gemm_ex(args: tuple) -> None:
    """cublasGemmEx's documented semantics (column-major, argument checks), float32 only."""
    ta, tb, m, n, k, alpha_p, a, a_type, lda, b, b_type, ldb, beta_p, c, c_type, ldc, compute, \
        algo = args
    assert (a_type, b_type, c_type) == (0, 0, 0)
    assert compute in (ccublas.CUBLAS_COMPUTE_32F, ccublas.CUBLAS_COMPUTE_32F_FAST_TF32)
    assert algo == ccublas.CUBLAS_GEMM_DEFAULT and min(m, n, k) >= 1
    assert lda >= (m if ta == ccublas.CUBLAS_OP_N else k)
    assert ldb >= (k if tb == ccublas.CUBLAS_OP_N else n)
    assert ldc >= m
    op_a = colmajor(a, m, k, lda) if ta == ccublas.CUBLAS_OP_N else colmajor(a, k, m, lda).T
    op_b = colmajor(b, k, n, ldb) if tb == ccublas.CUBLAS_OP_N else colmajor(b, n, k, ldb).T
    out = colmajor(c, m, n, ldc)
    alpha = ctypes.c_float.from_address(alpha_p).value
    beta = ctypes.c_float.from_address(beta_p).value
    result = alpha * (op_a.astype(np.float64) @ op_b.astype(np.float64))
    out[...] = result + beta * out if beta else result


def gemm_case(rng, m, n, k, trans_a, trans_b, beta, ab_type=0):
    """Row-major float32 ``a``, ``b`` and ``c`` (written in place by the GEMM), the product
    wanted (``op(a) @ op(b) + beta * c``) and the backend's ``_Gemm`` for it (``ab_type``: the
    cudaDataType declared for A and B, 0 = float32)."""
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    want = (a.T if trans_a else a) @ (b.T if trans_b else b) + beta * c
    op = cops.Gemm(m, n, k, a.ctypes.data, trans_a, b.ctypes.data, trans_b, c.ctypes.data,
                  ab_type, 0, beta, ccublas.CUBLAS_COMPUTE_32F)
    return a, b, c, want, op


# ---------------------------------------------------------------------- CPU emulation

EMULATION_PRELUDE = r"""
#define RNN_GPU_HOST_EMULATION 1
#include <math.h>
#include <cstddef>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
"""

STEP_EMULATION = r"""
struct Dim3 { unsigned int x = 0, y = 1, z = 1; };
static Dim3 blockIdx, threadIdx, blockDim, gridDim;
#include "{kernels}/recurrent.cu"

template <typename... P, std::size_t... I>
static void call(void (*f)(P...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}
// The step kernels have no barriers: running the threads one after another is exact.
template <typename... P>
static void emulate(void (*f)(P...), long long grid, long long block, long long /*smem*/,
                    void** args) {
    blockDim.x = (unsigned)block;
    gridDim.x = (unsigned)grid;
    for (long long b = 0; b < grid; ++b)
        for (long long t = 0; t < block; ++t) {
            blockIdx.x = (unsigned)b;
            threadIdx.x = (unsigned)t;
            call(f, args, std::index_sequence_for<P...>{});
        }
}
"""

PERSISTENT_EMULATION = r"""
#include <barrier>
#include <chrono>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>
struct Dim3 { unsigned int x = 0, y = 1, z = 1; };
static thread_local Dim3 blockIdx, threadIdx;
static Dim3 blockDim, gridDim;
// One host thread per CUDA thread: __syncthreads, grid.sync and each warp's shuffles are
// barriers over the block, the grid and the warp.
static std::vector<std::barrier<>*> block_barriers, warp_barriers;
static std::barrier<>* grid_barrier;
static std::vector<float> shuffle_slots;
static std::vector<std::vector<unsigned char>> shared_buffers;
static thread_local unsigned char* this_shared;
#define __syncthreads() block_barriers[blockIdx.x]->arrive_and_wait()
#define RNN_GPU_DYNAMIC_SHARED(name) unsigned char* name = this_shared
#define __launch_bounds__(n)
static float __shfl_xor_sync(unsigned, float v, int offset) {
    const size_t warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const size_t lane = threadIdx.x % 32;
    std::barrier<>* wb = warp_barriers[warp];
    shuffle_slots[warp * 32 + lane] = v;
    wb->arrive_and_wait();
    const float other = shuffle_slots[warp * 32 + (lane ^ offset)];
    wb->arrive_and_wait();
    return other;
}
// cp.async: each copy is deferred to the wait that covers its group (the latest moment the
// hardware may perform it), so a product that reads a chunk before waiting for it reads the
// previous step's values there and the result is wrong.
struct PendingCopy { void* dst; const void* src; };
static thread_local std::vector<PendingCopy> open_copies;
static thread_local std::deque<std::vector<PendingCopy>> copy_groups;
static void copy16_async(void* dst, const void* src) { open_copies.push_back({dst, src}); }
static void copy_commit() {
    copy_groups.push_back(open_copies);
    open_copies.clear();
}
template <int PENDING> static void copy_wait() {
    for (; (int)copy_groups.size() > PENDING; copy_groups.pop_front())
        for (const PendingCopy& c : copy_groups.front()) std::memcpy(c.dst, c.src, 16);
}
// A straggler: block 0 leaves every grid barrier late, so that the other blocks run ahead into
// the next step meanwhile. A kernel that overwrites what a slower block may still read (one
// d_rec slot where the persistent backward keeps two, say) then gives wrong results here
// every time instead of once in a while.
constexpr int STRAGGLER_MS = 5;
namespace cooperative_groups {
struct grid_group {
    void sync() {
        grid_barrier->arrive_and_wait();
        if (blockIdx.x == 0)
            std::this_thread::sleep_for(std::chrono::milliseconds(STRAGGLER_MS));
    }
};
inline grid_group this_grid() { return {}; }
}
#include "{kernels}/{source}.cu"

template <typename... P, std::size_t... I>
static void call(void (*f)(P...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}
template <typename... P>
static void emulate(void (*f)(P...), long long grid, long long block, long long smem,
                    void** args) {
    blockDim.x = (unsigned)block;
    gridDim.x = (unsigned)grid;
    const long long n = grid * block;
    std::barrier<> gb((std::ptrdiff_t)n);
    grid_barrier = &gb;
    std::vector<std::barrier<>*> bbs, wbs;
    for (long long b = 0; b < grid; ++b) bbs.push_back(new std::barrier<>((std::ptrdiff_t)block));
    for (long long w = 0; w < n / 32; ++w) wbs.push_back(new std::barrier<>(32));
    block_barriers = bbs;
    warp_barriers = wbs;
    shuffle_slots.assign((size_t)n, 0.0f);
    shared_buffers.assign((size_t)grid, std::vector<unsigned char>((size_t)smem + 16, 0xff));
    std::vector<std::thread> threads;
    for (long long b = 0; b < grid; ++b)
        for (long long t = 0; t < block; ++t)
            threads.emplace_back([=] {
                blockIdx.x = (unsigned)b;
                threadIdx.x = (unsigned)t;
                this_shared = shared_buffers[(size_t)b].data();
                call(f, args, std::index_sequence_for<P...>{});
            });
    for (auto& th : threads) th.join();
    for (auto* p : bbs) delete p;
    for (auto* p : wbs) delete p;
}
"""

REGISTRY = r"""
using Launcher = std::function<void(long long, long long, long long, void**)>;
#define EMU(...) {#__VA_ARGS__, [](long long g, long long b, long long s, void** a) { \
    emulate(&__VA_ARGS__, g, b, s, a); }},
static const std::map<std::string, Launcher> kernels = {
{entries}
};
extern "C" int emu_launch(const char* name, long long grid, long long block, long long smem,
                          void** args) {
    auto it = kernels.find(name);
    if (it == kernels.end()) return 1;
    it->second(grid, block, smem, args);
    return 0;
}
"""


# One warp's tile_product through persistent_mma.cu's tensor-core tile (mma_tile), on the CPU:
# the element type is "bfloat16" as the top 16 bits of a float, and mma_m16n8k16 is emulated
# from the PTX ISA's fragment layouts ("Matrix Fragments for mma.m16n8k16", written out here
# apart from the kernel's own comment): the lanes post their fragment registers, each lane
# rebuilds the 16 x 16 A and 16 x 8 B tiles from all 32 posts and computes its own four D
# elements. Two K chunks, the second accumulated, against a plain sum; small multiples of 1/8,
# so every sum is exact. Exit status 0 when every element matches.
MMA_TILE_CHECK = r"""
#include <cstdint>
#include <cstdio>
#include <random>
struct emu_bf16 { std::uint16_t bits; };
static float bf16_value(std::uint32_t bits) {
    const std::uint32_t u = bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static unsigned posted_a[32][4], posted_b[32][2];
static std::barrier<>* mma_warp;
// d += A . B for one 16 x 8 output, as mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
static void mma_m16n8k16(emu_bf16, float (&d)[4], const unsigned (&a)[4], unsigned b0,
                         unsigned b1) {
    const int lane = threadIdx.x % 32;
    for (int i = 0; i < 4; ++i) posted_a[lane][i] = a[i];
    posted_b[lane][0] = b0;
    posted_b[lane][1] = b1;
    mma_warp->arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int group = l / 4, pair = 2 * (l % 4);   // groupID, 2 * threadID_in_group
        // A: register i holds (row, col), (row, col + 1), lower half first
        const int row[4] = {group, group + 8, group, group + 8};
        const int col[4] = {pair, pair, pair + 8, pair + 8};
        for (int i = 0; i < 4; ++i) {
            A[row[i]][col[i]] = bf16_value(posted_a[l][i] & 0xffffu);
            A[row[i]][col[i] + 1] = bf16_value(posted_a[l][i] >> 16);
        }
        // B: register i holds rows (k) pair + 8 i and the next one, column groupID
        for (int i = 0; i < 2; ++i) {
            B[pair + 8 * i][group] = bf16_value(posted_b[l][i] & 0xffffu);
            B[pair + 8 * i + 1][group] = bf16_value(posted_b[l][i] >> 16);
        }
    }
    mma_warp->arrive_and_wait();            // every lane has read the posts before new ones
    const int group = lane / 4, pair = 2 * (lane % 4);
    for (int i = 0; i < 4; ++i) {           // D: (group, pair), (group, pair + 1), then row + 8
        const int r = group + 8 * (i / 2), n = pair + i % 2;
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][n];
        d[i] += acc;
    }
}
// ldmatrix.sync.aligned.m8n8.x4.shared.b16, from the PTX ISA's text: lane l posts the address
// of row l % 8 of matrix l / 8 (which must be 16-byte aligned); register i of lane l gets
// elements 2 (l % 4) and 2 (l % 4) + 1 of row l / 4 of matrix i, the lower one in the low half
static const void* posted_rows[32];
static int misaligned_rows = 0;
static void ldmatrix_x4(unsigned (&r)[4], const emu_bf16* row) {
    const int lane = threadIdx.x % 32;
    posted_rows[lane] = row;
    if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) ++misaligned_rows;
    mma_warp->arrive_and_wait();
    for (int i = 0; i < 4; ++i) {
        const emu_bf16* src = static_cast<const emu_bf16*>(posted_rows[8 * i + lane / 4]);
        const int e = 2 * (lane % 4);
        r[i] = static_cast<unsigned>(src[e].bits) | static_cast<unsigned>(src[e + 1].bits) << 16;
    }
    mma_warp->arrive_and_wait();            // every lane has read the posts before new ones
}
template <>
void tile_product<emu_bf16>(float* c, long long ldc, const emu_bf16* a, long long lda,
                            const emu_bf16* b, long long ldb, long long K, int lane,
                            bool accumulate) {
    mma_tile(c, ldc, a, lda, b, ldb, K, lane, accumulate);
}
template <>
void warp_tile_add<emu_bf16>(float (&d)[2][2][2][4], const emu_bf16* a, long long lda,
                             const emu_bf16* b, long long ldb, long long K, int lane,
                             int m_valid, int n_valid) {
    mma_warp_tile(d, a, lda, b, ldb, K, lane, m_valid, n_valid);
}
// The forward's warp tile (warp_tile_add, then warp_tile_store) over 32 rows of a and 32
// columns of b, K in two slices accumulated in registers, with m_valid x n_valid of its 2 x 2
// tiles: the stored elements against plain sums, every other element of c untouched.
template <typename Draw>
static int warp_tile_wrong(Draw draw, int m_valid, int n_valid) {
    constexpr int K = 64, LD = K + 8, LDC = 40;
    std::vector<emu_bf16> a(32 * LD), b(32 * LD);
    for (auto& x : a) x = draw();
    for (auto& x : b) x = draw();
    std::vector<float> c(32 * LDC, -1.0f);
    std::vector<std::thread> lanes;
    for (int l = 0; l < 32; ++l)
        lanes.emplace_back([&, l] {
            threadIdx.x = (unsigned)l;
            float d[2][2][2][4] = {};
            warp_tile_add<emu_bf16>(d, a.data(), LD, b.data(), LD, 48, l, m_valid, n_valid);
            warp_tile_add<emu_bf16>(d, a.data() + 48, LD, b.data() + 48, LD, 16, l, m_valid,
                                    n_valid);
            warp_tile_store(c.data(), LDC, d, l, m_valid, n_valid);
        });
    for (auto& t : lanes) t.join();
    int wrong = 0;
    for (int r = 0; r < 32; ++r)
        for (int n = 0; n < LDC; ++n) {
            float want = -1.0f;
            if (r < 16 * m_valid && n < 16 * n_valid) {
                want = 0.0f;
                for (int k = 0; k < K; ++k)
                    want += bf16_value(a[r * LD + k].bits) * bf16_value(b[n * LD + k].bits);
            }
            if (c[r * LDC + n] != want) ++wrong;
        }
    return wrong;
}
int main() {
    constexpr int K = 64, LD = K + 8, LDC = 20;          // padded rows, as in the kernel
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> eighths(-8, 8);
    auto draw = [&] {
        const float f = eighths(rng) / 8.0f;
        std::uint32_t u;
        std::memcpy(&u, &f, 4);
        return emu_bf16{static_cast<std::uint16_t>(u >> 16)};
    };
    std::vector<emu_bf16> a(16 * LD), b(16 * LD);        // a row-major, b column-major (K x 16)
    for (auto& x : a) x = draw();
    for (auto& x : b) x = draw();
    std::vector<float> c(16 * LDC, -1.0f);
    mma_warp = new std::barrier<>(32);
    std::vector<std::thread> lanes;
    for (int l = 0; l < 32; ++l)
        lanes.emplace_back([&, l] {
            threadIdx.x = (unsigned)l;
            tile_product<emu_bf16>(c.data(), LDC, a.data(), LD, b.data(), LD, K / 2, l, false);
            tile_product<emu_bf16>(c.data(), LDC, a.data() + K / 2, LD, b.data() + K / 2, LD,
                                   K / 2, l, true);
        });
    for (auto& t : lanes) t.join();
    int wrong = 0;
    for (int r = 0; r < 16; ++r)
        for (int n = 0; n < LDC; ++n) {
            float want = -1.0f;                         // columns 16.. are not the tile's
            if (n < 16) {
                want = 0.0f;
                for (int k = 0; k < K; ++k)
                    want += bf16_value(a[r * LD + k].bits) * bf16_value(b[n * LD + k].bits);
            }
            if (c[r * LDC + n] != want) ++wrong;
        }
    std::printf("%d of %d elements wrong\n", wrong, 16 * LDC);
    if (misaligned_rows) std::printf("%d ldmatrix rows not 16-byte aligned\n", misaligned_rows);
    int warp_wrong = 0;
    for (int mv = 1; mv <= 2; ++mv)
        for (int nv = 1; nv <= 2; ++nv) warp_wrong += warp_tile_wrong(draw, mv, nv);
    std::printf("%d of %d warp-tile elements wrong\n", warp_wrong, 4 * 32 * 40);
    return wrong != 0 || misaligned_rows != 0 || warp_wrong != 0;
}
"""


def run_mma_tile_check(tmp_path: Path, defines: tuple[str, ...] = ()
                       ) -> subprocess.CompletedProcess:
    """Build and run :data:`MMA_TILE_CHECK` against kernels/cuda/persistent_mma.cu, with
    ``defines`` (-D options: the kernel's tuning constants)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the CPU emulation of the kernels")
    body = PERSISTENT_EMULATION.replace("{kernels}", str(KERNELS))
    code = EMULATION_PRELUDE + body.replace("{source}", "persistent_mma") + MMA_TILE_CHECK
    cpp, exe = tmp_path / "mma_tile_check.cpp", tmp_path / "mma_tile_check"
    cpp.write_text(code)
    built = subprocess.run([compiler, "-std=c++20", "-O1", "-pthread", "-Wall",
                            "-Wno-unused-function", "-Wno-unknown-pragmas", *defines, "-o",
                            str(exe), str(cpp)], capture_output=True, text=True)
    assert built.returncode == 0 and "warning" not in built.stderr, built.stderr
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)


def build_emulation(tmp_path: Path, source: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The emulation library of one kernel source, with ``defines`` (-D options: the kernels'
    tuning constants); built in ``tmp_path``, which must differ between defines."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the CPU emulation of the kernels")
    body = STEP_EMULATION if source == "recurrent" else PERSISTENT_EMULATION
    body = body.replace("{kernels}", str(KERNELS)).replace("{source}", source)
    entries = "\n".join(f"    EMU({n})" for n in csources.name_expressions(source, "float32"))
    code = EMULATION_PRELUDE + body + REGISTRY.replace("{entries}", entries)
    cpp, lib = tmp_path / f"emulate_{source}.cpp", tmp_path / f"emulate_{source}.so"
    cpp.write_text(code)
    run = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall",
                          "-Wno-unused-function", "-Wno-unknown-pragmas", *defines, "-o", str(lib),
                          str(cpp)], capture_output=True, text=True)
    assert run.returncode == 0 and "warning" not in run.stderr, run.stderr
    dll = ctypes.CDLL(str(lib))
    dll.emu_launch.restype = ctypes.c_int
    dll.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_longlong,
                               ctypes.c_longlong, ctypes.POINTER(ctypes.c_void_p)]
    return dll


class EmulatedDevice:
    """``_CupyDevice``'s interface on the CPU: NumPy buffers (NaN-poisoned, so that reading
    memory nobody wrote shows), the kernels through the emulation library, gemmEx through
    :func:`emulated_gemm_ex`. ``sms`` plays the multiprocessor count for persistent plans."""

    dtype, dtype_name, ctype, itemsize, index = np.float32, "float32", "float", 4, 0
    compute = ccublas.CUBLAS_COMPUTE_32F
    capturing = False
    graphs = False                                  # capture off: a fresh workspace per call
    stream = types.SimpleNamespace(ptr=0)

    def __init__(self, libs=None, sms: int = 3, smem_limit: int = 1 << 16, occupancy: int = 1):
        self.libs, self.sms, self.smem_limit, self.occupancy = libs, sms, smem_limit, occupancy
        self.launched: list[str] = []
        self.plans: list = []                             # as CupyDevice.plans
        self.launches: list = []                          # the Launch operations run

    def ptr(self, a):
        return a.ctypes.data

    def empty(self, shape, dtype, what):
        poison = np.nan if np.issubdtype(dtype, np.floating) else -1
        return np.full(shape, poison, dtype)

    def contiguous(self, a):
        return np.ascontiguousarray(a)

    def lengths(self, lengths):
        return None if lengths is None else np.ascontiguousarray(lengths, np.int64)

    def copy_raw(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)

    def any_nonzero(self, a):
        return bool(a.view(np.uint8).any())

    def upload(self, dst, host):
        assert dst.dtype == host.dtype and dst.shape == host.shape
        dst[...] = host

    def kernel(self, module, base, *template_args):
        name = csources.kernel_name(base, self.ctype, *template_args)
        assert name in csources.name_expressions(module, "float32")
        return name, module

    def launch(self, op):
        holders = []
        for a in op.args:
            if a is None:
                holders.append(ctypes.c_void_p(0))
            elif isinstance(a, np.int64):
                holders.append(ctypes.c_longlong(int(a)))
            elif isinstance(a, np.float32):
                holders.append(ctypes.c_float(float(a)))
            else:
                assert a.dtype in (np.float32, np.int64) and a.flags.c_contiguous
                holders.append(ctypes.c_void_p(a.ctypes.data))
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        assert op.cooperative == op.fn.startswith("persistent")
        assert self.libs[op.fn].emu_launch(op.name.encode(), op.grid, op.block, op.shared_mem,
                                           argv) == 0, op.name
        self.launched.append(op.name)
        self.launches.append(op)

    def gemm(self, op):
        emulated_gemm_ex(op.cublas_args())

    persistent_plan = cdev.CupyDevice.persistent_plan      # the real planning code
    persistent_mma_plan = cdev.CupyDevice.persistent_mma_plan
    persistent_mma_bwd_plan = cdev.CupyDevice.persistent_mma_bwd_plan
    _tensor_core_plan = cdev.CupyDevice._tensor_core_plan
    _tensor_core_grid = cdev.CupyDevice._tensor_core_grid
    _persistent_grid = cdev.CupyDevice._persistent_grid

    def copy_2d(self, dst, dst_pitch, src, src_pitch, width, rows):
        for r in range(rows):
            ctypes.memmove(dst + r * dst_pitch, src + r * src_pitch, width)

    def _attribute(self, name):
        return {"cudaDevAttrCooperativeLaunch": 1, "cudaDevAttrMultiProcessorCount": self.sms,
                "cudaDevAttrMaxSharedMemoryPerBlockOptin": self.smem_limit}[name]

    def _occupancy(self, fn, shared_mem):
        return self.occupancy

    def synchronize(self):
        pass

    def run(self, ops, *, graph=False, workspace=None):
        cops.run_ops(self, ops)          # the backend's own error reporting


def record_launches(monkeypatch, device_class) -> list:
    """The kernel launches (``Launch`` operations) ``device_class`` runs from now on, in order,
    until ``monkeypatch`` undoes the recording."""
    launched = []
    launch = device_class.launch

    def recording(self, op):
        launched.append(op)
        return launch(self, op)

    monkeypatch.setattr(device_class, "launch", recording)
    return launched


CELL_CASES = [("rnn", ("tanh",)), ("rnn", ("relu",)), ("lstm", ()), ("gru", ()),
              ("twostage", ("tanh", "tanh")), ("twostage", ("sigmoid", "relu")),
              ("twostage", ("relu", "sigmoid"))]


def layer_inputs(cell, T, B, H, bias, rng):
    G = 1 if cell == "twostage" else cb.GATES[cell]
    xw = rng.standard_normal((T, B, G * H))
    if cell == "twostage":
        w = {k: rng.uniform(-0.6, 0.6, (H, H)) for k in ("weight_aa", "weight_ha", "weight_hh")}
        if bias:
            w["bias_h"] = rng.uniform(-0.6, 0.6, H)
    else:
        w = {"weight_hh": rng.uniform(-0.6, 0.6, (G * H, H))}
        if bias:
            w["bias_hh"] = rng.uniform(-0.6, 0.6, G * H)
    n_state = 2 if cell == "lstm" else 1
    state = tuple(0.5 * rng.standard_normal((B, H)) for _ in range(n_state))
    dy = rng.standard_normal((T, B, H))
    dstate = tuple(rng.standard_normal((B, H)) for _ in range(n_state))
    return xw, w, state, dy, dstate


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def check_against_numpy(dev, cell, acts, T, B, H, *, reverse, lengths, bias, seed=0, tol=2e-5):
    """One layer and direction through the backend's algorithms on ``dev`` (float32) against
    the numpy backend (float64): y, final state, dxw, dstate0 and every weight gradient."""
    rng = np.random.default_rng(seed)
    xw, w, state, dy, dstate = layer_inputs(cell, T, B, H, bias, rng)
    pr = problem(cell, acts, T=T, B=B, H=H, training=True, has_lengths=lengths is not None)
    ref = NumpyBackend()
    y64, final64, tape64 = ref.forward(pr, xw, w, state, lengths, reverse=reverse,
                                       keep_tape=True)
    dxw64, d064, grads64 = ref.backward(tape64, dy, dstate)

    def f32(a):
        return np.ascontiguousarray(a, np.float32)

    w32, state32 = {k: f32(v) for k, v in w.items()}, tuple(map(f32, state))
    y, final, ktape = cb.run_forward(dev, pr, f32(xw), w32, state32, lengths, reverse=reverse,
                                     keep_tape=True)
    y_inf, final_inf, no_tape = cb.run_forward(dev, pr, f32(xw), w32, state32, lengths,
                                               reverse=reverse, keep_tape=False)
    assert no_tape is None
    dxw, d0, grads = cb.run_backward(dev, ktape, f32(dy), tuple(map(f32, dstate)))
    assert set(grads) == set(grads64)
    pairs = {"y": (y, y64), "y (no tape)": (y_inf, y64), "dxw": (dxw, dxw64)}
    for i in range(len(state)):
        pairs[f"final[{i}]"] = (final[i], final64[i])
        pairs[f"final[{i}] (no tape)"] = (final_inf[i], final64[i])
        pairs[f"dstate0[{i}]"] = (d0[i], d064[i])
    pairs.update({f"grads[{k}]": (grads[k], grads64[k]) for k in grads64})
    errors = {k: relative_error(*v) for k, v in pairs.items()}
    assert all(e < tol for e in errors.values()), errors
    return ktape


class ReplayingDevice(EmulatedDevice):
    """Capture on, with a CUDA graph's semantics: a time loop whose operation keys were seen
    before runs the operations recorded THEN (their frozen arguments and GEMM addresses), not
    the ones of the current call. Every buffer stays alive, so that no two calls share an
    address by accident; every table written is logged."""

    graphs = True

    def __init__(self, libs, stream_ptr=0):
        super().__init__(libs)
        self.stream = types.SimpleNamespace(ptr=stream_ptr)
        self.recorded: dict = {}
        self.replayed = 0
        self.kept: list = []
        self.tables: list = []

    def empty(self, shape, dtype, what):
        a = super().empty(shape, dtype, what)
        self.kept.append(a)
        return a

    def upload(self, dst, host):
        super().upload(dst, host)
        self.tables.append((dst.ctypes.data, tuple(host)))

    def run(self, ops, *, graph=False, workspace=None):
        if graph:
            key = tuple(op.key(self) for op in ops)
            if key in self.recorded:
                ops = self.recorded[key]
                self.replayed += 1
            else:
                self.recorded[key] = list(ops)
        super().run(ops)


# ---------------------------------------------------------------------- oracle harness

LAYERS = {"LSTM": ("LSTM", {}), "LSTM-proj": ("LSTM", {"proj_size": 3}), "GRU": ("GRU", {}),
          "RNN-tanh": ("RNN", {"nonlinearity": "tanh"}),
          "RNN-relu": ("RNN", {"nonlinearity": "relu"}),
          "TwoStage": ("TwoStageRNN", {"f": "tanh", "g": "sigmoid"})}
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}


def relative_rms_error(got, want) -> float:
    """``||got - want|| / ||want||`` (DESIGN §6 for fp16/bf16: a bias gradient summed over
    T*B rounded terms carries an absolute error growing like sqrt(T*B), which an element-wise
    bound would misread)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    scale = max(float(np.sqrt(np.mean(want * want))), 1e-3)
    return float(np.sqrt(np.mean((got - want) ** 2))) / scale


def check_errors(got: dict, ref: dict, dtype: str) -> None:
    """float32: max error relative to max(1, max|ref|); fp16/bf16: relative RMS, plus a loose
    max bound that still catches a wrong row or unit (those are O(1) errors)."""
    assert set(got) == set(ref)
    tol = TOLERANCE[dtype]
    errors = {k: relative_error(got[k], ref[k]) for k in ref}
    if dtype == "float32":
        assert max(errors.values()) < tol, errors
        return
    assert max(errors.values()) < 5 * tol, errors
    rms = {k: relative_rms_error(got[k], ref[k]) for k in ref}
    assert max(rms.values()) < tol, rms


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` and back to float32 (what the GPU will hold, exactly)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(
        getattr(torch, dtype)).float().numpy()


def _device(a: np.ndarray, dtype: str, kind: str):
    import torch

    t = torch.from_numpy(a).to(device="cuda", dtype=getattr(torch, dtype))
    if kind == "torch":
        return t
    import cupy

    return cupy.from_dlpack(t)


def _host(a) -> np.ndarray:
    import torch

    if not isinstance(a, torch.Tensor):
        a = torch.from_dlpack(a)
    return a.detach().float().cpu().numpy()


def _structure(state):
    return tuple(state) if isinstance(state, tuple) else (state,)


def run_against_oracle(layer: str, dtype: str, kind: str, *, seed: int, T=6, B=5, I=3, H=7,
                       bidirectional=True, backend: str = "cupy"):
    """forward + backward of ``layer`` through ``backend`` against the float64 oracle, on the
    GPU (``kind`` "cupy" or "torch"), or on the CPU with NumPy float32 arrays (``kind``
    "numpy": the emulated backend below). Returns the backend tapes of every layer and
    direction (taken before backward, which empties the layer tape's list; backward pops
    their kernel tapes)."""
    from oracles import reference

    rng = np.random.default_rng(seed)
    name, opts = LAYERS[layer]
    m = getattr(rg, name)(I, H, bidirectional=bidirectional, dtype=dtype, seed=seed, **opts)
    if kind != "numpy":
        m.to("cuda")
    D = 2 if bidirectional else 1
    P = opts.get("proj_size") or H                 # the width of h (and of y per direction)
    widths = (P, H) if name == "LSTM" else (H,)    # h, and the LSTM's c
    x = _round(rng.standard_normal((T, B, I)), dtype)
    state = tuple(_round(0.5 * rng.standard_normal((D, B, w)), dtype) for w in widths)
    dy = _round(rng.standard_normal((T, B, D * P)), dtype)
    dstate = tuple(_round(rng.standard_normal((D, B, w)), dtype) for w in widths)
    lengths = rng.integers(0, T + 1, B)
    lengths[0] = T
    lengths[1] = 0
    pack = (lambda s: s) if name == "LSTM" else (lambda s: s[0])
    want = reference(m, x, pack(state), lengths, dy, pack(dstate))

    def dev(a):
        return np.ascontiguousarray(a, dtype) if kind == "numpy" else _device(a, dtype, kind)

    host = (lambda a: np.asarray(a, np.float64)) if kind == "numpy" else _host
    y, final, tape = m.forward(dev(x), pack(tuple(map(dev, state))), lengths=lengths,
                               backend=backend)
    backend_tapes = [t for per_layer in tape.tapes for per_dir in per_layer for t in per_dir]
    dx, dstate0, grads = m.backward(tape, dev(dy), pack(tuple(map(dev, dstate))))
    got = {"y": host(y), "dx": host(dx), **{f"final[{i}]": host(s) for i, s in
                                            enumerate(_structure(final))},
           **{f"dstate0[{i}]": host(s) for i, s in enumerate(_structure(dstate0))},
           **{f"grads[{k}]": host(v) for k, v in grads.items()}}
    ref = {"y": want.y, "dx": want.dx, **{f"final[{i}]": s for i, s in enumerate(want.state)},
           **{f"dstate0[{i}]": s for i, s in enumerate(want.dstate0)},
           **{f"grads[{k}]": v for k, v in want.grads.items()}}
    check_errors(got, ref, dtype)
    return backend_tapes


class EmulatedCupyBackend(Backend):
    """The cupy backend's algorithms (run_forward / run_backward, tapes as CupyBackend's) on
    the CPU emulation, as a registered float32 NumPy backend: the layer code, both
    directions, lengths with zeros and given states, exactly as the GPU oracle tests run."""

    name, priority, array_kind = "cupy-emulated", -100, "numpy"
    libs: dict = {}
    smem_limit = 1 << 16                 # the emulated devices' shared memory a block
    # the real backend's variants (module settings of backends/cupy.py) and segment costs
    variants, variant = cb.CupyBackend.variants, cb.CupyBackend.variant
    segment_costs = cb.CupyBackend.segment_costs

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape):
        dev = EmulatedDevice(self.libs, sms=3, smem_limit=self.smem_limit)
        y, final, ktape = cb.run_forward(dev, problem, xw, weights, state, lengths,
                                         reverse=reverse, keep_tape=keep_tape)
        tape = None
        if keep_tape:
            tape = Tape(self.name, problem, reverse, {"kernel_tape": ktape, "path": ktape.path})
        return y, final, tape

    def backward(self, tape, dy, dstate):
        ktape = tape.data.pop("kernel_tape")
        return cb.run_backward(EmulatedDevice(self.libs, smem_limit=self.smem_limit),
                               ktape, dy, dstate)
