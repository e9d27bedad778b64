"""Registry and dispatch (DESIGN §4): names, report, get, register, the selection order."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import rnn_gpu as rg
from rnn_gpu.backend_api import Problem
from rnn_gpu.backends.numpy import NumpyBackend


def _problem(**overrides) -> Problem:
    base = dict(cell="lstm", activations=(), dtype="float32", device="cpu", input_kind="numpy",
                seq_len=4, batch=2, input_size=3, hidden_size=5)
    return Problem(**{**base, **overrides})


def _backend(name: str, priority: int, *, unavailable: str | None = None,
             declines: str | None = None):
    """A recording backend that delegates the work to the numpy backend."""

    class Recording(NumpyBackend):
        calls = 0

        def unavailable_reason(self):
            return unavailable

        def not_supported_reasons(self, problem):
            return [declines] if declines else super().not_supported_reasons(problem)

        def forward(self, *args, **kwargs):
            type(self).calls += 1
            return super().forward(*args, **kwargs)

        def forward_layer(self, *args, **kwargs):      # the fused path the layer prefers
            type(self).calls += 1
            return super().forward_layer(*args, **kwargs)

    Recording.name, Recording.priority = name, priority
    return Recording


@pytest.fixture
def temporary():
    added = []

    def add(factory, **kwargs):
        backend = rg.backends.register(factory, **kwargs)
        added.append(backend.name)
        return backend

    yield add
    for name in added:
        rg.backends.unregister(name)


@pytest.fixture
def x():
    return np.random.default_rng().standard_normal((4, 2, 3)).astype("float32")


def test_builtin_numpy_backend_comes_from_the_entry_point():
    assert "numpy" in rg.backends.names()
    row = next(r for r in rg.backends.report() if r["name"] == "numpy")
    assert row == {"name": "numpy", "available": True, "reason": "", "priority": 0,
                   "distribution": f"rnn-gpu {rg.__version__}"}
    assert isinstance(rg.backends.get("numpy"), NumpyBackend)


def test_register_rejects_duplicates_unless_override(temporary):
    temporary(_backend("tmp_dup", 1))
    with pytest.raises(ValueError, match="'tmp_dup' is already registered.*override=True"):
        rg.backends.register(_backend("tmp_dup", 2))
    replaced = temporary(_backend("tmp_dup", 3), override=True)
    assert rg.backends.get("tmp_dup") is replaced and replaced.priority == 3


@pytest.mark.parametrize("factory, message", [
    (42, "factory: expected a zero-argument callable"),
    (lambda: object(), "has no string attribute 'name'"),
])
def test_register_rejects_things_that_are_not_backends(factory, message):
    with pytest.raises(TypeError, match=message):
        rg.backends.register(factory)


def test_get_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown name 'nope'.*'numpy'"):
        rg.backends.get("nope")


def test_auto_takes_the_highest_priority_backend_that_serves(temporary, x):
    high = temporary(_backend("tmp_high", 50, declines="tmp_high declines everything"))
    mid = temporary(_backend("tmp_mid", 20))
    low = temporary(_backend("tmp_unavailable", 90, unavailable="no such device here"))
    assert rg.backends.select(_problem()) is mid
    rg.LSTM(3, 5)(x)
    assert type(mid).calls == 1 and type(high).calls == 0 and type(low).calls == 0


@pytest.mark.parametrize("probe", ["unavailable_reason", "not_supported_reasons"])
def test_a_backend_whose_probe_raises_is_passed_over_with_a_warning(temporary, x, probe):
    """A broken plugin's probe failed every auto-selected call, even ones NumPy serves."""

    class Broken(_backend("tmp_broken", 1000)):
        def unavailable_reason(self):
            if probe == "unavailable_reason":
                raise OSError("libfoo.so: cannot open shared object file")
            return None

        def not_supported_reasons(self, problem):
            raise OSError("libfoo.so: cannot open shared object file")

    temporary(Broken)
    with pytest.warns(RuntimeWarning, match=rf"backend 'tmp_broken': its {probe}\(\) raised "
                                            r"OSError: libfoo.so.*; passed over"):
        assert rg.backends.select(_problem()).name == "numpy"
        rg.LSTM(3, 5)(x)
    with pytest.warns(RuntimeWarning), pytest.raises(rg.BackendError, match="OSError"):
        rg.LSTM(3, 5)(x, backend="tmp_broken")        # named: its failure is the error


