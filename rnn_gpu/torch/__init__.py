"""torch.nn.Module drop-ins: ``LSTM``, ``GRU``, ``RNN`` and ``TwoStageRNN`` (DESIGN §3).

    from rnn_gpu.torch import LSTM
    m = LSTM(32, 64, num_layers=2, batch_first=True, backend=None)   # torch.nn.LSTM's signature
    m.load_state_dict(torch_lstm.state_dict())                         # same keys and shapes
    y, (h, c) = m(x)                                                   # autograd works

Needs torch (``pip install 'rnn-gpu[torch]'``).
"""

from .function import RecurrentFunction
from .modules import GRU, LSTM, RNN, TwoStageRNN

__all__ = ["GRU", "LSTM", "RNN", "RecurrentFunction", "TwoStageRNN"]
