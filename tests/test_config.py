"""The float32 precision switches (DESIGN §3): IEEE by default, TF32 only when allowed, tf32x3
when chosen; the torch drop-ins' per-call TF32 scope wins over the process setting."""

from __future__ import annotations

import pytest

import rnn_gpu as rg
from rnn_gpu import _config


@pytest.fixture(autouse=True)
def restore():
    yield
    rg.set_float32_precision("ieee")


def test_default_is_ieee():
    assert rg.float32_precision() == "ieee" and not rg.tf32_allowed()


def test_tf32x3_is_kept_apart_from_tf32():
    rg.set_float32_precision("tf32x3")
    assert rg.float32_precision() == "tf32x3" and not rg.tf32_allowed()
    rg.allow_tf32(True)                       # TF32 allowed: the faster, coarser one wins
    assert rg.float32_precision() == "tf32"
    rg.allow_tf32(False)                      # back to the chosen precision, not to IEEE
    assert rg.float32_precision() == "tf32x3"


def test_tf32_by_name_is_allow_tf32():
    rg.set_float32_precision("tf32")
    assert rg.tf32_allowed() and rg.float32_precision() == "tf32"
    rg.set_float32_precision("ieee")
    assert not rg.tf32_allowed() and rg.float32_precision() == "ieee"


@pytest.mark.parametrize("allowed,expected", [(True, "tf32"), (False, "tf32x3")])
def test_the_torch_layers_scope_decides_tf32(allowed, expected):
    rg.set_float32_precision("tf32x3")
    with _config.tf32_scope(allowed):
        assert rg.float32_precision() == expected


@pytest.mark.parametrize("bad", ["fp32", "TF32X3", "", None])
def test_unknown_precision_is_named(bad):
    with pytest.raises(ValueError, match=r"precision: expected one of ieee, tf32x3, tf32, got"):
        rg.set_float32_precision(bad)
    assert rg.float32_precision() == "ieee"
