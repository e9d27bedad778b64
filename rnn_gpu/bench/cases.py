"""What is measured: one :class:`Case` per cell x shape x dtype (x device, x pass).

The CPU set is the NumPy backend's acceptance set (LSTM/GRU/RNN at the three shapes below,
float32, forward). GPU sets (DESIGN §5's shapes, fp16/bf16, forward+backward) are added here
when the GPU backends arrive; nothing else needs to change for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CELLS = ("LSTM", "GRU", "RNN", "TwoStageRNN")
CPU_CELLS = ("LSTM", "GRU", "RNN")              # the acceptance set; TwoStageRNN is informative
CPU_SHAPES = ((128, 256, 128), (64, 1024, 256), (256, 32, 512))      # (T, B, H), I = H
QUICK_SHAPES = ((32, 64, 64), (16, 256, 32))    # seconds, not minutes: a smoke run


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
    pass_: str = "forward"  # "forward"; "train" (forward + backward) comes with the GPU work

    @property
    def shape(self) -> str:
        """``T×B×H`` when I = H (the usual case), else ``T×B×I×H``."""
        dims = (self.T, self.B, self.H) if self.I == self.H else (self.T, self.B, self.I, self.H)
        return "×".join(map(str, dims))

    @property
    def tokens(self) -> int:
        return self.T * self.B

    def label(self) -> str:
        return f"{self.cell} {self.shape} {self.dtype} {self.pass_} on {self.device}"


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


def _cases(cells, shapes, dtypes) -> list[Case]:
    out = []
    for cell in cells:
        for shape in shapes:
            T, B, I, H = shape if len(shape) == 4 else (shape[0], shape[1], shape[2], shape[2])
            for dtype in dtypes:
                out.append(Case(cell, T, B, I, H, dtype))
    return out


def cpu_cases(cells=None, shapes=None, dtypes=("float32",)) -> list[Case]:
    """The CPU acceptance set plus TwoStageRNN for information (or the filtered subset)."""
    return _cases(cells or CELLS, shapes or CPU_SHAPES, dtypes)


def quick_cases(cells=None, shapes=None, dtypes=("float32",)) -> list[Case]:
    """Small shapes for a smoke run (``rnn-gpu bench --quick``)."""
    return _cases(cells or CELLS, shapes or QUICK_SHAPES, dtypes)
