"""A few training steps of one layer on CUDA with a fixed tiling, for a profiler to look at.

``bash .ci/gpu profile`` runs it under Nsight Compute (ncu) where the card's image has it. Why:
run 5 timed the LSTM fp16 backward at 256x4096x256 at 84 us a step, about 3x what its
instructions, bytes and latency chain account for by count (docs/performance.md); only the
warp stall reasons can say where the rest goes. And the float32 forward's fix rests on a count
of shared-memory wavefronts (tests/fma_banks.py) that ncu measures directly. The tiling is
fixed (run 5's choices by default) so that no tuning launches come before the profiled ones,
and the sequence is short (the per-step cost is what matters, and ncu replays each kernel).

    python3 .ci/profile_step.py lstm float16 8x4096x256 --rows 64 --units 128
"""

from __future__ import annotations

import argparse

import torch

import rnn_gpu as rg
from rnn_gpu.kernels.triton.gated import Tiles
from rnn_gpu.kernels.triton.launch import forced_tiles

CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", choices=sorted(CELLS))
    parser.add_argument("dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("shape", help="TxBxH (I = H)")
    parser.add_argument("--rows", type=int, required=True, help="batch rows per program")
    parser.add_argument("--units", type=int, required=True, help="hidden units per program")
    parser.add_argument("--block-h", type=int, default=64)
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--device", default="cuda",
                        help="cuda; cpu with TRITON_INTERPRET=1 to try the script without a GPU")
    args = parser.parse_args()
    T, B, H = (int(v) for v in args.shape.split("x"))
    block_k = 32 if args.dtype == "float32" else 64        # what launch.candidates gives
    tiles = Tiles(args.rows, min(args.block_h, args.units), block_k, args.units, args.warps,
                  args.stages)
    # the interpreter runs programs one after another: a grid barrier would never be met there
    split = args.units < H and args.device != "cpu"
    layer = getattr(rg, CELLS[args.cell])(H, H, dtype=args.dtype, seed=0).to(args.device)
    x = torch.randn(T, B, H, device=args.device, dtype=getattr(torch, args.dtype))
    with forced_tiles(tiles, grid_sync=split):
        y, _, tape = layer.forward(x, backend="triton")
        layer.backward(tape, torch.randn_like(y))
    if args.device != "cpu":
        torch.cuda.synchronize()
    print(f"profile_step: {args.cell} {args.dtype} {args.shape} {tiles} grid_sync={split}: ran")


if __name__ == "__main__":
    main()
