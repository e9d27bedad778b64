"""The Triton tile tuner compares the per-step cost of its candidates, not one short timing.

No GPU needed: the device properties and the timings are stood in for, the way a card would
report them; the last test runs the backend's own timing call through the interpreter. As in
test_triton_interpreter.py, ``TRITON_INTERPRET`` is set before the kernels are first imported
(it decides, once, whether they are compiled or interpreted), and on a machine with a GPU the
module is skipped so that the gpu tests get compiled kernels.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'rnn-gpu[test]')")

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU is present: the gpu tests run the compiled kernels and the real tuner")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def launch(interpret):
    from rnn_gpu.kernels.triton import launch

    return launch


@pytest.fixture
def Tiles(interpret):
    from rnn_gpu.kernels.triton.gated import Tiles

    return Tiles


def fake_call(costs: dict, calls: list | None = None):
    """A ``time_call`` whose tiling costs ``fixed + per_step * n_steps`` milliseconds; a tiling
    with a deeper pipeline than the costs name costs as its 2-stage self, unless named."""

    def time_call(tiles, grid_sync, n_steps):
        if calls is not None:
            calls.append((tiles, n_steps))
        fixed, per_step = costs.get(tiles) or costs[dataclasses.replace(tiles, num_stages=2)]
        return fixed + per_step * n_steps

    return time_call


def test_step_ms_takes_the_fixed_cost_out(launch, Tiles):
    tiles = Tiles(64, 64, 32, 256)
    ms = launch.step_ms(fake_call({tiles: (0.4, 0.025)}), (tiles, False))
    assert ms == pytest.approx(0.025)


@pytest.fixture
def fake_card(monkeypatch, launch):
    """choose() as on a 132-SM card, with an empty cache."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(name="Fake H100",
                                                             multi_processor_count=132))
    monkeypatch.setattr(launch, "_cache", {})


def test_choose_prefers_the_cheaper_step_over_the_cheaper_short_call(fake_card, launch):
    options = launch.candidates(4, 4096, 256, "float32", 132)
    assert len(options) >= 2
    cheap_step, cheap_call = options[0][0], options[1][0]
    # Over 8 steps the second is faster (0.05 + 8*0.05 = 0.45 against 0.5 + 8*0.01 = 0.58 ms),
    # but per step the first is five times cheaper: a long sequence wants the first.
    costs = {o[0]: (1.0, 1.0) for o in options}
    costs[cheap_step] = (0.5, 0.01)
    costs[cheap_call] = (0.05, 0.05)
    calls: list = []
    best = launch.choose("lstm", 4, 4096, 256, "float32", "cuda:0", fake_call(costs, calls))
    assert best[0] == cheap_step
    assert {n for _, n in calls} == {launch.SHORT_STEPS, launch.LONG_STEPS}
    # Remembered: a second call for the same shape times nothing.
    calls.clear()
    again = launch.choose("lstm", 4, 4096, 256, "float32", "cuda:0", fake_call(costs, calls))
    assert again == best and calls == []


