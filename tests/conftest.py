"""Shared fixtures for the test suite (kept generic: several test modules use them)."""

from __future__ import annotations

import numpy as np
import pytest

import rnn_gpu as rg
import rnn_gpu.backends.cupy as cb
from rnn_gpu.kernels.cuda import graphs as cgraphs


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A freshly seeded generator per test; the seed is printed so a failure can be replayed
    (``np.random.default_rng(seed)``)."""
    seed = np.random.SeedSequence().entropy
    print(f"{request.node.nodeid}: rng seed {seed}")
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------- cupy (test_cupy_*.py)

@pytest.fixture
def registered():
    """The cupy backend in the registry (through its entry point, or registered here)."""
    added = "cupy" not in rg.backends.names()
    if added:
        rg.backends.register(cb.CupyBackend)
    yield rg.backends.get("cupy")
    if added:
        rg.backends.unregister("cupy")


@pytest.fixture
def force_path():
    names = ("FORCE_PATH", "FORCE_BACKWARD_PATH", "MMA_ROW_GROUPS", "MMA_WARP_TILES",
             "MMA_BWD_CHUNK_BYTES")
    saved = {name: getattr(cb, name) for name in names}
    yield
    for name, value in saved.items():
        setattr(cb, name, value)


@pytest.fixture
def fresh_workspaces(monkeypatch):
    monkeypatch.setattr(cgraphs, "workspaces", cgraphs.WorkspaceCache())


# ------------------------------------------------------------------ triton (test_triton_*.py)

@pytest.fixture
def launches_of_two(monkeypatch):
    """The grid barrier's counter bounded at 2 (kernels/triton/__init__.py: MAX_BARRIER_COUNT),
    so that every sequence is cut into launches as one of ~16 million steps would be. Yields
    the list of each call's ``(first iteration, count)`` launches, appended as they happen."""
    import rnn_gpu.kernels.triton as kt
    from rnn_gpu.kernels.triton import gated, twostage

    monkeypatch.setattr(kt, "MAX_BARRIER_COUNT", 2)
    seen = []

    def spy(*args):
        seen.append(kt.launch_spans(*args))
        return seen[-1]

    monkeypatch.setattr(gated, "launch_spans", spy)
    monkeypatch.setattr(twostage, "launch_spans", spy)
    return seen
