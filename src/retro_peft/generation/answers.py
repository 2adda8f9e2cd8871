"""What a decoded text means: the `Answer`, SQuAD normalisation, whole-word matches, abstention, citations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from retro_peft.generation.prompt import Passage
from retro_peft.text import mentions, normalize_answer

__all__ = ["Answer", "cite", "is_abstention", "mentions", "normalize_answer", "split_citations"]


@dataclass
class Answer:
    text: str
    citations: list[tuple[str, str, str, float]] = field(default_factory=list)  # (chunk_id, doc_id, title, score)
    abstained: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    passages: list[Passage] = field(default_factory=list, repr=False)  # what the prompt held
    finish_reason: str = "stop"  # "stop", "length" or "cancelled"
    # The calibrated answerability score (an adapter's head; None without one): below its threshold, abstained.
    answerability: float | None = None
    dropped_turns: int = 0  # earlier turns of the conversation left out of the prompt to fit its budget
    # SamplingConfig.logprobs: per generated token (citation markers included), (token id, log p,
    # [(alternative id, log p), ...]); None when not asked for, or for a scored (choice) or abstained answer
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = field(default=None, repr=False)


def is_abstention(text: str, phrase: str) -> bool:
    """The answer is (or starts with) the abstention phrase, after normalisation."""
    norm, target = normalize_answer(text), normalize_answer(phrase)
    return bool(target) and norm.startswith(target)


# ALCE-style citation markers: "[2]" or "[1][3]", anywhere in the answer (a trained adapter ends with them).
_MARKERS = re.compile(r"\s*\[(\d{1,3})\]")


def split_citations(text: str, passages: list[Passage]) -> tuple[str, list[Passage]]:
    """(the text without its markers, the passages they name, in order). Markers naming no passage of the
    prompt are dropped from the text too: they cite nothing."""
    cited = []
    for m in _MARKERS.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= len(passages) and passages[n - 1] not in cited:
            cited.append(passages[n - 1])
    return _MARKERS.sub("", text).strip(), cited


def cite(answer: str, passages: list[Passage], cited: list[Passage] | None = None) -> list[tuple[str, str, str, float]]:
    """The passages the answer cites: those its markers name (`cited`, from `split_citations`); without
    markers, those that contain the answer (as whole words); if none does, every passage the prompt held."""
    hits = cited or [p for p in passages if mentions(p.text, answer)] or list(passages)
    return [(p.chunk_id, p.doc_id, p.title, p.score) for p in hits]