def test_chosen_describes_what_choose_runs(fake_card, launch, Tiles, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert launch.chosen("gru", 3, 4096, 256, "float16", "cuda:0") is None   # not tuned yet
    options = launch.candidates(3, 4096, 256, "float16", 132)
    costs = {o[0]: (0.1, 0.05) for o in options}
    costs[options[-1][0]] = (0.1, 0.01)
    best = launch.choose("gru", 3, 4096, 256, "float16", torch.device("cuda:0"),
                         fake_call(costs))
    assert best == options[-1]
    described = launch.chosen("gru", 3, 4096, 256, "float16", "cuda")   # the current device
    t = best[0]
    assert described == (f"{'split' if best[1] else 'tiled'} b{t.block_b} h{t.block_h} "
                         f"k{t.block_k} u{t.units} w{t.num_warps}")
    with launch.forced_tiles(Tiles(16, 16, 16, 16)):
        assert launch.chosen("gru", 3, 4096, 256, "float16", "cuda:0").endswith("(forced)")


def test_the_backend_reports_the_tiling_under_the_interpreter(launch):
    import rnn_gpu as rg
    from rnn_gpu.backend_api import Problem

    problem = Problem(cell="twostage", activations=("tanh", "tanh"), dtype="float32",
                      device="cpu", input_kind="torch", seq_len=4, batch=3, input_size=5,
                      hidden_size=20)
    assert rg.backends.get("triton").describe_run(problem) == (
        "tiled b16 h16 k16 u32 w4 (interpreter)")
    training = dataclasses.replace(problem, training=True)     # backward tuned on its own
    assert rg.backends.get("triton").describe_run(training) == (
        "forward tiled b16 h16 k16 u32 w4 (interpreter); backward tiled b16 h16 k16 u32 w4 "
        "(interpreter)")


def test_backend_times_whole_steps_even_for_a_short_sequence(monkeypatch, launch):
    """The backend's timing call runs LONG_STEPS real steps when the sequence is shorter (the
    input is repeated), and the chosen tiling still gives the right answer."""
    import rnn_gpu as rg
    from rnn_gpu.kernels.triton import gated

    seen: list[int] = []
    real_forward, real_choose = gated.gated_forward, launch.choose

    def spy_forward(cell, act, xw, *args, **kwargs):
        seen.append(xw.shape[0])
        return real_forward(cell, act, xw, *args, **kwargs)

    def choose_by_timing(kind, gates, B, H, dtype, device, time_call, resident=False):
        option = real_choose(kind, gates, B, H, dtype, device, time_call)
        launch.step_ms(time_call, option)
        return option

    monkeypatch.setattr(gated, "gated_forward", spy_forward)
    monkeypatch.setattr(launch, "choose", choose_by_timing)
    monkeypatch.setattr(launch, "time_cuda", lambda run: (run(), 1.0)[1])

    rng = np.random.default_rng(0)
    layer = rg.GRU(3, 8)
    x = rng.standard_normal((3, 2, 3)).astype(np.float32)
    y, _ = layer(torch.from_numpy(x), backend="triton")
    assert seen == [launch.SHORT_STEPS, launch.LONG_STEPS, 3]
    y_ref, _ = layer(x, backend="numpy")
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=2e-5, atol=2e-5)


def test_time_cuda_queues_gpu_sleep_before_each_timed_call(monkeypatch, launch):
    """Each timed call sits behind a GPU sleep recorded before its start event (so the events
    time the GPU, not Python's launch), and the median of the repeats is returned."""
    log: list[str] = []
    elapsed = iter([5.0, 1.0, 3.0, 2.0, 4.0])

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("record")

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return next(elapsed)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(f"sleep {cycles}"),
                        raising=False)
    ms = launch.time_cuda(lambda: log.append("run"))
    sleep = f"sleep {launch.SLEEP_CYCLES}"
    assert log == ["run", "sync"] + [sleep, "record", "run", "record"] * 5
    assert ms == 3.0


@pytest.mark.parametrize("cell,opts", [("LSTM", None), ("GRU", None),
                                       ("TwoStageRNN", {"f": "tanh", "g": "sigmoid"})])
def test_backward_chooses_its_own_tiling_and_stays_right(monkeypatch, launch, Tiles, cell,
                                                         opts, rng):
    """The backward is tuned apart from the forward (kind '<cell>-backward'), its timing call
    runs SHORT_STEPS and LONG_STEPS steps of the tape even for a shorter sequence, and with a
    tiling other than the forward's (units split over programs) the gradients still match the
    float64 oracle: the tape does not depend on how the forward was cut."""
    from oracles import assert_close, ours, reference
    from test_layers_vs_torch import Case, build

    from rnn_gpu.kernels.triton import gated, twostage

    split = (Tiles(block_b=16, block_h=16, block_k=16, units=16), False)
    kinds, steps = [], []
    real_choose = launch.choose

    def choose(kind, gates, B, H, dtype, device, time_call, resident=False):
        kinds.append(kind)
        if not kind.endswith("-backward"):
            return real_choose(kind, gates, B, H, dtype, device, time_call)
        launch.step_ms(time_call, split)              # what the tuner would time, then:
        return split

    def spy(real):
        def backward(tape, dy, *args, tiles=None, grid_sync=None):
            steps.append((dy.shape[0], tiles.units if tiles else None))
            return real(tape, dy, *args, tiles=tiles, grid_sync=grid_sync)
        return backward

    monkeypatch.setattr(launch, "choose", choose)
    monkeypatch.setattr(launch, "time_cuda", lambda run: (run(), 1.0)[1])
    monkeypatch.setattr(gated, "gated_backward", spy(gated.gated_backward))
    monkeypatch.setattr(twostage, "twostage_backward", spy(twostage.twostage_backward))
    case = Case(cell=cell, opts=opts, dtype="float32", T=3, B=5, I=4, H=40, with_state=True,
                lengths="zero")
    m, x, state, lengths, dy, dstate = build(case, rng)
    lengths = lengths.copy()
    lengths[0] = 3          # one full-length row: the layer runs only up to the longest length
    want = reference(m, x, state, lengths, dy, dstate)
    got = ours(m, x, state, lengths, dy, dstate, backend="triton")
    assert_close(got, want, rtol=2e-5, atol=2e-5, what=f"{cell}: ")
    kind = {"LSTM": "lstm", "GRU": "gru", "TwoStageRNN": "twostage"}[cell]
    assert kinds == [f"{kind}-taped", f"{kind}-backward"]   # a training forward: its own
    assert steps == [(launch.SHORT_STEPS, 16), (launch.LONG_STEPS, 16), (3, 16)]


