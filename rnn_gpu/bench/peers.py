"""Who runs a case: our backends through the public layers, and the peers they are compared
with (torch.nn on the CPU now; torch.nn on cuDNN with the GPU backends).

A runner turns (case, parameters, input) into a zero-argument callable that returns
``(y, state)`` as NumPy arrays, so that the runner loop can check the answer before timing the
very same callable. Parameters come from one rnn_gpu layer's ``state_dict()``: every runner
computes with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

PEER_TORCH_CPU = "torch-cpu"


class Runner:
    """Base class. ``name`` is what the table shows; ``is_peer`` marks a comparison target."""

    name = "runner"
    is_peer = False
    explicit = True         # False: leave the runner out of a case it cannot serve

    def unavailable_reason(self, case) -> str | None:
        return None

    def prepare(self, case, params: dict[str, np.ndarray],
                x: np.ndarray) -> Callable[[], tuple[np.ndarray, list[np.ndarray]]]:
        raise NotImplementedError


class BackendRunner(Runner):
    """One of our backends, called through the public layer with ``backend=name``.

    ``explicit``: the user asked for this backend, so a case it cannot serve is shown with the
    reason instead of being left out silently.
    """

    def __init__(self, backend: str, explicit: bool = False):
        self.name = backend
        self.explicit = explicit

    def unavailable_reason(self, case) -> str | None:
        from rnn_gpu import registry

        try:
            backend = registry.get(self.name)
            reason = backend.unavailable_reason()
            if reason:
                return reason
            reasons = backend.not_supported_reasons(_problem(case))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "; ".join(reasons) or None

    def prepare(self, case, params, x):
        import rnn_gpu

        layer = getattr(rnn_gpu, case.cell)(case.I, case.H, dtype=case.dtype, seed=0).eval()
        layer.load_state_dict(params)
        if case.device != "cpu":
            layer.to(case.device)
        name = self.name

        def call():
            y, state = layer(x, backend=name)
            return _numpy(y), [_numpy(s) for s in _as_tuple(state)]

        return call


class TorchCpuRunner(Runner):
    """torch.nn on the CPU with the same weights, under ``torch.no_grad()``.

    torch.nn has no TwoStageRNN: its peer is a plain torch loop (input GEMM for all steps,
    then three matmuls and two activations per step), what a user would write without us.
    """

    name = PEER_TORCH_CPU
    is_peer = True

    def unavailable_reason(self, case) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed"
        if case.device != "cpu":
            return "torch-cpu runs on the CPU"
        if case.dtype not in ("float32", "float64"):
            return f"torch.nn on the CPU is not benchmarked in {case.dtype}"
        return None

    def prepare(self, case, params, x):
        import torch

        dtype = getattr(torch, case.dtype)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype)
                   for k, v in params.items()}
        xt = torch.from_numpy(x)
        if case.cell == "TwoStageRNN":
            step = _torch_twostage(tensors)
        else:
            module = getattr(torch.nn, case.cell)(case.I, case.H).to(dtype)
            module.load_state_dict(tensors)
            module.eval()
            step = module

        def call():
            with torch.no_grad():
                y, state = step(xt)
            return y.numpy(), [s.numpy() for s in _as_tuple(state)]

        return call


def _problem(case):
    """The :class:`~rnn_gpu.backend_api.Problem` a layer would hand the backends for ``case``."""
    from rnn_gpu.backend_api import Problem
    from rnn_gpu.layers import LAYERS

    activations = {"RNN": ("tanh",), "TwoStageRNN": ("tanh", "tanh")}.get(case.cell, ())
    return Problem(cell=LAYERS[case.cell]._spec.kind, activations=activations, dtype=case.dtype,
                   device=case.device, input_kind="numpy", seq_len=case.T, batch=case.B,
                   input_size=case.I, hidden_size=case.H)


def _torch_twostage(p: dict[str, Any]):
    """The seed's cell as a plain torch loop (DESIGN §2), one layer, tanh/tanh."""
    import torch

    w_ia, b_a, w_aa = p["weight_ia_l0"], p["bias_a_l0"], p["weight_aa_l0"]
    w_ha, w_hh, b_h = p["weight_ha_l0"], p["weight_hh_l0"], p["bias_h_l0"]

    def forward(x):
        T, B, _ = x.shape
        xa = torch.addmm(b_a, x.reshape(T * B, -1), w_ia.T).reshape(T, B, -1)
        h = x.new_zeros(B, w_hh.shape[0])
        ys = torch.empty(T, B, w_hh.shape[0], dtype=x.dtype)
        for t in range(T):
            a = torch.tanh(torch.addmm(xa[t], h, w_aa.T))
            h = torch.tanh(torch.addmm(b_h, a, w_ha.T).addmm_(h, w_hh.T))
            ys[t] = h
        return ys, h[None]

    return forward


def _as_tuple(state) -> tuple:
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def _numpy(a) -> np.ndarray:
    from rnn_gpu._arrays import to_numpy

    return to_numpy(a)


def our_runners(names: list[str] | None = None) -> list[Runner]:
    """Runners for the registered backends (all of them, or ``names``, in that order)."""
    from rnn_gpu import registry

    if names:
        return [BackendRunner(name, explicit=True) for name in names]
    return [BackendRunner(name) for name in registry.names()]


def peer_runners() -> list[Runner]:
    return [TorchCpuRunner()]
