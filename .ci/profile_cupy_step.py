"""One LSTM layer's forward and backward on the cupy backend's tensor-core persistent kernels
(``cupy:persistent-mma-train``), for Nsight Compute to look at.

``bash .ci/gpu profile-cupy`` runs it under ncu. Why: run 7's phase clocks
(.ci/phase_clocks.py) found the products of both kernels at 160-240 cycles a k-step where the
tensor cores need ~10, and the backward waiting 28 of its 50 us a step for d_rec from L2 at
LSTM fp16 512x64x1024; the warp stall reasons say which latency it is. The sequence is short
(ncu replays each kernel, and the per-step cost is what matters).

    python3 .ci/profile_cupy_step.py float16 16x64x1024
"""

from __future__ import annotations

import argparse

import torch

import rnn_gpu as rg
from rnn_gpu import registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dtype", choices=["float16", "bfloat16"])
    parser.add_argument("shape", help="TxBxH (I = H)")
    args = parser.parse_args()
    T, B, H = (int(v) for v in args.shape.split("x"))
    layer = rg.LSTM(H, H, dtype=args.dtype, seed=0).to("cuda")
    x = torch.randn(T, B, H, device="cuda", dtype=getattr(torch, args.dtype))
    with registry.get("cupy").variant("persistent-mma-train"):
        y, _, tape = layer.forward(x, backend="cupy")
        layer.backward(tape, torch.randn_like(y))
    torch.cuda.synchronize()
    print(f"profile_cupy_step: LSTM {args.dtype} {args.shape}: ran")


if __name__ == "__main__":
    main()