def test_the_backward_is_tuned_under_the_precision_its_forward_ran_in(monkeypatch, launch):
    """The drop-ins run the forward in the TF32 scope of torch.backends.cudnn.allow_tf32 and
    the backward outside it: the backward's tiling was keyed (and cached) as IEEE float32."""
    from rnn_gpu.torch import GRU

    keys = []
    real_choose = launch.choose

    def choose(kind, gates, B, H, dtype, device, time_call, resident=False):
        keys.append((kind, dtype))
        return real_choose(kind, gates, B, H, dtype, device, time_call)

    monkeypatch.setattr(launch, "choose", choose)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    m = GRU(4, 8, backend="triton")
    m(torch.randn(3, 2, 4))[0].sum().backward()
    assert keys == [("gru-taped", "float32-tf32"), ("gru-backward", "float32-tf32")]


def test_resident_candidate_keeps_every_program_resident_and_in_shared_memory(launch):
    """DESIGN's 512x64x1024 LSTM on 132 SMs: one 64-row block, 8 units per program (128
    programs, the grid barrier's limit), 64 KB of weights and 128 KB of h; half precision only;
    none where the programs or the shared memory cannot hold it."""
    from rnn_gpu.kernels.triton import gated_resident

    tiles, split = launch.resident_candidate(4, 64, 1024, "bfloat16", 132)
    assert (tiles.resident, tiles.block_b, tiles.units, split) == (True, 64, 8, True)
    assert gated_resident.smem_bytes(4, 64, 8, 1024) == (64 + 128) * 1024
    assert launch.resident_candidate(1, 64, 1024, "float16", 132)[0].units == 16   # RNN: N>=16
    assert launch.resident_candidate(4, 64, 1024, "float32", 132) is None
    assert launch.resident_candidate(4, 1024, 512, "float16", 132) is None   # 16 row blocks
    assert launch.resident_candidate(4, 64, 4096, "float16", 132) is None    # h alone: 512 KB
    first, *rest = launch.candidates(4, 64, 1024, "float16", 132, resident=True)
    assert first[0].resident and rest == launch.candidates(4, 64, 1024, "float16", 132)
    assert not any(o[0].resident for o in rest)


def test_a_candidate_that_cannot_run_here_is_skipped(fake_card, launch):
    """A tiling the card cannot compile or launch (a resident tile over its shared memory)
    costs infinity in the comparison instead of failing the call."""
    from triton.runtime.errors import OutOfResources

    options = launch.candidates(4, 64, 1024, "float16", 132, resident=True)
    assert options[0][0].resident

    def time_call(tiles, grid_sync, n_steps):
        if tiles.resident or tiles.num_stages > 2:
            raise OutOfResources(232 * 1024, 227 * 1024, "shared memory")
        return 0.1 + 0.01 * n_steps * (1 + options.index((tiles, grid_sync)))

    best = launch.choose("lstm", 4, 64, 1024, "float16", "cuda:0", time_call, resident=True)
    assert best == options[1]      # (its 3-stage variant, timed next, could not run either)


def test_a_refused_launch_or_ptxas_error_is_skipped_and_nothing_runnable_is_an_error(
        fake_card, launch):
    """ptxas's errors and a launch's RuntimeError (a cooperative grid the driver cannot hold
    at once) failed the whole first call; a shape no tiling can run was cached anyway."""
    from triton.runtime.errors import PTXASError

    options = launch.candidates(4, 64, 1024, "float16", 132)
    refused = {options[0][0]: RuntimeError("Triton Error [CUDA]: too many blocks in "
                                           "cooperative launch"),
               options[1][0]: PTXASError("ptxas fatal")}

    def time_call(tiles, grid_sync, n_steps):
        if tiles in refused:
            raise refused[tiles]
        return 0.1 + 0.01 * n_steps

    best = launch.choose("lstm", 4, 64, 1024, "float16", "cuda:0", time_call)
    assert best[0] not in refused

    def nothing_runs(tiles, grid_sync, n_steps):
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    with pytest.raises(RuntimeError, match=r"triton: no tiling of gru float16 B=64 H=1024 runs "
                                           r"on this card: .*too many blocks"):
        launch.choose("gru", 3, 64, 1024, "float16", "cuda:0", nothing_runs)
    with pytest.raises(RuntimeError, match="no tiling"):          # not cached: asked again
        launch.choose("gru", 3, 64, 1024, "float16", "cuda:0", nothing_runs)


