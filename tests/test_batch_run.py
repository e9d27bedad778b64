"""``rnn-gpu run`` in process: results against the model itself, inputs and outputs of every
kind, bucketing, resume bookkeeping, out-of-memory halving, a full disk and bad input."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

import rnn_gpu as rg
from rnn_gpu._arrays import is_out_of_memory
from rnn_gpu.backends.numpy import NumpyBackend
from rnn_gpu.batch import apply_batch
from rnn_gpu.batch import sinks as batch_sinks
from rnn_gpu.batch.executors import LocalExecutor, _HostStaging
from rnn_gpu.batch.prefetch import prefetch
from rnn_gpu.cli import main

N, T, I, H = 300, 12, 5, 8


@pytest.fixture
def job(tmp_path):
    """A bidirectional LSTM with a Readout, N sequences with lengths in [0, T]."""
    model = rg.LSTM(I, H, num_layers=2, bidirectional=True, seed=3)
    model.readout = rg.Readout(2 * H, 3, seed=4)
    rg.save(model, tmp_path / "model.safetensors")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, T, I)).astype("float32")
    lengths = rng.integers(0, T + 1, N)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "lengths.npy", lengths)
    return tmp_path, model, x, lengths


def run_cli(capsys, *args) -> tuple[int, dict | None, str]:
    code = main(["run", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, (json.loads(out) if code == 0 else None), err


def job_args(d, output="out.npy", *extra):
    return [d / "model.safetensors", d / "x.npy", d / output, "--lengths", d / "lengths.npy",
            "--quiet", *extra]


@pytest.mark.parametrize("emit", ["last", "sequence", "probs"])
def test_outputs_equal_the_model_on_the_whole_dataset(job, capsys, emit):
    d, model, x, lengths = job
    code, summary, _ = run_cli(capsys, *job_args(d, "out.npy", "--emit", emit,
                                                  "--batch-size", "32", "--chunk-size", "96"))
    assert code == 0
    expected = apply_batch(model.eval(), x, lengths, emit=emit)
    got = np.load(d / "out.npy")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if emit != "last":      # zeros past each length, up to the dataset's T
        steps = np.arange(T)[None, :]
        assert not got[steps >= lengths[:, None]].any()
    assert summary["sequences"] == summary["computed"] == N
    assert summary["chunks"] == summary["chunks_written"] == 4 and summary["chunks_skipped"] == 0
    assert summary["backend"] == "numpy" and summary["batches_retried"] == 0


def test_shards_zarr_and_npy_inputs_and_outputs_agree(job, capsys):
    zarr = pytest.importorskip("zarr")
    d, _, x, lengths = job
    shards = d / "shards"
    shards.mkdir()
    for i, (a, b) in enumerate([(0, 100), (100, 110), (110, N)]):   # part10 sorts after part2
        np.save(shards / f"part{[1, 2, 10][i]}.npy", x[a:b])
    np.save(shards / "lengths.npy", lengths)                        # found beside the shards
    z = zarr.open_array(store=str(d / "x.zarr"), mode="w", shape=x.shape, chunks=(64, T, I),
                        dtype="float32")
    z[:] = x
    base = ["--emit", "sequence", "--batch-size", "50", "--quiet"]
    model = d / "model.safetensors"
    assert run_cli(capsys, *job_args(d, "ref.npy", *base[:-1]))[0] == 0
    code, _, err = run_cli(capsys, model, shards, d / "from_shards.zarr", *base[:-1])
    assert code == 0 and "lengths from" in err
    assert run_cli(capsys, model, d / "x.zarr", d / "from_zarr.npy", "--lengths",
                   shards / "lengths.npy", *base)[0] == 0
    ref = np.load(d / "ref.npy")
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(d / "from_shards.zarr"))), ref)
    np.testing.assert_array_equal(np.load(d / "from_zarr.npy"), ref)


def test_batches_are_padded_to_their_own_longest_sequence(job, capsys):
    d, model, x, _ = job
    lengths = np.where(np.arange(N) % 2, 2, T)          # alternating short and long
    np.save(d / "lengths.npy", lengths)
    seen = []

    class Recording(NumpyBackend):
        name = "test_recording"
        segment_costs = None            # every row for every step: only the buckets trim


        def forward_layer(self, problem, *args, **kwargs):
            seen.append((problem.batch, problem.seq_len))
            return super().forward_layer(problem, *args, **kwargs)

    rg.backends.register(Recording)
    try:
        for bucket in ([], ["--no-bucket"]):
            seen.clear()
            code, _, _ = run_cli(capsys, *job_args(d, f"out{len(bucket)}.npy", "--batch-size",
                                                   "50", "--chunk-size", "100", "--backend",
                                                   "test_recording", "--overwrite", *bucket))
            assert code == 0
            # minus the preflight: one row, one step, in each of the 4 layer-directions
            padded = sum(b * t for b, t in seen) - 4
            if bucket:
                assert padded == 4 * N * T              # 2 layers x 2 directions, all at T
            else:
                assert padded == 4 * (N // 2) * (T + 2)  # short batches run 2 steps only
    finally:
        rg.backends.unregister("test_recording")
    np.testing.assert_allclose(np.load(d / "out0.npy"), np.load(d / "out1.npy"), atol=1e-6)


def test_rerun_of_a_finished_job_computes_nothing(job, capsys):
    d = job[0]
    assert run_cli(capsys, *job_args(d, "out.npy", "--chunk-size", "100"))[0] == 0
    before = np.load(d / "out.npy")
    code, summary, _ = run_cli(capsys, *job_args(d, "out.npy", "--chunk-size", "100"))
    assert code == 0 and summary["computed"] == 0 and summary["chunks_skipped"] == 3
    np.testing.assert_array_equal(np.load(d / "out.npy"), before)
    manifest = json.loads((d / "out.npy.manifest.json").read_text())
    assert manifest["done"] == [[0, 3]] and manifest["complete"] is True


def test_another_job_on_the_same_output_is_refused_unless_overwrite(job, capsys):
    d = job[0]
    assert run_cli(capsys, *job_args(d))[0] == 0
    code, _, err = run_cli(capsys, *job_args(d, "out.npy", "--emit", "sequence"))
    assert code == 2 and "different job" in err and "emit" in err and "--overwrite" in err
    code, summary, _ = run_cli(capsys, *job_args(d, "out.npy", "--emit", "sequence",
                                                  "--overwrite"))
    assert code == 0 and summary["computed"] == N
    assert np.load(d / "out.npy").shape == (N, T, 2 * H)


@pytest.mark.parametrize("output, named", [("x.npy", "INPUT"), ("model.safetensors", "MODEL"),
                                            ("lengths.npy", "--lengths")])
def test_overwrite_never_replaces_the_jobs_own_files(job, capsys, output, named):
    """OUTPUT naming INPUT, MODEL or the lengths is a usage error before anything is touched,
    --overwrite or not (it used to delete the input and then fail reading it)."""
    d = job[0]
    before = (d / output).read_bytes()
    args = [d / "model.safetensors", d / "x.npy", d / output, "--lengths", d / "lengths.npy",
            "--quiet", "--overwrite"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and f"is also {named}" in err, err
    assert (d / output).read_bytes() == before
    # the same file through another spelling of its path
    code, _, err = run_cli(capsys, *args[:2], d / ".." / d.name / output, *args[3:])
    assert code == 2 and f"is also {named}" in err, err


def test_overwrite_never_deletes_a_directory_that_is_not_a_zarr_output(job, capsys):
    d = job[0]
    (d / "results").mkdir()
    (d / "results" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, *job_args(d, "results", "--overwrite"))
    assert code == 2 and "is a directory" in err, err
    (d / "store.zarr").mkdir()                                  # named like zarr, is not
    (d / "store.zarr" / "keep.txt").write_text("mine")
    from rnn_gpu.batch.errors import UsageError
    from rnn_gpu.batch.sinks import remove_output

    with pytest.raises(UsageError, match="not a zarr store; not deleting it"):
        remove_output(str(d / "store.zarr"))
    assert (d / "results" / "keep.txt").read_text() == "mine"
    assert (d / "store.zarr" / "keep.txt").read_text() == "mine"
    # a zarr output of an earlier job is still replaced
    pytest.importorskip("zarr")
    assert run_cli(capsys, *job_args(d, "out.zarr"))[0] == 0
    code, summary, err = run_cli(capsys, *job_args(d, "out.zarr", "--emit", "sequence",
                                                    "--overwrite"))
    assert code == 0 and summary["shape"] == [N, T, 2 * H], err


def test_an_output_inside_the_input_shard_directory_is_refused(job, capsys):
    d, _, x, _ = job
    (d / "shards").mkdir()
    np.save(d / "shards" / "part0.npy", x)
    code, _, err = run_cli(capsys, d / "model.safetensors", d / "shards",
                           d / "shards" / "out.npy", "--quiet", "--no-lengths")
    assert code == 2 and "lies inside INPUT" in err, err
    assert sorted(p.name for p in (d / "shards").iterdir()) == ["part0.npy"]


def test_an_output_not_written_by_a_job_is_refused(job, capsys):
    d = job[0]
    np.save(d / "out.npy", np.ones(3))
    code, _, err = run_cli(capsys, *job_args(d))
    assert code == 2 and "OUTPUT" in err and "no manifest" in err
    np.testing.assert_array_equal(np.load(d / "out.npy"), np.ones(3))   # untouched


class _OutOfMemoryAbove(NumpyBackend):
    """Fails like a device out of memory for batches larger than ``limit``."""

    name = "test_oom"
    limit = 20

    def forward_layer(self, problem, *args, **kwargs):
        if problem.batch > self.limit:
            raise MemoryError(f"test: no room for a batch of {problem.batch}")
        return super().forward_layer(problem, *args, **kwargs)


def test_out_of_memory_halves_the_batch_and_says_so(job, capsys):
    d, model, x, lengths = job
    rg.backends.register(_OutOfMemoryAbove)
    try:
        code, summary, err = run_cli(capsys, *job_args(d, "out.npy", "--batch-size", "64",
                                                       "--backend", "test_oom"))
    finally:
        rg.backends.unregister("test_oom")
    assert code == 0
    assert "out of memory on a batch of 64 sequences; retrying it in batches of 32" in err
    assert "batches of 16" in err
    assert summary["batches_retried"] == 2       # 64 -> 32 -> 16, then 16 is the ceiling
    np.testing.assert_allclose(np.load(d / "out.npy"), apply_batch(model.eval(), x, lengths),
                               rtol=1e-5, atol=1e-6)


def test_out_of_memory_is_recognised_by_type_name():
    class OutOfMemoryError(RuntimeError):      # what torch.cuda and cupy raise, by name
        pass

    assert is_out_of_memory(MemoryError()) and is_out_of_memory(OutOfMemoryError())
    assert not is_out_of_memory(RuntimeError("out of memory"))


def test_out_of_memory_for_one_sequence_is_a_runtime_failure(job, capsys):
    d = job[0]
    rg.backends.register(_OutOfMemoryAbove)
    _OutOfMemoryAbove.limit = 0
    try:
        executor = LocalExecutor(log=lambda msg: None)
        with pytest.raises(Exception, match="even for a batch of one sequence"):
            list(executor.map(rg.load(d / "model.safetensors").eval(),
                              [(0, np.zeros((4, 3, I), "float32"), None)], emit="last",
                              backend="test_oom"))
    finally:
        _OutOfMemoryAbove.limit = 20
        rg.backends.unregister("test_oom")


class _RecordingLookahead(_HostStaging):
    """The CUDA staging's protocol on the CPU: ``stage`` starts a copy, ``ready`` waits for it;
    records the order, so that the lookahead of LocalExecutor.map can be checked here."""

    def __init__(self, events):
        super().__init__("cpu")
        self.lookahead, self.events = True, events

    def stage(self, x):
        self.events.append(("stage", len(x)))
        return x.copy()

    def ready(self, staged):
        self.events.append(("ready", len(staged)))
        return staged


def test_cuda_staging_with_a_cpu_build_of_torch_copies_through_cupy():
    """A CUDA run on a machine with CuPy and a CPU build of torch: torch.cuda.Stream raised
    in the first stage(); the copies go through cupy.asarray then, as without torch."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("checks a CPU build of torch")
    assert _HostStaging("cuda:0").lookahead is False


