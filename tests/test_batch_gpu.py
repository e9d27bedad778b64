"""``rnn-gpu run`` on a GPU: results against a CPU run, out-of-memory halving with torch's own
error, and the host-to-device copies issued ahead on a copy stream.

The tests register ``torch_cuda_test`` (tests/torch_cuda_backend.py, a plain torch loop, with a
variant that raises torch's real out-of-memory error on demand), so that the runner is tested
apart from any kernel. Marked ``gpu``: skipped without a CUDA device.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import rnn_gpu as rg
from rnn_gpu.batch import apply_batch
from rnn_gpu.batch.executors import LocalExecutor
from rnn_gpu.cli import main

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

from torch_cuda_backend import TorchCudaOutOfMemoryAbove, TorchCudaTestBackend  # noqa: E402

N, T, I, H = 200, 20, 6, 16
TOL = dict(rtol=1e-5, atol=1e-5)            # float32, GPU against NumPy on the CPU


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    # TF32 matmuls would be off by ~1e-3; the comparison with the CPU is for float32 proper.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture
def backends():
    for backend in (TorchCudaTestBackend, TorchCudaOutOfMemoryAbove):
        rg.backends.register(backend)
    yield
    for backend in (TorchCudaTestBackend, TorchCudaOutOfMemoryAbove):
        rg.backends.unregister(backend.name)


@pytest.fixture
def job(tmp_path):
    """A 2-layer bidirectional tanh RNN and N sequences with lengths in [0, T]."""
    model = rg.RNN(I, H, num_layers=2, bidirectional=True, seed=7)
    rg.save(model, tmp_path / "model.safetensors")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((N, T, I)).astype("float32")
    lengths = rng.integers(0, T + 1, N)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "lengths.npy", lengths)
    return tmp_path, model.eval(), x, lengths


def run(capsys, d, output, *extra) -> tuple[dict, str]:
    code = main(["run", str(d / "model.safetensors"), str(d / "x.npy"), str(d / output),
                 "--lengths", str(d / "lengths.npy"), "--emit", "sequence", "--quiet",
                 *map(str, extra)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


def test_cuda_run_writes_what_a_cpu_run_writes(job, backends, capsys):
    d, _, _, _ = job
    cpu, _ = run(capsys, d, "cpu.npy", "--device", "cpu", "--backend", "numpy",
                 "--batch-size", "32", "--chunk-size", "64")
    gpu, _ = run(capsys, d, "gpu.npy", "--device", "cuda", "--backend", "torch_cuda_test",
                 "--batch-size", "32", "--chunk-size", "64")
    np.testing.assert_allclose(np.load(d / "gpu.npy"), np.load(d / "cpu.npy"), **TOL)
    assert gpu["device"] == "cuda" and gpu["backend"] == "torch_cuda_test"
    assert gpu["executor"] == "local" and gpu["computed"] == N
    assert gpu["batches"] == cpu["batches"] == 7      # chunks of 64, 64, 64, 8 rows
    assert gpu["batches_retried"] == 0


def test_cuda_out_of_memory_halves_the_batch_and_says_so(job, backends, capsys):
    d, model, x, lengths = job
    summary, err = run(capsys, d, "out.npy", "--device", "cuda", "--backend",
                       "torch_cuda_test_oom", "--batch-size", "64")
    assert "out of memory on a batch of 64 sequences; retrying it in batches of 32" in err
    assert "batches of 16" in err                    # the limit is 16 rows
    assert summary["batches_retried"] == 2           # 64 -> 32 -> 16, then 16 is the ceiling
    np.testing.assert_allclose(np.load(d / "out.npy"),
                               apply_batch(model, x, lengths, emit="sequence"), **TOL)


def test_copies_are_issued_ahead_on_a_copy_stream(backends):
    model = rg.RNN(I, H, seed=9).eval()           # one layer and direction: one call a batch
    executor = LocalExecutor(device="cuda", log=lambda msg: None)
    seen = []

    class Watching(TorchCudaTestBackend):
        name = "torch_cuda_test_watching"

        def forward(self, *args, **kwargs):
            staging = executor._staging
            seen.append((staging.copies, staging.copy_stream, torch.cuda.current_stream()))
            return super().forward(*args, **kwargs)

    rg.backends.register(Watching)
    try:
        rng = np.random.default_rng(10)
        batches = [(i, rng.standard_normal((24 + i, T - i, I)).astype("float32"),
                    rng.integers(1, T - i + 1, 24 + i)) for i in range(5)]
        got = dict(executor.map(model.to("cuda"), iter(batches), emit="sequence",
                                backend=Watching.name))
    finally:
        rg.backends.unregister(Watching.name)
    # When batch i computes, the copy of batch i+1 has been issued already (the last has none).
    assert [copies for copies, _, _ in seen] == [2, 3, 4, 5, 5]
    for _, copy_stream, compute_stream in seen:
        assert copy_stream is not None and copy_stream != compute_stream
    assert executor._staging.copies == len(batches)
    cpu = model.to("cpu")
    for key, x, lengths in batches:
        np.testing.assert_allclose(got[key], apply_batch(cpu, x, lengths, emit="sequence"),
                                   **TOL)
