"""``rnn-gpu bench``: it runs, reports finite speeds, and never times a wrong answer.

No timing assertions: speed is what the benchmark shows, not what unit tests check.
"""

from __future__ import annotations

import contextlib
import json
import math
import re

import numpy as np
import pytest

import rnn_gpu as rg
from rnn_gpu.backend_api import Backend
from rnn_gpu.bench import cases, flops
from rnn_gpu.bench.peers import Prepared, Runner
from rnn_gpu.cli import main

pytest.importorskip("torch")


def _bench_json(capsys, *args: str, code: int = 0) -> dict:
    """The JSON report; ``code`` 1 where a runner is meant to be wrong (a wrong row fails the
    command)."""
    assert main(["bench", "--quick", "--json", *args]) == code
    return json.loads(capsys.readouterr().out)


def _assert_checked(row: dict) -> None:
    """Ours checked against the peer within float32's tolerance; the peer, the reference
    itself, with no error against itself (0 would read as 'verified')."""
    if row["runner"] == "torch-cpu":
        assert row["max_err"] is None and row["checked_against"] is None, row
    else:
        assert row["max_err"] <= 1e-4 and row["checked_against"] == "torch-cpu", row


def test_quick_bench_reports_numpy_and_torch(capsys):
    report = _bench_json(capsys, "--repeats", "1")
    assert report["machine"]["threads"] >= 1 and report["machine"]["numpy"] == np.__version__
    rows = report["rows"]
    assert {r["runner"] for r in rows} >= {"numpy", "torch-cpu"}
    assert {r["cell"] for r in rows} == set(cases.CELLS)
    for row in rows:
        if row["runner"] not in ("numpy", "torch-cpu"):
            continue
        assert row["error"] is None, row
        for key in ("ms", "tokens_per_s", "gflops", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        _assert_checked(row)
        if row["runner"] == "torch-cpu":
            assert row["ratio"] == 1.0
            assert row["config"] is None
        else:                                      # the NumPy backend says how it tiled
            assert row["config"] and ("thread" in row["config"] or "tiles" in row["config"])


def test_the_table_says_how_each_case_ran(capsys):
    assert main(["bench", "--quick", "--repeats", "1", "--cell", "LSTM", "--shape",
                 "4x2x8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "how each case ran:\n  LSTM 4×2×8 float32 forward numpy: 1 thread" in out


def test_float32_precision_is_set_for_the_run_and_reported(capsys, monkeypatch):
    """--float32-precision holds while the cases run (a stand-in runner reads it), is named in
    the JSON and above the table, and the process's own setting is back afterwards."""
    import rnn_gpu as rg
    from rnn_gpu.bench import runner

    seen = []
    real_run_case = runner.run_case

    def spy(*args, **kwargs):
        seen.append(rg.float32_precision())
        return real_run_case(*args, **kwargs)

    monkeypatch.setattr(runner, "run_case", spy)
    report = _bench_json(capsys, "--repeats", "1", "--cell", "RNN", "--shape", "2x2x4",
                         "--float32-precision", "tf32x3")
    assert seen == ["tf32x3"] and report["machine"]["float32_precision"] == "tf32x3"
    assert rg.float32_precision() == "ieee"
    assert main(["bench", "--quick", "--repeats", "1", "--cell", "RNN", "--shape", "2x2x4",
                 "--float32-precision", "tf32x3"]) == 0
    assert ("float32 products: tf32x3 in our backends (rnn-gpu bench --float32-precision); "
            "torch.nn: IEEE float32") in capsys.readouterr().out


def _problem(B, H, training=False, cell="lstm"):
    from rnn_gpu.backend_api import Problem

    return Problem(cell=cell, activations=(), dtype="float32", device="cpu",
                   input_kind="numpy", seq_len=8, batch=B, input_size=H, hidden_size=H,
                   training=training)


@pytest.mark.parametrize("B, H, training, threads, expected", [
    (256, 128, False, 2, "2 row tiles of ~128 rows, no barrier"),
    (32, 512, False, 2, "2 unit tiles of ~256 units, a barrier per step"),
    (32, 512, True, 2, "1 thread, multi-threaded BLAS"),      # training: no unit tiles
    (4, 8, False, 2, "1 thread, multi-threaded BLAS"),
    (256, 128, False, 1, "1 thread, multi-threaded BLAS"),
])
def test_numpy_backend_describes_its_tiles(monkeypatch, B, H, training, threads, expected):
    monkeypatch.setenv("RNN_GPU_NUM_THREADS", str(threads))
    assert rg.backends.get("numpy").describe_run(_problem(B, H, training)) == expected


class _Garbage(Backend):
    """Right shapes, wrong numbers."""

    name = "garbage_for_test"
    priority = -100

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape):
        rng = np.random.default_rng(0)
        T, B = xw.shape[:2]
        y = rng.standard_normal((T, B, problem.output_size)).astype(xw.dtype)
        return y, tuple(rng.standard_normal(s.shape).astype(s.dtype) for s in state), None

    def backward(self, tape, dy, dstate):
        raise NotImplementedError


@pytest.fixture
def garbage():
    rg.backends.register(_Garbage)
    yield _Garbage.name
    rg.backends.unregister(_Garbage.name)


def test_a_wrong_backend_is_reported_and_not_timed(capsys, garbage):
    report = _bench_json(capsys, "--cell", "RNN,LSTM", "--backend", f"numpy,{garbage}",
                         "--repeats", "1", code=1)
    wrong = [r for r in report["rows"] if r["runner"] == garbage]
    assert len(wrong) == 4                             # 2 cells x 2 quick shapes
    for row in wrong:
        assert row["ms"] is None and row["tokens_per_s"] is None and row["ratio"] is None
        assert "wrong answer" in row["error"] and row["max_err"] > 1e-4
    assert all(r["error"] is None and r["ms"] > 0 for r in report["rows"]
               if r["runner"] == "numpy")


def test_each_case_is_logged_as_soon_as_it_is_timed(capsys, garbage):
    """stderr gets one 'timed' line per case, with every runner's result, before the table:
    what a bench cut off by a time limit still leaves (.ci/gpu keeps these lines)."""
    assert main(["bench", "--quick", "--cell", "GRU", "--shape", "4x8x8,5x3x6", "--backend",
                 f"numpy,{garbage}", "--repeats", "1"]) == 1          # a wrong row: exit 1
    timed = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("timed ")]
    assert [line.split(":")[0] for line in timed] == [
        "timed GRU 4×8×8 float32 forward on cpu", "timed GRU 5×3×6 float32 forward on cpu"]
    for line in timed:
        assert re.search(r"numpy [\d.]+ ms [\d.]+x err [\d.e+-]+ \[", line), line
        assert f"{garbage} wrong answer" in line and "torch-cpu" in line


def test_a_bench_cut_off_keeps_the_cases_it_finished_in_its_json(tmp_path, monkeypatch):
    """--json PATH is rewritten after every case, marked incomplete until the end: run 7's
    bench-cells hit its time limit in its last case and lost every row it had timed."""
    from rnn_gpu.bench import runner

    real, calls = runner.run_case, []

    def run_case(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt          # stopped mid-case (timeout's SIGTERM kills it
                                             # outright: the file holds what was finished)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_case", run_case)
    path = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--quick", "--cell", "GRU", "--shape", "4x8x8,5x3x6", "--backend",
              "numpy", "--repeats", "1", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["complete"] is False
    assert {r["shape"] for r in report["rows"]} == {"4×8×8"}
    assert any(r["runner"] == "numpy" and r["ms"] > 0 for r in report["rows"])
    assert not (tmp_path / "bench.json.tmp").exists()
    monkeypatch.setattr(runner, "run_case", real)
    assert main(["bench", "--quick", "--cell", "GRU", "--shape", "4x8x8,5x3x6", "--backend",
                 "numpy", "--repeats", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["complete"] is True and {r["shape"] for r in report["rows"]} == {"4×8×8",
                                                                                    "5×3×6"}


def test_the_table_says_wrong_and_the_command_fails(capsys, garbage):
    assert main(["bench", "--quick", "--cell", "GRU", "--shape", "4x8x8", "--backend",
                 garbage, "--repeats", "1"]) == 1
    captured = capsys.readouterr()
    assert "WRONG" in captured.out and "not timed" in captured.out and "torch-cpu" in captured.out
    assert f"rnn-gpu bench: 1 row(s) wrong or failed (see 'not timed' under the table): GRU " \
           f"4×8×8 float32 forward {garbage}" in captured.err


def test_bad_arguments_exit_2(capsys):
    assert main(["bench", "--shape", "12x3"]) == 2
    assert "TxBxH" in capsys.readouterr().err
    assert main(["bench", "--cell", "transformer"]) == 2
    assert main(["bench", "--dtype", "int8"]) == 2
    assert main(["bench", "--repeats", "0"]) == 2
    assert main(["bench", "--threads", "0"]) == 2
    capsys.readouterr()
    # checked before any case runs (they used to fail every row, or the end of the run)
    assert main(["bench", "--quick", "--backend", "numpy,foo"]) == 2
    assert "unknown name 'foo'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--backend", "numpy:fast"]) == 2
    assert "the numpy backend has no variant 'fast'" in capsys.readouterr().err
    assert main(["bench", "--quick", "--json", "/nonexistent/dir/x.json"]) == 2
    assert "json: the directory '/nonexistent/dir'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:        # argparse's choices
        main(["bench", "--lengths", "random"])
    assert exited.value.code == 2 and "invalid choice: 'random'" in capsys.readouterr().err


def test_shapes_cells_and_flops():
    assert cases.parse_shape("128x256x128") == (128, 256, 128, 128)
    assert cases.parse_shape("8×4×3×5") == (8, 4, 3, 5)
    assert [cases.parse_cell(c) for c in ("lstm", "GRU", "rnn", "twostage")] == [
        "LSTM", "GRU", "RNN", "TwoStageRNN"]
    assert len([c for c in cases.cpu_cases() if c.cell != "TwoStageRNN"]) == 9
    assert flops.forward_flops("LSTM", 2, 3, 5, 7) == 2 * 2 * 3 * (5 + 7) * 4 * 7
    assert flops.forward_flops("TwoStageRNN", 2, 3, 5, 7) == 2 * 2 * 3 * 7 * (5 + 3 * 7)
    assert flops.train_flops("GRU", 2, 3, 5, 7) == 3 * flops.forward_flops("GRU", 2, 3, 5, 7)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_lstm_projection_cases(capsys):
    """--proj-size: LSTM with torch.nn's proj_size on both sides, outputs and gradients
    checked against torch.nn before timing, the problem's flops counted with P."""
    rows = _bench_json(capsys, "--cell", "LSTM", "--shape", "6x8x5x12", "--proj-size", "4",
                       "--pass", "all", "--repeats", "1")["rows"]
    assert {(r["runner"], r["pass_"]) for r in rows} >= {
        (runner, p) for runner in ("numpy", "torch-cpu") for p in ("forward", "train")}
    for row in rows:
        if row["runner"] in ("numpy", "torch-cpu"):
            assert row["shape"] == "6×8×5×12 P=4" and row["error"] is None, row
            _assert_checked(row)
    assert flops.forward_flops("LSTM", 6, 8, 5, 12, 4) == 2 * 6 * 8 * ((5 + 4) * 48 + 4 * 12)
    assert cases.Case("LSTM", 6, 8, 5, 12, P=4).out_size == 4


@pytest.mark.parametrize("args, message", [
    (["--cell", "GRU", "--proj-size", "4"], "proj-size: only LSTM has a projection, got cells GRU"),
    (["--cell", "LSTM", "--shape", "4x4x8", "--proj-size", "8"],
     "proj-size: expected less than the hidden size of every shape, got 8 for H=8"),
    (["--proj-size", "-1"], "proj-size: expected a positive LSTM projection size, got -1")])
def test_bad_projection_arguments_exit_2(capsys, args, message):
    assert main(["bench", "--quick", *args]) == 2
    assert message in capsys.readouterr().err


def test_variable_length_cases(capsys):
    """--lengths uniform: every runner gets the same seeded lengths (torch.nn a packed
    sequence, the TwoStageRNN loop its masks), outputs and gradients are checked against torch
    before timing, and tokens and flops count the valid steps only."""
    rows = _bench_json(capsys, "--shape", "7x9x6", "--lengths", "uniform", "--pass", "all",
                       "--repeats", "1")["rows"]
    case = cases.Case("LSTM", 7, 9, 6, 6, lengths="uniform")
    lengths = cases.case_lengths(case)
    assert lengths.min() >= 1 and lengths.max() <= 7 and len(set(lengths.tolist())) > 2
    assert case.tokens == lengths.sum() < 7 * 9
    assert flops.case_flops(case) == flops.forward_flops("LSTM", 7, 9, 6, 6) * case.tokens / 63
    assert {(r["cell"], r["pass_"]) for r in rows if r["runner"] == "numpy"} == {
        (c, p) for c in cases.CELLS for p in cases.PASSES}
    for row in rows:
        if row["runner"] in ("numpy", "torch-cpu"):
            assert row["shape"] == "7×9×6 len=uniform" and row["error"] is None, row
            _assert_checked(row)
            assert row["tokens_per_s"] * row["ms"] / 1e3 == pytest.approx(case.tokens)


def test_the_problem_a_backend_is_asked_about_has_the_cases_lengths():
    """Backends' describe_run and not_supported_reasons saw a case with lengths as one
    without (and T steps, not the longest), so a runner's config column could name a tiling
    it never ran."""
    from rnn_gpu.bench.peers import _problem

    case = cases.Case("LSTM", 7, 9, 6, 6, lengths="uniform")
    problem = _problem(case)
    assert problem.has_lengths and problem.seq_len == cases.case_lengths(case).max()
    plain = _problem(cases.Case("LSTM", 7, 9, 6, 6))
    assert not plain.has_lengths and plain.seq_len == 7


class _IgnoresLengths(Backend):
    """The NumPy backend with the lengths dropped: right without lengths, wrong with them."""

    name = "ignores_lengths_for_test"
    priority = -100

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape):
        from rnn_gpu.backends.numpy import NumpyBackend

        return NumpyBackend().forward(problem, xw, weights, state, None, reverse=reverse,
                                      keep_tape=keep_tape)


def test_a_backend_that_ignores_lengths_is_not_timed(capsys):
    rg.backends.register(_IgnoresLengths)
    try:
        for lengths, wrong in (("full", False), ("uniform", True)):
            rows = _bench_json(capsys, "--cell", "GRU", "--shape", "6x5x4", "--lengths",
                               lengths, "--backend", _IgnoresLengths.name, "--repeats", "1",
                               code=1 if wrong else 0)
            [row] = [r for r in rows["rows"] if r["runner"] == _IgnoresLengths.name]
            assert (row["error"] is not None and "wrong answer" in row["error"]) is wrong, row
    finally:
        rg.backends.unregister(_IgnoresLengths.name)


def test_without_the_peer_no_row_claims_a_ratio(capsys, monkeypatch):
    """torch missing: numpy is still timed, but a ratio against itself would read as 'level
    with torch', so no row gets one, and the peer row says why it did not run."""
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` now fails
    rows = _bench_json(capsys, "--repeats", "1", "--cell", "RNN")["rows"]
    ours = [r for r in rows if r["runner"] == "numpy"]
    peers = [r for r in rows if r["runner"] == "torch-cpu"]
    assert ours and all(r["error"] is None and r["ms"] > 0 for r in ours)
    assert all(r["ratio"] is None for r in rows)
    assert peers and all("torch is not installed" in r["error"] for r in peers)


def test_without_the_peer_no_answer_reads_as_verified(capsys, monkeypatch, garbage):
    """torch missing: nothing independent checks the first of our runners (the reference of
    the others), so its errors are None, not 0 against itself, and a line under the table and
    the 'timed' log line say it is unchecked; another of ours is still checked against it
    (a wrong one is caught: the NumPy backend is the reference, not a plugin that sorts
    before it), and says against what."""
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` now fails
    assert main(["bench", "--quick", "--cell", "GRU", "--shape", "4x8x8", "--repeats", "1",
                 "--backend", f"numpy,{garbage}", "--json", "-"]) == 1
    rows = {r["runner"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    numpy_row = rows["numpy"]
    assert numpy_row["error"] is None and numpy_row["ms"] > 0
    assert numpy_row["max_err"] is None and numpy_row["rms_err"] is None
    assert numpy_row["checked_against"] is None
    assert numpy_row["warning"].startswith("unchecked: no peer ran (torch-cpu: torch is not "
                                           "installed)")
    wrong = rows[garbage]
    assert "wrong answer" in wrong["error"] and wrong["max_err"] > 1e-4
    assert wrong["checked_against"] == "numpy"
    assert main(["bench", "--quick", "--cell", "RNN", "--shape", "4x8x8", "--repeats", "1",
                 "--backend", "numpy"]) == 0
    captured = capsys.readouterr()
    under = captured.out.split("take with care:\n")[1]
    assert "  RNN 4×8×8 float32 forward numpy: unchecked: no peer ran" in under
    [timed] = [line for line in captured.err.splitlines() if line.startswith("timed ")]
    assert re.search(r"numpy [\d.]+ ms unchecked \[", timed) and " err " not in timed, timed


def test_train_pass_checks_gradients_too(capsys):
    """A backend whose forward is right and whose gradients are doubled: timed for forward,
    reported as wrong (and not timed) for train."""
    from test_asv_suite import _WrongGrads

    rg.backends.register(_WrongGrads)
    try:
        rows = _bench_json(capsys, "--cell", "GRU", "--shape", "8x16x12", "--pass", "all",
                           "--backend", f"numpy,{_WrongGrads.name}", "--repeats", "1",
                           code=1)["rows"]
    finally:
        rg.backends.unregister(_WrongGrads.name)
    by = {(r["runner"], r["pass_"]): r for r in rows}
    assert by[(_WrongGrads.name, "forward")]["error"] is None
    assert "wrong answer" in by[(_WrongGrads.name, "train")]["error"]
    assert by[(_WrongGrads.name, "train")]["ms"] is None
    for runner in ("numpy", "torch-cpu"):
        row = by[(runner, "train")]
        assert row["error"] is None and row["ms"] > 0
        _assert_checked(row)


def test_gpu_options_without_a_gpu_exit_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["bench", "--quick", "--dtype", "bfloat16"]) == 2      # CPU: float32/64 only
    assert "float32, float64 on cpu" in capsys.readouterr().err
    assert main(["bench", "--quick", "--pass", "sideways"]) == 2
    assert main(["bench", "--device", "tpu"]) == 2


def test_gpu_set_is_design_section_5():
    gpu = cases.gpu_cases()
    shapes = {(c.T, c.B, c.H) for c in gpu}
    assert shapes == {*cases.GPU_SHAPES, cases.LONG_SHAPE} and max(c.B for c in gpu) == 16384
    assert max(c.T for c in gpu) >= 4096
    assert {c.dtype for c in gpu} == {"float32", "float16", "bfloat16"}
    assert {c.pass_ for c in gpu} == {"forward", "train"} and all(c.on_gpu for c in gpu)


def test_a_backend_that_declines_training_is_unavailable_for_the_train_pass():
    """Its reason shows as 'unavailable' (asv: skipped), not as a failure of the run."""
    from rnn_gpu.bench import peers

    class InferenceOnly(rg.backends.get("numpy").__class__):
        name = "inference_only_for_test"
        priority = -100

        def not_supported_reasons(self, problem):
            return super().not_supported_reasons(problem) + (
                ["no backward here"] if problem.training else [])

    rg.backends.register(InferenceOnly)
    try:
        runner = peers.BackendRunner(InferenceOnly.name, explicit=True)
        forward = cases.Case("GRU", 4, 3, 5, 6)
        assert runner.unavailable_reason(forward) is None
        train = cases.Case("GRU", 4, 3, 5, 6, pass_="train")
        assert runner.unavailable_reason(train) == "no backward here"
    finally:
        rg.backends.unregister(InferenceOnly.name)


class _WithVariants(rg.backends.get("numpy").__class__):
    """The numpy backend with two named variants: "plain", and "broken", under which its
    forward returns garbage (so the check shows that calls really ran inside the variant)."""

    name = "variants_for_test"
    priority = -100
    forward_layer = None            # the layer then calls forward with the input projection
    active: list[str] = []
    calls: list[str] = []

    def variants(self):
        return ("plain", "broken")

    @contextlib.contextmanager
    def variant(self, name):
        _WithVariants.active.append(name)
        try:
            yield
        finally:
            _WithVariants.active.pop()

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape):
        _WithVariants.calls.append(_WithVariants.active[-1] if _WithVariants.active else "")
        y, final, tape = super().forward(problem, xw, weights, state, lengths,
                                         reverse=reverse, keep_tape=keep_tape)
        return (y + 1.0 if "broken" in _WithVariants.active else y), final, tape

    def describe_run(self, problem):
        return f"variant {_WithVariants.active[-1] if _WithVariants.active else None}"


def test_backend_variants_are_separate_rows(capsys):
    """`--backend NAME:VARIANT`: one row per variant, every call (and the description) made
    inside the backend's variant(); an unknown variant is a usage error naming the known
    ones, before any case runs."""
    rg.backends.register(_WithVariants)
    _WithVariants.calls.clear()
    try:
        name = _WithVariants.name
        report = _bench_json(capsys, "--cell", "GRU", "--shape", "4x3x5", "--repeats", "1",
                             "--backend", f"{name}:plain,{name}:broken", code=1)
        assert main(["bench", "--quick", "--backend", f"{name}:plain,{name}:nope"]) == 2
        assert "has no variant 'nope' (it has plain, broken)" in capsys.readouterr().err
    finally:
        rg.backends.unregister(_WithVariants.name)
    rows = {r["runner"]: r for r in report["rows"]}
    plain, broken = (rows[f"{name}:{v}"] for v in ("plain", "broken"))
    assert plain["error"] is None and plain["ms"] > 0 and plain["config"] == "variant plain"
    assert "wrong answer" in broken["error"] and broken["ms"] is None
    assert set(_WithVariants.calls) == {"plain", "broken"} and not _WithVariants.active


class _Sums(Runner):
    """A stand-in runner for a half-precision case on the CPU: y is the running sum of x over
    time. As a peer it sums in the case's dtype (it rounds its state every step, as torch's
    half-precision loops do); as ours it sums in float32 from the inputs cast to the dtype.
    In half precision it multiplies by ``1 + bias`` (a wrong answer when bias is not 0).
    Records what it was given."""

    def __init__(self, name, is_peer=False, bias=0.0):
        self.name, self.is_peer, self.bias, self.seen = name, is_peer, bias, []

    def prepare(self, case, params, x):
        self.seen.append((case, x))
        xs = x.astype(case.dtype)
        acc = np.cumsum(xs, axis=0, dtype=case.dtype if self.is_peer else np.float32)
        y = acc.astype(np.float32) * (1 + self.bias * case.half)
        return Prepared(lambda: None, lambda _: (y, [y[-1:]]))


def test_half_precision_is_checked_against_the_peer_in_float32():
    """A half-precision case: the reference is the peer's float32 run on the inputs rounded
    to the dtype (DESIGN §6: relative RMS), so ours (float32 state) is exact against it, while
    the peer's own rounding shows as its error; the peer is still timed, as the bar. float16
    (NumPy has no bfloat16; its rounding is checked below)."""
    from rnn_gpu.bench import runner as bench_runner

    case = cases.Case("RNN", 256, 8, 8, 8, "float16", "cpu")
    peer, ours = _Sums("peer", is_peer=True), _Sums("ours")
    rows = {r.runner: r for r in bench_runner.run_case(case, [ours, peer], repeats=1)}
    oracle_case, oracle_x = peer.seen[-1]
    assert oracle_case == case.float32_oracle() and oracle_case.dtype == "float32"
    assert np.array_equal(oracle_x, peer.seen[0][1].astype(np.float16).astype(np.float32))
    assert rows["ours"].error is None and rows["ours"].rms_err == 0 == rows["ours"].max_err
    assert rows["peer"].error is None and rows["peer"].ms is not None
    assert rows["peer"].rms_err > 1e-4                      # its per-step rounding, shown
    assert rows["peer"].checked_against == rows["ours"].checked_against == "peer in float32"


def test_a_half_precision_answer_beyond_the_rms_tolerance_is_not_timed():
    """3% off everywhere: under the 0.1 max-error net, over float16's 1e-2 relative RMS."""
    from rnn_gpu.bench import runner as bench_runner

    case = cases.Case("RNN", 16, 4, 8, 8, "float16", "cpu")
    ours = _Sums("ours", bias=0.03)
    rows = {r.runner: r for r in bench_runner.run_case(case, [ours, _Sums("peer", True)],
                                                         repeats=1)}
    assert rows["ours"].ms is None and rows["ours"].max_err < 0.1
    assert rows["ours"].error.startswith("wrong answer: relative RMS error 3.00e-02 against "
                                         "peer in float32 (tolerance 0.01)")
    # the same error in the peer: shown, and the peer is timed all the same (it is the bar)
    rows = {r.runner: r for r in bench_runner.run_case(
        case, [_Sums("ours"), _Sums("peer", True, bias=0.03)], repeats=1)}
    assert rows["peer"].error is None and rows["peer"].ms is not None
    assert rows["peer"].rms_err > 0.02 and rows["ours"].ok and rows["ours"].ratio is not None


def test_the_oracle_rounds_inputs_as_the_runners_cast_them():
    torch = pytest.importorskip("torch")
    a = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    for dtype in ("float16", "bfloat16"):
        oracle = cases.Case("RNN", 1, 1, 1, 1, dtype).float32_oracle()
        want = torch.from_numpy(a).to(getattr(torch, dtype)).float()
        assert np.array_equal(cases.round_inputs(a, oracle), want.numpy())
        assert torch.equal(cases.round_inputs(torch.from_numpy(a), oracle), want)
    assert cases.round_inputs(a, cases.Case("RNN", 1, 1, 1, 1, "float32")) is a


def test_the_float32_oracle_never_runs_in_tf32():
    """With TF32 allowed for both sides, the peer in float32 uses it (a fair race), but not as
    a half-precision case's oracle: TF32's 2^-11 is fp16's own roundoff."""
    torch = pytest.importorskip("torch")
    from rnn_gpu.bench.peers import _no_tf32

    rg.allow_tf32(True)
    try:
        with _no_tf32():
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with _no_tf32(oracle=True):
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        rg.allow_tf32(False)


def test_a_dry_run_lists_the_cases_and_times_nothing(capsys, monkeypatch, tmp_path):
    """``--dry-run`` checks and lists; it neither runs a case nor writes ``--json``."""
    from rnn_gpu.bench import runner

    def run_case(*args, **kwargs):
        raise AssertionError("a dry run timed a case")

    monkeypatch.setattr(runner, "run_case", run_case)
    path = tmp_path / "bench.json"
    assert main(["bench", "--dry-run", "--cell", "GRU,LSTM", "--shape", "4x8x8",
                 "--backend", "numpy", "--json", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "dry run: 2 cases on cpu, 10 repeats, runners: numpy, torch-cpu"
    assert out[1:] == ["  GRU 4×8×8 float32 forward", "  LSTM 4×8×8 float32 forward"]
    assert not path.exists()
    # what is checked still is: a backend's unknown variant
    assert main(["bench", "--dry-run", "--backend", "numpy:fast"]) == 2
    assert "the numpy backend has no variant 'fast'" in capsys.readouterr().err


def test_a_dry_run_notes_runners_that_serve_no_case_here(capsys, monkeypatch):
    """On a machine without a GPU, triton (no interpreter) serves nothing: said up front."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["bench", "--dry-run", "--cell", "GRU", "--shape", "4x8x8",
                 "--backend", "numpy,triton"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("  note: triton serves none of these cases here: ")
    assert not any("note: numpy" in line for line in out)


def test_bench_help_lists_every_backends_variants(capsys):
    from rnn_gpu import registry

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    for name in registry.names():
        for variant in (getattr(registry.get(name), "variants", None) or (lambda: ()))():
            assert f"{name}:{variant}" in text


def test_the_cudnn_peer_declines_bfloat16_below_compute_capability_8_on_the_case_card(
        monkeypatch):
    """torch.cuda.is_bf16_supported() answers for the current device, and says yes below 8.0
    where a bfloat16 tensor can be made (emulation): a V100 (7.0) was not declined, nor a
    case on cuda:1 judged by its own card."""
    torch = pytest.importorskip("torch")
    from rnn_gpu.bench.cases import Case
    from rnn_gpu.bench.peers import TorchRunner

    capability = {0: (9, 0), 1: (7, 0)}
    asked = []

    def get_device_capability(device=None):
        index = torch.device(device).index or 0
        asked.append(index)
        return capability[index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    runner = TorchRunner("cuda:1")
    old = Case("LSTM", 4, 2, 3, 5, dtype="bfloat16", device="cuda:1")
    assert runner.unavailable_reason(old) == ("bfloat16 needs compute capability 8.0, cuda:1 "
                                              "has 7.0")
    assert runner.unavailable_reason(Case("LSTM", 4, 2, 3, 5, dtype="float16",
                                          device="cuda:1")) is None
    assert TorchRunner("cuda").unavailable_reason(
        Case("LSTM", 4, 2, 3, 5, dtype="bfloat16", device="cuda:0")) is None
    assert set(asked) == {0, 1}
