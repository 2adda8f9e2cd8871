"""`retro-peft` command line: a thin layer over the Python API.

Each stage of the pipeline registers its own subcommands (`cli/index.py`, ...);
every `RetroPeftError` becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from retro_peft import __version__
from retro_peft.choices import HISTORY_STRATEGIES, KV_LAYOUTS
from retro_peft.errors import RetroPeftError


def build_parser() -> argparse.ArgumentParser:
    # Each module keeps its heavy imports (torch, transformers, uvicorn) inside its
    # commands, so `retro-peft --help` stays fast.
    from retro_peft.cli import ask, demo, domain, evaluate, index, serve, train, train_retriever

    parser = argparse.ArgumentParser(prog="retro-peft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"retro-peft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (index, train_retriever, train, evaluate, ask, domain, demo, serve):
        module.register(sub)
    return parser


def add_kv_cache_arguments(p: argparse.ArgumentParser) -> None:
    """--kv-cache FILE and --kv-layout, for the commands that answer through a frozen KV cache."""
    p.add_argument("--kv-cache", metavar="FILE",
                   help="answer through the frozen KV cache in FILE (stored passage states; computed there first "
                        "if FILE does not exist): see docs/kv-cache.md")
    p.add_argument("--kv-layout", choices=KV_LAYOUTS,
                   help="with --kv-cache: block (default; every passage stored, only the question prefilled, answers "
                        "change), prefix (head and first passage stored, the rest prefilled: a full prefill's "
                        "answers) or blend (block, then the first 16 tokens of each later passage recomputed)")


def add_answer_arguments(p: argparse.ArgumentParser, choices_default: str, abstain_default: str) -> None:
    """--choices and --abstain-at, for `ask` and for a domain's defaults (`domain add`)."""
    p.add_argument("--choices", type=parse_choices, metavar="A,B,...",
                   help=f"comma-separated answer choices: every answer is exactly one of them ({choices_default})")
    p.add_argument("--abstain-at", metavar="answer_rate=R|off",
                   help="abstain below the adapter's calibrated answerability head's threshold for answer rate R "
                        f"(0 < R <= 1), or never by the score (off); default: {abstain_default}")


def add_history_argument(p: argparse.ArgumentParser, default: str) -> None:
    """--history, for a domain's strategy (`domain add`) and `ask --chat`."""
    p.add_argument("--history", choices=HISTORY_STRATEGIES,
                   help="how a follow-up's search query is built from the conversation: none (the question alone), "
                        "concat (with the previous turns, the newest weighted most) or rewrite (condensed into a "
                        f"standalone question by the base model); default: {default}")


def parse_choices(text: str) -> tuple[str, ...]:
    from retro_peft.domains.registry import check_choices

    try:
        return check_choices([c.strip() for c in text.split(",")], "--choices")
    except RetroPeftError as e:  # argparse shows its message for an ArgumentTypeError only
        raise argparse.ArgumentTypeError(str(e)) from None


def abstain_at(args: argparse.Namespace) -> float | None:
    """--abstain-at as an answer rate (0: off), or None when not given."""
    if args.abstain_at is None:
        return None
    from retro_peft.generation.answerability import parse_abstain_at  # loads torch

    return parse_abstain_at(args.abstain_at)


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
