"""Warnings attributed to the user's line: the first frame outside rnn_gpu (and torch).

A fixed ``stacklevel`` is right for one call path only: the dropout warning of
``rg.LSTM(..., dropout=0.5)`` pointed past the user's line (``sys:1``), a plugin's load
warning into registry.py or layers.py, depending on which path loaded it first.
"""

from __future__ import annotations

import os
import sys
import warnings


def _library_dirs() -> tuple[str, ...]:
    """The directories whose frames are rnn_gpu's own, each ending in a separator (so that a
    plugin module beside the package, ``rnn_gpu_example_plugin.py``, is not one of them).
    ``rnn_gpu.backends`` and ``rnn_gpu.kernels`` live outside the package directory (see
    pyproject's package-dir); torch's frames stand between a drop-in's caller and the
    library (``Module.__call__``, ``Function.apply``) and are skipped as well."""
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    for name in ("rnn_gpu.backends", "rnn_gpu.kernels", "torch"):
        module = sys.modules.get(name)        # a module never imported has no frame to skip
        dirs += [os.path.abspath(p) for p in getattr(module, "__path__", None) or ()]
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` at the first frame outside rnn_gpu and torch. Python 3.12's
    ``skip_file_prefixes`` does that walk; before it, the same walk by hand."""
    prefixes = _library_dirs()
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=prefixes)
        return
    frame, level = sys._getframe(1), 2          # level 2: warn's caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(prefixes):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
