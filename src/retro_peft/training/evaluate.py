"""Answer evaluation, one JSON shape for every answer kind (a score that does not apply is None).

- span (SQuAD): `em`, `f1`: on answerable questions, max over the gold answers, SQuAD
  normalisation (lower case, no punctuation, no articles). An abstention scores 0.
- choice: `accuracy` and `macro_f1` over the choices (an abstention is a wrong answer),
  beside `majority_accuracy`, the accuracy of always answering the most frequent gold
  answer of these very questions (the best constant answer: a strict baseline).
- free: `token_f1` (SQuAD's token F1) and `rouge_l` (ROUGE-L F-measure, Google's
  `rouge-score` with its stemmer).
- every kind: `f1_answered` (the kind's main score over the answered answerable
  questions only), `abstain_unanswerable` (share of unanswerable questions abstained on),
  `answer_answerable` (share of answerable ones answered), `retrieval_recall` (share of
  questions whose prompt held a gold passage: a chunk of a gold document, or, for a span
  question without gold documents, a chunk holding the answer's words; None closed book),
  `citation_precision` (cited passages that belong to a gold document, over all cited, on
  answered answerable questions with gold documents) and `citation_recall` (share of those
  questions whose prompt held a gold passage that cite one).
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

from retro_peft.generation import Answer, Generator, normalize_answer
from retro_peft.text import mentions
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


_ROUGE = None


def rouge_l(prediction: str, answers) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max((_ROUGE.score(a, prediction)["rougeL"].fmeasure for a in answers), default=0.0)


def macro_f1(predictions: list[str | None], golds: list[str]) -> float:
    """Mean per-class F1 over the gold classes (a prediction outside them, e.g. None for abstained, is wrong)."""
    scores = []
    for label in sorted(set(golds)):
        tp = sum(p == g == label for p, g in zip(predictions, golds))
        fp = sum(p == label != g for p, g in zip(predictions, golds))
        fn = sum(g == label != p for p, g in zip(predictions, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


@dataclass
class EvalResult:
    n: int
    kind: str
    em: float | None = None
    f1: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    majority_accuracy: float | None = None
    token_f1: float | None = None
    rouge_l: float | None = None
    f1_answered: float | None = None
    abstain_unanswerable: float | None = None
    answer_answerable: float | None = None
    retrieval_recall: float | None = None
    citation_precision: float | None = None
    citation_recall: float | None = None
    n_answerable: int = 0
    n_unanswerable: int = 0
    prompt_tokens: float = 0.0  # mean per question
    predictions: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        return d


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def is_gold_passage(passage, item: QAItem) -> bool:
    if item.gold_doc_ids:
        return passage.doc_id in item.gold_doc_ids
    return item.kind == "span" and any(mentions(passage.text, a) for a in item.answers)


def score(items: list[QAItem], answers: list[Answer], *, retrieval: bool) -> EvalResult:
    kinds = {it.kind for it in items}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    answerable = [(it, a) for it, a in zip(items, answers) if it.answerable]
    unanswerable = [(it, a) for it, a in zip(items, answers) if not it.answerable]
    answered = [(it, a) for it, a in answerable if not a.abstained]
    result = EvalResult(n=len(items), kind=kind, n_answerable=len(answerable), n_unanswerable=len(unanswerable),
                        abstain_unanswerable=_mean(float(a.abstained) for _, a in unanswerable),
                        answer_answerable=_mean(float(not a.abstained) for _, a in answerable),
                        prompt_tokens=_mean(a.prompt_tokens for a in answers) or 0.0)
    main = {"span": token_f1, "free": token_f1, "choice": exact_match}.get(kind, token_f1)
    result.f1_answered = _mean(main(a.text, it.answers) for it, a in answered)
    if kind == "span":
        result.em = _mean(0.0 if a.abstained else exact_match(a.text, it.answers) for it, a in answerable)
        result.f1 = _mean(0.0 if a.abstained else token_f1(a.text, it.answers) for it, a in answerable)
    elif kind == "choice" and answerable:
        golds = [it.answers[0] for it, _ in answerable]
        predicted = [None if a.abstained else a.text for _, a in answerable]
        result.accuracy = _mean(float(p is not None and exact_match(p, it.answers) > 0)
                                for p, (it, _) in zip(predicted, answerable))
        result.macro_f1 = macro_f1(predicted, golds)
        result.majority_accuracy = collections.Counter(golds).most_common(1)[0][1] / len(golds)
    elif kind == "free":
        result.token_f1 = _mean(0.0 if a.abstained else token_f1(a.text, it.answers) for it, a in answerable)
        result.rouge_l = _mean(0.0 if a.abstained else rouge_l(a.text, it.answers) for it, a in answerable)
    if retrieval:
        result.retrieval_recall = _mean(float(any(is_gold_passage(p, it) for p in a.passages))
                                        for it, a in zip(items, answers) if it.gold_doc_ids or it.kind == "span")
    cited = [(it, a) for it, a in answered if it.gold_doc_ids and a.citations]
    if retrieval and cited:
        flat = [c[1] in it.gold_doc_ids for it, a in cited for c in a.citations]
        result.citation_precision = sum(flat) / len(flat)
        held = [(it, a) for it, a in answered if it.gold_doc_ids and any(p.doc_id in it.gold_doc_ids for p in a.passages)]
        result.citation_recall = _mean(float(any(c[1] in it.gold_doc_ids for c in a.citations)) for it, a in held)
    result.predictions = [{"id": it.id, "question": it.question, "answers": list(it.answers), "prediction": a.text,
                           "abstained": a.abstained, "answerability": a.answerability,
                           "citations": [list(c) for c in a.citations]} for it, a in zip(items, answers)]
    return result


def evaluate(generator: Generator, items: list[QAItem], *, retrieval: bool = True, limit: int | None = None,
             progress: bool = False, desc: str = "answer") -> EvalResult:
    """Answer `items` (in the generator's batches; a choice question by its choices) and score them;
    `retrieval=False`: closed book. progress: a bar over the questions (on stderr)."""
    from tqdm.auto import tqdm

    items = items[:limit] if limit else items
    answers = []
    with tqdm(total=len(items), desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, len(items), generator.batch_size):  # the batches answer_many would cut
            batch = items[start:start + generator.batch_size]
            answers += generator.answer_many([it.question for it in batch],
                                             passages=None if retrieval else [[] for _ in batch],
                                             choices=[it.choices or None for it in batch])
            bar.update(len(batch))
    return score(items, answers, retrieval=retrieval and generator.index is not None)
