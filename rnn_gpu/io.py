"""Weights I/O with safetensors: tensors plus the layer's config in the metadata, no pickle.

File layout: every parameter under its torch.nn name; a Readout attached as ``model.readout``
under ``readout.weight`` / ``readout.bias``. Metadata (all strings, as safetensors requires):
``format = "rnn_gpu/1"``, ``config`` = JSON of ``model.config()``, and ``readout`` = JSON of
the readout's config when there is one.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any

import numpy as np

from ._dtypes import host_dtype

FORMAT = "rnn_gpu/1"
_READOUT_PREFIX = "readout."


class WeightsFileError(ValueError):
    """A weights file that is unreadable, not safetensors, or inconsistent (a missing one
    raises FileNotFoundError)."""


def save(model: Any, path: str | os.PathLike) -> None:
    """Write ``model`` (a layer, or a Readout) to ``path`` as safetensors."""
    from safetensors.numpy import save_file

    from .layers import RecurrentLayer
    from .readout import Readout, readout_mismatch

    if not isinstance(model, (RecurrentLayer, Readout)):
        raise TypeError(f"model: expected an rnn_gpu layer or Readout, got "
                        f"{type(model).__name__}")
    config = model.config()
    if isinstance(model, Readout):
        config = {"cell": "Readout", **config}
    tensors = {k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(config)}
    readout = getattr(model, "readout", None)
    if readout is not None:
        if not isinstance(readout, Readout):
            raise TypeError(f"model.readout: expected an rnn_gpu.Readout or None, got "
                            f"{type(readout).__name__}")
        mismatch = readout_mismatch(model, readout)
        if mismatch:
            raise ValueError(mismatch)
        tensors.update({_READOUT_PREFIX + k: v for k, v in readout.state_dict().items()})
        metadata["readout"] = json.dumps(readout.config())
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path!r} is a directory, expected a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"path: the directory {parent!r} of {path!r} does not exist")
    # a name of its own (not path + pid): two threads saving to one path must not share it
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _file_mode(path))     # safetensors creates its files 0600
        os.replace(tmp, path)      # a crash mid-write never leaves a torn file under `path`
    finally:
        if os.path.exists(tmp):    # a failed write leaves no temporary file behind either
            os.remove(tmp)


def _file_mode(path: str) -> int:
    """The mode a new file gets from the umask (as ``open`` gives it), or the mode of the file
    being replaced: a model directory shared with other users or Dask workers stays readable."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without setting it: os.umask(0) and back would leave a window
    in which a file another thread creates gets mode 0666."""
    try:
        with open("/proc/self/status") as f:        # Linux
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022                                     # the common default elsewhere


def _read(path: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    if os.path.isdir(path):
        raise WeightsFileError(f"path: {path!r} is a directory, expected a .safetensors file")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:
        size = os.path.getsize(path)
        raise WeightsFileError(f"{path!r} is not a readable safetensors file ({size} bytes; "
                               f"it may be truncated or of another format): {exc}") from None
    return metadata, tensors


def _config(path: str, metadata: dict[str, str], key: str) -> dict[str, Any]:
    try:
        config = json.loads(metadata[key])
    except KeyError:
        raise WeightsFileError(f"{path!r} has no {key!r} entry in its metadata; was it written "
                               "by rnn_gpu.save?") from None
    except json.JSONDecodeError as exc:
        raise WeightsFileError(f"{path!r}: metadata {key!r} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise WeightsFileError(f"{path!r}: metadata {key!r} should be a JSON object, got "
                               f"{type(config).__name__}")
    return config


def _build(path: str, cls, config: dict[str, Any], tensors: dict[str, np.ndarray]):
    try:
        obj = cls(**config)
    except (TypeError, ValueError) as exc:
        raise WeightsFileError(f"{path!r}: its config {config} does not describe a valid "
                               f"{cls.__name__}: {exc}") from None
    # save writes the config's dtype (bfloat16 as float32, which holds it exactly): another
    # dtype means a file edited or written elsewhere, cast silently before
    stored = host_dtype(obj.dtype)
    for name, t in tensors.items():
        if np.dtype(t.dtype) != np.dtype(stored):
            raise WeightsFileError(f"{path!r}: tensor {name!r} is {t.dtype}, but its config "
                                   f"says dtype {obj.dtype!r} (stored as {stored})")
    try:
        obj.load_state_dict(tensors)
    except (KeyError, ValueError, TypeError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise WeightsFileError(f"{path!r}: tensors do not match its config: {message}") from None
    return obj


def load(path: str | os.PathLike):
    """Read a file written by :func:`save`; returns the layer (with ``.readout``) or Readout."""
    from .layers import LAYERS
    from .readout import Readout, readout_mismatch

    path = os.fspath(path)
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT:
        raise WeightsFileError(f"{path!r}: metadata 'format' is {metadata.get('format')!r}, "
                               f"expected {FORMAT!r}; was it written by rnn_gpu.save?")
    config = _config(path, metadata, "config")
    cell = config.pop("cell", None)
    if cell == "Readout":
        return _build(path, Readout, config, tensors)
    if cell not in LAYERS:
        raise WeightsFileError(f"{path!r}: metadata names cell {cell!r}, expected one of "
                               f"{sorted(LAYERS)} or 'Readout'")
    readout_tensors = {k[len(_READOUT_PREFIX):]: v for k, v in tensors.items()
                       if k.startswith(_READOUT_PREFIX)}
    layer_tensors = {k: v for k, v in tensors.items() if not k.startswith(_READOUT_PREFIX)}
    model = _build(path, LAYERS[cell], config, layer_tensors)
    if "readout" in metadata:
        model.readout = _build(path, Readout, _config(path, metadata, "readout"),
                               readout_tensors)
        mismatch = readout_mismatch(model, model.readout)
        if mismatch:
            raise WeightsFileError(f"{path!r}: {mismatch}")
    elif readout_tensors:
        raise WeightsFileError(f"{path!r} holds readout tensors {sorted(readout_tensors)} but "
                               "no 'readout' metadata")
    return model
