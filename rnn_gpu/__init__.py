"""rnn_gpu: fast recurrent layers (RNN, LSTM, GRU, TwoStageRNN) with pluggable kernel backends.

    import rnn_gpu as rg
    m = rg.LSTM(32, 64)
    y, (h, c) = m(x)                      # x: NumPy array, CuPy array or torch tensor

See DESIGN §3 for the public names; ``rg.backends`` is the backend registry.
"""

from . import (
    _source_tree,  # noqa: F401  (first: a checkout's backends/ and kernels/)
    backends,
)
from ._config import allow_tf32, float32_precision, set_float32_precision, tf32_allowed
from .io import load, save
from .layers import GRU, LSTM, RNN, RecurrentLayer, TwoStageRNN
from .readout import Readout
from .registry import BackendError, use_backend

__version__ = "0.1.0"

__all__ = [
    "GRU", "LSTM", "RNN", "TwoStageRNN", "RecurrentLayer", "Readout", "BackendError",
    "allow_tf32", "tf32_allowed", "set_float32_precision", "float32_precision", "backends",
    "load", "save", "use_backend", "__version__",
]
