"""Choosing tiles per shape: which programs own which rows and units (DESIGN §5).

Two designs, one kernel (:mod:`.gated`, :mod:`.twostage`):

* **batch-tiled**: each program owns ``block_b`` rows and all H units, so programs never wait
  for each other. Right when the batch alone gives enough programs (DESIGN §5: 2.0-3.3x
  cuDNN at 128x16384x128 with a plain kernel of this kind).
* **split**: the units of a row block are split over programs that meet at a grid-wide
  barrier each step (one barrier ~1.2 us on an H100). Right when the batch is small: at
  512x64x1024 one program per row block ran at 0.04x cuDNN. The grid is kept to at most one
  program per SM so that every program is resident and the barrier cannot deadlock.

On a GPU the candidates for a shape are timed once and the fastest is remembered per (cell,
dtype, B, H, device) for the process: the sequence length is a runtime argument, so a new T
never recompiles or re-tunes. What is compared is the cost of one step: each candidate runs
the real call for ``SHORT_STEPS`` and for ``LONG_STEPS`` steps (CUDA events) and the difference
is divided by the extra steps. A single 8-step timing carried ~0.1-0.2 ms of fixed cost
(allocation, launch) that is not per step, so candidates within ~10% swapped between runs (H100,
LSTM fp32 4096x64x256: 16-row blocks in one run, 32-row blocks in the next). The difference
alone was still not enough for half precision, whose steps take 10-30 us: with 2 and 10 steps
the H100 measured -6.5 to +17 us per step for the same tilings (run 3), because the events also
timed the GPU idling while Python launched the call. So :func:`time_cuda` first queues ~1 ms of
GPU sleep, behind which the call's launches wait, and the two runs are 16 steps apart. The
backward is tuned apart from the forward (kind ``"<cell>-backward"``): its best tiling is
another one; so is a training forward, which also writes the tape (kind ``"<cell>-taped"``).
A second round times variants of the first round's winner that only a timing can judge (a
deeper software pipeline for long k-loops, more warps for float32's FMA loops, two programs an
SM for a batch-tiled grid larger than the card: :func:`second_round`). Under Triton's
interpreter one small fixed tiling is used (speed is meaningless there). With
``RNN_GPU_TUNE_LOG=1`` each choice and the candidates' timings are printed to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator

import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from rnn_gpu._arrays import is_out_of_memory

from . import gated_resident, interpreting
from .gated import Tiles

_cache: dict[tuple, tuple[Tiles, bool]] = {}
_lock = threading.Lock()
_forced: tuple[Tiles, bool] | None = None
SHORT_STEPS, LONG_STEPS = 2, 18   # per-step cost = (t(LONG) - t(SHORT)) / 16


def check_mode() -> None:
    """The kernels are compiled or interpreted as decided when they were imported; refuse a
    mismatch with the environment now rather than crash inside Triton. (``tl.zeros`` is
    avoided in the kernels for the same reason: it is itself a jit function whose mode is fixed
    when triton is imported.)"""
    from triton.runtime.interpreter import InterpretedFunction

    from .gated import _gated_fwd_kernel

    compiled_as_interpreted = isinstance(_gated_fwd_kernel, InterpretedFunction)
    if compiled_as_interpreted != interpreting():
        now = "set" if interpreting() else "unset"
        raise RuntimeError(
            f"TRITON_INTERPRET is {now} now but was not when rnn_gpu's Triton kernels were "
            f"imported; set or unset it before the first call that uses the triton backend")


@contextlib.contextmanager
def forced_tiles(tiles: Tiles, grid_sync: bool = False) -> Iterator[None]:
    """Use these tiles for every call in the block (tests use it to cover the split path
    under the interpreter, where the split runs one launch per step). Resident tiles are
    forced on the gated forwards only; the other calls are tuned as usual."""
    global _forced
    previous, _forced = _forced, (tiles, grid_sync)
    try:
        yield
    finally:
        _forced = previous


def _round_up(n: int, m: int) -> int:
    return triton.cdiv(n, m) * m


def _block_h(units: int) -> int:
    for b in (64, 32, 16):
        if units % b == 0:
            return b
    return 16


def resident_candidate(gates: int, B: int, H: int, dtype: str,
                       n_sm: int) -> tuple[Tiles, bool] | None:
    """The weights-resident forward tiling for this shape (:mod:`.gated_resident`), or None
    where it cannot run: half precision only, 64-row blocks (a wgmma tile), the fewest units
    per program that keep every program resident (grid barrier), weights and h within shared
    memory."""
    if dtype not in ("float16", "bfloat16"):
        return None
    bb = gated_resident.MIN_ROWS
    n_blocks = triton.cdiv(B, bb)
    units = 16 // gated_resident.gate_slots(gates)      # the product's N must be >= 16
    while units < H and n_blocks * triton.cdiv(H, units) > n_sm:
        units *= 2
    if n_blocks * triton.cdiv(H, units) > n_sm or not gated_resident.fits(gates, bb, units, H):
        return None
    split = triton.cdiv(H, units) > 1
    return Tiles(bb, units, 0, units, 8, resident=True), split


def candidates(gates: int, B: int, H: int, dtype: str, n_sm: int,
               resident: bool = False) -> list[tuple[Tiles, bool]]:
    """Tilings worth timing for this shape, best guess first; with ``resident`` (a gated
    forward) the weights-resident tiling first where it can run."""
    first = resident_candidate(gates, B, H, dtype, n_sm) if resident else None
    streaming = _streaming_candidates(gates, B, H, dtype, n_sm)
    return [first, *streaming] if first is not None else streaming


def _streaming_candidates(gates: int, B: int, H: int, dtype: str,
                          n_sm: int) -> list[tuple[Tiles, bool]]:
    block_k = 32 if dtype.startswith("float32") else 64     # float32, float32-tf32x3, ...
    rows_cap = max(16, triton.next_power_of_2(B))
    out: list[tuple[Tiles, bool]] = []
    for bb in (128, 64, 32, 16):
        if bb > rows_cap:
            continue
        n_blocks = triton.cdiv(B, bb)
        max_split = n_sm // n_blocks
        if max_split < 2:
            continue
        units = _round_up(triton.cdiv(H, max_split), 16)
        if triton.cdiv(H, units) < 2:
            continue
        bh = _block_h(units)
        out.append((Tiles(bb, bh, block_k, units, _warps(gates, bb, bh)), True))
    for bb in (64, 128):
        bb = min(bb, rows_cap)
        bh = 64 if H > 32 else max(16, triton.next_power_of_2(H))
        tiling = (Tiles(bb, bh, block_k, _round_up(H, bh), _warps(gates, bb, bh)), False)
        # batch-tiled only pays when the batch alone fills a good part of the card
        if triton.cdiv(B, bb) * 4 >= n_sm and tiling not in out:
            out.append(tiling)
    if not out:                                   # tiny problem: one small program is fine
        return [(Tiles(16, 16, 16, _round_up(H, 16)), False)]
    # At most four (five with the resident one): each candidate is compiled (~1-2 s) and
    # timed on first use of a shape.
    # Split tilings with more programs first (more SMs busy), then larger row blocks.
    def programs(option):
        tiles = option[0]
        return triton.cdiv(B, tiles.block_b) * triton.cdiv(H, tiles.units)

    split = sorted((o for o in out if o[1]), key=lambda o: (-programs(o), -o[0].block_b))
    tiled = [o for o in out if not o[1]]
    return (split[:2] + _wider(split[:1], gates, H) + tiled)[:4]


def _warps(gates: int, bb: int, bh: int) -> int:
    # accumulators: gates*bb*bh fp32 values spread over the threads; 8 warps above 8K values
    # keeps them at <= 64 registers per thread.
    return 8 if gates * bb * bh >= 8192 else 4


def _wider(split: list[tuple[Tiles, bool]], gates: int,
           H: int) -> list[tuple[Tiles, bool]]:
    """The first split tiling with twice the units per program (half the programs), where the
    units still split: every program reads its rows' whole h_{t-1} (backward: dgates_t) and its
    columns of W_hh each step, so the step's L2 traffic grows with the number of unit splits.
    Estimate for the LSTM backward at 512x64x1024 fp16 (run 4: 28 us a step against cuDNN's
    15): 32-row blocks of 16 units read ~48 MB a step, of 32 units ~33 MB, each program then
    ~0.5 MB (~5 us at an SM's share of L2). Only the timing can say which wins."""
    if not split:
        return []
    tiles = split[0][0]
    units = tiles.units * 2
    if triton.cdiv(H, units) < 2:
        return []
    bh = _block_h(units)
    return [(dataclasses.replace(tiles, units=units, block_h=bh,
                                 num_warps=_warps(gates, tiles.block_b, bh)), True)]


def choose(kind: str, gates: int, B: int, H: int, dtype: str, device,
           time_call: Callable[[Tiles, bool, int], float], *,
           resident: bool = False) -> tuple[Tiles, bool]:
    """``(tiles, grid_sync)`` for one call. ``time_call(tiles, grid_sync, n_steps)`` runs the
    first ``n_steps`` steps of the real call with that tiling and returns milliseconds.
    ``resident``: the call can take the weights-resident forward kernel."""
    if _forced is not None and (resident or not _forced[0].resident):
        return _forced                  # (resident tiles are forced on forwards only)
    if interpreting():
        return _interpreted_tiles(H)
    props = _properties(device)
    key = _shape_key(kind, gates, B, H, dtype, device, props)
    with _lock:
        if key in _cache:
            return _cache[key]
    options = candidates(gates, B, H, dtype, props.multi_processor_count, resident)
    if len(options) == 1:
        best = options[0]
    else:
        failures: list[str] = []
        per_step = [_timed(time_call, option, failures) for option in options]
        if min(per_step) == math.inf:         # nothing to cache: every call would fail
            raise RuntimeError(f"triton: no tiling of {kind} {dtype} B={B} H={H} runs on "
                               f"this card: " + "; ".join(failures))
        winner = options[per_step.index(min(per_step))]
        extra = second_round(winner, kind, gates, B, H, dtype, props.multi_processor_count)
        options = options + extra
        per_step = per_step + [_timed(time_call, option) for option in extra]
        best = options[per_step.index(min(per_step))]
        deepest = deeper_pipeline(winner, kind, gates, H, stages=4)
        if deepest is not None and best[0].num_stages == 3:    # a third stage paid: a fourth?
            options.append(deepest)
            per_step.append(_timed(time_call, deepest))
            best = options[per_step.index(min(per_step))]
        if os.environ.get("RNN_GPU_TUNE_LOG"):
            shown = ", ".join(f"{_describe(o)}: {ms * 1e3:.1f} us"
                              for o, ms in zip(options, per_step))
            print(f"rnn_gpu triton tiles for {kind} {dtype} B={B} H={H} (per step): "
                  f"{shown} -> {_describe(best)}", file=sys.stderr)
    with _lock:
        _cache[key] = best
    return best


# With num_stages=2, Triton 3.6 gives a k-loop one buffer: each iteration waits for all of its
# own copies (ttgir async_wait num=0) before its products, so every iteration pays a full L2
# round trip. With 3 stages the next iteration's copies are in flight during this one's
# products (LSTM: async_wait num=5, two buffers; tests/triton_compile_check.py shows both),
# with 4 stages the next two iterations' (backward: async_wait num=4, three buffers).
# That matters for long k-loops whose products are short next to a round trip: the LSTM fp16
# backward at 512x64x1024 runs 64 iterations a step (K = 4H = 4096, BLOCK_K 64) at 25.9 us a
# step (H100, run 5), ~0.4 us each, about one round trip; at 256x4096x256 its two passes of 16
# iterations took 84 us a step, their 64 x 64 x 64 products a few hundred cycles each. For a
# short loop it did not pay: 256x4096x256 fp16 forward (4 iterations), 3 stages 24.6 against
# 2 stages' 23.3 us a step (run 3's sweep). So the tuner times the winner again with 3 stages
# where its loop has at least DEEP_PIPELINE_MIN_K_ITERATIONS iterations a step, and with 4
# where it has DEEPER_PIPELINE_MIN_K_ITERATIONS and 3 stages paid (where they did not, the loop
# is not waiting on its copies, and each variant timed costs ~2-3 s of compile and timing on
# first use), and keeps the fastest. (A 4-stage tiling whose buffers exceed the card's shared
# memory, e.g. the fp16 forward's 128 x 64 tile at 192 KiB on a smaller card, fails to launch
# and is skipped.)
DEEP_PIPELINE_MIN_K_ITERATIONS = 8
DEEPER_PIPELINE_MIN_K_ITERATIONS = 16


def deeper_pipeline(option: tuple[Tiles, bool], kind: str, gates: int,
                    H: int, stages: int = 3) -> tuple[Tiles, bool] | None:
    """``option`` with ``stages`` (3 or 4) pipeline stages, where its product loop is long
    enough for that to pay (DEEP_PIPELINE_MIN_K_ITERATIONS, DEEPER_PIPELINE_MIN_K_ITERATIONS);
    None otherwise, and for the resident forward, which has no k-loop."""
    tiles, sync = option
    if tiles.resident or tiles.num_stages != 2 or tiles.block_k <= 0:
        return None
    k_extent = gates * H if kind.endswith("-backward") else H   # dgates_t @ W_hh: K = G*H
    needed = {3: DEEP_PIPELINE_MIN_K_ITERATIONS, 4: DEEPER_PIPELINE_MIN_K_ITERATIONS}[stages]
    if triton.cdiv(k_extent, tiles.block_k) < needed:
        return None
    return dataclasses.replace(tiles, num_stages=stages), sync


# float32 (IEEE) products run on the CUDA cores as FMA loops, not on the tensor cores. Until
# their weights came transposed, their shared-memory reads were 16-way bank conflicts, which
# account for 137 of run 5's 158 us a step of the LSTM forward's 16 x 32 tiling at 512x64x1024
# (tests/triton_compile_check.py --fma-banks; common.weights_transposed). Without them the
# loop's FMAs and reads take ~0.5K and ~1.3K cycles per k-iteration and SM at 4 warps, one
# warp per scheduler, so latencies are exposed; 8 warps split the same tile in two (two warps
# a scheduler, no spills). Only a timing can say which wins, so the tuner times both.
def more_warps(option: tuple[Tiles, bool], dtype: str) -> tuple[Tiles, bool] | None:
    """``option`` with 8 warps where it has fewer and its products are IEEE float32 FMA
    loops; None otherwise."""
    tiles, sync = option
    if dtype != "float32" or tiles.resident or tiles.num_warps >= 8:
        return None
    return dataclasses.replace(tiles, num_warps=8), sync


def second_round(option: tuple[Tiles, bool], kind: str, gates: int, B: int, H: int,
                 dtype: str, n_sm: int) -> list[tuple[Tiles, bool]]:
    """Variants of the first round's winner that only a timing can judge: one more pipeline
    stage (:func:`deeper_pipeline`), more warps (:func:`more_warps`), two programs an SM
    (:func:`co_resident`). (A fourth stage is timed after them, where the third paid:
    :func:`choose`.)"""
    variants = (deeper_pipeline(option, kind, gates, H), more_warps(option, dtype),
                co_resident(option, B, H, n_sm))
    return [v for v in variants if v is not None]


# A batch-tiled grid with more programs than SMs runs in waves when one program fills an SM's
# register file. At 128x16384x128 the half-precision forward's 64-row tiling (run 5's choice)
# compiles to 255 registers x 256 threads (sm_90, tests/triton_compile_check.py), so its 256
# programs ran as two waves, 132 then 124, each program's step a chain of dependent L2 and HBM
# round trips: ~19 us a step per wave (5.43 ms, 128 steps, two waves, ~0.5 ms of input GEMM)
# against ~4 us of bytes and products. With 4 warps over unit blocks half as wide, the same rows
# take 255 x 128 registers (no spills in the forward; the backward spills 724 B against 668 B
# at 8 warps) and 48 KiB of shared memory, so two programs share an SM and the whole grid is
# resident at once: where the steps wait on latency, the second program runs in the first's
# stalls. Where they do not (run 5 also chose 64 rows over 128, which would fit in one wave),
# it is slower, so only a timing can say.
def co_resident(option: tuple[Tiles, bool], B: int, H: int,
                n_sm: int) -> tuple[Tiles, bool] | None:
    """``option`` with 4 warps and unit blocks half as wide, for a batch-tiled ``option`` at 8
    warps whose programs outnumber the SMs; None otherwise."""
    tiles, sync = option
    if sync or tiles.resident or tiles.num_warps != 8:
        return None
    if triton.cdiv(B, tiles.block_b) * triton.cdiv(H, tiles.units) <= n_sm:
        return None
    block_h = tiles.block_h // 2
    if block_h < 16 or tiles.units % block_h:
        return None
    return dataclasses.replace(tiles, num_warps=4, block_h=block_h), sync


def step_ms(time_call: Callable[[Tiles, bool, int], float],
            option: tuple[Tiles, bool]) -> float:
    """Milliseconds per step of one tiling, with the fixed cost of a call taken out."""
    short = time_call(*option, SHORT_STEPS)
    long = time_call(*option, LONG_STEPS)
    return (long - short) / (LONG_STEPS - SHORT_STEPS)


# What a tiling that cannot run here raises: Triton's compile errors, ptxas's, its resource
# check, and the launch's RuntimeError ("Triton Error [CUDA]: ...", e.g. a cooperative grid the
# driver cannot hold at once). Not an out-of-memory error, though torch's is a RuntimeError too:
# the call itself would not fit either, and the caller must see it as one (rnn-gpu run halves
# a batch on it; as "no tiling runs on this card" the run failed).
CANNOT_RUN = (CompilationError, OutOfResources, PTXASError, RuntimeError)


def _timed(time_call: Callable[[Tiles, bool, int], float], option: tuple[Tiles, bool],
           failures: list[str] | None = None) -> float:
    """:func:`step_ms`, or infinity for a tiling this card cannot compile or launch (a
    resident tile over its shared memory, say): the next candidate is taken instead, and the
    reason goes to ``failures``."""
    try:
        return step_ms(time_call, option)
    except CANNOT_RUN as exc:
        if is_out_of_memory(exc):
            raise
        reason = f"{_describe(option)}: {type(exc).__name__}: {str(exc)[:200]}"
        if failures is not None:
            failures.append(reason)
        if os.environ.get("RNN_GPU_TUNE_LOG"):
            print(f"rnn_gpu triton tiles: cannot run here: {reason}", file=sys.stderr)
        return math.inf


def _interpreted_tiles(H: int) -> tuple[Tiles, bool]:
    return Tiles(16, 16, 16, _round_up(H, 16)), False


def _properties(device):
    import torch

    return torch.cuda.get_device_properties(device)


def _shape_key(kind: str, gates: int, B: int, H: int, dtype: str, device, props) -> tuple:
    """What a choice is remembered under: the shape and the card, with the device as
    ``cuda:N`` whether it came as a torch device or a string (``cuda``: the current one)."""
    import torch

    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    return kind, gates, B, H, dtype, props.name, str(device)


def chosen(kind: str, gates: int, B: int, H: int, dtype: str, device) -> str | None:
    """What :func:`choose` runs for this shape, described; None before its first call."""
    if _forced is not None and not (_forced[0].resident and kind.endswith("-backward")):
        return f"{_describe(_forced)} (forced)"
    if interpreting():
        return f"{_describe(_interpreted_tiles(H))} (interpreter)"
    key = _shape_key(kind, gates, B, H, dtype, device, _properties(device))
    with _lock:
        option = _cache.get(key)
    return None if option is None else _describe(option)


def _describe(option: tuple[Tiles, bool]) -> str:
    t, sync = option
    if t.resident:
        return f"resident{' split' if sync else ''} b{t.block_b} u{t.units} w{t.num_warps}"
    stages = f" s{t.num_stages}" if t.num_stages != 2 else ""        # 2: the default
    return (f"{'split' if sync else 'tiled'} b{t.block_b} h{t.block_h} k{t.block_k} "
            f"u{t.units} w{t.num_warps}{stages}")


def time_cuda(run: Callable[[], object], repeats: int = 5) -> float:
    """Median milliseconds of ``run()`` by CUDA events, after one untimed call (compiles).

    Each timed call is queued behind ~1 ms of GPU sleep, so the events see the GPU's time for
    the call and not the host's: a short call (2 steps of a half-precision kernel, ~30 us) is
    otherwise shorter than Python's launch of it, and the events then time the launch."""
    import torch

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _queue_sleep(torch)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


SLEEP_CYCLES = 2_000_000    # ~1 ms at the H100's 1.98 GHz; > the host's launch of one call


def _queue_sleep(torch) -> None:
    sleep = getattr(torch.cuda, "_sleep", None)      # private, but in torch since 0.4
    if sleep is not None:
        sleep(SLEEP_CYCLES)


def tuned() -> dict[tuple, tuple[Tiles, bool]]:
    """What was chosen so far in this process (for reports)."""
    with _lock:
        return dict(_cache)
