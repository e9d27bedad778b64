"""Who runs a case: our backends through the public layers, and the peers they are compared
with: torch.nn on the CPU, and torch.nn on cuDNN when a GPU is there.

``prepare(case, params, x)`` returns a :class:`Prepared`: ``call()`` is what gets timed (it
returns the runner's own arrays, so that no device-to-host copy is timed) and ``result()``
runs it once and returns NumPy arrays for the check: ``(y, [final state..., and for a train
pass dx and every parameter gradient, in a fixed order])``. Parameters come from one rnn_gpu
layer's ``state_dict()``: every runner computes with the same weights, and a train pass
back-propagates the same output and state gradients (:func:`train_grads`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cases import case_lengths, round_inputs

PEER_TORCH_CPU = "torch-cpu"
PEER_TORCH_CUDNN = "torch-cudnn"


@dataclass
class Prepared:
    """``call`` is timed; ``result`` is checked. ``result`` defaults to ``convert(call())``."""

    call: Callable[[], Any]
    convert: Callable[[Any], tuple[np.ndarray, list[np.ndarray]]]

    def result(self) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.convert(self.call())


class Runner:
    """Base class. ``name`` is what the table shows; ``is_peer`` marks a comparison target."""

    name = "runner"
    is_peer = False
    explicit = True         # False: leave the runner out of a case it cannot serve

    def unavailable_reason(self, case) -> str | None:
        return None

    def prepare(self, case, params: dict[str, np.ndarray], x: np.ndarray) -> Prepared:
        raise NotImplementedError

    def describe_run(self, case) -> str | None:
        """How the runner ran ``case`` (asked after its calls), or None."""
        return None


def train_grads(case, seed: int = 2):
    """The output and final-state gradients a train pass back-propagates (float32, seeded):
    the gradient of ``sum(y * dy) + sum(h_n * dh) (+ sum(c_n * dc))``. NumPy on the CPU; on a
    GPU drawn there (a 128x16384x128 dy is 1 GiB: drawing it on the host took seconds)."""
    shapes = [(case.T, case.B, case.out_size), (1, case.B, case.out_size)]
    if case.cell == "LSTM":
        shapes.append((1, case.B, case.H))                      # c_n: H wide, P or not
    if case.on_gpu:
        import torch

        gen = torch.Generator(device=case.device).manual_seed(seed)
        dy, *dstate = (round_inputs(torch.randn(s, generator=gen, device=case.device), case)
                       for s in shapes)
        return dy, dstate
    rng = np.random.default_rng(seed)
    dy, *dstate = (round_inputs(rng.standard_normal(s).astype(np.float32), case)
                   for s in shapes)
    return dy, dstate


class BackendRunner(Runner):
    """One of our backends, called through the public layer with ``backend=name``; with
    ``NAME:VARIANT`` (``cupy:persistent``), inside the backend's ``variant(VARIANT)``.

    ``explicit``: the user asked for this backend, so a case it cannot serve is shown with the
    reason instead of being left out silently. On a GPU the input is a torch CUDA tensor (the
    layer hands each backend its own kind, zero-copy).
    """

    def __init__(self, backend: str, explicit: bool = False):
        self.name = backend
        self.backend, _, self.variant = backend.partition(":")
        self.explicit = explicit

    def unavailable_reason(self, case) -> str | None:
        from rnn_gpu import registry

        try:
            backend = registry.get(self.backend)
            reason = backend.unavailable_reason() or self.variant_reason(backend)
            if reason:
                return reason
            with self._variant():       # read as the registry reads it (a str is one reason)
                reasons = registry._declines(backend, _problem(case))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "; ".join(reasons) or None

    def variant_reason(self, backend) -> str | None:
        """Why ``backend`` has no variant by this runner's name (None: it has, or none was
        asked); ``rnn-gpu bench`` checks its arguments with it before any case runs."""
        if not self.variant:
            return None
        known = tuple(backend.variants()) if getattr(backend, "variants", None) else ()
        if self.variant in known:
            return None
        return (f"the {self.backend} backend has no variant {self.variant!r} (it has "
                f"{', '.join(known) or 'none'})")

    def _variant(self):
        if not self.variant:
            return contextlib.nullcontext()
        from rnn_gpu import registry

        return registry.get(self.backend).variant(self.variant)

    def describe_run(self, case) -> str | None:
        from rnn_gpu import registry

        describe = getattr(registry.get(self.backend), "describe_run", None)  # duck-typed
        if describe is None:
            return None
        with self._variant():
            return describe(_problem(case))

    def prepare(self, case, params, x):
        import rnn_gpu

        layer = getattr(rnn_gpu, case.cell)(case.I, case.H, dtype=case.dtype, seed=0,
                                            **case.layer_options()).eval()
        layer.load_state_dict(params)
        if case.device != "cpu":
            layer.to(case.device)
        name, variant = self.backend, self._variant
        x = _on_device(x, case)
        lengths = case_lengths(case)        # host ints, as users hold them
        if case.pass_ == "forward":
            def call():
                with variant():
                    return layer(x, lengths=lengths, backend=name)

            return Prepared(call, _forward_result)
        dy, dstate = (_on_device(a, case) for a in train_grads(case))
        names = list(layer.parameter_shapes())

        def train():
            with variant():
                y, state, tape = layer.forward(x, lengths=lengths, backend=name)
                dx, _, grads = layer.backward(tape, dy, dstate[0] if len(dstate) == 1
                                              else tuple(dstate))
            return y, state, dx, grads

        def convert(out):
            y, state, dx, grads = out
            return _numpy(y), [*(_numpy(s) for s in _as_tuple(state)), _numpy(dx),
                               *(_numpy(grads[k]) for k in names)]

        return Prepared(train, convert)


class TorchRunner(Runner):
    """torch.nn with the same weights: on the CPU (``torch-cpu``) or on cuDNN
    (``torch-cudnn``), inference under ``torch.inference_mode()``.

    Fair to the peer (DESIGN §7): on a GPU the module is moved and cast first and then
    ``flatten_parameters()`` is called (otherwise cuDNN compacts the weights on every call),
    and TF32 is off for float32, as for our kernels unless the user allows it.

    torch.nn has no TwoStageRNN: its peer is a plain torch loop (input GEMM for all steps,
    then three matmuls and two activations per step), what a user would write without us.
    """

    is_peer = True

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.name = PEER_TORCH_CPU if device == "cpu" else PEER_TORCH_CUDNN

    def unavailable_reason(self, case) -> str | None:
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if case.on_gpu != self.device.startswith("cuda"):
            return f"{self.name} does not run on {case.device}"
        if not case.on_gpu:
            if case.dtype not in ("float32", "float64"):
                return f"torch.nn on the CPU is not benchmarked in {case.dtype}"
            return None
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        # the case's card, not the current one; and not torch.cuda.is_bf16_supported(), which
        # says yes below 8.0 too where bfloat16 tensors can be made (emulated)
        major, minor = torch.cuda.get_device_capability(case.device)
        if case.dtype == "bfloat16" and major < 8:
            return (f"bfloat16 needs compute capability 8.0, {case.device} has "
                    f"{major}.{minor}")
        return None

    def prepare(self, case, params, x):
        import torch

        dtype, device = getattr(torch, case.dtype), case.device
        tensors = {k: _on_device(v, case, torch_on_cpu=True) for k, v in params.items()}
        xt = _on_device(x, case, torch_on_cpu=True)
        names = list(params)
        lengths = case_lengths(case)
        if case.cell == "TwoStageRNN":
            step = _torch_twostage(tensors, lengths)
            weights = [tensors[k] for k in names]
        else:
            module = getattr(torch.nn, case.cell)(case.I, case.H, device=device, dtype=dtype,
                                                  **case.layer_options())
            module.load_state_dict(tensors)
            if case.on_gpu:
                # No-op for bfloat16: torch's cudnn.is_acceptable() excludes it, so cuDNN
                # compacts bf16 weights on every call, as it does for any torch.nn user.
                module.flatten_parameters()
            # cuDNN's RNN backward refuses a module in eval mode; dropout is 0 either way.
            module.train(case.pass_ == "train")
            step = module if lengths is None else _packed(module, lengths)
            weights = [getattr(module, k) for k in names]
        oracle = bool(case.inputs_dtype)     # a half-precision case's float32 oracle
        if case.pass_ == "forward":
            def call():
                with _no_tf32(oracle), torch.inference_mode():
                    return step(xt)

            return Prepared(call, _forward_result)
        dy, dstate = (_on_device(a, case, torch_on_cpu=True) for a in train_grads(case))
        for w in weights:
            w.requires_grad_(True)
        xg = xt.clone().requires_grad_(True)

        def train():
            with _no_tf32(oracle):
                y, state = step(xg)
                state = _as_tuple(state)
                grads = torch.autograd.grad([y, *state], [xg, *weights], [dy, *dstate])
            return y, state, grads

        def convert(out):
            y, state, grads = out
            return _numpy(y), [*(_numpy(s) for s in state), *(_numpy(g) for g in grads)]

        return Prepared(train, convert)


@contextlib.contextmanager
def _no_tf32(oracle: bool = False):
    """float32 means IEEE float32 for the peer as for us (DESIGN §3, §7), unless the user
    allowed TF32 for both; as an oracle (``Case.float32_oracle``), always IEEE: TF32's 2^-11
    is fp16's own roundoff."""
    import torch

    from rnn_gpu import tf32_allowed

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    allow = tf32_allowed() and not oracle
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        with warnings.catch_warnings():
            # bfloat16 weights cannot be flattened (see TorchRunner.prepare): torch warns on
            # every call; the cost is in the timing, the warning would only flood the table.
            warnings.filterwarnings("ignore", message="RNN module weights are not part")
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _on_device(a, case, torch_on_cpu: bool = False):
    """Host or device data -> the case's device and dtype: NumPy on the CPU (a torch CPU tensor
    with ``torch_on_cpu``), a torch tensor on CUDA."""
    if isinstance(a, list):
        return [_on_device(v, case, torch_on_cpu) for v in a]
    from rnn_gpu._arrays import kind_of

    if not case.on_gpu and not torch_on_cpu:
        return a.astype(case.dtype) if a.dtype != np.dtype(case.dtype) else a
    import torch

    t = a if kind_of(a) == "torch" else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=case.device, dtype=getattr(torch, case.dtype))


