"""The ``rnn-gpu`` command line."""

from __future__ import annotations

import argparse
import os
import platform
import sys

from ._config import FLOAT32_PRECISIONS


def _variant_names() -> str:
    """Every registered backend's variants as NAME:VARIANT, for --backend's help (read from
    the backends, so that the help cannot fall behind them; see _BenchHelp for when)."""
    from . import registry

    try:
        names = [f"{name}:{v}" for name in registry.names()
                 for v in (getattr(registry.get(name), "variants", None) or (lambda: ()))()]
    except Exception as exc:               # a broken plugin must not break --help
        return f"the backends' variants could not be listed: {exc}"
    return ", ".join(names) or "no backend has variants"


_VARIANTS = "{the backends' variants}"       # in bench --backend's help, see _BenchHelp


class _BenchHelp(argparse.HelpFormatter):
    """Fills in the backends' variants when bench's help is printed, not when the parser is
    built: building it for every command (``rnn-gpu --help``, ``rnn-gpu run``) loaded every
    backend plugin, and a plugin may import torch, triton or cupy at import time."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        if text and _VARIANTS in text:
            # argparse %-formats the help after this: a % in a variant's name is literal
            text = text.replace(_VARIANTS, _variant_names().replace("%", "%%"))
        return text


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


def _default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _bench_cases(args: argparse.Namespace, device: str):
    """The cases the arguments ask for; ValueError naming the argument if they are bad."""
    from . import bench
    from .bench import cases as bench_cases

    cells = [bench_cases.parse_cell(c) for c in _split(args.cell)] or None
    shapes = [bench.parse_shape(s) for s in _split(args.shape)] or None
    on_gpu = device.startswith("cuda")
    allowed = bench_cases.GPU_DTYPES if on_gpu else ("float32", "float64")
    dtypes = _split(args.dtype) or (list(bench_cases.GPU_DTYPES) if on_gpu and not args.quick
                                    else ["float32"])
    for dtype in dtypes:
        if dtype not in allowed:
            raise ValueError(f"dtype: expected one of {', '.join(allowed)} on {device}, "
                             f"got {dtype!r}")
    passes = _split(args.pass_) or (list(bench_cases.PASSES) if on_gpu else ["forward"])
    if passes == ["all"]:
        passes = list(bench_cases.PASSES)
    for pass_ in passes:
        if pass_ not in bench_cases.PASSES:
            raise ValueError(f"pass: expected forward, train or all, got {pass_!r}")
    proj = args.proj_size or 0
    if proj < 0:
        raise ValueError(f"proj-size: expected a positive LSTM projection size, got {proj}")
    options = dict(proj_size=proj, lengths=args.lengths)
    if args.quick:
        return bench.quick_cases(cells, shapes, dtypes, passes, device, **options)
    if on_gpu:
        return bench_cases.gpu_cases(cells, shapes, dtypes, passes, device, **options)
    return bench.cpu_cases(cells, shapes, dtypes, passes, **options)


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from ._arrays import parse_device
    from .bench import peers, threads

    try:
        device = parse_device(args.device) if args.device else _default_device()
        if device.startswith("cuda") and _default_device() == "cpu" and not args.dry_run:
            raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA device "
                             "here (torch.cuda.is_available() is False, or torch is missing)")
        cases = _bench_cases(args, device)
        _check_bench_backends(_split(args.backend))
        if args.json and args.json != "-":
            _check_writable("json", args.json)
        n = threads.available_cores() if args.threads is None else args.threads
        if n < 1:
            raise ValueError(f"threads: expected a positive count, got {n}")
        if args.repeats is not None and args.repeats < 1:
            raise ValueError(f"repeats: expected a positive count, got {args.repeats}")
        if args.kernels is not None and args.kernels < 1:
            raise ValueError(f"kernels: expected a positive count of kernels to list, got "
                             f"{args.kernels}")
        if args.kernels and not device.startswith("cuda"):
            raise ValueError(f"kernels: the split by kernel is a GPU's (torch.profiler's CUDA "
                             f"activity); got --device {device}")
    except ValueError as exc:
        print(f"rnn-gpu bench: {exc}", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 10)
    runners = peers.our_runners(_split(args.backend) or None) + peers.peer_runners(device)
    if args.dry_run:
        return _print_dry_run(cases, runners, repeats, device, args.kernels)
    to_stdout = args.json == "-"
    log = None if to_stdout else (lambda msg: print(msg, file=sys.stderr, flush=True))
    from ._config import float32_precision_set

    with threads.same_threads(n), float32_precision_set(args.float32_precision):
        info = bench.machine_info(n, device)
        peak = None
        if not args.quick and device == "cpu":
            from .bench.peak import peak_gemm_gflops

            info["peak_gemm_gflops"] = peak_gemm_gflops()
            peak = max(info["peak_gemm_gflops"].values())
        save = None
        if args.json and not to_stdout:
            def save(rows_so_far):      # after every case: a bench cut off keeps what it timed
                _write_atomically(args.json, bench.to_json(rows_so_far, info, complete=False))
        rows = bench.run(cases, runners, repeats=repeats, peak_gflops=peak, log=log,
                         after_case=save, kernels=args.kernels or 0)
    if args.json:
        text = bench.to_json(rows, info)
        if to_stdout:
            print(text)
        else:
            _write_atomically(args.json, text)
    if not to_stdout:
        print(bench.format_table(rows, info, markdown=args.markdown))
    # A wrong or failed row is a failure of the command, so that a script or CI running it
    # notices; a runner this machine cannot serve ("unavailable") is not.
    failed = [r for r in rows if r.error and not r.error.startswith("unavailable")]
    if failed:
        print(f"rnn-gpu bench: {len(failed)} row(s) wrong or failed (see 'not timed' under "
              f"the table): " + "; ".join(f"{r.cell} {r.shape} {r.dtype} {r.pass_} {r.runner}"
                                          for r in failed[:5]), file=sys.stderr)
        return 1
    return 0


def _print_dry_run(cases, runners, repeats: int, device: str, kernels: int | None) -> int:
    """``rnn-gpu bench --dry-run``: what the arguments ask for, nothing timed. The lent GPU's
    script (.ci/gpu) is checked this way on the CPU, so that a typo in a stage costs a test
    run here rather than the stage on the card."""
    names = ", ".join(runner.name for runner in runners)
    split = f", each call split by kernel (top {kernels})" if kernels else ""
    print(f"dry run: {len(cases)} cases on {device}, {repeats} repeats, runners: {names}{split}")
    for runner in runners:
        # a runner that can serve none of the cases here (no GPU, no CuPy) would only report
        # "unavailable" rows: say so now (on a GPU machine, where .ci/gpu runs, it may serve)
        reasons = {_runner_reason(runner, case) for case in cases}
        if cases and None not in reasons:
            print(f"  note: {runner.name} serves none of these cases here: "
                  f"{sorted(reasons)[0]}")
    for case in cases:
        print(f"  {case.cell} {case.shape} {case.dtype} {case.pass_}")
    return 0


def _runner_reason(runner, case) -> str | None:
    try:
        return runner.unavailable_reason(case)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _check_bench_backends(names: list[str]) -> None:
    """Every ``--backend NAME[:VARIANT]`` is registered and has that variant: a typo is a
    usage error before any case runs, not a column of failed rows."""
    from . import registry
    from .bench.peers import BackendRunner

    for name in names:
        runner = BackendRunner(name, explicit=True)
        try:
            backend = registry.get(runner.backend)
        except ValueError as exc:
            raise ValueError(f"{exc} (--backend {name})") from None
        reason = runner.variant_reason(backend)
        if reason:
            raise ValueError(f"backend: {reason}")


def _check_writable(arg: str, path: str) -> None:
    """The directory ``path`` goes in exists and takes files: checked before the run, so that
    a typo does not cost the cases already timed."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{arg}: {path!r} is a directory; expected a file path")
    if not os.path.isdir(parent):
        raise ValueError(f"{arg}: the directory {parent!r} of {path!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{arg}: cannot write to the directory {parent!r}")