def test_deeper_pipeline_only_for_long_product_loops(launch, Tiles):
    """One more stage where the k-loop runs at least DEEP_PIPELINE_MIN_K_ITERATIONS times a
    step: K = H forward, G*H backward (dgates_t @ W_hh), over BLOCK_K."""
    tiles = Tiles(16, 32, 64, 32)
    deeper = launch.deeper_pipeline((tiles, True), "lstm-backward", 4, 1024)   # 64 iterations
    assert deeper == (dataclasses.replace(tiles, num_stages=3), True)
    assert launch.deeper_pipeline((tiles, True), "lstm", 4, 1024) is not None  # 16
    assert launch.deeper_pipeline((tiles, True), "lstm", 4, 256) is None       # 4
    assert launch.deeper_pipeline((tiles, True), "lstm-taped", 4, 448) is None  # 7
    assert launch.deeper_pipeline((tiles, True), "lstm-backward", 4, 128) is not None  # 8
    assert launch.deeper_pipeline((tiles, True), "rnn-backward", 1, 128) is None       # 2
    assert launch.deeper_pipeline(deeper, "lstm-backward", 4, 1024) is None    # once
    resident = Tiles(64, 8, 0, 8, resident=True)
    assert launch.deeper_pipeline((resident, True), "lstm", 4, 1024) is None   # no k-loop
    assert launch._describe(deeper) == "split b16 h32 k64 u32 w4 s3"
    # 4 stages from 16 iterations a step
    deepest = launch.deeper_pipeline((tiles, True), "lstm-backward", 4, 1024, stages=4)
    assert deepest == (dataclasses.replace(tiles, num_stages=4), True)
    assert launch._describe(deepest) == "split b16 h32 k64 u32 w4 s4"
    assert launch.deeper_pipeline((tiles, True), "lstm", 4, 1024, stages=4) is not None   # 16
    assert launch.deeper_pipeline((tiles, True), "lstm", 4, 960, stages=4) is None        # 15
    assert launch.deeper_pipeline((tiles, True), "lstm-backward", 4, 128, stages=4) is None  # 8


def test_float32_fma_loops_are_also_tried_with_more_warps(launch, Tiles):
    tiles = Tiles(32, 16, 32, 16, num_warps=4)
    assert launch.more_warps((tiles, True), "float32") == (
        dataclasses.replace(tiles, num_warps=8), True)
    assert launch.more_warps((tiles, True), "float16") is None            # tensor cores
    assert launch.more_warps((tiles, True), "float32-tf32x3") is None     # tensor cores
    assert launch.more_warps((dataclasses.replace(tiles, num_warps=8), True), "float32") is None
    # both variants of a long float32 loop (forward K = 1024, BLOCK_K 32: 32 iterations)
    second = launch.second_round((tiles, True), "lstm", 4, 64, 1024, "float32", 132)
    assert [launch._describe(o) for o in second] == ["split b32 h16 k32 u16 w4 s3",
                                                     "split b32 h16 k32 u16 w8"]


def test_a_tiled_grid_larger_than_the_card_is_also_tried_two_programs_an_sm(launch, Tiles):
    tiled = Tiles(64, 64, 64, 128, num_warps=8)
    spread = (Tiles(64, 32, 64, 128, num_warps=4), False)
    assert launch.co_resident((tiled, False), 16384, 128, 132) == spread   # 256 programs
    assert launch.co_resident((tiled, False), 8192, 128, 132) is None      # 128: one wave
    assert launch.co_resident((tiled, True), 16384, 128, 132) is None      # split
    assert launch.co_resident(spread, 16384, 128, 132) is None             # already 4 warps
    assert launch.co_resident((Tiles(64, 16, 64, 128, 8), False), 16384, 128, 132) is None
    assert launch.co_resident((Tiles(64, 64, 0, 64, 8, resident=True), False), 16384, 128,
                              132) is None


