"""The ``rnn-gpu`` command line."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import numpy as np

    import rnn_gpu

    from . import registry

    print(f"rnn_gpu {rnn_gpu.__version__}  python {platform.python_version()}  "
          f"numpy {np.__version__}")
    for mod in ("torch", "triton", "cupy"):
        try:
            version = __import__(mod).__version__
        except Exception:
            version = "not installed"
        print(f"  {mod}: {version}")
    print()
    print(registry.format_report())
    return 0


def _split(values: list[str] | None) -> list[str]:
    """``--cell LSTM,GRU --cell RNN`` -> ["LSTM", "GRU", "RNN"]."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .bench import cases as bench_cases
    from .bench import peers, threads

    try:
        cells = [bench_cases.parse_cell(c) for c in _split(args.cell)] or None
        shapes = [bench.parse_shape(s) for s in _split(args.shape)] or None
        dtypes = _split(args.dtype) or ["float32"]
        for dtype in dtypes:
            if dtype not in ("float32", "float64"):      # the CPU set; GPU dtypes come later
                raise ValueError(f"dtype: expected float32 or float64, got {dtype!r}")
        n = threads.available_cores() if args.threads is None else args.threads
        if n < 1:
            raise ValueError(f"threads: expected a positive count, got {n}")
        if args.repeats is not None and args.repeats < 1:
            raise ValueError(f"repeats: expected a positive count, got {args.repeats}")
    except ValueError as exc:
        print(f"rnn-gpu bench: {exc}", file=sys.stderr)
        return 2
    make = bench.quick_cases if args.quick else bench.cpu_cases
    cases = make(cells, shapes, dtypes)
    repeats = args.repeats or (3 if args.quick else 10)
    runners = peers.our_runners(_split(args.backend) or None) + peers.peer_runners()
    to_stdout = args.json == "-"
    log = None if to_stdout else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with threads.same_threads(n):
        info = bench.machine_info(n)
        peak = None
        if not args.quick:
            from .bench.peak import peak_gemm_gflops

            info["peak_gemm_gflops"] = peak_gemm_gflops()
            peak = max(info["peak_gemm_gflops"].values())
        rows = bench.run(cases, runners, repeats=repeats, peak_gflops=peak, log=log)
    if args.json:
        text = bench.to_json(rows, info)
        if to_stdout:
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    if not to_stdout:
        print(bench.format_table(rows, info, markdown=args.markdown))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnn-gpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and the backend table")
    info.set_defaults(func=_info)
    from .batch.cli import add_parser as add_run_parser

    add_run_parser(sub)
    bench = sub.add_parser(
        "bench", help="forward throughput of our backends next to torch.nn, checked first",
        description="Time one-layer forward passes of our backends and of torch.nn on the "
                    "CPU with the same weights and the same thread count. Every runner's "
                    "output is checked against torch.nn first; a wrong one is reported, not "
                    "timed. Default: LSTM, GRU, RNN (and TwoStageRNN for information) at "
                    "T×B×H = 128×256×128, 64×1024×256, 256×32×512, float32.")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes and 3 repeats: a smoke run of well under a minute")
    bench.add_argument("--cell", action="append", metavar="CELL",
                       help="LSTM, GRU, RNN, TwoStageRNN (comma-separated or repeated)")
    bench.add_argument("--backend", action="append", metavar="NAME",
                       help="our backends to run (default: every registered one that can "
                            "serve the case); torch.nn always runs as the peer")
    bench.add_argument("--dtype", action="append", metavar="DTYPE",
                       help="float32 (default) or float64")
    bench.add_argument("--shape", action="append", metavar="TxBxH",
                       help="T×B×H with I = H, or T×B×I×H (comma-separated or repeated)")
    bench.add_argument("--repeats", type=int, metavar="N",
                       help="timed calls per runner and case (default 10; 3 with --quick)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="threads for every runner (default: all usable cores)")
    bench.add_argument("--json", nargs="?", const="-", metavar="PATH",
                       help="write the results as JSON to PATH, or to stdout without PATH "
                            "(then no table is printed)")
    bench.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
