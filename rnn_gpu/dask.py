"""Dask beyond one machine (DESIGN §8): map a model over the batch axis of a Dask array, or send
the batches of ``rnn-gpu run`` to a running Dask cluster.

    import dask.array as da, rnn_gpu as rg, rnn_gpu.dask
    x = da.from_zarr("inputs.zarr")                       # (N, T, I), chunked along N
    y = rnn_gpu.dask.apply(rg.load("model.safetensors"), x, emit="last")   # lazy, (N, D*H)
    y.to_zarr("outputs.zarr")

Dask is optional: this module imports ``dask`` and ``distributed`` only when a function here is
called, so ``import rnn_gpu`` (and even ``import rnn_gpu.dask``) never does.

The model travels to the workers as its config and NumPy weights (:class:`_ShippedModel`), the
same contract as a ``.safetensors`` file, never as a pickled layer: a layer may hold torch or
CuPy arrays on a GPU the worker does not have, and its private attributes are not a wire format.
Each worker rebuilds the layer once and reuses it for every chunk it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from . import _checks, registry
from ._arrays import device_of, kind_of, parse_device
from ._dtypes import host_dtype
from .batch.apply import EMITS, apply_batch, output_shape

__all__ = ["BatchFailedError", "DaskExecutor", "apply"]

_INSTALL_HINT = 'pip install "rnn-gpu[dask]"'
_worker_log = logging.getLogger("rnn_gpu.dask")      # a worker's notes go to its log


class BatchFailedError(RuntimeError):
    """A batch failed on a Dask worker; ``key`` names it, ``__cause__`` is the worker's error."""

    def __init__(self, key: Any, error: BaseException):
        super().__init__(f"batch {key!r} failed on a Dask worker: "
                         f"{type(error).__name__}: {error}")
        self.key = key


