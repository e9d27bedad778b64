"""What is measured: one :class:`Case` per cell x shape x dtype x device x pass.

* The CPU set is the NumPy backend's acceptance set: LSTM/GRU/RNN (and TwoStageRNN for
  information) at three shapes, float32. It finishes in minutes on a 2-core machine.
* The GPU set is DESIGN §5's large batched sequences (up to B = 16384), where the cuDNN numbers
  were measured, plus one long sequence (T = 4096), in float32, float16 and bfloat16.
* The quick sets are small shapes for smoke runs (CI, ``--quick``).

``pass_`` is ``"forward"`` (inference) or ``"train"`` (forward, then backward of a loss on
every output and the final state: what a training step costs).

``lengths`` is ``""`` (every sequence runs all T steps) or ``"uniform"``: B lengths drawn
uniformly from 1..T (seeded, in no order: as a user's batch comes), which every runner gets as
``lengths`` (torch.nn as a packed sequence, ``enforce_sorted=False``). Tokens and flops then
count the valid steps only, the work the problem asks for: a runner that computes the padding
too shows a lower rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

CELLS = ("LSTM", "GRU", "RNN", "TwoStageRNN")
CPU_SHAPES = ((128, 256, 128), (64, 1024, 256), (256, 32, 512))      # (T, B, H), I = H
# asv's CPU set: the same three regimes (mid batch, large batch, small batch with large H) at
# 1/4-1/8 of the work (T*B), because asv starts one process per benchmark and parameter set (144
# on the CPU): at the acceptance shapes a quick pass took 16 min on 2 cores (0.7 s per LSTM
# 64x1024x256 call), at these about 5.
ASV_CPU_SHAPES = ((64, 128, 128), (32, 256, 256), (64, 16, 512))
QUICK_SHAPES = ((32, 64, 64), (16, 256, 32))    # seconds, not minutes: a smoke run
GPU_SHAPES = ((256, 4096, 256), (256, 1024, 512), (512, 64, 1024), (128, 16384, 128))
LONG_SHAPE = (4096, 64, 256)        # T >= 4096: the sequential path dominates, launches add up
GPU_QUICK_SHAPES = ((64, 256, 128), (32, 64, 256))
CPU_DTYPES = ("float32",)
GPU_DTYPES = ("float32", "float16", "bfloat16")
PASSES = ("forward", "train")
LENGTHS = ("full", "uniform")       # --lengths; "full" is the case's lengths ""


@dataclass(frozen=True)
class Case:
    """One benchmark problem: a one-layer, one-direction ``cell`` on x of shape (T, B, I)."""

    cell: str
    T: int
    B: int
    I: int                 # noqa: E741 (the conventional name)
    H: int
    dtype: str = "float32"
    device: str = "cpu"
    pass_: str = "forward"  # "forward", or "train" (forward + backward)
    P: int = 0             # LSTM proj_size (0: no projection)
    # The dtype the inputs (weights, x, the train pass's dy) are rounded to, when it is not
    # ``dtype``: a half-precision case's float32 oracle (:meth:`float32_oracle`).
    inputs_dtype: str = ""
    lengths: str = ""      # "" (all T) or "uniform" (see the module docstring)

    @property
    def shape(self) -> str:
        """``T×B×H`` when I = H (the usual case), else ``T×B×I×H``; `` P=n`` with a projection,
        `` len=uniform`` with lengths."""
        dims = (self.T, self.B, self.H) if self.I == self.H else (self.T, self.B, self.I, self.H)
        return ("×".join(map(str, dims)) + (f" P={self.P}" if self.P else "")
                + (f" len={self.lengths}" if self.lengths else ""))

    def layer_options(self) -> dict:
        """Constructor options beyond (I, H) for our layers and torch.nn's alike."""
        return {"proj_size": self.P} if self.P else {}

    @property
    def out_size(self) -> int:
        """The width of y and h: P with a projection, else H."""
        return self.P or self.H

    @property
    def tokens(self) -> int:
        """The valid (time step, sequence) pairs: T x B, or the sum of the lengths."""
        lengths = case_lengths(self)
        return self.T * self.B if lengths is None else int(lengths.sum())

    def label(self) -> str:
        return f"{self.cell} {self.shape} {self.dtype} {self.pass_} on {self.device}"

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def half(self) -> bool:
        return self.dtype in HALF_DTYPES

    def float32_oracle(self) -> Case:
        """The same problem in float32 on the inputs rounded to this case's half dtype: what
        a half-precision runner is checked against (DESIGN §6's relative RMS), instead of the
        peer in the same half dtype, which rounds its state and sums its weight gradients in
        that dtype and so is no oracle (TwoStageRNN's bf16 torch loop was 5.2e-2 off ours at
        256x4096x256, run 7)."""
        return replace(self, dtype="float32", inputs_dtype=self.dtype) if self.half else self


HALF_DTYPES = ("float16", "bfloat16")
LENGTHS_SEED = 3


