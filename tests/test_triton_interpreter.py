"""The Triton backend's kernels, run on the CPU through Triton's interpreter (DESIGN §6).

``TRITON_INTERPRET=1`` makes ``@triton.jit`` kernels run as Python over NumPy, program by
program; the backend then serves CPU torch tensors with the very same kernel source that runs on
a GPU. Every cell, direction, lengths, layers, the split-units tiling, float32, float16 and
bfloat16, forward and backward, against the float64 oracles (torch.nn, and the naive TwoStageRNN
reference). Small shapes: the interpreter runs at ~1 ms per kernel op.

The variable is set around each test (not for the whole run), so that the other test modules
see a machine without a GPU backend. On a machine with a GPU these tests are skipped: the
``gpu`` tests (tests/test_triton_gpu.py) run the compiled kernels there.
"""

from __future__ import annotations

import numpy as np
import pytest
from oracles import Result, as_tuple, assert_close, assert_close_rms, in_dtype, ours, reference
from test_layers_vs_torch import SMALL_ACTIVATION_CELLS, Case, build, check_small_activations

import rnn_gpu as rg
from rnn_gpu.registry import BackendError

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'rnn-gpu[test]')")

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU is present: the gpu tests run the compiled kernels instead")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def split_units():
    """Cut the hidden units into programs of 16 (the small-batch design), one launch per step
    (the interpreter runs programs one after another, so a grid barrier could not be met)."""
    from rnn_gpu.kernels.triton.gated import Tiles
    from rnn_gpu.kernels.triton.launch import forced_tiles

    with forced_tiles(Tiles(block_b=16, block_h=16, block_k=16, units=16)):
        yield


CELL_OPTS = [("LSTM", None), ("GRU", None), ("RNN", {"nonlinearity": "tanh"}),
             ("RNN", {"nonlinearity": "relu"}), ("TwoStageRNN", {"f": "sigmoid", "g": "relu"}),
             ("TwoStageRNN", {"f": "tanh", "g": "tanh"})]
LAYOUTS = {
    "plain": dict(T=5, B=3, I=4, H=20, with_state=True),
    "bidirectional_lengths": dict(T=6, B=4, I=3, H=17, bidirectional=True, lengths="zero",
                                  with_state=True),
    "two_layers_batch_first_nobias": dict(T=4, B=3, I=5, H=12, num_layers=2, batch_first=True,
                                          bias=False, lengths="full"),
}
TOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 2e-2}   # fp16/bf16: relative RMS


def check(case: Case, seed: int, tol: float):
    rng = np.random.default_rng(seed)
    m, x, state, lengths, dy, dstate = build(case, rng)
    want = reference(m, x, state, lengths, dy, dstate)
    got = ours(m, x, state, lengths, dy, dstate, backend="triton")
    assert_close(got, want, rtol=tol, atol=tol, what=f"{case}: ")
    inference = ours(m, x, state, lengths, backend="triton")
    assert_close(inference, type(want)(want.y, want.state), rtol=tol, atol=tol,
                 what=f"{case} m(x): ")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cell,opts", CELL_OPTS, ids=lambda v: str(v) if v else "")
def test_float32_matches_float64_oracle(interpret, cell, opts, layout, rng):
    case = Case(cell=cell, opts=opts, dtype="float32", **LAYOUTS[layout])
    check(case, int(rng.integers(2**32)), TOL["float32"])


@pytest.mark.parametrize("cell,opts", SMALL_ACTIVATION_CELLS)
def test_float32_keeps_relative_accuracy_for_small_activations(interpret, cell, opts, rng):
    """The kernels' tanh was 1 - 2/(e^{2x}+1), exact only to 1's rounding: tanh(1e-8) gave 0.
    It is now a rational function, relatively exact to 3.6e-7 (kernels/triton/common.py)."""
    check_small_activations(cell, opts, 1e-8, int(rng.integers(2**63)), backend="triton",
                            to_input=torch.from_numpy)


