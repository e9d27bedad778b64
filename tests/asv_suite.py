"""Load the asv benchmark module (``asv_benchmarks/benchmarks/recurrent.py``) the way asv does:
by path, with rnn_gpu installed, without asv itself."""

from __future__ import annotations

import importlib.util
import pathlib

ASV_DIR = pathlib.Path(__file__).resolve().parent.parent / "asv_benchmarks"


def load_recurrent():
    spec = importlib.util.spec_from_file_location(
        "rnn_gpu_asv_recurrent", ASV_DIR / "benchmarks" / "recurrent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
