"""`retro-peft` command line: a thin layer over the Python API.

Each stage of the pipeline registers its own subcommands (`cli/index.py`, ...);
every `RetroPeftError` becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from retro_peft import __version__
from retro_peft.choices import KV_LAYOUTS
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


def add_kv_cache_arguments(p: argparse.ArgumentParser) -> None:
    """--kv-cache FILE and --kv-layout, for the commands that answer through a frozen KV cache."""
    p.add_argument("--kv-cache", metavar="FILE",
                   help="answer through the frozen KV cache in FILE (stored passage states; computed there first "
                        "if FILE does not exist): see docs/kv-cache.md")
    p.add_argument("--kv-layout", choices=KV_LAYOUTS,
                   help="with --kv-cache: block (default; every passage stored, only the question prefilled, answers "
                        "change) or prefix (head and first passage stored, the rest prefilled: a full prefill's "
                        "answers)")


def given(args: argparse.Namespace, *names: str) -> dict:
    """The options among `names` the user set (argparse default None): a config dataclass fills in the rest,
    so each default is written once, in the dataclass (`RetrievalConfig`, `TrainConfig`, `SamplingConfig`)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


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