def test_lookahead_stages_the_next_batch_first_and_survives_out_of_memory(job):
    d, model, x, lengths = job
    model = model.eval()
    events: list = []
    executor = LocalExecutor(log=lambda msg: None)
    executor._staging = _RecordingLookahead(events)
    sizes = [8, 24, 24, 5, 24]           # the limit is 20: the 24s go in halves of 12
    cuts = np.cumsum([0, *sizes])
    batches = [(i, x[a:b], lengths[a:b]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    rg.backends.register(_OutOfMemoryAbove)
    try:
        got = list(executor.map(model, iter(batches), emit="last", backend="test_oom"))
    finally:
        rg.backends.unregister("test_oom")
    assert [key for key, _ in got] == list(range(len(sizes)))
    for (_, out), (_, xb, lb) in zip(got, batches):
        np.testing.assert_allclose(out, apply_batch(model, xb, lb), rtol=1e-5, atol=1e-6)
    assert executor.batches_retried == 1
    halves = [("stage", 12), ("ready", 12)] * 2           # copied one at a time, no lookahead
    assert events == [
        ("stage", 8), ("stage", 24), ("ready", 8),        # batch 1 is staged before 0 runs
        ("stage", 24), ("ready", 24), *halves,            # batch 2 too; batch 1 runs out of
        ("stage", 5), *halves,                            # memory: ceiling 12, batch 2's copy
        ("ready", 5),                                     # is dropped; batch 4 is above the
        *halves]                                          # ceiling, so not staged whole


def test_full_disk_keeps_what_was_written_and_a_rerun_resumes(job, capsys, monkeypatch):
    d, model, x, lengths = job
    real_write, calls = batch_sinks.NpyWriter.write, []

    def write_until_full(self, start, rows):
        calls.append(start)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, start, rows)

    monkeypatch.setattr(batch_sinks.NpyWriter, "write", write_until_full)
    from rnn_gpu.batch import cli as batch_cli

    kept, real_fail = [], batch_cli._fail      # the error kept, as a caller's handler may keep it
    monkeypatch.setattr(batch_cli, "_fail", lambda exc: kept.append(exc) or real_fail(exc))
    args = job_args(d, "out.npy", "--chunk-size", "50")
    code, _, err = run_cli(capsys, *args)
    assert code == 1
    assert "no space left on device while writing chunk 2 (rows 100:150)" in err
    assert "2 chunks recorded" in err and "rerun the same command" in err
    manifest = json.loads((d / "out.npy.manifest.json").read_text())
    assert manifest["done"] == [[0, 2]]                 # untouched by the failed chunk
    # the reader thread stopped with the run, though the error (and its traceback, with the
    # run's frames) is still held: it had read on until the traceback was dropped
    import threading
    import time

    deadline = time.monotonic() + 2
    while any(t.name == "rnn-gpu-reader" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the reader thread outlived the failed run"
        time.sleep(0.05)
    monkeypatch.setattr(batch_sinks.NpyWriter, "write", real_write)
    code, summary, _ = run_cli(capsys, *args)
    assert code == 0 and summary["chunks_skipped"] == 2 and summary["chunks_written"] == 4
    np.testing.assert_allclose(np.load(d / "out.npy"), apply_batch(model.eval(), x, lengths),
                               rtol=1e-5, atol=1e-6)


def _bad(d, name):
    """Arguments for one bad case, and words the error must contain."""
    model, x, lengths = d / "model.safetensors", d / "x.npy", d / "lengths.npy"
    out = d / "out.npy"
    cases = {
        "missing model": ([d / "nope.safetensors", x, out], ["MODEL", "no such file"]),
        "model not safetensors": ([lengths, x, out], ["MODEL", "rnn_gpu.save"]),
        "missing input": ([model, d / "nope.npy", out], ["INPUT", "no such file"]),
        "input not npy": ([model, model, out], ["INPUT", "expected a .npy file"]),
        "input_size mismatch": ([model, d / "wrong_i.npy", out],
                                ["INPUT", f"input_size {I}", f"got shape (4, {T}, 3)"]),
        "input ndim": ([model, d / "two_d.npy", out], ["INPUT", "(N, T, I)", "2 dimensions"]),
        "input not float": ([model, d / "ints.npy", out], ["INPUT", "floating", "int64"]),
        "lengths count": ([model, x, out, "--lengths", d / "short_lengths.npy"],
                          ["--lengths", f"expected {N} lengths", "got 7"]),
        "lengths range": ([model, x, out, "--lengths", d / "long_lengths.npy"],
                          ["--lengths", f"[0, {T}]", f"got {T + 1}"]),
        "batch size": ([model, x, out, "--batch-size", "0"], ["--batch-size", "got 0"]),
        "probs without readout": ([d / "bare.safetensors", x, out, "--emit", "probs"],
                                  ["--emit", "Readout"]),
        "unknown backend": ([model, x, out, "--backend", "nosuch"],
                            ["--backend: backend 'nosuch' (chosen by --backend)"]),
        "backend declines": ([model, x, out, "--backend", "triton"],
                             ["--backend: backend 'triton' (chosen by --backend) cannot serve",
                              f"T={T} B=256 "]),
        "no cuda": ([model, x, out, "--device", "cuda"], ["--device"]),
        "output folder missing": ([model, x, d / "no" / "out.npy"], ["OUTPUT", "does not exist"]),
        "output not npy": ([model, x, d / "out.txt"],         # was written as NPY under .txt
                           ["OUTPUT: expected a path ending in .npy", "or .zarr", "out.txt"]),
    }
    return cases[name]


@pytest.mark.parametrize("name", [
    "missing model", "model not safetensors", "missing input", "input not npy",
    "input_size mismatch", "input ndim", "input not float", "lengths count", "lengths range",
    "batch size", "probs without readout", "unknown backend", "backend declines", "no cuda",
    "output folder missing", "output not npy"])
def test_bad_input_is_a_usage_error_that_names_the_argument(job, capsys, monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)    # triton then declines the CPU
    d = job[0]
    np.save(d / "wrong_i.npy", np.zeros((4, T, 3), "float32"))
    np.save(d / "two_d.npy", np.zeros((4, T), "float32"))
    np.save(d / "ints.npy", np.zeros((4, T, I), "int64"))
    np.save(d / "short_lengths.npy", np.ones(7, "int64"))
    np.save(d / "long_lengths.npy", np.full(N, T + 1))
    rg.save(rg.GRU(I, H), d / "bare.safetensors")
    args, words = _bad(d, name)
    code, _, err = run_cli(capsys, *args, "--quiet")
    assert code == 2, err
    for word in words:
        assert word in err
    assert not os.path.exists(d / "out.npy")            # nothing written before the check


def test_a_backend_named_by_the_environment_is_reported_as_such(job, capsys, monkeypatch):
    monkeypatch.setenv("RNN_GPU_BACKEND", "nosuch")
    code, _, err = run_cli(capsys, *job_args(job[0]))
    assert code == 2 and err.startswith("rnn-gpu run: RNN_GPU_BACKEND: backend 'nosuch'"), err


def test_scheduler_without_dask_says_how_to_install_it(job, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rnn_gpu.dask", None)    # import fails as if missing
    code, _, err = run_cli(capsys, *job_args(job[0], "out.npy", "--scheduler", "tcp://x:1"))
    assert code == 2 and "--scheduler" in err and 'pip install "rnn-gpu[dask]"' in err


def test_prefetch_keeps_order_and_reraises_the_producers_error():
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(job, capsys,
                                                                              monkeypatch):
    from rnn_gpu.batch import run as batch_run
    from rnn_gpu.batch.sinks import OutputLock

    made = []
    monkeypatch.setattr(batch_run, "_executor", lambda opts, log: made.append(1))
    d = job[0]
    lock = OutputLock(str(d / "out.npy"))         # as a run in progress holds it
    try:
        code, _, err = run_cli(capsys, *job_args(d))
    finally:
        lock.release()
    assert code == 2 and "another rnn-gpu run is writing" in err
    assert made == []          # no executor (a Dask client) opened for a refused run
    monkeypatch.undo()
    assert run_cli(capsys, *job_args(d))[0] == 0  # released: free again


def test_full_disk_while_recording_a_chunk_leaves_the_old_manifest(job, capsys, monkeypatch):
    d = job[0]
    real_replace, calls = os.replace, []

    def replace_until_full(src, dst):
        if str(dst).endswith(".manifest.json"):
            calls.append(dst)
            if len(calls) == 3:          # the fresh manifest, chunk 0, then chunk 1 fails
                raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_until_full)
    code, _, err = run_cli(capsys, *job_args(d, "out.npy", "--chunk-size", "100"))
    assert code == 1 and "no space left on device while writing chunk 1" in err
    assert "The 1 chunk recorded" in err
    assert json.loads((d / "out.npy.manifest.json").read_text())["done"] == [[0, 1]]
    assert not list(d.glob("*.tmp-*"))                  # no temporary left behind


def test_an_input_that_fails_while_reading_is_a_runtime_failure(job, capsys, monkeypatch):
    from rnn_gpu.batch import sources

    d = job[0]
    real_read = sources.NpyFile.read

    def read_then_fail(self, start, stop):
        if start >= 100:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self, start, stop)

    monkeypatch.setattr(sources.NpyFile, "read", read_then_fail)
    code, _, err = run_cli(capsys, *job_args(d, "out.npy", "--chunk-size", "100"))
    assert code == 1 and "INPUT: reading" in err and "Input/output error" in err
    assert "The 1 chunk recorded" in err


def test_lengths_stored_as_whole_floats_are_taken_and_fractions_refused(job, capsys):
    """As the layers take them: a float lengths file of whole numbers is read as integers; a
    fraction or NaN is a usage error naming the first one."""
    d, model, x, lengths = job
    np.save(d / "float_lengths.npy", lengths.astype("float64"))
    code, _, err = run_cli(capsys, d / "model.safetensors", d / "x.npy", d / "out.npy",
                           "--lengths", d / "float_lengths.npy", "--quiet")
    assert code == 0, err
    np.testing.assert_allclose(np.load(d / "out.npy"), apply_batch(model.eval(), x, lengths),
                               rtol=1e-5, atol=1e-6)
    half = lengths.astype("float64")
    half[4] = 2.5
    np.save(d / "half_lengths.npy", half)
    code, _, err = run_cli(capsys, d / "model.safetensors", d / "x.npy", d / "out2.npy",
                           "--lengths", d / "half_lengths.npy", "--quiet")
    assert code == 2 and "--lengths: expected integers, got 2.5 at index 4" in err, err


class _AtMost(NumpyBackend):
    """A plugin that serves batches of up to 50 sequences (a size limit, as a GPU backend's
    shared memory may impose)."""

    name, priority = "test_at_most_50", 10

    def not_supported_reasons(self, problem):
        return ([f"test_at_most_50 takes batches of up to 50, not {problem.batch}"]
                if problem.batch > 50 else super().not_supported_reasons(problem))


@pytest.mark.parametrize("backend", ["--backend", "auto"])
def test_the_backend_is_chosen_for_the_jobs_batches_before_anything_is_written(job, capsys,
                                                                               backend):
    """The backend was checked on one step of one sequence only: named, a plugin that declines
    the run's batches failed after the output was created (exit 1); chosen automatically, the
    batches ran on NumPy while the summary named the plugin."""
    d, model, x, lengths = job
    name = ["--backend", _AtMost.name] if backend == "--backend" else []
    rg.backends.register(_AtMost)
    try:
        code, summary_big, err = run_cli(capsys, *job_args(d, "big.npy", "--batch-size", "128",
                                                           *name))
        code_small, summary, _ = run_cli(capsys, *job_args(d, "small.npy", "--batch-size",
                                                            "32", *name))
    finally:
        rg.backends.unregister(_AtMost.name)
    if backend == "--backend":
        assert code == 2 and not os.path.exists(d / "big.npy"), err
        assert ("--backend: backend 'test_at_most_50' (chosen by --backend) cannot serve "
                f"lstm T={T} B=128 ") in err and "up to 50, not 128" in err
    else:
        assert code == 0 and summary_big["backend"] == "numpy"      # batches ran there
    assert code_small == 0 and summary["backend"] == _AtMost.name
    np.testing.assert_allclose(np.load(d / "small.npy"),
                               apply_batch(model.eval(), x, lengths, emit="last"),
                               rtol=1e-5, atol=1e-6)


def test_a_zarr_input_rewritten_in_place_is_another_job(job, capsys):
    """The manifest knew a zarr input by path, shape and dtype only: a store regenerated with
    other data of the same shape was resumed, and the output mixed old and new results."""
    zarr = pytest.importorskip("zarr")
    d, _, x, _ = job
    def write(data):
        z = zarr.open_array(store=str(d / "x.zarr"), mode="w", shape=data.shape,
                            chunks=(64, T, I), dtype=data.dtype)
        z[...] = data

    write(x)
    args = [d / "model.safetensors", d / "x.zarr", d / "out.npy", "--quiet", "--no-lengths"]
    assert run_cli(capsys, *args)[0] == 0
    write(x[::-1].copy())                                   # other data, the same shape
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "different job (it differs in: input)" in err, err


@pytest.mark.parametrize("values, shown", [(np.array([1e20] * N), "got 100000000000000000000"),
                                           (np.full(N, 2**63 + 5, np.uint64),
                                            f"got {2**63 + 5}")])
def test_lengths_out_of_range_are_shown_as_given(job, capsys, values, shown):
    """Cast to int64 before the range check, 1e20 and 2**63 + 5 were reported as negative."""
    d = job[0]
    np.save(d / "huge.npy", values)
    code, _, err = run_cli(capsys, *job_args(d)[:3], "--lengths", d / "huge.npy", "--quiet")
    assert code == 2 and f"expected lengths in [0, T] = [0, {T}], {shown} at index 0" in err, err


def test_an_output_directory_without_room_for_the_lock_is_a_usage_error(job, capsys,
                                                                         monkeypatch):
    """OutputLock's os.open was unguarded: a read-only directory (or /proc) gave a
    traceback."""
    from rnn_gpu.batch import sinks

    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sinks.os, "open", refusing)
    code, _, err = run_cli(capsys, *job_args(job[0]))
    assert code == 2 and "OUTPUT: cannot create the lock file" in err and "writable" in err, err


