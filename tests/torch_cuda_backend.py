"""A CUDA backend for tests only: the RNN recurrence as a plain torch loop on the GPU.

It lets the GPU path of ``rnn-gpu run`` (pinned buffers, the copy stream, out-of-memory
halving) be tested apart from the library's kernels, with an out-of-memory variant. It is slow
(a few kernels per time step) and serves only what those tests need: ``RNN`` with tanh,
inference, float32/float64, torch CUDA tensors, with lengths in both directions as in the
contract (:mod:`rnn_gpu.backend_api`).

Register it with ``rnn_gpu.backends.register(TorchCudaTestBackend)`` and unregister it after.
"""

from __future__ import annotations

import numpy as np

from rnn_gpu.backend_api import Backend, Problem


class TorchCudaTestBackend(Backend):
    name = "torch_cuda_test"
    priority = -50               # never chosen over a real backend by auto selection
    array_kind = "torch"

    def unavailable_reason(self) -> str | None:
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        return None if torch.cuda.is_available() else "no CUDA device"

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = []
        if not problem.device.startswith("cuda"):
            reasons.append(f"the {self.name} backend runs on CUDA, not {problem.device}")
        if problem.cell != "rnn" or problem.activations != ("tanh",):
            reasons.append(f"the {self.name} backend has only the tanh RNN, not "
                           f"{problem.cell}{problem.activations}")
        if problem.training:
            reasons.append(f"the {self.name} backend has no backward (inference only)")
        if problem.dtype not in ("float32", "float64"):
            reasons.append(f"the {self.name} backend computes in float32 and float64, not "
                           f"{problem.dtype}")
        return reasons

    def forward(self, problem, xw, weights, state, lengths, *, reverse, keep_tape):
        import torch

        T, B, H = xw.shape
        w_t = weights["weight_hh"].t()
        bias = weights.get("bias_hh")
        h = state[0]
        y = torch.zeros_like(xw)
        # (T, B, 1) masks, built once on the host: row b is valid at t < lengths[b]. A row past
        # its length keeps its state and outputs zero, so a reverse walk from T-1 starts each
        # row at its own end with the initial state.
        valid = (None if lengths is None else
                 torch.from_numpy(np.arange(T)[:, None] < np.asarray(lengths)[None, :])
                 .to(xw.device)[:, :, None])
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            pre = xw[t] + h @ w_t
            h_new = torch.tanh(pre if bias is None else pre + bias)
            if valid is None:
                h = h_new
                y[t] = h_new
            else:
                h = torch.where(valid[t], h_new, h)
                y[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
        return y, (h,), None

    def backward(self, tape, dy, dstate):
        raise NotImplementedError(f"the {self.name} backend is inference only")


class TorchCudaOutOfMemoryAbove(TorchCudaTestBackend):
    """Raises the real ``torch.cuda.OutOfMemoryError`` for a batch of more than ``limit``
    rows, as a GPU too small for the batch would."""

    name = "torch_cuda_test_oom"
    limit = 16

    def forward(self, problem, xw, *args, **kwargs):
        import torch

        if problem.batch > self.limit:
            raise torch.cuda.OutOfMemoryError(
                f"test: CUDA out of memory for a batch of {problem.batch} (limit {self.limit})")
        return super().forward(problem, xw, *args, **kwargs)
