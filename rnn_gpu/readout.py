"""Readout: ``y_t = softmax(W_yo h_t + b_y)`` with a numerically stable cross-entropy (DESIGN §2).

Works on NumPy arrays (the CPU path the seed example trains with). ``weight`` is
(num_classes, hidden_size) and ``bias`` (num_classes,), as torch.nn.Linear.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _checks
from ._arrays import to_numpy
from ._dtypes import canonical_dtype


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax: subtract the row maximum before exponentiating."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def readout_mismatch(model: Any, readout: Any) -> str | None:
    """Why ``readout`` cannot read ``model``'s outputs, or None when it can: its hidden_size
    must be the layer's output features, both directions side by side (D * H_out)."""
    width = model.num_directions * model.output_size
    if readout.hidden_size == width:
        return None
    how = (f"num_directions * {'proj_size' if model.proj_size else 'hidden_size'} = "
           f"{model.num_directions} * {model.output_size} = {width}")
    return (f"model.readout: expected hidden_size = the layer's output features ({how}), got "
            f"{readout!r} with hidden_size {readout.hidden_size}")


class Readout:
    """Softmax classifier over hidden states: ``(..., H) -> (..., num_classes)``."""

    def __init__(self, hidden_size: int, num_classes: int, *, bias: bool = True,
                 dtype: Any = "float32", seed: int | None = None):
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.bias = bool(bias)
        self.dtype = canonical_dtype(dtype)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: Readout computes in NumPy, expected float32 or float64, "
                             f"got {self.dtype}")
        rng = np.random.default_rng(_checks.seed("seed", seed))
        bound = 1.0 / math.sqrt(self.hidden_size)       # torch.nn.Linear's default
        self._params = {"weight": rng.uniform(-bound, bound, (num_classes, hidden_size))
                        .astype(self.dtype)}
        if self.bias:
            self._params["bias"] = rng.uniform(-bound, bound, num_classes).astype(self.dtype)

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "num_classes": self.num_classes,
                "bias": self.bias, "dtype": self.dtype}

    def __repr__(self) -> str:
        return f"Readout({self.hidden_size}, {self.num_classes})"

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._params.items()}

    def parameters(self) -> dict[str, np.ndarray]:
        return dict(self._params)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._params.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        expected = self.parameter_shapes()
        if set(state_dict) != set(expected):
            raise KeyError(f"state_dict does not match {self!r}: missing keys "
                           f"{sorted(set(expected) - set(state_dict))}, unexpected keys "
                           f"{sorted(set(state_dict) - set(expected))}")
        loaded = {}
        for name, shape in expected.items():
            arr = to_numpy(state_dict[name])
            if tuple(arr.shape) != shape:
                raise ValueError(f"state_dict[{name!r}]: expected shape {shape}, got "
                                 f"{tuple(arr.shape)}")
            loaded[name] = np.array(arr, dtype=self.dtype)
        self._params = loaded

    def _hidden(self, h: Any) -> np.ndarray:
        _checks.array("h", h)
        h = to_numpy(h)
        if h.ndim < 1 or h.shape[-1] != self.hidden_size:
            raise ValueError(f"h: expected last dimension hidden_size={self.hidden_size}, got "
                             f"shape {tuple(h.shape)}")
        return h.astype(self.dtype, copy=False)

    def logits(self, h: Any) -> np.ndarray:
        h = self._hidden(h)
        z = h @ self._params["weight"].T
        return z + self._params["bias"] if self.bias else z

    def log_probs(self, h: Any) -> np.ndarray:
        return log_softmax(self.logits(h))

    def __call__(self, h: Any) -> np.ndarray:
        """Class probabilities ``softmax(W_yo h + b_y)``, shape ``h.shape[:-1] + (C,)``."""
        return np.exp(self.log_probs(h))

    def loss_and_grads(self, h: Any, targets: Any):
        """Mean cross-entropy over all positions, its gradient with respect to ``h``, and the
        parameter gradients: ``loss, dh, grads``."""
        h = self._hidden(h)
        t = np.asarray(to_numpy(targets) if not isinstance(targets, (list, tuple))
                       else targets)
        if t.shape != h.shape[:-1]:
            raise ValueError(f"targets: expected shape {h.shape[:-1]} (one class per position "
                             f"of h), got {t.shape}")
        if t.dtype.kind not in "iu":
            raise TypeError(f"targets: expected integer class indices, got dtype {t.dtype}")
        if t.size and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"targets: expected classes in [0, {self.num_classes}), got "
                             f"min {t.min()} max {t.max()}")
        logp = self.log_probs(h)
        flat_logp = logp.reshape(-1, self.num_classes)
        flat_t = t.reshape(-1)
        n = max(flat_t.size, 1)
        loss = float(-flat_logp[np.arange(flat_t.size), flat_t].sum() / n)
        dz = np.exp(flat_logp)                         # softmax
        dz[np.arange(flat_t.size), flat_t] -= 1.0
        dz /= n
        flat_h = h.reshape(-1, self.hidden_size)
        grads = {"weight": (dz.T @ flat_h).astype(self.dtype)}
        if self.bias:
            grads["bias"] = dz.sum(axis=0).astype(self.dtype)
        dh = (dz @ self._params["weight"]).reshape(h.shape).astype(self.dtype)
        return loss, dh, grads
