"""Imported first by ``rnn_gpu/__init__.py``: run from a source checkout, rnn_gpu takes that
checkout's ``backends/`` and ``kernels/``.

They sit at the top of the checkout and are mapped into the package as ``rnn_gpu.backends`` and
``rnn_gpu.kernels`` only by an install (setuptools' package-dir). Imported from a checkout (its
root first on sys.path: ``python -m pytest`` or ``python -c`` there), rnn_gpu found no backends
under a regular install (an ImportError about a circular import), and under an editable install
of another checkout took that one's backends and kernels, next to this checkout's layers,
silently. The checkout's own are put on the package's search path, as an install maps them.
"""

from __future__ import annotations

import os
import sys


def _map_checkout() -> None:
    package = sys.modules[__package__]
    here = os.path.dirname(os.path.abspath(package.__file__))
    root = os.path.dirname(here)
    if (not os.path.isdir(os.path.join(here, "backends"))           # installed: nothing to do
            and os.path.isfile(os.path.join(root, "pyproject.toml"))
            and all(os.path.isfile(os.path.join(root, sub, "__init__.py"))
                    for sub in ("backends", "kernels"))
            and root not in package.__path__):
        package.__path__.append(root)


_map_checkout()