def test_a_zarr_output_that_lost_its_metadata_can_be_overwritten(job, capsys):
    """A .zarr output of ours whose zarr.json was lost (an --overwrite cut short, a power cut)
    could be neither resumed nor overwritten: "not a zarr store; not deleting it"."""
    pytest.importorskip("zarr")
    d = job[0]
    assert run_cli(capsys, *job_args(d, "out.zarr"))[0] == 0
    for name in ("zarr.json", ".zarray", ".zattrs"):
        if (d / "out.zarr" / name).exists():
            (d / "out.zarr" / name).unlink()
    code, summary, err = run_cli(capsys, *job_args(d, "out.zarr", "--overwrite"))
    assert code == 0 and summary["computed"] == N, err


def test_an_output_named_like_the_inputs_lengths_is_not_taken_for_them(job, capsys):
    """OUTPUT data.lengths.npy beside INPUT data.npy: the first run had no lengths, and its
    resume took the partly written output for them."""
    d, model, x, _ = job
    args = [d / "model.safetensors", d / "x.npy", d / "x.lengths.npy", "--quiet"]
    assert run_cli(capsys, *args)[0] == 0
    code, summary, err = run_cli(capsys, *args)
    assert code == 0 and summary["computed"] == 0, err
    np.testing.assert_allclose(np.load(d / "x.lengths.npy"),
                               apply_batch(model.eval(), x, None), rtol=1e-5, atol=1e-6)


