"""The contract between the layer code and a backend (DESIGN §4).

A backend implements the fused recurrence of **one layer and one direction**, forward and
backward. The layer code has already applied the input weight to all time steps as one GEMM:

    xw[t] = W_ih x_t + b_ih          (T, B, gates*H), in torch.nn's gate order

and hands the backend ``xw``, the recurrent parameters of that layer and direction (base names
without the ``_l{k}`` suffix, see :mod:`rnn_gpu.cells`), the initial state and the lengths.

Equations per cell (DESIGN §2), with ``hh = W_hh h_{t-1} + b_hh``:

* ``rnn``:      ``h_t = act(xw_t + hh)``, ``act = problem.activations[0]`` (tanh or relu)
* ``lstm``:     ``i,f,g,o = split(xw_t + hh)``; ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``;
                ``h_t = σ(o) tanh(c_t)`` (then ``h_t = W_hr h_t`` when ``weight_hr`` is given)
* ``gru``:      ``r,z = σ(xw_r + hh_r), σ(xw_z + hh_z)``; ``n = tanh(xw_n + r * hh_n)``;
                ``h_t = (1 - z) n + z h_{t-1}``
* ``twostage``: ``a_t = f(xw_t + W_aa h_{t-1})``; ``h_t = g(W_ha a_t + W_hh h_{t-1} + b_h)``

``lengths`` (host int64 array of B, or None) has packed-sequence semantics: at steps
``t >= lengths[b]`` row b keeps its state and outputs zero. A reverse direction walks t from
T-1 down to 0, so each row starts at its own end.

``weights`` by cell (``_hh`` biases absent with ``bias=False``; H hidden, P ``proj_size``):

* ``rnn``, ``gru``, ``lstm``: ``weight_hh`` (gates*H, H), ``bias_hh`` (gates*H,); gates 1, 3, 4.
  LSTM with P > 0: ``weight_hh`` is (4H, P) and ``weight_hr`` (P, H); the state's h is (B, P).
* ``twostage``: ``weight_aa``, ``weight_ha``, ``weight_hh`` (H, H) and ``bias_h`` (H,); ``b_a``
  is in ``xw``. ``problem.activations`` is ``(f, g)``, each "tanh", "sigmoid" or "relu".

What a backend can rely on:

* Every array it is given is in its ``array_kind`` ("numpy", "torch" or "cupy"), on
  ``problem.device``, in ``problem.dtype``; T and B are at least 1. ``xw`` and ``dy`` are
  C-contiguous; the state, the parameters and ``forward_layer``'s x may be views (a caller's
  sliced h0, a batch_first input): make them contiguous where a kernel needs it.
* ``problem.seq_len`` and ``problem.batch`` are this call's (with lengths, T is the longest
  length; with ``segment_costs``, a segment's steps and rows, and ``lengths`` may then be None
  though ``problem.has_lengths`` is set). ``problem.input_size`` is the model's, not this
  layer's (``x.shape[-1]`` in ``forward_layer``).
* ``backward`` is called at most once per tape, with ``dstate`` filled (zeros where the caller
  gave none).

What it must do:

* **Not write into any array it is given.** They may be the caller's own (h0, c0, dy,
  ``dstate``, the parameters, ``forward_layer``'s x); the layer hands them over without a
  copy, and a tape checked at ``backward`` would blame the caller for the change.
* Return arrays of its ``array_kind`` in ``problem.dtype`` (y (T, B, H_out), the state in
  the shapes it was given), a tape when ``keep_tape`` is set, and from ``backward`` one
  gradient per weight it was given, by the same names. The layer checks the kinds, shapes,
  dtypes and names (metadata only) and names the backend when one is wrong.
* Keep per-call state in the tape, not on the instance: one instance serves every call in the
  process, from several threads at once (``rnn_gpu.dask`` on the threads scheduler, a server).

What a tape may refer to instead of copying: the arrays it was given (x, xw, the state, the
weights) and the y it returned. The layer guards the caller's arrays among them against
in-place changes until ``backward`` (fingerprints: torch's version counters, a CRC of NumPy
arrays, a bit sum of CuPy ones), the returned y included, whatever the backend: ``backward``
refuses a tape whose y the caller changed, naming y. h_{t-1} is y one step earlier, or the
initial state at a row's first step (with lengths, in reverse, the row's last valid step),
and y is zero past each row's length.

Optional, writing y where the layer wants it (``accepts_out = True`` on the backend):
``forward`` and ``forward_layer`` then take a keyword ``out``, a (T, B, H_out) array of the
backend's kind and the problem's dtype, possibly a strided view (one direction's half of a
bidirectional output, a segment's steps and rows of the layer's y), and write y there, every
element (zeros past each row's length), and return it as y. The layer passes ``out`` only to
a backend that says it takes it, and not always; a backend without the attribute is called as
before (its y is copied where the layer needs it). A tape that refers to y then refers to the
layer's own output, which saves the copy of y and keeps none beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Problem:
    """Everything a backend needs to decide whether it can serve a call."""

    cell: str                       # "rnn" | "lstm" | "gru" | "twostage"
    activations: tuple[str, ...]    # rnn: (nonlinearity,); twostage: (f, g); else ()
    dtype: str                      # "float32", "float64", "float16", "bfloat16"
    device: str                     # "cpu" or "cuda:N"
    input_kind: str                 # the caller's array kind: "numpy", "torch", "cupy"
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    proj_size: int = 0
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    training: bool = False          # True when a backward pass will follow
    has_lengths: bool = False

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    def describe(self) -> str:
        act = f"({','.join(self.activations)})" if self.activations else ""
        return (f"{self.cell}{act} T={self.seq_len} B={self.batch} I={self.input_size} "
                f"H={self.hidden_size}{f' P={self.proj_size}' if self.proj_size else ''} "
                f"{self.dtype} on {self.device}{' training' if self.training else ''}"
                f"{' with lengths' if self.has_lengths else ''}")


@dataclass(frozen=True)
class SegmentCosts:
    """What a backend tells the layer about its calls, for variable lengths (in row-steps: one
    row for one step is 1). See ``Backend.segment_costs``."""

    step_rows: float                # what a step costs beyond its rows (calls, reading W_hh)
    segment_cost: float             # what starting a call costs
    row_quantum: int = 1            # a call's rows are a multiple of this (or the whole batch)


@dataclass
class Tape:
    """What a backend's forward keeps for its backward. ``data`` is the backend's own business."""

    backend: str
    problem: Problem
    reverse: bool
    data: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Base class for backends. Subclass it (or duck-type it) and register the class.

    Class attributes:
      ``name``       unique registry name
      ``priority``   auto selection takes the highest-priority backend that serves a problem
      ``array_kind`` the array kind ``forward``/``backward`` take and return
    """

    name: str = "unnamed"
    priority: int = 0
    array_kind: str = "numpy"
    # True: forward/forward_layer take out= (see the module docstring)
    accepts_out: bool = False

    def unavailable_reason(self) -> str | None:
        """None when usable on this machine, else why not ("cupy is not installed")."""
        return None

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        """Why this backend declines ``problem``; empty when it can serve it."""
        return []

    def describe_run(self, problem: Problem) -> str | None:
        """How this backend runs ``problem`` (its tiling, its path), for benchmark reports;
        None when it has nothing to say. Optional. A backend that tunes per shape reports what
        it chose, so ask after a call."""
        return None

    def forward(
        self,
        problem: Problem,
        xw: Any,
        weights: dict[str, Any],
        state: tuple[Any, ...],
        lengths: np.ndarray | None,
        *,
        reverse: bool,
        keep_tape: bool,
    ) -> tuple[Any, tuple[Any, ...], Tape | None]:
        """Run one layer and direction.

        ``state`` is ``(h0,)`` or, for LSTM, ``(h0, c0)``; each (B, H_out) / (B, H).
        Returns ``(y, final_state, tape)``: y is (T, B, H_out) with zeros at padded steps,
        ``final_state`` has the structure of ``state``, tape is None unless ``keep_tape``.
        A backend with ``accepts_out = True`` also takes ``out=`` (the module docstring).
        """
        raise NotImplementedError

    # Optional: named ways of running that a benchmark compares side by side (the cupy
    # backend's paths; `rnn-gpu bench --backend cupy:persistent`):
    #
    #     variants() -> tuple[str, ...]        the names
    #     variant(name) -> context manager     calls made inside it run that way
    #
    # A variant is a process-wide setting while it is entered (benchmarks run one at a time).
    variants = None

    # Optional, the "larger fused path" of DESIGN §4: a backend that can do the input
    # projection better than the layer's one big GEMM (its own threads, no (T, B, gates*H)
    # array in memory, biases folded) defines
    #
    #     forward_layer(problem, x, w_ih, b_ih, weights, state, lengths, *, reverse, keep_tape)
    #
    # with x the layer's input (T, B, I) in this backend's array kind, w_ih (gates*H, I) and
    # b_ih (gates*H,) or None; it returns what forward returns, and backward is unchanged (it
    # still returns the gradient of xw = W_ih x + b_ih). The layer calls it when present.
    forward_layer = None

    # Optional, for variable lengths: a backend whose step costs less with fewer rows defines
    #
    #     segment_costs(problem) -> SegmentCosts | None
    #
    # The layer then runs the time loop as a few calls (segments), each over the rows still
    # running at its start, longest first (rnn_gpu._segments chooses them by those costs). Each
    # call is an ordinary forward/forward_layer of fewer steps and rows, with its own lengths;
    # backward gets each call's tape. None (or no method): one call over every row and step.
    segment_costs = None

    def backward(
        self, tape: Tape, dy: Any, dstate: tuple[Any, ...]
    ) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """Reverse of :meth:`forward`: ``dy`` (T, B, H_out), ``dstate`` like the final state.

        Returns ``(dxw, dstate0, dweights)``: dxw (T, B, gates*H) is the gradient of ``xw``
        (the layer turns it into dx, dW_ih and db_ih); dweights has one entry per recurrent
        parameter that ``forward`` received.
        """
        raise NotImplementedError
