"""Live-row segments: run a variable-length batch over only the rows still running.

Used by the layer code (``rnn_gpu.layers``) for a backend that asks for it with
``segment_costs`` (see :mod:`rnn_gpu.backend_api`): the layer runs every layer and direction
as one backend call per segment, gathering the segment's rows by index (``Schedule.order``) and
putting its results back in those rows, so that every array between calls keeps the caller's
row order.

With ``lengths``, row b is live at step t when ``t < lengths[b]``, in either direction. Sorted
by length, longest first, the live rows of step t are a prefix of the batch, and the prefix only
shrinks as t grows. A backend that runs the time loop in a few **segments** ``[start, stop)``,
each over the rows live at its first step, does close to the work of the valid steps (as a
packed sequence does) while each segment is still one ordinary dense call: its rows that end
inside the segment are masked there, as without segments.

:func:`plan` picks the segment boundaries that minimise a simple cost, in row-steps:

    sum over segments of  (stop - start) * (rows + step_rows)  +  segment_cost

``step_rows`` is what a step costs whatever its rows (the per-step calls, reading W_hh), and
``segment_cost`` what starting a call costs, both as equivalent rows (a backend's
``SegmentCosts``). With uniform lengths the work falls to about half of T*B, the valid steps,
plus the masked tail of each segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rnn_gpu.backend_api import SegmentCosts

# The dynamic programme considers at most this many boundaries (the distinct lengths, thinned
# evenly): 65 candidates cost ~2 ms of Python, and finer boundaries save little.
_MAX_CANDIDATES = 64


@dataclass(frozen=True)
class Segment:
    """Steps ``[start, stop)`` over the first ``rows`` rows of the sorted batch.

    ``lengths`` are those rows' lengths within the segment (``lengths[b] - start``, at most
    ``stop - start``), or None when every row runs the whole segment.
    """

    start: int
    stop: int
    rows: int
    lengths: np.ndarray | None

    @property
    def steps(self) -> int:
        return self.stop - self.start


def few_row_counts(batch: int, *, counts: int = 8, minimum: int = 64) -> int:
    """A row quantum that gives a batch at most ``counts`` segment sizes, each a multiple of
    ``minimum``: for GPU backends whose tuning or captured graphs are keyed on the batch."""
    return max(minimum, -(-batch // (counts * minimum)) * minimum)


def sort_order(lengths: np.ndarray) -> np.ndarray | None:
    """The row order that sorts ``lengths`` longest first (stable), or None if it already is."""
    lengths = np.asarray(lengths)
    if lengths.size < 2 or bool(np.all(lengths[:-1] >= lengths[1:])):
        return None
    return np.argsort(-lengths, kind="stable")


def live_rows(sorted_lengths: np.ndarray, t) -> np.ndarray | int:
    """How many rows of a longest-first batch are live at step(s) ``t``."""
    ascending = np.asarray(sorted_lengths)[::-1]
    return len(ascending) - np.searchsorted(ascending, t, side="right")


def plan(sorted_lengths: np.ndarray, steps: int, *, step_rows: float, segment_cost: float,
         row_quantum: int = 1) -> list[Segment]:
    """Segments covering steps ``[0, steps)`` of a batch sorted longest first; see the module
    doc for the cost they minimise. Rows of length 0 are in no segment. With ``row_quantum``,
    each segment's rows are rounded up to a multiple of it (at most the batch): the rows added
    have ended, and are masked in that segment."""
    lengths = np.asarray(sorted_lengths, dtype=np.int64)
    if steps <= 0 or lengths.size == 0 or lengths[0] <= 0:
        return []
    q = max(1, int(row_quantum))
    # The boundaries worth considering are where a row ends: t = L for each length L.
    ends = np.unique(lengths[(lengths > 0) & (lengths < steps)])
    if len(ends) > _MAX_CANDIDATES - 1:
        ends = ends[np.linspace(0, len(ends) - 1, _MAX_CANDIDATES - 1).round().astype(int)]
        ends = np.unique(ends)
    bounds = np.concatenate([[0], ends, [steps]])
    live = live_rows(lengths, bounds)
    live = np.where(live > 0, np.minimum(-(-live // q) * q, len(lengths)), 0)
    n = len(bounds)
    best = np.full(n, np.inf)
    best[0] = 0.0
    came_from = np.zeros(n, dtype=np.int64)
    for j in range(1, n):
        cost = best[:j] + (bounds[j] - bounds[:j]) * (live[:j] + step_rows) + segment_cost
        k = int(np.argmin(cost))
        best[j], came_from[j] = cost[k], k
    cuts = [n - 1]
    while cuts[-1] != 0:
        cuts.append(int(came_from[cuts[-1]]))
    cuts.reverse()
    segments = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        start, stop, rows = int(bounds[a]), int(bounds[b]), int(live[a])
        if rows == 0:                          # only rows of length 0 are left: nothing runs
            continue
        within = np.clip(lengths[:rows] - start, 0, stop - start)
        segments.append(Segment(start, stop, rows,
                                None if within.min() >= stop - start else within))
    return segments


@dataclass(frozen=True)
class Schedule:
    """How a layer call runs its steps: the segments, and the row order they assume.

    Without segments there is one segment of every step and row, with the caller's lengths (or
    None when no row ends early), and ``order`` is None.
    """

    segments: list[Segment]
    order: np.ndarray | None = None             # row i of the sorted batch is row order[i]
    whole: bool = False                         # one call over every row and step


def schedule(backend: Any, problem: Any, lengths: np.ndarray | None, steps: int) -> Schedule:
    """The segments a layer call runs on ``backend``; one dense segment unless the backend
    names its costs (``segment_costs``) and several segments beat one."""
    batch = problem.batch
    whole_lengths = None if lengths is None or int(lengths.min(initial=steps)) >= steps else lengths
    whole = Schedule([Segment(0, steps, batch, whole_lengths)], whole=True)
    costs = getattr(backend, "segment_costs", None)
    if whole_lengths is None or batch < 2 or not callable(costs):
        return whole
    costs = _checked_costs(backend, costs(problem))
    if costs is None:
        return whole
    order = sort_order(lengths)
    ordered = lengths if order is None else lengths[order]
    segments = plan(ordered, steps, step_rows=costs.step_rows, segment_cost=costs.segment_cost,
                    row_quantum=costs.row_quantum)
    if len(segments) <= 1 and (not segments or segments[0].rows == batch):
        return whole
    return Schedule(segments, order)


def _checked_costs(backend: Any, costs: Any) -> SegmentCosts | None:
    """A backend's answer as SegmentCosts (a plain tuple of its fields is taken too)."""
    if costs is None or isinstance(costs, SegmentCosts):
        pass
    elif isinstance(costs, (tuple, list)) and 2 <= len(costs) <= 3:
        costs = SegmentCosts(*costs)
    else:
        raise TypeError(f"backend {getattr(backend, 'name', backend)!r}: segment_costs() must "
                        f"return SegmentCosts(step_rows, segment_cost[, row_quantum]) or None, "
                        f"got {costs!r:.80}")
    if costs is not None:
        numbers = (costs.step_rows, costs.segment_cost, costs.row_quantum)
        if not all(isinstance(v, (int, float, np.integer, np.floating)) and v >= 0
                   for v in numbers) or int(costs.row_quantum) != costs.row_quantum or (
                costs.row_quantum < 1):
            raise ValueError(f"backend {getattr(backend, 'name', backend)!r}: segment_costs() "
                             f"must give step_rows >= 0, segment_cost >= 0 and a whole "
                             f"row_quantum >= 1, got {costs}")
    return costs
