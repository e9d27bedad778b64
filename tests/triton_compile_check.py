"""Compile the Triton kernels for NVIDIA GPUs without one: ``python tests/triton_compile_check.py``.

Triton lowers a kernel to PTX and assembles it with the ptxas it ships, all on the host, so a
type error, an unsupported construct or a resource overflow shows up here, not on a lent GPU.
Run in its own process (tests/test_triton_compile.py does): a process that imported the kernels
under ``TRITON_INTERPRET=1`` holds interpreted functions that cannot be compiled.
Prints one line per variant: kernel, cell, dtype, arch, specialisation (aligned: as a launch
compiles for H a multiple of 16, see ``_compile``), shared memory bytes, seconds.

``python tests/triton_compile_check.py --spills`` instead prints, for the forward kernel's
main tilings and the backward kernel's chosen ones on sm_90, the registers per thread and the
bytes of spill stores that ptxas -v reports (the register pressure that cost the kernels most
on an H100, docs/performance.md).

``python tests/triton_compile_check.py --fma-banks`` prints, for the float32 (IEEE) kernels at
run 5's tilings on sm_90, the shared-memory wavefronts of their FMA dots' operand reads
(tests/fma_banks.py) per 32 of K and SM, against the FMA issue cycles; the forwards also
with the weights as stored, the layout they had until the float32 products were found bound
by bank conflicts (docs/performance.md).

``python tests/triton_compile_check.py --resident`` prints the same for the weights-resident
forward (kernels/triton/gated_resident.py) at DESIGN's 512x64x1024 tiling on sm_90, with its
shared memory and whether W_hh's copy into shared memory sits before the time loop (Triton
hoists it: what makes the weights resident; a Triton that stopped would fail the test).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rnn_gpu.kernels.triton import gated, gated_resident, launch, twostage  # noqa: E402
from rnn_gpu.kernels.triton.common import weights_transposed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fma_banks  # noqa: E402


def launched_transposed(dtype: str, precision: str = "ieee") -> bool:
    """W_TRANSPOSED as the launchers set it (common.weights_transposed), for a signature
    dtype of this module ("fp32", "fp16", "bf16")."""
    return weights_transposed({"fp32": "float32"}.get(dtype, dtype), precision)


FP32_ARGS = {"h0_ptr", "c0_ptr", "h_ptr", "c_ptr", "gates_ptr", "ctape_ptr", "dhT_ptr",
             "dcT_ptr", "dh_ptr", "dc_ptr", "atape_ptr", "htape_ptr"}
INT_ARGS = {"len_ptr", "sync_ptr"}


def _compile(fn, dtype: str, arch: int, consts: dict, num_warps: int, aligned: bool = True,
             num_stages: int = 2):
    """Compile ``fn`` as a launch would. ``aligned``: as the card compiles it for DESIGN's
    shapes. A launch specialises every 16-byte aligned pointer and every int argument that is a
    multiple of 16 (H; T, B and the step range are ``do_not_specialize``) with
    ``tt.divisibility=16``, which lets Triton vectorise the loads and pipeline the k-loops with
    cp.async. Without it (an H that is not a multiple of 16) neither happens, and the register
    pressure differs: LSTM bf16 backward 64 x 128 units, 680 B of spill stores aligned, 564
    not (run 5's tilings; ``--spills``)."""
    signature, attrs = {}, {}
    # a constexpr parameter left out takes its default, as a launch does (compiled as a runtime
    # int instead, an ``if`` on it stays in the kernel and the loads lose their vectorisation)
    consts = {**{p.name: p.default for p in fn.params
                 if p.is_constexpr and p.name not in consts and p.has_default}, **consts}
    for index, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if not name.endswith("_ptr"):
            signature[name] = "i32"
        elif name in INT_ARGS:
            signature[name] = "*i32"
        elif name in FP32_ARGS:
            signature[name] = "*fp32"
        else:
            signature[name] = "*" + dtype
        if aligned and name not in fn.do_not_specialize:
            attrs[(index,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_variant(fn, dtype: str, arch: int, consts: dict, num_warps: int,
                    aligned: bool = True, num_stages: int = 2):
    start = time.perf_counter()
    kernel = _compile(fn, dtype, arch, consts, num_warps, aligned, num_stages)
    return kernel.metadata.shared, time.perf_counter() - start


# (label, cell, dtype, BLOCK_B, BLOCK_H, UNITS, GRID_SYNC, warps): the batch-tiled tiling of
# large batches (64 rows x all 256 units) and the split tiling the H100 chose at B=4096
# (128 rows x 64 units, 4 programs per row block, grid barrier), with and without the tape.
SPILL_CASES = [(f"{name} {dtype} {label}", cell, dtype, bb, bh, units, sync, 8)
               for name, cell in (("lstm", 1), ("gru", 2))
               for dtype in ("bf16", "fp32")
               for label, bb, bh, units, sync in (("64x256 tiled", 64, 64, 256, False),
                                                  ("128x64 split", 128, 64, 64, True))] + [
    # 128x16384x128's 64-row tiling as the tuner's two-programs-an-SM variant (launch.co_resident)
    ("lstm bf16 64x128 tiled w4", 1, "bf16", 64, 32, 128, False, 4)]


# (label, cell, dtype, BLOCK_B, UNITS, GRID_SYNC[, (BLOCK_H, warps)]): the backward tilings the
# H100 chose in run 5 (docs/performance.md) at DESIGN's shapes; BLOCK_H and warps as the tuner
# derives them unless given.
BACKWARD_SPILL_CASES = [
    ("lstm_bf16_64x128_split", 1, "bf16", 64, 128, True),     # 256x4096x256
    ("lstm_bf16_64x64_split", 1, "bf16", 64, 64, True),       # 256x1024x512
    ("lstm_bf16_16x32_split", 1, "bf16", 16, 32, True),       # 512x64x1024
    ("lstm_bf16_64x128_tiled", 1, "bf16", 64, 128, False),    # 128x16384x128
    ("lstm_fp32_128x64_split", 1, "fp32", 128, 64, True),     # 256x4096x256
    ("lstm_fp32_64x64_split", 1, "fp32", 64, 64, True),       # 256x1024x512
    ("gru_bf16_64x128_split", 2, "bf16", 64, 128, True),
    ("rnn_bf16_64x128_split", 0, "bf16", 64, 128, True),
    ("lstm_bf16_64x128_tiled_w4", 1, "bf16", 64, 128, False, (32, 4)),   # launch.co_resident
]


def ptxas_usage(ptx: str, arch: int = 90) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) that ptxas -v reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        done = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True,
                              text=True, check=True)
    report = done.stdout + done.stderr
    return (int(re.search(r"Used (\d+) registers", report).group(1)),
            int(re.search(r"(\d+) bytes spill stores", report).group(1)))


def spills() -> int:
    for label, cell, dtype, bb, bh, units, sync, warps in SPILL_CASES:
        for tape in (False, True):
            consts = dict(CELL=cell, G=gated.GATES[cell], TG=gated.TAPE_GATES[cell], ACT=0,
                          REVERSE=False, HAS_BIAS=True, HAS_LENGTHS=False, KEEP_TAPE=tape,
                          GRID_SYNC=sync, PRECISION="ieee", BLOCK_B=bb, BLOCK_H=bh,
                          BLOCK_K=32 if dtype == "fp32" else 64, UNITS=units,
                          W_TRANSPOSED=launched_transposed(dtype))
            kernel = _compile(gated._gated_fwd_kernel, dtype, 90, consts, warps)
            regs, spilled = ptxas_usage(kernel.asm["ptx"])
            print(f"spills gated_fwd {label.replace(' ', '_')} tape={int(tape)} "
                  f"registers={regs} spill_bytes={spilled}")
    for label, cell, dtype, bb, units, sync, *variant in BACKWARD_SPILL_CASES:
        gates = gated.GATES[cell]
        bh = launch._block_h(units)
        bh, warps = variant[0] if variant else (bh, launch._warps(gates, bb, bh))
        consts = dict(CELL=cell, G=gates, TG=gated.TAPE_GATES[cell], ACT=0, REVERSE=False,
                      HAS_LENGTHS=False, GRID_SYNC=sync, PRECISION="ieee", BLOCK_B=bb,
                      BLOCK_H=bh, BLOCK_K=32 if dtype == "fp32" else 64, UNITS=units)
        kernel = _compile(gated._gated_bwd_kernel, dtype, 90, consts, warps)
        regs, spilled = ptxas_usage(kernel.asm["ptx"])
        print(f"spills gated_bwd {label} registers={regs} spill_bytes={spilled}")
    return 0


# (cell, kind, T x B x H, BLOCK_B, BLOCK_H, UNITS, GRID_SYNC, warps): the float32 tilings the
# H100 chose in run 5 (docs/performance.md; BLOCK_K 32), forward (inference, and the taped one
# where it differed) and backward; TwoStageRNN at the LSTM's 256x4096x256 tiling.
FMA_BANK_CASES = [
    ("lstm", "fwd", "256x4096x256", 128, 64, 64, True, 8),
    ("lstm", "fwd", "256x1024x512", 64, 64, 64, True, 8),
    ("lstm", "fwd", "512x64x1024", 16, 32, 32, True, 4),
    ("lstm", "fwd-taped", "512x64x1024", 32, 16, 16, True, 4),
    ("lstm", "fwd", "128x16384x128", 128, 64, 128, False, 8),
    ("lstm", "bwd", "256x4096x256", 128, 64, 64, True, 8),
    ("lstm", "bwd", "256x1024x512", 64, 64, 64, True, 8),
    ("lstm", "bwd", "512x64x1024", 16, 32, 32, True, 4),
    ("lstm", "bwd", "128x16384x128", 64, 64, 128, False, 8),
    ("twostage", "fwd", "256x4096x256", 128, 64, 64, True, 8),
    ("twostage", "bwd", "256x4096x256", 128, 64, 64, True, 8),
]


def fma_bank_kernel(cell: str, kind: str, bb: int, bh: int, units: int, sync: bool,
                    transposed: bool):
    """(function, constexprs) of one FMA_BANK_CASES kernel in IEEE float32."""
    tiles = dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=32, UNITS=units, GRID_SYNC=sync,
                 PRECISION="ieee", REVERSE=False, HAS_LENGTHS=False)
    forward = dict(HAS_BIAS=True, KEEP_TAPE=kind == "fwd-taped", W_TRANSPOSED=transposed)
    if cell == "twostage":
        fn = twostage._twostage_fwd_kernel if kind.startswith("fwd") else \
            twostage._twostage_bwd_kernel
        return fn, dict(F=1, G=2, **tiles, **(forward if kind.startswith("fwd") else {}))
    shape = dict(CELL=1, G=4, TG=4, ACT=0)
    if kind.startswith("fwd"):
        return gated._gated_fwd_kernel, dict(shape, **tiles, **forward)
    return gated._gated_bwd_kernel, dict(shape, **tiles)


