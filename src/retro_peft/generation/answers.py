"""What a decoded text means: the `Answer`, SQuAD normalisation, whole-word matches, abstention, citations."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from retro_peft.generation.prompt import Passage


@dataclass
class Answer:
    text: str
    citations: list[tuple[str, str, str, float]] = field(default_factory=list)  # (chunk_id, doc_id, title, score)
    abstained: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    passages: list[Passage] = field(default_factory=list, repr=False)  # what the prompt held
    finish_reason: str = "stop"  # "stop", "length" or "cancelled"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


# Words for "does this text hold the answer": a number keeps its decimal point or separators ("0.8" is one
# word, so "8" is not in it), other punctuation separates ("32-token" holds "32"); case and articles aside.
_WORD = re.compile(r"\d+(?:[.,]\d+)*|[^\W_]+")


def _words(text: str) -> str:
    return " ".join(w for w in _WORD.findall(text.lower()) if w not in ("a", "an", "the"))


def mentions(text: str, answer: str) -> bool:
    """`answer` occurs in `text` as whole words: "1" is not in "1945", "8" not in "0.8" or "448"."""
    answer = _words(answer)
    return bool(answer) and f" {answer} " in f" {_words(text)} "


def is_abstention(text: str, phrase: str) -> bool:
    """The answer is (or starts with) the abstention phrase, after normalisation."""
    norm, target = normalize_answer(text), normalize_answer(phrase)
    return bool(target) and norm.startswith(target)


def cite(answer: str, passages: list[Passage]) -> list[tuple[str, str, str, float]]:
    """The passages that contain the answer (as whole words); if none does, every passage the prompt held."""
    hits = [p for p in passages if mentions(p.text, answer)] or list(passages)
    return [(p.chunk_id, p.doc_id, p.title, p.score) for p in hits]