def test_a_lost_dask_connection_is_not_reported_as_an_input_error(job):
    """distributed's CommClosedError is an OSError, and was reported as "INPUT: reading ...
    failed"."""
    from rnn_gpu.batch.errors import RunFailure
    from rnn_gpu.batch.run import RunOptions, run

    CommClosedError = type("CommClosedError", (OSError,), {"__module__": "distributed.comm"})

    class Lost(LocalExecutor):
        def map(self, *args, **kwargs):
            raise CommClosedError("in <TCP (closed)>: Stream is closed")
            yield

    d = job[0]
    opts = RunOptions(model=str(d / "model.safetensors"), input=str(d / "x.npy"),
                      output=str(d / "out.npy"), quiet=True)
    with pytest.raises(RunFailure, match=r"--scheduler: the connection to the Dask cluster was "
                                         r"lost \(CommClosedError: .*Stream is closed\)"):
        run(opts, executor=Lost(log=lambda msg: None))


@pytest.mark.parametrize("interpret", [True, False])
def test_bfloat16_runs_where_a_backend_serves_it(job, capsys, monkeypatch, interpret):
    """--dtype bfloat16 failed with a traceback: the runner reads bfloat16 data as float32
    (NumPy has none) and the layer refused it. Without a backend for it, a usage error."""
    pytest.importorskip("triton")
    d, model, x, lengths = job
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = 6                                              # the interpreter is slow
    np.save(d / "few.npy", x[:rows])
    np.save(d / "few_lengths.npy", lengths[:rows])
    code, _, err = run_cli(capsys, d / "model.safetensors", d / "few.npy", d / "bf.npy",
                           "--lengths", d / "few_lengths.npy", "--dtype", "bfloat16",
                           "--emit", "sequence", "--quiet")
    if not interpret:
        assert code == 2 and "--device/--dtype: no backend can serve" in err
        assert "bfloat16 on cpu" in err and not os.path.exists(d / "bf.npy")
        return
    assert code == 0, err
    got = np.load(d / "bf.npy")
    want = apply_batch(model.eval(), x[:rows], lengths[:rows], emit="sequence")
    assert got.dtype == np.float32
    assert np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)) < 2e-2


