"""torch.nn.Module drop-ins for torch.nn.LSTM / GRU / RNN, and the seed's TwoStageRNN.

Same constructors, parameter names, parameter order, initialisation, state_dict keys, forward
signature and shapes as torch.nn (PackedSequence included), plus a ``backend=`` keyword. The
Module owns the parameters (``torch.nn.Parameter``, so optimizers, ``.to()``, ``.double()``,
hooks and ``torch.func.functional_call`` work as usual); a core layer of :mod:`rnn_gpu.layers`
with the same configuration does the computing on those very tensors (see
:mod:`rnn_gpu.torch.function`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _warnings, registry
from .. import layers as _layers
from .._dtypes import canonical_dtype
from .function import bind, refuse_no_steps, run


def _parameterless(core_class: type, qualname: str) -> type:
    """``core_class`` minus its own weight initialisation.

    The Module creates and initialises the parameters itself (torch.nn's way, from torch's
    generator); letting the core draw a second set of the same size first would only cost
    time and memory. The class keeps the core's ``__name__`` (its messages say "LSTM") and
    gets a module-level ``__qualname__`` so that pickling a Module (``torch.save(model)``) works.
    """
    def reset_parameters(self) -> None:
        self._params = {}

    return type(core_class.__name__, (core_class,),
                {"reset_parameters": reset_parameters, "__module__": __name__,
                 "__qualname__": qualname, "__doc__": core_class.__doc__})


_CORE_LSTM = _parameterless(_layers.LSTM, "_CORE_LSTM")
_CORE_GRU = _parameterless(_layers.GRU, "_CORE_GRU")
_CORE_RNN = _parameterless(_layers.RNN, "_CORE_RNN")
_CORE_TWOSTAGE = _parameterless(_layers.TwoStageRNN, "_CORE_TWOSTAGE")


def _fixed(name: str) -> property:
    """A configuration attribute read from the core, which set at construction the parameters'
    shapes and the cell. torch.nn lets ``m.bidirectional = True`` be set and then fails at the
    next call, or (``m.mode = "RNN_RELU"``) switches the cell; here the core kept the old
    configuration silently, so setting one is refused."""
    def get(self):
        options = self._core._cell_options()
        if name == "mode":                  # torch.nn.RNNBase's: "LSTM", "GRU", "RNN_TANH", ...
            kind = type(self).__name__
            return f"RNN_{options['nonlinearity'].upper()}" if kind == "RNN" else kind
        return options[name] if name in options else getattr(self._core, name)

    def refuse(self, value):
        raise AttributeError(f"{name} of {type(self).__name__} is fixed when it is built (the "
                             f"parameters and the kernels follow it); build a new "
                             f"{type(self).__name__} with {name}={value!r} instead")

    return property(get, refuse, doc=f"The {name} the module was built with (read-only).")


class _RecurrentModule(nn.Module):
    """What the four drop-ins share; the subclasses only fix the constructor signature."""

    _core_class: type[_layers.RecurrentLayer]
    input_size = _fixed("input_size")
    hidden_size = _fixed("hidden_size")
    num_layers = _fixed("num_layers")
    bias = _fixed("bias")
    bidirectional = _fixed("bidirectional")
    proj_size = _fixed("proj_size")
    mode = _fixed("mode")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None, *,
                 backend: str | None = None, cell_options: dict[str, Any] | None = None):
        super().__init__()
        registry.check_name(backend)
        if isinstance(dropout, (int, float)) and dropout > 0 and num_layers == 1:
            _warnings.warn("dropout option adds dropout after all but last recurrent layer, "
                           f"so non-zero dropout expects num_layers greater than 1, but got "
                           f"dropout={dropout} and num_layers={num_layers}", UserWarning)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        # The core checks the configuration and is the single source of parameter names/shapes.
        with warnings.catch_warnings():      # torch.nn's own dropout warning was given above
            warnings.filterwarnings("ignore", message=r"dropout=.* does nothing")
            self._core = self._core_class(
                input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                dropout=dropout, bidirectional=bidirectional, proj_size=proj_size,
                dtype=canonical_dtype(dtype), **(cell_options or {}))
        core = self._core
        # batch_first and dropout are read at every call, so they may be changed; the sizes,
        # layers, directions, biases and cell options are properties of the core (see _fixed)
        self.batch_first, self.dropout = core.batch_first, core.dropout
        self.backend = backend
        self._flat_weights_names: list[str] = []
        groups: dict[str, list[str]] = {}               # per layer and direction, as torch.nn
        for name, shape in core.parameter_shapes().items():
            self.register_parameter(
                name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
            groups.setdefault(name[name.rindex("_l"):], []).append(name)   # "_l0_reverse"
            self._flat_weights_names.append(name)
        self._all_weights = list(groups.values())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch.nn (there is no cuDNN weight buffer to compact)."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def forward(self, input, hx=None, *, backend: str | None = None):
        """``(output, h_n)``, or ``(output, (h_n, c_n))`` for LSTM, exactly as torch.nn.

        ``input`` is ``(T, B, input_size)`` (``(B, T, ·)`` with batch_first), unbatched
        ``(T, input_size)``, or a PackedSequence (then ``output`` is one too). ``backend``
        overrides the constructor's choice for this call.
        """
        backend = self.backend if backend is None else backend
        # Looked up at every call (not cached) so that .to()/.double(), parametrizations and
        # torch.func.functional_call, which all replace these attributes, are seen.
        params = {name: getattr(self, name) for name in self._flat_weights_names}
        attrs = dict(training=self.training, dropout=float(self.dropout),
                     batch_first=bool(self.batch_first))
        data = input.data if isinstance(input, PackedSequence) else input
        if isinstance(data, torch.Tensor) and data.device.type == "meta":
            return self._meta_forward(input, hx, params, attrs)
        low = _autocast_dtype(data, params)
        if low is None:
            try:
                return self._forward(input, hx, params, backend, attrs)
            except registry.BackendError:
                own = next(iter(params.values())).dtype
                if not _float32_stands_in(data, own, backend):
                    raise
            # A half-precision module on the CPU (m.half()), which torch.nn runs: no CPU
            # backend computes in half precision, so float32 stands in, with differentiable
            # casts (gradients come back in the parameters' dtype) and results in the module's
            # dtype, as torch.nn returns them.
            return _cast(self._forward_in(torch.float32, input, hx, params, backend, attrs),
                         own)
        # Under torch.autocast an RNN runs in the autocast dtype, as torch.nn's do (it is on
        # autocast's lower-precision list): x, hx and the weights cast for this call (the
        # casts are differentiable, so the float32 parameters get their gradients), autocast
        # off inside, as torch.amp.custom_fwd(cast_inputs=...) does for a custom op. Where no
        # backend computes in that dtype (the NumPy backend has no half precision), the
        # parameters' own dtype, as autocast leaves ops without a low-precision kernel.
        with torch.autocast(data.device.type, enabled=False):
            try:
                return self._forward_in(low, input, hx, params, backend, attrs)
            except registry.BackendError:
                own = next(iter(params.values())).dtype
                return self._forward_in(own, input, hx, params, backend, attrs)

    def _forward_in(self, dtype, input, hx, params, backend, attrs):
        """:meth:`_forward` with x, hx and the parameters cast to ``dtype`` (differentiable
        casts: the gradients reach the parameters in their own dtype)."""
        return self._forward(_cast(input, dtype), _cast(hx, dtype),
                             {k: p.to(dtype) for k, p in params.items()}, backend, attrs)

    def _meta_forward(self, input, hx, params, attrs):
        """On the ``meta`` device (shape inference, FLOP counters, deferred init): empty
        results of torch.nn's shapes, nothing computed, after the checks a real call makes
        (a meta run is there to catch a wrong shape, dtype or device)."""
        if isinstance(input, PackedSequence):
            raise NotImplementedError("rnn_gpu.torch on the meta device takes padded input, "
                                      "not a PackedSequence")
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        view = bind(self._core, params, **attrs)
        layout = view._check_input(input, "torch")
        if hx is not None:
            view._check_state(hx, layout, "torch", name="hx")
        refuse_no_steps(view, layout, input)
        dtype = next(iter(params.values())).dtype
        D, out = view.num_directions, view.output_size
        T, B = layout["T"], layout["B"]
        y_shape = _layers._layout_shape(layout, T, B, D * out)
        state = (self.num_layers * D,) if layout["unbatched"] else (self.num_layers * D, B)

        def empty(*shape):
            return torch.empty(shape, dtype=dtype, device="meta")

        y, h = empty(*y_shape), empty(*state, out)
        lstm = self._core_class is _CORE_LSTM
        return (y, (h, empty(*state, self.hidden_size))) if lstm else (y, h)

    @property
    def _flat_weights(self) -> list[nn.Parameter]:
        """torch.nn.RNNBase's list of the parameters in order, which some code reads."""
        return [getattr(self, name) for name in self._flat_weights_names]

    def _forward(self, input, hx, params, backend, attrs):
        if not isinstance(input, PackedSequence):
            return run(self._core, params, input, hx, backend=backend, **attrs)
        # Packed input: the core takes padded sequences plus lengths. pad_packed_sequence
        # returns them in the caller's original batch order, which is also the order torch.nn
        # expects hx in and returns h_n in; only the packed output data is in sorted order.
        x, lengths = pad_packed_sequence(input, batch_first=self.batch_first)
        y, state = run(self._core, params, x, hx, lengths=lengths, backend=backend, **attrs)
        return _repack(y, lengths, input, self.batch_first), state

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        for key, value in self._core._cell_options().items():
            if value != "tanh":
                s += f", {key}={value!r}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s


