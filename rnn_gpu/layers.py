"""Recurrent layers: RNN, LSTM, GRU and the seed's TwoStageRNN (DESIGN §2, §3).

The layer code owns what is common to every backend: argument checking, the hoisted input GEMM
(``W_ih x + b_ih`` for all time steps at once), stacking layers and directions, dropout between
layers, lengths, layouts (batch_first, unbatched) and array kinds. The backend does one layer
and direction of the recurrence (see :mod:`rnn_gpu.backend_api`).
"""

from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import _checks, _config, _fingerprint, _segments, _warnings, registry
from ._arrays import Ops, device_of, dtype_name, kind_of, parse_device, to_kind, to_numpy
from ._dtypes import canonical_dtype, host_dtype
from ._matmul import matmul
from .backend_api import Problem, Tape
from .cells import (
    ACTIVATIONS,
    GRU_SPEC,
    LSTM_SPEC,
    RNN_NONLINEARITIES,
    RNN_SPEC,
    TWOSTAGE_SPEC,
    CellSpec,
    parameter_name,
    parameter_shapes,
)


@dataclass
class LayerTape:
    """What :meth:`RecurrentLayer.forward` keeps for :meth:`RecurrentLayer.backward`."""

    problem: Problem
    backend: Any
    layout: dict[str, Any]
    inputs: list[Any] = field(default_factory=list)          # each layer's input (T, B, ·)
    dropout_masks: list[Any] = field(default_factory=list)   # per layer, None where unused
    tapes: list[list[Tape]] = field(default_factory=list)    # [layer][direction]
    input_weights: list[list[Any]] = field(default_factory=list)
    used: bool = False
    owner: Any = None                                        # the layer whose forward made it
    precision: str = "ieee"                                  # float32 products, as forward's
    steps: int = 0                          # the steps forward ran: T, or the longest length
    schedule: Any = None                    # _segments.Schedule: segments and row order
    # (what, the caller's array, its fingerprint at forward): what the tapes refer to
    fingerprints: list[tuple[str, Any, Any]] = field(default_factory=list)

    def check_unchanged(self) -> None:
        """Raise if an array the tape refers to was changed in place since forward."""
        what = _fingerprint.first_changed(self.fingerprints)
        if what == _Y:
            raise RuntimeError(
                f"tape: {what} was changed in place after forward(); backward reads it (the "
                f"tape refers to y rather than keeping a copy of it), so the gradients would "
                f"be wrong. Change a copy instead (y = y * 2 or y.copy()/y.clone() first, not "
                f"y *= 2 or an in-place op such as torch.relu_), or run forward() again")
        if what is not None:
            raise RuntimeError(
                f"tape: {what} was changed in place after forward(); the gradients would be "
                f"for values the forward did not use. Run forward() again after changing it "
                f"(an optimizer step belongs after backward())")


# How check_unchanged names the output: the core layers return it as y, the torch drop-ins
# as their output tensor (the same memory).
_Y = "y (the output of forward(); in rnn_gpu.torch, the layer's output tensor)"


