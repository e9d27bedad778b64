"""The cupy backend (backends/cupy.py, kernels/cuda/*.cu).

CPU-only, always run:

* nvcc compiles every ``kernels/cuda/*.cu`` for sm_80 and sm_90 with every template the
  backend asks NVRTC for instantiated: a small translation unit per source includes it and
  takes the address of each of the backend's name expressions, so the list cannot drift;
* the graph path's whole algorithm runs on the CPU: the float32 step kernels of recurrent.cu
  compiled as C++ by the host compiler (blockIdx/threadIdx emulated), the cuBLAS ``gemmEx``
  calls interpreted column-major by NumPy, buffers poisoned with NaN; forward and backward of
  every cell against the numpy backend in float64. This checks the kernel math, the kernels'
  argument order, the time indexing, the pointer offsets and the cuBLAS argument mapping;
* the persistent kernels likewise, with one host thread per CUDA thread (barriers for
  ``__syncthreads``, ``grid.sync()`` and the warp shuffles);
* the GPU oracle tests' own harness (``run_against_oracle``), through the layer code, on the
  emulated kernels: a harness bug shows here, not on a GPU;
* errors name the failing kernel or GEMM; the graph cache and capture state machine on fake
  streams (plain, capture, replay; a failed capture warns once and runs plainly); the ctypes
  cuBLAS declarations against a fake libcublas built from the C signatures;
* availability reporting and the problems the backend declines, without a GPU.

GPU (marked ``gpu``; skipped unless the backend is available): every cell, dtype, direction
and lengths, forward and backward, CuPy arrays and torch tensors, both paths, against the
float64 oracle (tests/oracles.py), each operation synchronized so that a fault names its
kernel; graph capture and replay with capture switched on (off by default); ``rnn_gpu.torch.LSTM``
training against torch.nn; the triton backend at a larger shape. Kept short (small shapes).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import rnn_gpu as rg
import rnn_gpu.backends.cupy as cb
from rnn_gpu.backend_api import Backend, Problem, Tape
from rnn_gpu.backends.numpy import NumpyBackend
from rnn_gpu.kernels.cuda import cublas as ccublas
from rnn_gpu.kernels.cuda import device as cdev
from rnn_gpu.kernels.cuda import graphs as cgraphs
from rnn_gpu.kernels.cuda import ops as cops
from rnn_gpu.kernels.cuda import sources as csources
from rnn_gpu.registry import BackendError

KERNELS = Path(cb.__file__).resolve().parent.parent / "kernels" / "cuda"
SOURCES = ("recurrent", "persistent", "persistent_mma")
ARCHS = ("sm_80", "sm_90")


@pytest.fixture
def registered():
    """The cupy backend in the registry (through its entry point, or registered here)."""
    added = "cupy" not in rg.backends.names()
    if added:
        rg.backends.register(cb.CupyBackend)
    yield rg.backends.get("cupy")
    if added:
        rg.backends.unregister("cupy")


@pytest.fixture
def force_path():
    saved = cb.FORCE_PATH
    yield
    cb.FORCE_PATH = saved


def problem(cell="lstm", acts=(), dtype="float32", device="cuda:0", T=5, B=3, H=4, **kw):
    return Problem(cell=cell, activations=acts, dtype=dtype, device=device, input_kind="cupy",
                   seq_len=T, batch=B, input_size=3, hidden_size=H, **kw)


# ---------------------------------------------------------------------- nvcc

@pytest.fixture(scope="module")
def nvcc_builds(tmp_path_factory):
    """Every (source, arch) compile, started together (each takes 5-25 s)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (the CUDA toolkit is needed to compile the kernels)")
    out = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for src in SOURCES:
        unit = out / f"{src}_check.cu"
        unit.write_text(instantiating_unit(src))
        for arch in ARCHS:
            cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-c", "-o",
                   str(out / f"{src}_{arch}.o"), str(unit)]
            procs[src, arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)
    return {key: (p.wait(timeout=600), p.stdout.read()) for key, p in procs.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES)
def test_nvcc_compiles_every_instantiation(nvcc_builds, src, arch):
    code, log = nvcc_builds[src, arch]
    assert code == 0, f"nvcc failed on {src}.cu for {arch}:\n{log}"
    assert "warning" not in log.lower(), log


# Headers seen to compile under the card's NVRTC (pip's cu13 headers, H100 run 5). Its mma.h
# includes a crt/mma.h that those headers lack, so wmma failed there while nvcc here built it.
NVRTC_SYSTEM_HEADERS = {"cuda_fp16.h", "cuda_bf16.h", "cooperative_groups.h"}


def test_kernels_include_only_headers_the_cards_nvrtc_has():
    for path in sorted(KERNELS.glob("*.cu*")):
        system = set(re.findall(r"^\s*#include\s*<([\w./]+)>", path.read_text(), re.M))
        assert system <= NVRTC_SYSTEM_HEADERS, (path.name, system - NVRTC_SYSTEM_HEADERS)