def _problem(case):
    """The :class:`~rnn_gpu.backend_api.Problem` a layer would hand the backends for ``case``."""
    from rnn_gpu.backend_api import Problem
    from rnn_gpu.layers import LAYERS

    from .cases import case_lengths

    activations = {"RNN": ("tanh",), "TwoStageRNN": ("tanh", "tanh")}.get(case.cell, ())
    lengths = case_lengths(case)
    # as the layer does: with lengths it runs up to the longest (and says so to the backend)
    steps = case.T if lengths is None or case.B == 0 else int(lengths.max())
    return Problem(cell=LAYERS[case.cell]._spec.kind, activations=activations, dtype=case.dtype,
                   device=case.device, input_kind="torch" if case.on_gpu else "numpy",
                   seq_len=steps, batch=case.B, input_size=case.I, hidden_size=case.H,
                   proj_size=case.P, training=case.pass_ == "train",
                   has_lengths=lengths is not None)


def _packed(module, lengths: np.ndarray):
    """torch.nn with variable lengths, as its users call it: x packed
    (``enforce_sorted=False``: cuDNN sorts the batch itself), the output padded back to T.
    Both conversions are in the timed call; they are part of what the user pays."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    host_lengths = torch.as_tensor(lengths)         # pack_padded_sequence wants them on the CPU

    def forward(x):
        packed = pack_padded_sequence(x, host_lengths, enforce_sorted=False)
        y, state = module(packed)
        return pad_packed_sequence(y, total_length=x.shape[0])[0], state

    return forward


def _torch_twostage(p: dict[str, Any], lengths: np.ndarray | None = None):
    """The seed's cell as a plain torch loop (DESIGN §2), one layer, tanh/tanh, two GEMMs a
    step; with ``lengths``, each row's state held and its output zero after its end. Not
    captured as a CUDA graph: on a GPU it is bound by its launches (~6 a step)."""
    import torch

    w_ia, b_a, w_aa = p["weight_ia_l0"], p["bias_a_l0"], p["weight_aa_l0"]
    w_ha, w_hh, b_h = p["weight_ha_l0"], p["weight_hh_l0"], p["bias_h_l0"]
    valid_steps = None if lengths is None else torch.as_tensor(lengths).to(w_hh.device)

    def forward(x):
        T, B, _ = x.shape
        H = w_hh.shape[0]
        xa = torch.addmm(b_a, x.reshape(T * B, -1), w_ia.T).reshape(T, B, -1)
        # both products of h_{t-1} as one GEMM, as our backends do: two GEMMs a step, not
        # three (the peer is the bar, so it gets the same algebra; inside the call, so that
        # training differentiates through it)
        w_h = torch.cat([w_aa, w_hh]).T
        h = x.new_zeros(B, H)
        ys = []
        for t in range(T):
            both = h @ w_h
            a = torch.tanh(xa[t] + both[:, :H])
            h_new = torch.tanh(torch.addmm(both[:, H:] + b_h, a, w_ha.T))
            if valid_steps is None:
                h = h_new
                ys.append(h)
                continue
            valid = (t < valid_steps)[:, None]
            h = torch.where(valid, h_new, h)
            ys.append(torch.where(valid, h_new, torch.zeros_like(h_new)))
        return torch.stack(ys), h[None]

    return forward


def _forward_result(out):
    """``(y, state)`` of a forward call -> ``(y, [state...])`` ready for the check."""
    return _numpy(out[0]), [_numpy(s) for s in _as_tuple(out[1])]


def _as_tuple(state) -> tuple:
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def _numpy(a):
    """A result ready for the check: NumPy, or a torch tensor left on its device (copying a
    GiB-sized GPU output to the host would cost more than the check), detached, half
    precisions widened to float32."""
    from rnn_gpu._arrays import kind_of, to_numpy

    if kind_of(a) == "torch":
        a = a.detach()
        if a.dtype.is_floating_point and a.element_size() < 4:
            a = a.float()
        return a if a.is_cuda else a.numpy()
    return np.asarray(to_numpy(a))


def our_runners(names: list[str] | None = None) -> list[Runner]:
    """Runners for the registered backends (all of them, or ``names``, in that order)."""
    from rnn_gpu import registry

    if names:
        return [BackendRunner(name, explicit=True) for name in names]
    return [BackendRunner(name) for name in registry.names()]


def peer_runners(device: str = "cpu") -> list[Runner]:
    """The peers of a device: torch.nn on the CPU there, torch.nn on cuDNN on a GPU."""
    return [TorchRunner(device)]
