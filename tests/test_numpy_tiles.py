"""The NumPy backend's work splits (row tiles, unit tiles with a barrier, one tile) and its
input paths (chunks; LSTM's one GEMM on [x | h | 1]) give torch.nn's answers. The default
thresholds only take those paths for large problems, so these tests lower them to reach every
path with small shapes."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_gpu as rg
import rnn_gpu.backends.numpy as nb

torch = pytest.importorskip("torch")

PLANS = {
    "rows": dict(_MIN_ROWS_PER_THREAD=1, _MIN_SMALL_ROWS=1, _MIN_TILE_MACS=0,
                 _MIN_CONCAT_ROWS=1),
    "units": dict(_MIN_ROWS_PER_THREAD=10**9, _MIN_SMALL_ROWS=10**9, _MIN_UNITS_PER_THREAD=1,
                  _MIN_UNIT_TILE_MACS=0),
    "single": dict(_MIN_ROWS_PER_THREAD=10**9, _MIN_SMALL_ROWS=10**9,
                   _MIN_UNIT_TILE_MACS=10**18),
}


@pytest.fixture(params=[(plan, threads) for plan in PLANS for threads in (2, 3)],
                ids=lambda p: f"{p[0]}-{p[1]}threads")
def plan(request, monkeypatch):
    name, threads = request.param
    for key, value in PLANS[name].items():
        monkeypatch.setattr(nb, key, value)
    monkeypatch.setattr(nb, "_CHUNK_ROWS", 16)          # several input chunks per sequence
    monkeypatch.setenv("RNN_GPU_NUM_THREADS", str(threads))
    return name, threads


def _torch_run(m, x, state, lengths, batch_first):
    cls = getattr(torch.nn, type(m).__name__)
    kw = {"nonlinearity": m.nonlinearity} if isinstance(m, rg.RNN) else {}
    if m.proj_size:
        kw["proj_size"] = m.proj_size
    tm = cls(m.input_size, m.hidden_size, m.num_layers, bidirectional=m.bidirectional,
             batch_first=batch_first, **kw).double()
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    xt = torch.from_numpy(x).requires_grad_()
    hx = (tuple(torch.from_numpy(s) for s in state) if isinstance(state, tuple)
          else torch.from_numpy(state))
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.from_numpy(lengths), batch_first=batch_first, enforce_sorted=False)
        y, st = tm(packed, hx)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=batch_first,
                                                      total_length=x.shape[1 if batch_first
                                                                           else 0])
    else:
        y, st = tm(xt, hx)
    return xt, y, (st if isinstance(st, tuple) else (st,))


@pytest.mark.parametrize("cell, kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}),
                                      ("RNN", {"nonlinearity": "relu"}),
                                      ("LSTM", {"proj_size": 3})],
                         ids=["lstm", "gru", "rnn", "rnn-relu", "lstm-proj"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_tiles_match_torch(plan, cell, kw, lengths):
    rng = np.random.default_rng(7)
    T, B, I, H = 37, 9, 4, 10
    m = getattr(rg, cell)(I, H, 2, bidirectional=True, batch_first=True, dtype="float64",
                          **kw)
    x = rng.standard_normal((B, T, I))
    lens = rng.integers(1, T + 1, B) if lengths else None
    shape = (4, B, m.output_size)
    state = ((rng.standard_normal(shape), rng.standard_normal((4, B, H))) if cell == "LSTM"
             else rng.standard_normal(shape))
    y, st = m(x, state, lengths=lens)
    y2, st2, tape = m.forward(x, state, lengths=lens)
    xt, ty, tst = _torch_run(m, x, state, lens, batch_first=True)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y2, y, rtol=1e-12, atol=1e-13)
    for a, b in zip(st if isinstance(st, tuple) else (st,), tst):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    (ty * torch.from_numpy(dy)).sum().backward()
    dx, _, _ = m.backward(tape, dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("f, g", [("tanh", "tanh"), ("sigmoid", "relu")])
def test_twostage_tiles_match_one_thread(plan, f, g, monkeypatch):
    rng = np.random.default_rng(3)
    m = rg.TwoStageRNN(4, 10, 2, bidirectional=True, f=f, g=g, dtype="float64")
    x = rng.standard_normal((37, 9, 4))
    lens = rng.integers(0, 38, 9)
    y, st = m(x, lengths=lens)
    y2, _, tape = m.forward(x, lengths=lens)
    dx, _, grads = m.backward(tape, np.ones_like(y))
    monkeypatch.setenv("RNN_GPU_NUM_THREADS", "1")
    y1, st1 = m(x, lengths=lens)
    _, _, tape1 = m.forward(x, lengths=lens)
    dx1, _, grads1 = m.backward(tape1, np.ones_like(y))
    np.testing.assert_allclose(y, y1, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(y2, y1, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(st, st1, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, dx1, rtol=1e-12, atol=1e-13)
    for k in grads:
        np.testing.assert_allclose(grads[k], grads1[k], rtol=1e-10, atol=1e-12)


def test_plain_forward_with_xw_matches_the_fused_path():
    """Backend.forward(xw) (the contract every backend has) and forward_layer(x) agree."""
    from rnn_gpu.backend_api import Problem

    rng = np.random.default_rng(5)
    T, B, I, H = 23, 6, 4, 8
    backend = nb.NumpyBackend()
    for cell, gates in (("lstm", 4), ("gru", 3), ("rnn", 1)):
        problem = Problem(cell=cell, activations=("tanh",) if cell == "rnn" else (),
                          dtype="float64", device="cpu", input_kind="numpy", seq_len=T,
                          batch=B, input_size=I, hidden_size=H)
        w_ih, b_ih = rng.standard_normal((gates * H, I)), rng.standard_normal(gates * H)
        weights = {"weight_hh": rng.standard_normal((gates * H, H)) / 3,
                   "bias_hh": rng.standard_normal(gates * H)}
        state = tuple(rng.standard_normal((B, H)) for _ in range(2 if cell == "lstm" else 1))
        x = rng.standard_normal((T, B, I))
        lens = rng.integers(0, T + 1, B)
        for reverse in (False, True):
            a = backend.forward(problem, x @ w_ih.T + b_ih, weights, state, lens,
                                reverse=reverse, keep_tape=False)
            b = backend.forward_layer(problem, x, w_ih, b_ih, weights, state, lens,
                                      reverse=reverse, keep_tape=False)
            np.testing.assert_allclose(a[0], b[0], rtol=1e-12, atol=1e-13)
            for s, t in zip(a[1], b[1]):
                np.testing.assert_allclose(s, t, rtol=1e-12, atol=1e-13)


def test_an_error_in_one_unit_tile_does_not_hang(monkeypatch):
    for key, value in PLANS["units"].items():
        monkeypatch.setattr(nb, key, value)
    monkeypatch.setenv("RNN_GPU_NUM_THREADS", "2")
    calls = []

    def failing_tanh(x):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("injected")
        return np.tanh(x, out=x)

    monkeypatch.setattr(nb, "_tanh_", failing_tanh)
    with pytest.raises(FloatingPointError, match="injected"):
        rg.GRU(3, 8)(np.zeros((5, 4, 3), "float32"))
    monkeypatch.undo()
    y, _ = rg.GRU(3, 8)(np.zeros((5, 4, 3), "float32"))     # the pool still works
    assert y.shape == (5, 4, 8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [0, 1, 37, 4096])
def test_column_sums_are_the_bias_gradients_sum(dtype, rows):
    """The bias gradients' sum over T*B rows, as a product with ones: NumPy's sum down axis 0
    in float64 is the oracle (also for a strided view, and for no rows at all)."""
    from rnn_gpu._arrays import column_sums

    rng = np.random.default_rng(rows)
    a = rng.standard_normal((rows, 2 * 24)).astype(dtype)
    for view in (a, a[:, ::2]):
        got = column_sums(view)
        want = view.astype(np.float64).sum(axis=0)
        assert got.dtype == np.dtype(dtype) and got.shape == (view.shape[1],)
        tol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1, rows))


def test_overlapping_tile_runs_share_one_blas_limit_and_restore_it():
    """Two calls from two threads (Dask workers sharing a layer) whose tile runs overlap, the
    first ending first: each used to hold its own limit, and the second's restore put back the
    first's single thread for the rest of the process."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})

    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library that threadpoolctl can see")
    first, second = nb._single_threaded_blas(), nb._single_threaded_blas()
    first.__enter__()
    second.__enter__()
    assert blas_threads() == [1]
    first.__exit__(None, None, None)
    assert blas_threads() == [1]               # the second call's tiles still run
    second.__exit__(None, None, None)
    assert blas_threads() == before


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_a_forked_child_runs_tiled_calls(monkeypatch):
    """The pool's threads do not survive a fork, but it counted them as idle: a DataLoader
    worker's (or multiprocessing's "fork" child's) first multi-tile call waited forever."""
    import multiprocessing

    monkeypatch.setenv("RNN_GPU_NUM_THREADS", "2")
    m = rg.LSTM(8, 64, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 200, 8)).astype("float32")
    assert len(nb._plan(nb_problem(m, x), 200, False)) == 2        # two row tiles
    want = m(x)[0]                                                  # the pool starts here
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_call, args=(m, x, want, queue))
    child.start()
    try:
        same = queue.get(timeout=60)
    except Exception:
        same = None
    child.join(10)
    if child.is_alive():
        child.kill()
    assert same is not None, "the forked child hung in a tiled call"
    assert same, "the forked child's result differs from the parent's"