@pytest.mark.parametrize("cell,opts", CELL_OPTS[:3] + CELL_OPTS[4:5])
def test_split_units_match_oracle(interpret, split_units, cell, opts, rng):
    # H=40 over programs of 16 units: three programs per row block, the last one partial.
    case = Case(cell=cell, opts=opts, dtype="float32", T=5, B=3, I=4, H=40,
                bidirectional=True, lengths="zero", with_state=True)
    check(case, int(rng.integers(2**32)), TOL["float32"])


PROJECTED = {
    # h_0 and c_0 given (h_0 folded into xw), both directions, lengths with a 0 and a full row
    "state_lengths": dict(T=5, B=4, I=3, H=20, proj_size=7, bidirectional=True, lengths="zero",
                          with_state=True),
    # no state (h_0 = 0: xw is not copied), two layers (the second takes the 2P-wide y)
    "two_layers": dict(T=4, B=3, I=5, H=16, proj_size=5, num_layers=2, bidirectional=True,
                       batch_first=True, bias=False),
}


@pytest.mark.parametrize("layout", list(PROJECTED))
def test_lstm_projection_matches_oracle(interpret, layout, rng):
    """proj_size > 0: the gated kernels run the LSTM over m with W_hh W_hr folded
    (kernels/triton/projected.py); outputs, final states and every gradient (W_hr, W_hh, h_0,
    c_0, x) against torch.nn.LSTM(proj_size=...) in float64."""
    case = Case(cell="LSTM", dtype="float32", **PROJECTED[layout])
    check(case, int(rng.integers(2**32)), TOL["float32"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lstm_projection_half_precision_matches_oracle(interpret, dtype, rng):
    case = Case(cell="LSTM", dtype="float32", **PROJECTED["state_lengths"])
    check_half(case, dtype, int(rng.integers(2**32)))


def test_lstm_projection_split_units_matches_oracle(interpret, split_units, rng):
    case = Case(cell="LSTM", dtype="float32", T=4, B=3, I=4, H=40, proj_size=9,
                bidirectional=True, lengths="zero", with_state=True)
    check(case, int(rng.integers(2**32)), TOL["float32"])


RESIDENT_SHAPES = {
    # H=20 over programs of 8 (RNN: 16) units: the last one partial, the weight tile and the
    # state buffer padded to 32 columns, 3 rows of a 32-row block (29 padding rows)
    "padded": dict(H=20, B=3, units=(8, 16), block_b=32),
    # H=32 and B=16: a power of two and a whole row block, no padding
    "even": dict(H=32, B=16, units=(8, 16), block_b=16),
}


@pytest.mark.parametrize("shape", list(RESIDENT_SHAPES))
@pytest.mark.parametrize("cell,opts", CELL_OPTS[:3])
def test_weights_resident_forward_matches_oracle(interpret, cell, opts, shape, rng):
    """The forward that keeps W_hh on chip (gated_resident), forced for every gated forward
    (training too: the backward is tuned as usual), both directions, lengths with zeros."""
    from rnn_gpu.kernels.triton.gated import Tiles
    from rnn_gpu.kernels.triton.launch import forced_tiles

    sh = RESIDENT_SHAPES[shape]
    units = sh["units"][cell == "RNN"]
    tiles = Tiles(block_b=sh["block_b"], block_h=units, block_k=0, units=units, resident=True)
    case = Case(cell=cell, opts=opts, dtype="float32", T=4, B=sh["B"], I=3, H=sh["H"],
                bidirectional=True, lengths="zero", with_state=True)
    with forced_tiles(tiles):
        check(case, int(rng.integers(2**32)), TOL["float32"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cell,opts", CELL_OPTS[:3] + CELL_OPTS[5:])
def test_half_precision_matches_oracle(interpret, cell, opts, dtype, rng):
    """fp16/bf16 inputs and weights, fp32 accumulation and state inside the kernels. Smooth
    activations only: with relu, a pre-activation within rounding of 0 flips its gradient
    between 0 and 1 (bf16 TwoStageRNN(sigmoid, relu): dstate0 off by 0.2 in one run)."""
    case = Case(cell=cell, opts=opts, dtype="float32", T=5, B=3, I=4, H=20,
                bidirectional=True, lengths="full", with_state=True)
    check_half(case, dtype, int(rng.integers(2**32)))


def check_half(case: Case, dtype: str, seed: int):
    """The float32 case's model, weights and inputs rounded to ``dtype``, forward and backward
    against the float64 oracle of the float32 weights."""
    m, x, state, lengths, dy, dstate = build(case, np.random.default_rng(seed))
    want = reference(m, x, state, lengths, dy, dstate)
    half = in_dtype(m, dtype)
    tdt = getattr(torch, dtype)

    def cast(a):
        return None if a is None else (tuple(cast(p) for p in a) if isinstance(a, tuple)
                                       else torch.as_tensor(a).to(tdt))

    y, final, tape = half.forward(cast(x), cast(state), lengths=lengths, backend="triton")
    dx, dstate0, grads = half.backward(tape, cast(dy), cast(dstate))
    got = Result(_f64(y), tuple(_f64(s) for s in as_tuple(final)), _f64(dx),
                 tuple(_f64(s) for s in as_tuple(dstate0)), {k: _f64(v) for k, v in grads.items()})
    # The oracle saw the float32 weights, the kernels their fp16/bf16 rounding: relative RMS
    # per field (DESIGN §6), which an element of a gradient summed over T*B terms cannot trip.
    assert_close_rms(got, want, tol=TOL[dtype], what=f"{dtype} {case}: ")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_training_with_dropout(interpret, dtype, rng):
    """Dropout between layers in half precision. bfloat16 failed in forward (NumPy has no
    bfloat16 for the mask). Oracle: the same layer in float64 on the NumPy backend, with the
    same seed (so the same masks) and the half-precision run's rounded weights and input."""
    seed = int(rng.integers(2**32))
    m64 = rg.LSTM(4, 12, num_layers=3, dropout=0.4, dtype="float64", seed=seed)
    half = in_dtype(m64, dtype)
    m64.load_state_dict({k: _f64(v) for k, v in half.state_dict().items()})
    m64._rng, half._rng = np.random.default_rng(seed), np.random.default_rng(seed)
    tdt = getattr(torch, dtype)
    x = torch.randn(5, 3, 4).to(tdt)
    y, _, tape = half.forward(x, backend="triton")
    y64, _, tape64 = m64.forward(_f64(x))
    masks = [_f64(mk) for mk in tape.dropout_masks[1:]]
    assert len(masks) == 2 and all((mk == 0).any() for mk in masks)
    for mk, mk64 in zip(masks, tape64.dropout_masks[1:]):      # the same draws, rounded
        np.testing.assert_allclose(mk, mk64, rtol=1e-2)
    dy = torch.randn(*y.shape).to(tdt)
    dx, _, grads = half.backward(tape, dy)
    dx64, _, grads64 = m64.backward(tape64, _f64(dy))
    got = Result(_f64(y), (), _f64(dx), (), {k: _f64(v) for k, v in grads.items()})
    want = Result(y64, (), dx64, (), grads64)
    assert_close_rms(got, want, tol=TOL[dtype], what=f"{dtype} dropout: ")


def _f64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().double().numpy()
    return np.asarray(a, dtype=np.float64)


@pytest.mark.parametrize("cell,T,B,H", [("LSTM", 1, 1, 1), ("GRU", 3, 17, 63),
                                        ("RNN", 2, 33, 5), ("TwoStageRNN", 1, 2, 1)])
def test_odd_shapes(interpret, cell, T, B, H, rng):
    # B=17, 33: a second row block with one or a few live rows; H=1, 5, 63: masked columns
    case = Case(cell=cell, dtype="float32", T=T, B=B, I=3, H=H, with_state=True,
                lengths="zero" if B > 1 else "none")
    check(case, int(rng.integers(2**32)), TOL["float32"])


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("proj_size", [0, 5])
def test_torch_dropin_trains_through_the_kernels(interpret, proj_size, rng):
    """rnn_gpu.torch.LSTM on CPU tensors with backend='triton': outputs and every gradient
    match torch.nn.LSTM run in float64 with the same weights (with proj_size too)."""
    from rnn_gpu.torch import LSTM

    torch.manual_seed(int(rng.integers(2**31)))
    ours_m = LSTM(4, 12, num_layers=2, bidirectional=True, proj_size=proj_size,
                  backend="triton")
    ref = torch.nn.LSTM(4, 12, num_layers=2, bidirectional=True, proj_size=proj_size).double()
    ref.load_state_dict({k: v.double() for k, v in ours_m.state_dict().items()})
    x = torch.randn(5, 3, 4)
    y, (h, c) = ours_m(x)
    (y.square().sum() + h.sum() + c.sum()).backward()
    x64 = x.double()
    y64, (h64, c64) = ref(x64)
    (y64.square().sum() + h64.sum() + c64.sum()).backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for (name, p), p64 in zip(ours_m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_interpreter_ranks_below_numpy_and_serves_what_numpy_cannot(interpret):
    row = {r["name"]: r for r in rg.backends.report()}["triton"]
    assert row["available"], row
    assert row["priority"] < {r["name"]: r for r in rg.backends.report()}["numpy"]["priority"]
    m32 = rg.GRU(3, 8)
    x = torch.randn(4, 2, 3)
    assert rg.registry.select(_problem(m32, x)).name == "numpy"       # auto: numpy first
    m16 = rg.GRU(3, 8, dtype="float16")
    x16 = x.half()
    assert rg.registry.select(_problem(m16, x16)).name == "triton"    # numpy declines fp16
    y, _ = m16(x16)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def _problem(m, x):
    from rnn_gpu.backend_api import Problem

    return Problem(cell=m._spec.kind, activations=m._activations(), dtype=m.dtype,
                   device="cpu", input_kind="torch", seq_len=x.shape[0], batch=x.shape[1],
                   input_size=m.input_size, hidden_size=m.hidden_size)


def test_declines_with_reasons(interpret):
    x = np.zeros((3, 2, 4))
    with pytest.raises(BackendError, match="float64.*numpy backend"):
        rg.LSTM(4, 8, dtype="float64")(x, backend="triton")


def test_without_interpreter_or_gpu_the_reason_names_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    row = {r["name"]: r for r in rg.backends.report()}["triton"]
    assert not row["available"]
    assert "no CUDA device" in row["reason"] and "TRITON_INTERPRET=1" in row["reason"]
    with pytest.raises(BackendError, match="triton.*no CUDA device"):
        rg.RNN(3, 4)(np.zeros((2, 1, 3), np.float32), backend="triton")


@pytest.mark.parametrize("capability, declined", [((7, 5), True), ((8, 0), False),
                                                   ((9, 0), False)])
def test_bfloat16_needs_compute_capability_8(monkeypatch, capability, declined):
    """As on a card of that generation (a T4 is 7.5): the decline names the fix."""
    from rnn_gpu.backend_api import Problem

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    backend = rg.backends.get("triton")
    for dtype in ("bfloat16", "float16", "float32"):
        problem = Problem(cell="lstm", activations=(), dtype=dtype, device="cuda:0",
                          input_kind="torch", seq_len=4, batch=2, input_size=3, hidden_size=8)
        reasons = backend.not_supported_reasons(problem)
        if dtype == "bfloat16" and declined:
            assert reasons == [f"bfloat16 needs compute capability 8.0, cuda:0 has "
                               f"{capability[0]}.{capability[1]} (use float16 or float32)"]
        else:
            assert reasons == [], (dtype, reasons)


def test_declines_a_step_beyond_32_bit_offsets(interpret):
    """The forward kernel's offsets within a step are int32: a step of 4 x 2**29 elements is
    declined with the fix, one just below the limit is served (not run: ~8 GiB per step)."""
    from rnn_gpu.backend_api import Problem

    backend = rg.backends.get("triton")

    def reasons(B, H, cell="lstm"):
        return backend.not_supported_reasons(Problem(
            cell=cell, activations=("tanh",) if cell == "rnn" else (), dtype="float16",
            device="cpu", input_kind="torch", seq_len=1, batch=B, input_size=H, hidden_size=H))

    assert reasons(2**19 - 1, 1024) == []
    for cell in ("lstm", "gru", "rnn"):
        (why,) = reasons(2**19, 1024, cell)
        assert "32-bit offsets" in why and "batch 524288 x hidden size 1024" in why
        assert "split the batch" in why
    # TwoStageRNN was not checked: its H x H weights are indexed with int32 too
    assert reasons(64, 46340, "twostage") == []
    (why,) = reasons(64, 46341, "twostage")
    assert "hidden size 46341" in why and "the weights alone are past it" in why
    (why,) = reasons(2**15 + 1, 2**15, "twostage")
    assert "split the batch" in why
    # The kernel's own launcher refuses too, before it allocates anything (meta tensors).
    from rnn_gpu.kernels.triton.gated import Tiles, gated_forward

    xw = torch.empty((1, 2**19, 4 * 1024), device="meta", dtype=torch.float16)
    w = torch.empty((4 * 1024, 1024), device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match="32-bit offsets.*split the batch"):
        gated_forward(1, 0, xw, w, None, xw[0, :, :1024], None, None, reverse=False,
                      keep_tape=False, precision="ieee", tiles=Tiles(16, 16, 16, 1024),
                      grid_sync=False)


def test_weight_gradients_sum_over_more_rows_than_a_gemm_takes(interpret, monkeypatch, rng):
    """The weight gradients are products over T*B rows through torch's GEMM, whose cuBLAS
    dimensions are 32-bit: past GEMM_MAX_ROWS rows they are summed in chunks (here 4 rows a
    GEMM, so 15 rows take 4), and agree with the oracle."""
    import rnn_gpu.kernels.triton as kt
    from rnn_gpu import _matmul

    d, x = torch.randn(10, 3), torch.randn(10, 2)
    monkeypatch.setattr(kt, "GEMM_MAX_ROWS", 4)
    calls = []
    real = _matmul.matmul
    monkeypatch.setattr(_matmul, "matmul", lambda a, b, *args, **kw: (
        calls.append(a.shape[1]), real(a, b, *args, **kw))[1])
    torch.testing.assert_close(kt.rows_product(d, x, "ieee"), d.t() @ x)
    assert calls == [4, 4, 2]
    for cell, opts in (("LSTM", None), ("TwoStageRNN", {"f": "tanh", "g": "tanh"})):
        calls.clear()
        case = Case(cell=cell, opts=opts, dtype="float32", T=5, B=3, I=4, H=6,
                    with_state=True)
        check(case, int(rng.integers(2**32)), TOL["float32"])
        assert calls and max(calls) == 4 and 3 in calls, calls      # 15 rows: 4 + 4 + 4 + 3


def test_a_launch_never_has_more_barriers_than_the_int32_counter_counts():
    """The grid barrier's counter is int32, zeroed per launch, and reaches barriers x n_split
    (the programs of one row block): with 132 programs (the SMs of an H100 or H200) a launch
    may have 16,268,815 barriers; a longer sequence is cut into launches that stay below
    2**31 - 1, each iteration in exactly one of them."""
    from rnn_gpu.kernels.triton import MAX_BARRIER_COUNT, launch_spans

    assert MAX_BARRIER_COUNT == 2**31 - 1 and MAX_BARRIER_COUNT // 132 == 16_268_815
    assert launch_spans(16_268_815, True, True, 132) == [(0, 16_268_815)]
    assert launch_spans(16_268_816, True, True, 132) == [(0, 16_268_815), (16_268_815, 1)]
    for n_split in (1, 2, 7, 132, 1000):
        per_launch = MAX_BARRIER_COUNT // n_split
        for n in (0, 1, per_launch - 1, per_launch, per_launch + 1, 3 * per_launch + 7):
            spans = launch_spans(n, True, True, n_split)
            assert [b for b, _ in spans] == [sum(c for _, c in spans[:i])
                                             for i in range(len(spans))]
            assert sum(c for _, c in spans) == n
            assert all(c * n_split <= MAX_BARRIER_COUNT for _, c in spans)
            assert len(spans) == max(1, -(-n // per_launch))
    # split without a grid barrier (the interpreter): one launch per iteration, as before
    assert launch_spans(3, False, True, 4) == [(0, 1), (1, 1), (2, 1)]
    assert launch_spans(3, False, False, 1) == [(0, 3)]


@pytest.mark.parametrize("lengths", ["none", "zero"])
@pytest.mark.parametrize("cell,opts", [("LSTM", None), ("GRU", None),
                                       ("TwoStageRNN", {"f": "tanh", "g": "tanh"})])
def test_a_sequence_cut_into_launches_carries_its_state(interpret, launches_of_two, cell,
                                                        opts, lengths, rng):
    """What the cut relies on: forward and backward resume at any step (TwoStageRNN: any
    phase) from the state the previous launch left. With the counter's bound at 2, every
    launch of a one-program-per-row-block tiling runs at most 2 iterations; results agree
    with the float64 oracle."""
    case = Case(cell=cell, opts=opts, dtype="float32", T=5, B=3, I=4, H=6, lengths=lengths,
                bidirectional=True, with_state=True)
    check(case, int(rng.integers(2**32)), TOL["float32"])
    assert all(c <= 2 for spans in launches_of_two for _, c in spans)
    if lengths == "none":       # random lengths may leave no segment longer than 2 steps
        assert all(len(spans) > 1 for spans in launches_of_two)


def test_declines_lengths_past_int32(interpret):
    from rnn_gpu.backend_api import Problem

    def reasons(T, has_lengths):
        return rg.backends.get("triton").not_supported_reasons(Problem(
            cell="gru", activations=(), dtype="float32", device="cpu", input_kind="torch",
            seq_len=T, batch=1, input_size=1, hidden_size=1, has_lengths=has_lengths))

    assert reasons(2**31 - 1, True) == [] == reasons(2**31, False)
    assert reasons(2**31, True) == [
        "the triton kernels read the lengths as int32: 2147483648 steps is past 2147483647; "
        "split the sequence into several calls"]


def test_tape_is_used_once(interpret):
    m = rg.RNN(3, 4)
    x = torch.randn(2, 2, 3)
    y, _, tape = m.forward(x, backend="triton")
    m.backward(tape, torch.ones_like(y))
    with pytest.raises(RuntimeError, match="already used"):
        m.backward(tape, torch.ones_like(y))


def test_float32_precision_reaches_the_kernels(interpret, monkeypatch, rng):
    """rg.set_float32_precision("tf32x3") is what the kernels are launched with (the tuner
    keys its choice on it too), and the answer still meets float32's tolerance (the
    interpreter computes its dots in IEEE float32 whatever the precision)."""
    from rnn_gpu.kernels.triton import gated

    seen: list[str] = []
    real = gated.gated_forward

    def spy(*args, precision, **kwargs):
        seen.append(precision)
        return real(*args, precision=precision, **kwargs)

    monkeypatch.setattr(gated, "gated_forward", spy)
    case = Case(cell="LSTM", dtype="float32", **{**LAYOUTS["plain"], "with_state": True})
    rg.set_float32_precision("tf32x3")
    try:
        check(case, int(rng.integers(2**32)), TOL["float32"])
        assert seen and set(seen) == {"tf32x3"}
        rg.allow_tf32(True)
        seen.clear()
        ours(*build(case, np.random.default_rng(0))[:4], backend="triton")
        assert set(seen) == {"tf32"}
    finally:
        rg.set_float32_precision("ieee")
    seen.clear()
    ours(*build(case, np.random.default_rng(0))[:4], backend="triton")
    assert set(seen) == {"ieee"}


def _spy_on_launches(monkeypatch, kernel, seen: list) -> None:
    """Record each launch of the jit ``kernel``: its precision, W_TRANSPOSED and weights.
    (The kernel object itself stays in place: the backend checks its type.)"""
    cls = type(kernel)
    real = cls.__getitem__

    def getitem(self, grid):
        launch = real(self, grid)
        if self is not kernel:
            return launch

        def run(*args, **kwargs):
            seen.append((kwargs["PRECISION"], kwargs["W_TRANSPOSED"], args[1]))
            return launch(*args, **kwargs)
        return run

    monkeypatch.setattr(cls, "__getitem__", getitem)


@pytest.mark.parametrize("cell", ["LSTM", "TwoStageRNN"])
def test_float32_forward_takes_the_weights_transposed(interpret, monkeypatch, cell, rng):
    """In IEEE float32 the forwards' products are FMA loops that read W_hh conflict-free from
    shared memory only when it is contiguous along the units (kernels/triton/common.py): the
    launcher passes W_hhᵀ then, and W_hh as stored for half precision and TF32, whose
    tensor-core products want it K-major. Both layouts match the oracle (the other tests)."""
    from rnn_gpu.kernels.triton import gated, twostage

    kernel = gated._gated_fwd_kernel if cell == "LSTM" else twostage._twostage_fwd_kernel
    seen: list = []
    _spy_on_launches(monkeypatch, kernel, seen)
    case = Case(cell=cell, dtype="float32", **LAYOUTS["plain"])
    H, gates = case.H, 4 if cell == "LSTM" else 1
    check(case, int(rng.integers(2**32)), TOL["float32"])
    assert seen and all(p == "ieee" and transposed for p, transposed, _ in seen)
    assert all(w.shape == (H, gates * H) and w.is_contiguous() for *_, w in seen)
    seen.clear()
    rg.set_float32_precision("tf32x3")
    try:
        ours(*build(case, np.random.default_rng(0))[:4], backend="triton")
    finally:
        rg.set_float32_precision("ieee")
    assert seen and all(p == "tf32x3" and not transposed and w.shape == (gates * H, H)
                        for p, transposed, w in seen)
    seen.clear()
    half = Case(cell=cell, dtype="float16", **LAYOUTS["plain"])
    ours(*build(half, np.random.default_rng(0))[:4], backend="triton")
    assert seen and all(not transposed and w.dtype == torch.float16 for _, transposed, w in seen)


def test_autocast_runs_the_drop_in_in_the_autocast_dtype(interpret):
    """Under torch.autocast the drop-in computes in the autocast dtype, as torch.nn's RNNs do:
    bfloat16 here, on the CPU, which the interpreted Triton kernels serve (the NumPy backend
    does not). Output dtype as torch.nn's under the same autocast, values within bfloat16's
    tolerance of float64; the float32 parameters and the layer before get their gradients."""
    from torch import nn

    from rnn_gpu.torch import LSTM

    torch.manual_seed(0)
    lin, m = nn.Linear(5, 3), LSTM(3, 8)
    ref = nn.LSTM(3, 8)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        y, (hn, cn) = m(h)
        y_ref, _ = ref(h)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and hn.dtype == torch.bfloat16
    exact, _ = ref.double()(h.detach().double())
    rms = ((y.double() - exact) ** 2).mean().sqrt() / (exact ** 2).mean().sqrt()
    assert rms < TOL["bfloat16"], rms
    y.float().sum().backward()
    assert m.weight_hh_l0.grad.dtype == torch.float32
    assert torch.isfinite(m.weight_hh_l0.grad).all() and m.weight_hh_l0.grad.abs().sum() > 0
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_lstm_kernel_without_c0_starts_from_zeros(interpret):
    """gated_forward for LSTM with c0=None read a 1-element placeholder at (B, H) offsets (the
    backend always passes c0; the launcher is callable on its own)."""
    from rnn_gpu.kernels.triton.common import LSTM
    from rnn_gpu.kernels.triton.gated import Tiles, gated_forward

    torch.manual_seed(0)
    T, B, H = 3, 4, 8
    xw, w = torch.randn(T, B, 4 * H), torch.randn(4 * H, H) / 4
    h0 = torch.randn(B, H)
    kwargs = dict(reverse=False, keep_tape=False, precision="ieee",
                  tiles=Tiles(16, 16, 16, H), grid_sync=False)
    without = gated_forward(LSTM, 0, xw, w, None, h0, None, None, **kwargs)
    zeros = gated_forward(LSTM, 0, xw, w, None, h0, torch.zeros(B, H), None, **kwargs)
    for a, b in zip(without[:3], zeros[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cell, act", [(0, 0), (0, 2), (1, 0), (2, 0), ("twostage", (0, 1))])
@pytest.mark.parametrize("reverse", [False, True])
def test_each_launcher_matches_its_naive_reference(interpret, cell, act, reverse):
    """The plain-torch references beside the kernels (``naive_gated``, ``naive_twostage``,
    straight from DESIGN §2) agree with the launchers, lengths included: a reference no test
    ran could drift from the kernels unseen (naive_twostage built its mask on the CPU
    whatever the input's device)."""
    from rnn_gpu.kernels.triton import gated, twostage
    from rnn_gpu.kernels.triton.gated import Tiles

    torch.manual_seed(1)
    T, B, H = 4, 3, 8
    lengths = torch.tensor([4, 1, 3])
    kwargs = dict(reverse=reverse, keep_tape=False, precision="ieee",
                  tiles=Tiles(16, 16, 16, H), grid_sync=False)
    h0 = torch.randn(B, H)
    if cell == "twostage":
        xw = torch.randn(T, B, H)
        w_aa, w_ha, w_hh = (torch.randn(H, H) / 3 for _ in range(3))
        b_h = torch.randn(H)
        got = twostage.twostage_forward(act, xw, w_aa, w_ha, w_hh, b_h, h0, lengths, **kwargs)
        want = twostage.naive_twostage(act, xw, w_aa, w_ha, w_hh, b_h, h0, lengths,
                                       reverse=reverse)
    else:
        G = (1, 4, 3)[cell]
        xw, w_hh, b_hh = torch.randn(T, B, G * H), torch.randn(G * H, H) / 3, torch.randn(G * H)
        c0 = torch.randn(B, H)
        got = gated.gated_forward(cell, act, xw, w_hh, b_hh, h0, c0, lengths, **kwargs)
        want = gated.naive_gated(cell, act, xw, w_hh, b_hh, h0, c0, lengths, reverse=reverse)
        if cell == 1:                       # LSTM: the final cell state too
            torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)     # y
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)     # h_T


@pytest.mark.parametrize("with_lengths", [False, True])
def test_the_naive_references_stay_on_the_inputs_device(with_lengths):
    """On the meta device as a stand-in for a GPU: naive_twostage made its mask on the CPU
    (lengths or not), which fails beside tensors elsewhere."""
    from rnn_gpu.kernels.triton.gated import naive_gated
    from rnn_gpu.kernels.triton.twostage import naive_twostage

    T, B, H = 2, 3, 4

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    lengths = torch.tensor([2, 1, 2]) if with_lengths else None
    y, _ = naive_twostage((0, 1), meta(T, B, H), meta(H, H), meta(H, H), meta(H, H), None,
                          meta(B, H), lengths, reverse=False)
    assert y.device.type == "meta" and y.shape == (T, B, H)
    y, _, _ = naive_gated(1, 0, meta(T, B, 4 * H), meta(4 * H, H), None, meta(B, H),
                          meta(B, H), lengths, reverse=False)
    assert y.device.type == "meta" and y.shape == (T, B, H)
