"""The Triton backend's compiled kernels on a GPU (marked ``gpu``; skipped without CUDA).

Every cell, dtype, direction and lengths, forward and backward, against the float64 oracles,
on both tilings (batch-tiled, and units split over programs with a grid barrier); the torch
drop-ins training on CUDA by default; CuPy input through DLPack; no recompilation for a new
sequence length; clear errors on the GPU path. The large DESIGN §5 shapes are checked by
``rnn-gpu bench`` (every answer against cuDNN before it is timed).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from oracles import Result, as_tuple, assert_close, assert_close_rms, in_dtype, reference
from test_layers_vs_torch import SMALL_ACTIVATION_CELLS, Case, build, check_small_activations

import rnn_gpu as rg
from rnn_gpu.registry import BackendError

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

TOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 2e-2}   # fp16/bf16: relative RMS
CELL_OPTS = [("LSTM", None), ("GRU", None), ("RNN", {"nonlinearity": "tanh"}),
             ("RNN", {"nonlinearity": "relu"}), ("TwoStageRNN", {"f": "tanh", "g": "tanh"})]


def _f64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().double().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _cast(a, dtype):
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(_cast(p, dtype) for p in a)
    return torch.as_tensor(a).to(device="cuda", dtype=getattr(torch, dtype))


def run_on_gpu(case: Case, dtype: str, seed: int, tiles=None):
    """Forward + backward of ``case`` in ``dtype`` on CUDA with the triton backend, against the
    float64 oracle on the CPU with the same (float32-drawn) weights."""
    m, x, state, lengths, dy, dstate = build(case, np.random.default_rng(seed))
    want = reference(m, x, state, lengths, dy, dstate)
    gpu = in_dtype(m, dtype).to("cuda")
    ctx = _forced(tiles)
    with ctx:
        y, final, tape = gpu.forward(_cast(x, dtype), _cast(state, dtype), lengths=lengths,
                                     backend="triton")
        dx, d0, grads = gpu.backward(tape, _cast(dy, dtype), _cast(dstate, dtype))
        y_inf, final_inf = gpu(_cast(x, dtype), _cast(state, dtype), lengths=lengths,
                               backend="triton")
    got = Result(_f64(y), tuple(_f64(s) for s in as_tuple(final)), _f64(dx),
                 tuple(_f64(s) for s in as_tuple(d0)), {k: _f64(v) for k, v in grads.items()})
    tol = TOL[dtype]
    inference = Result(_f64(y_inf), tuple(_f64(s) for s in as_tuple(final_inf)))
    if dtype == "float32":
        assert_close(got, want, rtol=tol, atol=tol, what=f"{case} {dtype}: ")
        assert_close(inference, Result(want.y, want.state), rtol=tol, atol=tol,
                     what=f"{case} {dtype} m(x): ")
    else:
        assert_close_rms(got, want, tol=tol, what=f"{case} {dtype}: ")
        assert_close_rms(inference, Result(want.y, want.state), tol=tol,
                         what=f"{case} {dtype} m(x): ")


def _forced(tiles):
    import contextlib

    if tiles is None:
        return contextlib.nullcontext()
    from rnn_gpu.kernels.triton.launch import forced_tiles

    return forced_tiles(*tiles)


def _tilings():
    from rnn_gpu.kernels.triton.gated import Tiles

    split = Tiles(block_b=16, block_h=16, block_k=32, units=16)
    return {"auto": None,
            "batch_tiled": (Tiles(block_b=16, block_h=32, block_k=32, units=64), False),
            # what launch.co_resident offers: 64-row blocks (a wgmma tile) on 4 warps
            "batch_tiled_64_rows_4_warps": (Tiles(block_b=64, block_h=32, block_k=64, units=64,
                                                  num_warps=4), False),
            "split_grid_barrier": (split, True),
            # what the tuner's second round may choose (launch.second_round)
            "split_3_stages": (dataclasses.replace(split, num_stages=3), True),
            "split_4_stages": (dataclasses.replace(split, num_stages=4), True),
            "split_8_warps_3_stages": (dataclasses.replace(split, num_warps=8, num_stages=3),
                                       True)}


# Each (cell, dtype, tiling, direction, pass) is its own compiled kernel (~1-2 s to compile),
# so the grid is kept to what covers each piece once: every cell in fp32 and bf16 with the auto
# tiling (which at B=21 is the split tiling with the grid barrier), and every tiling in fp16.
SMALL = dict(dtype="float32", T=7, B=21, I=6, H=40, bidirectional=True, lengths="zero",
             with_state=True)   # B=21: two row blocks, one nearly empty; H=40: partial units


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cell,opts", CELL_OPTS)
def test_every_cell_matches_float64_oracle(cell, opts, dtype, rng):
    if opts == {"nonlinearity": "relu"} and dtype != "float32":
        pytest.skip("relu's gradient flips at 0 under half-precision rounding (see the "
                    "interpreter tests); covered in float32")
    run_on_gpu(Case(cell=cell, opts=opts, **SMALL), dtype, int(rng.integers(2**32)))


@pytest.mark.parametrize("tiling", ["batch_tiled", "batch_tiled_64_rows_4_warps",
                                    "split_grid_barrier", "split_3_stages", "split_4_stages"])
@pytest.mark.parametrize("cell,opts", [CELL_OPTS[0], CELL_OPTS[4]])
def test_each_tiling_matches_float64_oracle(cell, opts, tiling, rng):
    run_on_gpu(Case(cell=cell, opts=opts, **SMALL), "float16", int(rng.integers(2**32)),
               _tilings()[tiling])


@pytest.mark.parametrize("cell,opts", [CELL_OPTS[0], CELL_OPTS[4]])
def test_split_grid_barrier_cut_into_launches_matches_float64_oracle(cell, opts,
                                                                     launches_of_two, rng):
    """A sequence past the grid barrier's int32 counter (~16 million steps at 132 programs) is
    cut into launches, each with a fresh counter (kernels/triton/__init__.py: launch_spans).
    With the bound at 2 every launch of the split tiling runs one barrier, so each step (each
    TwoStageRNN phase) starts from the state the previous launch left, with the barrier on."""
    run_on_gpu(Case(cell=cell, opts=opts, **SMALL), "float16", int(rng.integers(2**32)),
               _tilings()["split_grid_barrier"])
    # some calls cut (a segment of random lengths may have a single step), none longer than 1
    assert any(len(spans) > 1 for spans in launches_of_two)
    assert all(c == 1 for spans in launches_of_two for _, c in spans)


@pytest.mark.parametrize("cell,opts", [CELL_OPTS[0], CELL_OPTS[4]])
def test_float32_with_more_warps_and_stages_matches_float64_oracle(cell, opts, rng):
    """IEEE float32 (FMA products) with 8 warps and 3 pipeline stages, which the tuner's
    second round times for float32 winners with 4 warps and long k-loops."""
    run_on_gpu(Case(cell=cell, opts=opts, **SMALL), "float32", int(rng.integers(2**32)),
               _tilings()["split_8_warps_3_stages"])


@pytest.mark.parametrize("cell,opts,dtype,shape", [
    ("LSTM", None, "float16", "masked"), ("LSTM", None, "float16", "even"),
    ("LSTM", None, "bfloat16", "masked"), ("LSTM", None, "bfloat16", "even"),
    ("GRU", None, "bfloat16", "masked"), ("RNN", {"nonlinearity": "tanh"}, "float16", "even")])
def test_weights_resident_forward_matches_float64_oracle(cell, opts, dtype, shape, rng):
    """The forward that keeps W_hh in shared memory (kernels/triton/gated_resident.py), with
    the grid barrier: at SMALL's B=21, H=40 (masked rows and units, five programs) and at
    B=64, H=64 (the unmasked path). Training too: the backward is tuned as usual."""
    from rnn_gpu.kernels.triton.gated import Tiles

    units = 16 if cell == "RNN" else 8
    tiles = (Tiles(block_b=64, block_h=units, block_k=0, units=units, resident=True), True)
    case = Case(cell=cell, opts=opts, **SMALL)
    if shape == "even":
        case = Case(cell=cell, opts=opts, **dict(SMALL, B=64, H=64))
    run_on_gpu(case, dtype, int(rng.integers(2**32)), tiles)


def test_two_layers_longer_sequence_fp16(rng):
    case = Case(cell="GRU", dtype="float32", T=64, B=96, I=32, H=128, num_layers=2,
                lengths="full", with_state=True)
    run_on_gpu(case, "float16", int(rng.integers(2**32)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lstm_projection_matches_float64_oracle(dtype, rng):
    # proj_size: the LSTM over m with W_hh W_hr folded (kernels/triton/projected.py)
    run_on_gpu(Case(cell="LSTM", proj_size=13, **SMALL), dtype, int(rng.integers(2**32)))


@pytest.mark.parametrize("proj_size", [0, 24])
def test_torch_dropin_uses_triton_by_default_and_trains(proj_size):
    from rnn_gpu.torch import LSTM

    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False
    ours = LSTM(16, 64, num_layers=2, bidirectional=True, proj_size=proj_size).cuda()
    ref = torch.nn.LSTM(16, 64, num_layers=2, bidirectional=True, proj_size=proj_size).double()
    ref.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    x = torch.randn(20, 8, 16, device="cuda")
    problem = rg.registry.select(_problem(x, proj_size))
    assert problem.name == "triton"
    y, (h, c) = ours(x)
    (y.square().sum() + h.sum() + c.sum()).backward()
    y64, (h64, c64) = ref(x.double().cpu())
    (y64.square().sum() + h64.sum() + c64.sum()).backward()
    torch.testing.assert_close(y.double().cpu(), y64, rtol=1e-5, atol=1e-5)
    for (name, p), p64 in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double().cpu(), p64.grad, rtol=1e-4, atol=1e-5,
                                   msg=name)


def _problem(x, proj_size=0):
    from rnn_gpu.backend_api import Problem

    return Problem(cell="lstm", activations=(), dtype="float32", device="cuda:0",
                   input_kind="torch", seq_len=x.shape[0], batch=x.shape[1],
                   input_size=x.shape[2], hidden_size=64, proj_size=proj_size, training=True)


def test_cupy_input_comes_back_as_cupy_zero_copy():
    cupy = pytest.importorskip("cupy")
    m = rg.GRU(8, 32, seed=0).to("cuda")
    x = cupy.random.standard_normal((5, 3, 8), dtype=cupy.float32)
    y, h = m(x, backend="triton")
    assert isinstance(y, cupy.ndarray) and isinstance(h, cupy.ndarray)
    y_t, _ = m(torch.from_dlpack(x), backend="triton")
    np.testing.assert_allclose(cupy.asnumpy(y), y_t.cpu().numpy(), rtol=0, atol=0)


def test_new_sequence_length_does_not_recompile():
    from rnn_gpu.kernels.triton.gated import _gated_fwd_kernel

    caches = getattr(_gated_fwd_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version keeps its kernel cache elsewhere")
    m = rg.LSTM(16, 64).to("cuda")
    m(torch.randn(9, 4, 16, device="cuda"), backend="triton")

    def compiled():
        return sum(len(c[0]) for c in caches.values())

    before = compiled()
    for T in (16, 17, 1, 250):
        m(torch.randn(T, 4, 16, device="cuda"), backend="triton")
    assert compiled() == before


def test_bad_input_on_the_gpu_path():
    m = rg.LSTM(4, 8).to("cuda")
    with pytest.raises(ValueError, match="x: the input is on cpu"):
        m(torch.zeros(3, 2, 4), backend="triton")
    h0 = torch.zeros(1, 2, 8)                                    # state left on the CPU
    with pytest.raises((ValueError, TypeError), match="state"):
        m(torch.zeros(3, 2, 4, device="cuda"), (h0, h0), backend="triton")
    cpu = rg.LSTM(4, 8)
    with pytest.raises(BackendError, match="runs on CUDA"):
        cpu(torch.zeros(3, 2, 4), backend="triton")
    m64 = rg.LSTM(4, 8, dtype="float64").to("cuda")
    with pytest.raises(BackendError, match="float64"):
        m64(torch.zeros(3, 2, 4, device="cuda", dtype=torch.float64), backend="triton")


@pytest.fixture
def tf32x3():
    rg.set_float32_precision("tf32x3")
    try:
        yield
    finally:
        rg.set_float32_precision("ieee")


@pytest.mark.parametrize("cell,opts", [CELL_OPTS[0], CELL_OPTS[1], CELL_OPTS[4]])
def test_float32_through_tf32x3_keeps_float32_accuracy(tf32x3, cell, opts, rng):
    """rg.set_float32_precision("tf32x3"): three TF32 tensor-core products per float32 dot;
    held to the same float32 tolerance against float64 as the IEEE kernels, on the small case
    and on a longer, wider one (errors would grow with H and T). The weight gradients' bound is
    scaled by each array's largest element (tests/oracles.py): unscaled, one element of ~50 000
    of GRU's and TwoStageRNN's went over it by 1.2-1.3x on an H200 (run 7), an element where
    large terms of the T*B-long sum cancel, and IEEE float32 reaches 0.99 of it there."""
    run_on_gpu(Case(cell=cell, opts=opts, **SMALL), "float32", int(rng.integers(2**32)))
    wide = Case(cell=cell, opts=opts, dtype="float32", T=48, B=64, I=64, H=256,
                lengths="full", with_state=True)
    run_on_gpu(wide, "float32", int(rng.integers(2**32)))


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_autocast_on_cuda_runs_the_drop_in_in_half_precision(backend, low):
    """Mixed-precision training (torch.autocast on CUDA): the drop-in computes in the autocast
    dtype on the named backend, as torch.nn's RNNs do on cuDNN; values within the dtype's
    tolerance of float64, and the float32 parameters get their gradients."""
    if rg.backends.get(backend).unavailable_reason():
        pytest.skip(rg.backends.get(backend).unavailable_reason())
    from torch import nn

    from rnn_gpu.torch import GRU

    torch.manual_seed(0)
    dtype = getattr(torch, low)
    lin, m = nn.Linear(24, 16).cuda(), GRU(16, 64, backend=backend).cuda()
    ref = nn.GRU(16, 64).cuda()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(40, 24, 24, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        h = lin(x)
        y, hn = m(h)
        y_ref, _ = ref(h)
    assert y.dtype == y_ref.dtype == dtype and hn.dtype == dtype
    exact, _ = ref.double()(h.detach().double())
    rms = ((y.double() - exact) ** 2).mean().sqrt() / (exact ** 2).mean().sqrt()
    assert rms < TOL[low], rms
    y.float().sum().backward()
    assert m.weight_hh_l0.grad.dtype == torch.float32
    assert torch.isfinite(m.weight_hh_l0.grad).all() and lin.weight.grad is not None


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_half_precision_training_with_dropout_on_cuda(backend, low):
    """Dropout between layers in half precision (bfloat16 failed in forward: NumPy has no
    bfloat16 for the mask; with CuPy the masked product runs in torch). The masks the tape
    kept drop something, and the layer's output matches the float64 NumPy layer run with the
    same seed (the same masks) on the rounded weights."""
    if rg.backends.get(backend).unavailable_reason():
        pytest.skip(rg.backends.get(backend).unavailable_reason())
    seed = 11
    half = rg.LSTM(16, 64, num_layers=2, dropout=0.5, dtype=low, seed=seed).to("cuda")
    m64 = rg.LSTM(16, 64, num_layers=2, dropout=0.5, dtype="float64", seed=seed)
    m64.load_state_dict({k: np.asarray(v, np.float64) for k, v in half.state_dict().items()})
    half._rng, m64._rng = np.random.default_rng(seed), np.random.default_rng(seed)
    x = torch.randn(12, 24, 16, device="cuda").to(getattr(torch, low))
    y, _, tape = half.forward(x, backend=backend)
    y64, _, _ = m64.forward(x.double().cpu().numpy())
    assert (tape.dropout_masks[1] == 0).any()
    rms = np.sqrt(((y.double().cpu().numpy() - y64) ** 2).mean() / (y64 ** 2).mean())
    assert rms < TOL[low], rms
    dx, _, grads = half.backward(tape, torch.ones_like(y))
    assert dx.dtype == getattr(torch, low) and torch.isfinite(dx).all()


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_torch_compile_around_the_drop_in_on_cuda(backend):
    """torch.compile (inductor) of a model with our LSTM inside, on CUDA: the recurrence runs
    the named backend's kernels as one graph break, the head compiles; outputs and gradients
    within float32's tolerance of the same model with torch.nn.LSTM, uncompiled."""
    if rg.backends.get(backend).unavailable_reason():
        pytest.skip(rg.backends.get(backend).unavailable_reason())
    from torch import nn

    from rnn_gpu.torch import LSTM

    torch._dynamo.reset()
    torch.manual_seed(0)
    ours, head = LSTM(32, 64, backend=backend).cuda(), nn.Linear(64, 5).cuda()
    ref = nn.LSTM(32, 64).cuda()
    ref.load_state_dict(ours.state_dict())

    def model(rnn, x):
        return torch.log_softmax(head(rnn(x)[0]), -1)

    compiled = torch.compile(model)
    x = torch.randn(50, 16, 32, device="cuda")
    with torch.backends.cudnn.flags(allow_tf32=False):
        out, want = compiled(ours, x), model(ref, x)
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
        out.square().sum().backward()
        want.square().sum().backward()
    for name, p in ours.named_parameters():
        q = getattr(ref, name)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("cell,opts", SMALL_ACTIVATION_CELLS)
def test_small_activations_keep_relative_accuracy_on_cuda(cell, opts):
    """The compiled kernels' tanh (a rational function; 1 - 2/(e^{2x}+1) gave 0 for
    tanh(1e-8)), as the interpreter test checks it on the CPU."""
    check_small_activations(cell, opts, 1e-8, int(np.random.default_rng().integers(2**63)),
                            backend="triton", to_input=lambda a: torch.from_numpy(a).cuda(),
                            device="cuda")
