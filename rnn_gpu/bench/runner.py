"""The benchmark loop: for each case, build one set of weights and one input, run every runner
once and check its answer against the reference (the peer; in half precision the peer in
float32 on the same rounded inputs, :meth:`~rnn_gpu.bench.cases.Case.float32_oracle`), then time
the runners that were right, interleaved (:func:`rnn_gpu.bench.timing.measure`). On a GPU each
runner's peak memory is read off torch's allocator around one call.

The asv suite (``asv_benchmarks/``) uses the same pieces: :func:`make_inputs`,
:func:`reference_result`, :func:`check_against_peer` and the runners, so the two cannot
disagree on what they measure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .cases import Case, round_inputs
from .flops import case_flops
from .kernels import profile_kernels
from .load import LoadMeter
from .memory import peak_bytes
from .peers import Runner
from .report import Row
from .timing import measure, timer_for

# max |ours - reference| / max(1, max |reference|): loose enough for float32 rounding that
# accumulates over 256 steps (~1e-6 seen), tight enough that any real bug fails by far.
# Half precisions are checked against the float32 oracle (Case.float32_oracle) by DESIGN §6's
# relative RMS error of each array, at the GPU tests' tolerances (tests/test_triton_gpu.py);
# the max error is only a net there, for errors confined to a few rows or steps (a wrong row
# or step is off by O(1)): half precision's own max error grows with the sequence and is not
# what DESIGN bounds.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-1, "bfloat16": 1e-1}
RMS_TOLERANCE = {"float16": 1e-2, "bfloat16": 2e-2}


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
        x = torch.randn(shape, generator=gen, device=case.device)
    else:
        x = np.random.default_rng(seed + 1).standard_normal(shape).astype(host)
    params = {k: round_inputs(v, case) for k, v in layer.state_dict().items()}
    return params, round_inputs(x, case)


def compare(out, ref) -> float:
    """Scaled max error between two ``(y, [state...])`` results (inf if shapes differ or a
    value is not finite). Results are NumPy arrays or torch tensors (compared on their device
    in float64, without a copy to the host)."""
    return _worst(out, ref, (_scaled_max_error,))[0]


def _worst(out, ref, errors) -> list[float]:
    """Each of ``errors`` (functions of a float64 pair), its largest over the arrays; every
    array is converted once, whatever the number of measures (a train pass at 128x16384x128
    has two 2 GiB float64 arrays a pair)."""
    if len(out[1]) != len(ref[1]):
        return [float("inf")] * len(errors)
    worst = [0.0] * len(errors)
    for a, b in [(out[0], ref[0]), *zip(out[1], ref[1])]:
        a, b = _float64_pair(a, b)
        if tuple(a.shape) != tuple(b.shape):
            return [float("inf")] * len(errors)
        if a.numel() if hasattr(a, "numel") else a.size:
            if not bool(_isfinite(a).all()):
                return [float("inf")] * len(errors)
            worst = [max(w, error(a, b)) for w, error in zip(worst, errors)]
    return worst


def _scaled_max_error(a, b) -> float:
    return float(abs(a - b).max()) / max(1.0, float(abs(b).max()))


def _relative_rms_error(a, b) -> float:
    """``||a - b|| / max(||b||, 1e-3)``, norms as RMS: DESIGN §6's measure for half precision."""
    return float(((a - b) ** 2).mean() ** 0.5) / max(float((b * b).mean() ** 0.5), 1e-3)


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
    """A runner's output disagrees with the reference beyond the dtype's tolerance."""

    def __init__(self, runner: str, case: Case, detail: str, max_err: float, tolerance: float,
                 rms_err: float | None = None):
        super().__init__(f"{runner} on {case.label()}: {detail}")
        self.detail = detail        # "<which error> <value> against <reference> (tolerance)"
        self.max_err, self.tolerance, self.rms_err = max_err, tolerance, rms_err