@pytest.mark.parametrize("spread_ms,chosen", [(0.5, "spread"), (2.0, "winner")])
def test_choose_times_a_tiled_winner_again_two_programs_an_sm(fake_card, launch, spread_ms,
                                                              chosen):
    """LSTM fp16 at B=16384, H=128: the 64-row tiling's 256 programs outnumber the 132 SMs, so
    the winner is timed again with 4 warps over half-width unit blocks; the faster is kept."""
    options = launch.candidates(4, 16384, 128, "float16", 132)
    winner = options[0]
    assert winner[0].block_b == 64 and not winner[1]
    spread = launch.co_resident(winner, 16384, 128, 132)
    costs = {o[0]: (0.1, 1.0 + i) for i, o in enumerate(options)}
    costs[spread[0]] = (0.1, spread_ms)
    calls: list = []
    best = launch.choose("lstm", 4, 16384, 128, "float16", "cuda:0", fake_call(costs, calls))
    assert best == {"spread": spread, "winner": winner}[chosen]
    assert [t for t, _ in calls].count(spread[0]) == 2      # the short and the long run


@pytest.mark.parametrize("s3_ms,s4_ms,winner", [(0.5, 2.0, 3), (0.5, 0.3, 4), (2.0, 0.5, 2),
                                                 (2.0, 2.0, 2)])
def test_choose_times_the_winner_again_with_deeper_pipelines(fake_card, launch, s3_ms, s4_ms,
                                                            winner):
    """At a long k-loop (LSTM backward at 512x64x1024: 64 iterations) the winner of the first
    round is timed again with 3 stages, and where that paid with 4; the fastest is kept."""
    options = launch.candidates(4, 64, 1024, "float16", 132)
    costs = {o[0]: (0.1, 2.0 + i) for i, o in enumerate(options)}
    costs[options[1][0]] = (0.1, 1.0)                       # the first round's winner
    s3 = launch.deeper_pipeline(options[1], "lstm-backward", 4, 1024)
    s4 = launch.deeper_pipeline(options[1], "lstm-backward", 4, 1024, stages=4)
    costs[s3[0]], costs[s4[0]] = (0.1, s3_ms), (0.1, s4_ms)
    calls: list = []
    best = launch.choose("lstm-backward", 4, 64, 1024, "float16", "cuda:0",
                         fake_call(costs, calls))
    assert best == {2: options[1], 3: s3, 4: s4}[winner]
    timed = [t for t, _ in calls]
    fourth = s3_ms < 1.0                          # timed only where the third stage paid
    assert timed.count(s3[0]) == 2 and timed.count(s4[0]) == (2 if fourth else 0)
    assert len(set(timed)) == len(options) + 1 + fourth


def test_resident_tiles_are_forced_on_forwards_only(launch, Tiles):
    tiles = Tiles(64, 8, 0, 8, resident=True)
    with launch.forced_tiles(tiles, True):
        assert launch.choose("lstm", 4, 64, 1024, "float16", "cpu", None, resident=True) == (
            tiles, True)
        backward = launch.choose("lstm-backward", 4, 64, 1024, "float16", "cpu", None)
        assert not backward[0].resident
        assert launch.chosen("lstm", 4, 64, 1024, "float16", "cpu") == (
            "resident split b64 u8 w4 (forced)")
        assert "resident" not in launch.chosen("lstm-backward", 4, 64, 1024, "float16", "cpu")


def test_the_first_split_tiling_is_also_offered_with_half_the_programs(launch):
    """Every program reads its rows' whole h (backward: dgates) and its W_hh columns each step,
    so fewer, wider programs move fewer bytes; the tuner times that variant too."""
    def described(B, H, dtype="float16"):
        return [launch._describe(o) for o in launch.candidates(4, B, H, dtype, 132)]

    assert described(64, 1024) == ["split b32 h16 k64 u16 w4", "split b16 h32 k64 u32 w4",
                                   "split b32 h32 k64 u32 w4"]        # 128, 128, 64 programs
    assert described(4096, 256)[2] == "split b128 h64 k64 u128 w8"     # 32 x 2 programs
    assert not any(d.startswith("split") for d in described(16384, 128))   # none to widen


def test_out_of_memory_while_timing_is_raised_as_such(fake_card, launch):
    """torch.cuda.OutOfMemoryError is a RuntimeError, which the tuner takes for a tiling the
    card cannot launch: every candidate "failed" and the call raised "no tiling ... runs on
    this card", which rnn-gpu run does not recognise as out of memory (it halves the batch on
    one), nor would anyone reading it. The error itself must come through, and nothing be
    cached."""
    from rnn_gpu._arrays import is_out_of_memory

    def no_memory(tiles, grid_sync, n_steps):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
        launch.choose("lstm", 4, 64, 1024, "float16", "cuda:0", no_memory, resident=True)
    assert is_out_of_memory(caught.value)
    assert launch.tuned() == {}
