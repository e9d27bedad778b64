"""The two kinds of failure ``rnn-gpu run`` reports without a traceback.

Messages name the argument, what was expected and what was received, e.g.
``INPUT: expected an array of shape (N, T, 16), got shape (100, 20, 8)``.
"""

from __future__ import annotations


class UsageError(ValueError):
    """The arguments or the files they name are wrong; nothing was computed. Exit code 2."""

    exit_code = 2


class RunFailure(RuntimeError):
    """The job started but could not finish (disk full, out of memory, ...). Exit code 1.

    What was finished before is kept: a rerun of the same command resumes.
    """

    exit_code = 1