def test_shards_are_ordered_by_number_then_name_whatever_the_listing(tmp_path, monkeypatch):
    """part1 and part01 compared equal as numbers, so their order was the file system's
    listing order, which may differ between machines (and between a run and its resume)."""
    from rnn_gpu.batch import sources

    folder = tmp_path / "shards"
    folder.mkdir()
    for name, value in (("part10", 10), ("part2", 2), ("part1", 1), ("part01", 0)):
        np.save(folder / f"{name}.npy", np.full((1, 2, 3), value, "float32"))
    real_listdir = os.listdir
    orders = []
    for reverse in (False, True):
        monkeypatch.setattr(sources.os, "listdir",
                            lambda p, r=reverse: sorted(real_listdir(p), reverse=r))
        source = sources.open_input(str(folder))
        orders.append(source.read(0, 4)[:, 0, 0].tolist())
    assert orders == [[0, 1, 2, 10]] * 2


def test_two_paths_to_one_output_take_one_lock(job, capsys):
    """The lock was named after OUTPUT as written: through a symlink to the output file, a
    second run took another lock and could write the same file at once."""
    from rnn_gpu.batch.sinks import OutputLock

    d = job[0]
    assert run_cli(capsys, *job_args(d, "out.npy"))[0] == 0
    (d / "alias.npy").symlink_to(d / "out.npy")
    lock = OutputLock(str(d / "out.npy"))             # a run writing through the real path
    try:
        code, _, err = run_cli(capsys, *job_args(d, "alias.npy"))
    finally:
        lock.release()
    assert code == 2 and "another rnn-gpu run is writing" in err, err


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc")
def test_a_zarr_output_is_on_disk_before_the_manifest_names_its_chunks(job, capsys, monkeypatch):
    """The npy path fsyncs each chunk (and with it the file's header) before the manifest
    records it; zarr's metadata (zarr.json) and the folders zarr creates for a chunk
    (c/<i>/0/) were never fsynced, so a crash after a run could leave recorded chunks beside
    missing metadata, or chunk files whose names were lost (read back as zeros)."""
    pytest.importorskip("zarr")
    d = job[0]
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert run_cli(capsys, *job_args(d, "out.zarr", "--chunk-size", "96"))[0] == 0
    store = os.path.realpath(d / "out.zarr")
    manifests = [i for i, p in enumerate(synced) if ".manifest.json.tmp-" in p]
    assert len(manifests) == 1 + 4            # the job, then one record per chunk
    metadata = [m for m in ("zarr.json", ".zarray") if os.path.exists(os.path.join(store, m))]
    first_record = manifests[1]
    for path in [os.path.join(store, m) for m in metadata] + [store]:
        assert path in synced[:first_record], path
    for chunk in range(4):
        chunk_file = next(p for p in (os.path.join(store, "c", str(chunk), "0"),   # (N, 2H)
                                      os.path.join(store, f"{chunk}.0")) if os.path.exists(p))
        before = synced[:manifests[1 + chunk]]
        folder = os.path.dirname(chunk_file)
        assert chunk_file in before
        while folder != os.path.dirname(store):          # every folder up to the store's
            assert folder in before, (chunk, folder)
            folder = os.path.dirname(folder)


