"""The benchmark loop: for each case, build one set of weights and one input, run every runner
once and check its answer against the reference (the peer), then time the runners that were
right, interleaved (:func:`rnn_gpu.bench.timing.measure`). On a GPU each runner's peak memory
is read off torch's allocator around one call.

The asv suite (``asv_benchmarks/``) uses the same pieces: :func:`make_inputs`,
:func:`check_against_peer` and the runners, so the two cannot disagree on what they measure.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .cases import Case
from .flops import case_flops
from .memory import peak_bytes
from .peers import Runner
from .report import Row
from .timing import measure, timer_for

# max |ours - reference| / max(1, max |reference|): loose enough for float32 rounding that
# accumulates over 256 steps (~1e-6 seen), tight enough that any real bug fails by far.
# Half precisions: both sides round every step, so they drift apart by a few ulps of 2^-8
# (bf16) or 2^-11 (fp16) per step before the gates squash it.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


def make_inputs(case: Case, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The weights (from an rnn_gpu layer, torch.nn's initialisation) and x, both seeded, in
    float32 (float64 for a float64 case); each runner casts them to the case's dtype."""
    import rnn_gpu

    host = "float64" if case.dtype == "float64" else "float32"
    layer = getattr(rnn_gpu, case.cell)(case.I, case.H, dtype=host, seed=seed,
                                        **case.layer_options())
    shape = (case.T, case.B, case.I)
    if case.on_gpu:          # drawn on the device: 1 GiB of x took seconds on the host
        import torch

        gen = torch.Generator(device=case.device).manual_seed(seed + 1)
        return layer.state_dict(), torch.randn(shape, generator=gen, device=case.device)
    x = np.random.default_rng(seed + 1).standard_normal(shape)
    return layer.state_dict(), x.astype(host)


def compare(out, ref) -> float:
    """Scaled max error between two ``(y, [state...])`` results (inf if shapes differ or a
    value is not finite). Results are NumPy arrays or torch tensors (compared on their device
    in float64, without a copy to the host)."""
    if len(out[1]) != len(ref[1]):
        return float("inf")
    worst = 0.0
    for a, b in [(out[0], ref[0]), *zip(out[1], ref[1])]:
        a, b = _float64_pair(a, b)
        if tuple(a.shape) != tuple(b.shape):
            return float("inf")
        if a.numel() if hasattr(a, "numel") else a.size:
            if not bool(_isfinite(a).all()):
                return float("inf")
            scale = max(1.0, float(abs(b).max()))
            worst = max(worst, float(abs(a - b).max()) / scale)
    return worst


def _float64_pair(a, b):
    """Both as float64 NumPy arrays, or both as float64 torch tensors on the device of
    whichever is a CUDA tensor."""
    from rnn_gpu._arrays import kind_of

    if "torch" not in (kind_of(a), kind_of(b)):
        return np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    import torch

    device = next((t.device for t in (a, b) if kind_of(t) == "torch"), "cpu")
    return tuple(torch.as_tensor(t).to(device=device, dtype=torch.float64) for t in (a, b))


def _isfinite(a):
    return a.isfinite() if hasattr(a, "isfinite") else np.isfinite(a)


class WrongAnswer(AssertionError):
    """A runner's output disagrees with the peer's beyond the dtype's tolerance."""

    def __init__(self, message: str, max_err: float, tolerance: float):
        super().__init__(message)
        self.max_err, self.tolerance = max_err, tolerance


def check_against_peer(case: Case, result, reference, *, runner: str, peer: str) -> float:
    """The scaled max error of ``result`` against ``reference``; raises :class:`WrongAnswer`
    beyond the dtype's tolerance."""
    err = compare(result, reference)
    tol = TOLERANCE.get(case.dtype, 1e-4)
    if not err <= tol:
        raise WrongAnswer(f"{runner} on {case.label()}: max error {err:.2e} against {peer} "
                          f"(tolerance {tol:g})", err, tol)
    return err


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
            prepared = runner.prepare(case, params, x)
            results[runner.name] = prepared.result()
            if case.on_gpu:
                row.peak_bytes = peak_bytes(prepared.call, case.device)
        except Exception as exc:
            row.error = f"failed: {type(exc).__name__}: {exc}"
            continue
        calls[runner.name] = prepared.call
    peer_name = next((r.name for r in runners if r.is_peer and r.name in results), None)
    # No peer (torch missing): our runners are still checked against each other, but no row
    # gets a ratio, since a ratio against ourselves would read as "level with the peer".
    reference = peer_name or next(iter(results), None)
    for row in rows:
        if row.runner not in results:
            continue
        try:
            row.max_err = check_against_peer(case, results[row.runner], results[reference],
                                             runner=row.runner, peer=reference)
        except WrongAnswer as wrong:
            row.max_err = wrong.max_err
            row.error = (f"wrong answer: max error {wrong.max_err:.2e} against {reference} "
                         f"(tolerance {wrong.tolerance:g}); not timed")
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
    by_name = {r.name: r for r in runners}
    for row in rows:
        if peer is not None and row.ok:
            row.ratio = peer.ms / row.ms
        if row.ok:
            row.config = by_name[row.runner].describe_run(case)
    if log:     # each case's numbers as soon as they exist: a bench cut off by its time limit
        log(f"timed {case.label()}: " + "; ".join(_brief(r) for r in rows))  # keeps them
    return rows


def _brief(row: Row) -> str:
    if not row.ok:
        return f"{row.runner} {row.error}"
    ratio = "" if row.ratio is None else f" {row.ratio:.2f}x"
    err = "" if row.max_err is None else f" err {row.max_err:.1e}"
    return f"{row.runner} {row.ms:.3f} ms{ratio}{err} [{row.config or ''}]"


def run(cases: list[Case], runners: list[Runner], *, repeats: int = 10,
        peak_gflops: float | None = None,
        log: Callable[[str], None] | None = None,
        after_case: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """All cases; thread settings are the caller's (see :mod:`rnn_gpu.bench.threads`).
    ``after_case(rows so far)`` is called as each case is done (the CLI saves its JSON then)."""
    rows = []
    for case in cases:
        rows += run_case(case, runners, repeats=repeats, peak_gflops=peak_gflops, log=log)
        if after_case is not None:
            after_case(rows)
    return rows
