"""The layers' large float32 GEMMs in the precision in force (rnn_gpu/_matmul.py).

The TF32 paths run only on CUDA tensors; here the tf32x3 arithmetic itself (the split and the
three products) is checked on CPU torch tensors, where a matmul is IEEE, so the three products
must give the float32 product back to float32 rounding. Which arrays take which path, and that
a layer's forward and backward route their GEMMs through it with the forward's precision, are
checked with the CUDA test stood in for.
"""

from __future__ import annotations

import numpy as np
import pytest

import rnn_gpu as rg
from rnn_gpu import _matmul

torch = pytest.importorskip("torch")


def _awkward(rng, shape):
    """float32 values over many exponents and both signs, with an exact zero."""
    a = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, size=shape))
    a.flat[0] = 0.0
    return torch.from_numpy(a.astype(np.float32))


def test_split_parts_are_tf32_and_leave_only_a_tiny_rest(rng):
    a = _awkward(rng, (64, 48))
    hi, lo = _matmul.split_tf32(a)
    for part in (hi, lo):                                       # exact TF32 inputs: low 13
        assert not (part.view(torch.int32) & 0x1FFF).any()      # mantissa bits clear
    a64, hi64, lo64 = a.double(), hi.double(), lo.double()
    assert ((a64 - hi64).abs() <= a64.abs() * 2.0**-11).all()   # rounded, not truncated
    assert ((a64 - hi64 - lo64).abs() <= a64.abs() * 2.0**-22).all()
    # a transposed operand is split in place of its strides, not copied
    hi_t, lo_t = _matmul.split_tf32(a.T)
    assert torch.equal(hi_t, hi.T) and torch.equal(lo_t, lo.T)


def _tensor_core_product(a, b):
    """A TF32 tensor-core GEMM as the hardware does it: each input's low 13 mantissa bits
    dropped (towards zero), exact products, float32 result."""
    def cut(x):
        return (x.view(torch.int32) & _matmul.TF32_HIGH_MASK).view(torch.float32).double()
    return (cut(a) @ cut(b)).float()


def test_tf32x3_on_tensor_cores_is_as_close_as_float32(rng):
    """With the hardware's input cut emulated (products exact, so this measures the split),
    the three products' error is no larger on average than float32's own GEMM and below
    2⁻²¹ of sum |a||b| everywhere. The first split (high part truncated, low part not TF32)
    gave ~3x float32's mean error and up to ~2⁻²⁰ here."""
    a, b = _awkward(rng, (96, 512)), _awkward(rng, (512, 40))
    a_hi, a_lo = _matmul.split_tf32(a)
    b_hi, b_lo = _matmul.split_tf32(b)
    got = (_tensor_core_product(a_hi, b_hi) + _tensor_core_product(a_hi, b_lo)
           + _tensor_core_product(a_lo, b_hi)).double()
    want, scale = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    err = (got - want).abs() / scale
    float32_err = ((a @ b).double() - want).abs() / scale
    assert err.mean() <= float32_err.mean(), (float(err.mean()), float(float32_err.mean()))
    assert err.max() <= 2.0**-21, float(err.max())


def test_tf32x3_gives_the_float32_product(rng):
    a, b = _awkward(rng, (96, 80)), _awkward(rng, (80, 40))
    want = a.double() @ b.double()
    got = _matmul.tf32x3_matmul(a, b)
    assert got.dtype == torch.float32
    scale = (a.double().abs() @ b.double().abs())               # error bound per element
    assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-30).all()


def test_tf32x3_keeps_nan_and_inf():
    a = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    b = torch.eye(2)
    got = _matmul.tf32x3_matmul(a, b)
    assert got[0].isnan().any() and (got[1].isinf() | got[1].isnan()).any()


def test_tf32x3_keeps_nans_whose_payload_fills_the_mantissa():
    """0x7FFFFFFF and 0xFFFFFFFF are NaNs; rounding their bit pattern wraps to a zero."""
    bits = torch.tensor([[0x7FFFFFFF, -1, 0x7FFFF000, 0x3F800000]], dtype=torch.int32)
    a = bits.view(torch.float32)
    hi, _ = _matmul.split_tf32(a)
    assert hi[0, :3].isnan().all() and hi[0, 3] == 1.0
    assert _matmul.tf32x3_matmul(a, torch.eye(4))[0, :3].isnan().all()