def test_a_refused_run_leaves_no_lock_file_behind(job, capsys):
    """OUTPUT.lock was created before the output was examined, so a run refused by those
    checks (OUTPUT exists and is not this job's) left an empty lock file beside it."""
    d = job[0]
    (d / "other.npy").write_bytes(b"not ours")
    code, _, err = run_cli(capsys, *job_args(d, "other.npy"))
    assert code == 2 and "exists and was not written by this job" in err, err
    assert not (d / "other.npy.lock").exists()
    assert (d / "other.npy").read_bytes() == b"not ours"
    # a run leaves its lock file (the README says so); another job refused later keeps it
    assert run_cli(capsys, *job_args(d, "out.npy"))[0] == 0
    assert (d / "out.npy.lock").exists()
    code, _, err = run_cli(capsys, *job_args(d, "out.npy", "--emit", "sequence"))
    assert code == 2 and "belongs to a different job" in err, err
    assert (d / "out.npy.lock").exists()


def test_a_lock_file_removed_by_a_refused_run_is_not_a_lock_any_more(job, monkeypatch):
    """A refused run removes the lock file it made while it holds the lock. A run that opened
    that file just before then locks a file no longer at the path, which a third run would
    not see: it must start again with the file that is there."""
    import fcntl

    from rnn_gpu.batch.sinks import OutputLock

    d = job[0]
    refused = OutputLock(str(d / "out.npy"))            # created the file, holds the lock
    assert refused.created
    real_flock, calls = fcntl.flock, []

    def flock_after_the_refusal(fd, op):
        calls.append(fd)
        if len(calls) == 1:                 # we opened the file; the refused run lets go now
            refused.discard()
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_refusal)
    second = OutputLock(str(d / "out.npy"))
    monkeypatch.setattr(fcntl, "flock", real_flock)
    try:
        assert len(calls) == 2 and second.created          # locked the new file, not the old
        assert os.path.samestat(os.fstat(second._fd), os.stat(d / "out.npy.lock"))
        with pytest.raises(batch_sinks.UsageError, match="another rnn-gpu run is writing"):
            OutputLock(str(d / "out.npy"))
    finally:
        second.release()