@dataclass(frozen=True)
class Agreement:
    """How far a result is from the reference: the scaled max error, and for half precision
    the relative RMS error (None otherwise)."""

    max_err: float
    rms_err: float | None = None


def check_against_peer(case: Case, result, reference, *, runner: str, peer: str) -> Agreement:
    """The errors of ``result`` against ``reference`` (for a half-precision case: the float32
    oracle's result, :meth:`Case.float32_oracle`); raises :class:`WrongAnswer` beyond the
    dtype's tolerances."""
    if case.half:       # both measures from one float64 conversion of each array
        err, rms = _worst(result, reference, (_scaled_max_error, _relative_rms_error))
    else:
        err, rms = compare(result, reference), None
    tol = TOLERANCE.get(case.dtype, 1e-4)
    if rms is not None and not rms <= RMS_TOLERANCE[case.dtype]:
        rms_tol = RMS_TOLERANCE[case.dtype]
        raise WrongAnswer(runner, case, f"relative RMS error {rms:.2e} against {peer} "
                          f"(tolerance {rms_tol:g})", err, rms_tol, rms)
    if not err <= tol:
        raise WrongAnswer(runner, case, f"max error {err:.2e} against {peer} (tolerance {tol:g})",
                          err, tol, rms)
    return Agreement(err, rms)


def reference_result(case: Case, peer: Runner):
    """``peer``'s result for the reference of ``case`` (the case itself, or for half precision
    its float32 oracle on the same rounded inputs), or None if the peer cannot run it."""
    oracle = case.float32_oracle()
    if peer.unavailable_reason(oracle) is not None:
        return None
    params, x = make_inputs(oracle)
    return peer.prepare(oracle, params, x).result()


def run_case(case: Case, runners: list[Runner], *, repeats: int,
             peak_gflops: float | None = None,
             log: Callable[[str], None] | None = None, kernels: int = 0) -> list[Row]:
    """Check, then time, every runner on one case. The first available peer is the reference.
    ``peak_gflops`` (the machine's GEMM rate) gives each row its floor. ``kernels`` > 0 (on a
    GPU): each timed runner's call once more under the profiler, its kernels' time and that
    many of its costliest kernels in the row (:mod:`rnn_gpu.bench.kernels`)."""
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
    by_name = {r.name: r for r in runners}
    peer_name = next((r.name for r in runners if r.is_peer and r.name in results), None)
    # No peer (torch missing): our runners are still checked against one of them (the NumPy
    # backend where it ran: the plain one, not a plugin that sorts before it), but no row
    # gets a ratio, since a ratio against ourselves would read as "level with the peer".
    reference_name = peer_name or ("numpy" if "numpy" in results else next(iter(results), None))
    reference = results.get(reference_name)
    # The runner whose own result is the reference is not compared with it (an error of 0
    # against itself would read as "verified"): its errors stay None, and one of ours in that
    # place says so under the table. Half precision replaces the reference by the float32
    # oracle below, against which the peer too has an error.
    self_referenced = reference_name
    if case.half and peer_name is not None:
        # Half precision: every runner, the peer too, against the peer in float32 on the same
        # rounded inputs (Case.float32_oracle), by DESIGN §6's relative RMS.
        oracle = None
        try:
            oracle = reference_result(case, by_name[peer_name])
        except Exception as exc:
            if log:
                log(f"{case.label()}: no float32 oracle ({type(exc).__name__}: {exc}); "
                    f"checked against {peer_name} in {case.dtype}")
        if oracle is not None:
            reference, reference_name = oracle, f"{peer_name} in float32"
            self_referenced = None
        del oracle                              # one name for it, freed before the timing
    for row in rows:
        if row.runner not in results:
            continue
        if row.runner == self_referenced:
            if not by_name[row.runner].is_peer:
                row.warning = (f"unchecked: no peer ran ({_peer_reasons(rows, by_name)}), so "
                               f"nothing independent checked its answer; its errors are "
                               f"not shown" + (" (the other runners' are against it)"
                                               if len(results) > 1 else ""))
            continue
        row.checked_against = reference_name
        try:
            agreement = check_against_peer(case, results[row.runner], reference,
                                           runner=row.runner, peer=reference_name)
        except WrongAnswer as wrong:
            row.max_err, row.rms_err = wrong.max_err, wrong.rms_err
            if by_name[row.runner].is_peer:     # the bar we are measured against: timed
                row.warning = (f"the peer itself is beyond the tolerance: {wrong.detail}; "
                               f"timed as users run it")   # as users run it, its errors shown
                continue
            row.error = f"wrong answer: {wrong.detail}; not timed"
            calls.pop(row.runner)
        else:
            row.max_err, row.rms_err = agreement.max_err, agreement.rms_err
    results.clear()                             # free the outputs before timing
    del reference
    if log:
        log(f"timing {case.label()}: {', '.join(calls)}")
    with LoadMeter() as load:
        timings = measure(calls, timer=timer_for(case.device), repeats=repeats)
    flops = case_flops(case)
    for row in rows:
        timing = timings.get(row.runner)
        if timing is None:
            continue
        row.other_cores = load.other_cores
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
        if row.ok:
            try:
                row.config = by_name[row.runner].describe_run(case)
            except Exception as exc:      # a plugin's broken description costs the column only
                row.config = f"(describe_run failed: {type(exc).__name__}: {exc})"
        if row.ok and kernels:
            try:
                row.kernel_ms, row.kernels = profile_kernels(calls[row.runner], case.device,
                                                             kernels)
            except Exception as exc:      # a profiler that cannot start costs the split only
                if log:
                    log(f"{case.label()}: {row.runner}: no kernel profile "
                        f"({type(exc).__name__}: {exc})")
    if log:     # each case's numbers as soon as they exist: a bench cut off by its time limit
        briefs = (_brief(r, by_name[r.runner].is_peer) for r in rows)     # keeps them
        log(f"timed {case.label()}: " + "; ".join(briefs))
    return rows


