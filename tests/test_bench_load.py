"""rnn_gpu.bench.load: the CPU time other processes used while a case was timed, and the
table's warning for a case timed on a busy machine (a loaded 2-core VM once made torch.nn's
spinning threads 50x slower, and the table read as a 40x win for us)."""

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
