"""Outputs of ``rnn-gpu run`` and the manifest that makes a run resumable.

The output is written one chunk (a contiguous range of rows) at a time. A chunk counts as done
only once its bytes are on disk (written, then fsync'ed; for zarr, with the array's metadata
and the folders on the way to the chunk's file) *and* the manifest says so; the
manifest itself is replaced atomically (temporary file, fsync, ``os.replace``, fsync of the
directory). A crash at any moment therefore leaves either the old manifest or the new one, and
every chunk that either names is complete. Chunks not named are simply computed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import numpy as np

from .errors import UsageError
from .sources import NpyFile, _import_zarr

MANIFEST_FORMAT = "rnn_gpu.run/1"
MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(output: str) -> str:
    return os.path.normpath(output) + MANIFEST_SUFFIX


class NpyWriter:
    """A ``.npy`` output: created at full size, then filled with ``pwrite`` at row offsets.

    No memory map: dirty and cached pages of a map count as resident memory of the process.
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, *, create: bool):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        if create:
            tmp = f"{path}.tmp-{os.getpid()}"
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=self.shape)
            del mm                      # header written, file sized (sparse), map released
            os.replace(tmp, path)
        self.offset = _npy_offset(path, self.shape, self.dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1).view(np.uint8))
        offset, done = self.offset + start * self.row_bytes, 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)
        os.fsync(self._fd)              # on disk before the manifest may name the chunk

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def matches(path: str, shape, dtype) -> bool:
        try:
            _npy_offset(path, tuple(shape), np.dtype(dtype))
        except (UsageError, OSError):
            return False
        return True


class ZarrWriter:
    """A zarr output whose chunks along N are exactly the run's chunks, so that writing one
    run chunk writes one zarr chunk and never touches another."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int, *,
                 create: bool):
        zarr = _import_zarr("OUTPUT")
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        chunks = (chunk_rows, *self.shape[1:])
        if create:
            self.array = zarr.open_array(store=path, mode="w", shape=self.shape, chunks=chunks,
                                         dtype=self.dtype, fill_value=0)
            # zarr writes its metadata without fsync: a crash after a chunk was recorded could
            # leave the recorded chunks beside a missing or empty zarr.json, as the npy path's
            # header cannot be (the first chunk's fsync covers that file's header). OUTPUT's own
            # entry in its folder is flushed by the manifest's write (same folder).
            for name in ZARR_METADATA:
                if os.path.isfile(os.path.join(path, name)):
                    _fsync_file(os.path.join(path, name))
            _fsync_dir(path)
        else:
            self.array = zarr.open_array(store=path, mode="r+")
        self.chunk_rows = chunk_rows

    def write(self, start: int, rows: np.ndarray) -> None:
        self.array[start:start + len(rows)] = rows
        # zarr does not fsync; flush the chunk's file ourselves, or everything if we cannot
        # tell which file it is (another store layout).
        chunk_file = self._chunk_file(start // self.chunk_rows)
        if chunk_file is None:
            os.sync()
            return
        _fsync_file(chunk_file)
        # and the folders on the way to it, which this write may have created (format 3:
        # c/<i>/0/): a file's fsync does not flush its name, and a chunk recorded as done but
        # not found after a crash would read as zeros (the fill value)
        rel = os.path.relpath(os.path.dirname(chunk_file), self.path)
        folders = [] if rel == os.curdir else rel.split(os.sep)
        for depth in range(len(folders), -1, -1):          # c/<i>/0, c/<i>, c, the store
            _fsync_dir(os.path.join(self.path, *folders[:depth]))

    def close(self) -> None:
        pass

    def _chunk_file(self, index: int) -> str | None:
        rest = ["0"] * (len(self.shape) - 1)
        for candidate in (os.path.join(self.path, "c", str(index), *rest),     # zarr format 3
                          os.path.join(self.path, ".".join([str(index), *rest]))):  # format 2
            if os.path.isfile(candidate):
                return candidate
        return None

    @staticmethod
    def matches(path: str, shape, dtype, chunk_rows: int) -> bool:
        try:
            zarr = _import_zarr("OUTPUT")
            array = zarr.open_array(store=path, mode="r")
        except Exception:
            return False
        return (tuple(array.shape) == tuple(shape) and np.dtype(str(array.dtype)) == dtype
                and tuple(array.chunks)[0] == chunk_rows)


class OutputLock:
    """An exclusive lock on OUTPUT for the length of a run, so that two runs never write the
    same output at once. ``flock`` locks die with their process, so a killed run leaves no
    stale lock behind. Where ``fcntl`` does not exist (Windows) there is no lock.

    The lock is taken before the output is examined: whether OUTPUT may be resumed,
    overwritten or refused is only true while no other run can change it. A run refused by
    those checks removes the lock file again if it created it (:meth:`discard`), so that a
    refused command leaves the folder as it found it. Removing a lock file is safe only
    because every run, once it holds the lock, checks that the file it locked is still the
    one at the path (see ``__init__``)."""

    def __init__(self, output: str):
        # beside the file the output really is: two paths to it (a symlink, a symlinked
        # folder) took two locks, and two runs could write the same file at once
        self.path = os.path.realpath(output) + ".lock"
        self._fd = None
        self.created = False            # by this run: discard() may remove it
        try:
            import fcntl
        except ImportError:
            return
        while True:
            fd, created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UsageError(f"OUTPUT: another rnn-gpu run is writing {output!r} (it "
                                 f"holds {self.path!r}); wait for it or stop it first"
                                 ) from None
            # A refused run removes the file while holding its lock; if we opened it just
            # before that, we now hold a lock on a file no longer at the path, which a third
            # run would not see. Then start again with the file that is there (or none).
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd, self.created = fd, created
                return
            os.close(fd)

    def _open(self) -> tuple[int, bool]:
        """The lock file's descriptor, and whether this call created it."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                pass
            except OSError as exc:
                raise UsageError(f"OUTPUT: cannot create the lock file {self.path!r} beside "
                                 f"it ({exc.strerror}); OUTPUT's directory must be writable"
                                 ) from None
            try:
                return os.open(self.path, os.O_RDWR), False
            except FileNotFoundError:
                continue                # removed in between by a refused run: create it
            except OSError as exc:
                raise UsageError(f"OUTPUT: cannot open the lock file {self.path!r} beside it "
                                 f"({exc.strerror}); OUTPUT's directory must be writable"
                                 ) from None

    def discard(self) -> None:
        """Release the lock, and remove the lock file if this run created it: for a run that
        was refused before it wrote anything. (After a run the file stays, as documented.)"""
        if self._fd is not None and self.created:
            # still ours: removed while we hold its lock. If it cannot be, it stays, as after
            # any run: harmless
            with contextlib.suppress(OSError):
                os.remove(self.path)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # releases the lock
            self._fd = None


