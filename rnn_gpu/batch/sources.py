"""Inputs of ``rnn-gpu run``: a ``.npy`` file, a directory of ``.npy`` shards, or a zarr array.

Every source is sequence-major ``(N, T, I)`` and offers ``read(start, stop)``, which returns a
fresh NumPy array of rows ``start:stop``. Reads are explicit ``readinto`` calls at the rows'
byte offset rather than slices of a memory map: pages touched through a map stay in the
process's resident set until it is unmapped, so a map over a large file would make peak
memory grow with the dataset, which is exactly what the runner must not do.

``identity()`` describes the data for the job manifest, so that a rerun against other data
is noticed (path, shape, dtype, and for files their size and modification time).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

LENGTHS_FILE = "lengths.npy"          # inside a shard directory
LENGTHS_SUFFIX = ".lengths.npy"       # beside a file: data.npy -> data.lengths.npy


class NpyFile:
    """One ``.npy`` file, read by byte offset (C order) or through a map (Fortran order)."""

    kind = "npy"

    def __init__(self, path: str, arg: str = "INPUT"):
        self.path = path
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = header(f)
                self.offset = f.tell()
        except FileNotFoundError:
            raise UsageError(f"{arg}: no such file {path!r}") from None
        except PermissionError:
            raise UsageError(f"{arg}: cannot read {path!r} (permission denied)") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{arg}: expected a .npy file, {path!r} is not readable as one "
                             f"({exc})") from None
        if dtype.hasobject:
            raise UsageError(f"{arg}: expected numbers, {path!r} holds Python objects")
        self.shape, self.dtype, self.fortran = tuple(shape), dtype, fortran
        expected = self.offset + int(np.prod(shape)) * dtype.itemsize
        if os.path.getsize(path) < expected:
            raise UsageError(f"{arg}: {path!r} is truncated: its header promises {expected} "
                             f"bytes, the file has {os.path.getsize(path)}")
        self._lock = threading.Lock()

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.fortran:      # rows are not contiguous; rare enough to take the simple way
            mm = np.load(self.path, mmap_mode="r")
            try:
                return np.array(mm[start:stop])
            finally:
                del mm
        row_shape = self.shape[1:]
        out = np.empty((stop - start, *row_shape), dtype=self.dtype)
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        with self._lock, open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * row_bytes)
            view = memoryview(out.reshape(-1).view(np.uint8))
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.path!r} ended early while reading rows "
                                  f"{start}:{stop}")
                done += n
        return out

    def identity(self) -> dict[str, Any]:
        stat = os.stat(self.path)
        return {"kind": self.kind, "path": os.path.abspath(self.path), "shape": list(self.shape),
                "dtype": self.dtype.str, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class ShardDirectory:
    """A directory of ``.npy`` shards, concatenated along N in natural name order
    (``part2`` before ``part10``); ``lengths.npy`` and ``*.lengths.npy`` are not shards."""

    kind = "npy-shards"

    def __init__(self, path: str, arg: str = "INPUT"):
        self.path = path
        names = sorted((n for n in os.listdir(path) if n.endswith(".npy")
                        and n != LENGTHS_FILE and not n.endswith(LENGTHS_SUFFIX)),
                       key=_natural_key)
        if not names:
            raise UsageError(f"{arg}: expected .npy shards in the directory {path!r}, found "
                             "none")
        self.shards = [NpyFile(os.path.join(path, n), arg) for n in names]
        first = self.shards[0]
        for shard in self.shards:
            if len(shard.shape) != 3 or shard.shape[1:] != first.shape[1:] or (
                    shard.dtype != first.dtype):
                raise UsageError(
                    f"{arg}: every shard must have shape (n, T, I) and dtype like the first "
                    f"({os.path.basename(first.path)}: shape {first.shape}, {first.dtype}); "
                    f"{os.path.basename(shard.path)} has shape {shard.shape}, {shard.dtype}")
        self.starts = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self.shape = (int(self.starts[-1]), *first.shape[1:])
        self.dtype = first.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for i, shard in enumerate(self.shards):
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if lo < hi:
                parts.append(shard.read(int(lo - self.starts[i]), int(hi - self.starts[i])))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty((0, *self.shape[1:]), self.dtype)
        return np.concatenate(parts)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "shape": list(self.shape),
                "dtype": self.dtype.str,
                "shards": [{k: v for k, v in s.identity().items() if k not in ("kind",)}
                           for s in self.shards]}


class ZarrArray:
    """A zarr array (format 2 or 3) on the local file system."""

    kind = "zarr"

    def __init__(self, path: str, arg: str = "INPUT"):
        zarr = _import_zarr(arg)
        self.path = path
        try:
            self.array = zarr.open_array(store=path, mode="r")
        except Exception as exc:
            raise UsageError(f"{arg}: expected a zarr array, {path!r} is not readable as one "
                             f"({type(exc).__name__}: {exc})") from None
        self.shape = tuple(self.array.shape)
        self.dtype = np.dtype(str(self.array.dtype)) if not isinstance(
            self.array.dtype, np.dtype) else self.array.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])

    def identity(self) -> dict[str, Any]:
        """Path, shape, dtype, and the store's files: how many, their bytes and the newest
        modification time. Without the files a store rewritten in place with new data of the
        same shape was resumed, and the output mixed results of the old and the new data."""
        files = size = newest = 0
        for folder, _, names in os.walk(self.path):
            for name in names:
                stat = os.stat(os.path.join(folder, name))
                files, size = files + 1, size + stat.st_size
                newest = max(newest, stat.st_mtime_ns)
        return {"kind": self.kind, "path": os.path.abspath(self.path), "shape": list(self.shape),
                "dtype": self.dtype.str, "files": files, "bytes": size, "mtime_ns": newest}


def open_input(path: str):
    """The source at ``path``; checks that it is ``(N, T, I)`` of a floating dtype."""
    source = _open(path, "INPUT")
    if len(source.shape) != 3:
        raise UsageError(f"INPUT: expected a sequence-major array of shape (N, T, I), got "
                         f"shape {source.shape} ({len(source.shape)} dimensions) in {path!r}")
    if source.dtype.kind != "f":
        raise UsageError(f"INPUT: expected floating-point data (float16/32/64), got dtype "
                         f"{source.dtype} in {path!r}")
    return source


def open_lengths(path: str, n: int, T: int, arg: str = "--lengths"
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """Lengths as an int64 array of ``n`` values in ``[0, T]``, and the file's identity.

    They are held in memory: 8 bytes per sequence, small next to the sequences themselves.
    """
    source = _open(path, arg)
    if len(source.shape) != 1 or source.dtype.kind not in "iuf":
        raise UsageError(f"{arg}: expected a 1-D array of integers (one length per sequence), "
                         f"got shape {source.shape} and dtype {source.dtype} in {path!r}")
    if source.shape[0] != n:
        raise UsageError(f"{arg}: expected {n} lengths (one per sequence of INPUT), got "
                         f"{source.shape[0]} in {path!r}")
    lengths = source.read(0, n)
    if lengths.dtype.kind == "f":     # whole numbers stored as floats, as the layers take them
        fractional = np.flatnonzero(~np.isfinite(lengths) | (lengths != np.round(lengths)))
        if fractional.size:
            i = int(fractional[0])
            raise UsageError(f"{arg}: expected integers, got {lengths[i]} at index {i} "
                             f"(dtype {lengths.dtype}) in {path!r}")
    # checked before the cast to int64, which made 1e20 and 2**63 + 5 read as negative numbers
    bad = np.flatnonzero((lengths < 0) | (lengths > T))
    if bad.size:
        i = int(bad[0])
        value = lengths[i].item()
        raise UsageError(f"{arg}: expected lengths in [0, T] = [0, {T}], got "
                         f"{int(value) if float(value).is_integer() else value} at "
                         f"index {i} ({bad.size} out of range) in {path!r}")
    return lengths.astype(np.int64), source.identity()


def lengths_beside(input_path: str) -> str | None:
    """The lengths file that goes with ``input_path`` by name, if there is one:
    ``data.npy`` / ``data.zarr`` -> ``data.lengths.npy``; a shard directory -> its
    ``lengths.npy``."""
    p = Path(input_path)
    if p.is_dir() and not _is_zarr(p):
        candidate = p / LENGTHS_FILE
    else:
        candidate = p.with_name(p.name.removesuffix(p.suffix) + LENGTHS_SUFFIX)
    return str(candidate) if candidate.is_file() else None


def _open(path: str, arg: str):
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{arg}: no such file or directory {path!r}")
    try:
        if _is_zarr(p):
            return ZarrArray(path, arg)
        if p.is_dir():
            return ShardDirectory(path, arg)
        return NpyFile(path, arg)
    except PermissionError as exc:
        raise UsageError(f"{arg}: cannot read {exc.filename or path!r} (permission denied)"
                         ) from None


def _is_zarr(p: Path) -> bool:
    return p.suffix == ".zarr" or (p.is_dir() and any(
        (p / marker).exists() for marker in ("zarr.json", ".zarray")))


def _import_zarr(arg: str):
    try:
        import zarr
    except ImportError:
        raise UsageError(f'{arg}: reading or writing zarr needs the zarr package: pip install '
                         '"rnn-gpu[zarr]"') from None
    return zarr


def _natural_key(name: str):
    """part2 before part10; names equal as numbers (part1, part01) by the name itself, so that
    the order never depends on the order the file system lists them in."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)], name
