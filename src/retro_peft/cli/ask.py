"""`retro-peft ask`: answer a question from a domain (or from an index + adapter), with citations; `--chat`:
a conversation read from stdin, each question answered with the earlier questions and answers in its prompt."""

from __future__ import annotations

import json
import sys

from retro_peft.choices import DTYPE_NAMES, check_quantize, check_quantize_skip
from retro_peft.cli import abstain_at, add_answer_arguments, add_history_argument, add_quantize_argument, given
from retro_peft.errors import InputError
from retro_peft.models import DEFAULT_GENERATOR


def register(sub) -> None:
    p = sub.add_parser("ask", help="answer a question with retrieval, citing the chunks used")
    p.add_argument("text", nargs="?", help="the question (not with --chat)")
    p.add_argument("--domain", help="a registered domain, or 'auto' to route (default: the only registered "
                                    "domain, else auto)")
    p.add_argument("--index", help="answer from this index instead of a registered domain")
    p.add_argument("--adapter", help="with --index: the adapter folder to use (default: base model)")
    p.add_argument("--model", help="base model (default: the adapter's, else smollm2-135m)")
    # sampling options left out take SamplingConfig's defaults (greedy, 64 tokens)
    p.add_argument("--max-tokens", type=int, dest="max_new_tokens")
    p.add_argument("--temperature", type=float, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="auto: bfloat16 on CUDA, float32 on a CPU")
    add_quantize_argument(p, "adapters trained on either base answer on it")
    add_answer_arguments(p, "default: the domain's, if any", "the domain's abstain_at, else the rate the head was "
                                                             "calibrated for")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--json", action="store_true", help="the answer as JSON (with --chat: one JSON line per answer)")
    p.add_argument("--chat", action="store_true",
                   help="a conversation: read questions from stdin, one a line, and answer each with the earlier "
                        "questions and answers in its prompt (the domain is picked on the first); Ctrl-D ends it")
    add_history_argument(p, "the domain's, else none (with --chat)")
    p.set_defaults(func=run)


def _targets(args) -> tuple[dict, str]:
    """{domain name: DomainSpec} to load from, and the name to ask (or 'auto')."""
    from retro_peft.domains import AUTO, get_domain, list_domains
    from retro_peft.domains.registry import DomainSpec

    if args.adapter and not args.index:
        raise InputError("--adapter needs --index (the index the adapter reads from)")
    if args.index:
        if args.domain:
            raise InputError("give either --domain or --index, not both")
        return {"ad-hoc": DomainSpec("ad-hoc", args.index, args.adapter)}, "ad-hoc"
    if args.domain and args.domain != AUTO:
        spec = get_domain(args.domain)
        return {spec.name: spec}, spec.name
    specs = list_domains()
    if not specs:
        raise InputError("no domain is registered: run `retro-peft demo`, or `retro-peft domain add`, or pass --index")
    if len(specs) == 1 and not args.domain:
        return {specs[0].name: specs[0]}, specs[0].name
    return {s.name: s for s in specs}, AUTO


def _base_model(args, targets) -> str:
    if args.model:
        return args.model
    from retro_peft.adapters.model import read_retro_config

    for spec in targets.values():
        if spec.adapter:
            return read_retro_config(spec.adapter)["base_model"]["name"]
    return DEFAULT_GENERATOR