def test_a_broken_backends_warning_points_at_the_callers_line(temporary, x):
    """A fixed stacklevel counted from whichever path reached the warning: it named
    registry.py, layers.py or torch's module.py, never the line of the user's call."""
    torch = pytest.importorskip("torch")
    import rnn_gpu.torch as rt

    class Broken(_backend("tmp_broken", 1000)):
        def unavailable_reason(self):
            raise OSError("libfoo.so: cannot open shared object file")

    temporary(Broken)
    calls = [
        lambda: rg.backends.select(_problem()),
        lambda: rg.LSTM(3, 5)(x),
        lambda: rg.LSTM(3, 5).forward(x),
        lambda: rt.LSTM(3, 5)(torch.from_numpy(x)),
        lambda: rt.LSTM(3, 5)(torch.from_numpy(x).requires_grad_()),   # autograd.Function
    ]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        where = {(w.filename, w.lineno) for w in caught if "tmp_broken" in str(w.message)}
        assert where == {(__file__, call.__code__.co_firstlineno)}


def test_selection_order_call_then_context_then_env_then_auto(temporary, x, monkeypatch):
    a = temporary(_backend("tmp_a", -5))
    b = temporary(_backend("tmp_b", -5))
    c = temporary(_backend("tmp_c", -5))
    m = rg.GRU(3, 5)
    monkeypatch.setenv("RNN_GPU_BACKEND", "tmp_c")
    m(x)
    assert type(c).calls == 1
    with rg.use_backend("tmp_b"):
        m(x)
        assert type(b).calls == 1
        m(x, backend="tmp_a")
        assert type(a).calls == 1
    monkeypatch.delenv("RNN_GPU_BACKEND")
    m(x)
    assert (type(a).calls, type(b).calls, type(c).calls) == (1, 1, 1)  # auto: numpy


def test_explicit_choice_never_falls_back(temporary, x):
    temporary(_backend("tmp_gone", 100, unavailable="tmp_gone needs a device"))
    with pytest.raises(rg.BackendError, match=r"'tmp_gone' \(chosen by backend=\).*needs a dev"):
        rg.LSTM(3, 5)(x, backend="tmp_gone")
    temporary(_backend("tmp_picky", 100, declines="tmp_picky wants float16"))
    with pytest.raises(rg.BackendError, match=r"use_backend\(\).*tmp_picky wants float16"), \
            rg.use_backend("tmp_picky"):
        rg.LSTM(3, 5)(x)


def test_environment_variable_with_unknown_name(monkeypatch, x):
    monkeypatch.setenv("RNN_GPU_BACKEND", "no_such_backend")
    with pytest.raises(ValueError, match="'no_such_backend' .*RNN_GPU_BACKEND.* not registered"):
        rg.RNN(3, 5)(x)


def test_use_backend_checks_the_name_on_entry():
    with pytest.raises(ValueError, match="unknown name 'nope'"), rg.use_backend("nope"):
        pass


def test_nothing_fits_lists_every_backends_reason():
    with pytest.raises(rg.BackendError) as err:
        rg.backends.select(_problem(device="cuda:0", dtype="bfloat16"))
    text = str(err.value)
    assert text.startswith("no backend can serve lstm T=4 B=2 I=3 H=5 bfloat16 on cuda:0")
    assert "numpy: the numpy backend runs on the CPU" in text
    assert "computes in float32 and float64, not bfloat16" in text


def test_format_report_is_a_table():
    lines = rg.backends.format_report().splitlines()
    assert lines[0].split() == ["backend", "available", "priority", "from", "reason"]
    assert any(line.split()[:5] == ["numpy", "yes", "0", "rnn-gpu", rg.__version__]
               for line in lines[1:])


def test_report_says_where_each_backend_came_from(temporary):
    """Which installed distribution (and version) a backend came from was not shown: with two
    plugins or two versions installed, `rnn-gpu info` could not tell which one served."""
    temporary(_backend("tmp_coded", -5))
    rows = {r["name"]: r for r in rg.backends.report()}
    assert rows["numpy"]["distribution"] == f"rnn-gpu {rg.__version__}"
    assert rows["tmp_coded"]["distribution"] == f"register() in {__name__}"
    line = next(line for line in rg.backends.format_report().splitlines()
                if line.startswith("tmp_coded"))
    assert line.split()[3:6] == ["register()", "in", __name__]
    # rows without the key (built by a caller before it existed) still format
    assert "-" in rg.backends.format_report([{"name": "x", "available": True, "reason": "",
                                              "priority": 1}]).splitlines()[1].split()


