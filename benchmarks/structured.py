"""Benchmark structured answers: JSON enforced while decoding (xgrammar token masks) against free decoding.

    .venv/bin/python benchmarks/structured.py --out benchmarks/results/structured-cpu-smollm2.json

The real SmolLM2-135M-Instruct (float32, CPU) answers SQuAD questions (articles 4-5, the first
`--questions`), each prompted with its own paragraph as the one passage, through `Generator.answer_many`
(retro-peft's decode loop): once free and once under `response_format` json_schema
{"answer": string, "confidence": number} (both required). The prompt asks for that JSON in both runs, so
the free run shows what the model does when only asked.

Reported per batch size (1 and 8): the share of answers that parse (json.loads) and have both fields of
the right types, the finish reasons, and the decode time per generated token (wall time of the whole
call / tokens generated; the prompts are the same, so prefill is a shared constant) with its ratio.

Goals (issue 20): 100% of constrained answers parse; at most 1.2x the free decoding time per token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import SQUAD, machine_info, print_json

from retro_peft.base_model import load_base_model
from retro_peft.generation import Generator, SamplingConfig
from retro_peft.generation.grammar import JsonConstraint
from retro_peft.generation.prompt import Passage, RetrievalConfig

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
          "required": ["answer", "confidence"]}
INSTRUCTION = ' Reply with JSON only: {"answer": <the answer>, "confidence": <0 to 1>}.'


def squad_items(limit: int) -> list[tuple[str, Passage]]:
    data = json.loads(SQUAD.read_text())["data"][3:]  # the evaluation articles
    items = []
    for article in data:
        for n, paragraph in enumerate(article["paragraphs"]):
            for qa in paragraph["qas"]:
                if not qa["is_impossible"]:
                    items.append((qa["question"] + INSTRUCTION,
                                  Passage(chunk_id=f"{article['title']}-{n}", doc_id=article["title"],
                                          text=paragraph["context"], title=article["title"])))
                    break  # one question per paragraph: different passages
    return items[:limit]


def valid(text: str) -> bool:
    try:
        document = json.loads(text)
    except ValueError:
        return False
    return (isinstance(document, dict) and isinstance(document.get("answer"), str)
            and isinstance(document.get("confidence"), (int, float)) and not isinstance(document["confidence"], bool))


def run(generator: Generator, items, constraint, batch: int, max_tokens: int) -> dict:
    sampling = SamplingConfig(max_new_tokens=max_tokens)
    answers, start = [], time.perf_counter()
    for i in range(0, len(items), batch):
        part = items[i:i + batch]
        answers += generator.answer_many([q for q, _ in part], passages=[[p] for _, p in part], sampling=sampling,
                                         constraints=None if constraint is None else [constraint] * len(part))
        print(f"  {'json' if constraint else 'free'} batch {batch}: {len(answers)}/{len(items)} "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    tokens = sum(a.completion_tokens for a in answers)
    reasons: dict[str, int] = {}
    for a in answers:
        reasons[a.finish_reason] = reasons.get(a.finish_reason, 0) + 1
    return {"answers": len(answers), "valid_json": sum(valid(a.text) for a in answers) / len(answers),
            "finish_reasons": reasons, "tokens": tokens, "seconds": round(seconds, 2),
            "ms_per_token": round(1000 * seconds / max(tokens, 1), 2), "example": answers[0].text}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the shared 2-core machine; "
                                                            "more spin-wait against other processes)")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_base_model(args.model)
    generator = Generator(model, tokenizer, retrieval=RetrievalConfig(k=1), batch_size=64)
    items = squad_items(args.questions)
    constraint = JsonConstraint.of(SCHEMA)
    generator.runner.grammars.compile(constraint)  # compiled once (cached), as the server does before decoding
    generator.answer_many([items[0][0]], passages=[[items[0][1]]], sampling=SamplingConfig(max_new_tokens=4))  # warm
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        free = run(generator, items, None, batch, args.max_tokens)
        constrained = run(generator, items, constraint, batch, args.max_tokens)
        results[f"batch_{batch}"] = {"free": free, "json_schema": constrained,
                                     "time_per_token_ratio": round(constrained["ms_per_token"] / free["ms_per_token"],
                                                                   3)}
    print_json({"benchmark": "structured", "machine": machine_info(), "model": args.model, "dtype": "float32",
                "threads": torch.get_num_threads(), "questions": len(items), "max_tokens": args.max_tokens,
                "schema": SCHEMA, "grammar_library": "xgrammar", "results": results}, args.out)


if __name__ == "__main__":
    main()