class RecurrentLayer:
    """Shared machinery; use :class:`RNN`, :class:`LSTM`, :class:`GRU`, :class:`TwoStageRNN`."""

    _spec: CellSpec

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, *,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, dtype: Any = "float32",
                 seed: int | None = None):
        self.input_size = _checks.positive_int("input_size", input_size)
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self.num_layers = _checks.positive_int("num_layers", num_layers)
        self.proj_size = _checks.positive_int("proj_size", proj_size, minimum=0)
        if self.proj_size and self._spec.kind != "lstm":
            raise ValueError(f"proj_size: only LSTM supports a projection, got proj_size="
                             f"{proj_size} for {type(self).__name__}")
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size: expected less than hidden_size={hidden_size}, got "
                             f"{proj_size}")
        # Any real number (np.float32 too, which torch.nn takes) but not a bool
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real) or \
                not (0.0 <= dropout <= 1.0):
            raise ValueError(f"dropout: expected a float in [0, 1], got {dropout!r}")
        for name, flag in (("bias", bias), ("batch_first", batch_first),
                           ("bidirectional", bidirectional)):
            # bidirectional 0 or 1 as well, which torch.nn takes (it checks only bias and
            # batch_first to be bools)
            if not isinstance(flag, (bool, np.bool_)) and not (
                    name == "bidirectional" and isinstance(flag, numbers.Integral)
                    and flag in (0, 1)):
                raise TypeError(f"{name}: expected a bool, got {flag!r}")
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        if self.dropout > 0 and num_layers == 1:
            _warnings.warn(f"dropout={dropout} does nothing with num_layers=1: it applies "
                           f"between stacked layers (as torch.nn's)", UserWarning)
        self.bidirectional = bool(bidirectional)
        self.dtype = canonical_dtype(dtype)
        self.seed = _checks.seed("seed", seed)
        self.device = "cpu"
        self.training = True
        self.readout = None
        self._rng = np.random.default_rng(seed)
        self._params: dict[str, Any] = {}
        self.reset_parameters()

    # ------------------------------------------------------------------ configuration

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Size of h (and of each direction's slice of y): proj_size or hidden_size."""
        return self.proj_size or self.hidden_size

    def _cell_options(self) -> dict[str, Any]:
        return {}

    def _activations(self) -> tuple[str, ...]:
        return ()

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the layer (saved in weight files' metadata)."""
        return {"cell": type(self).__name__, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "bias": self.bias, "batch_first": self.batch_first, "dropout": self.dropout,
                "bidirectional": self.bidirectional, "proj_size": self.proj_size,
                "dtype": self.dtype, **self._cell_options()}

    def __repr__(self) -> str:
        cfg = self.config()
        defaults = dict(num_layers=1, bias=True, batch_first=False, dropout=0.0,
                        bidirectional=False, proj_size=0, dtype="float32", nonlinearity="tanh",
                        f="tanh", g="tanh")
        extra = "".join(f", {k}={v!r}" for k, v in cfg.items() if k in defaults
                        and v != defaults[k])
        return f"{cfg['cell']}({self.input_size}, {self.hidden_size}{extra})"

    # ------------------------------------------------------------------ parameters

    def _layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        in_size = self.input_size if layer == 0 else self.output_size * self.num_directions
        return parameter_shapes(self._spec, in_size, self.hidden_size, self.proj_size, self.bias)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, in torch.nn's order."""
        # Asked at every call of the torch drop-ins (and by backward): kept with the
        # configuration it was built from, and rebuilt if that changes.
        key = (self._spec, self.input_size, self.hidden_size, self.num_layers, self.proj_size,
               self.bias, self.bidirectional)
        cached = self.__dict__.get("_shapes_cache")
        if cached is None or cached[0] != key:
            shapes = {}
            for layer in range(self.num_layers):
                for reverse in (False, True)[: self.num_directions]:
                    for base, shape in self._layer_shapes(layer).items():
                        shapes[parameter_name(base, layer, reverse)] = shape
            cached = self._shapes_cache = (key, shapes)
        return dict(cached[1])

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        held = host_dtype(self.dtype)
        params = {name: self._rng.uniform(-bound, bound, size=shape).astype(held)
                  for name, shape in self.parameter_shapes().items()}
        self._params = self._place(params, self.device)

    def _place(self, params: dict[str, np.ndarray], device: str) -> dict[str, Any]:
        """Host arrays -> this layer's storage (NumPy on the CPU, torch or CuPy on CUDA)."""
        kind = _storage_kind(device, self.dtype)
        if kind == "numpy":
            return {k: np.ascontiguousarray(v, dtype=self.dtype) for k, v in params.items()}
        if kind == "torch":
            import torch

            dt = getattr(torch, self.dtype)
            return {k: torch.as_tensor(np.asarray(v)).to(device=device, dtype=dt)
                    for k, v in params.items()}
        return {k: to_kind(np.ascontiguousarray(v, dtype=self.dtype), "cupy", device)
                for k, v in params.items()}

    def parameters(self) -> dict[str, Any]:
        """Name -> the parameter array itself (update it in place to train)."""
        return dict(self._params)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> a NumPy copy (bfloat16 parameters are returned as float32, exactly)."""
        out = {}
        for k, v in self._params.items():
            if kind_of(v) == "torch" and self.dtype == "bfloat16":
                v = v.float()
            out[k] = np.array(to_numpy(v), copy=True)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load NumPy arrays or torch tensors; names and shapes must match exactly. The values
        are copied, as torch.nn does: training this layer in place never changes the caller's
        arrays (or another layer loaded from the same dict)."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict: expected a mapping of name -> array, got "
                            f"{type(state_dict).__name__}")
        expected = self.parameter_shapes()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise KeyError(f"state_dict does not match {self!r}: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        host = {}
        for name, shape in expected.items():
            value = state_dict[name]
            if kind_of(value) is None:
                raise TypeError(f"state_dict[{name!r}]: expected an array or tensor, got "
                                f"{type(value).__name__}")
            if kind_of(value) == "torch" and dtype_name(value) == "bfloat16":
                value = value.float()
            arr = to_numpy(value)
            if tuple(arr.shape) != shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {shape}, got "
                                 f"{tuple(arr.shape)}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise TypeError(f"state_dict[{name!r}]: expected a floating dtype, got "
                                f"{arr.dtype}")
            host[name] = np.array(arr, copy=True)
        self._params = self._place(host, self.device)

    def to(self, device: Any) -> RecurrentLayer:
        """Move the weights to ``device`` ("cpu", "cuda", "cuda:N"); returns self."""
        device = parse_device(device)
        if device != self.device:
            self._params = self._place(self.state_dict(), device)
            self.device = device
        return self

    def train(self, mode: bool = True) -> RecurrentLayer:
        """Dropout between layers applies in :meth:`forward` while training (the default)."""
        self.training = _checks.flag("mode", mode)
        return self

    def eval(self) -> RecurrentLayer:
        return self.train(False)

    # ------------------------------------------------------------------ running

    def __call__(self, x, state=None, *, lengths=None, backend: str | None = None):
        """Inference: ``y, state``. No tape is kept and no dropout applied."""
        if kind_of(x) == "torch" and x.requires_grad:
            _warn_outside_autograd(type(self).__name__)
        y, final, _ = self._run(x, state, lengths, backend, keep_tape=False)
        return y, final

    def forward(self, x, state=None, *, lengths=None, backend: str | None = None):
        """Training forward: ``y, state, tape``; pass the tape to :meth:`backward`."""
        return self._run(x, state, lengths, backend, keep_tape=True)

    def _run(self, x, state, lengths, backend_name, *, keep_tape: bool):
        in_kind = _checks.array("x", x)
        layout = self._check_input(x, in_kind)
        T, B = layout["T"], layout["B"]
        xt = _to_time_major(x, layout)
        lengths_np = _check_lengths(lengths, T, B, layout["unbatched"])
        # Steps past the longest sequence give only zeros and leave every state as it was: run
        # up to the longest, and pad y back to T (a batch padded to a fixed T then costs what
        # its sequences do; the reverse direction starts at each sequence's end either way).
        steps = T if lengths_np is None or B == 0 else int(lengths_np.max())
        if steps < T:
            xt = xt[:steps]
        problem = Problem(
            cell=self._spec.kind, activations=self._activations(), dtype=self.dtype,
            device=layout["device"], input_kind=in_kind, seq_len=steps, batch=B,
            input_size=self.input_size, hidden_size=self.hidden_size,
            proj_size=self.proj_size, num_layers=self.num_layers,
            bidirectional=self.bidirectional, bias=self.bias, training=keep_tape,
            has_lengths=lengths_np is not None)
        backend = registry.select(problem, backend_name)
        kind, device = backend.array_kind, layout["device"]
        ops = Ops(kind)
        states = self._check_state(state, layout, in_kind, zeros_kind=kind)  # per layer*dir
        states = [tuple(to_kind(s, kind, device) for s in st) for st in states]
        params = {k: to_kind(v, kind, device) for k, v in self._params.items()}
        inp = to_kind(xt, kind, device)
        # With lengths, a backend may ask to run the live rows only (_segments): each call then
        # takes the rows live at its first step, gathered by index, and its results go back
        # to those rows (the arrays between calls stay in the caller's row order).
        plan = _segments.schedule(backend, problem, lengths_np, steps)
        index = _segment_rows(plan, ops, device)
        tape = (LayerTape(problem, backend, layout, owner=self,
                          precision=_config.float32_precision(), steps=steps, schedule=plan,
                          fingerprints=self._fingerprints(x, state, lengths))
                if keep_tape else None)
        D, P = self.num_directions, self.output_size
        finals: list[tuple[Any, ...]] = []
        empty = steps == 0 or B == 0
        for layer in range(self.num_layers):
            mask = None
            if keep_tape and self.training and self.dropout > 0 and layer > 0 and not empty:
                # p = 1 drops everything (as torch.nn); no 1/(1-p) scaling to divide by zero.
                scale = 0.0 if self.dropout == 1.0 else 1.0 / (1.0 - self.dropout)
                host = np.float64 if self.dtype == "float64" else np.float32
                keep = (self._rng.random(inp.shape) >= self.dropout).astype(host)
                mask = _mask_like(keep * host(scale), kind, device, self.dtype)
                inp = _times_mask(inp, mask, kind, device)
            outs, tapes, w_ihs = [], [], []
            # Bidirectional: where it holds less at the peak, each direction's y goes into
            # its half of the layer's output rather than both halves being kept for one
            # concatenation (2x the output at once). With segments the backend's parts are
            # put there directly; a whole-batch y is copied in and let go, which pays while the
            # backend needs less than one y beside it (a fused backend: no (T, B, gates*H)
            # input projection). The top layer's output then has T rows at once, zero past
            # `steps`: no padding copy after.
            # The same for the top layer of a unidirectional stack with lengths, whose y is
            # padded to T. A backend that takes `out` (backend_api) writes y there itself, and
            # its tape may then refer to the layer's output instead of a copy of it.
            fused = callable(getattr(backend, "forward_layer", None))
            rows_out = T if layer == self.num_layers - 1 else steps
            out = None
            if (D > 1 or rows_out > steps) and (fused or not plan.whole or
                                                _accepts_out(backend)) and not empty:
                out = ops.zeros((rows_out, B, D * P), self.dtype, device)
            for d in range(D):
                reverse = d == 1
                init = states[layer * D + d]
                if empty:
                    outs.append(ops.zeros((steps, B, P), self.dtype, device))
                    finals.append(init)
                    continue
                half = None if out is None else out[:steps, :, d * P:(d + 1) * P]
                y, final, btapes, w_ih = self._run_direction(
                    backend, problem, plan, index, params, inp, init, layer, reverse, keep_tape,
                    ops, half)
                if half is None:
                    outs.append(y)
                elif y is not half:
                    half[...] = y
                del y, half
                finals.append(final)
                tapes.append(btapes)
                w_ihs.append(w_ih)
            if tape is not None:
                tape.inputs.append(inp)
                tape.dropout_masks.append(mask)
                tape.tapes.append(tapes)
                tape.input_weights.append(w_ihs)
            if out is None:
                out = outs[0] if D == 1 else ops.concat(outs, axis=2)
            inp = out
            del out, outs
        if inp.shape[0] < T:
            inp = ops.concat([inp, ops.zeros((T - steps, B, D * P), self.dtype, device)], axis=0)
        y = _from_time_major(inp, layout)
        y = to_kind(y, in_kind, device)
        if tape is not None:
            tape.fingerprints.append(_output_fingerprint(y, inp))
        final_state = self._pack_state(finals, layout, in_kind, ops)
        return y, final_state, tape

    def _fingerprints(self, x, state, lengths) -> list[tuple[str, Any, Any]]:
        """The caller's arrays that the tapes may refer to, with their fingerprints."""
        arrays = [("x (the input of forward())", x)]
        if state is not None:
            parts = state if isinstance(state, (tuple, list)) else (state,)
            arrays += [(f"the initial state's {name}", s)
                       for name, s in zip(("h_0", "c_0"), parts)]
        if lengths is not None:
            arrays.append(("lengths", lengths))
        arrays += [(f"parameter {name!r}", p) for name, p in self._params.items()]
        return [(what, a, _fingerprint.fingerprint(a)) for what, a in arrays
                if kind_of(a) is not None]

    def _run_direction(self, backend, problem, plan, index, params, inp, init, layer: int,
                       reverse: bool, keep_tape: bool, ops: Ops, into=None):
        """One layer and direction: one backend call per segment of ``plan`` (one without
        segments; ``index``: each segment's rows). Returns ``y, final, tapes, w_ih``, tapes one
        per segment. With segments, ``into`` (zeros, (steps, B, P), may be a view) receives
        their parts and is the y returned."""
        weights = self._recurrent_weights(params, layer, reverse)
        w_ih, b_ih = self._input_weights(params, layer, reverse)
        fused = callable(getattr(backend, "forward_layer", None))    # fuses W_ih x (§4)
        takes_out = _accepts_out(backend)
        whole = plan.whole
        y = None if whole else into if into is not None else ops.zeros(
            (inp.shape[0], problem.batch, self.output_size), self.dtype, problem.device)
        carried = init if whole else tuple(ops.copy(s) for s in init)
        tapes = []
        # The reverse direction meets the segments last first; a row that starts inside one
        # still holds its initial state in `carried`.
        for seg, rows in (reversed(index) if reverse else index):
            if whole:
                sub, part, start, target = problem, inp, init, into
            else:
                sub = replace(problem, seq_len=seg.steps, batch=seg.rows)
                part = inp[seg.start:seg.stop, rows]
                # A copy: `carried` changes after the call, and a tape may keep its start.
                start = tuple(_copy_rows(s, rows, ops) for s in carried)
                # rows gathered by an index array have no view to write into
                target = y[seg.start:seg.stop, rows] if isinstance(rows, slice) else None
            given = {"out": target} if takes_out and target is not None else {}
            if fused:
                method, out = "forward_layer", backend.forward_layer(
                    sub, part, w_ih, b_ih, weights, start, seg.lengths, reverse=reverse,
                    keep_tape=keep_tape, **given)
            else:
                xw = self._input_projection(w_ih, b_ih, part)
                method, out = "forward", backend.forward(
                    sub, xw, weights, start, seg.lengths, reverse=reverse, keep_tape=keep_tape,
                    **given)
            y_part, final, btape = _checked_forward(backend, method, out, sub, start,
                                                    self.output_size, keep_tape)
            tapes.append(btape)
            if given and not whole and y_part is target:
                y_part = None                       # already in place
            y, carried = _put_segment(whole, seg, rows, y, y_part, carried, final)
        return y, tuple(carried), tapes, w_ih

    def _input_weights(self, params, layer: int, reverse: bool):
        """``(W_ih, b_ih)`` of one layer and direction; b_ih is None without biases."""
        spec = self._spec
        w_ih = params[parameter_name(spec.input_weight, layer, reverse)]
        b_ih = params[parameter_name(spec.input_bias, layer, reverse)] if self.bias else None
        return w_ih, b_ih

    @staticmethod
    def _input_projection(w_ih, b_ih, inp):
        """``W_ih x + b_ih`` for all T*B rows as one GEMM -> (T, B, gates*H)."""
        T, B, n_in = inp.shape
        xw = matmul(inp.reshape(T * B, n_in), w_ih.T, _config.float32_precision(), b_ih)
        return xw.reshape(T, B, w_ih.shape[0])

    def _recurrent_names(self) -> list[str]:
        """The base names of the weights a backend gets (and returns gradients for)."""
        spec = self._spec
        names = list(spec.recurrent_weights) + (list(spec.recurrent_biases) if self.bias else [])
        return names + ["weight_hr"] if self.proj_size else names

    def _recurrent_weights(self, params, layer: int, reverse: bool) -> dict[str, Any]:
        return {base: params[parameter_name(base, layer, reverse)]
                for base in self._recurrent_names()}

    # ------------------------------------------------------------------ backward

    def backward(self, tape: LayerTape, dy, dstate=None, *, input_grad: bool = True):
        """BPTT through the whole stack: ``dx, dstate0, grads``.

        ``dy`` has y's shape, kind and device; ``dstate`` has the final state's structure (or
        None for zero). ``dx``/``dstate0`` come back in the input's kind; ``grads`` maps every
        parameter name to its gradient, in the same kind as :meth:`parameters`.
        ``input_grad=False``: ``dx`` is None, not computed (x is data, as in most training:
        the first layer's ``dxw @ W_ih`` is saved, a quarter of its backward's GEMM flops at
        I = H; 2-4% of an LSTM(128) training step at 64x256 on a 2-core CPU, NumPy backend).
        """
        if not isinstance(tape, LayerTape):
            raise TypeError(f"tape: expected the tape returned by {type(self).__name__}.forward,"
                            f" got {type(tape).__name__}")
        if tape.owner is not None and tape.owner is not self:
            raise ValueError(f"tape: expected a tape from this layer's forward(), got one from "
                             f"another layer ({tape.owner!r})")
        if tape.used:
            raise RuntimeError("tape: this tape was already used by backward(); run forward() "
                               "again (backward consumes the saved activations)")
        input_grad = _checks.flag("input_grad", input_grad)
        tape.check_unchanged()
        layout = tape.layout
        kind, device = tape.backend.array_kind, layout["device"]
        ops = Ops(kind)
        T, B = layout["T"], layout["B"]
        D, P = self.num_directions, self.output_size
        y_shape = _layout_shape(layout, T, B, D * P)
        _checks.same_place("dy", dy, kind=layout["kind"], device=device, dtype=self.dtype,
                           shape=y_shape)
        dfinal = self._check_state(dstate, layout, layout["kind"], name="dstate")
        dfinal = [tuple(to_kind(s, kind, device) for s in st) for st in dfinal]
        grad = to_kind(_to_time_major(dy, layout), kind, device)
        steps = tape.steps                  # forward ran these; dy past them reaches nothing
        if steps < T:
            grad = grad[:steps]
        grads: dict[str, Any] = {}
        dstate0: list[tuple[Any, ...]] = [()] * (self.num_layers * D)
        empty = steps == 0 or B == 0
        index = _segment_rows(tape.schedule, ops, device)
        for layer in reversed(range(self.num_layers)):
            inp = tape.inputs[layer]
            d_inp = None
            wanted = input_grad or layer > 0            # the gradient of this layer's input
            for d in range(D):
                reverse = d == 1
                which = layer * D + d
                if empty:
                    dstate0[which] = dfinal[which]
                    continue
                contrib, dstate0[which], layer_grads = self._backward_direction(
                    tape, index, grad[:, :, d * P:(d + 1) * P], dfinal[which], inp,
                    tape.tapes[layer][d], tape.input_weights[layer][d], reverse, ops, wanted)
                for base, g in layer_grads.items():
                    grads[parameter_name(base, layer, reverse)] = g
                if wanted:
                    d_inp = contrib if d_inp is None else d_inp + contrib
            if not wanted:
                grad = None
                break                               # layer 0, and x's gradient not asked for
            if empty:
                d_inp = ops.zeros(inp.shape, self.dtype, device)
            if tape.dropout_masks[layer] is not None:
                d_inp = _times_mask(d_inp, tape.dropout_masks[layer], kind, device)
            grad = d_inp
        tape.used = True
        tape.tapes.clear()
        dx = None
        if grad is not None:
            if steps < T:           # x past the longest sequence reaches nothing: zero gradient
                grad = ops.concat([grad, ops.zeros((T - steps, B, self.input_size), self.dtype,
                                                   device)], axis=0)
            dx = to_kind(_from_time_major(grad, layout), layout["kind"], device)
        out_grads = {}
        for name, shape in self.parameter_shapes().items():
            g = grads.get(name)
            if g is None:                       # empty batch or sequence: no gradient flows
                g = ops.zeros(shape, self.dtype, device)
            out_grads[name] = _like(g, self._params[name])
        return dx, self._pack_state(dstate0, layout, layout["kind"], ops), out_grads

    def _backward_direction(self, tape: LayerTape, index, dy, dfinal, inp, btapes, w_ih,
                            reverse: bool, ops: Ops, input_grad: bool = True):
        """One layer and direction, its segments in the reverse of forward's order. Returns
        the gradient of the layer input (None with ``input_grad=False``), of the initial
        state, and of the weights by base name."""
        plan, backend, precision = tape.schedule, tape.backend, tape.precision
        spec = self._spec
        order = list(reversed(index)) if reverse else index
        whole = plan.whole
        d_inp = None if whole or not input_grad else ops.zeros(inp.shape, self.dtype,
                                                                tape.layout["device"])
        carried = dfinal if whole else tuple(ops.copy(s) for s in dfinal)
        grads: dict[str, Any] = {}
        weight_names = self._recurrent_names()

        def add(name, g):
            grads[name] = g if name not in grads else grads[name] + g

        for (seg, rows), btape in reversed(list(zip(order, btapes))):
            if whole:
                dy_part, d_end, inp_part = ops.contiguous(dy), dfinal, inp
            else:
                dy_part = ops.contiguous(dy[seg.start:seg.stop, rows])
                d_end = tuple(_copy_rows(s, rows, ops) for s in carried)
                inp_part = ops.contiguous(inp[seg.start:seg.stop, rows])
            steps, count, n_in = inp_part.shape
            dxw, d_start, dw = _checked_backward(
                backend, backend.backward(btape, dy_part, d_end), (steps, count, w_ih.shape[0]),
                d_end, weight_names, self.dtype)
            dxw2 = dxw.reshape(steps * count, -1)
            add(spec.input_weight, matmul(dxw2.T, inp_part.reshape(steps * count, n_in),
                                          precision))
            if self.bias:
                add(spec.input_bias, ops.sum_leading(dxw2))
            for base, g in dw.items():
                add(base, g)
            contrib = (matmul(dxw2, w_ih, precision).reshape(steps, count, n_in) if input_grad
                       else None)
            d_inp, carried = _put_segment(whole, seg, rows, d_inp, contrib, carried, d_start)
        return d_inp, tuple(carried), grads

    # ------------------------------------------------------------------ input checking

    def _check_input(self, x, kind: str) -> dict[str, Any]:
        dtype = dtype_name(x)
        if dtype != self.dtype:
            cast = (f"x.to(torch.{self.dtype})" if kind == "torch"
                    else f"x.astype({self.dtype!r})")
            if dtype in ("float16", "bfloat16", "float32", "float64"):
                hint = f"cast it ({cast}), or build the model with dtype={dtype!r}"
            elif kind != "torch" and np.dtype(x.dtype).kind == "f":
                hint = f"its bytes are not in this machine's order; {cast} converts it"
            else:
                hint = f"use a floating-point array ({cast})"
            raise TypeError(f"x: expected dtype {self.dtype} (the model's dtype), got {dtype}; "
                            f"{hint}")
        device = device_of(x)
        if device != self.device:
            # the layers live on the CPU or CUDA devices only (no meta, mps, ...)
            fix = (f"call model.to({device!r}) or move x" if device.startswith("cuda")
                   else f"move x to {self.device}")
            raise ValueError(f"x: the input is on {device} but {type(self).__name__}'s weights "
                             f"are on {self.device}; {fix}")
        shape = tuple(x.shape)
        if len(shape) not in (2, 3):
            expected = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
            raise ValueError(f"x: expected a 3-D array {expected} or a 2-D unbatched array "
                             f"(T, input_size), got shape {shape}")
        if shape[-1] != self.input_size:
            raise ValueError(f"x: expected last dimension input_size={self.input_size}, got "
                             f"shape {shape}")
        unbatched = len(shape) == 2
        if unbatched:
            T, B = shape[0], 1
        elif self.batch_first:
            B, T = shape[0], shape[1]
        else:
            T, B = shape[0], shape[1]
        return {"T": T, "B": B, "unbatched": unbatched, "batch_first": self.batch_first,
                "device": device, "kind": kind}

    def _state_shapes(self, B: int, unbatched: bool) -> list[tuple[int, ...]]:
        n = self.num_layers * self.num_directions
        shapes = [(n, B, self.output_size)]
        if self._spec.kind == "lstm":
            shapes.append((n, B, self.hidden_size))
        return [s[:1] + s[2:] if unbatched else s for s in shapes]

    def _check_state(self, state, layout, kind: str, name: str = "state",
                     zeros_kind: str | None = None):
        """User state -> list over layer*direction of tuples of (B, ·) arrays (zeros if None).

        ``zeros_kind``: the array kind the zeros for a missing state are made in (default
        ``kind``); the caller converts to its backend's kind anyway, so making them there
        saves a torch.zeros and a conversion per part on the drop-ins' usual hx=None call."""
        B, unbatched, device = layout["B"], layout["unbatched"], layout["device"]
        shapes = self._state_shapes(B, unbatched)
        lstm = self._spec.kind == "lstm"
        if state is None:
            parts = [None] * len(shapes)
        elif lstm:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                got = (f"a {type(state).__name__} of {len(state)}"
                       if isinstance(state, (tuple, list)) else type(state).__name__)
                raise TypeError(f"{name}: LSTM expects a tuple (h, c), got {got}")
            parts = list(state)
        else:
            if isinstance(state, (tuple, list)):
                if len(state) != 1:
                    raise TypeError(f"{name}: {type(self).__name__} expects one array h, got a "
                                    f"{type(state).__name__} of {len(state)}")
                state = state[0]
            parts = [state]
        ops = Ops(zeros_kind or kind)
        full = []
        for i, (part, shape) in enumerate(zip(parts, shapes)):
            label = name if not lstm else f"{name}[{i}] ({'h' if i == 0 else 'c'})"
            if part is None:
                part = ops.zeros(shape, self.dtype, device)
            else:
                _checks.same_place(label, part, kind=kind, device=device, dtype=self.dtype,
                                   shape=shape)
            if unbatched:
                part = part[:, None, :]
            full.append(part)
        n = self.num_layers * self.num_directions
        return [tuple(p[i] for p in full) for i in range(n)]

    def _pack_state(self, finals, layout, kind: str, ops: Ops):
        device = layout["device"]
        parts = []
        for j in range(len(finals[0])):
            stacked = ops.stack([f[j] for f in finals], axis=0)
            if layout["unbatched"]:
                stacked = stacked[:, 0, :]
            parts.append(to_kind(stacked, kind, device))
        return tuple(parts) if self._spec.kind == "lstm" else parts[0]


# ---------------------------------------------------------------------- helpers

def _mask_like(host: np.ndarray, kind: str, device: str, dtype: str):
    """A host dropout mask as an array of ``kind`` in ``dtype``. NumPy has no
    bfloat16: its mask goes over as float32 and is cast by torch (exact: 0 and 1/(1-p) as
    float32, cast once, as a bfloat16 input scaled by it would be)."""
    if dtype != "bfloat16":
        return to_kind(host.astype(dtype, copy=False), kind, device)
    import torch

    return to_kind(to_kind(host, "torch", device).to(torch.bfloat16), kind, device)


def _times_mask(x, mask, kind: str, device: str):
    """``x * mask``; for CuPy bfloat16 arrays (which CuPy computes on only through ml_dtypes)
    the product is taken in torch, through DLPack without copies."""
    if kind != "cupy" or dtype_name(x) != "bfloat16":
        return x * mask
    return to_kind(to_kind(x, "torch", device) * to_kind(mask, "torch", device), kind, device)


def _storage_kind(device: str, dtype: str) -> str:
    if device == "cpu":
        if dtype == "bfloat16":
            try:
                import torch  # noqa: F401
            except ImportError:
                raise RuntimeError("dtype='bfloat16' needs torch to hold the weights (NumPy "
                                   "has no bfloat16); pip install 'rnn-gpu[torch]'") from None
            return "torch"
        return "numpy"
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return "cupy"
    except Exception:
        pass
    raise RuntimeError(f"to({device!r}): no CUDA device is available here (neither torch nor "
                       "cupy sees one)")


def _like(value, reference):
    """``value`` in the array kind, device and dtype of ``reference``."""
    out = to_kind(value, kind_of(reference), device_of(reference))
    if dtype_name(out) == dtype_name(reference):
        return out
    return out.to(reference.dtype) if kind_of(out) == "torch" else out.astype(reference.dtype)


def _accepts_out(backend) -> bool:
    """Whether ``backend``'s forward/forward_layer take ``out=`` (rnn_gpu.backend_api)."""
    return getattr(backend, "accepts_out", False) is True


def _output_fingerprint(y, time_major) -> tuple[str, Any, Any]:
    """The returned y's entry for :attr:`LayerTape.fingerprints`. Taken whatever the backend
    (a backend's tape may refer to the y it returned, as the NumPy backend's and the example
    plugin's do): the time-major array when y is a NumPy view of it (one contiguous CRC, the
    padding and every layout's view included); a torch tensor through a weak reference, so
    that a drop-in's output and its autograd node (whose context holds the tape) make no
    reference cycle: its version counter is shared with every view of it, and once nothing
    holds it, nothing can change it."""
    guard = time_major if kind_of(y) == "numpy" and kind_of(time_major) == "numpy" else y
    fp = _fingerprint.fingerprint(guard)
    if kind_of(guard) == "torch":
        guard = weakref.ref(guard)
    return _Y, guard, fp


def _segment_rows(plan, ops: Ops, device: str) -> list[tuple[Any, Any]]:
    """``(segment, rows)`` for each segment of ``plan``: its rows of the caller's batch, as a
    slice when the lengths come sorted, else as an index array of the backend's kind."""
    return [(seg, slice(0, seg.rows) if plan.order is None
             else ops.index(plan.order[:seg.rows], device)) for seg in plan.segments]


def _put_segment(whole: bool, seg, rows, out, part, carried, state):
    """Where one call's results go: ``(part, state)`` are the results when the call was whole;
    else they go into its steps and rows of ``out`` and its rows of ``carried``."""
    if whole:
        return part, tuple(state)
    if part is not None:                # None: an input gradient nobody asked for
        out[seg.start:seg.stop, rows] = part
    for s, v in zip(carried, state):
        s[rows] = v
    return out, carried


def _copy_rows(x, rows, ops: Ops):
    """``x[rows]`` as a new array (a slice gives a view, an index array a copy already)."""
    return ops.copy(x[rows]) if isinstance(rows, slice) else x[rows]


def _swap01(x):
    return x.swapaxes(0, 1) if kind_of(x) != "torch" else x.transpose(0, 1)


def _to_time_major(x, layout):
    if layout["unbatched"]:
        return x[:, None, :]
    return _swap01(x) if layout["batch_first"] else x


def _from_time_major(y, layout):
    if layout["unbatched"]:
        return y[:, 0, :]
    return _swap01(y) if layout["batch_first"] else y


def _layout_shape(layout, T: int, B: int, n: int) -> tuple[int, ...]:
    if layout["unbatched"]:
        return (T, n)
    return (B, T, n) if layout["batch_first"] else (T, B, n)


def _warn_outside_autograd(name: str) -> None:
    import torch

    if torch.is_grad_enabled():        # inside rnn_gpu.torch's autograd Function it is not
        _warnings.warn(f"x requires grad, but rnn_gpu.{name} runs outside torch's autograd: "
                       f"its outputs have no grad_fn. For autograd use rnn_gpu.torch.{name}; "
                       f"here, forward() and backward() give the gradients", UserWarning)


_RETURNS = {"forward": "(y, final_state, tape)", "forward_layer": "(y, final_state, tape)",
            "backward": "(dxw, dstate0, weight_grads)"}


def _returned(backend, method: str, result) -> tuple:
    """A backend's result, checked for its shape: a plugin that returns something else gets
    an error naming it and the contract, not an unpacking error in the layer."""
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        got = (f"a {type(result).__name__} of {len(result)}"
               if isinstance(result, (tuple, list)) else type(result).__name__)
        raise TypeError(f"backend {getattr(backend, 'name', backend)!r}: {method}() returned "
                        f"{got}; the backend contract (rnn_gpu.backend_api) is a tuple "
                        f"{_RETURNS[method]}")
    return tuple(result)


def _check_returned(backend, method: str, what: str, value, like_shape, dtype: str) -> None:
    """One array a backend returned: its kind, shape and dtype as the contract says. Metadata
    only (no copy, no device sync); a plugin's wrong shape or dtype reached the user before."""
    kind = backend.array_kind
    got = kind_of(value)
    problem = None
    if got != kind:
        problem = f"a {type(value).__name__}, not a {kind} array (its array_kind)"
    elif tuple(value.shape) != tuple(like_shape):
        problem = f"shape {tuple(value.shape)}, expected {tuple(like_shape)}"
    elif dtype_name(value) != dtype:
        problem = f"dtype {dtype_name(value)}, expected {dtype}"
    if problem:
        raise TypeError(f"backend {backend.name!r}: {method}() returned {what} of {problem} "
                        "(rnn_gpu.backend_api)")


def _check_state_returned(backend, method: str, what: str, value, like, dtype: str) -> tuple:
    """A state (or its gradient) returned: a tuple with ``like``'s structure and shapes."""
    if not isinstance(value, (tuple, list)) or len(value) != len(like):
        expected = "(h,)" if len(like) == 1 else "(h, c)"
        raise TypeError(f"backend {backend.name!r}: {method}() returned {what} {value!r:.60}; "
                        f"expected a tuple {expected} like the state it was given "
                        "(rnn_gpu.backend_api)")
    for part, (got, want) in zip(("h", "c"), zip(value, like)):
        _check_returned(backend, method, f"{what} {part}", got, want.shape, dtype)
    return tuple(value)


def _checked_forward(backend, method: str, result, problem: Problem, start: tuple,
                     output_size: int, keep_tape: bool) -> tuple:
    y, final, tape = _returned(backend, method, result)
    _check_returned(backend, method, "y", y, (problem.seq_len, problem.batch, output_size),
                    problem.dtype)
    final = _check_state_returned(backend, method, "the final state", final, start,
                                  problem.dtype)
    if keep_tape and tape is None:
        raise TypeError(f"backend {backend.name!r}: {method}() returned no tape though "
                        "keep_tape=True (rnn_gpu.backend_api)")
    return y, final, tape


def _checked_backward(backend, result, xw_shape, d_end: tuple, weight_names, dtype: str
                      ) -> tuple:
    dxw, d_start, dw = _returned(backend, "backward", result)
    _check_returned(backend, "backward", "dxw", dxw, xw_shape, dtype)
    d_start = _check_state_returned(backend, "backward", "dstate0", d_start, d_end, dtype)
    if not isinstance(dw, dict) or set(dw) != set(weight_names):
        got = sorted(dw) if isinstance(dw, dict) else type(dw).__name__
        raise TypeError(f"backend {backend.name!r}: backward() returned weight gradients "
                        f"{got}; expected one for each weight forward() was given, "
                        f"{sorted(weight_names)} (rnn_gpu.backend_api)")
    return dxw, d_start, dw


def _check_lengths(lengths, T: int, B: int, unbatched: bool) -> np.ndarray | None:
    """-> host int64 array of B, each in [0, T], or None."""
    if lengths is None:
        return None
    if kind_of(lengths) is None:
        if isinstance(lengths, (int, np.integer)) and unbatched:
            lengths = [lengths]
        try:
            arr = np.asarray(lengths)
        except Exception:
            raise TypeError(f"lengths: expected a 1-D array of B={B} ints, got "
                            f"{type(lengths).__name__}") from None
    else:
        arr = to_numpy(lengths)
    if arr.dtype.kind not in "iuf":        # text, objects, booleans: no shape to talk about
        raise TypeError(f"lengths: expected integers (one per sequence, B={B}), got "
                        f"{type(lengths).__name__} {lengths!r:.40} (dtype {arr.dtype})")
    if arr.ndim == 0 and unbatched:
        arr = arr.reshape(1)
    if arr.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},) (one length per sequence), got "
                         f"{tuple(arr.shape)}")
    _checks.whole_lengths(arr)
    # the range is checked before the cast: a uint64 2**64 - 1 would wrap to -1
    if B and (arr.min() < 0 or arr.max() > T):
        bad = arr[(arr < 0) | (arr > T)]
        raise ValueError(f"lengths: expected every length in [0, T={T}], got {bad[:5].tolist()}")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------- the public layers

