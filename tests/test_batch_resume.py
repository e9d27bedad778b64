"""A run killed midway (SIGKILL: no clean-up at all; SIGINT: Ctrl-C) and rerun with the same
arguments ends with exactly the output of an uninterrupted run, each chunk written once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import rnn_gpu as rg

N, T, I, H = 2000, 20, 4, 8
CHUNK, BATCH = 100, 50                 # 20 chunks of 2 batches

# The interrupted run goes through a backend that sleeps a little per batch, so that there is
# a "midway" to kill it in; its arithmetic is the NumPy backend's, so the outputs are
# bit-for-bit those of the plain runs. Where the job runs is not part of the job, so the rerun
# may resume it with the default backend.
SLOW_RUN = """
import signal, sys, time
# Ctrl-C as from a terminal: a child inherits its parent's signal mask and ignored signals, and
# in full test runs something in the pytest process left SIGINT blocked or ignored (the run
# then finished with status 0 after being signalled, in 3 of 4 full runs)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
signal.signal(signal.SIGINT, signal.default_int_handler)
import rnn_gpu as rg
from rnn_gpu.backends.numpy import NumpyBackend
from rnn_gpu.cli import main

class Slow(NumpyBackend):
    name = "test_slow"
    def forward_layer(self, *args, **kwargs):
        time.sleep(0.15)       # 40 batches: >= 6 s to interrupt it in, even on a busy CI box
                               # (0.06 s left a 2 s window, missed in 2 of 3 full CI runs)
        return super().forward_layer(*args, **kwargs)

rg.backends.register(Slow)
sys.exit(main(sys.argv[1:]))
"""


def cli(*args):
    return [sys.executable, "-m", "rnn_gpu.cli", "run", *map(str, args)]


@pytest.fixture
def job(tmp_path):
    rg.save(rg.RNN(I, H, seed=1), tmp_path / "model.safetensors")
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.standard_normal((N, T, I)).astype("float32"))
    np.save(tmp_path / "x.lengths.npy", rng.integers(0, T + 1, N))
    return tmp_path


def done_chunks(manifest) -> int:
    try:
        data = json.loads(manifest.read_text())
    except (FileNotFoundError, ValueError):
        return 0
    return sum(b - a for a, b in data["done"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(job, sig):
    args = [job / "model.safetensors", job / "x.npy", job / "out.npy", "--emit", "sequence",
            "--batch-size", BATCH, "--chunk-size", CHUNK]
    manifest = job / "out.npy.manifest.json"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, "run", *map(str, args),
                             "--backend", "test_slow", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while done_chunks(manifest) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    signalled_at = done_chunks(manifest)
    parent = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, (f"the run finished before it could be interrupted ({signalled_at}"
                                  f" chunks done when signalled; this process's SIGINT handler "
                                  f"and blocked signals: {parent}); stderr: {err[-400:]}")
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun the same command to resume" in err
        assert "Traceback" not in err
    before = done_chunks(manifest)
    assert 3 <= before < N // CHUNK

    resumed = subprocess.run(cli(*args, "--quiet"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["chunks_skipped"] == before                         # none done twice
    assert summary["chunks_written"] == N // CHUNK - before            # none left out
    assert summary["computed"] == N - before * CHUNK
    assert not list(job.glob("*.tmp-*"))                               # stale temporaries gone

    straight = subprocess.run(cli(*args[:2], job / "ref.npy", *args[3:], "--quiet"),
                              capture_output=True, text=True, timeout=120)
    assert straight.returncode == 0, straight.stderr
    np.testing.assert_array_equal(np.load(job / "out.npy"), np.load(job / "ref.npy"))


# Ctrl-C while a module loads inside main: the process signals itself when the import starts
CTRL_C_DURING_IMPORT = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])     # as SLOW_RUN above
signal.signal(signal.SIGINT, signal.default_int_handler)
from rnn_gpu.cli import main

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module, message", [
    ("rnn_gpu.bench.cases", "rnn-gpu: interrupted before the command started"),   # the parser
    ("rnn_gpu.batch.run", "rnn-gpu run: interrupted"),          # the runner's own modules
])
def test_ctrl_c_while_the_command_loads_is_a_clean_interruption(job, module, message):
    """Ctrl-C in the first few tenths of a second (the parser lists the backends' plugins, run
    imports its modules) printed a traceback instead of the runner's message and status 130."""
    args = [job / "model.safetensors", job / "x.npy", job / "out.npy", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", CTRL_C_DURING_IMPORT, module, "run",
                           *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (job / "out.npy").exists()