@pytest.mark.parametrize("returns, got", [(None, "NoneType"), ((1, 2), "a tuple of 2")])
def test_a_backend_breaking_the_return_contract_is_named(temporary, x, returns, got):
    """A plugin returning the wrong thing from forward (or backward) gets an error naming it
    and the contract, not an unpacking error inside the layer."""

    class Broken(NumpyBackend):
        name, priority = "broken_returns", -5

        def forward_layer(self, *args, **kwargs):
            return returns

    class BrokenBackward(NumpyBackend):
        name, priority = "broken_backward", -5

        def backward(self, *args, **kwargs):
            return returns

    temporary(Broken)
    temporary(BrokenBackward)
    m = rg.GRU(3, 5)
    with pytest.raises(TypeError, match=rf"backend 'broken_returns': forward_layer\(\) returned "
                                        rf"{got}; the backend contract .* is a tuple "
                                        rf"\(y, final_state, tape\)"):
        m(x, backend="broken_returns")
    y, _, tape = m.forward(x, backend="broken_backward")
    with pytest.raises(TypeError, match=r"backend 'broken_backward': backward\(\) returned "
                                        r".*\(dxw, dstate0, weight_grads\)"):
        m.backward(tape, np.ones_like(y))


@pytest.mark.parametrize("attr, value, expected", [
    ("priority", "5", "priority '5'; expected a finite number"),
    ("priority", None, "priority None; expected a finite number"),
    ("priority", True, "priority True; expected a finite number"),
    ("priority", float("nan"), "priority nan; expected a finite number"),
    ("array_kind", "jax", r"array_kind 'jax'; expected one of \['numpy', 'torch', 'cupy'\]"),
])
def test_a_backend_with_a_bad_priority_or_array_kind_is_refused_at_registration(attr, value,
                                                                               expected):
    """A plugin with priority "5" made report() (so `rnn-gpu info` and every auto-selected
    call) fail with `bad operand type for unary -: 'str'`; array_kind "jax" failed only at
    its first call, naming neither."""
    Bad = _backend("tmp_bad_attr", 0)
    setattr(Bad, attr, value)
    with pytest.raises(TypeError, match=rf"backend 'tmp_bad_attr' with {expected}"):
        rg.backends.register(Bad)
    assert "tmp_bad_attr" not in rg.backends.names()
    assert rg.backends.report()


@pytest.mark.parametrize("returned, available", [("", True), (False, True), (42, False)])
def test_report_and_selection_read_unavailable_reason_alike(temporary, returned, available):
    """"" showed as unavailable in the table while selection took the backend."""

    class Odd(_backend("tmp_odd", 1000)):
        def unavailable_reason(self):
            return returned

    temporary(Odd)
    row = next(r for r in rg.backends.report() if r["name"] == "tmp_odd")
    assert row["available"] is available
    if available:
        assert rg.backends.select(_problem()).name == "tmp_odd"
    else:
        assert "returned 42, not None or a str" in row["reason"]
        assert rg.backends.select(_problem()).name == "numpy"


def test_not_supported_reasons_returning_a_string_or_none(temporary):
    """A string was spelt out letter by letter ("o; n; l; y; ..."); None (a forgotten
    `return`) declined with a warning about an availability check."""

    class OneString(_backend("tmp_one_string", 1000)):
        def not_supported_reasons(self, problem):
            return "only GRU"

    class Nothing(_backend("tmp_nothing", 1000)):
        def not_supported_reasons(self, problem):
            return None

    temporary(OneString)
    with pytest.raises(rg.BackendError, match=r"'tmp_one_string' \(chosen by backend=\) cannot "
                                              r"serve .*: only GRU$"):
        rg.backends.select(_problem(), "tmp_one_string")
    rg.backends.unregister("tmp_one_string")
    temporary(Nothing)
    with pytest.warns(RuntimeWarning, match=r"'tmp_nothing': its not_supported_reasons\(\) "
                                            r"returned None; expected a list of str"):
        assert rg.backends.select(_problem()).name == "numpy"


def _drop_key(grads, key):
    return {k: v for k, v in grads.items() if k != key}


