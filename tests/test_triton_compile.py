"""The Triton kernels compile for sm_80 and sm_90 on a machine without a GPU (Triton's own
ptxas, no driver needed); run in a subprocess, see tests/triton_compile_check.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def run_check(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """tests/triton_compile_check.py in its own process (see there), compiling for real: a
    fresh Triton cache, TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    script = Path(__file__).with_name("triton_compile_check.py")
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, timeout=900)


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    done = run_check(tmp_path, "80", "90")
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    # 8 kernels x 2 architectures, the float32 LSTM through tf32x3 on sm_90, and the
    # weights-resident forward (LSTM, GRU, RNN in bf16 on sm_90; LSTM in fp16 on sm_80); the
    # sm_90 ones also as compiled for an H that is not a multiple of 16, and there the LSTM and
    # TwoStageRNN kernels also with 3 pipeline stages and the LSTM's with 4 (the tuner's second
    # round)
    sm90 = 8 + 2 + 3 + 4 + 2
    assert len(lines) == sm90 * 2 + 8 + 1, done.stdout
    assert sum(" unaligned " in line for line in lines) == sm90, done.stdout


# Spill stores per thread (bytes) that ptxas -v reports (triton 3.6.0's ptxas, sm_90) for the
# forward kernel's main tilings, (without tape, with tape), compiled as a launch compiles them
# at DESIGN's shapes: aligned pointers and H a multiple of 16 (tests/triton_compile_check.py,
# ``_compile``). A change that spills more than a quarter above these (plus 32 bytes of slack)
# fails here, on any machine, before a GPU ever runs it. (Until 2026-11-27 these were compiled
# without that specialisation, which no DESIGN shape runs: 24 / 1204 B for the LSTM bf16 rows
# with tape, against 40 / 1152 here; the int32-offset change of c390336 was judged on those.)
# float32 with W_hh transposed, as launched since the FMA bank-conflict fix (as stored before:
# LSTM 128x64 360 / 692, 64x256 0 / 0; GRU 128x64 128 / 288).
SPILL_BUDGET = {
    "lstm_bf16_64x256_tiled": (0, 40), "lstm_bf16_128x64_split": (176, 1108),
    "lstm_fp32_64x256_tiled": (0, 20), "lstm_fp32_128x64_split": (120, 660),
    "gru_bf16_64x256_tiled": (0, 0), "gru_bf16_128x64_split": (32, 416),
    "gru_fp32_64x256_tiled": (0, 0), "gru_fp32_128x64_split": (40, 252),
    # 128x16384x128's 64-row tiling with 4 warps over 32-unit blocks, two programs an SM
    # (launch.co_resident; run 5's 8 warps over 64-unit blocks spill no more, 0 / 40 B, but take
    # the whole register file)
    "lstm_bf16_64x128_tiled_w4": (0, 32),
}
# The same for the backward kernel at the tilings run 5 chose. With int32 offsets within a step
# (1f1a2b7's parent had int64): LSTM bf16 64x128 784 -> 680, 64x64 616 -> 720, 64x128 tiled
# 768 -> 668, fp32 128x64 1084 -> 1116, 64x64 32 -> 4; GRU 192 -> 128; RNN 0 -> 0.
BACKWARD_SPILL_BUDGET = {
    "lstm_bf16_64x128_split": 680, "lstm_bf16_64x64_split": 720, "lstm_bf16_16x32_split": 0,
    "lstm_bf16_64x128_tiled": 668, "lstm_fp32_128x64_split": 1116,
    "lstm_fp32_64x64_split": 4, "gru_bf16_64x128_split": 128, "rnn_bf16_64x128_split": 0,
    "lstm_bf16_64x128_tiled_w4": 724,       # launch.co_resident's variant of the one above
}


def test_kernel_spills_stay_within_budget(tmp_path):
    done = run_check(tmp_path, "--spills")
    assert done.returncode == 0, done.stdout + done.stderr
    seen, budget = {}, {}
    for line in done.stdout.splitlines():
        fields = line.split()
        spilled = int(fields[-1].split("=")[1])
        if fields[1] == "gated_fwd":
            key = (fields[2], int(fields[3][-1]))
            budget[key] = SPILL_BUDGET[key[0]][key[1]]
        else:
            key = (fields[2], "backward")
            budget[key] = BACKWARD_SPILL_BUDGET[fields[2]]
        seen[key] = spilled
    assert set(seen) == ({(label, tape) for label in SPILL_BUDGET for tape in (0, 1)}
                         | {(label, "backward") for label in BACKWARD_SPILL_BUDGET})
    over = {key: (spilled, budget[key]) for key, spilled in seen.items()
            if spilled > budget[key] * 1.25 + 32}
    assert not over, f"spill stores (bytes per thread, budget) grew: {over}\n{done.stdout}"


