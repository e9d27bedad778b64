"""The seed document's example: a TwoStageRNN + softmax Readout learns a toy sequence.

    inputs  x = [0, 1, 0, 1, 1, 0]
    targets y = [0, 1, 1, 0, 1, 0]

Each input bit is fed one-hot; at every step the model predicts the target bit. Trained with
plain SGD on full-sequence BPTT, on the NumPy backend, so it runs anywhere:

    python examples/seed_sequence.py [--epochs 300] [--lr 0.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import rnn_gpu as rg

INPUTS = [0, 1, 0, 1, 1, 0]
TARGETS = [0, 1, 1, 0, 1, 0]


def train(epochs: int = 300, lr: float = 0.5, hidden: int = 8, seed: int = 0,
          log_every: int = 50, log=print):
    """Train and return ``(final_loss, predictions)``."""
    x = np.eye(2, dtype=np.float32)[INPUTS][:, None, :]       # (T=6, B=1, I=2), one-hot
    targets = np.array(TARGETS)[:, None]                      # (T, B)
    rnn = rg.TwoStageRNN(2, hidden, f="tanh", g="tanh", seed=seed)
    readout = rg.Readout(hidden, 2, seed=seed + 1)
    loss = float("nan")
    for epoch in range(1, epochs + 1):
        h, _, tape = rnn.forward(x, backend="numpy")
        loss, dh, readout_grads = readout.loss_and_grads(h, targets)
        _, _, grads = rnn.backward(tape, dh)
        for params, g in ((rnn.parameters(), grads), (readout.parameters(), readout_grads)):
            for name, p in params.items():
                p -= lr * g[name]                              # SGD, in place
        if log and (epoch % log_every == 0 or epoch == 1):
            log(f"epoch {epoch:4d}  loss {loss:.4f}")
    h, _ = rnn(x, backend="numpy")
    predictions = readout(h)[:, 0, :].argmax(axis=-1).tolist()
    return loss, predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    loss, predictions = train(args.epochs, args.lr, args.hidden, args.seed)
    print(f"inputs      {INPUTS}")
    print(f"targets     {TARGETS}")
    print(f"predictions {predictions}")
    correct = sum(p == t for p, t in zip(predictions, TARGETS))
    print(f"final loss {loss:.4f}; {correct}/{len(TARGETS)} targets predicted")
    return 0 if correct == len(TARGETS) else 1


if __name__ == "__main__":
    sys.exit(main())
