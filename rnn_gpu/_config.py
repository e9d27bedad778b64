"""Process-wide switches."""

from __future__ import annotations

_TF32 = False


def allow_tf32(enabled: bool = True) -> None:
    """Let GPU backends use TF32 tensor cores for float32 (off by default: float32 means IEEE
    float32). ``rnn_gpu.torch`` layers follow ``torch.backends.cudnn.allow_tf32`` instead."""
    global _TF32
    _TF32 = bool(enabled)


def tf32_allowed() -> bool:
    return _TF32
