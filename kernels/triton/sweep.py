"""Time tilings of the forward kernel on this GPU: ``python -m rnn_gpu.kernels.triton.sweep``.

For tuning :func:`.launch.candidates` on a new card: each line is one (shape, dtype, tiling,
precision) with its time per step over a short sequence, so that designs can be compared
without running whole benchmarks. Options: ``--cell lstm --shape 256x4096x256 --dtype float16``
(repeatable), ``--steps 32``.
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch
import triton

from .common import LSTM
from .gated import GATES, Tiles, gated_forward
from .launch import time_cuda

CELLS = {"rnn": 0, "lstm": 1, "gru": 2}


def configs(B: int, H: int, n_sm: int, dtype: str):
    """A broad grid of tilings that are legal here (split ones fit one program per SM)."""
    for bb, bh, bk, units, warps, stages in itertools.product(
            (16, 32, 64, 128), (16, 32, 64), (32, 64, 128), (16, 32, 64, 128, 256, 512, 1024),
            (4, 8, 16), (1, 2, 3)):
        if units % bh or units > H or bk > H or bb > max(16, triton.next_power_of_2(B)):
            continue
        grid = triton.cdiv(B, bb) * triton.cdiv(H, units)
        split = units < H
        if split and grid > n_sm:
            continue
        if not split and grid < n_sm // 4:
            continue
        yield Tiles(bb, bh, bk, units, warps, stages), split


def _text(tiles: Tiles, split: bool) -> str:
    return (f"{'split' if split else 'tiled'} b{tiles.block_b} h{tiles.block_h} "
            f"k{tiles.block_k} u{tiles.units} w{tiles.num_warps} s{tiles.num_stages}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cell", default="lstm", choices=list(CELLS))
    parser.add_argument("--shape", action="append", help="TxBxH, e.g. 256x4096x256")
    parser.add_argument("--dtype", action="append", help="float32, float16, bfloat16")
    parser.add_argument("--precision", default="ieee", help="float32 dot: ieee, tf32, tf32x3")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--limit", type=int, default=40, help="most configs per shape")
    parser.add_argument("--filter", default="", help="only configs whose text contains this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "sweep: times the kernels on a CUDA device, and torch sees none here\n")
    cell = CELLS[args.cell]
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    for shape, dtype in itertools.product(args.shape or ["256x4096x256"],
                                          args.dtype or ["float16"]):
        _, B, H = (int(v) for v in shape.split("x"))
        dt = getattr(torch, dtype)
        g = GATES[cell]
        xw = torch.randn(args.steps, B, g * H, device="cuda", dtype=dt)
        w = (torch.randn(g * H, H, device="cuda") / H ** 0.5).to(dt)
        b = torch.zeros(g * H, device="cuda", dtype=dt)
        h0 = torch.zeros(B, H, device="cuda", dtype=dt)
        c0 = h0.float() if cell == LSTM else None
        results = []
        options = [(t, sp, _text(t, sp)) for t, sp in configs(B, H, n_sm, dtype)]
        options = [o for o in options if args.filter in o[2]]
        # a fixed-seed sample when there are too many: comparable across runs
        if len(options) > args.limit:
            options = random.Random(0).sample(options, args.limit)
        for tiles, split, text in options:
            args_ = (cell, 0, xw, w, b, h0, c0, None)
            try:
                ms = time_cuda(lambda a=args_, tiles=tiles, split=split: gated_forward(
                    *a, reverse=False, keep_tape=False, precision=args.precision, tiles=tiles,
                    grid_sync=split))
            except Exception as exc:                  # out of resources and the like
                print(f"{args.cell} {shape} {dtype} {text}: failed {type(exc).__name__}",
                      flush=True)
                continue
            results.append((ms, text))
            print(f"{args.cell} {shape} {dtype} {args.precision} {text}: "
                  f"{1e3 * ms / args.steps:.1f} us/step", flush=True)
        for ms, text in sorted(results)[:5]:
            print(f"BEST {args.cell} {shape} {dtype} {text}: {1e3 * ms / args.steps:.1f} us/step")


if __name__ == "__main__":
    main()
