"""Peak host memory of ``rnn-gpu run`` does not grow with the dataset.

The same job on N and on 20 N sequences (both memory-mapped-sized .npy files, read in slices)
is run in fresh processes, each reporting its own peak resident set size. Reading the whole
input (128 MiB here) or holding the whole output (64 MiB) would show up as that much more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rnn_gpu as rg

T, I, H = 50, 16, 8
SMALL = 2_000                  # 6.4 MB of input; 20x: 128 MB in, 64 MB out (--emit sequence)

# The child reports its own peak. Not ru_maxrss: Linux carries that over from the parent
# through fork and exec, so it would include whatever pytest itself had touched.
PEAK_RSS = """
import json, sys
from rnn_gpu.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "peak_mib": peak_kib / 1024}), file=sys.stderr)
"""


def make_input(path, n: int) -> None:
    block = np.random.default_rng(0).standard_normal((500, T, I)).astype("float32")
    x = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(n, T, I))
    for start in range(0, n, len(block)):
        x[start:start + len(block)] = block[:n - start]
    x.flush()
    del x


def peak_mib(tmp_path, n: int) -> float:
    make_input(tmp_path / f"x{n}.npy", n)
    args = [tmp_path / "model.safetensors", tmp_path / f"x{n}.npy", tmp_path / f"out{n}.npy",
            "--emit", "sequence", "--batch-size", "128", "--chunk-size", "1024", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, "run", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    assert json.loads(proc.stdout)["computed"] == n
    return report["peak_mib"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_peak_memory_is_flat_in_the_dataset_size(tmp_path):
    rg.save(rg.RNN(I, H, seed=0), tmp_path / "model.safetensors")
    small = peak_mib(tmp_path, SMALL)
    large = peak_mib(tmp_path, 20 * SMALL)
    print(f"peak RSS: {small:.1f} MiB for N={SMALL}, {large:.1f} MiB for N={20 * SMALL}")
    assert large - small < 24, (small, large)       # the large input alone is 122 MiB
    out = np.load(tmp_path / f"out{20 * SMALL}.npy", mmap_mode="r")
    first = np.load(tmp_path / f"out{SMALL}.npy", mmap_mode="r")
    np.testing.assert_array_equal(out[:500], first[:500])   # same block, same outputs