# (what the plugin gets wrong, how its forward result / backward result is changed, the error)
_BROKEN_RESULTS = [
    ("y time-major swapped", lambda y, s, t: (y.transpose(1, 0, 2), s, t), None,
     r"forward_layer\(\) returned y of shape \(2, 4, 5\), expected \(4, 2, 5\)"),
    ("a step missing from y", lambda y, s, t: (y[1:], s, t), None, r"y of shape \(3, 2, 5\)"),
    ("y in float64", lambda y, s, t: (y.astype("float64"), s, t), None,
     "y of dtype float64, expected float32"),
    ("y as a list", lambda y, s, t: (y.tolist(), s, t), None, "y of a list, not a numpy array"),
    ("a bare final h", lambda y, s, t: (y, s[0], t), None,
     r"the final state .*; expected a tuple \(h, c\) like the state it was given"),
    ("LSTM's final c left out", lambda y, s, t: (y, s[:1], t), None,
     r"expected a tuple \(h, c\)"),
    ("final c of the wrong shape", lambda y, s, t: (y, (s[0], s[1][0]), t), None,
     r"the final state c of shape \(5,\), expected \(2, 5\)"),
    ("no tape", lambda y, s, t: (y, s, None), None, "returned no tape though keep_tape=True"),
    ("a gradient left out", None, lambda dx, ds, g: (dx, ds, _drop_key(g, "bias_hh")),
     r"weight gradients \['weight_hh'\]; expected one for each weight .*"
     r"\['bias_hh', 'weight_hh'\]"),
    ("an unknown gradient", None, lambda dx, ds, g: (dx, ds, {**g, "weight_ih": g["weight_hh"]}),
     r"weight gradients \['bias_hh', 'weight_hh', 'weight_ih'\]"),
    ("dstate0 h of the wrong shape", None, lambda dx, ds, g: (dx, (ds[0][None], ds[1]), g),
     r"backward\(\) returned dstate0 h of shape \(1, 2, 5\), expected \(2, 5\)"),
    ("dxw in float64", None, lambda dx, ds, g: (dx.astype("float64"), ds, g),
     "dxw of dtype float64"),
]


@pytest.mark.parametrize("forward_change, backward_change, error",
                         [case[1:] for case in _BROKEN_RESULTS],
                         ids=[case[0] for case in _BROKEN_RESULTS])
def test_a_backend_returning_wrong_arrays_is_named(temporary, x, forward_change,
                                                   backward_change, error):
    """What a backend returns reached the user unchecked: a missing gradient came back as
    zeros, an unknown one was added into weight_ih's, a y of the wrong shape or dtype, a
    final state of the wrong structure were handed on."""

    class Wrong(NumpyBackend):
        name, priority = "tmp_wrong", -5

        def forward_layer(self, *args, **kwargs):
            out = super().forward_layer(*args, **kwargs)
            return forward_change(*out) if forward_change else out

        def backward(self, *args, **kwargs):
            out = super().backward(*args, **kwargs)
            return backward_change(*out) if backward_change else out

    temporary(Wrong)
    m = rg.LSTM(3, 5)
    with pytest.raises(TypeError, match=r"backend 'tmp_wrong': .*" + error):
        y, state, tape = m.forward(x, backend="tmp_wrong")
        m.backward(tape, np.ones_like(y))


@pytest.mark.parametrize("missing", ["torch", "triton"])
def test_the_triton_backends_install_hint_names_the_extra_that_brings_it(monkeypatch, missing):
    """Either package missing: the hint is the [triton] extra (torch + triton); [torch] alone
    would leave the backend unavailable for want of triton."""
    import importlib.util

    from rnn_gpu.backends.triton import TritonBackend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real(name, *a))
    assert TritonBackend().unavailable_reason() == (
        f"{missing} is not installed (pip install 'rnn-gpu[triton]')")


def test_the_librarys_own_warnings_point_at_the_users_line(x):
    """The dropout warning of a one-layer model and the no-autograd warning had a fixed
    stacklevel: rg.LSTM(..., dropout=0.5) pointed past the user's line (``sys:1``)."""
    torch = pytest.importorskip("torch")
    import rnn_gpu.torch as rt

    class MyGRU(rg.GRU):                    # one more __init__ between the user and the check
        pass

    calls = [
        (lambda: rg.LSTM(3, 5, dropout=0.5), "does nothing with num_layers=1"),
        (lambda: MyGRU(3, 5, dropout=0.5), "does nothing with num_layers=1"),
        (lambda: rt.LSTM(3, 5, dropout=0.5), "expects num_layers greater than 1"),
        (lambda: rg.LSTM(3, 5)(torch.from_numpy(x).requires_grad_()), "outside torch's autograd"),
    ]
    for call, text in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        where = {(w.filename, w.lineno) for w in caught if text in str(w.message)}
        assert where == {(__file__, call.__code__.co_firstlineno)}, (text, where)
