"""Batch processing: stream datasets of sequences through a model (DESIGN §8).

``rnn-gpu run`` is :func:`rnn_gpu.batch.run.run`; :func:`apply_batch` is its unit of work and
:class:`LocalExecutor` runs those units in this process (``rnn_gpu.dask`` on a cluster).
"""

from .apply import EMITS, apply_batch, output_shape
from .executors import LocalExecutor

__all__ = ["EMITS", "LocalExecutor", "apply_batch", "output_shape"]
