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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnn-gpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and the backend table")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
