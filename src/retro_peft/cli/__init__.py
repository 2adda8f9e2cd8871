"""`retro-peft` command line: a thin layer over the Python API.

Each stage of the pipeline registers its own subcommands (`cli/index.py`, ...);
every `RetroPeftError` becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from retro_peft import __version__
from retro_peft.errors import RetroPeftError


def build_parser() -> argparse.ArgumentParser:
    # Each module keeps its heavy imports (torch, transformers, uvicorn) inside its
    # commands, so `retro-peft --help` stays fast.
    from retro_peft.cli import ask, demo, domain, evaluate, index, serve, train

    parser = argparse.ArgumentParser(prog="retro-peft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"retro-peft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (index, train, evaluate, ask, domain, demo, serve):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("retro_peft").setLevel(logging.INFO)  # progress messages
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RetroPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