def test_what_takes_the_tf32_paths(monkeypatch):
    a32 = torch.ones((2, 2))
    assert not _matmul._takes_tf32(a32, a32)                     # CPU: no TF32 there
    assert not _matmul._takes_tf32(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))
    calls = []
    monkeypatch.setattr(_matmul, "tf32x3_matmul", lambda a, b: calls.append(1) or a @ b)
    monkeypatch.setattr(_matmul, "_takes_tf32", lambda a, b: True)
    _matmul.matmul(a32, a32, "tf32x3")
    assert calls == [1]
    _matmul.matmul(a32, a32, "ieee")
    assert calls == [1]
    with pytest.raises(ValueError, match="precision: expected ieee, tf32x3 or tf32, got 'x'"):
        _matmul.matmul(a32, a32, "x")


@pytest.mark.parametrize("set_by", ["untouched", "legacy", "new"])
def test_the_torch_tf32_switch_is_restored(set_by):
    """On for the block and back afterwards, whichever of torch's two TF32 APIs the program
    used, and without tripping torch's check against mixing them (it raises on a legacy read
    after the new flag was set to something else)."""
    flags = torch.backends.cuda.matmul
    new_api = hasattr(flags, "fp32_precision")
    if set_by == "new" and not new_api:
        pytest.skip("this torch has no fp32_precision (torch < 2.9)")
    before = flags.fp32_precision if new_api else flags.allow_tf32
    try:
        if set_by == "legacy":
            flags.allow_tf32 = False
        elif set_by == "new":
            flags.fp32_precision = "ieee"
        kept = flags.fp32_precision if new_api else flags.allow_tf32
        with _matmul._tf32_matmuls():
            assert (flags.fp32_precision == "tf32") if new_api else flags.allow_tf32
        assert (flags.fp32_precision if new_api else flags.allow_tf32) == kept
        assert flags.allow_tf32 is False                   # a legacy read still works
    finally:
        if new_api:
            flags.fp32_precision = before
        else:
            flags.allow_tf32 = before


def test_overlapping_tf32_blocks_in_two_threads_restore_the_switch():
    """Two threads' blocks, the first ending first: each used to restore its own saved value,
    so the second put back "on" and TF32 stayed on for the rest of the process."""
    flags = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(flags, "fp32_precision") else "allow_tf32"
    kept = getattr(flags, name)
    first, second = _matmul._tf32_matmuls(), _matmul._tf32_matmuls()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert getattr(flags, name) in ("tf32", True)         # the second block still runs
    second.__exit__(None, None, None)
    assert getattr(flags, name) == kept


INTERPRETED = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is present: the kernels are compiled there, not "
    "interpreted (tests/test_triton_gpu.py covers tf32x3)")


