"""`retro-peft` command line: a thin layer over the Python API.

Each stage of the pipeline registers its own subcommands (`cli/index.py`, ...);
every `RetroPeftError` becomes a one-line message and exit status 2. Results go to
stdout, retro-peft's own messages to stderr; other libraries' logs, progress bars and
warnings are off unless `-v/--verbose` (or `RETRO_PEFT_LOG=debug`) asks for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from retro_peft import __version__
from retro_peft.choices import HISTORY_STRATEGIES, KV_LAYOUTS, QUANTIZE_MODES
from retro_peft.errors import MissingPackageError, RetroPeftError


def build_parser() -> argparse.ArgumentParser:
    # Each module keeps its heavy imports (torch, transformers, uvicorn) inside its
    # commands, so `retro-peft --help` stays fast.
    from retro_peft.cli import (ask, calibrate, demo, domain, evaluate, export, gptq, index, serve, train,
                                train_retriever)

    parser = argparse.ArgumentParser(prog="retro-peft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"retro-peft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show other libraries' logs, progress bars and warnings (also: RETRO_PEFT_LOG=debug)")
    for module in (index, train_retriever, train, calibrate, evaluate, export, gptq, ask, domain, demo, serve):
        module.register(sub)
    for command in sub.choices.values():  # `retro-peft ask ... -v` as well as `retro-peft -v ask ...`
        for child in [command, *_subcommands(command)]:
            child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [p for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for p in action.choices.values()]


# Libraries whose logs and warnings are noise around a command's output (loading bars, deprecation notices).
THIRD_PARTY = ("transformers", "sentence_transformers", "huggingface_hub", "peft", "bm25s", "datasets", "faiss",
               "accelerate", "torch", "urllib3", "httpx", "qdrant_client", "bitsandbytes")


def quiet(verbose: bool) -> None:
    """Other libraries' logs (below errors), progress bars and warnings off, unless `verbose`."""
    if verbose:
        return
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # transformers reads this switch when it is imported ("Loading weights" bars)
    # Read by transformers when first imported (it resets its logger's level then); if already imported, below.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    pattern = "|".join(THIRD_PARTY)
    for category in (FutureWarning, DeprecationWarning, UserWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category, module=f"({pattern})(\\.|$)")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    """--no-progress, for the commands with long jobs (embedding, answering, training, a frozen KV cache build)."""
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (none either when stderr is not a terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars (on stderr) unless --no-progress, and only when stderr is a terminal: `retro_peft.progress`."""
    from retro_peft import progress

    return progress.enabled(not getattr(args, "no_progress", False))


def add_kv_cache_arguments(p: argparse.ArgumentParser) -> None:
    """--kv-cache FILE and --kv-layout, for the commands that answer through a frozen KV cache."""
    p.add_argument("--kv-cache", metavar="FILE",
                   help="answer through the frozen KV cache in FILE (stored passage states; computed there first "
                        "if FILE does not exist): see docs/kv-cache.md")
    p.add_argument("--kv-layout", choices=KV_LAYOUTS,
                   help="with --kv-cache: block (default; every passage stored, only the question prefilled, answers "
                        "change), prefix (head and first passage stored, the rest prefilled: a full prefill's "
                        "answers), blend (block, then the first 16 tokens of each later passage recomputed) or "
                        "deviation (block, then the 15%% of later passages' tokens whose states deviate most "
                        "recomputed, as CacheBlend)")


def add_quantize_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--quantize 4bit|8bit and --quantize-skip NAMES, for the commands that load a base model (train, eval, ask)."""
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help=f"load the base model's linear layers quantized by bitsandbytes ({what}): 4bit (NF4, double "
                        "quantization, bfloat16 compute) or 8bit (LLM.int8()); needs pip install "
                        "'retro-peft[quantize]'")
    p.add_argument("--quantize-skip", type=parse_quantize_skip, metavar="NAMES",
                   help="with --quantize: comma-separated linear layers kept unquantized, in the load dtype, by the "
                        "end of their name, e.g. down_proj or down_proj,k_proj,v_proj (measured on SmolLM2-135M: 4-bit's KL "
                        "from the float32 next-token distribution 0.37 -> 0.25 / 0.16 nats, for 25% / 31% of the "
                        "weights in full precision)")


def parse_quantize_skip(text: str) -> tuple[str, ...]:
    """--quantize-skip's comma-separated names, as a tuple (checked against the model when it is loaded)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"give the linear layers to keep unquantized, e.g. down_proj,v_proj; "
                                         f"got {text!r}")
    return names


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
    args = build_parser().parse_args(argv)
    debug = os.environ.get("RETRO_PEFT_LOG", "").lower() == "debug"
    # retro-peft's progress messages (stderr); debug: everything
    logging.getLogger("retro_peft").setLevel(logging.DEBUG if debug else logging.INFO)
    quiet(args.verbose or debug)
    try:
        return int(args.func(args) or 0)
    except RetroPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package (serve, qdrant): the pip command; anything else: a bug
        missing = MissingPackageError.of(e, f"retro-peft {args.command}")
        if missing is None:
            raise
        print(f"error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
