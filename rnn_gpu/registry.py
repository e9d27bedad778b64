"""Backend registry and selection (DESIGN §4).

Backends arrive through the entry-point group ``rnn_gpu.backends`` (the built-in ones too) or
through :func:`register`. Entry points are loaded lazily, once, on the first question asked of
the registry; a plugin that fails to load gives a warning naming it and is left out.

Selection, first that applies: the call's ``backend=``, then :func:`use_backend`, then the
``RNN_GPU_BACKEND`` environment variable, then auto (highest priority that is available and
serves the problem). An explicit choice that cannot serve the call raises; it never falls back.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any

from ._warnings import warn as _warn
from .backend_api import Backend, Problem

ENTRY_POINT_GROUP = "rnn_gpu.backends"
ENV_VAR = "RNN_GPU_BACKEND"


class BackendError(RuntimeError):
    """No backend can serve a call, or the chosen one cannot."""


_backends: dict[str, Backend] = {}
# name -> where the backend came from, for report(): "DIST VERSION" of the distribution whose
# entry point it is, or "register() in MODULE" for one registered in code (which of several
# installed plugins, or which version, serves a call is otherwise not visible)
_sources: dict[str, str] = {}
_plugins_loaded = False
_lock = threading.RLock()
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rnn_gpu_backend", default=None
)


ARRAY_KINDS = ("numpy", "torch", "cupy")
DISTRIBUTION = "rnn-gpu"        # whose entry points are the built-in backends


def _instantiate(factory: Callable[[], Any], origin: str) -> Backend:
    """The backend ``factory`` returns, checked for what the registry and the layers read
    from it: a broken plugin fails here, by name, not in every later call."""
    backend = factory()
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{origin} returned {backend!r}, which has no string attribute 'name'")
    for method in ("forward", "backward", "not_supported_reasons", "unavailable_reason"):
        if not callable(getattr(backend, method, None)):
            raise TypeError(f"{origin} returned backend {name!r} without a {method}() method")
    priority = getattr(backend, "priority", 0)
    if (isinstance(priority, bool) or not isinstance(priority, (int, float))
            or priority != priority or priority in (float("inf"), float("-inf"))):
        raise TypeError(f"{origin} returned backend {name!r} with priority {priority!r}; "
                        "expected a finite number (auto selection takes the highest)")
    kind = getattr(backend, "array_kind", "numpy")
    if kind not in ARRAY_KINDS:
        raise TypeError(f"{origin} returned backend {name!r} with array_kind {kind!r}; "
                        f"expected one of {list(ARRAY_KINDS)}")
    return backend


def _is_builtin(ep: Any) -> bool:
    dist = getattr(ep, "dist", None)
    name = (dist.metadata["Name"] or "") if dist is not None else ""
    return re.sub(r"[-_.]+", "-", name).lower() == DISTRIBUTION      # PEP 503's normal form


def _load_plugins() -> None:
    global _plugins_loaded
    with _lock:
        if _plugins_loaded:
            return
        _plugins_loaded = True
        # The built-in backends first, then the plugins by entry-point name: a plugin that
        # names its backend "numpy" is refused whatever its entry point is called (replacing
        # a backend on purpose is register(..., override=True)).
        found = sorted(entry_points(group=ENTRY_POINT_GROUP),
                       key=lambda e: (not _is_builtin(e), e.name))
        origins: dict[str, str] = {}
        for ep in found:
            dist = getattr(ep, "dist", None)
            source = f", from {dist.metadata['Name']}" if dist is not None else ""
            origin = f"backend plugin {ep.name!r} ({ep.value}{source})"
            # ep.dist is None where the finder gives no distribution (some importers)
            installed = (f"{dist.metadata['Name']} {dist.version}" if dist is not None
                         else f"entry point {ep.value}")
            try:
                backend = _instantiate(ep.load(), origin)
            except Exception as exc:  # a broken plugin must never break the library
                _warn(f"rnn_gpu: {origin} failed to load: {type(exc).__name__}: {exc}")
                continue
            if backend.name in _backends:
                _warn(f"rnn_gpu: {origin} is named {backend.name!r}, which "
                      f"{origins[backend.name]} already registered; ignoring it")
                continue
            _backends[backend.name] = backend
            _sources[backend.name] = installed
            origins[backend.name] = origin


def register(factory: Callable[[], Any], *, override: bool = False) -> Backend:
    """Register a backend. ``factory`` is a zero-argument callable (a backend class is one).

    Returns the instance. Registering a name twice raises unless ``override=True``.
    """
    if not callable(factory):
        raise TypeError(f"factory: expected a zero-argument callable, got {factory!r}")
    _load_plugins()
    backend = _instantiate(factory, f"factory {factory!r}")
    with _lock:
        if backend.name in _backends and not override:
            raise ValueError(f"a backend named {backend.name!r} is already registered; "
                             "pass override=True to replace it")
        _backends[backend.name] = backend
        _sources[backend.name] = f"register() in {getattr(factory, '__module__', None)}"
    return backend


def unregister(name: str) -> None:
    """Remove a backend (mainly for tests and for plugins replacing themselves)."""
    _load_plugins()
    with _lock:
        _backends.pop(name, None)
        _sources.pop(name, None)


def names() -> list[str]:
    """Registered backend names, sorted."""
    _load_plugins()
    return sorted(_backends)


def get(name: str) -> Backend:
    """The registered backend called ``name``."""
    _load_plugins()
    try:
        return _backends[name]
    except KeyError:
        raise ValueError(f"backend: unknown name {name!r}; registered backends are "
                         f"{names()}") from None


def check_name(name: Any) -> None:
    """A ``backend=`` argument given ahead of any call: None or a registered name. A misspelt
    one fails where it is given, naming the registered backends, not at the first call."""
    if name is None:
        return
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name (str) or None, got {name!r}")
    get(name)


def report() -> list[dict[str, Any]]:
    """One row per backend: name, available, reason, priority, distribution (highest priority
    first). ``distribution`` is "NAME VERSION" of the installed distribution whose entry point
    the backend is ("rnn-gpu 0.1.0" for the built-in ones), or "register() in MODULE" for one
    registered in code."""
    rows = []
    for name in names():
        backend = _backends[name]
        try:
            reason = _unavailable(backend)
        except Exception as exc:
            reason = f"its unavailable_reason() raised {type(exc).__name__}: {exc}"
        rows.append({"name": name, "available": reason is None, "reason": reason or "",
                     "priority": getattr(backend, "priority", 0),
                     "distribution": _sources.get(name, "")})
    return sorted(rows, key=lambda r: _selection_order(r["name"]))


def _selection_order(name: str) -> tuple[int, str]:
    """Sort key of report()'s rows and of auto selection: highest priority first, then name."""
    return -getattr(_backends[name], "priority", 0), name


