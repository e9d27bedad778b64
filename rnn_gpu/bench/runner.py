"""The benchmark loop: for each case, build one set of weights and one input, run every runner
once and check its answer against the reference (the peer), then time the runners that were
right, interleaved (:func:`rnn_gpu.bench.timing.measure`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .cases import Case
from .flops import case_flops
from .peers import Runner
from .report import Row
from .timing import measure, timer_for

# max |ours - reference| / max(1, max |reference|): loose enough for float32 rounding that
# accumulates over 256 steps (~1e-6 seen), tight enough that any real bug fails by far.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def make_inputs(case: Case, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The weights (from an rnn_gpu layer, torch.nn's initialisation) and x, both seeded."""
    import rnn_gpu

    layer = getattr(rnn_gpu, case.cell)(case.I, case.H, dtype=case.dtype, seed=seed)
    x = np.random.default_rng(seed + 1).standard_normal((case.T, case.B, case.I))
    return layer.state_dict(), x.astype(case.dtype)


def compare(out, ref) -> float:
    """Scaled max error between two ``(y, [state...])`` results (inf if shapes differ)."""
    pairs = [(out[0], ref[0])] + list(zip(out[1], ref[1]))
    if len(out[1]) != len(ref[1]):
        return float("inf")
    worst = 0.0
    for a, b in pairs:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return float("inf")
        if not np.all(np.isfinite(a)):
            return float("inf")
        scale = max(1.0, float(np.abs(b).max(initial=0.0)))
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)) / scale)
    return worst


def run_case(case: Case, runners: list[Runner], *, repeats: int,
             peak_gflops: float | None = None,
             log: Callable[[str], None] | None = None) -> list[Row]:
    """Check, then time, every runner on one case. The first available peer is the reference.
    ``peak_gflops`` (the machine's GEMM rate) gives each row its floor."""
    params, x = make_inputs(case)
    rows, calls, results = [], {}, {}
    for runner in runners:
        row = Row(case.cell, case.shape, case.dtype, runner.name, case.device, case.pass_)
        rows.append(row)
        reason = runner.unavailable_reason(case)
        if reason:
            if runner.explicit:
                row.error = f"unavailable: {reason}"
            else:
                rows.pop()
            continue
        try:
            call = runner.prepare(case, params, x)
            results[runner.name] = call()
        except Exception as exc:
            row.error = f"failed: {type(exc).__name__}: {exc}"
            continue
        calls[runner.name] = call
    peer_name = next((r.name for r in runners if r.is_peer and r.name in results), None)
    # No peer (torch missing): our runners are still checked against each other, but no row
    # gets a ratio, since a ratio against ourselves would read as "level with the peer".
    reference = peer_name or next(iter(results), None)
    tol = TOLERANCE.get(case.dtype, 1e-4)
    for row in rows:
        if row.runner not in results:
            continue
        row.max_err = compare(results[row.runner], results[reference])
        if not row.max_err <= tol:
            row.error = (f"wrong answer: max error {row.max_err:.2e} against {reference} "
                         f"(tolerance {tol:g}); not timed")
            calls.pop(row.runner)
    results.clear()                             # free the outputs before timing
    if log:
        log(f"timing {case.label()}: {', '.join(calls)}")
    timings = measure(calls, timer=timer_for(case.device), repeats=repeats)
    flops = case_flops(case)
    for row in rows:
        timing = timings.get(row.runner)
        if timing is None:
            continue
        seconds = timing.median
        row.ms, row.best_ms = seconds * 1e3, timing.best * 1e3
        row.spread, row.samples = timing.spread, len(timing.samples)
        row.tokens_per_s = case.tokens / seconds
        row.gflops = flops / seconds / 1e9
        if peak_gflops:
            row.floor_ms = flops / peak_gflops / 1e6
    peer = next((r for r in rows if r.runner == peer_name and r.ok), None)
    for row in rows:
        if peer is not None and row.ok:
            row.ratio = peer.ms / row.ms
    return rows


def run(cases: list[Case], runners: list[Runner], *, repeats: int = 10,
        peak_gflops: float | None = None,
        log: Callable[[str], None] | None = None) -> list[Row]:
    """All cases; thread settings are the caller's (see :mod:`rnn_gpu.bench.threads`)."""
    rows = []
    for case in cases:
        rows += run_case(case, runners, repeats=repeats, peak_gflops=peak_gflops, log=log)
    return rows