class LSTM(RecurrentLayer):
    """LSTM, gates (i, f, g, o) as torch.nn.LSTM; ``proj_size`` supported."""

    _spec = LSTM_SPEC


class GRU(RecurrentLayer):
    """GRU with the reset gate applied after the recurrent product (as cuDNN and torch)."""

    _spec = GRU_SPEC


class RNN(RecurrentLayer):
    """Elman RNN: ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, act tanh or relu."""

    _spec = RNN_SPEC

    def __init__(self, input_size, hidden_size, num_layers=1, *, nonlinearity: str = "tanh",
                 **kwargs):
        self.nonlinearity = _checks.choice("nonlinearity", nonlinearity, RNN_NONLINEARITIES)
        super().__init__(input_size, hidden_size, num_layers, **kwargs)

    def _cell_options(self):
        return {"nonlinearity": self.nonlinearity}

    def _activations(self):
        return (self.nonlinearity,)


class TwoStageRNN(RecurrentLayer):
    """The seed's cell: ``a_t = f(W_ia x_t + W_aa h_{t-1} + b_a)``,
    ``h_t = g(W_ha a_t + W_hh h_{t-1} + b_h)``; f, g in {tanh, sigmoid, relu}."""

    _spec = TWOSTAGE_SPEC

    def __init__(self, input_size, hidden_size, num_layers=1, *, f: str = "tanh",
                 g: str = "tanh", **kwargs):
        self.f = _checks.choice("f", f, ACTIVATIONS)
        self.g = _checks.choice("g", g, ACTIVATIONS)
        super().__init__(input_size, hidden_size, num_layers, **kwargs)

    def _cell_options(self):
        return {"f": self.f, "g": self.g}

    def _activations(self):
        return (self.f, self.g)


LAYERS = {cls.__name__: cls for cls in (LSTM, GRU, RNN, TwoStageRNN)}