def test_mma_kernel_runs_its_half_products_on_the_tensor_cores(tmp_path):
    """The fp16 and bf16 instantiations of persistent_mma.cu emit mma.sync m16n8k16 (PTX for
    sm_80, the oldest target): a fallback to the generic CUDA-core tile would compile too. The
    step's copy of h is cp.async in four groups, each waited for before its products."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (the CUDA toolkit is needed to compile the kernels)")
    unit = tmp_path / "mma_check.cu"
    unit.write_text(instantiating_unit("persistent_mma"))
    ptx = tmp_path / "mma_check.ptx"
    done = subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-ptx", "-o", str(ptx), str(unit)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    text = ptx.read_text()
    for kind in ("f16", "bf16"):
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32" in text, kind
    assert "cp.async.cg.shared.global" in text
    source = (KERNELS / "persistent_mma.cu").read_text()
    chunks = int(re.search(r"constexpr int MMA_K_CHUNKS = (\d+);", source).group(1))
    for pending in range(chunks):
        assert f"cp.async.wait_group {pending};" in text, pending


def instantiating_unit(src: str) -> str:
    """C++ that includes ``src``.cu and instantiates every template the backend asks NVRTC
    for (taking a kernel template's address in host code instantiates it)."""
    names = [n for d in cb.DTYPES for n in csources.name_expressions(src, d)]
    body = "".join(f"    (void)&{name};\n" for name in names)
    return (f'#include "{(KERNELS / f"{src}.cu").as_posix()}"\n\n'
            f"void rnn_gpu_nvcc_check_{src}() {{\n{body}}}\n")


def test_instantiating_unit_names_every_kernel_of_the_source():
    for src in SOURCES:
        unit = instantiating_unit(src)
        kernels = set(re.findall(r"__global__\s+void(?:\s+__launch_bounds__\([^)]*\))?\s+(\w+)",
                                 (KERNELS / f"{src}.cu").read_text()))
        instantiated = set(re.findall(r"\(void\)&(\w+)<", unit))
        assert kernels and instantiated == kernels, (src, kernels ^ instantiated)


def test_kernel_source_inlines_the_shared_header():
    for src in SOURCES:
        text = csources.kernel_source(src)
        assert not re.search(r'^#include "', text, re.MULTILINE)
        assert "struct GatedStep" in text


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


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("beta", [0, 1])
def test_gemm_arguments_compute_the_row_major_product(trans_a, trans_b, beta):
    # a and b stay bound: the op holds only their addresses
    a, b, c, want, op = gemm_case(np.random.default_rng(0), 5, 3, 7, trans_a, trans_b, beta)
    emulated_gemm_ex(op.cublas_args())
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)


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
namespace cooperative_groups {
struct grid_group { void sync() { grid_barrier->arrive_and_wait(); } };
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


def build_emulation(tmp_path: Path, source: str) -> ctypes.CDLL:
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
                          "-Wno-unused-function", "-Wno-unknown-pragmas", "-o", str(lib), str(cpp)],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "warning" not in run.stderr, run.stderr
    dll = ctypes.CDLL(str(lib))
    dll.emu_launch.restype = ctypes.c_int
    dll.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_longlong,
                               ctypes.c_longlong, ctypes.POINTER(ctypes.c_void_p)]
    return dll


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    path = tmp_path_factory.mktemp("emulation")
    return {src: build_emulation(path, src) for src in SOURCES}


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

    def gemm(self, op):
        emulated_gemm_ex(op.cublas_args())

    persistent_plan = cdev.CupyDevice.persistent_plan      # the real planning code
    persistent_mma_plan = cdev.CupyDevice.persistent_mma_plan
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
    dxw, d0, grads = cb.run_backward(dev, pr, ktape, f32(dy), tuple(map(f32, dstate)))
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


LENGTHS = {"none": None, "with zeros": np.array([5, 0, 2])}


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell,acts", CELL_CASES)
def test_graph_path_on_emulated_kernels_matches_numpy(emulation, force_path, cell, acts,
                                                     reverse, lengths):
    cb.FORCE_PATH = "graph"
    dev = EmulatedDevice(emulation)
    tape = check_against_numpy(dev, cell, acts, 5, 3, 4, reverse=reverse,
                               lengths=LENGTHS[lengths], bias=not reverse)
    assert tape.path == "graph" and not any("persistent" in n for n in dev.launched)


@pytest.mark.parametrize("cell,acts", CELL_CASES[:5])
def test_graph_path_on_emulated_kernels_several_blocks(emulation, force_path, cell, acts):
    cb.FORCE_PATH = "graph"                        # B*H = 315 > 256 threads: two blocks
    check_against_numpy(EmulatedDevice(emulation), cell, acts, 3, 7, 45, reverse=True,
                        lengths=np.array([3, 1, 0, 2, 3, 3, 1]), bias=True)


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


@pytest.fixture
def fresh_workspaces(monkeypatch):
    monkeypatch.setattr(cgraphs, "workspaces", cgraphs.WorkspaceCache())


@pytest.mark.parametrize("cell,acts", CELL_CASES[:6])
def test_a_replayed_time_loop_serves_a_new_call(emulation, force_path, fresh_workspaces, cell,
                                                acts):
    """The graph path with capture on, forward (taped, then tape-free) and backward, twice with
    new inputs and new outputs: from the second loop of each kind on, the operations recorded
    the first time run instead of the call's own (what a CUDA graph replay does), and the
    results still match the float64 oracle, because those operations reach the call's arrays
    only through the rewritten call table."""
    cb.FORCE_PATH = "graph"
    dev = ReplayingDevice(emulation)
    lengths = np.array([5, 0, 2])
    check_against_numpy(dev, cell, acts, 5, 3, 4, reverse=True, lengths=lengths, bias=True)
    assert dev.replayed == 1               # the tape-free forward replays the taped one's loop
    check_against_numpy(dev, cell, acts, 5, 3, 4, reverse=True, lengths=lengths[::-1].copy(),
                        bias=True, seed=1)
    assert dev.replayed == 4 and len(dev.recorded) == 2
    assert len(cgraphs.workspaces) == 2        # one forward, one backward workspace, kept
    by_table: dict = {}
    for address, content in dev.tables:
        by_table.setdefault(address, set()).add(content)
    # new addresses in every forward (4) and backward (2) table written: no replay could
    # have been right by reusing the recorded call's arrays
    assert sorted(len(v) for v in by_table.values()) == [2, 4]


def test_without_capture_no_workspace_is_kept(emulation, force_path, fresh_workspaces):
    cb.FORCE_PATH = "graph"
    check_against_numpy(EmulatedDevice(emulation), "lstm", (), 3, 2, 4, reverse=False,
                        lengths=None, bias=True)
    assert len(cgraphs.workspaces) == 0


def test_workspaces_are_kept_per_stream_and_signature_and_bounded(fresh_workspaces,
                                                                  monkeypatch):
    monkeypatch.setattr(cgraphs, "GRAPH_CACHE_SIZE", 2)
    buffers = {"h": ((2, 3), np.float32, "h")}

    def workspace(stream_ptr, signature):
        dev = ReplayingDevice(None, stream_ptr)
        with cgraphs.workspace(dev, signature, "GatedFwdCall", buffers) as ws:
            assert ws.lock.locked() and ws.table.shape == (7,)
            return ws

    a = workspace(1, ("x",))
    assert workspace(1, ("x",)) is a
    b = workspace(2, ("x",))                       # another stream: its own buffers
    assert b is not a and b["h"].ctypes.data != a["h"].ctypes.data
    workspace(1, ("y",))                           # a third entry drops the oldest (a)
    assert len(cgraphs.workspaces) == 2 and workspace(1, ("x",)) is not a
    with pytest.raises(TypeError, match="GatedFwdCall: expected the fields"):
        a.bind(ReplayingDevice(None), xw=None)


def test_the_per_thread_default_stream_gets_a_workspace_per_thread(fresh_workspaces):
    """cudaStreamPerThread is one handle for a different stream in each thread: two threads'
    loops on it run concurrently, so they must not share a workspace (other streams, the
    legacy default one included, order their work themselves)."""
    import threading

    buffers = {"h": ((2, 3), np.float32, "h")}
    seen = {}

    def workspace(name, stream_ptr):
        with cgraphs.workspace(ReplayingDevice(None, stream_ptr), ("x",), "GatedFwdCall",
                               buffers) as ws:
            seen[name] = ws

    for name, ptr in (("ptds-1", 2), ("null-1", 0)):
        workspace(name, ptr)
    other = threading.Thread(target=lambda: [workspace(n, p) for n, p in (("ptds-2", 2),
                                                                           ("null-2", 0))])
    other.start()
    other.join()
    assert seen["ptds-1"] is not seen["ptds-2"] and seen["null-1"] is seen["null-2"]