def fma_banks_report() -> int:
    for cell, kind, shape, bb, bh, units, sync, warps in FMA_BANK_CASES:
        layouts = ("transposed", "as_stored") if kind.startswith("fwd") else ("as_stored",)
        for weights in layouts:
            fn, consts = fma_bank_kernel(cell, kind, bb, bh, units, sync,
                                         weights == "transposed")
            reads = fma_banks.dot_operand_reads(_compile(fn, "fp32", 90, consts, warps)
                                                .asm["ttgir"])
            # per 32 of K in every product of a step (one k-iteration of each k-loop), and SM
            # (one program): each warp reads its operand tiles once; the FMAs are
            # BLOCK_B x BLOCK_H x 32 per product, at 128 a cycle
            dots = sum(r.operand == 1 for r in reads)
            worst = max(r.conflict for r in reads)
            print(f"fma_banks {cell} {kind} {shape} b{bb} h{bh} u{units} w{warps} "
                  f"weights={weights} launched={int(weights == 'transposed' or kind == 'bwd')} "
                  f"worst_conflict={worst:.2f} "
                  f"wavefronts_per_32k={sum(r.wavefronts for r in reads) * warps} "
                  f"fma_cycles_per_32k={bb * bh * 32 * dots // 128}")
    return 0


def resident_consts(cell: int, units: int, H: int = 1024, tape: bool = True) -> dict:
    """The resident forward of one 64-row block with the grid barrier."""
    return dict(CELL=cell, G=gated.GATES[cell], TG=gated.TAPE_GATES[cell], ACT=0,
                REVERSE=False, HAS_BIAS=True, HAS_LENGTHS=True, KEEP_TAPE=tape, GRID_SYNC=True,
                PRECISION="ieee", BLOCK_B=64, UNITS=units,
                G4=gated_resident.gate_slots(gated.GATES[cell]),
                HP=triton.next_power_of_2(H))


