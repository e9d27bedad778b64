"""``rnn-gpu run MODEL INPUT OUTPUT``: the command-line face of :mod:`rnn_gpu.batch.run`.

Progress and notes go to stderr, the JSON summary to stdout. Exit codes: 0 done, 2 a usage
error (bad arguments or files; nothing computed), 1 a runtime failure (disk full, out of
memory; what was finished is kept and a rerun resumes), 130 interrupted (resumable too).
"""

from __future__ import annotations

import argparse
import json
import sys

from .apply import EMITS
from .errors import RunFailure, UsageError

DESCRIPTION = """\
Stream the sequences of INPUT through the model in MODEL and write the results to OUTPUT.

MODEL   a file written by rnn_gpu.save (with a Readout for --emit probs).
INPUT   sequence-major data of shape (N, T, I): a .npy file, a directory of .npy shards
        (concatenated in natural name order) or a zarr array (*.zarr).
OUTPUT  a .npy file, or a zarr array when the name ends in .zarr. Beside it,
        OUTPUT.manifest.json records the job and its finished chunks: rerunning the same
        command after an interruption resumes where it stopped.

Lengths: --lengths PATH (N ints in [0, T]); without it, INPUT's companion file is used when
there is one (data.npy -> data.lengths.npy, a shard directory -> its lengths.npy), else every
sequence has length T.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``run`` on the ``rnn-gpu`` command's subparsers."""
    p = subparsers.add_parser(
        "run", help="stream a dataset of sequences through a saved model (resumable)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="weights file written by rnn_gpu.save")
    p.add_argument("input", metavar="INPUT", help=".npy file, directory of .npy shards, or zarr")
    p.add_argument("output", metavar="OUTPUT", help=".npy file or .zarr array to write")
    p.add_argument("--emit", choices=EMITS, default="last",
                   help="last: final hidden state (N, D*H); sequence: every output "
                        "(N, T, D*H), zero past each length; probs: the Readout's class "
                        "probabilities (N, T, C). Default: last")
    p.add_argument("--batch-size", type=int, default=256, metavar="B",
                   help="sequences per batch (default 256); halved automatically on out of "
                        "memory")
    p.add_argument("--lengths", metavar="PATH", help=".npy of N sequence lengths")
    p.add_argument("--no-lengths", action="store_true",
                   help="do not look for a lengths file beside INPUT")
    p.add_argument("--backend", metavar="NAME", help="backend to use (default: automatic)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "float64"),
                   help="compute dtype (default: the model's); the input is cast to it")
    p.add_argument("--device", default="cpu", help='"cpu" (default), "cuda" or "cuda:N"')
    p.add_argument("--chunk-size", type=int, metavar="ROWS",
                   help="sequences per output chunk, the unit of resuming and of length "
                        "bucketing (default: up to 8 batches and ~32 MiB, but at least "
                        "one batch)")
    p.add_argument("--no-bucket", action="store_true",
                   help="keep input order inside batches instead of grouping similar lengths")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT even if it holds another job's results")
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the batches on a Dask cluster (needs rnn-gpu[dask])")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.lengths is not None and args.no_lengths:
        return _fail(UsageError("--lengths: cannot be combined with --no-lengths"))
    try:
        # the import inside the try: a Ctrl-C while the runner's modules load is an
        # interruption like any other, not a traceback
        from .run import RunOptions, run

        opts = RunOptions(
            model=args.model, input=args.input, output=args.output,
            batch_size=args.batch_size, emit=args.emit, backend=args.backend, dtype=args.dtype,
            device=args.device, lengths=args.lengths, find_lengths=not args.no_lengths,
            chunk_rows=args.chunk_size, bucket=not args.no_bucket, overwrite=args.overwrite,
            quiet=args.quiet, scheduler=args.scheduler)
        summary = run(opts)
    except (UsageError, RunFailure) as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        print("rnn-gpu run: interrupted; the chunks already written are kept, rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary), flush=True)
    return 0


def _fail(exc) -> int:
    print(f"rnn-gpu run: {exc}", file=sys.stderr)
    return exc.exit_code
