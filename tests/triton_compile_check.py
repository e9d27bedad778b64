"""Compile the Triton kernels for NVIDIA GPUs without one: ``python tests/triton_compile_check.py``.

Triton lowers a kernel to PTX and assembles it with the ptxas it ships, all on the host, so a
type error, an unsupported construct or a resource overflow shows up here, not on a lent GPU.
Run in its own process (tests/test_triton_compile.py does): a process that imported the kernels
under ``TRITON_INTERPRET=1`` holds interpreted functions that cannot be compiled.
Prints one line per variant: kernel, cell, dtype, arch, shared memory bytes, seconds.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rnn_gpu.kernels.triton import gated, twostage  # noqa: E402

FP32_ARGS = {"h0_ptr", "c0_ptr", "h_ptr", "c_ptr", "gates_ptr", "ctape_ptr", "dhT_ptr",
             "dcT_ptr", "dh_ptr", "dc_ptr", "atape_ptr", "htape_ptr"}
INT_ARGS = {"len_ptr", "sync_ptr"}


def compile_variant(fn, dtype: str, arch: int, consts: dict, num_warps: int):
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif not name.endswith("_ptr"):
            signature[name] = "i32"
        elif name in INT_ARGS:
            signature[name] = "*i32"
        elif name in FP32_ARGS:
            signature[name] = "*fp32"
        else:
            signature[name] = "*" + dtype
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    start = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": 2})
    return kernel.metadata.shared, time.perf_counter() - start


def variants(arch: int):
    # sm_90: one block of units per program (state in registers); sm_80: several blocks
    # (state through global memory) - between them both code paths of every kernel
    units = 64 if arch >= 90 else 128
    tiles = dict(BLOCK_B=64, BLOCK_H=64, BLOCK_K=64, UNITS=units)
    common = dict(REVERSE=True, HAS_LENGTHS=True, GRID_SYNC=True, PRECISION="ieee", **tiles)
    for cell, name in ((0, "rnn"), (1, "lstm"), (2, "gru")):
        shape = dict(CELL=cell, G=gated.GATES[cell], TG=gated.TAPE_GATES[cell], ACT=0)
        yield ("gated_fwd", name, gated._gated_fwd_kernel,
               {**shape, **common, "HAS_BIAS": True, "KEEP_TAPE": True})
        yield "gated_bwd", name, gated._gated_bwd_kernel, {**shape, **common}
    acts = dict(F=1, G=2)
    yield ("twostage_fwd", "twostage", twostage._twostage_fwd_kernel,
           {**acts, **common, "HAS_BIAS": True, "KEEP_TAPE": True})
    yield "twostage_bwd", "twostage", twostage._twostage_bwd_kernel, {**acts, **common}


def main(argv: list[str]) -> int:
    archs = [int(a) for a in argv] or [80, 90]
    failed = 0
    for arch in archs:
        for kernel, cell, fn, consts in variants(arch):
            # bf16 on sm_90 (the headline dtype), fp32 (IEEE dot, FMA path) on the rest
            dtype = "bf16" if arch >= 90 else "fp32"
            try:
                shared, seconds = compile_variant(fn, dtype, arch, consts, num_warps=8)
            except Exception as exc:                  # report every failure, then fail
                failed += 1
                print(f"FAILED {kernel} {cell} {dtype} sm_{arch}: {type(exc).__name__}: {exc}")
                continue
            print(f"ok {kernel} {cell} {dtype} sm_{arch} units={consts['UNITS']} "
                  f"shared={shared} {seconds:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
