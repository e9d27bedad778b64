"""The results: one :class:`Row` per case x runner, as a text table or as JSON."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass

from .kernels import format_kernels
from .load import busy_note

COLUMNS = ("cell", "shape T×B×H", "dtype", "pass", "runner", "ms (median)", "spread",
           "tokens/s", "TFLOP/s", "vs peer")
TEXT_COLUMNS = 5            # left-aligned; the numbers after them are right-aligned


@dataclass
class Row:
    cell: str
    shape: str
    dtype: str
    runner: str
    device: str = "cpu"
    pass_: str = "forward"
    ms: float | None = None              # median milliseconds per call; None when not timed
    best_ms: float | None = None
    spread: float | None = None          # (max - min) / median of the samples
    samples: int = 0
    tokens_per_s: float | None = None    # T*B / s
    gflops: float | None = None          # GEMM GFLOP/s (rnn_gpu.bench.flops)
    ratio: float | None = None           # peer ms / our ms: > 1 means faster than the peer
    floor_ms: float | None = None        # GEMM flops at the machine's peak GEMM rate
    peak_bytes: int | None = None        # GPU: memory the call needed beyond its inputs
    max_err: float | None = None         # max |ours - reference| / max(1, max |reference|)
    rms_err: float | None = None         # half precision: relative RMS error (DESIGN §6)
    checked_against: str | None = None   # the reference of max_err/rms_err; None: not checked
                                         # (the row is the reference itself, errors None)
    error: str | None = None             # why there is no timing (wrong answer, failure)
    config: str | None = None            # how our backend ran it (tiling, path), if it says
    kernel_ms: float | None = None       # --kernels: the GPU time of one call's kernels
    kernels: list | None = None          # --kernels: its costliest (bench.kernels.KernelTime)
    other_cores: float | None = None     # cores other processes kept busy while it was timed
    warning: str | None = None           # why its numbers need care (a peer beyond the
                                         # half-precision tolerance)

    @property
    def ok(self) -> bool:
        return self.error is None and self.ms is not None


def machine_info(threads: int, device: str = "cpu") -> dict:
    """CPU model, cores, thread count and the versions that matter, read off this machine
    (and the GPU, CUDA, cuDNN, Triton and CuPy versions when ``device`` is a GPU)."""
    import numpy as np

    import rnn_gpu

    info = {
        "cpu": _cpu_model(),
        "cores": _cores(),
        "threads": threads,
        "python": platform.python_version(),
        "rnn_gpu": rnn_gpu.__version__,
        "numpy": np.__version__,
        "numpy_blas": _numpy_blas(),
        "torch": None,
        "torch_blas": None,
        "float32_precision": rnn_gpu.float32_precision(),
    }
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    parts = []
    if torch.backends.mkl.is_available():
        parts.append("MKL")
    if torch.backends.mkldnn.is_available():
        parts.append("oneDNN")
    info["torch_blas"] = " + ".join(parts) or "default"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, " \
                      f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        # NGC's containers may set it: cuBLAS then runs every float32 GEMM (ours and the
        # peer's) in TF32 whatever torch's flags say, and "IEEE float32" rows are not
        info["tf32_override"] = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
        for mod in ("triton", "cupy"):
            try:
                info[mod] = __import__(mod).__version__
            except Exception:
                info[mod] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _numpy_blas() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown"
    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
            arch = lib.get("architecture")
            return f"{lib.get('internal_api')} {lib.get('version')}" + (f" ({arch})" if arch
                                                                        else "")
    return "unknown"


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _tokens(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def header_lines(info: dict) -> list[str]:
    lines = [f"CPU: {info['cpu']}, {info['cores']} cores; threads per runner: "
             f"{info['threads']}",
             f"numpy {info['numpy']} ({info['numpy_blas']}); python {info['python']}; "
             f"rnn_gpu {info['rnn_gpu']}"]
    if info.get("torch"):
        lines.append(f"torch {info['torch']} ({info['torch_blas']})")
    if info.get("gpu"):
        extra = "".join(f"; {m} {info[m]}" for m in ("triton", "cupy") if info.get(m))
        lines.append(f"GPU: {info['gpu']}; CUDA {info['cuda']}, cuDNN {info['cudnn']}{extra}")
    if info.get("tf32_override") not in (None, "", "0"):
        lines.append("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set: cuBLAS runs float32 GEMMs in "
                     "TF32 on both sides, whatever the flags; float32 rows are not IEEE")
    if info.get("float32_precision", "ieee") != "ieee":
        lines.append(f"float32 products: {info['float32_precision']} in our backends "
                     f"(rnn-gpu bench --float32-precision); torch.nn: "
                     f"{'TF32' if info['float32_precision'] == 'tf32' else 'IEEE float32'}")
    if info.get("peak_gemm_gflops"):
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in info["peak_gemm_gflops"].items())
        lines.append(f"peak GEMM (2048³ float32, same threads), GFLOP/s: {peaks}")
    return lines


def _tflops(gflops: float | None) -> str:
    if gflops is None:
        return "—"
    return _fmt(gflops / 1e3, ".3f" if gflops < 1e3 else ".1f")


def _gflops(gflops: float | None) -> str:
    """CPU rows: GFLOP/s (in TFLOP/s they read 0.000-0.100)."""
    return _fmt(gflops, ".1f")


def format_table(rows: list[Row], info: dict | None = None, markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table), one row per runner.
    The ratio is the peer's time over ours (> 1: faster than the peer); the peer is torch.nn
    on the same device (torch-cpu, or torch-cudnn on a GPU)."""
    on_cpu = bool(rows) and all(r.device == "cpu" for r in rows)
    rate = _gflops if on_cpu else _tflops
    columns = tuple("GFLOP/s" if on_cpu and c == "TFLOP/s" else c for c in COLUMNS)
    columns += ("peak MiB",) if any(r.peak_bytes is not None for r in rows) else ()
    body = []
    for r in rows:
        timed = r.error is None
        cells = (r.cell, r.shape, r.dtype, r.pass_, r.runner,
                 _fmt(r.ms, ".2f" if (r.ms or 0) < 10 else ".1f") if timed
                 else "WRONG" if r.max_err is not None else "error",
                 # (max - min) / median of the samples: a ratio within it is a draw
                 _fmt(None if r.spread is None else 100 * r.spread, ".0f") + "%"
                 if timed and r.spread is not None else "—",
                 _tokens(r.tokens_per_s) if timed else "—",
                 rate(r.gflops) if timed else "—",
                 _fmt(r.ratio, ".2f") if timed else "—")
        if len(columns) > len(COLUMNS):
            cells += (_fmt(None if r.peak_bytes is None else r.peak_bytes / 2**20, ".0f"),)
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(columns) + " |",
                 "|" + "|".join("---" if i < TEXT_COLUMNS else "---:"
                                for i in range(len(columns))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        table = [columns, *body]
        widths = [max(len(row[i]) for row in table) for i in range(len(columns))]

        def line(row):
            return "  ".join(c.ljust(w) if i < TEXT_COLUMNS else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths)))

        lines = [line(columns), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    def labelled(text_of) -> list[str]:
        return [f"  {r.cell} {r.shape} {r.dtype} {r.pass_} {r.runner}: {text_of(r)}"
                for r in rows if text_of(r)]

    notes = labelled(lambda r: r.error)
    warnings = labelled(lambda r: r.warning)
    cores = (info or {}).get("cores") or _cores()
    busy = {}                            # one line a case: every runner of it was timed together
    for r in rows:
        note = busy_note(r.other_cores, cores, r.device)
        if note:
            busy.setdefault(f"  {r.cell} {r.shape} {r.dtype} {r.pass_}: {note}", None)
    warnings = list(busy) + warnings
    configs = labelled(lambda r: r.config if not r.error else None)
    profiles = labelled(lambda r: None if r.kernel_ms is None else
                        format_kernels(r.kernel_ms, r.kernels or [], r.ms))
    out = []
    if info is not None:
        out += header_lines(info) + [""]
    out += lines
    if configs:
        out += ["", "how each case ran:"] + configs
    if profiles:
        out += ["", "where one more call's GPU time went (--kernels: total, then the costliest "
                    "kernels: ms, share, launches, us a launch):"] + profiles
    if notes:
        out += ["", "not timed:"] + notes
    if warnings:
        out += ["", "take with care:"] + warnings
    return "\n".join(out)


def to_json(rows: list[Row], info: dict, complete: bool = True) -> str:
    """The report as JSON; ``complete`` is False in the copies saved while the bench still
    runs (a run cut off by a time limit leaves the cases it finished, marked so)."""
    return json.dumps({"machine": info, "complete": complete,
                       "rows": [asdict(r) for r in rows]}, indent=2, ensure_ascii=False)
