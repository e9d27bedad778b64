"""rnn_gpu.dask: a model mapped over a Dask array, and the executor behind `run --scheduler`.

Every result is compared with :func:`rnn_gpu.batch.apply_batch` run locally on the same data;
the cluster is two worker processes, started once for the module (a start costs ~1.5 s).
"""

from __future__ import annotations

import gc
import pickle
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="rnn_gpu.dask needs dask[array]")
distributed = pytest.importorskip("distributed", reason="rnn_gpu.dask needs distributed")

import rnn_gpu as rg  # noqa: E402
import rnn_gpu.dask as rgd  # noqa: E402
from rnn_gpu.batch import apply_batch  # noqa: E402

N, T, I, H, C = 23, 6, 5, 7, 3
TOL = dict(rtol=1e-10, atol=1e-12)          # float64 (DESIGN §6)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture
def model(rng):
    m = rg.LSTM(I, H, num_layers=2, bidirectional=True, dtype="float64",
                seed=int(rng.integers(2**31)))
    m.readout = rg.Readout(2 * H, C, dtype="float64", seed=int(rng.integers(2**31)))
    return m


@pytest.fixture
def data(rng):
    x = rng.standard_normal((N, T, I))
    lengths = rng.integers(0, T + 1, N)
    return x, lengths


# ---------------------------------------------------------------------- the local path

def test_importing_rnn_gpu_never_imports_dask():
    code = ("import sys, rnn_gpu, rnn_gpu.batch, rnn_gpu.cli, rnn_gpu.dask; "
            "print([m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_missing_dask_says_how_to_install(monkeypatch, model, data):
    monkeypatch.setitem(sys.modules, "distributed", None)      # makes `import distributed` fail
    with pytest.raises(ImportError, match=r'pip install "rnn-gpu\[dask\]"'):
        rgd.DaskExecutor("tcp://127.0.0.1:8786")
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r'pip install "rnn-gpu\[dask\]"'):
        rgd.apply(model, data[0])


# ---------------------------------------------------------------------- apply

@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("emit", ["last", "sequence", "probs"])
def test_apply_on_cluster_equals_local(client, model, data, emit, with_lengths):
    x, lengths = data
    lengths = lengths if with_lengths else None
    # Uneven row chunks, and T split too: apply must rechunk T and features to one chunk.
    array = da.from_array(x, chunks=((10, 6, 7), (4, 2), (I,)))
    lazy = rgd.apply(model, array, None if lengths is None else da.from_array(lengths, 5),
                     emit=emit)
    out = client.compute(lazy).result()
    expected = apply_batch(model, x, lengths, emit=emit)
    np.testing.assert_allclose(out, expected, **TOL)
    assert lazy.shape == out.shape and lazy.dtype == out.dtype == expected.dtype
    assert lazy.chunks[0] == (10, 6, 7)                       # chunked along N like the input
    assert all(len(c) == 1 for c in lazy.chunks[1:])


def test_apply_model_path_and_numpy_lengths(client, model, data, tmp_path):
    x, lengths = data
    path = tmp_path / "model.safetensors"
    rg.save(model, path)
    lazy = rgd.apply(str(path), da.from_array(x, chunks=(8, T, I)), lengths, emit="probs")
    np.testing.assert_allclose(client.compute(lazy).result(),
                               apply_batch(model, x, lengths, emit="probs"), **TOL)


def test_apply_sub_batches_bound_rows_per_call(monkeypatch, model, data):
    x, lengths = data
    sizes = []

    def recording_apply_batch(m, xb, lb, **kw):
        sizes.append(xb.shape[0])
        return apply_batch(m, xb, lb, **kw)

    monkeypatch.setattr(rgd, "apply_batch", recording_apply_batch)
    lazy = rgd.apply(model, da.from_array(x, chunks=(10, T, I)), lengths, emit="sequence",
                     batch_size=4)
    out = lazy.compute(scheduler="sync")                       # in-process: the recorder sees it
    np.testing.assert_allclose(out, apply_batch(model, x, lengths, emit="sequence"), **TOL)
    assert max(sizes) <= 4 and sum(sizes) == N