def test_call_tables_are_the_kernels_structs():
    """The fields of each call table, in order, as recurrent.cu declares them: a field out of
    place would send a kernel to the wrong array."""
    source = (KERNELS / "recurrent.cu").read_text()
    structs = dict(re.findall(r"struct (\w+Call) \{(.*?)\};", source, flags=re.S))
    assert set(structs) == set(cgraphs.CALL_TABLES)
    for name, body in structs.items():
        fields = tuple(re.findall(r"\*\s*(\w+);", body))
        assert fields == cgraphs.CALL_TABLES[name], name


@pytest.mark.parametrize("reverse,smem", [(False, "shared"), (True, "global")])
@pytest.mark.parametrize("cell,acts", CELL_CASES)
def test_persistent_path_on_emulated_kernels_matches_numpy(emulation, force_path, cell, acts,
                                                          reverse, smem):
    """H=7 over 3 emulated SMs: blocks of 3, 3 and 1 units; the weights in shared memory or
    read from global memory. (One host thread per CUDA thread: ~2 s a case.)"""
    cb.FORCE_PATH = "persistent"
    dev = EmulatedDevice(emulation, sms=3, smem_limit=(1 << 16) if smem == "shared" else 0)
    tape = check_against_numpy(dev, cell, acts, 4, 3, 7, reverse=reverse,
                               lengths=np.array([4, 0, 2]), bias=reverse)
    assert tape.path == "persistent"
    assert sum("persistent" in n for n in dev.launched) == 2     # taped and tape-free forward


@pytest.mark.parametrize("path", cb.PATHS)
@pytest.mark.parametrize("cell,acts", CELL_CASES[:5])
def test_emulated_kernels_at_tiny_shapes(emulation, force_path, cell, acts, path):
    cb.FORCE_PATH = path
    for T, B, H in ((1, 1, 1), (2, 1, 3)):
        check_against_numpy(EmulatedDevice(emulation), cell, acts, T, B, H, reverse=True,
                            lengths=None, bias=True)


MMA_SHAPES = {"one tile each way": dict(T=4, B=3, H=7, sms=3),          # blocks of 3, 3, 1 units
              "several tiles": dict(T=3, B=18, H=20, sms=2),             # Bp 32, LSTM Np 48
              # Hp 112: float32 rows of 28 words, copied in K chunks of 8, 8, 8 and 4 words
              "four K chunks": dict(T=3, B=5, H=100, sms=4)}


