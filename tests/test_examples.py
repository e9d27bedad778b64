"""The seed's example trains TwoStageRNN + Readout and predicts all six targets."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seed_sequence.py"
TARGETS = [0, 1, 1, 0, 1, 0]


@pytest.mark.parametrize("seed", [0, 7])
def test_seed_example_predicts_all_six_targets(seed):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--seed", str(seed)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    predictions = next(line for line in lines if line.startswith("predictions"))
    assert ast.literal_eval(predictions.split(maxsplit=1)[1]) == TARGETS
    losses = [float(line.split("loss")[1]) for line in lines if line.startswith("epoch")]
    assert losses[-1] < losses[0] / 10, f"loss did not fall: {losses}"


def test_seed_example_fails_loudly_when_untrained():
    """The exit code reflects the predictions: with no training it cannot be all correct
    for every seed, so the check above is able to fail."""
    codes = {subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "1", "--lr", "0",
                             "--seed", str(s)], capture_output=True, timeout=300).returncode
             for s in range(4)}
    assert 1 in codes


BATCH_EXAMPLE = EXAMPLE.parent / "make_batch_example.py"


def test_batch_example_runs_through_rnn_gpu_run(tmp_path):
    """The README's main job: the example writes a model with a Readout and a dataset with
    lengths; `rnn-gpu run --emit probs` turns it into class probabilities, one row each."""
    folder = tmp_path / "example_job"
    made = subprocess.run([sys.executable, str(BATCH_EXAMPLE), str(folder), "--sequences",
                           "600", "--steps", "30"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    proc = subprocess.run([sys.executable, "-m", "rnn_gpu.cli", "run",
                           str(folder / "model.safetensors"), str(folder / "inputs.npy"),
                           str(folder / "out.npy"), "--lengths", str(folder / "lengths.npy"),
                           "--emit", "probs"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["sequences"] == summary["computed"] == 600
    assert "seq/s" in proc.stderr                                      # the progress bar
    probs, lengths = np.load(folder / "out.npy"), np.load(folder / "lengths.npy")
    assert probs.shape == (600, 30, 4)
    valid = np.arange(30)[None, :] < lengths[:, None]
    np.testing.assert_allclose(probs[valid].sum(-1), 1.0, rtol=1e-5)   # distributions
    assert not probs[~valid].any()                                     # padding stays zero