def run(args) -> int:
    from retro_peft.generation import SamplingConfig
    from retro_peft.generation.prompt import Turn

    if args.chat and args.text is not None:
        raise InputError("--chat reads the questions from stdin: give no TEXT")
    if args.history and not args.chat:
        raise InputError("--history needs --chat (it builds a follow-up's search query from the conversation)")
    if not args.chat and args.text is None:
        raise InputError("give the question (TEXT), or --chat to read questions from stdin")
    if not args.chat and not args.text.strip():
        raise InputError("the question is empty")
    check_quantize(args.quantize)  # bitsandbytes missing: the pip command before anything is loaded
    args.quantize_skip = check_quantize_skip(args.quantize, args.quantize_skip or ())
    sampling = SamplingConfig(**given(args, "max_new_tokens", "temperature", "top_p", "seed"),
                              stop=tuple(args.stop or ()))
    if not args.chat:
        _reply(args, *_open(args, args.text, sampling), args.text, sampling)
        return 0
    opened, history = None, []
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF (Ctrl-D)
            return 0
        if not line.strip():
            continue
        opened = opened or _open(args, line.strip(), sampling)  # the first question picks the domain
        answer = _reply(args, *opened, line.strip(), sampling, history)
        history.append(Turn("user", line.strip()))
        if answer.text.strip():
            history.append(Turn("assistant", answer.text.strip()))


def _open(args, question: str, sampling):
    """(the bank with the domain to ask loaded, its name or None for the base model, the route taken or None)."""
    from retro_peft.domains import AUTO, Router
    from retro_peft.domains.bank import AdapterBank

    targets, name = _targets(args)
    rate = abstain_at(args)
    route = None
    if name == AUTO:  # route on the indexes first, so only the chosen domain's adapter is loaded
        route = Router({n: spec.index for n, spec in targets.items()}).route(question)
        name = route.domain
    chosen = {name: targets[name]} if name is not None else {}  # the routed domain's adapter names the base
    bank = AdapterBank(_base_model(args, chosen), max_new_tokens=sampling.max_new_tokens, dtype=args.dtype,
                       quantize=args.quantize, quantize_skip=args.quantize_skip)
    if name is not None:
        spec = targets[name]
        bank.load(name, spec.index, spec.adapter, kv_cache=spec.kv_cache, kv_layout=spec.kv_layout,
                  choices=spec.choices, abstain_at=spec.abstain_at if rate is None else rate,
                  history=args.history or spec.history)
    head = bank.domains[name].generator.answerability if name is not None else None
    if rate is not None and head is None:
        print(f"note: --abstain-at is ignored: {f'domain {name}' if name else 'the base model'} has no adapter "
              "answerability head (answerability.json)", file=sys.stderr)
    return bank, name, route


def _reply(args, bank, name, route, question: str, sampling, history=None):
    """Answer `question` (after the conversation's `history`) and print the answer; returns it."""
    head = bank.domains[name].generator.answerability if name is not None else None
    if args.stream and not args.json:
        answer = None
        for piece in bank.stream(question, name, sampling=sampling, choices=args.choices, history=history):
            if isinstance(piece, str):
                print(piece, end="", flush=True)
            else:
                answer = piece
        print()
    else:
        answer = bank.answer(question, name, sampling=sampling, choices=args.choices, history=history)
    if args.json:
        json.dump({
            "answer": answer.text, "domain": name, "abstained": answer.abstained,
            "answerability": answer.answerability,
            "route": None if route is None else {"domain": route.domain, "score": route.score,
                                                  "similarity": route.similarity},
            "citations": [{"chunk_id": c, "doc_id": d, "title": t, "score": s} for c, d, t, s in answer.citations],
            "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "finish_reason": answer.finish_reason, "dropped_turns": answer.dropped_turns,
        }, sys.stdout, ensure_ascii=False)
        print(flush=True)
        return answer
    if not args.stream:
        print(answer.text)
    where = f"domain {name}" if name else "base model (no domain matched; no retrieval)"
    # the score is there when the adapter has an answerability head (with the threshold it was compared with)
    scored = "" if answer.answerability is None else \
        f", answerability {answer.answerability:.3f} (threshold {head.threshold:.3f})"
    dropped = f", {answer.dropped_turns} earliest turns left out" if answer.dropped_turns else ""
    print(f"\n[{where}{', abstained' if answer.abstained else ''}{scored}{dropped}]")
    for i, (chunk_id, doc_id, title, score) in enumerate(answer.citations, start=1):
        print(f"  [{i}] {title or doc_id}  ({chunk_id}, score {score:.3f})")
    sys.stdout.flush()
    return answer
