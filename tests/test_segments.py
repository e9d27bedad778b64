"""Variable lengths run as segments over the live rows (rnn_gpu._segments).

The planner against a brute force over every set of boundaries; the layer, with a backend that
segments as finely as it can, against torch.nn (float64, packed sequences) and the naive
reference for lengths of 0: every cell, both directions, layers, batch_first, proj_size, an
initial state, dropout masks, the torch drop-ins, and torch tensors through the Triton
interpreter. And the NumPy backend's own costs: they segment a large uniform batch and leave a
small one whole.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from oracles import assert_close, ours, reference
from test_layers_vs_torch import Case, build

import rnn_gpu as rg
import rnn_gpu.backends.numpy as nb
from rnn_gpu import _segments
from rnn_gpu.backend_api import SegmentCosts
from rnn_gpu.backends.numpy import NumpyBackend

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'rnn-gpu[test]')")

# ---------------------------------------------------------------------- the planner

def _cost(live, bounds, step_rows, segment_cost):
    return sum((b - a) * (live[a] + step_rows) + segment_cost
               for a, b in zip(bounds[:-1], bounds[1:]))


def _check_covers(segments, lengths, steps, quantum=1):
    """Segments tile [0, steps) in order, each over a prefix of rows that are all live at its
    start (with a quantum: the live rows rounded up to it, or the batch); every valid (step,
    row) is in exactly one; the lengths within are right."""
    assert segments and segments[0].start == 0 and segments[-1].stop <= steps
    for a, b in zip(segments[:-1], segments[1:]):
        assert a.stop == b.start and a.rows >= b.rows
    for seg in segments:
        assert seg.start < seg.stop and 0 < seg.rows <= len(lengths)
        live = int(np.sum(lengths > seg.start))
        assert seg.rows == min(len(lengths), -(-live // quantum) * quantum)
        within = np.clip(lengths[:seg.rows] - seg.start, 0, seg.steps)
        if seg.lengths is None:
            assert within.min() == seg.steps
        else:
            np.testing.assert_array_equal(seg.lengths, within)
    covered = np.zeros((steps, len(lengths)), int)
    for seg in segments:
        covered[seg.start:seg.stop, :seg.rows] += 1
    valid = np.arange(steps)[:, None] < lengths[None, :]
    assert covered.max() <= 1 and covered[valid].all()


@pytest.mark.parametrize("step_rows,segment_cost", [(0, 0), (2, 5), (16, 40), (0, 1000)])
def test_plan_is_the_cheapest_set_of_boundaries(step_rows, segment_cost, rng):
    for _ in range(30):
        B, steps = int(rng.integers(1, 9)), int(rng.integers(1, 10))
        lengths = np.sort(rng.integers(0, steps + 1, B))[::-1].copy()
        lengths[0] = steps
        segments = _segments.plan(lengths, steps, step_rows=step_rows,
                                  segment_cost=segment_cost)
        _check_covers(segments, lengths, steps)
        live = {t: int(np.sum(lengths > t)) for t in range(steps + 1)}
        got = _cost(live, [s.start for s in segments] + [steps], step_rows, segment_cost)
        best = min(_cost(live, [0, *inner, steps], step_rows, segment_cost)
                   for k in range(steps) for inner in itertools.combinations(range(1, steps), k))
        assert got == pytest.approx(best), (lengths, segments)


def test_plan_with_many_lengths_thins_its_boundaries_and_still_covers_every_step(rng):
    lengths = np.sort(rng.integers(0, 5000, 3000))[::-1].copy()
    steps = int(lengths[0])
    segments = _segments.plan(lengths, steps, step_rows=0, segment_cost=0)
    assert len(segments) <= _segments._MAX_CANDIDATES
    _check_covers(segments, lengths, steps)
    work = sum(s.steps * s.rows for s in segments)
    assert work < 1.05 * lengths.sum()                    # 64 boundaries leave ~1/128 over


@pytest.mark.parametrize("quantum", [2, 3, 8])
def test_plan_rounds_rows_up_to_the_quantum(quantum, rng):
    for _ in range(20):
        B, steps = int(rng.integers(1, 30)), int(rng.integers(1, 40))
        lengths = np.sort(rng.integers(0, steps + 1, B))[::-1].copy()
        lengths[0] = steps
        segments = _segments.plan(lengths, steps, step_rows=0, segment_cost=0,
                                  row_quantum=quantum)
        _check_covers(segments, lengths, steps, quantum)


def test_triton_segments_are_a_variant_with_few_row_counts():
    """Off by default; inside the variant a large batch is segmented into at most 8 row
    counts (the tuner keys on the exact batch), a small one not at all."""
    pytest.importorskip("triton")
    backend = rg.backends.get("triton")
    lengths = np.random.default_rng(3).integers(1, 257, 4096)

    def schedule(B):
        problem = rg.backend_api.Problem("lstm", (), "float16", "cuda:0", "torch", 256, B, 256,
                                         256, has_lengths=True)
        return _segments.schedule(backend, problem, lengths[:B], 256)

    assert schedule(4096).whole
    with backend.variant("segments"):
        plan = schedule(4096)
        rows = {seg.rows for seg in plan.segments}
        assert not plan.whole and len(rows) <= 8 and all(r % 512 == 0 for r in rows)
        assert sum(s.steps * s.rows for s in plan.segments) < 0.6 * 256 * 4096
        assert schedule(64).whole
    assert schedule(4096).whole
    with pytest.raises(ValueError, match="segments"), backend.variant("nope"):
        pass


def test_sort_order_is_stable_longest_first_and_none_when_sorted():
    assert _segments.sort_order(np.array([5, 5, 3, 0])) is None
    np.testing.assert_array_equal(_segments.sort_order(np.array([2, 5, 2, 7])), [3, 1, 0, 2])


def test_numpy_costs_segment_a_large_uniform_batch_and_leave_a_small_one_whole(rng):
    backend = rg.backends.get("numpy")

    def schedule(T, B):
        lengths = rng.integers(1, T + 1, B)
        lengths[0] = T
        problem = rg.backend_api.Problem("lstm", (), "float32", "cpu", "numpy", T, B, 256, 256,
                                         has_lengths=True)
        return _segments.schedule(backend, problem, lengths, T), lengths

    plan, lengths = schedule(64, 1024)
    work = sum(s.steps * s.rows for s in plan.segments)
    assert not plan.whole and work < 0.65 * 64 * 1024, plan.segments    # valid: ~0.5
    plan, _ = schedule(8, 3)
    assert plan.whole and plan.order is None


# ---------------------------------------------------------------------- the layer

class Segmenting(NumpyBackend):
    """The NumPy backend, segmenting wherever it can (no cost per step or call), recording
    the (steps, rows) of every call."""

    name = "test_segmenting"
    calls: list = []

    def segment_costs(self, problem):
        return SegmentCosts(0, 0)

    def forward_layer(self, problem, *args, **kwargs):
        self.calls.append((problem.seq_len, problem.batch))
        return super().forward_layer(problem, *args, **kwargs)


@pytest.fixture
def segmenting():
    rg.backends.register(Segmenting)
    Segmenting.calls = []
    yield Segmenting
    rg.backends.unregister("test_segmenting")


LAYER_CASES = {
    "LSTM-bidirectional-proj-zero": Case("LSTM", 7, 9, 3, 6, num_layers=2, bidirectional=True,
                                         proj_size=4, with_state=True, lengths="zero"),
    "GRU-batch_first-state": Case("GRU", 8, 10, 4, 5, batch_first=True, with_state=True,
                                  lengths="full"),
    "RNN-relu-two-layers": Case("RNN", 6, 8, 3, 5, num_layers=2, bidirectional=True,
                                opts={"nonlinearity": "relu"}, lengths="zero"),
    "TwoStage-bidirectional": Case("TwoStageRNN", 6, 7, 3, 4, bidirectional=True,
                                   opts={"f": "sigmoid", "g": "tanh"}, with_state=True,
                                   lengths="full", bias=False),
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_segments_match_the_float64_oracles(segmenting, name, rng):
    case = LAYER_CASES[name]
    m, x, state, lengths, dy, dstate = build(case, rng)
    lengths[0] = case.T                       # several segments, whatever the draw
    lengths[1] = 1
    want = reference(m, x, state, lengths, dy, dstate)
    assert_close(ours(m, x, state, lengths, dy, dstate, backend="test_segmenting"), want,
                 rtol=1e-10, atol=1e-12, what=f"{name}: ")
    directions = case.num_layers * (2 if case.bidirectional else 1)
    calls = segmenting.calls
    assert len(calls) > directions                        # segments, not one call each
    work = sum(t * b for t, b in calls) // directions
    assert lengths.sum() <= work < case.T * case.B      # valid steps only, plus masked tails
    inference = ours(m, x, state, lengths, backend="test_segmenting")
    assert_close(inference, type(want)(want.y, want.state), rtol=1e-10, atol=1e-12)


def test_lengths_already_sorted_need_no_reordering(segmenting, rng):
    case = Case("LSTM", 6, 6, 3, 4, bidirectional=True, with_state=True)
    m, x, state, _, dy, dstate = build(case, rng)
    lengths = np.array([6, 5, 5, 3, 1, 0])
    want = reference(m, x, state, lengths, dy, dstate)
    y, final, tape = m.forward(x, state, lengths=lengths, backend="test_segmenting")
    assert tape.schedule.order is None and len(tape.schedule.segments) > 1
    assert_close(ours(m, x, state, lengths, dy, dstate, backend="test_segmenting"), want,
                 rtol=1e-10, atol=1e-12)


def test_dropout_masks_stay_in_the_callers_row_order(monkeypatch, rng):
    """test_gradients' dropout check (masks read from the tape, against the naive reference
    with those masks), with the NumPy backend segmenting as finely as it can."""
    from test_gradients import DROPOUT_CELLS, test_dropout_masks_and_reference

    monkeypatch.setattr(nb, "_SEGMENT_STEP_ROWS", 0)
    monkeypatch.setattr(nb, "_SEGMENT_CALL_STEPS", 0)
    for cell, opts in DROPOUT_CELLS:
        test_dropout_masks_and_reference(cell, opts, rng)


def test_torch_drop_in_with_a_packed_sequence(segmenting, rng):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from rnn_gpu.torch import GRU

    ref = torch.nn.GRU(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours_m = GRU(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64,
                 backend="test_segmenting")
    ours_m.load_state_dict(ref.state_dict())
    x = torch.from_numpy(rng.standard_normal((7, 6, 3)))
    lengths = torch.tensor([3, 7, 1, 5, 7, 2])
    results = []
    for module in (ref, ours_m):
        xg = x.clone().requires_grad_()
        out, h = module(pack_padded_sequence(xg, lengths, enforce_sorted=False))
        y, _ = pad_packed_sequence(out, total_length=7)
        ((y * y.detach().sin()).sum() + (h * 0.3).sum()).backward()
        results.append((y.detach(), h.detach(), xg.grad,
                        [p.grad for p in module.parameters()]))
    (y0, h0, dx0, g0), (y1, h1, dx1, g1) = results
    assert len(segmenting.calls) > 4
    for a, b in [(y1, y0), (h1, h0), (dx1, dx0), *zip(g1, g0)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_torch_tensors_through_the_triton_interpreter(monkeypatch, rng):
    """Segments on a backend whose arrays are torch tensors: the row order is applied with
    torch's index_select, the kernels are the Triton ones."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the interpreter path is not taken")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from rnn_gpu.backends.triton import TritonBackend

    class TritonSegmenting(TritonBackend):
        name = "test_triton_segmenting"
        calls = 0

        def segment_costs(self, problem):
            return SegmentCosts(0, 0)

        def forward(self, problem, *args, **kwargs):
            type(self).calls += 1
            return super().forward(problem, *args, **kwargs)

    rg.backends.register(TritonSegmenting)
    try:
        case = Case("LSTM", 5, 4, 3, 16, bidirectional=True, with_state=True, dtype="float32")
        m, x, state, _, dy, dstate = build(case, rng)
        lengths = np.array([2, 5, 0, 3])
        to_t = torch.from_numpy
        got = ours(m, to_t(x), tuple(map(to_t, state)), lengths, to_t(dy),
                   tuple(map(to_t, dstate)), backend="test_triton_segmenting")
        want = reference(m, x.astype(np.float64), tuple(s.astype(np.float64) for s in state),
                         lengths, dy.astype(np.float64),
                         tuple(s.astype(np.float64) for s in dstate))
        assert TritonSegmenting.calls > 2
        assert_close(got, want, rtol=2e-5, atol=2e-5)
    finally:
        rg.backends.unregister("test_triton_segmenting")


