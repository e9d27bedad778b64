"""``rnn-gpu bench --kernels``: the split of a call's GPU time by kernel, checked on the CPU
with recorded profiler events (the profiler itself on a GPU: test_bench_gpu.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rnn_gpu.bench import cases, kernels, runner
from rnn_gpu.bench.peers import BackendRunner, TorchRunner
from rnn_gpu.cli import main

torch = pytest.importorskip("torch")
from torch.autograd import DeviceType  # noqa: E402


@pytest.mark.parametrize("name, short", [
    ("void gated_fwd_step<__half, 1, 0>(GatedFwdCall<__half> const*, float const*, float*)",
     "gated_fwd_step<__half, 1, 0>"),
    ("_gated_fwd_kernel", "_gated_fwd_kernel"),
    ("void at::native::(anonymous namespace)::fill<float>(float*, long)",
     "at::native::{anon}::fill<float>"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_"
     "segment_k_off_kernel__5x_cublas", None),
    ("void cudnn::rnn::RNN_blockPersist_fp_LSTM<__half, float, 4, 1, 0>(cudnn::rnn::"
     "RNNPersistParams)", "cudnn::rnn::RNN_blockPersist_fp_LSTM<__half, float, 4, 1, 0>"),
])
def test_kernel_names_lose_their_return_type_and_arguments(name, short):
    got = kernels.short_name(name)
    assert len(got) <= kernels.NAME_WIDTH
    if short is None:
        assert got.endswith("…") and name.startswith(got[:-1])
    else:
        assert got == short


def _event(name, us, device=DeviceType.CUDA):
    return SimpleNamespace(name=name, device_type=device,
                           time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_summarize_groups_by_kernel_and_ranks_by_total_time():
    events = [_event("void step<float>(float*)", 3.0), _event("gemm_a", 10.0),
              _event("void step<float>(float*)", 4.0), _event("aten::mm", 50.0, DeviceType.CPU),
              _event("void step<float>(float*)", 5.0), _event("copy", 1.0)]
    total_ms, top = kernels.summarize(events, top=2)
    assert total_ms == pytest.approx(0.023)                 # the CPU op is not a kernel
    assert top == [kernels.KernelTime("step<float>", 3, 12.0),
                   kernels.KernelTime("gemm_a", 1, 10.0)]
    text = kernels.format_kernels(total_ms, top, call_ms=0.046)
    assert text.splitlines()[0] == "kernels 0.023 ms of 0.046 ms timed (50%)"
    assert "3×" in text.splitlines()[1] and "4.00 us  step<float>" in text.splitlines()[1]


def test_run_case_profiles_each_timed_runner_and_reports_it(monkeypatch):
    """The plumbing, with the profiler replaced: each timed row gets its split, the table a
    block of them, the JSON the fields; a profiler that fails costs the split only."""
    seen = []

    def fake_profile(call, device, top):
        seen.append(top)
        call()
        if len(seen) == 2:
            raise RuntimeError("CUPTI is busy")
        return 0.5, [kernels.KernelTime("k", 2, 400.0)]

    monkeypatch.setattr(runner, "profile_kernels", fake_profile)
    log = []
    case = cases.Case("GRU", 4, 3, 5, 6)
    rows = runner.run_case(case, [BackendRunner("numpy"), TorchRunner("cpu")], repeats=1,
                           log=log.append, kernels=4)
    assert seen == [4, 4]
    assert rows[0].kernel_ms == 0.5 and rows[0].kernels == [kernels.KernelTime("k", 2, 400.0)]
    assert rows[1].kernel_ms is None and rows[1].ok
    assert any("torch-cpu: no kernel profile (RuntimeError: CUPTI is busy)" in m for m in log)
    assert any(m.startswith("timed ") and "kernels 0.500 ms" in m for m in log)
    from rnn_gpu import bench

    table = bench.format_table(rows)
    assert "where one more call's GPU time went" in table
    assert "GRU 4×3×5×6 float32 forward numpy: kernels 0.500 ms of" in table
    row = json.loads(bench.to_json(rows, {}))["rows"][0]
    assert row["kernel_ms"] == 0.5 and row["kernels"] == [{"name": "k", "launches": 2,
                                                           "us": 400.0}]


def test_kernels_needs_a_gpu_and_a_positive_count(capsys):
    assert main(["bench", "--quick", "--kernels", "--cell", "GRU"]) == 2
    assert "kernels: the split by kernel is a GPU's" in capsys.readouterr().err
    assert main(["bench", "--quick", "--kernels", "0", "--device", "cuda", "--dry-run"]) == 2
    assert "kernels: expected a positive count of kernels to list, got 0" in \
        capsys.readouterr().err


def test_a_failing_describe_run_costs_the_config_column_only(monkeypatch):
    """A backend's describe_run that raises stopped the whole bench."""
    def broken(self, case):
        raise KeyError("tiles")

    monkeypatch.setattr(BackendRunner, "describe_run", broken)
    rows = runner.run_case(cases.Case("GRU", 4, 3, 5, 6),
                           [BackendRunner("numpy"), TorchRunner("cpu")], repeats=1)
    assert rows[0].ok and rows[0].ms is not None
    assert rows[0].config == "(describe_run failed: KeyError: 'tiles')"
