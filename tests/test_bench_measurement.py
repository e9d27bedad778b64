"""What the bench's numbers rest on, checked on the CPU: the CPU time other processes used
while a case was timed and the table's warning for a busy machine (a loaded 2-core VM once made
torch.nn's spinning threads 50x slower, and the table read as a 40x win for us); CuPy's pool in
the peak memory; the header's warning for cuBLAS forced to TF32; CUDA events refusing to time
across two streams."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rnn_gpu.bench import load
from rnn_gpu.bench.report import Row, format_table


def test_other_cores_is_the_machines_busy_time_less_our_own(monkeypatch):
    clock = iter([(100.0, 10.0, 50.0), (103.5, 11.0, 52.0)])     # (busy, own, wall) seconds
    start, end = next(clock), next(clock)
    values = {"busy": iter([start[0], end[0]]), "own": iter([start[1], end[1]]),
              "wall": iter([start[2], end[2]])}
    monkeypatch.setattr(load, "_busy_seconds", lambda: next(values["busy"]))
    monkeypatch.setattr(load, "_own_seconds", lambda: next(values["own"]))
    monkeypatch.setattr(load.time, "perf_counter", lambda: next(values["wall"]))
    with load.LoadMeter() as meter:
        pass
    assert meter.other_cores == pytest.approx((3.5 - 1.0) / 2.0)


def test_without_proc_stat_nothing_is_claimed(monkeypatch):
    monkeypatch.setattr(load, "_busy_seconds", lambda: None)
    with load.LoadMeter() as meter:
        pass
    assert meter.other_cores is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_beside_the_block_is_seen():
    spinner = subprocess.Popen([sys.executable, "-c",
                                "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)                       # the spinner up and running
        with load.LoadMeter() as meter:
            time.sleep(1.0)                   # this process idle: the busy time is another's
    finally:
        spinner.kill()
        spinner.wait()
    assert meter.other_cores > 0.5, meter.other_cores


def test_the_table_flags_each_busy_case_once():
    rows = [Row("GRU", "8×4×16", "float32", runner, ms=1.0, other_cores=other)
            for runner, other in (("numpy", 1.3), ("torch-cpu", 1.3))]
    rows += [Row("LSTM", "8×4×16", "float32", "numpy", ms=1.0, other_cores=0.1)]
    text = format_table(rows, {"cpu": "x", "cores": 2, "threads": 2, "numpy": "2",
                               "numpy_blas": "b", "python": "3", "rnn_gpu": "0"})
    busy = [line for line in text.splitlines() if "the machine was busy" in line]
    assert busy == ["  GRU 8×4×16 float32 forward: the machine was busy: other processes used "
                    "1.3 of 2 cores while this case ran; its times (the peer's spinning "
                    "threads above all) are not to be trusted, rerun it on a quiet machine"]
    assert "GFLOP/s" in text and "TFLOP/s" not in text     # CPU rows: not 0.000 TFLOP/s


def test_a_gpu_case_is_flagged_only_when_a_quarter_of_the_cores_are_busy():
    assert load.busy_note(0.6, 2, "cpu") is not None
    assert load.busy_note(0.6, 16, "cuda:0") is None
    assert load.busy_note(4.5, 16, "cuda:0") is not None


def test_peak_memory_counts_cupys_pool_too(monkeypatch):
    """The CuPy backend allocates from CuPy's pool, which torch's allocator never sees: its
    rows read as needing next to nothing. A stand-in pool that grows by 3 MiB in the call."""
    import types

    from rnn_gpu.bench import memory

    class Pool:
        held, freed = 5 << 20, []

        def free_all_blocks(self):
            self.freed.append(self.held)
            self.held = 1 << 20                    # what is in use stays

        def total_bytes(self):
            return self.held

    pool = Pool()
    device = types.SimpleNamespace(synchronize=lambda: None)
    fake = types.SimpleNamespace(get_default_memory_pool=lambda: pool,
                                 cuda=types.SimpleNamespace(Device=lambda: device))
    monkeypatch.setitem(sys.modules, "cupy", fake)

    def call():
        pool.held += 3 << 20
        return "y"

    assert memory.cupy_pool_growth(call) == ("y", 3 << 20)
    assert pool.freed == [5 << 20]                 # the cache emptied first
    monkeypatch.delitem(sys.modules, "cupy")
    assert memory.cupy_pool_growth(lambda: "z") == ("z", 0)


def test_the_header_warns_when_cublas_is_forced_to_tf32():
    from rnn_gpu.bench.report import header_lines

    info = {"cpu": "x", "cores": 16, "threads": 16, "numpy": "2", "numpy_blas": "b",
            "python": "3", "rnn_gpu": "0", "gpu": "H200", "cuda": "13", "cudnn": 9}
    assert not any("TF32" in line for line in header_lines({**info, "tf32_override": None}))
    assert any(line.startswith("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set")
               for line in header_lines({**info, "tf32_override": "1"}))


def test_cuda_event_timing_refuses_two_streams(monkeypatch):
    """Events on torch's stream would not wait for kernels on another CuPy stream."""
    import types

    from rnn_gpu.bench import timing

    torch_like = types.SimpleNamespace(cuda=types.SimpleNamespace(
        current_stream=lambda: types.SimpleNamespace(cuda_stream=0)))
    stream = {"ptr": 0}
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        get_current_stream=lambda: types.SimpleNamespace(ptr=stream["ptr"])))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    timing._check_one_stream(torch_like)                  # both the legacy default stream
    stream["ptr"] = 0x7F00
    with pytest.raises(RuntimeError, match=r"torch's current stream \(0x0\) is not CuPy's "
                                           r"\(0x7f00\)"):
        timing._check_one_stream(torch_like)