def test_describe_run_says_when_lengths_may_run_in_segments():
    """The bench's "how each case ran" line: the NumPy backend's tiling, and with lengths that
    the layer may run it in segments; the Triton backend only inside its variant."""
    problem = rg.backend_api.Problem("gru", (), "float32", "cpu", "numpy", 64, 1024, 256, 256)
    numpy_backend = rg.backends.get("numpy")
    plain = numpy_backend.describe_run(problem)
    with_lengths = numpy_backend.describe_run(replace(problem, has_lengths=True))
    assert "segments" not in plain and with_lengths.startswith("with lengths, in segments")
    assert plain in with_lengths
    pytest.importorskip("triton")
    triton_backend = rg.backends.get("triton")
    on_cuda = replace(problem, device="cuda:0", input_kind="torch", has_lengths=True)
    with triton_backend.variant("segments"):
        assert triton_backend.describe_run(on_cuda).startswith("segments over the live rows")


@pytest.mark.parametrize("answer,error,match", [
    ("cheap", TypeError, r"'test_bad_costs': segment_costs\(\) must return SegmentCosts"),
    ((1, 2, 3, 4), TypeError, "must return SegmentCosts"),
    ((-1, 0), ValueError, "step_rows >= 0"),
    (SegmentCosts(0, 0, 2.5), ValueError, "whole row_quantum >= 1"),
])
def test_a_plugin_with_bad_segment_costs_is_named(answer, error, match, rng):
    class BadCosts(NumpyBackend):
        name = "test_bad_costs"

        def segment_costs(self, problem):
            return answer

    rg.backends.register(BadCosts)
    try:
        m = rg.GRU(3, 4)
        x = rng.standard_normal((5, 6, 3)).astype(np.float32)
        with pytest.raises(error, match=match):
            m(x, lengths=[5, 1, 2, 3, 4, 5], backend="test_bad_costs")
        m(x, backend="test_bad_costs")                    # without lengths: never asked
    finally:
        rg.backends.unregister("test_bad_costs")


def test_a_plain_tuple_of_costs_is_taken(segmenting, monkeypatch, rng):
    monkeypatch.setattr(Segmenting, "segment_costs", lambda self, problem: (0, 0))
    case = LAYER_CASES["GRU-batch_first-state"]
    m, x, state, lengths, dy, dstate = build(case, rng)
    lengths[0], lengths[1] = case.T, 1
    assert_close(ours(m, x, state, lengths, dy, dstate, backend="test_segmenting"),
                 reference(m, x, state, lengths, dy, dstate), rtol=1e-10, atol=1e-12)
    assert len(Segmenting.calls) > 1