def _write_atomically(path: str, text: str) -> None:
    """``text`` and a newline into ``path``: a reader (or a kill mid-write) never sees half a
    report (the batch runner's manifest writer: a temporary file, fsynced, renamed over it)."""
    from .batch.sinks import atomic_write_text

    atomic_write_text(path, text + "\n")


def build_parser() -> argparse.ArgumentParser:
    from .bench.cases import LENGTHS

    parser = argparse.ArgumentParser(
        prog="rnn-gpu", description="Fast recurrent layers: the backend table (info), a saved "
        "model over a dataset of sequences (run), our backends against torch.nn (bench).")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and the backend table")
    info.set_defaults(func=_info)
    from .batch.cli import add_parser as add_run_parser

    add_run_parser(sub)
    bench = sub.add_parser(
        "bench", help="throughput of our backends next to torch.nn (cuDNN on a GPU), checked "
                      "first", formatter_class=_BenchHelp,
        description="Time one-layer passes of every available backend and of torch.nn with "
                    "the same weights in one process: on the CPU with the same thread count, "
                    "on a GPU with CUDA events against cuDNN. Every runner's output (and, for "
                    "--pass train, every gradient) is checked against torch.nn first; a wrong "
                    "one is reported, not timed. CPU default: LSTM, GRU, RNN, TwoStageRNN at "
                    "T×B×H = 128×256×128, 64×1024×256, 256×32×512, float32, forward. GPU "
                    "default: the same cells at 256×4096×256, 256×1024×512, 512×64×1024, "
                    "128×16384×128 and 4096×64×256 in float32, float16 and bfloat16, "
                    "forward and train.")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes, float32, forward and 3 repeats: a smoke run of well "
                            "under a minute")
    bench.add_argument("--device", metavar="DEVICE",
                       help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU)")
    bench.add_argument("--pass", dest="pass_", action="append", metavar="PASS",
                       help="forward, train (forward + backward) or all (default: forward on "
                            "the CPU, all on a GPU)")
    bench.add_argument("--cell", action="append", metavar="CELL",
                       help="LSTM, GRU, RNN, TwoStageRNN (comma-separated or repeated)")
    bench.add_argument("--backend", action="append", metavar="NAME",
                       help="our backends to run (default: every registered one that can "
                            "serve the case), NAME:VARIANT for one way of running it "
                            f"({_VARIANTS}); torch.nn always runs as the peer")
    bench.add_argument("--dtype", action="append", metavar="DTYPE",
                       help="CPU: float32 (default) or float64; GPU: float32, float16, "
                            "bfloat16 (default: all three)")
    bench.add_argument("--shape", action="append", metavar="TxBxH",
                       help="T×B×H with I = H, or T×B×I×H (comma-separated or repeated)")
    bench.add_argument("--proj-size", type=int, metavar="P",
                       help="LSTM with a projection of size P (torch.nn's proj_size; LSTM "
                            "only, P below each shape's H)")
    bench.add_argument("--lengths", default="full", choices=LENGTHS,
                       help="full (default): every sequence T steps; uniform: B lengths drawn "
                            "uniformly from 1..T (seeded, unsorted), passed as lengths (to "
                            "torch.nn as a packed sequence); tokens/s and TFLOP/s then count "
                            "the valid steps only")
    bench.add_argument("--repeats", type=int, metavar="N",
                       help="timed calls per runner and case (default 10; 3 with --quick)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="threads for every runner (default: all usable cores)")
    bench.add_argument("--json", nargs="?", const="-", metavar="PATH",
                       help="write the results as JSON to PATH, or to stdout without PATH "
                            "(then no table is printed)")
    bench.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    bench.add_argument("--kernels", nargs="?", type=int, const=6, metavar="N",
                       help="GPU: after timing a case, run each runner's call once more under "
                            "torch.profiler and show its kernels' total time and its N "
                            "costliest kernels (default 6); in the JSON too")
    bench.add_argument("--dry-run", action="store_true",
                       help="check the arguments, the backends and their variants, print the "
                            "cases and runners, time nothing (also with --device cuda where "
                            "there is no GPU)")
    bench.add_argument("--float32-precision", default="ieee", choices=FLOAT32_PRECISIONS,
                       help="float32 products in our GPU backends: ieee (default, as torch.nn "
                            "with TF32 off), tf32x3 (three TF32 tensor-core products, float32's "
                            "accuracy; torch.nn stays IEEE) or tf32 (both sides TF32)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        # building the parser imports the commands' modules (bench's help, if asked for, lists
        # the backends' plugins): a window in which a Ctrl-C printed a traceback. Nothing has
        # run yet. (The commands handle their own interruptions: run's message says what it
        # kept.)
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("rnn-gpu: interrupted before the command started; nothing was done",
              file=sys.stderr)
        return 130
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader of stdout left (`rnn-gpu info | head -3`): no traceback. Python flushes
        # stdout again at exit and would raise there too, so stdout goes to devnull.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):   # no real stdout (captured, closed)
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