# (label, cell, units): DESIGN's 512x64x1024 on 132 SMs (RNN needs 16 units for N >= 16)
RESIDENT_CASES = [("lstm", 1, 8), ("gru", 2, 8), ("rnn", 0, 16)]


def resident() -> int:
    for label, cell, units in RESIDENT_CASES:
        for tape in (False, True):
            kernel = _compile(gated_resident.gated_fwd_resident_kernel, "bf16", 90,
                              resident_consts(cell, units, tape=tape), 8)
            ttgir = kernel.asm["ttgir"]
            loop = ttgir.index("scf.for")
            w_tile = f"tensor<1024x{gated_resident.gate_slots(gated.GATES[cell]) * units}x"
            hoisted = any(m.start() < loop and w_tile in m.group(0)
                          for m in re.finditer(r"ttg\.local_alloc[^\n]*", ttgir))
            regs, spilled = ptxas_usage(kernel.asm["ptx"])
            print(f"resident {label} bf16 b64 u{units} h1024 tape={int(tape)} "
                  f"shared={kernel.metadata.shared} registers={regs} spill_bytes={spilled} "
                  f"weights_before_loop={int(hoisted)}")
    return 0


def variants(arch: int):
    """(kernel, cell, function, constexprs, dtype): bf16 on sm_90 (the headline dtype), fp32
    (IEEE dot, FMA path) on sm_80, and on sm_90 also fp32 through tf32x3 (three TF32
    tensor-core products, :func:`rnn_gpu.set_float32_precision`)."""
    # sm_90: one block of units per program (state in registers); sm_80: several blocks
    # (state through global memory) - between them both code paths of every kernel
    units = 64 if arch >= 90 else 128
    dtype = "bf16" if arch >= 90 else "fp32"
    tiles = dict(BLOCK_B=64, BLOCK_H=64, BLOCK_K=64, UNITS=units)
    common = dict(REVERSE=True, HAS_LENGTHS=True, GRID_SYNC=True, PRECISION="ieee", **tiles)
    transposed = dict(W_TRANSPOSED=launched_transposed(dtype))     # as launched
    for cell, name in ((0, "rnn"), (1, "lstm"), (2, "gru")):
        shape = dict(CELL=cell, G=gated.GATES[cell], TG=gated.TAPE_GATES[cell], ACT=0)
        yield ("gated_fwd", name, gated._gated_fwd_kernel,
               {**shape, **common, "HAS_BIAS": True, "KEEP_TAPE": True, **transposed}, dtype)
        yield "gated_bwd", name, gated._gated_bwd_kernel, {**shape, **common}, dtype
    acts = dict(F=1, G=2)
    yield ("twostage_fwd", "twostage", twostage._twostage_fwd_kernel,
           {**acts, **common, "HAS_BIAS": True, "KEEP_TAPE": True, **transposed}, dtype)
    yield ("twostage_bwd", "twostage", twostage._twostage_bwd_kernel, {**acts, **common},
           dtype)
    resident_dtype = "bf16" if arch >= 90 else "fp16"
    for cell, name, units in ((1, "lstm", 8), (2, "gru", 8), (0, "rnn", 16))[:3 if arch >= 90
                                                                            else 1]:
        yield ("gated_fwd_resident", name, gated_resident.gated_fwd_resident_kernel,
               resident_consts(cell, units), resident_dtype)
    if arch >= 90:
        lstm = dict(CELL=1, G=gated.GATES[1], TG=gated.TAPE_GATES[1], ACT=0)
        tf32x3 = {**common, "PRECISION": "tf32x3", "BLOCK_K": 32}
        yield ("gated_fwd", "lstm-tf32x3", gated._gated_fwd_kernel,
               {**lstm, **tf32x3, "HAS_BIAS": True, "KEEP_TAPE": True}, "fp32")
        yield "gated_bwd", "lstm-tf32x3", gated._gated_bwd_kernel, {**lstm, **tf32x3}, "fp32"