def test_float32_products_read_shared_memory_without_bank_conflicts(tmp_path):
    """The float32 (IEEE) products are FMA loops whose operands Triton reads from unswizzled
    shared memory. With W_hh streamed as stored (contiguous along k), every weight read was a
    16-way bank conflict (8 wavefronts per quarter-warp), which the H100's float32 step times
    followed (docs/performance.md). As launched, the forwards take W_hh transposed and no
    operand read of any float32 kernel at run 5's tilings may conflict; the kernels compiled
    with the weights as stored must still show the conflict, so that the count can fail."""
    done = run_check(tmp_path, "--fma-banks")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [dict(field.split("=") for field in line.split()[8:]) | {"what": line}
            for line in done.stdout.splitlines() if line.startswith("fma_banks ")]
    launched = [r for r in rows if r["launched"] == "1"]
    stored = [r for r in rows if r["launched"] == "0"]
    assert len(launched) == 11 and len(stored) == 6, done.stdout
    for row in launched:
        assert float(row["worst_conflict"]) == 1.0, row["what"]
    for row in stored:
        assert float(row["worst_conflict"]) >= 8.0, row["what"]
    # what the fix is for: at 256x1024x512 the reads took 8x the FMAs' cycles, now at most 1.25x
    fwd = {r["weights"]: r for r in rows if " fwd 256x1024x512 " in r["what"]}
    assert int(fwd["as_stored"]["wavefronts_per_32k"]) > \
        8 * int(fwd["as_stored"]["fma_cycles_per_32k"])
    assert int(fwd["transposed"]["wavefronts_per_32k"]) <= \
        1.25 * int(fwd["transposed"]["fma_cycles_per_32k"])


# The weights-resident forward at DESIGN's 512x64x1024 (64 rows x 8 units, bf16, sm_90, triton
# 3.6.0, aligned as above): spill stores per thread. (Reading h with H's runtime stride and
# masks spilled 2.2 KB, compiled unaligned; the state buffer is padded so that the read needs
# neither.)
RESIDENT_SPILL_BUDGET = {"lstm": (0, 0), "gru": (0, 0), "rnn": (0, 0)}
H100_SHARED_MEMORY = 227 * 1024      # the opt-in limit per block


def test_resident_forward_keeps_the_weights_in_shared_memory(tmp_path):
    """What makes the kernel resident is Triton's, not ours: it must copy the loop-invariant
    weight tile into shared memory once, before the time loop (ttg.local_alloc before scf.for),
    and the weights with h must fit the card's shared memory. Checked on the compiled kernel,
    so that a Triton that stopped hoisting shows here, not as a slow GPU run."""
    done = run_check(tmp_path, "--resident")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [dict(field.split("=") for field in line.split()[6:]) | {"cell": line.split()[1]}
            for line in done.stdout.splitlines() if line.startswith("resident ")]
    assert len(rows) == 2 * len(RESIDENT_SPILL_BUDGET), done.stdout
    for row in rows:
        budget = RESIDENT_SPILL_BUDGET[row["cell"]][int(row["tape"])]
        assert row["weights_before_loop"] == "1", row
        assert int(row["shared"]) <= H100_SHARED_MEMORY, row
        assert int(row["spill_bytes"]) <= budget * 1.25 + 32, (row, budget)


def test_grid_barrier_launches_are_cooperative(tmp_path):
    """A kernel with a grid barrier asks the driver for a cooperative launch (the whole grid
    at once, or a refusal), so that two of them on two streams cannot each hold part of the
    card and spin forever; the rest launch plainly. RNN_GPU_TRITON_COOPERATIVE=0 turns it off.
    In a subprocess: importing the kernel modules here would fix, for the rest of the run,
    whether they are interpreted or compiled (the interpreter tests and the gpu tests each
    need theirs)."""
    code = (
        "from rnn_gpu.kernels.triton import common, gated, twostage\n"
        "tiles = gated.Tiles(block_b=16, block_h=16, block_k=16, units=16)\n"
        "key = 'launch_cooperative_grid'\n"
        "for sync in (True, False):\n"
        "    assert gated._constexprs(0, 0, tiles, 'ieee', sync)[key] is sync\n"
        "    assert twostage._consts((0, 0), tiles, 'ieee', sync)[key] is sync\n"
        "common.COOPERATIVE = False\n"
        "assert gated._constexprs(0, 0, tiles, 'ieee', True)[key] is False\n"
        "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_triton_takes_the_cooperative_launch_option_when_compiling(tmp_path, monkeypatch):
    """Triton's compiler knows the option and records it for its launcher (what the card's
    driver is then asked for), on a machine without a GPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    code = (
        "import triton, triton.language as tl\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "@triton.jit\n"
        "def k(p):\n"
        "    tl.store(p + tl.program_id(0), 1.0)\n"
        "src = ASTSource(fn=k, signature={'p': '*fp32'}, constexprs={})\n"
        "c = triton.compile(src, target=GPUTarget('cuda', 90, 32),\n"
        "                   options={'launch_cooperative_grid': True})\n"
        "print(c.metadata.launch_cooperative_grid)\n")
    script = tmp_path / "coop.py"                # @triton.jit needs a file to read
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