def case_lengths(case: Case) -> np.ndarray | None:
    """The case's sequence lengths (int64, B of them), or None when every sequence runs all T
    steps. ``"uniform"``: each drawn uniformly from 1..T, seeded, the same for every runner."""
    if not case.lengths:
        return None
    if case.lengths != "uniform":
        raise ValueError(f"lengths: expected one of {', '.join(LENGTHS)}, got {case.lengths!r}")
    return np.random.default_rng(LENGTHS_SEED).integers(1, case.T + 1, size=case.B,
                                                         dtype=np.int64)


def round_inputs(a, case: Case):
    """``a`` (float32 NumPy array or torch tensor) rounded to ``case.inputs_dtype`` and back,
    so that the oracle sees exactly the values a half-precision runner gets by its cast; ``a``
    itself when the case has no ``inputs_dtype``."""
    if not case.inputs_dtype:
        return a
    if isinstance(a, np.ndarray):
        if case.inputs_dtype == "bfloat16":     # NumPy has no bfloat16: round the bits, to
            bits = a.astype(np.float32).view(np.uint32)      # nearest, ties to even
            bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(
                0xFFFF0000)
            return bits.view(np.float32)
        return a.astype(case.inputs_dtype).astype(np.float32)
    import torch

    return a.to(getattr(torch, case.inputs_dtype)).to(torch.float32)


def parse_cell(name: str) -> str:
    """``lstm`` / ``LSTM`` / ``twostage`` -> the canonical layer name."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    for cell in CELLS:
        if key in (cell.lower(), cell.lower().removesuffix("rnn")) and key:
            return cell
    raise ValueError(f"cell: expected one of {', '.join(CELLS)}, got {name!r}")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``TxBxH`` (I = H) or ``TxBxIxH`` -> (T, B, I, H); ``x``, ``X`` and ``×`` all separate."""
    parts = [p for p in re.split(r"[x×X,]", text.strip()) if p]
    if len(parts) not in (3, 4) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape: expected TxBxH or TxBxIxH with positive integers, got {text!r}")
    dims = [int(p) for p in parts]
    if len(dims) == 3:
        T, B, H = dims
        return T, B, H, H
    T, B, I, H = dims
    return T, B, I, H


def _cases(cells, shapes, dtypes, device="cpu", passes=("forward",),
           proj_size: int = 0, lengths: str = "full") -> list[Case]:
    """Every combination; with ``proj_size``, LSTM only, and a shape whose H is not above it
    is a ValueError naming both. ``lengths``: one of :data:`LENGTHS`."""
    if lengths not in LENGTHS:
        raise ValueError(f"lengths: expected one of {', '.join(LENGTHS)}, got {lengths!r}")
    if proj_size and any(cell != "LSTM" for cell in cells):
        raise ValueError(f"proj-size: only LSTM has a projection, got cells {', '.join(cells)}")
    out = []
    for pass_ in passes:
        for cell in cells:
            for shape in shapes:
                T, B, I, H = shape if len(shape) == 4 else (*shape[:2], shape[2], shape[2])
                if proj_size >= H:
                    raise ValueError(f"proj-size: expected less than the hidden size of "
                                     f"every shape, got {proj_size} for H={H}")
                for dtype in dtypes:
                    out.append(Case(cell, T, B, I, H, dtype, device, pass_, proj_size,
                                    lengths="" if lengths == "full" else lengths))
    return out


def cpu_cases(cells=None, shapes=None, dtypes=CPU_DTYPES, passes=("forward",),
              proj_size: int = 0, lengths: str = "full") -> list[Case]:
    """The CPU acceptance set plus TwoStageRNN for information (or the filtered subset)."""
    return _cases(cells or _cells(proj_size), shapes or CPU_SHAPES, dtypes, "cpu", passes,
                  proj_size, lengths)


def gpu_cases(cells=None, shapes=None, dtypes=GPU_DTYPES, passes=PASSES,
              device="cuda", proj_size: int = 0, lengths: str = "full") -> list[Case]:
    """DESIGN §5's shapes and the long sequence, every GPU dtype, forward and train."""
    return _cases(cells or _cells(proj_size), shapes or (*GPU_SHAPES, LONG_SHAPE), dtypes,
                  device, passes, proj_size, lengths)


def quick_cases(cells=None, shapes=None, dtypes=CPU_DTYPES, passes=("forward",),
                device="cpu", proj_size: int = 0, lengths: str = "full") -> list[Case]:
    """Small shapes for a smoke run (``rnn-gpu bench --quick``)."""
    default = GPU_QUICK_SHAPES if device.startswith("cuda") else QUICK_SHAPES
    return _cases(cells or _cells(proj_size), shapes or default, dtypes, device, passes,
                  proj_size, lengths)


def _cells(proj_size: int) -> tuple[str, ...]:
    """The default cells: all of them, or LSTM alone with a projection."""
    return ("LSTM",) if proj_size else CELLS