def remove_stale_temporaries(output: str) -> None:
    """Temporary files of a run that was killed while writing them (under the lock, so no
    live run owns them)."""
    for stem in (os.path.normpath(output), manifest_path(output)):
        folder, name = os.path.split(stem)
        for entry in os.listdir(folder or "."):
            if entry.startswith(name + ".tmp-"):
                os.remove(os.path.join(folder, entry))


def is_zarr_output(path: str) -> bool:
    return os.path.normpath(path).endswith(".zarr")


def open_writer(path: str, shape, dtype, chunk_rows: int, *, create: bool):
    if is_zarr_output(path):
        return ZarrWriter(path, shape, dtype, chunk_rows, create=create)
    return NpyWriter(path, shape, dtype, create=create)


def output_matches(path: str, shape, dtype, chunk_rows: int) -> bool:
    if is_zarr_output(path):
        return ZarrWriter.matches(path, shape, np.dtype(dtype), chunk_rows)
    return NpyWriter.matches(path, shape, dtype)


ZARR_METADATA = (".zarray", ".zgroup", ".zattrs", "zarr.json")


def check_removable(path: str) -> None:
    """The UsageError :func:`remove_output` would raise, without deleting anything."""
    if os.path.isdir(path) and not os.path.islink(path):
        entries = os.listdir(path)
        ours = os.path.isfile(manifest_path(path))      # a run of ours wrote it (its manifest)
        if not is_zarr_output(path) or (entries and not ours
                                        and not set(entries) & set(ZARR_METADATA)):
            raise UsageError(f"OUTPUT: {path!r} is a directory that is not a zarr store; "
                             f"not deleting it (give a .npy path or a .zarr directory)")


def remove_output(path: str) -> None:
    """Delete an output (file or zarr directory) and its manifest, for ``--overwrite``. A
    directory goes only when it is a zarr store (named ``*.zarr``, holding zarr's metadata, or
    empty): anything else is a UsageError, never deleted."""
    check_removable(path)
    # the manifest first: a removal that fails half way (a read-only folder inside the store)
    # then leaves an output no manifest vouches for, which a rerun refuses or overwrites;
    # the other way round, a manifest would list chunks whose files were gone
    if os.path.lexists(manifest_path(path)):
        os.remove(manifest_path(path))
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class Manifest:
    """Which chunks of which job are done. Stored as JSON beside the output::

        {"format": "rnn_gpu.run/1", "job": {...}, "chunk_rows": 512, "chunks": 40,
         "done": [[0, 12], [14, 15]], "complete": false}

    ``done`` lists half-open ranges of chunk indices, which stays a few numbers long however
    many chunks there are (the local runner finishes them in order).
    """

    def __init__(self, path: str, job: dict[str, Any], chunk_rows: int, chunks: int,
                 done: set[int] | None = None):
        self.path, self.job, self.chunk_rows, self.chunks = path, job, chunk_rows, chunks
        self.done = set(done or ())

    @classmethod
    def read(cls, path: str) -> dict[str, Any] | None:
        """The stored manifest as a dict, None if there is none; raises UsageError if it is
        not one of ours."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UsageError(f"OUTPUT: its manifest {path!r} is unreadable ({exc}); pass "
                             "--overwrite to start the job again") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise UsageError(f"OUTPUT: {path!r} is not a manifest of rnn-gpu run; pass "
                             "--overwrite to replace it")
        return data

    @classmethod
    def from_dict(cls, path: str, data: dict[str, Any]) -> Manifest:
        done = {i for a, b in data.get("done", []) for i in range(a, b)}
        return cls(path, data["job"], data["chunk_rows"], data["chunks"], done)

    def mark_done(self, index: int) -> None:
        self.done.add(index)
        try:
            self.save()
        except BaseException:
            self.done.discard(index)        # as on disk: the old manifest still stands
            raise

    @property
    def complete(self) -> bool:
        return len(self.done) == self.chunks

    def save(self) -> None:
        data = {"format": MANIFEST_FORMAT, "job": self.job, "chunk_rows": self.chunk_rows,
                "chunks": self.chunks, "done": _ranges(self.done), "complete": self.complete}
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` so that a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):     # the write failed (disk full): the old file stands
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _ranges(indices: set[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _npy_offset(path: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    f = NpyFile(path, "OUTPUT")
    if f.shape != shape or f.dtype != dtype or f.fortran:
        raise UsageError(f"OUTPUT: {path!r} holds shape {f.shape} {f.dtype}, expected "
                         f"{shape} {dtype}")
    return f.offset


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:         # not possible everywhere (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