def _float32_stands_in(x: Any, dtype: torch.dtype, backend: str | None) -> bool:
    """Whether a call no backend served may run in float32 instead: half-precision tensors on
    the CPU with the backend left to the registry (a backend named explicitly keeps its
    error)."""
    return (backend is None and dtype in (torch.float16, torch.bfloat16)
            and isinstance(x, torch.Tensor) and x.device.type == "cpu"
            and x.dtype == dtype)


def _autocast_dtype(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The autocast dtype for this call, or None: autocast off on x's device, or weights that
    autocast leaves alone (float64, as it does; or already in that dtype)."""
    if not isinstance(x, torch.Tensor):
        return None
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
        low = torch.get_autocast_dtype(device_type)
    except TypeError:                       # torch < 2.4: one function per device type
        enabled = (torch.is_autocast_cpu_enabled() if device_type == "cpu"
                   else torch.is_autocast_enabled())
        low = (torch.get_autocast_cpu_dtype() if device_type == "cpu"
               else torch.get_autocast_gpu_dtype())
    weights = next(iter(params.values())).dtype
    if not enabled or weights == torch.float64 or weights == low:
        return None
    return low


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """x (a tensor or PackedSequence) or hx (a tensor or a tuple of them) in ``dtype``."""
    if value is None:
        return None
    if isinstance(value, PackedSequence):      # (a tuple itself; its .to(dtype) fails)
        return PackedSequence(value.data.to(dtype), value.batch_sizes, value.sorted_indices,
                              value.unsorted_indices)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value.to(dtype) if value.is_floating_point() else value


def _repack(y: torch.Tensor, lengths: torch.Tensor, like: PackedSequence,
            batch_first: bool) -> PackedSequence:
    """Padded output (original order) -> PackedSequence with ``like``'s batch layout."""
    if batch_first:
        y = y.transpose(0, 1)
    if like.sorted_indices is not None:
        y = y.index_select(1, like.sorted_indices)
        lengths = lengths.index_select(0, like.sorted_indices.cpu())
    data = pack_padded_sequence(y, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _only_lstm_projects(proj_size: Any) -> None:
    """GRU and RNN take ``proj_size`` where torch.nn's do (8th, before device), to refuse it
    as torch.nn does."""
    if proj_size:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class LSTM(_RecurrentModule):
    """torch.nn.LSTM drop-in (gates i, f, g, o; ``proj_size`` supported)."""

    _core_class = _CORE_LSTM

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None, *,
                 backend: str | None = None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, backend=backend)


class GRU(_RecurrentModule):
    """torch.nn.GRU drop-in (gates r, z, n; reset applied after the recurrent product)."""

    _core_class = _CORE_GRU

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: Any = None, dtype: Any = None, *,
                 backend: str | None = None):
        _only_lstm_projects(proj_size)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend)


class RNN(_RecurrentModule):
    """torch.nn.RNN drop-in (Elman, tanh or relu); ``nonlinearity`` is 4th, as in torch.nn."""

    _core_class = _CORE_RNN

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device: Any = None, dtype: Any = None, *, backend: str | None = None):
        _only_lstm_projects(proj_size)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend,
                         cell_options={"nonlinearity": nonlinearity})

    nonlinearity = _fixed("nonlinearity")


class TwoStageRNN(_RecurrentModule):
    """The seed's two-stage cell (DESIGN §2): ``a_t = f(W_ia x_t + W_aa h_{t-1} + b_a)``,
    ``h_t = g(W_ha a_t + W_hh h_{t-1} + b_h)``; f, g in {"tanh", "sigmoid", "relu"}."""

    _core_class = _CORE_TWOSTAGE

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device: Any = None, dtype: Any = None, *, f: str = "tanh", g: str = "tanh",
                 backend: str | None = None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend=backend,
                         cell_options={"f": f, "g": g})

    f = _fixed("f")
    g = _fixed("g")