@pytest.mark.parametrize("shape", list(MMA_SHAPES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell,acts", CELL_CASES[:4])
def test_persistent_mma_path_on_emulated_kernels_matches_numpy(emulation, force_path, cell,
                                                              acts, reverse, shape):
    """The tensor-core kernel's tiling, padding and synchronisation, run on the CPU: its
    float32 instantiation computes the same 16 x 16 tiles with CUDA-core arithmetic (the
    emulation has no tensor cores; the half and bfloat16 mma.sync code is checked by nvcc here and
    by the gpu tests on a card). Rows and units that fill no whole tile are padded."""
    cb.FORCE_PATH = "persistent-mma"
    sh = MMA_SHAPES[shape]
    dev = EmulatedDevice(emulation, sms=sh["sms"], smem_limit=1 << 20)
    lengths = np.array(([sh["T"], 0, 2] * sh["B"])[:sh["B"]])
    tape = check_against_numpy(dev, cell, acts, sh["T"], sh["B"], sh["H"], reverse=reverse,
                               lengths=lengths, bias=reverse)
    assert tape.path == "persistent-mma"
    assert sum("persistent_mma" in n for n in dev.launched) == 2   # taped and tape-free forward


def test_persistent_mma_path_falls_back_to_the_cuda_core_kernel(emulation, force_path):
    """A block slice that does not fit in shared memory: the plain persistent kernel runs
    (weights from global memory there), with a warning; TwoStageRNN takes it directly."""
    cb.FORCE_PATH = "persistent-mma"
    dev = EmulatedDevice(emulation, sms=3, smem_limit=0)
    with pytest.warns(RuntimeWarning, match="cannot run here.*the CUDA-core persistent kernel"):
        tape = check_against_numpy(dev, "gru", (), 3, 2, 5, reverse=False, lengths=None,
                                   bias=True)
    assert tape.path == "persistent" and not any("mma" in n for n in dev.launched)
    tape = check_against_numpy(EmulatedDevice(emulation), "twostage", ("tanh", "tanh"), 3, 2, 5,
                               reverse=False, lengths=None, bias=True)
    assert tape.path == "persistent"


def test_persistent_mma_plan_counts_padded_weights_and_products():
    """(512, 64, 1024) fp16 on 132 SMs: 128 blocks of 8 units; 32 weight rows and the 64 rows
    of the state, x 1024 + 8 halves (193.5 KiB), and 64 x 32 fp32 products (8 KiB), + 128 B
    of alignment."""
    dev = EmulatedDevice(sms=132, smem_limit=227 * 1024)
    dev.itemsize = 2
    plan = dev.persistent_mma_plan(None, 4, 1024, 64)
    assert plan == cdev.PersistentPlan(128, 8, (32 + 64) * 1032 * 2 + 64 * 32 * 4 + 128, True)
    gru = dev.persistent_mma_plan(None, 3, 1000, 5)   # 24 rows -> 32, batch 16, 1000 -> 1008
    assert gru == cdev.PersistentPlan(125, 8, (32 + 16) * 1016 * 2 + 16 * 32 * 4 + 128, True)
    assert isinstance(dev.persistent_mma_plan(None, 4, 1024, 128), str)   # 256 KiB: too much
    reason = EmulatedDevice(sms=132, smem_limit=48 * 1024).persistent_mma_plan(None, 4, 1024, 64)
    assert "shared memory per block" in reason and "allows 49152" in reason


def test_mma_shared_memory_padding_agrees_with_the_kernel():
    source = (KERNELS / "persistent_mma.cu").read_text()
    pad = re.search(r"constexpr long long MMA_SMEM_PAD = (\d+);", source)
    assert pad and int(pad.group(1)) == cdev.MMA_SMEM_PAD
    # 16-byte row copies: a padded row of 16-bit elements stays 16-byte aligned
    assert (cdev.MMA_SMEM_PAD * 2) % 16 == 0


def test_persistent_plan_splits_units_and_falls_back_to_global_memory():
    plan = EmulatedDevice(sms=132, smem_limit=227 * 1024).persistent_plan(None, 4, 1024)
    assert plan == cdev.PersistentPlan(128, 8, 4 * 8 * 1024 * 4, True)   # 128 KiB of fp32
    plan = EmulatedDevice(sms=132, smem_limit=100 * 1024).persistent_plan(None, 4, 1024)
    assert plan == cdev.PersistentPlan(128, 8, 0, False)
    plan = EmulatedDevice(sms=4, smem_limit=1 << 20).persistent_plan(None, 1, 3)
    assert plan == cdev.PersistentPlan(3, 1, 12, True)
    reason = EmulatedDevice(sms=132, occupancy=0).persistent_plan(None, 4, 1024)
    assert "cannot all be resident" in reason


def test_persistent_path_falls_back_to_the_graph_path_with_a_warning(emulation, force_path):
    cb.FORCE_PATH = "persistent"
    dev = EmulatedDevice(emulation, occupancy=0)
    with pytest.warns(RuntimeWarning, match="cannot run here.*taking the graph path"):
        tape = check_against_numpy(dev, "lstm", (), 3, 2, 5, reverse=False, lengths=None,
                                   bias=True)
    assert tape.path == "graph"


def test_graph_cache_runs_plainly_then_captures_then_replays(monkeypatch):
    monkeypatch.setattr(cgraphs, "GRAPH_CACHE_SIZE", 2)
    cache = cgraphs.GraphCache()
    assert cache.lookup("a") == cgraphs.NEW
    assert cache.lookup("a") == cgraphs.SEEN
    cache.store("a", "graph-a")
    assert cache.lookup("a") == "graph-a"
    assert cache.lookup("b") == cgraphs.NEW
    assert cache.lookup("c") == cgraphs.NEW             # evicts the least recently used, "a"
    assert cache.lookup("a") == cgraphs.NEW


@pytest.mark.parametrize("name", list(cb.VARIANTS))
def test_each_variant_forces_its_path_and_restores_the_settings(monkeypatch, name):
    """`rnn-gpu bench --backend cupy:NAME`: inside the variant the path (and, for the graph
    variants, capture) is the variant's; outside, whatever was set before."""
    monkeypatch.setattr(cb, "FORCE_PATH", None)
    monkeypatch.setattr(cb, "USE_GRAPH", False)
    backend = cb.CupyBackend()
    assert name in backend.variants()
    with backend.variant(name):
        assert cb.choose_path("lstm", 4096, 256) == name.removesuffix("-captured")
        assert cb.USE_GRAPH is (name == "graph-captured")
        described = backend.describe_run(problem(B=4096, H=256))
    assert cb.FORCE_PATH is None and cb.USE_GRAPH is False
    assert ("captured as a CUDA graph" in described) is (name == "graph-captured")
    assert ("tensor cores" in described) is (name == "persistent-mma")
    with pytest.raises(ValueError, match="variant: expected one of"), backend.variant("mma"):
        pass


def test_choose_path_heuristic_and_force(force_path):
    assert cb.choose_path("lstm", 8, 256) == "persistent"
    assert cb.choose_path("lstm", 16, 512) == "persistent"      # run 5: 5.0 against 8.8 ms
    assert cb.choose_path("lstm", 8, 1024) == "graph"           # run 5: a tie
    assert cb.choose_path("lstm", 32, 512) == "graph"           # run 5: 10.4 against 6.3 ms
    assert cb.choose_path("lstm", 4096, 256) == "graph"
    assert cb.choose_path("lstm", 16, 1024) == "graph"        # too many MACs per step
    # half precision: the tensor-core kernel where run 5 timed it fastest
    for dtype in ("float16", "bfloat16"):
        assert cb.choose_path("lstm", 8, 1024, dtype) == "persistent-mma"    # 3.6 vs 5.8 ms
        assert cb.choose_path("lstm", 16, 512, dtype) == "persistent-mma"    # 2.6 vs 4.8 ms
        assert cb.choose_path("gru", 64, 256, dtype) == "persistent-mma"
        assert cb.choose_path("lstm", 64, 1024, dtype) == "graph"            # 20.2 vs 12.2 ms
        assert cb.choose_path("lstm", 8, 256, dtype) == "persistent"         # not timed: plain
        assert cb.choose_path("twostage", 16, 512, dtype) == "persistent"    # no mma kernel
    assert cb.choose_path("lstm", 16, 512, "float32") == "persistent"       # CUDA cores there
    cb.FORCE_PATH = "graph"
    assert cb.choose_path("lstm", 1, 8) == "graph"
    cb.FORCE_PATH = "persistent"
    assert cb.choose_path("gru", 4096, 1024) == "persistent"
    cb.FORCE_PATH = "fast"
    with pytest.raises(ValueError, match="FORCE_PATH"):
        cb.choose_path("gru", 1, 1)


def test_float32_gemms_use_tf32_only_when_allowed():
    assert cdev.compute_type("float32") == ccublas.CUBLAS_COMPUTE_32F
    assert cdev.compute_type("float16") == ccublas.CUBLAS_COMPUTE_32F
    rg.allow_tf32(True)
    try:
        assert cdev.compute_type("float32") == ccublas.CUBLAS_COMPUTE_32F_FAST_TF32
        assert cdev.compute_type("bfloat16") == ccublas.CUBLAS_COMPUTE_32F
    finally:
        rg.allow_tf32(False)


def test_kernel_arguments_must_have_exact_sizes():
    with pytest.raises(TypeError, match="numpy.int64"):
        cops.Launch("k", None, 1, 1, (np.zeros(2), 3))
    with pytest.raises(TypeError, match="numpy.int64"):
        cops.Launch("k", None, 1, 1, (np.int32(3),))


def test_a_failing_operation_names_the_kernel_and_the_cause(emulation, monkeypatch):
    class Broken(EmulatedDevice):
        def launch(self, op):
            raise ValueError("cudaErrorIllegalAddress: an illegal memory access")

    dev = Broken(emulation)
    a = np.zeros(4, np.float32)
    op = cb._pointwise(dev, "cast_to_f32", n=4, args=(a, a, np.int64(4)))
    with pytest.raises(RuntimeError, match=r"kernel cast_to_f32<float> \(grid 1 x block 256\)"
                       r" failed: ValueError: cudaErrorIllegalAddress") as info:
        cops.run_ops(dev, [op])
    assert isinstance(info.value.__cause__, ValueError)
    gemm = cb._gemm(dev, 2, 3, 4, 0, 0, 0, trans_b=True)
    assert gemm.describe() == ("cuBLAS gemmEx C[2x3] (float32) = A Bᵀ (float32, k=4) + 0 C, "
                               f"compute type {ccublas.CUBLAS_COMPUTE_32F}")
    # CHECK_LAUNCHES: a synchronization after each operation, reported against it.
    monkeypatch.setattr(cops, "CHECK_LAUNCHES", True)

    class Faulting(EmulatedDevice):
        def synchronize(self):
            raise RuntimeError("cudaErrorLaunchFailure")

    with pytest.raises(RuntimeError, match=r"cast_to_f32<float>.*cudaErrorLaunchFailure"):
        cops.run_ops(Faulting(emulation), [op])


def test_graph_keys_cover_every_address_and_scalar():
    """A captured time loop is replayed only for an identical key: any other buffer, size,
    time index, GEMM operand, beta or compute type must make a different key."""
    dev = EmulatedDevice()
    a, b, c = (np.zeros(8, np.float32) for _ in range(3))

    def launch(x, y, n):
        return cb._pointwise(dev, "cast_to_f32", n=8, args=(x, y, np.int64(n))).key(dev)

    assert launch(a, b, 8) == launch(a, b, 8)
    assert len({launch(a, b, 8), launch(a, c, 8), launch(c, b, 8), launch(a, b, 7)}) == 4
    base = dict(m=2, n=3, k=4, a=a.ctypes.data, b=b.ctypes.data, c=c.ctypes.data)

    def gemm(**changes):
        kw = {**base, **changes}
        beta, tf32 = kw.pop("beta", 0), kw.pop("tf32", False)
        compute = (ccublas.CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else
                   ccublas.CUBLAS_COMPUTE_32F)
        op = cops.Gemm(kw["m"], kw["n"], kw["k"], kw["a"], False, kw["b"], True, kw["c"], 0, 0,
                       beta, compute)
        return op.key(dev)

    variants = [gemm(), gemm(m=1), gemm(k=3), gemm(a=b.ctypes.data), gemm(c=a.ctypes.data),
                gemm(beta=1), gemm(tf32=True)]
    assert gemm() == gemm() and len(set(variants)) == len(variants)


def test_graph_capture_is_on_by_default_and_the_environment_turns_it_off():
    """On since run 5 timed the replays faster than plain launches (module docstring)."""
    code = "import rnn_gpu.backends.cupy as c; print(c.USE_GRAPH)"
    unset = {k: v for k, v in os.environ.items() if k != "RNN_GPU_CUPY_GRAPH"}
    for value, want in ((None, "True"), ("", "False"), ("0", "False"), ("1", "True")):
        env = unset if value is None else {**unset, "RNN_GPU_CUPY_GRAPH": value}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        assert run.stdout.strip() == want, (value, run.stderr)


class FakeStream:
    def __init__(self, name, log, fail_end=False):
        self.name, self.log, self.fail_end, self.ptr = name, log, fail_end, id(self)

    def __enter__(self):
        self.log.append(("enter", self.name))

    def __exit__(self, *exc):
        self.log.append(("exit", self.name))

    def begin_capture(self):
        self.log.append(("begin", self.name))

    def end_capture(self):
        self.log.append(("end", self.name))
        if self.fail_end:
            raise RuntimeError("cudaErrorStreamCaptureInvalidated")
        return FakeGraph(self.log)


class FakeGraph:
    def __init__(self, log):
        self.log = log

    def launch(self, stream):
        self.log.append(("launch", stream.name))


class FakeOp:
    def __init__(self, name, log, fail_in_capture=False):
        self.name, self.log, self.fail_in_capture = name, log, fail_in_capture

    def key(self, dev):
        return ("fake", self.name)

    def describe(self):
        return f"kernel {self.name}"

    def run(self, dev):
        if dev.capturing and self.fail_in_capture:
            raise NotImplementedError("not capturable")
        self.log.append((self.name, "captured" if dev.capturing else "ran",
                         dev.op_stream.name))


class FakeBlas:
    def handle(self, index):
        return 1


class CaptureDevice(cdev.CupyDevice):
    """``CupyDevice``'s graph logic without CuPy: fake streams, graphs and operations."""

    def __init__(self, log):
        self.index, self.capturing, self.blas = 0, False, FakeBlas()
        self.stream = self.op_stream = FakeStream("caller", log)

    def _cublas_on(self, stream):
        return contextlib.nullcontext()


@pytest.fixture
def fresh_graph_state(monkeypatch):
    monkeypatch.setattr(cgraphs, "graphs", cgraphs.GraphCache())
    monkeypatch.setattr(cgraphs, "capture_off", [])


def test_graph_path_runs_plainly_then_captures_then_replays(fresh_graph_state, monkeypatch):
    log = []
    capture = FakeStream("capture", log)
    monkeypatch.setattr(cgraphs, "capture_stream", lambda index: capture)
    dev = CaptureDevice(log)
    ops = [FakeOp("gemm", log), FakeOp("step", log)]
    dev.run(ops, graph=True)
    assert log == [("gemm", "ran", "caller"), ("step", "ran", "caller")]
    log.clear()
    dev.run(ops, graph=True)
    assert log == [("enter", "capture"), ("begin", "capture"), ("gemm", "captured", "capture"),
                   ("step", "captured", "capture"), ("end", "capture"), ("exit", "capture"),
                   ("launch", "caller")]
    assert not dev.capturing and dev.op_stream is dev.stream
    log.clear()
    dev.run(ops, graph=True)
    assert log == [("launch", "caller")]
    log.clear()
    dev.run([FakeOp("other", log)], graph=True)     # another time loop: plain the first time
    assert log == [("other", "ran", "caller")]


@pytest.mark.parametrize("where", ["operation", "end_capture"])
def test_a_failed_capture_warns_once_and_runs_plainly(fresh_graph_state, monkeypatch, where):
    log = []
    capture = FakeStream("capture", log, fail_end=where == "end_capture")
    monkeypatch.setattr(cgraphs, "capture_stream", lambda index: capture)
    dev = CaptureDevice(log)
    ops = [FakeOp("gemm", log, fail_in_capture=where == "operation"), FakeOp("step", log)]
    dev.run(ops, graph=True)
    log.clear()
    expected = (r"kernel gemm failed: NotImplementedError: not capturable" if where ==
                "operation" else r"end_capture: RuntimeError: cudaErrorStreamCaptureInvalidated")
    with pytest.warns(RuntimeWarning, match=r"capturing the time loop as a CUDA graph failed "
                      rf"\(.*{expected}"):
        dev.run(ops, graph=True)
    assert ("end", "capture") in log                # the capture was ended in every case
    assert log[-2:] == [("gemm", "ran", "caller"), ("step", "ran", "caller")]
    assert cgraphs.capture_off and not dev.graphs and dev.blas is None
    log.clear()
    dev2 = CaptureDevice(log)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # no second warning, no second attempt
        dev2.run(ops, graph=True)
        dev2.run(ops, graph=True)
    assert log == [("gemm", "ran", "caller"), ("step", "ran", "caller")] * 2


FAKE_CUBLAS = r"""
// The four cublas_api.h functions the backend calls through ctypes, with their C signatures
// (enums are int), computing float32 gemmEx on host memory: checks the ctypes declarations.
#include <cstdint>
typedef void* cublasHandle_t;
typedef int cublasStatus_t;
static int handle_storage;
static int pointer_mode = -1;
extern "C" {
void* last_stream = nullptr;
cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) { *handle = &handle_storage; return 0; }
cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t h, int mode) {
    if (h != &handle_storage) return 1;
    pointer_mode = mode;
    return 0;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t h, void* stream) {
    if (h != &handle_storage) return 1;
    last_stream = stream;
    return 0;
}
cublasStatus_t cublasGemmEx(cublasHandle_t h, int transa, int transb, int m, int n, int k,
                            const void* alpha, const void* A, int Atype, int lda, const void* B,
                            int Btype, int ldb, const void* beta, void* C, int Ctype, int ldc,
                            int computeType, int algo) {
    if (h != &handle_storage || pointer_mode != 0) return 1;
    if (Atype != 0 || Btype != 0 || Ctype != 0 || computeType != 68 || algo != -1) return 7;
    const float* a = static_cast<const float*>(A);
    const float* b = static_cast<const float*>(B);
    float* c = static_cast<float*>(C);
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            double acc = 0;
            for (int p = 0; p < k; ++p) {
                const float x = transa ? a[p + (int64_t)i * lda] : a[i + (int64_t)p * lda];
                const float y = transb ? b[j + (int64_t)p * ldb] : b[p + (int64_t)j * ldb];
                acc += (double)x * y;
            }
            float& out = c[i + (int64_t)j * ldc];
            out = (float)(al * acc + (be != 0.0f ? be * out : 0.0f));
        }
    return 0;
}
}
"""


@pytest.fixture(scope="module")
def fake_cublas(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the fake libcublas")
    out = tmp_path_factory.mktemp("fake_cublas")
    src, lib = out / "fake_cublas.cpp", out / "libcublas_fake.so"
    src.write_text(FAKE_CUBLAS)
    run = subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-Wall", "-o", str(lib),
                          str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return str(lib)


@pytest.mark.parametrize("trans_a,trans_b,beta", [(False, True, 0), (True, False, 1)])
def test_ctypes_cublas_declarations_compute_the_row_major_product(fake_cublas, trans_a,
                                                                  trans_b, beta):
    raw = ccublas.RawCublas(ctypes.CDLL(fake_cublas), fake_cublas)
    rng = np.random.default_rng(1)
    a, b, c, want, op = gemm_case(rng, 3, 5, 4, trans_a, trans_b, beta)
    raw.gemm_ex(0, 0xABC0, op.cublas_args())
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)
    assert ctypes.c_void_p.in_dll(ctypes.CDLL(fake_cublas), "last_stream").value == 0xABC0
    a, b, c, _, bad = gemm_case(rng, 3, 5, 4, trans_a, trans_b, beta,
                                ab_type=ccublas.CUDA_DATA_TYPES["float16"])
    with pytest.raises(RuntimeError, match="cublasGemmEx returned CUBLAS_STATUS_INVALID_VALUE"):
        raw.gemm_ex(0, 0, bad.cublas_args())


def test_ctypes_cublas_loader_says_why_it_found_none(monkeypatch):
    monkeypatch.setattr(ccublas, "cublas_candidates",
                        lambda: iter(["/nonexistent/libcublas.so.99"]))
    reason = ccublas.load_raw_cublas()
    assert isinstance(reason, str) and "/nonexistent/libcublas.so.99" in reason


# ---------------------------------------------------------------------- availability

def test_report_says_why_cupy_is_unavailable(registered):
    reason = registered.unavailable_reason()
    if reason is None:
        pytest.skip("the cupy backend is available here")
    assert "cupy is not installed" in reason or "no CUDA device" in reason or "cuBLAS" in reason
    row = next(r for r in rg.backends.report() if r["name"] == "cupy")
    assert row == {"name": "cupy", "available": False, "reason": reason,
                   "priority": cb.PRIORITY}


def test_explicit_cupy_on_numpy_input_raises_with_the_reason(registered):
    m = rg.LSTM(3, 4, seed=0)
    x = np.zeros((2, 1, 3), np.float32)
    reason = registered.unavailable_reason() or "runs on CUDA"
    with pytest.raises(BackendError, match="cupy") as info:
        m(x, backend="cupy")
    assert reason in str(info.value)


@pytest.mark.parametrize("kwargs,expected", [
    (dict(dtype="float64"), "use the numpy backend for float64"),
    (dict(proj_size=2), "no LSTM projection"),
    (dict(device="cpu"), "runs on CUDA, but the input is on cpu"),
    (dict(cell="rnn", acts=("sigmoid",)), "no activation 'sigmoid'"),
])
def test_declined_problems_say_why(kwargs, expected):
    reasons = cb.CupyBackend().not_supported_reasons(problem(**kwargs))
    assert any(expected in r for r in reasons), reasons


@pytest.mark.parametrize("B, H, training, expected", [
    (8, 256, False, "persistent (graph path where the grid does not fit)"),
    (8, 256, True, "persistent forward (graph path where the grid does not fit), graph backward"),
    (4096, 256, False, "graph path: a cuBLAS GEMM and a fused pointwise kernel per step, "
                       "captured as a CUDA graph and replayed"),
])
def test_describe_run_names_the_path(B, H, training, expected):
    assert cb.choose_path("lstm", B, H) == ("graph" if "persistent" not in expected
                                            else "persistent")
    got = cb.CupyBackend().describe_run(problem(B=B, H=H, training=training))
    assert got == expected


def test_describe_run_names_the_tensor_core_path_it_chooses_for_half():
    assert cb.CupyBackend().describe_run(problem(dtype="bfloat16", B=16, H=512)) == (
        "persistent on tensor cores (plain persistent, then graph, where it cannot run)")


def test_describe_run_names_the_forced_tensor_core_path(force_path):
    cb.FORCE_PATH = "persistent-mma"
    assert cb.CupyBackend().describe_run(problem(training=True)) == (
        "persistent on tensor cores forward (plain persistent, then graph, where it cannot "
        "run), graph backward")
    twostage = problem(cell="twostage", acts=("tanh", "tanh"))
    assert cb.CupyBackend().describe_run(twostage) == (
        "persistent (graph path where the grid does not fit)")


def test_supported_problem_has_no_reasons():
    for cell, acts in CELL_CASES:
        for dtype in ("float32", "float16"):
            assert cb.CupyBackend().not_supported_reasons(problem(cell, acts, dtype)) == []


@pytest.mark.parametrize("capability, declined", [("75", True), ("80", False), ("90", False)])
def test_bfloat16_needs_compute_capability_8(monkeypatch, capability, declined):
    """As on a card of that generation (a T4 is 7.5): the decline names the fix. CuPy 14 as
    a stand-in module, so that this runs without CuPy (and without ml_dtypes, whose own reason
    is then listed too)."""
    def device(index):
        assert index == 0
        return types.SimpleNamespace(compute_capability=capability)

    fake = types.SimpleNamespace(__version__="14.2.0",
                                 cuda=types.SimpleNamespace(Device=device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    reasons = cb.CupyBackend().not_supported_reasons(problem(dtype="bfloat16"))
    wanted = "bfloat16 needs compute capability 8.0, cuda:0 has 7.5 (use float16 or float32)"
    assert (wanted in reasons) == declined, reasons
    assert not [r for r in reasons if r != wanted and "ml_dtypes" not in r], reasons


# ---------------------------------------------------------------------- GPU

def _gpu_reason() -> str | None:
    reason = cb.CupyBackend().unavailable_reason()
    if reason:
        return f"cupy backend unavailable: {reason}"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


GPU_REASON = _gpu_reason()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")

LAYERS = {"LSTM": ("LSTM", {}), "GRU": ("GRU", {}), "RNN-tanh": ("RNN", {"nonlinearity": "tanh"}),
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
    n_state = 2 if name == "LSTM" else 1
    x = _round(rng.standard_normal((T, B, I)), dtype)
    state = tuple(_round(0.5 * rng.standard_normal((D, B, H)), dtype) for _ in range(n_state))
    dy = _round(rng.standard_normal((T, B, D * H)), dtype)
    dstate = tuple(_round(rng.standard_normal((D, B, H)), dtype) for _ in range(n_state))
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
    backend_tapes = [t for per_layer in tape.tapes for t in per_layer]   # backward clears them
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

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape):
        dev = EmulatedDevice(self.libs, sms=3)
        y, final, ktape = cb.run_forward(dev, problem, xw, weights, state, lengths,
                                         reverse=reverse, keep_tape=keep_tape)
        tape = None
        if keep_tape:
            tape = Tape(self.name, problem, reverse, {"kernel_tape": ktape, "path": ktape.path})
        return y, final, tape

    def backward(self, tape, dy, dstate):
        ktape = tape.data.pop("kernel_tape")
        return cb.run_backward(EmulatedDevice(self.libs), tape.problem, ktape, dy, dstate)


@pytest.fixture
def emulated_backend(emulation, monkeypatch):
    pytest.importorskip("torch", reason="the oracle (tests/oracles.py) needs torch")
    monkeypatch.setattr(EmulatedCupyBackend, "libs", emulation)
    rg.backends.register(EmulatedCupyBackend)
    yield EmulatedCupyBackend.name
    rg.backends.unregister(EmulatedCupyBackend.name)


@pytest.mark.parametrize("path,layer", [("graph", layer) for layer in LAYERS]
                         + [("persistent", "TwoStage")])
def test_oracle_harness_on_emulated_kernels(emulated_backend, force_path, path, layer):
    """The GPU oracle tests' own harness, run on the CPU (graph path every layer, persistent
    TwoStage, ~5 s): checks the harness and the backend through the layer code."""
    cb.FORCE_PATH = path
    tapes = run_against_oracle(layer, "float32", "numpy", seed=len(layer),
                               backend=emulated_backend)
    assert [t.data for t in tapes] == [{"path": path}] * 2


@pytest.fixture
def check_launches(monkeypatch):
    """Synchronize after every operation: an asynchronous fault names its kernel."""
    monkeypatch.setattr(cops, "CHECK_LAUNCHES", True)


@pytest.fixture
def graph_capture(monkeypatch):
    """Capture on (USE_GRAPH), fresh cache and capture state."""
    monkeypatch.setattr(cb, "USE_GRAPH", True)
    monkeypatch.setattr(cgraphs, "graphs", cgraphs.GraphCache())
    monkeypatch.setattr(cgraphs, "capture_off", [])


# A capture that fails warns (the backend then runs plainly); the capture tests make that
# warning an error, so that the failure shows its reason.
capture_must_work = pytest.mark.filterwarnings("error:rnn_gpu cupy backend:RuntimeWarning")


GRAPH_CASES = ([(layer, "float32", kind) for layer in LAYERS for kind in ("cupy", "torch")]
               + [(layer, "float16", "cupy") for layer in LAYERS]
               + [(layer, "bfloat16", "torch") for layer in LAYERS])


@gpu
@needs_gpu
@pytest.mark.parametrize("layer,dtype,kind", GRAPH_CASES)
def test_gpu_graph_path_matches_oracle(registered, force_path, check_launches, layer, dtype,
                                       kind):
    reasons = registered.not_supported_reasons(problem(dtype=dtype))
    if reasons:
        pytest.skip("; ".join(reasons))
    cb.FORCE_PATH = "graph"
    tapes = run_against_oracle(layer, dtype, kind, seed=len(layer) + len(dtype))
    assert [t.data for t in tapes] == [{"path": "graph"}] * 2     # kernel tapes consumed


@gpu
@needs_gpu
@pytest.mark.parametrize("layer,dtype", [(layer, "float32") for layer in LAYERS]
                         + [("LSTM", "float16"), ("TwoStage", "float16")])
def test_gpu_persistent_path_matches_oracle(registered, force_path, check_launches, layer,
                                            dtype):
    cb.FORCE_PATH = "persistent"
    tapes = run_against_oracle(layer, dtype, "cupy", seed=7)
    assert [t.data for t in tapes] == [{"path": "persistent"}] * 2   # no graph-path fallback


@gpu
@needs_gpu
@pytest.mark.parametrize("layer,dtype", [(layer, dtype) for layer in ("LSTM", "GRU", "RNN-tanh")
                                         for dtype in ("float16", "bfloat16", "float32")])
def test_gpu_persistent_mma_path_matches_oracle(registered, force_path, check_launches, layer,
                                                dtype):
    """The tensor-core persistent kernel (mma.sync in fp16/bf16) against the float64 oracle."""
    reasons = registered.not_supported_reasons(problem(dtype=dtype))
    if reasons:
        pytest.skip("; ".join(reasons))
    cb.FORCE_PATH = "persistent-mma"
    tapes = run_against_oracle(layer, dtype, "cupy", seed=11)
    assert [t.data for t in tapes] == [{"path": "persistent-mma"}] * 2


@gpu
@needs_gpu
def test_gpu_heuristic_takes_the_persistent_path_for_a_small_batch(registered, force_path):
    cb.FORCE_PATH = None
    m = rg.LSTM(3, 8, dtype="float32", seed=1).to("cuda")
    x = _device(np.ones((4, 2, 3), np.float32), "float32", "cupy")
    _, _, tape = m.forward(x, backend="cupy")
    assert tape.tapes[0][0].data["path"] == "persistent"


@gpu
@needs_gpu
@capture_must_work
def test_gpu_graph_capture_and_replay_give_the_plain_result(registered, graph_capture):
    """The same time loop run plainly, captured, then replayed, with new data each time (the
    GEMMs through the ctypes cuBLAS, the only capture-safe one)."""
    import cupy

    rng = np.random.default_rng(3)
    with cupy.cuda.Device(0):
        dev = cdev.CupyDevice(0, np.dtype(np.float32), capture=True)
        assert dev.graphs, cgraphs.capture_off or ccublas.raw_cublas()
        a = cupy.empty((4, 3), np.float32)
        b = cupy.asarray(rng.standard_normal((3, 5)).astype(np.float32))
        c = cupy.empty((4, 5), np.float32)
        d = cupy.empty((4, 5), np.float32)
        ops = [cb._gemm(dev, 4, 5, 3, a.data.ptr, b.data.ptr, c.data.ptr),
               cb._pointwise(dev, "cast_from_f32", n=20, args=(c, d, np.int64(20)))]
        for _ in range(4):
            a_host = rng.standard_normal((4, 3)).astype(np.float32)
            a.set(a_host)
            dev.run(ops, graph=True)
            np.testing.assert_allclose(d.get(), a_host @ b.get(), rtol=1e-5, atol=1e-5)
        key = (0, tuple(op.key(dev) for op in ops))
        assert isinstance(cgraphs.graphs.lookup(key), cgraphs.Captured)


@gpu
@needs_gpu
@capture_must_work
@pytest.mark.parametrize("layer", ["LSTM", "TwoStage"])
def test_gpu_repeated_calls_replay_a_captured_graph_with_the_same_result(
        registered, force_path, graph_capture, monkeypatch, layer):
    """Forward and backward four times with capture on and NEW inputs every time (the outputs
    of earlier calls kept alive, so no address repeats): plain launches, capture, then
    replays. Each call must match the same call with capture off (CuPy's cuBLAS), so a replay
    that wrote into an earlier call's arrays, or read its inputs, would fail here."""
    cb.FORCE_PATH = "graph"
    name, opts = LAYERS[layer]
    m = getattr(rg, name)(8, 32, dtype="float32", seed=9, **opts).to("cuda")
    rng = np.random.default_rng(10)
    calls = [(_device(rng.standard_normal((12, 48, 8)).astype(np.float32), "float32", "cupy"),
              _device(rng.standard_normal((12, 48, 32)).astype(np.float32), "float32", "cupy"),
              rng.integers(1, 13, 48)) for _ in range(4)]
    kept = []

    def run_once(x, dy, lengths):
        y, _, tape = m.forward(x, lengths=lengths, backend="cupy")
        dx, _, grads = m.backward(tape, dy)
        kept.append((y, dx, grads))
        return [_host(y), _host(dx), *(_host(g) for g in grads.values())]

    captured = [run_once(*call) for call in calls]
    replays = cgraphs.graphs.replays
    monkeypatch.setattr(cb, "USE_GRAPH", False)
    plain = [run_once(*call) for call in calls]
    for got, want in zip(captured, plain):      # another cuBLAS handle: rounding may differ
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert not cgraphs.capture_off, cgraphs.capture_off
    assert any(isinstance(v, cgraphs.Captured) for v in cgraphs.graphs._entries.values())
    assert replays >= 4, replays       # forward and backward of the third and fourth calls


@gpu
@needs_gpu
def test_gpu_runs_on_the_callers_stream(registered, monkeypatch):
    import cupy

    m = rg.GRU(3, 16, dtype="float32", seed=2).to("cuda")
    x_host = np.random.default_rng(4).standard_normal((5, 64, 3)).astype(np.float32)
    monkeypatch.setattr(cgraphs, "graphs", cgraphs.GraphCache())
    want, _ = m(_device(x_host, "float32", "cupy"), backend="cupy")
    assert cgraphs.graphs._entries      # capture on by default: the first call's loop is noted
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.asarray(x_host)
        y, _ = m(x, backend="cupy")
        assert cupy.cuda.get_current_stream().ptr == stream.ptr
    stream.synchronize()
    np.testing.assert_allclose(_host(y), _host(want), rtol=1e-6, atol=1e-6)


@gpu
@needs_gpu
def test_gpu_out_of_memory_names_the_buffer(registered):
    import cupy

    with cupy.cuda.Device(0):
        dev = cdev.CupyDevice(0, np.dtype(np.float32))
        with pytest.raises(MemoryError, match=r"the test buffer.*MiB"):
            dev.empty((1 << 45,), np.float32, "the test buffer")


@gpu
@needs_gpu
def test_gpu_compile_failure_names_the_kernels_and_shows_nvrtc_log(registered, monkeypatch):
    import cupy

    monkeypatch.setattr(csources, "kernel_source", lambda module: "this is not C++;\n")
    with cupy.cuda.Device(0), pytest.raises(RuntimeError, match=r"recurrent\.cu.*cast_to_f32"):
        csources.compile_module("recurrent", "float32")


@gpu
@needs_gpu
def test_gpu_torch_lstm_trains_like_torch_nn(registered, monkeypatch):
    import torch

    import rnn_gpu.torch as rt

    torch.manual_seed(0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ours = rt.LSTM(5, 12, num_layers=2, bidirectional=True, backend="cupy").cuda()
    ref = torch.nn.LSTM(5, 12, num_layers=2, bidirectional=True).cuda()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(7, 9, 5, device="cuda")
    for model in (ours, ref):
        y, (h, c) = model(x)
        (y.square().sum() + h.sum() + 0.5 * c.sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        err = (p.grad - q.grad).abs().max().item() / max(1.0, q.grad.abs().max().item())
        assert err < 1e-4, name


@gpu
@needs_gpu
def test_gpu_matches_triton_at_a_larger_shape(registered):
    triton = rg.backends.get("triton") if "triton" in rg.backends.names() else None
    if triton is None or triton.unavailable_reason() is not None:
        pytest.skip("the triton backend is not available")
    m = rg.LSTM(64, 128, dtype="float16", seed=5).to("cuda")
    x = _device(np.random.default_rng(6).standard_normal((32, 256, 64)).astype(np.float32),
                "float16", "torch")
    y_cupy, (h_cupy, c_cupy) = m(x, backend="cupy")
    y_triton, (h_triton, c_triton) = m(x, backend="triton")
    check_errors({"y": _host(y_cupy), "h": _host(h_cupy), "c": _host(c_cupy)},
                 {"y": _host(y_triton), "h": _host(h_triton), "c": _host(c_triton)}, "float16")
