"""Where a step of the cupy tensor-core persistent kernels goes, phase by phase, on the card.

Why: by count the tensor-core forward's step at LSTM fp16 512x64x1024 should take ~5-7 us
(products ~2 us of shared-memory reads, the copy of h ~2 us from L2, one grid barrier), and it
took 18 (9.3 ms, H200, run 6); the persistent backward took ~55 us a step against ~12-17
estimated. Run 6's image had no Nsight Compute, so this script measures on its own:
persistent_mma.cu compiled with RNN_GPU_PHASE_CLOCKS (kernels/cuda/persistent.cuh) counts the
SM cycles of each phase of each step in every block. For each ``--variant`` (extra -D options
for the kernel's tuning constants; "" is the source as it is) it prints

* the phases of the forward and of the backward: cycles a step (mean over blocks, min, max),
  and microseconds a step at the clock the kernel ran at (block 0's cycles over its
  nanoseconds);
* the launch's time without the instrumentation (CUDA events, median of ``--repeats``), the
  forward alone and forward plus backward, so that variants compare by their real cost.

    python3 .ci/phase_clocks.py lstm float16 512x64x1024 --variant= --variant=-DMMA_CHAINS=2

Three words of a variant are no -D options but settings of backends/cupy.py: ``rows=N``
runs both kernels with N row groups (``MMA_ROW_GROUPS``), ``tiles=warp`` the forward with 32 x
32 warp tiles (``MMA_WARP_TILES``), ``chunk=N`` the backward with chunks of N bytes a row
(``MMA_BWD_CHUNK_BYTES``); as ``--variant=rows=2`` or ``--variant="rows=2 tiles=warp
chunk=1024 -DBWD_STAGGER=1"``.

Only the LSTM/GRU/RNN forward and backward of persistent_mma.cu are compiled (seconds, not the
whole module). Results also go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics

import numpy as np

FORWARD_PHASES = ("element inputs prefetched", "copies of h issued", "chunk waits + barrier",
                  "products (warp 0)", "closing barrier", "finish", "grid.sync")
BACKWARD_PHASES = ("gate backward", "grid.sync", "chunk issue, wait + barrier",
                   "products (warp 0)", "barrier after products", "finish")
CELLS = {"rnn": ("RNN", 0, 0), "lstm": ("LSTM", 1, 0), "gru": ("GRU", 2, 0)}


def compile_kernels(cupy, sources, cell: int, act: int, dtype: str, defines: list[str]):
    """persistent_mma.cu's forward and backward for one cell and dtype with ``defines``: the
    RawModule and its {name expression: RawKernel}."""
    ct = sources.CTYPES[dtype]
    names = [sources.kernel_name(k, ct, cell, act) for k in ("gated_fwd_persistent_mma",
                                                               "gated_bwd_persistent_mma")]
    raw = cupy.RawModule(code=sources.kernel_source("persistent_mma"),
                         options=(*sources.COMPILE_OPTIONS, *defines), name_expressions=names)
    return raw, {name: raw.get_function(name) for name in names}


def split_variant(variant: str) -> tuple[dict, list[str]]:
    """A ``--variant``'s settings of backends/cupy.py (``MMA_ROW_GROUPS`` from its last
    ``rows=N``, 1 without; ``MMA_WARP_TILES`` with ``tiles=warp``; ``MMA_BWD_CHUNK_BYTES``
    from ``chunk=N``, 512 without) and its -D options."""
    words = shlex.split(variant)

    def number(key: str, default: int, step: int) -> int:
        values = [w.removeprefix(key) for w in words if w.startswith(key)]
        if not values:
            return default
        if not (values[-1].isdigit() and int(values[-1]) >= step and int(values[-1]) % step == 0):
            raise SystemExit(f"--variant {variant!r}: {key}N needs a positive integer N"
                             + (f", a multiple of {step}" if step > 1 else ""))
        return int(values[-1])

    tiles = [w.removeprefix("tiles=") for w in words if w.startswith("tiles=")]
    if any(t != "warp" for t in tiles):
        raise SystemExit(f"--variant {variant!r}: tiles= takes only 'warp'")
    settings = {"MMA_ROW_GROUPS": number("rows=", 1, 1), "MMA_WARP_TILES": bool(tiles),
                "MMA_BWD_CHUNK_BYTES": number("chunk=", 512, 512)}
    return settings, [w for w in words if not w.startswith(("rows=", "tiles=", "chunk="))]


def clock_arrays(cupy, raw):
    def view(name, n):
        return cupy.ndarray((n,), cupy.uint64, memptr=raw.get_global(name))
    return {k: view(f"rg_phase_{k}", 8) for k in ("sum", "min", "max")} | {
        "loop": view("rg_phase_loop", 2)}


def reset(arrays) -> None:
    for key, arr in arrays.items():
        arr.set(np.full(arr.shape, np.iinfo(np.uint64).max if key == "min" else 0, np.uint64))


def phases(arrays, names, blocks: int, steps: int) -> dict:
    got = {k: v.get() for k, v in arrays.items()}
    cycles, ns = (int(v) for v in got["loop"])
    ghz = cycles / ns if ns else float("nan")
    rows = []
    for p, name in enumerate(names):
        mean = got["sum"][p] / blocks / steps
        rows.append({"phase": name, "cycles": mean, "min": got["min"][p] / steps,
                     "max": got["max"][p] / steps, "us": mean / ghz / 1e3})
    return {"ghz": ghz, "us_per_step": ns / steps / 1e3, "phases": rows}


def show(title: str, result: dict) -> None:
    print(f"  {title}: {result['us_per_step']:.2f} us a step (block 0), clock "
          f"{result['ghz']:.3f} GHz")
    for r in result["phases"]:
        print(f"    {r['phase']:<28} {r['cycles']:9.0f} cycles  (min {r['min']:8.0f}, max "
              f"{r['max']:8.0f})  {r['us']:7.2f} us")


def check_defines(defines: list[str]) -> None:
    """Each ``-DNAME[=VALUE]`` names a macro the CUDA sources test (``#ifndef NAME`` or
    ``#ifdef NAME``): a misspelt one would compile the default kernel under the variant's
    name, and the card would time the same kernel twice."""
    from pathlib import Path

    text = "".join(p.read_text() for p in
                   sorted((Path(__file__).resolve().parents[1] / "kernels" / "cuda").glob("*.cu*")))
    for define in defines:
        name = define[2:].split("=")[0] if define.startswith("-D") else ""
        if not name or (f"#ifndef {name}" not in text and f"#ifdef {name}" not in text):
            raise SystemExit(f"--variant: {define!r} is not -DNAME for a macro of "
                             "kernels/cuda (#ifndef NAME / #ifdef NAME)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", choices=sorted(CELLS))
    parser.add_argument("dtype", choices=["float16", "bfloat16"])
    parser.add_argument("shape", help="TxBxH (I = H)")
    parser.add_argument("--variant", action="append", default=None,
                        help="extra -D options, as --variant=-DMMA_CHAINS=2 (with '=': the value "
                             "starts with a dash), rows=N for N row groups, tiles=warp for "
                             "warp tiles, chunk=N for the backward's chunk bytes; repeatable; "
                             "--variant= is the source as it is, one row group (the default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--dry-run", action="store_true",
                        help="check the shape and the variants, print them, run nothing (how "
                             "the tests check .ci/gpu's stages without a card)")
    args = parser.parse_args()
    try:
        T, B, H = (int(v) for v in args.shape.split("x"))
    except ValueError:
        parser.error(f"shape: expected TxBxH, three integers, got {args.shape!r}")
    if args.dry_run:
        for variant in args.variant or [""]:
            settings, defines = split_variant(variant)
            check_defines(defines)
            print(f"dry run: {args.cell} {args.dtype} {T}x{B}x{H} variant {variant!r}: "
                  f"{settings} {defines}")
        return

    import cupy
    import torch

    import rnn_gpu as rg
    import rnn_gpu.backends.cupy as cb
    from rnn_gpu import registry
    from rnn_gpu.kernels.cuda import device, sources

    cell_name, cell, act = CELLS[args.cell]
    index = cupy.cuda.Device().id
    backend = registry.get("cupy")
    layer = getattr(rg, cell_name)(H, H, dtype=args.dtype, seed=0).to("cuda")
    x = torch.randn(T, B, H, device="cuda", dtype=getattr(torch, args.dtype))
    key = (index, "persistent_mma", args.dtype)
    results = []
    last_launch = {}                             # kernel base name -> its last Launch
    launch = device.CupyDevice.launch

    def recording(self, op):
        last_launch[op.name.split("<")[0]] = op
        return launch(self, op)

    device.CupyDevice.launch = recording

    def run_once(train: bool):
        if not train:
            return layer(x, backend="cupy")
        y, _, tape = layer.forward(x, backend="cupy")
        return layer.backward(tape, torch.ones_like(y))

    def timed(train: bool) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(args.repeats):
            start.record()
            run_once(train)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times)

    def measure(entry: dict, defines: list[str]) -> None:
        with backend.variant("persistent-mma-train"):
            raw, kernels = compile_kernels(cupy, sources, cell, act, args.dtype,
                                           [*defines, "-DRNN_GPU_PHASE_CLOCKS"])
            sources._modules[key] = kernels
            arrays = clock_arrays(cupy, raw)
            run_once(True)                      # warm-up: the GEMMs, the plans
            torch.cuda.synchronize()
            reset(arrays)
            layer(x, backend="cupy")
            torch.cuda.synchronize()
            entry["forward_blocks"] = blocks = last_launch["gated_fwd_persistent_mma"].grid
            entry["forward"] = phases(arrays, FORWARD_PHASES, blocks, T)
            show("forward (instrumented)", entry["forward"])
            y, _, tape = layer.forward(x, backend="cupy")
            dy = torch.ones_like(y)
            torch.cuda.synchronize()
            reset(arrays)
            layer.backward(tape, dy)
            torch.cuda.synchronize()
            entry["backward_blocks"] = blocks = last_launch["gated_bwd_persistent_mma"].grid
            entry["backward"] = phases(arrays, BACKWARD_PHASES, blocks, T)
            show("backward (instrumented)", entry["backward"])

            _, kernels = compile_kernels(cupy, sources, cell, act, args.dtype, defines)
            sources._modules[key] = kernels
            run_once(True)
            entry["forward_ms"], entry["train_ms"] = timed(False), timed(True)
            print(f"  not instrumented: forward {entry['forward_ms']:.2f} ms "
                  f"({entry['forward_ms'] * 1e3 / T:.2f} us a step), forward + backward "
                  f"{entry['train_ms']:.2f} ms", flush=True)

    for variant in args.variant or [""]:
        settings, defines = split_variant(variant)
        print(f"=== {args.cell} {args.dtype} {args.shape}, variant {variant or '(as is)'}",
              flush=True)
        entry = {"variant": variant, "shape": args.shape, "dtype": args.dtype, "cell": args.cell}
        saved = {key: getattr(cb, key) for key in settings}
        for key, value in settings.items():
            setattr(cb, key, value)
        try:
            measure(entry, defines)
            # the kernels' last arguments: rows a group, then the warp split / the chunk
            rows, split = (int(a) for a in last_launch["gated_fwd_persistent_mma"].args[-2:])
            chunk = int(last_launch["gated_bwd_persistent_mma"].args[-1])
            entry["rows"], entry["warp_split"], entry["bwd_chunk"] = rows, split, chunk
            print(f"  plan: forward {entry['forward_blocks']} blocks, {rows} rows a group, warp "
                  f"split {split}; backward {entry['backward_blocks']} blocks, chunks of "
                  f"{chunk} elements a row", flush=True)
        except Exception as exc:        # one variant's failure must not cost the others
            print(f"  failed: {type(exc).__name__}: {exc}", flush=True)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            for key, value in saved.items():
                setattr(cb, key, value)
        results.append(entry)
        if args.json:                   # after every variant: a cut-off run keeps the rest
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    sources._modules.pop(key, None)
    print(summary(results))


def summary(results: list[dict]) -> str:
    """The variants side by side: each pass's instrumented step and uninstrumented time."""
    lines = [f"{'variant':<32} {'fwd us/step':>11} {'bwd us/step':>11} {'forward ms':>10} "
             f"{'train ms':>9}"]
    for e in results:
        if "error" in e:
            lines.append(f"{e['variant'] or '(as is)':<32} failed: {e['error']}")
            continue
        lines.append(f"{e['variant'] or '(as is)':<32} {e['forward']['us_per_step']:11.2f} "
                     f"{e['backward']['us_per_step']:11.2f} {e['forward_ms']:10.2f} "
                     f"{e['train_ms']:9.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
