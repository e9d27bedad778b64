"""The benchmark harness on a GPU: CUDA-event timing, the cuDNN peer (fair: flattened weights,
no TF32, checked against torch.nn in float64 on the CPU), peak memory, ``rnn-gpu bench`` on
CUDA and the asv GPU benchmarks. Marked ``gpu``: skipped without a CUDA device."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from rnn_gpu.bench import cases, memory, peers, runner, timing
from rnn_gpu.cli import main

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_event_timer_measures_gpu_time_not_launch_time():
    a = torch.randn(4096, 4096, device="cuda")
    timer = timing.CudaEventTimer("cuda")

    def work():
        for _ in range(20):
            a @ a                                    # ~55 GFLOP: milliseconds, queued fast

    work()
    seconds = timer(work)
    start = time.perf_counter()
    work()                                           # the launches alone return at once
    launch = time.perf_counter() - start
    torch.cuda.synchronize()
    assert seconds > 0 and seconds > 2 * launch
    clock = timing.CudaEventClock("cuda")
    t0 = clock()
    work()
    t1 = clock()
    assert 0.3 * seconds < t1 - t0 < 3 * seconds


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN", "TwoStageRNN"])
@pytest.mark.parametrize("pass_", ["forward", "train"])
def test_cudnn_peer_agrees_with_torch_in_float64(cell, pass_):
    """float32 on the GPU against float64 on the CPU, outputs and every gradient: 1e-4 fails
    if TF32 were left on (its 10-bit mantissa gives ~1e-3)."""
    gpu = cases.Case(cell, 40, 24, 48, 64, "float32", "cuda", pass_)
    params, x = runner.make_inputs(gpu)
    result = peers.TorchRunner("cuda").prepare(gpu, params, x).result()
    w = {k: torch.from_numpy(v).double().requires_grad_(True) for k, v in params.items()}
    if cell == "TwoStageRNN":
        step = peers._torch_twostage(w)
    else:
        module = getattr(torch.nn, cell)(48, 64, dtype=torch.float64)
        module.load_state_dict({k: v.detach() for k, v in w.items()})
        step, w = module, {k: getattr(module, k) for k in params}
    xc = x.cpu().double().requires_grad_(True)
    y, state = step(xc)
    state = state if isinstance(state, tuple) else (state,)
    reference = [y, *state]
    if pass_ == "train":
        dy, dstate = peers.train_grads(gpu)
        reference += torch.autograd.grad([y, *state], [xc, *w.values()],
                                         [g.cpu().double() for g in (dy, *dstate)])
    reference = [t.detach() for t in reference]
    assert runner.compare(result, (reference[0], reference[1:])) < 1e-4


def test_peak_memory_counts_what_a_call_allocates():
    n = 1 << 26                                      # 256 MiB of float32
    assert memory.peak_bytes(lambda: torch.empty(n, device="cuda"), "cuda") >= 4 * n


def test_bench_on_cuda_reports_cudnn_rows_with_memory(capsys):
    assert main(["bench", "--quick", "--device", "cuda", "--pass", "all", "--dtype",
                 "float32,float16,bfloat16", "--repeats", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    cudnn = [r for r in rows if r["runner"] == "torch-cudnn"]
    assert len(cudnn) == len(cases.CELLS) * 2 * 3 * 2         # cells x shapes x dtypes x passes
    for row in cudnn:
        assert row["error"] is None, row
        assert row["ms"] > 0 and row["ratio"] == 1.0 and row["peak_bytes"] > 0
        # half precision: checked against cuDNN in float32 on the rounded inputs, and shown
        assert (row["rms_err"] is None) == (row["dtype"] == "float32"), row
    assert not [r for r in rows if r["runner"] == "numpy"]    # not a CUDA backend: left out


def test_asv_gpu_benchmarks_run_on_cudnn():
    from asv_suite import load_recurrent

    recurrent = load_recurrent()
    for cls in (recurrent.GpuForward, recurrent.GpuForwardBackward):
        bench = cls()
        bench.setup("LSTM", "torch-cudnn", "512x64x1024", "bfloat16")
        assert recurrent.gpu_clock() > 0
        assert bench.track_tokens_per_s() > 0 and bench.track_tflops() > 0
        assert bench.track_peak_memory() > 0
        getattr(bench, "time_forward" if cls is recurrent.GpuForward
                else "time_forward_backward")()
    assert np.isfinite(recurrent.gpu_clock())


def test_one_of_our_backends_on_cuda_gets_a_checked_row_against_cudnn(capsys):
    """The path the Triton and CuPy rows will take, exercised now with the plain-torch CUDA
    test backend: the layer on CUDA, torch inputs, the answer checked against cuDNN, timed with
    CUDA events, a ratio; and the same backend as an asv parameter."""
    from asv_suite import load_recurrent
    from torch_cuda_backend import TorchCudaTestBackend

    import rnn_gpu as rg

    rg.backends.register(TorchCudaTestBackend)
    try:
        assert main(["bench", "--quick", "--device", "cuda", "--cell", "RNN", "--pass",
                     "forward", "--backend", TorchCudaTestBackend.name, "--repeats", "2",
                     "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["rows"]
        ours = [r for r in rows if r["runner"] == TorchCudaTestBackend.name]
        assert ours and all(r["error"] is None and r["max_err"] < 1e-4 and r["ratio"] > 0
                            and r["peak_bytes"] is not None for r in ours), ours
        bench = load_recurrent().GpuForward()
        bench.setup("RNN", TorchCudaTestBackend.name, "512x64x1024", "float32")
        assert bench.track_tokens_per_s() > 0
        with pytest.raises(NotImplementedError, match="inference only"):
            load_recurrent().GpuForwardBackward().setup(
                "RNN", TorchCudaTestBackend.name, "512x64x1024", "float32")
    finally:
        rg.backends.unregister(TorchCudaTestBackend.name)


def test_variable_lengths_on_cuda_check_our_rows_against_packed_cudnn(capsys):
    """--lengths uniform on the GPU: cuDNN runs packed sequences (lengths on the host, as
    pack_padded_sequence wants them), every runner that can serve the case is checked against
    it, outputs and gradients, before it is timed."""
    import rnn_gpu as rg

    ours = [n for n in ("triton", "cupy") if rg.backends.get(n).unavailable_reason() is None]
    ours += [f"{n}:segments" for n in ours]                     # segments over the live rows
    chosen = ["--backend", ",".join(ours)] if ours else []
    assert main(["bench", "--quick", "--device", "cuda", "--lengths", "uniform", "--pass",
                 "all", "--dtype", "float32,float16", "--repeats", "2", "--json", *chosen]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    cudnn = [r for r in rows if r["runner"] == "torch-cudnn"]
    assert len(cudnn) == len(cases.CELLS) * 2 * 2 * 2         # cells x shapes x dtypes x passes
    for row in rows:
        assert row["shape"].endswith(" len=uniform"), row
        if row["runner"] in ("torch-cudnn", *ours):
            assert row["error"] is None and row["ms"] > 0, row


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_bench_kernels_splits_each_call_by_kernel(capsys, backend):
    """``--kernels``: each timed row holds its kernels' total (a share of the timed call, not
    more than ~the call) and its costliest kernels; ours include the fused recurrence's,
    cuDNN's its own (CUPTI records every library's launches)."""
    from rnn_gpu import registry

    if registry.get(backend).unavailable_reason():
        pytest.skip(registry.get(backend).unavailable_reason())
    assert main(["bench", "--device", "cuda", "--kernels", "3", "--cell", "LSTM", "--shape",
                 "32x64x128", "--dtype", "float16", "--pass", "forward", "--backend", backend,
                 "--repeats", "3", "--json", "-"]) == 0
    rows = {r["runner"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for name in (backend, "torch-cudnn"):
        row = rows[name]
        assert row["error"] is None, row
        assert 0 < row["kernel_ms"] <= 1.5 * row["ms"] + 0.05, row
        assert 1 <= len(row["kernels"]) <= 3, row
        assert all(k["launches"] >= 1 and k["us"] > 0 for k in row["kernels"]), row
    recurrence = "gated" if backend == "triton" else "gated_fwd"
    assert any(recurrence in k["name"] for k in rows[backend]["kernels"]), rows[backend]
