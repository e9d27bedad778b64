"""Shared fixtures for the test suite (kept generic: several test modules use them)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A freshly seeded generator per test; the seed is printed so a failure can be replayed
    (``np.random.default_rng(seed)``)."""
    seed = np.random.SeedSequence().entropy
    print(f"{request.node.nodeid}: rng seed {seed}")
    return np.random.default_rng(seed)