def _require(module: str):
    """Import an optional Dask module, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"rnn_gpu.dask needs dask and distributed ({module} is missing: "
                          f"{exc}); {_INSTALL_HINT}") from None


# ---------------------------------------------------------------------- the model on the wire

def _as_layer(model):
    """``model`` as an rnn_gpu layer: a layer as is, a path loaded with :func:`rnn_gpu.load`."""
    from .layers import RecurrentLayer

    if isinstance(model, (str, os.PathLike)):
        from .io import load

        model = load(model)
    if not isinstance(model, RecurrentLayer):
        raise TypeError(f"model: expected an rnn_gpu layer (LSTM, GRU, RNN, TwoStageRNN) or "
                        f"the path of a .safetensors file, got {type(model).__name__}")
    return model


_PROCESS_LOCAL = ("_lock", "_models", "_per_thread")     # rebuilt after unpickling, never sent


class _ShippedModel:
    """A layer (and its readout) as config + host NumPy weights, rebuilt lazily on a worker.

    Pickling keeps only the description; the rebuilt layers are a per-process cache (one per
    device), so a worker that receives this object once builds the layer once.
    """

    def __init__(self, model):
        readout = getattr(model, "readout", None)
        self.config = model.config()
        self.state = model.state_dict()                    # host NumPy copies, even from a GPU
        self.readout_config = readout.config() if readout is not None else None
        self.readout_state = readout.state_dict() if readout is not None else None
        self.device = model.device
        self.token = self._digest()
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Any] = {}
        self._per_thread = threading.local()        # LocalExecutors: their buffers aren't shared

    def _digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.config, self.readout_config]).encode())
        for tensors in (self.state, self.readout_state or {}):
            for name, arr in sorted(tensors.items()):
                h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _PROCESS_LOCAL}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __dask_tokenize__(self) -> str:
        return self.token               # same weights -> same graph keys, without pickling

    def __sizeof__(self) -> int:        # what Dask's memory accounting sees
        return sum(a.nbytes for t in (self.state, self.readout_state or {}) for a in t.values())

    def output_dtype(self, emit: str) -> np.dtype:
        if emit == "probs":
            return np.dtype(self.readout_config["dtype"])
        # bfloat16 has no NumPy dtype; its outputs come back as float32, exactly.
        return np.dtype(host_dtype(self.config["dtype"]))

    def model(self, device: str):
        """The layer on ``device``, built on first use in this process."""
        with self._lock:
            if device not in self._models:
                self._models[device] = self._build().to(device)
            return self._models[device]

    def local_executor(self, device: str):
        """This thread's LocalExecutor for ``device``: it stages batches onto the GPU and halves
        a batch that runs out of memory, and remembers the size that fit, as a local run does."""
        from .batch.executors import LocalExecutor

        executors = self._per_thread.__dict__.setdefault("executors", {})
        if device not in executors:
            executors[device] = LocalExecutor(device=device, log=_worker_log.warning)
        return executors[device]

    def _build(self):
        from .layers import LAYERS
        from .readout import Readout

        config = dict(self.config)
        model = LAYERS[config.pop("cell")](**config)
        model.load_state_dict(self.state)
        if self.readout_config is not None:
            model.readout = Readout(**self.readout_config)
            model.readout.load_state_dict(self.readout_state)
        return model.eval()


# ---------------------------------------------------------------------- apply over a dask array

def apply(model, array, lengths=None, *, emit: str = "last", backend: str | None = None,
          batch_size: int | None = None):
    """Map ``model`` over the batch axis of ``array``; returns a lazy ``dask.array.Array``.

    ``model``: an rnn_gpu layer (with ``.readout`` for ``emit="probs"``) or the path of a
    ``.safetensors`` file. ``array``: a Dask array ``(N, T, input_size)``, sequence-major as on
    disk; chunks along N are the unit of work, and the T and feature axes are rechunked to one
    chunk each (a sequence cannot be split across tasks). ``lengths``: optional ``(N,)`` integer
    lengths, NumPy or Dask (whole numbers stored as floats are taken too, as the layers take
    them); they are rechunked to match ``array``'s rows.

    Each chunk goes through :func:`rnn_gpu.batch.apply_batch`, in sub-batches of at most
    ``batch_size`` rows when given (to bound a worker's memory). The result is chunked along N
    like ``array``: ``(N, D*H)`` for ``emit="last"``, ``(N, T, D*H)`` for ``"sequence"``,
    ``(N, T, C)`` for ``"probs"``. NumPy chunks run on the worker's CPU; a CuPy chunk (GPU
    workers with dask-cuda) is handed to the model as is, the model is moved to that chunk's
    GPU, and the result chunk is CuPy too.
    """
    da = _require("dask.array")
    dask = _require("dask")
    model = _as_layer(model)
    _check_emit(model, emit)
    registry.check_name(backend)      # at apply(), not at compute()
    shipped = _ShippedModel(model)
    array = _check_array(da, array, shipped)
    batch_size = _check_batch_size(batch_size)
    lengths = _align_lengths(da, lengths, array)

    width = output_shape(model, 0, 0, emit)[-1]
    dtype = shipped.output_dtype(emit)
    out_ind = "nw" if emit == "last" else "ntw"
    args = [array, "nti", lengths, "n" if lengths is not None else None,
            dask.delayed(shipped, pure=True), None]
    meta = da.utils.meta_from_array(array, ndim=len(out_ind), dtype=dtype)  # NumPy or CuPy
    return da.blockwise(_apply_block, out_ind, *args, new_axes={"w": width}, concatenate=True,
                        dtype=dtype, meta=meta, token="rnn_gpu-apply", emit=emit,
                        backend=backend, batch_size=batch_size)


def _apply_block(x, lengths, shipped: _ShippedModel, *, emit: str, backend: str | None,
                 batch_size: int | None):
    """One chunk on a worker: the model runs where the chunk lives (CPU, or the chunk's GPU),
    so a model placed on a GPU by the caller still runs NumPy chunks on CPU-only workers."""
    on_gpu = kind_of(x) == "cupy"
    model = shipped.model(device_of(x))
    B = x.shape[0]
    step = batch_size or max(B, 1)
    out = None
    for start in range(0, max(B, 1), step):
        rows = slice(start, start + step)
        part = apply_batch(model, x[rows], None if lengths is None else lengths[rows],
                           emit=emit, backend=backend)
        if out is None:
            if part.shape[0] == B:          # one sub-batch: no copy
                out = part
                break
            out = np.empty((B, *part.shape[1:]), dtype=part.dtype)
        out[rows] = part
    out = out.astype(shipped.output_dtype(emit), copy=False)
    if on_gpu:
        import cupy

        return cupy.asarray(out)
    return out


def _check_emit(model, emit: str) -> None:
    if emit not in EMITS:
        raise ValueError(f"emit: expected one of {', '.join(EMITS)}, got {emit!r}")
    output_shape(model, 0, 0, emit)              # "probs" without a readout says so here


def _check_array(da, array, shipped: _ShippedModel):
    if not isinstance(array, da.Array):
        raise TypeError(f"array: expected a dask.array.Array of shape (N, T, input_size), got "
                        f"{type(array).__name__}; wrap NumPy data with "
                        f"dask.array.from_array(x, chunks=(rows, -1, -1))")
    if array.ndim != 3:
        raise ValueError(f"array: expected shape (N, T, input_size), got {array.ndim} "
                         f"dimensions, shape {array.shape}")
    if any(np.isnan(s) for s in array.shape[1:]):
        raise ValueError(f"array: the T and feature sizes must be known, got shape "
                         f"{array.shape}; call array.compute_chunk_sizes() first")
    input_size = shipped.config["input_size"]
    if array.shape[2] != input_size:
        raise ValueError(f"array: expected input_size={input_size} features in the last "
                         f"axis, got shape {array.shape}")
    model_dtype = shipped.config["dtype"]
    if model_dtype != "bfloat16" and np.dtype(array.dtype) != np.dtype(model_dtype):
        raise TypeError(f"array: dtype {array.dtype} does not match the model's {model_dtype}; "
                         f"convert with array.astype({model_dtype!r})")
    if array.numblocks[1] > 1 or array.numblocks[2] > 1:
        array = array.rechunk({1: -1, 2: -1})    # one task sees whole sequences
    return array


def _check_batch_size(batch_size):
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
    return int(batch_size)


def _align_lengths(da, lengths, array):
    """``lengths`` as a 1-d integer Dask array chunked like ``array``'s rows (or None)."""
    if lengths is None:
        return None
    N = array.shape[0]
    if not isinstance(lengths, da.Array):
        lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (not np.isnan(N) and lengths.shape[0] != N):
        raise ValueError(f"lengths: expected shape ({N},), one length per sequence of array, "
                         f"got shape {tuple(lengths.shape)}")
    # Floats holding whole numbers are lengths too, as the layers and `rnn-gpu run --lengths`
    # take them (a lengths file saved as float64 is common); fractions are refused below
    # (NumPy) or by the layer when the chunk runs (Dask), with the layers' message.
    if np.dtype(lengths.dtype).kind not in "iuf":
        raise TypeError(f"lengths: expected integers, got dtype {lengths.dtype}")
    if any(np.isnan(c) for c in array.chunks[0]):
        raise ValueError("lengths: array has unknown chunk sizes along N, so lengths cannot be "
                         "aligned with it; call array.compute_chunk_sizes() first")
    if isinstance(lengths, da.Array):           # checked per chunk, where they are read
        return lengths.rechunk((array.chunks[0],))
    T = array.shape[1]
    _checks.whole_lengths(lengths)
    bad = np.flatnonzero((lengths < 0) | (lengths > T))
    if bad.size:             # in memory already: checked now, not deep in a task at compute()
        raise ValueError(f"lengths: expected every length in [0, T={T}], got "
                         f"{lengths[bad[:5]].tolist()} (at index {int(bad[0])})")
    return da.from_array(lengths.astype(np.int64, copy=False), chunks=(array.chunks[0],))


# ---------------------------------------------------------------------- executor for `run`

def _check_address(address) -> None:
    """A malformed address is a ValueError before any Client exists: a Client that fails to
    parse its address is left half-made, and its finaliser then waits 20 s to close."""
    from distributed.comm.addressing import parse_address, parse_host_port

    if not isinstance(address, str):
        raise TypeError(f"address: expected a scheduler address (tcp://host:8786) or a "
                        f"distributed.Client, got {type(address).__name__}")
    try:
        scheme, location = parse_address(address)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except ValueError as exc:
        raise ValueError(f"address: expected a scheduler address like tcp://host:8786, got "
                         f"{address!r} ({exc})") from None


class DaskExecutor:
    """Runs the batches of ``rnn-gpu run`` on a Dask cluster (``--scheduler ADDRESS``).

    Same protocol as the local executor: ``map`` yields ``(key, output)`` as batches complete,
    pulling batches lazily and keeping at most ``max_in_flight`` on the cluster (default: two
    per worker thread) so that the client's memory stays bounded. The model is sent to every
    worker once per ``map``; each batch travels to one worker and its output back. On the
    worker a batch goes through :class:`rnn_gpu.batch.executors.LocalExecutor`, so staging onto
    the GPU and halving a batch that runs out of memory work as in a local run;
    ``batches_retried`` adds up the halvings of all workers.

    ``address``: a scheduler address (``tcp://host:8786``) or a ``distributed.Client``.
    ``device``: where the workers run the model ("cpu", "cuda"); default: the device of the
    model given to ``map``. With dask-cuda each worker sees its own GPU as ``cuda:0``.
    """

    def __init__(self, address, *, device: str | None = None, max_in_flight: int | None = None,
                 connect_timeout: float = 10.0):
        distributed = _require("distributed")
        self.device = None if device is None else parse_device(device)
        # checked before connecting: a client opened and then refused was left open
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or
                                          not isinstance(max_in_flight, int) or
                                          max_in_flight < 1):
            raise ValueError(f"max_in_flight: expected a positive int or None, got "
                             f"{max_in_flight!r}")
        if isinstance(address, distributed.Client):
            self._client, self._owns_client = address, False
        else:
            _check_address(address)
            try:
                self._client = distributed.Client(address, timeout=connect_timeout,
                                                  set_as_default=False)
            except (OSError, TimeoutError, ValueError, TypeError) as exc:
                raise ConnectionError(f"address: cannot connect to a Dask scheduler at "
                                      f"{address!r}: {exc}") from None
            self._owns_client = True
        self._max_in_flight = max_in_flight
        self.batches_retried = 0
        self.name = f"dask {self._client.scheduler.address}"

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect (a Client passed in by the caller is left open: it is theirs)."""
        if self._owns_client:
            self._client.close()

    def in_flight_limit(self) -> int:
        if self._max_in_flight is not None:
            return self._max_in_flight
        return max(2, 2 * sum(self._client.nthreads().values()))

    def map(self, model, batches: Iterable[tuple[Any, Any, Any]], *, emit: str,
            backend: str | None) -> Iterator[tuple[Any, np.ndarray]]:
        """Yield ``(key, apply_batch(model, x, lengths, emit=emit, backend=backend))`` for each
        ``(key, x, lengths)`` of ``batches``, in order of completion. A batch that fails on a
        worker raises :class:`BatchFailedError` naming its key; the rest are cancelled."""
        model = _as_layer(model)                     # errors here, before anything is sent
        _check_emit(model, emit)
        shipped = _ShippedModel(model)
        device = self.device or shipped.device
        return self._map(shipped, device, iter(batches), emit, backend)

    def _map(self, shipped, device, batches, emit, backend):
        distributed = _require("distributed")
        client = self._client
        model_future = client.scatter(shipped, broadcast=True, hash=False)
        pending: dict[Any, Any] = {}                # future -> (batch key, its data)
        done = distributed.as_completed(loop=client.loop)

        def submit_next() -> bool:
            item = next(batches, None)
            if item is None:
                return False
            key, x, lengths = item
            data = client.scatter(np.asarray(x), hash=False)   # no large object in the graph
            future = client.submit(_run_batch, model_future, device, data, lengths, emit,
                                   backend, pure=False)
            pending[future] = (key, data)
            done.add(future)
            return True

        try:
            for _ in range(self.in_flight_limit()):
                if not submit_next():
                    break
            for future in done:
                key, data = pending.pop(future)
                try:
                    output, retried = future.result()
                except Exception as exc:
                    raise BatchFailedError(key, exc) from exc
                finally:
                    future.release()
                    data.release()
                self.batches_retried += retried
                submit_next()                        # keep the cluster busy while we yield
                yield key, output
        finally:
            for future, (_, data) in pending.items():
                future.cancel()
                data.release()
            model_future.release()


def _run_batch(shipped: _ShippedModel, device: str, x, lengths, emit: str,
               backend: str | None):
    """One batch on a worker, run as the local executor runs it; returns the output and how
    many times the batch had to be halved for memory."""
    local = shipped.local_executor(device)
    before = local.batches_retried
    [(_, output)] = local.map(shipped.model(device), [(None, x, lengths)], emit=emit,
                              backend=backend)
    return output, local.batches_retried - before