def _child_call(m, x, want, queue):
    queue.put(bool(np.array_equal(m(x)[0], want)))


def nb_problem(m, x):
    from rnn_gpu.backend_api import Problem

    return Problem(cell="lstm", activations=(), dtype="float32", device="cpu",
                   input_kind="numpy", seq_len=x.shape[0], batch=x.shape[1],
                   input_size=x.shape[2], hidden_size=m.hidden_size)


def test_blas_limit_set_in_one_thread_and_restored_in_another():
    """threadpoolctl >= 3.8 lets only the first thread that set OpenBLAS's limit change it:
    a limit taken by the main thread and given back by a worker's call stayed at one thread
    for the rest of the process, and a worker's own limit was skipped."""
    import threading

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        if not before or max(before) < 2:
            pytest.skip("no BLAS whose thread count threadpoolctl can set to 2")
        main_entered, worker_entered, main_left = (threading.Event() for _ in range(3))
        inside = {}

        def worker():
            main_entered.wait()
            with nb._single_threaded_blas():
                worker_entered.set()
                main_left.wait()                      # the worker's call is the last one out
                inside["worker"] = _blas_threads()

        thread = threading.Thread(target=worker)
        thread.start()
        with nb._single_threaded_blas():              # the main thread's call comes first
            main_entered.set()
            worker_entered.wait()
            inside["main"] = _blas_threads()
        main_left.set()
        thread.join()
        assert _blas_threads() == before, "the limit was not given back"
        with nb._single_threaded_blas():              # taken again from this thread
            pass
        result = []
        other = threading.Thread(target=lambda: result.append(_in_limit()))
        other.start()
        other.join()
        assert inside == {"main": [1] * len(before), "worker": [1] * len(before)}
        assert result == [[1] * len(before)], "a worker thread's limit was skipped"
        assert _blas_threads() == before


def _in_limit():
    with nb._single_threaded_blas():
        return _blas_threads()
