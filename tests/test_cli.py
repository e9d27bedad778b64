"""The ``rnn-gpu`` command in a shell pipeline."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_closed_pipe_on_stdout_is_no_traceback():
    """``rnn-gpu info | head -3``: the reader leaves before the command has written all."""
    read, write = os.pipe()
    os.close(read)                                   # every write to stdout: EPIPE
    try:
        done = subprocess.run([sys.executable, "-c",
                               "import sys; from rnn_gpu.cli import main; sys.exit(main())",
                               "info"], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
