"""Answer text as scores and matches see it: SQuAD normalisation and whole-word mentions (no heavy imports:
the QA loader, the index's SQuAD reader and the CLI's parser use it)."""

from __future__ import annotations

import re
import string


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