def test_float_lengths_are_taken_alike_by_the_layers_the_cli_and_apply(model, data, tmp_path,
                                                                      capsys):
    """Whole numbers stored as floats (a lengths file saved as float64) are lengths for the
    layers and for `rnn-gpu run --lengths`; apply refused them (TypeError for any float
    dtype), so the same data ran through two entry points and not the third. A fraction is
    refused by all three, naming the lengths."""
    from rnn_gpu.cli import main

    x, lengths = data
    whole = lengths.astype("float64")
    expected = apply_batch(model, x, lengths, emit="last")
    np.testing.assert_allclose(apply_batch(model, x, whole, emit="last"), expected, **TOL)
    for given in (whole, da.from_array(whole, chunks=10)):
        out = rgd.apply(model, da.from_array(x, chunks=(10, T, I)), given).compute(
            scheduler="sync")
        np.testing.assert_allclose(out, expected, **TOL)
    rg.save(model, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "whole.npy", whole)
    assert main(["run", str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"),
                 str(tmp_path / "out.npy"), "--lengths", str(tmp_path / "whole.npy"),
                 "--quiet"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, **TOL)

    half = whole.copy()
    half[4] = 2.5
    with pytest.raises(TypeError, match=r"lengths: expected integers.*2\.5"):
        model(x.transpose(1, 0, 2), lengths=half)     # the layers: time-major (T, B, I)
    with pytest.raises(TypeError, match=r"lengths: expected integers.*2\.5"):
        rgd.apply(model, da.from_array(x, chunks=(10, T, I)), half)
    with pytest.raises(TypeError, match=r"lengths: expected integers.*2\.5"):
        rgd.apply(model, da.from_array(x, chunks=(10, T, I)),
                  da.from_array(half, chunks=10)).compute(scheduler="sync")
    np.save(tmp_path / "half.npy", half)
    capsys.readouterr()
    assert main(["run", str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"),
                 str(tmp_path / "half.npy.out.npy"), "--lengths", str(tmp_path / "half.npy"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--lengths: expected integers, got 2.5 at index 4" in err and "Traceback" not in err


def test_apply_empty_array(model):
    out = rgd.apply(model, da.zeros((0, T, I), chunks=(5, T, I), dtype="float64")).compute(
        scheduler="sync")
    assert out.shape == (0, 2 * H)


@pytest.mark.parametrize("case, error, match", [
    ("numpy array", TypeError, "array: expected a dask.array.Array"),
    ("2-d array", ValueError, "array: expected shape"),
    ("wrong input size", ValueError, "array: expected input_size=5"),
    ("wrong dtype", TypeError, "array: dtype float32 does not match"),
    ("unknown backend", ValueError, r"backend: unknown name 'nmupy'; registered backends are"),
    ("lengths too short", ValueError, r"lengths: expected shape \(23,\)"),
    ("lengths 2-d", ValueError, "lengths: expected shape"),
    ("float lengths", TypeError, r"lengths: expected integers, got dtype float64 with "
                                 r"lengths\[4\] = 2.5"),
    ("lengths past T", ValueError, rf"lengths: expected every length in \[0, T={T}\], got "
                                   rf"\[{T + 1}\] \(at index 3\)"),
    ("unknown emit", ValueError, "emit: expected one of last, sequence, probs"),
    ("probs without readout", ValueError, "emit: 'probs' needs a model saved with a Readout"),
    ("zero batch_size", ValueError, "batch_size: expected a positive int"),
    ("not a model", TypeError, "model: expected an rnn_gpu layer"),
])
def test_apply_bad_input_names_the_argument(model, data, case, error, match):
    x, lengths = data
    array = da.from_array(x, chunks=(10, T, I))
    kwargs = dict(model=model, array=array)
    if case == "numpy array":
        kwargs["array"] = x
    elif case == "2-d array":
        kwargs["array"] = array[:, 0]
    elif case == "wrong input size":
        kwargs["array"] = array[:, :, :4]
    elif case == "wrong dtype":
        kwargs["array"] = array.astype("float32")
    elif case == "unknown backend":                 # before: only at compute(), 9 frames deep
        kwargs["backend"] = "nmupy"
    elif case == "lengths too short":
        kwargs["lengths"] = lengths[:-1]
    elif case == "lengths 2-d":
        kwargs["lengths"] = lengths[:, None]
    elif case == "float lengths":                   # whole floats are taken; 2.5 is not
        kwargs["lengths"] = lengths.astype("float64")
        kwargs["lengths"][4] = 2.5
    elif case == "lengths past T":                  # NumPy lengths: checked at once
        kwargs["lengths"] = lengths.copy()
        kwargs["lengths"][3] = T + 1
    elif case == "unknown emit":
        kwargs["emit"] = "everything"
    elif case == "probs without readout":
        model.readout = None
        kwargs["emit"] = "probs"
    elif case == "zero batch_size":
        kwargs["batch_size"] = 0
    elif case == "not a model":
        kwargs["model"] = object()
    with pytest.raises(error, match=match):
        rgd.apply(**kwargs)


def test_shipped_model_pickles_without_its_cache_and_rebuilds_the_same_layer(model):
    shipped = rgd._ShippedModel(model)
    assert shipped.model("cpu") is shipped.model("cpu")           # built once per process
    again = pickle.loads(pickle.dumps(shipped))
    assert again._models == {} and again.token == shipped.token
    rebuilt = again.model("cpu")
    assert rebuilt.config() == model.config()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(rebuilt.state_dict()[name], value)
    for name, value in model.readout.state_dict().items():
        np.testing.assert_array_equal(rebuilt.readout.state_dict()[name], value)


# ---------------------------------------------------------------------- the executor

def _batches(x, lengths, size):
    for i, start in enumerate(range(0, len(x), size)):
        rows = slice(start, start + size)
        yield f"batch-{i}", x[rows], (lengths[rows] if i % 2 else None)


@pytest.mark.parametrize("emit", ["last", "probs"])
def test_executor_map_equals_local_per_key(cluster, model, data, emit):
    x, lengths = data
    with rgd.DaskExecutor(cluster.scheduler_address) as executor:
        assert executor.name == f"dask {cluster.scheduler_address}"
        got = dict(executor.map(model, _batches(x, lengths, 4), emit=emit, backend=None))
    expected = {key: apply_batch(model, xb, lb, emit=emit)
                for key, xb, lb in _batches(x, lengths, 4)}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, **TOL)


def test_executor_pulls_batches_lazily(client, model, data):
    x, lengths = data
    pulled = 0

    def counting_batches():
        nonlocal pulled
        for item in _batches(x, lengths, 2):
            pulled += 1
            yield item

    executor = rgd.DaskExecutor(client, max_in_flight=2)
    for done, _ in enumerate(executor.map(model, counting_batches(), emit="last",
                                          backend="numpy"), start=1):
        assert pulled <= done + 2, f"{pulled} batches pulled with only {done} done"
    assert done == pulled == 12
    executor.close()
    assert client.status == "running"              # a client passed in is the caller's to close


def test_executor_worker_error_names_the_batch(client, model, data):
    x, _ = data
    batches = [("good", x[:3], None), ("bad one", x[3:6, :, :4], None)]   # wrong input size
    executor = rgd.DaskExecutor(client)
    with pytest.raises(rgd.BatchFailedError, match="batch 'bad one' failed on a Dask worker: "
                                                   "ValueError: .*input_size=5") as info:
        list(executor.map(model, batches, emit="last", backend=None))
    assert info.value.key == "bad one"
    # The cluster is still usable afterwards.
    assert len(list(executor.map(model, batches[:1], emit="last", backend=None))) == 1


def test_executor_checks_its_arguments_before_sending(client, model, data):
    executor = rgd.DaskExecutor(client)
    with pytest.raises(ValueError, match="emit: expected one of"):
        executor.map(model, [], emit="nope", backend=None)
    with pytest.raises(TypeError, match="model: expected an rnn_gpu layer"):
        executor.map(object(), [], emit="last", backend=None)
    with pytest.raises(ValueError, match="max_in_flight: expected a positive int"):
        rgd.DaskExecutor(client, max_in_flight=0)
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N'"):
        rgd.DaskExecutor(client, device="gpu")


def test_executor_unreachable_scheduler_names_the_address():
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=f"address: cannot connect to a Dask scheduler "
                                              f"at '{address}'"):
        rgd.DaskExecutor(address, connect_timeout=1)


@pytest.mark.parametrize("address", ["foo", "tcp://host-without-port"])
def test_executor_malformed_address_fails_at_once(address):
    """No Client is made for an address without a port: a half-made Client's finaliser waited
    20 s (and printed a traceback) after the error."""
    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"address: expected a scheduler address like "
                                         f"tcp://host:8786, got '{address}'"):
        rgd.DaskExecutor(address)
    gc.collect()
    assert time.perf_counter() - started < 5


def test_executor_checks_max_in_flight_before_connecting(monkeypatch):
    """A Client connected and then refused for a bad max_in_flight was left open."""
    import distributed

    monkeypatch.setattr(distributed, "Client", lambda *a, **k: pytest.fail("connected"))
    with pytest.raises(ValueError, match="max_in_flight: expected a positive int or None, "
                                         "got 0"):
        rgd.DaskExecutor("tcp://127.0.0.1:8786", max_in_flight=0)


def test_cli_run_malformed_scheduler_is_a_usage_error(model, data, tmp_path, capsys):
    from rnn_gpu.cli import main

    x, _ = data
    rg.save(model, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", x)
    code = main(["run", str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"),
                 str(tmp_path / "o.npy"), "--scheduler", "foo"])
    err = capsys.readouterr().err
    assert code == 2 and "--scheduler: expected a scheduler address like tcp://host:8786, " \
                         "got 'foo'" in err and "address:" not in err
    assert not (tmp_path / "o.npy").exists()


def test_executor_halves_a_batch_that_runs_out_of_memory_on_the_worker(monkeypatch, model, data):
    # An in-process worker, so that the patched apply_batch is the one the worker calls.
    import rnn_gpu.batch.executors as executors

    x, lengths = data

    def small_memory_apply_batch(m, xb, lb, **kw):
        if len(xb) > 3:
            raise MemoryError("fake: more than 3 sequences")
        return apply_batch(m, xb, lb, **kw)

    monkeypatch.setattr(executors, "apply_batch", small_memory_apply_batch)
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, \
            rgd.DaskExecutor(cluster.scheduler_address) as executor:
        got = dict(executor.map(model, _batches(x, lengths, 8), emit="sequence", backend=None))
        assert executor.batches_retried >= 1
    for key, xb, lb in _batches(x, lengths, 8):
        np.testing.assert_allclose(got[key], apply_batch(model, xb, lb, emit="sequence"), **TOL)


# ---------------------------------------------------------------------- rnn-gpu run --scheduler

def test_cli_run_with_scheduler_writes_what_a_local_run_writes(cluster, model, data, tmp_path,
                                                               capsys):
    import json

    from rnn_gpu.cli import main

    x, lengths = data
    rg.save(model, tmp_path / "model.safetensors")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x.lengths.npy", lengths)          # found beside INPUT by `run`
    common = [str(tmp_path / "model.safetensors"), str(tmp_path / "x.npy")]
    options = ["--emit", "sequence", "--batch-size", "4", "--chunk-size", "8", "--quiet"]
    assert main(["run", *common, str(tmp_path / "local.npy"), *options]) == 0
    assert main(["run", *common, str(tmp_path / "dask.npy"), *options,
                 "--scheduler", cluster.scheduler_address]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["executor"] == f"dask {cluster.scheduler_address}"
    assert summary["computed"] == N
    local, remote = np.load(tmp_path / "local.npy"), np.load(tmp_path / "dask.npy")
    np.testing.assert_allclose(remote, local, **TOL)
    np.testing.assert_allclose(remote, apply_batch(model, x, lengths, emit="sequence"), **TOL)


def test_cli_run_with_scheduler_and_cuda_does_not_touch_cuda_on_the_client(
        cluster, model, data, tmp_path, capsys, monkeypatch):
    # The client may have no GPU while the workers have one: the client keeps the model on the
    # CPU and leaves the device to the workers. Here the workers have no GPU either, so the
    # executor records the device it is given and runs on the CPU instead.
    import json

    from rnn_gpu.cli import main
    from rnn_gpu.layers import RecurrentLayer

    x, lengths = data
    rg.save(model, tmp_path / "model.safetensors")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "lengths.npy", lengths)
    real_to, devices = RecurrentLayer.to, []

    def cpu_only_to(self, device):
        assert str(device) == "cpu", f"the client moved the model to {device}"
        return real_to(self, device)

    def executor_on_cpu(address, *, device):
        devices.append(device)
        return real_executor(address, device="cpu")

    real_executor = rgd.DaskExecutor
    monkeypatch.setattr(RecurrentLayer, "to", cpu_only_to)
    monkeypatch.setattr(rgd, "DaskExecutor", executor_on_cpu)
    args = [str(tmp_path / "model.safetensors"), str(tmp_path / "x.npy"),
            str(tmp_path / "out.npy"), "--lengths", str(tmp_path / "lengths.npy"), "--emit",
            "sequence", "--batch-size", "4", "--quiet", "--scheduler",
            cluster.scheduler_address, "--device", "cuda"]
    assert main(["run", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert devices == ["cuda"] and summary["device"] == "cuda"
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               apply_batch(model, x, lengths, emit="sequence"), **TOL)
    # a misspelt device or an unknown backend is still a usage error, found on the client
    assert main(["run", *args[:-1], "gpu", "--overwrite"]) == 2
    assert main(["run", *args, "--backend", "no_such_backend", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--device: cannot use 'gpu'" in err and "--backend: unknown name" in err
