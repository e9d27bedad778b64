"""The CUDA C++ sources of the cupy backend (``kernels/cuda/*.cu``): which template
instantiations the backend asks NVRTC for, the source with its headers inlined, and the
compiled kernels, once per device, source file and dtype."""

from __future__ import annotations

import importlib.resources
import re
import threading
from typing import Any

COMPILE_OPTIONS: tuple[str, ...] = ()  # CuPy >= 14 compiles RawModules as C++17 by default

# Template arguments, as in common.cuh.
CELL_IDS = {"rnn": 0, "lstm": 1, "gru": 2}
ACT_IDS = {"tanh": 0, "sigmoid": 1, "relu": 2}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
TAPE_GATES = {"rnn": 1, "lstm": 4, "gru": 4}
GATED_VARIANTS = ((0, 0), (0, 2), (1, 0), (2, 0))      # (cell, activation) instantiated
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def name_expressions(module: str, dtype: str) -> list[str]:
    """The template instantiations the backend asks NVRTC for, per source file and dtype
    (tests/test_cupy_compile.py has nvcc instantiate exactly these for sm_80 and sm_90)."""
    ct = CTYPES[dtype]
    if module == "recurrent":
        names = [f"{k}<{ct}, {c}, {a}>" for k in ("gated_fwd_step", "gated_bwd_step")
                 for c, a in GATED_VARIANTS]
        names += [f"{k}<{ct}, {a}>" for k in ("twostage_fwd_a", "twostage_fwd_b",
                                              "twostage_bwd_a", "twostage_bwd_b")
                  for a in range(3)]
        return names + [f"{k}<{ct}>" for k in ("cast_to_f32", "cast_from_f32", "fill_value",
                                               "add_at_first_step", "gather_first_step",
                                               "rows_that_stepped")]
    if module == "persistent_mma":
        return [f"{k}<{ct}, {c}, {a}>" for k in ("gated_fwd_persistent_mma",
                                                 "gated_bwd_persistent_mma")
                for c, a in GATED_VARIANTS]
    if module == "persistent":
        names = [f"gated_fwd_persistent<{ct}, {c}, {a}>" for c, a in GATED_VARIANTS]
        return names + [f"twostage_fwd_persistent<{ct}, {f}, {g}>" for f in range(3)
                        for g in range(3)]
    raise ValueError(f"unknown kernel source {module!r}")


def kernel_name(base: str, ctype: str, *template_args: int) -> str:
    return f"{base}<{', '.join([ctype, *map(str, template_args)])}>"


def kernel_source(module: str) -> str:
    """``kernels/cuda/{module}.cu`` with its ``#include "..."`` lines replaced by the files
    (NVRTC then needs no include path into the package)."""
    root = importlib.resources.files("rnn_gpu.kernels").joinpath("cuda")

    def inlined(name: str) -> str:     # headers include headers; their guards drop repeats
        return re.sub(r'^#include "([\w.]+)"[ \t]*$', lambda m: inlined(m.group(1)),
                      root.joinpath(name).read_text(encoding="utf-8"), flags=re.MULTILINE)

    return inlined(f"{module}.cu")


_modules: dict[tuple[int, str, str], dict[str, Any]] = {}
_modules_lock = threading.Lock()


def compiled(index: int, module: str, dtype: str) -> dict[str, Any]:
    """name expression -> ``cupy.RawKernel`` for one device, source file and dtype."""
    key = (index, module, dtype)
    with _modules_lock:
        kernels = _modules.get(key)
        if kernels is None:
            kernels = _modules[key] = compile_module(module, dtype)
        return kernels


def compile_module(module: str, dtype: str) -> dict[str, Any]:
    """Compiles (NVRTC) and loads every kernel of one source file for one dtype. Any failure
    says which file, dtype and kernel, with NVRTC's log when there is one."""
    import cupy

    names = name_expressions(module, dtype)
    what = f"kernels/cuda/{module}.cu for {dtype}"
    current = "(the module)"
    try:
        raw = cupy.RawModule(code=kernel_source(module), options=COMPILE_OPTIONS,
                             name_expressions=names)
        kernels = {}
        for current in names:            # CuPy compiles on the first get_function
            kernels[current] = raw.get_function(current)
        return kernels
    except cupy.cuda.compiler.CompileException as exc:
        raise RuntimeError(f"cupy backend: NVRTC failed to compile {what} (kernels "
                           f"{', '.join(names)}); NVRTC's log:\n{exc.get_message()}") from exc
    except Exception as exc:             # NVRTC missing, a driver that cannot load the code...
        raise RuntimeError(f"cupy backend: could not compile or load {what}, at kernel "
                           f"{current} ({type(exc).__name__}: {exc})") from exc
