"""`egmla-bench`: what each attention variant costs in speed and memory.

egmla-bench train ...    training-step throughput, MFU and peak memory (egmla.bench.train)
egmla-bench decode ...   decode-step latency, cache bytes and batch that fits a budget (egmla.bench.decode)
"""

from __future__ import annotations

import argparse
import sys

from . import decode, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="egmla-bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    decode.add_parser(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to relaunch itself, one process per GPU
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