def _peer_reasons(rows: list[Row], by_name: dict[str, Runner]) -> str:
    """Why no peer of a case ran: each peer row's error, or that none was asked for."""
    reasons = [f"{r.runner}: {r.error.removeprefix('unavailable: ')}" for r in rows
               if by_name[r.runner].is_peer and r.error]
    return "; ".join(reasons) or "none was run"


def _brief(row: Row, is_peer: bool) -> str:
    if not row.ok:
        return f"{row.runner} {row.error}"
    ratio = "" if row.ratio is None else f" {row.ratio:.2f}x"
    err = ((" reference" if is_peer else " unchecked") if row.checked_against is None
           else "" if row.max_err is None else f" err {row.max_err:.1e}")
    err += "" if row.rms_err is None else f" rms {row.rms_err:.1e}"
    kernels = "" if row.kernel_ms is None else f" kernels {row.kernel_ms:.3f} ms"
    return f"{row.runner} {row.ms:.3f} ms{ratio}{err}{kernels} [{row.config or ''}]"


def run(cases: list[Case], runners: list[Runner], *, repeats: int = 10,
        peak_gflops: float | None = None,
        log: Callable[[str], None] | None = None,
        after_case: Callable[[list[Row]], None] | None = None,
        kernels: int = 0) -> list[Row]:
    """All cases; thread settings are the caller's (see :mod:`rnn_gpu.bench.threads`).
    ``after_case(rows so far)`` is called as each case is done (the CLI saves its JSON then);
    ``kernels`` as :func:`run_case`'s."""
    rows = []
    for case in cases:
        rows += run_case(case, runners, repeats=repeats, peak_gflops=peak_gflops, log=log,
                         kernels=kernels)
        if after_case is not None:
            after_case(rows)
    return rows