def format_report(rows: list[dict[str, Any]] | None = None) -> str:
    rows = report() if rows is None else rows
    header = ("backend", "available", "priority", "from", "reason")
    # rows from before the distribution column (a caller's own report() rows) still print
    table = [header] + [(r["name"], "yes" if r["available"] else "no", str(r["priority"]),
                         r.get("distribution") or "-", r["reason"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4]
             for row in table]
    return "\n".join(line.rstrip() for line in lines)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Within the block, calls without ``backend=`` use ``name``."""
    backend = get(name)
    token = _context_choice.set(name)
    try:
        yield backend
    finally:
        _context_choice.reset(token)


def _unavailable(backend: Backend) -> str | None:
    """``unavailable_reason()`` read one way for the table and for selection: None (or an
    empty string, or False) is available; a string is the reason; anything else is a
    broken probe, named."""
    reason = backend.unavailable_reason()
    if reason is None or reason is False or reason == "":
        return None
    if isinstance(reason, str):
        return reason
    return f"its unavailable_reason() returned {reason!r}, not None or a str"


def _declines(backend: Backend, problem: Problem) -> list[str]:
    """``not_supported_reasons(problem)`` as a list of strings. A single string is one
    reason; None or another non-list is a broken probe and declines (serving a problem the
    backend meant to decline could give wrong results)."""
    reasons = backend.not_supported_reasons(problem)
    if isinstance(reasons, str):
        return [reasons]
    if not isinstance(reasons, (list, tuple)):
        raise _BrokenProbe(f"not_supported_reasons() returned {reasons!r}; expected a list of "
                           "str ([] when the backend serves the problem)")
    return [str(r) for r in reasons]


class _BrokenProbe(TypeError):
    """A probe that returned what the contract does not allow (its message says what)."""


def _reasons(backend: Backend, problem: Problem) -> list[str]:
    """Why ``backend`` cannot serve ``problem`` (empty: it can). A probe that raises is a
    reason, with a warning: a broken plugin is passed over, never the crash of a call that
    another backend serves."""
    probe = "unavailable_reason()"
    try:
        reason = _unavailable(backend)
        if reason:
            return [reason]
        probe = "not_supported_reasons()"
        return _declines(backend, problem)
    except Exception as exc:
        detail = (str(exc) if isinstance(exc, _BrokenProbe)
                  else f"{probe} raised {type(exc).__name__}: {exc}")
        message = f"backend {getattr(backend, 'name', backend)!r}: its {detail}"
        _warn(f"rnn_gpu: {message}; passed over")
        return [message]


def select(problem: Problem, explicit: str | None = None) -> Backend:
    """Pick the backend for ``problem`` (see the module docstring for the order)."""
    choice, source = explicit, "backend="
    if choice is None:
        choice, source = _context_choice.get(), "use_backend()"
    if choice is None:
        choice, source = os.environ.get(ENV_VAR) or None, f"the environment variable {ENV_VAR}"
    if choice is not None:
        if not isinstance(choice, str):
            raise TypeError(f"backend: expected a backend name (str), got {choice!r}")
        _load_plugins()
        if choice not in _backends:
            raise ValueError(f"backend {choice!r} (chosen by {source}) is not registered; "
                             f"registered backends are {names()}")
        backend = _backends[choice]
        reasons = _reasons(backend, problem)
        if reasons:
            raise BackendError(f"backend {choice!r} (chosen by {source}) cannot serve "
                               f"{problem.describe()}: {'; '.join(reasons)}")
        return backend
    declined = []
    # report()'s order, without its rows: each backend's unavailable_reason() is read once,
    # by _reasons (report() read every backend's first, and triton's alone, two find_spec
    # calls, cost ~8 us; ~28 us of a 1x1x8x8 LSTM call went to the selection)
    for name in sorted(names(), key=_selection_order):
        backend = _backends[name]
        reasons = _reasons(backend, problem)
        if not reasons:
            return backend
        declined.append(f"  {backend.name}: {'; '.join(reasons)}")
    if not declined:
        declined.append("  (no backends are registered)")
    raise BackendError(f"no backend can serve {problem.describe()}:\n" + "\n".join(declined))
