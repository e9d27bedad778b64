"""The autograd bridge: one ``torch.autograd.Function`` around a core layer's forward/backward.

As in flash-linear-attention's fused_recurrent ops, the whole recurrence is one node of the
autograd graph: ``forward`` runs the fused op and keeps the op's own tape, ``backward`` hands
that tape to the op's own backward. torch never records the per-step graph, so time and memory
are the backend's, not autograd's.

The core layer (:class:`rnn_gpu.layers.RecurrentLayer`) computes on whatever sits in its
``_params`` dict. :func:`bind` makes a per-call view of the Module's core layer whose ``_params``
are the Module's parameter tensors themselves (``detach()`` shares storage; on the CPU the core
then sees them as NumPy arrays, zero-copy). A per-call view rather than the shared instance
because the view then belongs to one graph: backward runs with exactly the parameters, dtype
and device that forward saw, concurrent calls from several threads do not trample each other,
and nothing keeps an old parameter alive after ``.to()`` / ``.double()`` replaces it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from .. import _config
from .._arrays import device_of, to_kind
from .._dtypes import canonical_dtype
from ..layers import LSTM as _CoreLSTM
from ..layers import RecurrentLayer


def bind(core: RecurrentLayer, params: dict[str, torch.Tensor], **attrs: Any) -> RecurrentLayer:
    """A shallow copy of ``core`` that computes with ``params`` (not copies of them).

    ``attrs`` (training, dropout, batch_first, ...) are set on the copy; the core's dtype and
    device follow the parameters, so ``module.double()`` or ``module.to(...)`` need no hook.
    """
    first_name, first = next(iter(params.items()))
    shapes = core.parameter_shapes()
    for name, p in params.items():
        # A parameter replaced by one of another shape (m.weight_hh_l0 = nn.Parameter(...), a
        # parametrization) crashed deep in a matmul, or ran with a (4H, H, 1) one silently.
        if tuple(p.shape) != shapes[name]:
            raise ValueError(f"{name}: expected shape {shapes[name]}, got {tuple(p.shape)}")
        if p.dtype != first.dtype or p.device != first.device:
            raise TypeError(f"parameters: every parameter must share one dtype and device; "
                            f"{first_name} is {first.dtype} on {first.device} but {name} is "
                            f"{p.dtype} on {p.device}")
    # copy.copy without its __reduce_ex__ round trip (~5 against ~2 us; the layers define
    # no __copy__ or __slots__)
    view = object.__new__(type(core))
    view.__dict__.update(core.__dict__)
    view._params = {name: p.detach() for name, p in params.items()}
    view.dtype = canonical_dtype(first.dtype)
    view.device = device_of(first)
    for key, value in attrs.items():
        setattr(view, key, value)
    return view


def _opaque_to_compile(fn):
    """``fn`` as one graph break under torch.compile, run eagerly (autograd included), so that
    the code around the layer compiles. Traced, dynamo walked into the core's dispatch, its
    NumPy or CuPy calls and the backends' lazy imports: 26 graphs, its recompile limit, and 32 s
    for a first call of a 2-layer LSTM on 5x3x8 (CPU, torch 2.13) that takes milliseconds. A
    fused kernel leaves it nothing to fuse."""
    reason = ("rnn_gpu's recurrent layers run their fused kernels outside the graph (one "
              "graph break); fullgraph=True cannot hold them")
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:                                  # torch < 2.7: no reason=
        return torch.compiler.disable(fn)


@_opaque_to_compile
def run(core: RecurrentLayer, params: dict[str, torch.Tensor], x: torch.Tensor, hx: Any, *,
        lengths: torch.Tensor | None = None, backend: str | None = None, **attrs: Any):
    """``core`` with ``params`` on torch tensors: ``(y, h_n)`` or, for LSTM, ``(y, (h_n, c_n))``.

    ``params`` maps every parameter name (torch.nn's order) to its tensor; ``attrs`` are set on
    the per-call view (see :func:`bind`). Three paths: autograd through
    :class:`RecurrentFunction` when a gradient can flow; the core's tape-free inference call
    otherwise; and the core's ``forward`` (with its dropout) when no gradient flows but dropout
    must still apply.
    """
    _refuse_tracing(type(core).__name__)
    if not isinstance(x, torch.Tensor):
        name = type(core).__name__
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(f"torch.fx.symbolic_trace: rnn_gpu.torch.{name} runs its fused "
                            f"kernels outside torch's graph and cannot be traced into; keep "
                            f"it a leaf module (a torch.fx.Tracer whose is_leaf_module returns "
                            f"True for it), as torch.nn.{name} is by default")
        raise TypeError(f"input: expected a torch.Tensor or a PackedSequence, got "
                        f"{type(x).__name__} (the NumPy/CuPy API is rnn_gpu.{name})")
    core = bind(core, params, **attrs)
    refuse_no_steps(core, core._check_input(x, "torch"), x)
    lstm = isinstance(core, _CoreLSTM)
    h0, c0 = _split_state(hx, lstm)
    dropout_active = core.training and core.dropout > 0 and core.num_layers > 1
    # Dropout masks from torch's generator, so that torch.manual_seed reproduces them as it
    # does for torch.nn (the core draws its masks from its own NumPy generator).
    seed = int(torch.randint(0, 2**62, ()).item()) if dropout_active else None
    # TF32 for float32 follows torch.backends.cudnn.allow_tf32, as torch.nn's RNNs do (cuDNN
    # obeys that flag); the flag is read per call and kept for the backward of this call.
    tf32 = bool(torch.backends.cudnn.allow_tf32)
    leaves = [x, h0, c0, *params.values()]
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in leaves)
    if need_grad:
        # The parameters go in as the Module's tensors (not the detached views in core._params)
        # so that autograd routes their gradients; the views share their storage.
        outs = RecurrentFunction.apply(core, (lengths, backend, seed, tf32), x, h0, c0,
                                       *params.values())
        return (outs[0], (outs[1], outs[2])) if lstm else (outs[0], outs[1])
    state = None if h0 is None else ((h0, c0) if lstm else h0)
    with _config.tf32_scope(tf32), _config.cpu_threads_scope(torch.get_num_threads()):
        if dropout_active:
            _reseed(core, seed)
            y, final, _ = core.forward(x, state, lengths=lengths, backend=backend)
            return y, final
        return core(x, state, lengths=lengths, backend=backend)


def refuse_no_steps(core: RecurrentLayer, layout: dict[str, Any], x: torch.Tensor) -> None:
    """torch.nn's RNNs refuse an input of T = 0 steps (batched or not, either layout; B = 0
    with T >= 1 they take), so the drop-ins do too, after the same checks of the input's
    shape that torch.nn makes first. The core layers (the NumPy/CuPy API) take T = 0 and
    return empty outputs and the initial state; a drop-in that did so would accept what
    torch.nn refuses, and code tried on it would fail on torch.nn."""
    if layout["T"] == 0:
        where = "dimension 1, batch_first=True" if layout["batch_first"] and \
            not layout["unbatched"] else "dimension 0"
        raise ValueError(f"input: expected at least one time step (T in {where}), got shape "
                         f"{tuple(x.shape)}; torch.nn's RNNs refuse T = 0 too (rnn_gpu."
                         f"{type(core).__name__}, the NumPy/CuPy API, takes it)")


def _refuse_tracing(name: str) -> None:
    """torch.export, torch.jit.trace and torch.func's transforms cannot see through the fused
    op: say so here, where their own errors read as our bugs (export, on fake tensors: ".numpy()
    is not supported for tensor subclasses" deep in the core; trace: "unordered_map::at"; vmap,
    grad, jvp: a note on autograd.Function's setup_context)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)      # torch >= 2.5
    if is_exporting is not None and is_exporting():
        instead = (f"export the model with torch.nn.{name} in its place (it takes this "
                   f"layer's state_dict unchanged), or " if name in ("LSTM", "GRU", "RNN")
                   else "")
        raise NotImplementedError(
            f"torch.export: rnn_gpu.torch.{name} runs its fused kernels outside torch's graph "
            f"and cannot be exported; {instead}use torch.compile, which runs this layer as one "
            f"graph break")
    if torch.jit.is_tracing():
        raise NotImplementedError(
            f"torch.jit.trace: rnn_gpu.torch.{name} runs its fused kernels outside torch's "
            f"graph and cannot be traced; use torch.compile, which runs this layer as one "
            f"graph break")
    if _fake_tensor_mode_active():
        raise NotImplementedError(
            f"FakeTensorMode: rnn_gpu.torch.{name} computes with the tensors' values outside "
            f"torch's graph, which fake tensors do not have; for shapes, run it on the meta "
            f"device (it returns empty results of torch.nn's shapes there)")
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        raise NotImplementedError(
            f"torch.func transforms (vmap, grad, jvp, jacrev, ...): rnn_gpu.torch.{name}'s "
            f"fused op has no rules for them; use torch.autograd (loss.backward(), "
            f"torch.autograd.grad) for gradients, and a batch dimension instead of vmap "
            f"(torch.func.functional_call works)")


def _fake_tensor_mode_active() -> bool:
    """Whether a FakeTensorMode is on (its tensors have no data; `.numpy()` failed deep in the
    core). Private API, so guarded: where it is missing, that failure stays as it was."""
    # Not imported here: importing it costs time and warnings; no FakeTensorMode can be on
    # before something else has imported it.
    fake = sys.modules.get("torch._subclasses.fake_tensor")
    stack = getattr(sys.modules.get("torch.utils._python_dispatch"),
                    "_get_current_dispatch_mode_stack", None)
    mode = getattr(fake, "FakeTensorMode", None)
    if mode is None or stack is None:
        return False
    return any(isinstance(m, mode) for m in stack())


def _reseed(core: RecurrentLayer, seed: int | None) -> None:
    if seed is not None:
        core._rng = np.random.default_rng(seed)


def _split_state(hx: Any, lstm: bool):
    if hx is None:
        return None, None
    if lstm:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx: LSTM expects a tuple (h_0, c_0), got {type(hx).__name__}")
        if not all(isinstance(h, torch.Tensor) for h in hx):
            raise TypeError("hx: LSTM expects a tuple of two tensors (h_0, c_0)")
        return hx[0], hx[1]
    if not isinstance(hx, torch.Tensor):
        raise TypeError(f"hx: expected a tensor h_0, got {type(hx).__name__}")
    return hx, None


class RecurrentFunction(torch.autograd.Function):
    """``(y, h_n[, c_n]) = core(x, (h_0[, c_0]))`` as one autograd node.

    Inputs: ``core`` (a view from :func:`bind`), ``call = (lengths, backend, dropout seed,
    tf32)``,
    then the tensors ``x, h_0, c_0`` (h_0/c_0 may be None) and every parameter in
    ``core._params`` order.
    """

    @staticmethod
    def forward(ctx, core, call, x, h0, c0, *params):
        y, final, tape = _core_forward(core, call, x, h0, c0)
        # Under saved-tensor hooks (torch.utils.checkpoint without reentrance, save_on_cpu)
        # the caller wants the activations out of memory, and the tape is outside their
        # reach (a GRU(64, 256, 2) on 200x32x64 kept its 83 MB): keep only the inputs, which
        # the hooks pack, and let backward recompute the tape from them.
        if _saved_tensor_hooks_active():
            tape = None
        ctx.core, ctx.call, ctx.tape = core, call, tape
        ctx.y_meta = (y.shape, y.dtype, y.device)
        # The tape holds what backward needs (partly as views of these very tensors); saving
        # them as well makes autograd's version counters catch an in-place change of x, hx or
        # a parameter between forward and backward, and lets a second backward recompute.
        ctx.save_for_backward(x, h0, c0, *params)
        ctx.set_materialize_grads(False)
        return (y, *final) if isinstance(core, _CoreLSTM) else (y, final)

    @staticmethod
    def backward(ctx, dy, *dfinal):
        # Raises torch's own error if an input changed in place, or if this is a second
        # backward without retain_graph=True (autograd freed the saved tensors).
        x, h0, c0, *params = ctx.saved_tensors
        with torch.no_grad():
            grads = _backward(ctx, x, h0, c0, params, dy, dfinal)
        if not torch.is_grad_enabled():
            return grads
        # create_graph=True: the gradients must not pass for differentiable. Not
        # torch's once_differentiable: its error node has no path to the inputs, so
        # torch.autograd.grad(..., inputs=...) prunes it and a MAML meta-gradient or a Hessian
        # came out first-order or zero, silently.
        anchors = [t for t in (x, h0, c0, *params, dy, *dfinal)
                   if t is not None and t.requires_grad]
        return _refuse_second_order(type(ctx.core).__name__, grads, anchors)

    @staticmethod
    def jvp(ctx, *tangents):
        name = type(ctx.core).__name__
        instead = (f"; torch.nn.{name} has one (it takes this layer's state_dict unchanged)"
                   if name in ("LSTM", "GRU", "RNN") else "")
        raise NotImplementedError(
            f"forward-mode AD (torch.autograd.forward_ad): rnn_gpu.torch.{name}'s fused op has "
            f"no forward-mode rule; use reverse mode (loss.backward(), torch.autograd.grad)"
            f"{instead}")


def _saved_tensor_hooks_active() -> bool:
    """Whether default saved-tensor hooks are set (torch.autograd.graph.saved_tensors_hooks:
    checkpoint(use_reentrant=False), save_on_cpu). torch has no public query; without this
    private one (older or newer torch), the tape is kept, as before."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        return top(False) is not None
    except TypeError:
        return False


def _backward(ctx, x, h0, c0, params, dy, dfinal):
    """RecurrentFunction's gradients, in its inputs' order: the core's backward on the tape."""
    core, tape, ctx.tape = ctx.core, ctx.tape, None     # free the activations once used
    if tape is None:
        # A second backward through this node (retain_graph=True, gradcheck), whose first
        # consumed the tape, or a forward under saved-tensor hooks: recompute it (same dropout
        # seed).
        tape = _core_forward(core, ctx.call, x, h0, c0)[2]
    if dy is None:
        shape, dtype, device = ctx.y_meta
        dy = torch.zeros(shape, dtype=dtype, device=device)
    lstm = isinstance(core, _CoreLSTM)
    # Autograd may hand in expanded (stride-0) gradients, e.g. from .sum(): densify them.
    dfinal = tuple(None if d is None else d.contiguous() for d in dfinal)
    needs = ctx.needs_input_grad
    with _config.cpu_threads_scope(torch.get_num_threads()):
        # x is data in most training: its gradient, the first layer's dxw @ W_ih, is skipped
        dx, dstate0, grads = core.backward(tape, dy.contiguous(), dfinal if lstm else dfinal[0],
                                           input_grad=needs[2])
    dh0, dc0 = dstate0 if lstm else (dstate0, None)
    param_grads = [_as_grad(grads[name], p) if needs[5 + i] else None
                   for i, (name, p) in enumerate(zip(core._params, params))]
    return (None, None,
            dx if needs[2] else None,
            dh0 if needs[3] else None,
            dc0 if needs[4] else None,
            *param_grads)


def _refuse_second_order(name: str, grads: tuple, anchors: list[torch.Tensor]) -> tuple:
    """``grads`` as they are, behind a node that raises when they are differentiated. The
    node's inputs include ``anchors`` (the layer's inputs and the incoming gradients that
    require grad), so every path from the gradients back to the inputs crosses it."""
    present = [i for i, g in enumerate(grads) if g is not None]
    guarded = _SecondOrderRefused.apply(name, len(present), *(grads[i] for i in present),
                                        *anchors)
    out = list(grads)
    for i, g in zip(present, guarded):
        out[i] = g
    return tuple(out)


class _SecondOrderRefused(torch.autograd.Function):
    """Identity on the first ``n`` tensors (the gradients); differentiating them raises."""

    @staticmethod
    def forward(ctx, name, n, *tensors):
        ctx.name = name
        ctx.set_materialize_grads(False)
        return tuple(g.clone() for g in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        instead = (f". Use torch.nn.{ctx.name} for that part (it takes this layer's state_dict "
                   f"unchanged)" if ctx.name in ("LSTM", "GRU", "RNN") else "")
        raise RuntimeError(
            f"rnn_gpu.torch.{ctx.name}: second-order gradients (differentiating gradients "
            f"taken with create_graph=True, as MAML, Hessians and gradient penalties do) are "
            f"not supported: the fused backward is not itself differentiable{instead}")


def _core_forward(core, call, x, h0, c0):
    lengths, backend, seed, tf32 = call
    _reseed(core, seed)
    state = None if h0 is None else ((h0, c0) if isinstance(core, _CoreLSTM) else h0)
    with _config.tf32_scope(tf32), _config.cpu_threads_scope(torch.get_num_threads()):
        return core.forward(x, state, lengths=lengths, backend=backend)


def _as_grad(g: Any, p: torch.Tensor) -> torch.Tensor:
    """A gradient from the core (NumPy, CuPy or torch) as a tensor like parameter ``p``."""
    t = to_kind(g, "torch", device_of(p))
    return t if t.dtype == p.dtype else t.to(p.dtype)
