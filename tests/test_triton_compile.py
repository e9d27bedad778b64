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
    # weights-resident forward (LSTM, GRU, RNN in bf16 on sm_90; LSTM in fp16 on sm_80)
    assert len(lines) == 8 * 2 + 2 + 3 + 1, done.stdout


# Spill stores per thread (bytes) that ptxas -v reported for the forward kernel when its
# offsets within a step became int32 and its accumulators started from xw (triton 3.6.0's
# ptxas, sm_90). Before that change: 852 / 1378 / 4826 / 5652 for the four LSTM bf16 rows.
# A change that spills more than a quarter above these (plus 32 bytes of slack) fails here,
# on any machine, before a GPU ever runs it.
SPILL_BUDGET = {
    "lstm_bf16_64x256_tiled": (24, 104), "lstm_bf16_128x64_split": (1204, 2104),
    "lstm_fp32_64x256_tiled": (64, 60), "lstm_fp32_128x64_split": (1420, 2348),
    "gru_bf16_64x256_tiled": (16, 64), "gru_bf16_128x64_split": (1396, 1848),
    "gru_fp32_64x256_tiled": (68, 100), "gru_fp32_128x64_split": (1544, 1696),
}


# The same for the backward kernel at the tilings run 5 chose (tests/triton_compile_check.py),
# when its offsets within a step became int32 too. Before: 1328 / 824 / 0 / 1272 for the LSTM
# bf16 rows, 3596 / 812 for fp32 (128x64: ptxas now stops at 128 registers there), GRU 716,
# RNN 1356.
BACKWARD_SPILL_BUDGET = {
    "lstm_bf16_64x128_split": 564, "lstm_bf16_64x64_split": 80, "lstm_bf16_16x32_split": 0,
    "lstm_bf16_64x128_tiled": 472, "lstm_fp32_128x64_split": 6364,
    "lstm_fp32_64x64_split": 1028, "gru_bf16_64x128_split": 84, "rnn_bf16_64x128_split": 888,
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


# The weights-resident forward at DESIGN's 512x64x1024 (64 rows x 8 units, bf16, sm_90, triton
# 3.6.0): spill stores per thread as first compiled (reading h with H's runtime stride and
# masks spilled 2.2 KB; the state buffer is padded so that the read needs neither).
RESIDENT_SPILL_BUDGET = {"lstm": (76, 68), "gru": (0, 0), "rnn": (0, 0)}
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
