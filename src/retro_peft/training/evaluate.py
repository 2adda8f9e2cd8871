"""Answer evaluation: SQuAD exact match and token F1, abstention and retrieval recall.

- `em`, `f1`: on answerable questions, max over the gold answers, SQuAD
  normalisation (lower case, no punctuation, no articles). An abstention scores 0.
- `abstain_unanswerable`: share of unanswerable questions answered with the abstention phrase.
- `answer_answerable`: share of answerable questions NOT answered with it.
- `retrieval_recall`: share of questions with known gold documents whose gold
  document is among the chunks the prompt held (None in closed-book mode).
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

from retro_peft.generation import Answer, Generator, normalize_answer
from retro_peft.qa import QAItem


def exact_match(prediction: str, answers) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers) -> float:
    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)
    return max((f1(prediction, a) for a in answers), default=0.0)


@dataclass
class EvalResult:
    n: int
    em: float | None
    f1: float | None
    abstain_unanswerable: float | None
    answer_answerable: float | None
    retrieval_recall: float | None
    n_answerable: int = 0
    n_unanswerable: int = 0
    prompt_tokens: float = 0.0  # mean per question
    predictions: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        return d


def score(items: list[QAItem], answers: list[Answer], *, retrieval: bool) -> EvalResult:
    answerable = [(it, a) for it, a in zip(items, answers) if it.answers and not it.is_impossible]
    unanswerable = [(it, a) for it, a in zip(items, answers) if not (it.answers and not it.is_impossible)]
    with_gold = [(it, a) for it, a in zip(items, answers) if it.gold_doc_ids]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    return EvalResult(
        n=len(items),
        em=mean(0.0 if a.abstained else exact_match(a.text, it.answers) for it, a in answerable),
        f1=mean(0.0 if a.abstained else token_f1(a.text, it.answers) for it, a in answerable),
        abstain_unanswerable=mean(float(a.abstained) for _, a in unanswerable),
        answer_answerable=mean(float(not a.abstained) for _, a in answerable),
        retrieval_recall=mean(float(any(p.doc_id in it.gold_doc_ids for p in a.passages)) for it, a in with_gold)
        if retrieval else None,
        n_answerable=len(answerable),
        n_unanswerable=len(unanswerable),
        prompt_tokens=mean(a.prompt_tokens for a in answers) or 0.0,
        predictions=[{"id": it.id, "question": it.question, "answers": list(it.answers), "prediction": a.text,
                      "abstained": a.abstained, "citations": [list(c) for c in a.citations]}
                     for it, a in zip(items, answers)],
    )


def evaluate(generator: Generator, items: list[QAItem], *, retrieval: bool = True, limit: int | None = None) -> EvalResult:
    """Answer `items` (batched) and score them; `retrieval=False` answers closed book."""
    items = items[:limit] if limit else items
    questions = [it.question for it in items]
    passages = None if retrieval else [[] for _ in items]
    answers = generator.answer_many(questions, passages=passages)
    return score(items, answers, retrieval=retrieval and generator.index is not None)