def test_the_output_is_checked_before_the_dask_scheduler_is_contacted(job, capsys,
                                                                      monkeypatch):
    """With --scheduler the client connected before OUTPUT was examined: a usage error there
    (OUTPUT not this job's) cost a connection, or the wait for a scheduler that is down."""
    from rnn_gpu.batch import run as batch_run
    from rnn_gpu.batch.errors import UsageError

    contacted = []

    def unreachable(opts, log):
        contacted.append(opts.scheduler)
        raise UsageError(f"--scheduler: cannot connect to a Dask scheduler at "
                         f"{opts.scheduler!r}: timed out")

    monkeypatch.setattr(batch_run, "_executor", unreachable)
    d = job[0]
    (d / "other.npy").write_bytes(b"not ours")
    scheduler = ["--scheduler", "tcp://127.0.0.1:9"]
    code, _, err = run_cli(capsys, *job_args(d, "other.npy", *scheduler))
    assert code == 2 and "OUTPUT:" in err and "was not written by this job" in err, err
    assert contacted == []
    # the checks passed (--overwrite): the connection is tried, and fails before the old
    # output is deleted
    code, _, err = run_cli(capsys, *job_args(d, "other.npy", *scheduler, "--overwrite"))
    assert code == 2 and "--scheduler: cannot connect" in err, err
    assert contacted == ["tcp://127.0.0.1:9"]
    assert (d / "other.npy").read_bytes() == b"not ours"
    assert not (d / "other.npy.manifest.json").exists() and not (d / "other.npy.lock").exists()


