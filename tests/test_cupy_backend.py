"""The cupy backend (backends/cupy.py, kernels/cuda/*.py) on the CPU, without a GPU and
without running its kernels:

* the path choice: ``choose_path``'s heuristic and ``FORCE_PATH``, the bench variants, the
  persistent kernels' launch plans;
* the graph cache and capture state machine on fake streams (plain, capture, replay; a failed
  capture warns once and runs plainly), the graph keys, capture on by default; the workspaces
  kept per stream and signature;
* the ctypes cuBLAS declarations against a fake libcublas built from the C signatures; the
  compute type (tf32 where allowed); the kernel arguments' sizes;
* availability reporting and the problems the backend declines.

The other cupy tests: test_cupy_compile.py (the CUDA sources, nvcc), test_cupy_emulated.py
(the kernels run on the CPU against the numpy backend), test_cupy_gpu.py (on a GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
from cupy_emulation import CELL_CASES, EmulatedDevice, ReplayingDevice, gemm_case, problem

import rnn_gpu as rg
import rnn_gpu.backends.cupy as cb
from rnn_gpu.kernels.cuda import blocks as cblocks
from rnn_gpu.kernels.cuda import cublas as ccublas
from rnn_gpu.kernels.cuda import device as cdev
from rnn_gpu.kernels.cuda import graphs as cgraphs
from rnn_gpu.kernels.cuda import ops as cops
from rnn_gpu.registry import BackendError


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


def test_persistent_mma_plan_counts_padded_weights_and_products():
    """(512, 64, 1024) fp16 on 132 SMs: 128 blocks of 8 units; 32 weight rows and the 64 rows
    of the state, x 1024 + 8 halves (193.5 KiB), and 64 x 32 fp32 products (8 KiB), + 128 B
    of alignment."""
    dev = EmulatedDevice(sms=132, smem_limit=227 * 1024)
    dev.itemsize = 2
    plan = dev.persistent_mma_plan(None, 4, 1024, 64)
    assert plan == cdev.PersistentPlan(128, 8, (32 + 64) * 1032 * 2 + 64 * 32 * 4 + 128, True,
                                       rows=64, row_groups=1)
    gru = dev.persistent_mma_plan(None, 3, 1000, 5)   # 24 rows -> 32, batch 16, 1000 -> 1008
    assert gru == cdev.PersistentPlan(125, 8, (32 + 16) * 1016 * 2 + 16 * 32 * 4 + 128, True,
                                      rows=16)
    assert isinstance(dev.persistent_mma_plan(None, 4, 1024, 128), str)   # 256 KiB: too much
    reason = EmulatedDevice(sms=132, smem_limit=48 * 1024).persistent_mma_plan(None, 4, 1024, 64)
    assert "shared memory per block" in reason and "allows 49152" in reason


def test_persistent_mma_bwd_plan_counts_padded_columns_chunks_and_partials():
    """The backward at (512, 64, 1024) fp16 on 132 SMs: 128 blocks of 8 units, their columns
    of W_hh padded to 16 (x 4096 + 8 halves: 128.3 KiB), two chunk buffers of 64 rows x
    (256 + 8) halves (66 KiB), and 4 tiles shared by 2 warps each: 2 partials of 64 x 16
    fp32 (8 KiB), + 128 B of alignment."""
    dev = EmulatedDevice(sms=132, smem_limit=227 * 1024)
    dev.itemsize = 2
    assert cdev.bwd_k_split(64, 16, 2) == 2
    plan = dev.persistent_mma_bwd_plan(None, 4, 1024, 64)
    assert plan == cdev.PersistentPlan(
        128, 8, 16 * 4104 * 2 + 2 * 64 * 264 * 2 + 2 * 64 * 16 * 4 + 128, True, rows=64,
        chunk=256, k_split=2)
    # batch 16, one tile: 8 warps share it, each a 32-wide slice of a 256-wide chunk
    assert cdev.bwd_k_split(16, 16, 2) == 8 and cdev.bwd_k_split(16, 16, 4) == 8
    assert cdev.bwd_k_split(128, 32, 2) == 1                   # 16 tiles: one warp each
    reason = dev.persistent_mma_bwd_plan(None, 4, 2048, 64)   # 16 units x 8192: 256 KiB
    assert "shared memory per block" in reason and "columns of W_hh" in reason


def test_row_split_rounds_groups_to_whole_tiles():
    assert cdev.row_split(64, 1) == (64, 1) and cdev.row_split(64, 2) == (32, 2)
    assert cdev.row_split(5, 2) == (16, 1)          # one tile holds the whole batch
    assert cdev.row_split(40, 4) == (16, 3)         # 10 rows a group -> 16: three groups
    assert cdev.row_split(33, 2) == (32, 2)         # the second group: 1 row and padding


def test_tensor_core_plans_with_row_groups():
    """Two row groups at (512, 64, 1024) fp16 on 132 SMs: 2 x 64 blocks of 16 units, each with
    32 rows. Forward: 64 weight rows and 32 rows of the state x 1032 halves (193.5 KiB, as with
    one group) and 32 x 64 fp32 products. Backward: 16 units' columns (no padding now), two
    chunk buffers of 32 rows, 2 tiles shared by 4 warps each. Four groups would need 128
    weight rows a block (290 KiB): two are planned instead. On 3 SMs four groups cannot have a
    block each: two are planned, one block each."""
    dev = EmulatedDevice(sms=132, smem_limit=227 * 1024)
    dev.itemsize = 2
    forward = cdev.PersistentPlan(128, 16, (64 + 32) * 1032 * 2 + 32 * 64 * 4 + 128, True,
                                  rows=32, row_groups=2)
    assert dev.persistent_mma_plan(None, 4, 1024, 64, row_groups=2) == forward
    assert dev.persistent_mma_plan(None, 4, 1024, 64, row_groups=4) == forward
    assert cdev.bwd_k_split(32, 16, 2) == 4
    backward = dev.persistent_mma_bwd_plan(None, 4, 1024, 64, row_groups=2)
    assert backward == cdev.PersistentPlan(
        128, 16, 16 * 4104 * 2 + 2 * 32 * 264 * 2 + 4 * 32 * 16 * 4 + 128, True, rows=32,
        row_groups=2, chunk=256, k_split=4)
    small = EmulatedDevice(sms=3, smem_limit=1 << 20).persistent_mma_plan(None, 1, 7, 64,
                                                                          row_groups=4)
    assert (small.row_groups, small.rows, small.units, small.blocks) == (2, 32, 7, 2)
    one = dev.persistent_mma_plan(None, 4, 1024, 5, row_groups=2)     # 5 rows: one tile
    assert (one.row_groups, one.rows, one.blocks) == (1, 16, 128)
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="row_groups: expected a positive int"):
            dev.persistent_mma_plan(None, 4, 1024, 64, row_groups=bad)


def test_forward_plan_with_warp_tiles():
    """Warp tiles (32 x 32 a warp) at (512, 64, 1024) fp16 on 132 SMs: 64 rows x 32 weight rows
    are 2 warp tiles, 4 warps each, so 4 fp32 partials of 64 x 32 (32 KiB): 225.6 KiB in all,
    under the 227 KiB limit; two row groups likewise (32 rows x 64 weight rows). On 100 KiB
    the partials do not fit, and the per-tile loop (warp_split 0) is planned."""
    assert cdev.fwd_warp_split(64, 32) == 4 and cdev.fwd_warp_split(32, 64) == 4
    assert cdev.fwd_warp_split(16, 16) == 8            # one warp tile, 2 x 2 of it padding
    assert cdev.fwd_warp_split(64, 128) == 1           # 2 x 4 warp tiles: one warp each
    assert cdev.fwd_warp_split(64, 160) == 0           # 2 x 5 warp tiles outnumber the warps
    dev = EmulatedDevice(sms=132, smem_limit=227 * 1024)
    dev.itemsize = 2
    plan = dev.persistent_mma_plan(None, 4, 1024, 64, warp_tiles=True)
    assert plan == cdev.PersistentPlan(128, 8, (32 + 64) * 1032 * 2 + 4 * 64 * 32 * 4 + 128,
                                       True, rows=64, row_groups=1, warp_split=4)
    assert plan.shared_mem <= 227 * 1024
    grouped = dev.persistent_mma_plan(None, 4, 1024, 64, row_groups=2, warp_tiles=True)
    assert (grouped.row_groups, grouped.units, grouped.warp_split) == (2, 16, 4)
    assert dev.persistent_mma_plan(None, 4, 1024, 64).warp_split == 0
    small = EmulatedDevice(sms=132, smem_limit=100 * 1024)
    small.itemsize = 2           # RNN at batch 32: 1 warp tile, 8 partials of 32 x 16 (16 KiB)
    plan = small.persistent_mma_plan(None, 1, 1024, 32, warp_tiles=True)
    assert plan.warp_split == 0 and plan.shared_mem == (16 + 32) * 1032 * 2 + 32 * 16 * 4 + 128


@pytest.mark.parametrize("setting,value,backward", [
    ("MMA_ROW_GROUPS", 0, False), ("MMA_ROW_GROUPS", 2.0, True), ("MMA_WARP_TILES", 1, False),
    ("MMA_BWD_CHUNK_BYTES", 768, True), ("MMA_BWD_CHUNK_BYTES", True, True)])
def test_bad_tensor_core_settings_name_the_setting(monkeypatch, setting, value, backward):
    monkeypatch.setattr(cb, setting, value)
    base = "gated_bwd_persistent_mma" if backward else "gated_fwd_persistent_mma"
    with pytest.raises(ValueError, match=rf"rnn_gpu.backends.cupy.{setting}: expected .*, got "
                                         rf"{value!r}"):
        cb._persistent_launch(EmulatedDevice(), base, (1, 0), 4, 8, lambda plan: (), batch=4,
                              backward=backward)


def test_backward_plan_with_wider_chunks():
    """1 KiB chunks of d_rec at (512, 64, 1024) fp16 in two row groups: two buffers of 32 rows
    x (512 + 8) halves, 2 tiles shared by 4 warps: 201.4 KiB. In one group 64 rows do not fit
    (266.4 KiB), and 512-byte chunks are planned. The kernel gets the width in elements."""
    dev = EmulatedDevice(sms=132, smem_limit=227 * 1024)
    dev.itemsize = 2
    assert cdev.bwd_k_split(32, 16, 2, 1024) == 4
    wide = dev.persistent_mma_bwd_plan(None, 4, 1024, 64, row_groups=2, chunk_bytes=1024)
    assert wide == cdev.PersistentPlan(
        128, 16, 16 * 4104 * 2 + 2 * 32 * 520 * 2 + 4 * 32 * 16 * 4 + 128, True, rows=32,
        row_groups=2, chunk=512, k_split=4)
    narrow = dev.persistent_mma_bwd_plan(None, 4, 1024, 64, chunk_bytes=1024)
    assert (narrow.rows, narrow.chunk) == (64, 256)
    assert dev.persistent_mma_bwd_plan(None, 4, 1024, 64).chunk == 256
    for bad in (0, 768, 256, True, 1024.0):
        with pytest.raises(ValueError, match="chunk_bytes: expected a positive multiple of 512"):
            dev.persistent_mma_bwd_plan(None, 4, 1024, 64, chunk_bytes=bad)


def test_persistent_plan_splits_units_and_falls_back_to_global_memory():
    plan = EmulatedDevice(sms=132, smem_limit=227 * 1024).persistent_plan(None, 4, 1024)
    assert plan == cdev.PersistentPlan(128, 8, 4 * 8 * 1024 * 4, True)   # 128 KiB of fp32
    plan = EmulatedDevice(sms=132, smem_limit=100 * 1024).persistent_plan(None, 4, 1024)
    assert plan == cdev.PersistentPlan(128, 8, 0, False)
    plan = EmulatedDevice(sms=4, smem_limit=1 << 20).persistent_plan(None, 1, 3)
    assert plan == cdev.PersistentPlan(3, 1, 12, True)
    reason = EmulatedDevice(sms=132, occupancy=0).persistent_plan(None, 4, 1024)
    assert "cannot all be resident" in reason


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


# name -> forward path, backward path, capture, row groups, warp tiles, the backward's chunk
# bytes (at LSTM 4096 x 256, where the heuristic takes the graph path both ways)
MMA, GRAPH = "persistent-mma", "graph"
EXPECTED_VARIANTS = {
    "graph": (GRAPH, GRAPH, False, 1, False, 512),
    "graph-captured": (GRAPH, GRAPH, True, 1, False, 512),
    "persistent": ("persistent", GRAPH, False, 1, False, 512),
    "persistent-mma": (MMA, GRAPH, False, 1, False, 512),
    "persistent-mma-train": (MMA, MMA, False, 1, False, 512),
    "persistent-mma-rows2": (MMA, GRAPH, False, 2, False, 512),
    "persistent-mma-train-rows2": (MMA, MMA, False, 2, False, 512),
    "persistent-mma-wt": (MMA, GRAPH, False, 1, True, 512),
    "persistent-mma-train-rows2-wt": (MMA, MMA, False, 2, True, 512),
    "persistent-mma-train-rows2-wt-wide": (MMA, MMA, False, 2, True, 1024),
    "segments": (GRAPH, GRAPH, False, 1, False, 512)}    # the paths as auto; see test_segments


def test_every_variant_is_tested():
    assert set(cb.VARIANTS) == set(EXPECTED_VARIANTS)


@pytest.mark.parametrize("name", list(EXPECTED_VARIANTS))
def test_each_variant_forces_its_path_and_restores_the_settings(monkeypatch, name):
    """`rnn-gpu bench --backend cupy:NAME`: inside the variant the paths, capture and the
    tensor-core kernels' row groups and warp tiles are the variant's; outside, whatever was set
    before."""
    monkeypatch.setattr(cb, "FORCE_PATH", None)
    monkeypatch.setattr(cb, "USE_GRAPH", False)
    monkeypatch.setattr(cb, "FORCE_BACKWARD_PATH", None)
    monkeypatch.setattr(cb, "MMA_ROW_GROUPS", 1)
    monkeypatch.setattr(cb, "MMA_WARP_TILES", False)
    monkeypatch.setattr(cb, "MMA_BWD_CHUNK_BYTES", 512)
    backend = cb.CupyBackend()
    assert name in backend.variants()
    forward, backward, capture, row_groups, warp_tiles, chunk = EXPECTED_VARIANTS[name]
    with backend.variant(name):
        assert cb.choose_path("lstm", 4096, 256) == forward
        assert cb.choose_backward_path("lstm", 4096, 256) == backward
        assert cb.USE_GRAPH is capture and row_groups == cb.MMA_ROW_GROUPS
        assert cb.MMA_WARP_TILES is warp_tiles and chunk == cb.MMA_BWD_CHUNK_BYTES
        described = backend.describe_run(problem(B=4096, H=256, training=True))
    assert cb.FORCE_PATH is None and cb.USE_GRAPH is False and cb.FORCE_BACKWARD_PATH is None
    assert cb.MMA_ROW_GROUPS == 1 and cb.MMA_WARP_TILES is False
    assert cb.MMA_BWD_CHUNK_BYTES == 512 and cb.SEGMENTS is False
    assert ("captured as a CUDA graph" in described) is capture
    assert ("tensor cores" in described) is (forward == "persistent-mma")
    assert ("persistent backward" in described) is (backward == "persistent-mma")
    assert ("2 row groups" in described) is (row_groups == 2)
    assert ("warp tiles" in described) is warp_tiles
    assert ("1024-byte chunks" in described) is (chunk == 1024)
    with pytest.raises(ValueError, match="variant: expected one of"), backend.variant("mma"):
        pass


def test_backward_path_heuristic_and_force(force_path):
    # run 6 (H200): the tensor-core persistent backward up to 2**25 multiply-adds a step, in
    # half precision, inside the tensor-core forward's bounds
    for dtype in ("float16", "bfloat16"):
        assert cb.choose_backward_path("lstm", 8, 1024, dtype) == "persistent-mma"   # 10.6/12.3
        assert cb.choose_backward_path("lstm", 16, 512, dtype) == "persistent-mma"   # 6.8/11.5
        assert cb.choose_backward_path("lstm", 64, 256, dtype) == "persistent-mma"   # 7.6/12.4
        assert cb.choose_backward_path("gru", 64, 256, dtype) == "persistent-mma"
        assert cb.choose_backward_path("lstm", 64, 1024, dtype) == "graph"    # ~28 vs ~22 ms
        assert cb.choose_backward_path("lstm", 8, 256, dtype) == "graph"      # 2048 rows x units
        assert cb.choose_backward_path("lstm", 128, 256, dtype) == "graph"    # batch above 64
        assert cb.choose_backward_path("twostage", 16, 512, dtype) == "graph"
    assert cb.choose_backward_path("lstm", 16, 512, "float32") == "graph"     # no tensor cores
    cb.FORCE_BACKWARD_PATH = "graph"
    assert cb.choose_backward_path("lstm", 16, 512, "float16") == "graph"
    cb.FORCE_BACKWARD_PATH = "persistent-mma"
    assert cb.choose_backward_path("gru", 64, 1024) == "persistent-mma"
    assert cb.choose_backward_path("twostage", 64, 1024) == "graph"   # no persistent backward
    cb.FORCE_BACKWARD_PATH = "mma"
    with pytest.raises(ValueError, match="FORCE_BACKWARD_PATH: expected one of"):
        cb.choose_backward_path("lstm", 64, 1024)


def test_choose_path_heuristic_and_force(force_path):
    assert cb.choose_path("lstm", 8, 256) == "persistent"
    assert cb.choose_path("lstm", 16, 512) == "persistent"      # run 5: 5.0 against 8.8 ms
    assert cb.choose_path("lstm", 8, 1024) == "graph"           # run 5: a tie
    assert cb.choose_path("lstm", 32, 512) == "graph"           # run 5: 10.4 against 6.3 ms
    assert cb.choose_path("lstm", 4096, 256) == "graph"
    assert cb.choose_path("lstm", 16, 1024) == "graph"        # too many MACs per step
    # half precision: the tensor-core kernel where runs 5 and 6 timed it fastest
    for dtype in ("float16", "bfloat16"):
        assert cb.choose_path("lstm", 8, 1024, dtype) == "persistent-mma"    # 3.6 vs 5.8 ms
        assert cb.choose_path("lstm", 16, 512, dtype) == "persistent-mma"    # 2.6 vs 4.8 ms
        assert cb.choose_path("gru", 64, 256, dtype) == "persistent-mma"
        assert cb.choose_path("lstm", 64, 1024, dtype) == "persistent-mma"   # run 6: 9.3 vs 19.8
        assert cb.choose_path("lstm", 128, 256, dtype) == "graph"            # batch above 64
        assert cb.choose_path("lstm", 64, 2048, dtype) == "graph"            # 2**30 MACs a step
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


def test_graph_keys_cover_every_address_and_scalar():
    """A captured time loop is replayed only for an identical key: any other buffer, size,
    time index, GEMM operand, beta or compute type must make a different key."""
    dev = EmulatedDevice()
    a, b, c = (np.zeros(8, np.float32) for _ in range(3))

    def launch(x, y, n):
        return cblocks.pointwise(dev, "cast_to_f32", n=8, args=(x, y, np.int64(n))).key(dev)

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
                   "priority": cb.PRIORITY, "distribution": f"rnn-gpu {rg.__version__}"}


def test_explicit_cupy_on_numpy_input_raises_with_the_reason(registered):
    m = rg.LSTM(3, 4, seed=0)
    x = np.zeros((2, 1, 3), np.float32)
    reason = registered.unavailable_reason() or "runs on CUDA"
    with pytest.raises(BackendError, match="cupy") as info:
        m(x, backend="cupy")
    assert reason in str(info.value)


@pytest.mark.parametrize("kwargs,expected", [
    (dict(dtype="float64"), "use the numpy backend for float64"),
    (dict(device="cpu"), "runs on CUDA, but the input is on cpu"),
    (dict(cell="rnn", acts=("sigmoid",)), "no activation 'sigmoid'"),
])
def test_declined_problems_say_why(kwargs, expected):
    reasons = cb.CupyBackend().not_supported_reasons(problem(**kwargs))
    assert any(expected in r for r in reasons), reasons


@pytest.mark.parametrize("cell, acts", CELL_CASES)
def test_gemms_past_cublas_32_bit_dimensions_are_declined(cell, acts):
    """cuBLAS's gemmEx takes 32-bit ints, and ctypes (the captured path's cuBLAS) wraps a
    larger one silently: the weight gradients' GEMMs sum over T*B rows (k = T*B, and the bias
    GEMM's ones vector has ldb = T*B), so 2**32 + 5 rows would have summed over 5. Declined up
    front with the reason, decided on the Problem alone (no kernel runs)."""
    def reasons(T, B, **kw):
        return cb.CupyBackend().not_supported_reasons(problem(cell, acts, T=T, B=B, H=1,
                                                              **kw))

    limit = 2**31 - 1
    assert reasons(limit, 1, training=True) == [] == reasons(1, limit)
    (why,) = reasons(2**16, 2**15, training=True)
    assert why == ("cuBLAS takes 32-bit dimensions (at most 2147483647), and this needs 65536 "
                   "steps x batch 32768 = 2147483648 rows (the weight gradients' GEMMs sum "
                   "over all of them); split the batch or the sequence into several calls")
    assert reasons(2**16, 2**15) == []         # inference: every GEMM is one step's B rows
    (why,) = reasons(1, 2**31)
    assert "needs batch 2147483648 (the rows of every step's GEMM); split the batch" in why
    if cell == "lstm":                         # m W_hrᵀ over all T*B rows, forward too
        (why,) = reasons(2**16, 2**15, proj_size=1)
        assert "2147483648 rows (the projection m W_hrᵀ runs over all of them)" in why


def test_a_gemm_past_32_bits_is_refused_before_cublas():
    """The net under the decline: an operation whose dimension or leading dimension does not
    fit gemmEx's ints cannot be made (ctypes would have passed it wrapped)."""
    compute = ccublas.CUBLAS_COMPUTE_32F
    cops.Gemm(4, 4, 2**31 - 1, 0, True, 0, False, 0, 0, 0, 0, compute)
    with pytest.raises(ValueError, match=r"32-bit dimensions: k = 2147483648 is outside"):
        cops.Gemm(4, 4, 2**31, 0, True, 0, False, 0, 0, 0, 0, compute)    # outer_grad
    with pytest.raises(ValueError, match=r"32-bit dimensions: m = 4294967301 is outside"):
        cops.Gemm(2**32 + 5, 4, 4, 0, False, 0, True, 0, 0, 0, 0, compute)


def test_lstm_projection_is_served():
    # proj_size runs as the LSTM over m with W_hh W_hr folded (kernels/cuda/projected.py)
    assert cb.CupyBackend().not_supported_reasons(problem(proj_size=2)) == []


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
