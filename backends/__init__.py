"""Backends of rnn_gpu, one module each, and the registry API (DESIGN §4).

    rg.backends.names()     registered names
    rg.backends.report()    one row per backend: name, available, reason, priority, distribution
    rg.backends.get(name)
    rg.backends.register(factory, *, override=False)

Built-in backends are registered through the ``rnn_gpu.backends`` entry-point group, like any
third-party plugin; write a plugin by subclassing :class:`Backend`.
"""

from rnn_gpu.backend_api import Backend, Problem, SegmentCosts, Tape
from rnn_gpu.registry import (
    BackendError,
    format_report,
    get,
    names,
    register,
    report,
    select,
    unregister,
)

__all__ = ["Backend", "BackendError", "Problem", "SegmentCosts", "Tape", "format_report", "get",
           "names", "register", "report", "select", "unregister"]