def deeper_variants(arch: int, stages: int = 3):
    """What the tuner's second round may also run on sm_90 (kernels/triton/launch.py,
    ``deeper_pipeline``): the kernels with k-loops with 3 pipeline stages, and the LSTM's with
    4 (``stages=4``)."""
    if arch < 90:
        return
    cells = ("lstm", "twostage") if stages == 3 else ("lstm",)
    for kernel, cell, fn, consts, dtype in variants(arch):
        if cell in cells and kernel != "gated_fwd_resident":   # the resident has no k-loop
            yield kernel, f"{cell}-s{stages}", fn, consts, dtype


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if any(not a.isdigit() for a in argv if a not in ("--spills", "--resident", "--fma-banks")):
        print(f"usage: python tests/triton_compile_check.py [ARCH ...] | --spills | --resident | "
              f"--fma-banks (ARCH: 80, 90, ...); got {' '.join(argv)}", file=sys.stderr)
        return 2
    if argv == ["--spills"]:
        return spills()
    if argv == ["--resident"]:
        return resident()
    if argv == ["--fma-banks"]:
        return fma_banks_report()
    archs = [int(a) for a in argv] or [80, 90]
    failed = 0
    for arch in archs:
        # both specialisations on sm_90 (H a multiple of 16 or not), the aligned one on sm_80
        for aligned in (True, False) if arch >= 90 else (True,):
            runs = ([(v, 2) for v in variants(arch)] + [(v, 3) for v in deeper_variants(arch)]
                    + [(v, 4) for v in deeper_variants(arch, 4)])
            for (kernel, cell, fn, consts, dtype), stages in runs:
                what = f"{kernel} {cell} {dtype} sm_{arch} {'aligned' if aligned else 'unaligned'}"
                try:
                    shared, seconds = compile_variant(fn, dtype, arch, consts, 8, aligned,
                                                      stages)
                except Exception as exc:                  # report every failure, then fail
                    failed += 1
                    print(f"FAILED {what}: {type(exc).__name__}: {exc}")
                    continue
                print(f"ok {what} units={consts['UNITS']} shared={shared} {seconds:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