def test_a_zarr_output_without_zarr_installed_is_refused_before_anything_is_written(
        job, capsys, monkeypatch):
    """Refused at the output's checks, leaving the folder as it was: the check at the sink's
    opening came after the manifest and the lock file had been written beside OUTPUT."""
    import sys

    d = job[0]
    before = sorted(p.name for p in d.iterdir())
    monkeypatch.setitem(sys.modules, "zarr", None)          # import zarr -> ImportError
    code, _, err = run_cli(capsys, *job_args(d, "out.zarr"))
    assert code == 2 and "OUTPUT: reading or writing zarr needs the zarr package" in err, err
    assert sorted(p.name for p in d.iterdir()) == before


def test_an_old_output_that_cannot_be_removed_fails_clearly_and_vouches_for_nothing(
        job, capsys, monkeypatch):
    """--overwrite of a zarr output whose removal fails half way: exit 1 with the reason, no
    traceback, and no manifest left to vouch for chunks that may be gone (a rerun resumed
    them, reading zeros where the files had been)."""
    import errno as _errno
    import shutil

    pytest.importorskip("zarr")
    d = job[0]
    assert run_cli(capsys, *job_args(d, "out.zarr"))[0] == 0
    real_rmtree = shutil.rmtree

    def half_then_fail(path, *args, **kwargs):
        chunks = os.path.join(path, "c")
        if os.path.isdir(chunks):
            real_rmtree(chunks)                 # some chunk files gone ...
        raise PermissionError(_errno.EACCES, "Permission denied", path)   # ... then refused

    monkeypatch.setattr(batch_sinks.shutil, "rmtree", half_then_fail)
    code, _, err = run_cli(capsys, *job_args(d, "out.zarr", "--overwrite"))
    assert code == 1 and "cannot remove the old output" in err and "Permission denied" in err
    assert not os.path.exists(batch_sinks.manifest_path(str(d / "out.zarr")))
    monkeypatch.setattr(batch_sinks.shutil, "rmtree", real_rmtree)
    code, _, err = run_cli(capsys, *job_args(d, "out.zarr"))      # no resume of gone chunks
    assert code == 2, err
    code, summary, err = run_cli(capsys, *job_args(d, "out.zarr", "--overwrite"))
    assert code == 0 and summary["shape"][0] == N, err
