"""The cupy backend on a GPU (every test marked ``gpu``; skipped unless the backend is
available and torch sees a CUDA device; ``.ci/gpu``'s tests-cupy stage runs this module).

Every cell, dtype, direction and lengths, forward and backward, CuPy arrays and torch
tensors, every path, against the float64 oracle (tests/oracles.py, through
``run_against_oracle`` of tests/cupy_emulation.py, whose own check runs on the CPU in
test_cupy_emulated.py), each operation synchronized so that a fault names its kernel; graph
capture and replay with capture switched on; the caller's stream; out-of-memory and compile
errors; ``rnn_gpu.torch.LSTM`` training against torch.nn; the triton backend at a larger
shape. Kept short (small shapes).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from cupy_emulation import (
    LAYERS,
    _device,
    _host,
    check_errors,
    problem,
    record_launches,
    run_against_oracle,
)

import rnn_gpu as rg
import rnn_gpu.backends.cupy as cb
from rnn_gpu.kernels.cuda import blocks as cblocks
from rnn_gpu.kernels.cuda import cublas as ccublas
from rnn_gpu.kernels.cuda import device as cdev
from rnn_gpu.kernels.cuda import graphs as cgraphs
from rnn_gpu.kernels.cuda import ops as cops
from rnn_gpu.kernels.cuda import sources as csources


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
@pytest.mark.parametrize("layer,dtype", [(layer, dtype)
                                         for layer in ("LSTM", "LSTM-proj", "GRU", "RNN-tanh")
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
@pytest.mark.parametrize("layer,dtype", [(layer, dtype)
                                         for layer in ("LSTM", "LSTM-proj", "GRU", "RNN-tanh")
                                         for dtype in ("float16", "bfloat16", "float32")])
def test_gpu_persistent_mma_backward_matches_oracle(registered, force_path, check_launches,
                                                    layer, dtype, monkeypatch):
    """The tensor-core persistent backward (gated_bwd_persistent_mma) against the float64
    oracle, after the tensor-core forward; a fall back to the graph path would warn, and the
    warning is an error here."""
    reasons = registered.not_supported_reasons(problem(dtype=dtype))
    if reasons:
        pytest.skip("; ".join(reasons))
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "persistent-mma", "persistent-mma"
    launched = record_launches(monkeypatch, cdev.CupyDevice)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_against_oracle(layer, dtype, "cupy", seed=13)
    names = [op.name for op in launched]
    assert sum(n.startswith("gated_bwd_persistent_mma") for n in names) == 2   # 2 directions
    assert not any(n.startswith("gated_bwd_step") for n in names)


@gpu
@needs_gpu
@pytest.mark.parametrize("row_groups,warp_tiles,chunk", [(2, False, 512), (1, True, 512),
                                                         (2, True, 512), (2, True, 1024)],
                         ids=["rows2", "warp-tiles", "rows2-warp-tiles", "rows2-wt-wide"])
@pytest.mark.parametrize("layer,dtype", [(layer, dtype) for layer in ("LSTM", "GRU", "RNN-tanh")
                                         for dtype in ("float16", "bfloat16")])
def test_gpu_persistent_mma_variants_match_oracle(registered, force_path, check_launches,
                                                  layer, dtype, row_groups, warp_tiles,
                                                  chunk, monkeypatch):
    """The tensor-core forward and backward with two row groups (MMA_ROW_GROUPS = 2), the
    forward's 32 x 32 warp tiles (MMA_WARP_TILES) and the backward's 1 KiB chunks
    (MMA_BWD_CHUNK_BYTES; bench variants cupy:persistent-mma-train-rows2,
    cupy:persistent-mma-wt, ...-rows2-wt, ...-rows2-wt-wide): batch 40, with two groups as
    2 x 32 rows (the second: 8 rows and padding), against the float64 oracle; every
    tensor-core launch ran as planned (rows a group, the forward's warp split, the
    backward's chunk), none fell back."""
    reasons = registered.not_supported_reasons(problem(dtype=dtype))
    if reasons:
        pytest.skip("; ".join(reasons))
    cb.FORCE_PATH, cb.FORCE_BACKWARD_PATH = "persistent-mma", "persistent-mma"
    cb.MMA_ROW_GROUPS, cb.MMA_WARP_TILES, cb.MMA_BWD_CHUNK_BYTES = row_groups, warp_tiles, chunk
    launched = record_launches(monkeypatch, cdev.CupyDevice)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_against_oracle(layer, dtype, "cupy", seed=17, B=40, H=24)
    rows = 32 if row_groups == 2 else 48
    fwd = [op for op in launched if op.name.startswith("gated_fwd_persistent_mma")]
    bwd = [op for op in launched if op.name.startswith("gated_bwd_persistent_mma")]
    assert len(fwd) == len(bwd) == 2                       # a direction each
    assert all(int(op.args[-2]) == rows and (int(op.args[-1]) > 0) is warp_tiles for op in fwd)
    assert all(int(op.args[-2]) == rows and int(op.args[-1]) * 2 == chunk for op in bwd)


@gpu
@needs_gpu
def test_gpu_heuristic_takes_the_persistent_path_for_a_small_batch(registered, force_path):
    cb.FORCE_PATH = None
    m = rg.LSTM(3, 8, dtype="float32", seed=1).to("cuda")
    x = _device(np.ones((4, 2, 3), np.float32), "float32", "cupy")
    _, _, tape = m.forward(x, backend="cupy")
    assert tape.tapes[0][0][0].data["path"] == "persistent"


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
        ops = [cblocks.gemm(dev, 4, 5, 3, a.data.ptr, b.data.ptr, c.data.ptr),
               cblocks.pointwise(dev, "cast_from_f32", n=20, args=(c, d, np.int64(20)))]
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
def test_gpu_backward_refuses_a_tape_whose_cupy_input_changed(registered):
    """The CuPy fingerprint (a bit sum on the device, compared with one copy to the host)."""
    import cupy

    m = rg.GRU(3, 16, dtype="float32", seed=2).to("cuda")
    x = cupy.asarray(np.random.default_rng(4).standard_normal((5, 8, 3)).astype(np.float32))
    h0 = cupy.zeros((1, 8, 16), cupy.float32)
    y, _, tape = m.forward(x, h0, backend="cupy")
    m.backward(tape, cupy.ones_like(y))                          # unchanged: fine
    for changed in (x, h0):
        y, _, tape = m.forward(x, h0, backend="cupy")
        changed[0, 1] += 1.0
        with pytest.raises(RuntimeError, match=r"tape: .* was changed in place after "
                                               r"forward\(\)"):
            m.backward(tape, cupy.ones_like(y))


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
@pytest.mark.parametrize("proj_size", [0, 4])
def test_gpu_torch_lstm_trains_like_torch_nn(registered, monkeypatch, proj_size):
    import torch

    import rnn_gpu.torch as rt

    torch.manual_seed(0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ours = rt.LSTM(5, 12, num_layers=2, bidirectional=True, proj_size=proj_size,
                   backend="cupy").cuda()
    ref = torch.nn.LSTM(5, 12, num_layers=2, bidirectional=True, proj_size=proj_size).cuda()
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
