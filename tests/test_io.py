"""rg.save / rg.load: safetensors with the config in the metadata (no pickle), roundtrips for
every cell and option, and clear errors for every kind of bad file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import rnn_gpu as rg
from rnn_gpu.io import WeightsFileError

CONFIGS = [
    (rg.LSTM, dict()),
    (rg.LSTM, dict(num_layers=2, bidirectional=True, proj_size=2, batch_first=True)),
    (rg.LSTM, dict(bias=False, dtype="float64", dropout=0.25, num_layers=2)),
    (rg.GRU, dict(num_layers=3, bidirectional=True)),
    (rg.GRU, dict(bias=False, dtype="float64")),
    (rg.RNN, dict(nonlinearity="relu", num_layers=2)),
    (rg.RNN, dict(bidirectional=True, batch_first=True, dtype="float64")),
    (rg.TwoStageRNN, dict(f="sigmoid", g="relu", num_layers=2, bidirectional=True)),
    (rg.TwoStageRNN, dict(bias=False, dtype="float64")),
]
IDS = [f"{c.__name__}-{i}" for i, (c, _) in enumerate(CONFIGS)]


def _x(m, rng):
    shape = (2, 5, m.input_size) if m.batch_first else (5, 2, m.input_size)
    return rng.standard_normal(shape).astype(m.dtype)


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=IDS)
def test_roundtrip(cls, kwargs, tmp_path, rng):
    m = cls(3, 4, seed=int(rng.integers(2**32)), **kwargs)
    path = tmp_path / "model.safetensors"
    rg.save(m, path)
    m2 = rg.load(path)
    assert type(m2) is cls
    assert m2.config() == m.config()
    assert m2.readout is None
    assert list(m2.state_dict()) == list(m.state_dict())
    for k, v in m.state_dict().items():
        assert m2.state_dict()[k].dtype == v.dtype
        np.testing.assert_array_equal(m2.state_dict()[k], v)
    x = _x(m, rng)
    y, s = m(x)
    y2, s2 = m2(x)
    np.testing.assert_array_equal(y2, y)
    for a, b in zip(s2 if isinstance(s2, tuple) else (s2,), s if isinstance(s, tuple) else (s,)):
        np.testing.assert_array_equal(a, b)
    # str paths work as well as PathLike
    rg.save(m, str(path))
    assert rg.load(str(path)).config() == m.config()


def test_file_format_is_plain_safetensors(tmp_path, rng):
    m = rg.GRU(3, 5, num_layers=2, bidirectional=True, seed=int(rng.integers(2**32)))
    path = tmp_path / "m.safetensors"
    rg.save(m, path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        assert meta["format"] == "rnn_gpu/1"
        config = json.loads(meta["config"])
        assert config == {**m.config(), "cell": "GRU"}
        assert config["cell"] == "GRU" and config["hidden_size"] == 5
        assert sorted(f.keys()) == sorted(m.state_dict())
        for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            np.testing.assert_array_equal(f.get_tensor(k), m.state_dict()[k])
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])       # a JSON header, then raw tensor bytes
    assert header["__metadata__"]["format"] == "rnn_gpu/1"
    assert b"pickle" not in raw and b"\x80\x04\x95" not in raw[:8 + header_len]


def test_readout_saved_and_loaded(tmp_path, rng):
    m = rg.LSTM(3, 6, proj_size=2, seed=int(rng.integers(2**32)))
    m.readout = rg.Readout(2, 7, seed=int(rng.integers(2**32)))
    path = tmp_path / "with_readout.safetensors"
    rg.save(m, path)
    with safe_open(str(path), framework="numpy") as f:
        assert json.loads(f.metadata()["readout"]) == m.readout.config()
        assert {"readout.weight", "readout.bias"} <= set(f.keys())
    m2 = rg.load(path)
    assert isinstance(m2.readout, rg.Readout)
    assert m2.readout.config() == m.readout.config()
    h = rng.standard_normal((4, 2)).astype(np.float32)
    np.testing.assert_array_equal(m2.readout(h), m.readout(h))
    x = _x(m, rng)
    np.testing.assert_array_equal(m2(x)[0], m(x)[0])


def test_readout_alone(tmp_path, rng):
    r = rg.Readout(4, 3, bias=False, dtype="float64", seed=int(rng.integers(2**32)))
    path = tmp_path / "r.safetensors"
    rg.save(r, path)
    r2 = rg.load(path)
    assert isinstance(r2, rg.Readout) and r2.config() == r.config()
    h = rng.standard_normal((5, 4))
    np.testing.assert_array_equal(r2(h), r(h))


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match=r"model: expected an rnn_gpu layer or Readout, got dict"):
        rg.save({"a": np.zeros(2)}, tmp_path / "x.safetensors")
    m = rg.GRU(2, 3)
    m.readout = "not a readout"
    with pytest.raises(TypeError, match=r"model.readout: expected an rnn_gpu.Readout or None, "
                       r"got str"):
        rg.save(m, tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "m.safetensors"
    rg.save(rg.GRU(2, 3), path)
    rg.save(rg.RNN(2, 5), path)
    assert rg.load(path).config()["cell"] == "RNN"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]     # no temp files left


# ---------------------------------------------------------------------- bad files

@pytest.fixture
def saved(tmp_path, rng):
    m = rg.LSTM(3, 4, num_layers=2, seed=int(rng.integers(2**32)))
    path = tmp_path / "good.safetensors"
    rg.save(m, path)
    return m, path


def _rewrite(path, tensors=None, metadata=None):
    """Write a safetensors file with the given tensors / metadata, starting from ``path``."""
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    t = load_file(str(path))
    if tensors is not None:
        t = tensors(t)
    if metadata is not None:
        meta = metadata(meta)
    out = path.with_name("bad.safetensors")
    save_file(t, str(out), metadata=meta)
    return out


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path: no such file '.*nothing.safetensors'"):
        rg.load(tmp_path / "nothing.safetensors")


def test_directory(tmp_path):
    with pytest.raises(WeightsFileError, match=r"is a directory, expected a .safetensors file"):
        rg.load(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 8, 3, 0])
def test_truncated_file(saved, keep):
    _, path = saved
    raw = path.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    path.write_bytes(raw[:n])
    with pytest.raises(WeightsFileError, match=rf"is not a readable safetensors file \({n} bytes;"
                       r" it may be truncated or of another format\)"):
        rg.load(path)


def test_random_bytes(tmp_path, rng):
    path = tmp_path / "random.safetensors"
    path.write_bytes(rng.bytes(1000))
    with pytest.raises(WeightsFileError, match=r"not a readable safetensors file"):
        rg.load(path)


def test_npy_file(tmp_path):
    path = tmp_path / "weights.npy"
    np.save(path, np.zeros((4, 4), np.float32))
    with pytest.raises(WeightsFileError, match=r"not a readable safetensors file"):
        rg.load(path)


def test_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(rg.GRU(2, 3).state_dict(), str(path))
    with pytest.raises(WeightsFileError, match=r"metadata 'format' is None, expected "
                       r"'rnn_gpu/1'; was it written by rnn_gpu.save\?"):
        rg.load(path)


def _with_config(m, **change):
    return {**m, "config": json.dumps({**json.loads(m["config"]), **change})}


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: {**m, "format": "rnn_gpu/999"},
     r"metadata 'format' is 'rnn_gpu/999', expected 'rnn_gpu/1'"),
    (lambda m: {"format": m["format"]}, r"has no 'config' entry in its metadata"),
    (lambda m: {**m, "config": "{not json"}, r"metadata 'config' is not valid JSON"),
    (lambda m: {**m, "config": ""}, r"metadata 'config' is not valid JSON"),
    (lambda m: {**m, "config": "{\"cell\": \"LSTM\",}"}, r"metadata 'config' is not valid JSON"),
    (lambda m: {**m, "config": "[1, 2]"},
     r"metadata 'config' should be a JSON object, got list"),
    (lambda m: _with_config(m, cell="Transformer"),
     r"metadata names cell 'Transformer', expected one of \['GRU', 'LSTM', 'RNN', "
     r"'TwoStageRNN'\] or 'Readout'"),
], ids=["format-version", "missing-config", "json-garbage", "json-empty", "json-trailing-comma",
        "config-not-object", "unknown-cell"])
def test_metadata_that_is_wrong(saved, edit, pattern):
    _, path = saved
    with pytest.raises(WeightsFileError, match=pattern):
        rg.load(_rewrite(path, metadata=edit))


@pytest.mark.parametrize("change,pattern", [
    ({"hidden_size": 5}, r"tensors do not match its config: state_dict\['weight_ih_l0'\]: "
                         r"expected shape \(20, 3\), got \(16, 3\)"),
    ({"input_size": 7}, r"tensors do not match its config: state_dict\['weight_ih_l0'\]: "
                        r"expected shape \(16, 7\), got \(16, 3\)"),
    ({"num_layers": 3}, r"tensors do not match its config: .*missing keys \['weight_ih_l2'"),
    ({"bidirectional": True}, r"tensors do not match its config: .*missing keys "
                              r"\['weight_ih_l0_reverse'"),
    ({"bias": False}, r"tensors do not match its config: .*unexpected keys \[.*'bias_ih_l0'"),
    ({"hidden_size": 0}, r"its config .* does not describe a valid LSTM: hidden_size: expected "
                         r"an int >= 1, got 0"),
    ({"proj_size": 9}, r"does not describe a valid LSTM: proj_size: expected less than"),
    ({"colour": "blue"}, r"does not describe a valid LSTM: .*colour"),
    ({"dtype": "int8"}, r"does not describe a valid LSTM: dtype: expected one of"),
])
def test_config_contradicts_tensors(saved, change, pattern):
    _, path = saved
    bad = _rewrite(path, metadata=lambda m: _with_config(m, **change))
    with pytest.raises(WeightsFileError, match=pattern):
        rg.load(bad)


@pytest.mark.parametrize("edit, pattern", [
    (lambda t: {k: v for k, v in t.items() if k != "weight_hh_l1"},
     r"tensors do not match its config: .*missing keys \['weight_hh_l1'\], unexpected keys \[\]"),
    (lambda t: {**t, "weight_hh_l7": np.zeros((16, 4), np.float32)},
     r"tensors do not match its config: .*missing keys \[\], unexpected keys \['weight_hh_l7'\]"),
    (lambda t: {**t, "bias_ih_l0": np.zeros(16, np.int32)},
     r"tensor 'bias_ih_l0' is int32, but its config says dtype 'float32' \(stored as float32\)"),
    (lambda t: {**t, "bias_ih_l0": np.zeros(16, np.float64)},
     r"tensor 'bias_ih_l0' is float64, but its config says dtype 'float32'"),
    (lambda t: {**t, "weight_hh_l1": t["weight_hh_l1"].astype(np.float16)},
     r"tensor 'weight_hh_l1' is float16, but its config says dtype 'float32'"),
    (lambda t: {**t, "readout.weight": np.zeros((3, 4), np.float32)},
     r"holds readout tensors \['weight'\] but no 'readout' metadata"),
], ids=["missing-tensor", "extra-tensor", "integer-tensor", "float64-tensor", "float16-tensor",
        "readout-without-metadata"])
def test_tensors_that_contradict_the_config(saved, edit, pattern):
    _, path = saved
    with pytest.raises(WeightsFileError, match=pattern):
        rg.load(_rewrite(path, tensors=edit))


def test_readout_metadata_contradicts_tensors(tmp_path):
    m = rg.GRU(2, 3)
    m.readout = rg.Readout(3, 4)
    path = tmp_path / "m.safetensors"
    rg.save(m, path)
    bad = _rewrite(path, metadata=lambda meta: {**meta, "readout": json.dumps(
        {**json.loads(meta["readout"]), "num_classes": 5})})
    with pytest.raises(WeightsFileError, match=r"tensors do not match its config: "
                       r"state_dict\['weight'\]: expected shape \(5, 3\), got \(4, 3\)"):
        rg.load(bad)


READOUT_WIDTH = (r"model.readout: expected hidden_size = the layer's output features "
                 r"\(num_directions \* hidden_size = 2 \* 3 = 6\), got Readout\(3, 4\)")


def test_readout_that_does_not_fit_the_layer(tmp_path):
    """A Readout must read the layer's D*H_out features. Before, save and load took it and
    `rnn-gpu run --emit probs` failed on the first batch with a traceback naming `h`."""
    m = rg.GRU(2, 3, bidirectional=True)
    m.readout = rg.Readout(3, 4)
    with pytest.raises(ValueError, match=READOUT_WIDTH):
        rg.save(m, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())
    from rnn_gpu.batch.apply import apply_batch, output_shape

    with pytest.raises(ValueError, match=READOUT_WIDTH):
        output_shape(m, 1, 2, "probs")
    with pytest.raises(ValueError, match=READOUT_WIDTH):
        apply_batch(m, np.zeros((1, 2, 2), np.float32), emit="probs")
    # a file written before the check (or by hand): load names the mismatch
    m.readout = rg.Readout(6, 4)
    path = tmp_path / "m.safetensors"
    rg.save(m, path)
    bad = _rewrite(path, metadata=lambda meta: {**meta, "readout": json.dumps(
        {**json.loads(meta["readout"]), "hidden_size": 3})},
        tensors=lambda t: {**t, "readout.weight": t["readout.weight"][:, :3].copy()})
    with pytest.raises(WeightsFileError, match=READOUT_WIDTH):
        rg.load(bad)


def test_weights_file_error_is_a_value_error():
    assert issubclass(WeightsFileError, ValueError)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_roundtrip_half_precision_weights(dtype, tmp_path, rng):
    """GPU dtypes save and load on the CPU too (bfloat16 weights are stored as float32, which
    holds every bfloat16 value exactly)."""
    if dtype == "bfloat16":
        pytest.importorskip("torch", reason="bfloat16 weights are held by torch")
    m = rg.GRU(3, 4, num_layers=2, dtype=dtype, seed=int(rng.integers(2**32)))
    path = tmp_path / "half.safetensors"
    rg.save(m, path)
    m2 = rg.load(path)
    assert m2.config() == m.config() and m2.dtype == dtype
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(m2.state_dict()[k], v)


def test_save_to_a_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    for target in (tmp_path / "sub", f"{tmp_path / 'sub'}/"):
        with pytest.raises(IsADirectoryError, match=r"path: .* is a directory, expected a file"):
            rg.save(rg.GRU(2, 3), target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]      # nothing left behind


def test_save_to_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path: the directory .*nowhere.* does not "
                       r"exist"):
        rg.save(rg.GRU(2, 3), tmp_path / "nowhere" / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.numpy

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    path = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match="disk full"):
        rg.save(rg.GRU(2, 3), path)
    assert list(tmp_path.iterdir()) == []


def test_saved_files_get_the_usual_permissions(tmp_path):
    """safetensors creates its files 0600; ours follow the umask (a new file) or keep the
    replaced file's mode, so that a shared model directory stays readable."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        rg.save(rg.GRU(2, 3), tmp_path / "m.safetensors")
        assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o644
        os.chmod(tmp_path / "m.safetensors", 0o640)
        rg.save(rg.GRU(2, 3), tmp_path / "m.safetensors")
        assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o640
        os.umask(0o027)
        real_umask = os.umask
        try:      # read, never set: setting it to 0 and back races with other threads' files
            os.umask = lambda mask: pytest.fail("save set the process umask")
            rg.save(rg.GRU(2, 3), tmp_path / "n.safetensors")
        finally:
            os.umask = real_umask
        assert stat.S_IMODE(os.stat(tmp_path / "n.safetensors").st_mode) == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "n.safetensors"]
    finally:
        os.umask(old)
