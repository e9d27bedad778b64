"""The cupy backend's algorithms on the CPU, on its CUDA kernels compiled as C++ (the
emulation of tests/cupy_emulation.py; skipped without a C++ compiler):

* the GEMMs' arguments, interpreted as cuBLAS ``gemmEx`` does (column-major), compute the
  row-major products the backend means;
* the graph path's whole algorithm: the float32 step kernels of recurrent.cu, the cuBLAS
  ``gemmEx`` calls interpreted by NumPy, buffers poisoned with NaN; forward and backward of
  every cell against the numpy backend in float64. This checks the kernel math, the kernels'
  argument order, the time indexing, the pointer offsets and the cuBLAS argument mapping;
  with capture on, a replayed time loop serves a new call through its call table;
* the persistent kernels likewise, with one host thread per CUDA thread (barriers for
  ``__syncthreads``, ``grid.sync()`` and the warp shuffles), the tensor-core kernel's tiling
  and padding through its float32 instantiation, and the fallbacks where a kernel cannot run;
* errors name the failing kernel or GEMM;
* the GPU oracle tests' own harness (``run_against_oracle``), through the layer code, on the
  emulated kernels: a harness bug shows here, not on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from cupy_emulation import (
    CELL_CASES,
    LAYERS,
    SOURCES,
    EmulatedCupyBackend,
    EmulatedDevice,
    ReplayingDevice,
    build_emulation,
    check_against_numpy,
    emulated_gemm_ex,
    gemm_case,
    problem,
    record_launches,
    run_against_oracle,
    run_mma_tile_check,
)

import rnn_gpu as rg
import rnn_gpu.backends.cupy as cb
from rnn_gpu.kernels.cuda import blocks as cblocks
from rnn_gpu.kernels.cuda import cublas as ccublas
from rnn_gpu.kernels.cuda import graphs as cgraphs
from rnn_gpu.kernels.cuda import ops as cops


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    path = tmp_path_factory.mktemp("emulation")
    return {src: build_emulation(path, src) for src in SOURCES}


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("beta", [0, 1])
def test_gemm_arguments_compute_the_row_major_product(trans_a, trans_b, beta):
    # a and b stay bound: the op holds only their addresses
    a, b, c, want, op = gemm_case(np.random.default_rng(0), 5, 3, 7, trans_a, trans_b, beta)
    emulated_gemm_ex(op.cublas_args())
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)


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
    cb.FORCE_PATH = path          # with persistent-mma, the tensor-core backward too
    cb.FORCE_BACKWARD_PATH = "persistent-mma" if path == "persistent-mma" else "graph"
    for T, B, H in ((1, 1, 1), (2, 1, 3)):
        check_against_numpy(EmulatedDevice(emulation), cell, acts, T, B, H, reverse=True,
                            lengths=None, bias=True)


@pytest.mark.parametrize("defines", [(), ("-DMMA_CHAINS=2",), ("-DMMA_CHAINS=3",),
                                     ("-DMMA_LDMATRIX=1",), ("-DMMA_LDMATRIX=1", "-DMMA_CHAINS=2")],
                         ids=["as is", "2 chains", "3 chains", "ldmatrix", "ldmatrix, 2 chains"])
def test_mma_tile_fragments_follow_the_ptx_layouts(tmp_path, defines):
    """The half/bfloat16 tile of the tensor-core kernel (mma_tile: its fragment addressing,
    the two 16 x 8 halves, padded rows, accumulating a second K chunk) on the CPU, with
    mma.sync m16n8k16 emulated from the PTX ISA's layouts (tests/cupy_emulation.py). The
    kernel tests above run its float32 instantiation, which has no fragments. Also with the
    k loop split over 2 and 3 accumulator sets (MMA_CHAINS; each chunk is 2 k-steps, so 3
    leaves a set unused), and with the fragments loaded by an emulated ldmatrix.x4
    (MMA_LDMATRIX), whose row addresses must be 16-byte aligned. Then the forward's 32 x 32
    warp tile (warp_tile_add, warp_tile_store: fragments reused across its 2 x 2 tiles, K in
    two register-accumulated slices) with 1 or 2 valid tiles each way."""
    done = run_mma_tile_check(tmp_path, defines)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("0 of 320 elements wrong"), done.stdout
    assert "\n0 of 5120 warp-tile elements wrong" in done.stdout, done.stdout


def check_shape(emulation, sh: dict, cell, acts, reverse):
    """``check_against_numpy`` at one shape of MMA_SHAPES or BWD_SHAPES (T, B, H and the
    emulated SM count), on a device with 1 MiB of shared memory a block, lengths T, 0, 2, ...
    and the bias on the reverse direction only. Returns the device and the kernel tape."""
    dev = EmulatedDevice(emulation, sms=sh["sms"], smem_limit=1 << 20)
    lengths = np.array(([sh["T"], 0, 2] * sh["B"])[:sh["B"]])
    tape = check_against_numpy(dev, cell, acts, sh["T"], sh["B"], sh["H"], reverse=reverse,
                               lengths=lengths, bias=reverse)
    return dev, tape


MMA_SHAPES = {"one tile each way": dict(T=4, B=3, H=7, sms=3),          # blocks of 3, 3, 1 units
              "several tiles": dict(T=3, B=18, H=20, sms=2),             # Bp 32, LSTM Np 48
              # Hp 112: float32 rows of 28 words, copied in K chunks of 8, 8, 8 and 4 words
              "four K chunks": dict(T=3, B=5, H=100, sms=4),
              # one block of 30 units: 1200 (row, unit) elements, 5 for some of the 256
              # threads, the first 2 with xw loaded before the products, the rest after
              "more elements than prefetched": dict(T=3, B=40, H=30, sms=1)}


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
    dev, tape = check_shape(emulation, MMA_SHAPES[shape], cell, acts, reverse)
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


BWD_SHAPES = {"one tile each way": dict(T=4, B=3, H=7, sms=3),        # blocks of 3, 3, 1 units
              # LSTM GH 80: one chunk; Bp 32, 2 x 1 tiles, so 4 warps share each
              "several row tiles": dict(T=3, B=18, H=20, sms=2),
              # GH = 4 x 100 = 400: four chunks of 128 float32 columns, the last one 16 wide
              # (fewer than the warps' slices); blocks of 25 units, Np 32
              "four chunks": dict(T=3, B=5, H=100, sms=4),
              # one block of 30 units (Np 32): 1200 elements, 5 for some of the 256 threads
              "more elements than threads": dict(T=3, B=40, H=30, sms=1),
              # H = 63 on 4 SMs: blocks of 16, 16, 16, 15 units; LSTM GH 252 padded to 256
              "odd hidden size": dict(T=2, B=3, H=63, sms=4)}


@pytest.mark.parametrize("shape", list(BWD_SHAPES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell,acts", CELL_CASES[:4])
def test_persistent_mma_backward_on_emulated_kernels_matches_numpy(emulation, force_path, cell,
                                                                  acts, reverse, shape):
    """The tensor-core persistent backward (gated_bwd_persistent_mma): the reverse-time loop
    with one grid barrier a step, the recurrent gradients double-buffered in global memory and
    streamed through shared memory in cp.async chunks, warps sharing a tile over slices of a
    chunk; its float32 instantiation on the CPU (as the forward's), against the numpy backend
    in float64: dxw, the initial state's gradients and every weight gradient."""
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "graph", "persistent-mma"
    dev, _ = check_shape(emulation, BWD_SHAPES[shape], cell, acts, reverse)
    assert dev.launched.count(f"gated_bwd_persistent_mma<float, {cb.CELL_IDS[cell]}, "
                              f"{cb.ACT_IDS[acts[0]] if acts else 0}>") == 1
    assert not any(n.startswith("gated_bwd_step") for n in dev.launched)


@pytest.mark.parametrize("shape", list(BWD_SHAPES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell,acts", CELL_CASES[:4])
def test_persistent_mma_backward_with_wide_chunks_matches_numpy(emulation, force_path, cell,
                                                                acts, reverse, shape):
    """MMA_BWD_CHUNK_BYTES = 1024: chunks of d_rec 256 float32 columns wide, so "four chunks"
    (GH 400) becomes one of 256 and one of 144, and the other shapes one chunk; the warps'
    slices of a chunk twice as wide. The launch carries the plan's width."""
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "graph", "persistent-mma"
    cb.MMA_BWD_CHUNK_BYTES = 1024
    dev, _ = check_shape(emulation, BWD_SHAPES[shape], cell, acts, reverse)
    bwd = [op for op in dev.launches if op.name.startswith("gated_bwd_persistent_mma")]
    assert len(bwd) == 1 and bwd[0].args[-1] == 256


@pytest.fixture(scope="module")
def staggered(emulation, tmp_path_factory):
    """The emulation with persistent_mma.cu built with BWD_STAGGER=1 (the others as they are)."""
    path = tmp_path_factory.mktemp("staggered")
    return {**emulation,
            "persistent_mma": build_emulation(path, "persistent_mma", ("-DBWD_STAGGER=1",))}


@pytest.mark.parametrize("reverse", [False, True])
def test_persistent_mma_backward_with_staggered_chunks_matches_numpy(staggered, force_path,
                                                                     reverse):
    """BWD_STAGGER (a tuning constant, off by default): block j multiplies the chunks of d_rec
    from chunk j on. At BWD_SHAPES' "four chunks" (LSTM H = 100 on 4 SMs) the 4 blocks start
    at the 4 different chunks (GH 400: three of 128 float32 columns and one of 16); the
    results must not change."""
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "graph", "persistent-mma"
    dev, _ = check_shape(staggered, BWD_SHAPES["four chunks"], "lstm", (), reverse)
    assert dev.launched.count("gated_bwd_persistent_mma<float, 1, 0>") == 1


# MMA_ROW_GROUPS asked for, and the plan's (rows a group, groups, blocks a group)
ROW_GROUP_SHAPES = {
    # 2 x 2 blocks of 10 units; the second group's rows are 16-19 and 12 rows of padding
    "two groups": (dict(T=3, B=20, H=20, sms=4), 2, (16, 2, 2)),
    # four groups asked of batch 40: 3 groups of 16 rows (the last: 8 rows and padding), each
    # with 2 blocks of 5 and 4 units; LSTM GH 36 -> 48
    "three groups": (dict(T=3, B=40, H=9, sms=6), 4, (16, 3, 2)),
    # 3 SMs: one block of 7 units a group; the second group has 1 row and 31 of padding
    "a block a group": (dict(T=2, B=33, H=7, sms=3), 2, (32, 2, 1)),
}


@pytest.mark.parametrize("shape", list(ROW_GROUP_SHAPES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell,acts", CELL_CASES[:4])
def test_persistent_mma_row_groups_on_emulated_kernels_match_numpy(emulation, force_path, cell,
                                                                   acts, reverse, shape):
    """The tensor-core forward and backward with the batch's rows split into row groups
    (MMA_ROW_GROUPS; BlockSlice in persistent_mma.cu): each group of blocks copies, multiplies
    and finishes only its own rows of h and of d_rec; rows past the batch in the last group are
    padding. Against the numpy backend in float64, as the one-group tests above; the grids
    and rows launched are the plan's."""
    sh, asked, (rows, groups, per_group) = ROW_GROUP_SHAPES[shape]
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "persistent-mma", "persistent-mma"
    cb.MMA_ROW_GROUPS = asked
    dev, tape = check_shape(emulation, sh, cell, acts, reverse)
    assert tape.path == "persistent-mma"
    mma = [op for op in dev.launches if "persistent_mma" in op.name]
    assert len(mma) == 3                        # taped and tape-free forward, backward

    # the rows a group come last but one (then the forward's warp split, the backward's chunk)
    assert all(op.grid == groups * per_group and op.args[-2] == rows for op in mma), \
        [(op.name, op.grid, op.args[-2]) for op in mma]


def test_describe_run_names_the_plans_that_ran_not_the_settings_asked(emulation, force_path):
    """The bench's config column: four row groups asked of batch 40 ran as three, the forward's
    warp tiles and 1 KiB backward chunks as planned; a variant that fell back is named as what
    ran, with the path it asked for."""
    sh, asked, (rows, groups, per_group) = ROW_GROUP_SHAPES["three groups"]
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "persistent-mma", "persistent-mma"
    cb.MMA_ROW_GROUPS, cb.MMA_WARP_TILES, cb.MMA_BWD_CHUNK_BYTES = asked, True, 1024
    training = problem("lstm", T=sh["T"], B=sh["B"], H=sh["H"], training=True)
    assert "in 4 row groups" in cb.CupyBackend().describe_run(training)     # nothing ran yet
    dev, _ = check_shape(emulation, sh, "lstm", (), False)
    blocks = f"{groups * per_group} blocks of 5 units, {groups} row groups of {rows} rows"
    split = next(op.args[-1] for op in dev.launches if "fwd_persistent_mma" in op.name)
    assert cb.CupyBackend().describe_run(training) == (
        f"forward persistent on tensor cores ({blocks}, 32 x 32 warp tiles of {split} warps); "
        f"backward persistent on tensor cores ({blocks}, 1024-byte chunks)")
    cb.MMA_ROW_GROUPS = 2            # other settings: their own record, none yet
    assert "in 2 row groups" in cb.CupyBackend().describe_run(training)

    cb.FORCE_PATH, cb.MMA_ROW_GROUPS = "persistent", 1
    dev = EmulatedDevice(emulation, occupancy=0)
    with pytest.warns(RuntimeWarning, match="taking the graph path"):
        check_against_numpy(dev, "lstm", (), 3, 2, 5, reverse=False, lengths=None, bias=True)
    assert cb.CupyBackend().describe_run(problem("lstm", T=3, B=2, H=5, training=True)) == (
        "forward graph path (persistent could not run here); "
        "backward graph path (persistent on tensor cores could not run here)")
    assert cb.CupyBackend().describe_run(problem("lstm", T=3, B=2, H=5)) == (
        "graph path (persistent could not run here)")


def test_persistent_mma_backward_falls_back_to_the_graph_path_with_a_warning(emulation,
                                                                           force_path):
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "graph", "persistent-mma"
    dev = EmulatedDevice(emulation, sms=3, smem_limit=1 << 12)
    with pytest.warns(RuntimeWarning, match=r"gated_bwd_persistent_mma.*cannot run here.*"
                                            r"shared memory.*taking the graph path"):
        check_against_numpy(dev, "lstm", (), 3, 2, 5, reverse=False, lengths=None, bias=True)
    assert any(n.startswith("gated_bwd_step") for n in dev.launched)


def test_persistent_path_falls_back_to_the_graph_path_with_a_warning(emulation, force_path):
    cb.FORCE_PATH = "persistent"
    dev = EmulatedDevice(emulation, occupancy=0)
    with pytest.warns(RuntimeWarning, match="cannot run here.*taking the graph path"):
        tape = check_against_numpy(dev, "lstm", (), 3, 2, 5, reverse=False, lengths=None,
                                   bias=True)
    assert tape.path == "graph"


def test_a_failing_operation_names_the_kernel_and_the_cause(emulation, monkeypatch):
    class Broken(EmulatedDevice):
        def launch(self, op):
            raise ValueError("cudaErrorIllegalAddress: an illegal memory access")

    dev = Broken(emulation)
    a = np.zeros(4, np.float32)
    op = cblocks.pointwise(dev, "cast_to_f32", n=4, args=(a, a, np.int64(4)))
    with pytest.raises(RuntimeError, match=r"kernel cast_to_f32<float> \(grid 1 x block 256\)"
                       r" failed: ValueError: cudaErrorIllegalAddress") as info:
        cops.run_ops(dev, [op])
    assert isinstance(info.value.__cause__, ValueError)
    gemm = cblocks.gemm(dev, 2, 3, 4, 0, 0, 0, trans_b=True)
    assert gemm.describe() == ("cuBLAS gemmEx C[2x3] (float32) = A Bᵀ (float32, k=4) + 0 C, "
                               f"compute type {ccublas.CUBLAS_COMPUTE_32F}")
    # CHECK_LAUNCHES: a synchronization after each operation, reported against it.
    monkeypatch.setattr(cops, "CHECK_LAUNCHES", True)

    class Faulting(EmulatedDevice):
        def synchronize(self):
            raise RuntimeError("cudaErrorLaunchFailure")

    with pytest.raises(RuntimeError, match=r"cast_to_f32<float>.*cudaErrorLaunchFailure"):
        cops.run_ops(Faulting(emulation), [op])


@pytest.fixture
def emulated_backend(emulation, monkeypatch):
    pytest.importorskip("torch", reason="the oracle (tests/oracles.py) needs torch")
    monkeypatch.setattr(EmulatedCupyBackend, "libs", emulation)
    rg.backends.register(EmulatedCupyBackend)
    yield EmulatedCupyBackend.name
    rg.backends.unregister(EmulatedCupyBackend.name)


@pytest.mark.parametrize("path,layer", [("graph", layer) for layer in LAYERS]
                         + [("persistent", "TwoStage"), ("persistent", "LSTM-proj"),
                            ("persistent-mma", "LSTM-proj")])
def test_oracle_harness_on_emulated_kernels(emulated_backend, force_path, path, layer):
    """The GPU oracle tests' own harness, run on the CPU (graph path every layer, persistent
    TwoStage, ~5 s): checks the harness and the backend through the layer code. LSTM-proj
    (proj_size, kernels/cuda/projected.py) on every path: given states (so h_0 is folded into
    xw), a row of length 0, both directions, every gradient against torch.nn in float64."""
    cb.FORCE_PATH = path
    tapes = run_against_oracle(layer, "float32", "numpy", seed=len(layer),
                               backend=emulated_backend)
    assert [t.data for t in tapes] == [{"path": path}] * 2


def test_segments_variant_on_emulated_kernels(emulated_backend, force_path, monkeypatch):
    """`cupy:segments`: the layer calls the backend once per segment over the live rows (here
    as finely as it can), each call on the path its rows take; every result against torch.nn
    in float64, through the GPU oracle tests' harness."""
    monkeypatch.setattr(cb, "SEGMENT_MIN_ROWS", 1)
    monkeypatch.setattr(cb, "SEGMENT_CALL_STEPS", 0)
    backend = rg.backends.get(emulated_backend)
    calls = []
    real = type(backend).forward

    def counting(self, problem, *args, **kwargs):
        calls.append((problem.seq_len, problem.batch))
        return real(self, problem, *args, **kwargs)

    monkeypatch.setattr(type(backend), "forward", counting)
    with backend.variant("segments"):
        run_against_oracle("GRU", "float32", "numpy", seed=3, backend=emulated_backend)
    assert len(calls) > 2 and min(b for _, b in calls) < 5     # B = 5: fewer rows later on
    calls.clear()
    run_against_oracle("GRU", "float32", "numpy", seed=3, backend=emulated_backend)
    assert calls == [(6, 5), (6, 5)]                          # outside it: one call a direction


WARP_TILE_SHAPES = {**{name: (sh, 1) for name, sh in MMA_SHAPES.items()},
                    "two groups": (ROW_GROUP_SHAPES["two groups"][0], 2)}


@pytest.mark.parametrize("shape", list(WARP_TILE_SHAPES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell,acts", CELL_CASES[:4])
def test_persistent_mma_warp_tiles_on_emulated_kernels_match_numpy(emulation, force_path, cell,
                                                                   acts, reverse, shape):
    """The tensor-core forward with 32 x 32 warp tiles (MMA_WARP_TILES; warp_tile_add in
    persistent_mma.cu): warps share a warp tile over slices of each K chunk (some slices
    empty: "four K chunks" has a last chunk of one k-step, "several tiles" chunks of one),
    each into its own partial, summed in the finish; warp tiles partly padding; at "more
    elements than prefetched" 8 warp tiles, one warp each. Against the numpy backend in
    float64; the forward launches carry the plan's split."""
    sh, row_groups = WARP_TILE_SHAPES[shape]
    cb.FORCE_PATH, cb.MMA_WARP_TILES, cb.MMA_ROW_GROUPS = "persistent-mma", True, row_groups
    dev, tape = check_shape(emulation, sh, cell, acts, reverse)
    assert tape.path == "persistent-mma"
    fwd = [op for op in dev.launches if op.name.startswith("gated_fwd_persistent_mma")]
    assert len(fwd) == 2 and all(op.args[-1] >= 1 for op in fwd), [op.args[-2:] for op in fwd]
    if shape == "more elements than prefetched" and cell == "lstm":
        assert fwd[0].args[-1] == 1                     # 48 rows x 128 weight rows: 8 tiles


@pytest.mark.parametrize("row_groups,warp_tiles,chunk", [(2, False, 512), (1, True, 512),
                                                         (2, True, 512), (2, True, 1024)],
                         ids=["rows2", "warp-tiles", "rows2-warp-tiles", "rows2-wt-wide"])
@pytest.mark.parametrize("layer", ["LSTM", "GRU"])
def test_oracle_harness_trains_with_the_tensor_core_variants(emulated_backend, force_path,
                                                             monkeypatch, layer, row_groups,
                                                             warp_tiles, chunk):
    """test_cupy_gpu.py's variant test on the emulation: the tensor-core forward and backward
    with MMA_ROW_GROUPS = 2, MMA_WARP_TILES and MMA_BWD_CHUNK_BYTES = 1024 at batch 40 (2
    groups of 32 rows, or one of 48; 3 emulated SMs) through the layer code against torch.nn
    in float64, with the same checks of what was launched."""
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "persistent-mma", "persistent-mma"
    cb.MMA_ROW_GROUPS, cb.MMA_WARP_TILES, cb.MMA_BWD_CHUNK_BYTES = row_groups, warp_tiles, chunk
    monkeypatch.setattr(EmulatedCupyBackend, "smem_limit", 1 << 18)   # 1 KiB float32 chunks
    launched = record_launches(monkeypatch, EmulatedDevice)
    run_against_oracle(layer, "float32", "numpy", seed=17, B=40, H=24, backend=emulated_backend)
    rows = 32 if row_groups == 2 else 48
    fwd = [op for op in launched if op.name.startswith("gated_fwd_persistent_mma")]
    bwd = [op for op in launched if op.name.startswith("gated_bwd_persistent_mma")]
    assert len(fwd) == len(bwd) == 2
    assert all(int(op.args[-2]) == rows and (int(op.args[-1]) > 0) is warp_tiles for op in fwd)
    assert all(int(op.args[-2]) == rows and int(op.args[-1]) * 4 == chunk for op in bwd)


@pytest.mark.parametrize("layer", ["LSTM-proj", "GRU"])
def test_oracle_harness_trains_through_the_persistent_backward(emulated_backend, force_path,
                                                               monkeypatch, layer):
    """The tensor-core forward and backward (bench variant cupy:persistent-mma-train) through
    the layer code against torch.nn in float64: both directions, given states, a row of
    length 0."""
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "persistent-mma", "persistent-mma"
    launched = record_launches(monkeypatch, EmulatedDevice)
    run_against_oracle(layer, "float32", "numpy", seed=3, backend=emulated_backend)
    names = [op.name for op in launched]
    assert sum(n.startswith("gated_bwd_persistent_mma") for n in names) == 2
    assert not any(n.startswith("gated_bwd_step") for n in names)


def test_lstm_projection_without_initial_state_skips_the_fold(emulated_backend, force_path,
                                                              monkeypatch):
    """No h_0 (zeros): xw is used as it is, no copy (kernels/cuda/projected.py); two layers,
    both directions, lengths with a zero, against the numpy backend."""
    from rnn_gpu.kernels.cuda import projected

    folded = []
    fold = projected.fold_initial_state

    def recording(*args):
        out = fold(*args)
        folded.append(out[1])
        return out

    monkeypatch.setattr(projected, "fold_initial_state", recording)
    cb.FORCE_PATH = "graph"
    rng = np.random.default_rng(5)
    m = rg.LSTM(3, 7, num_layers=2, bidirectional=True, proj_size=2, seed=5)
    x = rng.standard_normal((4, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((4, 3, 4)).astype(np.float32)
    lengths = np.array([4, 0, 2])
    runs = {}
    for backend in ("numpy", emulated_backend):
        y, state, tape = m.forward(x, lengths=lengths, backend=backend)
        dx, _, grads = m.backward(tape, dy)
        runs[backend] = [y, *state, dx, *grads.values()]
    assert folded == [False] * 4                  # two layers, two directions
    for got, want in zip(runs[emulated_backend], runs["numpy"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