def _layer_under_tf32x3(monkeypatch, rng, case, stand_in):
    """Forward of ``case`` under tf32x3, backward after the setting went back to IEEE, through
    the Triton kernels on the interpreter (torch CPU tensors standing in for CUDA ones), with
    ``stand_in`` as the tf32x3 GEMM. Returns (our Result, the float64 oracle's, the GEMMs the
    forward passed to ``stand_in``, those of forward and backward)."""
    pytest.importorskip("triton")
    from oracles import Result, as_np, as_tuple, reference
    from test_layers_vs_torch import build

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    def counted(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return stand_in(a, b)

    monkeypatch.setattr(_matmul, "_takes_tf32", lambda a, b: True)   # CPU stands in for CUDA
    monkeypatch.setattr(_matmul, "tf32x3_matmul", counted)
    m, x, state, lengths, dy, dstate = build(case, rng)
    want = reference(m, x, state, lengths, dy, dstate)
    rg.set_float32_precision("tf32x3")
    try:
        y, final, tape = m.forward(torch.from_numpy(x), torch.from_numpy(state),
                                   backend="triton")
    finally:
        rg.set_float32_precision("ieee")
    forward_calls = len(calls)
    dx, d0, grads = m.backward(tape, torch.from_numpy(dy), torch.from_numpy(dstate))
    got = Result(as_np(y), tuple(as_np(f) for f in as_tuple(final)), as_np(dx),
                 tuple(as_np(g) for g in as_tuple(d0)), {k: as_np(v) for k, v in grads.items()})
    return got, want, forward_calls, len(calls)


@INTERPRETED
def test_a_layer_routes_its_gemms_with_the_forwards_precision(monkeypatch, rng):
    """Forward under tf32x3, backward after the setting went back to IEEE, through the Triton
    kernels on the interpreter (torch tensors): the input projections, both backward GEMMs of
    each layer and the backend's dW_hh go through tf32x3 (the tapes keep the forward's
    precision), and everything still meets float32's tolerance against the float64 oracle."""
    from oracles import assert_close
    from test_layers_vs_torch import Case

    case = Case(cell="GRU", dtype="float32", T=5, B=3, I=4, H=6, num_layers=2,
                with_state=True)
    got, want, forward_calls, all_calls = _layer_under_tf32x3(monkeypatch, rng, case,
                                                              _matmul.tf32x3_matmul)
    assert forward_calls == 2                             # the input projection, per layer
    assert all_calls == 2 + 3 * 2                         # dW_ih, dx and dW_hh, per layer
    assert_close(got, want, rtol=2e-5, atol=2e-5, what="GRU, tf32x3 GEMMs: ")


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_matmul_adds_the_bias_once(monkeypatch, precision, rng):
    """a @ b + bias for torch tensors (one addmm where the precision allows it), NumPy arrays
    and no bias, every precision (CUDA stood in for, so the TF32 branches run)."""
    a, b = _awkward(rng, (7, 5)), _awkward(rng, (5, 3))
    bias = torch.from_numpy(rng.standard_normal(3).astype(np.float32))
    want = a.double() @ b.double() + bias.double()
    scale = a.double().abs() @ b.double().abs() + bias.double().abs()
    got_np = _matmul.matmul(a.numpy(), b.numpy(), precision, bias.numpy())
    assert (np.abs(got_np - want.numpy()) <= 1e-6 * scale.numpy() + 1e-30).all()
    monkeypatch.setattr(_matmul, "_takes_tf32", lambda a, b: True)
    got = _matmul.matmul(a, b, precision, bias)
    assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-30).all()
    assert torch.equal(_matmul.matmul(a, b, "ieee"), a @ b)


def _one_tf32_product(a, b):
    """What a one-pass TF32 GEMM gives: both inputs rounded to TF32 (2^-11 relative each)."""
    return _matmul._round_tf32(a) @ _matmul._round_tf32(b)


@INTERPRETED
@pytest.mark.parametrize("weight_gradient_gemm,passes", [("tf32x3", True), ("tf32", False)])
def test_the_weight_gradient_check_tells_tf32x3_from_one_tf32_product(
        monkeypatch, rng, weight_gradient_gemm, passes):
    """tests/oracles.py scales a weight gradient's absolute tolerance by the array's largest
    element (a sum over T*B terms errs by its terms' sizes, not its own). That must still
    catch TF32-sized error: here only the weight-gradient GEMMs (dxwᵀ x, T*B long) take the
    stand-in, everything else is IEEE, and the one-pass TF32 stand-in must fail the check
    where tf32x3 (three products, CPU float32 matmuls of exact TF32 parts) passes."""
    from oracles import assert_close
    from test_layers_vs_torch import Case

    case = Case(cell="GRU", dtype="float32", T=8, B=16, I=16, H=64, with_state=True)
    stand_in = {"tf32x3": _matmul.tf32x3_matmul, "tf32": _one_tf32_product}[weight_gradient_gemm]
    taken = []

    def only_weight_gradients(a, b):
        if a.shape[1] == case.T * case.B:                 # dxwᵀ x: the T*B-long reduction
            taken.append(tuple(a.shape))
            return stand_in(a, b)
        return a @ b

    got, want, _, _ = _layer_under_tf32x3(monkeypatch, rng, case, only_weight_gradients)
    assert taken, "no weight-gradient GEMM took the stand-in"
    if passes:
        assert_close(got, want, rtol=2e-5, atol=2e-5, what="GRU, tf32x3 dW: ")
    else:
        with pytest.raises(AssertionError, match=r"grads\['weight_ih_l0'\]"):
            assert_close(got, want, rtol=2e-5, atol=2e-5, what="GRU, one TF32 pass dW: ")
