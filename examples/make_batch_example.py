"""Write a small batch job for ``rnn-gpu run`` into a folder: a model and a dataset.

    python3 examples/make_batch_example.py example_job
    rnn-gpu run example_job/model.safetensors example_job/inputs.npy example_job/out.npy \\
        --lengths example_job/lengths.npy --emit probs

The folder gets
  model.safetensors  a seeded TwoStageRNN (the seed document's cell) with a Readout attached,
                     written by rnn_gpu.save (untrained: the point is the pipeline, not the
                     predictions)
  inputs.npy         N random sequences, sequence-major (N, T, I), float32
  lengths.npy        N lengths in [1, T], so batches are padded and bucketed
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import sys

import numpy as np

import rnn_gpu as rg


def make_job(folder: str, *, sequences: int = 4096, steps: int = 100, input_size: int = 16,
             hidden_size: int = 32, classes: int = 4, seed: int = 0) -> None:
    os.makedirs(folder, exist_ok=True)
    model = rg.TwoStageRNN(input_size, hidden_size, seed=seed)
    model.readout = rg.Readout(hidden_size, classes, seed=seed + 1)
    with _replaced_if_changed(os.path.join(folder, "model.safetensors")) as tmp:
        rg.save(model, tmp)
    rng = np.random.default_rng(seed)
    with _replaced_if_changed(os.path.join(folder, "inputs.npy")) as tmp:
        # written in slices through a memory map, so that a large example needs little memory
        inputs = np.lib.format.open_memmap(tmp, mode="w+", dtype="float32",
                                           shape=(sequences, steps, input_size))
        for start in range(0, sequences, 1024):
            stop = min(sequences, start + 1024)
            inputs[start:stop] = rng.standard_normal((stop - start, steps, input_size))
        inputs.flush()
        del inputs
    with _replaced_if_changed(os.path.join(folder, "lengths.npy")) as tmp:
        np.save(tmp, rng.integers(1, steps + 1, size=sequences))


@contextlib.contextmanager
def _replaced_if_changed(path: str):
    """Write to a temporary file; keep the existing ``path`` when the bytes are the same.

    Rerunning the example then leaves its files untouched (same modification times), so that
    ``rnn-gpu run`` recognises the job it already did instead of calling it a new one.
    """
    tmp = path + ".new.npy" if path.endswith(".npy") else path + ".new"
    try:
        yield tmp
        if os.path.exists(path) and filecmp.cmp(tmp, path, shallow=False):
            os.remove(tmp)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the job (created if missing)")
    parser.add_argument("--sequences", type=int, default=4096, help="N (default 4096)")
    parser.add_argument("--steps", type=int, default=100, help="T (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_job(args.folder, sequences=args.sequences, steps=args.steps, seed=args.seed)
    print(f"wrote {args.folder}/model.safetensors, inputs.npy ({args.sequences} x {args.steps}"
          f" x 16), lengths.npy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
