"""The loop of ``rnn-gpu run``: plan chunks, read batches, run them, write chunks, resume.

Chunks. The N sequences are cut into chunks of ``chunk_rows`` consecutive rows. A chunk is the
unit of writing and of the manifest: it is written in one piece, then recorded as done. On a
rerun of the same job, chunks recorded as done are skipped and the others computed again.

Batches and bucketing. Within a chunk, sequences are sorted by length (stable) and cut into
batches of ``batch_size``; each batch is padded only to its own longest sequence, so similar
lengths travel together and little time goes into padding. Outputs are scattered back to their
input positions in the chunk's buffer, so the file is in input order. The chunk is the
bucketing window, which bounds the sort's memory and keeps order-restoring local.

Memory. At any time the process holds one chunk of input (the window being cut into batches),
the few batches queued by the reader thread, the batch being computed and the output buffers
of chunks in flight (one for the local executor). The chunk size is chosen so that a chunk of
input or output is at most ``CHUNK_BUDGET`` bytes (or one batch, if a batch is larger), so
peak memory does not depend on N.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import registry
from .._arrays import device_of, is_out_of_memory, kind_of, parse_device
from .._dtypes import host_dtype
from ..backend_api import Problem
from .apply import EMITS, apply_batch, output_shape
from .errors import RunFailure, UsageError
from .executors import LocalExecutor, OutOfMemory, _HostStaging
from .prefetch import prefetch
from .sinks import (
    Manifest,
    OutputLock,
    check_removable,
    is_zarr_output,
    manifest_path,
    open_writer,
    output_matches,
    remove_output,
    remove_stale_temporaries,
)
from .sources import _import_zarr, lengths_beside, open_input, open_lengths

CHUNK_BUDGET = 32 * 2**20          # bytes of input or output per chunk, at most 8 batches
MAX_BATCHES_PER_CHUNK = 8
PREFETCH_DEPTH = 2                 # batches read ahead of the one being computed


@dataclass
class RunOptions:
    model: str
    input: str
    output: str
    batch_size: int = 256
    emit: str = "last"
    backend: str | None = None
    dtype: str | None = None            # None: the model's own dtype
    device: str = "cpu"
    lengths: str | None = None          # a path; None: look beside INPUT (see lengths_beside)
    find_lengths: bool = True
    chunk_rows: int | None = None       # None: derived from CHUNK_BUDGET
    bucket: bool = True
    overwrite: bool = False
    quiet: bool = False
    scheduler: str | None = None        # a Dask scheduler address: run there


def run(opts: RunOptions, *, executor=None, log: Callable[[str], None] | None = None
        ) -> dict[str, Any]:
    """Run the job; returns the summary. Raises UsageError / RunFailure for the errors a user
    can act on (see :mod:`rnn_gpu.batch.errors`)."""
    from tqdm import tqdm

    started = time.perf_counter()
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    note = (lambda msg: None) if opts.quiet else log
    # Everything that can be checked is checked before the output is touched.
    _check_options(opts)
    _check_output_path(opts)
    model = _load_model(opts)
    source = open_input(opts.input)
    N, T, input_size = source.shape
    if input_size != model.input_size:
        raise UsageError(f"INPUT: expected sequences of input_size {model.input_size} (the "
                         f"model's), shape (N, T, {model.input_size}); got shape {source.shape}")
    lengths, lengths_identity = _lengths(opts, N, T, note)
    try:
        out_shape = output_shape(model, N, T, opts.emit)
    except ValueError as exc:
        raise UsageError(f"--emit: {str(exc).removeprefix('emit: ')}") from None
    out_dtype = _output_dtype(model, opts.emit)
    chunk_rows = opts.chunk_rows or _chunk_rows(opts.batch_size, source, out_shape, out_dtype)
    chunk_rows = max(1, min(chunk_rows, N))
    backend_name = _preflight(model, opts, input_size, lengths, N, T)
    pinned = None if _on_workers(opts) else backend_name
    job = _job(opts, model, source, lengths_identity, chunk_rows, out_shape, out_dtype)
    parent = os.path.dirname(os.path.abspath(opts.output))
    if not os.path.isdir(parent):
        raise UsageError(f"OUTPUT: the directory {parent!r} does not exist")
    plan = _Plan(source, lengths, chunk_rows, opts.batch_size, opts.bucket, model.dtype)
    lock = None
    try:
        # The lock first: a Dask client connected before a refused lock was left open
        lock = OutputLock(opts.output)
        try:
            checked = _check_output(opts, job, out_shape, out_dtype)
            # Only now the cluster: every local check is done, so a usage error costs no
            # connection (nor the wait for a scheduler that is down). Nothing is written yet
            # either, so a scheduler that cannot be reached is still a usage error.
            executor = executor or _executor(opts, log)
        except UsageError:
            # refused before anything was written: the lock file goes too, if this run made it
            # (the checks above need the lock, so it cannot come after them; see OutputLock)
            lock.discard()
            raise
        remove_stale_temporaries(opts.output)
        manifest, fresh = _open_manifest(opts, job, -(-N // chunk_rows), checked, note)
        counts = _execute(opts, model, plan, manifest, fresh, executor, out_shape, out_dtype,
                          note, pinned or opts.backend)
    finally:
        if lock is not None:
            lock.release()
        if executor is not None:
            executor.close()
    return {
        "sequences": N, "computed": counts["computed"],
        "seconds": round(time.perf_counter() - started, 3),
        "sequences_per_s": (round(counts["computed"] / counts["seconds"], 1)
                            if counts["computed"] else None),
        "backend": backend_name, "device": opts.device, "executor": executor.name,
        "emit": opts.emit, "output": opts.output, "shape": list(out_shape),
        "batches": counts["batches"],
        "batches_retried": getattr(executor, "batches_retried", 0),
        "chunks": manifest.chunks, "chunks_written": counts["written"],
        "chunks_skipped": counts["skipped"],
    }


def _execute(opts, model, plan, manifest, fresh, executor, out_shape, out_dtype, note,
             backend: str | None) -> dict[str, Any]:
    """The loop: batches to the executor, outputs into chunk buffers, full chunks to disk."""
    from tqdm import tqdm

    n_chunks, chunk_rows = manifest.chunks, manifest.chunk_rows
    try:
        writer = open_writer(opts.output, out_shape, out_dtype, chunk_rows, create=fresh)
    except OSError as exc:
        raise RunFailure(f"OUTPUT: cannot {'create' if fresh else 'open'} {opts.output!r}: "
                         f"{exc}") from None
    skipped = len(manifest.done)
    if skipped == n_chunks and n_chunks:
        note(f"rnn-gpu run: nothing to do: all {n_chunks} chunks of {opts.output} are written")
    elif skipped:
        note(f"rnn-gpu run: resuming: {skipped} of {n_chunks} chunks already written")
    pending = [c for c in range(n_chunks) if c not in manifest.done]
    bar = tqdm(total=plan.source.shape[0], initial=sum(plan.rows(c) for c in manifest.done),
               unit="seq", unit_scale=True, file=sys.stderr, disable=opts.quiet,
               dynamic_ncols=True, desc="rnn-gpu run")
    counts = {"written": 0, "batches": 0, "computed": 0, "skipped": skipped}
    started = time.perf_counter()
    buffers: dict[int, np.ndarray] = {}       # chunks in flight (one, locally)
    received: dict[int, int] = {}
    batches = results = None
    try:
        batches = prefetch(plan.batches(pending), PREFETCH_DEPTH)
        results = executor.map(model, batches, emit=opts.emit, backend=backend)
        for (chunk, number), out in results:
            counts["batches"] += 1
            if chunk not in buffers:
                buffers[chunk] = np.zeros((plan.rows(chunk), *out_shape[1:]), out_dtype)
            positions = plan.positions.pop((chunk, number))
            if out.ndim == 3:         # padded to this batch's longest sequence only
                buffers[chunk][positions, :out.shape[1]] = out
            else:
                buffers[chunk][positions] = out
            received[chunk] = received.get(chunk, 0) + 1
            bar.update(len(positions))
            if received[chunk] == plan.batch_count[chunk]:
                _write_chunk(writer, manifest, chunk, buffers.pop(chunk), opts)
                del received[chunk]
                counts["written"] += 1
                counts["computed"] += plan.rows(chunk)
    except OutOfMemory as exc:
        raise RunFailure(f"{exc}. {_kept(manifest)}") from None
    except registry.BackendError as exc:
        raise RunFailure(f"--backend: {_cli_words(exc, opts)}. {_kept(manifest)}") from None
    except OSError as exc:             # writing errors are RunFailures already: this is reading
        if type(exc).__module__.startswith("distributed"):   # CommClosedError is an OSError
            raise RunFailure(f"--scheduler: the connection to the Dask cluster was lost "
                             f"({type(exc).__name__}: {exc}). {_kept(manifest)}") from None
        raise RunFailure(f"INPUT: reading {opts.input!r} failed: {exc}. {_kept(manifest)}"
                         ) from None
    except Exception as exc:
        # A batch that failed on a Dask worker (rnn_gpu.dask.BatchFailedError, matched by name
        # so that the local path never imports it): the worker's error, without a traceback.
        if type(exc).__name__ != "BatchFailedError":
            raise
        raise RunFailure(f"{exc}. {_kept(manifest)}") from None
    finally:
        # Closed now, not when the traceback lets go of them: the reader thread stops
        for generator in (results, batches):
            close = getattr(generator, "close", None)
            if close is not None:
                close()
        bar.close()
        writer.close()
    counts["seconds"] = time.perf_counter() - started
    return counts


class _Plan:
    """Cuts chunks into batches (bucketed by length) and remembers where each batch goes."""

    def __init__(self, source, lengths, chunk_rows, batch_size, bucket, model_dtype):
        self.source, self.lengths, self.chunk_rows = source, lengths, chunk_rows
        self.batch_size, self.bucket = batch_size, bucket
        # cast on the host to the model's dtype (float64 data into a float32 model, say);
        # NumPy has no bfloat16, so such data goes as it is and the backend decides.
        self.dtype = np.dtype(model_dtype) if model_dtype != "bfloat16" else None
        self.positions: dict[tuple[int, int], np.ndarray] = {}
        self.batch_count: dict[int, int] = {}

    def rows(self, chunk: int) -> int:
        start = chunk * self.chunk_rows
        return min(self.source.shape[0], start + self.chunk_rows) - start

    def batches(self, chunks) -> Iterator[tuple[tuple[int, int], np.ndarray, Any]]:
        for chunk in chunks:
            start = chunk * self.chunk_rows
            stop = start + self.rows(chunk)
            window = self.source.read(start, stop)
            lengths = None if self.lengths is None else self.lengths[start:stop]
            order = (np.argsort(lengths, kind="stable") if self.bucket and lengths is not None
                     else np.arange(stop - start))
            cuts = range(0, stop - start, self.batch_size)
            self.batch_count[chunk] = len(cuts)
            for number, cut in enumerate(cuts):
                positions = order[cut:cut + self.batch_size]
                steps = window.shape[1] if lengths is None else int(lengths[positions].max())
                x = window[positions, :steps]
                if self.dtype is not None:
                    x = x.astype(self.dtype, copy=False)
                self.positions[(chunk, number)] = positions
                yield ((chunk, number), np.ascontiguousarray(x),
                       None if lengths is None else lengths[positions])
            del window


def _write_chunk(writer, manifest: Manifest, chunk: int, rows: np.ndarray, opts: RunOptions
                 ) -> None:
    start = chunk * manifest.chunk_rows
    try:
        writer.write(start, rows)
        manifest.mark_done(chunk)          # only after the rows are on disk
    except OSError as exc:
        what = ("no space left on device" if exc.errno == errno.ENOSPC
                else f"{type(exc).__name__}: {exc.strerror or exc}")
        raise RunFailure(f"OUTPUT: {what} while writing chunk {chunk} (rows "
                         f"{start}:{start + len(rows)}) of {opts.output!r}. "
                         f"{_kept(manifest)}") from None


def _kept(manifest: Manifest) -> str:
    n = len(manifest.done)
    return (f"The {n} chunk{'s' if n != 1 else ''} recorded in {manifest.path!r} "
            f"{'are' if n != 1 else 'is'} kept; rerun the same command to resume.")


def _check_options(opts: RunOptions) -> None:
    if opts.emit not in EMITS:
        raise UsageError(f"--emit: expected one of {', '.join(EMITS)}, got {opts.emit!r}")
    if opts.batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive number, got {opts.batch_size}")
    if opts.chunk_rows is not None and opts.chunk_rows < 1:
        raise UsageError(f"--chunk-size: expected a positive number, got {opts.chunk_rows}")
    if opts.dtype is not None and opts.dtype not in ("float16", "bfloat16", "float32",
                                                     "float64"):
        raise UsageError(f"--dtype: expected float16, bfloat16, float32 or float64, got "
                         f"{opts.dtype!r}")


def _load_model(opts: RunOptions):
    import rnn_gpu as rg
    from rnn_gpu.io import WeightsFileError
    from rnn_gpu.layers import RecurrentLayer

    try:
        model = rg.load(opts.model)
    except FileNotFoundError:
        raise UsageError(f"MODEL: no such file {opts.model!r}") from None
    except (WeightsFileError, OSError) as exc:
        raise UsageError(f"MODEL: expected a file written by rnn_gpu.save: {exc}") from None
    if not isinstance(model, RecurrentLayer):
        raise UsageError(f"MODEL: expected a recurrent layer (RNN, LSTM, GRU, TwoStageRNN), "
                         f"{opts.model!r} holds a {type(model).__name__}")
    if opts.dtype is not None and opts.dtype != model.dtype:
        config = model.config()
        config.pop("cell")
        recast = type(model)(**{**config, "dtype": opts.dtype})
        recast.load_state_dict(model.state_dict())
        recast.readout = model.readout
        if model.readout is not None and opts.dtype in ("float32", "float64"):
            recast.readout = _recast_readout(model.readout, opts.dtype)
        model = recast
    model.eval()
    try:
        if _on_workers(opts):
            parse_device(opts.device)       # only its spelling: the workers have the device
        else:
            model.to(opts.device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise UsageError(f"--device: cannot use {opts.device!r}: {exc}") from None
    return model


def _on_workers(opts: RunOptions) -> bool:
    """Whether the device is only the Dask workers' business: the client (this process) may
    have no GPU, so it keeps the model on the CPU (DaskExecutor ships it, and each worker moves
    it to ``--device``) and cannot try the device or a GPU backend out itself."""
    return opts.scheduler is not None and opts.device.strip().lower() != "cpu"


def _recast_readout(readout, dtype: str):
    """The readout in ``dtype`` (it computes in NumPy, so only float32 and float64 exist)."""
    from rnn_gpu.readout import Readout

    recast = Readout(**{**readout.config(), "dtype": dtype})
    recast.load_state_dict(readout.state_dict())
    return recast


def _output_dtype(model, emit: str) -> np.dtype:
    if emit == "probs":                 # the readout's own dtype
        return np.dtype(model.readout.dtype)
    return np.dtype(host_dtype(model.dtype))


def _lengths_path(opts: RunOptions) -> str | None:
    """--lengths, or without it the file found beside INPUT (unless --no-lengths)."""
    if opts.lengths is None and opts.find_lengths:
        found = lengths_beside(opts.input)
        # OUTPUT named like INPUT's lengths (data.lengths.npy beside data.npy): not lengths,
        # but this job's own output on a resume
        if found is not None and os.path.abspath(found) == os.path.abspath(opts.output):
            return None
        return found
    return opts.lengths


def _lengths(opts: RunOptions, N: int, T: int, note) -> tuple[np.ndarray | None, dict | None]:
    path = _lengths_path(opts)
    if path is not None and opts.lengths is None:
        note(f"rnn-gpu run: lengths from {path} (found beside INPUT; --lengths PATH picks "
             "another file, --no-lengths none)")
    if path is None:
        return None, None
    return open_lengths(path, N, T)


def _check_output_path(opts: RunOptions) -> None:
    """OUTPUT must be none of the job's own files (nor inside INPUT's shard directory), and
    a directory only as a zarr output: --overwrite deletes what OUTPUT names, so a slip of the
    command line must not cost the input, the model or an unrelated directory."""
    out = os.path.realpath(opts.output)
    named = {"INPUT": opts.input, "MODEL": opts.model, "--lengths": _lengths_path(opts)}
    for arg, path in named.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if out == real:
            raise UsageError(f"OUTPUT: {opts.output!r} is also {arg} ({path!r}); write the "
                             f"results to another path")
        if os.path.isdir(real) and out.startswith(real + os.sep):
            raise UsageError(f"OUTPUT: {opts.output!r} lies inside {arg}, the directory "
                             f"{path!r} (its .npy files are read as shards); write the results "
                             f"elsewhere")
    if os.path.isdir(opts.output) and not is_zarr_output(opts.output):
        raise UsageError(f"OUTPUT: {opts.output!r} is a directory; expected a .npy file path, "
                         f"or a zarr directory ending in .zarr")
    if not is_zarr_output(opts.output) and not opts.output.endswith(".npy"):
        # the file is NPY whatever its name: out.txt or out.csv would mislead whoever opens it
        raise UsageError(f"OUTPUT: expected a path ending in .npy (a NumPy file) or .zarr (a "
                         f"zarr array), got {opts.output!r}")
    if is_zarr_output(opts.output):
        # here, not when the sink opens: by then the manifest was written and the lock file
        # made, and a run refused for want of zarr left both beside OUTPUT
        _import_zarr("OUTPUT")


def _chunk_rows(batch_size: int, source, out_shape, out_dtype) -> int:
    in_row = int(np.prod(source.shape[1:])) * source.dtype.itemsize
    out_row = int(np.prod(out_shape[1:])) * out_dtype.itemsize
    per_batch = batch_size * max(in_row, out_row, 1)
    return batch_size * max(1, min(MAX_BATCHES_PER_CHUNK, CHUNK_BUDGET // per_batch))


def _preflight(model, opts: RunOptions, input_size: int, lengths: np.ndarray | None, N: int,
               T: int) -> str:
    """Before anything is written: choose the backend for the job's largest batch (an unknown
    backend, a device nothing serves, a dtype or size the backend declines fail here, as usage
    errors), then run one tiny batch on it (a device that does not work, a model that does not
    fit). Returns the name of the backend that serves every batch of the job."""
    if _on_workers(opts):
        # The shapes were checked by the caller; what the device and backend can do only the
        # workers can tell, and a batch they cannot run fails the run there (exit code 1).
        if opts.backend is not None and opts.backend not in registry.names():
            raise UsageError(f"--backend: unknown name {opts.backend!r}; registered backends "
                             f"are {registry.names()}")
        return opts.backend or "auto"
    has_lengths = lengths is not None
    steps = T if lengths is None or N == 0 else int(lengths.max())
    dtype = host_dtype(model.dtype)
    x = np.zeros((1, 1, input_size), dtype)
    staged = _HostStaging(opts.device).to_device(x)
    # who chose the backend, in the command line's words (the registry's name the Python API)
    arg = ("--backend" if opts.backend else
           registry.ENV_VAR if os.environ.get(registry.ENV_VAR) else "--device/--dtype")
    # The job's largest batch: a backend that serves one step of one sequence may decline
    # the batches of the run (a size limit), which the README promises to say before writing.
    problem = Problem(cell=model._spec.kind, activations=model._activations(),
                      dtype=model.dtype, device=device_of(staged), input_kind=kind_of(staged),
                      seq_len=steps, batch=max(1, min(opts.batch_size, N)),
                      input_size=input_size, hidden_size=model.hidden_size,
                      proj_size=model.proj_size, num_layers=model.num_layers,
                      bidirectional=model.bidirectional, bias=model.bias,
                      has_lengths=has_lengths)
    try:
        chosen = registry.select(problem, opts.backend).name
    except registry.BackendError as exc:
        raise UsageError(f"{arg}: {_cli_words(exc, opts)}") from None
    except ValueError as exc:        # --backend (or RNN_GPU_BACKEND) names no backend
        if "not registered" not in str(exc):
            raise
        raise UsageError(f"{arg}: {_cli_words(exc, opts)}") from None
    try:
        apply_batch(model, staged, np.ones(1, np.int64) if has_lengths else None,
                    emit=opts.emit, backend=chosen)
    except registry.BackendError:
        pass            # declines one step of one sequence, serves the job's batches: fine
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise RunFailure(f"out of memory ({type(exc).__name__}) running a single one-step "
                         "sequence: the model does not fit this device") from None
    return chosen


def _cli_words(exc: Exception, opts: RunOptions) -> str:
    """A registry error in the command line's words. Every batch runs on the backend chosen
    before the run (pinned, so that the summary's backend is the one that ran them all)."""
    who = "--backend" if opts.backend else "the choice made before the run"
    return str(exc).replace("(chosen by backend=)", f"(chosen by {who})")


def _job(opts, model, source, lengths_identity, chunk_rows, out_shape, out_dtype) -> dict:
    """What the output depends on. Where it runs (--backend, --device, --scheduler) is left
    out on purpose: a job started on one machine may be finished on another."""
    job = {
        "model_sha256": _model_fingerprint(model),
        "model_config": model.config(),
        "input": source.identity(),
        "lengths": lengths_identity,
        "emit": opts.emit, "batch_size": opts.batch_size, "bucket": opts.bucket,
        "chunk_rows": chunk_rows, "output_shape": list(out_shape), "output_dtype": out_dtype.str,
    }
    return json.loads(json.dumps(job))       # the form it takes after a round trip to disk


def _check_output(opts, job, out_shape, out_dtype) -> tuple[dict | None, bool]:
    """Whether OUTPUT may be written by this job: (the stored manifest, whether to resume it).
    Raises UsageError if not. Only reads: :func:`_open_manifest` acts on the answer, after the
    executor has connected."""
    path, chunk_rows = manifest_path(opts.output), job["chunk_rows"]
    if opts.overwrite:
        check_removable(opts.output)
        return None, False
    stored = Manifest.read(path)
    exists = os.path.lexists(opts.output)
    if stored is None and exists:
        raise UsageError(f"OUTPUT: {opts.output!r} exists and was not written by this job "
                         f"(no manifest {path!r} beside it); pass --overwrite to replace it")
    if stored is not None and stored.get("job") != job:
        differs = sorted(k for k in set(job) | set(stored.get("job") or {})
                         if (stored.get("job") or {}).get(k) != job.get(k))
        raise UsageError(f"OUTPUT: {opts.output!r} belongs to a different job (it differs in: "
                         f"{', '.join(differs)}); rerun with the same arguments to resume it, "
                         "or pass --overwrite to start again")
    if stored is not None and exists and output_matches(opts.output, out_shape, out_dtype,
                                                         chunk_rows):
        return stored, True
    if exists:
        check_removable(opts.output)
    return stored, False


def _open_manifest(opts, job, n_chunks, checked: tuple[dict | None, bool], note
                   ) -> tuple[Manifest, bool]:
    """The job's manifest, and whether the output has to be created afresh. ``checked`` is
    :func:`_check_output`'s answer."""
    path, chunk_rows = manifest_path(opts.output), job["chunk_rows"]
    stored, resume = checked
    if resume:
        return Manifest.from_dict(path, stored), False
    if stored is not None and stored.get("done"):
        note(f"rnn-gpu run: OUTPUT {opts.output!r} is missing or damaged; starting again")
    if opts.overwrite or os.path.lexists(opts.output):
        try:
            remove_output(opts.output)
        except OSError as exc:      # a read-only folder, a file in use: say which, no traceback
            raise RunFailure(f"OUTPUT: cannot remove the old output {opts.output!r} to start "
                             f"again: {exc}") from None
    manifest = Manifest(path, job, chunk_rows, n_chunks)
    try:
        manifest.save()          # first the manifest: a crash now leaves a job with no chunks
    except OSError as exc:
        raise RunFailure(f"OUTPUT: cannot write the manifest {path!r}: {exc}") from None
    return manifest, True


def _executor(opts: RunOptions, log):
    if opts.scheduler is None:
        return LocalExecutor(device=opts.device, log=log)
    try:
        from rnn_gpu.dask import DaskExecutor

        return DaskExecutor(opts.scheduler, device=opts.device)
    except ImportError as exc:              # rnn_gpu.dask imports dask only when it is used
        raise UsageError(f"--scheduler: running on Dask needs dask and distributed ({exc}); "
                         'pip install "rnn-gpu[dask]"') from None
    except (OSError, TimeoutError, ValueError) as exc:
        # the Python API's messages name its argument, ``address``: here that is --scheduler
        raise UsageError(f"--scheduler: {str(exc).removeprefix('address: ')}") from None


def _model_fingerprint(model) -> str:
    """SHA-256 of the model's config and weights (and its readout's).

    Not of the file: safetensors writes its metadata in no fixed order, so saving the same
    model twice can give different bytes, and that must not turn the job into another one.
    """
    digest = hashlib.sha256()
    parts = [("", model)] + ([("readout.", model.readout)] if model.readout is not None else [])
    for prefix, part in parts:
        digest.update(json.dumps(part.config(), sort_keys=True).encode())
        for name, value in sorted(part.state_dict().items()):
            value = np.ascontiguousarray(value)
            digest.update(f"{prefix}{name} {value.dtype.str} {value.shape}".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()
